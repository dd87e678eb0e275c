//! The compact batch payload codec: hand-written CBOR with interned names and a borrowed
//! (zero-copy) decoder.
//!
//! The payload of a batch sealed with [`crate::batch::ENC_COMPACT`] is plain CBOR that any
//! decoder reads (tested against ciborium), laid out for speed and size:
//!
//! ```text
//! payload = [ names, hlc_base, ops ]
//!   names    = [ tstr, ... ]       every collection and field name used, unique (in order of
//!                                  first use)
//!   hlc_base = uint                timestamp of the first op
//!   ops      = [ op, ... ]
//!   op       = [0, coll, key, dh, { name_idx => value, ... }]   upsert (names increasing)
//!            | [1, coll, key, dh]                                delete
//!            | [2, coll, key, dh, name_idx, delta]               counter add
//!            | [3, token, dh]                                    revoke
//!   coll, name_idx = uint index into names;  key, token = tstr
//!   dh       = uint: timestamp minus the previous op's (the first op's minus hlc_base);
//!              >= 1 after the first op, so timestamps strictly increase by construction
//!   value    = null | bool | int | float64 | tstr | [value, ...] | {tstr => value, ...}
//! ```
//!
//! Names are paid for once per batch instead of once per op, and timestamps cost one byte
//! when ops are sealed together. Decoding validates everything [`Op::validate`] and the
//! batch's timestamp rule check, but allocates nothing per op: [`PayloadView`] holds `&str`
//! slices of the input and field values as raw CBOR ([`ValueRef`]), in three vectors per
//! batch. Owned [`Op`]s are built only on request ([`PayloadView::to_ops`]).

use crate::hlc::Hlc;
use crate::limits;
use crate::op::{Op, OpError, Value, REVOCATIONS_COLLECTION};

const KIND_UPSERT: u64 = 0;
const KIND_DELETE: u64 = 1;
const KIND_ADD: u64 = 2;
const KIND_REVOKE: u64 = 3;

/// Why a compact payload is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    /// Not CBOR of the expected shape.
    #[error("malformed payload: {0}")]
    Malformed(&'static str),
    /// Well-formed, but an op breaks a rule.
    #[error("invalid op: {0}")]
    InvalidOp(#[from] OpError),
    /// Timestamps do not strictly increase, or overflow.
    #[error("op timestamps must strictly increase")]
    Unordered,
}

// ---------------------------------------------------------------------------------------
// Encoding
// ---------------------------------------------------------------------------------------

#[inline(always)]
pub(crate) fn head(out: &mut Vec<u8>, major: u8, n: u64) {
    let m = major << 5;
    if n < 24 {
        out.push(m | n as u8);
    } else if n <= 0xff {
        out.extend_from_slice(&[m | 24, n as u8]);
    } else if n <= 0xffff {
        out.push(m | 25);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    } else if n <= 0xffff_ffff {
        out.push(m | 26);
        out.extend_from_slice(&(n as u32).to_be_bytes());
    } else {
        out.push(m | 27);
        out.extend_from_slice(&n.to_be_bytes());
    }
}

/// Where a payload's ops array starts, given where its `hlc_base` is (what
/// [`encode_ops`] returns): past that unsigned integer's head.
pub(crate) fn ops_at(plain: &[u8], base_at: usize) -> usize {
    let len = match plain.get(base_at).map(|b| b & 0x1f) {
        Some(0..=23) | None => 1,
        Some(24) => 2,
        Some(25) => 3,
        Some(26) => 5,
        Some(_) => 9,
    };
    (base_at + len).min(plain.len())
}

#[inline(always)]
pub(crate) fn tstr(out: &mut Vec<u8>, s: &str) {
    head(out, 3, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

pub(crate) fn int(out: &mut Vec<u8>, v: i64) {
    if v >= 0 {
        head(out, 0, v as u64);
    } else {
        head(out, 1, !(v as u64)); // -1 - v
    }
}

/// Writes a JSON value as CBOR (the layout of field values in payloads and stored records).
pub(crate) fn value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::Null => out.push(0xf6),
        Value::Bool(b) => out.push(if *b { 0xf5 } else { 0xf4 }),
        Value::Number(n) => {
            if let Some(u) = n.as_u64() {
                head(out, 0, u);
            } else if let Some(i) = n.as_i64() {
                int(out, i);
            } else {
                // serde_json numbers are finite.
                out.push(0xfb);
                out.extend_from_slice(&n.as_f64().unwrap_or(0.0).to_be_bytes());
            }
        }
        Value::String(s) => tstr(out, s),
        Value::Array(items) => {
            head(out, 4, items.len() as u64);
            for i in items {
                value(out, i);
            }
        }
        Value::Object(map) => {
            head(out, 5, map.len() as u64);
            for (k, i) in map {
                tstr(out, k);
                value(out, i);
            }
        }
    }
}

/// The distinct names of a batch, numbered in order of first use. Lookups first try the index
/// the same position (collection, first field, ...) had in the previous op: in a batch of
/// same-shaped records that guess is almost always right. Small tables are then searched
/// linearly, large ones through a hash map.
struct Names<'a> {
    list: Vec<&'a str>,
    map: Option<std::collections::HashMap<&'a str, u32>>,
    hint: [u32; 8],
}

impl<'a> Names<'a> {
    const LINEAR_MAX: usize = 16;

    #[inline]
    fn index(&mut self, slot: usize, s: &'a str) -> u64 {
        let slot = slot.min(7);
        let h = self.hint[slot] as usize;
        if self.list.get(h).is_some_and(|n| same_name(n, s)) {
            return h as u64;
        }
        let i = match &mut self.map {
            Some(map) => *map.entry(s).or_insert_with(|| {
                self.list.push(s);
                (self.list.len() - 1) as u32
            }),
            None => match self.list.iter().position(|n| *n == s) {
                Some(i) => i as u32,
                None => {
                    self.list.push(s);
                    if self.list.len() > Self::LINEAR_MAX {
                        self.map = Some(
                            self.list
                                .iter()
                                .enumerate()
                                .map(|(i, n)| (*n, i as u32))
                                .collect(),
                        );
                    }
                    (self.list.len() - 1) as u32
                }
            },
        };
        self.hint[slot] = i;
        u64::from(i)
    }
}

