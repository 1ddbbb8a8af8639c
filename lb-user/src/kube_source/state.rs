//! What the Service and EndpointSlice watchers keep: each object in the compact normalised form
//! the model is built from (the API objects are many times larger), and the change log, under
//! one lock so that the daemon sees a change together with the objects it names.

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use kube::{ResourceExt as _, runtime::watcher};

use super::{
    changes::{ChangeLog, Changes},
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
    changes: ChangeLog,
    node_names: NodeNames,
}

/// A slice with the service it belongs to.
#[derive(Debug)]
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
    pub(super) fn on_service(&mut self, event: watcher::Event<Service>) -> Applied {
        match event {
            watcher::Event::Init => {
                self.services.start_list();
                Applied::Buffered
            }
            watcher::Event::InitApply(service) => {
                let name = service_name(&service);
                self.services.listed(&name.namespace, name.name, Some(KeptService::new(&service)));
                Applied::Buffered
            }
            watcher::Event::InitDone => {
                self.services.finish_list();
                self.changes.relisted();
                Applied::Listed { objects: self.services.len() }
            }
            watcher::Event::Apply(service) => {
                let name = service_name(&service);
                let kept = KeptService::new(&service);
                self.services.put(&name.namespace, name.name.clone(), Some(kept));
                self.changes.service_changed(name);
                Applied::Changed
            }
            watcher::Event::Delete(service) => {
                let name = service_name(&service);
                self.services.remove(&name.namespace, &name.name);
                self.changes.service_changed(name);
                Applied::Changed
            }
        }
    }

    pub(super) fn on_slice(&mut self, event: watcher::Event<EndpointSlice>) -> Applied {
        match event {
            watcher::Event::Init => {
                self.slices.start_list();
                Applied::Buffered
            }
            watcher::Event::InitApply(slice) => {
                let owned = self.keep_slice(&slice);
                self.slices.listed(model::namespace(&slice.metadata), slice.name_any(), owned);
                Applied::Buffered
            }
            watcher::Event::InitDone => {
                self.slices.finish_list();
                let owners = self.slices.iter().map(|(_, name, owned)| (name, &owned.service));
                self.changes.slices_relisted(owners);
                Applied::Listed { objects: self.slices.len() }
            }
            watcher::Event::Apply(slice) => {
                let owned = self.keep_slice(&slice);
                let after = owned.as_ref().map(|owned| owned.service.clone());
                let name = slice.name_any();
                // A slice relabelled to another service changes both.
                let before =
                    self.slices.put(model::namespace(&slice.metadata), name.clone(), owned);
                self.changes.slice_moved(&name, before.map(|b| b.service).as_ref(), after.as_ref());
                Applied::Changed
            }
            watcher::Event::Delete(slice) => {
                let name = slice.name_any();
                let before = self.slices.remove(model::namespace(&slice.metadata), &name);
                self.changes.slice_moved(&name, before.map(|b| b.service).as_ref(), None);
                // The service its last version named, should the store have missed it.
                if let Some(service) = slice_service_name(&slice) {
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

    /// `slice` in the form kept, with its service; `None` for a slice of no service.
    fn keep_slice(&mut self, slice: &EndpointSlice) -> Option<OwnedSlice> {
        keep_slice(slice, &mut self.node_names)
            .map(|(service, slice)| OwnedSlice { service, slice })
    }
}
