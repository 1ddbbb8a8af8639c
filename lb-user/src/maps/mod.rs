//! The one module that reads and writes the datapath's maps through `aya::maps` (others only
//! read their sizes): typed access, whether taken from a freshly loaded object or opened from
//! their pins, and the copy into a resized map (`copy`).
//!
//! Writers speak in [`MapOp`]s, so the reconciler can be a pure function tested without a
//! kernel (through [`MapWriter`]) and the kernel side a thin `apply_all`, which batches runs of
//! writes into one map.

use std::{
    net::Ipv4Addr,
    os::fd::{AsFd as _, BorrowedFd, OwnedFd},
    path::Path,
};

use aya::{
    Ebpf,
    maps::{
        Array, HashMap, LpmTrie, Map, MapData, MapError, PerCpuArray, PerCpuValues,
        lpm_trie::Key as LpmKey,
    },
};
use ipnet::Ipv4Net;
use lb_common::maps::{
    AffinityKey, AffinityValue, Backend, ConntrackKey, ConntrackValue, NodeConfig, RefusalBudget,
    ServiceCounters, ServiceKey, ServiceValue, Slot, SourceRangeKey, ct_flags, names, node_flags,
};

use crate::{
    error::{Error, Result},
    map_batch,
    pins::PinLayout,
    reconcile::Forget,
};

pub mod copy;

/// One change to the datapath's maps. Slots are addressed by index in the `BACKEND_SLOTS`
/// array; removing one zeroes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MapOp {
    SetNodeConfig(NodeConfig),
    UpsertBackend { id: u32, backend: Backend },
    RemoveBackend { id: u32 },
    UpsertSlot { index: u32, slot: Slot },
    RemoveSlot { index: u32 },
    UpsertService { key: ServiceKey, value: ServiceValue },
    RemoveService { key: ServiceKey },
    AddSourceRange { service_id: u32, range: Ipv4Net },
    RemoveSourceRange { service_id: u32, range: Ipv4Net },
}

/// Something that applies map operations: the kernel maps, or a recording fake in tests.
pub trait MapWriter {
    fn apply(&mut self, op: &MapOp) -> Result<()>;

    /// Applies `ops` in order; a writer may merge runs of them into fewer calls.
    fn apply_all(&mut self, ops: &[MapOp]) -> Result<()> {
        ops.iter().try_for_each(|op| self.apply(op))
    }
}

/// The datapath's maps that the daemon writes or reads.
pub struct KernelMaps {
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    slots: Array<MapData, Slot>,
    backends: HashMap<MapData, u32, Backend>,
    source_ranges: LpmTrie<MapData, SourceRangeKey, u8>,
    node_config: Array<MapData, NodeConfig>,
    conntrack: HashMap<MapData, ConntrackKey, ConntrackValue>,
    service_stats: PerCpuArray<MapData, ServiceCounters>,
    /// Second descriptors of the maps a sync fills in bulk and of the one the collector walks,
    /// for batch calls (the typed maps do not lend theirs).
    batch_fds: BatchFds,
}

struct BatchFds {
    services: OwnedFd,
    slots: OwnedFd,
    backends: OwnedFd,
    conntrack: OwnedFd,
    /// The only descriptor of the affinity map: nothing reads it but a purge.
    affinity: OwnedFd,
}

/// What [`KernelMaps::purge`] removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Purged {
    /// Conntrack entries (both directions count).
    pub flows: usize,
    /// Session-affinity entries.
    pub affinities: usize,
}

/// Conntrack entries a batch read asks for at once: 384 KiB of room, so that a million entries
/// take about 120 calls.
const CONNTRACK_ENTRIES_PER_CALL: usize = 8_192;

/// Slots a batch read asks for at once: 12 bytes each, so the 2M of the default array take
/// 128 calls.
const SLOTS_PER_CALL: usize = 16_384;

fn map_error(name: &str) -> impl FnOnce(MapError) -> Error + '_ {
    move |source| Error::Map { name: name.to_owned(), source: Box::new(source) }
}

