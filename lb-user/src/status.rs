//! `status`: what is programmed, read from the pinned maps: frontends with their backends and
//! counters, the datapath's per-reason counters, and where the programs are attached.

use std::{collections::BTreeMap, fmt::Write as _, net::Ipv4Addr};

use lb_common::maps::{backend_flags, proto, scope, service_flags};
use serde::Serialize;

use crate::{
    error::{Error, Result},
    maps::KernelMaps,
    pins::{NetlinkTcRecord, PinLayout, program_of_link},
    stats,
};

#[derive(Debug, Serialize)]
pub struct Status {
    pub frontends: Vec<FrontendStatus>,
    /// Every reason with its count, by name.
    pub reasons: BTreeMap<&'static str, u64>,
    /// With FIB forwarding on: translated XDP packets sent out by FIB lookup and redirect.
    pub xdp_redirected: u64,
    /// With FIB forwarding on: translated XDP packets passed up the stack (lookup failed).
    pub xdp_to_stack: u64,
    /// Packets translated by the tc fallback of interfaces where XDP could not be attached.
    pub tc_fallback_translated: u64,
    /// Of those, with FIB forwarding on, sent out by FIB lookup and redirect.
    pub tc_fallback_redirected: u64,
    /// Every pinned attachment, by program and then interface.
    pub attachments: Vec<AttachmentStatus>,
}

#[derive(Debug, Serialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct AttachmentStatus {
    pub program: &'static str,
    /// `xdp`, `tcx-ingress`, `cls_bpf`, or the host path's hook.
    pub hook: String,
    /// The interface, or `host` for the host path's cgroup.
    pub target: String,
}

#[derive(Debug, Serialize)]
pub struct FrontendStatus {
    pub address: String,
    pub protocol: &'static str,
    pub scope: &'static str,
    pub flags: Vec<&'static str>,
    /// `ip:port`, with `local` for endpoints on this node.
    pub backends: Vec<BackendStatus>,
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Debug, Serialize)]
pub struct BackendStatus {
    pub address: String,
    pub local: bool,
}

const FLAG_NAMES: [(u16, &str); 6] = [
    (service_flags::EXTERNAL, "external"),
    (service_flags::EXT_LOCAL, "ext-local"),
    (service_flags::TWO_SCOPES, "two-scopes"),
    (service_flags::AFFINITY, "affinity"),
    (service_flags::SOURCE_RANGES, "source-ranges"),
    (service_flags::EMPTY_DROP, "empty-drop"),
];

/// `ip:port` from network-order fields.
pub fn endpoint(ip_be: u32, port_be: u16) -> String {
    format!("{}:{}", Ipv4Addr::from(u32::from_be(ip_be)), u16::from_be(port_be))
}

/// `tcp`, `udp`, or `other`.
pub fn protocol_name(number: u8) -> &'static str {
    match number {
        proto::TCP => "tcp",
        proto::UDP => "udp",
        _ => "other",
    }
}

