//! Batches: the unit of the change log, of gossip and of catch-up.
//!
//! Wire form (the *envelope*) is a CBOR array of three byte strings:
//!
//! ```text
//! [ header: bstr, signature: bstr(64), payload: bstr ]
//! ```
//!
//! - `header` is the CBOR map [`BatchHeader`] (namespace, author, seq, previous batch id, HLC
//!   range, op count, payload length and blake3 hash).
//! - the batch id is `blake3(header bytes)`; it doubles as the gossip message id.
//! - `signature` is the author's ed25519 signature over `SIGNING_CONTEXT || header bytes`.
//! - `payload` is the ops in the compact CBOR layout of [`crate::codec`] (names interned,
//!   timestamps delta-coded), zstd-compressed when that pays (`enc` in the header says which),
//!   with a dictionary ([`crate::dict`]) for small batches when that pays more.
//!
//! The bytes are kept as received: ids and signatures are over exact bytes, never over a
//! re-encoding. Any CBOR decoder can read the envelope (it is plain CBOR).

use serde::{Deserialize, Serialize};

use blazedb_identity::{Keypair, PublicKey};

use crate::batch_ops::BatchOps;
use crate::capability::Chain;
use crate::dict::{Dict, DictId, DictLookup, DictRef, NoDicts};
use crate::hlc::Hlc;
use crate::limits;
use crate::op::{validate_namespace, Op, OpError};
use crate::squeeze::{Frames, Squeeze};
use std::borrow::Cow;

/// Domain separation for batch signatures.
pub const SIGNING_CONTEXT: &[u8] = b"blazedb/batch/v1\0";
/// Current header version.
pub const HEADER_VERSION: u8 = 1;

/// Identity of a batch: blake3 of its header bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BatchId(#[serde(with = "serde_bytes")] pub [u8; 32]);

impl std::fmt::Debug for BatchId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BatchId({})", self)
    }
}

impl std::fmt::Display for BatchId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in &self.0[..8] {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl BatchId {
    /// Full lowercase hex form.
    pub fn to_hex(&self) -> String {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut s = String::with_capacity(64);
        for b in self.0 {
            s.push(char::from(DIGITS[usize::from(b >> 4)]));
            s.push(char::from(DIGITS[usize::from(b & 0x0f)]));
        }
        s
    }
}

/// The signed, hashed part of a batch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchHeader {
    /// Header format version ([`HEADER_VERSION`]).
    pub v: u8,
    /// Namespace the batch belongs to.
    pub ns: String,
    /// Author's ed25519 public key.
    #[serde(with = "serde_bytes")]
    pub author: [u8; 32],
    /// Position in the author's chain for this namespace, from 1.
    pub seq: u64,
    /// Id of the author's previous batch in this namespace (`None` iff `seq == 1`).
    pub prev: Option<BatchId>,
    /// Timestamp of the first op.
    pub hlc_min: Hlc,
    /// Timestamp of the last op.
    pub hlc_max: Hlc,
    /// Number of ops in the payload.
    pub ops: u32,
    /// Length of the payload in bytes.
    pub payload_len: u32,
    /// blake3 of the payload bytes.
    #[serde(with = "serde_bytes")]
    pub payload_hash: [u8; 32],
    /// The author's capability chain (encoded [`Chain`]) for namespaces that need one;
    /// `None` in public namespaces and for the namespace owner.
    pub cap: Option<serde_bytes::ByteBuf>,
    /// Payload encoding: [`ENC_COMPACT`], [`ENC_COMPACT_ZSTD`] or [`ENC_COMPACT_ZSTD_DICT`]
    /// (what sealing writes), or the older serde layouts [`ENC_CBOR`] / [`ENC_ZSTD`] (still
    /// verified, for stored logs).
    pub enc: u8,
    /// The dictionary of an [`ENC_COMPACT_ZSTD_DICT`] payload (absent otherwise). Last, and
    /// left out when absent, so every header without it encodes exactly as before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dict: Option<DictRef>,
}

/// Payload is the CBOR array of ops (serde layout; read, no longer written).
pub const ENC_CBOR: u8 = 0;
/// Payload is the CBOR array of ops, compressed with zstd (read, no longer written).
pub const ENC_ZSTD: u8 = 1;
/// Payload is the compact CBOR layout of [`crate::codec`] (what sealing writes).
pub const ENC_COMPACT: u8 = 2;
/// Payload is the compact layout, compressed with zstd.
pub const ENC_COMPACT_ZSTD: u8 = 3;
/// Payload is the compact layout, compressed with zstd and the dictionary the header names;
/// `payload_hash` is then `blake3::keyed_hash(key = DictId, payload)`, which binds the batch
/// to exactly one dictionary.
pub const ENC_COMPACT_ZSTD_DICT: u8 = 4;
/// Batches of this many ops or more are not tried with a dictionary: it saves nothing there
/// (B4: 1.01x at 100 ops) and the attempt costs a second compression.
pub const DICT_OPS_MAX: usize = 100;
/// Payloads smaller than this are not worth compressing (without a dictionary).
const COMPRESS_MIN_BYTES: usize = 512;
/// Payloads of this many bytes or more are compressed as two zstd frames, the name table
/// and first timestamp in one, the ops in the other (readers inflate concatenated frames as
/// one payload): the ops frame of a call encoded ahead is then compressed on its writer's
/// task, in parallel with other writers, instead of in the sealer every write passes through
/// in turn ([`crate::squeeze::Squeeze::compress_split`]). Costs one frame header (~10 bytes).
pub const SPLIT_MIN_BYTES: usize = 16 * 1024;

/// Why a batch is not acceptable. Every variant is a reason to drop it and count it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BatchError {
    /// Larger than [`limits::MAX_BATCH_BYTES`].
    #[error("batch of {0} bytes exceeds the limit")]
    TooLarge(usize),
    /// Not a well-formed envelope or header.
    #[error("malformed batch: {0}")]
    Malformed(String),
    /// Header version we do not speak.
    #[error("unsupported batch header version {0}")]
    UnsupportedVersion(u8),
    /// Payload does not match the hash or length in the header.
    #[error("payload does not match header hash/length")]
    PayloadMismatch,
    /// Signature does not verify under the author key.
    #[error("bad signature")]
    BadSignature,
    /// Header fields inconsistent with each other or with the ops.
    #[error("inconsistent batch: {0}")]
    Inconsistent(String),
    /// The author's capability does not allow this batch.
    #[error("not allowed: {0}")]
    Unauthorized(String),
    /// An op breaks a limit or naming rule.
    #[error("invalid op: {0}")]
    InvalidOp(#[from] OpError),
    /// The payload needs a dictionary we do not hold: not a fault of whoever sent the batch,
    /// fetch the dictionary and verify again.
    #[error("dictionary {0} is not held")]
    MissingDict(DictRef),
}

