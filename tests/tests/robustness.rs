//! At least a million random and mutated packets through each program, against the seed the
//! packet tables use (`lb_tests::fixtures`). Every packet must be passed untouched, dropped (with
//! a counted reason), refused with an exact RST or ICMP port unreachable, or translated
//! correctly (TCP and UDP, fragments of them, and ICMP errors about them); none may be
//! mistranslated.
//!
//! The oracle knows nothing of the programs' code. It reads the seeded tables, restates the
//! README's parse contract (which packets are well-formed enough to translate), recomputes every
//! checksum itself, and keeps a model of the flows this run created (the translations it saw), so
//! it can tell a legal reverse NAT from a mistranslation. See [`Oracle::judge`].
//!
//! Per-run counters are not read (it would take fifty syscalls a packet). Instead the per-reason
//! counters are read around each batch, and must grow by exactly the batch's run count, split
//! over pass, translate and drop/refuse reasons as the verdicts were.
//!
//! Inputs that never reach a program, because BPF_PROG_TEST_RUN itself refuses them with EINVAL
//! (see [`refused_by_test_run`]), are not generated (frames under 14 bytes) or skipped and
//! counted (tc only); nothing else is excluded.
//!
//! A failure prints the seed, the packet's index, how it was made, and the input and output in
//! hex. `LB_ROBUSTNESS_SEED=<n>` replays a seed (conntrack timeouts and LRU eviction depend on
//! timing, so a replay is faithful up to those); `LB_ROBUSTNESS_PACKETS=<n>` changes the number
//! of runs per program.

use std::{
    collections::{BTreeMap, HashMap},
    fmt::{self, Write as _},
    net::Ipv4Addr,
    sync::LazyLock,
    time::Instant,
};

use etherparse::{NetSlice, SlicedPacket, TransportSlice};
use lb_common::{
    maps::{proto, scope, service_flags},
    stats::Reason,
};
use lb_tests::{
    checksum,
    datapath::{Datapath, Hook},
    fixtures::{self, CLUSTER_IPS, LB_IP},
    netns::Netns,
    node::{NODE_IP, SNAT_PORT_MAX, SNAT_PORT_MIN},
    packets::{CLIENT_MAC, NODE_MAC, Spec, TcpFields},
    rng::Rng,
};
use lb_user::stats::ReasonCounts;

const DEFAULT_SEED: u64 = 0x1b5e_ed00_2026_0001;
const RUNS_PER_PROGRAM: u64 = 1_000_000;
/// Runs through `lb_tc` that make the flows `lb_tc_reply`'s run replies to.
const FLOW_RUNS_BEFORE_REPLIES: u64 = 50_000;
/// Runs between two reads of the per-reason counters.
const BATCH: u64 = 25_000;

#[test]
fn xdp_survives_a_million_random_and_mutated_packets() {
    survive(Hook::Xdp);
}

#[test]
fn tc_survives_a_million_random_and_mutated_packets() {
    survive(Hook::Tc);
}

#[test]
fn the_tc_fallback_survives_a_million_random_and_mutated_packets() {
    survive(Hook::TcExternal);
}

/// `lb_tc_reply` makes no flow: the pod-facing program makes them first (some to frontend 13,
/// whose backend is a host-network endpoint of the node), and the million runs then go through
/// `lb_tc_reply`, which may only pass packets or reverse-translate those flows' replies.
#[test]
fn the_reply_program_survives_a_million_random_and_mutated_packets() {
    survive(Hook::TcReply);
}

/// The oracle itself, on hand-made outputs: it accepts a correct DNAT, reverse NAT and refusal
/// (the refusal built independently, by etherparse) and rejects each way a datapath could get
/// them wrong. Without this, a lenient oracle would pass a million packets and prove nothing.
#[test]
fn the_oracle_rejects_what_a_buggy_datapath_would_do() {
    let tables = Tables::from_seed();
    let mut oracle = Oracle::new(Hook::Tc, &tables);
    let forward = Hook::Tc.forward_code();
    let request = syn(endpoint(fixtures::POD, 40_000), endpoint("10.96.45.10", 80));
    let input = request.build();
    let to = |dst: Endpoint, src: Endpoint| Draft { src, dst, ..request.clone() }.build();
    let pod = endpoint(fixtures::POD, 40_000);
    let backend = endpoint("10.244.1.10", 80);
    let rejected = [
        ("a backend of another frontend", to(endpoint("10.244.1.11", 80), pod)),
        ("a source masqueraded outside the SNAT range", to(backend, endpoint(NODE_IP, 1234))),
        ("a payload byte changed", changed_byte(&to(backend, pod), 56, true)),
        ("a wrong IPv4 checksum", changed_byte(&to(backend, pod), 14 + 11, false)),
        ("a wrong TCP checksum", changed_byte(&to(backend, pod), 34 + 17, false)),
    ];
    for (what, output) in rejected {
        assert!(oracle.judge(forward, &input, &output).is_err(), "accepted {what}");
    }
    let good = to(backend, pod);
    assert!(oracle.judge(forward, &input, &good).is_ok(), "rejected a correct DNAT");
    let other = to(endpoint("10.244.2.10", 80), pod);
    assert!(oracle.judge(forward, &input, &other).is_err(), "accepted a flow changing backend");
    assert!(
        oracle.judge(Hook::Tc.pass_code(), &input, &good).is_err(),
        "accepted a pass verdict on a changed packet"
    );

    let answer = syn(backend, pod).build();
    let reverse = |src: &str| Draft { src: endpoint(src, 80), ..syn(backend, pod) }.build();
    assert!(oracle.judge(forward, &answer, &reverse("10.96.45.10")).is_ok(), "rejected a reply");
    assert!(
        oracle.judge(forward, &answer, &reverse("10.96.45.14")).is_err(),
        "accepted a reply from a frontend the client never used"
    );

    assert_fragments_are_judged(&mut oracle, &request, backend);
    assert_refusals_are_judged(&mut oracle);

    // An error from the backend about the translated SYN reaches the pod from the service.
    let sent = syn(pod, backend);
    let error = icmp_about(backend, pod, &sent);
    let as_the_pod_sent_it = icmp_about(endpoint("10.96.45.10", 80), pod, &request);
    assert!(
        oracle.judge(forward, &error, &as_the_pod_sent_it).is_ok(),
        "rejected a correct ICMP error translation"
    );
    let other_service = syn(pod, endpoint("10.96.45.14", 80));
    let wrong = icmp_about(endpoint("10.96.45.14", 80), pod, &other_service);
    assert!(oracle.judge(forward, &error, &wrong).is_err(), "accepted an error from another VIP");
}

/// An ICMP port unreachable from `from` to `to` quoting the first 28 bytes of `quoted`.
fn icmp_about(from: Endpoint, to: Endpoint, quoted: &Draft) -> Vec<u8> {
    let quote = quoted.build()[ETH_LEN..ETH_LEN + 28].to_vec();
    let l4 = L4::Icmp { kind: ICMP_DEST_UNREACHABLE, code: 3 };
    Draft { l4, payload: quote, ..syn(from, to) }.build()
}

/// A later fragment is legal only with the addresses its first fragment was given, and only
/// its IPv4 header may change.
fn assert_fragments_are_judged(oracle: &mut Oracle<'_>, request: &Draft, backend: Endpoint) {
    let forward = Hook::Tc.forward_code();
    let first = Draft { frags: IPV4_MF, id: 0x0f0f, ..request.clone() };
    let later = Draft { l4: L4::Other(proto::TCP), frags: 3, ..first.clone() };
    let translated = |draft: &Draft, dst: Endpoint| Draft { dst, ..draft.clone() }.build();
    assert!(
        oracle.judge(forward, &later.build(), &translated(&later, backend)).is_err(),
        "accepted a later fragment translated before its first"
    );
    let (first_frame, later_frame) = (first.build(), later.build());
    assert!(
        oracle.judge(forward, &first_frame, &translated(&first, backend)).is_ok(),
        "rejected a translated first fragment"
    );
    assert!(
        oracle.judge(forward, &later_frame, &translated(&later, backend)).is_ok(),
        "rejected a later fragment given its first one's addresses"
    );
    let elsewhere = translated(&later, endpoint("10.244.2.10", 80));
    assert!(
        oracle.judge(forward, &later_frame, &elsewhere).is_err(),
        "accepted a later fragment sent elsewhere than its first"
    );
    let payload_at = translated(&later, backend).len() - 1;
    let damaged = changed_byte(&translated(&later, backend), payload_at, true);
    assert!(
        oracle.judge(forward, &later_frame, &damaged).is_err(),
        "accepted a later fragment with its payload changed"
    );
    let other_datagram = Draft { id: 0x0f10, ..later };
    assert!(
        oracle
            .judge(forward, &other_datagram.build(), &translated(&other_datagram, backend))
            .is_err(),
        "accepted a later fragment of another datagram"
    );
}

fn syn(src: Endpoint, dst: Endpoint) -> Draft {
    Draft {
        src,
        dst,
        l4: L4::Tcp { flags: TCP_SYN, options: Vec::new() },
        payload: b"hello".to_vec(),
        tags: Vec::new(),
        ip_options: Vec::new(),
        frags: 0x4000,
        id: 0x1234,
        padding: Vec::new(),
        seq: 1000,
        ack: 0,
    }
}

/// `frame` with byte `at` changed; with `refresh`, checksums recomputed to hide the change.
fn changed_byte(frame: &[u8], at: usize, refresh: bool) -> Vec<u8> {
    let mut frame = frame.to_vec();
    frame[at] = frame[at].wrapping_add(1);
    if refresh {
        refresh_checksums(&mut frame);
    }
    frame
}

fn assert_refusals_are_judged(oracle: &mut Oracle<'_>) {
    let bounce = Hook::Tc.bounce_code();
    let client = fixtures::POD;
    let input = Spec::tcp(client, 40_200, "10.96.45.12", 80).build();
    let reset = |ack: u32| {
        let tcp =
            TcpFields { syn: false, ack: Some(ack), rst: true, fin: false, seq: 0, window: 0 };
        let spec = Spec::tcp("10.96.45.12", 80, client, 40_200).with_payload(&[]).with_tcp(tcp);
        spec.with_macs(NODE_MAC, CLIENT_MAC).build()
    };
    // RFC 793: a SYN with sequence number 1000 and 5 bytes is answered with ack 1000 + 5 + 1.
    assert!(oracle.judge(bounce, &input, &reset(1006)).is_ok(), "rejected a correct RST");
    assert!(oracle.judge(bounce, &input, &reset(1005)).is_err(), "accepted a wrong ack");
    let served = Spec::tcp(client, 40_200, "10.96.45.10", 80).build();
    assert!(
        oracle.judge(bounce, &served, &reset(1006)).is_err(),
        "accepted a refusal of a served frontend"
    );
}

/// Runs [`survive_here`] in a namespace of its own: north-south packets are looked up in the
/// FIB (to check them against their path's MTU), and the runs must not depend on the host's
/// routes and forwarding settings. (A new namespace has no route but its loopback's, so no
/// lookup finds a path; `fib_forward` tests what they find.)
fn survive(hook: Hook) {
    Netns::new("lbt-fuzz").enter(|| survive_here(hook));
}

