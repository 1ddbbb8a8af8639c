//! Which service port serves a frontend (VIP, port, protocol, scope) that several claim, e.g.
//! an external IP that two services list. The rule is the one a full rebuild applies in port
//! order: the lowest [`ServicePortId`] wins. Rebuilding one service at a time must reach the
//! same answer whatever the order of changes, so the losers are remembered: when the owner lets
//! the frontend go, they are rebuilt and the lowest of them takes it.

use std::collections::{BTreeSet, HashMap};

use lb_common::maps::ServiceKey;

use crate::model::{ServiceName, ServicePortId};

#[derive(Clone, Debug, Default)]
pub(super) struct Claims {
    owners: HashMap<ServiceKey, ServicePortId>,
    /// Claimants that lost to the owner, by frontend.
    waiting: HashMap<ServiceKey, BTreeSet<ServicePortId>>,
}

impl Claims {
    /// Whether a port that sorts before `port` serves `key`: then `port` must leave it alone.
    pub(super) fn held_by_earlier(&self, key: ServiceKey, port: &ServicePortId) -> bool {
        self.owners.get(&key).is_some_and(|owner| owner < port)
    }

    /// Makes `port` the owner of `key`; returns the owner it displaced, which must be rebuilt.
    pub(super) fn take(&mut self, key: ServiceKey, port: &ServicePortId) -> Option<ServicePortId> {
        self.owners.insert(key, port.clone()).filter(|previous| previous != port)
    }

    /// Records that `port` wants `key` once its owner lets it go.
    pub(super) fn wait(&mut self, key: ServiceKey, port: &ServicePortId) {
        self.waiting.entry(key).or_default().insert(port.clone());
    }

    /// Lets `key` go if a port of `service` owns it (a port that displaced it keeps it);
    /// returns whether it did.
    pub(super) fn release(&mut self, key: ServiceKey, service: &ServiceName) -> bool {
        let owned = self.owners.get(&key).is_some_and(|owner| owner.belongs_to(service));
        if owned {
            self.owners.remove(&key);
        }
        owned
    }

    /// Forgets that the ports of `service` wait for `key`.
    pub(super) fn stop_waiting(&mut self, key: ServiceKey, service: &ServiceName) {
        if let Some(waiting) = self.waiting.get_mut(&key) {
            waiting.retain(|port| !port.belongs_to(service));
            if waiting.is_empty() {
                self.waiting.remove(&key);
            }
        }
    }

    pub(super) fn is_owned(&self, key: ServiceKey) -> bool {
        self.owners.contains_key(&key)
    }

    /// The services waiting for `key`.
    pub(super) fn waiters(&self, key: ServiceKey) -> impl Iterator<Item = ServiceName> + '_ {
        self.waiting.get(&key).into_iter().flatten().map(ServicePortId::service)
    }
}
