//! The real programs, loaded with private maps, run on one packet at a time.

use std::{
    sync::atomic::{AtomicBool, AtomicU32, Ordering},
    time::Instant,
};

use aya::{
    Ebpf,
    programs::{SchedClassifier, TestRun, TestRunOptions, Xdp},
};
use lb_common::{
    maps::{RefusalBudget, names},
    stats::Reason,
};
/// The return codes the tests compare against.
pub use lb_user::return_codes::{
    TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, TC_ACT_UNSPEC, XDP_DROP, XDP_PASS, XDP_REDIRECT,
    XDP_TX,
};
use lb_user::{
    conntrack_gc, loader,
    maps::{KernelMaps, MapOp, MapWriter as _},
    program_names,
    stats::{self, Forwarding, ReasonCounts},
};

/// Which entry point sees the packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    /// `lb_xdp`, on external interfaces.
    Xdp,
    /// `lb_tc`, on tc ingress of pod-facing interfaces.
    Tc,
    /// `lb_tc_external`, the tc fallback of an external interface where XDP could not be
    /// attached: `lb_xdp`'s semantics with tc's return codes.
    TcExternal,
    /// `lb_tc_reply`, on tc egress of both kinds: replies the node's own stack sends.
    TcReply,
}

impl Hook {
    /// The hooks of the packet tables: the two entry points every node has.
    pub const ALL: [Self; 2] = [Self::Xdp, Self::Tc];

    /// A tc program (an skb): tc's return codes and test-run rules.
    pub fn is_tc(self) -> bool {
        self != Self::Xdp
    }

    /// The return code meaning "passed on untouched".
    pub fn pass_code(self) -> u32 {
        match self {
            Self::Xdp => XDP_PASS,
            Self::Tc | Self::TcExternal | Self::TcReply => TC_ACT_UNSPEC,
        }
    }

    /// The return code meaning "translated, continue to the new destination".
    pub fn forward_code(self) -> u32 {
        match self {
            Self::Xdp => XDP_PASS,
            Self::Tc | Self::TcExternal | Self::TcReply => TC_ACT_OK,
        }
    }

    /// The return code meaning "dropped".
    pub fn drop_code(self) -> u32 {
        match self {
            Self::Xdp => XDP_DROP,
            Self::Tc | Self::TcExternal | Self::TcReply => TC_ACT_SHOT,
        }
    }

    /// The return code meaning "sent back where it came from" (refusals).
    pub fn bounce_code(self) -> u32 {
        match self {
            Self::Xdp => XDP_TX,
            Self::Tc | Self::TcExternal | Self::TcReply => TC_ACT_REDIRECT,
        }
    }
}

/// What one run did.
#[derive(Debug)]
pub struct Run {
    pub return_code: u32,
    /// The packet as the program left it.
    pub output: Vec<u8>,
    /// Counters incremented by this run.
    pub counted: ReasonCounts,
}

impl Run {
    /// Asserts the run's return code and that exactly `reason` was counted, once.
    pub fn assert_outcome(&self, code: u32, reason: Reason, context: &str) {
        assert_eq!(self.return_code, code, "{context}: return code");
        let counted: Vec<_> = self.counted.non_zero().collect();
        assert_eq!(counted, vec![(reason.name(), 1)], "{context}: counters");
    }
}

/// Keeps the calling thread on the CPU it runs on now, so that the programs it runs see one
/// CPU's per-CPU state (a refusal budget) from one run to the next.
pub fn stay_on_this_cpu() {
    // SAFETY: a plain system call.
    let cpu = usize::try_from(unsafe { libc::sched_getcpu() }).expect("sched_getcpu");
    run_on(&[cpu]);
}

/// Lets the calling thread run only on `cpus`.
fn run_on(cpus: &[usize]) {
    // SAFETY: plain system calls on a set this function owns.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &cpu in cpus {
            libc::CPU_SET(cpu, &mut set);
        }
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &raw const set)
    };
    assert_eq!(rc, 0, "sched_setaffinity: {}", std::io::Error::last_os_error());
}

/// The CPUs the calling thread may run on.
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: plain system calls on a set this function owns.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        let rc = libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &raw mut set);
        assert_eq!(rc, 0, "sched_getaffinity: {}", std::io::Error::last_os_error());
        (0..libc::CPU_SETSIZE as usize).filter(|&cpu| libc::CPU_ISSET(cpu, &set)).collect()
    }
}

/// A private instance of the programs and their maps: nothing pinned, nothing attached.
pub struct Datapath {
    ebpf: Ebpf,
    maps: KernelMaps,
}

impl Default for Datapath {
    fn default() -> Self {
        Self::load()
    }
}

