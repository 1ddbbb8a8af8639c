//! The source against the scripted API server: lists, watch events, bookmarks, 410 Gone and an
//! outage. Time is paused, so the watchers' backoff passes instantly and a missing request or
//! nudge fails the test after [`PATIENCE`] of virtual time rather than hanging it.

use std::{collections::BTreeSet, net::Ipv4Addr};

use futures::FutureExt as _;
use http::StatusCode;
use serde_json::{Value, json};
use tokio::sync::mpsc::{self, error::TryRecvError};

use super::{
    Changes, KubeSource,
    api_server::{self, ApiServer, NODE, PATIENCE, Resource, WatchStream},
    node_ipv4_addresses,
};
use crate::{config::NodeConfig, model::ServiceName};

/// The source keeps no resourceVersions: the version also numbers the service's port, so that
/// the tests can tell which version the source holds.
fn service(name: &str, resource_version: &str) -> Value {
    let port = port(resource_version);
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": { "name": name, "namespace": "default", "resourceVersion": resource_version },
        "spec": { "type": "ClusterIP", "clusterIP": "10.96.0.10", "ports": [{ "port": port }] },
    })
}

/// The version also numbers the slice's port, that its endpoints take.
fn slice(name: &str, service: &str, resource_version: &str) -> Value {
    let port = port(resource_version);
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": "default",
            "resourceVersion": resource_version,
            "labels": { "kubernetes.io/service-name": service },
        },
        "addressType": "IPv4",
        "endpoints": [{ "addresses": ["10.244.1.5"], "conditions": { "ready": true } }],
        "ports": [{ "port": port }],
    })
}

fn node(resource_version: &str, internal_ip: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": { "name": NODE, "resourceVersion": resource_version },
        "status": { "addresses": [{ "type": "InternalIP", "address": internal_ip }] },
    })
}

fn port(resource_version: &str) -> u16 {
    resource_version.parse().expect("a resourceVersion that is a port number")
}

fn node_config() -> NodeConfig {
    NodeConfig::from_yaml_str(
        "nodeName: node-a\nnodeIPs: [192.168.1.63]\nclusterCIDR: 10.244.0.0/16\nserviceCIDR: 10.96.0.0/12",
    )
    .expect("node configuration")
}

/// `name@resourceVersion` of each Service the source holds, by name.
fn services(source: &KubeSource) -> Vec<String> {
    let models = source.service_models(&node_config());
    models
        .iter()
        .filter_map(|(name, model)| Some(format!("{}@{}", name.name, model.ports.first()?.port)))
        .collect()
}

/// `service@resourceVersion` of the slices the source holds, seen through the endpoints of
/// their service's port, by service name.
fn slices(source: &KubeSource) -> Vec<String> {
    let models = source.service_models(&node_config());
    let endpoints = models.iter().flat_map(|(name, model)| {
        let ports = model.ports.iter().flat_map(|port| &port.endpoints);
        ports.map(|endpoint| format!("{}@{}", name.name, endpoint.port))
    });
    endpoints.collect()
}

/// A source started on a scripted server.
struct Harness {
    source: KubeSource,
    server: ApiServer,
    nudges: mpsc::Receiver<()>,
}

/// The watches [`Harness::listed`] leaves open.
struct Watches {
    services: WatchStream,
    slices: WatchStream,
    node: WatchStream,
}

impl Harness {
    fn start() -> Self {
        let (client, server) = api_server::pair();
        // Roomy enough that no nudge is dropped: the tests count them.
        let (nudge, nudges) = mpsc::channel(64);
        Self { source: KubeSource::start(client, NODE, nudge), server, nudges }
    }

