//! The node daemon: attach (or adopt) the datapath, then keep its maps equal to what the source
//! describes. Exiting leaves everything pinned and attached, so traffic keeps flowing and the
//! next daemon adopts the maps without a flush.

use std::{
    borrow::Cow,
    collections::BTreeSet,
    net::SocketAddr,
    path::{Path, PathBuf},
    pin::Pin,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use notify::{RecursiveMode, Watcher as _};
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

use crate::{
    attach,
    config::NodeConfig,
    conntrack_gc,
    control::ControlPlane,
    error::{Error, Result},
    health::{self, HealthCheckServers, ProxyHealth},
    interfaces::{self, Follower},
    kube_source::{self, Changes, KubeSource},
    loader::Capacities,
    manifest,
    maps::{KernelMaps, Purged},
    metrics::{self, Metrics, Programmed, SyncDone},
    model::{ServiceModel, ServiceName},
    pins::PinLayout,
    reconcile::{Reconciler, Report, SlotMode},
    resize, upgrade,
};

/// Where Services and EndpointSlices come from.
#[derive(Clone, Debug)]
pub enum Source {
    /// A directory of manifests, watched for changes.
    Manifests(PathBuf),
    /// The Kubernetes API: this kubeconfig, or what kube-rs infers (KUBECONFIG, ~/.kube/config,
    /// in-cluster).
    Kubernetes { kubeconfig: Option<PathBuf> },
    /// The Kubernetes API through a client built elsewhere: the tests' scripted API server.
    #[cfg(feature = "scripted-api-server")]
    KubernetesClient(ScriptedClient),
}

/// A kube-rs client of the scripted API server (the client itself is not `Debug`).
#[cfg(feature = "scripted-api-server")]
#[derive(Clone)]
pub struct ScriptedClient(pub kube::Client);

#[cfg(feature = "scripted-api-server")]
impl std::fmt::Debug for ScriptedClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ScriptedClient")
    }
}

