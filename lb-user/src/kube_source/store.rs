//! Compact objects by namespace and name, fed by one watcher with kube-rs's reflector
//! semantics: a (re-)list is buffered and swapped in whole when it completes, so the store never
//! shows a half-listed state, and until then it keeps the last known objects.

use std::collections::{HashMap, hash_map};

/// An object's namespace and name.
pub(super) type ObjectKey = (String, String);

#[derive(Debug)]
pub(super) struct Store<T> {
    objects: HashMap<ObjectKey, T>,
    /// The list in progress, if any.
    listing: Option<HashMap<ObjectKey, T>>,
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
    pub(super) fn listed(&mut self, key: ObjectKey, object: Option<T>) {
        let listing = self.listing.get_or_insert_with(HashMap::new);
        match object {
            Some(object) => listing.insert(key, object),
            None => listing.remove(&key),
        };
    }

    /// The list completed: it replaces every object.
    pub(super) fn finish_list(&mut self) {
        self.objects = self.listing.take().unwrap_or_default();
        self.objects.shrink_to_fit();
    }

    /// A watch event's object; `None` is one the source does not keep (any earlier version
    /// goes). Returns the version it replaced.
    pub(super) fn put(&mut self, key: ObjectKey, object: Option<T>) -> Option<T> {
        match object {
            Some(object) => self.objects.insert(key, object),
            None => self.objects.remove(&key),
        }
    }

    /// Returns the removed object.
    pub(super) fn remove(&mut self, key: &ObjectKey) -> Option<T> {
        self.objects.remove(key)
    }

    pub(super) fn get(&self, namespace: &str, name: &str) -> Option<&T> {
        // The key is a pair of owned strings: a lookup by borrowed parts needs them owned too,
        // which costs two small allocations per lookup, negligible next to building a model.
        self.objects.get(&(namespace.to_owned(), name.to_owned()))
    }

    pub(super) fn iter(&self) -> hash_map::Iter<'_, ObjectKey, T> {
        self.objects.iter()
    }

    pub(super) fn len(&self) -> usize {
        self.objects.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> ObjectKey {
        ("default".to_owned(), name.to_owned())
    }

    fn names(store: &Store<u32>) -> Vec<(String, u32)> {
        let mut names: Vec<_> = store.iter().map(|((_, name), v)| (name.clone(), *v)).collect();
        names.sort();
        names
    }

    #[test]
    fn a_list_shows_only_once_complete_and_replaces_everything() {
        let mut store = Store::default();
        store.put(key("old"), Some(1));
        store.start_list();
        store.listed(key("a"), Some(2));
        store.listed(key("b"), None);
        assert_eq!(names(&store), [("old".to_owned(), 1)], "half a list is not shown");
        store.finish_list();
        assert_eq!(names(&store), [("a".to_owned(), 2)], "the list replaced the old objects");
    }

    #[test]
    fn watch_events_replace_and_remove_single_objects() {
        let mut store = Store::default();
        assert_eq!(store.put(key("a"), Some(1)), None);
        assert_eq!(store.put(key("a"), Some(2)), Some(1), "the replaced version");
        assert_eq!(store.put(key("b"), Some(3)), None);
        assert_eq!(store.put(key("b"), None), Some(3), "an object no longer kept goes");
        assert_eq!(store.remove(&key("a")), Some(2));
        assert_eq!(store.len(), 0);
        assert_eq!(store.get("default", "a"), None);
    }

    #[test]
    fn a_restarted_list_drops_the_abandoned_one() {
        let mut store = Store::default();
        store.start_list();
        store.listed(key("a"), Some(1));
        store.start_list();
        store.listed(key("b"), Some(2));
        store.finish_list();
        assert_eq!(names(&store), [("b".to_owned(), 2)]);
    }
}
