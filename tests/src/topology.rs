//! The demo node as network namespaces: a node with an external interface towards a client
//! namespace, and pods behind veths, each pod running small TCP and UDP servers that answer
//! with their name. Every address lives inside these namespaces; none has a route out of them.
//!
//! ```text
//!  client (192.168.1.100) --client0/ext0-- node-a (192.168.1.63) --veth-- pod namespaces
//! ```

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use crate::netns::{Netns, run};

pub const NODE_IP: &str = "192.168.1.63";
pub const CLIENT_IP: &str = "192.168.1.100";
/// The external interface (XDP) and the client's end of it.
pub const EXTERNAL_IFACE: &str = "ext0";
/// Where pods send everything: a link-local next hop, a node address on `lo` (Linux answers
/// ARP for any of its addresses on any interface), so no pod needs to know the node's IP.
const POD_GATEWAY: &str = "169.254.1.1";

/// The demo's pods: (name, address). The first is a client, the rest serve.
pub const PODS: [(&str, &str); 6] = [
    ("client", "10.244.1.5"),
    ("my-nginx-1", "10.244.1.10"),
    ("my-nginx-2", "10.244.1.11"),
    ("my-nginx-nodeport-1", "10.244.1.20"),
    ("my-nginx-nodeport-2", "10.244.1.21"),
    ("nginx", "10.244.1.30"),
];

pub struct Pod {
    pub name: &'static str,
    pub ip: Ipv4Addr,
    pub netns: Netns,
    /// The node's end of the pod's veth (tc ingress attaches here).
    pub host_iface: String,
}

/// All namespaces of the demo, removed on drop.
pub struct Topology {
    prefix: String,
    /// The index of the next pod's namespace and veth names.
    next_pod: usize,
    pub node: Netns,
    pub client: Netns,
    pub pods: Vec<Pod>,
    /// Pods of another node (see [`Topology::add_remote_pod`]).
    pub remote_pods: Vec<Pod>,
}

impl Topology {
    pub fn new(prefix: &str) -> Self {
        let node = Netns::new(&format!("{prefix}-node"));
        let client = Netns::new(&format!("{prefix}-client"));
        node.ip(&[
            "link",
            "add",
            EXTERNAL_IFACE,
            "type",
            "veth",
            "peer",
            "name",
            "client0",
            "netns",
            client.name(),
        ]);
        node.ip(&["addr", "add", &format!("{NODE_IP}/24"), "dev", EXTERNAL_IFACE]);
        node.ip(&["link", "set", EXTERNAL_IFACE, "up"]);
        client.ip(&["addr", "add", &format!("{CLIENT_IP}/24"), "dev", "client0"]);
        client.ip(&["link", "set", "client0", "up"]);
        client.ip(&["route", "add", "default", "via", NODE_IP]);
        // XDP rewrites packets incrementally and so needs complete checksums from the client;
        // a veth otherwise hands over checksum-offloaded (partial) ones.
        run("ip", &["netns", "exec", client.name(), "ethtool", "-K", "client0", "tx", "off"]);
        sysctl(&node, "net.ipv4.ip_forward", "1");
        node.ip(&["addr", "add", &format!("{POD_GATEWAY}/32"), "dev", "lo"]);
        let pods = PODS
            .iter()
            .enumerate()
            .map(|(index, &(name, ip))| add_pod(&node, prefix, index, name, ip))
            .collect();
        Self {
            prefix: prefix.into(),
            next_pod: PODS.len(),
            node,
            client,
            pods,
            remote_pods: Vec::new(),
        }
    }

    /// Adds a pod (no servers) behind a new veth `vpod<n>`, as a CNI does when a pod starts.
    pub fn add_pod(&mut self, name: &'static str, ip: &str) -> &Pod {
        let pod = add_pod(&self.node, &self.prefix, self.next_pod, name, ip);
        self.next_pod += 1;
        self.pods.push(pod);
        self.pods.last().expect("just added")
    }

