//! The node daemon: attach (or adopt) the datapath, then keep its maps equal to what the source
//! describes. Exiting leaves everything pinned and attached, so traffic keeps flowing and the
//! next daemon adopts the maps without a flush.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    time::Duration,
};

use notify::{RecursiveMode, Watcher as _};
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use crate::{
    attach,
    config::NodeConfig,
    error::{Error, Result},
    manifest,
    maps::KernelMaps,
    model,
    pins::PinLayout,
    reconcile::{DatapathState, Reconciler, SlotMode},
};

/// How the daemon runs.
#[derive(Clone, Debug)]
pub struct Options {
    pub manifests: PathBuf,
    pub node_config: NodeConfig,
    /// Where to attach when no earlier daemon left a datapath pinned.
    pub targets: attach::Targets,
    pub pins: PinLayout,
    /// A full resync this often even without a change event, to repair what anything else may
    /// have changed in the maps.
    pub resync: Duration,
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
    let programmed = DatapathState::read(&maps)?;
    let mut reconciler = Reconciler::new(programmed, SlotMode::of(&options.node_config));
    let (nudge, mut nudges) = mpsc::channel(16);
    let _watcher = watch(&options.manifests, nudge)?;
    tokio::pin!(shutdown);
    info!(manifests = %options.manifests.display(), "running");
    let mut reported = Reported::default();
    loop {
        if let Err(error) = sync(&options, &mut reconciler, &mut maps, &mut reported) {
            error!(error = %error_chain(&error), "reconcile failed; re-reading the maps and retrying at the next change");
            reconciler =
                Reconciler::new(DatapathState::read(&maps)?, SlotMode::of(&options.node_config));
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

/// Attaches a fresh datapath, or adopts the one pinned by an earlier daemon.
fn attach_or_adopt(options: &Options) -> Result<KernelMaps> {
    if options.pins.is_loaded() {
        info!(pin_dir = %options.pins.root().display(), "adopting the pinned datapath");
    } else {
        for attachment in attach::load_and_attach(&options.pins, &options.targets)? {
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

/// Reads the manifests and reconciles; a malformed file or object is reported and skipped.
fn sync(
    options: &Options,
    reconciler: &mut Reconciler,
    maps: &mut KernelMaps,
    reported: &mut Reported,
) -> Result<()> {
    let started = std::time::Instant::now();
    let manifests = manifest::load_dir(&options.manifests).map_err(|e| Error::Io {
        path: options.manifests.clone(),
        source: std::io::Error::other(e.to_string()),
    })?;
    let model = model::build(&manifests.services, &manifests.slices, &options.node_config);
    let report = reconciler.reconcile(&model, &options.node_config, maps)?;
    let lines = manifests
        .problems
        .iter()
        .map(|problem| format!("skipped: {problem}"))
        .chain(model.skipped.iter().map(|s| format!("not programmed: {}: {}", s.object, s.reason)))
        .chain(model.notes.iter().map(|note| format!("note: {note}")))
        .chain(report.problems.iter().map(|problem| format!("not programmed: {problem}")))
        .collect();
    reported.update(lines);
    let purged = maps.purge_flows(&report.removed_pairs)?;
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
