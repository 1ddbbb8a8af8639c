//! An upgraded daemon runs its own datapath code. Adopting a pinned datapath keeps the pinned
//! maps (conntrack, affinity, what is programmed), but the pinned programs are whatever version
//! attached them. Each pinned program whose instructions differ from this binary's (the kernel's
//! tag: a hash of the instructions, map references left out) is replaced on every one of its
//! attachments in place, without a moment detached: `BPF_LINK_UPDATE` for XDP, tcx and cgroup
//! links, a netlink replace of the same filter for cls_bpf. The new programs use the pinned
//! maps, so established flows carry on. When a map changes size (see [`crate::resize`]), every
//! program moves to the new maps this way, whatever its code.

use std::{fs, mem::ManuallyDrop, path::Path};

use aya::{
    Ebpf,
    maps::MapInfo,
    programs::{
        CgroupSockAddr, Program, ProgramError, ProgramInfo, SchedClassifier, Xdp,
        cgroup_sock_addr::CgroupSockAddrLink,
        links::{FdLink, LinkError, PinnedLink},
        tc::SchedClassifierLink,
        xdp::XdpLink,
    },
};
use tracing::info;

use crate::{
    attach::{pin_program, recorded_filter, remove_pin},
    error::{Error, Result},
    loader,
    pins::{NetlinkTcRecord, PinLayout, program_of_link},
    program_names,
    resize::Resizing,
};

/// Loads this binary's programs against the pinned maps, resized to `capacities` where they
/// differ, and puts each one whose code differs from the pinned program's in its place (every
/// one, if a map was resized), and logs each. Programs with the same code stay as they are.
pub fn replace_outdated_programs(pins: &PinLayout, capacities: &loader::Capacities) -> Result<()> {
    let mut resizing = Resizing::begin(pins, capacities)?;
    let planned = loader::load_pinned(pins, capacities).and_then(|mut ebpf| {
        resizing.copy()?;
        let steps = plan(&mut ebpf, pins, !resizing.is_empty())?;
        Ok((ebpf, steps))
    });
    let (mut ebpf, steps) = match planned {
        Ok(planned) => planned,
        Err(error) => {
            // Nothing uses the new maps yet.
            resizing.abandon();
            return Err(error);
        }
    };
    // From here a failure leaves a resize to the next start: programs may use the new maps.
    for Replacement { name, old_id, new_id } in steps {
        let program = ebpf.program_mut(name).ok_or(Error::MissingProgram(name))?;
        let attachments = relink(program, name, pins)?;
        if let Some(old_id) = old_id {
            info!(program = name, old_id, new_id, attachments, "replaced a pinned program");
        } else {
            // A program the older version did not have: pinned. One for interfaces is attached
            // when the daemon follows them (lb_tc_reply on tc egress); a host-path one by a
            // daemon given the host cgroup (`attach::attach_missing_host_links`).
            info!(program = name, new_id, attachments, "pinned a program the pins lacked");
        }
    }
    resizing.finish()
}

/// A loaded program to put in place of a pinned one (`old_id`; `None`: none is pinned).
struct Replacement {
    name: &'static str,
    old_id: Option<u32>,
    new_id: u32,
}

/// The programs of `ebpf` to put in place of the pinned ones: those whose code differs or
/// that are not pinned (every one if `maps_replaced`), without changing anything yet.
fn plan(ebpf: &mut Ebpf, pins: &PinLayout, maps_replaced: bool) -> Result<Vec<Replacement>> {
    let mut steps = Vec::new();
    for name in program_names::ALL {
        let program = ebpf.program_mut(name).ok_or(Error::MissingProgram(name))?;
        let new = program.info().map_err(program_error(name, "reading the loaded program"))?;
        let pin = pins.program(name);
        let old = if pin.exists() {
            Some(ProgramInfo::from_pin(&pin).map_err(program_error(name, "opening the pin"))?)
        } else {
            None
        };
        // Or on other pinned maps: a program this version has and an older one does not
        // (`lb_reap`) is left pinned on the old maps if that older version resized them.
        let stale = |old: &ProgramInfo| old.tag() != new.tag() || uses_unpinned_maps(old, &new);
        if old.as_ref().is_none_or(stale) || maps_replaced {
            let old_id = old.map(|old| old.id());
            steps.push(Replacement { name, old_id, new_id: new.id() });
        }
    }
    Ok(steps)
}

/// Whether the pinned program `old` uses a map of a pinned name (`loader::MAP_NAMES`) that
/// `new`, loaded on what is pinned now, does not: one a resize replaced. (Each load has its own
/// global-data maps, which do not count.) False when the kernel cannot say.
fn uses_unpinned_maps(old: &ProgramInfo, new: &ProgramInfo) -> bool {
    let (Ok(Some(old_ids)), Ok(Some(new_ids))) = (old.map_ids(), new.map_ids()) else {
        return false;
    };
    old_ids.iter().filter(|id| !new_ids.contains(id)).any(|&id| {
        MapInfo::from_id(id).is_ok_and(|map| {
            map.name_as_str().is_some_and(|name| loader::MAP_NAMES.contains(&name))
        })
    })
}

