//! First real traffic: the daemon on a manifest directory, attached to a node namespace with
//! pods behind veths and an external client; real TCP and UDP sockets through ClusterIPs and a
//! NodePort, refusal of a service without endpoints, a live manifest edit, and a daemon restart
//! that an established connection survives (listed by `lb-user flows` first), the daemon's
//! metrics endpoint (its map entries checked against the pinned maps), and a UDP stream draining
//! from a terminating endpoint; the periodic resync under steady changes. Everything is torn down
//! on success and failure.

use std::{
    net::{SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

use lb_tests::{
    daemon::{RunningDaemon, SYNCS_OK, counter, scrape_metrics, wait_for, wait_for_backends},
    manifests::ManifestDir,
    pins::TestPins,
    topology::{NODE_IP, Topology, exchange, long_lived, tcp_request, udp_request},
};
use lb_user::{flows, maps::KernelMaps, reconcile::DatapathState};

fn addr(text: &str) -> SocketAddr {
    text.parse().expect("socket address")
}

#[test]
fn real_connections_through_the_running_daemon() {
    let topology = Topology::new("lbt");
    let _servers = topology.start_servers();
    let pins = TestPins::new();
    let manifests = ManifestDir::new();
    let daemon = RunningDaemon::start(&topology, &pins, manifests.path(), None);
    let client_pod = &topology.pod("client").netns;

    let answer =
        tcp_request(client_pod, addr("10.96.45.10:80")).expect("pod to the my-nginx ClusterIP");
    assert!(answer.starts_with("hello from my-nginx-"), "{answer}");

    let answer = tcp_request(&topology.client, addr(&format!("{NODE_IP}:30380")))
        .expect("client to NodePort 30380");
    assert!(answer.starts_with("hello from my-nginx-nodeport-"), "{answer}");

    let answer = udp_request(client_pod, addr("10.96.0.10:53")).expect("UDP through a ClusterIP");
    assert!(answer.starts_with("my-nginx-"), "{answer}");

    let started = Instant::now();
    let refused = tcp_request(client_pod, addr("10.96.45.12:80")).expect_err("no endpoints");
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused, "{refused}");
    assert!(started.elapsed() < Duration::from_secs(1), "refused at once, not timed out");

    // Hairpin: a backend reaching its own service, on whichever backend the hash picks.
    let own = &topology.pod("my-nginx-1").netns;
    for _ in 0..6 {
        let answer =
            tcp_request(own, addr("10.96.45.10:80")).expect("hairpin through the ClusterIP");
        assert!(answer.starts_with("hello from my-nginx-"), "{answer}");
    }

    let metrics = scrape_metrics(&topology.node).expect("the metrics endpoint answers");
    for line in [
        "# TYPE lb_datapath_packets counter",
        "# TYPE lb_syncs counter",
        "# TYPE lb_sync_duration_seconds histogram",
    ] {
        assert!(metrics.contains(line), "{line} in\n{metrics}");
    }
    assert!(
        counter(&metrics, "lb_datapath_packets_total{reason=\"forward_new\"}") >= Some(4),
        "{metrics}"
    );
    assert!(
        counter(&metrics, "lb_datapath_packets_total{reason=\"reject_no_endpoints\"}") >= Some(1)
    );
    assert!(counter(&metrics, SYNCS_OK) >= Some(1), "{metrics}");
    the_map_entries_shown_are_the_pinned_maps(&metrics, &pins);

    // An established connection survives a daemon restart: the datapath stays attached and
    // the new daemon adopts the pinned maps without a flush.
    let mut connection = long_lived(client_pod, addr("10.96.45.10:80"));
    let first = exchange(&mut connection);
    // `lb-user flows` lists it: from the client pod, through the ClusterIP to the pod that
    // answered, established.
    let answered = first.trim_start_matches("hello from ");
    let backend = format!("{}:80", topology.pod(answered).ip);
    let flows = flows::read(pins.layout()).expect("flows");
    let listed = flows.iter().any(|f| {
        f.client.starts_with("10.244.1.5:")
            && (f.frontend.as_str(), f.backend.as_str(), f.state)
                == ("10.96.45.10:80", backend.as_str(), "established")
    });
    assert!(listed, "{backend}: {flows:#?}");
    daemon.stop();
    assert_eq!(exchange(&mut connection), first, "answered while no daemon runs");
    let daemon = RunningDaemon::start(&topology, &pins, manifests.path(), None);
    assert_eq!(exchange(&mut connection), first, "same backend after the restart");

    // A live edit: my-nginx-2 leaves the EndpointSlice; new connections only reach my-nginx-1.
    manifests.edit("- {addresses: [10.244.1.11], nodeName: node-a, conditions: {ready: true}}\nports:\n- {name: '', port: 80, protocol: TCP}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: my-nginx-nodeport", "ports:\n- {name: '', port: 80, protocol: TCP}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: my-nginx-nodeport");
    wait_for_backends(&pins, "10.96.45.10:80", 1, "the edit to be programmed");
    for _ in 0..8 {
        let answer = tcp_request(client_pod, addr("10.96.45.10:80")).expect("after the edit");
        assert_eq!(answer, "hello from my-nginx-1");
    }
    let daemon =
        a_udp_stream_drains_from_a_terminating_endpoint(daemon, &topology, &pins, &manifests);
    drop(daemon);
}

/// As with kube-proxy, a UDP flow stays on its endpoint while the endpoint is terminating but
/// serving, and moves when it stops serving; new flows avoid it at once. A restarted daemon
/// takes the draining flow up.
fn a_udp_stream_drains_from_a_terminating_endpoint(
    daemon: RunningDaemon,
    topology: &Topology,
    pins: &TestPins,
    manifests: &ManifestDir,
) -> RunningDaemon {
    let client_pod = &topology.pod("client").netns;
    let stream = client_pod.enter(|| UdpSocket::bind(("0.0.0.0", 0))).expect("UDP socket");
    stream.set_read_timeout(Some(Duration::from_secs(2))).expect("timeout");
    let ask = || {
        stream.send_to(b"ping", addr("10.96.0.10:53")).expect("send");
        let mut buffer = [0u8; 64];
        let (len, _) = stream.recv_from(&mut buffer).expect("an answer through the ClusterIP");
        String::from_utf8_lossy(&buffer[..len]).into_owned()
    };
    let first = ask();
    let (draining, staying) = match first.as_str() {
        "my-nginx-1" => ("my-nginx-1", "my-nginx-2"),
        _ => ("my-nginx-2", "my-nginx-1"),
    };
    let echo_slice = |conditions: &[(&str, &str); 2]| {
        let lines = conditions.map(|(pod, conditions)| {
            let ip = topology.pod(pod).ip;
            format!("- {{addresses: [{ip}], nodeName: node-a, conditions: {{{conditions}}}}}\n")
        });
        format!("name: echo-udp-u1{}{}{}", ECHO_SLICE_MIDDLE, lines[0], lines[1])
    };
    let ready = "ready: true";
    let terminating = "ready: false, serving: true, terminating: true";
    let gone = "ready: false, serving: false, terminating: true";
    manifests.edit(
        &echo_slice(&[("my-nginx-1", ready), ("my-nginx-2", ready)]),
        &echo_slice(&[(draining, terminating), (staying, ready)]),
    );
    wait_for_backends(pins, "10.96.0.10:53", 1, "the terminating endpoint to leave the slots");
    wait_for(
        || {
            let metrics = scrape_metrics(&topology.node).unwrap_or_default();
            counter(&metrics, "lb_draining_udp_endpoints") == Some(1)
        },
        "the drain in the daemon's metrics",
    );
    let fresh = udp_request(client_pod, addr("10.96.0.10:53")).expect("a new UDP flow");
    assert_eq!(fresh, staying, "new flows avoid the terminating endpoint");
    std::thread::sleep(Duration::from_millis(300));
    for _ in 0..4 {
        assert_eq!(ask(), draining, "the stream stays on its terminating endpoint");
    }
    daemon.stop();
    let daemon = RunningDaemon::start(topology, pins, manifests.path(), None);
    assert_eq!(ask(), draining, "the stream still drains after a restart");
    manifests.edit(
        &echo_slice(&[(draining, terminating), (staying, ready)]),
        &echo_slice(&[(draining, gone), (staying, ready)]),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while ask() != staying {
        assert!(
            Instant::now() < deadline,
            "the stream never left its endpoint that stopped serving"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    daemon
}

/// What comes between the name of echo-udp's EndpointSlice and its endpoints in the seed.
const ECHO_SLICE_MIDDLE: &str = "
  namespace: default
  labels: {kubernetes.io/service-name: echo-udp}
addressType: IPv4
endpoints:
";

/// `lb_map_entries` and `lb_frontends` count what the pinned maps hold (nothing changes the
/// manifests meanwhile).
fn the_map_entries_shown_are_the_pinned_maps(metrics: &str, pins: &TestPins) {
    let maps = KernelMaps::from_pins(pins.layout()).expect("the pinned maps");
    let programmed = DatapathState::read(&maps).expect("what is programmed");
    let frontends = programmed.services.keys().filter(|key| !key.is_marker()).count();
    assert!(frontends > 0 && frontends < programmed.services.len(), "markers and frontends");
    for (series, entries) in [
        ("lb_map_entries{map=\"SERVICES\"}", programmed.services.len()),
        ("lb_map_entries{map=\"BACKENDS\"}", programmed.backends.len()),
        ("lb_map_entries{map=\"BACKEND_SLOTS\"}", programmed.slots.len()),
        ("lb_frontends", frontends),
    ] {
        let expected = u64::try_from(entries).expect("a count");
        assert_eq!(counter(metrics, series), Some(expected), "{series} in\n{metrics}");
    }
}

/// The periodic resync rebuilds every service even while changes come more often than its
/// period, as kube-proxy's, timed from the last full sync: a busy cluster's changes must not put
/// off for ever the repair of what a missed event or a failed write left behind.
#[test]
fn the_periodic_resync_runs_while_changes_keep_coming() {
    let topology = Topology::new("lbr");
    let pins = TestPins::new();
    let manifests = ManifestDir::new();
    let resync = Duration::from_secs(1);
    let daemon = RunningDaemon::start_resyncing(&topology, &pins, manifests.path(), resync);
    let count = |series: &str| {
        let metrics = scrape_metrics(&topology.node).expect("the metrics endpoint answers");
        counter(&metrics, series).unwrap_or_else(|| panic!("{series} in\n{metrics}"))
    };
    let (syncs_before, full_before) = (count(SYNCS_OK), count("lb_full_syncs_total"));
    // A service changed every 200 ms, for three resync periods.
    let churn_started = Instant::now();
    for change in 0_u16.. {
        if churn_started.elapsed() >= 3 * resync {
            break;
        }
        let service = format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: churn, namespace: default}}\n\
             spec: {{clusterIP: 10.96.99.1, ports: [{{port: {}}}]}}\n",
            1000 + change
        );
        manifests.add_file("churn.yaml", &service);
        std::thread::sleep(Duration::from_millis(200));
    }
    let (syncs, full) =
        (count(SYNCS_OK) - syncs_before, count("lb_full_syncs_total") - full_before);
    assert!(syncs >= 3, "{syncs} syncs: the changes reached the daemon");
    assert!(full >= 2, "{full} full syncs in three periods of steady changes");
    daemon.stop();
}
