//! North-south forwarding by FIB lookup (node config `xdpRedirect: true`), by XDP and by the tc
//! fallback of an external interface alike: a translated packet leaves by redirect to the egress
//! interface the kernel's FIB names, with the next hop's MAC, the egress interface's MAC and a
//! decremented TTL (from XDP only when it leaves by the interface it came in on); without a
//! route, with a VLAN tag in the frame, or from XDP for another interface, it goes up the
//! stack. Both outcomes are counted. With FIB forwarding on or off, a packet with DF set that
//! is too big for its path is answered with the ICMP fragmentation needed.
//! BPF_PROG_TEST_RUN looks routes up in the calling thread's namespace, so the runs happen in
//! a throwaway namespace with a known route and neighbour.

use lb_common::{
    maps::{NodeConfig, node_flags},
    stats::Reason,
};
use lb_tests::{
    checksum,
    datapath::{Datapath, Hook, Run, TC_ACT_OK, TC_ACT_REDIRECT, XDP_PASS, XDP_REDIRECT},
    fixtures::{EXTERNAL_CLIENT, seeded},
    netns::{Netns, run},
    node,
    packets::{L3, Spec, TcpFields, endpoints, icmp_fragmentation_needed},
};
use lb_user::{maps::MapOp, stats::Forwarding};

const NEXT_HOP_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x0a, 0x0b];

fn with_fib_forwarding(datapath: &mut Datapath) {
    let config = NodeConfig {
        flags: node_flags::CONFIGURED | node_flags::FIB_FORWARD,
        ..node::node_config()
    };
    datapath.apply(&[MapOp::SetNodeConfig(config)]);
}

/// A namespace where 10.244.2.0/24 (the remote backends) is reachable through `out0`.
fn routed_namespace() -> (Netns, [u8; 6]) {
    routed_namespace_named("lbt-fib")
}

fn routed_namespace_named(prefix: &str) -> (Netns, [u8; 6]) {
    let netns = Netns::new(prefix);
    // A veth pair: this kernel has no dummy devices; the peer only has to be up.
    netns.ip(&["link", "add", "out0", "type", "veth", "peer", "name", "out1"]);
    netns.ip(&["link", "set", "out1", "up"]);
    netns.ip(&["addr", "add", "10.244.2.1/24", "dev", "out0"]);
    netns.ip(&["link", "set", "out0", "up"]);
    netns.ip(&[
        "neigh",
        "add",
        "10.244.2.11",
        "lladdr",
        "02:00:00:00:0a:0b",
        "dev",
        "out0",
        "nud",
        "permanent",
    ]);
    run("ip", &["netns", "exec", netns.name(), "sysctl", "-qw", "net.ipv4.conf.all.forwarding=1"]);
    run("ip", &["netns", "exec", netns.name(), "sysctl", "-qw", "net.ipv4.conf.lo.forwarding=1"]);
    let link = netns.ip(&["-o", "link", "show", "out0"]);
    let mac = link
        .split_whitespace()
        .skip_while(|word| *word != "link/ether")
        .nth(1)
        .expect("out0 has a MAC");
    let bytes: Vec<u8> = mac.split(':').map(|b| u8::from_str_radix(b, 16).expect("hex")).collect();
    (netns, bytes.try_into().expect("six bytes"))
}

/// The north-south entry points: XDP, and the tc fallback where XDP cannot be attached.
const NORTH_SOUTH: [Hook; 2] = [Hook::Xdp, Hook::TcExternal];

fn redirect_code(hook: Hook) -> u32 {
    if hook.is_tc() { TC_ACT_REDIRECT } else { XDP_REDIRECT }
}

fn to_stack_code(hook: Hook) -> u32 {
    if hook.is_tc() { TC_ACT_OK } else { XDP_PASS }
}

/// What one packet of `hook` sent on `redirected` (or not) adds to the forwarding counters.
fn counted_as(hook: Hook, redirected: bool) -> Forwarding {
    let one = u64::from(redirected);
    match hook {
        Hook::Xdp => Forwarding { redirected: one, to_stack: 1 - one, ..Forwarding::default() },
        _ => Forwarding { tc_fallback: 1, tc_fallback_redirected: one, ..Forwarding::default() },
    }
}

