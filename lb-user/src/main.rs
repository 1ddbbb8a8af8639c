//! `lb-user`: the node daemon and its command-line tools.

use std::{net::Ipv4Addr, time::Duration};

use anyhow::{Context as _, bail};
use clap::Parser as _;
use lb_user::{
    attach,
    cli::{self, Cli, Command},
    config::NodeConfig,
    daemon, flows,
    loader::Capacities,
    manifest, model,
    model::Protocol,
    pins::PinLayout,
    status,
    trace::{Request, Tracer},
};

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
            node_name,
            targets,
            pin_dir,
            resync_seconds,
            metrics_address,
            healthz_address,
        } => {
            let supplied = cli::supplied(node_name, manifests.as_deref());
            let node_config = NodeConfig::from_file_with(&node_config, &supplied)?;
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
