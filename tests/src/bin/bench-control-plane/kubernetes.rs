//! The `"kubernetes"` rows: the same services and EndpointSlices listed and watched from the
//! Kubernetes source tests' scripted API server (a tower-test mock in this process), through
//! `KubeSource` as the daemon runs it. Start to programmed runs from starting the watchers to
//! the first full sync written, and includes the mock server making and encoding its list
//! pages in this process (so does the peak RSS). A change is an EndpointSlice MODIFIED event, timed from sending it to its map
//! writes: watch stream, reflector store, nudge, rebuild of the service the event names.

use std::time::Instant;

use lb_user::{
    config::NodeConfig,
    control::ControlPlane,
    kube_source::{
        Changes, KubeSource,
        api_server::{self, NODE, PATIENCE, Resource},
    },
    loader,
    maps::KernelMaps,
    reconcile::{DatapathState, Reconciler, SlotMode},
};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::{
    CHANGES, ENDPOINTS, NODE_CONFIG, capacities, changed_service, cluster_ip, endpoint, row_json,
};

/// kube-rs's list page size.
const PAGE: usize = 500;

pub fn measure(size: usize) -> String {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a Tokio runtime")
        .block_on(run(size))
}

fn service(i: usize) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": { "name": format!("svc-{i}"), "namespace": "bench", "resourceVersion": "1" },
        "spec": {
            "clusterIP": cluster_ip(i),
            "ports": [{ "port": 80, "protocol": "TCP", "targetPort": 8080 }],
        },
    })
}

fn slice(i: usize, generation: usize) -> Value {
    let endpoints: Vec<Value> = (0..ENDPOINTS)
        .map(|e| {
            let (address, node) = endpoint(i, e, generation);
            json!({ "addresses": [address], "nodeName": node, "conditions": { "ready": true } })
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": format!("svc-{i}-a"),
            "namespace": "bench",
            "resourceVersion": (1000 + generation).to_string(),
            "labels": { "kubernetes.io/service-name": format!("svc-{i}") },
        },
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{ "name": "", "port": 8080, "protocol": "TCP" }],
    })
}

fn node() -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": { "name": NODE, "resourceVersion": "1" },
        "status": { "addresses": [{ "type": "InternalIP", "address": "192.168.1.63" }] },
    })
}

/// Answers the list of `resource` in pages of kube-rs's page size, as the API server does,
/// each page's objects made when it is asked for.
async fn list_in_pages(
    server: &mut api_server::ApiServer,
    resource: Resource,
    resource_version: &str,
    size: usize,
    object: impl Fn(usize) -> Value,
) {
    let pages = size.div_ceil(PAGE).max(1);
    for page in 0..pages {
        let request = server.next(resource).await;
        let token = |page: usize| format!("page-{page}");
        request.assert_list((page > 0).then(|| token(page)).as_deref());
        let items: Vec<Value> = (page * PAGE..((page + 1) * PAGE).min(size)).map(&object).collect();
        let next = (page + 1 < pages).then(|| token(page + 1));
        request.answer_list(resource_version, &items, next.as_deref());
    }
}

async fn run(size: usize) -> String {
    let node_config = NodeConfig::from_yaml_str(NODE_CONFIG).expect("node config");
    let capacities = capacities(size);
    let mut ebpf = loader::load_private_with(&capacities).expect("load the datapath");
    let mut maps = KernelMaps::take_from(&mut ebpf).expect("maps");
    let (client, mut server) = api_server::pair();
    let (nudge, mut nudges) = mpsc::channel(16);

    let started = Instant::now();
    let source = KubeSource::start(client, NODE, nudge);
    list_in_pages(&mut server, Resource::Services, "100", size, service).await;
    list_in_pages(&mut server, Resource::Slices, "200", size, |i| slice(i, 0)).await;
    server.list(Resource::Node, "300", &[node()]).await;
    // Held open: a closed watch would make the watchers re-list.
    let _services = server.watch(Resource::Services, "100").await;
    let mut slice_events = server.watch(Resource::Slices, "200").await;
    let _node = server.watch(Resource::Node, "300").await;
    tokio::time::timeout(PATIENCE, source.ready())
        .await
        .expect("listed in time")
        .expect("watchers running");
    let listed = started.elapsed();
    assert_eq!(source.take_changes(), Changes::Everything, "the first lists change anything");
    let models = source.service_models(&node_config);
    let modelled = started.elapsed();
    let reconciler =
        Reconciler::with_capacities(DatapathState::default(), SlotMode::PerBackend, &capacities);
    let mut plane = ControlPlane::new(reconciler);
    let writes = plane.sync_all(models, &node_config, &mut maps).expect("reconcile").writes;
    let programmed = started.elapsed();
    while nudges.try_recv().is_ok() {}

    let mut latencies = Vec::with_capacity(CHANGES);
    for change in 1..=CHANGES {
        let event = slice(changed_service(change, size), change);
        let started = Instant::now();
        slice_events.modified(event).await;
        tokio::time::timeout(PATIENCE, nudges.recv())
            .await
            .expect("a nudge after the event")
            .expect("the source holds the sender");
        let Changes::Services(changed) = source.take_changes() else {
            panic!("the source re-listed during the benchmark");
        };
        let report = plane
            .sync_services(
                changed,
                |name| source.service_objects(name, &node_config).model(name),
                &mut maps,
            )
            .expect("reconcile");
        maps.purge(&report.forget).expect("purge flows");
        latencies.push(started.elapsed());
        assert!(report.writes > 0, "a change writes something");
    }
    row_json(
        "\"source\": \"kubernetes\", ",
        size,
        (listed, modelled, programmed),
        writes,
        &mut latencies,
    )
}
