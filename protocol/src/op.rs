//! Operations: what a batch carries.
//!
//! Field names on the wire are one letter (`c` collection, `k` key, `h` HLC, `f` fields/field,
//! `d` delta): an op is encoded millions of times, names are paid for every time.

use serde::{Deserialize, Serialize};

use crate::hlc::Hlc;
use crate::limits;
use crate::name_map::OpFields;

/// A JSON-like value held in a field.
pub type Value = serde_json::Value;

/// One change to one record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Op {
    /// Sets the given fields (last writer wins per field, by HLC then author).
    #[serde(rename = "u")]
    Upsert {
        /// Collection name.
        #[serde(rename = "c")]
        collection: String,
        /// Record key.
        #[serde(rename = "k")]
        key: String,
        /// Timestamp of this op (assigned by the writing node).
        #[serde(rename = "h")]
        hlc: Hlc,
        /// Fields to set.
        #[serde(rename = "f")]
        fields: OpFields,
    },
    /// Deletes the record: hides every field written before it (a tombstone).
    #[serde(rename = "d")]
    Delete {
        /// Collection name.
        #[serde(rename = "c")]
        collection: String,
        /// Record key.
        #[serde(rename = "k")]
        key: String,
        /// Timestamp of this op.
        #[serde(rename = "h")]
        hlc: Hlc,
    },
    /// Revokes a capability token (and every token delegated from it) from `hlc` on. Only an
    /// admin of the namespace may write it. Materialized as a record of the reserved
    /// collection [`REVOCATIONS_COLLECTION`], keyed by the token id (hex).
    #[serde(rename = "r")]
    Revoke {
        /// Id of the revoked token (64 lowercase hex digits).
        #[serde(rename = "k")]
        token: String,
        /// Timestamp of this op: batches after it that rely on the token stop counting.
        #[serde(rename = "h")]
        hlc: Hlc,
    },
    /// Adds `delta` to a numeric field; concurrent adds all count.
    #[serde(rename = "a")]
    CounterAdd {
        /// Collection name.
        #[serde(rename = "c")]
        collection: String,
        /// Record key.
        #[serde(rename = "k")]
        key: String,
        /// Timestamp of this op.
        #[serde(rename = "h")]
        hlc: Hlc,
        /// Field holding the counter.
        #[serde(rename = "f")]
        field: String,
        /// Amount to add (may be negative).
        #[serde(rename = "d")]
        delta: i64,
    },
}

/// Reserved collection holding revocations (collections starting with `_` are reserved).
pub const REVOCATIONS_COLLECTION: &str = "_revocations";

/// Why an op (or a name) is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OpError {
    /// A name is empty, too long or has characters outside its alphabet.
    #[error("invalid {what} {value:?}: {reason}")]
    InvalidName {
        /// Which kind of name.
        what: &'static str,
        /// The offending name (truncated).
        value: String,
        /// What is wrong.
        reason: String,
    },
    /// A field value is too large or too deeply nested.
    #[error("field {field:?}: {reason}")]
    InvalidValue {
        /// Field name.
        field: String,
        /// What is wrong.
        reason: String,
    },
    /// More ops in one call than a batch holds.
    #[error("too many ops in one call: the limit is {max}")]
    TooManyOps {
        /// The limit.
        max: usize,
    },
    /// A call's ops, encoded, would exceed what a batch's payload may hold.
    #[error("a call's ops exceed {max} bytes encoded")]
    CallTooLarge {
        /// The limit.
        max: usize,
    },
    /// An upsert with too many fields.
    #[error("too many fields: {count} > {max}", max = limits::MAX_FIELDS_PER_UPSERT)]
    TooManyFields {
        /// How many fields were given.
        count: usize,
    },
}

impl Op {
    /// Collection of the record this op touches.
    pub fn collection(&self) -> &str {
        match self {
            Op::Upsert { collection, .. }
            | Op::Delete { collection, .. }
            | Op::CounterAdd { collection, .. } => collection,
            Op::Revoke { .. } => REVOCATIONS_COLLECTION,
        }
    }