/// A batch whose envelope, hash, signature and ops have all been checked.
/// (Chain position is checked by the engine, which knows the author's previous batch.)
#[derive(Clone, Debug, PartialEq)]
pub struct VerifiedBatch {
    /// Batch id.
    pub id: BatchId,
    /// Decoded header.
    pub header: BatchHeader,
    /// Author key (parsed from the header).
    pub author: PublicKey,
    /// The ops, in order, as their validated compact payload (read through
    /// [`BatchOps::view`]); shared, so the copies a batch travels in (the store action, the
    /// materializer's job, the writer's receipt, a simulator's nodes) never copy them.
    pub ops: BatchOps,
    /// The exact envelope bytes, as stored and sent; shared (cloning a batch, or handing
    /// its bytes to the store and to gossip, copies no payload).
    pub bytes: bytes::Bytes,
    /// The author's capability chain, decoded and structurally verified (whether it
    /// authorizes this batch is the engine's judgement: it knows the namespace's policy).
    pub cap: Option<Chain>,
    /// Whether the batch's ops count: false once a token in its capability chain has been
    /// revoked at or before the batch's last timestamp. Stored anyway (chains stay
    /// contiguous); set by the engine.
    pub effective: bool,
    /// The dictionary the payload was compressed with (`enc` 4): whoever stores the batch
    /// stores it too, in the same transaction.
    pub dict: Option<Dict>,
}

/// Borrowed view of an envelope's three parts.
#[derive(Clone, Copy, Debug)]
pub struct Envelope<'a> {
    /// Header bytes.
    pub header: &'a [u8],
    /// Signature bytes.
    pub signature: &'a [u8],
    /// Payload bytes.
    pub payload: &'a [u8],
}

impl<'a> Envelope<'a> {
    /// Splits envelope bytes without copying. Cheap: used to compute gossip message ids.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, BatchError> {
        if bytes.len() > limits::MAX_BATCH_BYTES {
            return Err(BatchError::TooLarge(bytes.len()));
        }
        let malformed = |m: &str| BatchError::Malformed(m.to_string());
        let (&first, mut rest) = bytes.split_first().ok_or_else(|| malformed("empty"))?;
        if first != 0x83 {
            return Err(malformed("envelope is not a 3-element CBOR array"));
        }
        let mut parts = [&[][..]; 3];
        for part in &mut parts {
            let (bstr, tail) = read_bstr(rest).ok_or_else(|| malformed("expected byte string"))?;
            *part = bstr;
            rest = tail;
        }
        if !rest.is_empty() {
            return Err(malformed("trailing bytes after envelope"));
        }
        Ok(Envelope {
            header: parts[0],
            signature: parts[1],
            payload: parts[2],
        })
    }

    /// The header bytes of envelope bytes, read from their front only: `bytes` may end
    /// anywhere after the header (the first piece of a batch a store keeps in pieces).
    pub fn header_of(bytes: &'a [u8]) -> Result<&'a [u8], BatchError> {
        let malformed = |m: &str| BatchError::Malformed(m.to_string());
        match bytes.split_first() {
            Some((0x83, rest)) => read_bstr(rest)
                .map(|(header, _)| header)
                .ok_or_else(|| malformed("expected byte string")),
            Some(_) => Err(malformed("envelope is not a 3-element CBOR array")),
            None => Err(malformed("empty")),
        }
    }

    /// The batch id (blake3 of the header bytes).
    pub fn id(&self) -> BatchId {
        BatchId(*blake3::hash(self.header).as_bytes())
    }
}

/// Reads one definite-length CBOR byte string; returns it and the rest.
fn read_bstr(b: &[u8]) -> Option<(&[u8], &[u8])> {
    let (&ib, rest) = b.split_first()?;
    if ib >> 5 != 2 {
        return None;
    }
    let (len, rest) = match ib & 0x1f {
        n @ 0..=23 => (u64::from(n), rest),
        24 => (u64::from(*rest.first()?), &rest[1..]),
        25 => (
            u64::from(u16::from_be_bytes(rest.get(..2)?.try_into().ok()?)),
            &rest[2..],
        ),
        26 => (
            u64::from(u32::from_be_bytes(rest.get(..4)?.try_into().ok()?)),
            &rest[4..],
        ),
        27 => (
            u64::from_be_bytes(rest.get(..8)?.try_into().ok()?),
            &rest[8..],
        ),
        _ => return None, // indefinite length or reserved
    };
    let len = usize::try_from(len).ok()?;
    if len > rest.len() {
        return None;
    }
    Some(rest.split_at(len))
}

fn write_bstr(out: &mut Vec<u8>, b: &[u8]) {
    bstr_head(out, b.len());
    out.extend_from_slice(b);
}

/// The head of a CBOR byte string of `len` bytes.
fn bstr_head(out: &mut Vec<u8>, len: usize) {
    let len = len as u64;
    match len {
        0..=23 => out.push(0x40 | len as u8),
        24..=0xff => out.extend_from_slice(&[0x58, len as u8]),
        0x100..=0xffff => {
            out.push(0x59);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        0x1_0000..=0xffff_ffff => {
            out.push(0x5a);
            out.extend_from_slice(&(len as u32).to_be_bytes());
        }
        _ => {
            out.push(0x5b);
            out.extend_from_slice(&len.to_be_bytes());
        }
    }
}

fn to_cbor<T: Serialize>(v: &T) -> Vec<u8> {
    let mut out = Vec::new();
    ciborium::into_writer(v, &mut out).expect("serializing to a Vec cannot fail");
    out
}

/// Where a new batch sits in its author's chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChainPosition {
    /// Sequence number of the new batch (1 for the first).
    pub seq: u64,
    /// Id of the previous batch (`None` for the first).
    pub prev: Option<BatchId>,
}

/// Seals ops into a signed batch. The ops must already carry strictly increasing timestamps.
pub fn seal(
    keypair: &Keypair,
    ns: &str,
    pos: ChainPosition,
    ops: Vec<Op>,
    cap: Option<&Chain>,
) -> Result<VerifiedBatch, BatchError> {
    seal_with(keypair, ns, pos, ops, cap, None)
}

/// Header bytes a dictionary costs: the `dict` key (5) and an 8-byte byte string (9).
const DICT_HEADER_BYTES: usize = 14;

/// [`seal`], trying `dict` too for batches of fewer than [`DICT_OPS_MAX`] ops: the payload
/// goes out in whichever encoding makes the batch smallest (plain, zstd, zstd with the
/// dictionary, the latter charged for the header bytes naming it).
pub fn seal_with(
    keypair: &Keypair,
    ns: &str,
    pos: ChainPosition,
    ops: Vec<Op>,
    cap: Option<&Chain>,
    dict: Option<&Dict>,
) -> Result<VerifiedBatch, BatchError> {
    seal_squeezed(keypair, ns, pos, ops, cap, dict, &mut Squeeze::strong())
}

/// [`seal_with`], compressing a large payload as the writer's `squeeze` chooses (the fast
/// or the strong zstd level, adapted to what the strong one gains on this namespace's data;
/// see [`crate::squeeze`]). Readers decode either alike.
pub fn seal_squeezed(
    keypair: &Keypair,
    ns: &str,
    pos: ChainPosition,
    ops: Vec<Op>,
    cap: Option<&Chain>,
    dict: Option<&Dict>,
    squeeze: &mut Squeeze,
) -> Result<VerifiedBatch, BatchError> {
    validate_namespace(ns)?;
    check_ops(&ops)?;
    seal_valid(keypair, ns, pos, &ops, cap, dict, squeeze)
}

