//! Copies the entries of a pinned map into another pinned map of the same kind and a different
//! size: how [`crate::resize`] carries a map's contents into its resized successor. The kernel
//! cannot resize a map, so a new one is filled from the old.
//!
//! The programs may run on the old map while it is copied, so a copy is two passes: the first
//! before the programs move to the new map, the second after, for what they changed in between.

use std::{
    collections::{BTreeMap, HashMap as StdHashMap},
    hash::Hash,
    os::fd::AsFd as _,
    path::Path,
};

use aya::{
    Pod,
    maps::{HashMap, Map, MapData, MapError, MapInfo, PerCpuArray, PerCpuValues},
};
use lb_common::{
    conntrack::{CLAIMED, is_live, twin_key},
    maps::{
        AffinityKey, AffinityValue, Backend, ConntrackKey, ConntrackValue, FragmentKey,
        FragmentValue, ServiceCounters, ServiceKey, ServiceValue, Slot, names,
    },
};

use super::{
    found, incompatible_pins, lookup_all, map_error, syscall_error, unknown_map, update_all,
};
use crate::{
    clock,
    error::{Error, Result},
    pins::PinLayout,
};

/// `BPF_ANY` and `BPF_NOEXIST`.
const BPF_ANY: u64 = 0;
const BPF_NOEXIST: u64 = 1;

/// What the first pass read from the old map, for the second to tell what changed since.
pub enum Copied {
    Conntrack(StdHashMap<ConntrackKey, ConntrackValue>),
    Affinity(StdHashMap<AffinityKey, AffinityValue>),
    /// The frontends' counters by index, where not zero.
    Counters(BTreeMap<u32, Vec<ServiceCounters>>),
    /// The verdict counters by reason, where not zero.
    Verdicts(BTreeMap<u32, Vec<u64>>),
    /// Maps only the daemon writes: the first pass is the whole copy.
    Complete,
}

/// True for the maps the programs insert into: LRU maps, which make room by evicting.
pub fn programs_insert(name: &str) -> bool {
    matches!(name, names::CONNTRACK | names::AFFINITY | names::FRAGMENTS)
}

/// Checks that map `name` pinned at `pin` (in the datapath pinned under `pins`) has this
/// build's key and value sizes: a copy trusts them.
pub fn check_layout(pins: &PinLayout, name: &str, pin: &Path) -> Result<()> {
    let info = MapInfo::from_pin(pin).map_err(map_error(name))?;
    let (key, value) = match name {
        names::SERVICES => (size_of::<ServiceKey>(), size_of::<ServiceValue>()),
        names::BACKENDS => (size_of::<u32>(), size_of::<Backend>()),
        names::BACKEND_SLOTS => (size_of::<u32>(), size_of::<Slot>()),
        names::SERVICE_STATS => (size_of::<u32>(), size_of::<ServiceCounters>()),
        names::STATS => (size_of::<u32>(), size_of::<u64>()),
        names::CONNTRACK => (size_of::<ConntrackKey>(), size_of::<ConntrackValue>()),
        names::AFFINITY => (size_of::<AffinityKey>(), size_of::<AffinityValue>()),
        names::FRAGMENTS => (size_of::<FragmentKey>(), size_of::<FragmentValue>()),
        _ => return Err(unknown_map(name)),
    };
    let error = if info.key_size() as usize != key {
        MapError::InvalidKeySize { size: info.key_size() as usize, expected: key }
    } else if info.value_size() as usize != value {
        MapError::InvalidValueSize { size: info.value_size() as usize, expected: value }
    } else {
        return Ok(());
    };
    Err(incompatible_pins(pins, map_error(name)(error)))
}