/// The index of `out0` in `netns`: where the tests' packets arrive, as a NodePort's packets
/// arrive on the interface that also leads to its remote backends.
fn out0_index(netns: &Netns) -> u32 {
    // `ip -o link show out0`: "<index>: out0@out1: <...> ...".
    let line = netns.ip(&["-o", "link", "show", "out0"]);
    line.split(':').next().and_then(|index| index.trim().parse().ok()).expect("out0's index")
}

#[test]
fn a_translated_packet_is_redirected_to_the_next_hop() {
    let (netns, out0_mac) = routed_namespace();
    let out0 = out0_index(&netns);
    for (port, hook) in (50_500..).zip(NORTH_SOUTH) {
        let mut datapath = seeded();
        with_fib_forwarding(&mut datapath);
        let request = Spec::tcp(EXTERNAL_CLIENT, port, "192.168.1.63", 30380).build();
        let run = netns.enter(|| datapath.run_arriving_on(hook, &request, out0));
        assert_eq!(run.return_code, redirect_code(hook), "{hook:?}: redirected by FIB lookup");
        let counted: Vec<_> = run.counted.non_zero().collect();
        assert_eq!(counted, vec![(Reason::ForwardNew.name(), 1)], "{hook:?}");
        assert_eq!(datapath.forwarding(), counted_as(hook, true), "{hook:?}");
        assert_eq!(run.output[..6], NEXT_HOP_MAC, "{hook:?}: destination MAC: the next hop's");
        assert_eq!(run.output[6..12], out0_mac, "{hook:?}: source MAC: the egress interface's");
        assert_eq!(run.output[L3 + 8], 63, "{hook:?}: TTL decremented");
        let backend = ("10.244.2.11".parse().expect("address"), 80);
        assert_eq!(endpoints(&run.output).1, backend, "{hook:?}");
        checksum::assert_valid(&run.output);
    }
}

/// Checks that `run` (of `hook`, on `datapath`) went up the stack: its code and counters,
/// TTL untouched (the stack forwards it, `ttl_at` in the frame), still translated to `backend`.
fn assert_up_the_stack(datapath: &Datapath, hook: Hook, run: &Run, ttl_at: usize, backend: &str) {
    assert_eq!(run.return_code, to_stack_code(hook), "{hook:?}: up the stack");
    assert_eq!(datapath.forwarding(), counted_as(hook, false), "{hook:?}");
    assert_eq!(run.output[ttl_at], 64, "{hook:?}: TTL untouched: the stack forwards it");
    let backend = (backend.parse().expect("address"), 80);
    assert_eq!(endpoints(&run.output).1, backend, "{hook:?}: still translated");
    checksum::assert_valid(&run.output);
}

#[test]
fn without_a_route_the_packet_goes_up_the_stack() {
    let (netns, _) = routed_namespace();
    for (port, hook) in (50_510..).zip(NORTH_SOUTH) {
        let mut datapath = seeded();
        with_fib_forwarding(&mut datapath);
        // Frontend 4's backend 10.244.1.11 has no route in this namespace.
        let request = Spec::tcp(EXTERNAL_CLIENT, port, "192.168.1.63", 30381).build();
        let run = netns.enter(|| datapath.run(hook, &request));
        assert_up_the_stack(&datapath, hook, &run, L3 + 8, "10.244.1.11");
    }
}

#[test]
fn a_frame_with_a_vlan_tag_goes_up_the_stack_whatever_the_route() {
    let (netns, _) = routed_namespace();
    let out0 = out0_index(&netns);
    for (port, hook) in (50_520..).zip(NORTH_SOUTH) {
        let mut datapath = seeded();
        with_fib_forwarding(&mut datapath);
        // The route and neighbour of the redirect above, but a tag a redirect would keep.
        let request = Spec::tcp(EXTERNAL_CLIENT, port, "192.168.1.63", 30380).with_vlan(7).build();
        let run = netns.enter(|| datapath.run_arriving_on(hook, &request, out0));
        assert_up_the_stack(&datapath, hook, &run, L3 + 4 + 8, "10.244.2.11");
    }
}