    /// Key of the record this op touches.
    pub fn key(&self) -> &str {
        match self {
            Op::Upsert { key, .. } | Op::Delete { key, .. } | Op::CounterAdd { key, .. } => key,
            Op::Revoke { token, .. } => token,
        }
    }

    /// Timestamp of this op.
    pub fn hlc(&self) -> Hlc {
        match self {
            Op::Upsert { hlc, .. }
            | Op::Delete { hlc, .. }
            | Op::CounterAdd { hlc, .. }
            | Op::Revoke { hlc, .. } => *hlc,
        }
    }

    /// Sets the timestamp (the writing node stamps ops just before sealing a batch).
    pub fn set_hlc(&mut self, new: Hlc) {
        match self {
            Op::Upsert { hlc, .. }
            | Op::Delete { hlc, .. }
            | Op::CounterAdd { hlc, .. }
            | Op::Revoke { hlc, .. } => *hlc = new,
        }
    }

    /// Checks every limit and naming rule. Ops from any source pass through here before they
    /// are sealed into a batch or accepted from a peer.
    pub fn validate(&self) -> Result<(), OpError> {
        self.checked_len().map(drop)
    }

    /// [`Op::validate`] and [`Op::approx_len`] in one walk over the fields: the size of a
    /// valid op, or why it is invalid. Writers check and size every op of a call; walking its
    /// fields once instead of twice matters at millions of ops per second.
    pub fn checked_len(&self) -> Result<usize, OpError> {
        if let Op::Revoke { token, .. } = self {
            validate_token_id(token)?;
            return Ok(self.approx_len());
        }
        validate_user_collection(self.collection())?;
        validate_key(self.key())?;
        match self {
            Op::Upsert {
                collection,
                key,
                fields,
                ..
            } => {
                if fields.len() > limits::MAX_FIELDS_PER_UPSERT {
                    return Err(OpError::TooManyFields {
                        count: fields.len(),
                    });
                }
                upsert_len(collection, key, fields, |name, value| {
                    validate_field_name(name)?;
                    validate_value(name, value)
                })
            }
            Op::CounterAdd { field, .. } => {
                validate_field_name(field)?;
                Ok(self.approx_len())
            }
            Op::Delete { .. } | Op::Revoke { .. } => Ok(self.approx_len()),
        }
    }

    /// Approximate encoded size of this op in bytes (names, values and a fixed allowance for
    /// the op's tag and timestamp). Used to plan batch sizes before sealing; the sealed size
    /// is what the limits are checked against.
    pub fn approx_len(&self) -> usize {
        match self {
            Op::Upsert {
                collection,
                key,
                fields,
                ..
            } => {
                let Ok(len) = upsert_len(collection, key, fields, |_, v| {
                    Ok::<_, std::convert::Infallible>(
                        value_size(v, 0).unwrap_or(limits::MAX_VALUE_BYTES),
                    )
                });
                len
            }
            Op::Delete {
                collection, key, ..
            } => collection.len() + key.len() + OP_FIXED_BYTES,
            Op::CounterAdd {
                collection,
                key,
                field,
                ..
            } => collection.len() + key.len() + field.len() + OP_FIXED_BYTES + 9,
            Op::Revoke { token, .. } => token.len() + OP_FIXED_BYTES,
        }
    }
}

fn name_error(what: &'static str, value: &str, reason: impl Into<String>) -> OpError {
    OpError::InvalidName {
        what,
        value: value.chars().take(80).collect(),
        reason: reason.into(),
    }
}

/// Namespace names: 1–64 bytes of `a-z 0-9 . _ -`.
pub fn validate_namespace(ns: &str) -> Result<(), OpError> {
    validate_ident("namespace", ns, limits::MAX_NAMESPACE_LEN, |c| {
        c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-')
    })
}