fn survive_here(hook: Hook) {
    assert_partition_covers_every_reason();
    let seed = env_number("LB_ROBUSTNESS_SEED").unwrap_or(DEFAULT_SEED);
    let target = env_number("LB_ROBUSTNESS_PACKETS").unwrap_or(RUNS_PER_PROGRAM);
    eprintln!("{hook:?}: seed {seed:#x}, {target} runs");
    let started = Instant::now();
    let tables = Tables::from_seed();
    // The replies' program needs flows to reply to: the pod-facing program makes them.
    let first = if hook == Hook::TcReply { Hook::Tc } else { hook };
    let mut fuzz = Fuzz {
        hook: first,
        seed,
        programs: fixtures::seeded(),
        oracle: Oracle::new(first, &tables),
        // One stream per hook, so the two tests can run in parallel and each replays alone.
        generator: Generator::new(seed ^ hook_salt(hook), &tables),
        sweep: truncation_sweep(&tables).into_iter(),
        totals: Totals::default(),
    };
    if first != hook {
        fuzz.batch(FLOW_RUNS_BEFORE_REPLIES);
        eprintln!("{hook:?}: {} flows made through {first:?}", fuzz.oracle.model.dnat.len());
        fuzz.hook = hook;
        fuzz.oracle.hook = hook;
        fuzz.sweep = truncation_sweep(&tables).into_iter();
        fuzz.totals = Totals::default();
    }
    while fuzz.totals.tally.runs < target {
        fuzz.batch(BATCH.min(target - fuzz.totals.tally.runs));
    }
    let totals = &fuzz.totals;
    totals.assert_coverage(hook);
    eprintln!(
        "{hook:?}: {} runs ({} inputs skipped, refused by BPF_PROG_TEST_RUN) in {:.1?}: {} \
         passed, {} translated, {} refused, {} resets not answered, {} dropped; {} flows seen",
        totals.tally.runs,
        totals.skipped,
        started.elapsed(),
        totals.tally.passed,
        totals.tally.translated,
        totals.tally.bounced,
        totals.tally.resets_dropped,
        totals.tally.dropped,
        fuzz.oracle.model.dnat.len(),
    );
    eprintln!("{hook:?}: reasons counted: {:?}", totals.counted);
    eprintln!("{hook:?}: packets made by: {:?}", totals.made_by);
}

/// One program's run: the loaded programs, the oracle, and where the inputs come from.
struct Fuzz<'t> {
    hook: Hook,
    seed: u64,
    programs: Datapath,
    oracle: Oracle<'t>,
    generator: Generator<'t>,
    /// Fixed inputs that go first.
    sweep: std::vec::IntoIter<Vec<u8>>,
    totals: Totals,
}

impl Fuzz<'_> {
    /// `runs` judged runs between two counter reads, which must account for exactly them.
    fn batch(&mut self, runs: u64) {
        let before = self.programs.counters();
        let mut tally = Tally::default();
        while tally.runs < runs {
            let (input, how) = match self.sweep.next() {
                Some(frame) => (frame, vec!["truncation sweep"]),
                None => self.generator.frame(&self.oracle.model),
            };
            if refused_by_test_run(self.hook, &input) {
                self.totals.skipped += 1;
                continue;
            }
            let index = self.totals.tally.runs + tally.runs;
            tally.add(self.run_one(index, &input, &how));
            for name in how {
                *self.totals.made_by.entry(name).or_default() += 1;
            }
        }
        let counted = self.programs.counters().since(&before);
        check_batch(self.hook, self.seed, &tally, &counted);
        self.totals.add(&tally, &counted);
    }

    fn run_one(&mut self, index: u64, input: &[u8], how: &[&'static str]) -> Outcome {
        let (hook, seed) = (self.hook, self.seed);
        let (code, output) = self.programs.run_uncounted(hook, input);
        let context = Context { hook, seed, index, how, input, output: &output };
        match self.oracle.judge(code, input, &output) {
            Ok(outcome) => {
                context.disarm();
                outcome
            }
            Err(message) => {
                let report = format!("{message}\n{context}");
                context.disarm();
                panic!("{report}");
            }
        }
    }
}

fn env_number(name: &str) -> Option<u64> {
    let text = std::env::var(name).ok()?;
    let parsed = match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => text.parse(),
    };
    Some(parsed.unwrap_or_else(|e| panic!("{name}={text}: {e}")))
}

fn hook_salt(hook: Hook) -> u64 {
    match hook {
        Hook::Xdp => 0,
        Hook::Tc => 0x7c7c_7c7c_7c7c_7c7c,
        Hook::TcExternal => 0x7e7e_7e7e_7e7e_7e7e,
        Hook::TcReply => 0x7f7f_7f7f_7f7f_7f7f,
    }
}

/// Inputs BPF_PROG_TEST_RUN refuses with EINVAL before any program runs, so they cannot be
/// tested here:
/// - frames under 14 bytes (an Ethernet header), for XDP and tc alike: the generator never
///   makes them (every truncation keeps 14 bytes);
/// - for tc (an skb program), a frame whose EtherType is IPv4 (0x0800) without a full 20-byte
///   IPv4 header after the Ethernet header, or IPv6 (0x86dd) without a full 40-byte IPv6 header:
///   the kernel checks the network header of the skb it builds (measured on 6.18). Such frames
///   still run through XDP.
fn refused_by_test_run(hook: Hook, frame: &[u8]) -> bool {
    if frame.len() < ETH_LEN {
        return true;
    }
    let after_ethernet = frame.len() - ETH_LEN;
    hook.is_tc()
        && match be16(frame, 12) {
            ETH_P_IPV4 => after_ethernet < 20,
            ETH_P_IPV6 => after_ethernet < 40,
            _ => false,
        }
}

/// What a failing run prints: enough to rebuild the packet and rerun it alone.
struct Context<'a> {
    hook: Hook,
    seed: u64,
    index: u64,
    how: &'a [&'static str],
    input: &'a [u8],
    output: &'a [u8],
}

impl Context<'_> {
    /// The run passed: nothing to print.
    fn disarm(self) {
        std::mem::forget(self);
    }
}

impl fmt::Display for Context<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?}, seed {:#x} (LB_ROBUSTNESS_SEED), run {}, made by: {}\n  input  ({} bytes): \
             {}\n  output ({} bytes): {}",
            self.hook,
            self.seed,
            self.index,
            self.how.join(" + "),
            self.input.len(),
            hex(self.input),
            self.output.len(),
            hex(self.output),
        )
    }
}

impl Drop for Context<'_> {
    /// A panic inside the oracle's helpers (`checksum::assert_valid`) still names the packet.
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("while judging: {self}");
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::with_capacity(2 * bytes.len()), |mut text, byte| {
        write!(text, "{byte:02x}").expect("writing to a String");
        text
    })
}

/// Reasons by the verdict they stand for (README, "Counters"). A packet the parser cannot trust
/// is passed; `truncated_l4` would also name a translation that failed half-way, which would be
/// a drop, and would then break the batch balance below.
const PASSED: &[Reason] = &[
    Reason::NotIpv4,
    Reason::TruncatedEthernet,
    Reason::TruncatedVlan,
    Reason::StackedVlan,
    Reason::TruncatedIpv4,
    Reason::BadIpv4Header,
    Reason::BadIpv4Length,
    Reason::Fragment,
    Reason::OtherL4,
    Reason::TruncatedL4,
    Reason::NotService,
    Reason::NoNodeConfig,
];
const TRANSLATED: &[Reason] = &[
    Reason::ForwardNew,
    Reason::ForwardEstablished,
    Reason::ReplyTranslated,
    Reason::IcmpErrorTranslated,
    Reason::FragmentTranslated,
];
/// Refused with an RST or ICMP error, or dropped when the input was itself a reset (the
/// oracle tells which: `Outcome::ResetDropped`).
const REFUSED: &[Reason] =
    &[Reason::RejectNoEndpoints, Reason::RejectUnservedPort, Reason::FragmentationNeeded];
const DROPPED: &[Reason] = &[
    Reason::DropNoLocalEndpoint,
    Reason::DropUnallocatedVip,
    Reason::DropSourceRange,
    Reason::DropIcmpToVip,
    Reason::DropSnatExhausted,
    Reason::DropBackendMissing,
    Reason::DropConntrackFull,
    Reason::DropRefusalFailed,
    Reason::DropFragmentUntracked,
    Reason::DropRefusalRateLimited,
];

/// Counted by the node's socket hooks (cgroup programs), never by `lb_xdp` or `lb_tc`.
const OTHER_HOOKS: &[Reason] = &[Reason::HostTranslated, Reason::HostRefused];

/// A reason added later must be classified here before this test can pass.
fn assert_partition_covers_every_reason() {
    for reason in Reason::ALL {
        let classes = [PASSED, TRANSLATED, REFUSED, DROPPED, OTHER_HOOKS];
        let hits = classes.iter().filter(|class| class.contains(reason)).count();
        assert_eq!(hits, 1, "{} must be in exactly one verdict class", reason.name());
    }
}

fn sum_of(counted: &ReasonCounts, class: &[Reason]) -> u64 {
    class.iter().map(|reason| counted.get(*reason)).sum()
}

/// Verdicts of one batch, as the oracle judged them.
#[derive(Default)]
struct Tally {
    runs: u64,
    passed: u64,
    translated: u64,
    bounced: u64,
    resets_dropped: u64,
    dropped: u64,
}

impl Tally {
    fn add(&mut self, outcome: Outcome) {
        self.runs += 1;
        match outcome {
            Outcome::Passed => self.passed += 1,
            Outcome::Translated => self.translated += 1,
            Outcome::Bounced => self.bounced += 1,
            Outcome::ResetDropped => self.resets_dropped += 1,
            Outcome::Dropped => self.dropped += 1,
        }
    }
}

fn check_batch(hook: Hook, seed: u64, tally: &Tally, counted: &ReasonCounts) {
    let context = format!("{hook:?}, seed {seed:#x}, batch of {} runs", tally.runs);
    let counts: Vec<_> = counted.non_zero().collect();
    let total: u64 = counted.0.iter().sum();
    // lb_tc_reply counts only what it translates or drops (see the program).
    let uncounted = if hook == Hook::TcReply { tally.passed } else { 0 };
    assert_eq!(
        total,
        tally.runs - uncounted,
        "{context}: every counted run counts exactly one reason: {counts:?}"
    );
    assert_eq!(
        tally.passed - uncounted,
        sum_of(counted, PASSED),
        "{context}: untouched packets vs pass reasons: {counts:?}"
    );
    assert_eq!(
        tally.translated,
        sum_of(counted, TRANSLATED),
        "{context}: translated packets vs translate reasons: {counts:?}"
    );
    assert_eq!(
        tally.bounced + tally.resets_dropped,
        sum_of(counted, REFUSED),
        "{context}: refusals and unanswered resets vs refusal reasons: {counts:?}"
    );
    assert_eq!(
        tally.dropped,
        sum_of(counted, DROPPED),
        "{context}: other drops vs drop reasons: {counts:?}"
    );
    assert_eq!(sum_of(counted, OTHER_HOOKS), 0, "{context}: socket-hook reasons: {counts:?}");
}

#[derive(Default)]
struct Totals {
    tally: Tally,
    skipped: u64,
    counted: BTreeMap<&'static str, u64>,
    made_by: BTreeMap<&'static str, u64>,
}

impl Totals {
    fn add(&mut self, tally: &Tally, counted: &ReasonCounts) {
        self.tally.runs += tally.runs;
        self.tally.passed += tally.passed;
        self.tally.translated += tally.translated;
        self.tally.bounced += tally.bounced;
        self.tally.resets_dropped += tally.resets_dropped;
        self.tally.dropped += tally.dropped;
        for (name, count) in counted.non_zero() {
            *self.counted.entry(name).or_default() += count;
        }
    }

    /// A fuzzer that never reached the translating paths would pass while testing nothing:
    /// every verdict, every mutation and every reason this seed can produce must have occurred.
    fn assert_coverage(&self, hook: Hook) {
        if hook == Hook::TcReply {
            return self.assert_reply_coverage();
        }
        let t = &self.tally;
        let verdicts = [
            ("passed", t.passed),
            ("translated", t.translated),
            ("refused", t.bounced),
            ("reset not answered", t.resets_dropped),
            ("dropped", t.dropped),
        ];
        for (what, count) in verdicts {
            assert!(count > t.runs / 1000, "{hook:?}: only {count} of {} runs {what}", t.runs);
        }
        for name in MUTATION_NAMES.iter().chain(&GENERATED_KINDS) {
            let made = self.made_by.get(name).copied().unwrap_or(0);
            assert!(made > 0, "{hook:?}: no packet made by {name}");
        }
        let expected = Reason::ALL.iter().filter(|reason| !NOT_REQUIRED.contains(reason));
        for reason in expected {
            let count = self.counted.get(reason.name()).copied().unwrap_or(0);
            assert!(count > 0, "{hook:?}: {} never counted: {:?}", reason.name(), self.counted);
        }
        for reason in [Reason::NoNodeConfig, Reason::DropBackendMissing] {
            let count = self.counted.get(reason.name()).copied().unwrap_or(0);
            assert_eq!(count, 0, "{hook:?}: {} with a complete seed", reason.name());
        }
    }

