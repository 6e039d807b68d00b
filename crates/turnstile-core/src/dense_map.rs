//! [`DenseMap`]: a hash map for tables of a million entries that must stay small and steady in
//! memory (the coordinator's leases and semaphores).
//!
//! A standard hash map keeps its entries in its bucket array. At a million 64-byte entries that
//! array has 2^21 buckets (130 MiB, all of it touched, at 48% load), and when it doubles, the
//! old 65 MiB copy is freed in one piece, which the allocator may keep resident for a while.
//! Here the entries sit densely in chunks of [`CHUNK`] entries that are never moved or
//! reallocated (64 KiB each for the lease table), and the hash table only holds their `u32`
//! positions (5 bytes a bucket with its control byte). At a million leases that is 61 MiB of
//! entries plus a 10 MiB index, and growing frees nothing larger than the old index.
//!
//! Removal moves the last entry into the hole (and points its index slot at the new position),
//! so the entries stay dense and a chunk is freed as soon as the tail leaves it. Iteration
//! walks the positions in order; that order depends on the history of inserts and removals,
//! and nothing may rely on it.

use std::borrow::Borrow;
use std::hash::{BuildHasher, Hash};

/// log2 of [`CHUNK`].
const CHUNK_BITS: u32 = 10;
/// Entries per chunk: small enough that the empty tail of the last chunk costs little, large
/// enough that the list of chunks is tiny (a thousand pointers for a million entries).
const CHUNK: usize = 1 << CHUNK_BITS;

/// A hash map with dense, never-moving entry storage and an index of positions (see the
/// module doc). Hashed with foldhash, seeded at random per map, like the coordinator's other
/// maps.
pub(crate) struct DenseMap<K, V> {
    hasher: foldhash::fast::RandomState,
    /// Positions of the entries, hashed by their keys.
    index: hashbrown::HashTable<u32>,
    /// The entries: position `p` is `chunks[p / CHUNK][p % CHUNK]`. Every chunk before the one
    /// holding the last entry is full; after it there is at most one empty spare, so that
    /// inserts and removals around a chunk boundary do not allocate and free in turn.
    chunks: Vec<Vec<(K, V)>>,
    len: usize,
}

impl<K, V> Default for DenseMap<K, V> {
    fn default() -> Self {
        DenseMap {
            hasher: foldhash::fast::RandomState::default(),
            index: hashbrown::HashTable::new(),
            chunks: Vec::new(),
            len: 0,
        }
    }
}

impl<K: std::fmt::Debug, V: std::fmt::Debug> std::fmt::Debug for DenseMap<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map()
            .entries(self.chunks.iter().flatten().map(|(k, v)| (k, v)))
            .finish()
    }
}

/// The entry at `pos`, which must be below the map's length.
#[inline]
fn at<K, V>(chunks: &[Vec<(K, V)>], pos: u32) -> &(K, V) {
    let pos = pos as usize;
    &chunks[pos >> CHUNK_BITS][pos & (CHUNK - 1)]
}

impl<K: Hash + Eq, V> DenseMap<K, V> {
    /// Number of entries.
    #[inline]
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Entries the index holds before it must grow.
    pub(crate) fn capacity(&self) -> usize {
        self.index.capacity()
    }

    #[inline]
    fn position<Q: Hash + Eq + ?Sized>(&self, key: &Q) -> Option<u32>
    where
        K: Borrow<Q>,
    {
        // `Borrow` promises that `key` hashes as the stored key does.
        let hash = self.hasher.hash_one(key);
        let chunks = &self.chunks;
        self.index
            .find(hash, |&p| at(chunks, p).0.borrow() == key)
            .copied()
    }

    /// The entries' values, in the order of [`iter`](DenseMap::iter).
    pub(crate) fn values(&self) -> impl Iterator<Item = &V> {
        self.iter().map(|(_, v)| v)
    }

    /// The value of `key`, if present.
    #[inline]
    pub(crate) fn get<Q: Hash + Eq + ?Sized>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
    {
        self.position(key).map(|p| &at(&self.chunks, p).1)
    }

    /// The value of `key` for change, if present.
    #[inline]
    pub(crate) fn get_mut<Q: Hash + Eq + ?Sized>(&mut self, key: &Q) -> Option<&mut V>
    where
        K: Borrow<Q>,
    {
        let pos = self.position(key)? as usize;
        Some(&mut self.chunks[pos >> CHUNK_BITS][pos & (CHUNK - 1)].1)
    }

