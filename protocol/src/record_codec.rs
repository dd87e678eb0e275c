//! The stored form of a [`RecordState`]: a compact binary layout the materializer reads and
//! writes once per touched record.
//!
//! Records are derived state (rebuilt from the log at will), so this layout is private to a
//! store and versioned by its first byte; it never crosses the wire. It replaced serde +
//! ciborium, whose map-of-maps encoding spelled out `hlc`/`author` per stamp (~350 bytes for a
//! three-field record of workload W) and dominated the materializer's time. Layout
//! (docs/design.md §6):
//!
//! ```text
//! state  := 0x02 flags:u8 authors fields
//!           flags bit 0: a tombstone stamp follows, bit 1: a touched stamp follows
//!           [deleted: stamp] [touched: stamp]
//! authors:= n:varint (32-byte ed25519 key){n}      every author a stamp names, once
//! stamp  := hlc:u64 little-endian, author index:varint
//! fields := n:varint field{n}                      in name order (strictly increasing)
//! field  := name_len:varint name fflags:u8
//!           fflags bit 0: last-written value follows, bit 1: counter adds follow
//!           [stamp value:CBOR] [n:varint (stamp delta:zigzag varint){n}]
//! ```
//!
//! Decoding checks what it relies on (lengths, indexes, UTF-8, field order, value depth) and
//! reports a damaged record as an error instead of panicking.

use crate::codec::{self, OpView, PayloadView};
use crate::hlc::Hlc;
use crate::merge::{FieldMap, FieldState, RecordState, Stamp};

/// First byte of every stored state in this layout.
pub const STATE_FORMAT: u8 = 0x02;

const HAS_DELETED: u8 = 1;
const HAS_TOUCHED: u8 = 2;
const HAS_LWW: u8 = 1;
const HAS_ADDS: u8 = 2;

