//! The maps the programs read (written by the daemon) and the state they keep themselves
//! (conntrack, affinity, counters). Capacities are the defaults; the loader may override them.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray},
};
use lb_common::maps::{
    AffinityKey, AffinityValue, Backend, ConntrackKey, ConntrackValue, FragmentKey, FragmentValue,
    NodeConfig, RefusalBudget, RevNat, ServiceCounters, ServiceKey, ServiceValue, Slot,
    SockRevNatKey, SourceRangeKey, capacity, forwarding, refusal_budget,
};

/// `BPF_ANY`: an update that inserts or replaces.
pub const BPF_ANY: u64 = 0;
/// `BPF_NOEXIST`: an update that inserts only if the key is free.
pub const BPF_NOEXIST: u64 = 1;

#[map(name = "SERVICES")]
pub static SERVICES: HashMap<ServiceKey, ServiceValue> =
    HashMap::with_max_entries(capacity::SERVICES, 0);

/// Every frontend's slots, each frontend a contiguous run (`ServiceValue::slot_base`): an array
/// lookup is one load the verifier inlines, where a hash lookup walks a bucket.
#[map(name = "BACKEND_SLOTS")]
pub static BACKEND_SLOTS: Array<Slot> = Array::with_max_entries(capacity::BACKEND_SLOTS, 0);

#[map(name = "BACKENDS")]
pub static BACKENDS: HashMap<u32, Backend> = HashMap::with_max_entries(capacity::BACKENDS, 0);

/// LRU: under pressure (a flood of new flows) the least recently used flows go first, never
/// an insert failure. Normally the daemon's collector deletes dead entries, so inserts take a
/// free slot and do not evict. One LRU list for all CPUs, not per-CPU lists
/// (`BPF_F_NO_COMMON_LRU`): those split the capacity per CPU, so one busy CPU would evict while
/// the others' free slots sat unused.
#[map(name = "CONNTRACK")]
pub static CONNTRACK: LruHashMap<ConntrackKey, ConntrackValue> =
    LruHashMap::with_max_entries(capacity::CONNTRACK, 0);

#[map(name = "AFFINITY")]
pub static AFFINITY: LruHashMap<AffinityKey, AffinityValue> =
    LruHashMap::with_max_entries(capacity::AFFINITY, 0);

#[map(name = "SOURCE_RANGES")]
pub static SOURCE_RANGES: LpmTrie<SourceRangeKey, u8> =
    LpmTrie::with_max_entries(capacity::SOURCE_RANGES, 0);

#[map(name = "NODE_CONFIG")]
pub static NODE_CONFIG: Array<NodeConfig> = Array::with_max_entries(1, 0);

/// (socket, backend) -> service address, for `recvmsg` and `getpeername` of host sockets.
#[map(name = "SOCK_REV_NAT")]
pub static SOCK_REV_NAT: LruHashMap<SockRevNatKey, RevNat> =
    LruHashMap::with_max_entries(capacity::SOCK_REV_NAT, 0);

#[map(name = "FORWARDING")]
pub static FORWARDING: PerCpuArray<u64> = PerCpuArray::with_max_entries(forwarding::COUNT, 0);

#[map(name = "SERVICE_STATS")]
pub static SERVICE_STATS: PerCpuArray<ServiceCounters> =
    PerCpuArray::with_max_entries(capacity::SERVICES, 0);

/// This CPU's budgets of refusals (see `RefusalBudget`), by `refusal_budget` index; written by
/// the daemon.
#[map(name = "REFUSAL_BUDGET")]
pub static REFUSAL_BUDGET: PerCpuArray<RefusalBudget> =
    PerCpuArray::with_max_entries(refusal_budget::COUNT, 0);

/// First fragments' translations, for the rest of their datagrams (see `fragments`).
///
/// Declared last: maps are created in declaration order, and with this one's preallocated
/// entries created before the others, the dataplane bench's first packet with 100k services
/// was slower in most runs (a memory-layout effect, measured, not understood).
#[map(name = "FRAGMENTS")]
pub static FRAGMENTS: LruHashMap<FragmentKey, FragmentValue> =
    LruHashMap::with_max_entries(capacity::FRAGMENTS, 0);