    /// Lists Services web and dns (at 100), slice web-abcde (at 200) and the node (at 300, at
    /// 192.168.1.63), opens the three watches, and takes the nudges of the lists.
    async fn listed(&mut self) -> Watches {
        let services = [service("web", "90"), service("dns", "95")];
        self.server.list(Resource::Services, "100", &services).await;
        self.server.list(Resource::Slices, "200", &[slice("web-abcde", "web", "190")]).await;
        self.server.list(Resource::Node, "300", &[node("290", "192.168.1.63")]).await;
        let watches = Watches {
            services: self.server.watch(Resource::Services, "100").await,
            slices: self.server.watch(Resource::Slices, "200").await,
            node: self.server.watch(Resource::Node, "300").await,
        };
        self.source.ready().now_or_never().expect("ready once listed").expect("watchers running");
        while self.nudges.try_recv().is_ok() {}
        watches
    }

    async fn nudged(&mut self, after: &str) {
        tokio::time::timeout(PATIENCE, self.nudges.recv())
            .await
            .unwrap_or_else(|_| panic!("no nudge after {after}"))
            .expect("the source holds the sender");
    }

    fn assert_not_nudged(&mut self, during: &str) {
        assert_eq!(self.nudges.try_recv(), Err(TryRecvError::Empty), "nudged during {during}");
    }

    fn services(&self) -> Vec<String> {
        services(&self.source)
    }

    fn slices(&self) -> Vec<String> {
        slices(&self.source)
    }
}

#[tokio::test(start_paused = true)]
async fn initial_list_makes_the_source_ready_with_the_listed_objects() {
    let Harness { source, mut server, mut nudges } = Harness::start();
    let listed = [service("web", "90"), service("dns", "95")];
    server.list(Resource::Services, "100", &listed).await;
    // Each watch follows its completed list: once it arrives, that store is filled.
    let _services = server.watch(Resource::Services, "100").await;
    assert!(
        source.ready().now_or_never().is_none(),
        "ready before the EndpointSlices were listed: the daemon would unprogram their backends"
    );
    server.list(Resource::Slices, "200", &[slice("web-abcde", "web", "190")]).await;
    tokio::time::timeout(PATIENCE, source.ready())
        .await
        .expect("ready once Services and EndpointSlices are listed")
        .expect("watchers running");
    server.list(Resource::Node, "300", &[node("290", "192.168.1.63")]).await;
    let _slices = server.watch(Resource::Slices, "200").await;
    let _node = server.watch(Resource::Node, "300").await;

    assert_eq!(services(&source), ["dns@95", "web@90"], "sorted by name");
    assert_eq!(slices(&source), ["web@190"]);
    let (node, addresses) = source.node();
    let node = node.expect("the node is listed");
    assert_eq!(node_ipv4_addresses(&node), [Ipv4Addr::new(192, 168, 1, 63)]);
    assert_eq!(addresses, [Ipv4Addr::new(192, 168, 1, 63)]);
    let mut lists = 0;
    while nudges.try_recv().is_ok() {
        lists += 1;
    }
    assert_eq!(lists, 3, "one nudge per completed list");
}

#[tokio::test(start_paused = true)]
async fn watch_events_change_the_objects_and_nudge() {
    let mut h = Harness::start();
    let mut watches = h.listed().await;

    watches.services.added(service("api", "101")).await;
    h.nudged("ADDED").await;
    assert_eq!(h.services(), ["api@101", "dns@95", "web@90"], "after ADDED api");

    watches.services.modified(service("web", "102")).await;
    h.nudged("MODIFIED").await;
    assert_eq!(h.services(), ["api@101", "dns@95", "web@102"], "after MODIFIED web");

    watches.services.deleted(service("dns", "103")).await;
    h.nudged("DELETED").await;
    assert_eq!(h.services(), ["api@101", "web@102"], "after DELETED dns");

    watches.slices.added(slice("api-fghij", "api", "201")).await;
    h.nudged("ADDED slice").await;
    assert_eq!(h.slices(), ["api@201", "web@190"]);

    watches.node.modified(node("301", "192.168.1.64")).await;
    h.nudged("MODIFIED node").await;
    let (node, _) = h.source.node();
    let node = node.expect("the node is still there");
    assert_eq!(node_ipv4_addresses(&node), [Ipv4Addr::new(192, 168, 1, 64)], "re-addressed node");
    h.assert_not_nudged("nothing: one nudge per event");
}

