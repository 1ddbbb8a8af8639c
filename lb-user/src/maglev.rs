//! Maglev consistent hashing (Eisenbud et al., "Maglev: A Fast and Reliable Software Network Load
//! Balancer", NSDI 2016, section 3.4) for a service's backend slots.
//!
//! The datapath picks slot `flow_hash % slot_count` of a frontend (`lb_common::maps::Slot`). Filled
//! with one entry per backend, any change of the backend set reshuffles almost every flow, and two
//! nodes that saw the backends in a different order disagree. Filled with a Maglev table instead,
//! the slots depend only on the set of backend names, so every node picks the same backend for a
//! flow (a flow that moves between nodes after an ECMP change keeps its backend), and adding or
//! removing one backend moves little more than that backend's own share of the flows.

use twox_hash::XxHash64;

/// The table size unless configured otherwise: a prime (section 3.4 needs `M` prime so that every
/// `skip` generates a full permutation), and Cilium's default. Section 3.4 takes `M > 100 * N` for
/// at most 1% imbalance between backends' shares of the hash space, so this fits services of up
/// to about 160 backends; larger ones want a larger [`RECOMMENDED_TABLE_SIZES`] entry.
pub const DEFAULT_TABLE_SIZE: u32 = 16_381;

/// Smallest accepted size: below it a table cannot be much larger than its backend set.
pub const MIN_TABLE_SIZE: u32 = 251;

/// Largest accepted size (`2^17 - 1`): each entry is one `BACKEND_SLOTS` element, and that map is
/// shared by every service.
pub const MAX_TABLE_SIZE: u32 = 131_071;

/// The sizes to offer in configuration: the largest prime below each power of two from `2^8` to
/// `2^17` (Cilium's list). Any prime in [`MIN_TABLE_SIZE`]`..=`[`MAX_TABLE_SIZE`] is accepted.
pub const RECOMMENDED_TABLE_SIZES: [u32; 10] =
    [251, 509, 1_021, 2_039, 4_093, 8_191, 16_381, 32_749, 65_521, 131_071];

/// Seed of `h1`, which picks where a backend's permutation starts.
const OFFSET_SEED: u64 = 0;

/// Seed of `h2`, which picks the stride of a backend's permutation. It differs from
/// [`OFFSET_SEED`] so that offset and skip are independent, as section 3.4 asks.
const SKIP_SEED: u64 = 1;

/// Marks an entry no backend has claimed yet while the table is populated.
const UNCLAIMED: u32 = u32::MAX;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error(
        "Maglev table size {size} is not a prime in {min}..={max} (recommended: {recommended:?})",
        min = MIN_TABLE_SIZE,
        max = MAX_TABLE_SIZE,
        recommended = RECOMMENDED_TABLE_SIZES
    )]
    InvalidTableSize { size: u32 },

    #[error("{backends} backends do not fit a Maglev table of {size} entries")]
    TooManyBackends { backends: usize, size: u32 },
}

/// Whether `size` can be a Maglev table size: a prime (section 3.4) within
/// [`MIN_TABLE_SIZE`]`..=`[`MAX_TABLE_SIZE`].
pub fn is_valid_table_size(size: u32) -> bool {
    (MIN_TABLE_SIZE..=MAX_TABLE_SIZE).contains(&size) && is_prime(size)
}

/// Validates a configured table size, so that a bad setting fails at start-up rather than at the
/// first service.
pub fn check_table_size(size: u32) -> Result<u32> {
    if is_valid_table_size(size) { Ok(size) } else { Err(Error::InvalidTableSize { size }) }
}

/// Builds the Maglev lookup table of `size` entries for `backends`: entry `i` is the index into
/// `backends` of the backend that owns slot `i`. No backends give an empty table.
///
/// `backends` are stable names, the same string on every node (e.g. `"10.244.1.10:80"`). The table
/// depends only on the set of names: their order does not matter, and a duplicate name counts once
/// (its first index is returned). Every backend owns `size / n` or `size / n + 1` entries.
pub fn table(backends: &[impl AsRef<str>], size: u32) -> Result<Vec<u32>> {
    let size = check_table_size(size)?;
    let unique = unique_backends(backends, size)?;
    if unique.is_empty() {
        // `populate` would wait forever for a backend to claim the first entry.
        return Ok(Vec::new());
    }
    let mut permutations: Vec<Permutation> =
        unique.iter().map(|&(name, _)| Permutation::new(name, size)).collect();
    let owners = populate(&mut permutations, size);
    Ok(owners.into_iter().map(|owner| unique[owner as usize].1).collect())
}

/// The backends sorted by name with duplicates dropped, each with its first index in `backends`.
/// Sorting makes the population order, and so the table, independent of the caller's order.
fn unique_backends<S: AsRef<str>>(backends: &[S], size: u32) -> Result<Vec<(&str, u32)>> {
    let too_many = || Error::TooManyBackends { backends: backends.len(), size };
    let mut named = backends
        .iter()
        .enumerate()
        .map(|(index, backend)| {
            Ok((backend.as_ref(), u32::try_from(index).map_err(|_| too_many())?))
        })
        .collect::<Result<Vec<_>>>()?;
    // Sorting by (name, index) puts a name's first occurrence first; `dedup` keeps that one.
    named.sort_unstable();
    named.dedup_by_key(|&mut (name, _)| name);
    // With more backends than entries some would own nothing: refuse rather than drop them.
    if named.len() > size as usize {
        return Err(too_many());
    }
    Ok(named)
}