/// The first pass, into a new map no program uses yet: copies every entry of map `name`
/// pinned at `from` into the one pinned at `to`. A conntrack map gets only live entries; both
/// LRU maps get the least recently used first, so that a smaller map evicts those first, as
/// far as the kernel's LRU keeps insertion order.
/// Returns how many entries it wrote, and what it read.
pub fn copy_all(name: &str, from: &Path, to: &Path) -> Result<(usize, Copied)> {
    let (source, target) = (open(name, from)?, open(name, to)?);
    Ok(match name {
        names::SERVICES => {
            (copy::<ServiceKey, ServiceValue>(name, &source, &target)?, Copied::Complete)
        }
        names::BACKENDS => (copy::<u32, Backend>(name, &source, &target)?, Copied::Complete),
        names::BACKEND_SLOTS => (copy::<u32, Slot>(name, &source, &target)?, Copied::Complete),
        names::SERVICE_STATS => {
            let (written, read) = copy_counters(name, source, target, false)?;
            (written, Copied::Counters(read))
        }
        names::STATS => {
            let (written, read) = copy_counters(name, source, target, false)?;
            (written, Copied::Verdicts(read))
        }
        names::CONNTRACK => {
            let mut entries = live_conntrack(read_all(name, &source)?)?;
            entries.sort_by_key(|(_, value)| value.last_seen);
            write_all(name, &target, &entries)?;
            (entries.len(), Copied::Conntrack(entries.into_iter().collect()))
        }
        names::AFFINITY => {
            let mut entries = read_all::<AffinityKey, AffinityValue>(name, &source)?;
            entries.sort_by_key(|(_, value)| value.last_used);
            write_all(name, &target, &entries)?;
            (entries.len(), Copied::Affinity(entries.into_iter().collect()))
        }
        // Records live for seconds: one pass, no second. A datagram whose first fragment
        // passes between the copy and the programs' move has its record in the old map, and
        // its later fragments are not translated; its sender's retry is.
        names::FRAGMENTS => {
            (copy::<FragmentKey, FragmentValue>(name, &source, &target)?, Copied::Complete)
        }
        _ => return Err(unknown_map(name)),
    })
}

/// The first pass of a move a stopped daemon began: programs may use the new map already, so
/// what it holds stays, and only what it lacks is copied (as by [`copy_changes`] after a first
/// pass that read nothing).
pub fn copy_missing(name: &str, from: &Path, to: &Path) -> Result<(usize, Copied)> {
    match name {
        names::CONNTRACK => {
            let (written, old) = carry_conntrack(name, from, to, &StdHashMap::new())?;
            Ok((written, Copied::Conntrack(old.into_iter().collect())))
        }
        names::AFFINITY => {
            let (written, old) = carry_affinity(name, from, to, &StdHashMap::new())?;
            Ok((written, Copied::Affinity(old.into_iter().collect())))
        }
        names::SERVICE_STATS => {
            let (written, read) = copy_counters(name, open(name, from)?, open(name, to)?, true)?;
            Ok((written, Copied::Counters(read)))
        }
        names::STATS => {
            let (written, read) = copy_counters(name, open(name, from)?, open(name, to)?, true)?;
            Ok((written, Copied::Verdicts(read)))
        }
        // The programs may have recorded newer datagrams under the same keys already.
        names::FRAGMENTS => Ok((0, Copied::Complete)),
        // Nothing runs the daemon's writes meanwhile: copy it all again.
        _ => copy_all(name, from, to),
    }
}

/// The second pass, once the programs use the new map: carries over what the old programs
/// changed in the old map since `copied` was read (new flows, changed entries such as a TCP
/// state change, counts), where the new programs have not changed the same entry since; see
/// `carry_changes`. Returns how many entries it wrote.
pub fn copy_changes(name: &str, from: &Path, to: &Path, copied: &Copied) -> Result<usize> {
    match copied {
        Copied::Conntrack(copied) => Ok(carry_conntrack(name, from, to, copied)?.0),
        Copied::Affinity(copied) => Ok(carry_affinity(name, from, to, copied)?.0),
        Copied::Counters(copied) => add_counts(name, open(name, from)?, open(name, to)?, copied),
        Copied::Verdicts(copied) => add_counts(name, open(name, from)?, open(name, to)?, copied),
        Copied::Complete => Ok(0),
    }
}

/// [`copy_changes`] of conntrack; returns the live entries it read too.
fn carry_conntrack(
    name: &str,
    from: &Path,
    to: &Path,
    copied: &StdHashMap<ConntrackKey, ConntrackValue>,
) -> Result<(usize, Vec<(ConntrackKey, ConntrackValue)>)> {
    let old = live_conntrack(read_all(name, &open(name, from)?)?)?;
    let same = |a: &ConntrackValue, b: &ConntrackValue| {
        ConntrackValue { last_seen: 0, ..*a } == ConntrackValue { last_seen: 0, ..*b }
    };
    let twin = |key: &ConntrackKey, value: &ConntrackValue| Some(twin_key(key, value));
    let written = carry_changes(name, open(name, to)?, copied, &old, same, twin)?;
    Ok((written, old))
}

