//! Which services the watch events touched since the daemon last looked, and which slices each
//! service has (the slice store is keyed by slice, not by service). A watch event names its
//! object, so a change costs a rebuild of its service only; a completed (re-)list may have
//! changed anything.

use std::collections::{BTreeSet, HashMap};

use crate::model::ServiceName;

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
    /// A service's slices, by name (they share its namespace).
    slices: HashMap<ServiceName, BTreeSet<String>>,
}

impl Default for ChangeLog {
    fn default() -> Self {
        // Before the first look, everything is new.
        Self { everything: true, services: BTreeSet::new(), slices: HashMap::new() }
    }
}

impl ChangeLog {
    /// A watch event changed `service`'s Service or one of its slices.
    pub(super) fn service_changed(&mut self, service: ServiceName) {
        self.services.insert(service);
    }

    /// A list completed.
    pub(super) fn relisted(&mut self) {
        self.everything = true;
    }

    /// Slice `name` belonged to `before` and now to `after` (`None`: to no service, or it is
    /// gone); both services changed.
    pub(super) fn slice_moved(
        &mut self,
        name: &str,
        before: Option<&ServiceName>,
        after: Option<&ServiceName>,
    ) {
        if let Some(before) = before {
            if let Some(names) = self.slices.get_mut(before) {
                names.remove(name);
                if names.is_empty() {
                    self.slices.remove(before);
                }
            }
            self.services.insert(before.clone());
        }
        if let Some(after) = after {
            self.slices.entry(after.clone()).or_default().insert(name.to_owned());
            self.services.insert(after.clone());
        }
    }

    /// A list of slices completed: `owners` gives each slice's name and service.
    pub(super) fn slices_relisted<'a>(
        &mut self,
        owners: impl Iterator<Item = (&'a str, &'a ServiceName)>,
    ) {
        self.slices.clear();
        for (name, service) in owners {
            self.slices.entry(service.clone()).or_default().insert(name.to_owned());
        }
        self.everything = true;
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
    pub(super) fn slices_of(&self, service: &ServiceName) -> impl Iterator<Item = &str> {
        self.slices.get(service).into_iter().flatten().map(String::as_str)
    }
}
