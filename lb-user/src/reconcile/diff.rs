//! The reconciler proper: the map operations that turn the programmed tables into the desired
//! ones, and nothing else.
//!
//! Order is what keeps packets from seeing a half-written service: everything a frontend will
//! point at (backends, slots, reverse NAT, source ranges) is written before the frontend, and
//! what it stops pointing at is removed after it. A frontend whose slot count shrinks is
//! rewritten before its surplus slots go, so no flow hash lands on a missing slot.

use std::collections::{BTreeMap, BTreeSet};

use super::state::DatapathState;
use crate::maps::MapOp;

/// The operations, in a safe order. Equal states give no operation at all.
pub fn diff(programmed: &DatapathState, desired: &DatapathState) -> Vec<MapOp> {
    let mut ops = Vec::new();
    if let Some(node) = desired.node
        && programmed.node != desired.node
    {
        ops.push(MapOp::SetNodeConfig(node));
    }
    for (id, backend) in changed(&programmed.backends, &desired.backends) {
        ops.push(MapOp::UpsertBackend { id, backend });
    }
    for (key, backend_id) in changed(&programmed.slots, &desired.slots) {
        ops.push(MapOp::UpsertSlot { key, backend_id });
    }
    for (service_id, rev_nat) in changed(&programmed.rev_nats, &desired.rev_nats) {
        ops.push(MapOp::UpsertRevNat { service_id, rev_nat });
    }
    for &(service_id, range) in desired.source_ranges.difference(&programmed.source_ranges) {
        ops.push(MapOp::AddSourceRange { service_id, range });
    }
    for (key, value) in changed(&programmed.services, &desired.services) {
        ops.push(MapOp::UpsertService { key, value });
    }
    for key in stale(&programmed.services, &desired.services) {
        ops.push(MapOp::RemoveService { key });
    }
    for key in stale(&programmed.slots, &desired.slots) {
        ops.push(MapOp::RemoveSlot { key });
    }
    for &(service_id, range) in programmed.source_ranges.difference(&desired.source_ranges) {
        ops.push(MapOp::RemoveSourceRange { service_id, range });
    }
    for service_id in stale(&programmed.rev_nats, &desired.rev_nats) {
        ops.push(MapOp::RemoveRevNat { service_id });
    }
    for id in stale(&programmed.backends, &desired.backends) {
        ops.push(MapOp::RemoveBackend { id });
    }
    ops
}

/// Entries of `desired` that `programmed` lacks or holds with another value.
fn changed<K: Ord + Copy, V: PartialEq + Copy>(
    programmed: &BTreeMap<K, V>,
    desired: &BTreeMap<K, V>,
) -> Vec<(K, V)> {
    desired
        .iter()
        .filter(|(key, value)| programmed.get(key) != Some(value))
        .map(|(key, value)| (*key, *value))
        .collect()
}

/// Keys of `programmed` that `desired` no longer has.
fn stale<K: Ord + Copy, V>(programmed: &BTreeMap<K, V>, desired: &BTreeMap<K, V>) -> Vec<K> {
    programmed.keys().filter(|key| !desired.contains_key(key)).copied().collect()
}

/// (frontend, backend) pairs that were programmed and are no longer: their non-TCP conntrack
/// entries must go, so UDP clients move to a live backend instead of sending into the void.
/// TCP flows are left alone, as kube-proxy does: a terminating backend may still finish them.
pub fn removed_pairs(programmed: &DatapathState, desired: &DatapathState) -> BTreeSet<(u32, u32)> {
    let pairs = |state: &DatapathState| -> BTreeSet<(u32, u32)> {
        state.slots.iter().map(|(key, backend)| (key.service_id, *backend)).collect()
    };
    pairs(programmed).difference(&pairs(desired)).copied().collect()
}
