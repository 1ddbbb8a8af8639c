//! The daemon's health, as kube-proxy reports its own.
//!
//! - `/healthz` and `/livez` (kube-proxy's port 10256): 200 while the daemon keeps the maps in
//!   step with the source, 503 otherwise. Liveness probes use it, and load balancers of
//!   services with externalTrafficPolicy Cluster probe it to choose nodes.
//! - Health check node ports. A LoadBalancer service with externalTrafficPolicy Local has a
//!   `healthCheckNodePort`; load balancers probe it on every node and send the service's
//!   traffic only to nodes that answer 200, since the others have no local endpoint and drop
//!   it. Each port gets an HTTP server, where kube-proxy's would listen (the NodePort
//!   addresses, or all addresses), that answers any path with the count of local ready
//!   endpoints: 200 when there is one and the daemon is healthy, 503 otherwise, with
//!   kube-proxy's JSON body and headers.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, SystemTime},
};

use hyper::{Request, StatusCode};
use tokio::{
    net::{TcpListener, TcpSocket},
    task::JoinHandle,
};
use tracing::{info, warn};

use crate::{
    error::{Error, Result},
    http,
    model::{HealthCheck, ServiceName},
};

/// Whether the daemon keeps the maps in step with the source: healthy while the latest sync
/// succeeded and the last good one is no older than twice the resync interval (the daemon
/// syncs at least that often, so an older one means it is stuck). Before the first sync the
/// daemon's start counts as one, as kube-proxy gives a starting proxy that grace: a first list
/// of a big cluster takes a while.
#[derive(Debug)]
pub struct ProxyHealth {
    resync: Duration,
    started: SystemTime,
    syncs: Mutex<Syncs>,
    /// False while this node is being deleted: `/healthz` then tells load balancers to drain
    /// it, while `/livez` does not tell the kubelet to restart the daemon.
    node_eligible: AtomicBool,
}

#[derive(Debug, Default)]
struct Syncs {
    last_ok: Option<SystemTime>,
    last_failed: bool,
}

impl ProxyHealth {
    pub fn new(resync: Duration) -> Arc<Self> {
        Arc::new(Self {
            resync,
            started: SystemTime::now(),
            syncs: Mutex::default(),
            node_eligible: AtomicBool::new(true),
        })
    }

    /// Records whether this node is to take load balancer traffic (see
    /// [`crate::kube_source::node_eligible`]).
    pub fn set_node_eligible(&self, eligible: bool) {
        if self.node_eligible.swap(eligible, Ordering::Relaxed) != eligible {
            if eligible {
                info!("this node takes load balancer traffic again: /healthz follows the syncs");
            } else {
                info!(
                    "this node is being deleted: /healthz answers 503 so load balancers drain it"
                );
            }
        }
    }

    /// Records a sync that succeeded or failed.
    pub fn record_sync(&self, ok: bool) {
        let mut syncs = self.syncs.lock().unwrap_or_else(PoisonError::into_inner);
        syncs.last_failed = !ok;
        if ok {
            syncs.last_ok = Some(SystemTime::now());
        }
    }

    /// (healthy, time of the last good sync) at `now`.
    fn at(&self, now: SystemTime) -> (bool, Option<SystemTime>) {
        let syncs = self.syncs.lock().unwrap_or_else(PoisonError::into_inner);
        let since = syncs.last_ok.unwrap_or(self.started);
        let recent = now.duration_since(since).unwrap_or_default() <= self.resync.saturating_mul(2);
        (recent && !syncs.last_failed, syncs.last_ok)
    }

    pub fn is_healthy(&self) -> bool {
        self.at(SystemTime::now()).0
    }
}

/// Binds `address` (an error names it) and answers `/healthz` and `/livez` there until the
/// runtime stops.
pub async fn serve_healthz(address: SocketAddr, health: Arc<ProxyHealth>) -> Result<()> {
    let listener = TcpListener::bind(address)
        .await
        .map_err(Error::io(format!("healthz address {address}")))?;
    http::serve(listener, "healthz", move |request| healthz(&health, request, SystemTime::now()));
    Ok(())
}

