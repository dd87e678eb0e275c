//! The staged delta's record table: record key → stored state, hashed once per op.
//!
//! A `HashMap<Box<[u8]>, Box<[u8]>>` cost staging two things that this table does not:
//! - every record staged was hashed twice (a lookup that missed, then an insert), and
//! - growing the table (each doubling) hashed every key again, reading each key from its own
//!   heap block: a cache miss per record held. With the delta of B2/B3 growing from empty to
//!   ~200k–1M records, those rehashes were ~22% of the materializer's time (perf, B2 one
//!   writer: `foldhash::hash_bytes_long` under `reserve_rehash`).
//!
//! Here a slot keeps its key's hash, so growth never touches the keys, and a lookup that
//! misses inserts with the hash it already has. Key and state share one heap block
//! (`key ++ state`): one allocation per record instead of two, and a slot stays 32 bytes.

use std::hash::BuildHasher;

/// One record: its key's hash, and `key ++ state` in one block (`None`: an empty slot).
/// 32 bytes: two slots per cache line.
struct Slot {
    hash: u64,
    key_len: u32,
    block: Option<Box<[u8]>>,
}

impl Slot {
    const EMPTY: Slot = Slot {
        hash: 0,
        key_len: 0,
        block: None,
    };

    fn key(&self) -> &[u8] {
        self.block
            .as_deref()
            .map_or(&[], |b| &b[..self.key_len as usize])
    }

    fn state(&self) -> &[u8] {
        self.block
            .as_deref()
            .map_or(&[], |b| &b[self.key_len as usize..])
    }
}

/// Record key → stored state (see the module docs).
///
/// Open addressing with linear probing over the slots themselves, at most half full: a key's
/// first slot is a function of its hash alone, so staging can prefetch it many ops ahead
/// ([`DeltaMap::prefetch_slot`]), and a few ops ahead, with the slot in cache, find the
/// record's block and prefetch that too ([`DeltaMap::prefetch_block`]). (hashbrown's table
/// keeps its slot addresses to itself: the earlier version could only *read* ahead, which
/// stalled on each of the three dependent misses — control bytes, slot, block — as the
/// update itself would: perf put ~93% of staging's own samples on those three loads.)
#[derive(Default)]
pub(crate) struct DeltaMap {
    /// A power of two long (or empty), never more than half full.
    slots: Vec<Slot>,
    len: usize,
    /// `64 - log2(slots.len())`: a hash's first slot is its top bits after a multiply.
    shift: u32,
    hasher: foldhash::fast::RandomState,
}

/// What [`DeltaMap::update`] did.
pub(crate) enum Updated {
    /// The key was new; its state is this many bytes.
    Inserted { state_len: usize },
    /// The key was held with a state of `old` bytes, now `new` bytes.
    Replaced { old: usize, new: usize },
}