/// One backend's preference list over the table entries (section 3.4):
/// `permutation[j] = (offset + j * skip) mod M`, walked one entry at a time.
struct Permutation {
    size: u32,
    skip: u32,
    next: u32,
}

impl Permutation {
    /// `offset = h1(name) mod M`, `skip = h2(name) mod (M - 1) + 1`. As `M` is prime and
    /// `1 <= skip < M`, the walk visits every entry exactly once in `M` steps.
    fn new(name: &str, size: u32) -> Self {
        let offset = reduce(XxHash64::oneshot(OFFSET_SEED, name.as_bytes()), size);
        let skip = reduce(XxHash64::oneshot(SKIP_SEED, name.as_bytes()), size - 1) + 1;
        Self { size, skip, next: offset }
    }

    /// The backend's next preferred entry.
    fn advance(&mut self) -> usize {
        let entry = self.next;
        // Both terms are below `MAX_TABLE_SIZE` (2^17), so the sum cannot overflow.
        self.next = (self.next + self.skip) % self.size;
        entry as usize
    }
}

/// `hash mod modulus`, taken on all 64 bits of the hash as the paper's `h(name) mod M` is.
#[expect(clippy::cast_possible_truncation, reason = "the remainder is below `modulus`, a u32")]
fn reduce(hash: u64, modulus: u32) -> u32 {
    (hash % u64::from(modulus)) as u32
}

/// The population loop of section 3.4 (Pseudocode 1): backends take turns, each claiming its most
/// preferred entry that is still free, until every entry is claimed. Taking turns is what bounds
/// the imbalance: every full round gives each backend exactly one entry, so shares differ by at
/// most one. Returns, for each entry, the index of its owner in `permutations`.
fn populate(permutations: &mut [Permutation], size: u32) -> Vec<u32> {
    let mut owners = vec![UNCLAIMED; size as usize];
    let mut claimed = 0;
    loop {
        for (backend, permutation) in (0..).zip(permutations.iter_mut()) {
            let entry = next_unclaimed(permutation, &owners);
            owners[entry] = backend;
            claimed += 1;
            if claimed == owners.len() {
                return owners;
            }
        }
    }
}

/// Walks `permutation` to its first unclaimed entry. It finds one within `M` steps because the
/// permutation covers every entry and the caller stops once all are claimed.
fn next_unclaimed(permutation: &mut Permutation, owners: &[u32]) -> usize {
    loop {
        let entry = permutation.advance();
        if owners[entry] == UNCLAIMED {
            return entry;
        }
    }
}