/// [`copy_changes`] of affinity; returns the entries it read too.
fn carry_affinity(
    name: &str,
    from: &Path,
    to: &Path,
    copied: &StdHashMap<AffinityKey, AffinityValue>,
) -> Result<(usize, Vec<(AffinityKey, AffinityValue)>)> {
    let old = read_all(name, &open(name, from)?)?;
    let same = |a: &AffinityValue, b: &AffinityValue| a.backend_id == b.backend_id;
    let written = carry_changes(name, open(name, to)?, copied, &old, same, |_, _| None)?;
    Ok((written, old))
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

/// The id of map `name` pinned at `pin`.
pub fn map_id(name: &str, pin: &Path) -> Result<u32> {
    MapInfo::from_pin(pin).map(|info| info.id()).map_err(map_error(name))
}

fn open(name: &str, path: &Path) -> Result<MapData> {
    MapData::from_pin(path).map_err(map_error(name))
}

fn read_all<K: Pod, V: Pod>(name: &str, map: &MapData) -> Result<Vec<(K, V)>> {
    lookup_all(name, map.fd().as_fd())
}

fn write_all<K: Pod, V: Pod>(name: &str, map: &MapData, entries: &[(K, V)]) -> Result<()> {
    let (keys, values): (Vec<K>, Vec<V>) = entries.iter().copied().unzip();
    update_all(name, map.fd().as_fd(), &keys, &values)
}

/// Copies a hash map or an array in batches; returns the entries copied.
fn copy<K: Pod, V: Pod>(name: &str, source: &MapData, target: &MapData) -> Result<usize> {
    let entries = read_all::<K, V>(name, source)?;
    write_all(name, target, &entries)?;
    Ok(entries.len())
}

/// The entries that have not timed out.
fn live_conntrack(
    entries: Vec<(ConntrackKey, ConntrackValue)>,
) -> Result<Vec<(ConntrackKey, ConntrackValue)>> {
    let now = clock::jiffies_now().map_err(syscall_error(names::CONNTRACK, "clock_gettime"))?;
    let rate = clock::jiffies_per_second();
    // A claimed entry is being rewritten by a program (`CLAIMED`): copied as it is, it would
    // never expire in the new map; its new content is carried by the second pass.
    let kept = |(key, value): &(ConntrackKey, ConntrackValue)| {
        value.last_seen != CLAIMED && is_live(value, key.proto, now, rate)
    };
    Ok(entries.into_iter().filter(kept).collect())
}

/// Writes into `target` each entry of `old` that changed since `copied` was read (other than
/// its timestamp: the new programs refresh that themselves), where the new map's entry has not
/// changed too, and each entry new since, unless the new map holds its key or its `twin` (the
/// other entry of its flow) with other content: then neither is copied, and no flow is copied
/// half. Only what is to be written is looked up in the new map, so that the pass is about one
/// read of the old map long. Returns how many entries it wrote.
fn carry_changes<K: Pod + Eq + Hash, V: Pod>(
    name: &str,
    target: MapData,
    copied: &StdHashMap<K, V>,
    old: &[(K, V)],
    same: fn(&V, &V) -> bool,
    twin: fn(&K, &V) -> Option<K>,
) -> Result<usize> {
    let changed: StdHashMap<K, V> = old
        .iter()
        .filter(|(key, value)| copied.get(key).is_none_or(|before| !same(before, value)))
        .copied()
        .collect();
    let mut target: HashMap<_, K, V> =
        HashMap::try_from(Map::LruHashMap(target)).map_err(map_error(name))?;
    let get = |target: &HashMap<MapData, K, V>, key: &K| found(name, target.get(key, 0));
    let mut written = 0;
    // Changed entries first: a new entry's twin may be one of them.
    let (updates, inserts): (Vec<_>, Vec<_>) =
        changed.iter().partition(|(key, _)| copied.contains_key(key));
    for (key, value) in updates.into_iter().chain(inserts) {
        let flags = if let Some(before) = copied.get(key) {
            match get(&target, key)? {
                Some(now) if same(&now, before) => BPF_ANY,
                _ => continue,
            }
        } else {
            if let Some(twin) = twin(key, value)
                && let Some(theirs) = get(&target, &twin)?
            {
                // The old map's twin: changed too, or as copied (but for its timestamp).
                let ours = changed.get(&twin).or_else(|| copied.get(&twin));
                if ours.is_none_or(|ours| !same(ours, &theirs)) {
                    continue;
                }
            }
            BPF_NOEXIST
        };
        // A NOEXIST insert loses to an entry the new programs made since: theirs is the one
        // packets of that flow have used.
        match target.insert(key, value, flags) {
            Ok(()) => written += 1,
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EEXIST) => {}
            Err(error) => return Err(map_error(name)(error)),
        }
    }
    Ok(written)
}

