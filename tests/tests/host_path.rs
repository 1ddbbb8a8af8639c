//! The host path: node processes (here, processes moved into a test cgroup and the node's
//! network namespace) reach ClusterIPs and NodePorts through the cgroup hooks of the running
//! daemon, see the service address as their peer, and are refused at once by a service
//! without endpoints or on a port the service does not serve (a service address nobody holds
//! fails at once too), and reach a LoadBalancer IP only if its loadBalancerSourceRanges hold
//! the node's address. Only the test's own processes are in the cgroup. A process of the cgroup
//! in a pod's network namespace is the pod's, not the node's: the tc path serves it.

use std::{path::Path, process::Command};

use lb_tests::{
    cgroup::TestCgroup,
    daemon::RunningDaemon,
    manifests::ManifestDir,
    pins::TestPins,
    topology::{NODE_IP, Topology},
};
use lb_user::{attach, pins::HOST_IFACE, program_names, status};

/// Two LoadBalancer services of my-nginx's pods with loadBalancerSourceRanges: one range holds
/// the node's address, the other does not.
const RANGED: &str = "\
apiVersion: v1
kind: Service
metadata: {name: lb-node-allowed, namespace: default}
spec:
  type: LoadBalancer
  clusterIP: 10.96.45.41
  selector: {run: my-nginx}
  loadBalancerSourceRanges: [192.168.1.0/24]
  ports:
  - {port: 80, protocol: TCP, targetPort: 80, nodePort: 30501}
status:
  loadBalancer:
    ingress:
    - {ip: 198.51.100.41}
---
apiVersion: v1
kind: Service
metadata: {name: lb-node-outside, namespace: default}
spec:
  type: LoadBalancer
  clusterIP: 10.96.45.42
  selector: {run: my-nginx}
  loadBalancerSourceRanges: [203.0.113.0/25]
  ports:
  - {port: 80, protocol: TCP, targetPort: 80, nodePort: 30502}
status:
  loadBalancer:
    ingress:
    - {ip: 198.51.100.42}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: lb-node-allowed-1
  namespace: default
  labels: {kubernetes.io/service-name: lb-node-allowed}
addressType: IPv4
endpoints:
- {addresses: [10.244.1.10], nodeName: node-a, conditions: {ready: true}}
ports:
- {name: '', port: 80, protocol: TCP}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: lb-node-outside-1
  namespace: default
  labels: {kubernetes.io/service-name: lb-node-outside}
addressType: IPv4
endpoints:
- {addresses: [10.244.1.10], nodeName: node-a, conditions: {ready: true}}
ports:
- {name: '', port: 80, protocol: TCP}
";

/// What the node process does: connect, print its peer and the first answer line (TCP), or
/// exchange one datagram (UDP), or eight from one unconnected socket and print how many
/// backends answered (`udp8`); errors are printed as `error: <errno name>`.
const CLIENT: &str = r#"
import socket, sys
kind, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
try:
    if kind == "tcp":
        s = socket.create_connection((host, port), timeout=2)
        s.sendall(b"GET /\n")
        print("%s:%d" % s.getpeername(), s.makefile().readline().strip())
    elif kind == "udp":
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(2)
        s.sendto(b"ping", (host, port))
        data, peer = s.recvfrom(512)
        print("%s:%d" % peer, data.decode())
    else:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(2)
        answers = set()
        for _ in range(8):
            s.sendto(b"ping", (host, port))
            answers.add(s.recvfrom(512)[0].decode())
        print(len(answers), "backends")
except OSError as e:
    print("error:", e.strerror)
"#;

