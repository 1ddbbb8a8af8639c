//! Compact objects by namespace and name, fed by one watcher with kube-rs's reflector
//! semantics: a (re-)list is buffered and swapped in whole when it completes, so the store never
//! shows a half-listed state, and until then it keeps the last known objects.

use std::collections::HashMap;

/// By namespace, then name: a namespace's name is stored once, not once per object, and a
/// lookup by borrowed names needs no allocation.
type Namespaces<T> = HashMap<String, HashMap<String, T>>;

#[derive(Debug)]
pub(super) struct Store<T> {
    objects: Namespaces<T>,
    /// The list in progress, if any.
    listing: Option<Namespaces<T>>,
}

impl<T> Default for Store<T> {
    fn default() -> Self {
        Self { objects: HashMap::new(), listing: None }
    }
}

impl<T> Store<T> {
    /// A list starts: a previous unfinished one is abandoned (the watcher restarted it).
    pub(super) fn start_list(&mut self) {
        self.listing = Some(HashMap::new());
    }

    /// One object of the list in progress; `None` is an object the source does not keep.
    pub(super) fn listed(&mut self, namespace: &str, name: String, object: Option<T>) {
        let listing = self.listing.get_or_insert_with(HashMap::new);
        put(listing, namespace, name, object);
    }

    /// The list completed: it replaces every object.
    pub(super) fn finish_list(&mut self) {
        self.objects = self.listing.take().unwrap_or_default();
    }

    /// A watch event's object; `None` is one the source does not keep (any earlier version
    /// goes). Returns the version it replaced.
    pub(super) fn put(&mut self, namespace: &str, name: String, object: Option<T>) -> Option<T> {
        put(&mut self.objects, namespace, name, object)
    }

    /// Returns the removed object.
    pub(super) fn remove(&mut self, namespace: &str, name: &str) -> Option<T> {
        remove(&mut self.objects, namespace, name)
    }

    pub(super) fn get(&self, namespace: &str, name: &str) -> Option<&T> {
        self.objects.get(namespace)?.get(name)
    }

    /// Every object with its namespace and name, in no particular order.
    pub(super) fn iter(&self) -> impl Iterator<Item = (&str, &str, &T)> {
        self.objects.iter().flat_map(|(namespace, objects)| {
            objects.iter().map(move |(name, object)| (namespace.as_str(), name.as_str(), object))
        })
    }

    pub(super) fn len(&self) -> usize {
        self.objects.values().map(HashMap::len).sum()
    }
}

fn put<T>(map: &mut Namespaces<T>, namespace: &str, name: String, object: Option<T>) -> Option<T> {
    let Some(object) = object else { return remove(map, namespace, &name) };
    if let Some(objects) = map.get_mut(namespace) {
        return objects.insert(name, object);
    }
    map.insert(namespace.to_owned(), HashMap::from([(name, object)]));
    None
}

fn remove<T>(map: &mut Namespaces<T>, namespace: &str, name: &str) -> Option<T> {
    let objects = map.get_mut(namespace)?;
    let removed = objects.remove(name);
    if objects.is_empty() {
        map.remove(namespace);
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(store: &Store<u32>) -> Vec<(String, String, u32)> {
        let mut names: Vec<_> =
            store.iter().map(|(ns, name, v)| (ns.to_owned(), name.to_owned(), *v)).collect();
        names.sort();
        names
    }

    fn entry(namespace: &str, name: &str, value: u32) -> (String, String, u32) {
        (namespace.to_owned(), name.to_owned(), value)
    }

    #[test]
    fn a_list_shows_only_once_complete_and_replaces_everything() {
        let mut store = Store::default();
        store.put("default", "old".to_owned(), Some(1));
        store.start_list();
        store.listed("default", "a".to_owned(), Some(2));
        store.listed("kube-system", "b".to_owned(), Some(3));
        store.listed("default", "c".to_owned(), None);
        assert_eq!(names(&store), [entry("default", "old", 1)], "half a list is not shown");
        store.finish_list();
        assert_eq!(
            names(&store),
            [entry("default", "a", 2), entry("kube-system", "b", 3)],
            "the list replaced the old objects"
        );
        assert_eq!(store.len(), 2);
    }

    #[test]
    fn watch_events_replace_and_remove_single_objects() {
        let mut store = Store::default();
        assert_eq!(store.put("default", "a".to_owned(), Some(1)), None);
        assert_eq!(store.put("default", "a".to_owned(), Some(2)), Some(1), "the replaced version");
        assert_eq!(store.put("other", "a".to_owned(), Some(3)), None, "another namespace's a");
        assert_eq!(store.put("other", "a".to_owned(), None), Some(3), "no longer kept: gone");
        assert_eq!(store.get("default", "a"), Some(&2));
        assert_eq!(store.remove("default", "a"), Some(2));
        assert_eq!(store.remove("default", "a"), None);
        assert_eq!(store.len(), 0);
        assert_eq!(store.get("default", "a"), None);
    }

    #[test]
    fn a_restarted_list_drops_the_abandoned_one() {
        let mut store = Store::default();
        store.start_list();
        store.listed("default", "a".to_owned(), Some(1));
        store.start_list();
        store.listed("default", "b".to_owned(), Some(2));
        store.finish_list();
        assert_eq!(names(&store), [entry("default", "b", 2)]);
    }
}