#[tokio::test(start_paused = true)]
async fn the_node_addresses_outlive_a_node_without_any() {
    let mut h = Harness::start();
    assert!(h.source.node_addressed().now_or_never().is_none(), "no Node listed yet");
    let mut watches = h.listed().await;
    tokio::time::timeout(PATIENCE, h.source.node_addressed())
        .await
        .expect("addressed once the Node is listed with an InternalIP");
    assert_eq!(h.source.node().1, [Ipv4Addr::new(192, 168, 1, 63)]);

    // Two events before anyone reads the addresses: re-addressed, then no address at all.
    watches.node.modified(node("302", "192.168.1.64")).await;
    h.nudged("MODIFIED node").await;
    let mut unaddressed = node("303", "192.168.1.64");
    unaddressed["status"]["addresses"] = json!([{ "type": "Hostname", "address": NODE }]);
    watches.node.modified(unaddressed.clone()).await;
    h.nudged("MODIFIED node").await;
    let known = [Ipv4Addr::new(192, 168, 1, 64)];
    let (node, addresses) = h.source.node();
    assert!(node.is_some());
    assert_eq!(addresses, known, "a Node reporting no IPv4 address keeps the last ones");

    watches.node.deleted(unaddressed).await;
    h.nudged("DELETED node").await;
    assert_eq!(h.source.node(), (None, known.to_vec()), "nor does a Node gone for a moment");
}

/// A Node marked for deletion takes no load balancer traffic (health checks answer 503), and
/// still none once it is gone: kube-proxy judges a deleted Node by its last state too.
#[tokio::test(start_paused = true)]
async fn a_node_marked_for_deletion_stays_ineligible_once_deleted() {
    let mut h = Harness::start();
    assert!(h.source.node_eligible(), "eligible before the Node is seen");
    let mut watches = h.listed().await;
    assert!(h.source.node_eligible());
    assert_eq!(h.source.node_problem(), None, "the Node is listed");

    let mut marked = node("301", "192.168.1.63");
    marked["spec"] =
        json!({ "taints": [{ "key": "ToBeDeletedByClusterAutoscaler", "effect": "NoSchedule" }] });
    watches.node.modified(marked.clone()).await;
    h.nudged("MODIFIED node").await;
    assert!(!h.source.node_eligible(), "marked for deletion");
    watches.node.deleted(marked).await;
    h.nudged("DELETED node").await;
    assert!(!h.source.node_eligible(), "gone after it was marked");
    let problem = h.source.node_problem().expect("a missing Node is a problem to report");
    assert!(problem.starts_with(&format!("the Node {NODE:?} is gone")), "{problem}");

    // Registered again, unmarked: eligible, and nothing to report.
    watches.node.added(node("302", "192.168.1.63")).await;
    h.nudged("ADDED node").await;
    assert!(h.source.node_eligible(), "registered again");
    assert_eq!(h.source.node_problem(), None);
}

/// A Node deleted without being marked first (`kubectl delete node`) leaves the node eligible,
/// as kube-proxy, which judges the Node's last state.
#[tokio::test(start_paused = true)]
async fn a_node_deleted_unmarked_stays_eligible() {
    let mut h = Harness::start();
    let mut watches = h.listed().await;
    watches.node.deleted(node("301", "192.168.1.63")).await;
    h.nudged("DELETED node").await;
    assert!(h.source.node_eligible());
    assert!(h.source.node_problem().is_some(), "but reported");
}

/// A node name that no Node carries (a hostname where the Node is named otherwise) leaves every
/// endpoint remote: it is reported once the Node list is complete without it.
#[tokio::test(start_paused = true)]
async fn a_node_name_no_node_carries_is_reported() {
    let mut h = Harness::start();
    assert_eq!(h.source.node_problem(), None, "not before the Node list completes");
    h.server.list(Resource::Node, "300", &[]).await;
    let mut node_watch = h.server.watch(Resource::Node, "300").await;
    let problem = h.source.node_problem().expect("reported once listed without it");
    assert!(problem.starts_with(&format!("no Node named {NODE:?}")), "{problem}");
    assert!(h.source.node_eligible(), "never seen: nothing says otherwise");

    while h.nudges.try_recv().is_ok() {}
    node_watch.added(node("301", "192.168.1.63")).await;
    h.nudged("ADDED node").await;
    assert_eq!(h.source.node_problem(), None, "cleared once the Node appears");
}