    /// `lb_tc_reply` passes most packets and reverse-translates some; it never makes a flow,
    /// refuses or drops one it could parse.
    fn assert_reply_coverage(&self) {
        let t = &self.tally;
        assert!(t.passed > t.runs / 2, "TcReply: only {} of {} runs passed", t.passed, t.runs);
        assert!(t.translated > t.runs / 1000, "TcReply: only {} translated", t.translated);
        assert_eq!(t.bounced + t.resets_dropped, 0, "TcReply refused packets");
        let count = |reason: Reason| self.counted.get(reason.name()).copied().unwrap_or(0);
        assert!(count(Reason::ReplyTranslated) > 0, "TcReply: {:?}", self.counted);
        let never = [Reason::ForwardNew, Reason::ForwardEstablished, Reason::RejectNoEndpoints];
        for reason in never.into_iter().chain([Reason::RejectUnservedPort, Reason::NoNodeConfig]) {
            assert_eq!(count(reason), 0, "TcReply: {} counted", reason.name());
        }
    }
}

/// Reasons this run need not produce. Never: the socket hooks' reasons (asserted zero per
/// batch), `truncated_ethernet` (frames under 14 bytes never reach a program), and the
/// missing-configuration and missing-slot drops (the seed is complete;
/// asserted zero above), and refusals beyond the budget (the seed sets none: the oracle's
/// refusals are all answered), and fragmentation needed (the run's namespace has no route
/// but its loopback's, so no lookup finds a path to be too big for). Not necessarily: a full
/// conntrack map, a refusal with no room to grow,
/// and SNAT exhaustion (which does happen here: every masqueraded flow to one backend competes
/// for the same 4536 ports, probed 8 at a time, and fuzzed TCP flows seldom close).
const NOT_REQUIRED: &[Reason] = &[
    Reason::HostTranslated,
    Reason::HostRefused,
    Reason::TruncatedEthernet,
    Reason::NoNodeConfig,
    Reason::DropSnatExhausted,
    Reason::DropBackendMissing,
    Reason::DropConntrackFull,
    Reason::DropRefusalFailed,
    Reason::DropRefusalRateLimited,
    Reason::FragmentationNeeded,
];

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Endpoint {
    ip: Ipv4Addr,
    port: u16,
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.ip, self.port)
    }
}

fn endpoint(ip: &str, port: u16) -> Endpoint {
    Endpoint { ip: ip.parse().expect("address"), port }
}

/// A packet's five-tuple.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Tuple {
    src: Endpoint,
    dst: Endpoint,
    proto: u8,
}

impl fmt::Display for Tuple {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} -> {} (proto {})", self.src, self.dst, self.proto)
    }
}

struct FrontendView {
    id: u32,
    vip: Endpoint,
    proto: u8,
    scope: u8,
    flags: u16,
    backends: Vec<Endpoint>,
    /// loadBalancerSourceRanges as (network, prefix length).
    source_ranges: Vec<(Ipv4Addr, u8)>,
}

impl FrontendView {
    fn admits(&self, source: Ipv4Addr) -> bool {
        self.flags & service_flags::SOURCE_RANGES == 0
            || self.source_ranges.iter().any(|&(net, len)| in_prefix(source, net, len))
    }
}

struct Tables {
    frontends: Vec<FrontendView>,
    cluster_ips: Vec<Ipv4Addr>,
}

impl Tables {
    fn from_seed() -> Self {
        let frontends = fixtures::frontends()
            .into_iter()
            .map(|f| FrontendView {
                id: f.service_id,
                vip: endpoint(f.vip, f.port),
                proto: f.proto,
                scope: f.scope,
                flags: f.flags,
                backends: f.backends.iter().map(|&(ip, port, _)| endpoint(ip, port)).collect(),
                source_ranges: f.source_ranges.iter().map(|cidr| parse_cidr(cidr)).collect(),
            })
            .collect();
        let cluster_ips = CLUSTER_IPS.iter().map(|ip| ip.parse().expect("ClusterIP")).collect();
        Self { frontends, cluster_ips }
    }

    fn frontend(&self, vip: Endpoint, proto_number: u8, entry_scope: u8) -> Option<&FrontendView> {
        self.frontends
            .iter()
            .find(|f| f.vip == vip && f.proto == proto_number && f.scope == entry_scope)
    }

    /// The frontend a new flow to `vip` uses (DESIGN.md, `lb_common::maps::scope`): the
    /// EXTERNAL entry, or its INTERNAL twin for sources inside the cluster.
    fn frontend_for(
        &self,
        vip: Endpoint,
        proto_number: u8,
        internal: bool,
    ) -> Option<&FrontendView> {
        let external = self.frontend(vip, proto_number, scope::EXTERNAL)?;
        if internal && external.flags & service_flags::TWO_SCOPES != 0 {
            return self.frontend(vip, proto_number, scope::INTERNAL);
        }
        Some(external)
    }

    /// True if a new flow to `dst` must be refused: a frontend without endpoints that is not
    /// flagged to drop, or a port or protocol an allocated ClusterIP does not serve.
    fn refuses(&self, tuple: Tuple, internal: bool) -> bool {
        match self.frontend_for(tuple.dst, tuple.proto, internal) {
            Some(f) => f.backends.is_empty() && f.flags & service_flags::EMPTY_DROP == 0,
            None => self.cluster_ips.contains(&tuple.dst.ip),
        }
    }
}

fn parse_cidr(cidr: &str) -> (Ipv4Addr, u8) {
    let (net, len) = cidr.split_once('/').expect("CIDR");
    (net.parse().expect("network"), len.parse().expect("prefix length"))
}

fn in_prefix(address: Ipv4Addr, net: Ipv4Addr, len: u8) -> bool {
    let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
    u32::from(address) & mask == u32::from(net) & mask
}

/// The node's cluster CIDR (`lb_tests::node`): sources inside it are "inside the cluster".
fn in_cluster(address: Ipv4Addr) -> bool {
    in_prefix(address, Ipv4Addr::new(10, 244, 0, 0), 16)
}

/// tc runs on pod-facing interfaces: its sources are always inside the cluster.
fn internal_source(hook: Hook, source: Ipv4Addr) -> bool {
    hook == Hook::Tc || in_cluster(source)
}

/// An address and port the programs masquerade to.
fn is_snat_address(endpoint: Endpoint) -> bool {
    endpoint.ip == node_ip() && (SNAT_PORT_MIN..=SNAT_PORT_MAX).contains(&endpoint.port)
}

fn node_ip() -> Ipv4Addr {
    static NODE: LazyLock<Ipv4Addr> = LazyLock::new(|| NODE_IP.parse().expect("node address"));
    *NODE
}

const ETH_LEN: usize = 14;
const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_PSH: u8 = 0x08;
const TCP_ACK: u8 = 0x10;
const TCP_URG: u8 = 0x20;

fn be16(frame: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([frame[at], frame[at + 1]])
}

fn be32(frame: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([frame[at], frame[at + 1], frame[at + 2], frame[at + 3]])
}

fn ip_at(frame: &[u8], at: usize) -> Ipv4Addr {
    Ipv4Addr::new(frame[at], frame[at + 1], frame[at + 2], frame[at + 3])
}

/// The IPv4 datagram of a frame that the README's parse contract calls well-formed: Ethernet
/// with at most one 802.1Q/802.1ad tag, IPv4 with a valid IHL, and a total length that fits
/// the frame (the rest is Ethernet padding). It may be a fragment.
struct Datagram {
    part: Part,
    /// The identification field: names a fragmented datagram.
    id: u16,
    l3: usize,
    /// IPv4 header length, options included.
    header_len: usize,
    /// IPv4 total length.
    total_len: usize,
    proto: u8,
    src: Ipv4Addr,
    dst: Ipv4Addr,
}

impl Datagram {
    fn l4(&self) -> usize {
        self.l3 + self.header_len
    }

    fn end(&self) -> usize {
        self.l3 + self.total_len
    }
}

fn parse_ipv4(frame: &[u8]) -> Option<Datagram> {
    let mut l3 = ETH_LEN;
    let mut ether_type = be16(frame.get(..ETH_LEN)?, 12);
    if matches!(ether_type, ETH_P_8021Q | ETH_P_8021AD) {
        ether_type = be16(frame.get(..18)?, 16);
        l3 = 18;
        if matches!(ether_type, ETH_P_8021Q | ETH_P_8021AD) {
            return None;
        }
    }
    let ip = frame.get(l3..l3 + 20)?;
    let header_len = usize::from(ip[0] & 0x0f) * 4;
    let total_len = usize::from(be16(ip, 2));
    if ether_type != ETH_P_IPV4 || ip[0] >> 4 != 4 || header_len < 20 {
        return None;
    }
    if total_len < header_len || l3 + total_len > frame.len() {
        return None;
    }
    let (src, dst) = (ip_at(ip, 12), ip_at(ip, 16));
    let (part, id) = (Part::of(be16(ip, 6)), be16(ip, 4));
    Some(Datagram { part, id, l3, header_len, total_len, proto: ip[9], src, dst })
}

/// Which part of its datagram a packet is (RFC 791).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Part {
    Whole,
    /// "More fragments" set, offset 0: the L4 header is here.
    First,
    /// A non-zero offset: payload only.
    Later,
}

const IPV4_MF: u16 = 0x2000;
const IPV4_OFFSET: u16 = 0x1fff;

impl Part {
    fn of(frags: u16) -> Self {
        if frags & IPV4_OFFSET != 0 {
            Self::Later
        } else if frags & IPV4_MF != 0 {
            Self::First
        } else {
            Self::Whole
        }
    }
}

/// A fragmented datagram, as its fragments name it: source, destination, identification,
/// protocol.
type FragmentKey = (Ipv4Addr, Ipv4Addr, u16, u8);

/// The key of a first fragment of a TCP or UDP datagram, whatever follows its IPv4 header.
fn parse_first_fragment(frame: &[u8]) -> Option<FragmentKey> {
    let ip = parse_ipv4(frame)?;
    let tcp_or_udp = ip.proto == proto::TCP || ip.proto == proto::UDP;
    (ip.part == Part::First && tcp_or_udp).then_some((ip.src, ip.dst, ip.id, ip.proto))
}

/// A later fragment of a TCP or UDP datagram, which the programs translate as its first
/// fragment was.
fn parse_later_fragment(frame: &[u8]) -> Option<(Datagram, FragmentKey)> {
    let ip = parse_ipv4(frame)?;
    if ip.part != Part::Later || (ip.proto != proto::TCP && ip.proto != proto::UDP) {
        return None;
    }
    let key = (ip.src, ip.dst, ip.id, ip.proto);
    Some((ip, key))
}

/// A well-formed TCP or UDP packet: a complete L4 header inside the datagram (TCP: a data
/// offset of 5 words or more, within the datagram; UDP: a length of 8 or more, within a whole
/// datagram); a whole datagram or a first fragment.
struct Parsed {
    /// The datagram's key if this is its first fragment.
    first_fragment: Option<FragmentKey>,
    l3: usize,
    l4: usize,
    /// IPv4 header length, options included.
    header_len: usize,
    /// IPv4 total length.
    total_len: usize,
    tuple: Tuple,
    /// TCP flags; 0 for UDP.
    flags: u8,
    /// TCP header length, options included; 8 for UDP.
    l4_header_len: usize,
}

