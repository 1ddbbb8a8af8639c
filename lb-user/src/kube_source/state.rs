//! What the Service and EndpointSlice watchers keep: each object in the compact normalised form
//! the model is built from (the API objects are many times larger), and the change log, under
//! one lock so that the daemon sees a change together with the objects it names.

use k8s_openapi::{
    Metadata as _,
    api::{core::v1::Service, discovery::v1::EndpointSlice},
};
use kube::{ResourceExt as _, runtime::watcher};

use super::{
    changes::{ChangeLog, Changes},
    decoded::{Decoded, Malformed},
    store::Store,
};
use crate::{
    config::NodeConfig,
    model::{
        self, KeptService, KeptSlice, NodeNames, ServiceName, ServiceObjects, keep_slice,
        service_name, slice_service_name,
    },
};

#[derive(Debug, Default)]
pub(super) struct Objects {
    services: Store<KeptService>,
    slices: Store<OwnedSlice>,
    /// Objects the API returned that did not decode (see `decoded`), with why. The last
    /// readable version of each, if there was one, stays in the stores above.
    malformed_services: Store<String>,
    malformed_slices: Store<String>,
    changes: ChangeLog,
    node_names: NodeNames,
}

/// A slice with the service it belongs to.
#[derive(Debug, Clone)]
struct OwnedSlice {
    service: ServiceName,
    slice: KeptSlice,
}

/// What applying a watch event did to the objects the daemon sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Applied {
    /// Part of a list in progress, buffered.
    Buffered,
    /// An object changed.
    Changed,
    /// A list completed and replaced the store, which now holds this many objects.
    Listed { objects: usize },
}

impl Objects {
    pub(super) fn on_service(&mut self, event: watcher::Event<Decoded<Service>>) -> Applied {
        match event {
            watcher::Event::Init => {
                self.services.start_list();
                self.malformed_services.start_list();
                Applied::Buffered
            }
            watcher::Event::InitApply(Decoded::Object(service)) => {
                let name = service_name(&service.metadata);
                self.services.listed(&name.namespace, name.name, Some(KeptService::new(&service)));
                Applied::Buffered
            }
            watcher::Event::InitApply(Decoded::Malformed(malformed)) => {
                list_malformed(&mut self.services, &mut self.malformed_services, malformed);
                Applied::Buffered
            }
            watcher::Event::InitDone => {
                self.services.finish_list();
                self.malformed_services.finish_list();
                self.changes.relisted();
                Applied::Listed { objects: self.services.len() }
            }
            watcher::Event::Apply(Decoded::Object(service)) => {
                let name = service_name(&service.metadata);
                let kept = KeptService::new(&service);
                self.services.put(&name.namespace, name.name.clone(), Some(kept));
                self.malformed_services.remove(&name.namespace, &name.name);
                self.changes.service_changed(name);
                Applied::Changed
            }
            watcher::Event::Apply(Decoded::Malformed(malformed)) => {
                put_malformed(&mut self.malformed_services, malformed)
            }
            watcher::Event::Delete(service) => {
                let name = service_name(service.metadata());
                self.services.remove(&name.namespace, &name.name);
                self.malformed_services.remove(&name.namespace, &name.name);
                self.changes.service_changed(name);
                Applied::Changed
            }
        }
    }

    pub(super) fn on_slice(&mut self, event: watcher::Event<Decoded<EndpointSlice>>) -> Applied {
        match event {
            watcher::Event::Init => {
                self.slices.start_list();
                self.malformed_slices.start_list();
                Applied::Buffered
            }
            watcher::Event::InitApply(Decoded::Object(slice)) => {
                let owned = self.keep_slice(&slice);
                self.slices.listed(model::namespace(&slice.metadata), slice.name_any(), owned);
                Applied::Buffered
            }
            watcher::Event::InitApply(Decoded::Malformed(malformed)) => {
                list_malformed(&mut self.slices, &mut self.malformed_slices, malformed);
                Applied::Buffered
            }
            watcher::Event::InitDone => {
                self.slices.finish_list();
                self.malformed_slices.finish_list();
                let owners = self.slices.iter().map(|(_, name, owned)| (name, &owned.service));
                self.changes.slices_relisted(owners);
                Applied::Listed { objects: self.slices.len() }
            }
            watcher::Event::Apply(Decoded::Object(slice)) => {
                let owned = self.keep_slice(&slice);
                let after = owned.as_ref().map(|owned| owned.service.clone());
                let (namespace, name) = (model::namespace(&slice.metadata), slice.name_any());
                self.malformed_slices.remove(namespace, &name);
                // A slice relabelled to another service changes both.
                let before = self.slices.put(namespace, name.clone(), owned);
                self.changes.slice_moved(&name, before.map(|b| b.service).as_ref(), after.as_ref());
                Applied::Changed
            }
            watcher::Event::Apply(Decoded::Malformed(malformed)) => {
                put_malformed(&mut self.malformed_slices, malformed)
            }
            watcher::Event::Delete(slice) => {
                let metadata = slice.metadata();
                let (namespace, name) = (model::namespace(metadata), slice.name_any());
                self.malformed_slices.remove(namespace, &name);
                let before = self.slices.remove(namespace, &name);
                self.changes.slice_moved(&name, before.map(|b| b.service).as_ref(), None);
                // The service its last version named, should the store have missed it.
                if let Some(service) = slice_service_name(metadata) {
                    self.changes.service_changed(service);
                }
                Applied::Changed
            }
        }
    }

    pub(super) fn take_changes(&mut self) -> Changes {
        self.changes.take()
    }

