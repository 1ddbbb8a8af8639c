//! Keeping the programs on the interfaces that exist. Pod-facing interfaces come and go with
//! their pods (a routed CNI gives each pod a veth of its own, named by a pattern: Calico's
//! `cali*`, Cilium's `lxc*`), and any interface may vanish while no daemon runs. The daemon
//! looks at the interfaces when it starts and on every link event, and makes the pinned
//! attachments match: the tc program on each existing interface that `--tc-iface` names or
//! matches (`prefix*`), XDP on each that `--xdp-iface` names or matches; the pin of an attachment whose
//! interface is gone (or was replaced by a new one of the same name) is removed, and an
//! attachment the targets no longer select is detached. An external interface served by the tc
//! fallback because another program held its XDP hook gets XDP back once that hook is free.

mod events;
mod kernel;

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
};

use aya::programs::{ProgramError, SchedClassifier, Xdp};
use aya_obj::programs::XdpAttachType;
use events::LinkEvents;
use tracing::{debug, error, info, warn};

use crate::{
    attach::{self, Attachment, Targets},
    error::{Error, Result},
    metrics::Metrics,
    pins::{
        NetlinkTcRecord, PinLayout, TCX_EXTERNAL_HOOK, TCX_HOOK, TCX_REPLY_HOOK, TcRole, XDP_HOOK,
    },
    program_names,
};

/// A running daemon's side of this module: it waits for link events and follows each, logging
/// and counting the changes.
pub struct Follower {
    /// `None` once the events were lost: interfaces are then no longer followed.
    events: Option<LinkEvents>,
    /// Interfaces that could not be attached at the last look.
    failing: BTreeSet<String>,
}

impl Follower {
    /// Subscribes to link events in the calling thread's network namespace. Subscribe before
    /// the first look at the interfaces, so that no change falls between.
    pub fn subscribe() -> Result<Self> {
        Ok(Self { events: Some(LinkEvents::subscribe()?), failing: BTreeSet::new() })
    }

    /// Waits for the next batch of link events. Should the events be lost, says so once and
    /// then waits for ever.
    pub async fn changed(&mut self) {
        let Some(events) = &mut self.events else {
            return std::future::pending().await;
        };
        if let Err(error) = events.changed().await {
            error!(error = %crate::error::chain(&error), "interface events lost: new interfaces are no longer attached until the daemon restarts");
            self.events = None;
            std::future::pending::<()>().await;
        }
    }

    /// [`follow`]s `targets`, logging and counting each change. An interface that cannot be
    /// attached is tried again at the next event, and warned about when it starts failing, not
    /// at every event while it still does.
    pub fn follow(&mut self, pins: &PinLayout, targets: &Targets, metrics: &Metrics) {
        let changes = match follow(pins, targets) {
            Ok(changes) => changes,
            Err(error) => {
                error!(error = %crate::error::chain(&error), "could not compare the attachments with the interfaces");
                return;
            }
        };
        metrics.observe_interfaces(&changes);
        for attachment in &changes.attached {
            info!(%attachment, "attached");
        }
        for removed in &changes.removed {
            info!("{removed}");
        }
        let mut failing = BTreeSet::new();
        for (iface, why) in changes.failed {
            if self.failing.contains(&iface) {
                debug!(%iface, error = %why, "still cannot attach");
            } else {
                warn!(%iface, error = %why, "cannot attach; trying again at the next interface event");
            }
            failing.insert(iface);
        }
        self.failing = failing;
    }
}

/// Which interfaces a list of `--tc-iface` or `--xdp-iface` values selects: a value ending in
/// `*` selects every interface whose name begins with what comes before it; any other value,
/// that one name.
pub struct Selector<'a>(&'a [String]);

impl<'a> Selector<'a> {
    pub fn new(specs: &'a [String]) -> Self {
        Self(specs)
    }

    pub fn matches(&self, iface: &str) -> bool {
        self.0.iter().any(|spec| match spec.strip_suffix('*') {
            Some(prefix) => iface.starts_with(prefix),
            None => spec == iface,
        })
    }

    /// The interfaces to attach to now: every plain name (present or not, so that a missing
    /// one is reported), and the present interfaces a pattern matches.
    pub fn expand(&self, present: &BTreeMap<String, u32>) -> Vec<String> {
        let mut names: Vec<String> =
            self.0.iter().filter(|spec| !spec.ends_with('*')).cloned().collect();
        for iface in present.keys() {
            if self.matches(iface) && !names.contains(iface) {
                names.push(iface.clone());
            }
        }
        names
    }
}

/// The interfaces of this network namespace, by name.
pub fn present() -> Result<BTreeMap<String, u32>> {
    kernel::present()
}

/// What one look at the interfaces changed.
#[derive(Debug, Default)]
pub struct Changes {
    pub attached: Vec<Attachment>,
    /// A line per pin removed, saying why.
    pub removed: Vec<String>,
    /// (interface, why) for each interface that could not be attached (it may have vanished
    /// meanwhile).
    pub failed: Vec<(String, String)>,
}

