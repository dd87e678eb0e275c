//! zstd dictionaries for small payloads: content-addressed, shipped and stored with the
//! batches that use them.
//!
//! A dictionary is any byte string of 1..=[`limits::MAX_DICT_BYTES`] (a trained zstd
//! dictionary, or raw content: zstd accepts both). Its identity is [`DictId`] =
//! `blake3(bytes)`; batch headers name it by [`DictRef`], the first 8 bytes of the id (a full
//! id would cost 39 header bytes, more than a dictionary saves on a 1-op batch). The ref only
//! *finds* candidates; what binds the batch to exactly one dictionary is the payload hash,
//! which for dictionary-compressed payloads is `blake3::keyed_hash(key = DictId, payload)`
//! and is covered by the author's signature (see [`crate::batch`]). So a batch decodes to one
//! op list, whatever dictionaries share its ref.
//!
//! Versioning: a new dictionary is a new id. Old ones stay valid forever for the batches that
//! name them; a node holds every dictionary named by a batch it stores.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock};

use serde::{Deserialize, Serialize};

use crate::limits;

/// Identity of a dictionary: blake3 of its bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DictId(pub [u8; 32]);

impl DictId {
    /// The short form that batch headers carry.
    pub fn dict_ref(&self) -> DictRef {
        let mut r = [0u8; 8];
        r.copy_from_slice(&self.0[..8]);
        DictRef(r)
    }
}

impl std::fmt::Debug for DictId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DictId(")?;
        for b in &self.0[..8] {
            write!(f, "{b:02x}")?;
        }
        write!(f, ")")
    }
}

/// The first 8 bytes of a [`DictId`]: how a batch header names its dictionary (a lookup key,
/// not the binding: see the module docs).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct DictRef(#[serde(with = "serde_bytes")] pub [u8; 8]);

impl std::fmt::Debug for DictRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DictRef(")?;
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        write!(f, ")")
    }
}

impl std::fmt::Display for DictRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// Why bytes are not a dictionary.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DictError {
    /// Empty or larger than [`limits::MAX_DICT_BYTES`].
    #[error("dictionary of {0} bytes is outside 1..={max}", max = limits::MAX_DICT_BYTES)]
    Size(usize),
}

struct Inner {
    id: DictId,
    bytes: Vec<u8>,
    /// zstd contexts with the dictionary loaded, made on first use (only authors compress,
    /// every verifier decompresses) and reused: a fresh context per 1-op batch cost more than
    /// the compression itself. `None` if zstd refused the dictionary.
    encoder: OnceLock<Option<Mutex<zstd::bulk::Compressor<'static>>>>,
    decoder: OnceLock<Option<Mutex<zstd::bulk::Decompressor<'static>>>>,
}

/// A dictionary whose id is known to match its bytes (it can only be built by hashing them).
/// Cheap to clone.
#[derive(Clone)]
pub struct Dict(Arc<Inner>);

impl Dict {
    /// Checks the size and computes the id.
    pub fn new(bytes: Vec<u8>) -> Result<Self, DictError> {
        if bytes.is_empty() || bytes.len() > limits::MAX_DICT_BYTES {
            return Err(DictError::Size(bytes.len()));
        }
        Ok(Dict(Arc::new(Inner {
            id: DictId(*blake3::hash(&bytes).as_bytes()),
            bytes,
            encoder: OnceLock::new(),
            decoder: OnceLock::new(),
        })))
    }

    /// `blake3(bytes)`.
    pub fn id(&self) -> DictId {
        self.0.id
    }

    /// What headers carry.
    pub fn dict_ref(&self) -> DictRef {
        self.0.id.dict_ref()
    }

    /// The dictionary's bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.0.bytes
    }

    /// Compresses `plain` with this dictionary at `level` (the frame does not repeat zstd's
    /// own dictionary id: the header names the dictionary).
    /// `level` is fixed by the first call (sealing always uses the same).
    pub(crate) fn compress(&self, plain: &[u8], level: i32) -> std::io::Result<Vec<u8>> {
        let c = self.0.encoder.get_or_init(|| {
            let mut c = zstd::bulk::Compressor::with_dictionary(level, &self.0.bytes).ok()?;
            c.set_parameter(zstd::zstd_safe::CParameter::DictIdFlag(false))
                .ok()?;
            Some(Mutex::new(c))
        });
        let c = c.as_ref().ok_or_else(|| refused("compress"))?;
        // A panic while compressing leaves nothing half-done that matters: the context is
        // reset by the next frame.
        let mut c = c.lock().unwrap_or_else(|e| e.into_inner());
        c.compress(plain)
    }

    /// Inflates a payload compressed with this dictionary, at most `max` bytes (the frame
    /// must state its size, and the output buffer is that size, not `max`).
    pub(crate) fn decompress(&self, payload: &[u8], max: usize) -> std::io::Result<Vec<u8>> {
        let size = match zstd::zstd_safe::get_frame_content_size(payload) {
            Ok(Some(n)) if n <= max as u64 => n as usize,
            Ok(Some(_)) => return Err(std::io::Error::other("frame inflates beyond the limit")),
            _ => return Err(std::io::Error::other("frame does not state its size")),
        };
        let d = self.0.decoder.get_or_init(|| {
            let d = zstd::bulk::Decompressor::with_dictionary(&self.0.bytes).ok()?;
            Some(Mutex::new(d))
        });
        let d = d.as_ref().ok_or_else(|| refused("decompress"))?;
        let mut d = d.lock().unwrap_or_else(|e| e.into_inner());
        let out = d.decompress(payload, size)?;
        if out.len() != size {
            return Err(std::io::Error::other("frame size differs from its header"));
        }
        Ok(out)
    }
}

