//! `flows`: the translated connections the datapath tracks, read from the pinned conntrack map,
//! as `conntrack -L` shows kube-proxy's: client, the frontend it spoke to, the backend it was
//! sent to, the source it was masqueraded to, TCP state and idle time. One line per flow, from
//! its forward entry; from its reply entry when that is the only one left (the forward entry
//! evicted, or expired first: only the client's packets refresh it), which the line says, since
//! the client's next packet would then start a new flow.

use std::{collections::HashSet, fmt::Write as _};

use lb_common::{
    conntrack::{is_live, twin_key},
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
    /// The address and port the client's source became (the node's, or the client's own with
    /// another port where another flow held its reply tuple); `None` if not masqueraded.
    pub snat: Option<String>,
    /// TCP: `opening`, `established`, `half-closed` or `closing`; other protocols: `-`.
    pub state: &'static str,
    /// Seconds since a packet last refreshed the entry (refreshes are at most once a second).
    pub idle_s: u64,
    /// Only the reply entry is left: replies are still translated, the client's packets are not
    /// recognised.
    pub reply_only: bool,
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
    let live: Vec<_> = entries
        .iter()
        .filter(|(key, value)| is_live(value, key.proto, now, jiffies_per_second))
        .collect();
    let forward_keys: HashSet<ConntrackKey> = live
        .iter()
        .filter(|(_, value)| value.flags & ct_flags::REPLY == 0)
        .map(|(key, _)| *key)
        .collect();
    let age = |value: &ConntrackValue| {
        now.saturating_sub(value.last_seen) / u64::from(jiffies_per_second.max(1))
    };
    let mut flows: Vec<(ConntrackKey, Flow)> = live
        .iter()
        .filter_map(|(key, value)| {
            let masqueraded = value.flags & ct_flags::SNAT != 0;
            if value.flags & ct_flags::REPLY == 0 {
                let backend = (value.translated_ip_be, value.translated_port_be);
                let snat = masqueraded.then_some((value.nat_ip_be, value.nat_port_be));
                return Some((*key, flow(key, value, backend, snat, age(value), false)));
            }
            let forward = twin_key(key, value);
            if forward_keys.contains(&forward) {
                return None;
            }
            // A reply entry's source is the backend; its destination, the SNAT address if any.
            let backend = (key.src_ip_be, key.src_port_be);
            let snat = masqueraded.then_some((key.dst_ip_be, key.dst_port_be));
            Some((forward, flow(&forward, value, backend, snat, age(value), true)))
        })
        .collect();
    flows.sort_by_key(|(key, _)| {
        let order = |ip_be: u32, port_be: u16| (u32::from_be(ip_be), u16::from_be(port_be));
        (order(key.src_ip_be, key.src_port_be), order(key.dst_ip_be, key.dst_port_be))
    });
    flows.into_iter().map(|(_, flow)| flow).collect()
}

