//! North-south forwarding by FIB lookup (node config `xdpRedirect: true`), by XDP and by the tc
//! fallback of an external interface alike: a translated packet leaves by redirect to the egress
//! interface the kernel's FIB names, with the next hop's MAC, the egress interface's MAC and a
//! decremented TTL (from XDP only when it leaves by the interface it came in on); without a
//! route, with a VLAN tag in the frame, or from XDP for another interface, it goes up the
//! stack. Both outcomes are counted.
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
    packets::{L3, Spec, endpoints},
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
    let netns = Netns::new("lbt-fib");
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
