//! The command line of `lb-user`, here rather than in the binary so that tests can check
//! argument lists (the DaemonSet's) against it.

use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand};

use crate::{attach, config::Supplied, pins::DEFAULT_PIN_DIR, trace::Entry};

#[derive(Parser)]
#[command(version, about = "eBPF/XDP Kubernetes Service load balancer: node daemon and tools")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// The daemon: attach (or adopt) the datapath and keep it programmed from the source.
    Run {
        /// A directory of Service and EndpointSlice manifests (multi-document YAML), watched.
        /// Without it the daemon watches the Kubernetes API.
        #[arg(long, conflicts_with = "kubeconfig")]
        manifests: Option<PathBuf>,
        /// The kubeconfig for the Kubernetes API; default: KUBECONFIG, ~/.kube/config or the
        /// in-cluster service account.
        #[arg(long)]
        kubeconfig: Option<PathBuf>,
        /// The node configuration file (YAML).
        #[arg(long)]
        node_config: PathBuf,
        /// This node's name, over the file's `nodeName`: one file then serves every node of a
        /// DaemonSet, which sets `NODE_NAME` from the pod's `spec.nodeName`.
        #[arg(long, env = "NODE_NAME")]
        node_name: Option<String>,
        #[command(flatten)]
        targets: TargetArgs,
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        /// Seconds between full resyncs, timed from the last one whatever changes meanwhile.
        #[arg(long, default_value_t = 60)]
        resync_seconds: u64,
        /// Where to serve Prometheus metrics (`GET /metrics`); kube-proxy's address by default.
        /// `none` turns the endpoint off.
        #[arg(long, default_value = "127.0.0.1:10249", value_parser = parse_server_address)]
        metrics_address: ServerAddress,
        /// Where to answer `GET /healthz` and `/livez` (200 while the daemon syncs, else 503);
        /// kube-proxy's address by default, which liveness probes and load balancers use.
        /// `none` turns it off.
        #[arg(long, default_value = "0.0.0.0:10256", value_parser = parse_server_address)]
        healthz_address: ServerAddress,
    },
    /// Load the programs, attach them, and pin programs, links and maps under the pin directory.
    Load {
        #[command(flatten)]
        targets: TargetArgs,
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        /// Print the attachments as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Detach and unpin everything `load` or `run` created under the pin directory.
    Unload {
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
    /// What is programmed: frontends, backends and counters, from the pinned maps.
    Status {
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// The translated connections being tracked, from the pinned conntrack map (as
    /// `conntrack -L` shows kube-proxy's): client, frontend, backend, SNAT, TCP state, idle time.
    Flows {
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Run one packet through the real programs, programmed from manifests, and say what they do.
    Trace {
        #[arg(long)]
        manifests: PathBuf,
        #[arg(long)]
        node_config: PathBuf,
        #[arg(long, value_enum)]
        from: Entry,
        #[arg(long, default_value = "tcp")]
        proto: String,
        /// Source address, with an optional port (default 40000).
        #[arg(long)]
        src: String,
        /// Destination address and port.
        #[arg(long)]
        dst: String,
        #[arg(long)]
        json: bool,
    },
}

/// Where `run` and `load` attach the programs.
#[derive(clap::Args)]
pub struct TargetArgs {
    /// External interface for the XDP program (repeatable), or a prefix pattern ending in `*`.
    #[arg(long = "xdp-iface", value_name = "IF")]
    xdp_ifaces: Vec<String>,
    /// Pod-facing interface for the tc ingress program (repeatable), or a prefix pattern ending
    /// in `*` (`cali*`): `run` attaches to matching interfaces as they appear.
    #[arg(long = "tc-iface", value_name = "IF")]
    tc_ifaces: Vec<String>,
    /// cgroup v2 directory whose processes reach services through the host path when their
    /// sockets are in the daemon's network namespace (`/sys/fs/cgroup` for the whole node).
    #[arg(long, value_name = "DIR")]
    host_cgroup: Option<PathBuf>,
}

impl From<TargetArgs> for attach::Targets {
    fn from(args: TargetArgs) -> Self {
        Self {
            xdp_ifaces: args.xdp_ifaces,
            tc_ifaces: args.tc_ifaces,
            host_cgroup: args.host_cgroup,
        }
    }
}

/// What `run`'s command line says of the node besides its configuration file: its name
/// (`--node-name`, `NODE_NAME`), and whether its Node object supplies its addresses (it does
/// when the daemon watches the API, that is without `--manifests`).
pub fn supplied(node_name: Option<String>, manifests: Option<&Path>) -> Supplied {
    Supplied { node_name, node_ips_from_api: manifests.is_none() }
}

/// `--metrics-address`, `--healthz-address`: an address, or `none`.
#[derive(Clone, Debug)]
pub struct ServerAddress(pub Option<std::net::SocketAddr>);

fn parse_server_address(text: &str) -> Result<ServerAddress, String> {
    if text == "none" {
        return Ok(ServerAddress(None));
    }
    text.parse().map(|address| ServerAddress(Some(address))).map_err(|e| format!("{text}: {e}"))
}
