//! Which services the watch events touched since the daemon last looked, and which slices each
//! service has (a reflector store has no index by label). A watch event names its object, so a
//! change costs a rebuild of its service only; a completed (re-)list may have changed anything.

use std::collections::{BTreeSet, HashMap};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use kube::{
    ResourceExt as _,
    runtime::{reflector::Store, watcher},
};

use crate::model::{ServiceName, service_name, slice_service_name};

/// The services to rebuild.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Changes {
    /// A list completed: any service may have changed.
    Everything,
    Services(BTreeSet<ServiceName>),
}

#[derive(Debug)]
pub(super) struct ChangeLog {
    everything: bool,
    services: BTreeSet<ServiceName>,
    /// (namespace, slice name) to the service it belongs to.
    slice_owners: HashMap<(String, String), ServiceName>,
    /// A service's slices, by name.
    slices: HashMap<ServiceName, BTreeSet<String>>,
}

impl Default for ChangeLog {
    fn default() -> Self {
        // Before the first look, everything is new.
        Self {
            everything: true,
            services: BTreeSet::new(),
            slice_owners: HashMap::new(),
            slices: HashMap::new(),
        }
    }
}

impl ChangeLog {
    pub(super) fn on_service(&mut self, event: &watcher::Event<Service>) {
        match event {
            watcher::Event::Apply(service) | watcher::Event::Delete(service) => {
                self.services.insert(service_name(service));
            }
            watcher::Event::InitDone => self.everything = true,
            watcher::Event::Init | watcher::Event::InitApply(_) => {}
        }
    }

    /// `store` has applied `event` already.
    pub(super) fn on_slice(
        &mut self,
        event: &watcher::Event<EndpointSlice>,
        store: &Store<EndpointSlice>,
    ) {
        match event {
            watcher::Event::Apply(slice) => {
                // A slice relabelled to another service changes both.
                self.forget(slice);
                if let Some(owner) = owner(slice) {
                    self.slices.entry(owner.clone()).or_default().insert(slice.name_any());
                    self.slice_owners.insert(slice_key(slice), owner.clone());
                    self.services.insert(owner);
                }
            }
            watcher::Event::Delete(slice) => {
                self.forget(slice);
                self.services.extend(owner(slice));
            }
            watcher::Event::InitDone => {
                self.slice_owners.clear();
                self.slices.clear();
                for slice in store.state() {
                    if let Some(owner) = owner(&slice) {
                        self.slices.entry(owner.clone()).or_default().insert(slice.name_any());
                        self.slice_owners.insert(slice_key(&slice), owner);
                    }
                }
                self.everything = true;
            }
            watcher::Event::Init | watcher::Event::InitApply(_) => {}
        }
    }

    /// What changed since the last call.
    pub(super) fn take(&mut self) -> Changes {
        let services = std::mem::take(&mut self.services);
        if std::mem::take(&mut self.everything) {
            Changes::Everything
        } else {
            Changes::Services(services)
        }
    }

    /// The names of `service`'s slices.
    pub(super) fn slices_of(&self, service: &ServiceName) -> Vec<String> {
        self.slices.get(service).into_iter().flatten().cloned().collect()
    }

    /// Drops `slice` from the index, marking the service it belonged to as changed.
    fn forget(&mut self, slice: &EndpointSlice) {
        let Some(previous) = self.slice_owners.remove(&slice_key(slice)) else { return };
        if let Some(names) = self.slices.get_mut(&previous) {
            names.remove(&slice.name_any());
            if names.is_empty() {
                self.slices.remove(&previous);
            }
        }
        self.services.insert(previous);
    }
}

fn slice_key(slice: &EndpointSlice) -> (String, String) {
    (slice.namespace().unwrap_or_default(), slice.name_any())
}

fn owner(slice: &EndpointSlice) -> Option<ServiceName> {
    slice_service_name(slice)
}
