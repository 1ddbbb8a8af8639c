//! Attaching the loaded programs to interfaces, pinning what keeps them attached, and removing
//! exactly that again.
//!
//! XDP prefers driver mode and falls back to generic (skb) mode. tc uses tcx (Linux 6.6+) and
//! falls back to a clsact qdisc with a direct-action cls_bpf filter on older kernels (Debian's
//! 6.1). Both XDP and tcx attachments are bpf_links: pinned, they outlive this process, and
//! unpinning them detaches. A cls_bpf filter has no link; its record is a directory (see
//! [`crate::pins`]).

use std::{ffi::CString, fmt, mem::ManuallyDrop, path::Path, process::Command};

use aya::{
    Ebpf,
    programs::{
        CgroupAttachMode, CgroupSockAddr, CgroupSockAddrAttachType, LinkOrder, Program,
        ProgramError, SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, Link as _, LinkError, PinnedLink},
        tc::{self, NlOptions, SchedClassifierLink, TcAttach},
    },
};
use serde::Serialize;
use tracing::{info, warn};

use crate::{
    error::{Error, Result},
    loader::program_mut,
    pins::{HOST_IFACE, NetlinkTcRecord, PinLayout, TcRole, XDP_HOOK},
    program_names,
};

/// How a program ended up attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AttachMode {
    /// Native XDP in the driver.
    XdpDriver,
    /// Generic XDP in the stack, for devices without driver support.
    XdpGeneric,
    /// tcx ingress (Linux 6.6+).
    Tcx,
    /// clsact qdisc + cls_bpf direct-action filter (kernels without tcx).
    ClsBpf,
    /// tcx egress.
    TcxEgress,
    /// clsact qdisc + cls_bpf direct-action filter on egress.
    ClsBpfEgress,
    /// A cgroup `sock_addr` hook (the host path), as a bpf_link.
    CgroupSockAddr,
}

impl fmt::Display for AttachMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::XdpDriver => "xdp driver mode",
            Self::XdpGeneric => "xdp generic (skb) mode",
            Self::Tcx => "tcx ingress",
            Self::ClsBpf => "clsact ingress, cls_bpf direct-action",
            Self::TcxEgress => "tcx egress",
            Self::ClsBpfEgress => "clsact egress, cls_bpf direct-action",
            Self::CgroupSockAddr => "cgroup sock_addr hook",
        })
    }
}

impl TcRole {
    /// How an attachment of this role is made: by tcx, or by a cls_bpf filter.
    fn mode(self, tcx: bool) -> AttachMode {
        match (self.attach_type(), tcx) {
            (TcAttachType::Egress, true) => AttachMode::TcxEgress,
            (TcAttachType::Egress, false) => AttachMode::ClsBpfEgress,
            (_, true) => AttachMode::Tcx,
            (_, false) => AttachMode::ClsBpf,
        }
    }
}

/// Where the programs go.
#[derive(Clone, Debug, Default)]
pub struct Targets {
    /// External interfaces: the XDP program. A value ending in `*` is a prefix pattern.
    pub xdp_ifaces: Vec<String>,
    /// Pod-facing interfaces: the tc ingress program. A value ending in `*` is a prefix
    /// pattern (see [`crate::interfaces::Selector`]).
    pub tc_ifaces: Vec<String>,
    /// The cgroup (v2 directory) whose processes get the host path for their sockets in the
    /// daemon's network namespace, usually the root `/sys/fs/cgroup` so that every node
    /// process does.
    pub host_cgroup: Option<std::path::PathBuf>,
}

/// One program attached to one interface (or cgroup).
#[derive(Clone, Debug, Serialize)]
pub struct Attachment {
    /// The interface, or the cgroup directory for the host path.
    pub iface: String,
    pub program: &'static str,
    pub program_id: u32,
    pub mode: AttachMode,
    /// The bpf_link id, for XDP and tcx.
    pub link_id: Option<u32>,
}

impl fmt::Display for Attachment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} on {}: program id {}, {}",
            self.program, self.iface, self.program_id, self.mode
        )?;
        if let Some(link_id) = self.link_id {
            write!(f, ", link id {link_id}")?;
        }
        Ok(())
    }
}

