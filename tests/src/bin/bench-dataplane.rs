//! `cargo xtask bench dataplane`: nanoseconds per packet of `lb_xdp`'s paths, measured with
//! BPF_PROG_TEST_RUN, with 10, 10k and 100k services and 1M conntrack entries loaded. Prints a
//! table and writes `target/bench/dataplane.json` under the workspace root.
//!
//! BPF_PROG_TEST_RUN with `repeat = n` runs the program n times on the same buffer, and the
//! program's rewrites persist from one run to the next (measured on 6.18: a DNATed SYN counts
//! one `forward_new`, then `not_service` for every repeat). So each path is set up so that its
//! own output is again an input for the same path:
//! - floor: an empty XDP program (`r0 = XDP_PASS; exit`), loaded with bpf(2) since aya loads
//!   only object files;
//! - conntrack hit and reply: two conntrack entries that translate a packet back and forth
//!   (client -> A becomes client -> B, which becomes client -> A), so every run is a hit;
//! - first packet: a chain of ClusterIP frontends whose backend is the next frontend's VIP, so
//!   run i is the first packet of a new flow to frontend i (conntrack miss, service lookup,
//!   backend selection, two conntrack inserts, DNAT); each call starts from a new client port;
//! - NodePort SNAT: a chain of NodePorts whose backend is the next NodePort on a remote address
//!   (the node's own): every run is a new flow that claims a SNAT port. The conntrack entries a
//!   call created are deleted after it, so SNAT ports never run short over a million runs.
//!
//! Every measurement checks that the per-reason counters grew by exactly its run count under
//! the reason of the path it claims to measure.
//!
//! Times: for the large-repeat paths (floor, hit, reply) this thread's CPU time across the call
//! divided by the runs, because the kernel's own figure is an integer average (1 ns steps on a
//! 3 ns floor); the per-call set-up is spread over millions of runs. For the chains (10 runs a
//! call) the kernel's reported average, which leaves the set-up out; it still includes the
//! timer reads around the loop, about a tenth of a call's overhead a packet, shown as "floor at
//! repeat 10".
#![expect(clippy::missing_panics_doc, reason = "a benchmark binary: failures panic with a message")]

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::Ipv4Addr,
    os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd},
    path::PathBuf,
    time::Instant,
};

use aya::{
    Ebpf,
    maps::{HashMap, Map, MapData},
    programs::{TestRun as _, TestRunOptions, Xdp},
};
use lb_common::{
    maps::{
        Backend, BackendSlotKey, ConntrackKey, ConntrackValue, RevNat, ServiceKey, ServiceValue,
        backend_flags, ct_flags, names, proto, scope, service_flags,
    },
    stats::Reason,
};
use lb_tests::{
    node::{self, NODE_IP},
    packets::{Spec, TcpFields},
};
use lb_user::{
    loader,
    maps::{KernelMaps, MapOp, MapWriter as _, ip_be},
    program_names,
    stats::{self, ReasonCounts},
};

const SERVICE_COUNTS: [u32; 3] = [10, 10_000, 100_000];
const CONNTRACK_FILL: u32 = 1_000_000;
/// Runs per call on the large-repeat paths.
const LONG_REPEAT: u32 = 5_000_000;
/// Runs per call on the chains: at most the number of services in the smallest set.
const CHAIN: u32 = 10;
const FIRST_PACKETS: u32 = 1_000_000;
const SNAT_PACKETS: u32 = 200_000;
/// NodePorts in the SNAT chain (30000 up), on top of the services counted.
const SNAT_NODE_PORTS: u16 = 10;
/// Service ids of the ping-pong reverse-NAT entries, above any chain service.
const PING: u32 = 250_000;
const PONG: u32 = 250_001;

const TARGET_CT_HIT: f64 = 4.0;
const TARGET_FIRST_PACKET: f64 = 30.0;
const TARGET_SCALING: f64 = 1.25;

fn main() {
    let floor = Floor::load();
    let floor_ns = floor.ns_per_run(LONG_REPEAT * 4);
    let floor_short_ns = floor.kernel_ns_at_repeat(CHAIN, 100_000);
    let mut by_services = BTreeMap::new();
    let mut parse_only_ns = 0.0;
    for services in SERVICE_COUNTS {
        let started = Instant::now();
        let mut bench = Bench::load(services);
        eprintln!(
            "{services} services, {CONNTRACK_FILL} conntrack entries: loaded in {:.1?}",
            started.elapsed()
        );
        parse_only_ns = bench.parse_only();
        by_services.insert(services, bench.paths());
    }
    let report = Report { floor_ns, floor_short_ns, parse_only_ns, by_services };
    report.print();
    let path = report.write_json();
    println!("\nwrote {}", path.display());
}

