//! `trace`: one packet through the real programs, on a private copy of the datapath programmed
//! from manifests by the same reconciler the daemon uses. Nothing is pinned or attached, so a
//! running daemon is not affected.

use std::net::Ipv4Addr;

use aya::{
    Ebpf,
    programs::{SchedClassifier, TestRun, TestRunOptions, Xdp},
};
use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TransportSlice};
use lb_common::maps::names;
use serde::Serialize;

use crate::{
    config::NodeConfig,
    error::{Error, Result},
    loader,
    maps::KernelMaps,
    model::{Model, Protocol, Traffic},
    program_names,
    reconcile::{DatapathState, Reconciler, SlotMode},
    stats,
};

/// Where the traced packet enters the node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Entry {
    /// A pod-facing interface: the tc program.
    Pod,
    /// An external interface: the XDP program.
    External,
    /// A process on the node. Its real path is the cgroup connect/sendmsg hook, which
    /// BPF_PROG_TEST_RUN cannot run; the packet goes through the tc program instead, which
    /// applies the same lookup and backend choice to an internal source.
    Host,
}

/// One packet to trace.
#[derive(Clone, Copy, Debug)]
pub struct Request {
    pub entry: Entry,
    pub protocol: Protocol,
    pub src: Ipv4Addr,
    pub src_port: u16,
    pub dst: Ipv4Addr,
    pub dst_port: u16,
}

/// What the programs did with it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Outcome {
    /// `forward`, `reject`, `drop` or `pass`.
    pub verdict: &'static str,
    /// The backend `ip:port` the packet was sent to.
    pub backend: Option<String>,
    /// The new source address, if the source was rewritten.
    pub snat: Option<String>,
    /// The service port matched, `namespace/name:port`.
    pub service: Option<String>,
    /// Every backend `ip:port` this kind of traffic may reach for that service.
    pub candidates: Vec<String>,
    /// The counter that fired.
    pub reason: &'static str,
}

/// A private datapath programmed with one model; trace as many packets as needed (flows and
/// affinity persist between them, as on a node).
pub struct Tracer {
    ebpf: Ebpf,
    model: Model,
}

impl Tracer {
    pub fn new(model: Model, node: &NodeConfig) -> Result<Self> {
        let mut ebpf = loader::load_private_with(&node.map_capacities)?;
        let mut maps = KernelMaps::take_from(&mut ebpf)?;
        let mut reconciler = Reconciler::with_capacities(
            DatapathState::default(),
            SlotMode::of(node),
            &node.map_capacities,
        );
        let report = reconciler.reconcile(&model, node, &mut maps)?;
        for problem in &report.problems {
            tracing::warn!(%problem, "not programmed");
        }
        // `maps` goes out of scope here: the loaded programs keep the maps alive.
        Ok(Self { ebpf, model })
    }

    pub fn trace(&mut self, request: &Request) -> Result<Outcome> {
        let packet = build_packet(request)?;
        let before = stats::read(self.ebpf.map(names::STATS).ok_or_else(missing_stats)?)?;
        let (code, output) = self.run(request.entry, &packet)?;
        let after = stats::read(self.ebpf.map(names::STATS).ok_or_else(missing_stats)?)?;
        let reason = after.since(&before).non_zero().next().map_or("none", |(name, _)| name);
        let verdict = verdict(request.entry, code, output != packet);
        let (backend, snat) =
            if verdict == "forward" { translated(request, &output) } else { (None, None) };
        let (service, candidates) = self.candidates(request);
        Ok(Outcome { verdict, backend, snat, service, candidates, reason })
    }

