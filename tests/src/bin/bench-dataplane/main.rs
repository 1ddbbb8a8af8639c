//! `cargo xtask bench dataplane`: nanoseconds per packet of `lb_xdp`'s paths, measured with
//! `BPF_PROG_TEST_RUN`, with 10, 10k and 100k services and 1M conntrack entries loaded. Prints a
//! table and writes `target/bench/dataplane.json` under the workspace root. Beside the packet
//! paths it times the daemon's conntrack collector, a conntrack resize over those entries, and a
//! restarted daemon's reading of the datapath before its first sync; and two yardsticks for the
//! first packet: a dependent cache miss, and one insert into a conntrack-shaped LRU map.
//!
//! Two facts of `BPF_PROG_TEST_RUN` (measured on 6.18) shape the method:
//! - with `repeat = n` the program runs n times on the same buffer and its rewrites persist from
//!   one run to the next: a SYN translated by DNAT counts one `forward_new`, then n - 1
//!   `not_service`;
//! - for XDP, any `repeat > 1` costs about 20 ms per call (the kernel installs the program in the
//!   XDP dispatcher and takes it out again), outside the timed loop but in the wall clock.
//!
//! So:
//! - floor: an empty XDP program (`r0 = XDP_PASS; exit`), loaded with bpf(2) since aya loads only
//!   object files;
//! - conntrack hit and reply: two conntrack entries that translate a packet back and forth
//!   (client -> A becomes client -> B, which becomes client -> A), so each of millions of runs
//!   of one call is a hit;
//! - first packet and NodePort SNAT: every call is one run (`repeat = 1`) of a SYN from a client
//!   never seen before, so every run is a new flow, averaged by chunks (the median chunk is
//!   reported, see [`CHUNKS`]); for the first packet the service counts take turns chunk by
//!   chunk, so that a slow spell of the machine does not move their ratio. The SNAT flows' two
//!   entries are deleted after each run, so the SNAT ports never run short. A single run pays
//!   for the caches the system call around it leaves cold, so at the largest count the first
//!   packet is also measured inside one call: the services form a ring in random order, each
//!   one's backends being the next one's ClusterIP, so a SYN translated by one is a new flow to
//!   the next, and one call of n runs takes a new client's SYN once around the ring of n
//!   services.
//!   (With 10 services such a call is mostly the cold start after the ~20 ms dispatcher update,
//!   so the ring is not used to compare service counts.)
//!
//! Every measurement checks that the per-reason counters grew by exactly its run count under
//! the reason of the path it claims to measure.
//!
//! Clocks: the kernel reports an integer average per call (1 ns steps, too coarse for a floor of
//! a few ns), so the long runs are timed by this thread's CPU time, as the difference between a
//! short and a long call: the fixed cost of a call (the dispatcher update) cancels out (the
//! median of [`TWO_POINT_TAKES`] such measurements is reported, and a path's ratio to the floor
//! is taken against a floor timed just before it). Single runs use the kernel's figure, which
//! leaves the call's set-up out but includes the timer reads around the run: that overhead is
//! shown as "floor, single runs", and the ratios of single-run paths are taken against the
//! repeat-n floor, so they overstate, never understate.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::Ipv4Addr,
    os::fd::{AsRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    time::Instant,
};

use aya::{
    Ebpf,
    maps::{HashMap, Map, MapData},
    programs::{TestRun as _, TestRunOptions, Xdp},
};
use lb_common::{
    maps::{
        Backend, ConntrackKey, ConntrackValue, ServiceKey, ServiceValue, Slot, backend_flags,
        capacity, ct_flags, names, proto, scope, service_flags,
    },
    stats::Reason,
};
use lb_tests::{
    daemon::example_node_config,
    node::{self, NODE_IP},
    packets::{Spec, TcpFields},
    rng::Rng,
    stand_in::{self, address_of, bpf},
};
use lb_user::{
    conntrack_gc, loader,
    maps::{KernelMaps, MapOp, MapWriter as _, ip_be},
    program_names,
    reconcile::{Reconciler, SlotMode},
    return_codes::XDP_PASS,
    stats::{self, ReasonCounts},
};

const SERVICE_COUNTS: [u32; 3] = [10, 10_000, 100_000];
const CONNTRACK_FILL: u32 = 1_000_000;
/// The conntrack map's size: room beside the live entries, as the daemon's collector keeps it
/// by deleting dead ones (`lb_user::conntrack_gc`). One extra run measures new flows in a map
/// full of live entries, where every insert evicts.
const CONNTRACK_CAPACITY: u32 = 2 * 1_048_576;
/// Runs of the short and the long call of a two-point measurement, per path.
const FLOOR_RUNS: (u32, u32) = (10_000_000, 100_000_000);
const HIT_RUNS: (u32, u32) = (1_000_000, 10_000_000);
/// New flows per service count, one run per call; with the ring tour at the largest count,
/// their entries (two each) fit beside the fill, so no insert evicts.
const FIRST_PACKETS: u32 = 300_000;
const SNAT_PACKETS: u32 = 200_000;
/// Single-run paths are averaged in this many consecutive chunks and the median chunk is
/// reported: a burst of other work on this shared VM then shifts one chunk, not the figure.
const CHUNKS: u32 = 5;
/// Two-point measurements (the floor, hits, replies) are taken this many times and the median
/// reported, for the same reason.
const TWO_POINT_TAKES: u32 = 3;
/// Single runs of the empty program, to show what a single run's timing adds.
const FLOOR_SINGLE_RUNS: u32 = 200_000;
/// NodePorts (30000 up) with remote backends, on top of the services counted.
const SNAT_NODE_PORTS: u32 = 100;
/// Service id of the ping-pong conntrack entries, above any other.
const PING: u32 = 250_000;