/// ns/packet of every measured path with one service count loaded.
#[derive(Clone, Copy)]
struct Paths {
    ct_hit_ns: f64,
    first_packet_ns: f64,
    snat_ns: f64,
    reply_ns: f64,
    snat_reply_ns: f64,
}

/// The empty XDP program: the cost of BPF_PROG_TEST_RUN's loop and an XDP program call.
struct Floor {
    fd: OwnedFd,
}

/// `struct bpf_insn`.
#[repr(C)]
struct Insn {
    code: u8,
    /// dst_reg in the low nibble, src_reg in the high nibble.
    regs: u8,
    off: i16,
    imm: i32,
}

/// The BPF_PROG_LOAD part of `union bpf_attr`, as far as this load needs it.
#[repr(C)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
}

/// The BPF_PROG_TEST_RUN part of `union bpf_attr` (linux/bpf.h).
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
    /// The struct's tail padding; the kernel wants unknown bytes zero.
    pad: u32,
}

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_PROG_TYPE_XDP: u32 = 6;
const XDP_PASS: u32 = 2;

fn bpf<T>(command: libc::c_long, attr: &mut T) -> libc::c_long {
    // SAFETY: `attr` is a live, fully initialised `repr(C)` prefix of `union bpf_attr` for
    // `command`, and its size is passed with it; the kernel reads and writes only that much.
    unsafe {
        libc::syscall(libc::SYS_bpf, command, std::ptr::from_mut(attr), std::mem::size_of::<T>())
    }
}

impl Floor {
    fn load() -> Self {
        // r0 = XDP_PASS (BPF_ALU64 | BPF_MOV | BPF_K); exit (BPF_JMP | BPF_EXIT).
        let insns = [
            Insn { code: 0xb7, regs: 0, off: 0, imm: 2 },
            Insn { code: 0x95, regs: 0, off: 0, imm: 0 },
        ];
        let license = c"GPL";
        let mut attr = ProgLoadAttr {
            prog_type: BPF_PROG_TYPE_XDP,
            insn_cnt: 2,
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
            log_level: 0,
            log_size: 0,
            log_buf: 0,
            kern_version: 0,
            prog_flags: 0,
        };
        let fd = bpf(BPF_PROG_LOAD, &mut attr);
        assert!(fd >= 0, "BPF_PROG_LOAD of the empty program: {}", std::io::Error::last_os_error());
        let fd = i32::try_from(fd).expect("a file descriptor");
        // SAFETY: the kernel just returned this descriptor to us, and nothing else owns it.
        Self { fd: unsafe { OwnedFd::from_raw_fd(fd) } }
    }

    /// Runs the program `repeat` times on a 64-byte frame; returns the kernel's reported
    /// average (integer ns) and this thread's CPU time for the call.
    fn run(&self, repeat: u32) -> (u32, f64) {
        let frame = [0u8; 64];
        let mut attr = TestRunAttr {
            prog_fd: u32::try_from(self.fd.as_fd().as_raw_fd()).expect("fd"),
            data_size_in: 64,
            data_in: frame.as_ptr() as u64,
            repeat,
            ..TestRunAttr::default()
        };
        let before = thread_cpu_ns();
        let rc = bpf(BPF_PROG_TEST_RUN, &mut attr);
        let cpu = as_f64(thread_cpu_ns() - before);
        assert!(
            rc == 0,
            "BPF_PROG_TEST_RUN of the empty program: {}",
            std::io::Error::last_os_error()
        );
        assert_eq!(attr.retval, XDP_PASS, "the empty program returns XDP_PASS");
        (attr.duration, cpu)
    }

    fn ns_per_run(&self, repeat: u32) -> f64 {
        let (_, cpu) = self.run(repeat);
        cpu / f64::from(repeat)
    }

    /// The kernel's average over `calls` calls of `repeat` runs: the floor as the chains see it.
    fn kernel_ns_at_repeat(&self, repeat: u32, calls: u32) -> f64 {
        let total: f64 = (0..calls).map(|_| f64::from(self.run(repeat).0)).sum();
        total / f64::from(calls)
    }
}