fn parse_translatable(frame: &[u8]) -> Option<Parsed> {
    let ip = parse_ipv4(frame)?;
    if ip.part == Part::Later {
        return None;
    }
    let (l4, end) = (ip.l4(), ip.end());
    let l4_header_len = match ip.proto {
        proto::TCP if l4 + 20 <= end => usize::from(frame[l4 + 12] >> 4) * 4,
        proto::UDP => 8,
        _ => return None,
    };
    let tcp = ip.proto == proto::TCP;
    if l4_header_len < 8 || l4 + l4_header_len > end || (tcp && l4_header_len < 20) {
        return None;
    }
    // UDP's length: at least its header, and within a whole datagram (a first fragment's
    // covers the datagram, not the fragment).
    let udp_len = usize::from(be16(frame, l4 + 4));
    if !tcp && (udp_len < 8 || (ip.part == Part::Whole && l4 + udp_len > end)) {
        return None;
    }
    let tuple = Tuple {
        src: Endpoint { ip: ip.src, port: be16(frame, l4) },
        dst: Endpoint { ip: ip.dst, port: be16(frame, l4 + 2) },
        proto: ip.proto,
    };
    let flags = if tcp { frame[l4 + 13] } else { 0 };
    let (l3, header_len, total_len) = (ip.l3, ip.header_len, ip.total_len);
    let first_fragment = (ip.part == Part::First).then_some((ip.src, ip.dst, ip.id, ip.proto));
    Some(Parsed { first_fragment, l3, l4, header_len, total_len, tuple, flags, l4_header_len })
}

const ICMP_DEST_UNREACHABLE: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;

/// An ICMP error (RFC 792: destination unreachable, time exceeded) in a well-formed datagram,
/// quoting the start of a TCP or UDP datagram: its IPv4 header and at least the ports, inside
/// the ICMP message.
struct IcmpError {
    outer: Datagram,
    /// Offset of the quoted IPv4 header, and of its L4 header.
    quote_l3: usize,
    quote_l4: usize,
    /// The quoted datagram's tuple, as it was sent.
    quoted: Tuple,
}

fn parse_icmp_error(frame: &[u8]) -> Option<IcmpError> {
    let outer = parse_ipv4(frame)?;
    // The programs leave fragments of anything but TCP and UDP alone.
    if outer.part != Part::Whole {
        return None;
    }
    let icmp = outer.l4();
    let kind = *frame.get(icmp)?;
    if outer.proto != proto::ICMP || icmp + 8 > outer.end() {
        return None;
    }
    if kind != ICMP_DEST_UNREACHABLE && kind != ICMP_TIME_EXCEEDED {
        return None;
    }
    let quote_l3 = icmp + 8;
    let version_ihl = *frame.get(quote_l3)?;
    let quote_l4 = quote_l3 + usize::from(version_ihl & 0x0f) * 4;
    if version_ihl >> 4 != 4 || quote_l4 < quote_l3 + 20 || quote_l4 + 4 > outer.end() {
        return None;
    }
    let quoted_proto = frame[quote_l3 + 9];
    if quoted_proto != proto::TCP && quoted_proto != proto::UDP {
        return None;
    }
    // A quoted later fragment has payload where the ports would be.
    if Part::of(be16(frame, quote_l3 + 6)) == Part::Later {
        return None;
    }
    let quoted = Tuple {
        src: Endpoint { ip: ip_at(frame, quote_l3 + 12), port: be16(frame, quote_l4) },
        dst: Endpoint { ip: ip_at(frame, quote_l3 + 16), port: be16(frame, quote_l4 + 2) },
        proto: quoted_proto,
    };
    Some(IcmpError { outer, quote_l3, quote_l4, quoted })
}

impl Parsed {
    fn l4_checksum_at(&self) -> usize {
        self.l4 + if self.tuple.proto == proto::TCP { 16 } else { 6 }
    }

    fn l4_end(&self) -> usize {
        self.l3 + self.total_len
    }
}

/// One's-complement sum (RFC 1071) of `bytes` as big-endian words, odd byte padded, unfolded.
/// Eight bytes a step: this runs on every byte of a million packets in a debug build.
fn ones_sum(bytes: &[u8]) -> u64 {
    let mut sum = 0u64;
    let mut at = 0;
    while at + 8 <= bytes.len() {
        let word = u64::from_be_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        sum += (word >> 48) + ((word >> 32) & 0xffff) + ((word >> 16) & 0xffff) + (word & 0xffff);
        at += 8;
    }
    while at < bytes.len() {
        let low = bytes.get(at + 1).copied().unwrap_or(0);
        sum += u64::from(u16::from_be_bytes([bytes[at], low]));
        at += 2;
    }
    sum
}

fn fold(mut sum: u64) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    u16::try_from(sum).expect("folded")
}

fn pseudo_header_sum(src: Ipv4Addr, dst: Ipv4Addr, proto_number: u8, len: usize) -> u64 {
    ones_sum(&src.octets())
        + ones_sum(&dst.octets())
        + u64::from(proto_number)
        + u64::try_from(len).expect("length")
}

/// The folded sum over a header or segment, its checksum field included: 0xffff (or 0, the
/// same value in one's complement) when the checksum is right. An incremental update must keep
/// it exactly as it was, right or wrong.
fn ip_residual(frame: &[u8], p: &Parsed) -> u16 {
    fold(ones_sum(&frame[p.l3..p.l3 + p.header_len]))
}

fn l4_residual(frame: &[u8], p: &Parsed) -> u16 {
    let (src, dst) = (ip_at(frame, p.l3 + 12), ip_at(frame, p.l3 + 16));
    let segment = &frame[p.l4..p.l4_end()];
    fold(pseudo_header_sum(src, dst, p.tuple.proto, segment.len()) + ones_sum(segment))
}

fn same_in_ones_complement(a: u16, b: u16) -> bool {
    a % 0xffff == b % 0xffff
}

/// Rewrites whatever checksums the frame has room for, from scratch, reading the headers as
/// they are (a mutated frame keeps its mutation). UDP's "no checksum" zero is kept.
fn refresh_checksums(frame: &mut [u8]) {
    let Some((l3, _)) = network_offset(frame) else { return };
    if frame.len() < l3 + 20 || be16(frame, l3 - 2) != ETH_P_IPV4 {
        return;
    }
    let header_len = usize::from(frame[l3] & 0x0f) * 4;
    if header_len < 20 || l3 + header_len > frame.len() {
        return;
    }
    set_checksum(frame, l3 + 10, |f| ones_sum(&f[l3..l3 + header_len]));
    let total_len = usize::from(be16(frame, l3 + 2));
    if total_len < header_len {
        return;
    }
    if Part::of(be16(frame, l3 + 6)) == Part::Later {
        return;
    }
    let (l4, end) = (l3 + header_len, (l3 + total_len).min(frame.len()));
    let (src, dst, proto_number) = (ip_at(frame, l3 + 12), ip_at(frame, l3 + 16), frame[l3 + 9]);
    let pseudo = pseudo_header_sum(src, dst, proto_number, end.saturating_sub(l4));
    match proto_number {
        proto::TCP if l4 + 18 <= end => {
            set_checksum(frame, l4 + 16, |f| pseudo + ones_sum(&f[l4..end]));
        }
        proto::UDP if l4 + 8 <= end && be16(frame, l4 + 6) != 0 => {
            set_checksum(frame, l4 + 6, |f| pseudo + ones_sum(&f[l4..end]));
            if be16(frame, l4 + 6) == 0 {
                frame[l4 + 6..l4 + 8].copy_from_slice(&[0xff, 0xff]);
            }
        }
        proto::ICMP if l4 + 4 <= end => set_checksum(frame, l4 + 2, |f| ones_sum(&f[l4..end])),
        _ => {}
    }
}

/// Stores at `at` the checksum of what `sum` adds up, computed with the field itself zeroed.
fn set_checksum(frame: &mut [u8], at: usize, sum: impl FnOnce(&[u8]) -> u64) {
    frame[at..at + 2].fill(0);
    let check = !fold(sum(frame));
    frame[at..at + 2].copy_from_slice(&check.to_be_bytes());
}

/// Offset of the network header after up to two VLAN tags, and the number of tags.
fn network_offset(frame: &[u8]) -> Option<(usize, usize)> {
    let mut at = 12;
    let mut tags = 0;
    while frame.len() >= at + 2 && matches!(be16(frame, at), ETH_P_8021Q | ETH_P_8021AD) {
        at += 4;
        tags += 1;
        if tags == 2 {
            break;
        }
    }
    (frame.len() >= at + 2).then_some((at + 2, tags))
}

/// True if etherparse finds every checksum of `frame` right: `lb_tests::checksum::assert_valid`
/// without the panic. etherparse cannot represent a few fields (the reserved IPv4 flag bit, TCP's
/// reserved bits) and trusts the UDP length field, so on some mutants it disagrees with this
/// test's own arithmetic; those are left to the residual checks.
fn etherparse_checksums_ok(frame: &[u8]) -> bool {
    let Ok(packet) = SlicedPacket::from_ethernet(frame) else { return false };
    let Some(NetSlice::Ipv4(ipv4)) = &packet.net else { return false };
    let header = ipv4.header().to_header();
    if header.header_checksum != header.calc_header_checksum() {
        return false;
    }
    match &packet.transport {
        Some(TransportSlice::Tcp(tcp)) => {
            tcp.to_header().calc_checksum_ipv4(&header, tcp.payload()).ok() == Some(tcp.checksum())
        }
        Some(TransportSlice::Udp(udp)) => {
            udp.checksum() == 0
                || udp.to_header().calc_checksum_ipv4(&header, udp.payload()).ok()
                    == Some(udp.checksum())
        }
        _ => false,
    }
}

#[derive(Clone, Copy)]
enum Outcome {
    Passed,
    Translated,
    Bounced,
    /// A TCP reset to a destination that would be refused: dropped, as RFC 793 wants, and
    /// counted under its refusal reason.
    ResetDropped,
    Dropped,
}

/// What this run has seen the programs do, to judge later packets of the same flows.
#[derive(Default)]
struct Model {
    /// Client-to-frontend tuple -> what its translations were. Backends come from the flow hash
    /// or affinity, both functions of the tuple, so a tuple keeps its backend even when its
    /// conntrack entry is evicted or closed and recreated (and then may get another SNAT port).
    dnat: HashMap<Tuple, Forward>,
    /// (client address, frontend id) -> backend, for ClientIP affinity.
    affinity: HashMap<(Ipv4Addr, u32), Endpoint>,
    /// A reply's tuple (backend -> client or SNAT address) -> every (frontend, client) a
    /// forward translation gave it. A reused SNAT port or a second frontend with the same
    /// backend may add more than one.
    replies: HashMap<Tuple, Vec<(Endpoint, Endpoint)>>,
    /// Recent (client tuple, translated tuple) pairs, for the generator to continue or answer.
    flows: Vec<(Tuple, Tuple)>,
    /// A translated first fragment's datagram, and whether `lb_tc_reply` (the node's egress)
    /// translated it -> the (source, destination) it was given: what its later fragments on
    /// the same side may be given. Only the latest first fragment of a key counts: one that
    /// is not translated removes the record, as in the programs' map.
    fragments: HashMap<(FragmentKey, bool), (Ipv4Addr, Ipv4Addr)>,
    /// Recent keys of `fragments`, for the generator's later fragments, and how many were
    /// recorded (the next slot to replace once full).
    fragment_keys: Vec<FragmentKey>,
    fragments_recorded: usize,
}

impl Model {
    fn record_first_fragment(&mut self, key: (FragmentKey, bool), translated: Tuple) {
        let addresses = (translated.src.ip, translated.dst.ip);
        if self.fragments.insert(key, addresses).is_none() {
            let key = key.0;
            if self.fragment_keys.len() < RECENT_FLOWS {
                self.fragment_keys.push(key);
            } else {
                self.fragment_keys[self.fragments_recorded % RECENT_FLOWS] = key;
            }
            self.fragments_recorded += 1;
        }
    }
}

