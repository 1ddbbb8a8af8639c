//! UDP flows on endpoints that left a frontend's slots but still serve. kube-proxy forgets a
//! UDP endpoint's conntrack entries only once the endpoint stops serving (is deleted, or turns
//! not serving): one that is terminating but serving, or that a traffic policy or topology
//! hints now leave out, keeps its flows, so a QUIC or RTP stream drains instead of being cut.
//! New flows never reach it: it has no slot.
//!
//! What the reconciler hands the maps to forget ([`Forget`]) follows from that: sticky clients
//! of every removed (frontend, backend) pair go at once, as kube-proxy's affinity ends with the
//! endpoint's chain; UDP flows go at once only where the endpoint no longer serves, the others
//! when it stops serving. Those are found by address, not by backend id: a freed id may name
//! another endpoint by then.

use std::collections::{BTreeMap, BTreeSet};

use lb_common::maps::{ConntrackKey, ConntrackValue, ct_flags, proto};

use super::state::{DatapathState, slots_of};

/// An endpoint on the wire: IPv4 address and port, both in network order.
pub type Address = (u32, u16);

/// The serving endpoints of the non-TCP frontends a reconcile rebuilt, by frontend id.
pub type Serving = BTreeMap<u32, BTreeSet<Address>>;

/// What a reconcile leaves for the conntrack and affinity maps to forget.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Forget {
    /// (frontend id, backend id) pairs no longer programmed: their session-affinity entries go.
    pub affinities: BTreeSet<(u32, u32)>,
    /// (frontend id, backend id) pairs whose endpoint no longer serves: their non-TCP flows go.
    pub flows: BTreeSet<(u32, u32)>,
    /// (frontend id, endpoint) whose draining ended: the non-TCP flows on it go.
    pub drained: BTreeSet<(u32, Address)>,
}

impl Forget {
    pub fn is_empty(&self) -> bool {
        self.affinities.is_empty() && self.flows.is_empty() && self.drained.is_empty()
    }

    /// Whether the non-TCP conntrack entry `(key, value)` belongs to a flow to forget.
    pub fn takes_flow(&self, key: &ConntrackKey, value: &ConntrackValue) -> bool {
        key.proto != proto::TCP
            && (self.flows.contains(&(value.service_id, value.backend_id))
                || self.drained.contains(&(value.service_id, endpoint_of(key, value))))
    }
}

/// The endpoint a conntrack entry's flow goes to: a forward entry translates to it, a reply
/// entry's packets come from it.
fn endpoint_of(key: &ConntrackKey, value: &ConntrackValue) -> Address {
    if value.flags & ct_flags::REPLY == 0 {
        (value.translated_ip_be, value.translated_port_be)
    } else {
        (key.src_ip_be, key.src_port_be)
    }
}

/// The (frontend id, endpoint) pairs whose UDP flows are kept while the endpoint serves.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Drains {
    kept: BTreeSet<(u32, Address)>,
}

impl Drains {
    pub fn len(&self) -> usize {
        self.kept.len()
    }

    pub fn is_empty(&self) -> bool {
        self.kept.is_empty()
    }

    /// Takes up the flows an earlier daemon left on endpoints outside their frontend's slots
    /// in `programmed`: the next reconcile of their frontend keeps them if the endpoint still
    /// serves, and forgets them if not. Without this, a restart would keep them until they
    /// expire, however long their clients go on sending into a pod that is gone.
    pub fn adopt<'a>(
        &mut self,
        flows: impl IntoIterator<Item = &'a (ConntrackKey, ConntrackValue)>,
        programmed: &DatapathState,
    ) {
        let slotted: BTreeSet<(u32, Address)> = programmed
            .services
            .values()
            .flat_map(|value| {
                slots_of(&programmed.slots, value)
                    .map(|(_, slot)| (value.service_id, (slot.backend.ip_be, slot.backend.port_be)))
            })
            .collect();
        for (key, value) in flows {
            let pair = (value.service_id, endpoint_of(key, value));
            if key.proto != proto::TCP
                && value.flags & ct_flags::REPLY == 0
                && !slotted.contains(&pair)
            {
                self.kept.insert(pair);
            }
        }
    }

    /// What a reconcile from `before` to `after` leaves to forget, given the pairs it removed
    /// and the serving endpoints of the non-TCP frontends it rebuilt. Kept pairs of rebuilt
    /// frontends end when their endpoint no longer serves there; removed pairs whose endpoint
    /// still serves are kept.
    pub fn settle(
        &mut self,
        removed: BTreeSet<(u32, u32)>,
        before: &DatapathState,
        after: &DatapathState,
        serving: &Serving,
    ) -> Forget {
        let rebuilt: BTreeSet<u32> =
            before.services.values().chain(after.services.values()).map(|v| v.service_id).collect();
        let serves = |frontend: u32, endpoint: &Address| {
            serving.get(&frontend).is_some_and(|endpoints| endpoints.contains(endpoint))
        };
        let mut forget = Forget::default();
        self.kept.retain(|(frontend, endpoint)| {
            let keep = !rebuilt.contains(frontend) || serves(*frontend, endpoint);
            if !keep {
                forget.drained.insert((*frontend, *endpoint));
            }
            keep
        });
        for &(frontend, backend_id) in &removed {
            let endpoint = before.backends.get(&backend_id).map(|b| (b.ip_be, b.port_be));
            match endpoint {
                Some(endpoint) if serves(frontend, &endpoint) => {
                    self.kept.insert((frontend, endpoint));
                }
                _ => {
                    forget.flows.insert((frontend, backend_id));
                }
            }
        }
        forget.affinities = removed;
        forget
    }
}