/// The flow whose forward tuple is `forward` (client -> frontend), from one of its entries.
fn flow(
    forward: &ConntrackKey,
    entry: &ConntrackValue,
    (backend_ip_be, backend_port_be): (u32, u16),
    snat: Option<(u32, u16)>,
    idle_s: u64,
    reply_only: bool,
) -> Flow {
    let state = if forward.proto == proto::TCP {
        lb_common::conntrack::tcp_state(entry).name()
    } else {
        "-"
    };
    Flow {
        protocol: protocol_name(forward.proto),
        client: endpoint(forward.src_ip_be, forward.src_port_be),
        frontend: endpoint(forward.dst_ip_be, forward.dst_port_be),
        backend: endpoint(backend_ip_be, backend_port_be),
        snat: snat.map(|(ip_be, port_be)| endpoint(ip_be, port_be)),
        state,
        idle_s,
        reply_only,
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
        let state = if f.reply_only { format!("{}*", f.state) } else { f.state.to_owned() };
        let _ = writeln!(
            out,
            "{:<5} {:<21} {:<21} {:<21} {snat:<21} {state:<11} {:>6}",
            f.protocol, f.client, f.frontend, f.backend, f.idle_s
        );
    }
    if flows.iter().any(|f| f.reply_only) {
        out.push_str("* reply entry only: the client's next packet would start a new flow\n");
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
            opening: 0,
            closing: 0,
        }
    }

    /// The reply entry of a flow from `client` masqueraded to the SNAT address: its NAT fields
    /// hold the original client.
    fn masqueraded_reply(
        vip: [u8; 4],
        client: [u8; 4],
        port: u16,
        last_seen: u64,
    ) -> ConntrackValue {
        let mut reply = value(ct_flags::REPLY | ct_flags::SNAT, vip, 80, last_seen);
        reply.nat_ip_be = u32::from(Ipv4Addr::from(client)).to_be();
        reply.nat_port_be = port.to_be();
        reply
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
            // Its reply entry (whose NAT fields hold the original client): no line of its own.
            (
                key(backend, 8080, [192, 168, 1, 63], 61_000, proto::TCP),
                masqueraded_reply(vip, pod, 40_001, now - 300),
            ),
            (
                key(pod, 40_000, vip, 80, proto::TCP),
                ConntrackValue { opening: 1, ..value(0, backend, 8080, now) },
            ),
            (
                key(pod, 40_002, vip, 80, proto::TCP),
                ConntrackValue { closing: 1, ..value(0, backend, 8080, now) },
            ),
            (
                key(pod, 40_003, vip, 80, proto::TCP),
                ConntrackValue { closing: 2, ..value(0, backend, 8080, now) },
            ),
            // Marked by a version before the state bytes, with flag bits.
            (key(pod, 40_004, vip, 80, proto::TCP), value(ct_flags::CLOSING, backend, 8080, now)),
            (key(pod, 40_005, vip, 80, proto::TCP), value(ct_flags::OPENING, backend, 8080, now)),
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
                ("10.244.1.5:40003", "half-closed", None, 0),
                ("10.244.1.5:40004", "closing", None, 0),
                ("10.244.1.5:40005", "opening", None, 0),
                ("10.244.1.5:53000", "-", None, 1),
            ]
        );
        assert_eq!(
            (flows[1].frontend.as_str(), flows[1].backend.as_str(), flows[1].protocol),
            ("10.96.45.10:80", "10.244.2.10:8080", "tcp")
        );
        assert!(table(&flows).lines().nth(2).is_some_and(|l| l.contains("192.168.1.63:61000")));
        assert!(flows.iter().all(|f| !f.reply_only));
    }

    #[test]
    fn a_reply_entry_whose_forward_entry_is_gone_stands_for_its_flow() {
        let now = 1_000_000;
        let (pod, vip, backend) = ([10, 244, 1, 5], [10, 96, 45, 10], [10, 244, 2, 10]);
        let node = [192, 168, 1, 63];
        let entries = [
            (key(backend, 8080, pod, 40_003, proto::TCP), value(ct_flags::REPLY, vip, 80, now)),
            // Masqueraded: the reply entry's destination is the SNAT address.
            (
                key(backend, 8080, node, 61_001, proto::TCP),
                masqueraded_reply(vip, pod, 40_004, now - 200),
            ),
        ];
        let flows = of_entries(&entries, now, RATE);
        let expected = |port: u16, snat: Option<&str>, idle_s| Flow {
            protocol: "tcp",
            client: format!("10.244.1.5:{port}"),
            frontend: "10.96.45.10:80".into(),
            backend: "10.244.2.10:8080".into(),
            snat: snat.map(str::to_owned),
            state: "established",
            idle_s,
            reply_only: true,
        };
        assert_eq!(
            flows,
            [expected(40_003, None, 0), expected(40_004, Some("192.168.1.63:61001"), 2)]
        );
        let text = table(&flows);
        assert!(text.contains("established*"), "{text}");
        assert!(
            text.ends_with("* reply entry only: the client's next packet would start a new flow\n")
        );
    }
}