/// Printed under the table; the module comment has the reasons.
const METHOD: &str = "\
method: every path's runs are checked against the per-reason counters.
  conntrack: 1M live entries in a map of 2M (the collector keeps dead entries out); the
    'conntrack full' row uses the default map (1M) full of live entries, where inserts evict.
  floor, parse only, conntrack hit, reply: one program call of 10M runs (floor 100M) minus one of
    1M (10M), in this thread's CPU time, per run, the median of three such measurements; hit
    and reply packets bounce between two conntrack entries, so every run is a hit. Their
    'x floor' is the median of the three takes' ratios, each against the floor timed just
    before it over as many runs (a slow spell of the machine slows both).
  first packet, NodePort SNAT: one run per call (repeat 1), a SYN from a client never seen before,
    the kernel's time averaged over 5 chunks of 60k (SNAT 40k) calls, the median chunk shown
    (a burst of other work on the machine moves one chunk, not the figure), the service
    counts' first-packet chunks taken in turn (a slow spell slows each); each includes the
    timer overhead of a single run (floor, single runs - floor) and the caches a system call
    leaves cold; ratios use the repeat-n floor, so they overstate.
  first packet in one call: services in a random ring, each one's backends at the next one's
    ClusterIP; one call of 100k runs takes a new client's SYN around it: 100k new flows.";

const TARGET_CT_HIT: f64 = 4.0;
const TARGET_FIRST_PACKET: f64 = 30.0;
const TARGET_SCALING: f64 = 1.25;

mod lru_insert;
mod memory;
mod resize;

fn main() {
    let miss_ns = memory::dependent_miss_ns();
    eprintln!("one dependent cache miss over 256 MiB: {miss_ns:.1} ns");
    let floor = RawXdp::empty();
    let floor_ns = median_two_point(FLOOR_RUNS, |runs| floor.run(runs).1);
    let floor_single_ns = floor.kernel_average_of_single_runs(FLOOR_SINGLE_RUNS);
    eprintln!("floor {floor_ns:.2} ns, at repeat 1 {floor_single_ns:.1} ns");
    let lru_insert_ns = lru_insert::insert_ns();
    eprintln!("one insert into a conntrack-shaped LRU map: {lru_insert_ns:.1} ns");
    let new_flow_map_ns = lru_insert::new_flow_ns();
    eprintln!("a lookup that misses and two inserts into that map: {new_flow_map_ns:.1} ns");
    let mut benches: Vec<Bench> = SERVICE_COUNTS
        .iter()
        .map(|&services| {
            let started = Instant::now();
            let bench = Bench::load(services, CONNTRACK_CAPACITY);
            eprintln!(
                "{services} services, {CONNTRACK_FILL} conntrack entries: loaded in {:.1?}",
                started.elapsed()
            );
            bench
        })
        .collect();
    // Over the fill alone, before any new flow, as the hits and replies.
    let collector_pass_s = benches[0].collector_pass();
    let mut paths: Vec<Paths> = benches.iter_mut().map(Bench::paths).collect();
    let largest = benches.last_mut().expect("three service counts");
    let parse_only = largest.parse_only();
    for (paths, first_packet) in paths.iter_mut().zip(first_packets_interleaved(&mut benches)) {
        paths.first_packet = first_packet;
    }
    let largest = benches.last_mut().expect("three service counts");
    let ring_ns = largest.first_packet_in_one_call();
    let resume_s = largest.resume();
    let mut by_services = BTreeMap::new();
    for (bench, paths) in benches.iter().zip(paths) {
        paths.log(bench.services);
        by_services.insert(bench.services, paths);
    }
    drop(benches);
    let full_table_ns =
        first_packets_interleaved(&mut [Bench::load(SERVICE_COUNTS[2], capacity::CONNTRACK)])[0];
    eprintln!("first packet with the default-sized conntrack map full: {full_table_ns:.1} ns");
    let resize_passes_s = resize::conntrack_passes_s();
    let report = Report {
        floor_ns,
        floor_single_ns,
        parse_only,
        by_services,
        full_table_ns,
        ring_ns,
        miss_ns,
        lru_insert_ns,
        new_flow_map_ns,
        collector_pass_s,
        resume_s,
        resize_passes_s,
    };
    report.print();
    let path = report.write_json();
    println!("\nwrote {}", path.display());
}

/// The median of [`CHUNKS`] averages of `run` (ns of run `i`) over consecutive runs, `runs` in
/// all.
fn median_of_chunks(runs: u32, mut run: impl FnMut(u32) -> f64) -> f64 {
    let per_chunk = runs / CHUNKS;
    let averages = (0..CHUNKS)
        .map(|chunk| {
            let total: f64 = (chunk * per_chunk..(chunk + 1) * per_chunk).map(&mut run).sum();
            total / f64::from(per_chunk)
        })
        .collect();
    median(averages)
}