/// Runs the client as a process of `cgroup`, inside the network namespace `netns` (the node's,
/// or a pod's).
fn process_in(cgroup: &Path, netns: &str, args: &[&str]) -> String {
    let script = format!(
        "echo $$ > {}/cgroup.procs && exec nsenter --net={netns} python3 -c '{CLIENT}' {}",
        cgroup.display(),
        args.join(" ")
    );
    let output = Command::new("sh").args(["-c", &script]).output().expect("node process");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

#[test]
fn node_processes_reach_services_through_the_cgroup_hooks() {
    let topology = Topology::new("lbh");
    let _servers = topology.start_servers();
    let pins = TestPins::new();
    let cgroup = TestCgroup::new();
    let manifests = ManifestDir::new();
    manifests.add_file("ranged.yaml", RANGED);
    let daemon = RunningDaemon::start(&topology, &pins, manifests.path(), Some(cgroup.path()));
    let netns = topology.node.path();

    let answer = process_in(cgroup.path(), &netns, &["tcp", "10.96.45.10", "80"]);
    assert!(
        answer.starts_with("10.96.45.10:80 hello from my-nginx-"),
        "peer is the service address: {answer}"
    );
    let answer = process_in(cgroup.path(), &netns, &["tcp", "192.168.1.63", "30380"]);
    assert!(answer.starts_with("192.168.1.63:30380 hello from my-nginx-nodeport-"), "{answer}");
    let answer = process_in(cgroup.path(), &netns, &["udp", "10.96.0.10", "53"]);
    assert!(
        answer.starts_with("10.96.0.10:53 my-nginx-"),
        "the reply comes from the service address: {answer}"
    );
    // Two backends; an unconnected socket's datagrams all go to one, as a flow's would.
    let answer = process_in(cgroup.path(), &netns, &["udp8", "10.96.0.10", "53"]);
    assert_eq!(answer, "1 backends", "one socket, one backend");
    let answer = process_in(cgroup.path(), &netns, &["tcp", "10.96.45.12", "80"]);
    assert_eq!(answer, "error: Connection refused", "no endpoints: refused at once");
    let answer = process_in(cgroup.path(), &netns, &["tcp", "10.96.45.10", "81"]);
    assert_eq!(answer, "error: Connection refused", "a port the ClusterIP does not serve");
    let answer = process_in(cgroup.path(), &netns, &["tcp", "10.96.99.99", "80"]);
    assert_eq!(answer, "error: Operation not permitted", "a service address nobody holds");
    // loadBalancerSourceRanges, as kube-proxy applies them to the node's own traffic: allowed
    // when a range holds the node's address, else it fails at once.
    assert!(NODE_IP.starts_with("192.168.1."), "the first range holds {NODE_IP}");
    let answer = process_in(cgroup.path(), &netns, &["tcp", "198.51.100.41", "80"]);
    assert_eq!(answer, "198.51.100.41:80 hello from my-nginx-1", "a range holds the node");
    let answer = process_in(cgroup.path(), &netns, &["tcp", "198.51.100.42", "80"]);
    assert_eq!(answer, "error: Operation not permitted", "no range holds the node");

    // The hooks also see the sockets of a pod whose processes are in the cgroup (as every pod's
    // are when the hooks sit at the root of the node's tree): they leave those to the pod's tc
    // path, which translates its packets.
    let counts = |pins: &TestPins| {
        let reasons = status::read(pins.layout()).expect("status").reasons;
        (reasons["host_translated"], reasons["forward_new"])
    };
    let (host_before, tc_before) = counts(&pins);
    let pod = topology.pod("client").netns.path();
    let answer = process_in(cgroup.path(), &pod, &["tcp", "10.96.45.10", "80"]);
    assert!(answer.starts_with("10.96.45.10:80 hello from my-nginx-"), "{answer}");
    let (host_after, tc_after) = counts(&pins);
    assert_eq!(host_after, host_before, "the host path translated a pod's connection");
    assert_eq!(tc_after, tc_before + 1, "the pod's SYN went through the tc path");

    daemon.stop();
}

#[test]
fn a_daemon_adopting_a_datapath_without_its_host_hooks_attaches_them() {
    let topology = Topology::new("lbi");
    let _servers = topology.start_servers();
    let pins = TestPins::new();
    let cgroup = TestCgroup::new();
    let manifests = ManifestDir::new();
    let daemon = RunningDaemon::start(&topology, &pins, manifests.path(), Some(cgroup.path()));
    daemon.stop();
    // As a first load stopped before its last step (the host hooks) leaves the pins.
    for name in program_names::HOST {
        let link = pins.layout().link(name, HOST_IFACE);
        let file = link.file_name().expect("a link file").to_string_lossy().into_owned();
        attach::detach_pinned(pins.layout(), &file).expect("detach").expect("a link");
    }

    let daemon = RunningDaemon::start(&topology, &pins, manifests.path(), Some(cgroup.path()));
    for name in program_names::HOST {
        assert!(pins.layout().link(name, HOST_IFACE).exists(), "{name} attached again");
    }
    let answer = process_in(cgroup.path(), &topology.node.path(), &["tcp", "10.96.45.10", "80"]);
    assert!(answer.starts_with("10.96.45.10:80 hello from my-nginx-"), "{answer}");
    daemon.stop();
}
