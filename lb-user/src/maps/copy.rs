//! Copies every entry of a pinned map into another pinned map of the same kind and a different
//! size: how [`crate::resize`] carries a map's contents into its resized successor. The kernel
//! cannot resize a map, so a new one is filled from the old.

use std::{collections::HashSet, hash::Hash, os::fd::AsFd as _, path::Path};

use aya::{
    Pod,
    maps::{HashMap, Map, MapData, MapError, PerCpuArray},
};
use lb_common::maps::{
    AffinityKey, AffinityValue, Backend, ConntrackKey, ConntrackValue, ServiceCounters, ServiceKey,
    ServiceValue, Slot, names,
};

use super::{map_error, syscall_error};
use crate::{
    error::{Error, Result},
    map_batch,
};

/// Entries a batch read asks for at once.
const ENTRIES_PER_CALL: usize = 8_192;
/// `BPF_NOEXIST`: insert only if the key is free.
const BPF_NOEXIST: u64 = 1;

/// What a first copy of a map read: for the maps the programs insert into (conntrack and
/// affinity), the keys, so that a second pass copies only the entries made since.
pub enum Copied {
    Conntrack(HashSet<ConntrackKey>),
    Affinity(HashSet<AffinityKey>),
    /// Maps only the daemon writes: one copy is the whole story.
    Complete,
}

impl Copied {
    /// Before any copy of map `name`: every entry of a map the programs write is still to copy.
    pub fn nothing(name: &str) -> Self {
        match name {
            names::CONNTRACK => Self::Conntrack(HashSet::new()),
            names::AFFINITY => Self::Affinity(HashSet::new()),
            _ => Self::Complete,
        }
    }
}

/// True for the maps the programs insert into, whose entries a copy may miss while they run.
pub fn programs_write(name: &str) -> bool {
    matches!(name, names::CONNTRACK | names::AFFINITY)
}

/// Copies the entries of map `name` pinned at `from` into the one pinned at `to`; returns how
/// many it copied and what a second pass ([`copy_new_entries`]) needs. `to` must be at least as
/// large, except for the LRU maps, which evict their oldest entries when it is not.
pub fn copy_all(name: &str, from: &Path, to: &Path) -> Result<(usize, Copied)> {
    let (source, target) = (open(name, from)?, open(name, to)?);
    let copied = match name {
        names::SERVICES => {
            (copy::<ServiceKey, ServiceValue>(name, &source, &target)?.len(), Copied::Complete)
        }
        names::BACKENDS => (copy::<u32, Backend>(name, &source, &target)?.len(), Copied::Complete),
        names::BACKEND_SLOTS => {
            (copy::<u32, Slot>(name, &source, &target)?.len(), Copied::Complete)
        }
        names::SERVICE_STATS => (copy_counters(name, source, target)?, Copied::Complete),
        names::CONNTRACK => {
            let keys = copy::<ConntrackKey, ConntrackValue>(name, &source, &target)?;
            (keys.len(), Copied::Conntrack(keys.into_iter().collect()))
        }
        names::AFFINITY => {
            let keys = copy::<AffinityKey, AffinityValue>(name, &source, &target)?;
            (keys.len(), Copied::Affinity(keys.into_iter().collect()))
        }
        _ => return Err(not_copyable(name)),
    };
    Ok(copied)
}

/// Copies the entries of `from` that the first copy did not see and `to` does not hold: those
/// the programs made between the two. Returns how many.
pub fn copy_new_entries(name: &str, from: &Path, to: &Path, copied: &Copied) -> Result<usize> {
    match copied {
        Copied::Conntrack(seen) => {
            copy_unseen::<ConntrackKey, ConntrackValue>(name, from, to, seen)
        }
        Copied::Affinity(seen) => copy_unseen::<AffinityKey, AffinityValue>(name, from, to, seen),
        Copied::Complete => Ok(0),
    }
}

/// Moves the pin of map `name` from `from` to `to`: bpffs cannot rename, so the map is pinned
/// a second time and the first pin removed.
pub fn move_pin(name: &str, from: &Path, to: &Path) -> Result<()> {
    open(name, from)?.pin(to).map_err(|source| Error::Pin {
        what: format!("map {name}"),
        path: to.to_owned(),
        source: Box::new(source),
    })?;
    std::fs::remove_file(from).map_err(Error::io(from))
}

fn open(name: &str, path: &Path) -> Result<MapData> {
    MapData::from_pin(path).map_err(map_error(name))
}

/// Copies a hash map or an array in batches; returns the keys copied (`copy::<K, _>(..).len()`
/// entries).
fn copy<K: Pod, V: Pod>(name: &str, source: &MapData, target: &MapData) -> Result<Vec<K>> {
    let (keys, values) = map_batch::lookup::<K, V>(source.fd().as_fd(), ENTRIES_PER_CALL)
        .map_err(syscall_error(name, "BPF_MAP_LOOKUP_BATCH"))?;
    map_batch::update(target.fd().as_fd(), &keys, &values)
        .map_err(syscall_error(name, "BPF_MAP_UPDATE_BATCH"))?;
    Ok(keys)
}

/// The per-frontend counters, index by index (a per-CPU array; the indexes past the smaller of
/// the two are not copied). Returns the indexes with traffic.
fn copy_counters(name: &str, source: MapData, target: MapData) -> Result<usize> {
    let source: PerCpuArray<_, ServiceCounters> =
        PerCpuArray::try_from(Map::PerCpuArray(source)).map_err(map_error(name))?;
    let mut target: PerCpuArray<_, ServiceCounters> =
        PerCpuArray::try_from(Map::PerCpuArray(target)).map_err(map_error(name))?;
    let mut copied = 0;
    for index in 0..source.len().min(target.len()) {
        let values = source.get(&index, 0).map_err(map_error(name))?;
        if values.iter().all(|counters| *counters == ServiceCounters::default()) {
            continue;
        }
        target.set(index, values, 0).map_err(map_error(name))?;
        copied += 1;
    }
    Ok(copied)
}

fn copy_unseen<K: Pod + Eq + Hash, V: Pod>(
    name: &str,
    from: &Path,
    to: &Path,
    seen: &HashSet<K>,
) -> Result<usize> {
    let source = open(name, from)?;
    let (keys, values) = map_batch::lookup::<K, V>(source.fd().as_fd(), ENTRIES_PER_CALL)
        .map_err(syscall_error(name, "BPF_MAP_LOOKUP_BATCH"))?;
    let mut target: HashMap<_, K, V> =
        HashMap::try_from(Map::LruHashMap(open(name, to)?)).map_err(map_error(name))?;
    let mut copied = 0;
    for (key, value) in keys.iter().zip(&values).filter(|(key, _)| !seen.contains(key)) {
        // An entry the new programs made for the same key meanwhile is the one packets of
        // that flow have used since: it stays.
        match target.insert(key, value, BPF_NOEXIST) {
            Ok(()) => copied += 1,
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EEXIST) => {}
            Err(error) => return Err(map_error(name)(error)),
        }
    }
    Ok(copied)
}

fn not_copyable(name: &str) -> Error {
    Error::Map {
        name: name.to_owned(),
        source: Box::new(MapError::InvalidName { name: name.to_owned() }),
    }
}
