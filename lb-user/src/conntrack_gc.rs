//! Conntrack garbage collection. The programs already treat an entry past its timeout as
//! absent; deleting such entries gives their slots back to the LRU, so that a new flow's
//! inserts take a free slot instead of evicting one, which costs about 400 ns more per first
//! packet with a million entries (`cargo xtask bench dataplane`).

use std::{
    sync::{
        Arc,
        mpsc::{self, RecvTimeoutError},
    },
    thread,
    time::{Duration, Instant},
};

use aya::{
    Ebpf,
    programs::{TestRun as _, TestRunOptions, Xdp},
};
use aya_obj::programs::XdpAttachType;
use lb_common::{
    conntrack::{TcpState, is_live, tcp_state},
    maps::{ConntrackKey, proto},
};
use tracing::{debug, error, info};

use crate::{
    clock,
    error::{Error, Result},
    maps::KernelMaps,
    metrics::Metrics,
    pins::PinLayout,
    program_names,
    return_codes::XDP_DROP,
};

/// Time between passes: UDP entries live 60 s and closing TCP ones 10 s, so no dead entry
/// stays much longer than its own lifetime.
pub const INTERVAL: Duration = Duration::from_secs(30);

/// What one pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pass {
    pub scanned: usize,
    pub removed: usize,
    /// Of the entries kept, those of TCP flows still opening (SYN seen, handshake not done): a
    /// SYN flood or a scan shows here first.
    pub opening: usize,
}

/// Deletes every conntrack entry that is dead at jiffies `now`. The map is read in batches;
/// each dead entry is then handed to the `reaper`, which deletes it if it is still dead: one a
/// packet refreshed since the walk, or a new flow took over, stays.
pub fn collect(maps: &KernelMaps, reaper: &Reaper, now: u64) -> Result<Pass> {
    let rate = clock::jiffies_per_second();
    let entries = maps.conntrack()?;
    let scanned = entries.len();
    let (mut removed, mut opening) = (0, 0);
    for (key, value) in entries {
        if is_live(&value, key.proto, now, rate) {
            let state = (key.proto == proto::TCP).then(|| tcp_state(&value));
            opening += usize::from(state == Some(TcpState::Opening));
            continue;
        }
        removed += usize::from(reaper.remove_if_expired(&key)?);
    }
    Ok(Pass { scanned, removed, opening })
}

/// The `lb_reap` program, which deletes a conntrack entry in the kernel, and only if it is still
/// expired there, claiming it as the datapath claims an expired entry it takes over. A delete
/// from here, after a look, could remove an entry a new flow had taken over since: that flow's
/// forward entry would live on without it, and its tuple (an SNAT port) go to a third flow,
/// whose replies would then reach both.
pub enum Reaper<'a> {
    /// Opened from its pin.
    Pinned(Box<Xdp>),
    /// Loaded in an object the caller holds.
    Loaded(&'a Xdp),
}

impl Reaper<'_> {
    /// The program pinned under `pins`, which uses the pinned maps (an upgrade or a resize pins
    /// it anew with the others).
    pub fn from_pins(pins: &PinLayout) -> Result<Reaper<'static>> {
        let path = pins.program(program_names::REAP);
        let program = Xdp::from_pin(&path, XdpAttachType::Interface).map_err(|source| {
            Error::Link { what: format!("opening {}", path.display()), source: source.into() }
        })?;
        Ok(Reaper::Pinned(Box::new(program)))
    }

    /// The program loaded in `ebpf`, with that object's maps.
    pub fn of(ebpf: &Ebpf) -> Result<Reaper<'_>> {
        ebpf.program(program_names::REAP)
            .and_then(|program| program.try_into().ok())
            .map(Reaper::Loaded)
            .ok_or(Error::MissingProgram(program_names::REAP))
    }

    /// Deletes the entry under `key` if it is still expired; true if it did.
    pub fn remove_if_expired(&self, key: &ConntrackKey) -> Result<bool> {
        let program: &Xdp = match self {
            Reaper::Pinned(program) => program,
            Reaper::Loaded(program) => program,
        };
        let bytes = key.to_bytes();
        let options = TestRunOptions { data_in: Some(&bytes), ..TestRunOptions::default() };
        let run = program.test_run(options).map_err(|source| Error::TestRun {
            program: program_names::REAP,
            source: Box::new(source),
        })?;
        Ok(run.return_value == XDP_DROP)
    }
}

/// A collector thread on the pinned maps; it stops when the handle is dropped.
pub struct Collector {
    _stop: mpsc::Sender<()>,
}

impl Collector {
    /// Runs a pass every `interval` on its own maps handle, off the reconcile loop: a pass over
    /// a million entries keeps the kernel busy for some 0.4 s.
    pub fn start(pins: &PinLayout, interval: Duration, metrics: Arc<Metrics>) -> Result<Self> {
        let maps = KernelMaps::from_pins(pins)?;
        let reaper = Reaper::from_pins(pins)?;
        let (stop, stopped) = mpsc::channel::<()>();
        thread::Builder::new()
            .name("conntrack-gc".into())
            .spawn(move || {
                while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(interval) {
                    run_pass(&maps, &reaper, &metrics);
                }
            })
            .map_err(Error::io("starting the conntrack collector"))?;
        Ok(Self { _stop: stop })
    }
}

fn run_pass(maps: &KernelMaps, reaper: &Reaper, metrics: &Metrics) {
    let started = Instant::now();
    let outcome = clock::jiffies_now()
        .map_err(Error::io("reading the kernel's jiffies"))
        .and_then(|now| collect(maps, reaper, now));
    if let Ok(pass) = &outcome {
        metrics.observe_collection(pass);
    }
    match outcome {
        Ok(pass) if pass.removed > 0 => {
            info!(
                scanned = pass.scanned,
                removed = pass.removed,
                opening = pass.opening,
                elapsed_ms = started.elapsed().as_millis(),
                "conntrack collected"
            );
        }
        Ok(pass) => debug!(scanned = pass.scanned, "conntrack collected, nothing expired"),
        Err(e) => error!(error = %e, "conntrack collection failed; retrying at the next pass"),
    }
}
