//! The demo behind the README's run command, until the daemon exists: the programs attached to
//! a veth pair between two throwaway namespaces, real packets through them, and the counters.
//! Every namespace and pin it creates is removed on exit, on failure too.

use std::process::Command;

use anyhow::{Context as _, bail};

/// Addresses live only inside the two demo namespaces, which have no default route.
const NODE_ADDR: &str = "10.213.0.1";
const CLIENT_ADDR: &str = "10.213.0.2";

struct Demo {
    node: String,
    client: String,
    pin_dir: String,
}

impl Demo {
    fn new() -> Self {
        let id = std::process::id();
        Self {
            node: format!("lbdemo-node-{id}"),
            client: format!("lbdemo-client-{id}"),
            pin_dir: format!("/sys/fs/bpf/lbdemo-{id}"),
        }
    }

    fn create_namespaces(&self) -> anyhow::Result<()> {
        run("ip", &["netns", "add", &self.node])?;
        run("ip", &["netns", "add", &self.client])?;
        let (node, client) = (self.node.as_str(), self.client.as_str());
        run(
            "ip",
            &[
                "-n", node, "link", "add", "lb0", "type", "veth", "peer", "name", "client0",
                "netns", client,
            ],
        )?;
        run("ip", &["-n", node, "addr", "add", &format!("{NODE_ADDR}/24"), "dev", "lb0"])?;
        run("ip", &["-n", client, "addr", "add", &format!("{CLIENT_ADDR}/24"), "dev", "client0"])?;
        for (ns, dev) in [(node, "lb0"), (node, "lo"), (client, "client0"), (client, "lo")] {
            run("ip", &["-n", ns, "link", "set", dev, "up"])?;
        }
        Ok(())
    }

    /// Runs `program` inside `netns`. `ip netns exec` would remount /sys and hide bpffs, so this
    /// enters only the network namespace.
    fn in_netns(netns: &str, program: &str, args: &[&str]) -> anyhow::Result<()> {
        let mut all = vec![format!("--net=/run/netns/{netns}"), program.to_owned()];
        all.extend(args.iter().map(|a| (*a).to_owned()));
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        run("nsenter", &all)
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        let binary = super::lb_user_binary_path();
        let _ = Command::new(binary).args(["unload", "--pin-dir", &self.pin_dir]).status();
        for ns in [&self.node, &self.client] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

pub fn run_demo() -> anyhow::Result<()> {
    let binary = super::lb_user_binary()?;
    let binary = binary.to_str().context("binary path is not UTF-8")?;
    let demo = Demo::new();
    demo.create_namespaces()?;

    println!("== load: XDP and tc ingress on lb0 in namespace {}", demo.node);
    Demo::in_netns(
        &demo.node,
        binary,
        &["load", "--xdp-iface", "lb0", "--tc-iface", "lb0", "--pin-dir", &demo.pin_dir],
    )?;

    println!(
        "== traffic from {} ({CLIENT_ADDR}) to {NODE_ADDR}: 3 UDP datagrams, 1 TCP SYN",
        demo.client
    );
    let send = format!(
        "for i in 1 2 3; do echo demo > /dev/udp/{NODE_ADDR}/9; done; \
         (exec 3<>/dev/tcp/{NODE_ADDR}/9) 2>/dev/null; true"
    );
    Demo::in_netns(&demo.client, "bash", &["-c", &send])?;

    println!("== counters (lb-user stats --pin-dir {})", demo.pin_dir);
    run(binary, &["stats", "--pin-dir", &demo.pin_dir])?;

    println!("== unload");
    run(binary, &["unload", "--pin-dir", &demo.pin_dir])?;
    Ok(())
}

fn run(program: &str, args: &[&str]) -> anyhow::Result<()> {
    let status =
        Command::new(program).args(args).status().with_context(|| format!("starting {program}"))?;
    if !status.success() {
        bail!("{program} {} failed ({status})", args.join(" "));
    }
    Ok(())
}