/// How the daemon runs.
#[derive(Clone, Debug)]
pub struct Options {
    pub source: Source,
    pub node_config: NodeConfig,
    /// Where the programs go. XDP and tc follow the interfaces as they come and go (see
    /// [`interfaces`]); the host path's cgroup is attached when the datapath is loaded afresh.
    pub targets: attach::Targets,
    pub pins: PinLayout,
    /// A full resync this often even without a change event, to repair what anything else may
    /// have changed in the maps.
    pub resync: Duration,
    /// Where to serve Prometheus metrics (`GET /metrics`), if anywhere.
    pub metrics_address: Option<SocketAddr>,
    /// Where to answer `GET /healthz` and `/livez`, if anywhere.
    pub healthz_address: Option<SocketAddr>,
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
    // Subscribed before the first look at the interfaces, so that no change falls between.
    let mut interfaces = Follower::subscribe()?;
    let mut maps = attach_or_adopt(&options)?;
    crate::maps::set_refusal_budget(&options.pins, options.node_config.refusal_limit.budget())?;
    let metrics = Metrics::new(&options.pins);
    interfaces.follow(&options.pins, &options.targets, &metrics);
    if let Some(address) = options.metrics_address {
        metrics::serve(address, Arc::clone(&metrics)).await?;
        info!(%address, "serving metrics at /metrics");
    }
    // Before the first lists: a liveness probe must find the daemon while it waits for them.
    let proxy_health = ProxyHealth::new(options.resync);
    if let Some(address) = options.healthz_address {
        health::serve_healthz(address, Arc::clone(&proxy_health)).await?;
        info!(%address, "serving /healthz");
    }
    let _collector = conntrack_gc::Collector::start(
        &options.pins,
        conntrack_gc::INTERVAL,
        Arc::clone(&metrics),
    )?;
    let capacities = Capacities::pinned(&options.pins)?;
    metrics.observe_capacities(&options.pins);
    report_maglev_room(&options.node_config, &capacities);
    let reconciler = reconciler_for(&maps, &options.node_config, &capacities)?;
    let (nudge, mut nudges) = mpsc::channel(16);
    tokio::pin!(shutdown);
    let objects = match &options.source {
        Source::Manifests(dir) => Some(manifest_objects(dir, &options.node_config, nudge)?),
        Source::Kubernetes { kubeconfig } => {
            let client = kube_source::client(kubeconfig.as_deref()).await.map_err(source_error)?;
            kubernetes_objects(client, &options.node_config, nudge, shutdown.as_mut()).await?
        }
        #[cfg(feature = "scripted-api-server")]
        Source::KubernetesClient(ScriptedClient(client)) => {
            let client = client.clone();
            kubernetes_objects(client, &options.node_config, nudge, shutdown.as_mut()).await?
        }
    };
    // `None`: told to stop while waiting for the API.
    let Some(objects) = objects else { return Ok(()) };
    let mut reported = Reported::default();
    let mut plane = ControlPlane::new(reconciler);
    let mut health_checks = HealthCheckServers::new(Arc::clone(&proxy_health));
    // The first sync rebuilds every service; so does the periodic resync, which repairs
    // whatever a missed event or a failed write left behind. Its deadline runs from the last
    // full sync, as kube-proxy's does: changes coming more often than the period must not put
    // it off for ever.
    let mut full = true;
    let mut next_full_sync = tokio::time::Instant::now();
    'running: loop {
        let started = Instant::now();
        // The Node as the source knows it now: the build and the health check ports use it.
        let (node, eligible) = objects.node(&options.node_config);
        let synced = sync(&node, &objects, &mut plane, &mut maps, &mut reported, full, &metrics);
        // From the end of the sync: one slower than the period must not be followed by another
        // at once, and so on for ever. A failed one counts too, or it would be retried at once
        // (the next change makes a full sync anyway, the control plane being new).
        if full || synced.as_ref().is_ok_and(|all| *all) {
            next_full_sync = tokio::time::Instant::now() + options.resync;
        }
        proxy_health.record_sync(synced.is_ok());
        proxy_health.set_node_eligible(eligible);
        if synced.is_ok() {
            health_checks.update(plane.health_checks(), &node.health_check_addresses());
        }
        if let Err(error) = synced {
            metrics.observe_failed_sync(started.elapsed());
            error!(error = %crate::error::chain(&error), "reconcile failed; re-reading the maps and retrying at the next change");
            // A new control plane knows nothing yet: its next sync is a full one.
            plane = ControlPlane::new(reconciler_for(&maps, &options.node_config, &capacities)?);
        }
        let resync = tokio::time::sleep_until(next_full_sync);
        tokio::pin!(resync);
        // Interface events change attachments, not maps: they do not end the wait for the next
        // sync.
        loop {
            tokio::select! {
                _ = nudges.recv() => {
                    // Editors write a file in several steps: let the burst settle. A watch
                    // event is one whole object: no wait.
                    if matches!(objects, Objects::Manifests { .. }) {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    while nudges.try_recv().is_ok() {}
                    full = false;
                    break;
                }
                () = &mut resync => {
                    // Not every change of an XDP hook sends a link event (a bpf_link's release
                    // does not): look at the interfaces now too.
                    interfaces.follow(&options.pins, &options.targets, &metrics);
                    full = true;
                    break;
                }
                () = interfaces.changed() => {
                    interfaces.follow(&options.pins, &options.targets, &metrics);
                }
                () = &mut shutdown => break 'running,
            }
        }
    }
    info!(pin_dir = %options.pins.root().display(), "exiting; the datapath stays attached and pinned");
    Ok(())
}

/// The manifest directory `dir` as the daemon's source, watched.
fn manifest_objects(dir: &Path, node: &NodeConfig, nudge: mpsc::Sender<()>) -> Result<Objects> {
    info!(manifests = %dir.display(), "running");
    let touched = Arc::new(Mutex::new(Touched::default()));
    Ok(Objects::Manifests {
        dir: dir.to_owned(),
        cache: Box::new(std::cell::RefCell::new(manifest::CachedDir::new(node))),
        touched: Arc::clone(&touched),
        _watcher: watch(dir, nudge, touched)?,
    })
}

/// The Kubernetes API through `client` as the daemon's source, once its first lists are in;
/// `None` if `shutdown` comes first.
async fn kubernetes_objects(
    client: kube::Client,
    node: &NodeConfig,
    nudge: mpsc::Sender<()>,
    mut shutdown: Pin<&mut impl std::future::Future<Output = ()>>,
) -> Result<Option<Objects>> {
    let source = KubeSource::start(client, &node.node_name, nudge);
    // Reconciling before the first lists complete would unprogram everything an earlier daemon
    // left: wait, keeping the adopted state untouched meanwhile.
    info!("waiting for the initial lists of Services and EndpointSlices");
    tokio::select! {
        ready = source.ready() => ready.map_err(source_error)?,
        () = shutdown.as_mut() => return Ok(None),
    }
    if node.node_ips.is_empty() {
        // The file leaves the addresses to the Node, and SNAT and NodePorts need one.
        info!(node = %node.node_name, "waiting for the Node's addresses (nodeIPs is not configured)");
        tokio::select! {
            () = source.node_addressed() => {}
            () = shutdown => return Ok(None),
        }
    }
    info!("running on the Kubernetes API");
    Ok(Some(Objects::Kubernetes(Box::new(source))))
}