#[tokio::test(start_paused = true)]
async fn a_bookmark_changes_nothing_and_the_next_watch_resumes_from_it() {
    let mut h = Harness::start();
    let mut watches = h.listed().await;

    watches.services.bookmark("150").await;
    // The API server ends every watch after its timeoutSeconds; the watcher watches again.
    watches.services.close();
    let resumed = h.server.next(Resource::Services).await;
    resumed.assert_watch("150");
    let _watch = resumed.answer_watch();

    assert_eq!(h.services(), ["dns@95", "web@90"], "a bookmark carries no object");
    h.assert_not_nudged("a bookmark and a resumed watch");
}

#[tokio::test(start_paused = true)]
async fn gone_relists_and_swaps_the_store_only_when_the_list_completes() {
    let mut h = Harness::start();
    let mut watches = h.listed().await;

    watches.services.gone().await;
    let first_page = h.server.next(Resource::Services).await;
    first_page.assert_list(None);
    assert_eq!(h.services(), ["dns@95", "web@90"], "the re-list started: the store still holds");
    first_page.answer_list("500", &[service("web", "450")], Some("page-2"));

    let second_page = h.server.next(Resource::Services).await;
    second_page.assert_list(Some("page-2"));
    assert_eq!(h.services(), ["dns@95", "web@90"], "half the new list is not a state to show");
    h.assert_not_nudged("an incomplete re-list");
    second_page.answer_list("500", &[service("api", "460")], None);

    h.nudged("the re-list").await;
    assert_eq!(h.services(), ["api@460", "web@450"], "the new list replaced the old one whole");
    let _watch = h.server.watch(Resource::Services, "500").await;
    assert_eq!(h.slices(), ["web@190"], "other stores untouched");
}