/// kube-proxy's `/healthz` and `/livez` answers (`pkg/proxy/healthcheck/proxy_health.go`):
/// the same, except that a node being deleted fails `/healthz` only.
fn healthz<B>(health: &ProxyHealth, request: &Request<B>, now: SystemTime) -> http::Answer {
    let liveness = match request.uri().path() {
        "/healthz" => false,
        "/livez" => true,
        _ => {
            return http::answer(StatusCode::NOT_FOUND, "text/plain", "not found: try /healthz\n");
        }
    };
    let (synced, last_ok) = health.at(now);
    let node_eligible = health.node_eligible.load(Ordering::Relaxed);
    let healthy = synced && (liveness || node_eligible);
    let timestamp = |time: SystemTime| {
        jiff::Timestamp::try_from(time).map(|t| t.to_string()).unwrap_or_default()
    };
    let body = serde_json::json!({
        "lastUpdated": last_ok.map(timestamp).unwrap_or_default(),
        "currentTime": timestamp(now),
        "nodeEligible": node_eligible,
    });
    let status = if healthy { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    http::answer(status, "application/json", body.to_string())
}

/// The servers of the health check node ports of the services programmed.
pub struct HealthCheckServers {
    servers: BTreeMap<u16, Server>,
    proxy_health: Arc<ProxyHealth>,
}

struct Server {
    service: ServiceName,
    local_endpoints: Arc<AtomicUsize>,
    /// One listener task per address it listens on.
    listeners: BTreeMap<Ipv4Addr, JoinHandle<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        for task in self.listeners.values() {
            task.abort();
        }
    }
}

impl HealthCheckServers {
    /// Servers whose answers also say whether the daemon is healthy.
    pub fn new(proxy_health: Arc<ProxyHealth>) -> Self {
        Self { servers: BTreeMap::new(), proxy_health }
    }

    /// Serves exactly `checks` on `addresses` (see `NodeConfig::health_check_addresses`): new
    /// ports are bound, gone ones closed, counts updated; when the addresses change, each port
    /// stops listening on the ones that went and starts on the new ones, and keeps the rest
    /// open. A port that cannot be bound (in use) is logged and tried again at the next update.
    /// Call it in a Tokio runtime.
    pub fn update(&mut self, checks: &BTreeMap<ServiceName, HealthCheck>, addresses: &[Ipv4Addr]) {
        let mut wanted: BTreeMap<u16, (&ServiceName, usize)> = BTreeMap::new();
        for (service, check) in checks {
            if let Some((first, _)) = wanted.get(&check.node_port) {
                // The API server allocates each port once; two manifests may still say so.
                warn!(port = check.node_port, %service, other = %first, "health check node port taken by another service");
                continue;
            }
            wanted.insert(check.node_port, (service, check.local_endpoints));
        }
        self.servers.retain(|port, server| {
            let keep = wanted.get(port).is_some_and(|(service, _)| **service == server.service);
            if !keep {
                info!(port, service = %server.service, "health check node port closed");
            }
            keep
        });
        for (port, (service, count)) in wanted {
            let server = self.servers.entry(port).or_insert_with(|| {
                info!(port, %service, local_endpoints = count, "serving a health check node port");
                Server {
                    service: service.clone(),
                    local_endpoints: Arc::new(AtomicUsize::new(count)),
                    listeners: BTreeMap::new(),
                }
            });
            server.local_endpoints.store(count, Ordering::Relaxed);
            server.listeners.retain(|address, task| {
                let keep = addresses.contains(address);
                if !keep {
                    task.abort();
                }
                keep
            });
            for &address in addresses {
                if server.listeners.contains_key(&address) {
                    continue;
                }
                match listen(server, &self.proxy_health, SocketAddr::from((address, port))) {
                    Ok(task) => {
                        server.listeners.insert(address, task);
                    }
                    Err(error) => {
                        warn!(port, %address, %service, %error, "cannot serve the health check node port");
                    }
                }
            }
        }
    }
}

/// Serves `server`'s answers on `address`.
fn listen(
    server: &Server,
    proxy_health: &Arc<ProxyHealth>,
    address: SocketAddr,
) -> std::io::Result<JoinHandle<()>> {
    let socket = TcpSocket::new_v4()?;
    // A port closed and opened again must not wait for its old connections' TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(address)?;
    let listener = socket.listen(128)?;
    let (name, health) = (server.service.clone(), Arc::clone(proxy_health));
    let endpoints = Arc::clone(&server.local_endpoints);
    Ok(http::serve(listener, "health check", move |_request| {
        answer(&name, endpoints.load(Ordering::Relaxed), health.is_healthy())
    }))
}

