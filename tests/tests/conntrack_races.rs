//! Two CPUs opening flows at the same time over one expired conntrack entry under their reply
//! tuple: exactly one takes it over (the programs' compare-and-swap claim), as when they come
//! one after the other. A binary of its own: beside other tests, the two threads of a race
//! share the CPUs with them and seldom run side by side.

use std::sync::{Mutex, MutexGuard, PoisonError};

use lb_common::maps::{ConntrackKey, ConntrackValue, NodeConfig, ct_flags, proto};
use lb_tests::{
    datapath::{Datapath, Hook, RaceRound},
    fixtures::{EXTERNAL_CLIENT, POD, seeded},
    node::{NODE_IP, SNAT_PORT_MAX, SNAT_PORT_MIN, node_config},
    packets::{Spec, endpoints},
    services::Frontend,
};
use lb_user::maps::{KernelMaps, MapOp, ip_be};

fn addr(text: &str) -> std::net::Ipv4Addr {
    text.parse().expect("address")
}

/// Taken by each test for its whole length: another test's work beside a race (loading the
/// programs is a second of the verifier's time) takes a CPU from its two threads, which then
/// seldom run side by side.
fn one_at_a_time() -> MutexGuard<'static, ()> {
    static TURN: Mutex<()> = Mutex::new(());
    TURN.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Rounds of two new flows opened at the same time over one expired reply entry. Without the
/// claim (`conntrack::claim`), both flows took the entry within the first ten rounds, in each
/// of three runs of each test on a 2-CPU VM.
const RACE_ROUNDS: u32 = 200;

/// Two new flows opened at the same time, [`RACE_ROUNDS`] times, over one expired entry under
/// their reply tuple.
struct ExpiredEntryRace {
    /// The two flows' forward entries, removed before each round.
    forward_keys: [ConntrackKey; 2],
    /// Where `stale` is written before each round.
    reply_key: ConntrackKey,
    stale: ConntrackValue,
}

impl ExpiredEntryRace {
    /// Runs the rounds, the two flows' first `packets` through `hook`; returns each round's
    /// two runs and the entry it left under the reply tuple.
    fn run(
        &self,
        datapath: &mut Datapath,
        hook: Hook,
        packets: &[Vec<u8>; 2],
    ) -> Vec<(RaceRound, ConntrackValue)> {
        let read = |maps: &KernelMaps| {
            maps.conntrack_entry(&self.reply_key).expect("read the reply entry")
        };
        // Each read before the next round writes the stale entry: the first before any round.
        let mut left = Vec::new();
        let race = datapath.race(hook, [&packets[0], &packets[1]], RACE_ROUNDS, |maps| {
            left.push(read(maps));
            maps.remove_conntrack(&self.forward_keys).expect("remove the last round's flows");
            maps.write_conntrack(&self.reply_key, &self.stale).expect("the expired flow");
        });
        left.push(read(datapath.maps()));
        // Two runs one after the other would pass without the claim.
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        assert!(cpus < 2 || race.overlapped > 0, "no round ran the two flows at the same time");
        eprintln!("{} of {RACE_ROUNDS} rounds overlapped", race.overlapped);
        let left = left.into_iter().skip(1).map(|entry| entry.expect("an entry after a round"));
        race.rounds.into_iter().zip(left).collect()
    }
}

/// An expired reply entry: `template`'s, last refreshed a day ago (past every timeout).
fn expired(template: ConntrackValue) -> ConntrackValue {
    let day = 86_400 * u64::from(lb_user::clock::jiffies_per_second());
    let now = lb_user::clock::jiffies_now().expect("jiffies");
    ConntrackValue { last_seen: now - day, flags: ct_flags::REPLY | template.flags, ..template }
}

/// Two clients open flows to a NodePort at the same time, on two CPUs, and the one SNAT port
/// there is held by an expired flow: one of them takes it, the other is refused it. (Both
/// taking it would send the first one's replies to the second client.) The same when the
/// expired flow is the first client's own earlier one (same source port): taking its own entry
/// back, it claims it too.
#[test]
fn of_two_flows_that_find_one_expired_snat_port_at_once_one_takes_it() {
    let _turn = one_at_a_time();
    let mut datapath = seeded();
    race_for_one_expired_snat_port(&mut datapath, None);
    race_for_one_expired_snat_port(&mut datapath, Some(0));
}

