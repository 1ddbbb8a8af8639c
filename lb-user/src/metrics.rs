//! Prometheus metrics at `GET /metrics` (`OpenMetrics` text): the datapath's per-reason counters,
//! read from the pinned maps at each scrape, and the daemon's own (syncs, map writes, purged
//! flows, conntrack collection). Per-frontend packet counts stay in `status`: a series per
//! frontend would be hundreds of thousands of series on a large cluster.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use hyper::{Request, StatusCode};
use lb_common::{maps::names, stats::Reason};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric, text::encode},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use tokio::net::TcpListener;
use tracing::warn;

use crate::{
    error::{Error, Result},
    http,
    pins::PinLayout,
    stats,
};

const CONTENT: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// How a sync ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SyncResult {
    Ok,
    Error,
}

impl SyncResult {
    fn label(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Error => "error",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SyncLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InterfaceLabels {
    /// `attached`, `removed` (interface gone or no longer selected) or `failed`.
    change: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MapLabels {
    /// The map's pinned name.
    map: &'static str,
}

/// What one successful sync did and left, for [`Metrics::observe_sync`].
pub struct SyncDone {
    pub elapsed: Duration,
    /// Whether it rebuilt every service (a full sync), not only changed ones.
    pub all_services: bool,
    /// Map entries written or removed.
    pub writes: usize,
    /// Conntrack entries forgotten.
    pub purged_flows: usize,
    /// (Frontend, endpoint) pairs kept draining after it.
    pub draining: usize,
    /// What is programmed after it.
    pub programmed: Programmed,
}

/// Frontends programmed, and entries of the maps the daemon programs: beside their capacities
/// the entries show how close each map is to full (a frontend whose table finds no room keeps
/// the one it had, or is not programmed).
#[derive(Clone, Copy, Debug, Default)]
pub struct Programmed {
    /// ClusterIP markers not counted.
    pub frontends: usize,
    /// `SERVICES`: frontends and the ClusterIP markers.
    pub services: usize,
    pub backends: usize,
    /// `BACKEND_SLOTS` in frontends' runs. A changed table needs a new contiguous run while
    /// its old one is still held, so tables find no room before this reaches the capacity.
    pub backend_slots: usize,
}

impl Programmed {
    /// What `state` holds.
    #[must_use]
    pub fn of(state: &crate::reconcile::DatapathState) -> Self {
        Self {
            frontends: state.services.keys().filter(|key| !key.is_marker()).count(),
            services: state.services.len(),
            backends: state.backends.len(),
            backend_slots: state.slots.len(),
        }
    }
}

/// The daemon's metrics; shared with the conntrack collector's thread.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    syncs: Family<SyncLabels, Counter>,
    full_syncs: Counter,
    sync_seconds: Histogram,
    map_writes: Counter,
    purged_flows: Counter,
    frontends: Gauge,
    draining: Gauge,
    conntrack_entries: Gauge,
    conntrack_opening: Gauge,
    conntrack_collected: Counter,
    map_capacities: Family<MapLabels, Gauge>,
    map_entries: Family<MapLabels, Gauge>,
    interface_changes: Family<InterfaceLabels, Counter>,
}

impl Metrics {
    /// Metrics of the datapath pinned under `pins`.
    pub fn new(pins: &PinLayout) -> Arc<Self> {
        let mut registry = Registry::with_prefix("lb");
        let syncs = Family::<SyncLabels, Counter>::default();
        registry.register("syncs", "Reconciles of the maps with the source", syncs.clone());
        let full_syncs = Counter::default();
        registry.register(
            "full_syncs",
            "Successful syncs that rebuilt every service: the first, the periodic resync, a \
             change of the Node",
            full_syncs.clone(),
        );
        // 100 us to ~100 s: one changed service up to a first sync of 100k services.
        let sync_seconds = Histogram::new(exponential_buckets(0.000_1, 4.0, 11));
        registry.register("sync_duration_seconds", "Time a sync took", sync_seconds.clone());
        let map_writes = Counter::default();
        registry.register(
            "map_writes",
            "Map entries written or removed by syncs",
            map_writes.clone(),
        );
        let purged_flows = Counter::default();
        registry.register(
            "purged_flows",
            "Conntrack entries of removed backends forgotten",
            purged_flows.clone(),
        );
        let frontends = Gauge::default();
        registry.register(
            "frontends",
            "Frontends (VIP, port, protocol, scope) programmed",
            frontends.clone(),
        );
        let draining = Gauge::default();
        registry.register(
            "draining_udp_endpoints",
            "(Frontend, endpoint) pairs out of the slots whose UDP flows are kept while the \
             endpoint still serves",
            draining.clone(),
        );
        let conntrack_entries = Gauge::default();
        registry.register(
            "conntrack_entries",
            "Conntrack entries at the last collection",
            conntrack_entries.clone(),
        );
        let conntrack_opening = Gauge::default();
        registry.register(
            "conntrack_opening_entries",
            "Conntrack entries of TCP flows still opening (SYN seen, handshake not done) at the \
             last collection",
            conntrack_opening.clone(),
        );
        let conntrack_collected = Counter::default();
        registry.register(
            "conntrack_collected",
            "Dead conntrack entries deleted by the collector",
            conntrack_collected.clone(),
        );
        let map_capacities = Family::<MapLabels, Gauge>::default();
        registry.register(
            "map_capacity_entries",
            "Entries each map whose size is configured has room for, as pinned",
            map_capacities.clone(),
        );
        let map_entries = Family::<MapLabels, Gauge>::default();
        registry.register(
            "map_entries",
            "Entries of the maps the daemon programs (SERVICES, BACKENDS, BACKEND_SLOTS), as \
             programmed by the last sync",
            map_entries.clone(),
        );
        let interface_changes = Family::<InterfaceLabels, Counter>::default();
        registry.register(
            "interface_attachments",
            "Attachments made, removed and failed as interfaces came and went",
            interface_changes.clone(),
        );
        registry.register_collector(Box::new(DatapathCounters { pins: pins.clone() }));
        Arc::new(Self {
            registry,
            syncs,
            full_syncs,
            sync_seconds,
            map_writes,
            purged_flows,
            frontends,
            draining,
            conntrack_entries,
            conntrack_opening,
            conntrack_collected,
            map_capacities,
            map_entries,
            interface_changes,
        })
    }

    /// Records a sync that succeeded.
    pub fn observe_sync(&self, sync: &SyncDone) {
        self.count_sync(SyncResult::Ok, sync.elapsed);
        if sync.all_services {
            self.full_syncs.inc();
        }
        self.map_writes.inc_by(as_u64(sync.writes));
        self.purged_flows.inc_by(as_u64(sync.purged_flows));
        let Programmed { frontends, services, backends, backend_slots } = sync.programmed;
        self.frontends.set(i64::try_from(frontends).unwrap_or(i64::MAX));
        self.draining.set(i64::try_from(sync.draining).unwrap_or(i64::MAX));
        for (map, entries) in [
            (names::SERVICES, services),
            (names::BACKENDS, backends),
            (names::BACKEND_SLOTS, backend_slots),
        ] {
            let gauge = self.map_entries.get_or_create(&MapLabels { map });
            gauge.set(i64::try_from(entries).unwrap_or(i64::MAX));
        }
    }

    /// Records a sync that failed; what it wrote before failing is not known.
    pub fn observe_failed_sync(&self, elapsed: Duration) {
        self.count_sync(SyncResult::Error, elapsed);
    }

    fn count_sync(&self, result: SyncResult, elapsed: Duration) {
        self.syncs.get_or_create(&SyncLabels { result: result.label() }).inc();
        self.sync_seconds.observe(elapsed.as_secs_f64());
    }

    /// Records one conntrack collection.
    pub fn observe_collection(&self, pass: &crate::conntrack_gc::Pass) {
        let gauge = |count: usize| i64::try_from(count).unwrap_or(i64::MAX);
        self.conntrack_entries.set(gauge(pass.scanned - pass.removed));
        self.conntrack_opening.set(gauge(pass.opening));
        self.conntrack_collected.inc_by(as_u64(pass.removed));
    }

    /// Records the sizes of the maps whose size is configured, as pinned under `pins`.
    pub fn observe_capacities(&self, pins: &PinLayout) {
        let configured = crate::loader::Capacities::default();
        for map in crate::loader::MAP_NAMES.into_iter().filter(|map| configured.of(map).is_some()) {
            if let Ok(entries) = crate::maps::pinned_entries(map, &pins.map(map)) {
                self.map_capacities.get_or_create(&MapLabels { map }).set(i64::from(entries));
            }
        }
    }

    /// Records what one look at the interfaces changed.
    pub fn observe_interfaces(&self, changes: &crate::interfaces::Changes) {
        for (change, count) in [
            ("attached", changes.attached.len()),
            ("removed", changes.removed.len()),
            ("failed", changes.failed.len()),
        ] {
            self.interface_changes.get_or_create(&InterfaceLabels { change }).inc_by(as_u64(count));
        }
    }

    /// The exposition text.
    pub fn render(&self) -> String {
        let mut text = String::new();
        // Writing to a String cannot fail; a collector that fails to read the maps logs it
        // and leaves its metrics out.
        let _ = encode(&mut text, &self.registry);
        text
    }
}

fn as_u64(count: usize) -> u64 {
    u64::try_from(count).unwrap_or(u64::MAX)
}

/// The kernel's counters, read when scraped.
#[derive(Debug)]
struct DatapathCounters {
    pins: PinLayout,
}

impl Collector for DatapathCounters {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        match stats::read_pinned(&self.pins) {
            Ok(counts) => {
                let mut family = encoder.encode_descriptor(
                    "datapath_packets",
                    "Packets the programs handled, by the reason counted.",
                    None,
                    prometheus_client::metrics::MetricType::Counter,
                )?;
                for reason in Reason::ALL {
                    let labels = [("reason", reason.name())];
                    ConstCounter::new(counts.get(*reason))
                        .encode(family.encode_family(&labels)?)?;
                }
            }
            Err(error) => warn!(%error, "metrics: cannot read the datapath counters"),
        }
        match stats::read_forwarding_pinned(&self.pins) {
            Ok(forwarding) => {
                let mut family = encoder.encode_descriptor(
                    "xdp_forwarded_packets",
                    "Translated XDP packets sent on by FIB redirect or up the stack (xdpRedirect).",
                    None,
                    prometheus_client::metrics::MetricType::Counter,
                )?;
                let outcomes =
                    [("redirect", forwarding.redirected), ("stack", forwarding.to_stack)];
                for (outcome, count) in outcomes {
                    let labels = [("outcome", outcome)];
                    ConstCounter::new(count).encode(family.encode_family(&labels)?)?;
                }
                ConstCounter::new(forwarding.tc_fallback).encode(encoder.encode_descriptor(
                    "tc_fallback_packets",
                    "Packets translated on tc ingress of external interfaces where XDP could not \
                     be attached.",
                    None,
                    prometheus_client::metrics::MetricType::Counter,
                )?)?;
                ConstCounter::new(forwarding.tc_fallback_redirected).encode(
                    encoder.encode_descriptor(
                        "tc_fallback_redirected_packets",
                        "Of the tc fallback's packets, those sent on by FIB redirect \
                         (xdpRedirect); the others went up the stack.",
                        None,
                        prometheus_client::metrics::MetricType::Counter,
                    )?,
                )?;
            }
            Err(error) => warn!(%error, "metrics: cannot read the forwarding counters"),
        }
        Ok(())
    }
}

/// Binds `address` (an error names it) and serves the metrics there until the runtime stops.
pub async fn serve(address: SocketAddr, metrics: Arc<Metrics>) -> Result<()> {
    let listener = TcpListener::bind(address)
        .await
        .map_err(Error::io(format!("metrics address {address}")))?;
    http::serve(listener, "metrics", move |request| respond(&metrics, request));
    Ok(())
}

fn respond<B>(metrics: &Metrics, request: &Request<B>) -> http::Answer {
    if request.uri().path() == "/metrics" {
        http::answer(StatusCode::OK, CONTENT, metrics.render())
    } else {
        http::answer(StatusCode::NOT_FOUND, "text/plain", "not found: try /metrics\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unpinned() -> Arc<Metrics> {
        Metrics::new(&PinLayout::new("/nonexistent/lb-metrics-test"))
    }

    #[test]
    fn syncs_and_collections_are_counted() {
        let metrics = unpinned();
        let sync = |elapsed_ms, writes, purged_flows, frontends, draining| SyncDone {
            elapsed: Duration::from_millis(elapsed_ms),
            all_services: writes > 100,
            writes,
            purged_flows,
            draining,
            programmed: Programmed { frontends, services: 45, backends: 12, backend_slots: 30 },
        };
        metrics.observe_sync(&sync(3, 120, 2, 40, 0));
        metrics.observe_sync(&sync(1, 5, 0, 41, 3));
        metrics.observe_failed_sync(Duration::from_millis(1));
        metrics.observe_collection(&crate::conntrack_gc::Pass {
            scanned: 1000,
            removed: 300,
            opening: 20,
        });
        let text = metrics.render();
        for line in [
            "lb_syncs_total{result=\"ok\"} 2",
            "lb_syncs_total{result=\"error\"} 1",
            "lb_full_syncs_total 1",
            "lb_map_writes_total 125",
            "lb_purged_flows_total 2",
            "lb_frontends 41",
            "lb_draining_udp_endpoints 3",
            "lb_sync_duration_seconds_count 3",
            "lb_conntrack_entries 700",
            "lb_conntrack_opening_entries 20",
            "lb_conntrack_collected_total 300",
            "lb_map_entries{map=\"SERVICES\"} 45",
            "lb_map_entries{map=\"BACKENDS\"} 12",
            "lb_map_entries{map=\"BACKEND_SLOTS\"} 30",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
        // Without a pinned datapath the kernel counters are left out, not reported as zero.
        assert!(!text.contains("lb_datapath_packets"), "{text}");
    }

    #[test]
    fn only_the_metrics_path_is_served() {
        let metrics = unpinned();
        let get = |path: &str| {
            let request = Request::get(path).body(()).expect("request");
            respond(&metrics, &request)
        };
        let found = get("/metrics");
        assert_eq!(found.status(), StatusCode::OK);
        assert_eq!(found.headers()[hyper::header::CONTENT_TYPE], CONTENT);
        assert_eq!(get("/").status(), StatusCode::NOT_FOUND);
    }
}