/// A route out of another interface than the packet came in on (here, in on the loopback):
/// XDP leaves it to the stack, as its redirect into a device that cannot take it (a pod's veth)
/// would lose it; the tc fallback's skb redirect goes anywhere.
#[test]
fn xdp_leaves_a_packet_for_another_interface_to_the_stack() {
    let (netns, _) = routed_namespace();
    for (port, hook) in (50_530..).zip(NORTH_SOUTH) {
        let mut datapath = seeded();
        with_fib_forwarding(&mut datapath);
        let request = Spec::tcp(EXTERNAL_CLIENT, port, "192.168.1.63", 30380).build();
        let run = netns.enter(|| datapath.run(hook, &request));
        if hook == Hook::Xdp {
            assert_up_the_stack(&datapath, hook, &run, L3 + 8, "10.244.2.11");
        } else {
            assert_eq!(run.return_code, redirect_code(hook), "{hook:?}: redirected");
            assert_eq!(datapath.forwarding(), counted_as(hook, true), "{hook:?}");
        }
    }
}

/// The MTU of `out0`, where the packets arrive (a veth's default).
const OUT0_MTU: usize = 1500;

/// The MTU of the path to 10.244.2.0/24 in [`narrow_namespace`], the tests' tunnel.
const NARROW_MTU: u16 = 1000;

/// [`routed_namespace`] where the remote backends are reached through `tun0`, an interface of
/// `mtu` bytes (a tunnel, say), narrower than `out0`, where the packets arrive.
fn narrow_namespace(mtu: u16) -> Netns {
    let (netns, _) = routed_namespace_named("lbt-mtu");
    netns.ip(&["link", "add", "tun0", "type", "veth", "peer", "name", "tun1"]);
    netns.ip(&["link", "set", "tun0", "mtu", &mtu.to_string()]);
    netns.ip(&["link", "set", "tun1", "up"]);
    netns.ip(&["link", "set", "tun0", "up"]);
    netns.ip(&["route", "replace", "10.244.2.0/24", "dev", "tun0"]);
    netns
}

/// A segment of an established connection to frontend 3 (NodePort 30380, whose backend is
/// 10.244.2.11:80 behind the narrow path), carrying `payload` bytes, DF set.
fn segment(port: u16, payload: usize) -> Vec<u8> {
    segment_spec(port, payload).build()
}

/// [`segment`], before it is built.
fn segment_spec(port: u16, payload: usize) -> Spec {
    let tcp = TcpFields { syn: false, ack: Some(1), ..TcpFields::default() };
    Spec::tcp(EXTERNAL_CLIENT, port, "192.168.1.63", 30380)
        .with_tcp(tcp)
        .with_payload(&vec![0x5a; payload])
}

/// `frame` with its IPv4 header changed by `change`, and its checksum recomputed.
fn with_ipv4(mut frame: Vec<u8>, change: impl FnOnce(&mut etherparse::Ipv4Header)) -> Vec<u8> {
    let (mut header, _) = etherparse::Ipv4Header::from_slice(&frame[L3..]).expect("IPv4 header");
    change(&mut header);
    header.header_checksum = header.calc_header_checksum();
    frame[L3..L3 + 20].copy_from_slice(&header.to_bytes());
    frame
}

/// The ICMP fragmentation needed `request` gets from the node (exact bytes): from the address
/// it was sent to, back to its sender, quoting its IPv4 header and first 8 payload bytes as
/// sent, with the path's MTU.
fn fragmentation_needed_for(request: &[u8], mtu: u16) -> Vec<u8> {
    icmp_fragmentation_needed("192.168.1.63", EXTERNAL_CLIENT, mtu, &request[L3..L3 + 28])
}

#[test]
fn a_packet_too_big_for_its_path_is_answered_with_fragmentation_needed() {
    let netns = narrow_namespace(NARROW_MTU);
    let out0 = out0_index(&netns);
    for (port, (hook, fib)) in
        (50_540..).zip(NORTH_SOUTH.into_iter().flat_map(|hook| [(hook, false), (hook, true)]))
    {
        let context = format!("{hook:?}, FIB forwarding {fib}");
        let mut datapath = seeded();
        if fib {
            with_fib_forwarding(&mut datapath);
        }
        let request = segment(port, 1200);
        let run = netns.enter(|| datapath.run_arriving_on(hook, &request, out0));
        run.assert_outcome(hook.bounce_code(), Reason::FragmentationNeeded, &context);
        let expected = fragmentation_needed_for(&request, NARROW_MTU);
        assert_eq!(run.output, expected, "{context}: the ICMP error, exactly");
        checksum::assert_icmp_valid(&run.output);
        let counted = if hook == Hook::Xdp {
            Forwarding::default()
        } else {
            Forwarding { tc_fallback: 1, ..Forwarding::default() }
        };
        assert_eq!(datapath.forwarding(), counted, "{context}: not forwarded");
    }
}