    /// Adds a pod of another node (no servers until [`Topology::start_servers`]), reached as
    /// pods of other nodes are over a routed node network: the node routes its address to the
    /// client's namespace, which forwards it on to the pod, behind a veth of its own.
    pub fn add_remote_pod(&mut self, name: &'static str, ip: &str) -> &Pod {
        let index = self.next_pod;
        self.next_pod += 1;
        let pod = Pod {
            name,
            ip: ip.parse().expect("pod address"),
            netns: Netns::new(&format!("{}-pod{index}", self.prefix)),
            host_iface: format!("vpod{index}"),
        };
        connect(&self.client, &pod);
        if self.remote_pods.is_empty() {
            sysctl(&self.client, "net.ipv4.ip_forward", "1");
            self.client.ip(&["addr", "add", &format!("{POD_GATEWAY}/32"), "dev", "lo"]);
        }
        // Complete checksums, as for the client: the packets reach the node's XDP program.
        run("ip", &["netns", "exec", pod.netns.name(), "ethtool", "-K", "eth0", "tx", "off"]);
        self.node.ip(&[
            "route",
            "add",
            &format!("{ip}/32"),
            "via",
            CLIENT_IP,
            "dev",
            EXTERNAL_IFACE,
        ]);
        self.remote_pods.push(pod);
        self.remote_pods.last().expect("just added")
    }

    /// Removes a pod and its veth, as a CNI does when a pod goes.
    pub fn remove_pod(&mut self, name: &str) {
        let index = self.pods.iter().position(|p| p.name == name).expect("a pod of that name");
        let pod = self.pods.remove(index);
        // Deleting the node's end deletes the pair at once; the namespace goes on drop.
        self.node.ip(&["link", "del", &pod.host_iface]);
    }

    /// Gives a pod a new veth of the same name (a new interface index), as when a CNI sets a
    /// pod's network up again.
    pub fn replace_pod_veth(&self, name: &str) {
        let pod = self.pod(name);
        self.node.ip(&["link", "del", &pod.host_iface]);
        connect(&self.node, pod);
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.pods.iter().find(|p| p.name == name).unwrap_or_else(|| panic!("no pod {name}"))
    }

    /// The node's ends of every pod veth, for the tc program.
    pub fn pod_ifaces(&self) -> Vec<String> {
        self.pods.iter().map(|p| p.host_iface.clone()).collect()
    }

    /// Starts the servers in every pod but the client; they stop when the result is dropped.
    pub fn start_servers(&self) -> Servers {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for pod in self.pods.iter().chain(&self.remote_pods).filter(|p| p.name != "client") {
            threads.push(serve_tcp(pod, Arc::clone(&stop)));
            threads.push(serve_udp(pod, Arc::clone(&stop)));
        }
        Servers { stop, threads }
    }
}

fn sysctl(netns: &Netns, key: &str, value: &str) {
    run("ip", &["netns", "exec", netns.name(), "sysctl", "-qw", &format!("{key}={value}")]);
}

fn add_pod(node: &Netns, prefix: &str, index: usize, name: &'static str, ip: &str) -> Pod {
    let pod = Pod {
        name,
        ip: ip.parse().expect("pod address"),
        netns: Netns::new(&format!("{prefix}-pod{index}")),
        host_iface: format!("vpod{index}"),
    };
    connect(node, &pod);
    pod
}

/// The pod's veth: its node end routes the pod's address, its pod end is the pod's `eth0`.
/// (`node` is the client's namespace for a remote pod.)
fn connect(node: &Netns, pod: &Pod) {
    let (host_iface, ip) = (pod.host_iface.as_str(), pod.ip.to_string());
    node.ip(&[
        "link",
        "add",
        host_iface,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        pod.netns.name(),
    ]);
    node.ip(&["link", "set", host_iface, "up"]);
    node.ip(&["route", "add", &format!("{ip}/32"), "dev", host_iface]);
    pod.netns.ip(&["addr", "add", &format!("{ip}/32"), "dev", "eth0"]);
    pod.netns.ip(&["link", "set", "eth0", "up"]);
    pod.netns.ip(&["route", "add", POD_GATEWAY, "dev", "eth0", "scope", "link"]);
    pod.netns.ip(&["route", "add", "default", "via", POD_GATEWAY, "dev", "eth0"]);
}

/// The pods' servers; stopped and joined on drop.
pub struct Servers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// How often the servers look at the stop flag (and, for the non-blocking accept, for new
/// connections: short, so a demo request is not delayed by it).
const POLL: Duration = Duration::from_millis(5);

