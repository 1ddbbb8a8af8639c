//! Health check node ports, as kube-proxy serves them. A LoadBalancer service with
//! externalTrafficPolicy Local has a `healthCheckNodePort`; cloud load balancers probe it on
//! every node and send the service's traffic only to nodes that answer 200, since the others
//! have no local endpoint and drop it. Each port gets an HTTP server on all addresses that
//! answers any path with the count of local ready endpoints: 200 when there is one and the
//! daemon's last sync succeeded, 503 otherwise, with kube-proxy's JSON body and headers.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
};

use hyper::StatusCode;
use tokio::{net::TcpSocket, task::JoinHandle};
use tracing::{info, warn};

use crate::{
    http,
    model::{HealthCheck, ServiceName},
};

/// The servers of the health check node ports of the services programmed.
#[derive(Default)]
pub struct HealthCheckServers {
    servers: BTreeMap<u16, Server>,
    /// False while the last sync failed: the maps may not say what the source does.
    proxy_healthy: Arc<AtomicBool>,
}

struct Server {
    service: ServiceName,
    local_endpoints: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl HealthCheckServers {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records whether the last sync succeeded; the answers say so from now on.
    pub fn set_proxy_healthy(&self, healthy: bool) {
        self.proxy_healthy.store(healthy, Ordering::Relaxed);
    }

    /// Serves exactly `checks`: new ports are bound, gone ones closed, counts updated. A port
    /// that cannot be bound (in use) is logged and tried again at the next update. Call it in
    /// a Tokio runtime.
    pub fn update(&mut self, checks: &BTreeMap<ServiceName, HealthCheck>) {
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
            if let Some(server) = self.servers.get(&port) {
                server.local_endpoints.store(count, Ordering::Relaxed);
                continue;
            }
            match self.start(port, service, count) {
                Ok(server) => {
                    info!(port, %service, local_endpoints = count, "serving a health check node port");
                    self.servers.insert(port, server);
                }
                Err(error) => {
                    warn!(port, %service, %error, "cannot serve the health check node port");
                }
            }
        }
    }

    fn start(&self, port: u16, service: &ServiceName, count: usize) -> std::io::Result<Server> {
        let socket = TcpSocket::new_v4()?;
        // A port closed and opened again must not wait for its old connections' TIME_WAIT.
        socket.set_reuseaddr(true)?;
        socket.bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)))?;
        let listener = socket.listen(128)?;
        let local_endpoints = Arc::new(AtomicUsize::new(count));
        let (name, healthy) = (service.clone(), Arc::clone(&self.proxy_healthy));
        let endpoints = Arc::clone(&local_endpoints);
        let task = http::serve(listener, "health check", move |_request| {
            answer(&name, endpoints.load(Ordering::Relaxed), healthy.load(Ordering::Relaxed))
        });
        Ok(Server { service: service.clone(), local_endpoints, task })
    }
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
}
