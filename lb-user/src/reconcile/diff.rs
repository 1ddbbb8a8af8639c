//! The reconciler proper: the map operations that turn the programmed tables into the desired
//! ones, and nothing else.
//!
//! Order is what keeps packets from seeing a half-written service: everything a frontend will
//! point at (backends, slots, source ranges) is written before the frontend, and
//! what it stops pointing at is removed after it. A frontend's new slots are a fresh run (see
//! `slot_runs`), so they never overwrite slots a frontend points at, and its old run goes once it
//! points at the new one. Source ranges are the exception: those that go are removed before
//! those that come are added, so that the map never holds both sets (the reconciler counts a
//! frontend's ranges in place of its old ones); meanwhile a frontend admits fewer sources,
//! never more.

use std::collections::{BTreeMap, BTreeSet};

use lb_common::maps::{ServiceValue, scope};

use super::state::{DatapathState, slots_of};
use crate::maps::MapOp;

/// The operations that turn `programmed` into `desired`, in a safe order; equal states give
/// none. Each goes to `emit` as soon as it is known, so a first sync of millions of entries
/// never holds them all in a list. Stops at the first error.
pub fn for_each_op<E>(
    programmed: &DatapathState,
    desired: &DatapathState,
    mut emit: impl FnMut(MapOp) -> Result<(), E>,
) -> Result<(), E> {
    // Into a datapath without one, the node configuration goes last: until it is there the
    // programs pass every packet, so none meets a first sync half written (refused, or
    // dropped as addressed to an unallocated service address, for want of its service).
    let node = desired.node.filter(|_| programmed.node != desired.node);
    let first_sync = programmed.node.is_none();
    if let Some(node) = node
        && !first_sync
    {
        emit(MapOp::SetNodeConfig(node))?;
    }
    for (id, backend) in changed(&programmed.backends, &desired.backends) {
        emit(MapOp::UpsertBackend { id, backend })?;
    }
    for (index, slot) in changed(&programmed.slots, &desired.slots) {
        emit(MapOp::UpsertSlot { index, slot })?;
    }
    for &(service_id, range) in programmed.source_ranges.difference(&desired.source_ranges) {
        emit(MapOp::RemoveSourceRange { service_id, range })?;
    }
    for &(service_id, range) in desired.source_ranges.difference(&programmed.source_ranges) {
        emit(MapOp::AddSourceRange { service_id, range })?;
    }
    // INTERNAL entries before the EXTERNAL ones that name them (`TWO_SCOPES`): a lookup that
    // follows the flag always finds the twin.
    let services = || changed(&programmed.services, &desired.services);
    for (key, value) in services().filter(|(key, _)| key.scope == scope::INTERNAL) {
        emit(MapOp::UpsertService { key, value })?;
    }
    for (key, value) in services().filter(|(key, _)| key.scope != scope::INTERNAL) {
        emit(MapOp::UpsertService { key, value })?;
    }
    for key in stale(&programmed.services, &desired.services) {
        emit(MapOp::RemoveService { key })?;
    }
    for index in stale(&programmed.slots, &desired.slots) {
        emit(MapOp::RemoveSlot { index })?;
    }
    for id in stale(&programmed.backends, &desired.backends) {
        emit(MapOp::RemoveBackend { id })?;
    }
    if let Some(node) = node
        && first_sync
    {
        emit(MapOp::SetNodeConfig(node))?;
    }
    Ok(())
}

/// Entries of `desired` that `programmed` lacks or holds with another value.
fn changed<'a, K: Ord + Copy, V: PartialEq + Copy>(
    programmed: &'a BTreeMap<K, V>,
    desired: &'a BTreeMap<K, V>,
) -> impl Iterator<Item = (K, V)> + 'a {
    desired
        .iter()
        .filter(|(key, value)| programmed.get(key) != Some(value))
        .map(|(key, value)| (*key, *value))
}

/// Keys of `programmed` that `desired` no longer has.
fn stale<'a, K: Ord + Copy, V>(
    programmed: &'a BTreeMap<K, V>,
    desired: &'a BTreeMap<K, V>,
) -> impl Iterator<Item = K> + 'a {
    programmed.keys().filter(|key| !desired.contains_key(key)).copied()
}

/// (frontend, backend) pairs that were programmed and are no longer: their sticky clients go,
/// and their UDP flows once the endpoint no longer serves (see `drains`).
pub fn removed_pairs(programmed: &DatapathState, desired: &DatapathState) -> BTreeSet<(u32, u32)> {
    let desired_by_id: BTreeMap<u32, &ServiceValue> =
        desired.services.values().map(|value| (value.service_id, value)).collect();
    let backends_of = |state: &DatapathState, value: &ServiceValue| -> BTreeSet<u32> {
        slots_of(&state.slots, value).map(|(_, slot)| slot.backend_id).collect()
    };
    let mut removed = BTreeSet::new();
    // Frontend by frontend, so that only one frontend's backends are in a set at a time.
    for value in programmed.services.values().filter(|value| value.slot_count > 0) {
        let id = value.service_id;
        let before = backends_of(programmed, value);
        let after = desired_by_id.get(&id).map(|now| backends_of(desired, now)).unwrap_or_default();
        removed.extend(before.difference(&after).map(|backend| (id, *backend)));
    }
    removed
}