/// CPU time of this thread: time spent running, in user space or (here) in the syscall, and
/// not time spent preempted by other work on the machine.
fn thread_cpu_ns() -> u64 {
    clock_ns(libc::CLOCK_THREAD_CPUTIME_ID)
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
    /// Client flows started so far, so every chain call starts a new one.
    clients: u32,
}

impl Bench {
    fn load(services: u32) -> Self {
        let mut ebpf = loader::load_private()
            .unwrap_or_else(|e| panic!("loading the programs (root and BTF needed): {e:?}"));
        // Opened by id before `take_from` moves the map out of the object.
        let conntrack = conntrack_by_id(&ebpf);
        let maps = KernelMaps::take_from(&mut ebpf).expect("datapath maps");
        let mut bench = Self { ebpf, maps, conntrack, services, clients: 0 };
        bench.apply(&[node::set_node_config()]);
        for index in 0..services {
            bench.apply(&chain_service(index, services));
        }
        for index in 0..SNAT_NODE_PORTS {
            bench.apply(&snat_node_port(index));
        }
        bench.fill_conntrack();
        bench
    }

    fn apply(&mut self, ops: &[MapOp]) {
        for op in ops {
            self.maps.apply(op).unwrap_or_else(|e| panic!("applying {op:?}: {e:?}"));
        }
    }

