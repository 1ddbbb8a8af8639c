//! Loads the embedded eBPF object: maps (pinned by name when a pin directory is given, so a
//! second load adopts the first one's maps instead of creating new ones) and both programs.

use aya::{Ebpf, EbpfLoader, programs::Program};
use lb_common::{
    maps::{capacity, names},
    stats::Reason,
};
use tracing::{debug, info};

use crate::{
    EBPF_OBJECT,
    error::{Error, Result},
    maps::pinned_entries,
    pins::PinLayout,
    program_names,
};

/// Every map the object declares, pinned by name under `maps/`.
pub const MAP_NAMES: [&str; 13] = [
    names::STATS,
    names::SERVICES,
    names::BACKEND_SLOTS,
    names::BACKENDS,
    names::CONNTRACK,
    names::AFFINITY,
    names::SOURCE_RANGES,
    names::NODE_CONFIG,
    names::SERVICE_STATS,
    names::SOCK_REV_NAT,
    names::FORWARDING,
    names::FRAGMENTS,
    names::REFUSAL_BUDGET,
];

/// Map sizes chosen at load time, in entries; `None` keeps the default of
/// `lb_common::maps::capacity`. Maps adopted from pins keep the size they were created with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Capacities {
    /// Frontends; also sizes the per-frontend counters.
    pub services: Option<u32>,
    pub backends: Option<u32>,
    pub backend_slots: Option<u32>,
    pub conntrack: Option<u32>,
    pub affinity: Option<u32>,
    /// First fragments' records, for their datagrams' later fragments.
    pub fragments: Option<u32>,
    /// loadBalancerSourceRanges entries, (frontend, range) each: not chosen in the file (an
    /// LPM trie allocates per entry, so its size costs nothing until used), but read from the
    /// pins, where an earlier version may have left a smaller map.
    #[serde(skip)]
    pub source_ranges: Option<u32>,
}

impl Capacities {
    pub fn services(&self) -> u32 {
        self.services.unwrap_or(capacity::SERVICES)
    }

    pub fn backends(&self) -> u32 {
        self.backends.unwrap_or(capacity::BACKENDS)
    }

    pub fn backend_slots(&self) -> u32 {
        self.backend_slots.unwrap_or(capacity::BACKEND_SLOTS)
    }

    pub fn source_ranges(&self) -> u32 {
        self.source_ranges.unwrap_or(capacity::SOURCE_RANGES)
    }

    /// The size map `name` is to have, for the maps whose size can be chosen.
    pub fn of(&self, name: &str) -> Option<u32> {
        match name {
            names::SERVICES | names::SERVICE_STATS => Some(self.services()),
            names::BACKENDS => Some(self.backends()),
            names::BACKEND_SLOTS => Some(self.backend_slots()),
            names::CONNTRACK => Some(self.conntrack.unwrap_or(capacity::CONNTRACK)),
            names::AFFINITY => Some(self.affinity.unwrap_or(capacity::AFFINITY)),
            names::FRAGMENTS => Some(self.fragments.unwrap_or(capacity::FRAGMENTS)),
            _ => None,
        }
    }

    /// The sizes of the maps pinned under `pins`: what the datapath has room for, whatever the
    /// configuration asks (a map the daemon programs is never shrunk in place, see
    /// [`crate::resize`]).
    pub fn pinned(pins: &PinLayout) -> Result<Self> {
        let entries = |name| pinned_entries(name, &pins.map(name));
        Ok(Self {
            services: Some(entries(names::SERVICES)?.min(entries(names::SERVICE_STATS)?)),
            backends: Some(entries(names::BACKENDS)?),
            backend_slots: Some(entries(names::BACKEND_SLOTS)?),
            conntrack: Some(entries(names::CONNTRACK)?),
            affinity: Some(entries(names::AFFINITY)?),
            fragments: Some(entries(names::FRAGMENTS)?),
            source_ranges: Some(entries(names::SOURCE_RANGES)?),
        })
    }

    /// (map, entries) for every map whose size was chosen.
    fn overrides(&self) -> Vec<(&'static str, u32)> {
        let services = self.services.map(|n| [(names::SERVICES, n), (names::SERVICE_STATS, n)]);
        services
            .into_iter()
            .flatten()
            .chain(self.backends.map(|n| (names::BACKENDS, n)))
            .chain(self.backend_slots.map(|n| (names::BACKEND_SLOTS, n)))
            .chain(self.conntrack.map(|n| (names::CONNTRACK, n)))
            .chain(self.affinity.map(|n| (names::AFFINITY, n)))
            .chain(self.fragments.map(|n| (names::FRAGMENTS, n)))
            .collect()
    }
}