/// The interface hooks this module keeps: north-south (XDP, or its tc fallback), the pods' tc
/// ingress, and on every interface of either kind tc egress (replies of host-network
/// backends).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Hook {
    Xdp,
    Tc,
    Replies,
}

impl Hook {
    /// The hook a tc attachment of `role` serves.
    fn of(role: TcRole) -> Self {
        match role {
            TcRole::Pods => Self::Tc,
            TcRole::External => Self::Xdp,
            TcRole::Replies => Self::Replies,
        }
    }
}

/// Removes the pins of attachments whose interface is gone: a link left on a vanished
/// interface cannot be updated, so this comes before replacing programs on adoption.
pub fn remove_stale(pins: &PinLayout) -> Result<Vec<String>> {
    remove_stale_among(pins, &kernel::present()?)
}

fn remove_stale_among(pins: &PinLayout, present: &BTreeMap<String, u32>) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    for pinned in pinned_attachments(pins)? {
        if !pinned.is_live(present)? {
            removed.push(pinned.remove_stale()?);
        }
    }
    Ok(removed)
}

/// Makes the attachments pinned under `pins` match `targets` on the interfaces that exist now
/// (see the module's comment). An interface that cannot be attached is reported in
/// [`Changes::failed`] and the others are still done.
pub fn follow(pins: &PinLayout, targets: &Targets) -> Result<Changes> {
    let present = kernel::present()?;
    let mut changes =
        Changes { removed: remove_stale_among(pins, &present)?, ..Changes::default() };
    let (xdp, tc) = (Selector::new(&targets.xdp_ifaces), Selector::new(&targets.tc_ifaces));
    let selects = |hook: Hook, iface: &str| match hook {
        Hook::Xdp => xdp.matches(iface),
        Hook::Tc => tc.matches(iface),
        Hook::Replies => xdp.matches(iface) || tc.matches(iface),
    };
    let mut attached = Vec::new();
    for pinned in pinned_attachments(pins)? {
        if !selects(pinned.hook, &pinned.iface) {
            changes.removed.extend(attach::detach_pinned(pins, &pinned.file_name)?);
            continue;
        }
        if pinned.tc_fallback
            && let Some(xdp) = take_back_xdp(pins, &pinned.iface)
        {
            // XDP first, then the fallback goes: no packet meanwhile misses the service stage.
            // One that both see is translated once: the fallback finds no service at the
            // address XDP translated it to, and passes it.
            changes.attached.push(xdp);
            changes.removed.extend(attach::detach_pinned(pins, &pinned.file_name)?);
        }
        // Quietly: this runs at every interface event, and the attach warned already.
        if pinned.hook != Hook::Replies
            && let Err(error) = attach::set_accept_local(&pinned.iface)
        {
            debug!(iface = %pinned.iface, %error, "could not set accept_local");
        }
        attached.push((pinned.hook, pinned.iface));
    }
    for iface in present.keys() {
        for hook in [Hook::Xdp, Hook::Tc, Hook::Replies] {
            if selects(hook, iface) && !attached.contains(&(hook, iface.clone())) {
                match attach_one(pins, hook, iface) {
                    Ok(attachment) => changes.attached.push(attachment),
                    Err(error) => {
                        changes.failed.push((iface.clone(), crate::error::chain(&error)));
                    }
                }
            }
        }
    }
    Ok(changes)
}

fn attach_one(pins: &PinLayout, hook: Hook, iface: &str) -> Result<Attachment> {
    match hook {
        Hook::Xdp => attach_north_south(pins, iface),
        Hook::Tc => attach_tc_from_pin(pins, iface, TcRole::Pods),
        Hook::Replies => attach_tc_from_pin(pins, iface, TcRole::Replies),
    }
}

/// North-south on an external interface, from the pinned programs: XDP, or where XDP cannot be
/// attached (another program holds the interface's XDP hook, in a mode ours cannot join) the
/// same service stage on tc ingress, logged.
pub(crate) fn attach_north_south(pins: &PinLayout, iface: &str) -> Result<Attachment> {
    let mut program = pinned_xdp(pins, iface)?;
    let attached = match attach::attach_xdp(&mut program, pins, iface) {
        Err(Error::Attach { source, .. })
            if !matches!(*source, ProgramError::UnknownInterface { .. }) =>
        {
            let error = crate::error::chain(&*source);
            warn!(%iface, %error, "XDP cannot be attached; north-south traffic takes tc ingress instead");
            attach_tc_from_pin(pins, iface, TcRole::External)
        }
        attached => attached,
    };
    if attached.is_ok() {
        attach::accept_local_sources(iface);
    }
    attached
}