#[tokio::test(start_paused = true)]
async fn an_outage_keeps_the_last_known_objects_until_a_relist_completes() {
    let mut h = Harness::start();
    let mut watches = h.listed().await;
    watches.services.added(service("api", "101")).await;
    h.nudged("ADDED").await;
    let known = ["api@101", "dns@95", "web@90"];

    // The connection drops and the API server stays unreachable: the watcher retries, with
    // backoff, from the last resourceVersion it saw.
    watches.services.close();
    for attempt in 1..=3 {
        let request = h.server.next(Resource::Services).await;
        request.assert_watch("101");
        request.refuse();
        assert_eq!(h.services(), known, "after refused watch {attempt}: no flush");
    }
    let request = h.server.next(Resource::Services).await;
    request.assert_watch("101");
    request.answer_status(StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailable");
    assert_eq!(h.services(), known, "after a 503: no flush");
    h.source.ready().now_or_never().expect("still ready").expect("watchers running");

    // Back, but the outage outlasted the watch window: 410 Gone, and the first re-list fails too.
    let mut watch = h.server.watch(Resource::Services, "101").await;
    watch.gone().await;
    let failed = h.server.next(Resource::Services).await;
    failed.assert_list(None);
    failed.refuse();
    assert_eq!(h.services(), known, "after a failed re-list: no flush");
    h.assert_not_nudged("the outage");

    // While we were away dns was deleted and db added.
    let relist = h.server.next(Resource::Services).await;
    relist.assert_list(None);
    let now = [service("api", "101"), service("web", "90"), service("db", "610")];
    relist.answer_list("700", &now, None);
    h.nudged("the re-list").await;
    assert_eq!(h.services(), ["api@101", "db@610", "web@90"], "converged on the new list");
    let _watch = h.server.watch(Resource::Services, "700").await;
}

/// A [`service`] or [`slice`] whose port is a string: JSON that no v1 Service or EndpointSlice
/// decodes from.
fn undecodable(mut object: Value) -> Value {
    let ports = if object.get("spec").is_some() {
        &mut object["spec"]["ports"]
    } else {
        &mut object["ports"]
    };
    ports[0]["port"] = json!("eighty");
    object
}

/// kube-rs decodes a list page whole: one object it cannot read would fail every list, and a
/// daemon started then would program nothing.
#[tokio::test(start_paused = true)]
async fn an_undecodable_object_in_a_list_is_named_and_left_out_alone() {
    let mut h = Harness::start();
    let services = [service("web", "90"), undecodable(service("bad", "91")), service("dns", "95")];
    h.server.list(Resource::Services, "100", &services).await;
    let slices = [slice("web-abcde", "web", "190"), undecodable(slice("dns-xyz", "dns", "191"))];
    h.server.list(Resource::Slices, "200", &slices).await;
    tokio::time::timeout(PATIENCE, h.source.ready())
        .await
        .expect("ready: the lists completed")
        .expect("watchers running");

    assert_eq!(h.services(), ["dns@95", "web@90"]);
    assert_eq!(h.slices(), ["web@190"]);
    let problems = h.source.decode_problems();
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert!(
        problems[0].starts_with("Service default/bad: not readable as a Service (")
            && problems[0].contains("eighty")
            && problems[0].ends_with("; left out"),
        "{problems:?}"
    );
    assert!(problems[1].starts_with("EndpointSlice default/dns-xyz: "), "{problems:?}");
}

/// A known object that a watch event brings back undecodable keeps its last readable version
/// programmed, and is named until a readable version or its deletion comes.
#[tokio::test(start_paused = true)]
async fn an_undecodable_version_keeps_the_last_readable_one() {
    let mut h = Harness::start();
    let mut watches = h.listed().await;

    watches.services.modified(undecodable(service("web", "102"))).await;
    h.nudged("MODIFIED web, undecodable").await;
    assert_eq!(h.services(), ["dns@95", "web@90"], "the last readable version stays");
    let problems = h.source.decode_problems();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0].starts_with("Service default/web: ")
            && problems[0].ends_with("; its last readable version stays in effect"),
        "{problems:?}"
    );
    watches.slices.modified(undecodable(slice("web-abcde", "web", "202"))).await;
    h.nudged("MODIFIED slice, undecodable").await;
    assert_eq!(h.slices(), ["web@190"]);
    assert_eq!(h.source.decode_problems().len(), 2);

    watches.services.modified(service("web", "103")).await;
    h.nudged("MODIFIED web").await;
    assert_eq!(h.services(), ["dns@95", "web@103"]);
    watches.slices.deleted(undecodable(slice("web-abcde", "web", "203"))).await;
    h.nudged("DELETED slice").await;
    assert_eq!(h.slices(), Vec::<String>::new(), "deleted, though unreadable");
    assert_eq!(h.source.decode_problems(), Vec::<String>::new(), "nothing left to report");

    // A relist that returns it unreadable again keeps it too.
    watches.services.modified(undecodable(service("web", "104"))).await;
    h.nudged("MODIFIED web, undecodable").await;
    watches.services.gone().await;
    let relist = h.server.next(Resource::Services).await;
    relist.assert_list(None);
    relist.answer_list("500", &[undecodable(service("web", "104")), service("db", "460")], None);
    h.nudged("the re-list").await;
    assert_eq!(h.services(), ["db@460", "web@103"], "dns gone, web kept as last readable");
    assert_eq!(h.source.decode_problems().len(), 1);
}

/// The daemon holds the source across awaits in spawned tasks.
const _: () = {
    const fn shareable<T: Send + Sync>() {}
    shareable::<KubeSource>();
};

