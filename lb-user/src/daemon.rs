//! The node daemon: attach (or adopt) the datapath, then keep its maps equal to what the source
//! describes. Exiting leaves everything pinned and attached, so traffic keeps flowing and the
//! next daemon adopts the maps without a flush.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

use notify::{RecursiveMode, Watcher as _};
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use crate::{
    attach,
    config::NodeConfig,
    conntrack_gc,
    error::{Error, Result},
    kube_source::{self, KubeSource},
    manifest,
    maps::KernelMaps,
    metrics::{self, Metrics},
    model,
    pins::PinLayout,
    reconcile::{DatapathState, Reconciler, SlotMode},
};

/// Where Services and EndpointSlices come from.
#[derive(Clone, Debug)]
pub enum Source {
    /// A directory of manifests, watched for changes.
    Manifests(PathBuf),
    /// The Kubernetes API: this kubeconfig, or what kube-rs infers (KUBECONFIG, ~/.kube/config,
    /// in-cluster).
    Kubernetes { kubeconfig: Option<PathBuf> },
}

/// How the daemon runs.
#[derive(Clone, Debug)]
pub struct Options {
    pub source: Source,
    pub node_config: NodeConfig,
    /// Where to attach when no earlier daemon left a datapath pinned.
    pub targets: attach::Targets,
    pub pins: PinLayout,
    /// A full resync this often even without a change event, to repair what anything else may
    /// have changed in the maps.
    pub resync: Duration,
    /// Where to serve Prometheus metrics (`GET /metrics`), if anywhere.
    pub metrics_address: Option<SocketAddr>,
}

/// Runs until SIGINT or SIGTERM.
pub async fn run(options: Options) -> Result<()> {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(Error::io("SIGTERM handler"))?;
    let shutdown = async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = terminate.recv() => {}
        }
    };
    run_until(options, shutdown).await
}

/// Runs until `shutdown` completes (tests stop a daemon this way without signals).
pub async fn run_until(
    options: Options,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    let mut maps = attach_or_adopt(&options)?;
    let metrics = Metrics::new(&options.pins);
    if let Some(address) = options.metrics_address {
        metrics::serve(address, Arc::clone(&metrics)).await?;
        info!(%address, "serving metrics at /metrics");
    }
    let _collector = conntrack_gc::Collector::start(
        &options.pins,
        conntrack_gc::INTERVAL,
        Arc::clone(&metrics),
    )?;
    let programmed = DatapathState::read(&maps)?;
    let mut reconciler = reconciler_for(programmed, &options.node_config);
    let (nudge, mut nudges) = mpsc::channel(16);
    tokio::pin!(shutdown);
    let objects = match &options.source {
        Source::Manifests(dir) => {
            info!(manifests = %dir.display(), "running");
            Objects::Manifests {
                dir: dir.clone(),
                cache: std::cell::RefCell::default(),
                _watcher: watch(dir, nudge)?,
            }
        }
        Source::Kubernetes { kubeconfig } => {
            let client = kube_source::client(kubeconfig.as_deref()).await.map_err(source_error)?;
            let source = KubeSource::start(client, &options.node_config.node_name, nudge);
            // Reconciling before the first lists complete would unprogram everything an
            // earlier daemon left: wait, keeping the adopted state untouched meanwhile.
            info!("waiting for the initial lists of Services and EndpointSlices");
            tokio::select! {
                ready = source.ready() => ready.map_err(source_error)?,
                () = &mut shutdown => return Ok(()),
            }
            info!("running on the Kubernetes API");
            Objects::Kubernetes(Box::new(source))
        }
    };
    let mut reported = Reported::default();
    loop {
        let started = Instant::now();
        if let Err(error) =
            sync(&options, &objects, &mut reconciler, &mut maps, &mut reported, &metrics)
        {
            metrics.observe_failed_sync(started.elapsed());
            error!(error = %error_chain(&error), "reconcile failed; re-reading the maps and retrying at the next change");
            reconciler = reconciler_for(DatapathState::read(&maps)?, &options.node_config);
        }
        tokio::select! {
            _ = nudges.recv() => {
                // Editors write a file in several steps: let the burst settle.
                tokio::time::sleep(Duration::from_millis(20)).await;
                while nudges.try_recv().is_ok() {}
            }
            () = tokio::time::sleep(options.resync) => {}
            () = &mut shutdown => break,
        }
    }
    info!(pin_dir = %options.pins.root().display(), "exiting; the datapath stays attached and pinned");
    Ok(())
}

fn reconciler_for(programmed: DatapathState, node: &NodeConfig) -> Reconciler {
    Reconciler::with_capacities(programmed, SlotMode::of(node), &node.map_capacities)
}