/// A frame with an 802.1Q tag is measured by its IPv4 length like any other: a packet as long
/// as the MTU where it arrived is a packet the wire carried, not segments GRO merged (the tag
/// does not count against the MTU). Its answer leaves with the tag.
#[test]
fn a_tagged_packet_too_big_for_its_path_is_answered_with_its_tag() {
    let netns = narrow_namespace(NARROW_MTU);
    let out0 = out0_index(&netns);
    for (port, hook) in (50_570..).zip(NORTH_SOUTH) {
        let mut datapath = seeded();
        let request = segment_spec(port, OUT0_MTU - 40).with_vlan(7).build();
        let run = netns.enter(|| datapath.run_arriving_on(hook, &request, out0));
        run.assert_outcome(hook.bounce_code(), Reason::FragmentationNeeded, &format!("{hook:?}"));
        // The answer to the same packet untagged, with the tag put back after the MACs.
        let untagged = fragmentation_needed_for(&segment(port, OUT0_MTU - 40), NARROW_MTU);
        let expected = [&untagged[..12], &request[12..16], &untagged[12..]].concat();
        assert_eq!(run.output, expected, "{hook:?}: the ICMP error, tagged");
    }
}

/// What fits the path, what the sender lets the stack fragment (no DF), and what expires here
/// (the stack's time exceeded comes first) go on as before, translated.
#[test]
fn packets_that_fit_or_may_be_fragmented_go_on_translated() {
    let netns = narrow_namespace(NARROW_MTU);
    let out0 = out0_index(&netns);
    let fits = usize::from(NARROW_MTU) - 40;
    for (port, hook) in (50_550..).step_by(3).zip(NORTH_SOUTH) {
        let cases = [
            ("fits the path", segment(port, fits)),
            ("no DF", with_ipv4(segment(port + 1, 1200), |ip| ip.dont_fragment = false)),
            ("TTL 1", with_ipv4(segment(port + 2, 1200), |ip| ip.time_to_live = 1)),
        ];
        for (case, request) in cases {
            assert_goes_on_translated(&netns, out0, hook, &request, case);
        }
    }
}

/// Generic (skb) XDP runs after GRO: a frame longer than the MTU of the interface it arrived
/// on is segments merged, which the stack splits again on the way out, not a packet to answer.
#[test]
fn xdp_leaves_segments_merged_by_gro_to_the_stack() {
    let netns = narrow_namespace(NARROW_MTU);
    let out0 = out0_index(&netns);
    let merged = segment(50_580, 2 * (OUT0_MTU - 40));
    assert_goes_on_translated(&netns, out0, Hook::Xdp, &merged, "two segments merged");
}

/// A path narrower than 552 bytes (below any path MTU Linux takes): packets up to 552 bytes are
/// not looked up, and go on; longer ones are answered.
#[test]
fn packets_up_to_552_bytes_are_not_checked() {
    const TINY_MTU: u16 = 500;
    let netns = narrow_namespace(TINY_MTU);
    let out0 = out0_index(&netns);
    for (port, hook) in (50_560..).step_by(2).zip(NORTH_SOUTH) {
        assert_goes_on_translated(&netns, out0, hook, &segment(port, 552 - 40), "552 bytes");
        let mut datapath = seeded();
        let request = segment(port + 1, 553 - 40);
        let run = netns.enter(|| datapath.run_arriving_on(hook, &request, out0));
        run.assert_outcome(hook.bounce_code(), Reason::FragmentationNeeded, "553 bytes");
        assert_eq!(run.output, fragmentation_needed_for(&request, TINY_MTU), "{hook:?}");
    }
}

/// Runs `request` through `hook` as arriving on `out0` of `netns`, and checks it went up the
/// stack translated to frontend 3's backend, whole.
fn assert_goes_on_translated(netns: &Netns, out0: u32, hook: Hook, request: &[u8], case: &str) {
    let context = format!("{hook:?}, {case}");
    let mut datapath = seeded();
    let run = netns.enter(|| datapath.run_arriving_on(hook, request, out0));
    run.assert_outcome(to_stack_code(hook), Reason::ForwardNew, &context);
    let backend = ("10.244.2.11".parse().expect("address"), 80);
    assert_eq!(endpoints(&run.output).1, backend, "{context}: translated");
    assert_eq!(run.output.len(), request.len(), "{context}");
    checksum::assert_valid(&run.output);
}
