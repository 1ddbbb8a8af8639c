//! SNAT ports and the node's own sockets: a masqueraded flow never takes a source port that a
//! socket of the node already receives on from its backend (a connection to the same backend,
//! one in `TIME_WAIT`, a listener or a bound UDP socket), for TCP and UDP, on XDP and on the tc
//! fallback. The SNAT range is narrowed to two ports so the test knows which one a flow must
//! get. `BPF_PROG_TEST_RUN` looks sockets up in the calling thread's namespace, so the sockets
//! and the runs live in a throwaway namespace.

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};

use lb_common::{
    maps::{NodeConfig, proto, service_flags},
    stats::Reason,
};
use lb_tests::{
    datapath::{Datapath, Hook},
    fixtures::{EXTERNAL_CLIENT, seeded},
    netns::{Netns, run},
    node::{self, NODE_IP},
    packets::{Spec, endpoints},
    services::Frontend,
};
use lb_user::maps::MapOp;

/// The SNAT range: these two ports only.
const FIRST: u16 = 61_500;
const SECOND: u16 = 61_501;
/// NodePort 30380's (TCP) remote backend, from the seed.
const TCP_BACKEND: (&str, u16) = ("10.244.2.11", 80);
/// A UDP NodePort with a remote backend, added here.
const UDP_NODE_PORT: u16 = 30_053;
const UDP_BACKEND: (&str, u16) = ("10.244.2.15", 53);

const NORTH_SOUTH: [Hook; 2] = [Hook::Xdp, Hook::TcExternal];

fn datapath() -> Datapath {
    let mut datapath = seeded();
    let config = NodeConfig { snat_port_min: FIRST, snat_port_max: SECOND, ..node::node_config() };
    let udp = Frontend::new(40, NODE_IP, UDP_NODE_PORT, proto::UDP)
        .flags(service_flags::EXTERNAL)
        .backend(UDP_BACKEND.0, UDP_BACKEND.1, false);
    datapath.apply(&[MapOp::SetNodeConfig(config)]);
    datapath.apply(&udp.ops());
    datapath
}

/// A namespace where the node's and the backends' addresses are local, so sockets can be bound
/// to them and connected between them.
fn node_namespace() -> Netns {
    let netns = Netns::new("lbt-snat");
    for address in [NODE_IP, TCP_BACKEND.0, UDP_BACKEND.0] {
        netns.ip(&["addr", "add", &format!("{address}/32"), "dev", "lo"]);
    }
    netns
}

fn socket_address(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::from((ip.parse::<Ipv4Addr>().expect("address"), port))
}

/// Runs a new flow's first packet through `hook` in `netns`; returns the SNAT port it got, or
/// `None` if it was dropped for want of one.
fn snat_port(netns: &Netns, datapath: &mut Datapath, hook: Hook, request: &Spec) -> Option<u16> {
    let run = netns.enter(|| datapath.run(hook, &request.build()));
    let counted: Vec<_> = run.counted.non_zero().collect();
    if counted == [(Reason::DropSnatExhausted.name(), 1)] {
        assert_eq!(run.return_code, hook.drop_code(), "{hook:?}");
        return None;
    }
    assert_eq!(counted, [(Reason::ForwardNew.name(), 1)], "{hook:?}");
    assert_eq!(run.return_code, hook.forward_code(), "{hook:?}");
    let ((source, port), _) = endpoints(&run.output);
    assert_eq!(source, NODE_IP.parse::<Ipv4Addr>().expect("address"), "{hook:?}: masqueraded");
    Some(port)
}

#[test]
fn tcp_flows_skip_ports_a_listener_or_a_connection_to_their_backend_holds() {
    for (client_port, hook) in (40_000..).step_by(10).zip(NORTH_SOUTH) {
        // A namespace per hook: the TIME_WAIT socket below outlives the iteration.
        let netns = node_namespace();
        let mut datapath = datapath();
        let node_port = |port| Spec::tcp(EXTERNAL_CLIENT, port, NODE_IP, 30380);

        // A listener on the first port: the flow takes the second.
        let listener = netns.enter(|| TcpListener::bind(socket_address(NODE_IP, FIRST)));
        let _listener = listener.expect("listening on the first SNAT port");
        let got = snat_port(&netns, &mut datapath, hook, &node_port(client_port));
        assert_eq!(got, Some(SECOND), "{hook:?}: the listener's port is skipped");

        // A fresh datapath (no flows hold the second port), and a local connection to the
        // backend from the second port: no port is left.
        let mut datapath = self::datapath();
        let backend = netns.enter(|| TcpListener::bind(socket_address(TCP_BACKEND.0, 80)));
        let backend = backend.expect("the backend's listener");
        let connection = netns.enter(|| connect_from(socket_address(NODE_IP, SECOND), &backend));
        let got = snat_port(&netns, &mut datapath, hook, &node_port(client_port + 5));
        assert_eq!(got, None, "{hook:?}: both ports held, the flow is dropped and counted");

        // The connection closes, this side first: its TIME_WAIT still holds the tuple.
        let accepted = backend.accept().expect("the backend's side").0;
        drop(connection);
        drop(accepted);
        wait_for_time_wait(&netns, SECOND);
        let got = snat_port(&netns, &mut datapath, hook, &node_port(client_port + 6));
        assert_eq!(got, None, "{hook:?}: a TIME_WAIT tuple is held too");
    }
}

#[test]
fn udp_flows_skip_a_port_a_local_socket_is_bound_to() {
    for (client_port, hook) in (41_000..).step_by(10).zip(NORTH_SOUTH) {
        let netns = node_namespace();
        let mut datapath = datapath();
        let request = |port| Spec::udp(EXTERNAL_CLIENT, port, NODE_IP, UDP_NODE_PORT);
        let got = snat_port(&netns, &mut datapath, hook, &request(client_port));
        let first = got.expect("a free port");
        let other = if first == FIRST { SECOND } else { FIRST };

        // A socket bound to the other port: the next flow has none left.
        let bound = netns.enter(|| UdpSocket::bind(socket_address(NODE_IP, other)));
        let _bound = bound.expect("binding the other SNAT port");
        let got = snat_port(&netns, &mut datapath, hook, &request(client_port + 1));
        assert_eq!(got, None, "{hook:?}: the bound port is skipped, the other is the first flow's");
    }
}

/// Waits until a TCP socket on local port `port` is in `TIME_WAIT` in `netns`.
fn wait_for_time_wait(netns: &Netns, port: u16) {
    let filter = format!("sport = :{port}");
    for _ in 0..100 {
        let listed = run(
            "ip",
            &["netns", "exec", netns.name(), "ss", "-tanH", "state", "time-wait", &filter],
        );
        if !listed.trim().is_empty() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    panic!("no TIME_WAIT socket on port {port}");
}

/// A TCP connection from `local` to `listener`'s address.
fn connect_from(local: SocketAddr, listener: &TcpListener) -> TcpStream {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
        .expect("a TCP socket");
    socket.bind(&local.into()).expect("binding the connection's source");
    let peer = listener.local_addr().expect("the listener's address");
    socket.connect(&peer.into()).expect("connecting to the backend");
    socket.into()
}