/// A stored record state that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("damaged record state: {0}")]
pub struct StateError(pub &'static str);

/// Appends the stored form of `state` to `out`.
pub fn encode_state(state: &RecordState, out: &mut Vec<u8>) {
    // Authors in order of first use; a record rarely has more than a handful.
    let mut authors: Vec<[u8; 32]> = Vec::new();
    let mut note = |a: &[u8; 32]| {
        if !authors.contains(a) {
            authors.push(*a);
        }
    };
    if let Some(s) = &state.deleted {
        note(&s.author);
    }
    if let Some(s) = &state.touched {
        note(&s.author);
    }
    for f in state.fields.values() {
        if let Some((s, _)) = &f.lww {
            note(&s.author);
        }
        for s in f.adds.keys() {
            note(&s.author);
        }
    }
    let idx = |a: &[u8; 32]| authors.iter().position(|x| x == a).unwrap_or(0) as u64;
    let stamp = |out: &mut Vec<u8>, s: &Stamp| {
        out.extend_from_slice(&s.hlc.0.to_le_bytes());
        varint(out, idx(&s.author));
    };

    out.push(STATE_FORMAT);
    let flags = u8::from(state.deleted.is_some()) * HAS_DELETED
        + u8::from(state.touched.is_some()) * HAS_TOUCHED;
    out.push(flags);
    if let Some(s) = &state.deleted {
        stamp(out, s);
    }
    if let Some(s) = &state.touched {
        stamp(out, s);
    }
    varint(out, authors.len() as u64);
    for a in &authors {
        out.extend_from_slice(a);
    }
    varint(out, state.fields.len() as u64);
    for (name, f) in &state.fields {
        varint(out, name.len() as u64);
        out.extend_from_slice(name.as_bytes());
        let fflags = u8::from(f.lww.is_some()) * HAS_LWW + u8::from(!f.adds.is_empty()) * HAS_ADDS;
        out.push(fflags);
        if let Some((s, v)) = &f.lww {
            stamp(out, s);
            codec::value(out, v);
        }
        if !f.adds.is_empty() {
            varint(out, f.adds.len() as u64);
            for (s, d) in &f.adds {
                stamp(out, s);
                varint(out, zigzag(*d));
            }
        }
    }
}

/// Appends the stored form of the state that one op, read from a payload view, produces on
/// an empty record: byte for byte `encode_state(&RecordState::from_op(&view.to_op(op),
/// author))` (property-tested), but for upserts and deletes written straight from the view,
/// with no state, name or value built: the materializer's commonest case is a record its
/// in-memory delta does not hold yet.
pub fn encode_op_state(
    view: &PayloadView<'_>,
    op: &OpView<'_>,
    author: &[u8; 32],
    out: &mut Vec<u8>,
) {
    let stamp = |out: &mut Vec<u8>, hlc: Hlc| {
        out.extend_from_slice(&hlc.0.to_le_bytes());
        varint(out, 0); // the one author
    };
    match *op {
        OpView::Upsert { hlc, .. } => {
            out.extend_from_slice(&[STATE_FORMAT, HAS_TOUCHED]);
            stamp(out, hlc);
            varint(out, 1);
            out.extend_from_slice(author);
            let fields = view.fields(op);
            varint(out, fields.len() as u64);
            for (name, value) in fields {
                varint(out, name.len() as u64);
                out.extend_from_slice(name.as_bytes());
                out.push(HAS_LWW);
                stamp(out, hlc);
                codec::value_ref(out, value);
            }
        }
        OpView::Delete { hlc, .. } => {
            out.extend_from_slice(&[STATE_FORMAT, HAS_DELETED]);
            stamp(out, hlc);
            varint(out, 1);
            out.extend_from_slice(author);
            varint(out, 0);
        }
        _ => encode_state(&RecordState::from_op(&view.to_op(op), *author), out),
    }
}

/// Whether applying `op` to the stored state `state` gives exactly the state `op` makes on an
/// empty record, so that [`encode_op_state`] can replace the state without decoding it. True
/// only when every stamp in the state is older than the op (an earlier timestamp, whatever
/// the author) and the op replaces all of it: a delete; or an upsert writing every field
/// the state holds, into a state with no tombstone and no counter adds. A state whose
/// layout cannot be walked (lengths, counts, flags, stamps) is never dominated: the caller's
/// decode then reports it. What the walk steps over is not checked (a value's bytes, a
/// name's UTF-8, an author index), so a state damaged only there, and older than the op
/// throughout, is replaced as a sound one would be: its damage is overwritten, never read.
/// Property-tested against `RecordState::apply`; fuzzed (`fuzz/`, target `payload`).
pub fn dominated_by(state: &[u8], view: &PayloadView<'_>, op: &OpView<'_>) -> bool {
    let (hlc, upsert) = match op {
        OpView::Upsert { hlc, .. } => (hlc.0, true),
        OpView::Delete { hlc, .. } => (hlc.0, false),
        _ => return false,
    };
    let mut names = view.fields(op).map(|(n, _)| n).peekable();
    let older = |t: Option<u64>| t.is_none_or(|t| t < hlc);
    let mut scan = || -> Result<bool, StateError> {
        let mut r = R { b: state, pos: 0 };
        let (deleted, touched) = r.head_times()?;
        if (upsert && deleted.is_some()) || !older(deleted) || !older(touched) {
            return Ok(false);
        }
        for _ in 0..r.count()? {
            let f = r.field_times()?;
            // Every field the state holds must be one the upsert writes (both in name order).
            if upsert {
                while names.next_if(|n| n.as_bytes() < f.name).is_some() {}
                if names.next_if(|n| n.as_bytes() == f.name).is_none() {
                    return Ok(false);
                }
            }
            if (upsert && f.adds.is_some()) || !older(f.lww) || !older(f.adds) {
                return Ok(false);
            }
        }
        Ok(r.pos == r.b.len())
    };
    scan().unwrap_or(false)
}

/// Whether joining the stored states `delta` and `file` ([`RecordState::merge`]) gives
/// `delta` itself, byte for byte, so that a flush can keep `delta` without decoding either:
/// every stamp `file` holds is older (an earlier timestamp, whatever the author) than the
/// stamp of the same kind in `delta` (its tombstone, its last write, each field's last
/// write), or than `delta`'s tombstone, and `file` has no counter adds. Sustained ingest of
/// overwrites (workload W: all of a record's fields written together, or a delete) is this
/// case nearly always. A state whose layout cannot be walked is never absorbed (the
/// caller's decode then reports it); as in [`dominated_by`], what the walk steps over (a
/// value's bytes, a name's UTF-8, an author index) is not checked, so a `file` state damaged
/// only there, and older than `delta` throughout, is replaced by `delta` unread. Where both
/// decode, property-tested against decode, merge and encode; fuzzed (`fuzz/`, target
/// `record_state`).
pub fn absorbs(delta: &[u8], file: &[u8]) -> bool {
    let read_delta = || -> Result<_, StateError> {
        let mut r = R { b: delta, pos: 0 };
        let (deleted, touched) = r.head_times()?;
        let fields = (0..r.count()?)
            .map(|_| r.field_times())
            .collect::<Result<Vec<_>, _>>()?;
        Ok((deleted, touched, fields))
    };
    let Ok((deleted, touched, fields)) = read_delta() else {
        return false;
    };
    // A stamp of `file` is absorbed by a newer one of its kind in `delta`, or by a newer
    // tombstone there (the join's compaction drops what a tombstone covers).
    let older = |t: u64, than: Option<u64>| {
        than.is_some_and(|than| t < than) || deleted.is_some_and(|d| t < d)
    };
    let scan = || -> Result<bool, StateError> {
        let mut r = R { b: file, pos: 0 };
        let (file_deleted, file_touched) = r.head_times()?;
        if file_deleted.is_some_and(|f| deleted.is_none_or(|d| f >= d))
            || file_touched.is_some_and(|t| !older(t, touched))
        {
            return Ok(false);
        }
        let mut theirs = fields.iter().peekable();
        for _ in 0..r.count()? {
            let f = r.field_times()?;
            // Counter adds, or nothing written: the full join.
            let Some(lww) = f.lww.filter(|_| f.adds.is_none()) else {
                return Ok(false);
            };
            // Both field lists are in name order.
            while theirs.next_if(|d| d.name < f.name).is_some() {}
            let same = theirs.next_if(|d| d.name == f.name).and_then(|d| d.lww);
            if !older(lww, same) {
                return Ok(false);
            }
        }
        Ok(r.pos == r.b.len())
    };
    scan().unwrap_or(false)
}

/// One field of a stored state as [`R::field_times`] reads it: its name, its last write's
/// time and its latest counter add's time.
struct FieldTimes<'a> {
    name: &'a [u8],
    lww: Option<u64>,
    adds: Option<u64>,
}