    /// The objects of one service, normalised for `node`.
    pub(super) fn service_objects(
        &self,
        service: &ServiceName,
        node: &NodeConfig,
    ) -> ServiceObjects {
        let mut objects = ServiceObjects::default();
        if let Some(kept) = self.services.get(&service.namespace, &service.name) {
            objects.add_kept_service(kept);
        }
        for name in self.changes.slices_of(service) {
            if let Some(owned) = self.slices.get(&service.namespace, name) {
                objects.add_kept_slice(&owned.slice, node);
            }
        }
        objects
    }

    /// Every service with a Service or a slice, sorted.
    pub(super) fn service_names(&self) -> Vec<ServiceName> {
        let mut names: Vec<ServiceName> = self
            .services
            .iter()
            .map(|(namespace, name, _)| ServiceName::new(namespace, name))
            .chain(self.slices.iter().map(|(_, _, owned)| owned.service.clone()))
            .collect();
        names.sort_unstable();
        names.dedup();
        names
    }

    /// The objects that did not decode, as problems to report: the first few of each kind
    /// named, with what became of each, and a count of the rest.
    pub(super) fn problems(&self) -> Vec<String> {
        let mut lines = malformed_lines("Service", &self.malformed_services, |namespace, name| {
            self.services.get(namespace, name).is_some()
        });
        lines.extend(malformed_lines(
            "EndpointSlice",
            &self.malformed_slices,
            |namespace, name| self.slices.get(namespace, name).is_some(),
        ));
        lines
    }

    /// `slice` in the form kept, with its service; `None` for a slice of no service.
    fn keep_slice(&mut self, slice: &EndpointSlice) -> Option<OwnedSlice> {
        keep_slice(slice, &mut self.node_names)
            .map(|(service, slice)| OwnedSlice { service, slice })
    }
}

/// A list's object that did not decode: recorded as malformed, and its last readable version,
/// if any, listed again as if the list had returned it, so that it stays in effect. (Should the
/// object have been deleted and made again under its name while the watch was down, the old
/// object's version is the one kept: the store holds no uids to tell them apart.)
fn list_malformed<T: Clone>(
    objects: &mut Store<T>,
    malformed: &mut Store<String>,
    bad: Box<Malformed>,
) {
    let Malformed { metadata, error } = *bad;
    let name = metadata.name.clone().unwrap_or_default();
    let namespace = model::namespace(&metadata);
    if let Some(kept) = objects.get(namespace, &name).cloned() {
        objects.listed(namespace, name.clone(), Some(kept));
    }
    malformed.listed(namespace, name, Some(error));
}

/// A watch event's object that did not decode: recorded as malformed; its last readable
/// version, if any, stays as it is. Counted as a change so that the daemon reports it now.
fn put_malformed(malformed: &mut Store<String>, bad: Box<Malformed>) -> Applied {
    let Malformed { metadata, error } = *bad;
    let name = metadata.name.clone().unwrap_or_default();
    let namespace = model::namespace(&metadata);
    malformed.put(namespace, name, Some(error));
    Applied::Changed
}

/// Problem lines for the objects of `kind` in `malformed`, `kept(namespace, name)` telling
/// whether one's last readable version stays: at most [`MALFORMED_NAMED`] named, by name, so
/// that an API change that makes every object unreadable logs a few lines, not one per object.
fn malformed_lines(
    kind: &str,
    malformed: &Store<String>,
    kept: impl Fn(&str, &str) -> bool,
) -> Vec<String> {
    let mut objects: Vec<_> = malformed.iter().collect();
    objects.sort_unstable_by_key(|&(namespace, name, _)| (namespace, name));
    let named = objects.iter().take(MALFORMED_NAMED).map(|&(namespace, name, error)| {
        malformed_problem(kind, namespace, name, error, kept(namespace, name))
    });
    let mut lines: Vec<String> = named.collect();
    if let Some(more) = objects.len().checked_sub(MALFORMED_NAMED).filter(|&more| more > 0) {
        lines.push(format!(
            "{more} more {kind}s not readable as a {kind}: only the first {MALFORMED_NAMED} by \
             name are named"
        ));
    }
    lines
}

/// How many unreadable objects of a kind the problems name.
const MALFORMED_NAMED: usize = 10;

fn malformed_problem(kind: &str, namespace: &str, name: &str, error: &str, kept: bool) -> String {
    // Unnamed: even the metadata did not decode.
    let name = if name.is_empty() { "<unnamed>" } else { name };
    let fate = if kept { "its last readable version stays in effect" } else { "left out" };
    format!("{kind} {namespace}/{name}: not readable as a {kind} ({error}); {fate}")
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use super::*;

    fn malformed(name: &str) -> Decoded<Service> {
        let metadata = ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some("shop".to_owned()),
            ..ObjectMeta::default()
        };
        Decoded::Malformed(Box::new(Malformed { metadata, error: "invalid type".to_owned() }))
    }

    #[test]
    fn many_unreadable_objects_are_named_a_few_and_counted() {
        let mut objects = Objects::default();
        objects.on_service(watcher::Event::Init);
        for index in (0..12).rev() {
            objects.on_service(watcher::Event::InitApply(malformed(&format!("s{index:02}"))));
        }
        objects.on_service(watcher::Event::InitDone);
        let problems = objects.problems();
        assert_eq!(problems.len(), MALFORMED_NAMED + 1, "{problems:?}");
        assert!(problems[0].starts_with("Service shop/s00: "), "by name: {problems:?}");
        assert!(problems[9].starts_with("Service shop/s09: "), "{problems:?}");
        assert!(problems[10].starts_with("2 more Services not readable"), "{problems:?}");
    }
}