/// [`seal_squeezed`] of ops whose contents were checked ([`crate::CheckedOps`]): only their
/// count and timestamp order are checked here.
#[allow(clippy::too_many_arguments)]
pub(crate) fn seal_checked(
    keypair: &Keypair,
    ns: &str,
    pos: ChainPosition,
    ops: &[Op],
    cap: Option<&Chain>,
    dict: Option<&Dict>,
    squeeze: &mut Squeeze,
) -> Result<VerifiedBatch, BatchError> {
    validate_namespace(ns)?;
    check_op_order(ops)?;
    seal_valid(keypair, ns, pos, ops, cap, dict, squeeze)
}

/// A payload encoded ahead of sealing ([`crate::CheckedOps::encode_ahead`],
/// [`crate::OpsBuilder`]), with what the header says of its ops. Its encoder made it from
/// checked ops with strictly increasing stamps, `hlc_min` the first and `hlc_max` the last.
pub(crate) struct PlainOps {
    pub(crate) plain: Vec<u8>,
    /// Where the ops array starts in `plain` (after the name table and `hlc_base`).
    pub(crate) split: usize,
    /// The ops array compressed ahead by the payload's writer, if it was.
    pub(crate) ahead: Option<crate::squeeze::Precompressed>,
    pub(crate) len: usize,
    pub(crate) hlc_min: Hlc,
    pub(crate) hlc_max: Hlc,
}

/// Seals a payload encoded ahead (no revocations among its ops: those are never encoded
/// ahead).
pub(crate) fn seal_plain(
    keypair: &Keypair,
    ns: &str,
    pos: ChainPosition,
    ops: PlainOps,
    cap: Option<&Chain>,
    dict: Option<&Dict>,
    squeeze: &mut Squeeze,
) -> Result<VerifiedBatch, BatchError> {
    validate_namespace(ns)?;
    if ops.len == 0 || ops.len > limits::MAX_OPS_PER_BATCH || ops.hlc_min > ops.hlc_max {
        return Err(BatchError::Inconsistent(format!(
            "a payload of {} ops encoded ahead does not fit a batch",
            ops.len
        )));
    }
    let revocations = Vec::new();
    seal_payload(keypair, ns, pos, ops, revocations, cap, dict, squeeze)
}

/// Seals ops and a namespace that passed their checks (each entry point above checks what its
/// callers have not: everything, or only the count and timestamp order): encodes them here.
fn seal_valid(
    keypair: &Keypair,
    ns: &str,
    pos: ChainPosition,
    ops: &[Op],
    cap: Option<&Chain>,
    dict: Option<&Dict>,
    squeeze: &mut Squeeze,
) -> Result<VerifiedBatch, BatchError> {
    let mut plain = Vec::new();
    let base_at = crate::codec::encode_ops(ops, &mut plain);
    let revocations = ops
        .iter()
        .filter_map(|o| match o {
            Op::Revoke { token, hlc } => Some((token.clone(), *hlc)),
            _ => None,
        })
        .collect();
    let plain = PlainOps {
        split: crate::codec::ops_at(&plain, base_at),
        plain,
        ahead: None,
        len: ops.len(),
        hlc_min: ops[0].hlc(),
        hlc_max: ops[ops.len() - 1].hlc(),
    };
    seal_payload(keypair, ns, pos, plain, revocations, cap, dict, squeeze)
}

/// Compresses, hashes, signs and frames a payload.
#[allow(clippy::too_many_arguments)]
fn seal_payload(
    keypair: &Keypair,
    ns: &str,
    pos: ChainPosition,
    ops: PlainOps,
    revocations: Vec<(String, Hlc)>,
    cap: Option<&Chain>,
    dict: Option<&Dict>,
    squeeze: &mut Squeeze,
) -> Result<VerifiedBatch, BatchError> {
    let PlainOps {
        plain,
        split,
        ahead,
        len,
        hlc_min,
        hlc_max,
    } = ops;
    // The payload in up to two parts, written one after the other into the envelope (a
    // frame compressed ahead by the writer is borrowed, not joined to its head first).
    let compressed = match plain.len() {
        n if n >= SPLIT_MIN_BYTES => squeeze.compress_split(&plain, split, ahead.as_ref()),
        n if n >= COMPRESS_MIN_BYTES => squeeze.compress(&plain).map(Frames::one),
        _ => None,
    };
    let (mut payload, mut enc) = match compressed {
        Some(z) if z.len() < plain.len() => (z, ENC_COMPACT_ZSTD),
        _ => (
            Frames {
                head: Vec::new(),
                body: Cow::Borrowed(&plain[..]),
            },
            ENC_COMPACT,
        ),
    };
    let mut used = None;
    if let Some(d) = dict.filter(|_| len < DICT_OPS_MAX) {
        if let Ok(z) = d.compress(&plain, crate::squeeze::STRONG_LEVEL) {
            if z.len() + DICT_HEADER_BYTES < payload.len() {
                payload = Frames::one(z);
                enc = ENC_COMPACT_ZSTD_DICT;
                used = Some(d.clone());
            }
        }
    }
    let mut hasher = match &used {
        Some(d) => blake3::Hasher::new_keyed(&d.id().0),
        None => blake3::Hasher::new(),
    };
    hasher.update(&payload.head);
    hasher.update(&payload.body);
    let payload_hash = *hasher.finalize().as_bytes();
    let header = BatchHeader {
        v: HEADER_VERSION,
        ns: ns.to_string(),
        author: *keypair.public().as_bytes(),
        seq: pos.seq,
        prev: pos.prev,
        hlc_min,
        hlc_max,
        ops: len as u32,
        payload_len: u32::try_from(payload.len())
            .map_err(|_| BatchError::TooLarge(payload.len()))?,
        payload_hash,
        cap: cap.map(|c| serde_bytes::ByteBuf::from(c.encode())),
        enc,
        dict: used.as_ref().map(Dict::dict_ref),
    };
    check_header(&header)?;
    let header_bytes = to_cbor(&header);
    let mut signed = Vec::with_capacity(SIGNING_CONTEXT.len() + header_bytes.len());
    signed.extend_from_slice(SIGNING_CONTEXT);
    signed.extend_from_slice(&header_bytes);
    let signature = keypair.sign(&signed);

    let mut bytes = Vec::with_capacity(header_bytes.len() + payload.len() + 80);
    bytes.push(0x83);
    write_bstr(&mut bytes, &header_bytes);
    write_bstr(&mut bytes, &signature);
    bstr_head(&mut bytes, payload.len());
    bytes.extend_from_slice(&payload.head);
    bytes.extend_from_slice(&payload.body);
    if bytes.len() > limits::MAX_BATCH_BYTES {
        return Err(BatchError::TooLarge(bytes.len()));
    }
    if header_bytes.len() > limits::MAX_HEADER_BYTES {
        return Err(BatchError::Malformed("header too large".into()));
    }
    Ok(VerifiedBatch {
        id: BatchId(*blake3::hash(&header_bytes).as_bytes()),
        header,
        author: keypair.public(),
        ops: BatchOps::from_encoded(len, revocations, plain),
        bytes: bytes.into(),
        cap: cap.cloned(),
        effective: true,
        dict: used,
    })
}