const RECENT_FLOWS: usize = 4096;

/// A client-to-frontend tuple's translation.
#[derive(Debug)]
struct Forward {
    backend: Endpoint,
    masqueraded: bool,
    /// Given a new source port once, because another flow held its reply tuple.
    clashed: bool,
    /// Every source it was given: the client itself, or the SNAT addresses it had.
    sources: Vec<Endpoint>,
}

struct Oracle<'t> {
    hook: Hook,
    tables: &'t Tables,
    model: Model,
    /// Replaced slot in `model.flows` once it is full; advanced by the flow count.
    next_slot: usize,
}

impl<'t> Oracle<'t> {
    fn new(hook: Hook, tables: &'t Tables) -> Self {
        Self { hook, tables, model: Model::default(), next_slot: 0 }
    }

    /// Judges one run (see [`Self::verdict`]) and keeps the model of fragment records.
    fn judge(&mut self, code: u32, input: &[u8], output: &[u8]) -> Result<Outcome, String> {
        let outcome = self.verdict(code, input, output)?;
        if !matches!(outcome, Outcome::Translated)
            && let Some(key) = parse_first_fragment(input)
        {
            // A first fragment not translated, its L4 header complete or not (RFC 1858's tiny
            // fragment): its datagram's later fragments must not take an earlier datagram's
            // record.
            self.model.fragments.remove(&(key, self.hook == Hook::TcReply));
        }
        Ok(outcome)
    }

    /// Pass: untouched. Drop: fine, told apart only when the input was a reset that would
    /// have been refused (the batch counters account for both). Refusal: the exact RST
    /// or ICMP error RFC 793/792 prescribe, for a destination the tables refuse. Translation:
    /// see [`Self::check_translation`].
    fn verdict(&mut self, code: u32, input: &[u8], output: &[u8]) -> Result<Outcome, String> {
        let hook = self.hook;
        if code == hook.drop_code() {
            return Ok(self.classify_drop(input));
        }
        if code == hook.bounce_code() {
            self.check_refusal(input, output)?;
            return Ok(Outcome::Bounced);
        }
        // XDP passes translated packets to the stack with the same code as untouched ones.
        if code == hook.pass_code() && output == input {
            return Ok(Outcome::Passed);
        }
        if code == hook.forward_code() {
            if output == input {
                return Err("forward verdict on an untranslated packet".into());
            }
            self.check_translation(input, output)?;
            return Ok(Outcome::Translated);
        }
        if code == hook.pass_code() {
            return Err("passed, but the packet was changed".into());
        }
        Err(format!("unexpected return code {code}"))
    }

    /// Translated: a TCP or UDP packet (see [`Self::check_nat`]) or an ICMP error about one (see
    /// [`Self::check_icmp_error`]), of the same length; nothing else may be rewritten.
    fn check_translation(&mut self, input: &[u8], output: &[u8]) -> Result<(), String> {
        if output.len() != input.len() {
            return Err(format!("length changed from {} to {}", input.len(), output.len()));
        }
        if let Some(before) = parse_translatable(input) {
            return self.check_nat(&before, input, output);
        }
        if let Some(error) = parse_icmp_error(input) {
            return self.check_icmp_error(&error, input, output);
        }
        if let Some((ip, key)) = parse_later_fragment(input) {
            return self.check_later_fragment(&ip, key, input, output);
        }
        Err("translated a packet that is neither well-formed TCP or UDP over IPv4 (or a fragment \
             of it) nor an ICMP error quoting TCP or UDP"
            .into())
    }

    /// A later fragment may only get the addresses its datagram's first fragment was given
    /// (and a checksum as right or wrong as before); nothing else in it may change.
    fn check_later_fragment(
        &self,
        ip: &Datagram,
        key: FragmentKey,
        input: &[u8],
        output: &[u8],
    ) -> Result<(), String> {
        unchanged_outside(&[(0, ip.l3 + 10), (ip.l3 + 20, input.len())], input, output)?;
        let header = ip.l3..ip.l3 + ip.header_len;
        let residual = |frame: &[u8]| fold(ones_sum(&frame[header.clone()]));
        if !same_in_ones_complement(residual(input), residual(output)) {
            return Err("IPv4 header checksum not updated for the new addresses".into());
        }
        let given = (ip_at(output, ip.l3 + 12), ip_at(output, ip.l3 + 16));
        match self.model.fragments.get(&(key, self.hook == Hook::TcReply)) {
            Some(&first) if first == given => Ok(()),
            Some(first) => Err(format!(
                "later fragment of {key:?} given {given:?}, its first fragment {first:?}"
            )),
            None => Err(format!("translated a later fragment of {key:?}, whose first was not")),
        }
    }

    /// Only addresses, ports and checksums changed, the checksums are as right (or as wrong) as
    /// before, and the change is either a DNAT to a backend of the frontend addressed, or the
    /// reverse NAT of a flow this run created.
    fn check_nat(&mut self, before: &Parsed, input: &[u8], output: &[u8]) -> Result<(), String> {
        only_nat_fields_changed(before, input, output)?;
        let after = parse_translatable(output).ok_or("the translation does not parse")?;
        checksums_preserved(before, input, output)?;
        let (from, to) = (before.tuple, after.tuple);
        // The replies' program only ever reverse-translates.
        let dnat = self.hook != Hook::TcReply && self.check_dnat(from, to)?;
        if !dnat && !self.is_known_reply(from, to) {
            return Err(format!(
                "mistranslated: {from} became {to}, neither a DNAT to a backend of the frontend \
                 addressed nor the reverse NAT of a flow this run created"
            ));
        }
        if let Some(key) = before.first_fragment {
            self.model.record_first_fragment((key, self.hook == Hook::TcReply), to);
        }
        Ok(())
    }

    /// An ICMP error quotes the datagram as it was on the wire, after translation, so a legal
    /// translation makes the quote read as the flow's other end sent it and sends the error
    /// there: only addresses, ports and checksums changed, every checksum as right (or wrong)
    /// as before, and the addresses those of one of [`Self::icmp_translations`].
    fn check_icmp_error(
        &self,
        error: &IcmpError,
        input: &[u8],
        output: &[u8],
    ) -> Result<(), String> {
        icmp_nat_fields_only(error, input, output)?;
        icmp_checksums_preserved(error, input, output)?;
        let actual = IcmpAddresses::read(error, output);
        let legal = self.icmp_translations(error);
        if legal.contains(&actual) {
            return Ok(());
        }
        let legal: Vec<String> = legal.iter().map(ToString::to_string).collect();
        Err(format!(
            "mistranslated ICMP error about {}: became {actual}; legal: [{}]",
            error.quoted,
            legal.join(", ")
        ))
    }

    /// What an error about a flow this run created may become. About a packet sent to a
    /// backend (the backend or a router answered): the quote reads client -> frontend, the
    /// error goes to the client, and if the backend itself sent it, it comes from the frontend
    /// address. About a reply sent from the frontend (the client side answered): the quote
    /// reads backend -> client (or SNAT address), and the error goes to the backend, from the
    /// SNAT address when the flow is masqueraded.
    fn icmp_translations(&self, error: &IcmpError) -> Vec<IcmpAddresses> {
        let quoted = error.quoted;
        let (outer_src, outer_dst) = (error.outer.src, error.outer.dst);
        let key = Tuple { src: quoted.dst, dst: quoted.src, proto: quoted.proto };
        let mut legal = Vec::new();
        for &(frontend, client) in self.model.replies.get(&key).into_iter().flatten() {
            // Masqueraded to the client's own port (see below): both readings.
            let masqueraded = client != quoted.src;
            let ambiguous = !masqueraded && is_snat_address(client);
            for masqueraded in [masqueraded, masqueraded || ambiguous] {
                legal.push(IcmpAddresses {
                    outer_src: if outer_src == quoted.dst.ip { frontend.ip } else { outer_src },
                    outer_dst: if masqueraded { client.ip } else { outer_dst },
                    quoted: Tuple { src: client, dst: frontend, proto: quoted.proto },
                });
            }
        }
        if let Some(forward) = self.model.dnat.get(&key) {
            for &source in &forward.sources {
                // A client at the node's address, on a port of the SNAT range, may have been
                // masqueraded to that very port: the translation the oracle saw cannot tell,
                // so both readings are legal.
                let masqueraded = source != key.src;
                let ambiguous = !masqueraded && is_snat_address(source);
                for masqueraded in [masqueraded, masqueraded || ambiguous] {
                    legal.push(IcmpAddresses {
                        outer_src: if masqueraded { source.ip } else { outer_src },
                        outer_dst: forward.backend.ip,
                        quoted: Tuple {
                            src: forward.backend,
                            dst: if masqueraded { source } else { quoted.dst },
                            proto: quoted.proto,
                        },
                    });
                }
            }
        }
        legal
    }

    /// `Ok(false)` if the change is not a DNAT to a backend of the addressed frontend; an error
    /// if it is one, but with an illegal source or inconsistent with what the flow did before.
    fn check_dnat(&mut self, from: Tuple, to: Tuple) -> Result<bool, String> {
        let internal = internal_source(self.hook, from.src.ip);
        let Some(frontend) = self.tables.frontend_for(from.dst, from.proto, internal) else {
            return Ok(false);
        };
        if !frontend.backends.contains(&to.dst) {
            return Ok(false);
        }
        let masqueraded = is_snat_address(to.src);
        // A new source port alone, in the SNAT range: legal only where a flow of another
        // frontend holds the reply tuple the client's own port would give.
        let new_port = to.src.ip == from.src.ip
            && to.src.port != from.src.port
            && (SNAT_PORT_MIN..=SNAT_PORT_MAX).contains(&to.src.port)
            && self.reply_tuple_held_elsewhere(from, to.dst, frontend.vip);
        if to.src != from.src && !masqueraded && !new_port {
            return Err(format!("DNAT {from} -> {to}: source neither kept nor masqueraded"));
        }
        if !frontend.admits(from.src.ip) {
            return Err(format!("{from} translated, but outside loadBalancerSourceRanges"));
        }
        let now = (to.dst, to.src != from.src);
        // A client at the SNAT address may have been masqueraded to its own port, which reads
        // as not masqueraded; the same flow made again while that port's entry still lives
        // is masqueraded to another. Only there may the two differ.
        // Nor where a clash gave the flow a new port, now or before: whether a reply tuple is
        // held by another flow changes.
        if let Some(earlier) = self.model.dnat.get(&from)
            && (earlier.backend != now.0
                || (earlier.masqueraded != now.1
                    && !is_snat_address(from.src)
                    && !new_port
                    && !earlier.clashed))
        {
            return Err(format!("{from}: now (backend, SNAT) {now:?}, earlier {earlier:?}"));
        }
        if frontend.flags & service_flags::AFFINITY != 0 {
            let sticky = *self.model.affinity.entry((from.src.ip, frontend.id)).or_insert(to.dst);
            if sticky != to.dst {
                return Err(format!(
                    "{from}: backend {} but the client sticks to {sticky}",
                    to.dst
                ));
            }
        }
        self.record(from, to, frontend.vip);
        if new_port && let Some(forward) = self.model.dnat.get_mut(&from) {
            forward.clashed = true;
        }
        Ok(true)
    }

    /// Whether another flow holds the reply tuple (`backend` -> `from`'s client) that a flow
    /// from `from` to `backend` keeping its source would have: as its own reply tuple, through
    /// a frontend other than `frontend` or for another client (one given that port by an
    /// earlier clash), or as its client tuple (the backend a client of a frontend at that
    /// address and port: a NodePort on the node's address, say).
    fn reply_tuple_held_elsewhere(
        &self,
        from: Tuple,
        backend: Endpoint,
        frontend: Endpoint,
    ) -> bool {
        let reply = Tuple { src: backend, dst: from.src, proto: from.proto };
        self.model.dnat.contains_key(&reply)
            || self
                .model
                .replies
                .get(&reply)
                .is_some_and(|pairs| pairs.iter().any(|pair| *pair != (frontend, from.src)))
    }