/// Reads a state written by [`encode_state`].
pub fn decode_state(bytes: &[u8]) -> Result<RecordState, StateError> {
    let mut r = R { b: bytes, pos: 0 };
    if r.byte()? != STATE_FORMAT {
        return Err(StateError("unknown format"));
    }
    let flags = r.byte()?;
    if flags & !(HAS_DELETED | HAS_TOUCHED) != 0 {
        return Err(StateError("unknown flags"));
    }
    // Stamps come before the author table they index: read them raw, resolve after.
    let deleted = (flags & HAS_DELETED != 0)
        .then(|| r.raw_stamp())
        .transpose()?;
    let touched = (flags & HAS_TOUCHED != 0)
        .then(|| r.raw_stamp())
        .transpose()?;
    let n_authors = r.count()?;
    let mut authors = Vec::with_capacity(n_authors);
    for _ in 0..n_authors {
        let a: [u8; 32] = r.take(32)?.try_into().map_err(|_| TRUNC)?;
        authors.push(a);
    }
    let resolve = |(hlc, i): (u64, u64)| -> Result<Stamp, StateError> {
        let author = *authors
            .get(usize::try_from(i).map_err(|_| BAD_AUTHOR)?)
            .ok_or(BAD_AUTHOR)?;
        Ok(Stamp {
            hlc: Hlc(hlc),
            author,
        })
    };
    let mut state = RecordState {
        deleted: deleted.map(resolve).transpose()?,
        touched: touched.map(resolve).transpose()?,
        fields: FieldMap::default(),
    };
    let n_fields = r.count()?;
    let mut last: Option<&str> = None;
    for _ in 0..n_fields {
        let len = r.count()?;
        let name =
            std::str::from_utf8(r.take(len)?).map_err(|_| StateError("field name not UTF-8"))?;
        if last.is_some_and(|l| l >= name) {
            return Err(StateError("fields out of order"));
        }
        last = Some(name);
        let fflags = r.byte()?;
        if fflags & !(HAS_LWW | HAS_ADDS) != 0 {
            return Err(StateError("unknown field flags"));
        }
        let mut f = FieldState::default();
        if fflags & HAS_LWW != 0 {
            let s = resolve(r.raw_stamp()?)?;
            let (v, used) =
                codec::read_value(&r.b[r.pos..]).map_err(|_| StateError("field value"))?;
            r.pos += used;
            f.lww = Some((s, v));
        }
        if fflags & HAS_ADDS != 0 {
            let n = r.count()?;
            for _ in 0..n {
                let s = resolve(r.raw_stamp()?)?;
                let d = unzigzag(r.varint()?);
                f.adds.insert(s, d);
            }
        }
        state.fields.insert(name.to_string(), f);
    }
    if r.pos != bytes.len() {
        return Err(StateError("trailing bytes"));
    }
    Ok(state)
}