/// Map `name` is not one the caller knows.
fn unknown_map(name: &str) -> Error {
    Error::Map {
        name: name.to_owned(),
        source: Box::new(MapError::InvalidName { name: name.to_owned() }),
    }
}

/// Typed view of one map, from whichever source.
fn typed<T: TryFrom<Map, Error = MapError>>(name: &str, map: Option<Map>) -> Result<T> {
    T::try_from(map.ok_or_else(|| unknown_map(name))?).map_err(map_error(name))
}

/// A lookup's value, or `None` if the key is not there.
fn found<V>(name: &str, looked_up: Result<V, MapError>) -> Result<Option<V>> {
    match looked_up {
        Ok(value) => Ok(Some(value)),
        Err(MapError::KeyNotFound) => Ok(None),
        Err(e) => Err(map_error(name)(e)),
    }
}

/// Every entry of map `name` (a plain or LRU hash map, or an array) behind `fd`, read in
/// batches.
fn lookup_all<K: aya::Pod, V: aya::Pod>(name: &str, fd: BorrowedFd<'_>) -> Result<Vec<(K, V)>> {
    let (keys, values) = map_batch::lookup(fd, CONNTRACK_ENTRIES_PER_CALL)
        .map_err(syscall_error(name, "bpf_map_lookup_batch"))?;
    Ok(keys.into_iter().zip(values).collect())
}

/// Writes `keys[i] -> values[i]` into map `name` behind `fd` in one batch.
fn update_all<K: aya::Pod, V: aya::Pod>(
    name: &str,
    fd: BorrowedFd<'_>,
    keys: &[K],
    values: &[V],
) -> Result<()> {
    map_batch::update(fd, keys, values).map_err(syscall_error(name, "bpf_map_update_batch"))
}

/// Gives every CPU `budget` (a full bucket) for each side in `REFUSAL_BUDGET`, pinned under
/// `pins`. Not a [`MapOp`]: the limit is the node's setting, written once at the start, not a
/// Kubernetes object's.
pub fn set_refusal_budget(pins: &PinLayout, budget: RefusalBudget) -> Result<()> {
    let name = names::REFUSAL_BUDGET;
    let data = MapData::from_pin(pins.map(name)).map_err(map_error(name))?;
    write_refusal_budget(&mut Map::PerCpuArray(data), budget)
}

/// [`set_refusal_budget`] in the map of a loaded object.
pub fn write_refusal_budget(map: &mut Map, budget: RefusalBudget) -> Result<()> {
    let name = names::REFUSAL_BUDGET;
    let mut array: PerCpuArray<_, RefusalBudget> =
        PerCpuArray::try_from(map).map_err(map_error(name))?;
    for side in 0..array.len() {
        // One value per possible CPU, as many as the entry read back holds.
        let cpus = array.get(&side, 0).map_err(map_error(name))?.len();
        let values = PerCpuValues::try_from(vec![budget; cpus])
            .map_err(syscall_error(name, "per-CPU values"))?;
        array.set(side, values, 0).map_err(map_error(name))?;
    }
    Ok(())
}

/// The size of map `name` pinned at `pin`, in entries.
pub fn pinned_entries(name: &str, pin: &Path) -> Result<u32> {
    Ok(aya::maps::MapInfo::from_pin(pin).map_err(map_error(name))?.max_entries())
}

impl KernelMaps {
    /// Takes the maps out of a loaded object (its programs keep using them).
    pub fn take_from(ebpf: &mut Ebpf) -> Result<Self> {
        Self::open(|name| ebpf.take_map(name))
    }

    /// Opens the maps pinned under `pins`.
    pub fn from_pins(pins: &PinLayout) -> Result<Self> {
        let opened = Self::open(|name| {
            let data = MapData::from_pin(pins.map(name)).ok()?;
            let map = match name {
                names::SOURCE_RANGES => Map::LpmTrie(data),
                names::NODE_CONFIG | names::BACKEND_SLOTS => Map::Array(data),
                names::CONNTRACK | names::AFFINITY => Map::LruHashMap(data),
                names::SERVICE_STATS => Map::PerCpuArray(data),
                _ => Map::HashMap(data),
            };
            Some(map)
        });
        opened.map_err(|error| incompatible_pins(pins, error))
    }