/// Loads the object with its maps pinned under `pins`, pins both programs, attaches them to the
/// given interfaces and pins the attachments. On failure nothing this call created is left
/// behind; maps that were already pinned (adopted from an earlier instance) stay.
pub fn load_and_attach(
    pins: &PinLayout,
    targets: &Targets,
    capacities: &crate::loader::Capacities,
) -> Result<Vec<Attachment>> {
    if targets.xdp_ifaces.is_empty()
        && targets.tc_ifaces.is_empty()
        && targets.host_cgroup.is_none()
    {
        return Err(Error::NoInterface);
    }
    if pins.is_loaded() {
        return Err(Error::AlreadyLoaded(pins.root().into()));
    }
    let fresh = !pins.root().exists();
    let attached = crate::loader::load_pinned(pins, capacities)
        .and_then(|mut ebpf| attach_all(&mut ebpf, pins, targets));
    if attached.is_err() {
        let cleanup = if fresh { unload(pins) } else { remove_attachments(pins) };
        if let Err(error) = cleanup {
            warn!(%error, "could not undo a partial load");
        }
    }
    attached
}

fn attach_all(ebpf: &mut Ebpf, pins: &PinLayout, targets: &Targets) -> Result<Vec<Attachment>> {
    pin_programs(ebpf, pins)?;
    let mut attachments = Vec::new();
    let present = crate::interfaces::present()?;
    let external = crate::interfaces::Selector::new(&targets.xdp_ifaces).expand(&present);
    let pods = crate::interfaces::Selector::new(&targets.tc_ifaces).expand(&present);
    for iface in &external {
        // From the programs just pinned, as interfaces that appear later are attached.
        attachments.push(crate::interfaces::attach_north_south(pins, iface)?);
    }
    for iface in &pods {
        let program = program_mut(ebpf, program_names::TC)?;
        attachments.push(attach_tc(program, pins, iface, TcRole::Pods)?);
    }
    let every_iface: std::collections::BTreeSet<_> = external.iter().chain(&pods).collect();
    for iface in every_iface {
        let program = program_mut(ebpf, program_names::TC_REPLY)?;
        attachments.push(attach_tc(program, pins, iface, TcRole::Replies)?);
    }
    if let Some(cgroup) = &targets.host_cgroup {
        for name in program_names::HOST {
            attachments.push(attach_host(program_mut(ebpf, name)?, name, pins, cgroup)?);
        }
    }
    Ok(attachments)
}

/// Attaches the host-path programs pinned under `pins` whose link to `cgroup` is not pinned:
/// a first load stopped between pinning its programs and attaching them last, or a datapath
/// loaded without `--host-cgroup` (or by a version without the host path) that a daemon with
/// it adopts.
pub fn attach_missing_host_links(pins: &PinLayout, cgroup: &Path) -> Result<Vec<Attachment>> {
    let mut attached = Vec::new();
    for name in program_names::HOST {
        if pins.link(name, HOST_IFACE).exists() {
            continue;
        }
        let path = pins.program(name);
        let hook = host_attach_type(name).ok_or(Error::MissingProgram(name))?;
        let mut program = CgroupSockAddr::from_pin(&path, hook).map_err(Error::attach(
            name,
            "cgroup sock_addr",
            &path.display().to_string(),
        ))?;
        attached.push(attach_host(&mut program, name, pins, cgroup)?);
    }
    Ok(attached)
}

/// The hook each host-path program is for.
fn host_attach_type(name: &str) -> Option<CgroupSockAddrAttachType> {
    match name {
        program_names::CONNECT4 => Some(CgroupSockAddrAttachType::Connect4),
        program_names::SENDMSG4 => Some(CgroupSockAddrAttachType::UDPSendMsg4),
        program_names::RECVMSG4 => Some(CgroupSockAddrAttachType::UDPRecvMsg4),
        program_names::GETPEERNAME4 => Some(CgroupSockAddrAttachType::GetPeerName4),
        _ => None,
    }
}