/// kube-proxy's answer (`pkg/proxy/healthcheck/service_health.go`), whatever the path.
fn answer(service: &ServiceName, local_endpoints: usize, proxy_healthy: bool) -> http::Answer {
    let status = if local_endpoints > 0 && proxy_healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = serde_json::json!({
        "service": {"namespace": service.namespace, "name": service.name},
        "localEndpoints": local_endpoints,
        "serviceProxyHealthy": proxy_healthy,
    });
    let mut response = http::answer(status, "application/json", body.to_string());
    let headers = response.headers_mut();
    headers.insert("X-Content-Type-Options", hyper::header::HeaderValue::from_static("nosniff"));
    headers.insert("X-Load-Balancing-Endpoint-Weight", local_endpoints.into());
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn body(response: http::Answer) -> serde_json::Value {
        use http_body_util::BodyExt as _;
        let bytes = response.into_body().collect().await.expect("a full body").to_bytes();
        serde_json::from_slice(&bytes).expect("JSON")
    }

    fn get(path: &str) -> Request<()> {
        Request::get(path).body(()).expect("request")
    }

    #[tokio::test]
    async fn healthz_is_200_while_syncs_succeed_and_503_after_a_failed_or_stale_one() {
        let resync = Duration::from_secs(60);
        let health = ProxyHealth::new(resync);
        let now = SystemTime::now();
        let status_at = |time| healthz(&health, &get("/healthz"), time).status();
        assert_eq!(status_at(now), StatusCode::OK, "starting: no sync due yet");
        assert_eq!(status_at(now + resync * 3), StatusCode::SERVICE_UNAVAILABLE, "never synced");
        health.record_sync(true);
        let answered = healthz(&health, &get("/healthz"), SystemTime::now());
        assert_eq!(answered.status(), StatusCode::OK);
        let body = body(answered).await;
        assert!(body["lastUpdated"].as_str().is_some_and(|t| t.ends_with('Z')), "{body}");
        assert_eq!(body["nodeEligible"], true);
        assert_eq!(healthz(&health, &get("/livez"), SystemTime::now()).status(), StatusCode::OK);
        assert_eq!(status_at(now + resync * 3), StatusCode::SERVICE_UNAVAILABLE, "stuck");
        health.record_sync(false);
        assert_eq!(status_at(SystemTime::now()), StatusCode::SERVICE_UNAVAILABLE, "failed");
        assert_eq!(healthz(&health, &get("/"), now).status(), StatusCode::NOT_FOUND);
    }

    #[tokio::test]
    async fn a_node_being_deleted_fails_healthz_but_not_livez() {
        let health = ProxyHealth::new(Duration::from_secs(60));
        health.record_sync(true);
        health.set_node_eligible(false);
        let answered = healthz(&health, &get("/healthz"), SystemTime::now());
        assert_eq!(answered.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body(answered).await["nodeEligible"], false);
        assert_eq!(healthz(&health, &get("/livez"), SystemTime::now()).status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn a_node_with_local_endpoints_answers_200_and_one_without_503() {
        let web = ServiceName::new("shop", "web");
        let ok = answer(&web, 2, true);
        assert_eq!(ok.status(), StatusCode::OK);
        assert_eq!(ok.headers()["X-Load-Balancing-Endpoint-Weight"], "2");
        assert_eq!(ok.headers()["content-type"], "application/json");
        assert_eq!(
            body(ok).await,
            serde_json::json!({
                "service": {"namespace": "shop", "name": "web"},
                "localEndpoints": 2,
                "serviceProxyHealthy": true,
            })
        );
        assert_eq!(answer(&web, 0, true).status(), StatusCode::SERVICE_UNAVAILABLE);
        let unsynced = answer(&web, 2, false);
        assert_eq!(unsynced.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body(unsynced).await["serviceProxyHealthy"], false);
    }

    #[tokio::test]
    async fn new_addresses_leave_the_listeners_of_those_that_stay_alone() {
        // A port nothing else holds on loopback.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|probe| probe.local_addr())
            .expect("a free port")
            .port();
        let mut servers = HealthCheckServers::new(ProxyHealth::new(Duration::from_secs(60)));
        let service = ServiceName::new("default", "web");
        let checks =
            BTreeMap::from([(service, HealthCheck { node_port: port, local_endpoints: 1 })]);
        let (one, two) = (Ipv4Addr::LOCALHOST, Ipv4Addr::new(127, 0, 0, 2));
        let listener_ids = |servers: &HealthCheckServers| -> BTreeMap<Ipv4Addr, tokio::task::Id> {
            servers.servers[&port].listeners.iter().map(|(a, task)| (*a, task.id())).collect()
        };

        servers.update(&checks, &[one]);
        let first = listener_ids(&servers)[&one];
        servers.update(&checks, &[one, two]);
        let ids = listener_ids(&servers);
        assert_eq!(ids[&one], first, "the listener on the address that stays was restarted");
        assert_eq!(ids.len(), 2);
        tokio::net::TcpStream::connect((two, port)).await.expect("the new address listens");

        servers.update(&checks, &[two]);
        assert_eq!(listener_ids(&servers).keys().copied().collect::<Vec<_>>(), [two]);
    }
}