/// String equality without a call into `memcmp`: names are a few bytes long, and comparing
/// them was a quarter of encoding workload W through the library call.
#[inline(always)]
pub(crate) fn same_name(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    if a.len() > 16 {
        return a == b;
    }
    a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

/// Encodes ops as a compact payload, appending to `out`. The ops are not checked here (the
/// sealer checks them first); any op list encodes. One pass over the ops, written straight
/// into `out` behind a gap for the name table (which comes first in the payload and is known
/// only at the end); the gap is as long as this thread's last name table, so a run of
/// same-shaped batches never moves its ops (before, every batch was written to a scratch
/// buffer and copied: ~20% of encoding workload W). A new shape moves them once. Returns
/// where, counted from the start of what it appended, the first op's timestamp (`hlc_base`)
/// is written.
pub fn encode_ops(ops: &[Op], out: &mut Vec<u8>) -> usize {
    thread_local! {
        /// The last payload's prefix length (array head and name table), and its bytes per op.
        static LAST: std::cell::Cell<(usize, usize)> = const { std::cell::Cell::new((0, 0)) };
    }
    let (gap, per_op) = LAST.get();
    let start = out.len();
    out.reserve(gap + ops.len().saturating_mul(per_op).min(SIZE_HINT_MAX) + 16);
    out.resize(start + gap, 0);
    let names = encode_body(ops, out);
    let mut prefix = Vec::with_capacity(8 + names.iter().map(|n| n.len() + 2).sum::<usize>());
    prefix.push(0x83);
    head(&mut prefix, 4, names.len() as u64);
    for n in &names {
        tstr(&mut prefix, n);
    }
    if prefix.len() == gap {
        out[start..start + gap].copy_from_slice(&prefix);
    } else {
        out.splice(start..start + gap, prefix.iter().copied());
    }
    let body = out.len() - start - prefix.len();
    LAST.set((prefix.len(), body / ops.len().max(1) + 1));
    prefix.len()
}

/// The most bytes reserved ahead from the last batch's size per op.
const SIZE_HINT_MAX: usize = 8 << 20;

/// Writes the ops (after the payload's name table, which this returns) to `body`.
fn encode_body<'a>(ops: &'a [Op], body: &mut Vec<u8>) -> Vec<&'a str> {
    let mut names = Names {
        list: Vec::new(),
        map: None,
        hint: [0; 8],
    };
    let base = ops.first().map_or(0, |op| op.hlc().0);
    head(body, 0, base);
    head(body, 4, ops.len() as u64);
    let mut prev = base;
    for op in ops {
        let h = op.hlc().0;
        let dh = h.wrapping_sub(prev);
        prev = h;
        let out = &mut *body;
        match op {
            Op::Upsert {
                collection,
                key,
                fields,
                ..
            } => {
                out.extend_from_slice(&[0x85, KIND_UPSERT as u8]);
                head(out, 0, names.index(0, collection));
                tstr(out, key);
                head(out, 0, dh);
                head(out, 5, fields.len() as u64);
                // BTreeMap order: field names strictly increase, as decoding requires.
                for (slot, (f, v)) in fields.iter().enumerate() {
                    head(out, 0, names.index(slot + 1, f));
                    value(out, v);
                }
            }
            Op::Delete {
                collection, key, ..
            } => {
                out.extend_from_slice(&[0x84, KIND_DELETE as u8]);
                head(out, 0, names.index(0, collection));
                tstr(out, key);
                head(out, 0, dh);
            }
            Op::CounterAdd {
                collection,
                key,
                field,
                delta,
                ..
            } => {
                out.extend_from_slice(&[0x86, KIND_ADD as u8]);
                head(out, 0, names.index(0, collection));
                tstr(out, key);
                head(out, 0, dh);
                head(out, 0, names.index(1, field));
                int(out, *delta);
            }
            Op::Revoke { token, .. } => {
                out.extend_from_slice(&[0x83, KIND_REVOKE as u8]);
                tstr(out, token);
                head(out, 0, dh);
            }
        }
    }
    names.list
}

// ---------------------------------------------------------------------------------------
// Decoding
// ---------------------------------------------------------------------------------------

/// A field value as raw, already validated CBOR bytes borrowed from the payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ValueRef<'a>(pub &'a [u8]);

impl ValueRef<'_> {
    /// The value as an owned JSON value.
    pub fn to_value(&self) -> Value {
        let mut r = Reader { b: self.0, pos: 0 };
        // Validated when the payload was decoded: cannot fail.
        parse_value(&mut r, 0).unwrap_or(Value::Null)
    }
}

/// Appends the canonical encoding of a validated raw value: exactly what [`value`] writes for
/// `v.to_value()`, with text (the commonest value) copied instead of parsed into a `String`.
pub(crate) fn value_ref(out: &mut Vec<u8>, v: ValueRef<'_>) {
    // The commonest case, a text whose head is already the shortest one (what `head` writes):
    // copied whole, head and all.
    if let Some(len) = canonical_text_len(v.0) {
        if len == v.0.len() {
            out.extend_from_slice(v.0);
            return;
        }
    }
    let mut r = Reader { b: v.0, pos: 0 };
    if let Ok((3, _, n)) = r.head() {
        if let Some(text) = v.0.get(r.pos..).filter(|t| t.len() as u64 == n) {
            head(out, 3, n);
            out.extend_from_slice(text);
            return;
        }
    }
    value(out, &v.to_value());
}

/// The whole length (head and bytes) of the text at the front of `raw` if its head is the
/// shortest form of its length (`None` for anything else: the caller takes the slow path).
#[inline]
fn canonical_text_len(raw: &[u8]) -> Option<usize> {
    let (&b0, rest) = raw.split_first()?;
    if b0 >> 5 != 3 {
        return None;
    }
    match b0 & 0x1f {
        n @ 0..=23 => Some(1 + usize::from(n)),
        24 => rest
            .first()
            .filter(|&&n| n >= 24)
            .map(|&n| 2 + usize::from(n)),
        25 => {
            let n = usize::from(u16::from_be_bytes(rest.get(..2)?.try_into().ok()?));
            (n > 0xff).then_some(3 + n)
        }
        _ => None,
    }
}

/// The length of the CBOR value at the front of `bytes`, which was checked when it was
/// written (only its structure is checked again: [`skip_value`]), without building it.
pub(crate) fn value_len(bytes: &[u8]) -> Result<usize, CodecError> {
    let mut r = Reader { b: bytes, pos: 0 };
    skip_value(&mut r, 0)?;
    Ok(r.pos)
}

/// Reads one CBOR value written by [`value`] from the front of `bytes`: the value and the
/// number of bytes it took. Nesting deeper than [`limits::MAX_VALUE_DEPTH`] is refused, so
/// damaged input cannot exhaust the stack.
pub(crate) fn read_value(bytes: &[u8]) -> Result<(Value, usize), CodecError> {
    let mut r = Reader { b: bytes, pos: 0 };
    let v = parse_value(&mut r, 0)?;
    Ok((v, r.pos))
}

/// One decoded op, borrowing from the payload. Names are indices into the payload's table.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum OpView<'a> {
    /// Upsert: `fields` is a range into the view's field list.
    Upsert {
        /// Collection (name index).
        collection: u32,
        /// Record key.
        key: &'a str,
        /// Timestamp.
        hlc: Hlc,
        /// Start and end of this op's fields in the view's field list.
        fields: (u32, u32),
    },
    /// Delete.
    Delete {
        /// Collection (name index).
        collection: u32,
        /// Record key.
        key: &'a str,
        /// Timestamp.
        hlc: Hlc,
    },
    /// Counter add.
    CounterAdd {
        /// Collection (name index).
        collection: u32,
        /// Record key.
        key: &'a str,
        /// Timestamp.
        hlc: Hlc,
        /// Field (name index).
        field: u32,
        /// Amount.
        delta: i64,
    },
    /// Revocation.
    Revoke {
        /// Token id (hex).
        token: &'a str,
        /// Timestamp.
        hlc: Hlc,
    },
}