/// Single runs of SYNs from new pod clients, spread over every service, in each of `benches`:
/// the median of [`CHUNKS`] chunk averages for each. The benches take turns chunk by chunk, so
/// that a slow spell of the machine falls on every service count alike rather than on one,
/// which would move their ratio.
fn first_packets_interleaved(benches: &mut [Bench]) -> Vec<f64> {
    let before: Vec<_> = benches.iter().map(Bench::counters).collect();
    let per_chunk = FIRST_PACKETS / CHUNKS;
    let mut averages = vec![Vec::new(); benches.len()];
    for chunk in 0..CHUNKS {
        for (bench, averages) in benches.iter_mut().zip(&mut averages) {
            averages.push(bench.first_packets(chunk * per_chunk..(chunk + 1) * per_chunk));
        }
    }
    for (bench, before) in benches.iter().zip(&before) {
        assert_counted(&bench.counters().since(before), Reason::ForwardNew, per_chunk * CHUNKS);
    }
    averages.into_iter().map(median).collect()
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// The median of [`TWO_POINT_TAKES`] [`two_point`] measurements.
fn median_two_point(runs: (u32, u32), mut call: impl FnMut(u32) -> f64) -> f64 {
    median((0..TWO_POINT_TAKES).map(|_| two_point(runs, &mut call)).collect())
}

/// ns per run from two calls of `short` and `long` runs: `(t(long) - t(short)) / (long -
/// short)`, so what a call costs whatever its length cancels out.
fn two_point((short, long): (u32, u32), mut call: impl FnMut(u32) -> f64) -> f64 {
    let short_ns = call(short);
    let long_ns = call(long);
    (long_ns - short_ns) / f64::from(long - short)
}

/// ns/packet of every measured path with one service count loaded.
#[derive(Clone, Copy)]
struct Paths {
    ct_hit: LongRun,
    first_packet: f64,
    snat: f64,
    reply: LongRun,
    snat_reply: LongRun,
}

impl Paths {
    fn log(&self, services: u32) {
        eprintln!(
            "{services} services: hit {:.1}, reply {:.1}, masqueraded reply {:.1}, first packet \
             {:.1}, SNAT {:.1} ns",
            self.ct_hit.ns, self.reply.ns, self.snat_reply.ns, self.first_packet, self.snat
        );
    }
}

/// A path timed over long calls (see [`Bench::long_run`]).
#[derive(Clone, Copy)]
struct LongRun {
    ns: f64,
    /// Against the floor measured just before each take, not the headline floor: a slow spell
    /// of the machine then slows both sides of the ratio.
    x_floor: f64,
}

/// An XDP program loaded with bpf(2) that returns `XDP_PASS`: the empty one is the floor, the
/// cost of `BPF_PROG_TEST_RUN`'s loop and an XDP program call.
struct RawXdp {
    fd: OwnedFd,
}

/// The `BPF_PROG_TEST_RUN` part of `union bpf_attr` (linux/bpf.h).
#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    /// The struct's tail padding: the kernel wants bytes it does not know to be zero.
    pad: u32,
}

const BPF_PROG_TEST_RUN: libc::c_long = 10;

impl RawXdp {
    fn empty() -> Self {
        Self { fd: stand_in::load(stand_in::Kind::Xdp) }
    }

    /// Runs the program `repeat` times on a 64-byte frame; returns the kernel's average (whole
    /// ns) and this thread's CPU time for the call.
    fn run(&self, repeat: u32) -> (u32, f64) {
        let frame = [0u8; 64];
        let mut attr = TestRunAttr {
            prog_fd: u32::try_from(self.fd.as_raw_fd()).expect("fd"),
            data_size_in: 64,
            data_in: address_of(&frame),
            repeat,
            ..TestRunAttr::default()
        };
        let before = thread_cpu_ns();
        let rc = bpf(BPF_PROG_TEST_RUN, &mut attr);
        let cpu = as_f64(thread_cpu_ns() - before);
        assert!(rc == 0, "BPF_PROG_TEST_RUN: {}", std::io::Error::last_os_error());
        assert_eq!(attr.retval, XDP_PASS, "the program returns XDP_PASS");
        (attr.duration, cpu)
    }

    /// The kernel's figure for single runs, averaged: the floor as single-run paths see it.
    fn kernel_average_of_single_runs(&self, calls: u32) -> f64 {
        let total: f64 = (0..calls).map(|_| f64::from(self.run(1).0)).sum();
        total / f64::from(calls)
    }
}

/// CPU time of this thread: time spent running, in user space or (here) in the syscall, and
/// not time spent preempted by other work on the machine.
fn thread_cpu_ns() -> u64 {
    clock_ns(libc::CLOCK_THREAD_CPUTIME_ID)
}

/// The programs' clock, so the entries written here are live to them.
fn datapath_now() -> u64 {
    lb_user::clock::jiffies_now().expect("reading the kernel's jiffies (root needed)")
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: writes one timespec we own.
    let rc = unsafe { libc::clock_gettime(clock, &raw mut now) };
    assert_eq!(rc, 0, "clock_gettime");
    let seconds = u64::try_from(now.tv_sec).expect("a clock after its epoch");
    seconds * 1_000_000_000 + u64::try_from(now.tv_nsec).expect("nanoseconds")
}

#[expect(clippy::cast_precision_loss, reason = "nanosecond counts far below 2^52")]
fn as_f64(ns: u64) -> f64 {
    ns as f64
}