const TRUNC: StateError = StateError("truncated");
const BAD_AUTHOR: StateError = StateError("author index out of range");

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

struct R<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> R<'a> {
    fn byte(&mut self) -> Result<u8, StateError> {
        let v = *self.b.get(self.pos).ok_or(TRUNC)?;
        self.pos += 1;
        Ok(v)
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], StateError> {
        let end = self.pos.checked_add(n).ok_or(TRUNC)?;
        let s = self.b.get(self.pos..end).ok_or(TRUNC)?;
        self.pos = end;
        Ok(s)
    }

    fn varint(&mut self) -> Result<u64, StateError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(StateError("varint too long"))
    }

    /// A length or count: each element takes at least one byte, so it cannot exceed what is
    /// left (keeps a damaged count from allocating gigabytes).
    fn count(&mut self) -> Result<usize, StateError> {
        let n = usize::try_from(self.varint()?).map_err(|_| TRUNC)?;
        if n > self.b.len() - self.pos {
            return Err(TRUNC);
        }
        Ok(n)
    }

    fn raw_stamp(&mut self) -> Result<(u64, u64), StateError> {
        let hlc = u64::from_le_bytes(self.take(8)?.try_into().map_err(|_| TRUNC)?);
        Ok((hlc, self.varint()?))
    }

    /// A state's head, for comparing times without decoding: its tombstone's and last
    /// write's times; the author table is stepped over (the field count is next).
    fn head_times(&mut self) -> Result<(Option<u64>, Option<u64>), StateError> {
        if self.byte()? != STATE_FORMAT {
            return Err(StateError("unknown format"));
        }
        let flags = self.byte()?;
        if flags & !(HAS_DELETED | HAS_TOUCHED) != 0 {
            return Err(StateError("unknown flags"));
        }
        let mut time = |has: bool| has.then(|| self.raw_stamp().map(|s| s.0)).transpose();
        let deleted = time(flags & HAS_DELETED != 0)?;
        let touched = time(flags & HAS_TOUCHED != 0)?;
        let n_authors = self.count()?;
        self.take(n_authors.checked_mul(32).ok_or(TRUNC)?)?;
        Ok((deleted, touched))
    }

    /// One field, for comparing times without decoding: its value and adds stepped over.
    fn field_times(&mut self) -> Result<FieldTimes<'a>, StateError> {
        let len = self.count()?;
        let name = self.take(len)?;
        let fflags = self.byte()?;
        if fflags & !(HAS_LWW | HAS_ADDS) != 0 {
            return Err(StateError("unknown field flags"));
        }
        let mut lww = None;
        if fflags & HAS_LWW != 0 {
            lww = Some(self.raw_stamp()?.0);
            self.pos += codec::value_len(&self.b[self.pos..]).map_err(|_| TRUNC)?;
        }
        let mut adds = None;
        if fflags & HAS_ADDS != 0 {
            for _ in 0..self.count()? {
                adds = adds.max(Some(self.raw_stamp()?.0));
                self.varint()?;
            }
        }
        Ok(FieldTimes { name, lww, adds })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::op::{Op, Value};
    use proptest::prelude::*;

    fn arb_state() -> impl Strategy<Value = RecordState> {
        let author = prop_oneof![Just([1u8; 32]), Just([2u8; 32]), Just([9u8; 32])];
        let field = "[a-z]{1,4}";
        let value = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            (-1e9f64..1e9).prop_map(Value::from),
            "\\PC{0,12}".prop_map(Value::from),
            proptest::collection::vec(any::<i32>().prop_map(Value::from), 0..4)
                .prop_map(Value::Array),
        ];
        let op = (0u64..40, author, field, value, -5i64..5, 0u8..3).prop_map(
            |(h, author, field, value, delta, kind)| {
                let (collection, key, hlc) = ("c".to_string(), "k".to_string(), Hlc(h));
                let op = match kind {
                    0 => Op::Upsert {
                        collection,
                        key,
                        hlc,
                        fields: crate::OpFields::from([(field, value)]),
                    },
                    1 => Op::Delete {
                        collection,
                        key,
                        hlc,
                    },
                    _ => Op::CounterAdd {
                        collection,
                        key,
                        hlc,
                        field,
                        delta,
                    },
                };
                (op, author)
            },
        );
        proptest::collection::vec(op, 0..12).prop_map(|ops| {
            let mut s = RecordState::default();
            for (op, a) in &ops {
                s.apply(op, *a);
            }
            s
        })
    }

    /// An op at the same time as a stamp in the state does not dominate it: which one wins
    /// is the authors' order, which `dominated_by` does not look at.
    #[test]
    fn equal_times_are_never_dominated() {
        let upsert = |hlc: u64| Op::Upsert {
            collection: "c".into(),
            key: "k".into(),
            hlc: Hlc(hlc),
            fields: crate::OpFields::from([("a".to_string(), Value::from(1))]),
        };
        let delete = |hlc: u64| Op::Delete {
            collection: "c".into(),
            key: "k".into(),
            hlc: Hlc(hlc),
        };
        for (held, op) in [
            (upsert(10), upsert(10)),
            (upsert(10), delete(10)),
            (delete(10), delete(10)),
        ] {
            let mut stored = Vec::new();
            encode_state(&RecordState::from_op(&held, [9; 32]), &mut stored);
            let mut plain = Vec::new();
            codec::encode_ops(std::slice::from_ref(&op), &mut plain);
            let view = codec::decode(&plain).unwrap();
            assert!(
                !dominated_by(&stored, &view, &view.ops()[0]),
                "{held:?} by {op:?}"
            );
            // One tick later, it does (a delete over anything; an upsert over an upsert).
            let mut later = Vec::new();
            let op = match op {
                Op::Upsert { .. } => upsert(11),
                _ => delete(11),
            };
            codec::encode_ops(std::slice::from_ref(&op), &mut later);
            let view = codec::decode(&later).unwrap();
            let want = !matches!((&held, &op), (Op::Delete { .. }, Op::Upsert { .. }));
            assert_eq!(dominated_by(&stored, &view, &view.ops()[0]), want);
        }
    }

    /// What the shortcuts check of a damaged state, as their docs say: a state whose layout
    /// cannot be walked is never dominated nor absorbed; one damaged only inside a value (a
    /// text that is not UTF-8), and older throughout, is replaced unread (found by fuzzing:
    /// the docs had promised that no damaged state is ever replaced).
    #[test]
    fn damage_the_walk_steps_over_is_replaced_unread() {
        let upsert = |hlc: u64, v: &str| Op::Upsert {
            collection: "c".into(),
            key: "k".into(),
            hlc: Hlc(hlc),
            fields: crate::OpFields::from([("a".to_string(), Value::from(v))]),
        };
        let state = |op: &Op| {
            let mut out = Vec::new();
            encode_state(&RecordState::from_op(op, [9; 32]), &mut out);
            out
        };
        let older = state(&upsert(10, "abc"));
        let newer = state(&upsert(11, "xyz"));
        let mut plain = Vec::new();
        codec::encode_ops(&[upsert(11, "xyz")], &mut plain);
        let view = codec::decode(&plain).unwrap();
        let op = &view.ops()[0];

        // The value's last byte made invalid UTF-8: the layout still walks.
        let mut in_value = older.clone();
        *in_value.last_mut().unwrap() = 0xff;
        assert!(decode_state(&in_value).is_err());
        assert!(dominated_by(&in_value, &view, op));
        assert!(absorbs(&newer, &in_value));

        // Cut short, or with unknown flags: the layout does not walk.
        let cut = &older[..older.len() - 2];
        let mut flags = older.clone();
        flags[1] |= 0x80;
        for damaged in [cut, &flags[..]] {
            assert!(decode_state(damaged).is_err());
            assert!(!dominated_by(damaged, &view, op));
            assert!(!absorbs(&newer, damaged));
        }
    }

    /// Stamps of the same time by different authors are not absorbed either way: which one
    /// wins is the author's order, which `absorbs` does not look at.
    #[test]
    fn equal_times_are_never_absorbed() {
        let upsert = |hlc: u64, v: i64| Op::Upsert {
            collection: "c".into(),
            key: "k".into(),
            hlc: Hlc(hlc),
            fields: crate::OpFields::from([("a".to_string(), Value::from(v))]),
        };
        let delete = |hlc: u64| Op::Delete {
            collection: "c".into(),
            key: "k".into(),
            hlc: Hlc(hlc),
        };
        let stored = |op: &Op, author: u8| {
            let mut out = Vec::new();
            encode_state(&RecordState::from_op(op, [author; 32]), &mut out);
            out
        };
        for (older, newer) in [
            (upsert(10, 1), upsert(10, 2)),
            (delete(10), delete(10)),
            (upsert(10, 1), delete(10)),
        ] {
            for (a, b) in [(1, 9), (9, 1)] {
                assert!(!absorbs(&stored(&newer, a), &stored(&older, b)));
            }
        }
        // One tick later, they are.
        assert!(absorbs(
            &stored(&upsert(11, 2), 1),
            &stored(&upsert(10, 1), 9)
        ));
        assert!(absorbs(&stored(&delete(11), 1), &stored(&upsert(10, 1), 9)));
        assert!(absorbs(&stored(&delete(11), 1), &stored(&delete(10), 9)));
    }

    proptest! {
        #[test]
        fn states_round_trip(state in arb_state()) {
            let mut out = Vec::new();
            encode_state(&state, &mut out);
            let back = decode_state(&out).unwrap();
            prop_assert_eq!(&back, &state);
            prop_assert_eq!(back.visible(), state.visible());
        }

        /// A record's first op encoded straight from the payload view is byte for byte the
        /// encoding of the state that op makes.
        #[test]
        fn op_states_from_the_view_are_encode_state(ops in crate::codec::tests::arb_ops(), author in any::<[u8; 32]>()) {
            let ops: Vec<Op> = ops.into_iter().filter(|o| o.validate().is_ok()).collect();
            let mut plain = Vec::new();
            codec::encode_ops(&ops, &mut plain);
            let view = codec::decode(&plain).unwrap();
            for (op, o) in view.ops().iter().zip(&ops) {
                let (mut direct, mut built) = (Vec::new(), Vec::new());
                encode_op_state(&view, op, &author, &mut direct);
                encode_state(&RecordState::from_op(o, author), &mut built);
                prop_assert_eq!(&direct, &built);
                prop_assert_eq!(decode_state(&direct).unwrap(), RecordState::from_op(o, author));
            }
        }

        /// Where `absorbs` says a join keeps the delta's state, decoding both, merging and
        /// encoding gives exactly those bytes; and it says so for overwrites of every field
        /// and for newer deletes (what sustained ingest flushes).
        #[test]
        fn absorbed_joins_keep_the_delta(
            file in arb_state(),
            delta in arb_state(),
            h in 0u64..80,
            author in prop_oneof![Just([1u8; 32]), Just([7u8; 32])],
            delete in any::<bool>(),
        ) {
            let (mut f, mut d) = (Vec::new(), Vec::new());
            encode_state(&file, &mut f);
            encode_state(&delta, &mut d);
            let join = |a: &[u8], b: &[u8]| {
                let mut s = decode_state(a).unwrap();
                s.merge(&decode_state(b).unwrap());
                let mut out = Vec::new();
                encode_state(&s, &mut out);
                out
            };
            if absorbs(&d, &f) {
                prop_assert_eq!(&join(&f, &d), &d);
                prop_assert_eq!(&join(&d, &f), &d);
            }
            // A newer op over all of the file's fields (or a newer delete), applied to the
            // delta, is absorbing unless the file holds counter adds.
            let (collection, key, hlc) = ("c".to_string(), "k".to_string(), Hlc(h));
            let op = if delete {
                Op::Delete { collection, key, hlc }
            } else {
                let fields = file.fields.iter().map(|(n, _)| (n.to_string(), Value::from(2)));
                Op::Upsert { collection, key, hlc, fields: fields.collect() }
            };
            let mut newer = delta.clone();
            newer.apply(&op, author);
            let mut n = Vec::new();
            encode_state(&newer, &mut n);
            let adds = file.fields.iter().any(|(_, fs)| !fs.adds.is_empty());
            // An upsert leaves the delta's tombstone as it was: the file's must be older.
            let tombstone_older = file
                .deleted
                .is_none_or(|fd| delete || delta.deleted.is_some_and(|dd| fd.hlc < dd.hlc));
            // (The file's stamps are all below 40: from 40 on, the op is newer than all.)
            if h >= 40 {
                prop_assert_eq!(absorbs(&n, &f), !adds && tombstone_older);
            }
            if absorbs(&n, &f) {
                prop_assert_eq!(&join(&f, &n), &n);
            }
        }

        /// Where `dominated_by` says the op replaces the state, the op's own state is exactly
        /// what applying it gives; and it says so for the plain overwrite it exists for.
        #[test]
        fn dominated_states_are_replaced_exactly(
            state in arb_state(),
            h in 0u64..60,
            author in prop_oneof![Just([1u8; 32]), Just([7u8; 32])],
            fields in proptest::collection::btree_set("[a-z]{1,4}", 0..4),
            delete in any::<bool>(),
        ) {
            let (collection, key, hlc) = ("c".to_string(), "k".to_string(), Hlc(h));
            let op = if delete {
                Op::Delete { collection, key, hlc }
            } else {
                let mut fields: crate::OpFields =
                    fields.into_iter().map(|f| (f, Value::from(1))).collect();
                // Often cover the state's fields, so the fast path is taken.
                if h % 2 == 0 {
                    for name in state.fields.iter().map(|(n, _)| n) {
                        fields.insert(name.clone(), Value::from("x"));
                    }
                }
                Op::Upsert { collection, key, hlc, fields }
            };
            let mut stored = Vec::new();
            encode_state(&state, &mut stored);
            let mut plain = Vec::new();
            codec::encode_ops(std::slice::from_ref(&op), &mut plain);
            let view = codec::decode(&plain).unwrap();
            let mut applied = state.clone();
            applied.apply(&op, author);
            if dominated_by(&stored, &view, &view.ops()[0]) {
                let mut direct = Vec::new();
                encode_op_state(&view, &view.ops()[0], &author, &mut direct);
                prop_assert_eq!(decode_state(&direct).unwrap(), applied);
            }
            // The case it is for: a newer upsert of every field of an upserted record.
            let newer = Hlc(100);
            let mut old = RecordState::default();
            let fields: crate::OpFields =
                [("a".to_string(), Value::from(1)), ("b".to_string(), Value::from("v"))].into();
            old.apply(&Op::Upsert { collection: "c".into(), key: "k".into(), hlc: Hlc(h), fields: fields.clone() }, author);
            let mut old_bytes = Vec::new();
            encode_state(&old, &mut old_bytes);
            let mut plain = Vec::new();
            codec::encode_ops(&[Op::Upsert { collection: "c".into(), key: "k".into(), hlc: newer, fields }], &mut plain);
            let view = codec::decode(&plain).unwrap();
            prop_assert!(dominated_by(&old_bytes, &view, &view.ops()[0]));
        }

        #[test]
        fn damaged_states_never_panic(state in arb_state(), at in any::<usize>(), byte in any::<u8>(), cut in any::<usize>()) {
            let mut out = Vec::new();
            encode_state(&state, &mut out);
            let i = at % out.len();
            out[i] = byte;
            let _ = decode_state(&out);
            out.truncate(cut % (out.len() + 1));
            let _ = decode_state(&out);
        }
    }

    #[test]
    fn smaller_than_the_serde_form() {
        let mut s = RecordState::default();
        let fields: crate::OpFields = ["a", "b", "c"]
            .iter()
            .map(|f| {
                (
                    f.to_string(),
                    Value::from("abcdefghijklmnopqrstuvwxyz0123456789"),
                )
            })
            .collect();
        s.apply(
            &Op::Upsert {
                collection: "bench".into(),
                key: "k0000001".into(),
                hlc: Hlc(1 << 40),
                fields,
            },
            [7; 32],
        );
        let mut compact = Vec::new();
        encode_state(&s, &mut compact);
        let mut serde = Vec::new();
        ciborium::into_writer(&s, &mut serde).unwrap();
        assert!(
            compact.len() * 3 < serde.len() * 2, // 195 vs 375 bytes when written
            "{} vs {}",
            compact.len(),
            serde.len()
        );
    }

    #[test]
    fn deep_values_in_a_damaged_state_are_refused() {
        // A field value of 10,000 nested arrays: the decoder must refuse it, not recurse.
        let mut out = vec![STATE_FORMAT, 0, 1];
        out.extend_from_slice(&[5; 32]);
        out.extend_from_slice(&[1, 1, b'x', HAS_LWW]);
        out.extend_from_slice(&1u64.to_le_bytes());
        out.push(0);
        out.extend(std::iter::repeat_n(0x81, 10_000));
        out.push(0xf6);
        assert_eq!(decode_state(&out), Err(StateError("field value")));
    }
}
