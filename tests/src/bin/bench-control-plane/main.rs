//! `cargo xtask bench control-plane`: the control plane from a manifest directory, for 1k, 10k
//! and 100k services with 10 endpoints each: time from start to fully programmed (read and
//! parse the directory, build the model, reconcile into the real kernel maps), peak RSS, and
//! the latency from one EndpointSlice change to its map update (p50/p99).
//!
//! Each service count runs in a child process of its own so that its peak RSS (`VmHWM`) is its
//! own. The change latency is measured the way the daemon applies a change: the file the
//! watcher names is re-read (a file holds 100 services), the services whose objects changed
//! are rebuilt and only their entries are diffed and written, and the flows of removed
//! backends are purged.
//!
//! The same services also come from the scripted API server of the Kubernetes source's tests
//! (see [`kubernetes`]): the `"kubernetes"` rows.

mod kubernetes;

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use lb_tests::netns::unique_name;
use lb_user::{
    config::NodeConfig,
    control::ControlPlane,
    loader::{self, Capacities},
    manifest,
    maps::KernelMaps,
    model::{ServiceModel, ServiceName},
    reconcile::{DatapathState, Reconciler, SlotMode},
};

const ENDPOINTS: usize = 10;
const SERVICES_PER_FILE: usize = 10;
const SIZES: [usize; 3] = [1_000, 10_000, 100_000];
/// Changes measured per size, and a wall-clock budget that only a regression would reach.
const CHANGES: usize = 1_000;
const CHANGE_BUDGET: Duration = Duration::from_secs(120);

const NODE_CONFIG: &str = "nodeName: node-a
nodeIPs: [192.168.1.63]
clusterCIDR: 10.128.0.0/9
serviceCIDR: 10.96.0.0/12
";

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let size_after = |flag: &str| {
        args.iter().position(|a| a == flag).map(|i| args[i + 1].parse::<usize>().expect("size"))
    };
    if let Some(size) = size_after("--one") {
        println!("{}", measure(size));
        return;
    }
    if let Some(size) = size_after("--kubernetes") {
        println!("{}", kubernetes::measure(size));
        return;
    }
    let mut manifests = Vec::new();
    let mut api = Vec::new();
    for size in SIZES {
        for (flag, rows) in [("--one", &mut manifests), ("--kubernetes", &mut api)] {
            let output =
                Command::new(&args[0]).args([flag, &size.to_string()]).output().expect("child run");
            assert!(
                output.status.success(),
                "{flag} {size}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
            rows.push(String::from_utf8_lossy(&output.stdout).trim().to_owned());
            eprintln!("{flag} {size} services: {}", rows.last().expect("row"));
        }
    }
    println!("from a manifest directory:");
    print_table(&manifests);
    println!("from the scripted API server:");
    print_table(&api);
    println!(
        "targets: 10k programmed <= 1 s, 100k <= 10 s; change p99 <= 10 ms at 100k; RSS <= 500 MiB at 100k"
    );
    let json = format!(
        "{{\"source\": \"manifests\", \"runs\": [{}], \"kubernetes\": {{\"source\": \"kubernetes\", \"runs\": [{}]}}}}\n",
        manifests.join(", "),
        api.join(", ")
    );
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&dir).expect("target/bench");
    std::fs::write(dir.join("control-plane.json"), json).expect("write JSON");
    println!("wrote target/bench/control-plane.json");
}

/// Address `index` counted from `base`.
fn ip(base: [u8; 4], index: usize) -> String {
    let value = u32::from_be_bytes(base) + u32::try_from(index).expect("fits");
    std::net::Ipv4Addr::from(value).to_string()
}

/// Endpoint `e` of service `i` at `generation`: its address and node. A change moves the
/// first endpoint to a fresh address.
fn endpoint(i: usize, e: usize, generation: usize) -> (String, &'static str) {
    let index = if e == 0 && generation > 0 { 8_000_000 - generation } else { i * ENDPOINTS + e };
    let node = if e.is_multiple_of(2) { "node-a" } else { "node-b" };
    (ip([10, 128, 0, 0], index), node)
}