/// The object loaded with private maps, seeded with one service count and a full conntrack
/// map.
struct Bench {
    ebpf: Ebpf,
    maps: KernelMaps,
    /// A second handle on the conntrack map (`KernelMaps` has no bulk insert).
    conntrack: HashMap<MapData, ConntrackKey, ConntrackValue>,
    services: u32,
    /// Clients so far: each new-flow run comes from a new one.
    clients: u32,
    /// The empty program, timed beside each long run.
    floor: RawXdp,
}

impl Bench {
    fn load(services: u32, conntrack_capacity: u32) -> Self {
        let capacities =
            loader::Capacities { conntrack: Some(conntrack_capacity), ..Default::default() };
        let mut ebpf = loader::load_private_with(&capacities)
            .unwrap_or_else(|e| panic!("loading the programs (root and BTF needed): {e:?}"));
        // Opened by id before `take_from` moves the map out of the object.
        let conntrack = conntrack_by_id(&ebpf);
        let maps = KernelMaps::take_from(&mut ebpf).expect("datapath maps");
        let mut bench =
            Self { ebpf, maps, conntrack, services, clients: 0, floor: RawXdp::empty() };
        bench.apply(&[node::set_node_config()]);
        for (index, next) in service_ring(services) {
            bench.apply(&cluster_ip_service(index, next));
        }
        for index in 0..SNAT_NODE_PORTS {
            bench.apply(&node_port_service(index));
        }
        bench.fill_conntrack();
        bench
    }

    fn apply(&mut self, ops: &[MapOp]) {
        for op in ops {
            self.maps.apply(op).unwrap_or_else(|e| panic!("applying {op:?}: {e:?}"));
        }
    }

    /// `CONNTRACK_FILL` live entries of flows nobody sends, as on a busy node.
    fn fill_conntrack(&mut self) {
        let now = datapath_now();
        for index in 0..CONNTRACK_FILL {
            let key = filler_key(index);
            self.conntrack.insert(&key, &flow_value(1, 0, now), 0).expect("conntrack fill");
        }
    }

    fn program(&self) -> &Xdp {
        self.ebpf
            .program(program_names::XDP)
            .and_then(|p| p.try_into().ok())
            .expect("the XDP program")
    }

    fn counters(&self) -> ReasonCounts {
        stats::read(self.ebpf.map(names::STATS).expect("STATS map")).expect("reading STATS")
    }