    /// Whether `key` is present.
    #[inline]
    pub(crate) fn contains_key<Q: Hash + Eq + ?Sized>(&self, key: &Q) -> bool
    where
        K: Borrow<Q>,
    {
        self.position(key).is_some()
    }

    /// Sets the value of `key`; returns the value it replaced, if any.
    #[inline]
    pub(crate) fn insert(&mut self, key: K, value: V) -> Option<V> {
        let hash = self.hasher.hash_one(&key);
        let (hasher, chunks) = (&self.hasher, &mut self.chunks);
        let pos = match self.index.entry(
            hash,
            |&p| at(chunks, p).0 == key,
            |&p| hasher.hash_one(&at(chunks, p).0),
        ) {
            hashbrown::hash_table::Entry::Occupied(slot) => {
                let p = *slot.get() as usize;
                return Some(std::mem::replace(
                    &mut chunks[p >> CHUNK_BITS][p & (CHUNK - 1)].1,
                    value,
                ));
            }
            hashbrown::hash_table::Entry::Vacant(slot) => {
                let pos = u32::try_from(self.len).expect(
                    "invariant: fewer than 2^32 entries (they would take hundreds of GiB: the \
                     allocation fails long before)",
                );
                slot.insert(pos);
                pos
            }
        };
        let chunk = pos as usize >> CHUNK_BITS;
        if chunk == chunks.len() {
            chunks.push(Vec::with_capacity(CHUNK));
        }
        // Pushed within the capacity it was made with, so the chunk never reallocates.
        chunks[chunk].push((key, value));
        self.len += 1;
        None
    }

    /// Removes `key`; returns its value, if it was present.
    #[inline]
    pub(crate) fn remove<Q: Hash + Eq + ?Sized>(&mut self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
    {
        let hash = self.hasher.hash_one(key);
        let chunks = &self.chunks;
        let slot = self
            .index
            .find_entry(hash, |&p| at(chunks, p).0.borrow() == key)
            .ok()?;
        let pos = slot.remove().0 as usize;
        let last = self.len - 1;
        let tail = self.chunks[last >> CHUNK_BITS]
            .pop()
            .expect("invariant: the chunk of the last position holds the last entry");
        self.len = last;
        let removed = if pos == last {
            tail
        } else {
            // The last entry fills the hole, and its index slot follows it.
            let moved = self.hasher.hash_one(&tail.0);
            let last = last as u32;
            let slot = self
                .index
                .find_mut(moved, |&p| p == last)
                .expect("invariant: every position below the length has one index slot");
            *slot = pos as u32;
            std::mem::replace(&mut self.chunks[pos >> CHUNK_BITS][pos & (CHUNK - 1)], tail)
        };
        // Keep one empty chunk past the used ones at most.
        let used = self.len.div_ceil(CHUNK);
        self.chunks.truncate(used + 1);
        Some(removed.1)
    }

    /// Shrinks the index to hold `min` entries (or the length, if more) and frees the spare
    /// chunk.
    pub(crate) fn shrink_to(&mut self, min: usize) {
        let (hasher, chunks) = (&self.hasher, &self.chunks);
        self.index
            .shrink_to(min, |&p| hasher.hash_one(&at(chunks, p).0));
        self.chunks.truncate(self.len.div_ceil(CHUNK));
        self.chunks.shrink_to_fit();
    }

    /// The entries, in position order (which depends on the history of the map: see the
    /// module doc).
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.chunks.iter().flatten().map(|(k, v)| (k, v))
    }

    /// The keys, in the order of [`iter`](DenseMap::iter).
    pub(crate) fn keys(&self) -> impl Iterator<Item = &K> {
        self.iter().map(|(k, _)| k)
    }
}

