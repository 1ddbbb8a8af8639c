//! What one cache miss costs on this machine: the yardstick for the first-packet figures, which
//! are a handful of dependent misses into large kernel tables (conntrack, frontends, slots).

use std::{hint::black_box, time::Instant};

use lb_tests::rng::Rng;

/// Bytes walked: far beyond the last-level cache and the TLB's reach with 4 KiB pages (the
/// kernel's large maps are `vmalloc`ed in 4 KiB pages), about the size of a conntrack map of 2M
/// entries.
const SPAN: usize = 256 << 20;
const STEPS: u32 = 5_000_000;

/// One cache line, holding the index of the next line to visit.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Line {
    next: u32,
}

/// ns per load of a random pointer chase over [`SPAN`] bytes, one load per cache line: each
/// address comes from the previous load, so no two misses overlap, as in a chain of lookups.
pub fn dependent_miss_ns() -> f64 {
    let count = SPAN / std::mem::size_of::<Line>();
    let mut lines = vec![Line { next: 0 }; count];
    // Sattolo's shuffle: one random cycle through every line.
    let mut order: Vec<u32> = (0..u32::try_from(count).expect("lines fit u32")).collect();
    let mut rng = Rng(0x6d65_6d6f_7279);
    for i in (1..count).rev() {
        order.swap(i, rng.below(i));
    }
    for (line, next) in lines.iter_mut().zip(&order) {
        line.next = *next;
    }
    let walk = |steps: u32| {
        let mut at = 0usize;
        for _ in 0..steps {
            at = lines[at].next as usize;
        }
        black_box(at)
    };
    walk(STEPS / 10);
    let started = Instant::now();
    walk(STEPS);
    started.elapsed().as_secs_f64() * 1e9 / f64::from(STEPS)
}