    /// `CONNTRACK_FILL` live entries of flows nobody sends, as a busy node has.
    fn fill_conntrack(&mut self) {
        let now = coarse_now_ns();
        for index in 0..CONNTRACK_FILL {
            let key = ConntrackKey {
                src_ip_be: ip_be(Ipv4Addr::from(0xac10_0000 | (index >> 8))),
                dst_ip_be: ip_be(Ipv4Addr::from(0x0a60_0000 | (index & 0xff))),
                src_port_be: 40_000u16.to_be(),
                dst_port_be: 80u16.to_be(),
                proto: proto::TCP,
                pad: [0; 3],
            };
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

    /// Runs `frame` `repeat` times; returns the kernel's average and the thread's CPU time.
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

    /// ns/run of `repeat` runs of `frame`, each of which must count `reason`.
    fn long_run(&self, frame: &[u8], reason: Reason) -> f64 {
        let before = self.counters();
        let (_, cpu) = self.run(frame, LONG_REPEAT);
        assert_counted(&self.counters().since(&before), reason, LONG_REPEAT);
        cpu / f64::from(LONG_REPEAT)
    }

    fn parse_only(&self) -> f64 {
        let mut arp = Spec::udp("10.244.1.5", 5353, "10.244.2.15", 53).build();
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        self.long_run(&arp, Reason::NotIpv4)
    }

    fn paths(&mut self) -> Paths {
        let paths = Paths {
            ct_hit_ns: self.ct_hit(),
            reply_ns: self.reply(false),
            snat_reply_ns: self.reply(true),
            first_packet_ns: self.first_packet(),
            snat_ns: self.snat(),
        };
        eprintln!(
            "{} services: hit {:.1}, reply {:.1}, masqueraded reply {:.1}, first packet {:.1}, \
             SNAT {:.1} ns",
            self.services,
            paths.ct_hit_ns,
            paths.reply_ns,
            paths.snat_reply_ns,
            paths.first_packet_ns,
            paths.snat_ns
        );
        paths
    }

    /// Two forward entries that send client -> A to B and client -> B to A.
    fn ct_hit(&mut self) -> f64 {
        let (client, a, b) = (("10.244.100.1", 40_000), ("10.96.200.1", 80), ("10.244.200.1", 80));
        for (to, backend) in [(a, b), (b, a)] {
            let key = tuple_key(client, to);
            self.conntrack.insert(&key, &forward_entry(backend), 0).expect("forward entry");
        }
        self.long_run(&established(client, a), Reason::ForwardEstablished)
    }

    /// Two reply entries whose reverse NAT turns B -> client into A -> client and back; with
    /// `masqueraded`, the client side is the SNAT address and is restored too.
    fn reply(&mut self, masqueraded: bool) -> f64 {
        let (a, b) = (("10.96.201.1", 80), ("10.244.201.1", 80));
        let client = if masqueraded { (NODE_IP, 61_001) } else { ("10.244.101.1", 40_000) };
        let original = ("203.0.113.7", 50_000);
        self.apply(&[rev_nat(PING, a), rev_nat(PONG, b)]);
        let (far, near) = if masqueraded { (original, client) } else { (client, client) };
        // B -> near becomes A -> far; A -> far becomes B -> near.
        let entries = [(b, near, PING, far), (a, far, PONG, near)];
        for (from, to, service, restore) in entries {
            let value = reply_entry(service, masqueraded, restore);
            self.conntrack.insert(&tuple_key(from, to), &value, 0).expect("reply entry");
        }
        self.long_run(&established(b, near), Reason::ReplyTranslated)
    }

    /// Chains of `CHAIN` new flows from a new client each call, across all services.
    fn first_packet(&mut self) -> f64 {
        let calls = FIRST_PACKETS / CHAIN;
        let before = self.counters();
        let mut total_ns = 0.0;
        for call in 0..calls {
            let start = (call * CHAIN) % self.services;
            let client = self.next_client();
            let frame = syn((&client.0.to_string(), client.1), chain_vip(start));
            total_ns += f64::from(self.run(&frame, CHAIN).0) * f64::from(CHAIN);
        }
        assert_counted(&self.counters().since(&before), Reason::ForwardNew, calls * CHAIN);
        total_ns / f64::from(calls * CHAIN)
    }

    /// Chains of `CHAIN` masqueraded NodePort flows; each call's entries are removed after it.
    fn snat(&mut self) -> f64 {
        let calls = SNAT_PACKETS / CHAIN;
        let before = self.counters();
        let mut total_ns = 0.0;
        for _ in 0..calls {
            let client = self.next_client();
            let external = Ipv4Addr::new(203, 0, 113, client.0.octets()[3]);
            let first = (external, client.1);
            let frame = syn((&external.to_string(), client.1), (node_ip(), 30_000));
            total_ns += f64::from(self.run(&frame, CHAIN).0) * f64::from(CHAIN);
            self.forget_snat_chain(first);
        }
        assert_counted(&self.counters().since(&before), Reason::ForwardNew, calls * CHAIN);
        total_ns / f64::from(calls * CHAIN)
    }

    /// Follows a SNAT chain's forward entries from its first client, removing every entry.
    fn forget_snat_chain(&mut self, first: (Ipv4Addr, u16)) {
        let node = ip_be(node_ip());
        let mut key = ConntrackKey {
            src_ip_be: ip_be(first.0),
            dst_ip_be: node,
            src_port_be: first.1.to_be(),
            dst_port_be: 30_000u16.to_be(),
            proto: proto::TCP,
            pad: [0; 3],
        };
        for hop in 0..CHAIN {
            let value = self.conntrack.get(&key, 0).unwrap_or_else(|e| panic!("hop {hop}: {e:?}"));
            assert!(value.flags & ct_flags::SNAT != 0, "hop {hop} was masqueraded");
            self.conntrack.remove(&key).expect("forward entry");
            let next = ConntrackKey {
                src_ip_be: value.nat_ip_be,
                src_port_be: value.nat_port_be,
                dst_ip_be: value.backend_ip_be,
                dst_port_be: value.backend_port_be,
                ..key
            };
            let reply = ConntrackKey {
                src_ip_be: next.dst_ip_be,
                src_port_be: next.dst_port_be,
                dst_ip_be: next.src_ip_be,
                dst_port_be: next.src_port_be,
                ..next
            };
            self.conntrack.remove(&reply).expect("reply entry");
            key = next;
        }
    }

    fn next_client(&mut self) -> (Ipv4Addr, u16) {
        self.clients += 1;
        let host = self.clients / 60_000;
        let ip = Ipv4Addr::new(
            10,
            244,
            150 + u8::try_from(host / 250).expect("few"),
            1 + u8::try_from(host % 250).expect("host"),
        );
        (ip, 1024 + u16::try_from(self.clients % 60_000).expect("port"))
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

/// `bpf_ktime_get_coarse_ns()`'s clock, so the entries written here are live to the programs.
fn coarse_now_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC_COARSE)
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
        last_seen_ns: now,
        backend_id: 0,
        service_id,
        backend_ip_be: 0,
        nat_ip_be: 0,
        backend_port_be: 0,
        nat_port_be: 0,
        flags,
        pad: [0; 2],
    }
}

/// A forward entry that sends its flow to `backend`.
fn forward_entry(backend: (&str, u16)) -> ConntrackValue {
    let (backend_ip_be, backend_port_be) = endpoint_be(backend);
    ConntrackValue { backend_ip_be, backend_port_be, ..flow_value(PING, 0, coarse_now_ns()) }
}

/// A reply entry whose source becomes frontend `service_id`'s address and, `masqueraded`, whose
/// destination becomes `client`.
fn reply_entry(service_id: u32, masqueraded: bool, client: (&str, u16)) -> ConntrackValue {
    let flags = ct_flags::REPLY | if masqueraded { ct_flags::SNAT } else { 0 };
    let (nat_ip_be, nat_port_be) = endpoint_be(client);
    ConntrackValue { nat_ip_be, nat_port_be, ..flow_value(service_id, flags, coarse_now_ns()) }
}

fn established(from: (&str, u16), to: (&str, u16)) -> Vec<u8> {
    let tcp = TcpFields { syn: false, ack: Some(1), ..TcpFields::default() };
    Spec::tcp(from.0, from.1, to.0, to.1).with_tcp(tcp).build()
}

fn syn(from: (&str, u16), to: (Ipv4Addr, u16)) -> Vec<u8> {
    Spec::tcp(from.0, from.1, &to.0.to_string(), to.1).build()
}

/// VIP of chain service `index`: 10.96.0.1 up, inside the service CIDR.
fn chain_vip(index: u32) -> (Ipv4Addr, u16) {
    (Ipv4Addr::from(0x0a60_0001 + index), 80)
}

/// ClusterIP service `index` of `count`, with two backends that both point at the next
/// service's VIP (ids and slots as the daemon writes them; the addresses close the chain).
fn chain_service(index: u32, count: u32) -> Vec<MapOp> {
    let service_id = index + 1;
    let (next_ip, next_port) = chain_vip((index + 1) % count);
    let mut ops = Vec::new();
    for slot in 0..2 {
        let id = 2 * index + slot + 1;
        let backend = Backend {
            ip_be: ip_be(next_ip),
            port_be: next_port.to_be(),
            proto: proto::TCP,
            flags: backend_flags::LOCAL,
        };
        ops.push(MapOp::UpsertBackend { id, backend });
        ops.push(MapOp::UpsertSlot { key: BackendSlotKey { service_id, slot }, backend_id: id });
    }
    let (vip, port) = chain_vip(index);
    ops.push(rev_nat(service_id, (&vip.to_string(), port)));
    let key = ServiceKey {
        vip_be: ip_be(vip),
        port_be: port.to_be(),
        proto: proto::TCP,
        scope: scope::EXTERNAL,
    };
    let value =
        ServiceValue { service_id, slot_count: 2, affinity_timeout_s: 0, flags: 0, pad: [0; 2] };
    ops.push(MapOp::UpsertService { key, value });
    ops
}

/// NodePort 30000 + `index` whose one backend, remote (so the flow is masqueraded), is the
/// next NodePort on the node's address.
fn snat_node_port(index: u16) -> Vec<MapOp> {
    let service_id = 200_000 + u32::from(index);
    let next = 30_000 + (index + 1) % SNAT_NODE_PORTS;
    let node = ip_be(node_ip());
    let backend_id = 240_000 + u32::from(index);
    let backend = Backend { ip_be: node, port_be: next.to_be(), proto: proto::TCP, flags: 0 };
    let port = 30_000 + index;
    let key = ServiceKey {
        vip_be: node,
        port_be: port.to_be(),
        proto: proto::TCP,
        scope: scope::EXTERNAL,
    };
    let value = ServiceValue {
        service_id,
        slot_count: 1,
        affinity_timeout_s: 0,
        flags: service_flags::EXTERNAL,
        pad: [0; 2],
    };
    vec![
        MapOp::UpsertBackend { id: backend_id, backend },
        MapOp::UpsertSlot { key: BackendSlotKey { service_id, slot: 0 }, backend_id },
        rev_nat(service_id, (NODE_IP, port)),
        MapOp::UpsertService { key, value },
    ]
}

fn node_ip() -> Ipv4Addr {
    NODE_IP.parse().expect("node address")
}

fn rev_nat(service_id: u32, (ip, port): (&str, u16)) -> MapOp {
    let (vip_be, port_be) = endpoint_be((ip, port));
    MapOp::UpsertRevNat { service_id, rev_nat: RevNat { vip_be, port_be, pad: [0; 2] } }
}

struct Report {
    floor_ns: f64,
    floor_short_ns: f64,
    parse_only_ns: f64,
    by_services: BTreeMap<u32, Paths>,
}

impl Report {
    /// The headline figures: the largest service count, the hardest case.
    fn headline(&self) -> Paths {
        *self.by_services.values().next_back().expect("at least one service count")
    }