    /// Runs `frame` `repeat` times; returns the kernel's average (whole ns) and this thread's
    /// CPU time.
    fn run(&self, frame: &[u8], repeat: u32) -> (u32, f64) {
        let mut output = vec![0u8; frame.len() + 256];
        let options = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut output),
            repeat,
            ..TestRunOptions::default()
        };
        let before = thread_cpu_ns();
        let result = self.program().test_run(options).expect("BPF_PROG_TEST_RUN of lb_xdp");
        let cpu = as_f64(thread_cpu_ns() - before);
        let average = u32::try_from(result.duration.as_nanos()).expect("a short average");
        (average, cpu)
    }

    /// ns/run of `frame` run over and over (two-point), every run counting `reason`: the
    /// median of [`TWO_POINT_TAKES`] takes, each beside a take of the floor.
    fn long_run(&self, frame: &[u8], reason: Reason) -> LongRun {
        let before = self.counters();
        let takes: Vec<(f64, f64)> = (0..TWO_POINT_TAKES)
            .map(|_| {
                let floor = two_point(HIT_RUNS, |runs| self.floor.run(runs).1);
                let ns = two_point(HIT_RUNS, |runs| self.run(frame, runs).1);
                (ns, ns / floor)
            })
            .collect();
        let runs = TWO_POINT_TAKES * (HIT_RUNS.0 + HIT_RUNS.1);
        assert_counted(&self.counters().since(&before), reason, runs);
        LongRun {
            ns: median(takes.iter().map(|take| take.0).collect()),
            x_floor: median(takes.iter().map(|take| take.1).collect()),
        }
    }

    /// Seconds of one pass of the daemon's collector (`lb_user::conntrack_gc`) over the
    /// conntrack map as loaded: it reads every entry and deletes none, all being live.
    fn collector_pass(&mut self) -> f64 {
        let started = Instant::now();
        let reaper = conntrack_gc::Reaper::of(&self.ebpf).expect("the reaper program");
        let pass = conntrack_gc::collect(&self.maps, &reaper, datapath_now()).expect("a pass");
        let seconds = started.elapsed().as_secs_f64();
        let filled = usize::try_from(CONNTRACK_FILL).expect("fits usize");
        assert_eq!((pass.scanned, pass.removed), (filled, 0), "{pass:?}");
        seconds
    }

    /// Seconds a restarted daemon spends on the datapath before its first sync: what its maps
    /// hold and the conntrack map read, the UDP flows outside their slots taken up
    /// (`lb_user::reconcile::Reconciler::resume`). The loaded flows are TCP, which is never
    /// drained, so none is taken up: the cost is the reading and the scan.
    fn resume(&self) -> f64 {
        let capacities = loader::Capacities::default();
        let mode = SlotMode::of(&example_node_config());
        let started = Instant::now();
        let reconciler = Reconciler::resume(&self.maps, mode, &capacities).expect("resuming");
        let seconds = started.elapsed().as_secs_f64();
        assert_eq!(reconciler.drains().len(), 0, "flows outside their slots");
        seconds
    }

    fn parse_only(&self) -> LongRun {
        let mut arp = Spec::udp("10.244.1.5", 5353, "10.244.2.15", 53).build();
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        self.long_run(&arp, Reason::NotIpv4)
    }

    /// The paths measured on this bench alone, over the fill (the SNAT flows' entries are
    /// removed): all but `first_packet`, which is measured in turn with the other service counts
    /// ([`first_packets_interleaved`]) and left NaN here.
    fn paths(&mut self) -> Paths {
        Paths {
            ct_hit: self.ct_hit(),
            reply: self.reply(false),
            snat_reply: self.reply(true),
            first_packet: f64::NAN,
            snat: self.snat(),
        }
    }

    /// Two forward entries that send client -> A to B and client -> B to A.
    fn ct_hit(&mut self) -> LongRun {
        let (client, a, b) = (("10.244.200.1", 40_000), ("10.96.200.1", 80), ("10.244.200.2", 80));
        for (to, backend) in [(a, b), (b, a)] {
            let key = tuple_key(client, to);
            self.conntrack.insert(&key, &forward_entry(backend), 0).expect("forward entry");
        }
        self.long_run(&established(client, a), Reason::ForwardEstablished)
    }

    /// Two reply entries that turn B -> client into A -> client and back; with `masqueraded`,
    /// the client side is the SNAT address and is restored too.
    fn reply(&mut self, masqueraded: bool) -> LongRun {
        let (a, b) = (("10.96.201.1", 80), ("10.244.201.2", 80));
        let client = if masqueraded { (NODE_IP, 61_001) } else { ("10.244.201.1", 40_000) };
        let original = ("203.0.113.7", 50_000);
        let (far, near) = if masqueraded { (original, client) } else { (client, client) };
        // B -> near becomes A -> far; A -> far becomes B -> near.
        for (from, to, frontend, restore) in [(b, near, a, far), (a, far, b, near)] {
            let value = reply_entry(frontend, masqueraded, restore);
            self.conntrack.insert(&tuple_key(from, to), &value, 0).expect("reply entry");
        }
        self.long_run(&established(b, near), Reason::ReplyTranslated)
    }

    /// The kernel's average of single runs of SYNs from new pod clients, the `packets`th of
    /// the run to service `packet % services`: consecutive ranges spread over every service.
    fn first_packets(&mut self, packets: std::ops::Range<u32>) -> f64 {
        let count = packets.len();
        let total: u64 = packets
            .map(|packet| {
                let client = self.next_client(Ipv4Addr::new(10, 244, 128, 0));
                let frame = syn(client, cluster_ip(packet % self.services));
                u64::from(self.run(&frame, 1).0)
            })
            .sum();
        as_f64(total) / as_f64(u64::try_from(count).expect("fits"))
    }

    /// A new pod client's SYN once around the ring of services, in one call: the first-packet
    /// path without a system call between packets.
    fn first_packet_in_one_call(&mut self) -> f64 {
        let before = self.counters();
        let client = self.next_client(Ipv4Addr::new(10, 244, 128, 0));
        let ns = f64::from(self.run(&syn(client, cluster_ip(0)), self.services).0);
        assert_counted(&self.counters().since(&before), Reason::ForwardNew, self.services);
        ns
    }

    /// Single runs of SYNs from new external clients to NodePorts whose backends are remote:
    /// each is masqueraded. The flow's entries are removed after each run.
    fn snat(&mut self) -> f64 {
        let before = self.counters();
        let ns = median_of_chunks(SNAT_PACKETS, |packet| {
            let client = self.next_client(Ipv4Addr::new(203, 0, 113, 0));
            let node_port = (node_ip(), node_port(packet % SNAT_NODE_PORTS));
            let ns = f64::from(self.run(&syn(client, node_port), 1).0);
            self.forget_masqueraded_flow(client, node_port);
            ns
        });
        assert_counted(&self.counters().since(&before), Reason::ForwardNew, SNAT_PACKETS);
        ns
    }

    /// Removes a masqueraded flow's forward entry and the reply entry that holds its port.
    fn forget_masqueraded_flow(&mut self, client: (Ipv4Addr, u16), frontend: (Ipv4Addr, u16)) {
        let key = ConntrackKey {
            src_ip_be: ip_be(client.0),
            dst_ip_be: ip_be(frontend.0),
            src_port_be: client.1.to_be(),
            dst_port_be: frontend.1.to_be(),
            proto: proto::TCP,
            pad: [0; 3],
        };
        let value = self.conntrack.get(&key, 0).expect("the new flow's forward entry");
        assert!(value.flags & ct_flags::SNAT != 0, "{client:?} was masqueraded");
        let reply = ConntrackKey {
            src_ip_be: value.translated_ip_be,
            src_port_be: value.translated_port_be,
            dst_ip_be: value.nat_ip_be,
            dst_port_be: value.nat_port_be,
            ..key
        };
        self.conntrack.remove(&key).expect("forward entry");
        self.conntrack.remove(&reply).expect("reply entry");
    }

    /// A client address and port never used before in this load, counted up from `base`.
    fn next_client(&mut self, base: Ipv4Addr) -> (Ipv4Addr, u16) {
        self.clients += 1;
        let host = self.clients / 60_000;
        let port = 1024 + u16::try_from(self.clients % 60_000).expect("port");
        (Ipv4Addr::from(u32::from(base) + 1 + host), port)
    }
}