/// Collection names: 1–64 bytes of `A-Z a-z 0-9 . _ -`.
pub fn validate_collection(c: &str) -> Result<(), OpError> {
    validate_ident("collection", c, limits::MAX_COLLECTION_LEN, |c| {
        c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
    })
}

fn validate_ident(
    what: &'static str,
    s: &str,
    max: usize,
    allowed: impl Fn(char) -> bool,
) -> Result<(), OpError> {
    if s.is_empty() {
        return Err(name_error(what, s, "must not be empty"));
    }
    if s.len() > max {
        return Err(name_error(what, s, format!("longer than {max} bytes")));
    }
    if let Some(bad) = s.chars().find(|c| !allowed(*c)) {
        return Err(name_error(
            what,
            s,
            format!("character {bad:?} not allowed"),
        ));
    }
    Ok(())
}

/// Collections user ops may touch: a valid collection name not starting with `_` (reserved).
pub fn validate_user_collection(c: &str) -> Result<(), OpError> {
    validate_collection(c)?;
    if c.starts_with('_') {
        return Err(name_error(
            "collection",
            c,
            "collections starting with '_' are reserved",
        ));
    }
    Ok(())
}

/// Capability token ids (in revocations): 64 lowercase hex digits.
pub fn validate_token_id(token: &str) -> Result<(), OpError> {
    if token.len() != 64
        || !token
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(name_error(
            "token id",
            token,
            "expected 64 lowercase hex digits",
        ));
    }
    Ok(())
}

/// Record keys: 1–256 bytes of UTF-8 without control characters.
pub fn validate_key(k: &str) -> Result<(), OpError> {
    validate_text("key", k, limits::MAX_KEY_LEN)
}

/// Field names: 1–128 bytes of UTF-8 without control characters.
pub fn validate_field_name(f: &str) -> Result<(), OpError> {
    validate_text("field name", f, limits::MAX_FIELD_NAME_LEN)
}

fn validate_text(what: &'static str, s: &str, max: usize) -> Result<(), OpError> {
    if s.is_empty() {
        return Err(name_error(what, s, "must not be empty"));
    }
    if s.len() > max {
        return Err(name_error(what, s, format!("longer than {max} bytes")));
    }
    // Printable ASCII (most keys) passes in one loop over the bytes; anything else is checked
    // by its chars (for ASCII, `char::is_control` is exactly 0x00–0x1f and 0x7f).
    let printable = s.bytes().all(|b| (0x20..0x7f).contains(&b));
    if !printable && s.chars().any(char::is_control) {
        return Err(name_error(what, s, "control characters not allowed"));
    }
    Ok(())
}

/// A writer's ops, each checked once by [`Op::checked_len`], with their summed approximate
/// size. The engine seals these without walking every op's fields again (a node checks a
/// call's ops on the caller's task, where a bad op gets its error before anything is queued;
/// the actor, which every write passes through in turn, then only encodes them). Only the
/// timestamps can change once checked, and no check depends on them.
///
/// A large call may already be pruned and encoded ([`CheckedOps::encode_ahead`], or built
/// as a payload by [`crate::OpsBuilder`]): then the engine never touches its ops, and the
/// owned ops, if any, are only kept for their writer to free.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CheckedOps {
    ops: Vec<Op>,
    /// Ops to seal: `ops.len()`, or the payload's count if encoded ahead.
    len: usize,
    bytes: usize,
    /// The ops pruned and encoded on their writer's task.
    ahead: Option<Ahead>,
}