/// Op-count, timestamp and content rules shared by sealing and verification.
fn check_ops(ops: &[Op]) -> Result<(), BatchError> {
    check_op_order(ops)?;
    for op in ops {
        op.validate()?;
    }
    Ok(())
}

/// Op-count and timestamp rules.
fn check_op_order(ops: &[Op]) -> Result<(), BatchError> {
    if ops.is_empty() {
        return Err(BatchError::Inconsistent(
            "a batch holds at least one op".into(),
        ));
    }
    if ops.len() > limits::MAX_OPS_PER_BATCH {
        return Err(BatchError::Inconsistent(format!(
            "{} ops exceed the limit of {}",
            ops.len(),
            limits::MAX_OPS_PER_BATCH
        )));
    }
    for w in ops.windows(2) {
        if w[0].hlc() >= w[1].hlc() {
            return Err(BatchError::Inconsistent(
                "op timestamps must strictly increase".into(),
            ));
        }
    }
    Ok(())
}

fn check_header(h: &BatchHeader) -> Result<(), BatchError> {
    if h.v != HEADER_VERSION {
        return Err(BatchError::UnsupportedVersion(h.v));
    }
    validate_namespace(&h.ns)?;
    if h.seq == 0 {
        return Err(BatchError::Inconsistent("seq starts at 1".into()));
    }
    if (h.seq == 1) != h.prev.is_none() {
        return Err(BatchError::Inconsistent(
            "prev must be absent exactly for seq 1".into(),
        ));
    }
    if h.ops == 0 || h.ops as usize > limits::MAX_OPS_PER_BATCH {
        return Err(BatchError::Inconsistent(format!(
            "op count {} out of range",
            h.ops
        )));
    }
    if h.hlc_min > h.hlc_max {
        return Err(BatchError::Inconsistent("hlc_min > hlc_max".into()));
    }
    if (h.enc == ENC_COMPACT_ZSTD_DICT) != h.dict.is_some() {
        return Err(BatchError::Inconsistent(
            "a dictionary is named exactly by enc 4 payloads".into(),
        ));
    }
    Ok(())
}

/// Fully verifies envelope bytes: size, structure, header, payload hash, strict signature,
/// op limits and timestamp consistency. Does not check the chain (see the engine). Payloads
/// compressed with a dictionary (`enc` 4) fail with [`BatchError::MissingDict`]: use
/// [`verify_with`].
pub fn verify(bytes: impl Into<bytes::Bytes>) -> Result<VerifiedBatch, BatchError> {
    verify_with(bytes, &NoDicts)
}

/// Checks what can be checked without the payload: envelope, canonical header, header rules
/// and the author's signature. Returns the header and the author key.
pub fn verify_header(bytes: &[u8]) -> Result<(BatchHeader, PublicKey), BatchError> {
    let env = Envelope::parse(bytes)?;
    if env.header.len() > limits::MAX_HEADER_BYTES {
        return Err(BatchError::Malformed("header too large".into()));
    }
    let header: BatchHeader = ciborium::from_reader(env.header)
        .map_err(|e| BatchError::Malformed(format!("header: {e}")))?;
    if to_cbor(&header) != env.header {
        // One header, one encoding: the id must not be malleable.
        return Err(BatchError::Malformed(
            "header is not canonically encoded".into(),
        ));
    }
    check_header(&header)?;
    let author = PublicKey::from_bytes(&header.author)
        .map_err(|_| BatchError::Malformed("author is not an ed25519 key".into()))?;
    let mut signed = Vec::with_capacity(SIGNING_CONTEXT.len() + env.header.len());
    signed.extend_from_slice(SIGNING_CONTEXT);
    signed.extend_from_slice(env.header);
    if !author.verify(&signed, env.signature) {
        return Err(BatchError::BadSignature);
    }
    Ok((header, author))
}

/// Checks that envelope bytes read back from storage are batch `id` as its author signed
/// it, without inflating or decoding the payload: the envelope, the header (hashing to `id`,
/// canonical, within the header rules, signed by its author) and the payload's length and
/// hash. `dict_ids` gives the ids of the held dictionaries a [`DictRef`] may name (a payload
/// compressed with one is hashed with its id as key). Any damage to the bytes fails it: the
/// header and signature are covered by `id` and the signature, the payload by its hash.
/// What a node runs over its own log's batches before sending them: damage on its disk is
/// found there, not by the peer (which would take the batch for a forgery and close the
/// link).
pub fn check_stored(
    bytes: &[u8],
    id: &BatchId,
    dict_ids: impl FnOnce(DictRef) -> Vec<DictId>,
) -> Result<(), BatchError> {
    let env = Envelope::parse(bytes)?;
    if env.id() != *id {
        return Err(BatchError::Malformed(
            "header does not hash to the batch id".into(),
        ));
    }
    let (header, _) = verify_header(bytes)?;
    if env.payload.len() != header.payload_len as usize {
        return Err(BatchError::PayloadMismatch);
    }
    let intact = match header.dict {
        None => blake3::hash(env.payload).as_bytes() == &header.payload_hash,
        Some(r) => {
            let ids = dict_ids(r);
            if ids.is_empty() {
                return Err(BatchError::MissingDict(r));
            }
            ids.iter()
                .any(|d| blake3::keyed_hash(&d.0, env.payload).as_bytes() == &header.payload_hash)
        }
    };
    if intact {
        Ok(())
    } else {
        Err(BatchError::PayloadMismatch)
    }
}

/// The dictionary a batch names, read from its header without decoding or verifying it (a
/// cheap check before [`verify_with`]): in a canonical header `dict` is the last entry, so it
/// is the header's last 14 bytes. `None` if it names none. (A non-canonical header that ends
/// the same way fails verification anyway.)
pub fn named_dict(bytes: &[u8]) -> Option<DictRef> {
    const KEY: [u8; 6] = [0x64, b'd', b'i', b'c', b't', 0x48];
    let h = Envelope::parse(bytes).ok()?.header;
    let tail = h.get(h.len().checked_sub(DICT_HEADER_BYTES)?..)?;
    let (key, r) = tail.split_at(KEY.len());
    (key == KEY).then(|| DictRef(r.try_into().expect("14 - 6 = 8 bytes")))
}