/// The key of the `index`th entry of the fill: a flow nobody sends.
fn filler_key(index: u32) -> ConntrackKey {
    ConntrackKey {
        src_ip_be: ip_be(Ipv4Addr::from(0xac10_0000 | (index >> 8))),
        dst_ip_be: ip_be(Ipv4Addr::from(0x0a60_0000 | (index & 0xff))),
        src_port_be: 40_000u16.to_be(),
        dst_port_be: 80u16.to_be(),
        proto: proto::TCP,
        pad: [0; 3],
    }
}

fn conntrack_by_id(ebpf: &Ebpf) -> HashMap<MapData, ConntrackKey, ConntrackValue> {
    let Some(Map::LruHashMap(data)) = ebpf.map(names::CONNTRACK) else {
        panic!("CONNTRACK is an LRU hash map in the object");
    };
    let id = data.info().expect("CONNTRACK info").id();
    let second = MapData::from_id(id).expect("CONNTRACK by id");
    HashMap::try_from(Map::LruHashMap(second)).expect("CONNTRACK as a hash map")
}

fn assert_counted(counted: &ReasonCounts, reason: Reason, runs: u32) {
    let counts: Vec<_> = counted.non_zero().collect();
    assert_eq!(
        counts,
        vec![(reason.name(), u64::from(runs))],
        "every run must take the {} path",
        reason.name()
    );
}

fn node_ip() -> Ipv4Addr {
    NODE_IP.parse().expect("node address")
}

fn endpoint_be((ip, port): (&str, u16)) -> (u32, u16) {
    (ip_be(ip.parse().expect("address")), port.to_be())
}

fn tuple_key(from: (&str, u16), to: (&str, u16)) -> ConntrackKey {
    let ((src_ip_be, src_port_be), (dst_ip_be, dst_port_be)) = (endpoint_be(from), endpoint_be(to));
    ConntrackKey { src_ip_be, dst_ip_be, src_port_be, dst_port_be, proto: proto::TCP, pad: [0; 3] }
}

/// A live conntrack entry of frontend `service_id` with `flags` and no addresses yet.
fn flow_value(service_id: u32, flags: u16, now: u64) -> ConntrackValue {
    ConntrackValue {
        last_seen: now,
        backend_id: 0,
        service_id,
        translated_ip_be: 0,
        nat_ip_be: 0,
        translated_port_be: 0,
        nat_port_be: 0,
        flags,
        opening: 0,
        closing: 0,
    }
}

/// A forward entry that sends its flow to `backend`.
fn forward_entry(backend: (&str, u16)) -> ConntrackValue {
    let (translated_ip_be, translated_port_be) = endpoint_be(backend);
    ConntrackValue { translated_ip_be, translated_port_be, ..flow_value(PING, 0, datapath_now()) }
}

/// A reply entry whose source becomes `frontend` and, `masqueraded`, whose destination becomes
/// `client`.
fn reply_entry(frontend: (&str, u16), masqueraded: bool, client: (&str, u16)) -> ConntrackValue {
    let flags = ct_flags::REPLY | if masqueraded { ct_flags::SNAT } else { 0 };
    let (translated_ip_be, translated_port_be) = endpoint_be(frontend);
    let (nat_ip_be, nat_port_be) = endpoint_be(client);
    ConntrackValue {
        translated_ip_be,
        translated_port_be,
        nat_ip_be,
        nat_port_be,
        ..flow_value(PING, flags, datapath_now())
    }
}

fn established(from: (&str, u16), to: (&str, u16)) -> Vec<u8> {
    let tcp = TcpFields { syn: false, ack: Some(1), ..TcpFields::default() };
    Spec::tcp(from.0, from.1, to.0, to.1).with_tcp(tcp).build()
}

fn syn(from: (Ipv4Addr, u16), to: (Ipv4Addr, u16)) -> Vec<u8> {
    Spec::tcp(&from.0.to_string(), from.1, &to.0.to_string(), to.1).build()
}

/// ClusterIP:port of service `index`: 10.96.0.1 up, inside the service CIDR.
fn cluster_ip(index: u32) -> (Ipv4Addr, u16) {
    (Ipv4Addr::from(0x0a60_0001 + index), 80)
}

fn node_port(index: u32) -> u16 {
    30_000 + u16::try_from(index).expect("a NodePort")
}

/// (service, next service) around a ring of `services` in random order: consecutive first
/// packets touch unrelated entries, as traffic to many services would.
fn service_ring(services: u32) -> Vec<(u32, u32)> {
    let mut order: Vec<u32> = (0..services).collect();
    let mut rng = Rng(0x5e7c_1ce5);
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i + 1));
    }
    (0..order.len()).map(|i| (order[i], order[(i + 1) % order.len()])).collect()
}

/// ClusterIP service `index` with two backend slots, both at service `next`'s ClusterIP (see
/// `service_ring`). Clients come from 10.244.128.0/17, so no flow is a hairpin.
fn cluster_ip_service(index: u32, next: u32) -> Vec<MapOp> {
    let (next_vip, next_port) = cluster_ip(next);
    let backends = [(next_vip, next_port, backend_flags::LOCAL); 2];
    service_ops(index + 1, cluster_ip(index), 0, &backends)
}