/// A payload encoded ahead of sealing. The ops were stamped with provisional timestamps
/// [`AHEAD_BASE`] + their index in the call, then pruned, then encoded: a call's ops are
/// stamped with one clock tick each, consecutive, so once the first real stamp is known,
/// every op's is (its provisional one, shifted), and every delta between stamps in the
/// payload is already right. Only the first surviving op's timestamp (`hlc_base`, at
/// `base_at`) is left to write in.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Ahead {
    /// The payload, `hlc_base` provisional.
    pub(crate) plain: Vec<u8>,
    /// Where `hlc_base` (its 9-byte CBOR head) is in `plain`.
    pub(crate) base_at: usize,
    /// Ops in the call before pruning: the ticks it takes.
    pub(crate) stamps: usize,
    /// Ops in the payload (after pruning).
    pub(crate) count: usize,
    /// Provisional indices (in the call) of the first and the last op in the payload.
    pub(crate) first: u64,
    pub(crate) last: u64,
    /// The ops array (`plain[base_at + 9..]`, which stamping leaves as it is) compressed on
    /// the writer's task ([`CheckedOps::compress_ahead`]).
    pub(crate) compressed: Option<crate::squeeze::Precompressed>,
}

/// The first provisional timestamp of a payload encoded ahead: at least 2^32, so its CBOR
/// head has the 9-byte form that any real timestamp (milliseconds since 1970, shifted 16
/// bits) has too.
pub(crate) const AHEAD_BASE: u64 = 1 << 48;

/// A payload encoded ahead, given its real stamps ([`Ahead::stamp`]).
pub(crate) enum Stamped {
    /// The payload, sealed as it is.
    Plain(crate::batch::PlainOps),
    /// The ops with their real stamps, for the sealer to encode (a clock too small for the
    /// 9-byte form of the first stamp: near 1970, as in tests).
    Ops(Vec<Op>),
}

impl Ahead {
    /// Clock ticks the call takes (its ops before pruning).
    pub(crate) fn stamps(&self) -> usize {
        self.stamps
    }

    /// Gives the payload its real stamps, the call's first being `first`: what encoding the
    /// stamped ops gives. `None` if the payload does not decode (it always does: its encoder
    /// made it from checked ops).
    pub(crate) fn stamp(self, first: Hlc) -> Option<Stamped> {
        let (min, max) = (first.0 + self.first, first.0 + self.last);
        let mut plain = self.plain;
        match plain.get_mut(self.base_at..self.base_at + 9) {
            Some(head) if min >= 1 << 32 && head[0] == 0x1b => {
                head[1..].copy_from_slice(&min.to_be_bytes());
                Some(Stamped::Plain(crate::batch::PlainOps {
                    plain,
                    split: self.base_at + 9,
                    ahead: self.compressed,
                    len: self.count,
                    hlc_min: Hlc(min),
                    hlc_max: Hlc(max),
                }))
            }
            _ => {
                let mut ops = crate::codec::decode(&plain).ok()?.to_ops();
                for op in ops.iter_mut() {
                    op.set_hlc(Hlc(first.0 + (op.hlc().0 - AHEAD_BASE)));
                }
                Some(Stamped::Ops(ops))
            }
        }
    }
}

impl CheckedOps {
    /// Checks every op; the first invalid one is the error.
    pub fn new(ops: Vec<Op>) -> Result<Self, OpError> {
        let mut bytes = 0usize;
        for op in &ops {
            bytes = bytes.saturating_add(op.checked_len()?);
        }
        Ok(Self {
            len: ops.len(),
            ops,
            bytes,
            ahead: None,
        })
    }

    /// A payload built ahead ([`crate::OpsBuilder`]), with no owned ops.
    pub(crate) fn from_ahead(ahead: Ahead, bytes: usize) -> Self {
        Self {
            ops: Vec::new(),
            len: ahead.count,
            bytes,
            ahead: Some(ahead),
        }
    }