    fn record(&mut self, from: Tuple, to: Tuple, frontend: Endpoint) {
        let forward = self.model.dnat.entry(from).or_insert_with(|| Forward {
            backend: to.dst,
            masqueraded: false,
            clashed: false,
            sources: Vec::new(),
        });
        // Whether a tuple needs SNAT never changes: once seen masqueraded, it is.
        forward.masqueraded |= to.src != from.src;
        if !forward.sources.contains(&to.src) {
            forward.sources.push(to.src);
            if self.model.flows.len() < RECENT_FLOWS {
                self.model.flows.push((from, to));
            } else {
                self.model.flows[self.next_slot % RECENT_FLOWS] = (from, to);
                self.next_slot += 1;
            }
        }
        let reply = Tuple { src: to.dst, dst: to.src, proto: from.proto };
        let pairs = self.model.replies.entry(reply).or_default();
        if !pairs.contains(&(frontend, from.src)) {
            pairs.push((frontend, from.src));
        }
    }

    /// A reply of a recorded flow: from the frontend the client spoke to, to that client.
    fn is_known_reply(&self, from: Tuple, to: Tuple) -> bool {
        self.model.replies.get(&from).is_some_and(|pairs| {
            pairs.iter().any(|&(frontend, client)| to.src == frontend && to.dst == client)
        })
    }

    fn classify_drop(&self, input: &[u8]) -> Outcome {
        let refused_reset = parse_translatable(input).is_some_and(|p| {
            p.flags & TCP_RST != 0
                && self.tables.refuses(p.tuple, internal_source(self.hook, p.tuple.src.ip))
        });
        if refused_reset { Outcome::ResetDropped } else { Outcome::Dropped }
    }

    fn check_refusal(&self, input: &[u8], output: &[u8]) -> Result<(), String> {
        if self.hook == Hook::TcReply {
            return Err("the replies' program refused a packet".into());
        }
        let p = parse_translatable(input).ok_or("refused a packet that is not TCP or UDP")?;
        if p.flags & TCP_RST != 0 {
            return Err("answered a reset with a refusal (RFC 793: never)".into());
        }
        if !self.tables.refuses(p.tuple, internal_source(self.hook, p.tuple.src.ip)) {
            return Err(format!("refused {}, which the tables do not refuse", p.tuple));
        }
        let expected = expected_refusal(input, &p);
        if output != expected {
            return Err(format!("refusal differs from the expected {}", hex(&expected)));
        }
        checksum::assert_valid(output);
        Ok(())
    }
}

fn only_nat_fields_changed(p: &Parsed, input: &[u8], output: &[u8]) -> Result<(), String> {
    let l4_check = p.l4_checksum_at();
    // The spans between the IPv4 checksum and addresses, the ports, and the L4 checksum.
    let kept =
        [(0, p.l3 + 10), (p.l3 + 20, p.l4), (p.l4 + 4, l4_check), (l4_check + 2, input.len())];
    unchanged_outside(&kept, input, output)
}

/// Compares the `kept` spans as slices (fast even in a debug build), naming the first change.
fn unchanged_outside(kept: &[(usize, usize)], input: &[u8], output: &[u8]) -> Result<(), String> {
    for &(start, end) in kept {
        if input[start..end] != output[start..end] {
            let at = (start..end).find(|&i| input[i] != output[i]).unwrap_or(start);
            return Err(format!("byte {at} changed, outside addresses, ports and checksums"));
        }
    }
    Ok(())
}

fn checksums_preserved(p: &Parsed, input: &[u8], output: &[u8]) -> Result<(), String> {
    if !same_in_ones_complement(ip_residual(input, p), ip_residual(output, p)) {
        return Err("IPv4 header checksum not updated for the new addresses".into());
    }
    let at = p.l4_checksum_at();
    let udp = p.tuple.proto == proto::UDP;
    if udp && be16(input, at) == 0 {
        if be16(output, at) != 0 {
            return Err("UDP \"no checksum\" (0) replaced by a checksum".into());
        }
    } else if udp && be16(output, at) == 0 {
        return Err("UDP checksum became 0, which means \"none\" (RFC 768: send 0xffff)".into());
    } else if !same_in_ones_complement(l4_residual(input, p), l4_residual(output, p)) {
        return Err("L4 checksum not updated for the new addresses and ports".into());
    }
    // The same, recomputed from scratch by etherparse (lb_tests::checksum).
    if SlicedPacket::from_ethernet(input).is_ok() && SlicedPacket::from_ethernet(output).is_err() {
        return Err("etherparse reads the input but not the translation".into());
    }
    if etherparse_checksums_ok(input) {
        checksum::assert_valid(output);
    }
    Ok(())
}

/// The addresses an ICMP error translation may change.
#[derive(Debug, PartialEq, Eq)]
struct IcmpAddresses {
    outer_src: Ipv4Addr,
    outer_dst: Ipv4Addr,
    quoted: Tuple,
}

impl IcmpAddresses {
    fn read(error: &IcmpError, frame: &[u8]) -> Self {
        let (l3, q3, q4) = (error.outer.l3, error.quote_l3, error.quote_l4);
        Self {
            outer_src: ip_at(frame, l3 + 12),
            outer_dst: ip_at(frame, l3 + 16),
            quoted: Tuple {
                src: Endpoint { ip: ip_at(frame, q3 + 12), port: be16(frame, q4) },
                dst: Endpoint { ip: ip_at(frame, q3 + 16), port: be16(frame, q4 + 2) },
                proto: error.quoted.proto,
            },
        }
    }
}

impl fmt::Display for IcmpAddresses {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} -> {} quoting {}", self.outer_src, self.outer_dst, self.quoted)
    }
}

fn icmp_nat_fields_only(error: &IcmpError, input: &[u8], output: &[u8]) -> Result<(), String> {
    let (l3, icmp, q3, q4) = (error.outer.l3, error.outer.l4(), error.quote_l3, error.quote_l4);
    // Around the outer checksum and addresses, the ICMP checksum, the quoted checksum and
    // addresses, and the quoted ports.
    let kept = [
        (0, l3 + 10),
        (l3 + 20, icmp + 2),
        (icmp + 4, q3 + 10),
        (q3 + 20, q4),
        (q4 + 4, input.len()),
    ];
    unchanged_outside(&kept, input, output)
}

fn icmp_checksums_preserved(error: &IcmpError, input: &[u8], output: &[u8]) -> Result<(), String> {
    let residual = |frame: &[u8], start: usize, end: usize| fold(ones_sum(&frame[start..end]));
    let (outer, icmp) = (&error.outer, error.outer.l4());
    let spans = [
        ("outer IPv4 header", outer.l3, icmp),
        ("quoted IPv4 header", error.quote_l3, error.quote_l4),
        ("ICMP", icmp, outer.end()),
    ];
    for (what, start, end) in spans {
        if !same_in_ones_complement(residual(input, start, end), residual(output, start, end)) {
            return Err(format!("{what} checksum not updated for the new addresses"));
        }
    }
    if etherparse_icmp_ok(input) {
        checksum::assert_icmp_valid(output);
    }
    Ok(())
}

/// `lb_tests::checksum::assert_icmp_valid` without the panic.
fn etherparse_icmp_ok(frame: &[u8]) -> bool {
    let Ok(packet) = SlicedPacket::from_ethernet(frame) else { return false };
    let Some(NetSlice::Ipv4(ipv4)) = &packet.net else { return false };
    let header = ipv4.header().to_header();
    let Some(TransportSlice::Icmpv4(icmp)) = &packet.transport else { return false };
    header.header_checksum == header.calc_header_checksum()
        && icmp.checksum() == icmp.icmp_type().calc_checksum(icmp.payload())
}

/// The refusal RFC 793 (reset generation) or RFC 792 (port unreachable, quoting the IPv4
/// header and 8 bytes) prescribe, from the address the client spoke to, back out of the
/// interface it came in on (Ethernet addresses swapped, VLAN tag kept), DF set, TTL 64.
fn expected_refusal(input: &[u8], p: &Parsed) -> Vec<u8> {
    let (body, protocol) = if p.tuple.proto == proto::TCP {
        (tcp_reset(input, p), proto::TCP)
    } else {
        let quote = &input[p.l3..p.l4 + 8];
        let mut icmp = vec![3, 3, 0, 0, 0, 0, 0, 0];
        icmp.extend_from_slice(quote);
        set_checksum(&mut icmp, 2, ones_sum);
        (icmp, proto::ICMP)
    };
    let total_len = u16::try_from(20 + body.len()).expect("short");
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&total_len.to_be_bytes());
    ip.extend_from_slice(&[0, 0, 0x40, 0, 64, protocol, 0, 0]);
    ip.extend_from_slice(&p.tuple.dst.ip.octets());
    ip.extend_from_slice(&p.tuple.src.ip.octets());
    set_checksum(&mut ip, 10, ones_sum);
    let mut frame = Vec::new();
    frame.extend_from_slice(&input[6..12]);
    frame.extend_from_slice(&input[0..6]);
    frame.extend_from_slice(&input[12..p.l3]);
    frame.extend(ip);
    frame.extend(body);
    frame
}

fn tcp_reset(input: &[u8], p: &Parsed) -> Vec<u8> {
    let (seq_in, ack_in) = (be32(input, p.l4 + 4), be32(input, p.l4 + 8));
    let (seq, ack, flags) = if p.flags & TCP_ACK != 0 {
        (ack_in, 0, TCP_RST)
    } else {
        let payload = p.total_len - p.header_len - p.l4_header_len;
        let syn_fin = u32::from(p.flags & TCP_SYN != 0) + u32::from(p.flags & TCP_FIN != 0);
        let length = u32::try_from(payload).expect("short") + syn_fin;
        (0, seq_in.wrapping_add(length), TCP_RST | TCP_ACK)
    };
    let mut tcp = Vec::with_capacity(20);
    tcp.extend_from_slice(&p.tuple.dst.port.to_be_bytes());
    tcp.extend_from_slice(&p.tuple.src.port.to_be_bytes());
    tcp.extend_from_slice(&seq.to_be_bytes());
    tcp.extend_from_slice(&ack.to_be_bytes());
    tcp.extend_from_slice(&[0x50, flags, 0, 0, 0, 0, 0, 0]);
    let pseudo = pseudo_header_sum(p.tuple.dst.ip, p.tuple.src.ip, proto::TCP, 20);
    set_checksum(&mut tcp, 16, |t| pseudo + ones_sum(t));
    tcp
}

/// The L4 part of a packet to build.
#[derive(Clone)]
enum L4 {
    Tcp { flags: u8, options: Vec<u8> },
    Udp { checksum_off: bool },
    Icmp { kind: u8, code: u8 },
    Other(u8),
}

/// A packet described by its fields; [`Draft::build`] makes it with every checksum right.
#[derive(Clone)]
struct Draft {
    src: Endpoint,
    dst: Endpoint,
    l4: L4,
    payload: Vec<u8>,
    /// VLAN tags (TPID and TCI), outermost first.
    tags: Vec<(u16, u16)>,
    ip_options: Vec<u8>,
    /// IPv4 flags and fragment offset.
    frags: u16,
    /// IPv4 identification.
    id: u16,
    /// Bytes after the datagram, as Ethernet padding.
    padding: Vec<u8>,
    seq: u32,
    ack: u32,
}

