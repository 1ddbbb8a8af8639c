//! The kernel writer's batches: runs of upserts go into the maps in one system call each, and
//! what the maps hold afterwards is exactly what the operations, applied one by one in order,
//! would have left.

use std::collections::BTreeMap;

use lb_common::maps::{Backend, ServiceKey, ServiceValue, Slot, capacity, proto, scope};
use lb_tests::datapath::Datapath;
use lb_user::maps::{MapOp, MapWriter as _};

fn backend(n: u32) -> Backend {
    Backend {
        ip_be: (0x0af4_0000 + n).to_be(),
        port_be: 8080u16.to_be(),
        proto: proto::TCP,
        flags: 0,
    }
}

fn service_key(n: u32) -> ServiceKey {
    ServiceKey {
        vip_be: (0x0a60_0000 + n).to_be(),
        port_be: 80u16.to_be(),
        proto: proto::TCP,
        scope: scope::EXTERNAL,
    }
}

#[test]
fn batched_runs_leave_what_single_writes_would() {
    let mut datapath = Datapath::load();
    let services = 3_000u32;
    let mut ops = Vec::new();
    ops.extend((0..2 * services).map(|id| MapOp::UpsertBackend { id, backend: backend(id) }));
    // Slot removals (zero writes) batch with slot upserts, in order: slot 3 is zeroed, then
    // written again below; the slot past the written ones stays zero.
    ops.push(MapOp::RemoveSlot { index: 3 });
    ops.push(MapOp::RemoveSlot { index: 2 * services });
    for service_id in 0..services {
        for slot in 0..2 {
            let backend_id = 2 * service_id + slot;
            let slot = Slot { backend_id, backend: backend(backend_id) };
            ops.push(MapOp::UpsertSlot { index: backend_id, slot });
        }
    }
    // A removal inside the runs: it must land after the upserts before it and before the
    // ones after it.
    ops.push(MapOp::RemoveBackend { id: 7 });
    ops.push(MapOp::UpsertBackend { id: 7, backend: backend(70_000) });
    ops.extend((0..services).map(|service_id| MapOp::UpsertService {
        key: service_key(service_id),
        value: ServiceValue {
            service_id,
            slot_base: 2 * service_id,
            slot_count: 2,
            affinity_timeout_s: 0,
            flags: 0,
            pad: [0; 2],
        },
    }));
    ops.push(MapOp::RemoveService { key: service_key(5) });
    datapath.maps().apply_all(&ops).expect("applying the operations");

    let maps = datapath.maps();
    let backends: BTreeMap<u32, Backend> = maps.backends().expect("backends").into_iter().collect();
    assert_eq!(backends.len(), 2 * services as usize);
    assert_eq!(backends[&7], backend(70_000), "the later upsert of 7 wins");
    assert_eq!(backends[&8], backend(8));
    let slots = maps.slots(0, 2 * services).expect("slots");
    let expected: Vec<Slot> =
        (0..2 * services).map(|id| Slot { backend_id: id, backend: backend(id) }).collect();
    assert_eq!(slots, expected, "every slot, in order");
    // The batched read of the whole array, as a restarted daemon does it.
    let array = maps.slot_array().expect("the slot array");
    assert_eq!(array.len(), capacity::BACKEND_SLOTS as usize, "every index, once");
    assert_eq!(array[..expected.len()], expected[..], "the written slots");
    assert!(array[expected.len()..].iter().all(|slot| *slot == Slot::default()), "zero beyond");
    let frontends: BTreeMap<ServiceKey, ServiceValue> =
        maps.services().expect("services").into_iter().collect();
    assert_eq!(frontends.len(), services as usize - 1, "service 5 removed after its upsert");
    assert!(!frontends.contains_key(&service_key(5)));
    assert_eq!(frontends[&service_key(42)].service_id, 42);
}