/// Reads the status of the instance pinned under `pins`.
pub fn read(pins: &PinLayout) -> Result<Status> {
    let maps = KernelMaps::from_pins(pins)?;
    let backends: BTreeMap<u32, _> = maps.backends()?.into_iter().collect();
    let mut frontends = Vec::new();
    let mut services = maps.services()?;
    services.sort_by_key(|(key, _)| {
        (u32::from_be(key.vip_be), u16::from_be(key.port_be), key.proto, key.scope)
    });
    for (key, value) in services.into_iter().filter(|(key, _)| !key.is_marker()) {
        let slots = maps.slots(value.slot_base, value.slot_count)?;
        let mut ids: Vec<u32> = slots.iter().map(|slot| slot.backend_id).collect();
        ids.sort_unstable();
        ids.dedup();
        let counters = maps.service_counters(value.service_id)?;
        frontends.push(FrontendStatus {
            address: endpoint(key.vip_be, key.port_be),
            protocol: protocol_name(key.proto),
            // The second entry of a frontend with two scopes serves sources inside the cluster.
            scope: if key.scope == scope::INTERNAL { "cluster-sources" } else { "all" },
            flags: FLAG_NAMES
                .iter()
                .filter(|(bit, _)| value.flags & bit != 0)
                .map(|(_, name)| *name)
                .collect(),
            backends: ids
                .iter()
                .filter_map(|id| backends.get(id))
                .map(|b| BackendStatus {
                    address: endpoint(b.ip_be, b.port_be),
                    local: b.flags & backend_flags::LOCAL != 0,
                })
                .collect(),
            packets: counters.packets,
            bytes: counters.bytes,
        });
    }
    let counts = stats::read_pinned(pins)?;
    let reasons =
        lb_common::stats::Reason::ALL.iter().map(|r| (r.name(), counts.get(*r))).collect();
    let forwarding = stats::read_forwarding_pinned(pins)?;
    let attachments = attachments(pins)?;
    Ok(Status {
        frontends,
        reasons,
        xdp_redirected: forwarding.redirected,
        xdp_to_stack: forwarding.to_stack,
        tc_fallback_translated: forwarding.tc_fallback,
        tc_fallback_redirected: forwarding.tc_fallback_redirected,
        attachments,
    })
}

/// The attachments pinned under `links/`, from their names.
fn attachments(pins: &PinLayout) -> Result<Vec<AttachmentStatus>> {
    let links_dir = pins.links_dir();
    let mut attachments = Vec::new();
    for entry in std::fs::read_dir(&links_dir).map_err(Error::io(&links_dir))? {
        let name = entry.map_err(Error::io(&links_dir))?.file_name().to_string_lossy().into_owned();
        let attachment = if let Some(record) = NetlinkTcRecord::parse(&name) {
            AttachmentStatus {
                program: record.role.program(),
                hook: "cls_bpf".into(),
                target: record.iface,
            }
        } else if let (Some(program), Some((hook, target))) =
            (program_of_link(&name), name.split_once('@'))
        {
            AttachmentStatus { program, hook: hook.into(), target: target.into() }
        } else {
            continue;
        };
        attachments.push(attachment);
    }
    attachments.sort();
    Ok(attachments)
}

impl Status {
    /// A table for people: one frontend a line, then the non-zero reason counters.
    pub fn table(&self) -> String {
        let mut out = format!(
            "{:<22} {:<5} {:<15} {:>10} {:>12}  BACKENDS (* local)  FLAGS\n",
            "FRONTEND", "PROTO", "SCOPE", "PACKETS", "BYTES"
        );
        for f in &self.frontends {
            let backends: Vec<String> = f
                .backends
                .iter()
                .map(|b| format!("{}{}", b.address, if b.local { "*" } else { "" }))
                .collect();
            let backends = if backends.is_empty() { "-".to_owned() } else { backends.join(",") };
            let _ = writeln!(
                out,
                "{:<22} {:<5} {:<15} {:>10} {:>12}  {backends}  {}",
                f.address,
                f.protocol,
                f.scope,
                f.packets,
                f.bytes,
                f.flags.join(",")
            );
        }
        let _ = writeln!(
            out,
            "\nXDP forwarding (xdpRedirect): {} redirected by FIB lookup, {} up the stack; \
             {} translated by the tc fallback, {} of them redirected",
            self.xdp_redirected,
            self.xdp_to_stack,
            self.tc_fallback_translated,
            self.tc_fallback_redirected
        );
        out.push_str("\nPROGRAM          HOOK          ON\n");
        for a in &self.attachments {
            let _ = writeln!(out, "{:<16} {:<13} {}", a.program, a.hook, a.target);
        }
        out.push_str("\nREASON                       PACKETS\n");
        for (name, count) in self.reasons.iter().filter(|(_, c)| **c > 0) {
            let _ = writeln!(out, "{name:<28} {count}");
        }
        out
    }
}
