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

use lb_common::maps::{AffinityKey, AffinityValue, ConntrackKey, ConntrackValue, ct_flags, proto};

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
    /// (frontend id, endpoint) pairs whose endpoint no longer serves: the non-TCP flows on it
    /// go. By address: a backend id freed since may name another endpoint, whose flows stay.
    pub flows: BTreeSet<(u32, Address)>,
}

impl Forget {
    pub fn is_empty(&self) -> bool {
        self.affinities.is_empty() && self.flows.is_empty()
    }

    /// Whether the conntrack entry `(key, value)` belongs to a flow to forget.
    pub fn takes_flow(&self, key: &ConntrackKey, value: &ConntrackValue) -> bool {
        key.proto != proto::TCP && self.flows.contains(&(value.service_id, endpoint_of(key, value)))
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
    /// (frontend id, backend id) pairs of session-affinity entries found with no slot behind
    /// them, for the next reconcile to forget (see [`Drains::adopt_affinities`]).
    stale_affinities: BTreeSet<(u32, u32)>,
}

/// One reconcile's view of the frontends it rebuilt, for [`Drains::settle`].
pub struct Rebuilt<'a> {
    /// Their entries before; on a full reconcile, every programmed entry.
    pub before: &'a DatapathState,
    /// Their entries after; on a full reconcile, every entry.
    pub after: &'a DatapathState,
    /// The serving endpoints of the non-TCP frontends built.
    pub serving: &'a Serving,
    /// A full reconcile: a frontend absent from `after` is gone, whatever kept pairs name it.
    pub every_frontend: bool,
}

impl Drains {
    pub fn len(&self) -> usize {
        self.kept.len()
    }

    pub fn is_empty(&self) -> bool {
        self.kept.is_empty()
    }

    /// Takes up the UDP flows in `flows` that run outside their frontend's slots in
    /// `programmed`: an earlier daemon's drains, or flows whose purge a failed sync lost. The
    /// next full reconcile keeps those whose endpoint still serves there and forgets the
    /// others; without this they would live as long as their clients go on sending.
    pub fn adopt<'a>(
        &mut self,
        flows: impl IntoIterator<Item = &'a (ConntrackKey, ConntrackValue)>,
        programmed: &DatapathState,
    ) {
        let slotted = slotted_endpoints(programmed, |_| true);
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

    /// Takes up the session-affinity entries whose (frontend, backend id) pair no slot of
    /// `programmed` holds: their purge was lost (a failed sync, or a daemon stopped between
    /// its writes and its purge). The datapath follows such an entry while the backend id
    /// exists, and a freed id may name another service's pod by then: the next reconcile
    /// forgets them.
    pub fn adopt_affinities<'a>(
        &mut self,
        entries: impl IntoIterator<Item = &'a (AffinityKey, AffinityValue)>,
        programmed: &DatapathState,
    ) {
        let slotted: BTreeSet<(u32, u32)> = programmed
            .services
            .values()
            .flat_map(|value| {
                slots_of(&programmed.slots, value)
                    .map(|(_, slot)| (value.service_id, slot.backend_id))
            })
            .collect();
        let stale = entries
            .into_iter()
            .map(|(key, value)| (key.service_id, value.backend_id))
            .filter(|pair| !slotted.contains(pair));
        self.stale_affinities.extend(stale);
    }

    /// What a reconcile leaves to forget, given the (frontend, backend id) pairs it removed.
    /// Kept pairs of rebuilt frontends end when their endpoint no longer serves there, and
    /// are let go when it is back in the slots; removed pairs whose endpoint still serves are
    /// kept, the others' flows forgotten.
    pub fn settle(&mut self, removed: BTreeSet<(u32, u32)>, rebuilt: &Rebuilt) -> Forget {
        let Rebuilt { before, after, serving, every_frontend } = *rebuilt;
        let built: BTreeSet<u32> = after.services.values().map(|v| v.service_id).collect();
        let touched: BTreeSet<u32> =
            before.services.values().map(|v| v.service_id).chain(built.iter().copied()).collect();
        // Only frontends that made it into the tables: a build that failed after recording
        // its endpoints left its id free.
        let serves = |frontend: u32, endpoint: &Address| {
            built.contains(&frontend)
                && serving.get(&frontend).is_some_and(|endpoints| endpoints.contains(endpoint))
        };
        let mut forget = Forget::default();
        if !self.kept.is_empty() {
            let slotted = slotted_endpoints(after, |frontend| touched.contains(&frontend));
            self.kept.retain(|pair @ (frontend, endpoint)| {
                if !every_frontend && !touched.contains(frontend) {
                    return true;
                }
                if !serves(*frontend, endpoint) {
                    forget.flows.insert(*pair);
                    return false;
                }
                // Back in the slots: a later removal names it again.
                !slotted.contains(pair)
            });
        }
        for &(frontend, backend_id) in &removed {
            let Some(backend) = before.backends.get(&backend_id) else { continue };
            if backend.proto == proto::TCP {
                continue;
            }
            let pair = (frontend, (backend.ip_be, backend.port_be));
            if serves(frontend, &pair.1) {
                self.kept.insert(pair);
            } else {
                forget.flows.insert(pair);
            }
        }
        forget.affinities = removed;
        forget.affinities.append(&mut self.stale_affinities);
        forget
    }
}