    fn open(mut take: impl FnMut(&str) -> Option<Map>) -> Result<Self> {
        let (services, services_fd) = with_fd(names::SERVICES, take(names::SERVICES))?;
        let (slots, slots_fd) = with_fd(names::BACKEND_SLOTS, take(names::BACKEND_SLOTS))?;
        let (backends, backends_fd) = with_fd(names::BACKENDS, take(names::BACKENDS))?;
        let (conntrack, conntrack_fd) = with_fd(names::CONNTRACK, take(names::CONNTRACK))?;
        let (_, affinity_fd) = with_fd(names::AFFINITY, take(names::AFFINITY))?;
        Ok(Self {
            services: typed(names::SERVICES, services)?,
            slots: typed(names::BACKEND_SLOTS, slots)?,
            backends: typed(names::BACKENDS, backends)?,
            source_ranges: typed(names::SOURCE_RANGES, take(names::SOURCE_RANGES))?,
            node_config: typed(names::NODE_CONFIG, take(names::NODE_CONFIG))?,
            conntrack: typed(names::CONNTRACK, conntrack)?,
            service_stats: typed(names::SERVICE_STATS, take(names::SERVICE_STATS))?,
            batch_fds: BatchFds {
                services: services_fd,
                slots: slots_fd,
                backends: backends_fd,
                conntrack: conntrack_fd,
                affinity: affinity_fd,
            },
        })
    }

    /// Every programmed frontend.
    pub fn services(&self) -> Result<Vec<(ServiceKey, ServiceValue)>> {
        self.services.iter().collect::<Result<_, _>>().map_err(map_error(names::SERVICES))
    }

    /// The whole slot array, in index order, read in batches.
    pub fn slot_array(&self) -> Result<Vec<Slot>> {
        let (_, slots): (Vec<u32>, Vec<Slot>) =
            map_batch::lookup(self.batch_fds.slots.as_fd(), SLOTS_PER_CALL)
                .map_err(syscall_error(names::BACKEND_SLOTS, "bpf_map_lookup_batch"))?;
        Ok(slots)
    }

    /// The run of `count` slots from `base` (a frontend's).
    pub fn slots(&self, base: u32, count: u32) -> Result<Vec<Slot>> {
        (base..base.saturating_add(count))
            .map(|index| self.slots.get(&index, 0).map_err(map_error(names::BACKEND_SLOTS)))
            .collect()
    }

    /// Every programmed backend.
    pub fn backends(&self) -> Result<Vec<(u32, Backend)>> {
        self.backends.iter().collect::<Result<_, _>>().map_err(map_error(names::BACKENDS))
    }

    /// The node configuration, if the daemon has written it.
    pub fn node_config(&self) -> Result<Option<NodeConfig>> {
        let config = self.node_config.get(&0, 0).map_err(map_error(names::NODE_CONFIG))?;
        Ok((config.flags & node_flags::CONFIGURED != 0).then_some(config))
    }

    /// Every programmed source range, as (frontend id, range).
    pub fn source_ranges(&self) -> Result<Vec<(u32, Ipv4Net)>> {
        let mut ranges = Vec::new();
        for key in self.source_ranges.keys() {
            let key = key.map_err(map_error(names::SOURCE_RANGES))?;
            let data = key.data();
            let prefix_len = key.prefix_len().saturating_sub(SourceRangeKey::SERVICE_ID_BITS);
            let address = Ipv4Addr::from(u32::from_be(data.src_ip_be));
            let range =
                Ipv4Net::new(address, u8::try_from(prefix_len).unwrap_or(32)).map_err(|e| {
                    Error::Link { what: "a source range in the map".into(), source: e.into() }
                })?;
            ranges.push((data.service_id, range));
        }
        Ok(ranges)
    }