/// The ClusterIP of service `i`.
fn cluster_ip(i: usize) -> String {
    ip([10, 96, 0, 1], i)
}

/// Map sizes for `size` services.
fn capacities(size: usize) -> Capacities {
    Capacities {
        services: Some(u32::try_from(2 * size + 1024).expect("fits")),
        backends: Some(u32::try_from(size * ENDPOINTS + 1024).expect("fits")),
        backend_slots: Some(u32::try_from(size * ENDPOINTS + 1024).expect("fits")),
        conntrack: Some(1024),
        affinity: Some(1024),
        fragments: Some(1024),
        source_ranges: None,
    }
}

/// Changes measured in one run; the services they touch.
fn changed_service(change: usize, size: usize) -> usize {
    (change * 7919) % size
}

/// Nearest-rank percentile of sorted `latencies`, in milliseconds: the smallest measured
/// latency with at least `percent` of them at or below it.
/// One size's JSON row: `prefix` (more fields, each followed by ", "), the start-up stages as
/// the elapsed times when parsing, modelling and programming ended, and the peak RSS of the
/// whole run (first sync and changes).
fn row_json(
    prefix: &str,
    size: usize,
    (parsed, modelled, programmed): (Duration, Duration, Duration),
    writes: usize,
    latencies: &mut [Duration],
) -> String {
    let rss_mib = peak_rss_mib();
    latencies.sort();
    format!(
        "{{{prefix}\"services\": {size}, \"endpoints_per_service\": {ENDPOINTS}, \"programmed_s\": {:.3}, \"parse_s\": {:.3}, \"model_s\": {:.3}, \"reconcile_s\": {:.3}, \"writes\": {writes}, \"peak_rss_mib\": {rss_mib:.1}, \"changes_measured\": {}, \"change_p50_ms\": {:.2}, \"change_p99_ms\": {:.2}}}",
        programmed.as_secs_f64(),
        parsed.as_secs_f64(),
        modelled.saturating_sub(parsed).as_secs_f64(),
        programmed.saturating_sub(modelled).as_secs_f64(),
        latencies.len(),
        percentile(latencies, 50),
        percentile(latencies, 99)
    )
}

fn percentile(latencies: &[Duration], percent: usize) -> f64 {
    let rank = (latencies.len() * percent).div_ceil(100).max(1);
    latencies[rank - 1].as_secs_f64() * 1e3
}

/// This process's peak RSS in MiB.
fn peak_rss_mib() -> f64 {
    // KiB to MiB; exact far beyond any RSS this machine can have.
    f64::from(u32::try_from(peak_rss_kib()).expect("RSS under 4 TiB")) / 1024.0
}

fn service_yaml(i: usize, generation: usize) -> String {
    let mut yaml = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i}, namespace: bench}}\nspec:\n  clusterIP: {}\n  ports:\n  - {{port: 80, protocol: TCP, targetPort: 8080}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: svc-{i}-a\n  namespace: bench\n  labels: {{kubernetes.io/service-name: svc-{i}}}\naddressType: IPv4\nendpoints:\n",
        cluster_ip(i)
    );
    for e in 0..ENDPOINTS {
        let (address, node) = endpoint(i, e, generation);
        let _ = writeln!(
            yaml,
            "- {{addresses: [{address}], nodeName: {node}, conditions: {{ready: true}}}}"
        );
    }
    yaml.push_str("ports:\n- {name: '', port: 8080, protocol: TCP}\n---\n");
    yaml
}

