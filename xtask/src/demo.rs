//! The README's run command: the daemon on the embedded default, the seed tutorial's manifests
//! (examples/) and a demo node made of network namespaces, with real requests to my-nginx's
//! ClusterIP and to NodePort 30380 answered by pods. Every namespace, pin and process it
//! creates is removed on exit, on failure too.

use std::{
    net::SocketAddr,
    process::{Child, Command},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use lb_tests::topology::{EXTERNAL_IFACE, NODE_IP, Topology, tcp_request, udp_request};

use super::workspace_root;

/// The daemon process, stopped with SIGTERM and its datapath unloaded on drop.
struct Daemon {
    child: Child,
    binary: String,
    pin_dir: String,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SIGTERM: the daemon exits cleanly, leaving the datapath pinned; unload removes it.
        if let Ok(pid) = i32::try_from(self.child.id()) {
            // SAFETY: plain kill(2) on our own child's pid.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let _ = self.child.wait();
        let _ = Command::new(&self.binary).args(["unload", "--pin-dir", &self.pin_dir]).output();
    }
}

pub fn run_demo() -> anyhow::Result<()> {
    let binary = super::lb_user_binary()?;
    let binary = binary.to_str().context("binary path is not UTF-8")?.to_owned();
    println!("== demo node: namespaces for node-a ({NODE_IP}), an external client and 6 pods");
    let topology = Topology::new("lbdemo");
    let _servers = topology.start_servers();
    let pin_dir = format!("/sys/fs/bpf/lbdemo-{}", std::process::id());
    let examples = workspace_root().join("examples");
    let mut args = vec![
        format!("--net={}", topology.node.path()),
        binary.clone(),
        "run".into(),
        "--manifests".into(),
        examples.join("manifests").display().to_string(),
        "--node-config".into(),
        examples.join("node.yaml").display().to_string(),
        "--xdp-iface".into(),
        EXTERNAL_IFACE.into(),
        "--pin-dir".into(),
        pin_dir.clone(),
    ];
    // The pods' veths by pattern, as a CNI names them: pods that start later are attached too.
    args.extend(["--tc-iface".into(), "vpod*".into()]);
    println!(
        "== starting the daemon: lb-user run --manifests examples/manifests --node-config examples/node.yaml ..."
    );
    let child = Command::new("nsenter").args(&args).spawn().context("starting the daemon")?;
    let daemon = Daemon { child, binary: binary.clone(), pin_dir: pin_dir.clone() };
    wait_until_programmed(&daemon)?;

    let client_pod = &topology.pod("client").netns;
    let requests: [(&str, &lb_tests::netns::Netns, &str, bool); 6] = [
        ("pod client -> my-nginx ClusterIP 10.96.45.10:80", client_pod, "10.96.45.10:80", true),
        ("pod client -> my-nginx ClusterIP 10.96.45.10:80", client_pod, "10.96.45.10:80", true),
        (
            "external client -> NodePort 192.168.1.63:30380",
            &topology.client,
            "192.168.1.63:30380",
            true,
        ),
        (
            "external client -> NodePort 192.168.1.63:30380",
            &topology.client,
            "192.168.1.63:30380",
            true,
        ),
        ("pod client -> UDP echo-udp ClusterIP 10.96.0.10:53", client_pod, "10.96.0.10:53", false),
        (
            "pod client -> service with no endpoints 10.96.45.12:80",
            client_pod,
            "10.96.45.12:80",
            true,
        ),
    ];
    let mut failures = 0;
    for (what, netns, target, tcp) in requests {
        let target: SocketAddr = target.parse()?;
        let started = Instant::now();
        let answer = if tcp { tcp_request(netns, target) } else { udp_request(netns, target) };
        match answer {
            Ok(answer) => println!("{what}: {answer:?} ({:?})", started.elapsed()),
            Err(error) if target.port() == 80 && target.ip().to_string() == "10.96.45.12" => {
                println!(
                    "{what}: {error} after {:?} (refused at once, as it should be)",
                    started.elapsed()
                );
            }
            Err(error) => {
                failures += 1;
                println!("{what}: FAILED: {error}");
            }
        }
    }
    let mut tools_ok = true;
    for tool in ["status", "flows"] {
        println!("== lb-user {tool} --pin-dir {pin_dir}");
        tools_ok &= Command::new(&binary).args([tool, "--pin-dir", &pin_dir]).status()?.success();
    }
    drop(daemon);
    println!("== stopped the daemon, unloaded the datapath, removed the namespaces");
    if failures > 0 || !tools_ok {
        bail!("{failures} request(s) failed");
    }
    Ok(())
}

fn wait_until_programmed(daemon: &Daemon) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let output = Command::new(&daemon.binary)
            .args(["status", "--json", "--pin-dir", &daemon.pin_dir])
            .output()?;
        if output.status.success()
            && String::from_utf8_lossy(&output.stdout).contains("10.96.45.10:80")
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the daemon did not program the services within 15 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
