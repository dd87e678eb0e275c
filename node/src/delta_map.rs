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

use hashbrown::HashTable;
use std::hash::BuildHasher;

/// One record: its key's hash, and `key ++ state` in one block.
struct Slot {
    hash: u64,
    key_len: u32,
    block: Box<[u8]>,
}

impl Slot {
    fn key(&self) -> &[u8] {
        &self.block[..self.key_len as usize]
    }

    fn state(&self) -> &[u8] {
        &self.block[self.key_len as usize..]
    }
}

/// Record key → stored state (see the module docs).
#[derive(Default)]
pub(crate) struct DeltaMap {
    table: HashTable<Slot>,
    hasher: foldhash::fast::RandomState,
}

/// What [`DeltaMap::update`] did.
pub(crate) enum Updated {
    /// The key was new; its state is this many bytes.
    Inserted { state_len: usize },
    /// The key was held with a state of `old` bytes, now `new` bytes.
    Replaced { old: usize, new: usize },
}

impl DeltaMap {
    /// Records held.
    pub fn len(&self) -> usize {
        self.table.len()
    }

    /// Whether no record is held.
    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// Room for `n` more records without growing.
    pub fn reserve(&mut self, n: usize) {
        self.table.reserve(n, |s| s.hash);
    }

    /// The stored state held for `key`.
    pub fn get(&self, key: &[u8]) -> Option<&[u8]> {
        let hash = self.hasher.hash_one(key);
        self.table.find(hash, matches(hash, key)).map(|s| s.state())
    }

    /// The hash `key` is filed under (for [`DeltaMap::touch`] and
    /// [`DeltaMap::update_hashed`]).
    pub fn hash(&self, key: &[u8]) -> u64 {
        self.hasher.hash_one(key)
    }

    /// Reads what an update of the key hashed to `hash` will read (its slot's group and, if
    /// held, the start of its block) without using it: called a few keys ahead of the
    /// updates, so that their cache misses are in flight together instead of one after
    /// another. Returns a byte of what it read, for the caller to fold into a
    /// [`std::hint::black_box`] once (so the reads are not optimized away).
    pub fn touch(&self, hash: u64) -> u8 {
        self.table
            .find(hash, |s| s.hash == hash)
            .map_or(0, |s| s.block.first().copied().unwrap_or(0))
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
        buf.clear();
        buf.extend_from_slice(key);
        match self.table.find_mut(hash, matches(hash, key)) {
            Some(slot) => {
                let old = slot.block.len() - key.len();
                f(Some(slot.state()), buf)?;
                slot.block = buf.as_slice().into();
                Ok(Updated::Replaced {
                    old,
                    new: buf.len() - key.len(),
                })
            }
            None => {
                f(None, buf)?;
                let block: Box<[u8]> = buf.as_slice().into();
                self.table.insert_unique(
                    hash,
                    Slot {
                        hash,
                        key_len,
                        block,
                    },
                    |s| s.hash,
                );
                Ok(Updated::Inserted {
                    state_len: buf.len() - key.len(),
                })
            }
        }
    }

    /// Every record's key, in no particular order.
    pub fn keys(&self) -> impl Iterator<Item = &[u8]> {
        self.table.iter().map(Slot::key)
    }

    /// Every record's (key, state), in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.table.iter().map(|s| (s.key(), s.state()))
    }
}

/// Whether a slot holds `key`: its kept hash is compared first, so a slot whose 7-bit tag
/// matched by chance is told apart without loading its block (a cache miss of its own).
fn matches(hash: u64, key: &[u8]) -> impl Fn(&Slot) -> bool + '_ {
    move |s| s.hash == hash && s.key() == key
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
                // Touching ahead reads without changing anything.
                let _ = map.touch(map.hash(format!("key{}", k ^ 1).as_bytes()));
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
