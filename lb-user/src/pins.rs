//! Where a loaded instance keeps its objects in bpffs:
//!
//! ```text
//! <pin-dir>/maps/<MAP>                        maps, pinned by name (adopted by the next load)
//! <pin-dir>/programs/<program>                the loaded programs
//! <pin-dir>/links/<hook>@<iface>              bpf_links (XDP, tcx): unpinning one detaches it
//! <pin-dir>/links/cls_bpf[-external|-egress]@<iface>@<prio>@<handle>[@if<index>][@clsact]
//!                                             a directory that records a netlink tc filter
//!                                             (kernels without tcx), which has no link to pin
//! ```
//! bpffs holds no regular files, so the netlink record is encoded in a directory name.

use std::path::{Path, PathBuf};

use aya::programs::TcAttachType;

use crate::{
    error::{Error, Result},
    program_names,
};

/// Link names: `<hook>@<iface>`.
pub const XDP_HOOK: &str = "xdp";
pub const TCX_HOOK: &str = "tcx-ingress";
/// tcx ingress of an external interface whose XDP hook another program holds.
pub const TCX_EXTERNAL_HOOK: &str = "tcx-ingress-external";
/// tcx egress of every pod-facing and external interface.
pub const TCX_REPLY_HOOK: &str = "tcx-egress";

/// Which tc program an interface runs: the pods' (east-west), the external one where XDP
/// cannot be attached (north-south), or on egress the one for host-network backends' replies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcRole {
    Pods,
    External,
    Replies,
}

impl TcRole {
    pub const ALL: [Self; 3] = [Self::Pods, Self::External, Self::Replies];

    pub fn program(self) -> &'static str {
        match self {
            Self::Pods => program_names::TC,
            Self::External => program_names::TC_EXTERNAL,
            Self::Replies => program_names::TC_REPLY,
        }
    }

    /// The hook part of the name of its tcx link.
    pub fn tcx_hook(self) -> &'static str {
        match self {
            Self::Pods => TCX_HOOK,
            Self::External => TCX_EXTERNAL_HOOK,
            Self::Replies => TCX_REPLY_HOOK,
        }
    }

    /// Ingress or egress.
    pub fn attach_type(self) -> TcAttachType {
        match self {
            Self::Pods | Self::External => TcAttachType::Ingress,
            Self::Replies => TcAttachType::Egress,
        }
    }

    /// The hook, as errors and logs name it.
    pub fn hook_name(self) -> &'static str {
        match self {
            Self::Pods | Self::External => "tc ingress",
            Self::Replies => "tc egress",
        }
    }

    /// The first part of the name of its cls_bpf record.
    fn record_prefix(self) -> &'static str {
        match self {
            Self::Pods => "cls_bpf",
            Self::External => "cls_bpf-external",
            Self::Replies => "cls_bpf-egress",
        }
    }
}
/// The "interface" of the host path's links: `<program>@host`.
pub const HOST_IFACE: &str = "host";

/// The pin directory used when none is given.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/lb-xdp";

/// `statfs` magic of bpffs (include/uapi/linux/magic.h).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Paths of one instance's pinned objects.
#[derive(Clone, Debug)]
pub struct PinLayout {
    root: PathBuf,
}

impl PinLayout {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn maps_dir(&self) -> PathBuf {
        self.root.join("maps")
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.maps_dir().join(name)
    }

    /// Where map `name` waits while a map of another size takes its place (see
    /// [`crate::resize`]). bpffs refuses names with a dot.
    pub fn map_set_aside(&self, name: &str) -> PathBuf {
        self.maps_dir().join(format!("{name}-resizing"))
    }

    pub fn programs_dir(&self) -> PathBuf {
        self.root.join("programs")
    }

    pub fn program(&self, name: &str) -> PathBuf {
        self.programs_dir().join(name)
    }

    pub fn links_dir(&self) -> PathBuf {
        self.root.join("links")
    }

    /// The pinned bpf_link of `hook` ([`XDP_HOOK`], [`TCX_HOOK`], or a host program's name)
    /// on `iface` ([`HOST_IFACE`] for the host path's cgroup).
    pub fn link(&self, hook: &str, iface: &str) -> PathBuf {
        self.links_dir().join(format!("{hook}@{iface}"))
    }

    /// True if programs are pinned here, i.e. an instance is loaded.
    pub fn is_loaded(&self) -> bool {
        std::fs::read_dir(self.programs_dir()).is_ok_and(|mut entries| entries.next().is_some())
    }

    /// Creates the directories, after checking that the root is (or will be) on bpffs: pinning
    /// anywhere else fails with a reason that does not say why.
    pub fn create_dirs(&self) -> Result<()> {
        let bpffs = self.root.ancestors().find(|p| p.exists()).unwrap_or(Path::new("/"));
        if !is_bpffs(bpffs) {
            return Err(Error::NotBpffs(self.root.clone()));
        }
        for dir in [self.maps_dir(), self.programs_dir(), self.links_dir()] {
            std::fs::create_dir_all(&dir).map_err(Error::io(&dir))?;
        }
        Ok(())
    }
}