/// Attaches one host-path program to `cgroup`. As a bpf_link it runs alongside whatever else
/// is attached there (systemd and container runtimes attach their own): link attachments are
/// always multi-program, and the kernel refuses the legacy multi flag on them, hence `Single`.
fn attach_host(
    program: &mut CgroupSockAddr,
    name: &'static str,
    pins: &PinLayout,
    cgroup: &Path,
) -> Result<Attachment> {
    let where_ = cgroup.display().to_string();
    let attach_error = || Error::attach(name, "cgroup sock_addr", &where_);
    let file = std::fs::File::open(cgroup).map_err(Error::io(cgroup))?;
    let program_id = program.info().map_err(attach_error())?.id();
    let link_id = program.attach(&file, CgroupAttachMode::Single).map_err(attach_error())?;
    let link = program.take_link(link_id).map_err(attach_error())?;
    let link_id = pin_link(into_fd_link(link, "cgroup attachment")?, &pins.link(name, HOST_IFACE))?;
    Ok(Attachment {
        iface: where_,
        program: name,
        program_id,
        mode: AttachMode::CgroupSockAddr,
        link_id: Some(link_id),
    })
}

fn pin_programs(ebpf: &mut Ebpf, pins: &PinLayout) -> Result<()> {
    for name in program_names::ALL {
        pin_program(ebpf.program_mut(name).ok_or(Error::MissingProgram(name))?, name, pins)?;
    }
    Ok(())
}

/// Pins `program` as the instance's program `name`.
pub(crate) fn pin_program(program: &mut Program, name: &str, pins: &PinLayout) -> Result<()> {
    let path = pins.program(name);
    program.pin(&path).map_err(Error::pin(format!("program {name}"), &path))
}

pub(crate) fn interface_name(iface: &str) -> Result<CString> {
    CString::new(iface).map_err(|_| Error::Link {
        what: format!("interface name {iface:?}"),
        source: "contains a NUL byte".into(),
    })
}

/// The bpf_link behind an attachment, which XDP and tcx attachments always are on Linux 6.1+.
fn into_fd_link<L>(link: L, what: &str) -> Result<FdLink>
where
    FdLink: TryFrom<L, Error = LinkError>,
{
    FdLink::try_from(link).map_err(|source| Error::Link {
        what: format!("{what} is not a bpf_link"),
        source: source.into(),
    })
}

pub(crate) fn attach_xdp(program: &mut Xdp, pins: &PinLayout, iface: &str) -> Result<Attachment> {
    let c_iface = interface_name(iface)?;
    let attach_error = || Error::attach(program_names::XDP, "xdp", iface);
    let (link_id, mode) = match program.attach(c_iface.as_c_str(), XdpMode::Driver) {
        Ok(link_id) => (link_id, AttachMode::XdpDriver),
        Err(driver_error) => {
            info!(%iface, error = %driver_error, "no driver-mode XDP, using generic mode");
            let link_id =
                program.attach(c_iface.as_c_str(), XdpMode::Skb).map_err(attach_error())?;
            (link_id, AttachMode::XdpGeneric)
        }
    };
    let program_id = program.info().map_err(attach_error())?.id();
    let link = program.take_link(link_id).map_err(attach_error())?;
    let link_id = pin_link(into_fd_link(link, "XDP attachment")?, &pins.link(XDP_HOOK, iface))?;
    Ok(Attachment {
        iface: iface.into(),
        program: program_names::XDP,
        program_id,
        mode,
        link_id: Some(link_id),
    })
}

pub(crate) fn attach_tc(
    program: &mut SchedClassifier,
    pins: &PinLayout,
    iface: &str,
    role: TcRole,
) -> Result<Attachment> {
    let c_iface = interface_name(iface)?;
    let attach_error = || Error::attach(role.program(), role.hook_name(), iface);
    let program_id = program.info().map_err(attach_error())?.id();
    let tcx = TcAttach::Tcx { attach_type: role.attach_type(), order: LinkOrder::default() };
    let (mode, link_id) = match program.attach(c_iface.as_c_str(), tcx) {
        Ok(link_id) => {
            let link = program.take_link(link_id).map_err(attach_error())?;
            let link = into_fd_link(link, "tcx attachment")?;
            (role.mode(true), Some(pin_link(link, &pins.link(role.tcx_hook(), iface))?))
        }
        Err(source @ ProgramError::UnknownInterface { .. }) => return Err(attach_error()(source)),
        Err(tcx_error) => {
            // Kernels before 6.6 answer EINVAL: no tcx. Fall back to clsact + cls_bpf.
            let record = attach_cls_bpf(program, pins, (iface, &c_iface), role, &tcx_error)?;
            info!(%iface, priority = record.priority, handle = record.handle, "attached through clsact/cls_bpf");
            (role.mode(false), None)
        }
    };
    if role == TcRole::Pods {
        accept_local_sources(iface);
    }
    Ok(Attachment { iface: iface.into(), program: role.program(), program_id, mode, link_id })
}