/// Trial division: sizes are at most [`MAX_TABLE_SIZE`], so at most ~180 divisions.
fn is_prime(n: u32) -> bool {
    if n < 4 {
        return n >= 2;
    }
    if n.is_multiple_of(2) {
        return false;
    }
    (3..)
        .step_by(2)
        .take_while(|divisor| divisor * divisor <= n)
        .all(|divisor| !n.is_multiple_of(divisor))
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: u32 = DEFAULT_TABLE_SIZE;

    fn names(count: usize) -> Vec<String> {
        (0..count).map(|i| format!("10.244.{}.{}:80", i / 250, i % 250 + 1)).collect()
    }

    fn build(backends: &[String], size: u32) -> Vec<u32> {
        table(backends, size).expect("valid table size and backends")
    }

    /// The table as backend names, to compare tables built from different slices.
    fn by_name(backends: &[String], size: u32) -> Vec<String> {
        build(backends, size).into_iter().map(|index| backends[index as usize].clone()).collect()
    }

    fn shares(table: &[u32], backends: usize) -> Vec<u32> {
        let mut shares = vec![0; backends];
        for &index in table {
            shares[index as usize] += 1;
        }
        shares
    }

    /// A fixed Fisher-Yates shuffle (xorshift64), so the test needs no random crate and
    /// reproduces exactly.
    fn shuffled(backends: &[String], mut state: u64) -> Vec<String> {
        let mut out = backends.to_vec();
        for i in (1..out.len()).rev() {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let j = usize::try_from(state % (i as u64 + 1)).expect("below the slice length");
            out.swap(i, j);
        }
        out
    }

    fn changed(before: &[String], after: &[String]) -> Vec<usize> {
        (0..before.len()).filter(|&i| before[i] != after[i]).collect()
    }

    #[test]
    fn table_has_size_entries_all_valid() {
        for (count, size) in [(1, 251), (3, 251), (10, M), (100, 65_521)] {
            let backends = names(count);
            let table = build(&backends, size);
            assert_eq!(table.len(), size as usize, "{count} backends, size {size}");
            assert!(
                table.iter().all(|&index| (index as usize) < count),
                "an index out of range with {count} backends"
            );
        }
    }

    #[test]
    fn no_backends_give_an_empty_table() {
        let none: [&str; 0] = [];
        assert_eq!(table(&none, M), Ok(Vec::new()));
    }

    #[test]
    fn one_backend_owns_every_entry() {
        assert_eq!(table(&["10.244.1.10:80"], M), Ok(vec![0; M as usize]));
    }

    #[test]
    fn duplicates_count_once_and_return_the_first_index() {
        let backends = ["b:80", "a:80", "b:80", "a:80"];
        let table = table(&backends, 251).expect("valid");
        assert!(table.iter().all(|&index| index == 0 || index == 1));
        assert_eq!(table, super::table(&["b:80", "a:80"], 251).expect("valid"));
    }

    #[test]
    fn shares_differ_by_at_most_one() {
        for count in [2, 3, 10, 100] {
            let backends = names(count);
            let shares = shares(&build(&backends, M), count);
            let floor = M / u32::try_from(count).expect("small");
            let ceil = M.div_ceil(u32::try_from(count).expect("small"));
            assert!(
                shares.iter().all(|share| (floor..=ceil).contains(share)),
                "{count} backends: shares {shares:?} outside {floor}..={ceil}"
            );
        }
    }

    #[test]
    fn input_order_does_not_matter() {
        let backends = names(10);
        let reference = by_name(&backends, M);
        let mut reversed = backends.clone();
        reversed.reverse();
        assert_eq!(by_name(&reversed, M), reference, "reversed input");
        for seed in [1, 42, 0x9e37_79b9_7f4a_7c15] {
            assert_eq!(
                by_name(&shuffled(&backends, seed), M),
                reference,
                "shuffled with seed {seed:#x}"
            );
        }
    }

    #[test]
    fn removing_a_backend_moves_few_other_entries() {
        let backends = names(10);
        let before = by_name(&backends, M);
        for removed in 0..backends.len() {
            let mut rest = backends.clone();
            let gone = rest.remove(removed);
            let after = by_name(&rest, M);
            let moved_others =
                changed(&before, &after).into_iter().filter(|&i| before[i] != gone).count();
            let others = before.iter().filter(|&name| *name != gone).count();
            // The paper's evaluation reports a few percent at most; 0.4 to 0.7% move here.
            assert!(
                moved_others * 50 < others,
                "removing {gone}: {moved_others} of {others} entries of other backends moved"
            );
        }
    }

    #[test]
    fn adding_a_backend_moves_about_its_share() {
        let backends = names(11);
        let before = by_name(&backends[..10], M);
        let after = by_name(&backends, M);
        let moved = changed(&before, &after).len();
        let new_share = after.iter().filter(|&name| *name == backends[10]).count();
        // The new backend takes M/11 entries (balance); anything beyond that is churn among the
        // old backends, which must stay small (80 entries, 0.5%, here).
        assert!(new_share >= (M / 11) as usize, "new backend owns {new_share}");
        assert!(
            (moved - new_share) * 50 < M as usize,
            "{moved} entries moved, {new_share} of them to the new backend"
        );
    }

    /// Pins the output so that a change of hash function, seed or population order, which would
    /// make nodes running different versions disagree, fails here.
    #[test]
    fn golden_table() {
        let backends = ["10.244.1.10:80", "10.244.2.11:80", "10.244.3.12:80"];
        let table = table(&backends, M).expect("valid");
        assert_eq!(table[..16], [1, 0, 2, 1, 1, 0, 1, 0, 2, 1, 1, 2, 0, 2, 2, 1]);
    }

    /// XXH64's published test vector, so the golden table's hash is known to be the real XXH64.
    #[test]
    fn hash_is_xxh64() {
        assert_eq!(XxHash64::oneshot(0, b""), 0xef46_db37_51d8_e999);
    }

    #[test]
    fn table_size_validation() {
        for size in [251, 16_381, 65_521, 131_071] {
            assert!(is_valid_table_size(size), "{size} should be valid");
        }
        for size in [0, 1, 2, 250, 16_384, 131_101, u32::MAX] {
            assert!(!is_valid_table_size(size), "{size} should be invalid");
        }
        assert!(RECOMMENDED_TABLE_SIZES.iter().all(|&size| is_valid_table_size(size)));
        assert!(RECOMMENDED_TABLE_SIZES.contains(&DEFAULT_TABLE_SIZE));
        assert_eq!(check_table_size(16_381), Ok(16_381));
        assert_eq!(table(&["a:80"], 16_384), Err(Error::InvalidTableSize { size: 16_384 }));
    }

    #[test]
    fn more_backends_than_entries_is_an_error() {
        let backends = names(252);
        assert_eq!(table(&backends, 251), Err(Error::TooManyBackends { backends: 252, size: 251 }));
    }

    #[test]
    fn is_prime_matches_a_sieve() {
        let limit = 2_000;
        let mut composite = vec![false; limit + 1];
        for i in 2..=limit {
            for multiple in (i * i..=limit).step_by(i) {
                composite[multiple] = true;
            }
        }
        for (n, &composite) in (0u32..).zip(&composite) {
            assert_eq!(is_prime(n), n >= 2 && !composite, "{n}");
        }
    }
}