fn refused(what: &str) -> std::io::Error {
    std::io::Error::other(format!("zstd refused the dictionary ({what})"))
}

impl PartialEq for Dict {
    fn eq(&self, other: &Self) -> bool {
        self.0.id == other.0.id
    }
}

impl Eq for Dict {}

impl std::fmt::Debug for Dict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Dict({:?}, {} bytes)", self.0.id, self.0.bytes.len())
    }
}

/// Where verification finds dictionaries.
pub trait DictLookup {
    /// Every held dictionary whose id starts with `r` (usually zero or one).
    fn find(&self, r: DictRef) -> Vec<Dict>;
}

/// No dictionaries: what [`crate::batch::verify`] uses (payloads of `enc` 0–3 need none).
#[derive(Clone, Copy, Debug, Default)]
pub struct NoDicts;

impl DictLookup for NoDicts {
    fn find(&self, _: DictRef) -> Vec<Dict> {
        Vec::new()
    }
}

/// A set of dictionaries, ordered by id (so a ref's candidates are one range).
#[derive(Clone, Debug, Default)]
pub struct DictSet {
    map: BTreeMap<DictId, Dict>,
}

impl DictSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a dictionary; true if it was new.
    pub fn insert(&mut self, d: Dict) -> bool {
        self.map.insert(d.id(), d).is_none()
    }

    /// Removes a dictionary.
    pub fn remove(&mut self, id: &DictId) -> Option<Dict> {
        self.map.remove(id)
    }

    /// Whether the set holds `id`.
    pub fn contains(&self, id: &DictId) -> bool {
        self.map.contains_key(id)
    }

    /// Number of dictionaries.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The dictionaries, by id.
    pub fn iter(&self) -> impl Iterator<Item = &Dict> {
        self.map.values()
    }
}

impl DictLookup for DictSet {
    fn find(&self, r: DictRef) -> Vec<Dict> {
        let mut lo = [0u8; 32];
        lo[..8].copy_from_slice(&r.0);
        let mut hi = [0xffu8; 32];
        hi[..8].copy_from_slice(&r.0);
        self.map
            .range(DictId(lo)..=DictId(hi))
            .map(|(_, d)| d.clone())
            .collect()
    }
}

impl<F: Fn(DictRef) -> Vec<Dict>> DictLookup for F {
    fn find(&self, r: DictRef) -> Vec<Dict> {
        self(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_is_blake3_and_size_is_bounded() {
        let d = Dict::new(b"some dictionary".to_vec()).unwrap();
        assert_eq!(d.id().0, *blake3::hash(b"some dictionary").as_bytes());
        assert_eq!(d.dict_ref().0, d.id().0[..8]);
        assert_eq!(Dict::new(Vec::new()), Err(DictError::Size(0)));
        let big = vec![7u8; limits::MAX_DICT_BYTES + 1];
        assert!(Dict::new(big).is_err());
        assert!(Dict::new(vec![7u8; limits::MAX_DICT_BYTES]).is_ok());
    }

    #[test]
    fn a_set_finds_by_ref() {
        let mut set = DictSet::new();
        let a = Dict::new(b"a".to_vec()).unwrap();
        let b = Dict::new(b"b".to_vec()).unwrap();
        set.insert(a.clone());
        set.insert(b.clone());
        assert_eq!(set.find(a.dict_ref()), vec![a]);
        assert_eq!(set.find(b.dict_ref()), vec![b]);
        assert!(NoDicts.find(DictRef([1; 8])).is_empty());
    }

    #[test]
    fn compression_roundtrips() {
        let d = Dict::new(b"users name alice bob carol".repeat(20)).unwrap();
        let plain = b"users alice name carol bob".to_vec();
        let z = d.compress(&plain, 1).unwrap();
        assert_eq!(d.decompress(&z, 1 << 20).unwrap(), plain);
        let other = Dict::new(b"zzzz".to_vec()).unwrap();
        assert_ne!(other.decompress(&z, 1 << 20).ok(), Some(plain));
    }
}