/// The (frontend id, endpoint) pairs in the slots of the frontends of `state` that `include`
/// names.
fn slotted_endpoints(
    state: &DatapathState,
    include: impl Fn(u32) -> bool,
) -> BTreeSet<(u32, Address)> {
    let values = state.services.values().filter(|value| include(value.service_id));
    values
        .flat_map(|value| {
            slots_of(&state.slots, value)
                .map(|(_, slot)| (value.service_id, (slot.backend.ip_be, slot.backend.port_be)))
        })
        .collect()
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

    fn rebuilt<'a>(
        before: &'a DatapathState,
        after: &'a DatapathState,
        serving: &'a Serving,
    ) -> Rebuilt<'a> {
        Rebuilt { before, after, serving, every_frontend: false }
    }

    #[test]
    fn affinities_without_a_slot_behind_them_are_forgotten_at_the_next_reconcile() {
        let programmed = state(&[STAYING]);
        let sticky = |service_id, backend_id| {
            let key = AffinityKey { client_ip_be: 9, service_id };
            (key, AffinityValue { backend_id, ..AffinityValue::default() })
        };
        let entries = [sticky(FRONTEND, STAYING.0), sticky(FRONTEND, LEAVING.0), sticky(8, 1)];
        let mut drains = Drains::default();
        drains.adopt_affinities(&entries, &programmed);
        let nothing = DatapathState::default();
        let forget = drains.settle(BTreeSet::new(), &rebuilt(&nothing, &nothing, &Serving::new()));
        let stale: BTreeSet<_> = [(FRONTEND, LEAVING.0), (8, 1)].into_iter().collect();
        assert_eq!(forget.affinities, stale, "the pairs no slot holds, and only those");
        let again = drains.settle(BTreeSet::new(), &rebuilt(&nothing, &nothing, &Serving::new()));
        assert!(again.is_empty(), "once");
    }

    #[test]
    fn a_removed_endpoint_that_still_serves_keeps_its_flows_until_it_stops() {
        let mut drains = Drains::default();
        let before = state(&[STAYING, LEAVING]);
        let after = state(&[STAYING]);
        let removed: BTreeSet<_> = [(FRONTEND, LEAVING.0)].into_iter().collect();

        // Terminating but serving: its sticky clients go, its flows stay.
        let both = serving(&[STAYING.1, LEAVING.1]);
        let forget = drains.settle(removed.clone(), &rebuilt(&before, &after, &both));
        assert_eq!(forget.affinities, removed);
        assert!(forget.flows.is_empty(), "{forget:?}");
        assert_eq!(drains.len(), 1);

        // A reconcile of another frontend changes nothing.
        let other = DatapathState::default();
        let forget = drains.settle(BTreeSet::new(), &rebuilt(&other, &other, &Serving::new()));
        assert!(forget.is_empty());

        // It stops serving: its flows go, found by its address, and it is no longer kept.
        let one = serving(&[STAYING.1]);
        let forget = drains.settle(BTreeSet::new(), &rebuilt(&after, &after, &one));
        assert_eq!(forget.flows, [(FRONTEND, LEAVING.1)].into_iter().collect());
        assert!(drains.is_empty());
        for reply in [false, true] {
            let (key, value) = flow(LEAVING.1, 99, reply);
            assert!(forget.takes_flow(&key, &value), "reply {reply}: found by address");
            let (key, value) = flow(STAYING.1, LEAVING.0, reply);
            assert!(!forget.takes_flow(&key, &value), "reply {reply}: another endpoint's flow");
        }
    }

    #[test]
    fn a_removed_endpoint_that_no_longer_serves_loses_its_flows_at_once_by_address() {
        let mut drains = Drains::default();
        let removed: BTreeSet<_> = [(FRONTEND, LEAVING.0)].into_iter().collect();
        let (before, after, none) = (state(&[STAYING, LEAVING]), state(&[STAYING]), serving(&[]));
        let forget = drains.settle(removed, &rebuilt(&before, &after, &none));
        assert_eq!(forget.flows, [(FRONTEND, LEAVING.1)].into_iter().collect());
        assert!(drains.is_empty());
        // The same backend id on another endpoint's flow: not taken.
        let (key, value) = flow(STAYING.1, LEAVING.0, false);
        assert!(!forget.takes_flow(&key, &value));
    }

    #[test]
    fn an_endpoint_back_in_the_slots_is_let_go_and_a_frontend_built_in_vain_serves_nothing() {
        let mut drains = Drains::default();
        let (before, after) = (state(&[STAYING, LEAVING]), state(&[STAYING]));
        let removed: BTreeSet<_> = [(FRONTEND, LEAVING.0)].into_iter().collect();
        let both = serving(&[STAYING.1, LEAVING.1]);
        drains.settle(removed.clone(), &rebuilt(&before, &after, &both));
        assert_eq!(drains.len(), 1);
        let forget = drains.settle(BTreeSet::new(), &rebuilt(&after, &before, &both));
        assert!(forget.is_empty() && drains.is_empty(), "ready again: {forget:?} {drains:?}");

        // Endpoints recorded for a frontend that then found no place in the tables.
        let empty = DatapathState::default();
        let forget = drains.settle(removed, &rebuilt(&before, &empty, &both));
        assert_eq!(forget.flows, [(FRONTEND, LEAVING.1)].into_iter().collect());
    }

    #[test]
    fn flows_left_outside_the_slots_are_kept_until_a_full_reconcile_says_otherwise() {
        let programmed = state(&[STAYING]);
        let flows = [
            flow(STAYING.1, STAYING.0, false),
            flow(LEAVING.1, LEAVING.0, false),
            flow(LEAVING.1, LEAVING.0, true),
        ];
        let mut drains = Drains::default();
        drains.adopt(&flows, &programmed);
        assert_eq!(drains.len(), 1, "one flow outside the slots, counted by its forward entry");
        let one = serving(&[STAYING.1]);
        let forget = drains.settle(BTreeSet::new(), &rebuilt(&programmed, &programmed, &one));
        assert_eq!(forget.flows, [(FRONTEND, LEAVING.1)].into_iter().collect());

        // A frontend no longer in the tables: only a full reconcile knows it is gone.
        let mut drains = Drains::default();
        drains.adopt(&flows, &programmed);
        let empty = DatapathState::default();
        let partial = drains.settle(BTreeSet::new(), &rebuilt(&empty, &empty, &Serving::new()));
        assert!(partial.is_empty());
        let nothing = Serving::new();
        let full = Rebuilt { every_frontend: true, ..rebuilt(&empty, &empty, &nothing) };
        let forget = drains.settle(BTreeSet::new(), &full);
        assert_eq!(forget.flows, [(FRONTEND, LEAVING.1)].into_iter().collect());
        assert!(drains.is_empty());
    }
}