    /// Prunes and encodes the ops here, on the caller's task, if they will be sealed as a
    /// batch of their own (more than [`crate::coalesce::CALLER_OPS_MAX`] ops, no revocation):
    /// the sealer, which every write passes through in turn, then only writes the first
    /// timestamp into the payload, and never walks the ops again (it used to encode them long
    /// after the writer last touched them: on workload W, ~110 ns per op, half of it cache
    /// misses). The sealed batch is byte for byte the one the sealer would have made from the
    /// same ops (property-tested). The pruned ops stay here, for their writer to free.
    pub fn encode_ahead(&mut self) {
        if self.ahead.is_some()
            || self.ops.len() <= crate::coalesce::CALLER_OPS_MAX
            || self.ops.iter().any(|op| matches!(op, Op::Revoke { .. }))
        {
            return;
        }
        let stamps = self.ops.len();
        for (i, op) in self.ops.iter_mut().enumerate() {
            op.set_hlc(Hlc(AHEAD_BASE + i as u64));
        }
        crate::prune::prune(&mut self.ops);
        let mut plain = Vec::new();
        let base_at = crate::codec::encode_ops(&self.ops, &mut plain);
        let index = |op: Option<&Op>| op.map_or(0, |op| op.hlc().0 - AHEAD_BASE);
        self.len = self.ops.len();
        self.ahead = Some(Ahead {
            plain,
            base_at,
            stamps,
            count: self.ops.len(),
            first: index(self.ops.first()),
            last: index(self.ops.last()),
            compressed: None,
        });
    }

    /// Compresses the ops of a payload encoded ahead at zstd `level` (what the namespace's
    /// writer currently seals large payloads with: [`crate::squeeze::Squeeze::level`]), here
    /// on the caller's task, so the sealer only compresses the payload's few-dozen-byte head.
    /// Changes nothing in the batch that is sealed: the sealer uses this frame only if it
    /// chose the same level, and compresses the ops itself otherwise. Does nothing for calls
    /// not encoded ahead or too small to be compressed in two frames.
    pub fn compress_ahead(&mut self, level: i32) {
        if let Some(a) = self.ahead.as_mut() {
            let body = a.plain.get(a.base_at + 9..).unwrap_or_default();
            if a.compressed.is_none() && a.plain.len() >= crate::batch::SPLIT_MIN_BYTES {
                a.compressed = crate::squeeze::Precompressed::new(body, level);
            }
        }
    }

    /// A payload built ahead without owned ops ([`crate::OpsBuilder`]) as owned ops again
    /// (with its provisional stamps), for the ordinary path.
    pub(crate) fn decode_ahead(&mut self) {
        if let Some(a) = self.ahead.take() {
            if self.ops.is_empty() {
                if let Ok(view) = crate::codec::decode(&a.plain) {
                    self.ops = view.to_ops();
                }
            }
            self.len = self.ops.len();
        }
    }

    /// The payload encoded ahead, if any (taken: the ops are about to change).
    pub(crate) fn take_ahead(&mut self) -> Option<Ahead> {
        self.ahead.take()
    }

    /// Whether the ops were pruned and encoded ahead.
    pub fn is_encoded_ahead(&self) -> bool {
        self.ahead.is_some()
    }

    /// The owned ops: empty for a payload built ahead ([`crate::OpsBuilder`]).
    pub fn ops(&self) -> &[Op] {
        &self.ops
    }

    /// Number of ops (after pruning, if encoded ahead).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are no ops.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether any op is a revocation (never in a call encoded ahead, whose owned ops, if
    /// any, are then not walked again).
    pub fn has_revokes(&self) -> bool {
        self.ahead.is_none() && self.ops.iter().any(|op| matches!(op, Op::Revoke { .. }))
    }

    /// Whether the engine seals these ops in a batch of their own, never coalesced with
    /// other callers' ([`crate::coalesce`]): more than [`crate::coalesce::CALLER_OPS_MAX`]
    /// ops (their batch already amortizes the per-batch costs), or a revocation.
    pub fn sealed_alone(&self) -> bool {
        self.len() > crate::coalesce::CALLER_OPS_MAX || self.has_revokes()
    }