impl Draft {
    fn build(&self) -> Vec<u8> {
        let mut frame = Vec::with_capacity(128 + self.payload.len());
        frame.extend_from_slice(&NODE_MAC);
        frame.extend_from_slice(&CLIENT_MAC);
        for &(tpid, tci) in &self.tags {
            frame.extend_from_slice(&tpid.to_be_bytes());
            frame.extend_from_slice(&tci.to_be_bytes());
        }
        frame.extend_from_slice(&ETH_P_IPV4.to_be_bytes());
        let l4 = self.l4_bytes();
        let header_len = 20 + self.ip_options.len();
        let total_len = u16::try_from(header_len + l4.len() + self.payload.len()).expect("fits");
        let ihl = u8::try_from(header_len / 4).expect("IHL");
        frame.extend_from_slice(&[0x40 | ihl, 0]);
        frame.extend_from_slice(&total_len.to_be_bytes());
        frame.extend_from_slice(&self.id.to_be_bytes());
        frame.extend_from_slice(&self.frags.to_be_bytes());
        frame.extend_from_slice(&[64, self.protocol(), 0, 0]);
        frame.extend_from_slice(&self.src.ip.octets());
        frame.extend_from_slice(&self.dst.ip.octets());
        frame.extend_from_slice(&self.ip_options);
        frame.extend(l4);
        frame.extend_from_slice(&self.payload);
        refresh_checksums(&mut frame);
        frame.extend_from_slice(&self.padding);
        frame
    }

    fn protocol(&self) -> u8 {
        match self.l4 {
            L4::Tcp { .. } => proto::TCP,
            L4::Udp { .. } => proto::UDP,
            L4::Icmp { .. } => proto::ICMP,
            L4::Other(number) => number,
        }
    }

    /// The L4 header; checksums are filled in by `refresh_checksums` (a UDP checksum left at
    /// zero stays "none" only when asked for).
    fn l4_bytes(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(60);
        match &self.l4 {
            L4::Tcp { flags, options } => {
                bytes.extend_from_slice(&self.src.port.to_be_bytes());
                bytes.extend_from_slice(&self.dst.port.to_be_bytes());
                bytes.extend_from_slice(&self.seq.to_be_bytes());
                bytes.extend_from_slice(&self.ack.to_be_bytes());
                let data_offset = u8::try_from(5 + options.len() / 4).expect("data offset");
                bytes.extend_from_slice(&[data_offset << 4, *flags, 0xfa, 0xf0, 0, 0, 0, 0]);
                bytes.extend_from_slice(options);
            }
            L4::Udp { checksum_off } => {
                let len = u16::try_from(8 + self.payload.len()).expect("UDP length");
                bytes.extend_from_slice(&self.src.port.to_be_bytes());
                bytes.extend_from_slice(&self.dst.port.to_be_bytes());
                bytes.extend_from_slice(&len.to_be_bytes());
                // Non-zero placeholder: refresh_checksums keeps a zero as "no checksum".
                bytes.extend_from_slice(if *checksum_off { &[0, 0] } else { &[0, 1] });
            }
            L4::Icmp { kind, code } => {
                bytes.extend_from_slice(&[*kind, *code, 0, 0]);
                bytes.extend_from_slice(&self.seq.to_be_bytes());
            }
            L4::Other(_) => {}
        }
        bytes
    }
}

const TCP_FLAG_SETS: [u8; 12] = [
    TCP_SYN,
    TCP_SYN | TCP_ACK,
    TCP_ACK,
    TCP_ACK | TCP_PSH,
    TCP_FIN | TCP_ACK,
    TCP_RST,
    TCP_RST | TCP_ACK,
    TCP_SYN | TCP_FIN,
    0,
    TCP_FIN,
    0xff,
    TCP_URG | TCP_PSH | TCP_FIN,
];

/// How packets are made, besides the mutations; each must be used (see `assert_coverage`).
const GENERATED_KINDS: [&str; 7] = [
    "new flow",
    "established flow",
    "reply",
    "ICMP error",
    "random frame",
    "first fragment",
    "later fragment",
];

struct Generator<'t> {
    rng: Rng,
    tables: &'t Tables,
}

impl<'t> Generator<'t> {
    fn new(seed: u64, tables: &'t Tables) -> Self {
        Self { rng: Rng(seed), tables }
    }

    /// The next input and how it was made.
    fn frame(&mut self, model: &Model) -> (Vec<u8>, Vec<&'static str>) {
        // Half new flows; continuing, answering and ICMP errors about flows seen; some noise.
        let roll = self.rng.below(100);
        let known = match roll {
            0..=19 => self.continuation(model).map(|draft| (draft, GENERATED_KINDS[1])),
            20..=34 => self.reply(model).map(|draft| (draft, GENERATED_KINDS[2])),
            35..=42 => self.icmp_error(model).map(|draft| (draft, GENERATED_KINDS[3])),
            43..=47 => return (self.random_frame(), vec![GENERATED_KINDS[4]]),
            48..=53 => Some((self.first_fragment(model), GENERATED_KINDS[5])),
            54..=59 => self.later_fragment(model).map(|draft| (draft, GENERATED_KINDS[6])),
            _ => None,
        };
        let (draft, kind) = known.unwrap_or_else(|| (self.new_flow(), GENERATED_KINDS[0]));
        let mut frame = draft.build();
        let mut how = vec![kind];
        if self.rng.percent(45) {
            for _ in 0..=self.rng.below(3) {
                how.push(mutate(&mut self.rng, &mut frame));
            }
            // Most mutants get right checksums, so they travel as far as their headers allow.
            if self.rng.percent(70) {
                refresh_checksums(&mut frame);
            }
        }
        (frame, how)
    }

    fn new_flow(&mut self) -> Draft {
        let (dst, protocol) = self.destination();
        let src = Endpoint { ip: self.source(), port: self.source_port() };
        self.draft(src, dst, protocol, TCP_SYN)
    }

    /// Another packet of a flow this run saw translated, client to service.
    fn continuation(&mut self, model: &Model) -> Option<Draft> {
        let &(client, _) = self.pick_flow(model)?;
        let flags = *self.rng.pick(&TCP_FLAG_SETS);
        Some(self.draft(client.src, client.dst, client.proto, flags))
    }

    /// The first fragment of a datagram of a new flow, of one this run saw, or of an answer;
    /// or of a datagram reusing the identification of one whose first fragment this run saw
    /// translated, to any port (so that it may not be), now and then too short for its L4
    /// header.
    fn first_fragment(&mut self, model: &Model) -> Draft {
        let known = match self.rng.below(4) {
            0 => self.continuation(model),
            1 => self.reply(model),
            2 if !model.fragment_keys.is_empty() => {
                let (src, dst, id, protocol) = *self.rng.pick(&model.fragment_keys);
                let port = self.rng.pick_or(&[80, 53, 30380], Rng::u16);
                let (src, dst) =
                    (Endpoint { ip: src, port: self.source_port() }, Endpoint { ip: dst, port });
                let draft = Draft { id, ..self.draft(src, dst, protocol, TCP_SYN) };
                // Now and then RFC 1858's tiny fragment: too short for its L4 header.
                Some(if self.rng.percent(25) {
                    let header_len = if protocol == proto::TCP { 20 } else { 8 };
                    let payload = vec![0x5a; self.rng.below(header_len)];
                    Draft { l4: L4::Other(protocol), payload, ..draft }
                } else {
                    draft
                })
            }
            _ => None,
        };
        let draft = known.unwrap_or_else(|| self.new_flow());
        Draft { frags: IPV4_MF, ..draft }
    }

    /// A later fragment: mostly of a datagram whose first fragment this run saw translated,
    /// else of a flow's datagram whose first fragment never came; now and then the last one.
    fn later_fragment(&mut self, model: &Model) -> Option<Draft> {
        let key = if !model.fragment_keys.is_empty() && self.rng.percent(80) {
            *self.rng.pick(&model.fragment_keys)
        } else {
            let &(client, _) = self.pick_flow(model)?;
            (client.src.ip, client.dst.ip, self.rng.u16() & 0x00ff, client.proto)
        };
        let (src, dst) = (Endpoint { ip: key.0, port: 0 }, Endpoint { ip: key.1, port: 0 });
        let draft = self.draft(src, dst, key.3, 0);
        let more = if self.rng.percent(50) { IPV4_MF } else { 0 };
        let offset = 1 + u16::try_from(self.rng.below(usize::from(IPV4_OFFSET))).expect("offset");
        Some(Draft { l4: L4::Other(key.3), frags: more | offset, id: key.2, ..draft })
    }

    /// A backend's answer to a flow this run saw translated; now and then to a neighbouring
    /// port, which is nobody's flow.
    fn reply(&mut self, model: &Model) -> Option<Draft> {
        let &(_, translated) = self.pick_flow(model)?;
        let mut to = translated.src;
        if self.rng.percent(5) {
            to.port = to.port.wrapping_add(1);
        }
        let flags = *self.rng.pick(&[TCP_SYN | TCP_ACK, TCP_ACK, TCP_ACK | TCP_PSH, TCP_RST]);
        Some(self.draft(translated.dst, to, translated.proto, flags))
    }

    /// An ICMP error about a flow this run saw translated: about the packet sent to the backend
    /// (from the backend or a router on the way), or about the reply sent to the client (from
    /// the client or a router); now and then about a neighbouring port, nobody's flow.
    fn icmp_error(&mut self, model: &Model) -> Option<Draft> {
        let &(client, translated) = self.pick_flow(model)?;
        let router = Ipv4Addr::new(10, 244, 2, 1);
        let (mut quoted, reporter, to) = if self.rng.percent(50) {
            let reporter = if self.rng.percent(50) { translated.dst.ip } else { router };
            (translated, reporter, translated.src.ip)
        } else {
            let reply = Tuple { src: client.dst, dst: client.src, proto: client.proto };
            let reporter = if self.rng.percent(50) { client.src.ip } else { router };
            (reply, reporter, client.dst.ip)
        };
        if self.rng.percent(5) {
            quoted.src.port = quoted.src.port.wrapping_add(1);
        }
        let quote = self.quote(quoted);
        let kind = *self.rng.pick(&[ICMP_DEST_UNREACHABLE, ICMP_TIME_EXCEEDED]);
        let code = self.rng.pick_or(&[3, 4, 1, 0], Rng::byte);
        let ends = (Endpoint { ip: reporter, port: 0 }, Endpoint { ip: to, port: 0 });
        let mut draft = self.draft(ends.0, ends.1, proto::ICMP, 0);
        draft.l4 = L4::Icmp { kind, code };
        draft.payload = quote;
        Some(draft)
    }

    /// The start of `tuple`'s datagram as an ICMP error quotes it: its IPv4 header (options now
    /// and then) and usually 8 bytes of L4; sometimes more, sometimes only the ports.
    fn quote(&mut self, tuple: Tuple) -> Vec<u8> {
        let draft = self.draft(tuple.src, tuple.dst, tuple.proto, TCP_ACK);
        let frame = Draft { tags: Vec::new(), padding: Vec::new(), ..draft.clone() }.build();
        let l4_bytes = *self.rng.pick(&[8, 8, 8, 4, 20]);
        let end = (ETH_LEN + 20 + draft.ip_options.len() + l4_bytes).min(frame.len());
        frame[ETH_LEN..end].to_vec()
    }