#[cfg(test)]
mod tests {
    use lb_common::maps::{Backend, ServiceKey, ServiceValue, Slot};

    use super::*;

    const FRONTEND: u32 = 7;
    const STAYING: (u32, Address) = (1, (0x0a00_0001, 53));
    const LEAVING: (u32, Address) = (2, (0x0a00_0002, 53));

    fn state(backends: &[(u32, Address)]) -> DatapathState {
        let mut state = DatapathState::default();
        let key = ServiceKey { vip_be: 1, port_be: 53, proto: proto::UDP, scope: 0 };
        let value = ServiceValue {
            service_id: FRONTEND,
            slot_base: 0,
            slot_count: u32::try_from(backends.len()).expect("few"),
            ..ServiceValue::default()
        };
        state.services.insert(key, value);
        for (index, &(id, (ip_be, port_be))) in (0..).zip(backends) {
            let backend = Backend { ip_be, port_be, proto: proto::UDP, flags: 0 };
            state.backends.insert(id, backend);
            state.slots.insert(index, Slot { backend_id: id, backend });
        }
        state
    }

    fn serving(endpoints: &[Address]) -> Serving {
        [(FRONTEND, endpoints.iter().copied().collect())].into_iter().collect()
    }

    fn flow(endpoint: Address, backend_id: u32, reply: bool) -> (ConntrackKey, ConntrackValue) {
        let (src, dst) = if reply { (endpoint, (9, 4000)) } else { ((9, 4000), (1, 53)) };
        let key = ConntrackKey::new(src.0, dst.0, src.1, dst.1, proto::UDP);
        let translated = if reply { (1, 53) } else { endpoint };
        let value = ConntrackValue {
            service_id: FRONTEND,
            backend_id,
            translated_ip_be: translated.0,
            translated_port_be: translated.1,
            flags: if reply { ct_flags::REPLY } else { 0 },
            ..ConntrackValue::default()
        };
        (key, value)
    }

    #[test]
    fn a_removed_endpoint_that_still_serves_keeps_its_flows_until_it_stops() {
        let mut drains = Drains::default();
        let before = state(&[STAYING, LEAVING]);
        let after = state(&[STAYING]);
        let removed: BTreeSet<_> = [(FRONTEND, LEAVING.0)].into_iter().collect();

        // Terminating but serving: its sticky clients go, its flows stay.
        let forget =
            drains.settle(removed.clone(), &before, &after, &serving(&[STAYING.1, LEAVING.1]));
        assert_eq!(forget.affinities, removed);
        assert!(forget.flows.is_empty() && forget.drained.is_empty(), "{forget:?}");
        assert_eq!(drains.len(), 1);

        // A reconcile of another frontend changes nothing.
        let other = DatapathState::default();
        let forget = drains.settle(BTreeSet::new(), &other, &other, &Serving::new());
        assert!(forget.is_empty());

        // It stops serving: its flows go, found by its address, and it is no longer kept.
        let forget = drains.settle(BTreeSet::new(), &after, &after, &serving(&[STAYING.1]));
        assert_eq!(forget.drained, [(FRONTEND, LEAVING.1)].into_iter().collect());
        assert!(drains.is_empty());
        for reply in [false, true] {
            let (key, value) = flow(LEAVING.1, 99, reply);
            assert!(forget.takes_flow(&key, &value), "reply {reply}: found by address");
            let (key, value) = flow(STAYING.1, STAYING.0, reply);
            assert!(!forget.takes_flow(&key, &value), "reply {reply}: a live endpoint's flow");
        }
    }

    #[test]
    fn a_removed_endpoint_that_no_longer_serves_loses_its_flows_at_once() {
        let mut drains = Drains::default();
        let removed: BTreeSet<_> = [(FRONTEND, LEAVING.0)].into_iter().collect();
        let forget =
            drains.settle(removed, &state(&[STAYING, LEAVING]), &state(&[STAYING]), &serving(&[]));
        assert_eq!(forget.flows, [(FRONTEND, LEAVING.0)].into_iter().collect());
        assert!(drains.is_empty());
        let (key, mut value) = flow(LEAVING.1, LEAVING.0, false);
        assert!(forget.takes_flow(&key, &value));
        value.backend_id = STAYING.0;
        assert!(!forget.takes_flow(&key, &value));
    }

    #[test]
    fn flows_an_earlier_daemon_left_outside_the_slots_are_kept_until_their_frontend_is_rebuilt() {
        let programmed = state(&[STAYING]);
        let flows = [
            flow(STAYING.1, STAYING.0, false),
            flow(LEAVING.1, LEAVING.0, false),
            flow(LEAVING.1, LEAVING.0, true),
        ];
        let mut drains = Drains::default();
        drains.adopt(&flows, &programmed);
        assert_eq!(drains.len(), 1, "one flow outside the slots, counted by its forward entry");
        let forget =
            drains.settle(BTreeSet::new(), &programmed, &programmed, &serving(&[STAYING.1]));
        assert_eq!(forget.drained, [(FRONTEND, LEAVING.1)].into_iter().collect());
    }
}