    /// Their approximate encoded size ([`Op::approx_len`] summed).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The first record (collection, key) that `inside` refuses, if any.
    pub fn record_outside(&self, inside: impl Fn(&str, &str) -> bool) -> Option<(String, String)> {
        let outside = |c: &str, k: &str| (!inside(c, k)).then(|| (c.to_string(), k.to_string()));
        match (&self.ahead, self.ops.is_empty()) {
            (Some(a), true) => match crate::codec::decode(&a.plain) {
                Ok(view) => view
                    .ops()
                    .iter()
                    .find_map(|op| outside(view.collection(op), view.key(op))),
                Err(_) => Some(("?".into(), "?".into())),
            },
            _ => self
                .ops
                .iter()
                .find_map(|op| outside(op.collection(), op.key())),
        }
    }

    /// Several writers' checked ops, in order, as one. (A payload encoded ahead is not
    /// carried over: the group is encoded as one. Calls encoded ahead are sealed alone, never
    /// grouped; one built without owned ops is decoded here all the same.)
    pub fn concat<'a>(parts: impl IntoIterator<Item = &'a CheckedOps>) -> Self {
        let mut out = Self::default();
        for p in parts {
            match (&p.ahead, p.ops.is_empty()) {
                (Some(a), true) => {
                    if let Ok(view) = crate::codec::decode(&a.plain) {
                        out.ops.extend(view.to_ops());
                    }
                }
                _ => out.ops.extend_from_slice(&p.ops),
            }
            out.bytes = out.bytes.saturating_add(p.bytes);
        }
        out.len = out.ops.len();
        out
    }

    /// The ops, for the engine to stamp and prune in place (both keep them valid; pruning
    /// can only make [`CheckedOps::bytes`] an overestimate). Not for a call encoded ahead.
    pub(crate) fn ops_mut(&mut self) -> &mut Vec<Op> {
        &mut self.ops
    }

    /// The owned ops (none for a payload built ahead).
    pub fn into_ops(self) -> Vec<Op> {
        self.ops
    }
}

/// Allowance in [`Op::approx_len`] for an op's tag, timestamp and framing.
const OP_FIXED_BYTES: usize = 24;

/// An upsert's approximate size, the one formula behind [`Op::approx_len`] and
/// [`Op::checked_len`]: `value_len` sizes (and may check) each field's value.
fn upsert_len<E>(
    collection: &str,
    key: &str,
    fields: &OpFields,
    mut value_len: impl FnMut(&str, &Value) -> Result<usize, E>,
) -> Result<usize, E> {
    let mut len = collection.len() + key.len() + OP_FIXED_BYTES;
    for (name, value) in fields {
        len += name.len() + 2 + value_len(name, value)?;
    }
    Ok(len)
}

/// Checks a value's nesting and size; returns its approximate encoded size.
pub(crate) fn validate_value(field: &str, v: &Value) -> Result<usize, OpError> {
    let bytes = value_size(v, 0).map_err(|reason| OpError::InvalidValue {
        field: field.chars().take(80).collect(),
        reason,
    })?;
    if bytes > limits::MAX_VALUE_BYTES {
        return Err(value_too_big(field, bytes));
    }
    Ok(bytes)
}

/// The error for a value of about `bytes` bytes, over [`limits::MAX_VALUE_BYTES`].
pub(crate) fn value_too_big(field: &str, bytes: usize) -> OpError {
    OpError::InvalidValue {
        field: field.chars().take(80).collect(),
        reason: format!(
            "value of ~{bytes} bytes exceeds {} bytes",
            limits::MAX_VALUE_BYTES
        ),
    }
}