impl OpView<'_> {
    /// Timestamp of the op.
    pub fn hlc(&self) -> Hlc {
        match self {
            OpView::Upsert { hlc, .. }
            | OpView::Delete { hlc, .. }
            | OpView::CounterAdd { hlc, .. }
            | OpView::Revoke { hlc, .. } => *hlc,
        }
    }
}

/// A decoded, fully validated compact payload borrowing from its bytes. `Yokeable`: a
/// [`crate::BatchOps`] keeps it next to the bytes it borrows from (`yoke`), so a payload is
/// decoded once per process, not again by every reader.
#[derive(Clone, Debug, Default, PartialEq, yoke::Yokeable)]
pub struct PayloadView<'a> {
    names: Vec<&'a str>,
    ops: Vec<OpView<'a>>,
    fields: Vec<(u32, ValueRef<'a>)>,
}

impl<'a> PayloadView<'a> {
    /// Number of ops.
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// Whether there are no ops.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// The ops, in order.
    pub fn ops(&self) -> &[OpView<'a>] {
        &self.ops
    }

    /// A name of the table (collection or field).
    pub fn name(&self, idx: u32) -> &'a str {
        self.names[idx as usize]
    }

    /// The collection of an op (the reserved revocations collection for a revoke).
    pub fn collection(&self, op: &OpView<'a>) -> &'a str {
        match op {
            OpView::Upsert { collection, .. }
            | OpView::Delete { collection, .. }
            | OpView::CounterAdd { collection, .. } => self.name(*collection),
            OpView::Revoke { .. } => REVOCATIONS_COLLECTION,
        }
    }

    /// The record key of an op (the token id for a revoke: its record in the revocations
    /// collection).
    pub fn key(&self, op: &OpView<'a>) -> &'a str {
        match op {
            OpView::Upsert { key, .. }
            | OpView::Delete { key, .. }
            | OpView::CounterAdd { key, .. } => key,
            OpView::Revoke { token, .. } => token,
        }
    }

    /// Where the fields of an upsert are held (empty for other ops): their entries, for a
    /// reader that prefetches them before it reads them ([`PayloadView::fields`]).
    pub fn field_entries(&self, op: &OpView<'a>) -> &[(u32, ValueRef<'a>)] {
        let (s, e) = match op {
            OpView::Upsert { fields, .. } => *fields,
            _ => (0, 0),
        };
        &self.fields[s as usize..e as usize]
    }

    /// The fields of an upsert (empty for other ops), in name order.
    pub fn fields(
        &self,
        op: &OpView<'a>,
    ) -> impl ExactSizeIterator<Item = (&'a str, ValueRef<'a>)> + '_ {
        self.field_entries(op)
            .iter()
            .map(|(n, v)| (self.names[*n as usize], *v))
    }

    /// One op as an owned [`Op`].
    pub fn to_op(&self, op: &OpView<'a>) -> Op {
        match *op {
            OpView::Upsert {
                collection,
                key,
                hlc,
                ..
            } => Op::Upsert {
                collection: self.name(collection).to_string(),
                key: key.to_string(),
                hlc,
                fields: self
                    .fields(op)
                    .map(|(n, v)| (n.to_string(), v.to_value()))
                    .collect::<crate::OpFields>(),
            },
            OpView::Delete {
                collection,
                key,
                hlc,
            } => Op::Delete {
                collection: self.name(collection).to_string(),
                key: key.to_string(),
                hlc,
            },
            OpView::CounterAdd {
                collection,
                key,
                hlc,
                field,
                delta,
            } => Op::CounterAdd {
                collection: self.name(collection).to_string(),
                key: key.to_string(),
                hlc,
                field: self.name(field).to_string(),
                delta,
            },
            OpView::Revoke { token, hlc } => Op::Revoke {
                token: token.to_string(),
                hlc,
            },
        }
    }

    /// Every op as an owned [`Op`].
    pub fn to_ops(&self) -> Vec<Op> {
        self.ops.iter().map(|op| self.to_op(op)).collect()
    }
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

const TRUNCATED: CodecError = CodecError::Malformed("truncated");

/// [`TRUNCATED`], made only when a read fails: `ok_or(TRUNCATED)` builds and drops a
/// `CodecError` on every read (its drop is not free: `InvalidOp` owns strings), which was
/// ~1.3% of a B2 profile in the materializer's decode alone.
#[cold]
fn truncated() -> CodecError {
    TRUNCATED
}

impl<'a> Reader<'a> {
    #[inline(always)]
    fn byte(&mut self) -> Result<u8, CodecError> {
        let v = *self.b.get(self.pos).ok_or_else(truncated)?;
        self.pos += 1;
        Ok(v)
    }

    #[inline(always)]
    fn take(&mut self, n: usize) -> Result<&'a [u8], CodecError> {
        let end = self.pos.checked_add(n).ok_or_else(truncated)?;
        let s = self.b.get(self.pos..end).ok_or_else(truncated)?;
        self.pos = end;
        Ok(s)
    }

    /// Reads an initial byte and its argument: (major type, additional info, argument).
    /// Indefinite lengths and reserved values are refused.
    #[inline(always)]
    fn head(&mut self) -> Result<(u8, u8, u64), CodecError> {
        let ib = self.byte()?;
        let (major, ai) = (ib >> 5, ib & 0x1f);
        let n = match ai {
            0..=23 => u64::from(ai),
            24 => u64::from(self.byte()?),
            25 => u64::from(u16::from_be_bytes(
                self.take(2)?.try_into().map_err(|_| TRUNCATED)?,
            )),
            26 => u64::from(u32::from_be_bytes(
                self.take(4)?.try_into().map_err(|_| TRUNCATED)?,
            )),
            27 => u64::from_be_bytes(self.take(8)?.try_into().map_err(|_| TRUNCATED)?),
            _ => return Err(CodecError::Malformed("indefinite length or reserved value")),
        };
        Ok((major, ai, n))
    }

    #[inline(always)]
    fn expect(&mut self, major: u8, what: &'static str) -> Result<u64, CodecError> {
        match self.head()? {
            (m, _, n) if m == major => Ok(n),
            _ => Err(CodecError::Malformed(what)),
        }
    }

    #[inline(always)]
    fn uint(&mut self, what: &'static str) -> Result<u64, CodecError> {
        self.expect(0, what)
    }

    #[inline(always)]
    fn text(&mut self, what: &'static str) -> Result<&'a str, CodecError> {
        let n = self.expect(3, what)?;
        let n = usize::try_from(n).map_err(|_| TRUNCATED)?;
        let bytes = self.take(n)?;
        if is_ascii(bytes) {
            // Names and keys are nearly always short ASCII, where `str::from_utf8`'s setup
            // costs more than the word-at-a-time test (~15% of decoding a W payload).
            #[allow(unsafe_code)]
            // SAFETY: every ASCII byte string is valid UTF-8.
            return Ok(unsafe { std::str::from_utf8_unchecked(bytes) });
        }
        std::str::from_utf8(bytes).map_err(|_| CodecError::Malformed("text is not UTF-8"))
    }

    /// Reads the next value if it is a text of at most 255 bytes (the commonest value) and
    /// returns its bytes (not checked as UTF-8); `None`, reading nothing, for any other value.
    /// The fast path of [`check_value`] and of the structure-only decode (which then skips
    /// the call into [`skip_value`]).
    #[inline(always)]
    fn short_text(&mut self) -> Result<Option<&'a [u8]>, CodecError> {
        let Some(&ib) = self.b.get(self.pos) else {
            return Ok(None);
        };
        if ib >> 5 != 3 || ib & 0x1f > 24 {
            return Ok(None);
        }
        self.pos += 1;
        let n = match ib & 0x1f {
            24 => usize::from(self.byte()?),
            n => usize::from(n),
        };
        self.take(n).map(Some)
    }

    fn i64(&mut self, what: &'static str) -> Result<i64, CodecError> {
        match self.head()? {
            (0, _, n) => i64::try_from(n).map_err(|_| CodecError::Malformed("integer overflow")),
            (1, _, n) => i64::try_from(n)
                .map(|n| -1 - n)
                .map_err(|_| CodecError::Malformed("integer overflow")),
            _ => Err(CodecError::Malformed(what)),
        }
    }

    /// A bounded element count: each element takes at least one byte.
    fn count(&self, n: u64, max: usize) -> Result<usize, CodecError> {
        let n = usize::try_from(n).map_err(|_| TRUNCATED)?;
        if n > max {
            return Err(CodecError::Malformed("too many elements"));
        }
        if n > self.b.len() - self.pos {
            return Err(TRUNCATED);
        }
        Ok(n)
    }
}