/// A TCP server on port 80: answers every line with `hello from <pod>`.
fn serve_tcp(pod: &Pod, stop: Arc<AtomicBool>) -> JoinHandle<()> {
    let (name, path) = (pod.name, pod.netns.path());
    std::thread::spawn(move || {
        crate::netns::enter_path(&path);
        let listener = TcpListener::bind(("0.0.0.0", 80)).expect("bind TCP 80 in the pod");
        listener.set_nonblocking(true).expect("non-blocking listener");
        let mut connections = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((stream, _)) => {
                    let stop = Arc::clone(&stop);
                    connections.push(std::thread::spawn(move || answer_lines(stream, name, &stop)));
                }
                Err(_) => std::thread::sleep(POLL),
            }
        }
        for connection in connections {
            let _ = connection.join();
        }
    })
}

fn answer_lines(stream: TcpStream, name: &str, stop: &AtomicBool) {
    stream.set_read_timeout(Some(POLL)).expect("read timeout");
    let mut writer = stream.try_clone().expect("clone stream");
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    while !stop.load(Ordering::Relaxed) {
        match reader.read_line(&mut line) {
            Ok(0) => return,
            Ok(_) => {
                if writeln!(writer, "hello from {name}").is_err() {
                    return;
                }
                line.clear();
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
}

/// Datagrams longer than this are echoed after the pod's name: large answers, for tests of
/// fragmented datagrams.
pub const UDP_ECHO_ABOVE: usize = 1000;

/// A UDP server on port 53: answers every datagram with the pod's name, followed by the
/// datagram itself if it is longer than [`UDP_ECHO_ABOVE`] bytes.
fn serve_udp(pod: &Pod, stop: Arc<AtomicBool>) -> JoinHandle<()> {
    let (name, path) = (pod.name, pod.netns.path());
    std::thread::spawn(move || {
        crate::netns::enter_path(&path);
        let socket = UdpSocket::bind(("0.0.0.0", 53)).expect("bind UDP 53 in the pod");
        socket.set_read_timeout(Some(POLL)).expect("read timeout");
        let mut buffer = vec![0u8; 65_536];
        while !stop.load(Ordering::Relaxed) {
            if let Ok((len, from)) = socket.recv_from(&mut buffer) {
                let mut answer = name.as_bytes().to_vec();
                if len > UDP_ECHO_ABOVE {
                    answer.extend_from_slice(&buffer[..len]);
                }
                let _ = socket.send_to(&answer, from);
            }
        }
    })
}

/// Connects from `netns` to `addr`, sends one line and returns the answer.
pub fn tcp_request(netns: &Netns, addr: SocketAddr) -> std::io::Result<String> {
    netns.enter(|| {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        stream.write_all(b"GET /\n")?;
        let mut answer = String::new();
        BufReader::new(stream).read_line(&mut answer)?;
        Ok(answer.trim().to_owned())
    })
}

/// A connection from `netns` to `addr` kept open, for [`exchange`] across datapath changes.
pub fn long_lived(netns: &Netns, addr: SocketAddr) -> TcpStream {
    let connection = netns
        .enter(|| TcpStream::connect_timeout(&addr, Duration::from_secs(2)))
        .unwrap_or_else(|e| panic!("long-lived connection to {addr}: {e}"));
    connection.set_read_timeout(Some(Duration::from_secs(2))).expect("timeout");
    connection
}

/// One line over a [`long_lived`] connection, and the server's answer (its pod's name).
pub fn exchange(connection: &mut TcpStream) -> String {
    connection.write_all(b"again\n").expect("write on the long-lived connection");
    let mut line = String::new();
    BufReader::new(connection.try_clone().expect("clone")).read_line(&mut line).expect("answer");
    line.trim().to_owned()
}

/// Sends one datagram from `netns` to `addr` and returns the answer.
pub fn udp_request(netns: &Netns, addr: SocketAddr) -> std::io::Result<String> {
    netns.enter(|| {
        let socket = UdpSocket::bind(("0.0.0.0", 0))?;
        socket.set_read_timeout(Some(Duration::from_secs(2)))?;
        socket.send_to(b"ping", addr)?;
        let mut buffer = [0u8; 512];
        let (len, _) = socket.recv_from(&mut buffer)?;
        Ok(String::from_utf8_lossy(&buffer[..len]).into_owned())
    })
}