    fn pick_flow<'m>(&mut self, model: &'m Model) -> Option<&'m (Tuple, Tuple)> {
        (!model.flows.is_empty()).then(|| self.rng.pick(&model.flows))
    }

    fn draft(&mut self, src: Endpoint, dst: Endpoint, protocol: u8, flags: u8) -> Draft {
        let rng = &mut self.rng;
        let l4 = match protocol {
            proto::TCP => {
                let flags = if rng.percent(50) { flags } else { *rng.pick(&TCP_FLAG_SETS) };
                let options = if rng.percent(10) { options(rng) } else { Vec::new() };
                L4::Tcp { flags: if rng.percent(5) { rng.byte() } else { flags }, options }
            }
            proto::UDP => L4::Udp { checksum_off: rng.percent(10) },
            proto::ICMP => {
                let kind = rng.pick_or(&[8, 0, 3, 11, 5], Rng::byte);
                L4::Icmp { kind, code: if rng.percent(80) { 0 } else { rng.byte() } }
            }
            other => L4::Other(other),
        };
        let payload_len = if rng.percent(5) { rng.below(1400) } else { rng.below(64) };
        let tags = match rng.below(100) {
            0..=7 => vec![(ETH_P_8021Q, rng.u16() & 0x0fff)],
            8..=9 => vec![(ETH_P_8021AD, rng.u16() & 0x0fff)],
            _ => Vec::new(),
        };
        Draft {
            src,
            dst,
            l4,
            payload: rng.bytes(payload_len),
            tags,
            ip_options: if rng.percent(10) { options(rng) } else { Vec::new() },
            frags: if rng.percent(85) { 0x4000 } else { 0 },
            // Few values, so that the generator's fragments sometimes share a datagram's key.
            id: rng.u16() & 0x00ff,
            padding: if rng.percent(5) { rng.some_bytes(30) } else { Vec::new() },
            seq: rng.u32(),
            ack: rng.u32(),
        }
    }

    /// Where new flows go: the seeded frontends most of the time, then every kind of address
    /// near them.
    fn destination(&mut self) -> (Endpoint, u8) {
        let roll = self.rng.below(100);
        let protocol = self.protocol();
        let rng = &mut self.rng;
        match roll {
            0..=44 => {
                let frontend = rng.pick(&self.tables.frontends);
                let protocol = if rng.percent(85) { frontend.proto } else { protocol };
                (frontend.vip, protocol)
            }
            45..=54 => {
                let ip = *rng.pick(&self.tables.cluster_ips);
                let port = rng.pick_or(&[80, 53, 443, 8080], Rng::u16);
                (Endpoint { ip, port }, protocol)
            }
            55..=64 => {
                let port =
                    rng.pick_or(&[30380, 30381, 30400, 30999, 22], |rng| rng.port_in(30000, 32767));
                (Endpoint { ip: node_ip(), port }, protocol)
            }
            65..=69 => (endpoint(LB_IP, rng.pick_or(&[80, 443], Rng::u16)), protocol),
            70..=79 => {
                // Somewhere in the service CIDR 10.96.0.0/12, almost never allocated.
                let ip = Ipv4Addr::from(0x0a60_0000 | (rng.u32() & 0x000f_ffff));
                (Endpoint { ip, port: rng.pick_or(&[80, 53], Rng::u16) }, protocol)
            }
            80..=89 => {
                let backend = *rng.pick(&self.tables.frontends[0].backends);
                (*rng.pick(&[backend, endpoint(fixtures::EXTERNAL_CLIENT, 80)]), protocol)
            }
            _ => (Endpoint { ip: Ipv4Addr::from(rng.u32()), port: rng.u16() }, protocol),
        }
    }

    fn protocol(&mut self) -> u8 {
        match self.rng.below(100) {
            0..=44 => proto::TCP,
            45..=79 => proto::UDP,
            80..=94 => proto::ICMP,
            _ => self.rng.byte(),
        }
    }

    /// Pods (backends among them, for hairpin), external clients on both sides of frontend 11's
    /// source range, the node, and anything at all.
    fn source(&mut self) -> Ipv4Addr {
        let rng = &mut self.rng;
        match rng.below(100) {
            0..=34 => Ipv4Addr::new(10, 244, 1 + rng.byte() % 2, 2 + rng.byte() % 40),
            35..=64 => Ipv4Addr::new(203, 0, 113, rng.byte()),
            65..=74 => {
                let frontend = rng.pick(&self.tables.frontends);
                frontend.backends.first().map_or(node_ip(), |b| b.ip)
            }
            75..=79 => node_ip(),
            80..=89 => Ipv4Addr::new(10, 244, rng.byte(), rng.byte()),
            _ => Ipv4Addr::from(rng.u32()),
        }
    }

    fn source_port(&mut self) -> u16 {
        match self.rng.below(100) {
            0 => 0,
            1..=4 => *self.rng.pick(&[53, 80, 443, 30380, 61000, 65535]),
            _ => self.rng.port_in(1024, 65535),
        }
    }

    /// Random bytes of random length from 14 bytes up; half of them claim to be IPv4.
    fn random_frame(&mut self) -> Vec<u8> {
        let len = ETH_LEN + self.rng.below(200);
        let mut frame = self.rng.bytes(len);
        if self.rng.percent(50) && len > ETH_LEN {
            frame[12..14].copy_from_slice(&ETH_P_IPV4.to_be_bytes());
            frame[ETH_LEN] = 0x45;
            if self.rng.percent(50) {
                refresh_checksums(&mut frame);
            }
        }
        frame
    }
}

/// IPv4 or TCP options: 4 to 40 bytes, either NOP padding ended by End-of-options, or noise
/// (neither program reads options, both must skip them).
fn options(rng: &mut Rng) -> Vec<u8> {
    let len = 4 * (1 + rng.below(10));
    if rng.percent(50) {
        let mut bytes = vec![1u8; len];
        bytes[len - 1] = 0;
        bytes
    } else {
        rng.bytes(len)
    }
}

/// Every mutation, by name; `mutate` applies one at random.
const MUTATION_NAMES: [&str; 17] = [
    "truncate",
    "IHL",
    "IP version",
    "total length too small",
    "total length too large",
    "fragment flags and offset",
    "IP protocol",
    "TCP data offset",
    "TCP flags",
    "UDP length",
    "ports",
    "stacked VLAN tags",
    "add a VLAN tag",
    "EtherType",
    "random bytes",
    "IP option bytes",
    "padding",
];

/// Damages `frame` one way and names the way. Offsets are found leniently, as far as the
/// frame goes; a mutation with nothing to damage flips a random byte instead.
fn mutate(rng: &mut Rng, frame: &mut Vec<u8>) -> &'static str {
    let index = rng.below(MUTATION_NAMES.len());
    let name = MUTATION_NAMES[index];
    let l3 = network_offset(frame).map_or(ETH_LEN, |(l3, _)| l3);
    let header_len = frame.get(l3).map_or(20, |b| usize::from(b & 0x0f) * 4).max(20);
    let l4 = l3 + header_len;
    let applied = match index {
        0 => truncate(rng, frame),
        1 => set_nibble(frame, l3, false, rng.byte()),
        2 => set_nibble(frame, l3, true, rng.byte()),
        3 => {
            let len = total_length_below(rng, frame, l3, header_len);
            set_u16(frame, l3 + 2, len)
        }
        4 => {
            let len = total_length_above(rng, frame, l3);
            set_u16(frame, l3 + 2, len)
        }
        5 => {
            set_u16(frame, l3 + 6, rng.pick_or(&[0x2000, 0x6000, 0x00b9, 0x2001, 0x8000], Rng::u16))
        }
        6 => set_byte(frame, l3 + 9, rng.pick_or(&[0, 1, 2, 6, 17, 47, 50, 132, 255], Rng::byte)),
        7 => set_nibble(frame, l4 + 12, true, rng.byte()),
        8 => set_byte(frame, l4 + 13, *rng.pick(&TCP_FLAG_SETS)),
        9 => set_u16(frame, l4 + 4, rng.pick_or(&[0, 1, 7, 8, 9, 0xffff], Rng::u16)),
        10 => {
            let at = l4 + 2 * rng.below(2);
            set_u16(frame, at, rng.pick_or(&[0, 1, 80, 65535], Rng::u16))
        }
        11 => {
            let count = 1 + rng.below(2);
            stack_tags(rng, frame, count)
        }
        12 => stack_tags(rng, frame, 1),
        13 => {
            set_u16(frame, l3 - 2, rng.pick_or(&[0x0800, 0x86dd, 0x0806, 0x8100, 0x88a8], Rng::u16))
        }
        15 if header_len > 20 => {
            let at = l3 + 20 + rng.below(header_len - 20);
            set_byte(frame, at, rng.byte())
        }
        16 => {
            let extra = rng.some_bytes(40);
            frame.extend(extra);
            true
        }
        // 14, "random bytes", and a mutation with nothing to damage.
        _ => false,
    };
    if !applied {
        flip_bytes(rng, frame);
    }
    name
}

fn truncate(rng: &mut Rng, frame: &mut Vec<u8>) -> bool {
    if frame.len() <= ETH_LEN {
        return false;
    }
    let len = ETH_LEN + rng.below(frame.len() - ETH_LEN);
    frame.truncate(len);
    true
}

fn total_length_below(rng: &mut Rng, frame: &[u8], l3: usize, header_len: usize) -> u16 {
    let current = frame.get(l3 + 2..l3 + 4).map_or(0, |b| usize::from(be16(b, 0)));
    let choices = [0, 1, 19, header_len - 1, header_len, header_len + 1, current.saturating_sub(1)];
    let chosen = *rng.pick(&choices);
    u16::try_from(if chosen < current { chosen } else { rng.below(current + 1) }).unwrap_or(0)
}

fn total_length_above(rng: &mut Rng, frame: &[u8], l3: usize) -> u16 {
    let current = frame.get(l3 + 2..l3 + 4).map_or(0, |b| be16(b, 0));
    let step = rng.pick_or(&[1, 2, 20, 1000], Rng::u16);
    current.saturating_add(step.max(1))
}

fn set_byte(frame: &mut [u8], at: usize, value: u8) -> bool {
    frame.get_mut(at).map(|byte| *byte = value).is_some()
}

fn set_u16(frame: &mut [u8], at: usize, value: u16) -> bool {
    frame.get_mut(at..at + 2).map(|field| field.copy_from_slice(&value.to_be_bytes())).is_some()
}

/// Sets the high (`high`) or low nibble of the byte at `at` to the low nibble of `value`.
fn set_nibble(frame: &mut [u8], at: usize, high: bool, value: u8) -> bool {
    let Some(byte) = frame.get_mut(at) else { return false };
    *byte = if high { (*byte & 0x0f) | (value << 4) } else { (*byte & 0xf0) | (value & 0x0f) };
    true
}

/// Inserts `count` tags right after the Ethernet addresses, making a tagged or stacked frame.
fn stack_tags(rng: &mut Rng, frame: &mut Vec<u8>, count: usize) -> bool {
    for _ in 0..count {
        let tpid = *rng.pick(&[ETH_P_8021Q, ETH_P_8021AD]);
        let mut tag = tpid.to_be_bytes().to_vec();
        tag.extend_from_slice(&(rng.u16() & 0x0fff).to_be_bytes());
        frame.splice(12..12, tag);
    }
    true
}

fn flip_bytes(rng: &mut Rng, frame: &mut [u8]) {
    for _ in 0..=rng.below(8) {
        let at = rng.below(frame.len());
        frame[at] = rng.byte();
    }
}

/// Every truncation, from 14 bytes to the whole frame, of one packet per seeded frontend (from
/// a pod and from outside) and of tagged, optioned and ICMP variants.
fn truncation_sweep(tables: &Tables) -> Vec<Vec<u8>> {
    let mut rng = Rng(0);
    let mut templates = Vec::new();
    for frontend in &tables.frontends {
        for client in [fixtures::POD, fixtures::EXTERNAL_CLIENT] {
            let src = endpoint(client, 40_000);
            let mut generator = Generator { rng: Rng(rng.next_u64()), tables };
            let mut draft = generator.draft(src, frontend.vip, frontend.proto, TCP_SYN);
            draft.tags.clear();
            draft.ip_options.clear();
            templates.push(draft.clone());
            draft.tags = vec![(ETH_P_8021Q, 7)];
            draft.ip_options = options(&mut rng);
            templates.push(draft);
        }
    }
    let mut generator = Generator { rng: Rng(1), tables };
    let icmp =
        generator.draft(endpoint(fixtures::POD, 7), endpoint(CLUSTER_IPS[0], 0), proto::ICMP, 0);
    templates.push(icmp);
    templates
        .iter()
        .map(Draft::build)
        .flat_map(|frame| (ETH_LEN..=frame.len()).map(move |len| frame[..len].to_vec()))
        .collect()
}
