//! `flows`: the translated connections the datapath tracks, read from the pinned conntrack map,
//! as `conntrack -L` shows kube-proxy's: client, the frontend it spoke to, the backend it was
//! sent to, the source it was masqueraded to, TCP state and idle time. One line per flow, from
//! its forward entry (each flow also has a reply entry, which says nothing more).

use std::fmt::Write as _;

use lb_common::{
    conntrack::is_live,
    maps::{ConntrackKey, ConntrackValue, ct_flags, proto},
};
use serde::Serialize;

use crate::{
    clock,
    error::Result,
    maps::KernelMaps,
    pins::PinLayout,
    status::{endpoint, protocol_name},
};

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Flow {
    pub protocol: &'static str,
    pub client: String,
    pub frontend: String,
    pub backend: String,
    /// The node address and port the client's source became; `None` if not masqueraded.
    pub snat: Option<String>,
    /// TCP: `opening`, `established` or `closing`; other protocols: `-`.
    pub state: &'static str,
    /// Seconds since a packet last refreshed the entry (refreshes are at most once a second).
    pub idle_s: u64,
}

/// The live flows of the datapath pinned under `pins`, by client.
pub fn read(pins: &PinLayout) -> Result<Vec<Flow>> {
    let maps = KernelMaps::from_pins(pins)?;
    let now =
        clock::jiffies_now().map_err(crate::error::Error::io("reading the kernel's jiffies"))?;
    Ok(of_entries(&maps.conntrack()?, now, clock::jiffies_per_second()))
}

/// The live flows among conntrack `entries` at jiffies `now`, by client. Dead entries the
/// collector has not deleted yet are left out: the programs ignore them too.
pub fn of_entries(
    entries: &[(ConntrackKey, ConntrackValue)],
    now: u64,
    jiffies_per_second: u32,
) -> Vec<Flow> {
    let mut flows: Vec<(ConntrackKey, Flow)> = entries
        .iter()
        .filter(|(key, value)| {
            value.flags & ct_flags::REPLY == 0 && is_live(value, key.proto, now, jiffies_per_second)
        })
        .map(|(key, value)| (*key, flow(key, value, now, jiffies_per_second)))
        .collect();
    flows.sort_by_key(|(key, _)| {
        let order = |ip_be: u32, port_be: u16| (u32::from_be(ip_be), u16::from_be(port_be));
        (order(key.src_ip_be, key.src_port_be), order(key.dst_ip_be, key.dst_port_be))
    });
    flows.into_iter().map(|(_, flow)| flow).collect()
}

fn flow(key: &ConntrackKey, value: &ConntrackValue, now: u64, jiffies_per_second: u32) -> Flow {
    let state = if key.proto != proto::TCP {
        "-"
    } else if value.flags & ct_flags::CLOSING != 0 {
        "closing"
    } else if value.flags & ct_flags::OPENING != 0 {
        "opening"
    } else {
        "established"
    };
    Flow {
        protocol: protocol_name(key.proto),
        client: endpoint(key.src_ip_be, key.src_port_be),
        frontend: endpoint(key.dst_ip_be, key.dst_port_be),
        backend: endpoint(value.translated_ip_be, value.translated_port_be),
        snat: (value.flags & ct_flags::SNAT != 0)
            .then(|| endpoint(value.nat_ip_be, value.nat_port_be)),
        state,
        idle_s: now.saturating_sub(value.last_seen) / u64::from(jiffies_per_second.max(1)),
    }
}

/// The flows as a table, for people.
pub fn table(flows: &[Flow]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<5} {:<21} {:<21} {:<21} {:<21} {:<11} {:>6}",
        "PROTO", "CLIENT", "FRONTEND", "BACKEND", "SNAT", "STATE", "IDLE_S"
    );
    for f in flows {
        let snat = f.snat.as_deref().unwrap_or("-");
        let _ = writeln!(
            out,
            "{:<5} {:<21} {:<21} {:<21} {snat:<21} {:<11} {:>6}",
            f.protocol, f.client, f.frontend, f.backend, f.state, f.idle_s
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    const RATE: u32 = 100;

    fn key(src: [u8; 4], src_port: u16, dst: [u8; 4], dst_port: u16, proto: u8) -> ConntrackKey {
        ConntrackKey {
            src_ip_be: u32::from(Ipv4Addr::from(src)).to_be(),
            dst_ip_be: u32::from(Ipv4Addr::from(dst)).to_be(),
            src_port_be: src_port.to_be(),
            dst_port_be: dst_port.to_be(),
            proto,
            pad: [0; 3],
        }
    }

    fn value(flags: u16, to: [u8; 4], port: u16, last_seen: u64) -> ConntrackValue {
        ConntrackValue {
            last_seen,
            backend_id: 1,
            service_id: 1,
            translated_ip_be: u32::from(Ipv4Addr::from(to)).to_be(),
            nat_ip_be: u32::from(Ipv4Addr::new(192, 168, 1, 63)).to_be(),
            translated_port_be: port.to_be(),
            nat_port_be: 61_000u16.to_be(),
            flags,
            pad: [0; 2],
        }
    }

    #[test]
    fn forward_entries_become_flows_with_their_state_and_reply_or_dead_entries_do_not() {
        let now = 1_000_000;
        let pod = [10, 244, 1, 5];
        let vip = [10, 96, 45, 10];
        let backend = [10, 244, 2, 10];
        let entries = [
            // Masqueraded and established, idle 3 s.
            (
                key(pod, 40_001, vip, 80, proto::TCP),
                value(ct_flags::SNAT, backend, 8080, now - 300),
            ),
            // Its reply entry: no line of its own.
            (
                key(backend, 8080, [192, 168, 1, 63], 61_000, proto::TCP),
                value(ct_flags::REPLY | ct_flags::SNAT, vip, 80, now - 300),
            ),
            (key(pod, 40_000, vip, 80, proto::TCP), value(ct_flags::OPENING, backend, 8080, now)),
            (key(pod, 40_002, vip, 80, proto::TCP), value(ct_flags::CLOSING, backend, 8080, now)),
            (key(pod, 53_000, vip, 53, proto::UDP), value(0, backend, 53, now - 100)),
            // A UDP flow quiet for two minutes: dead, not listed.
            (key(pod, 53_001, vip, 53, proto::UDP), value(0, backend, 53, now - 120 * 100)),
        ];
        let flows = of_entries(&entries, now, RATE);
        let lines: Vec<_> = flows
            .iter()
            .map(|f| (f.client.as_str(), f.state, f.snat.as_deref(), f.idle_s))
            .collect();
        assert_eq!(
            lines,
            [
                ("10.244.1.5:40000", "opening", None, 0),
                ("10.244.1.5:40001", "established", Some("192.168.1.63:61000"), 3),
                ("10.244.1.5:40002", "closing", None, 0),
                ("10.244.1.5:53000", "-", None, 1),
            ]
        );
        assert_eq!(
            (flows[1].frontend.as_str(), flows[1].backend.as_str(), flows[1].protocol),
            ("10.96.45.10:80", "10.244.2.10:8080", "tcp")
        );
        assert!(table(&flows).lines().nth(2).is_some_and(|l| l.contains("192.168.1.63:61000")));
    }
}