/// With Maglev, every frontend with endpoints takes a whole table of slots, so the slot array
/// may hold far fewer tables than there are frontends: says how many fit.
fn report_maglev_room(node: &NodeConfig, capacities: &Capacities) {
    if let SlotMode::Maglev(size) = SlotMode::of(node) {
        let tables = capacities.backend_slots() / size;
        if tables == 0 {
            warn!(
                table_size = size,
                "Maglev tables do not fit in backendSlots: every frontend gets one slot per backend"
            );
        } else {
            info!(
                table_size = size,
                tables,
                "Maglev tables: room in backendSlots for this many; past them, a frontend gets \
                 one slot per backend"
            );
        }
    }
}

/// A reconciler for `maps`, of the pinned `capacities`, as they hold the datapath. It takes up
/// the UDP flows outside their frontend's slots: an earlier daemon's drains, or flows a failed
/// sync did not get to forget. Its first sync, a full one, forgets those whose endpoint no
/// longer serves.
fn reconciler_for(
    maps: &KernelMaps,
    node: &NodeConfig,
    capacities: &Capacities,
) -> Result<Reconciler> {
    let reconciler = Reconciler::resume(maps, SlotMode::of(node), capacities)?;
    let drains = reconciler.drains().len();
    if drains > 0 {
        info!(drains, "took up UDP flows running outside their frontend's slots");
    }
    Ok(reconciler)
}

/// Attaches a fresh datapath, or adopts the one pinned by an earlier daemon, with this
/// binary's programs in place of any older ones.
fn attach_or_adopt(options: &Options) -> Result<KernelMaps> {
    resize::restore_unstarted(&options.pins)?;
    if options.pins.is_loaded() {
        info!(pin_dir = %options.pins.root().display(), "adopting the pinned datapath");
        // Opening the maps checks their layout, before programs that assume this binary's
        // layout go near them.
        KernelMaps::from_pins(&options.pins)?;
        // A link left on an interface that went away while no daemon ran cannot be updated.
        for removed in interfaces::remove_stale(&options.pins)? {
            info!("{removed}");
        }
        upgrade::replace_outdated_programs(&options.pins, &options.node_config.map_capacities)?;
        if let Some(cgroup) = &options.targets.host_cgroup {
            for attachment in attach::attach_missing_host_links(&options.pins, cgroup)? {
                info!(%attachment, "attached a host-path hook the pins lacked");
            }
        }
        // Reopened: a resized map is a new map.
        return KernelMaps::from_pins(&options.pins);
    }
    for attachment in attach::load_and_attach(
        &options.pins,
        &options.targets,
        &options.node_config.map_capacities,
    )? {
        info!(%attachment, "attached");
    }
    KernelMaps::from_pins(&options.pins)
}

/// What the last syncs reported, so that an unchanged problem is logged once, not every sync:
/// the source's own problems (a malformed file, a missing Node), read at every sync, apart from
/// what the model and the reconciler said, which a sync that changes no service leaves as is.
#[derive(Default)]
struct Reported {
    source: BTreeSet<String>,
    model: BTreeSet<String>,
}

impl Reported {
    /// Logs the source's problems not reported last time and remembers this set.
    fn update_source(&mut self, lines: BTreeSet<String>) {
        Self::log_new(&self.source, &lines);
        self.source = lines;
    }

    /// [`Self::update_source`] for the model's and the reconciler's remarks.
    fn update_model(&mut self, lines: BTreeSet<String>) {
        Self::log_new(&self.model, &lines);
        self.model = lines;
    }

    fn log_new(old: &BTreeSet<String>, new: &BTreeSet<String>) {
        for line in new.difference(old) {
            if line.starts_with(crate::control::NOT_PROXIED) {
                debug!("{line}");
            } else {
                warn!("{line}");
            }
        }
    }
}

