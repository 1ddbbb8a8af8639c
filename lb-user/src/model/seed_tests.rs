//! The seed scenario's cases, checked against the model: for each first packet, the service port
//! it addresses and the backends it may reach. The datapath decides the rest (SNAT, refusal or
//! drop, affinity); here only what the model must provide for it.

use std::{collections::BTreeSet, net::Ipv4Addr, path::PathBuf};

use super::{Endpoint, FrontendKind, Model, Protocol, Traffic, build};
use crate::{
    config::NodeConfig,
    manifest,
    scenario::{Case, read_cases},
};

fn seed_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/scenarios/seed")
}

fn seed() -> (Model, NodeConfig, Vec<Case>) {
    let dir = seed_dir();
    let node = NodeConfig::from_file(&dir.join("node.yaml"))
        .unwrap_or_else(|e| panic!("seed node.yaml: {e}"));
    let manifests = manifest::load_file(&dir.join("manifests.yaml"));
    assert!(manifests.problems.is_empty(), "seed manifests: {:#?}", manifests.problems);
    let cases = read_cases(&dir.join("packets.yaml")).unwrap_or_else(|e| panic!("{e}"));
    (build(&manifests.services, &manifests.slices, &node), node, cases)
}

fn protocol(case: &Case) -> Protocol {
    case.protocol().unwrap_or_else(|| panic!("{}: unknown proto {}", case.name, case.proto))
}

fn from_inside(case: &Case) -> bool {
    match case.from.as_str() {
        "external" => false,
        "pod" | "host" => true,
        other => panic!("{}: unknown from {other}", case.name),
    }
}

fn backends(model: &Model, case: &Case) -> Option<BTreeSet<String>> {
    let (port, kind) = model.lookup(case.dst, case.dport, protocol(case))?;
    let traffic = Traffic::of(kind, from_inside(case));
    Some(port.backends(traffic).iter().map(ToString::to_string).collect())
}

fn is_service_address(model: &Model, ip: Ipv4Addr) -> bool {
    model.ports.iter().any(|p| p.frontends(&model.node_port_addresses).iter().any(|f| f.ip == ip))
}

#[test]
fn forward_cases_reach_exactly_their_backends() {
    let (model, _, cases) = seed();
    let forward: Vec<_> = cases.iter().filter(|c| c.expect == "forward").collect();
    assert!(forward.len() >= 10, "the seed scenario has lost its forward cases");
    for case in forward {
        let found = backends(&model, case).unwrap_or_else(|| {
            panic!("{}: no service port at {}:{}", case.name, case.dst, case.dport)
        });
        let expected: BTreeSet<String> = case.backends.iter().cloned().collect();
        assert_eq!(found, expected, "{}", case.name);
    }
}

/// The model's side of the other verdicts: nothing to forward to, or no service there at all.
#[test]
fn other_cases_have_nothing_to_forward_to() {
    let (model, node, cases) = seed();
    for case in cases.iter().filter(|c| c.expect != "forward") {
        let found = backends(&model, case);
        match case.expect.as_str() {
            // No endpoints, or a service address on a port or protocol it does not serve.
            "reject" => assert!(
                found
                    .as_ref()
                    .map_or_else(|| is_service_address(&model, case.dst), BTreeSet::is_empty),
                "{}: {found:?}",
                case.name
            ),
            // An unallocated service-CIDR address, no endpoint allowed by the policy, or a source
            // outside loadBalancerSourceRanges.
            "drop" => {
                let denied_source = model.lookup(case.dst, case.dport, protocol(case)).is_some_and(
                    |(port, kind)| {
                        kind == FrontendKind::LoadBalancer
                            && !port.source_ranges.is_empty()
                            && !port.source_ranges.iter().any(|r| r.contains(&case.src))
                    },
                );
                let nothing = found.as_ref().is_none_or(BTreeSet::is_empty);
                assert!(denied_source || nothing, "{}: {found:?}", case.name);
                if found.is_none() {
                    assert!(node.service_cidr.contains(&case.dst), "{}", case.name);
                }
            }
            "pass" => {
                assert_eq!(found, None, "{}", case.name);
                assert!(!node.service_cidr.contains(&case.dst), "{}", case.name);
            }
            other => panic!("{}: unknown expect {other}", case.name),
        }
    }
}

#[test]
fn unprogrammed_services_are_skipped_with_a_reason() {
    let (model, _, _) = seed();
    for name in ["headless", "other-proxy", "client-svc"] {
        let object = format!("Service default/{name}");
        let skipped = model.skipped.iter().find(|s| s.object == object);
        assert!(skipped.is_some_and(|s| !s.reason.is_empty()), "{object} not skipped: {model:#?}");
        assert!(model.ports.iter().all(|p| p.id.name != name), "{name} programmed");
    }
    assert_eq!(model.skipped.len(), 3, "{:#?}", model.skipped);
    assert!(model.notes.is_empty(), "{:#?}", model.notes);
}

#[test]
fn policies_and_empty_services_leave_no_backends() {
    let (model, _, _) = seed();
    let port = |name: &str| {
        model
            .ports
            .iter()
            .find(|p| p.id.name == name)
            .unwrap_or_else(|| panic!("service {name} not in the model"))
    };
    for traffic in [Traffic::Internal, Traffic::External] {
        assert!(port("empty").backends(traffic).is_empty(), "empty, {traffic:?}");
    }
    assert_eq!(port("local-only-remote").backends(Traffic::External), Vec::<&Endpoint>::new());
    assert_eq!(port("local-only-remote").backends(Traffic::Internal).len(), 1);
    assert_eq!(port("itp-local").backends(Traffic::Internal), Vec::<&Endpoint>::new());
    assert_eq!(port("sticky").affinity_timeout_s, Some(600));
    assert_eq!(port("lb-web").source_ranges, ["203.0.113.0/25".parse().unwrap()]);
    assert_eq!(port("my-nginx-nodeport").node_port, Some(30380));
}
