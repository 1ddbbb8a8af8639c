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

use lb_common::{
    conntrack::{TcpState, is_live, tcp_state},
    maps::proto,
};
use tracing::{debug, error, info};

use crate::{clock, error::Result, maps::KernelMaps, metrics::Metrics, pins::PinLayout};

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
/// a dead entry is then read again on its own just before it goes, so that one a packet
/// refreshed since the walk stays. Dead entries are few next to the walk, and deleting each
/// right after its check keeps the window for a refresh to one system call.
pub fn collect(maps: &mut KernelMaps, now: u64) -> Result<Pass> {
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
        let still_dead = maps
            .conntrack_entry(&key)?
            .is_some_and(|current| !is_live(&current, key.proto, now, rate));
        if still_dead {
            removed += maps.remove_conntrack(&[key])?;
        }
    }
    Ok(Pass { scanned, removed, opening })
}

/// A collector thread on the pinned maps; it stops when the handle is dropped.
pub struct Collector {
    _stop: mpsc::Sender<()>,
}

impl Collector {
    /// Runs a pass every `interval` on its own maps handle, off the reconcile loop: a pass over
    /// a million entries keeps the kernel busy for some 0.4 s.
    pub fn start(pins: &PinLayout, interval: Duration, metrics: Arc<Metrics>) -> Result<Self> {
        let mut maps = KernelMaps::from_pins(pins)?;
        let (stop, stopped) = mpsc::channel::<()>();
        thread::Builder::new()
            .name("conntrack-gc".into())
            .spawn(move || {
                while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(interval) {
                    run_pass(&mut maps, &metrics);
                }
            })
            .map_err(crate::error::Error::io("starting the conntrack collector"))?;
        Ok(Self { _stop: stop })
    }
}

fn run_pass(maps: &mut KernelMaps, metrics: &Metrics) {
    let started = Instant::now();
    let outcome = clock::jiffies_now()
        .map_err(crate::error::Error::io("reading the kernel's jiffies"))
        .and_then(|now| collect(maps, now));
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