/// The running source's objects.
enum Objects {
    Manifests {
        dir: PathBuf,
        /// Parsed files by modification time: an edit re-parses only its file.
        cache: Box<std::cell::RefCell<manifest::CachedDir>>,
        touched: Arc<Mutex<Touched>>,
        _watcher: notify::RecommendedWatcher,
    },
    Kubernetes(Box<KubeSource>),
}

impl Objects {
    /// The node configuration to build with, and whether this node is to take load balancer
    /// traffic. The Node object's addresses and zone label, when the source knows them, are the
    /// truth about this node; it is not eligible while its Node is being deleted, nor after
    /// (see `KubeSource::node_eligible`).
    fn node<'a>(&self, configured: &'a NodeConfig) -> (Cow<'a, NodeConfig>, bool) {
        let mut node = Cow::Borrowed(configured);
        let Self::Kubernetes(source) = self else { return (node, true) };
        let (object, node_ips) = source.node();
        if !node_ips.is_empty() && node_ips != configured.node_ips {
            node.to_mut().node_ips = node_ips;
        }
        if let Some(zone) = object.as_ref().and_then(kube_source::node_zone)
            && configured.zone.as_ref() != Some(&zone)
        {
            node.to_mut().zone = Some(zone);
        }
        (node, source.node_eligible())
    }

    /// The services changed since the last call: `None` when any may have. A `full` sync
    /// reads the whole directory rather than the files the watcher named.
    fn changes(&self, full: bool) -> Result<Option<BTreeSet<ServiceName>>> {
        match self {
            Self::Manifests { dir, cache, touched, .. } => {
                let touched =
                    std::mem::take(&mut *touched.lock().unwrap_or_else(PoisonError::into_inner));
                let mut cache = cache.borrow_mut();
                if !full
                    && !touched.rescan
                    && let Some(changed) = cache.refresh_files(dir, touched.paths)
                {
                    return Ok(Some(changed));
                }
                cache.refresh(dir).map(Some).map_err(|e| Error::Io {
                    path: dir.clone(),
                    source: std::io::Error::other(e.to_string()),
                })
            }
            Self::Kubernetes(source) => Ok(match source.take_changes() {
                Changes::Everything => None,
                Changes::Services(services) => Some(services),
            }),
        }
    }

    /// Every service, for a full sync.
    fn sync_all(
        &self,
        plane: &mut ControlPlane,
        node: &NodeConfig,
        maps: &mut KernelMaps,
    ) -> Result<Report> {
        match self {
            Self::Manifests { cache, .. } => {
                let cache = cache.borrow();
                let services = cache.services();
                let parts =
                    services.iter().map(|(name, objects)| ((*name).clone(), objects.model(name)));
                plane.sync_all(parts, node, maps)
            }
            Self::Kubernetes(source) => plane.sync_all(source.service_models(node), node, maps),
        }
    }

    /// One service's part of the model, for a sync of the services a change names.
    fn service_model(&self, service: &ServiceName, node: &NodeConfig) -> ServiceModel {
        match self {
            Self::Manifests { cache, .. } => cache.borrow().objects(service).model(service),
            Self::Kubernetes(source) => source.service_objects(service, node).model(service),
        }
    }

    /// Files or documents the source could not read, as log lines.
    fn problems(&self) -> Vec<String> {
        match self {
            Self::Manifests { cache, .. } => {
                cache.borrow().problems().map(|p| format!("skipped: {p}")).collect()
            }
            Self::Kubernetes(source) => {
                source.node_problem().into_iter().chain(source.decode_problems()).collect()
            }
        }
    }
}

fn source_error(error: kube_source::Error) -> Error {
    Error::Source(Box::new(error))
}