    /// Forgets what a reconcile says to ([`Forget`]):
    /// - non-TCP flows to endpoints that no longer serve, so that UDP clients move to a live
    ///   backend. TCP flows stay, as with kube-proxy: a terminating backend may still finish
    ///   them;
    /// - every client's session affinity to removed (frontend, backend) pairs, as kube-proxy's
    ///   ends with the endpoint. The programs only check that a remembered backend id exists,
    ///   and an id freed now may name another service's backend at the next sync: this runs
    ///   before that sync.
    pub fn purge(&mut self, forget: &Forget) -> Result<Purged> {
        if forget.is_empty() {
            return Ok(Purged::default());
        }
        let doomed_flows: Vec<ConntrackKey> = if forget.flows.is_empty() {
            Vec::new()
        } else {
            let mut flows = self.conntrack()?;
            flows.retain(|(key, value)| forget.takes_flow(key, value));
            // Forward entries first: a packet of the flow between the two deletes finds its
            // forward entry gone and opens anew, where a forward entry left alone for a moment
            // would write its deleted reply entry again (`conntrack::touch` in the programs).
            flows.sort_by_key(|(_, value)| value.flags & ct_flags::REPLY != 0);
            flows.into_iter().map(|(key, _)| key).collect()
        };
        let doomed_affinities: Vec<AffinityKey> = self
            .affinities()?
            .into_iter()
            .filter(|(key, value)| forget.affinities.contains(&(key.service_id, value.backend_id)))
            .map(|(key, _)| key)
            .collect();
        // Sticky clients first: a packet between the two would otherwise open its flow again,
        // through the remembered backend, just after its old one was forgotten.
        let affinities = map_batch::delete(self.batch_fds.affinity.as_fd(), &doomed_affinities)
            .map_err(syscall_error(names::AFFINITY, "bpf_map_delete_batch"))?;
        let flows = self.remove_conntrack(&doomed_flows)?;
        Ok(Purged { flows, affinities })
    }

    /// Every session-affinity entry: (client, frontend id) -> (backend id, last use).
    pub fn affinities(&self) -> Result<Vec<(AffinityKey, AffinityValue)>> {
        lookup_all(names::AFFINITY, self.batch_fds.affinity.as_fd())
    }

    /// Writes one session-affinity entry (tests age entries with it).
    pub fn write_affinity(&mut self, key: &AffinityKey, value: &AffinityValue) -> Result<()> {
        update_all(names::AFFINITY, self.batch_fds.affinity.as_fd(), &[*key], &[*value])
    }

    /// Packets and bytes translated for frontend `service_id`, summed over CPUs.
    pub fn service_counters(&self, service_id: u32) -> Result<ServiceCounters> {
        let per_cpu =
            self.service_stats.get(&service_id, 0).map_err(map_error(names::SERVICE_STATS))?;
        Ok(per_cpu.iter().fold(ServiceCounters::default(), |sum, c| ServiceCounters {
            packets: sum.packets + c.packets,
            bytes: sum.bytes + c.bytes,
        }))
    }

    /// Every conntrack entry (both directions of every flow), read in batches. The programs
    /// keep inserting and the LRU keeps evicting while the map is walked: an entry that
    /// vanishes meanwhile is missed, not an error.
    pub fn conntrack(&self) -> Result<Vec<(ConntrackKey, ConntrackValue)>> {
        lookup_all(names::CONNTRACK, self.batch_fds.conntrack.as_fd())
    }

    /// The conntrack entry under `key`, if there is one.
    pub fn conntrack_entry(&self, key: &ConntrackKey) -> Result<Option<ConntrackValue>> {
        found(names::CONNTRACK, self.conntrack.get(key, 0))
    }

    /// Writes one conntrack entry (adopting flows from elsewhere; tests age entries with it).
    pub fn write_conntrack(&mut self, key: &ConntrackKey, value: &ConntrackValue) -> Result<()> {
        self.conntrack.insert(key, value, 0).map_err(map_error(names::CONNTRACK))
    }