/// NodePort 30000 + `index` on the node's address, with two remote backends: from outside the
/// cluster every flow to it is masqueraded.
fn node_port_service(index: u32) -> Vec<MapOp> {
    let backends = (0..2).map(|slot| (Ipv4Addr::from(0x0af5_0000 + 2 * index + slot), 80, 0));
    let frontend = (node_ip(), node_port(index));
    service_ops(200_000 + index, frontend, service_flags::EXTERNAL, &backends.collect::<Vec<_>>())
}

/// The daemon's write order for one frontend: backends and slots, then the frontend.
fn service_ops(
    service_id: u32,
    (vip, port): (Ipv4Addr, u16),
    flags: u16,
    backends: &[(Ipv4Addr, u16, u8)],
) -> Vec<MapOp> {
    let mut ops = Vec::new();
    for (slot, (ip, backend_port, backend_flags)) in (0u32..).zip(backends) {
        // The backend id doubles as the slot index: the frontend's run starts at 2 x its id.
        let id = 2 * service_id + slot;
        let backend = Backend {
            ip_be: ip_be(*ip),
            port_be: backend_port.to_be(),
            proto: proto::TCP,
            flags: *backend_flags,
        };
        ops.push(MapOp::UpsertBackend { id, backend });
        ops.push(MapOp::UpsertSlot { index: id, slot: Slot { backend_id: id, backend } });
    }
    let key = ServiceKey {
        vip_be: ip_be(vip),
        port_be: port.to_be(),
        proto: proto::TCP,
        scope: scope::EXTERNAL,
    };
    let slot_count = u32::try_from(backends.len()).expect("few backends");
    let value = ServiceValue {
        service_id,
        slot_base: 2 * service_id,
        slot_count,
        affinity_timeout_s: 0,
        flags,
        pad: [0; 2],
    };
    ops.push(MapOp::UpsertService { key, value });
    ops
}