/// What the daemon rebuilds after an event: the service it names, with the objects it has now.
#[tokio::test(start_paused = true)]
async fn watch_events_name_the_services_they_change() {
    let mut h = Harness::start();
    let mut watches = h.listed().await;
    assert_eq!(h.source.take_changes(), Changes::Everything, "the first lists change anything");
    assert_eq!(h.source.take_changes(), Changes::Services(BTreeSet::new()), "taken");
    let node = node_config();

    watches.slices.added(slice("api-fghij", "api", "201")).await;
    h.nudged("ADDED slice").await;
    watches.services.added(service("api", "101")).await;
    h.nudged("ADDED service").await;
    assert_eq!(h.source.take_changes(), Changes::Services(names(&["api"])));
    let api = ServiceName::new("default", "api");
    let model = h.source.service_objects(&api, &node).model(&api);
    let endpoints: Vec<String> =
        model.ports.iter().flat_map(|p| &p.endpoints).map(ToString::to_string).collect();
    assert_eq!(endpoints, ["10.244.1.5:201"], "the service with its slice");

    // A slice moved to another service changes both; a deleted one its last owner.
    watches.slices.modified(slice("api-fghij", "web", "202")).await;
    h.nudged("MODIFIED slice").await;
    assert_eq!(h.source.take_changes(), Changes::Services(names(&["api", "web"])));
    let model = h.source.service_objects(&api, &node).model(&api);
    assert!(model.ports.iter().all(|p| p.endpoints.is_empty()), "{model:?}");
    watches.slices.deleted(slice("api-fghij", "web", "203")).await;
    h.nudged("DELETED slice").await;
    assert_eq!(h.source.take_changes(), Changes::Services(names(&["web"])));
    let web = ServiceName::new("default", "web");
    let model = h.source.service_objects(&web, &node).model(&web);
    let endpoints: usize = model.ports.iter().map(|p| p.endpoints.len()).sum();
    assert_eq!(endpoints, 1, "web keeps web-abcde's endpoint only");
}

fn names(services: &[&str]) -> BTreeSet<ServiceName> {
    services.iter().map(|name| ServiceName::new("default", *name)).collect()
}

/// The source keeps each endpoint's node name, not whether it is local: a model built for
/// another node configuration (the Node renamed, say) sees the endpoints from that node.
#[tokio::test(start_paused = true)]
async fn which_endpoints_are_local_is_decided_when_the_model_is_built() {
    let mut h = Harness::start();
    let mut watches = h.listed().await;
    let mut two_nodes = slice("web-abcde", "web", "191");
    two_nodes["endpoints"] = json!([
        { "addresses": ["10.244.1.5"], "nodeName": "node-a" },
        { "addresses": ["10.244.2.5"], "nodeName": "node-b" },
    ]);
    watches.slices.modified(two_nodes).await;
    h.nudged("MODIFIED slice").await;

    let web = ServiceName::new("default", "web");
    let local = |node: &NodeConfig| -> Vec<String> {
        let model = h.source.service_objects(&web, node).model(&web);
        let endpoints = model.ports.iter().flat_map(|p| &p.endpoints);
        endpoints.filter(|e| e.node_local).map(ToString::to_string).collect()
    };
    let node_a = node_config();
    let node_b = NodeConfig { node_name: "node-b".to_owned(), ..node_config() };
    assert_eq!(local(&node_a), ["10.244.1.5:191"]);
    assert_eq!(local(&node_b), ["10.244.2.5:191"]);
}

/// A re-list of slices replaces them whole, and the index of which slices each service has
/// follows it: a slice missing from the new list no longer counts for its service.
#[tokio::test(start_paused = true)]
async fn a_slice_relist_replaces_the_slices_of_every_service() {
    let mut h = Harness::start();
    let mut watches = h.listed().await;
    watches.services.added(service("api", "101")).await;
    h.nudged("ADDED service").await;
    watches.slices.added(slice("api-fghij", "api", "201")).await;
    h.nudged("ADDED slice").await;
    assert_eq!(h.slices(), ["api@201", "web@190"]);

    watches.slices.gone().await;
    // While we were away api-fghij went and web got a second slice.
    let now = [slice("web-abcde", "web", "190"), slice("web-klmno", "web", "290")];
    h.server.list(Resource::Slices, "300", &now).await;
    h.nudged("the re-list").await;
    assert_eq!(h.source.take_changes(), Changes::Everything, "a re-list may change anything");
    assert_eq!(h.slices(), ["web@190", "web@290"], "api lost its slice; web has both");
    let _watch = h.server.watch(Resource::Slices, "300").await;
}