/// Approximate encoded size of a value, failing on excessive nesting.
fn value_size(v: &Value, depth: usize) -> Result<usize, String> {
    if depth > limits::MAX_VALUE_DEPTH {
        return Err(format!(
            "nested deeper than {} levels",
            limits::MAX_VALUE_DEPTH
        ));
    }
    Ok(match v {
        Value::Null | Value::Bool(_) => 1,
        Value::Number(_) => 9,
        Value::String(s) => s.len() + 5,
        Value::Array(items) => {
            let mut n = 5;
            for i in items {
                n += value_size(i, depth + 1)?;
                if n > limits::MAX_VALUE_BYTES {
                    break;
                }
            }
            n
        }
        Value::Object(map) => {
            let mut n = 5;
            for (k, i) in map {
                n += k.len() + 5 + value_size(i, depth + 1)?;
                if n > limits::MAX_VALUE_BYTES {
                    break;
                }
            }
            n
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// 300 upserts over 200 records (so pruning has work) and a few deletes.
    fn many() -> Vec<Op> {
        (0..300u64)
            .map(|i| match i % 7 {
                6 => Op::Delete {
                    collection: "c".into(),
                    key: format!("k{}", i % 200),
                    hlc: Hlc(0),
                },
                _ => Op::Upsert {
                    collection: "c".into(),
                    key: format!("k{}", i % 200),
                    hlc: Hlc(0),
                    fields: [(format!("f{}", i % 3), json!(i))].into_iter().collect(),
                },
            })
            .collect()
    }

    #[test]
    fn a_payload_encoded_ahead_takes_the_real_timestamps() {
        let mut checked = CheckedOps::new(many()).unwrap();
        checked.encode_ahead();
        assert!(checked.is_encoded_ahead());
        assert!(checked.len() < 300, "pruned first");
        assert_eq!(checked.len(), checked.ops().len());
        let ahead = checked.take_ahead().expect("300 ops are encoded ahead");
        assert_eq!(ahead.stamps(), 300);

        // What the sealer would do without it: stamp all 300, prune, encode.
        let first = Hlc::new(1_800_000_000_000, 7);
        let mut all = many();
        for (i, op) in all.iter_mut().enumerate() {
            op.set_hlc(Hlc(first.0 + i as u64));
        }
        crate::prune::prune(&mut all);
        let mut want = Vec::new();
        crate::codec::encode_ops(&all, &mut want);

        match ahead.clone().stamp(first) {
            Some(Stamped::Plain(p)) => {
                assert_eq!(p.plain, want);
                assert_eq!(p.len, all.len());
                assert_eq!(p.hlc_min, all[0].hlc());
                assert_eq!(p.hlc_max, all[all.len() - 1].hlc());
            }
            _ => panic!("a real clock takes the payload as it is"),
        }
        // A clock too small for the 9-byte form gives the stamped ops to the sealer.
        let early = Hlc(1 << 20);
        let Some(Stamped::Ops(ops)) = ahead.stamp(early) else {
            panic!("a tiny clock re-encodes");
        };
        let shifted: Vec<Hlc> = all
            .iter()
            .map(|o| Hlc(o.hlc().0 - first.0 + early.0))
            .collect();
        assert_eq!(ops.iter().map(Op::hlc).collect::<Vec<_>>(), shifted);
    }

    #[test]
    fn small_calls_and_revocations_are_not_encoded_ahead() {
        let mut few = CheckedOps::new(many()[..crate::coalesce::CALLER_OPS_MAX].to_vec()).unwrap();
        few.encode_ahead();
        assert!(few.take_ahead().is_none());
        let mut ops = many();
        ops.push(Op::Revoke {
            token: "00".repeat(32),
            hlc: Hlc(0),
        });
        let mut revoking = CheckedOps::new(ops).unwrap();
        revoking.encode_ahead();
        assert!(revoking.take_ahead().is_none());
        assert_eq!(revoking.len(), 301, "nothing pruned either");
    }

    fn upsert(fields: Value) -> Op {
        Op::Upsert {
            collection: "c".into(),
            key: "k".into(),
            hlc: Hlc(1),
            fields: serde_json::from_value(fields).unwrap(),
        }
    }

    #[test]
    fn names_are_checked() {
        assert!(validate_namespace("default").is_ok());
        assert!(validate_namespace("Default").is_err());
        assert!(validate_namespace("").is_err());
        assert!(validate_namespace(&"a".repeat(65)).is_err());
        assert!(validate_collection("users_2").is_ok());
        assert!(validate_collection("a/b").is_err());
        let reserved = Op::Delete {
            collection: "_revocations".into(),
            key: "k".into(),
            hlc: Hlc(1),
        };
        assert!(
            reserved.validate().is_err(),
            "user ops must not touch reserved collections"
        );
        let revoke = |t: &str| Op::Revoke {
            token: t.into(),
            hlc: Hlc(1),
        };
        assert!(revoke(&"ab".repeat(32)).validate().is_ok());
        assert!(revoke(&"AB".repeat(32)).validate().is_err());
        assert!(revoke("abc").validate().is_err());
        assert!(validate_key("any key: ünïcode").is_ok());
        assert!(validate_key("bad\nkey").is_err());
        assert!(validate_key(&"k".repeat(257)).is_err());
        // Control characters, ASCII or not, wherever they are; printable edges pass.
        for bad in ["\0", "a\u{1f}", "\u{7f}b", "x\u{85}", "ü\ty"] {
            assert!(validate_key(bad).is_err(), "{bad:?}");
        }
        for good in [" ", "~", "k0000001", "\u{a0}é"] {
            assert!(validate_key(good).is_ok(), "{good:?}");
        }
    }

    #[test]
    fn values_are_bounded() {
        assert!(upsert(json!({"a": 1, "b": "x", "c": [1, {"d": null}]}))
            .validate()
            .is_ok());
        assert!(upsert(json!({"a": "x".repeat(70_000)})).validate().is_err());
        let mut deep = json!(1);
        for _ in 0..40 {
            deep = json!([deep]);
        }
        assert!(upsert(json!({ "a": deep })).validate().is_err());
        let many: serde_json::Map<String, Value> =
            (0..300).map(|i| (format!("f{i}"), json!(i))).collect();
        assert!(matches!(
            upsert(Value::Object(many)).validate(),
            Err(OpError::TooManyFields { .. })
        ));
    }

    proptest::proptest! {
        /// The writer's one-walk check sizes a valid op exactly as `approx_len` does (the
        /// batcher's and the store's size estimates must agree).
        #[test]
        fn checked_len_is_approx_len(op in crate::codec::tests::arb_op()) {
            if let Ok(len) = op.checked_len() {
                proptest::prop_assert_eq!(len, op.approx_len());
            }
        }
    }

    #[test]
    fn checked_len_refuses_what_validate_refuses() {
        let bad = upsert(json!({ "": 1 }));
        assert!(bad.validate().is_err());
        assert_eq!(bad.checked_len().map(drop), bad.validate());
        let good = upsert(json!({ "a": "xyz", "b": [1, 2] }));
        assert_eq!(good.checked_len(), Ok(good.approx_len()));
    }

    #[test]
    fn checked_ops_refuse_any_invalid_op_and_sum_sizes() {
        let good = upsert(json!({ "a": "xyz", "b": [1, 2] }));
        let bad = upsert(json!({ "": 1 }));
        let err = CheckedOps::new(vec![good.clone(), bad.clone(), good.clone()]);
        assert_eq!(err, Err(bad.validate().unwrap_err()));
        let ok = CheckedOps::new(vec![good.clone(), good.clone()]).unwrap();
        assert_eq!(ok.len(), 2);
        assert_eq!(ok.bytes(), 2 * good.approx_len());
        let both = CheckedOps::concat([&ok, &ok]);
        assert_eq!(
            both.ops(),
            &[good.clone(), good.clone(), good.clone(), good][..]
        );
        assert_eq!(both.bytes(), 2 * ok.bytes());
        assert!(CheckedOps::new(Vec::new()).unwrap().is_empty());
    }
}