/// A masqueraded packet reaches the kernel on the interface it arrived on, its source now the
/// node's own address, which Linux drops as martian unless `accept_local` is set there:
/// hairpin traffic (a pod reaching its own service) on the pod's interface, and on an external
/// interface the packets XDP (or its tc fallback) hands up the stack, masqueraded towards a
/// remote backend or a pod, and translated back towards the client.
pub(crate) fn accept_local_sources(iface: &str) {
    if let Err(error) = set_accept_local(iface) {
        warn!(%iface, %error, "could not set accept_local: masqueraded connections will fail");
    }
}

/// Sets `accept_local` on `iface` unless it is set already (see [`accept_local_sources`]):
/// also for the interfaces whose pinned attachments a daemon adopts, which an earlier build
/// may have attached without it.
pub(crate) fn set_accept_local(iface: &str) -> std::io::Result<()> {
    let path = format!("/proc/sys/net/ipv4/conf/{iface}/accept_local");
    if std::fs::read_to_string(&path).is_ok_and(|value| value.trim() == "1") {
        return Ok(());
    }
    std::fs::write(&path, "1")
}

fn attach_cls_bpf(
    program: &mut SchedClassifier,
    pins: &PinLayout,
    (iface, c_iface): (&str, &CString),
    role: TcRole,
    tcx_error: &ProgramError,
) -> Result<NetlinkTcRecord> {
    // An existing clsact qdisc (another tool's) is fine and stays; one we add goes with the
    // last of our filters on the interface. Our records on it share that duty: the ingress and
    // egress filters sit on the same qdisc, and either may go first.
    let added_clsact = tc::qdisc_add_clsact(c_iface.as_c_str()).is_ok();
    let created_clsact =
        added_clsact || records_on(pins, iface)?.iter().any(|record| record.created_clsact);
    let netlink =
        TcAttach::Netlink { parent: role.attach_type().into(), options: NlOptions::default() };
    let attached =
        program.attach(c_iface.as_c_str(), netlink).and_then(|link_id| program.take_link(link_id));
    let link = match attached {
        Ok(link) => ManuallyDrop::new(link),
        Err(source) => {
            if added_clsact {
                delete_clsact(iface);
            }
            return Err(Error::AttachTc {
                program: role.program(),
                iface: iface.into(),
                tcx: tcx_error.to_string(),
                source: Box::new(source),
            });
        }
    };
    // Dropping a netlink link detaches the filter; it must outlive this process, so it is never
    // dropped (ManuallyDrop) and `unload` detaches it from the record instead.
    let (Ok(priority), Ok(handle)) = (link.priority(), link.handle()) else {
        unreachable!("a link made by a netlink attach is a netlink link");
    };
    // SAFETY: a NUL-terminated name; 0 means no such interface.
    let ifindex =
        Some(unsafe { libc::if_nametoindex(c_iface.as_ptr()) }).filter(|&index| index != 0);
    let record = NetlinkTcRecord {
        role,
        iface: iface.into(),
        priority,
        handle: handle.into(),
        ifindex,
        created_clsact,
    };
    let dir = pins.links_dir().join(record.dir_name());
    std::fs::create_dir(&dir).map_err(Error::io(&dir))?;
    Ok(record)
}

/// Pins a bpf_link and returns its kernel id.
fn pin_link(link: FdLink, path: &Path) -> Result<u32> {
    let link_id = link
        .info()
        .map_err(|source| Error::Link {
            what: format!("reading link info for {}", path.display()),
            source: source.into(),
        })?
        .id();
    link.pin(path).map_err(Error::pin("link", path))?;
    Ok(link_id)
}