/// True if a program in the kernel uses map `map_id`, or the kernel cannot say. A map pinned
/// by a daemon that stopped part way through a resize is used by a program only if that
/// daemon pinned one, or attached one: `relink` moves the links before the pin, and a program
/// that is neither pinned nor attached went with the daemon's process.
pub fn programs_use(map_id: u32) -> bool {
    for info in aya::programs::loaded_programs() {
        match info.and_then(|info| info.map_ids()) {
            Ok(Some(ids)) if !ids.contains(&map_id) => {}
            // Unloaded since the kernel listed it: it uses nothing any more.
            Err(error) if vanished(&error) => {}
            Ok(_) | Err(_) => return true,
        }
    }
    false
}

/// Whether `error` says the program is gone.
fn vanished(error: &ProgramError) -> bool {
    matches!(error, ProgramError::SyscallError(aya::sys::SyscallError { io_error, .. })
        if io_error.raw_os_error() == Some(libc::ENOENT))
}

/// Points every pinned attachment of program `name` at `program` (loaded, of the same type)
/// and pins `program` in place of the one it replaces. Returns the number of attachments.
pub fn relink(program: &mut Program, name: &'static str, pins: &PinLayout) -> Result<usize> {
    let links_dir = pins.links_dir();
    let mut attachments = 0;
    for entry in fs::read_dir(&links_dir).map_err(Error::io(&links_dir))? {
        let entry = entry.map_err(Error::io(&links_dir))?;
        let file_name = entry.file_name().to_string_lossy().into_owned();
        if let Some(record) = NetlinkTcRecord::parse(&file_name) {
            if name == record.role.program() {
                replace_cls_bpf(program, &record)?;
                attachments += 1;
            }
        } else if program_of_link(&file_name) == Some(name) {
            update_link(program, &entry.path())?;
            attachments += 1;
        }
    }
    let pin = pins.program(name);
    // Missing if the older version did not have the program, or a relink stopped here.
    remove_pin(&pin)?;
    pin_program(program, name, pins)?;
    Ok(attachments)
}

/// `BPF_LINK_UPDATE` of one pinned bpf_link. The link stays pinned; the descriptor opened
/// here is closed again, which leaves a pinned link attached.
fn update_link(program: &mut Program, path: &Path) -> Result<()> {
    let link_error = |source: LinkError| Error::Link {
        what: format!("opening pinned link {}", path.display()),
        source: source.into(),
    };
    let link = FdLink::from(PinnedLink::from_pin(path).map_err(link_error)?);
    match program {
        Program::Xdp(xdp) => XdpLink::try_from(link)
            .map_err(link_error)
            .and_then(|link| update_xdp(xdp, link).map_err(update_error(path))),
        Program::SchedClassifier(tc) => SchedClassifierLink::try_from(link)
            .map_err(link_error)
            .and_then(|link| update_tc(tc, link).map_err(update_error(path))),
        Program::CgroupSockAddr(host) => CgroupSockAddrLink::try_from(link)
            .map_err(link_error)
            .and_then(|link| update_host(host, link).map_err(update_error(path))),
        _ => Err(Error::Link {
            what: format!(
                "{} links a program of a type this project never attaches",
                path.display()
            ),
            source: "unexpected program type".into(),
        }),
    }
}

fn update_xdp(program: &mut Xdp, link: XdpLink) -> std::result::Result<(), ProgramError> {
    let id = program.attach_to_link(link)?;
    drop(program.take_link(id)?);
    Ok(())
}

fn update_tc(
    program: &mut SchedClassifier,
    link: SchedClassifierLink,
) -> std::result::Result<(), ProgramError> {
    let id = program.attach_to_link(link)?;
    drop(program.take_link(id)?);
    Ok(())
}

fn update_host(
    program: &mut CgroupSockAddr,
    link: CgroupSockAddrLink,
) -> std::result::Result<(), ProgramError> {
    let id = program.attach_to_link(link)?;
    drop(program.take_link(id)?);
    Ok(())
}

/// Replaces the program of a netlink tc filter by re-adding the filter under its priority and
/// handle (a netlink replace, atomic for packets).
fn replace_cls_bpf(program: &mut Program, record: &NetlinkTcRecord) -> Result<()> {
    let name = record.role.program();
    let Program::SchedClassifier(tc) = program else {
        return Err(Error::MissingProgram(name));
    };
    let replaced = tc.attach_to_link(recorded_filter(record)?).and_then(|id| tc.take_link(id));
    match replaced {
        // Dropping a netlink link deletes the filter: it must outlive this process.
        Ok(link) => {
            let _ = ManuallyDrop::new(link);
            Ok(())
        }
        Err(source) => Err(Error::attach(name, "cls_bpf replace", &record.iface)(source)),
    }
}

fn update_error(path: &Path) -> impl FnOnce(ProgramError) -> Error {
    let what = format!("updating the program of link {}", path.display());
    move |source| Error::Link { what, source: source.into() }
}

fn program_error(name: &'static str, doing: &'static str) -> impl FnOnce(ProgramError) -> Error {
    move |source| Error::Link { what: format!("{doing}: program {name}"), source: source.into() }
}