    fn run(&self, entry: Entry, packet: &[u8]) -> Result<(u32, Vec<u8>)> {
        let mut output = vec![0u8; packet.len() + 256];
        let options = TestRunOptions {
            data_in: Some(packet),
            data_out: Some(&mut output),
            ..TestRunOptions::default()
        };
        let (name, result) = match entry {
            Entry::External => {
                let program: &Xdp = program(&self.ebpf, program_names::XDP)?;
                (program_names::XDP, program.test_run(options))
            }
            Entry::Pod | Entry::Host => {
                let program: &SchedClassifier = program(&self.ebpf, program_names::TC)?;
                (program_names::TC, program.test_run(options))
            }
        };
        let result =
            result.map_err(|source| Error::TestRun { program: name, source: Box::new(source) })?;
        output.truncate(result.data_size_out as usize);
        Ok((result.return_value, output))
    }

    /// The service port addressed and the backends this traffic may use, from the model.
    fn candidates(&self, request: &Request) -> (Option<String>, Vec<String>) {
        let Some((port, kind)) = self.model.lookup(request.dst, request.dst_port, request.protocol)
        else {
            return (None, Vec::new());
        };
        let traffic = Traffic::of(kind, request.entry != Entry::External);
        let candidates = port.backends(traffic).iter().map(ToString::to_string).collect();
        (Some(port.id.to_string()), candidates)
    }
}

fn missing_stats() -> Error {
    Error::Map {
        name: names::STATS.into(),
        source: Box::new(aya::maps::MapError::InvalidName { name: names::STATS.into() }),
    }
}

fn program<'a, P>(ebpf: &'a Ebpf, name: &'static str) -> Result<&'a P>
where
    &'a P: TryFrom<&'a aya::programs::Program>,
{
    ebpf.program(name).and_then(|p| p.try_into().ok()).ok_or(Error::MissingProgram(name))
}

/// The verdict a return code stands for. XDP passes both untranslated and translated packets
/// up the stack, so whether the bytes changed tells those apart.
fn verdict(entry: Entry, code: u32, changed: bool) -> &'static str {
    use crate::return_codes::{
        TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, XDP_DROP, XDP_PASS, XDP_TX,
    };
    match (entry, code) {
        (Entry::External, XDP_PASS) if changed => "forward",
        (Entry::External, XDP_TX) | (Entry::Pod | Entry::Host, TC_ACT_REDIRECT) => "reject",
        (Entry::External, XDP_DROP) | (Entry::Pod | Entry::Host, TC_ACT_SHOT) => "drop",
        (Entry::Pod | Entry::Host, TC_ACT_OK) => "forward",
        _ => "pass",
    }
}

/// The backend (new destination) and, if rewritten, the new source of a translated packet.
fn translated(request: &Request, output: &[u8]) -> (Option<String>, Option<String>) {
    let Ok(packet) = SlicedPacket::from_ethernet(output) else { return (None, None) };
    let Some(NetSlice::Ipv4(ip)) = packet.net else { return (None, None) };
    let dst_port = match packet.transport {
        Some(TransportSlice::Tcp(tcp)) => tcp.destination_port(),
        Some(TransportSlice::Udp(udp)) => udp.destination_port(),
        _ => return (None, None),
    };
    let src = ip.header().source_addr();
    let snat = (src != request.src).then(|| src.to_string());
    (Some(format!("{}:{dst_port}", ip.header().destination_addr())), snat)
}

/// A TCP SYN or a small UDP datagram with the request's addresses.
fn build_packet(request: &Request) -> Result<Vec<u8>> {
    const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
    const NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
    let ip = PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC).ipv4(
        request.src.octets(),
        request.dst.octets(),
        64,
    );
    let mut packet = Vec::new();
    let written = match request.protocol {
        Protocol::Tcp => {
            ip.tcp(request.src_port, request.dst_port, 1, 64_240).syn().write(&mut packet, &[])
        }
        Protocol::Udp => ip.udp(request.src_port, request.dst_port).write(&mut packet, b"trace"),
        Protocol::Sctp => return Err(Error::BuildPacket("SCTP is not traced yet".into())),
    };
    written.map_err(|e| Error::BuildPacket(e.to_string()))?;
    Ok(packet)
}