/// Detaches and unpins everything a load put under `pins`, and removes its directories if they
/// are then empty. Returns a line per object removed. Maps go too: use this to remove an
/// instance, not to restart one.
pub fn unload(pins: &PinLayout) -> Result<Vec<String>> {
    let mut removed = remove_attachments(pins)?;
    for name in crate::loader::MAP_NAMES {
        removed.extend(remove_pin(&pins.map(name))?);
        removed.extend(remove_pin(&pins.map_set_aside(name))?);
    }
    for dir in [pins.links_dir(), pins.programs_dir(), pins.maps_dir(), pins.root().to_path_buf()] {
        match std::fs::remove_dir(&dir) {
            Ok(()) => removed.push(format!("removed {}", dir.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                warn!(dir = %dir.display(), error = %e, "left in place: it holds objects this project did not create");
            }
        }
    }
    Ok(removed)
}

/// Detaches every pinned attachment and unpins the programs; the maps stay.
fn remove_attachments(pins: &PinLayout) -> Result<Vec<String>> {
    let mut removed = detach_links(pins)?;
    for name in program_names::ALL {
        removed.extend(remove_pin(&pins.program(name))?);
    }
    Ok(removed)
}

fn detach_links(pins: &PinLayout) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    for name in link_names(pins)? {
        removed.extend(detach_pinned(pins, &name)?);
    }
    Ok(removed)
}

/// The names under `links/`; none if there is no such directory.
fn link_names(pins: &PinLayout) -> Result<Vec<String>> {
    let links_dir = pins.links_dir();
    let entries = match std::fs::read_dir(&links_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::Io { path: links_dir, source: e }),
    };
    entries
        .map(|entry| Ok(entry.map_err(Error::io(&links_dir))?.file_name().to_string_lossy().into()))
        .collect()
}

/// Detaches and unpins the attachment pinned as `links/<file_name>`; says what it did.
pub fn detach_pinned(pins: &PinLayout, file_name: &str) -> Result<Option<String>> {
    let path = pins.links_dir().join(file_name);
    if let Some(record) = NetlinkTcRecord::parse(file_name) {
        detach_cls_bpf(&record);
        std::fs::remove_dir(&path).map_err(Error::io(&path))?;
        if record.created_clsact && records_on(pins, &record.iface)?.is_empty() {
            delete_clsact(&record.iface);
        }
        return Ok(Some(format!(
            "detached cls_bpf filter from {} (priority {})",
            record.iface, record.priority
        )));
    }
    if !file_name.contains('@') {
        return Ok(None);
    }
    let link = PinnedLink::from_pin(&path).map_err(|source| Error::Link {
        what: format!("opening pinned link {}", path.display()),
        source: source.into(),
    })?;
    // Dropping the last reference to an unpinned bpf_link detaches it.
    drop(link.unpin().map_err(Error::io(&path))?);
    Ok(Some(format!("detached {file_name}")))
}

/// The netlink filter `record` describes, as a link aya can replace or detach.
pub(crate) fn recorded_filter(record: &NetlinkTcRecord) -> Result<SchedClassifierLink> {
    let iface = interface_name(&record.iface)?;
    let parent = record.role.attach_type().into();
    SchedClassifierLink::attached(
        iface.as_c_str(),
        parent,
        record.priority,
        record.handle.into(),
        None,
    )
    .map_err(|source| Error::attach(record.role.program(), "cls_bpf", &record.iface)(source.into()))
}

fn detach_cls_bpf(record: &NetlinkTcRecord) {
    let detached = recorded_filter(record)
        .map_err(|e| crate::error::chain(&e))
        .and_then(|link| link.detach().map_err(|e| e.to_string()));
    if let Err(error) = detached {
        // The interface or the filter is already gone: nothing is left attached.
        warn!(iface = %record.iface, %error, "cls_bpf filter was already gone");
    }
}

/// The cls_bpf records pinned for filters on `iface`.
fn records_on(pins: &PinLayout, iface: &str) -> Result<Vec<NetlinkTcRecord>> {
    let names = link_names(pins)?;
    let records = names.iter().filter_map(|name| NetlinkTcRecord::parse(name));
    Ok(records.filter(|record| record.iface == iface).collect())
}

/// aya can add a clsact qdisc but not delete one; iproute2's `tc` does.
fn delete_clsact(iface: &str) {
    let status = Command::new("tc").args(["qdisc", "del", "dev", iface, "clsact"]).status();
    if !status.is_ok_and(|s| s.success()) {
        warn!(%iface, "could not delete the clsact qdisc this project added");
    }
}

/// Unpins `path`, saying so; a pin already gone is not an error.
pub(crate) fn remove_pin(path: &Path) -> Result<Option<String>> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(Some(format!("unpinned {}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::Io { path: path.into(), source: e }),
    }
}