    /// Removes conntrack entries in batches; returns how many were there. Gone ones are not an
    /// error (the LRU may have evicted them).
    pub fn remove_conntrack(&mut self, keys: &[ConntrackKey]) -> Result<usize> {
        map_batch::delete(self.batch_fds.conntrack.as_fd(), keys)
            .map_err(syscall_error(names::CONNTRACK, "bpf_map_delete_batch"))
    }
}

fn source_range_key(service_id: u32, range: Ipv4Net) -> LpmKey<SourceRangeKey> {
    let data = SourceRangeKey { service_id, src_ip_be: u32::from(range.network()).to_be() };
    LpmKey::new(SourceRangeKey::SERVICE_ID_BITS + u32::from(range.prefix_len()), data)
}

/// The map, and a second descriptor of it.
fn with_fd(name: &str, map: Option<Map>) -> Result<(Option<Map>, OwnedFd)> {
    let fd = match &map {
        Some(Map::HashMap(data) | Map::LruHashMap(data) | Map::Array(data)) => {
            data.fd().as_fd().try_clone_to_owned()
        }
        _ => Err(std::io::Error::other("not a hash map or an array")),
    };
    Ok((map, fd.map_err(syscall_error(name, "dup"))?))
}

/// Names a map whose key or value size differs from this build's for what it is: a datapath
/// left by a build with other map layouts, which this build cannot open (daemon, status or
/// collector alike).
fn incompatible_pins(pins: &PinLayout, error: Error) -> Error {
    match error {
        Error::Map { name, source }
            if matches!(
                *source,
                MapError::InvalidKeySize { .. } | MapError::InvalidValueSize { .. }
            ) =>
        {
            Error::IncompatiblePins { dir: pins.root().to_path_buf(), name, source }
        }
        other => other,
    }
}

/// A failed system call on map `name`, in aya's terms.
fn syscall_error<'a>(
    name: &'a str,
    call: &'static str,
) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |io_error| Error::Map {
        name: name.to_owned(),
        source: Box::new(MapError::SyscallError(aya::sys::SyscallError { call, io_error })),
    }
}

/// Removing what is already gone is not an error: a retried reconcile must converge.
fn ignore_missing(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Err(MapError::KeyNotFound) => Ok(()),
        other => other,
    }
}

impl MapWriter for KernelMaps {
    /// Runs of [`same_batch`] writes go in one batch call each; the rest one by one, in
    /// the same order.
    fn apply_all(&mut self, ops: &[MapOp]) -> Result<()> {
        let mut rest = ops;
        while let Some(first) = rest.first() {
            let run = rest.iter().take_while(|op| same_batch(first, op)).count().max(1);
            let (head, tail) = rest.split_at(run);
            self.apply_run(head)?;
            rest = tail;
        }
        Ok(())
    }

    fn apply(&mut self, op: &MapOp) -> Result<()> {
        match op {
            MapOp::SetNodeConfig(config) => {
                self.node_config.set(0, config, 0).map_err(map_error(names::NODE_CONFIG))
            }
            MapOp::UpsertBackend { id, backend } => {
                self.backends.insert(id, backend, 0).map_err(map_error(names::BACKENDS))
            }
            MapOp::RemoveBackend { id } => {
                ignore_missing(self.backends.remove(id)).map_err(map_error(names::BACKENDS))
            }
            MapOp::UpsertSlot { index, slot } => {
                self.slots.set(*index, slot, 0).map_err(map_error(names::BACKEND_SLOTS))
            }
            MapOp::RemoveSlot { index } => {
                self.slots.set(*index, &Slot::default(), 0).map_err(map_error(names::BACKEND_SLOTS))
            }
            MapOp::UpsertService { key, value } => {
                self.services.insert(key, value, 0).map_err(map_error(names::SERVICES))
            }
            MapOp::RemoveService { key } => {
                ignore_missing(self.services.remove(key)).map_err(map_error(names::SERVICES))
            }
            MapOp::AddSourceRange { service_id, range } => self
                .source_ranges
                .insert(&source_range_key(*service_id, *range), &1, 0)
                .map_err(map_error(names::SOURCE_RANGES)),
            MapOp::RemoveSourceRange { service_id, range } => {
                ignore_missing(self.source_ranges.remove(&source_range_key(*service_id, *range)))
                    .map_err(map_error(names::SOURCE_RANGES))
            }
        }
    }
}

