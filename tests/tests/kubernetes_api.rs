//! The daemon on the Kubernetes API, end to end: the example Services and EndpointSlices are
//! listed and watched through kube-rs from the scripted API server (a mock connection in this
//! process, playing the API server's side of each list and watch), beside a Service the client
//! cannot decode, and real connections from
//! the topology's namespaces go through the programs it writes. Watch events reach the kernel:
//! an EndpointSlice edit moves new connections, and the Node's cluster-autoscaler taint turns
//! `/healthz` to 503 (kube-proxy's `nodeEligible`) while `/livez` stays 200. A daemon configured
//! as the DaemonSet configures it (`deploy/lb-xdp.yaml`) takes its node's addresses from the
//! Node object.

use std::net::SocketAddr;

use lb_tests::{
    daemon::{
        HEALTHZ_ADDRESS, RunningDaemon, SYNCS_OK, counter, default_targets, example_node_config,
        examples, http_get, scrape_metrics, wait_for, wait_for_backends,
    },
    deploy,
    manifests::json_documents,
    pins::TestPins,
    topology::{NODE_IP, Topology, tcp_request},
};
use lb_user::{
    cli,
    config::NodeConfig,
    daemon::{ScriptedClient, Source},
    kube_source::api_server::{self, ApiServer, NODE, Resource},
};
use serde_json::{Value, json};

/// The example manifests as the API server holds them: (Services, EndpointSlices), each with a
/// resource version.
fn example_objects() -> (Vec<Value>, Vec<Value>) {
    let path = examples().join("manifests/seed-tutorial.yaml");
    let (mut services, mut slices) = (Vec::new(), Vec::new());
    for mut object in json_documents(&path) {
        object["metadata"]["resourceVersion"] = json!("1");
        match object["kind"].as_str() {
            Some("Service") => services.push(object),
            Some("EndpointSlice") => slices.push(object),
            other => panic!("unexpected kind {other:?}"),
        }
    }
    (services, slices)
}

/// This node's Node object; `leaving` adds the cluster autoscaler's taint.
fn node(resource_version: &str, leaving: bool) -> Value {
    let taints = if leaving {
        json!([{ "key": "ToBeDeletedByClusterAutoscaler", "effect": "NoSchedule" }])
    } else {
        json!([])
    };
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": { "name": NODE, "resourceVersion": resource_version },
        "spec": { "taints": taints },
        "status": { "addresses": [{ "type": "InternalIP", "address": NODE_IP }] },
    })
}

/// A runtime, and the scripted API server's two ends: the daemon's client, whose connection
/// task runs on that runtime whichever thread uses the client, and the server.
fn scripted_api() -> (tokio::runtime::Runtime, ScriptedClient, ApiServer) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("a Tokio runtime");
    let (client, server) = runtime.block_on(async { api_server::pair() });
    (runtime, ScriptedClient(client), server)
}

fn addr(text: &str) -> SocketAddr {
    text.parse().expect("socket address")
}

fn healthz_status(topology: &Topology, path: &str) -> Option<u16> {
    http_get(&topology.client, &format!("{NODE_IP}:{}", port(HEALTHZ_ADDRESS)), path)
        .ok()
        .map(|response| response.status)
}

fn port(address: &str) -> u16 {
    address.parse::<SocketAddr>().expect("address").port()
}