/// A JSON key and the path figure it holds, by service count.
type Series = (&'static str, fn(&Paths) -> f64);

struct Report {
    floor_ns: f64,
    floor_single_ns: f64,
    parse_only: LongRun,
    by_services: BTreeMap<u32, Paths>,
    /// First packet at the largest service count with the default-sized conntrack map full of
    /// live entries: every insert evicts.
    full_table_ns: f64,
    /// First packet at the largest service count, a ring tour in one call.
    ring_ns: f64,
    /// One dependent cache miss in userspace (see `memory`).
    miss_ns: f64,
    /// One insert into a conntrack-shaped LRU map (see `lru_insert`).
    lru_insert_ns: f64,
    /// A lookup that misses and two inserts into that map: a new flow's least (see
    /// `lru_insert`).
    new_flow_map_ns: f64,
    /// One pass of the daemon's conntrack collector over the freshly filled map.
    collector_pass_s: f64,
    /// A restarted daemon's reading of the datapath before its first sync (see
    /// [`Bench::resume`]), at the largest service count.
    resume_s: f64,
    /// The two passes of a conntrack resize (see `resize`).
    resize_passes_s: (f64, f64),
}

impl Report {
    /// The headline figures: the largest service count, the hardest case.
    fn headline(&self) -> Paths {
        *self.by_services.values().next_back().expect("at least one service count")
    }

    fn scaling(&self) -> f64 {
        let first = |count| self.by_services[&count].first_packet;
        first(SERVICE_COUNTS[2]) / first(SERVICE_COUNTS[0])
    }

    fn print(&self) {
        println!("\nlb_xdp under BPF_PROG_TEST_RUN, {CONNTRACK_FILL} conntrack entries loaded");
        println!("{:<48} {:>9} {:>8}  {:<8} met", "path", "ns/packet", "x floor", "target");
        self.row("floor: empty XDP program (repeat 100M)", self.floor_ns, None);
        self.row("floor, single runs (kernel's timer included)", self.floor_single_ns, None);
        Self::long_row("parse only: ARP frame through lb_xdp", self.parse_only, None);
        for (services, paths) in &self.by_services {
            let headline = *services == SERVICE_COUNTS[2];
            let n = services;
            Self::long_row(
                &format!("conntrack hit, {n} services"),
                paths.ct_hit,
                headline.then_some(TARGET_CT_HIT),
            );
            self.row(
                &format!("first packet (single runs), {n} services"),
                paths.first_packet,
                headline.then_some(TARGET_FIRST_PACKET),
            );
            self.row(&format!("NodePort SNAT (single runs), {n} services"), paths.snat, None);
            Self::long_row(&format!("reply, {n} services"), paths.reply, None);
            Self::long_row(
                &format!("reply, masqueraded flow, {n} services"),
                paths.snat_reply,
                None,
            );
        }
        self.row(
            &format!("first packet, {} services, in one call", SERVICE_COUNTS[2]),
            self.ring_ns,
            None,
        );
        self.row(
            &format!("first packet, {} services, conntrack full", SERVICE_COUNTS[2]),
            self.full_table_ns,
            None,
        );
        let scaling = self.scaling();
        let met = if scaling <= TARGET_SCALING { "yes" } else { "NO" };
        let target = format!("<= {TARGET_SCALING}x");
        println!("{:<48} {:>9} {scaling:>8.2}  {target:<8} {met}", "first packet, 100k / 10", "");
        let (miss, first, budget) =
            (self.miss_ns, self.headline().first_packet, TARGET_FIRST_PACKET * self.floor_ns);
        println!(
            "\nyardstick: one dependent cache miss (userspace, random walk of 256 MiB) {miss:.0} ns;\n  \
             first packet, {} services = {:.1} misses; the {TARGET_FIRST_PACKET}x target \
             ({budget:.0} ns) = {:.1}",
            SERVICE_COUNTS[2],
            first / miss,
            budget / miss
        );
        let insert = self.lru_insert_ns;
        println!(
            "yardstick: one insert into a kernel LRU map shaped like conntrack ({CONNTRACK_FILL}+ \
             live entries in {CONNTRACK_CAPACITY}) {insert:.0} ns = {:.1}x floor; a new flow \
             makes two",
            insert / self.floor_ns
        );
        let (map_work, floor) = (self.new_flow_map_ns, self.floor_ns);
        println!(
            "yardstick: a new flow's least in that map (a lookup that misses, then two inserts) \
             {map_work:.0} ns = {:.1}x floor,\n  against the {TARGET_FIRST_PACKET}x target for the \
             whole first packet",
            map_work / floor
        );
        println!(
            "conntrack collector (the daemon's, every 30 s): one pass over {CONNTRACK_FILL} \
             entries {:.2} s",
            self.collector_pass_s
        );
        println!(
            "daemon restart: reading what is programmed ({} services) and the conntrack map \
             ({CONNTRACK_FILL} entries), taking up draining flows: {:.2} s before the first sync",
            SERVICE_COUNTS[2], self.resume_s
        );
        let (first, second) = self.resize_passes_s;
        println!(
            "conntrack resize (mapCapacities changed, at the daemon's start): {CONNTRACK_FILL} \
             live entries from a map of {} into one of {}: first pass {first:.2} s, second pass \
             (after the programs moved) {second:.2} s",
            resize::FROM_ENTRIES,
            resize::TO_ENTRIES
        );
        println!("\n{METHOD}");
    }

    /// A row whose ratio is against the headline floor.
    fn row(&self, name: &str, ns: f64, target: Option<f64>) {
        Self::print_row(name, ns, ns / self.floor_ns, target);
    }

    /// A row whose ratio is against the floor timed beside it.
    fn long_row(name: &str, path: LongRun, target: Option<f64>) {
        Self::print_row(name, path.ns, path.x_floor, target);
    }

    fn print_row(name: &str, ns: f64, ratio: f64, target: Option<f64>) {
        let (target, met) = match target {
            Some(limit) => (format!("<= {limit}x"), if ratio <= limit { "yes" } else { "NO" }),
            None => (String::new(), ""),
        };
        println!("{name:<48} {ns:>9.1} {ratio:>8.1}  {target:<8} {met}");
    }

    fn json(&self) -> String {
        let head = self.headline();
        let mut text = String::from("{\n");
        let fields = [
            ("floor_ns", self.floor_ns),
            ("floor_single_run_ns", self.floor_single_ns),
            ("parse_only_ns", self.parse_only.ns),
            ("ct_hit_ns", head.ct_hit.ns),
            ("ct_hit_x_floor", head.ct_hit.x_floor),
            ("first_packet_ns", head.first_packet),
            ("snat_ns", head.snat),
            ("reply_ns", head.reply.ns),
            ("snat_reply_ns", head.snat_reply.ns),
            ("first_packet_in_one_call_ns", self.ring_ns),
            ("first_packet_full_conntrack_ns", self.full_table_ns),
            ("dependent_cache_miss_ns", self.miss_ns),
            ("lru_insert_ns", self.lru_insert_ns),
            ("new_flow_map_work_ns", self.new_flow_map_ns),
            ("conntrack_collector_pass_s", self.collector_pass_s),
            ("daemon_resume_s", self.resume_s),
            ("conntrack_resize_first_pass_s", self.resize_passes_s.0),
            ("conntrack_resize_second_pass_s", self.resize_passes_s.1),
        ];
        for (name, value) in fields {
            writeln!(text, "  \"{name}\": {value:.2},").expect("writing to a String");
        }
        let by_count = |pick: fn(&Paths) -> f64| {
            let items: Vec<String> =
                self.by_services.iter().map(|(n, p)| format!("\"{n}\": {:.2}", pick(p))).collect();
            format!("{{{}}}", items.join(", "))
        };
        let series: [Series; 4] = [
            ("first_packet_ns_by_services", |p| p.first_packet),
            ("ct_hit_ns_by_services", |p| p.ct_hit.ns),
            ("snat_ns_by_services", |p| p.snat),
            ("reply_ns_by_services", |p| p.reply.ns),
        ];
        for (name, pick) in series {
            writeln!(text, "  \"{name}\": {},", by_count(pick)).expect("writing to a String");
        }
        writeln!(text, "  \"headline_services\": {},", SERVICE_COUNTS[2]).expect("String");
        writeln!(text, "  \"conntrack_entries\": {CONNTRACK_FILL},").expect("String");
        writeln!(text, "  \"conntrack_capacity\": {CONNTRACK_CAPACITY}").expect("String");
        text.push_str("}\n");
        text
    }

    /// Writes the JSON to `target/bench/dataplane.json` under the workspace root.
    fn write_json(&self) -> PathBuf {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the workspace root");
        let dir = root.join("target").join("bench");
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        let path = dir.join("dataplane.json");
        std::fs::write(&path, self.json())
            .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        path
    }
}