/// Checks text is UTF-8 without building a `&str`. Field values are mostly short ASCII, for
/// which the word-at-a-time ASCII test is several times cheaper than `str::from_utf8`'s setup
/// (which was 40% of decoding workload W); anything else takes the full check.
#[inline]
fn check_utf8(bytes: &[u8]) -> Result<(), CodecError> {
    if is_ascii(bytes) || std::str::from_utf8(bytes).is_ok() {
        Ok(())
    } else {
        Err(CodecError::Malformed("text is not UTF-8"))
    }
}

/// Whether every byte is ASCII: 8 bytes at a time, the last (partial) word read overlapping
/// the one before it, so short texts take a few branch-free steps.
#[inline]
fn is_ascii(b: &[u8]) -> bool {
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let word = |s: &[u8]| u64::from_le_bytes(s.try_into().unwrap_or([0x80; 8]));
    if b.len() < 8 {
        return b.iter().fold(0u8, |a, &c| a | c) < 0x80;
    }
    let mut acc = word(&b[b.len() - 8..]);
    for c in b.chunks_exact(8) {
        acc |= word(c);
    }
    acc & HIGH == 0
}

fn value_error(field: &str, reason: String) -> CodecError {
    CodecError::InvalidOp(OpError::InvalidValue {
        field: field.chars().take(80).collect(),
        reason,
    })
}

/// Skips one value, checking it is JSON-representable, and returns its approximate size as
/// [`Op::validate`] counts it (so both judge a value alike).
fn check_value(r: &mut Reader<'_>, depth: usize, field: &str) -> Result<usize, CodecError> {
    if depth > limits::MAX_VALUE_DEPTH {
        return Err(value_error(
            field,
            format!("nested deeper than {} levels", limits::MAX_VALUE_DEPTH),
        ));
    }
    // Fast path: a text of at most 255 bytes, the commonest value.
    if let Some(text) = r.short_text()? {
        check_utf8(text)?;
        return Ok(text.len() + 5);
    }
    let (major, ai, n) = r.head()?;
    Ok(match major {
        0 => 9,
        1 => {
            if n > i64::MAX as u64 {
                return Err(CodecError::Malformed("integer overflow"));
            }
            9
        }
        3 => {
            let n = usize::try_from(n).map_err(|_| TRUNCATED)?;
            check_utf8(r.take(n)?)?;
            n + 5
        }
        4 => {
            let n = r.count(n, usize::MAX)?;
            let mut size = 5;
            for _ in 0..n {
                size += check_value(r, depth + 1, field)?;
                if size > limits::MAX_VALUE_BYTES {
                    return Err(too_big(field, size));
                }
            }
            size
        }
        5 => {
            let n = r.count(n, usize::MAX)?;
            let mut size = 5;
            for _ in 0..n {
                let k = r.text("object keys must be text")?;
                size += k.len() + 5 + check_value(r, depth + 1, field)?;
                if size > limits::MAX_VALUE_BYTES {
                    return Err(too_big(field, size));
                }
            }
            size
        }
        7 => match (ai, n) {
            (20..=22, _) => 1, // false, true, null
            (27, bits) if f64::from_bits(bits).is_finite() => 9,
            _ => return Err(CodecError::Malformed("unsupported simple or float value")),
        },
        _ => return Err(CodecError::Malformed("unsupported value type")),
    })
}

fn too_big(field: &str, size: usize) -> CodecError {
    value_error(
        field,
        format!(
            "value of ~{size} bytes exceeds {} bytes",
            limits::MAX_VALUE_BYTES
        ),
    )
}

fn parse_value(r: &mut Reader<'_>, depth: usize) -> Result<Value, CodecError> {
    if depth > limits::MAX_VALUE_DEPTH {
        return Err(CodecError::Malformed("value nested too deeply"));
    }
    let (major, ai, n) = r.head()?;
    Ok(match major {
        0 => Value::from(n),
        1 => Value::from(-1 - i64::try_from(n).map_err(|_| TRUNCATED)?),
        3 => {
            let n = usize::try_from(n).map_err(|_| TRUNCATED)?;
            let s = std::str::from_utf8(r.take(n)?).map_err(|_| TRUNCATED)?;
            Value::String(s.to_string())
        }
        4 => {
            let n = r.count(n, usize::MAX)?;
            let mut items = Vec::with_capacity(n);
            for _ in 0..n {
                items.push(parse_value(r, depth + 1)?);
            }
            Value::Array(items)
        }
        5 => {
            let n = r.count(n, usize::MAX)?;
            let mut map = serde_json::Map::new();
            for _ in 0..n {
                let k = r.text("object keys must be text")?;
                map.insert(k.to_string(), parse_value(r, depth + 1)?);
            }
            Value::Object(map)
        }
        7 => match (ai, n) {
            (20, _) => Value::Bool(false),
            (21, _) => Value::Bool(true),
            (27, bits) => serde_json::Number::from_f64(f64::from_bits(bits))
                .map(Value::Number)
                .ok_or_else(truncated)?,
            _ => Value::Null,
        },
        _ => return Err(TRUNCATED),
    })
}

/// Decodes and validates a compact payload without copying: names, keys and values borrow
/// from `bytes`. Checks every rule [`Op::validate`] checks, op count and strictly increasing
/// timestamps; anything else is an error.
pub fn decode(bytes: &[u8]) -> Result<PayloadView<'_>, CodecError> {
    decode_as::<true>(bytes)
}

/// [`decode`] for a payload that already passed it (a verified batch's, read again by the
/// materializer): the structure is still checked, so damaged bytes are an error and never a
/// panic, but the op rules (names, keys, tokens, values' UTF-8, depth and size) are not
/// checked again. Values are checked for what reading them needs.
pub(crate) fn decode_checked_before(bytes: &[u8]) -> Result<PayloadView<'_>, CodecError> {
    decode_as::<false>(bytes)
}

