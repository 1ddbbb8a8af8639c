//! `lb-user`: the node daemon and its command-line tools.

use std::{net::Ipv4Addr, path::PathBuf, time::Duration};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use lb_user::{
    attach,
    config::NodeConfig,
    daemon, flows,
    loader::Capacities,
    manifest, model,
    model::Protocol,
    pins::{DEFAULT_PIN_DIR, PinLayout},
    status,
    trace::{Entry, Request, Tracer},
};

#[derive(Parser)]
#[command(version, about = "eBPF/XDP Kubernetes Service load balancer: node daemon and tools")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
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
        #[command(flatten)]
        targets: TargetArgs,
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        /// Seconds between full resyncs when nothing changes.
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
struct TargetArgs {
    /// External interface for the XDP program (repeatable), or a prefix pattern ending in `*`.
    #[arg(long = "xdp-iface", value_name = "IF")]
    xdp_ifaces: Vec<String>,
    /// Pod-facing interface for the tc ingress program (repeatable), or a prefix pattern ending
    /// in `*` (`cali*`): `run` attaches to matching interfaces as they appear.
    #[arg(long = "tc-iface", value_name = "IF")]
    tc_ifaces: Vec<String>,
    /// cgroup v2 directory whose processes reach services through the host path
    /// (`/sys/fs/cgroup` for the whole node).
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

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match Cli::parse().command {
        Command::Run {
            manifests,
            kubeconfig,
            node_config,
            targets,
            pin_dir,
            resync_seconds,
            metrics_address,
            healthz_address,
        } => {
            let node_config = NodeConfig::from_file(&node_config)?;
            let source = match manifests {
                Some(dir) => daemon::Source::Manifests(dir),
                None => daemon::Source::Kubernetes { kubeconfig },
            };
            let options = daemon::Options {
                source,
                node_config,
                targets: targets.into(),
                pins: PinLayout::new(pin_dir),
                resync: Duration::from_secs(resync_seconds.max(1)),
                metrics_address: metrics_address.0,
                healthz_address: healthz_address.0,
            };
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()?;
            runtime.block_on(daemon::run(options)).context("run")?;
        }
        Command::Load { targets, pin_dir, json } => {
            let targets = attach::Targets::from(targets);
            let attachments = attach::load_and_attach(
                &PinLayout::new(&pin_dir),
                &targets,
                &Capacities::default(),
            )
            .context("load")?;
            if json {
                println!("{}", serde_json::to_string_pretty(&attachments)?);
            } else {
                for attachment in &attachments {
                    println!("{attachment}");
                }
                println!("pinned under {}", pin_dir.display());
            }
        }
        Command::Unload { pin_dir } => {
            for line in attach::unload(&PinLayout::new(&pin_dir)).context("unload")? {
                println!("{line}");
            }
        }
        Command::Status { pin_dir, json } => {
            let status = status::read(&PinLayout::new(&pin_dir)).context("status")?;
            print_json_or_text(json, &status, status::Status::table)?;
        }
        Command::Flows { pin_dir, json } => {
            let flows = flows::read(&PinLayout::new(&pin_dir)).context("flows")?;
            print_json_or_text(json, &flows, |flows| flows::table(flows))?;
        }
        Command::Trace { manifests, node_config, from, proto, src, dst, json } => {
            let node = NodeConfig::from_file(&node_config)?;
            let objects = manifest::load_dir(&manifests)?;
            for problem in &objects.problems {
                eprintln!("skipped: {problem}");
            }
            let model = model::build(&objects.services, &objects.slices, &node);
            let (src, src_port) = address(&src, Some(40_000)).context("--src")?;
            let (dst, dst_port) = address(&dst, None).context("--dst")?;
            let protocol = match proto.as_str() {
                "tcp" => Protocol::Tcp,
                "udp" => Protocol::Udp,
                other => bail!("--proto {other}: tcp or udp"),
            };
            let request = Request { entry: from, protocol, src, src_port, dst, dst_port };
            let outcome = Tracer::new(model, &node)?.trace(&request)?;
            if json {
                println!("{}", serde_json::to_string(&outcome)?);
            } else {
                println!("verdict:    {}", outcome.verdict);
                println!("service:    {}", outcome.service.as_deref().unwrap_or("-"));
                println!("backend:    {}", outcome.backend.as_deref().unwrap_or("-"));
                println!("snat:       {}", outcome.snat.as_deref().unwrap_or("-"));
                println!("candidates: {}", outcome.candidates.join(", "));
                println!("reason:     {}", outcome.reason);
            }
        }
    }
    Ok(())
}

/// Prints `value` as JSON, or as `text` makes it for people.
fn print_json_or_text<T: serde::Serialize>(
    json: bool,
    value: &T,
    text: impl FnOnce(&T) -> String,
) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(value)?);
    } else {
        print!("{}", text(value));
    }
    Ok(())
}

/// `IP:PORT`, or `IP` alone when a default port is given.
fn address(text: &str, default_port: Option<u16>) -> anyhow::Result<(Ipv4Addr, u16)> {
    match text.rsplit_once(':') {
        Some((ip, port)) => Ok((ip.parse()?, port.parse()?)),
        None => Ok((text.parse()?, default_port.context("a port is required: IP:PORT")?)),
    }
}

/// `--metrics-address`, `--healthz-address`: an address, or `none`.
#[derive(Clone, Debug)]
struct ServerAddress(Option<std::net::SocketAddr>);

fn parse_server_address(text: &str) -> Result<ServerAddress, String> {
    if text == "none" {
        return Ok(ServerAddress(None));
    }
    text.parse().map(|address| ServerAddress(Some(address))).map_err(|e| format!("{text}: {e}"))
}
