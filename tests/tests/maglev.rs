//! Maglev tables through the real programs: two nodes that see the same endpoints (listed in a
//! different order, each with its own local ones) send every flow to the same backend, and an
//! endpoint leaving moves hardly any flow but its own. With one slot per backend, neither
//! holds: the same checks against that mode show that they tell the two apart.

use std::{collections::BTreeMap, net::Ipv4Addr, path::PathBuf};

use lb_user::{
    config::NodeConfig,
    manifest,
    model::{self, Model, Protocol},
    trace::{Entry, Request, Tracer},
};

/// my-nginx's ClusterIP and port in the seed.
const MY_NGINX: (Ipv4Addr, u16) = (Ipv4Addr::new(10, 96, 45, 10), 80);
/// Flows traced per datapath: source ports of one pod client.
const FLOWS: u16 = 400;
const TABLE_SIZE: u32 = 16_381;

fn seed_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scenarios/seed")
}

/// The seed as node `node_name` sees it, with my-nginx grown to `pods` endpoints; Maglev
/// tables of [`TABLE_SIZE`] when `maglev`.
fn node_view(node_name: &str, pods: u8, maglev: bool) -> (Model, NodeConfig) {
    let mut node = NodeConfig::from_file(&seed_dir().join("node.yaml")).expect("seed node.yaml");
    node_name.clone_into(&mut node.node_name);
    node.maglev_table_size = maglev.then_some(TABLE_SIZE);
    let objects = manifest::load_file(&seed_dir().join("manifests.yaml"));
    assert!(objects.problems.is_empty(), "{:?}", objects.problems);
    let mut model = model::build(&objects.services, &objects.slices, &node);
    let port = model
        .ports
        .iter_mut()
        .find(|p| (p.cluster_ip, p.port) == MY_NGINX)
        .expect("my-nginx in the seed");
    let template = port.endpoints[0].clone();
    port.endpoints = (1..=pods)
        .map(|n| {
            let mut endpoint = template.clone();
            endpoint.ip = Ipv4Addr::new(10, 244, 7, n);
            // Half of them on this node: each node has its own local endpoints.
            endpoint.node_local = (n % 2 == 0) == (node_name == "node-a");
            endpoint
        })
        .collect();
    (model, node)
}

/// The backend each of [`FLOWS`] new flows to my-nginx gets, by source port, on a fresh
/// datapath programmed with `model`.
fn backends(model: Model, node: &NodeConfig) -> BTreeMap<u16, String> {
    let mut tracer = Tracer::new(model, node).expect("a private datapath");
    (40_000..40_000 + FLOWS)
        .map(|src_port| {
            let request = Request {
                entry: Entry::Pod,
                protocol: Protocol::Tcp,
                src: Ipv4Addr::new(10, 244, 3, 3),
                src_port,
                dst: MY_NGINX.0,
                dst_port: MY_NGINX.1,
            };
            let outcome = tracer.trace(&request).expect("trace");
            assert_eq!(outcome.verdict, "forward", "{outcome:?}");
            (src_port, outcome.backend.expect("a forward has a backend"))
        })
        .collect()
}

/// How many of the flows both maps hold go to the same backend in both.
fn agreeing(a: &BTreeMap<u16, String>, b: &BTreeMap<u16, String>) -> usize {
    a.iter().filter(|(port, backend)| b.get(port) == Some(backend)).count()
}

/// Node A's and node B's choices for five my-nginx pods (B lists them in reverse order), and
/// node B's once the fifth has gone.
fn choices(maglev: bool) -> [BTreeMap<u16, String>; 3] {
    let (model_a, node_a) = node_view("node-a", 5, maglev);
    let (mut model_b, node_b) = node_view("node-b", 5, maglev);
    let reversed = |model: &mut Model| {
        for port in &mut model.ports {
            port.endpoints.reverse();
        }
    };
    reversed(&mut model_b);
    let (mut model_b_after, _) = node_view("node-b", 4, maglev);
    reversed(&mut model_b_after);
    [backends(model_a, &node_a), backends(model_b, &node_b), backends(model_b_after, &node_b)]
}

#[test]
fn with_maglev_tables_nodes_agree_and_a_leaving_endpoint_moves_only_its_flows() {
    let [a, b, b_after] = choices(true);
    assert_eq!(agreeing(&a, &b), a.len(), "every flow on the same backend on both nodes");
    let pods: std::collections::BTreeSet<&String> = a.values().collect();
    assert_eq!(pods.len(), 5, "every pod gets flows: {pods:?}");

    let gone = "10.244.7.5:80";
    let staying: Vec<u16> = a.iter().filter(|(_, b)| *b != gone).map(|(p, _)| *p).collect();
    let moved = staying.iter().filter(|port| a[port] != b_after[port]).count();
    // Maglev moves a few percent of the other flows at most with a table this much larger
    // than the backend count; a modulo over the slots moves most of them.
    assert!(
        moved * 20 <= staying.len(),
        "{moved} of {} flows on staying pods moved",
        staying.len()
    );
    assert!(b_after.values().all(|backend| backend != gone), "none to the pod that left");
}

#[test]
fn with_one_slot_per_backend_the_same_checks_fail() {
    let [a, b, b_after] = choices(false);
    assert!(
        agreeing(&a, &b) * 2 < a.len(),
        "endpoints listed in another order send most flows elsewhere: {} of {} agree",
        agreeing(&a, &b),
        a.len()
    );
    let gone = "10.244.7.5:80";
    let staying: Vec<u16> = b.iter().filter(|(_, b)| *b != gone).map(|(p, _)| *p).collect();
    let moved = staying.iter().filter(|port| b[port] != b_after[port]).count();
    assert!(moved * 2 > staying.len(), "a modulo moves most flows: {moved} of {}", staying.len());
}