/// An address as the datapath stores it (network order in a native `u32`).
pub fn ip_be(ip: Ipv4Addr) -> u32 {
    u32::from(ip).to_be()
}

/// A prefix's address and mask as the datapath stores them.
pub fn prefix_be(net: Ipv4Net) -> (u32, u32) {
    (ip_be(net.network()), ip_be(net.netmask()))
}

/// True if `a` and `b` write the same map in a way one batch update carries: upserts, and
/// slot removals, which write a zero slot (a changed table frees its whole old run).
fn same_batch(a: &MapOp, b: &MapOp) -> bool {
    matches!(
        (a, b),
        (MapOp::UpsertBackend { .. }, MapOp::UpsertBackend { .. })
            | (
                MapOp::UpsertSlot { .. } | MapOp::RemoveSlot { .. },
                MapOp::UpsertSlot { .. } | MapOp::RemoveSlot { .. }
            )
            | (MapOp::UpsertService { .. }, MapOp::UpsertService { .. })
    )
}

impl KernelMaps {
    /// One run of [`same_batch`] operations (or a single other one).
    fn apply_run(&mut self, run: &[MapOp]) -> Result<()> {
        let fds = &self.batch_fds;
        match run {
            [op] => self.apply(op),
            [MapOp::UpsertBackend { .. }, ..] => {
                upsert_batch(&fds.backends, names::BACKENDS, run, |op| match op {
                    MapOp::UpsertBackend { id, backend } => Some((*id, *backend)),
                    _ => None,
                })
            }
            [MapOp::UpsertSlot { .. } | MapOp::RemoveSlot { .. }, ..] => {
                upsert_batch(&fds.slots, names::BACKEND_SLOTS, run, |op| match op {
                    MapOp::UpsertSlot { index, slot } => Some((*index, *slot)),
                    MapOp::RemoveSlot { index } => Some((*index, Slot::default())),
                    _ => None,
                })
            }
            [MapOp::UpsertService { .. }, ..] => {
                upsert_batch(&fds.services, names::SERVICES, run, |op| match op {
                    MapOp::UpsertService { key, value } => Some((*key, *value)),
                    _ => None,
                })
            }
            _ => run.iter().try_for_each(|op| self.apply(op)),
        }
    }
}

/// Writes the entries `entry` picks out of `run` into map `name` in one batch.
fn upsert_batch<K: aya::Pod, V: aya::Pod>(
    fd: &OwnedFd,
    name: &str,
    run: &[MapOp],
    entry: impl Fn(&MapOp) -> Option<(K, V)>,
) -> Result<()> {
    let (keys, values): (Vec<K>, Vec<V>) = run.iter().filter_map(entry).unzip();
    update_all(name, fd.as_fd(), &keys, &values)
}

#[cfg(test)]
mod tests {
    use aya::maps::MapError;

    use super::incompatible_pins;
    use crate::{error::Error, pins::PinLayout};

    #[test]
    fn a_map_of_another_layout_is_reported_as_a_datapath_to_unload() {
        let pins = PinLayout::new("/sys/fs/bpf/lb-old");
        let size = MapError::InvalidValueSize { size: 20, expected: 16 };
        let error = Error::Map { name: "SERVICES".into(), source: Box::new(size) };
        let message = incompatible_pins(&pins, error).to_string();
        assert!(message.contains("map SERVICES has another layout"), "{message}");
        assert!(message.contains("unload --pin-dir /sys/fs/bpf/lb-old"), "{message}");
        let other = Error::Map { name: "SERVICES".into(), source: Box::new(MapError::KeyNotFound) };
        assert!(matches!(incompatible_pins(&pins, other), Error::Map { .. }), "other errors stay");
    }
}