/// Asks the CPU to bring the cache line holding `p` closer (x86-64 `prefetcht0`; nothing
/// elsewhere). A prefetch is a hint: it never faults, whatever the address, and changes
/// nothing the program can observe but time.
#[allow(unsafe_code)]
#[inline(always)]
fn prefetch(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `_mm_prefetch` needs SSE, which every x86-64 CPU has; it does not dereference
    // `p` in the language's sense (no fault, no read the program sees), so any address is
    // sound.
    unsafe {
        core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(p.cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

impl DeltaMap {
    /// Records held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no record is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Room for `n` more records without growing (so slots prefetched stay where they are).
    pub fn reserve(&mut self, n: usize) {
        let need = self.len.saturating_add(n).saturating_mul(2).max(16);
        if need > self.slots.len() {
            self.grow_to(need.next_power_of_two());
        }
    }

    /// Moves every record into a table of `cap` slots, by the hashes they keep (no key is
    /// read).
    fn grow_to(&mut self, cap: usize) {
        let old = std::mem::take(&mut self.slots);
        self.slots = Vec::with_capacity(cap);
        self.slots.resize_with(cap, || Slot::EMPTY);
        self.shift = 64 - cap.trailing_zeros();
        let mask = cap - 1;
        for slot in old.into_iter().filter(|s| s.block.is_some()) {
            let mut i = self.home(slot.hash);
            while self.slots[i].block.is_some() {
                i = (i + 1) & mask;
            }
            self.slots[i] = slot;
        }
    }

    /// The first slot a key of this hash may be in (the table must not be empty).
    fn home(&self, hash: u64) -> usize {
        (hash.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> self.shift) as usize
    }

    /// The slot holding `key` (`Ok`), or the empty slot where it would go (`Err`). The kept
    /// hash is compared first, so a block is read only for its own key (in practice).
    fn find(&self, hash: u64, key: &[u8]) -> Result<usize, usize> {
        let mask = self.slots.len() - 1;
        let mut i = self.home(hash);
        loop {
            let s = &self.slots[i];
            match &s.block {
                None => return Err(i),
                Some(b) if s.hash == hash && &b[..s.key_len as usize] == key => return Ok(i),
                Some(_) => i = (i + 1) & mask,
            }
        }
    }

    /// The stored state held for `key`.
    pub fn get(&self, key: &[u8]) -> Option<&[u8]> {
        if self.len == 0 {
            return None;
        }
        let hash = self.hasher.hash_one(key);
        self.find(hash, key).ok().map(|i| self.slots[i].state())
    }

    /// The hash `key` is filed under (for the prefetches and [`DeltaMap::update_hashed`]).
    pub fn hash(&self, key: &[u8]) -> u64 {
        self.hasher.hash_one(key)
    }

    /// Prefetches the first slot a key of this hash may be in: called many ops ahead of its
    /// update (the address depends on the hash alone).
    pub fn prefetch_slot(&self, hash: u64) {
        if self.slots.is_empty() {
            return;
        }
        // The slot after it too (the next cache line for a home in a line's second half).
        for s in self.slots[self.home(hash)..].iter().take(2) {
            prefetch((s as *const Slot).cast());
        }
    }

    /// Prefetches the block of the record whose kept hash is `hash`, if one is held: called a
    /// few ops ahead of its update, once [`DeltaMap::prefetch_slot`] has brought its slots
    /// in (reads slots only, never a block).
    pub fn prefetch_block(&self, hash: u64) {
        if self.len == 0 {
            return;
        }
        let mask = self.slots.len() - 1;
        let mut i = self.home(hash);
        while let Some(b) = &self.slots[i].block {
            if self.slots[i].hash == hash {
                prefetch(b.as_ptr());
                return;
            }
            i = (i + 1) & mask;
        }
    }

    /// Sets `key`'s state to what `f` writes, given the state held (if any), with one lookup.
    /// `f` appends the new state to the buffer it is given (which already holds the key: the
    /// block is then copied out once). If `f` fails, nothing changes.
    #[cfg(test)]
    pub fn update<E>(
        &mut self,
        key: &[u8],
        buf: &mut Vec<u8>,
        f: impl FnOnce(Option<&[u8]>, &mut Vec<u8>) -> Result<(), E>,
    ) -> Result<Updated, E> {
        let hash = self.hasher.hash_one(key);
        self.update_hashed(hash, key, buf, f)
    }

    /// [`DeltaMap::update`] of a key whose [`DeltaMap::hash`] is `hash`.
    pub fn update_hashed<E>(
        &mut self,
        hash: u64,
        key: &[u8],
        buf: &mut Vec<u8>,
        f: impl FnOnce(Option<&[u8]>, &mut Vec<u8>) -> Result<(), E>,
    ) -> Result<Updated, E> {
        let key_len = u32::try_from(key.len()).expect("record keys are bounded far below 4 GiB");
        self.reserve(1);
        buf.clear();
        buf.extend_from_slice(key);
        match self.find(hash, key) {
            Ok(i) => {
                let slot = &mut self.slots[i];
                let old = slot.state().len();
                f(Some(slot.state()), buf)?;
                slot.block = Some(buf.as_slice().into());
                Ok(Updated::Replaced {
                    old,
                    new: buf.len() - key.len(),
                })
            }
            Err(i) => {
                f(None, buf)?;
                self.slots[i] = Slot {
                    hash,
                    key_len,
                    block: Some(buf.as_slice().into()),
                };
                self.len += 1;
                Ok(Updated::Inserted {
                    state_len: buf.len() - key.len(),
                })
            }
        }
    }

    fn held(&self) -> impl Iterator<Item = &Slot> {
        self.slots.iter().filter(|s| s.block.is_some())
    }

    /// Bytes asked of the allocator: the slots and every block (see
    /// [`crate::store::Store::staged_heap_bytes`]).
    pub fn heap_bytes(&self) -> usize {
        self.slots.capacity() * std::mem::size_of::<Slot>()
            + self
                .held()
                .map(|s| s.block.as_ref().map_or(0, |b| b.len()))
                .sum::<usize>()
    }

    /// Every record's key, in no particular order.
    pub fn keys(&self) -> impl Iterator<Item = &[u8]> {
        self.held().map(Slot::key)
    }

    /// Every record's (key, state), in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.held().map(|s| (s.key(), s.state()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    proptest! {
        /// Behaves as a plain map of keys to the last state written, whatever the order of
        /// updates and however much it grows; a failed update changes nothing.
        #[test]
        fn acts_as_a_map(
            ops in proptest::collection::vec(
                (0u16..300, proptest::collection::vec(any::<u8>(), 0..12), any::<bool>()),
                0..2_000,
            ),
        ) {
            let (mut map, mut model) = (DeltaMap::default(), HashMap::<Vec<u8>, Vec<u8>>::new());
            let mut buf = Vec::new();
            for (k, state, fail) in ops {
                let key = format!("key{k}").into_bytes();
                let held = model.get(&key).cloned();
                // Prefetching changes nothing (held key or not, empty table or not).
                let ahead = map.hash(format!("key{}", k ^ 1).as_bytes());
                map.prefetch_slot(ahead);
                map.prefetch_block(ahead);
                // Room reserved ahead (as staging does per batch) moves records, never
                // changes them.
                if k % 97 == 0 {
                    map.reserve(usize::from(k));
                }
                let r = map.update(&key, &mut buf, |old, out| {
                    prop_assert_eq!(old.map(<[u8]>::to_vec), held.clone());
                    if fail {
                        return Err(TestCaseError::fail("refused"));
                    }
                    out.extend_from_slice(&state);
                    Ok(())
                });
                match (r, fail) {
                    (Err(_), true) => {}
                    (Ok(Updated::Inserted { state_len }), false) => {
                        prop_assert!(held.is_none());
                        prop_assert_eq!(state_len, state.len());
                        model.insert(key, state);
                    }
                    (Ok(Updated::Replaced { old, new }), false) => {
                        prop_assert_eq!(Some(old), held.map(|h| h.len()));
                        prop_assert_eq!(new, state.len());
                        model.insert(key, state);
                    }
                    (Err(e), false) => return Err(e),
                    (Ok(_), true) => prop_assert!(false, "a failed update reported success"),
                }
            }
            prop_assert_eq!(map.len(), model.len());
            prop_assert_eq!(map.is_empty(), model.is_empty());
            // Half full at most, and every block counted: key and state.
            let blocks: usize = model.iter().map(|(k, v)| k.len() + v.len()).sum();
            let slots = (map.heap_bytes() - blocks) / std::mem::size_of::<Slot>();
            prop_assert!(slots >= 2 * model.len(), "{} slots for {} records", slots, model.len());
            for (k, v) in &model {
                prop_assert_eq!(map.get(k), Some(v.as_slice()));
            }
            prop_assert_eq!(map.get(b"absent"), None);
            let mut all: Vec<(Vec<u8>, Vec<u8>)> =
                map.iter().map(|(k, v)| (k.to_vec(), v.to_vec())).collect();
            all.sort();
            let mut want: Vec<(Vec<u8>, Vec<u8>)> = model.into_iter().collect();
            want.sort();
            prop_assert_eq!(all, want);
        }
    }
}