#[test]
fn the_daemon_on_the_kubernetes_api_serves_and_follows_watch_events() {
    let topology = Topology::new("lbk");
    let _servers = topology.start_servers();
    let pins = TestPins::new();
    let (runtime, client, mut server) = scripted_api();
    let (mut services, slices) = example_objects();
    // One the client cannot decode (a port that is a string): kube-rs alone would fail the
    // whole list with it, and the daemon would never start.
    services.push(json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": { "name": "unreadable", "namespace": "default", "resourceVersion": "1" },
        "spec": { "ports": [{ "port": "eighty" }] },
    }));

    // The daemon starts (and waits for its first sync) while this thread answers its lists.
    let (daemon, mut watches) = std::thread::scope(|scope| {
        let daemon = scope.spawn(|| {
            let source = Source::KubernetesClient(client);
            let targets = default_targets(&topology, None);
            RunningDaemon::start_on(&topology, &pins, source, targets, example_node_config())
        });
        let watches = runtime.block_on(async {
            server.list(Resource::Services, "100", &services).await;
            server.list(Resource::Slices, "200", &slices).await;
            server.list(Resource::Node, "300", &[node("300", false)]).await;
            // Held open: a closed watch would make the watchers list again.
            let services = server.watch(Resource::Services, "100").await;
            let slices = server.watch(Resource::Slices, "200").await;
            let node = server.watch(Resource::Node, "300").await;
            (services, slices, node)
        });
        (daemon.join().expect("the daemon started"), watches)
    });

    let client_pod = &topology.pod("client").netns;
    let answer = tcp_request(client_pod, addr("10.96.45.10:80")).expect("pod to a ClusterIP");
    assert!(answer.starts_with("hello from my-nginx-"), "{answer}");
    let answer = tcp_request(&topology.client, addr(&format!("{NODE_IP}:30380")))
        .expect("client to NodePort 30380");
    assert!(answer.starts_with("hello from my-nginx-nodeport-"), "{answer}");
    assert_eq!(healthz_status(&topology, "/healthz"), Some(200));

    // A watch event: my-nginx-2 leaves the EndpointSlice; new connections reach my-nginx-1.
    let mut slice = slices.iter().find(|s| s["metadata"]["name"] == "my-nginx-abc12").cloned();
    let slice = slice.as_mut().expect("my-nginx's slice");
    slice["metadata"]["resourceVersion"] = json!("201");
    slice["endpoints"]
        .as_array_mut()
        .expect("endpoints")
        .retain(|e| e["addresses"][0] != "10.244.1.11");
    runtime.block_on(watches.1.modified(slice.clone()));
    wait_for_backends(&pins, "10.96.45.10:80", 1, "the watch event to be programmed");
    for _ in 0..6 {
        let answer = tcp_request(client_pod, addr("10.96.45.10:80")).expect("after the event");
        assert_eq!(answer, "hello from my-nginx-1");
    }

    // The cluster autoscaler is about to delete this node: load balancers must drain it.
    runtime.block_on(watches.2.modified(node("301", true)));
    wait_for(|| healthz_status(&topology, "/healthz") == Some(503), "/healthz to say 503");
    assert_eq!(healthz_status(&topology, "/livez"), Some(200), "the daemon itself is alive");
    let answer = tcp_request(client_pod, addr("10.96.45.10:80")).expect("still proxying");
    assert_eq!(answer, "hello from my-nginx-1");
    drop(daemon);
}

/// The DaemonSet's pod: the ConfigMap's node configuration names no node and lists no address;
/// the name comes from the command line (`NODE_NAME`), the addresses from the Node object.
/// Nothing is synced before the Node reports an address; then NodePorts listen on it.
#[test]
fn a_daemonset_pod_takes_its_addresses_from_its_node() {
    let topology = Topology::new("lbn");
    let _servers = topology.start_servers();
    let pins = TestPins::new();
    let (runtime, client, mut server) = scripted_api();
    let (services, slices) = example_objects();
    let supplied = cli::supplied(Some(NODE.to_owned()), None);
    let node_config = NodeConfig::from_yaml_str_with(&deploy::node_config_text(), &supplied)
        .expect("the ConfigMap's node configuration");
    assert!(node_config.node_ips.is_empty(), "no address in the file");

    let (daemon, _watches) = std::thread::scope(|scope| {
        let daemon = scope.spawn(|| {
            let source = Source::KubernetesClient(client);
            let targets = default_targets(&topology, None);
            RunningDaemon::start_on(&topology, &pins, source, targets, node_config)
        });
        let watches = runtime.block_on(async {
            server.list(Resource::Services, "100", &services).await;
            server.list(Resource::Slices, "200", &slices).await;
            let services = server.watch(Resource::Services, "100").await;
            let slices = server.watch(Resource::Slices, "200").await;
            // The daemon serves metrics while it waits: it has not synced.
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            let metrics = scrape_metrics(&topology.node).expect("metrics while waiting");
            // (A series appears with its first count.)
            assert_eq!(counter(&metrics, SYNCS_OK), None, "synced with no node address");
            server.list(Resource::Node, "300", &[node("300", false)]).await;
            let node = server.watch(Resource::Node, "300").await;
            (services, slices, node)
        });
        (daemon.join().expect("the daemon started"), watches)
    });

    let answer = tcp_request(&topology.client, addr(&format!("{NODE_IP}:30380")))
        .expect("client to NodePort 30380 on the Node's InternalIP");
    assert!(answer.starts_with("hello from my-nginx-nodeport-"), "{answer}");
    drop(daemon);
}