impl Datapath {
    pub fn load() -> Self {
        let mut ebpf = loader::load_private()
            .unwrap_or_else(|e| panic!("loading the programs (root and BTF needed): {e:?}"));
        let maps = KernelMaps::take_from(&mut ebpf).expect("datapath maps");
        Self { ebpf, maps }
    }

    pub fn maps(&mut self) -> &mut KernelMaps {
        &mut self.maps
    }

    /// Applies map operations, as the daemon would.
    pub fn apply(&mut self, ops: &[MapOp]) {
        for op in ops {
            self.maps.apply(op).unwrap_or_else(|e| panic!("applying {op:?}: {e:?}"));
        }
    }

    /// The program the conntrack collector deletes through, on these maps.
    pub fn reaper(&self) -> conntrack_gc::Reaper<'_> {
        conntrack_gc::Reaper::of(&self.ebpf).expect("the reaper program")
    }

    /// One pass of the daemon's conntrack collector at jiffies `now`.
    pub fn collect_conntrack(&self, now: u64) -> conntrack_gc::Pass {
        conntrack_gc::collect(&self.maps, &self.reaper(), now).expect("a collector pass")
    }

    /// Packets and bytes counted for frontend `service_id`, over all CPUs.
    pub fn service_counters(&self, service_id: u32) -> (u64, u64) {
        let counters = self.maps.service_counters(service_id).expect("service counters");
        (counters.packets, counters.bytes)
    }

    pub fn counters(&self) -> ReasonCounts {
        let map = self.ebpf.map(names::STATS).expect("STATS map in the object");
        stats::read(map).expect("reading STATS")
    }

    /// Gives every CPU `budget` for refusals, as the daemon does at its start (until then
    /// they are unlimited).
    pub fn set_refusal_budget(&mut self, budget: RefusalBudget) {
        let map = self.ebpf.map_mut(names::REFUSAL_BUDGET).expect("REFUSAL_BUDGET in the object");
        lb_user::maps::write_refusal_budget(map, budget).expect("writing REFUSAL_BUDGET");
    }

    /// How translated north-south packets were sent on, so far.
    pub fn forwarding(&self) -> Forwarding {
        let map = self.ebpf.map(names::FORWARDING).expect("FORWARDING map in the object");
        stats::read_forwarding(map).expect("reading FORWARDING")
    }

    /// Runs `packet` once through the program behind `hook`.
    pub fn run(&mut self, hook: Hook, packet: &[u8]) -> Run {
        self.run_counted(hook, packet, None)
    }

    /// [`Datapath::run`] of a packet that arrived on interface `ifindex` (of the calling
    /// thread's network namespace) instead of the loopback.
    pub fn run_arriving_on(&mut self, hook: Hook, packet: &[u8], ifindex: u32) -> Run {
        self.run_counted(hook, packet, Some(ifindex))
    }

    fn run_counted(&mut self, hook: Hook, packet: &[u8], ingress: Option<u32>) -> Run {
        let before = self.counters();
        let (return_code, output) = run_program(&self.ebpf, hook, packet, ingress);
        Run { return_code, output, counted: self.counters().since(&before) }
    }

    /// [`Datapath::run`] without reading the counters around it, for tests that run packets by
    /// the million and check the counters per batch.
    pub fn run_uncounted(&self, hook: Hook, packet: &[u8]) -> (u32, Vec<u8>) {
        run_program(&self.ebpf, hook, packet, None)
    }

    /// Runs two packets at the same time, one on this thread and one on another (on two CPUs
    /// where there are two), for `rounds` rounds, each after `prepare` has set the maps up;
    /// returns each round's two return codes and outputs, and in how many rounds the two runs
    /// (their system calls) overlapped. For the races of two CPUs over one map entry: both
    /// threads spin until a round starts, so that their runs overlap, if nothing else keeps a
    /// CPU busy meanwhile. Each thread keeps to a CPU of its own: left to the scheduler, two
    /// spinning threads beside other work (a build) can share one CPU for the whole race.
    pub fn race(
        &mut self,
        hook: Hook,
        packets: [&[u8]; 2],
        rounds: u32,
        mut prepare: impl FnMut(&mut KernelMaps),
    ) -> Race {
        let Self { ebpf, maps } = self;
        let ebpf = &*ebpf;
        let timed = |packet| {
            let start = Instant::now();
            let run = run_program(ebpf, hook, packet, None);
            (run, start..Instant::now())
        };
        let started = AtomicU32::new(0);
        let finished = AtomicU32::new(0);
        // Set when this thread stops, even by a panic, so that the other one does not wait for
        // a round that never starts.
        let stopped = AtomicBool::new(false);
        let allowed = allowed_cpus();
        let own_cpus = match allowed[..] {
            [first, second, ..] => Some((first, second)),
            _ => None,
        };
        let (here, other) = std::thread::scope(|scope| {
            let other = scope.spawn(|| {
                if let Some((_, cpu)) = own_cpus {
                    run_on(&[cpu]);
                }
                let mut runs = Vec::new();
                for round in 1..=rounds {
                    if !wait_for(&started, round, || stopped.load(Ordering::Acquire)) {
                        break;
                    }
                    runs.push(timed(packets[1]));
                    finished.store(round, Ordering::Release);
                }
                runs
            });
            let _stop = SetOnDrop(&stopped);
            if let Some((cpu, _)) = own_cpus {
                run_on(&[cpu]);
            }
            let mut here = Vec::new();
            for round in 1..=rounds {
                prepare(maps);
                started.store(round, Ordering::Release);
                here.push(timed(packets[0]));
                if !wait_for(&finished, round, || other.is_finished()) {
                    break;
                }
            }
            (here, other.join().expect("the other thread of the race"))
        });
        run_on(&allowed);
        let overlapped = here
            .iter()
            .zip(&other)
            .filter(|((_, a), (_, b))| a.start < b.end && b.start < a.end)
            .count();
        let rounds = here.into_iter().zip(other).map(|((a, _), (b, _))| [a, b]).collect();
        Race { rounds, overlapped }
    }
}

