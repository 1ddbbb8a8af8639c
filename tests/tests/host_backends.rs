//! A backend that is a host-network endpoint of this node (the API server behind the
//! `kubernetes` Service on a control-plane node, a host-network ingress controller): the
//! node's own stack answers, and its replies leave through the egress of the pod's or the
//! external interface, where `lb_tc_reply` restores the service address. Without it a pod
//! would get its SYN-ACK from the node's address and reset the connection. A client outside
//! the cluster reaching the ClusterIP is not masqueraded here, unlike to a pod backend.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpListener},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use lb_tests::{
    daemon::{RunningDaemon, wait_for_backends},
    manifests::ManifestDir,
    netns::enter_path,
    pins::TestPins,
    topology::{NODE_IP, Topology, tcp_request},
};

/// The API server's stand-in: on the node itself, port 6443.
const HOST_PORT: u16 = 6443;

const HOST_NETWORK_SERVICE: &str = "
apiVersion: v1
kind: Service
metadata: {name: apiserver, namespace: default}
spec:
  type: NodePort
  clusterIP: 10.96.0.1
  ports:
  - {name: https, port: 443, protocol: TCP, targetPort: 6443, nodePort: 30443}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: apiserver-1
  namespace: default
  labels: {kubernetes.io/service-name: apiserver}
addressType: IPv4
endpoints:
- {addresses: [192.168.1.63], nodeName: node-a, conditions: {ready: true}}
ports:
- {name: https, port: 6443, protocol: TCP}
";

/// A line server in the node's network namespace, stopped on drop.
struct HostServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl HostServer {
    fn start(node_netns: String) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let (ready, started) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            enter_path(&node_netns);
            let listener = TcpListener::bind(("0.0.0.0", HOST_PORT)).expect("bind on the node");
            listener.set_nonblocking(true).expect("non-blocking listener");
            ready.send(()).expect("signal");
            while !flag.load(Ordering::Relaxed) {
                let Ok((stream, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                stream.set_nonblocking(false).expect("blocking stream");
                stream.set_read_timeout(Some(Duration::from_secs(2))).expect("timeout");
                let mut writer = stream.try_clone().expect("clone");
                let mut line = String::new();
                if BufReader::new(stream).read_line(&mut line).is_ok() {
                    let _ = writeln!(writer, "hello from the node");
                }
            }
        });
        started.recv().expect("the host server started");
        Self { stop, thread: Some(thread) }
    }
}

impl Drop for HostServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[test]
fn pods_and_external_clients_reach_a_host_network_backend_through_its_service() {
    let topology = Topology::new("lbhb");
    let pins = TestPins::new();
    let manifests = ManifestDir::new();
    manifests.add_file("host-network.yaml", HOST_NETWORK_SERVICE);
    let _server = HostServer::start(topology.node.path());
    let daemon = RunningDaemon::start(&topology, &pins, manifests.path(), None);
    wait_for_backends(&pins, "10.96.0.1:443", 1, "the host-network service programmed");

    let pod = &topology.pod("client").netns;
    let cluster_ip: SocketAddr = "10.96.0.1:443".parse().expect("address");
    let answer = tcp_request(pod, cluster_ip).expect("a pod reaches the ClusterIP");
    assert_eq!(answer, "hello from the node");

    let node_port: SocketAddr = format!("{NODE_IP}:30443").parse().expect("address");
    let answer = tcp_request(&topology.client, node_port).expect("a client reaches the NodePort");
    assert_eq!(answer, "hello from the node");

    // From outside the cluster to the ClusterIP: not masqueraded (the node's answer to its own
    // address would stay on loopback), translated back on the external interface's egress.
    let answer = tcp_request(&topology.client, cluster_ip).expect("a client reaches the ClusterIP");
    assert_eq!(answer, "hello from the node");

    daemon.stop();
}