/// Writes file `file` of the directory and returns its path.
fn write_file(dir: &Path, file: usize, size: usize, changed: Option<(usize, usize)>) -> PathBuf {
    let mut text = String::new();
    for i in file * SERVICES_PER_FILE..((file + 1) * SERVICES_PER_FILE).min(size) {
        let generation = changed.filter(|(service, _)| *service == i).map_or(0, |(_, g)| g);
        text.push_str(&service_yaml(i, generation));
    }
    let path = dir.join(format!("services-{file:04}.yaml"));
    std::fs::write(&path, text).expect("write manifests");
    path
}

/// One change as the daemon applies it: the file the watcher named, the services whose
/// objects changed in it, their entries, the flows of their removed backends. Returns the
/// number of map writes.
fn apply_change(
    dir: &Path,
    file: PathBuf,
    cache: &mut manifest::CachedDir,
    plane: &mut ControlPlane,
    maps: &mut KernelMaps,
) -> usize {
    let changed = cache.refresh_files(dir, [file]).expect("a manifest file of the directory");
    let report = plane
        .sync_services(changed, |service| cache.objects(service).model(service), maps)
        .expect("reconcile");
    maps.purge(&report.forget).expect("purge flows");
    report.writes
}

fn measure(size: usize) -> String {
    let dir = std::env::temp_dir().join(unique_name("lb-bench-manifests"));
    std::fs::create_dir_all(&dir).expect("bench directory");
    let files = size.div_ceil(SERVICES_PER_FILE);
    for file in 0..files {
        write_file(&dir, file, size, None);
    }
    let node = NodeConfig::from_yaml_str(NODE_CONFIG).expect("node config");
    let capacities = capacities(size);
    let mut ebpf = loader::load_private_with(&capacities).expect("load the datapath");
    let mut maps = KernelMaps::take_from(&mut ebpf).expect("maps");

    // The first sync, stage by stage (the calls the daemon's full sync makes).
    let started = Instant::now();
    let reconciler =
        Reconciler::with_capacities(DatapathState::default(), SlotMode::PerBackend, &capacities);
    let mut plane = ControlPlane::new(reconciler);
    let mut cache = manifest::CachedDir::new(&node);
    cache.refresh(&dir).expect("manifest directory");
    assert_eq!(cache.problems().count(), 0, "{:?}", cache.problems().next());
    let parsed = started.elapsed();
    let services: Vec<(ServiceName, ServiceModel)> = cache
        .services()
        .iter()
        .map(|(name, objects)| ((*name).clone(), objects.model(name)))
        .collect();
    let modelled = started.elapsed();
    let writes = plane.sync_all(services, &node, &mut maps).expect("reconcile").writes;
    let programmed = started.elapsed();

    let mut latencies = Vec::new();
    let budget = Instant::now();
    for change in 1..=CHANGES {
        if budget.elapsed() > CHANGE_BUDGET {
            break;
        }
        let service = changed_service(change, size);
        let file = write_file(&dir, service / SERVICES_PER_FILE, size, Some((service, change)));
        let started = Instant::now();
        let writes = apply_change(&dir, file, &mut cache, &mut plane, &mut maps);
        latencies.push(started.elapsed());
        assert!(writes > 0, "a change writes something");
    }
    let _ = std::fs::remove_dir_all(&dir);
    row_json("", size, (parsed, modelled, programmed), writes, &mut latencies)
}

fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
        .expect("VmHWM")
}

fn print_table(rows: &[String]) {
    println!(
        "{:>9} {:>14} {:>14} {:>10} {:>12} {:>12}",
        "services", "programmed", "peak RSS", "changes", "change p50", "change p99"
    );
    for row in rows {
        let field = |key: &str| -> String {
            let start = row.find(&format!("\"{key}\": ")).expect("key") + key.len() + 4;
            row[start..].split([',', '}']).next().expect("value").trim().to_owned()
        };
        println!(
            "{:>9} {:>12} s {:>10} MiB {:>10} {:>9} ms {:>9} ms",
            field("services"),
            field("programmed_s"),
            field("peak_rss_mib"),
            field("changes_measured"),
            field("change_p50_ms"),
            field("change_p99_ms")
        );
    }
}