/// Loads the object with private maps: nothing pinned, nothing attached. For tests and `trace`.
pub fn load_private() -> Result<Ebpf> {
    load(None, &Capacities::default())
}

/// [`load_private`] with chosen map sizes.
pub fn load_private_with(capacities: &Capacities) -> Result<Ebpf> {
    load(None, capacities)
}

/// Loads the object with its maps pinned under `pins` (adopting maps already pinned there).
pub fn load_pinned(pins: &PinLayout, capacities: &Capacities) -> Result<Ebpf> {
    load(Some(pins), capacities)
}

fn load(pins: Option<&PinLayout>, capacities: &Capacities) -> Result<Ebpf> {
    raise_memlock_limit();
    let netns_cookie = network_namespace_cookie()?;
    let mut loader = EbpfLoader::new();
    // The host path's hooks serve only sockets of this (the node's) network namespace.
    loader.override_global("NODE_NETNS_COOKIE", &netns_cookie, true);
    for (name, entries) in capacities.overrides() {
        loader.map_max_entries(name, entries);
    }
    if let Some(pins) = pins {
        pins.create_dirs()?;
        for name in MAP_NAMES {
            let path = pins.map(name);
            // aya adopts a pinned map only if its definition matches the object's, size
            // included: an adopted map keeps the size it was created with.
            if let Ok(entries) = pinned_entries(name, &path) {
                if name == names::STATS && entries < Reason::COUNT {
                    // Counters for fewer reasons, which no program runs on: an adopted datapath
                    // has them moved first (`crate::resize`), keeping the counts.
                    info!(
                        pinned = entries,
                        reasons = Reason::COUNT,
                        "verdict counters start afresh"
                    );
                    std::fs::remove_file(&path).map_err(Error::io(&path))?;
                } else {
                    loader.map_max_entries(name, entries);
                }
            }
            loader.map_pin_path(name, path);
        }
    }
    let mut ebpf = loader.load(EBPF_OBJECT).map_err(|e| Error::LoadObject(Box::new(e)))?;
    for name in program_names::ALL {
        load_program(&mut ebpf, name)?;
    }
    Ok(ebpf)
}

/// Hands one program to the verifier.
fn load_program(ebpf: &mut Ebpf, name: &'static str) -> Result<()> {
    let loaded = match ebpf.program_mut(name) {
        Some(Program::Xdp(program)) => program.load(),
        Some(Program::SchedClassifier(program)) => program.load(),
        Some(Program::CgroupSockAddr(program)) => program.load(),
        _ => return Err(Error::MissingProgram(name)),
    };
    loaded.map_err(|source| Error::LoadProgram { program: name, source: Box::new(source) })
}

/// The cookie of the calling thread's network namespace (`SO_NETNS_COOKIE`, Linux 5.14+): what
/// `bpf_get_netns_cookie` returns for a socket there.
fn network_namespace_cookie() -> Result<u64> {
    let read = || {
        // Any socket belongs to the namespace it was made in; it needs no address.
        // SAFETY: plain system call; the descriptor is owned right after.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a descriptor just returned by socket(2), owned by nothing else.
        let socket = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let mut cookie = 0u64;
        let mut length = libc::socklen_t::try_from(size_of::<u64>()).expect("8 fits socklen_t");
        // SAFETY: getsockopt writes at most `length` bytes into `cookie`, which we own.
        let rc = unsafe {
            libc::getsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&socket),
                libc::SOL_SOCKET,
                libc::SO_NETNS_COOKIE,
                (&raw mut cookie).cast(),
                &raw mut length,
            )
        };
        if rc == 0 { Ok(cookie) } else { Err(std::io::Error::last_os_error()) }
    };
    read().map_err(Error::io("reading the network namespace's cookie (SO_NETNS_COOKIE)"))
}

/// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK. Raising it needs CAP_SYS_RESOURCE,
/// which some containers lack; newer kernels charge the memory cgroup instead, so a refusal is
/// only worth a debug line.
fn raise_memlock_limit() {
    let unlimited = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: setrlimit reads a valid, initialised rlimit struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &raw const unlimited) } != 0 {
        debug!(error = %std::io::Error::last_os_error(), "could not raise RLIMIT_MEMLOCK");
    }
}

/// The program of type `P` named `name`, for callers that run or attach it.
pub fn program_mut<'a, P>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut P>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program>,
{
    ebpf.program_mut(name).and_then(|p| p.try_into().ok()).ok_or(Error::MissingProgram(name))
}