/// What [`Datapath::race`] saw.
pub struct Race {
    /// Each round's two runs: return code and output packet each.
    pub rounds: Vec<RaceRound>,
    /// Rounds whose two runs overlapped in time.
    pub overlapped: usize,
}

/// The two runs of one round of [`Datapath::race`].
pub type RaceRound = [(u32, Vec<u8>); 2];

/// Sets its flag when dropped.
struct SetOnDrop<'a>(&'a AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// Spins until `counter` reaches `value` (true), or until `gave_up` (false); yields now and
/// then, for a machine with one CPU.
fn wait_for(counter: &AtomicU32, value: u32, gave_up: impl Fn() -> bool) -> bool {
    let mut spins = 0u32;
    while counter.load(Ordering::Acquire) < value {
        spins = spins.wrapping_add(1);
        if spins.is_multiple_of(10_000) {
            if gave_up() {
                return false;
            }
            std::thread::yield_now();
        } else {
            std::hint::spin_loop();
        }
    }
    true
}

/// Runs `packet` through the program behind `hook`, arrived on interface `ingress` if given:
/// a context (`struct xdp_md`, or `struct __sk_buff` up to its `ifindex`) naming it.
fn run_program(ebpf: &Ebpf, hook: Hook, packet: &[u8], ingress: Option<u32>) -> (u32, Vec<u8>) {
    // Room for programs that grow the packet (a short datagram refused with an ICMP error).
    let mut output = vec![0u8; packet.len() + 512];
    let context = ingress.map(|ifindex| {
        let fields: Vec<u32> = if hook.is_tc() {
            // len .. priority and ingress_ifindex left 0, then ifindex.
            [vec![0; 10], vec![ifindex]].concat()
        } else {
            // data, data_end, data_meta, ingress_ifindex.
            let len = u32::try_from(packet.len()).expect("a packet");
            vec![0, len, 0, ifindex]
        };
        fields.iter().flat_map(|field| field.to_ne_bytes()).collect::<Vec<u8>>()
    });
    let options = TestRunOptions {
        data_in: Some(packet),
        data_out: Some(&mut output),
        ctx_in: context.as_deref(),
        ..TestRunOptions::default()
    };
    let result = match hook {
        Hook::Xdp => program::<Xdp>(ebpf, program_names::XDP).test_run(options),
        Hook::Tc => program::<SchedClassifier>(ebpf, program_names::TC).test_run(options),
        Hook::TcExternal => {
            program::<SchedClassifier>(ebpf, program_names::TC_EXTERNAL).test_run(options)
        }
        Hook::TcReply => {
            program::<SchedClassifier>(ebpf, program_names::TC_REPLY).test_run(options)
        }
    }
    .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN of {hook:?} on {packet:02x?}: {e:?}"));
    output.truncate(result.data_size_out as usize);
    (result.return_value, output)
}

fn program<'a, P>(ebpf: &'a Ebpf, name: &str) -> &'a P
where
    &'a P: TryFrom<&'a aya::programs::Program>,
{
    ebpf.program(name)
        .and_then(|p| p.try_into().ok())
        .unwrap_or_else(|| panic!("program {name} of the expected type"))
}