/// XDP on an interface the tc fallback serves, if its XDP hook is free again (the program that
/// held it is gone); `None` while it is still held.
fn take_back_xdp(pins: &PinLayout, iface: &str) -> Option<Attachment> {
    let attached = pinned_xdp(pins, iface)
        .and_then(|mut program| attach::attach_xdp(&mut program, pins, iface));
    match attached {
        Ok(attachment) => {
            info!(%iface, "the XDP hook is free again: north-south traffic takes XDP, the tc fallback goes");
            Some(attachment)
        }
        Err(error) => {
            debug!(%iface, error = %crate::error::chain(&error), "XDP still cannot be attached");
            None
        }
    }
}

/// The pinned XDP program, opened to attach it to `iface`.
fn pinned_xdp(pins: &PinLayout, iface: &str) -> Result<Xdp> {
    let name = program_names::XDP;
    Xdp::from_pin(pins.program(name), XdpAttachType::Interface)
        .map_err(Error::attach(name, "xdp", iface))
}

fn attach_tc_from_pin(pins: &PinLayout, iface: &str, role: TcRole) -> Result<Attachment> {
    let mut program = SchedClassifier::from_pin(pins.program(role.program()))
        .map_err(Error::attach(role.program(), role.hook_name(), iface))?;
    attach::attach_tc(&mut program, pins, iface, role)
}

/// One XDP or tc attachment pinned under `links/`.
struct Pinned {
    hook: Hook,
    iface: String,
    file_name: String,
    path: std::path::PathBuf,
    /// A cls_bpf filter's record; `None` for a bpf_link.
    record: Option<NetlinkTcRecord>,
    /// The north-south tc fallback of an interface where XDP could not be attached.
    tc_fallback: bool,
}

fn pinned_attachments(pins: &PinLayout) -> Result<Vec<Pinned>> {
    let links_dir = pins.links_dir();
    let mut pinned = Vec::new();
    for entry in fs::read_dir(&links_dir).map_err(Error::io(&links_dir))? {
        let entry = entry.map_err(Error::io(&links_dir))?;
        let file_name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if let Some(record) = NetlinkTcRecord::parse(&file_name) {
            let (hook, iface) = (Hook::of(record.role), record.iface.clone());
            let tc_fallback = record.role == TcRole::External;
            pinned.push(Pinned { hook, iface, file_name, path, record: Some(record), tc_fallback });
            continue;
        }
        let (hook, iface, tc_fallback) = match file_name.split_once('@') {
            Some((XDP_HOOK, iface)) => (Hook::Xdp, iface.to_owned(), false),
            Some((TCX_HOOK, iface)) => (Hook::Tc, iface.to_owned(), false),
            Some((TCX_REPLY_HOOK, iface)) => (Hook::Replies, iface.to_owned(), false),
            Some((TCX_EXTERNAL_HOOK, iface)) => {
                (Hook::of(TcRole::External), iface.to_owned(), true)
            }
            _ => continue,
        };
        pinned.push(Pinned { hook, iface, file_name, path, record: None, tc_fallback });
    }
    Ok(pinned)
}

impl Pinned {
    /// True while the attachment still runs on the interface its pin names: an interface of
    /// that name exists and has the index the attachment was made on. A bpf_link says which
    /// interface it is on (none once that one is gone); a cls_bpf filter goes with its
    /// interface, and its record keeps the index (records of versions that did not are taken
    /// as live while the name exists).
    fn is_live(&self, present: &BTreeMap<String, u32>) -> Result<bool> {
        let Some(&ifindex) = present.get(&self.iface) else {
            return Ok(false);
        };
        match &self.record {
            Some(record) => Ok(record.ifindex.is_none_or(|attached| attached == ifindex)),
            None => Ok(kernel::pinned_link_ifindex(&self.path)? == ifindex),
        }
    }

    /// Removes the pin of an attachment whose interface is gone: the kernel detached it with
    /// the interface, so there is nothing to detach.
    fn remove_stale(&self) -> Result<String> {
        let removed = if self.record.is_some() { fs::remove_dir } else { fs::remove_file };
        removed(&self.path).map_err(Error::io(&self.path))?;
        Ok(format!("removed {}: its interface {} is gone", self.file_name, self.iface))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trailing_star_selects_by_prefix_and_a_name_selects_itself() {
        let specs = ["cali*".to_owned(), "eth1".to_owned()];
        let selector = Selector::new(&specs);
        assert!(selector.matches("cali12ab"));
        assert!(selector.matches("cali"));
        assert!(selector.matches("eth1"));
        assert!(!selector.matches("eth10"));
        assert!(!selector.matches("xcali1"));
    }

    #[test]
    fn expanding_keeps_plain_names_even_when_absent_and_adds_pattern_matches() {
        let specs = ["vpod*".to_owned(), "missing0".to_owned(), "vpod1".to_owned()];
        let present = BTreeMap::from([
            ("lo".to_owned(), 1),
            ("vpod0".to_owned(), 2),
            ("vpod1".to_owned(), 3),
        ]);
        assert_eq!(Selector::new(&specs).expand(&present), ["missing0", "vpod1", "vpod0"]);
    }
}