/// A per-CPU counter a copy carries over: a frontend's packets and bytes, or a verdict count.
trait Counter: Pod + Default + PartialEq {
    /// `self` plus what was counted from `then` to `now`.
    fn plus_since(self, now: Self, then: Self) -> Self;
}

impl Counter for ServiceCounters {
    fn plus_since(self, now: Self, then: Self) -> Self {
        Self {
            packets: self.packets + now.packets.saturating_sub(then.packets),
            bytes: self.bytes + now.bytes.saturating_sub(then.bytes),
        }
    }
}

impl Counter for u64 {
    fn plus_since(self, now: Self, then: Self) -> Self {
        self + now.saturating_sub(then)
    }
}

/// Counters, index by index (a per-CPU array; indexes past the smaller of the two are not
/// copied). With `only_into_zero`, an index the new map has counted is left alone.
/// Returns how many indexes it wrote, and the old map's non-zero counters.
fn copy_counters<C: Counter>(
    name: &str,
    source: MapData,
    target: MapData,
    only_into_zero: bool,
) -> Result<(usize, BTreeMap<u32, Vec<C>>)> {
    let (source, mut target) = (counters::<C>(name, source)?, counters::<C>(name, target)?);
    let is_zero = |counter: &C| *counter == C::default();
    let mut read = BTreeMap::new();
    let mut written = 0;
    for index in 0..source.len().min(target.len()) {
        let values = source.get(&index, 0).map_err(map_error(name))?;
        if values.iter().all(is_zero) {
            continue;
        }
        read.insert(index, values.to_vec());
        if only_into_zero && !target.get(&index, 0).map_err(map_error(name))?.iter().all(is_zero) {
            continue;
        }
        target.set(index, values, 0).map_err(map_error(name))?;
        written += 1;
    }
    Ok((written, read))
}

/// Adds to `target` what `source` counted since `copied` was read. Returns how many indexes
/// it wrote.
fn add_counts<C: Counter>(
    name: &str,
    source: MapData,
    target: MapData,
    copied: &BTreeMap<u32, Vec<C>>,
) -> Result<usize> {
    let (source, mut target) = (counters::<C>(name, source)?, counters::<C>(name, target)?);
    let mut written = 0;
    for index in 0..source.len().min(target.len()) {
        let now = source.get(&index, 0).map_err(map_error(name))?;
        let before = copied.get(&index);
        let then =
            |cpu: usize| before.and_then(|values| values.get(cpu)).copied().unwrap_or_default();
        if (0..now.len()).all(|cpu| C::default().plus_since(now[cpu], then(cpu)) == C::default()) {
            continue;
        }
        let mut sums = target.get(&index, 0).map_err(map_error(name))?.to_vec();
        for (cpu, sum) in sums.iter_mut().enumerate() {
            *sum = sum.plus_since(now[cpu], then(cpu));
        }
        let sums = PerCpuValues::try_from(sums).map_err(syscall_error(name, "per-CPU values"))?;
        target.set(index, sums, 0).map_err(map_error(name))?;
        written += 1;
    }
    Ok(written)
}

fn counters<C: Counter>(name: &str, map: MapData) -> Result<PerCpuArray<MapData, C>> {
    PerCpuArray::try_from(Map::PerCpuArray(map)).map_err(map_error(name))
}