/// The decoder; `RULES` says whether the op rules are checked (see the two callers above).
fn decode_as<const RULES: bool>(bytes: &[u8]) -> Result<PayloadView<'_>, CodecError> {
    let mut r = Reader { b: bytes, pos: 0 };
    if r.byte()? != 0x83 {
        return Err(CodecError::Malformed("payload is not a 3-element array"));
    }
    let n_names = r.expect(4, "names must be an array")?;
    let n_names = r.count(n_names, bytes.len())?;
    let mut names: Vec<&str> = Vec::with_capacity(n_names);
    for _ in 0..n_names {
        let n = r.text("names must be text")?;
        if RULES {
            crate::op::validate_field_name(n)?;
        }
        names.push(n);
    }
    // Each name's position in name order: field order is then checked on integers.
    let mut rank = Vec::new();
    if RULES {
        check_unique(&names)?;
        rank = vec![0u32; names.len()];
        let mut by_name: Vec<u32> = (0..names.len() as u32).collect();
        by_name.sort_unstable_by_key(|&i| names[i as usize]);
        for (r, &i) in by_name.iter().enumerate() {
            rank[i as usize] = r as u32;
        }
    }
    // Which names have been checked as collections (on first use as one).
    let mut checked = vec![false; names.len()];
    let base = r.uint("hlc base must be an unsigned integer")?;
    let n_ops = r.expect(4, "ops must be an array")?;
    let n_ops = r.count(n_ops, limits::MAX_OPS_PER_BATCH)?;
    let mut ops = Vec::with_capacity(n_ops);
    let mut fields: Vec<(u32, ValueRef<'_>)> = Vec::with_capacity(n_ops * 3);
    let mut prev = base;
    for i in 0..n_ops {
        let (major, _, len) = r.head()?;
        if major != 4 {
            return Err(CodecError::Malformed("an op must be an array"));
        }
        let kind = r.uint("op kind must be an unsigned integer")?;
        let want_len = match kind {
            KIND_UPSERT => 5,
            KIND_DELETE => 4,
            KIND_ADD => 6,
            KIND_REVOKE => 3,
            _ => return Err(CodecError::Malformed("unknown op kind")),
        };
        if len != want_len {
            return Err(CodecError::Malformed("op array has the wrong length"));
        }
        if kind == KIND_REVOKE {
            let token = r.text("token must be text")?;
            let hlc = next_hlc(&mut r, &mut prev, i)?;
            let op = OpView::Revoke { token, hlc };
            if RULES {
                crate::op::validate_token_id(token)?;
            }
            ops.push(op);
            continue;
        }
        let coll = name_index(&mut r, &names)?;
        let key = r.text("key must be text")?;
        if RULES {
            check_collection(coll, &names, &mut checked)?;
            check_key(key)?;
        }
        let hlc = next_hlc(&mut r, &mut prev, i)?;
        match kind {
            KIND_UPSERT => {
                let n = r.expect(5, "upsert fields must be a map")?;
                if n > limits::MAX_FIELDS_PER_UPSERT as u64 {
                    return Err(OpError::TooManyFields { count: n as usize }.into());
                }
                let start = fields.len() as u32;
                let mut last: Option<u32> = None;
                for _ in 0..n {
                    let f = name_index(&mut r, &names)?;
                    let from = r.pos;
                    if RULES {
                        if last.is_some_and(|l| l >= rank[f as usize]) {
                            return Err(CodecError::Malformed("fields must be in name order"));
                        }
                        last = Some(rank[f as usize]);
                        let size = check_value(&mut r, 0, names[f as usize])?;
                        if size > limits::MAX_VALUE_BYTES {
                            return Err(too_big(names[f as usize], size));
                        }
                    } else if r.short_text()?.is_none() {
                        skip_value(&mut r, 0)?;
                    }
                    fields.push((f, ValueRef(&bytes[from..r.pos])));
                }
                ops.push(OpView::Upsert {
                    collection: coll,
                    key,
                    hlc,
                    fields: (start, fields.len() as u32),
                });
            }
            KIND_DELETE => ops.push(OpView::Delete {
                collection: coll,
                key,
                hlc,
            }),
            _ => {
                let field = name_index(&mut r, &names)?;
                let delta = r.i64("delta must be an integer")?;
                ops.push(OpView::CounterAdd {
                    collection: coll,
                    key,
                    hlc,
                    field,
                    delta,
                });
            }
        }
    }
    if r.pos != bytes.len() {
        return Err(CodecError::Malformed("trailing bytes after payload"));
    }
    Ok(PayloadView { names, ops, fields })
}

/// An encoded upsert's fields, its map starting at `at` in `bytes`: each field's name index
/// and where its value's bytes are. For pruning ops encoded ahead ([`crate::OpsBuilder`]).
pub(crate) fn upsert_fields(
    bytes: &[u8],
    at: usize,
) -> Result<Vec<(u64, std::ops::Range<usize>)>, CodecError> {
    let mut r = Reader { b: bytes, pos: at };
    let n = r.expect(5, "fields must be a map")?;
    let n = r.count(n, limits::MAX_FIELDS_PER_UPSERT)?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let idx = r.uint("field name index")?;
        let start = r.pos;
        skip_value(&mut r, 0)?;
        out.push((idx, start..r.pos));
    }
    Ok(out)
}

/// The unsigned integer at `at` in `bytes`.
pub(crate) fn uint_at(bytes: &[u8], at: usize) -> Result<u64, CodecError> {
    Reader { b: bytes, pos: at }.uint("an unsigned integer")
}

/// Steps over one value, checking only its structure (lengths, nesting depth, known types).
fn skip_value(r: &mut Reader<'_>, depth: usize) -> Result<(), CodecError> {
    if depth > limits::MAX_VALUE_DEPTH {
        return Err(CodecError::Malformed("value nested too deeply"));
    }
    let (major, ai, n) = r.head()?;
    match major {
        0 | 1 => {}
        3 => {
            r.take(usize::try_from(n).map_err(|_| TRUNCATED)?)?;
        }
        4 => {
            for _ in 0..r.count(n, usize::MAX)? {
                skip_value(r, depth + 1)?;
            }
        }
        5 => {
            for _ in 0..r.count(n, usize::MAX)? {
                r.text("object keys must be text")?;
                skip_value(r, depth + 1)?;
            }
        }
        7 if matches!(ai, 20..=22 | 27) => {}
        _ => return Err(CodecError::Malformed("unsupported value type")),
    }
    Ok(())
}

fn check_unique(names: &[&str]) -> Result<(), CodecError> {
    let dup = if names.len() <= 16 {
        names
            .iter()
            .enumerate()
            .any(|(i, n)| names[..i].contains(n))
    } else {
        let mut seen = std::collections::HashSet::with_capacity(names.len());
        !names.iter().all(|n| seen.insert(*n))
    };
    if dup {
        return Err(CodecError::Malformed("names must be unique"));
    }
    Ok(())
}