impl<'a, K, V> IntoIterator for &'a DenseMap<K, V> {
    type Item = (&'a K, &'a V);
    type IntoIter = std::iter::Map<
        std::iter::Flatten<std::slice::Iter<'a, Vec<(K, V)>>>,
        fn(&'a (K, V)) -> (&'a K, &'a V),
    >;

    fn into_iter(self) -> Self::IntoIter {
        self.chunks.iter().flatten().map(|(k, v)| (k, v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// Every position below the length has exactly one index slot that finds its key, the
    /// chunks are full up to the last entry, and at most one spare follows.
    fn check<V: PartialEq + std::fmt::Debug + Clone>(
        m: &DenseMap<u64, V>,
        model: &BTreeMap<u64, V>,
    ) {
        assert_eq!(m.len(), model.len());
        assert_eq!(m.index.len(), model.len());
        assert!(m.chunks.len() <= m.len().div_ceil(CHUNK) + 1);
        for (i, c) in m.chunks.iter().enumerate() {
            let expected = m.len().saturating_sub(i * CHUNK).min(CHUNK);
            assert_eq!(c.len(), expected, "chunk {i}");
            assert_eq!(c.capacity(), CHUNK, "chunk {i} was reallocated");
        }
        let mut seen: BTreeMap<u64, V> = BTreeMap::new();
        for (k, v) in m.iter() {
            assert!(seen.insert(*k, v.clone()).is_none(), "{k} listed twice");
            assert_eq!(m.get(k), Some(v));
        }
        assert_eq!(&seen, model);
    }

    #[test]
    fn insert_get_replace_remove() {
        let mut m: DenseMap<u64, &str> = DenseMap::default();
        assert_eq!(m.insert(1, "a"), None);
        assert_eq!(m.insert(2, "b"), None);
        assert_eq!(m.insert(1, "c"), Some("a"));
        assert_eq!(m.len(), 2);
        assert_eq!(m.get(&1), Some(&"c"));
        assert!(m.contains_key(&2));
        assert!(!m.contains_key(&3));
        if let Some(v) = m.get_mut(&2) {
            *v = "d";
        }
        assert_eq!(m.remove(&1), Some("c"));
        assert_eq!(m.remove(&1), None);
        assert_eq!(m.get(&1), None);
        assert_eq!(m.get(&2), Some(&"d"));
        assert_eq!(m.remove(&2), Some("d"));
        assert_eq!(m.len(), 0);
        assert_eq!(m.iter().count(), 0);
    }

    #[test]
    fn removal_moves_the_last_entry_and_keeps_it_findable() {
        let mut m: DenseMap<u64, u64> = DenseMap::default();
        let mut model = BTreeMap::new();
        for k in 0..3 * CHUNK as u64 + 5 {
            m.insert(k, k * 10);
            model.insert(k, k * 10);
        }
        check(&m, &model);
        // Holes at the front, in the middle and at the end, each filled from the tail.
        for k in [0, 1500, 3 * CHUNK as u64 + 4, 7, 2048] {
            assert_eq!(m.remove(&k), Some(k * 10));
            model.remove(&k);
            check(&m, &model);
        }
        // Iteration lists every entry once whatever the holes were.
        assert_eq!(m.keys().count(), model.len());
    }

    #[test]
    fn chunks_are_freed_as_the_map_empties_and_reused_as_it_fills() {
        let mut m: DenseMap<u64, u64> = DenseMap::default();
        let mut model = BTreeMap::new();
        let n = 4 * CHUNK as u64;
        for k in 0..n {
            m.insert(k, k);
            model.insert(k, k);
        }
        assert_eq!(m.chunks.len(), 4);
        for k in 0..n - 1 {
            m.remove(&k);
            model.remove(&k);
        }
        check(&m, &model);
        // One entry left: its chunk and one spare.
        assert_eq!(m.chunks.len(), 2);
        // In and out across a chunk boundary keeps the spare rather than freeing it.
        for k in n..n + CHUNK as u64 {
            m.insert(k, k);
            model.insert(k, k);
        }
        check(&m, &model);
        m.remove(&n);
        model.remove(&n);
        check(&m, &model);
        assert_eq!(m.chunks.len(), 2);
        m.shrink_to(0);
        check(&m, &model);
        assert_eq!(m.chunks.len(), 1);
        assert!(m.capacity() >= m.len());
    }

    #[test]
    fn random_operations_match_a_btreemap() {
        // A small deterministic generator: the sequence is the same every run.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut m: DenseMap<u64, u64> = DenseMap::default();
        let mut model = BTreeMap::new();
        for step in 0..40_000u64 {
            let r = next();
            // Keys from a small range, so that removals and replacements hit.
            let k = r % 3000;
            match (r >> 32) % 7 {
                0..=3 => assert_eq!(m.insert(k, step), model.insert(k, step)),
                4 | 5 => assert_eq!(m.remove(&k), model.remove(&k)),
                _ => {
                    if model.len() * 4 < m.capacity() {
                        m.shrink_to(model.len() * 2);
                    }
                }
            }
            if step % 997 == 0 {
                check(&m, &model);
            }
        }
        check(&m, &model);
        // Emptied completely, then refilled.
        let keys: Vec<u64> = model.keys().copied().collect();
        for k in keys {
            assert_eq!(m.remove(&k), model.remove(&k));
        }
        check(&m, &model);
        assert!(m.chunks.len() <= 1);
        m.insert(5, 5);
        model.insert(5, 5);
        check(&m, &model);
    }
}