/// [`verify`], finding the dictionaries of `enc` 4 payloads in `dicts`. Fails with
/// [`BatchError::MissingDict`] (after the signature checked out) when none of the held
/// candidates is the payload's dictionary.
pub fn verify_with(
    bytes: impl Into<bytes::Bytes>,
    dicts: &dyn DictLookup,
) -> Result<VerifiedBatch, BatchError> {
    let bytes: bytes::Bytes = bytes.into();
    let (header, author) = verify_header(&bytes)?;
    let env = Envelope::parse(&bytes)?;
    if env.payload.len() != header.payload_len as usize {
        return Err(BatchError::PayloadMismatch);
    }
    let dict = match header.dict {
        None => {
            if blake3::hash(env.payload).as_bytes() != &header.payload_hash {
                return Err(BatchError::PayloadMismatch);
            }
            None
        }
        Some(r) => {
            // The ref finds candidates; the keyed hash picks the one the author signed.
            let found = dicts.find(r);
            if found.is_empty() {
                return Err(BatchError::MissingDict(r));
            }
            let d = found.into_iter().find(|d| {
                d.dict_ref() == r
                    && blake3::keyed_hash(&d.id().0, env.payload).as_bytes() == &header.payload_hash
            });
            Some(d.ok_or(BatchError::PayloadMismatch)?)
        }
    };
    // The payload uncompressed, owned: it is kept with the batch as it is (no copy).
    let plain: Vec<u8> = match header.enc {
        ENC_CBOR | ENC_COMPACT => env.payload.to_vec(),
        ENC_COMPACT_ZSTD_DICT => {
            let d = dict
                .as_ref()
                .expect("check_header: enc 4 names a dictionary");
            d.decompress(env.payload, limits::MAX_PAYLOAD_PLAIN_BYTES)
                .map_err(|e| BatchError::Malformed(format!("payload: zstd: {e}")))?
        }
        ENC_ZSTD | ENC_COMPACT_ZSTD => {
            // Bounded: a small payload must not inflate into gigabytes.
            crate::squeeze::decompress(env.payload, limits::MAX_PAYLOAD_PLAIN_BYTES)
                .map_err(|e| BatchError::Malformed(format!("payload: zstd: {e}")))?
        }
        other => {
            return Err(BatchError::Malformed(format!(
                "unknown payload encoding {other}"
            )))
        }
    };
    let plain = if header.enc >= ENC_COMPACT {
        plain
    } else {
        // Read, no longer written: kept as the compact payload like every other batch.
        let ops: Vec<Op> = ciborium::from_reader(plain.as_slice())
            .map_err(|e| BatchError::Malformed(format!("payload: {e}")))?;
        check_ops(&ops)?;
        let mut compact = Vec::new();
        crate::codec::encode_ops(&ops, &mut compact);
        compact
    };
    // The compact decoder checks every op rule and the timestamp order itself. The view is
    // kept with the batch (readers do not decode it again).
    let decoded = BatchOps::decode(std::sync::Arc::new(plain), crate::codec::decode).map_err(
        |e| match e {
            crate::codec::CodecError::InvalidOp(e) => BatchError::InvalidOp(e),
            crate::codec::CodecError::Unordered => {
                BatchError::Inconsistent("op timestamps must strictly increase".into())
            }
            other => BatchError::Malformed(format!("payload: {other}")),
        },
    )?;
    let view = decoded.get();
    let (Some(first), Some(last)) = (view.ops().first(), view.ops().last()) else {
        return Err(BatchError::Inconsistent(
            "a batch holds at least one op".into(),
        ));
    };
    if view.len() != header.ops as usize {
        return Err(BatchError::Inconsistent(
            "op count differs from header".into(),
        ));
    }
    if first.hlc() != header.hlc_min || last.hlc() != header.hlc_max {
        return Err(BatchError::Inconsistent(
            "HLC range differs from the ops".into(),
        ));
    }
    let ops = BatchOps::from_decoded(decoded);
    let cap = match &header.cap {
        Some(c) => Some(
            Chain::decode(c).map_err(|e| BatchError::Inconsistent(format!("capability: {e}")))?,
        ),
        None => None,
    };
    let id = env.id();
    Ok(VerifiedBatch {
        id,
        header,
        author,
        ops,
        bytes,
        cap,
        effective: true,
        dict,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Upserts shaped like workload W: three random-letter values of 8–64 bytes (little for
    /// zstd's match finder to find).
    fn letter_ops(n: u64, seed: u64) -> Vec<Op> {
        let mut s = seed | 1;
        let mut next = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        (0..n)
            .map(|i| {
                let fields = ["a", "b", "c"].map(|f| {
                    let len = 8 + next() % 57;
                    let v: String = (0..len)
                        .map(|_| (b'a' + (next() % 26) as u8) as char)
                        .collect();
                    (f.to_string(), serde_json::json!(v))
                });
                Op::Upsert {
                    collection: "users".into(),
                    key: format!("k{:07}", next() % 1_000_000),
                    hlc: Hlc::new(1_000 + i, 0),
                    fields: crate::OpFields::from(fields),
                }
            })
            .collect()
    }

    /// Whichever effort the writer's squeeze picks, the batch verifies to the same ops; on
    /// random letters it settles below the strong level, and its payload stays within a few
    /// percent of the strong one's.
    #[test]
    fn adaptive_effort_seals_batches_that_verify_alike() {
        let kp = Keypair::from_seed([9; 32]);
        let mut squeeze = Squeeze::adaptive();
        let mut prev = None;
        for seq in 1..=3u64 {
            let ops = letter_ops(3_000, seq);
            let pos = ChainPosition { seq, prev };
            let b = seal_squeezed(&kp, "ns", pos, ops.clone(), None, None, &mut squeeze).unwrap();
            let strong = seal(&kp, "ns", pos, ops.clone(), None).unwrap();
            assert_eq!(b.header.enc, ENC_COMPACT_ZSTD);
            assert!(b.bytes.len() * 100 <= strong.bytes.len() * 105);
            let v = verify(b.bytes.clone()).unwrap();
            assert_eq!(v.ops.to_vec().unwrap(), ops);
            assert_eq!(v.id, b.id);
            prev = Some(b.id);
        }
        assert!(!squeeze.is_strong());
        // The first (a probe) keeps the smallest frame, strong; the next two are below it
        // (the fast level here: its matches save 5% over the fastest on these ops).
        assert_eq!(squeeze.fast_batches(), 2);
    }

    fn ops(n: u64) -> Vec<Op> {
        (0..n)
            .map(|i| Op::Upsert {
                collection: "users".into(),
                key: format!("k{i}"),
                hlc: Hlc::new(1_000 + i, 0),
                fields: crate::OpFields::from([(
                    "name".to_string(),
                    serde_json::json!(format!("n{i}")),
                )]),
            })
            .collect()
    }

    fn first() -> ChainPosition {
        ChainPosition { seq: 1, prev: None }
    }

    #[test]
    fn seal_then_verify_roundtrips() {
        let kp = Keypair::generate();
        let b = seal(&kp, "default", first(), ops(10), None).unwrap();
        let v = verify(b.bytes.clone()).unwrap();
        assert_eq!(v, b);
        assert_eq!(Envelope::parse(&b.bytes).unwrap().id(), b.id);
    }

    #[test]
    fn envelope_is_plain_cbor() {
        let kp = Keypair::generate();
        let b = seal(&kp, "default", first(), ops(3), None).unwrap();
        let parts: Vec<serde_bytes::ByteBuf> = ciborium::from_reader(&b.bytes[..]).unwrap();
        assert_eq!(parts.len(), 3);
        let header: BatchHeader = ciborium::from_reader(&parts[0][..]).unwrap();
        assert_eq!(header, b.header);
        assert_eq!(header.enc, ENC_COMPACT);
        let generic: ciborium::Value = ciborium::from_reader(&parts[2][..]).unwrap();
        assert_eq!(generic.as_array().unwrap()[2].as_array().unwrap().len(), 3);
        assert_eq!(
            crate::codec::decode(&parts[2]).unwrap().to_ops(),
            b.ops.to_vec().unwrap()
        );
    }

    #[test]
    fn large_payloads_are_compressed_and_roundtrip() {
        let kp = Keypair::generate();
        let b = seal(&kp, "default", first(), ops(300), None).unwrap();
        assert_eq!(b.header.enc, ENC_COMPACT_ZSTD);
        let mut plain = Vec::new();
        crate::codec::encode_ops(&b.ops.to_vec().unwrap(), &mut plain);
        let plain_len = plain.len();
        assert!(
            (b.header.payload_len as usize) < plain_len / 2,
            "compression did not pay"
        );
        assert_eq!(verify(b.bytes.clone()).unwrap(), b);
        let small = seal(&kp, "default", first(), ops(2), None).unwrap();
        assert_eq!(small.header.enc, ENC_COMPACT);
    }

    /// A payload that inflates beyond the limit is refused, however small it is on the wire.
    #[test]
    fn decompression_bombs_are_refused() {
        let kp = Keypair::generate();
        let bomb =
            zstd::bulk::compress(&vec![0u8; limits::MAX_PAYLOAD_PLAIN_BYTES + 1], 3).unwrap();
        let b = seal(&kp, "default", first(), ops(1), None).unwrap();
        assert!(bomb.len() < 4096);
        for enc in [ENC_ZSTD, ENC_COMPACT_ZSTD] {
            let bytes = resign(&kp, b.header.clone(), &bomb, enc);
            assert!(matches!(verify(bytes), Err(BatchError::Malformed(m)) if m.contains("zstd")));
        }
    }

    /// A dictionary-compressed payload that inflates beyond the limit is refused too.
    #[test]
    fn dict_decompression_bombs_are_refused() {
        let kp = Keypair::generate();
        let d = Dict::new(vec![0u8; 1024]).unwrap();
        let bomb = zstd::bulk::Compressor::with_dictionary(3, d.bytes())
            .unwrap()
            .compress(&vec![0u8; limits::MAX_PAYLOAD_PLAIN_BYTES + 1])
            .unwrap();
        let b = seal(&kp, "default", first(), ops(1), None).unwrap();
        let mut h = b.header.clone();
        h.enc = ENC_COMPACT_ZSTD_DICT;
        h.dict = Some(d.dict_ref());
        h.payload_len = bomb.len() as u32;
        h.payload_hash = *blake3::keyed_hash(&d.id().0, &bomb).as_bytes();
        let header_bytes = to_cbor(&h);
        let mut signed = SIGNING_CONTEXT.to_vec();
        signed.extend_from_slice(&header_bytes);
        let mut bytes = vec![0x83];
        write_bstr(&mut bytes, &header_bytes);
        write_bstr(&mut bytes, &kp.sign(&signed));
        write_bstr(&mut bytes, &bomb);
        let res = verify_with(bytes, &set_of(&d));
        assert!(matches!(res, Err(BatchError::Malformed(m)) if m.contains("zstd")));
    }

    /// Re-signs a batch with its payload replaced (test helper for hand-made batches).
    fn resign(kp: &Keypair, mut header: BatchHeader, payload: &[u8], enc: u8) -> Vec<u8> {
        header.enc = enc;
        header.payload_len = payload.len() as u32;
        header.payload_hash = *blake3::hash(payload).as_bytes();
        let header_bytes = to_cbor(&header);
        let mut signed = SIGNING_CONTEXT.to_vec();
        signed.extend_from_slice(&header_bytes);
        let sig = kp.sign(&signed);
        let mut bytes = vec![0x83];
        write_bstr(&mut bytes, &header_bytes);
        write_bstr(&mut bytes, &sig);
        write_bstr(&mut bytes, payload);
        bytes
    }

    /// Logs written before the compact codec (serde layout, plain or zstd) still verify.
    #[test]
    fn legacy_serde_payloads_still_verify() {
        let kp = Keypair::generate();
        let b = seal(&kp, "default", first(), ops(300), None).unwrap();
        let legacy = to_cbor(&b.ops.to_vec().unwrap());
        for (payload, enc) in [
            (legacy.clone(), ENC_CBOR),
            (zstd::bulk::compress(&legacy, 1).unwrap(), ENC_ZSTD),
        ] {
            let v = verify(resign(&kp, b.header.clone(), &payload, enc)).unwrap();
            assert_eq!(v.ops, b.ops);
        }
        // A compact payload labelled as legacy (and the reverse) is refused.
        let mut compact = Vec::new();
        crate::codec::encode_ops(&b.ops.to_vec().unwrap(), &mut compact);
        assert!(verify(resign(&kp, b.header.clone(), &compact, ENC_CBOR)).is_err());
        assert!(verify(resign(&kp, b.header.clone(), &legacy, ENC_COMPACT)).is_err());
        assert!(verify(resign(&kp, b.header.clone(), &compact, 9)).is_err());
    }

    /// Ops that break a rule are refused at verification with the op's own error, even when
    /// correctly signed.
    #[test]
    fn signed_invalid_ops_are_refused() {
        let kp = Keypair::generate();
        let b = seal(&kp, "default", first(), ops(2), None).unwrap();
        let mut bad = ops(2);
        if let Op::Upsert { collection, .. } = &mut bad[1] {
            *collection = "_revocations".into();
        }
        let mut compact = Vec::new();
        crate::codec::encode_ops(&bad, &mut compact);
        assert!(matches!(
            verify(resign(&kp, b.header.clone(), &compact, ENC_COMPACT)),
            Err(BatchError::InvalidOp(_))
        ));
        let mut unordered = ops(2);
        unordered.swap(0, 1);
        let mut compact = Vec::new();
        crate::codec::encode_ops(&unordered, &mut compact);
        assert!(matches!(
            verify(resign(&kp, b.header.clone(), &compact, ENC_COMPACT)),
            Err(BatchError::Inconsistent(_))
        ));
    }

    proptest::proptest! {
        /// Whatever path sealing takes (compact plain or zstd, by size), verification gives
        /// back exactly the sealed ops, and the old serde path gives the same ops too.
        #[test]
        fn every_encoding_path_gives_the_same_ops(
            ops in crate::codec::tests::arb_ops(),
            repeat in 1usize..40,
        ) {
            let kp = Keypair::from_seed([9; 32]);
            let mut ops: Vec<Op> = ops.into_iter().filter(|o| o.validate().is_ok()).collect();
            proptest::prop_assume!(!ops.is_empty());
            // Repeating the list (with later timestamps) pushes some batches past the
            // compression threshold.
            let span = ops[ops.len() - 1].hlc().0 - ops[0].hlc().0 + 1;
            let one = ops.clone();
            for r in 1..repeat as u64 {
                ops.extend(one.iter().cloned().map(|mut o| {
                    o.set_hlc(Hlc(o.hlc().0 + r * span));
                    o
                }));
            }
            ops.truncate(limits::MAX_OPS_PER_BATCH);
            let b = seal(&kp, "default", first(), ops.clone(), None).unwrap();
            proptest::prop_assert!(b.header.enc == ENC_COMPACT || b.header.enc == ENC_COMPACT_ZSTD);
            let v = verify(b.bytes.clone()).unwrap();
            proptest::prop_assert_eq!(&v.ops.to_vec().unwrap(), &ops);
            let legacy = resign(&kp, b.header.clone(), &to_cbor(&ops), ENC_CBOR);
            proptest::prop_assert_eq!(&verify(legacy).unwrap().ops.to_vec().unwrap(), &ops);
        }
    }

    /// A dictionary that holds the payload's own text: zstd then always wins with it.
    fn dict_for(ops: &[Op]) -> Dict {
        let mut plain = Vec::new();
        crate::codec::encode_ops(ops, &mut plain);
        plain.truncate(limits::MAX_DICT_BYTES);
        plain.extend_from_slice(b"users name");
        plain.truncate(limits::MAX_DICT_BYTES);
        Dict::new(plain).unwrap()
    }

    fn set_of(d: &Dict) -> crate::dict::DictSet {
        let mut set = crate::dict::DictSet::new();
        set.insert(d.clone());
        set
    }

    proptest::proptest! {
        /// Every payload sealed with a dictionary verifies to exactly the sealed ops; without
        /// the dictionary it is "missing" (not invalid); with another dictionary under the
        /// same ref, or the right one's bytes tampered with, it is refused.
        #[test]
        fn dict_payloads_verify_to_the_sealed_ops(
            ops in crate::codec::tests::arb_ops(),
            flip in proptest::prelude::any::<proptest::sample::Index>(),
            repeat in 1usize..8,
        ) {
            let kp = Keypair::from_seed([5; 32]);
            let mut ops: Vec<Op> = ops.into_iter().filter(|o| o.validate().is_ok()).collect();
            proptest::prop_assume!(!ops.is_empty());
            // Repeating the list (with later timestamps) makes payloads big enough for the
            // dictionary to pay for its header bytes.
            let span = ops[ops.len() - 1].hlc().0 - ops[0].hlc().0 + 1;
            let one = ops.clone();
            for r in 1..repeat as u64 {
                ops.extend(one.iter().cloned().map(|mut o| {
                    o.set_hlc(Hlc(o.hlc().0 + r * span));
                    o
                }));
            }
            let dict = dict_for(&ops);
            let b = seal_with(&kp, "default", first(), ops.clone(), None, Some(&dict)).unwrap();
            let without = seal(&kp, "default", first(), ops.clone(), None).unwrap();
            if b.header.dict.is_none() {
                // Not worth it (tiny payload, or too many ops): sealed as without it.
                proptest::prop_assert_eq!(&b, &without);
                return Ok(());
            }
            proptest::prop_assert!(ops.len() < DICT_OPS_MAX);
            proptest::prop_assert!(b.bytes.len() < without.bytes.len());
            proptest::prop_assert_eq!(b.header.enc, ENC_COMPACT_ZSTD_DICT);
            proptest::prop_assert_eq!(b.header.dict, Some(dict.dict_ref()));
            proptest::prop_assert_eq!(b.dict.as_ref(), Some(&dict));
            let v = verify_with(b.bytes.clone(), &set_of(&dict)).unwrap();
            proptest::prop_assert_eq!(&v.ops.to_vec().unwrap(), &ops);
            proptest::prop_assert_eq!(&v, &b);
            proptest::prop_assert_eq!(
                verify(b.bytes.clone()),
                Err(BatchError::MissingDict(dict.dict_ref()))
            );
            // Another dictionary offered under the batch's ref (a lookup that lies).
            let other = Dict::new(b"some other dictionary".to_vec()).unwrap();
            let liar = |_: DictRef| vec![other.clone()];
            proptest::prop_assert!(verify_with(b.bytes.clone(), &liar).is_err());
            // The right dictionary with one byte changed: another id, refused.
            let mut bytes = dict.bytes().to_vec();
            let i = flip.index(bytes.len());
            bytes[i] ^= 0x01;
            let tampered = Dict::new(bytes).unwrap();
            proptest::prop_assert_ne!(tampered.id(), dict.id());
            let tampered_lookup = |_: DictRef| vec![tampered.clone()];
            proptest::prop_assert!(verify_with(b.bytes.clone(), &tampered_lookup).is_err());
        }
    }

    /// The header of a batch without a dictionary is byte for byte what it was before the
    /// `dict` field existed (the struct as it was, encoded the same way), so every stored and
    /// relayed batch keeps its id and stays canonical.
    #[test]
    fn headers_without_a_dict_are_unchanged() {
        #[derive(Serialize)]
        struct HeaderBeforeDicts {
            v: u8,
            ns: String,
            #[serde(with = "serde_bytes")]
            author: [u8; 32],
            seq: u64,
            prev: Option<BatchId>,
            hlc_min: Hlc,
            hlc_max: Hlc,
            ops: u32,
            payload_len: u32,
            #[serde(with = "serde_bytes")]
            payload_hash: [u8; 32],
            cap: Option<serde_bytes::ByteBuf>,
            enc: u8,
        }
        let kp = Keypair::from_seed([1; 32]);
        let b = seal(&kp, "default", first(), ops(3), None).unwrap();
        let h = b.header.clone();
        let old = HeaderBeforeDicts {
            v: h.v,
            ns: h.ns.clone(),
            author: h.author,
            seq: h.seq,
            prev: h.prev,
            hlc_min: h.hlc_min,
            hlc_max: h.hlc_max,
            ops: h.ops,
            payload_len: h.payload_len,
            payload_hash: h.payload_hash,
            cap: h.cap.clone(),
            enc: h.enc,
        };
        let env = Envelope::parse(&b.bytes).unwrap();
        assert_eq!(env.header, to_cbor(&old).as_slice());
        // Snapshot: a change to the header's encoding shows up here in review.
        let hex: String = env.header.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, GOLDEN_HEADER_HEX);
        // And with a dictionary, the field comes last, so the map's other keys keep their
        // order; a header that spells `dict: null` is not canonical.
        let d = dict_for(&ops(3));
        let with = seal_with(&kp, "default", first(), ops(3), None, Some(&d)).unwrap();
        let wenv = Envelope::parse(&with.bytes).unwrap();
        assert!(wenv
            .header
            .ends_with(&[&[0x64][..], b"dict", &[0x48], &d.dict_ref().0].concat()));
        assert_eq!(named_dict(&with.bytes), Some(d.dict_ref()));
        assert_eq!(named_dict(&b.bytes), None);
        let mut null_dict = env.header[..env.header.len()].to_vec();
        null_dict[0] += 1; // one more map entry
        null_dict.extend_from_slice(&[0x64, b'd', b'i', b'c', b't', 0xf6]);
        let mut bytes = vec![0x83];
        write_bstr(&mut bytes, &null_dict);
        write_bstr(&mut bytes, env.signature);
        write_bstr(&mut bytes, env.payload);
        assert!(matches!(verify(bytes), Err(BatchError::Malformed(m)) if m.contains("canonical")));
    }

    /// A dictionary is used only where it makes the batch smaller, and never from
    /// [`DICT_OPS_MAX`] ops up.
    #[test]
    fn dicts_are_used_only_where_they_pay() {
        let kp = Keypair::from_seed([2; 32]);
        let useless = Dict::new(vec![0xee; 64]).unwrap();
        let b = seal_with(&kp, "default", first(), ops(1), None, Some(&useless)).unwrap();
        assert_eq!(b.header.enc, ENC_COMPACT);
        assert!(b.dict.is_none());
        let big = ops(DICT_OPS_MAX as u64);
        let d = dict_for(&big);
        let b = seal_with(&kp, "default", first(), big, None, Some(&d)).unwrap();
        assert_eq!(b.header.enc, ENC_COMPACT_ZSTD);
        let d = dict_for(&ops(1));
        let b = seal_with(&kp, "default", first(), ops(1), None, Some(&d)).unwrap();
        assert_eq!(b.header.enc, ENC_COMPACT_ZSTD_DICT);
        let plain = seal(&kp, "default", first(), ops(1), None).unwrap();
        assert!(b.bytes.len() < plain.bytes.len());
    }

    /// A header that names a dictionary with another encoding (or enc 4 without one) is
    /// inconsistent, even when correctly signed.
    #[test]
    fn dict_and_enc_go_together() {
        let kp = Keypair::generate();
        let b = seal(&kp, "default", first(), ops(2), None).unwrap();
        let mut h = b.header.clone();
        h.dict = Some(DictRef([1; 8]));
        let env = Envelope::parse(&b.bytes).unwrap();
        let bytes = resign(&kp, h, env.payload, ENC_COMPACT);
        assert!(matches!(verify(bytes), Err(BatchError::Inconsistent(_))));
        let bytes = resign(&kp, b.header.clone(), env.payload, ENC_COMPACT_ZSTD_DICT);
        assert!(matches!(verify(bytes), Err(BatchError::Inconsistent(_))));
    }

    /// `check_stored` passes a batch as sealed (plain, zstd, with a dictionary) and fails
    /// every single-bit change of its bytes, a batch under another id, and a dictionary
    /// batch whose dictionary is not among the candidates, without inflating anything.
    #[test]
    fn check_stored_finds_any_damage() {
        let kp = Keypair::from_seed([3; 32]);
        let d = dict_for(&ops(1));
        let batches = [
            seal(&kp, "default", first(), ops(3), None).unwrap(),
            seal(&kp, "default", first(), letter_ops(200, 5), None).unwrap(),
            seal_with(&kp, "default", first(), ops(1), None, Some(&d)).unwrap(),
        ];
        assert_eq!(batches[1].header.enc, ENC_COMPACT_ZSTD);
        assert_eq!(batches[2].header.enc, ENC_COMPACT_ZSTD_DICT);
        let held = |r: DictRef| {
            assert_eq!(r, d.dict_ref());
            vec![DictId([7; 32]), d.id()]
        };
        for b in &batches {
            check_stored(&b.bytes, &b.id, held).unwrap();
            assert!(check_stored(&b.bytes, &BatchId([0; 32]), held).is_err());
            let mut bytes = b.bytes.to_vec();
            for i in 0..bytes.len() {
                for bit in [0x01, 0x80] {
                    bytes[i] ^= bit;
                    assert!(
                        check_stored(&bytes, &b.id, held).is_err(),
                        "byte {i} of {} flipped passed",
                        bytes.len()
                    );
                    bytes[i] ^= bit;
                }
            }
            check_stored(&bytes, &b.id, held).unwrap();
        }
        let b = &batches[2];
        assert!(matches!(
            check_stored(&b.bytes, &b.id, |_| Vec::new()),
            Err(BatchError::MissingDict(_))
        ));
        assert!(matches!(
            check_stored(&b.bytes, &b.id, |_| vec![DictId([7; 32])]),
            Err(BatchError::PayloadMismatch)
        ));
    }

    /// `Envelope::header_of` reads the header from any front of the envelope that holds
    /// it, and refuses (never panics on) every shorter one.
    #[test]
    fn header_of_reads_the_front_only() {
        let kp = Keypair::from_seed([4; 32]);
        let b = seal(&kp, "default", first(), letter_ops(300, 9), None).unwrap();
        let env = Envelope::parse(&b.bytes).unwrap();
        let header_end =
            env.header.as_ptr() as usize - b.bytes.as_ptr() as usize + env.header.len();
        for cut in 0..=b.bytes.len() {
            let got = Envelope::header_of(&b.bytes[..cut]);
            if cut >= header_end {
                assert_eq!(got.unwrap(), env.header, "cut {cut}");
            } else {
                assert!(got.is_err(), "cut {cut}");
            }
        }
    }

    /// What `headers_without_a_dict_are_unchanged` expects (3 ops, key seed [1; 32]).
    const GOLDEN_HEADER_HEX: &str = "ac617601626e736764656661756c7466617574686f7258208a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf3748801b40f6f5c63736571016470726576f667686c635f6d696e1a03e8000067686c635f6d61781a03ea0000636f7073036b7061796c6f61645f6c656e183f6c7061796c6f61645f6861736858203317aa8caed86054de3b1083cc0b213a33374c7dfb4782beb545b6b33ef4b64863636170f663656e6302";

    #[test]
    fn tampering_is_detected() {
        let kp = Keypair::generate();
        let b = seal(&kp, "default", first(), ops(5), None).unwrap();
        // Flip every byte position in turn: no single-byte change may verify.
        for i in 0..b.bytes.len() {
            let mut t = b.bytes.to_vec();
            t[i] ^= 0x01;
            assert!(verify(t).is_err(), "flip at {i} accepted");
        }
        assert!(verify(b.bytes[..b.bytes.len() - 1].to_vec()).is_err());
        let mut longer = b.bytes.to_vec();
        longer.push(0);
        assert!(verify(longer).is_err());
    }

    #[test]
    fn forged_author_is_rejected() {
        let kp = Keypair::generate();
        let other = Keypair::generate();
        let b = seal(&kp, "default", first(), ops(2), None).unwrap();
        let forged = seal(&other, "default", first(), ops(2), None).unwrap();
        // Splice a valid signature of another key onto the header.
        let env = Envelope::parse(&b.bytes).unwrap();
        let fenv = Envelope::parse(&forged.bytes).unwrap();
        let mut spliced = vec![0x83];
        write_bstr(&mut spliced, env.header);
        write_bstr(&mut spliced, fenv.signature);
        write_bstr(&mut spliced, env.payload);
        assert_eq!(verify(spliced), Err(BatchError::BadSignature));
    }

    #[test]
    fn limits_are_enforced_on_seal() {
        let kp = Keypair::generate();
        assert!(seal(&kp, "default", first(), vec![], None).is_err());
        assert!(seal(&kp, "Bad NS", first(), ops(1), None).is_err());
        let mut unordered = ops(2);
        unordered.swap(0, 1);
        assert!(seal(&kp, "default", first(), unordered, None).is_err());
        assert!(seal(
            &kp,
            "default",
            ChainPosition { seq: 2, prev: None },
            ops(1),
            None
        )
        .is_err());
        assert!(verify(vec![0u8; limits::MAX_BATCH_BYTES + 1]).is_err());
    }
}