/// Reads what changed in the source and reconciles it for `node` (the configuration with what
/// the source knows of the Node): the services a change names, or every service when `full` is
/// asked for, the source may have changed anything, or the node configuration changed. A
/// malformed file or object is reported and skipped. True if it rebuilt every service.
fn sync(
    node: &NodeConfig,
    objects: &Objects,
    plane: &mut ControlPlane,
    maps: &mut KernelMaps,
    reported: &mut Reported,
    full: bool,
    metrics: &Metrics,
) -> Result<bool> {
    let started = Instant::now();
    let changes = objects.changes(full)?;
    reported.update_source(objects.problems().into_iter().collect());
    // How many services were rebuilt; `None` for all of them.
    let (report, rebuilt) = match changes {
        Some(services) if !full && !plane.needs_full_sync(node) => {
            if services.is_empty() {
                return Ok(false);
            }
            let rebuilt = services.len();
            let report =
                plane.sync_services(services, |name| objects.service_model(name, node), maps)?;
            (report, Some(rebuilt))
        }
        _ => (objects.sync_all(plane, node, maps)?, None),
    };
    let lines = plane
        .remarks()
        .chain(report.problems.iter().map(|problem| format!("not programmed: {problem}")))
        .collect();
    reported.update_model(lines);
    let purged = maps.purge(&report.forget)?;
    metrics.observe_sync(&SyncDone {
        elapsed: started.elapsed(),
        all_services: rebuilt.is_none(),
        writes: report.writes,
        purged_flows: purged.flows,
        draining: plane.reconciler().drains().len(),
        programmed: Programmed::of(plane.reconciler().programmed()),
    });
    if report.writes > 0 || purged != Purged::default() {
        let services = rebuilt.map_or_else(|| "all".to_owned(), |count| count.to_string());
        info!(
            writes = report.writes,
            purged_flows = purged.flows,
            purged_affinities = purged.affinities,
            services,
            elapsed_us = started.elapsed().as_micros(),
            "programmed"
        );
    }
    Ok(rebuilt.is_none())
}

/// The files the watcher saw change since the last sync.
#[derive(Debug, Default)]
struct Touched {
    paths: BTreeSet<PathBuf>,
    /// Events were lost or named no file: only reading the whole directory tells.
    rescan: bool,
}

/// Watches the manifest directory; every event records its paths and nudges the loop.
fn watch(
    dir: &Path,
    changes: mpsc::Sender<()>,
    touched: Arc<Mutex<Touched>>,
) -> Result<notify::RecommendedWatcher> {
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let mut touched = touched.lock().unwrap_or_else(PoisonError::into_inner);
        match event {
            // Reading the files (as every sync does) raises access events: only changes count.
            Ok(event) if matches!(event.kind, notify::EventKind::Access(_)) => return,
            Ok(event) => {
                touched.rescan |= event.need_rescan() || event.paths.is_empty();
                touched.paths.extend(event.paths);
            }
            Err(_) => touched.rescan = true,
        }
        // A full channel already holds a nudge: dropping this one loses nothing.
        let _ = changes.try_send(());
    })
    .map_err(|e| Error::Io { path: dir.into(), source: std::io::Error::other(e) })?;
    watcher
        .watch(dir, RecursiveMode::NonRecursive)
        .map_err(|e| Error::Io { path: dir.into(), source: std::io::Error::other(e) })?;
    Ok(watcher)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The real watcher names an edited file the way the cache expects, so that a change
    /// re-reads that file only.
    #[tokio::test]
    async fn the_watcher_names_edited_files_as_the_cache_reads_them() {
        let dir = std::env::temp_dir().join(format!("lb-watch-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let service = |ip: &str| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: web}}\nspec: {{clusterIP: {ip}, ports: [{{port: 80}}]}}\n"
            )
        };
        let file = dir.join("web.yaml");
        std::fs::write(&file, service("10.96.0.1")).expect("write");
        let node = NodeConfig::from_yaml_str(
            "nodeName: n\nnodeIPs: [192.168.1.1]\nclusterCIDR: 10.244.0.0/16\nserviceCIDR: 10.96.0.0/12",
        )
        .expect("node");
        let mut cache = manifest::CachedDir::new(&node);
        cache.refresh(&dir).expect("first read");
        let (nudge, mut nudges) = mpsc::channel(16);
        let touched = Arc::new(Mutex::new(Touched::default()));
        let _watcher = watch(&dir, nudge, Arc::clone(&touched)).expect("watching");

        std::fs::write(&file, service("10.96.0.22")).expect("edit");
        tokio::time::timeout(Duration::from_secs(5), nudges.recv())
            .await
            .expect("a nudge after the edit")
            .expect("the watcher holds the sender");
        // The rest of the burst (modify, close).
        tokio::time::sleep(Duration::from_millis(100)).await;
        let touched = std::mem::take(&mut *touched.lock().expect("not poisoned"));
        let changed = cache.refresh_files(&dir, touched.paths.clone());
        let _ = std::fs::remove_dir_all(&dir);
        assert!(!touched.rescan, "{touched:?}");
        assert_eq!(touched.paths, BTreeSet::from([file]));
        assert_eq!(changed, Some(BTreeSet::from([ServiceName::new("default", "web")])));
    }
}
