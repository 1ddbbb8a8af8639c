//! Health check node ports, probed as a cloud load balancer probes them, from outside the node:
//! a LoadBalancer service with externalTrafficPolicy Local answers 200 on its
//! `healthCheckNodePort` while this node has a ready endpoint of it and 503 when it has none,
//! with kube-proxy's JSON body, on the nodePortAddresses only; the port closes when the service
//! goes. The daemon's own `/healthz` answers on kube-proxy's port 10256.

use lb_tests::{
    daemon::{RunningDaemon, http_get, wait_for},
    manifests::ManifestDir,
    pins::TestPins,
    topology::{NODE_IP, Topology},
};

/// `web-local` has its endpoint on this node (node-a), `web-remote` on another one.
const SERVICES: &str = "
apiVersion: v1
kind: Service
metadata: {name: web-local, namespace: shop}
spec:
  type: LoadBalancer
  clusterIP: 10.96.80.1
  externalTrafficPolicy: Local
  healthCheckNodePort: 32100
  ports:
  - {port: 80, protocol: TCP, targetPort: 80, nodePort: 30500}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-local-1
  namespace: shop
  labels: {kubernetes.io/service-name: web-local}
addressType: IPv4
endpoints:
- {addresses: [10.244.1.30], nodeName: node-a, conditions: {ready: true}}
ports:
- {name: '', port: 80, protocol: TCP}
---
apiVersion: v1
kind: Service
metadata: {name: web-remote, namespace: shop}
spec:
  type: LoadBalancer
  clusterIP: 10.96.80.2
  externalTrafficPolicy: Local
  healthCheckNodePort: 32101
  ports:
  - {port: 80, protocol: TCP, targetPort: 80, nodePort: 30501}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-remote-1
  namespace: shop
  labels: {kubernetes.io/service-name: web-remote}
addressType: IPv4
endpoints:
- {addresses: [10.244.2.30], nodeName: node-b, conditions: {ready: true}}
ports:
- {name: '', port: 80, protocol: TCP}
";

/// The status and body a load balancer's probe from the external client gets.
fn probe(topology: &Topology, port: u16) -> std::io::Result<(u16, serde_json::Value)> {
    let response = http_get(&topology.client, &format!("{NODE_IP}:{port}"), "/healthz")?;
    let body = serde_json::from_str(response.body()).expect("a JSON body");
    Ok((response.status, body))
}

#[test]
fn healthz_and_health_check_node_ports_answer_as_kube_proxy_does() {
    let topology = Topology::new("lbhc");
    let pins = TestPins::new();
    let manifests = ManifestDir::new();
    manifests.add_file("shop.yaml", SERVICES);
    let daemon = RunningDaemon::start(&topology, &pins, manifests.path(), None);
    let healthz = http_get(&topology.client, &format!("{NODE_IP}:10256"), "/healthz")
        .expect("the daemon's /healthz answers");
    assert_eq!(healthz.status, 200, "{}", healthz.text);

    let (status, body) = probe(&topology, 32100).expect("web-local's health check answers");
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        serde_json::json!({
            "service": {"namespace": "shop", "name": "web-local"},
            "localEndpoints": 1,
            "serviceProxyHealthy": true,
        })
    );
    // As kube-proxy binds it: on the nodePortAddresses (192.168.1.63/32 here) only.
    let elsewhere = http_get(&topology.node, "127.0.0.1:32100", "/healthz");
    assert!(elsewhere.is_err(), "the node's other addresses do not serve it");
    let (status, body) = probe(&topology, 32101).expect("web-remote's health check answers");
    assert_eq!((status, &body["localEndpoints"]), (503, &serde_json::json!(0)), "{body}");

    // The local endpoint stops being ready: load balancers must stop sending to this node.
    manifests.add_file("shop.yaml", &SERVICES.replacen("ready: true", "ready: false", 1));
    wait_for(
        || probe(&topology, 32100).is_ok_and(|(status, _)| status == 503),
        "web-local's health check to answer 503",
    );

    // The service goes: so does its port.
    let without_local = &SERVICES[SERVICES
        .find("---\napiVersion: v1\nkind: Service\nmetadata: {name: web-remote")
        .expect("web-remote")..];
    manifests.add_file("shop.yaml", without_local);
    wait_for(|| probe(&topology, 32100).is_err(), "web-local's health check port to close");
    assert_eq!(probe(&topology, 32101).expect("web-remote's stays").0, 503);
    drop(daemon);
}