    fn scaling(&self) -> f64 {
        let first = |count| self.by_services[&count].first_packet_ns;
        first(SERVICE_COUNTS[2]) / first(SERVICE_COUNTS[0])
    }

    fn print(&self) {
        let floor = self.floor_ns;
        println!("\nlb_xdp, BPF_PROG_TEST_RUN, {CONNTRACK_FILL} conntrack entries");
        println!("{:<46} {:>10} {:>8}  {:<9} {}", "path", "ns/packet", "x floor", "target", "met");
        let row = |name: &str, ns: f64, target: Option<f64>| {
            let ratio = ns / floor;
            let (target, met) = match target {
                Some(limit) => (format!("<= {limit}x"), if ratio <= limit { "yes" } else { "NO" }),
                None => (String::new(), ""),
            };
            println!("{name:<46} {ns:>10.1} {ratio:>8.2}  {target:<9} {met}");
        };
        row("floor: empty XDP program", floor, None);
        row("floor at repeat 10 (kernel's figure)", self.floor_short_ns, None);
        row("parse only (ARP frame through lb_xdp)", self.parse_only_ns, None);
        for (services, paths) in &self.by_services {
            let hit_target = (*services == SERVICE_COUNTS[2]).then_some(TARGET_CT_HIT);
            let first_target = (*services == SERVICE_COUNTS[2]).then_some(TARGET_FIRST_PACKET);
            row(&format!("conntrack hit, {services} services"), paths.ct_hit_ns, hit_target);
            row(&format!("first packet, {services} services"), paths.first_packet_ns, first_target);
            row(&format!("NodePort SNAT first packet, {services} services"), paths.snat_ns, None);
            row(&format!("reply, {services} services"), paths.reply_ns, None);
            row(
                &format!("reply of a masqueraded flow, {services} services"),
                paths.snat_reply_ns,
                None,
            );
        }
        let scaling = self.scaling();
        let met = if scaling <= TARGET_SCALING { "yes" } else { "NO" };
        println!(
            "{:<46} {:>10} {:>8.2}  {:<9} {met}",
            "first packet, 100k vs 10 services",
            "",
            scaling,
            format!("<= {TARGET_SCALING}x")
        );
    }