/// Two clients' SYNs to a NodePort whose SNAT range is one port, held by an expired flow (of
/// client `owner`, from the same source port, or of a third client), raced [`RACE_ROUNDS`]
/// times: in every round exactly one takes the port, and its reply entry is the one left.
fn race_for_one_expired_snat_port(datapath: &mut Datapath, owner: Option<usize>) {
    let port = SNAT_PORT_MIN;
    datapath.apply(&[MapOp::SetNodeConfig(NodeConfig { snat_port_max: port, ..node_config() })]);
    let clients = ["203.0.113.20", "203.0.113.21"];
    let syns = clients.map(|client| Spec::tcp(client, 40_000, NODE_IP, 30380).build());
    let forward_keys = clients.map(|client| {
        let (client, node) = (ip_be(addr(client)), ip_be(addr(NODE_IP)));
        ConntrackKey::new(client, node, 40_000u16.to_be(), 30380u16.to_be(), proto::TCP)
    });
    let (backend, node) = (ip_be(addr("10.244.2.11")), ip_be(addr(NODE_IP)));
    let reply_key = ConntrackKey::new(backend, node, 80u16.to_be(), port.to_be(), proto::TCP);
    let stale = expired(ConntrackValue {
        flags: ct_flags::SNAT,
        service_id: 3,
        translated_ip_be: node,
        translated_port_be: 30380u16.to_be(),
        nat_ip_be: ip_be(addr(owner.map_or(EXTERNAL_CLIENT, |owner| clients[owner]))),
        nat_port_be: if owner.is_some() { 40_000u16 } else { 39_999 }.to_be(),
        ..ConntrackValue::default()
    });
    let race = ExpiredEntryRace { forward_keys, reply_key, stale };
    for (round, (runs, holder)) in race.run(datapath, Hook::Xdp, &syns).iter().enumerate() {
        let codes = runs.each_ref().map(|(code, _)| *code);
        let taken: Vec<usize> = (0..2).filter(|&i| codes[i] == Hook::Xdp.forward_code()).collect();
        assert_eq!(taken.len(), 1, "round {round}: one flow takes the port: {codes:?}");
        let other = 1 - taken[0];
        assert_eq!(codes[other], Hook::Xdp.drop_code(), "round {round}: the other is refused");
        let ((_, snat_port), _) = endpoints(&runs[taken[0]].1);
        assert_eq!(snat_port, port, "round {round}");
        assert_eq!(
            holder.nat_ip_be,
            ip_be(addr(clients[taken[0]])),
            "round {round}: replies to it"
        );
    }
}

/// One client socket opens flows to two frontends of one backend at the same time, on two
/// CPUs, over an expired reply entry under their shared reply tuple: one flow takes the tuple,
/// the other a new source port, as when they come one after the other. (Both taking it would
/// send the first one's replies from the second's frontend.)
#[test]
fn of_two_flows_that_find_one_expired_reply_tuple_at_once_one_takes_it() {
    let _turn = one_at_a_time();
    let mut datapath = seeded();
    let vips = ["10.96.9.1", "10.96.9.2"];
    for (id, vip) in [(901, vips[0]), (902, vips[1])] {
        datapath
            .apply(&Frontend::new(id, vip, 53, proto::UDP).backend("10.244.1.15", 53, true).ops());
    }
    let queries = vips.map(|vip| Spec::udp(POD, 5353, vip, 53).build());
    let (pod, backend) = (ip_be(addr(POD)), ip_be(addr("10.244.1.15")));
    let forward_keys = vips.map(|vip| {
        ConntrackKey::new(pod, ip_be(addr(vip)), 5353u16.to_be(), 53u16.to_be(), proto::UDP)
    });
    let reply_key = ConntrackKey::new(backend, pod, 53u16.to_be(), 5353u16.to_be(), proto::UDP);
    let stale = expired(ConntrackValue {
        service_id: 2,
        translated_ip_be: ip_be(addr("10.96.0.10")),
        translated_port_be: 53u16.to_be(),
        ..ConntrackValue::default()
    });
    let race = ExpiredEntryRace { forward_keys, reply_key, stale };
    for (round, (runs, holder)) in race.run(&mut datapath, Hook::Tc, &queries).iter().enumerate() {
        let codes = runs.each_ref().map(|(code, _)| *code);
        assert_eq!(codes, [Hook::Tc.forward_code(); 2], "round {round}: both translated");
        let ports = runs.each_ref().map(|(_, output)| endpoints(output).0.1);
        let kept: Vec<usize> = (0..2).filter(|&i| ports[i] == 5353).collect();
        assert_eq!(kept.len(), 1, "round {round}: one flow keeps its port: {ports:?}");
        let moved = ports[1 - kept[0]];
        assert!((SNAT_PORT_MIN..=SNAT_PORT_MAX).contains(&moved), "round {round}: {moved}");
        let frontend = ip_be(addr(vips[kept[0]]));
        assert_eq!(holder.translated_ip_be, frontend, "round {round}: its replies from it");
    }
}
