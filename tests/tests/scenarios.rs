//! Every case of every scenario under tests/scenarios/ through `trace`: the real programs,
//! programmed from the scenario's manifests by the daemon's reconciler. For a forward case the
//! candidates must equal the expected set, every chosen backend must be in it, many source
//! ports together must reach every member (or exactly one, with affinity), and SNAT must be as
//! the case says.

use std::{
    collections::BTreeSet,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use lb_user::{
    config::NodeConfig,
    manifest, model,
    model::Protocol,
    scenario::{Case, read_cases},
    trace::{Entry, Outcome, Request, Tracer},
};

/// Source ports tried per case: enough that a uniform choice over a handful of backends
/// misses one with negligible probability (3 backends: 3 * (2/3)^64 < 1e-10).
const SOURCE_PORTS: u16 = 64;

fn scenarios() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("reading {}: {e}", root.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| path.join("packets.yaml").exists())
        .collect();
    dirs.sort();
    assert!(!dirs.is_empty(), "no scenario under {}", root.display());
    dirs
}

fn entry(case: &Case) -> Entry {
    match case.from.as_str() {
        "pod" => Entry::Pod,
        "external" => Entry::External,
        "host" => Entry::Host,
        other => panic!("{}: unknown from {other}", case.name),
    }
}

fn protocol(case: &Case) -> Protocol {
    match case.protocol() {
        Some(protocol @ (Protocol::Tcp | Protocol::Udp)) => protocol,
        _ => panic!("{}: protocol {} is not traced yet", case.name, case.proto),
    }
}

/// Checks the SNAT rule of a forward case against one outcome.
fn check_snat(
    case: &Case,
    outcome: &Outcome,
    node_ip: Ipv4Addr,
    local_backends: &BTreeSet<String>,
) {
    let backend = outcome.backend.as_deref().expect("a forward has a backend");
    let masqueraded = match outcome.snat.as_deref() {
        None => false,
        Some(ip) => {
            assert_eq!(ip, node_ip.to_string(), "{}: SNAT only to the node address", case.name);
            true
        }
    };
    let rule = case.snat.as_ref().map(|v| match v {
        serde_yaml::Value::Bool(b) => b.to_string(),
        serde_yaml::Value::String(s) => s.clone(),
        other => panic!("{}: snat {other:?}", case.name),
    });
    match rule.as_deref() {
        Some("true") => assert!(masqueraded, "{}: SNAT required", case.name),
        Some("false") => assert!(!masqueraded, "{}: SNAT forbidden", case.name),
        Some("when-remote") => {
            if !local_backends.contains(backend) {
                assert!(masqueraded, "{}: SNAT required towards remote {backend}", case.name);
            }
        }
        Some("when-hairpin") => {
            let hairpin = backend.split(':').next() == Some(case.src.to_string().as_str());
            assert_eq!(masqueraded, hairpin, "{}: SNAT iff hairpin (backend {backend})", case.name);
        }
        None => {}
        Some(other) => panic!("{}: unknown snat rule {other}", case.name),
    }
}

/// Runs the scenario in `dir`, with Maglev tables of `maglev_table_size` slots instead of one
/// slot per backend when given; the number of cases.
fn run_scenario(dir: &Path, maglev_table_size: Option<u32>) -> usize {
    let mut node = NodeConfig::from_file(&dir.join("node.yaml")).expect("node.yaml");
    node.maglev_table_size = maglev_table_size.or(node.maglev_table_size);
    let objects = manifest::load_file(&dir.join("manifests.yaml"));
    assert!(objects.problems.is_empty(), "{}: {:?}", dir.display(), objects.problems);
    let model = model::build(&objects.services, &objects.slices, &node);
    let local_backends: BTreeSet<String> = model
        .ports
        .iter()
        .flat_map(|p| p.endpoints.iter().filter(|e| e.node_local).map(ToString::to_string))
        .collect();
    let cases = read_cases(&dir.join("packets.yaml")).unwrap_or_else(|e| panic!("{e}"));
    let mut tracer = Tracer::new(model, &node).expect("a private datapath");
    let node_ip = node.node_ips[0];
    for case in &cases {
        let mut chosen = BTreeSet::new();
        for src_port in 40_000..40_000 + SOURCE_PORTS {
            let request = Request {
                entry: entry(case),
                protocol: protocol(case),
                src: case.src,
                src_port,
                dst: case.dst,
                dst_port: case.dport,
            };
            let outcome = tracer.trace(&request).unwrap_or_else(|e| panic!("{}: {e:?}", case.name));
            assert_eq!(outcome.verdict, case.expect, "{}: verdict ({outcome:?})", case.name);
            if case.expect != "forward" {
                continue;
            }
            let expected: BTreeSet<&str> = case.backends.iter().map(String::as_str).collect();
            let candidates: BTreeSet<&str> =
                outcome.candidates.iter().map(String::as_str).collect();
            assert_eq!(candidates, expected, "{}: candidates", case.name);
            let backend = outcome.backend.clone().expect("a forward has a backend");
            assert!(
                expected.contains(backend.as_str()),
                "{}: {backend} not a candidate",
                case.name
            );
            check_snat(case, &outcome, node_ip, &local_backends);
            chosen.insert(backend);
        }
        if case.expect == "forward" {
            if case.affinity {
                assert_eq!(
                    chosen.len(),
                    1,
                    "{}: affinity, one backend for the client: {chosen:?}",
                    case.name
                );
            } else {
                let expected: BTreeSet<String> = case.backends.iter().cloned().collect();
                assert_eq!(
                    chosen, expected,
                    "{}: every backend is chosen across source ports",
                    case.name
                );
            }
        }
    }
    cases.len()
}

#[test]
fn every_scenario_case_behaves_as_written() {
    let mut total = 0;
    for dir in scenarios() {
        total += run_scenario(&dir, None);
    }
    assert!(total > 0, "no case ran");
}

#[test]
fn every_scenario_case_behaves_as_written_with_maglev_tables() {
    let mut total = 0;
    for dir in scenarios() {
        total += run_scenario(&dir, Some(16_381));
    }
    assert!(total > 0, "no case ran");
}