    fn json(&self) -> String {
        let head = self.headline();
        let mut text = String::from("{\n");
        let mut field = |name: &str, value: f64| {
            writeln!(text, "  \"{name}\": {value:.2},").expect("String");
        };
        field("floor_ns", self.floor_ns);
        field("floor_repeat10_ns", self.floor_short_ns);
        field("parse_only_ns", self.parse_only_ns);
        field("ct_hit_ns", head.ct_hit_ns);
        field("first_packet_ns", head.first_packet_ns);
        field("snat_ns", head.snat_ns);
        field("reply_ns", head.reply_ns);
        field("snat_reply_ns", head.snat_reply_ns);
        let by_count = |pick: fn(&Paths) -> f64| {
            let items: Vec<String> =
                self.by_services.iter().map(|(n, p)| format!("\"{n}\": {:.2}", pick(p))).collect();
            format!("{{{}}}", items.join(", "))
        };
        writeln!(text, "  \"first_packet_ns_by_services\": {},", by_count(|p| p.first_packet_ns))
            .expect("String");
        writeln!(text, "  \"ct_hit_ns_by_services\": {},", by_count(|p| p.ct_hit_ns))
            .expect("String");
        writeln!(text, "  \"snat_ns_by_services\": {},", by_count(|p| p.snat_ns)).expect("String");
        writeln!(text, "  \"reply_ns_by_services\": {},", by_count(|p| p.reply_ns))
            .expect("String");
        writeln!(text, "  \"services_for_headline\": {},", SERVICE_COUNTS[2]).expect("String");
        writeln!(text, "  \"conntrack_entries\": {CONNTRACK_FILL}").expect("String");
        text.push_str("}\n");
        text
    }

    fn write_json(&self) -> PathBuf {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        let dir = root.join("target").join("bench");
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        let path = dir.join("dataplane.json");
        std::fs::write(&path, self.json())
            .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        path
    }
}
