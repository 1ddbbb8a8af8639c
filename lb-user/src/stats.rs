//! Reading the per-CPU verdict counters, from a loaded object or from the pinned map.

use aya::maps::{Map, MapData, PerCpuArray};
use lb_common::{
    maps::{forwarding, names},
    stats::Reason,
};

use crate::{
    error::{Error, Result},
    pins::PinLayout,
};

/// Counter totals over all CPUs, one per reason in index order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReasonCounts(pub [u64; Reason::COUNT as usize]);

impl ReasonCounts {
    pub fn get(&self, reason: Reason) -> u64 {
        self.0[reason as usize]
    }

    /// Reasons with a non-zero count, by name.
    pub fn non_zero(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        Reason::ALL.iter().map(|r| (r.name(), self.get(*r))).filter(|(_, n)| *n > 0)
    }

    /// The per-reason increase from `earlier` to `self`.
    #[must_use]
    pub fn since(&self, earlier: &Self) -> Self {
        Self(std::array::from_fn(|i| self.0[i] - earlier.0[i]))
    }
}

/// Reads the `STATS` map of a loaded object.
pub fn read(map: &Map) -> Result<ReasonCounts> {
    let array: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(map).map_err(map_error)?;
    let mut totals = [0u64; Reason::COUNT as usize];
    for (index, total) in (0u32..).zip(totals.iter_mut()) {
        *total = array.get(&index, 0).map_err(map_error)?.iter().sum();
    }
    Ok(ReasonCounts(totals))
}

/// Reads the `STATS` map pinned under `pins`.
pub fn read_pinned(pins: &PinLayout) -> Result<ReasonCounts> {
    let data = MapData::from_pin(pins.map(names::STATS)).map_err(map_error)?;
    read(&Map::PerCpuArray(data))
}

fn map_error(source: aya::maps::MapError) -> Error {
    Error::Map { name: names::STATS.into(), source: Box::new(source) }
}

/// How the north-south programs sent on the packets they translated.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Forwarding {
    /// XDP with FIB forwarding on: redirected by FIB lookup.
    pub redirected: u64,
    /// XDP with FIB forwarding on: passed to the stack.
    pub to_stack: u64,
    /// Translated by the tc fallback of interfaces where XDP could not be attached.
    pub tc_fallback: u64,
    /// Of those, redirected by FIB lookup (FIB forwarding on).
    pub tc_fallback_redirected: u64,
}

/// The `FORWARDING` counters of the datapath pinned under `pins`.
pub fn read_forwarding_pinned(pins: &PinLayout) -> Result<Forwarding> {
    let data = MapData::from_pin(pins.map(names::FORWARDING)).map_err(forwarding_error)?;
    read_forwarding(&Map::PerCpuArray(data))
}

/// Reads the `FORWARDING` map of a loaded object.
pub fn read_forwarding(map: &Map) -> Result<Forwarding> {
    let array: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(map).map_err(forwarding_error)?;
    let total = |index: u32| -> Result<u64> {
        Ok(array.get(&index, 0).map_err(forwarding_error)?.iter().sum())
    };
    Ok(Forwarding {
        redirected: total(forwarding::REDIRECTED)?,
        to_stack: total(forwarding::TO_STACK)?,
        // A map pinned by an older version keeps its fewer slots.
        tc_fallback: total(forwarding::TC_FALLBACK).unwrap_or(0),
        tc_fallback_redirected: total(forwarding::TC_FALLBACK_REDIRECTED).unwrap_or(0),
    })
}

fn forwarding_error(source: aya::maps::MapError) -> Error {
    Error::Map { name: names::FORWARDING.into(), source: Box::new(source) }
}
