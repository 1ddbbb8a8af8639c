//! The daemon on a thread inside a topology's node namespace, on the example node
//! configuration, stopped the way SIGTERM stops it (the datapath stays pinned).

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    path::{Path, PathBuf},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use lb_user::{attach, config::NodeConfig, daemon, status};

use crate::{
    netns::{Netns, enter_path},
    pins::TestPins,
    topology::{EXTERNAL_IFACE, Topology},
};

/// The repository's `examples/` directory.
pub fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

/// The demo's node configuration, `examples/node.yaml`.
pub fn example_node_config() -> NodeConfig {
    NodeConfig::from_file(&examples().join("node.yaml")).expect("node.yaml")
}

/// Where a test daemon serves its metrics, inside the topology's node namespace.
pub const METRICS_ADDRESS: &str = "127.0.0.1:10249";
/// Where a test daemon answers `/healthz`, on every address of the node's namespace.
pub const HEALTHZ_ADDRESS: &str = "0.0.0.0:10256";

/// How long a stopped daemon may take to finish its thread: its last sync under emulation.
const STOP_PATIENCE: Duration = Duration::from_mins(2);

pub struct RunningDaemon {
    /// Dropping it is the SIGTERM.
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

/// XDP on the topology's external interface, tc on its pod interfaces, and the host path on
/// `host_cgroup` if given: what [`RunningDaemon::start`] attaches to.
pub fn default_targets(topology: &Topology, host_cgroup: Option<&Path>) -> attach::Targets {
    attach::Targets {
        xdp_ifaces: vec![EXTERNAL_IFACE.into()],
        tc_ifaces: topology.pod_ifaces(),
        host_cgroup: host_cgroup.map(Path::to_owned),
    }
}

impl RunningDaemon {
    /// Starts the daemon on `manifests`, attached to the topology (and to `host_cgroup` for the
    /// host path), and waits until it has programmed the example services.
    pub fn start(
        topology: &Topology,
        pins: &TestPins,
        manifests: &Path,
        host_cgroup: Option<&Path>,
    ) -> Self {
        let targets = default_targets(topology, host_cgroup);
        Self::start_with(topology, pins, manifests, targets, example_node_config())
    }

    /// [`Self::start`] with the attachment targets and the node configuration given.
    pub fn start_with(
        topology: &Topology,
        pins: &TestPins,
        manifests: &Path,
        targets: attach::Targets,
        node_config: NodeConfig,
    ) -> Self {
        let source = daemon::Source::Manifests(manifests.to_owned());
        Self::start_on(topology, pins, source, targets, node_config)
    }

    /// [`Self::start_with`] on any source of objects.
    pub fn start_on(
        topology: &Topology,
        pins: &TestPins,
        source: daemon::Source,
        targets: attach::Targets,
        node_config: NodeConfig,
    ) -> Self {
        let resync = Duration::from_secs(60);
        Self::launch(topology, pins, source, targets, node_config, resync)
    }

    /// [`Self::start`] with a full resync every `resync`.
    pub fn start_resyncing(
        topology: &Topology,
        pins: &TestPins,
        manifests: &Path,
        resync: Duration,
    ) -> Self {
        let source = daemon::Source::Manifests(manifests.to_owned());
        let targets = default_targets(topology, None);
        Self::launch(topology, pins, source, targets, example_node_config(), resync)
    }