/// Attaches a fresh datapath, or adopts the one pinned by an earlier daemon.
fn attach_or_adopt(options: &Options) -> Result<KernelMaps> {
    if options.pins.is_loaded() {
        info!(pin_dir = %options.pins.root().display(), "adopting the pinned datapath");
    } else {
        for attachment in attach::load_and_attach(
            &options.pins,
            &options.targets,
            &options.node_config.map_capacities,
        )? {
            info!(%attachment, "attached");
        }
    }
    KernelMaps::from_pins(&options.pins)
}

/// What the last sync reported, so that an unchanged problem is logged once, not every sync.
#[derive(Default)]
struct Reported(BTreeSet<String>);

impl Reported {
    /// Logs the lines not reported last time and remembers this set.
    fn update(&mut self, lines: BTreeSet<String>) {
        for line in lines.difference(&self.0) {
            warn!("{line}");
        }
        self.0 = lines;
    }
}

/// The running source's objects.
enum Objects {
    Manifests {
        dir: PathBuf,
        /// Parsed files by modification time: an edit re-parses only its file.
        cache: std::cell::RefCell<manifest::CachedDir>,
        _watcher: notify::RecommendedWatcher,
    },
    Kubernetes(Box<KubeSource>),
}

/// One reading of the source: objects, problems met reading them, and the node's addresses
/// if the source knows them.
struct Reading {
    services: Vec<Service>,
    slices: Vec<EndpointSlice>,
    problems: Vec<String>,
    node_ips: Vec<Ipv4Addr>,
}

impl Objects {
    fn read(&self) -> Result<Reading> {
        match self {
            Self::Manifests { dir, cache, .. } => {
                let manifests = cache.borrow_mut().load(dir).map_err(|e| Error::Io {
                    path: dir.clone(),
                    source: std::io::Error::other(e.to_string()),
                })?;
                Ok(Reading {
                    problems: manifests.problems.iter().map(|p| format!("skipped: {p}")).collect(),
                    services: manifests.services,
                    slices: manifests.slices,
                    node_ips: Vec::new(),
                })
            }
            Self::Kubernetes(source) => {
                let snapshot = source.snapshot();
                let node_ips = snapshot
                    .node
                    .as_ref()
                    .map(kube_source::node_ipv4_addresses)
                    .unwrap_or_default();
                Ok(Reading {
                    services: snapshot.services,
                    slices: snapshot.slices,
                    problems: Vec::new(),
                    node_ips,
                })
            }
        }
    }
}

fn source_error(error: kube_source::Error) -> Error {
    Error::Source(Box::new(error))
}

/// Reads the source and reconciles; a malformed file or object is reported and skipped.
fn sync(
    options: &Options,
    objects: &Objects,
    reconciler: &mut Reconciler,
    maps: &mut KernelMaps,
    reported: &mut Reported,
    metrics: &Metrics,
) -> Result<()> {
    let started = Instant::now();
    let reading = objects.read()?;
    // The Node object's addresses, when known, are the truth about this node's IPs.
    let node = if reading.node_ips.is_empty() || reading.node_ips == options.node_config.node_ips {
        std::borrow::Cow::Borrowed(&options.node_config)
    } else {
        std::borrow::Cow::Owned(NodeConfig {
            node_ips: reading.node_ips.clone(),
            ..options.node_config.clone()
        })
    };
    let model = model::build(&reading.services, &reading.slices, &node);
    let report = reconciler.reconcile(&model, &node, maps)?;
    let lines = reading
        .problems
        .iter()
        .cloned()
        .chain(model.skipped.iter().map(|s| format!("not programmed: {}: {}", s.object, s.reason)))
        .chain(model.notes.iter().map(|note| format!("note: {note}")))
        .chain(report.problems.iter().map(|problem| format!("not programmed: {problem}")))
        .collect();
    reported.update(lines);
    let purged = maps.purge_flows(&report.removed_pairs)?;
    metrics.observe_sync(started.elapsed(), report.ops.len(), purged, model.ports.len());
    if !report.ops.is_empty() || purged > 0 {
        info!(
            writes = report.ops.len(),
            purged_flows = purged,
            service_ports = model.ports.len(),
            elapsed_us = started.elapsed().as_micros(),
            "programmed"
        );
    }
    Ok(())
}

/// Watches the manifest directory; every event nudges the loop.
fn watch(dir: &Path, changes: mpsc::Sender<()>) -> Result<notify::RecommendedWatcher> {
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // Reading the files (as every sync does) raises access events: only changes count.
        let is_change = event.is_ok_and(|e| !matches!(e.kind, notify::EventKind::Access(_)));
        if is_change {
            // A full channel already holds a nudge: dropping this one loses nothing.
            let _ = changes.try_send(());
        }
    })
    .map_err(|e| Error::Io { path: dir.into(), source: std::io::Error::other(e) })?;
    watcher
        .watch(dir, RecursiveMode::NonRecursive)
        .map_err(|e| Error::Io { path: dir.into(), source: std::io::Error::other(e) })?;
    Ok(watcher)
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