#[inline]
fn next_hlc(r: &mut Reader<'_>, prev: &mut u64, i: usize) -> Result<Hlc, CodecError> {
    let dh = r.uint("timestamp delta must be an unsigned integer")?;
    if i > 0 && dh == 0 {
        return Err(CodecError::Unordered);
    }
    // (A match, not `ok_or`: see [`truncated`].)
    *prev = match prev.checked_add(dh) {
        Some(h) => h,
        None => return Err(CodecError::Unordered),
    };
    Ok(Hlc(*prev))
}

#[inline(always)]
fn name_index(r: &mut Reader<'_>, names: &[&str]) -> Result<u32, CodecError> {
    let i = r.uint("name index must be an unsigned integer")?;
    if i >= names.len() as u64 {
        return Err(CodecError::Malformed("name index out of range"));
    }
    Ok(i as u32)
}

fn check_collection(i: u32, names: &[&str], checked: &mut [bool]) -> Result<(), CodecError> {
    if !checked[i as usize] {
        crate::op::validate_user_collection(names[i as usize])?;
        checked[i as usize] = true;
    }
    Ok(())
}

/// Key rule of [`crate::op::validate_key`], with an ASCII fast path.
#[inline]
fn check_key(k: &str) -> Result<(), CodecError> {
    let b = k.as_bytes();
    if !b.is_empty()
        && b.len() <= limits::MAX_KEY_LEN
        && b.iter().all(|&c| (0x20..0x7f).contains(&c))
    {
        return Ok(());
    }
    crate::op::validate_key(k).map_err(Into::into)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn upsert(c: &str, k: &str, h: u64, fields: Value) -> Op {
        Op::Upsert {
            collection: c.into(),
            key: k.into(),
            hlc: Hlc(h),
            fields: serde_json::from_value(fields).unwrap(),
        }
    }

    fn sample() -> Vec<Op> {
        vec![
            upsert(
                "users",
                "ada",
                100,
                json!({"name": "Ada", "age": 36, "neg": -7, "pi": 3.25, "ok": true, "none": null,
                       "langs": ["en", "fr"], "nested": {"b": [1, {"c": "d"}], "a": -1e300}}),
            ),
            Op::Delete {
                collection: "users".into(),
                key: "bob".into(),
                hlc: Hlc(101),
            },
            Op::CounterAdd {
                collection: "stats".into(),
                key: "visits".into(),
                hlc: Hlc(500),
                field: "n".into(),
                delta: i64::MIN,
            },
            Op::Revoke {
                token: "ab".repeat(32),
                hlc: Hlc(u64::MAX),
            },
        ]
    }

    fn enc(ops: &[Op]) -> Vec<u8> {
        let mut out = Vec::new();
        encode_ops(ops, &mut out);
        out
    }

    #[test]
    fn roundtrips_every_op_kind() {
        let ops = sample();
        let bytes = enc(&ops);
        let view = decode(&bytes).unwrap();
        assert_eq!(view.len(), 4);
        assert_eq!(view.to_ops(), ops);
        assert_eq!(view.collection(&view.ops()[2]), "stats");
        assert_eq!(view.collection(&view.ops()[3]), REVOCATIONS_COLLECTION);
        let names: Vec<&str> = view.fields(&view.ops()[0]).map(|(n, _)| n).collect();
        assert_eq!(
            names,
            ["age", "langs", "name", "neg", "nested", "none", "ok", "pi"]
        );
    }

    /// The name table's gap is sized from the thread's last batch: batches of changing
    /// shapes (longer, shorter or no names than the last), appended after existing bytes,
    /// encode exactly as a first batch on a fresh thread does.
    #[test]
    fn batches_of_changing_shapes_encode_alike_in_any_sequence() {
        let shapes: Vec<Vec<Op>> = vec![
            sample(),
            vec![upsert("c", "k", 1, json!({"a": 1}))],
            vec![upsert(
                "a-much-longer-collection",
                "k",
                7,
                json!({"x": "y", "zz": [1]}),
            )],
            vec![Op::Revoke {
                token: "cd".repeat(32),
                hlc: Hlc(3),
            }],
            Vec::new(),
        ];
        // Reference: each shape encoded first thing on a fresh thread.
        let fresh: Vec<Vec<u8>> = shapes
            .iter()
            .map(|ops| {
                let ops = ops.clone();
                std::thread::spawn(move || enc(&ops)).join().unwrap()
            })
            .collect();
        for order in [
            [0, 1, 2, 3, 4, 0, 0, 2, 1, 1],
            [4, 3, 2, 1, 0, 1, 2, 3, 4, 4],
        ] {
            for i in order {
                let mut out = vec![0xAA; 3];
                encode_ops(&shapes[i], &mut out);
                assert_eq!(&out[..3], &[0xAA; 3], "bytes before the payload kept");
                assert_eq!(&out[3..], fresh[i].as_slice(), "shape {i}");
                assert_eq!(decode(&out[3..]).unwrap().to_ops(), shapes[i]);
            }
        }
    }

    /// A plain CBOR decoder reads the payload, and sees the documented layout.
    #[test]
    fn plain_ciborium_reads_it() {
        use ciborium::Value as C;
        let bytes = enc(&sample());
        let v: C = ciborium::from_reader(&bytes[..]).unwrap();
        let parts = v.as_array().unwrap();
        let names: Vec<&str> = parts[0]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n.as_text().unwrap())
            .collect();
        assert_eq!(
            names,
            ["users", "age", "langs", "name", "neg", "nested", "none", "ok", "pi", "stats", "n"]
        );
        assert_eq!(parts[1], C::Integer(100.into()));
        let ops = parts[2].as_array().unwrap();
        let first = ops[0].as_array().unwrap();
        assert_eq!(first[0], C::Integer(0.into()));
        assert_eq!(first[1], C::Integer(0.into())); // "users"
        assert_eq!(first[2], C::Text("ada".into()));
        let counter = ops[2].as_array().unwrap();
        assert_eq!(counter[3], C::Integer(399.into())); // 500 - 101
        assert_eq!(counter[5], C::Integer(i64::MIN.into()));
    }

    #[test]
    fn invalid_ops_are_refused_like_op_validate() {
        let cases = vec![
            upsert("_revocations", "k", 1, json!({"a": 1})),
            upsert("bad/coll", "k", 1, json!({"a": 1})),
            upsert("c", "", 1, json!({"a": 1})),
            upsert("c", "bad\u{7}key", 1, json!({"a": 1})),
            upsert("c", "bad\u{85}key", 1, json!({"a": 1})),
            upsert("c", &"k".repeat(257), 1, json!({"a": 1})),
            upsert("c", "k", 1, json!({"a": "x".repeat(70_000)})),
            upsert("c", "k", 1, json!({ "": 1 })),
            Op::Revoke {
                token: "AB".repeat(32),
                hlc: Hlc(1),
            },
        ];
        for op in cases {
            let expected = op.validate().unwrap_err();
            let got = decode(&enc(std::slice::from_ref(&op))).unwrap_err();
            assert_eq!(got, CodecError::InvalidOp(expected), "{op:?}");
        }
        let mut deep = json!(1);
        for _ in 0..40 {
            deep = json!([deep]);
        }
        let op = upsert("c", "k", 1, json!({ "a": deep }));
        assert!(op.validate().is_err());
        assert!(matches!(
            decode(&enc(&[op])),
            Err(CodecError::InvalidOp(OpError::InvalidValue { .. }))
        ));
        // Depth limits agree with Op::validate at the boundary, for texts too.
        for levels in [31, 32, 33, 34] {
            let mut v = json!("leaf");
            for _ in 0..levels {
                v = json!([v]);
            }
            let op = upsert("c", "k", 1, json!({ "a": v }));
            assert_eq!(
                decode(&enc(std::slice::from_ref(&op))).is_ok(),
                op.validate().is_ok(),
                "{levels} levels"
            );
        }
        let many: serde_json::Map<String, Value> =
            (0..300).map(|i| (format!("f{i}"), json!(i))).collect();
        let op = upsert("c", "k", 1, Value::Object(many));
        assert!(matches!(
            decode(&enc(&[op])),
            Err(CodecError::InvalidOp(OpError::TooManyFields { count: 300 }))
        ));
    }

    #[test]
    fn timestamps_must_strictly_increase() {
        let a = upsert("c", "k", 5, json!({"a": 1}));
        let b = upsert("c", "k", 5, json!({"a": 2}));
        assert_eq!(decode(&enc(&[a.clone(), b])), Err(CodecError::Unordered));
        // A decreasing timestamp wraps the delta around: the sum overflows.
        let c = upsert("c", "k", 4, json!({"a": 2}));
        assert_eq!(decode(&enc(&[a, c])), Err(CodecError::Unordered));
    }

    #[test]
    fn structural_damage_is_refused() {
        let good = enc(&sample());
        assert!(decode(&good[..good.len() - 1]).is_err());
        let mut longer = good.clone();
        longer.push(0);
        assert_eq!(
            decode(&longer),
            Err(CodecError::Malformed("trailing bytes after payload"))
        );
        // Duplicate names.
        let mut bad = Vec::new();
        bad.push(0x83);
        head(&mut bad, 4, 2);
        tstr(&mut bad, "a");
        tstr(&mut bad, "a");
        head(&mut bad, 0, 0);
        head(&mut bad, 4, 0);
        assert_eq!(
            decode(&bad),
            Err(CodecError::Malformed("names must be unique"))
        );
        // Fields out of name order: [names "b", "a"], one upsert with fields {0: 1, 1: 2}.
        let mut bad = Vec::new();
        bad.push(0x83);
        head(&mut bad, 4, 3);
        tstr(&mut bad, "c");
        tstr(&mut bad, "b");
        tstr(&mut bad, "a");
        head(&mut bad, 0, 7);
        head(&mut bad, 4, 1);
        bad.extend_from_slice(&[0x85, 0x00, 0x00]);
        tstr(&mut bad, "key");
        bad.extend_from_slice(&[0x00, 0xa2, 0x01, 0x01, 0x02, 0x02]);
        assert_eq!(
            decode(&bad),
            Err(CodecError::Malformed("fields must be in name order"))
        );
        let len = bad.len();
        bad[len - 4] = 0x02;
        bad[len - 2] = 0x01;
        assert_eq!(decode(&bad).unwrap().to_ops().len(), 1);
        // Indefinite-length array.
        assert!(decode(&[0x83, 0x9f, 0xff, 0x00, 0x80]).is_err());
        // Huge counts do not allocate.
        let mut huge = vec![0x83];
        head(&mut huge, 4, u64::MAX);
        assert!(decode(&huge).is_err());
    }

    pub(crate) fn arb_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            (-1e12f64..1e12).prop_map(|f| json!(f)),
            "\\PC{0,12}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map("[a-z]{0,4}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    pub(crate) fn arb_op() -> impl Strategy<Value = Op> {
        let coll = "[a-zA-Z0-9._-]{1,8}";
        let key = "[^\\p{Cc}]{1,12}";
        prop_oneof![
            (
                coll,
                key,
                prop::collection::btree_map("[a-z]{1,6}", arb_value(), 0..5)
            )
                .prop_map(|(c, k, fields)| Op::Upsert {
                    collection: c,
                    key: k,
                    hlc: Hlc(0),
                    fields: fields.into()
                }),
            (coll, key).prop_map(|(c, k)| Op::Delete {
                collection: c,
                key: k,
                hlc: Hlc(0)
            }),
            (coll, key, "[a-z]{1,6}", any::<i64>()).prop_map(|(c, k, f, d)| Op::CounterAdd {
                collection: c,
                key: k,
                hlc: Hlc(0),
                field: f,
                delta: d
            }),
            "[0-9a-f]{64}".prop_map(|t| Op::Revoke {
                token: t,
                hlc: Hlc(0)
            }),
        ]
    }

    /// Op lists with strictly increasing timestamps (some ops may break naming rules).
    pub(crate) fn arb_ops() -> impl Strategy<Value = Vec<Op>> {
        (
            prop::collection::vec((arb_op(), 1u64..1_000), 1..30),
            any::<u32>(),
        )
            .prop_map(|(ops, base)| {
                let mut h = u64::from(base);
                ops.into_iter()
                    .map(|(mut op, step)| {
                        h += step;
                        op.set_hlc(Hlc(h));
                        op
                    })
                    .collect()
            })
    }

    /// A raw value re-encodes canonically, whatever head length the writer chose.
    #[test]
    fn value_ref_writes_the_canonical_form() {
        for (raw, canonical) in [
            (
                &[0x78, 3, b'a', b'b', b'c'][..],
                &[0x63, b'a', b'b', b'c'][..],
            ),
            (&[0x63, b'a', b'b', b'c'], &[0x63, b'a', b'b', b'c']),
            (&[0x19, 0, 5], &[5]),
            (&[0x82, 0x01, 0x61, b'x'], &[0x82, 0x01, 0x61, b'x']),
        ] {
            let mut out = Vec::new();
            value_ref(&mut out, ValueRef(raw));
            assert_eq!(out, canonical);
            let mut via_value = Vec::new();
            value(&mut via_value, &ValueRef(raw).to_value());
            assert_eq!(out, via_value);
        }
    }

    proptest! {
        /// A text of any length, with its head written in any of the lengths CBOR allows,
        /// re-encodes exactly as `value` writes it (the copy fast path and the slow path agree).
        #[test]
        fn value_ref_text_is_canonical(len in prop_oneof![0usize..30, 250usize..260, 65_530usize..65_540], wide in 0u8..4) {
            let text = "x".repeat(len);
            let mut raw = Vec::new();
            let ai_min = match len { 0..=23 => 0, 24..=0xff => 1, 0x100..=0xffff => 2, _ => 3 };
            match wide.max(ai_min) {
                0 => raw.push(0x60 | len as u8),
                1 => raw.extend_from_slice(&[0x78, len as u8]),
                2 => { raw.push(0x79); raw.extend_from_slice(&(len as u16).to_be_bytes()); }
                _ => { raw.push(0x7a); raw.extend_from_slice(&(len as u32).to_be_bytes()); }
            }
            raw.extend_from_slice(text.as_bytes());
            let mut out = Vec::new();
            value_ref(&mut out, ValueRef(&raw));
            let mut want = Vec::new();
            value(&mut want, &Value::String(text));
            prop_assert_eq!(out, want);
        }

        /// decode(encode(ops)) == ops, for every valid op list.
        #[test]
        fn roundtrip(ops in arb_ops()) {
            let ops: Vec<Op> = ops.into_iter().filter(|o| o.validate().is_ok()).collect();
            let bytes = enc(&ops);
            let view = decode(&bytes).unwrap();
            prop_assert_eq!(&view.to_ops(), &ops);
            // Read again without the rule checks: the same view.
            prop_assert_eq!(decode_checked_before(&bytes).unwrap(), view);
        }

        /// Any valid payload is plain CBOR: ciborium reads it whole, with the same names.
        #[test]
        fn ciborium_reads_every_payload(ops in arb_ops()) {
            let bytes = enc(&ops);
            let v: ciborium::Value = ciborium::from_reader(&bytes[..]).unwrap();
            let parts = v.as_array().unwrap();
            prop_assert_eq!(parts.len(), 3);
            prop_assert_eq!(parts[2].as_array().unwrap().len(), ops.len());
        }

        /// Damaged input never panics, and what is accepted re-encodes to a valid payload.
        #[test]
        fn mutations_never_panic(ops in arb_ops(), flips in prop::collection::vec((any::<usize>(), any::<u8>()), 1..4)) {
            let mut bytes = enc(&ops);
            for (i, x) in flips {
                let i = i % bytes.len();
                bytes[i] ^= x.max(1);
            }
            // Damaged bytes read without the rule checks: an error or a view, never a panic.
            if let Ok(view) = decode_checked_before(&bytes) {
                let _ = view.to_ops();
            }
            if let Ok(view) = decode(&bytes) {
                let owned = view.to_ops();
                for op in &owned {
                    prop_assert!(op.validate().is_ok());
                }
                let again = enc(&owned);
                prop_assert_eq!(decode(&again).unwrap().to_ops(), owned);
            }
        }

        /// The word-at-a-time ASCII test agrees with the standard one on every length and
        /// position of a high byte; text that is not UTF-8 is refused inside a value.
        #[test]
        fn ascii_and_utf8_checks_agree_with_std(bytes in prop::collection::vec(any::<u8>(), 0..80)) {
            prop_assert_eq!(is_ascii(&bytes), bytes.is_ascii());
            prop_assert_eq!(check_utf8(&bytes).is_ok(), std::str::from_utf8(&bytes).is_ok());
        }

        /// The inlined name comparison is string equality.
        #[test]
        fn same_name_is_equality(a in "[a-c]{0,20}", b in "[a-c]{0,20}") {
            prop_assert_eq!(same_name(&a, &b), a == b);
            prop_assert!(same_name(&a, &a.clone()));
        }
    }

    /// A value whose text is not UTF-8 (at any position, in short and long texts) is refused,
    /// so the ASCII fast path cannot let it through.
    #[test]
    fn non_utf8_value_text_is_refused() {
        for len in [1usize, 7, 8, 9, 15, 16, 17, 40, 64, 200] {
            for bad in [0, len / 2, len - 1] {
                let mut text = vec![b'a'; len];
                text[bad] = 0xff;
                // [names=["c","f"], base=1, ops=[[0, 0, "k", 0, {1: <text>}]]]
                let mut p = vec![0x83, 0x82, 0x61, b'c', 0x61, b'f', 0x01, 0x81];
                p.extend_from_slice(&[0x85, 0x00, 0x00, 0x61, b'k', 0x00, 0xa1, 0x01]);
                head(&mut p, 3, len as u64);
                p.extend_from_slice(&text);
                assert!(
                    matches!(decode(&p), Err(CodecError::Malformed("text is not UTF-8"))),
                    "len {len}, bad byte at {bad}"
                );
                p.truncate(p.len() - len);
                p.extend_from_slice(&vec![b'a'; len]);
                assert!(decode(&p).is_ok(), "len {len}: the valid form decodes");
            }
        }
    }

    /// The structure-only decode steps over texts of every head size alike (in line up to 255
    /// bytes, through `skip_value` past it): each field's value is exactly its encoded bytes,
    /// and a payload cut inside the text is refused, as by the full decode.
    #[test]
    fn structure_only_decode_steps_over_texts_of_every_length() {
        for len in [0usize, 1, 23, 24, 200, 255, 256, 1_000, 60_000] {
            // [names=["c","f","g"], base=1, ops=[[0, 0, "k", 0, {1: <text>, 2: 7}]]]
            let mut p = vec![0x83, 0x83, 0x61, b'c', 0x61, b'f', 0x61, b'g', 0x01, 0x81];
            p.extend_from_slice(&[0x85, 0x00, 0x00, 0x61, b'k', 0x00, 0xa2, 0x01]);
            let start = p.len();
            head(&mut p, 3, len as u64);
            p.extend(std::iter::repeat_n(b'x', len));
            let text = p[start..].to_vec();
            p.extend_from_slice(&[0x02, 0x07]);
            for d in [decode, decode_checked_before] {
                let view = d(&p).unwrap_or_else(|e| panic!("len {len}: {e}"));
                let fields: Vec<_> = view.fields(&view.ops()[0]).collect();
                assert_eq!(fields.len(), 2, "len {len}");
                assert_eq!(fields[0].1 .0, &text[..], "len {len}");
                assert_eq!(fields[1].1 .0, &[0x07][..], "len {len}");
                let cut = &p[..start + text.len() - 1];
                assert!(d(cut).is_err(), "len {len}: a cut text was read");
            }
        }
    }

    /// Keys and names take the ASCII fast path to `&str`: a key or name that is not UTF-8
    /// (a high byte at any position, short and long) is refused by both decoders, and one
    /// that is UTF-8 but not ASCII is read back exactly.
    #[test]
    fn keys_and_names_that_are_not_utf8_are_refused() {
        // [names=["c", <name>], base=1, ops=[[0, 0, <key>, 0, {1: "v"}]]]
        let payload = |name: &[u8], key: &[u8]| {
            let mut p = vec![0x83, 0x82, 0x61, b'c'];
            head(&mut p, 3, name.len() as u64);
            p.extend_from_slice(name);
            p.extend_from_slice(&[0x01, 0x81, 0x85, 0x00, 0x00]);
            head(&mut p, 3, key.len() as u64);
            p.extend_from_slice(key);
            p.extend_from_slice(&[0x00, 0xa1, 0x01, 0x61, b'v']);
            p
        };
        for len in [1usize, 7, 8, 9, 16, 17, 40] {
            for bad in [0, len / 2, len - 1] {
                let mut text = vec![b'k'; len];
                text[bad] = 0xc3; // a lead byte without its continuation
                for p in [payload(b"f", &text), payload(&text, b"k")] {
                    for d in [decode, decode_checked_before] {
                        assert!(
                            matches!(d(&p), Err(CodecError::Malformed("text is not UTF-8"))),
                            "len {len}, bad byte at {bad}"
                        );
                    }
                }
            }
        }
        let key = "clé-日本-ключ";
        let p = payload(b"f", key.as_bytes());
        for d in [decode, decode_checked_before] {
            let view = d(&p).unwrap();
            assert_eq!(view.key(&view.ops()[0]), key);
        }
    }
}