    fn launch(
        topology: &Topology,
        pins: &TestPins,
        source: daemon::Source,
        targets: attach::Targets,
        node_config: NodeConfig,
        resync: Duration,
    ) -> Self {
        let options = daemon::Options {
            source,
            node_config,
            targets,
            pins: pins.layout().clone(),
            resync,
            // Inside the node's namespace: every test daemon has a loopback of its own.
            metrics_address: Some(METRICS_ADDRESS.parse().expect("address")),
            healthz_address: Some(HEALTHZ_ADDRESS.parse().expect("address")),
        };
        log_to_stderr();
        let node = topology.node.path();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            enter_path(&node);
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            // Not a blocking task waiting on a channel: the runtime's drop would wait for it,
            // so a daemon that failed would never finish its thread.
            let shutdown = async move {
                let _ = stopped.await;
            };
            runtime.block_on(daemon::run_until(options, shutdown)).expect("daemon");
        });
        let daemon = Self { stop: Some(stop), thread: Some(thread) };
        // Its first sync, not only the services in the maps: an adopted datapath has those
        // before the new daemon has done anything.
        wait_for(
            || {
                let exited = daemon.thread.as_ref().is_none_or(JoinHandle::is_finished);
                assert!(!exited, "the daemon exited before its first sync (its error is above)");
                scrape_metrics(&topology.node)
                    .is_some_and(|metrics| counter(&metrics, SYNCS_OK) >= Some(1))
            },
            "the daemon's first sync",
        );
        wait_for(
            || status::read(pins.layout()).is_ok_and(|s| s.frontends.len() >= 7),
            "the daemon to program the services",
        );
        daemon
    }

    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        drop(self.stop.take());
        let Some(thread) = self.thread.take() else { return };
        let deadline = Instant::now() + STOP_PATIENCE;
        while !thread.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        // A second panic while a failed test unwinds would abort it before its namespaces
        // and pins are removed; a daemon stuck past its patience is left behind, named.
        if !thread.is_finished() {
            eprintln!("the daemon thread did not stop within {STOP_PATIENCE:?}; leaving it");
            assert!(std::thread::panicking(), "the daemon did not stop");
            return;
        }
        let joined = thread.join();
        assert!(joined.is_ok() || std::thread::panicking(), "the daemon thread panicked");
    }
}

impl Drop for RunningDaemon {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// `GET /metrics` from the daemon, inside the node's namespace; `None` while none answers.
pub fn scrape_metrics(node: &Netns) -> Option<String> {
    let response = http_get(node, METRICS_ADDRESS, "/metrics").ok()?;
    (response.status == 200).then_some(response.text)
}

/// An HTTP response: its status code, and the whole text (status line, headers and body).
pub struct HttpResponse {
    pub status: u16,
    pub text: String,
}

impl HttpResponse {
    /// What follows the headers.
    pub fn body(&self) -> &str {
        self.text.split_once("\r\n\r\n").map_or("", |(_, body)| body)
    }
}

/// `GET path` from inside `netns` to `address`, over HTTP/1.0 (the server closes the
/// connection after answering).
pub fn http_get(netns: &Netns, address: &str, path: &str) -> std::io::Result<HttpResponse> {
    let address: std::net::SocketAddr = address.parse().expect("socket address");
    netns.enter(|| {
        let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(2))?;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        stream.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())?;
        let mut text = String::new();
        stream.read_to_string(&mut text)?;
        let status = text
            .split(' ')
            .nth(1)
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {text:?}")))?;
        Ok(HttpResponse { status, text })
    })
}

/// The series of successful syncs.
pub const SYNCS_OK: &str = "lb_syncs_total{result=\"ok\"}";

/// The value of the sample `series` in an exposition text.
pub fn counter(metrics: &str, series: &str) -> Option<u64> {
    metrics.lines().find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
}

/// The daemon's log on stderr (shown with a failing test's output), once per test process.
fn log_to_stderr() {
    static INIT: std::sync::Once = std::sync::Once::new();
    INIT.call_once(|| {
        let filter =
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .try_init();
    });
}

/// Polls `condition` for up to a minute: it returns as soon as the condition holds, and the
/// VM tier runs under CPU emulation, where loading and verifying the programs alone can take
/// ten seconds.
pub fn wait_for(mut condition: impl FnMut() -> bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until the datapath pinned under `pins` has `count` backends behind the frontend at
/// `address` (`ip:port`): a change the daemon was told about has reached the kernel.
pub fn wait_for_backends(pins: &TestPins, address: &str, count: usize, what: &str) {
    wait_for(
        || {
            status::read(pins.layout()).is_ok_and(|s| {
                s.frontends.iter().any(|f| f.address == address && f.backends.len() == count)
            })
        },
        what,
    );
}