/// The program a pinned bpf_link (its file name under `links/`) runs.
pub fn program_of_link(link_name: &str) -> Option<&'static str> {
    let (hook, iface) = link_name.split_once('@')?;
    match hook {
        XDP_HOOK => Some(program_names::XDP),
        TCX_HOOK => Some(program_names::TC),
        TCX_EXTERNAL_HOOK => Some(program_names::TC_EXTERNAL),
        TCX_REPLY_HOOK => Some(program_names::TC_REPLY),
        _ if iface == HOST_IFACE => program_names::HOST.into_iter().find(|name| *name == hook),
        _ => None,
    }
}

fn is_bpffs(path: &Path) -> bool {
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes into a zeroed struct we own and reads a NUL-terminated path.
    unsafe {
        let mut stats: libc::statfs = std::mem::zeroed();
        libc::statfs(c_path.as_ptr(), &raw mut stats) == 0 && stats.f_type == BPF_FS_MAGIC
    }
}

/// The record of a netlink (cls_bpf) tc filter, encoded as a directory name under `links/`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetlinkTcRecord {
    pub role: TcRole,
    pub iface: String,
    pub priority: u16,
    pub handle: u32,
    /// The interface's index when the filter was added: a new interface of the same name has
    /// another, and none of its filters. `None` in records of versions that did not keep it.
    pub ifindex: Option<u32>,
    /// The clsact qdisc was added by this load and goes away with it.
    pub created_clsact: bool,
}

impl NetlinkTcRecord {
    pub fn dir_name(&self) -> String {
        let ifindex = self.ifindex.map(|index| format!("@if{index}")).unwrap_or_default();
        let clsact = if self.created_clsact { "@clsact" } else { "" };
        let Self { iface, priority, handle, .. } = self;
        let prefix = self.role.record_prefix();
        format!("{prefix}@{iface}@{priority}@{handle}{ifindex}{clsact}")
    }

    pub fn parse(name: &str) -> Option<Self> {
        let mut parts = name.split('@');
        let prefix = parts.next()?;
        let role = TcRole::ALL.into_iter().find(|role| role.record_prefix() == prefix)?;
        let iface = parts.next()?.to_owned();
        let priority = parts.next()?.parse().ok()?;
        let handle = parts.next()?.parse().ok()?;
        let mut record =
            Self { role, iface, priority, handle, ifindex: None, created_clsact: false };
        for part in parts {
            match (part, part.strip_prefix("if")) {
                ("clsact", _) => record.created_clsact = true,
                (_, Some(index)) => record.ifindex = Some(index.parse().ok()?),
                _ => return None,
            }
        }
        Some(record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netlink_record_round_trips_through_its_directory_name() {
        let cases = [
            (TcRole::Pods, None, false),
            (TcRole::Pods, Some(7), false),
            (TcRole::External, Some(7), true),
            (TcRole::Replies, Some(7), true),
        ];
        for (role, ifindex, created_clsact) in cases {
            let record = NetlinkTcRecord {
                role,
                iface: "eth0.100".into(),
                priority: 49152,
                handle: 1,
                ifindex,
                created_clsact,
            };
            assert_eq!(NetlinkTcRecord::parse(&record.dir_name()), Some(record));
        }
        // A record of a version that kept no interface index.
        let older = NetlinkTcRecord::parse("cls_bpf@eth0@49152@1@clsact").expect("parses");
        assert_eq!((older.role, older.ifindex, older.created_clsact), (TcRole::Pods, None, true));
        assert_eq!(NetlinkTcRecord::parse("xdp@eth0"), None);
        assert_eq!(NetlinkTcRecord::parse("cls_bpf@eth0@1@2@bogus"), None);
    }

    #[test]
    fn every_link_name_names_the_program_it_runs() {
        let pins = PinLayout::new("/sys/fs/bpf/test");
        let name_of = |path: PathBuf| path.file_name().unwrap().to_string_lossy().into_owned();
        let xdp = name_of(pins.link(XDP_HOOK, "eth0"));
        assert_eq!(program_of_link(&xdp), Some(program_names::XDP));
        for role in TcRole::ALL {
            let tcx = name_of(pins.link(role.tcx_hook(), "veth1"));
            assert_eq!(program_of_link(&tcx), Some(role.program()));
        }
        for host in program_names::HOST {
            assert_eq!(program_of_link(&name_of(pins.link(host, HOST_IFACE))), Some(host));
        }
        assert_eq!(program_of_link("lb_connect4@eth0"), None);
        assert_eq!(program_of_link("cls_bpf@eth0@1@2"), None);
    }
}
