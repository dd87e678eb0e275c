//! [`BatchOps`]: the ops of a verified batch, kept as their validated compact payload.
//!
//! A batch's ops used to travel as owned [`Op`]s (`Arc<Vec<Op>>`): every received batch was
//! decoded into ~8 heap blocks per workload-W op (names, keys, the field map, values), and
//! those blocks were freed on whichever thread dropped the last reference (the materializer,
//! the flusher), after crossing threads. The compact payload already holds everything, in one
//! block, and [`crate::codec::decode`] borrows from it without allocating per op: so the ops
//! are kept as those bytes, and whoever needs them reads a [`PayloadView`]. Owned ops are made
//! only on request ([`BatchOps::to_vec`]: tests, tools, the rare record that must be merged
//! into a decoded state).
//!
//! The bytes are always a payload that decoded and validated (every op rule, strictly
//! increasing timestamps, at least one op) when the value was built; [`BatchOps::view`] decodes
//! them again without checking those rules a second time, but still checks the structure and
//! reports damage as an error.

use std::sync::{Arc, OnceLock};

use yoke::Yoke;

use crate::codec::{self, CodecError, OpView, PayloadView};
use crate::hlc::Hlc;
use crate::op::Op;

/// A payload's ops decoded, kept with the bytes they borrow from.
/// The bytes are a `Vec` behind the `Arc` (not an `Arc<[u8]>`, which a `Vec` becomes only by
/// copying): a payload just encoded or inflated is kept where it was written.
type Decoded = Yoke<PayloadView<'static>, Arc<Vec<u8>>>;

/// The ops of a batch, in order, as the uncompressed compact payload ([`crate::codec`]).
/// Cheap to clone (the bytes, and their decoded view, are shared).
#[derive(Clone)]
pub struct BatchOps {
    plain: Arc<Vec<u8>>,
    /// The payload decoded: kept from verification (which decodes it anyway), or made by the
    /// first [`BatchOps::view`] for a batch sealed here. Staging used to decode every payload
    /// a second time (39% of its instructions, callgrind of B2m). Costs ~110 bytes per W op
    /// (the op, field and name entries) while the batch is held.
    decoded: Arc<OnceLock<Decoded>>,
    len: usize,
    /// The revocations among the ops (token id in hex, time): rare, and needed where the
    /// rest of the ops are not (the engine's admission, the log's revocation table).
    revocations: Vec<(String, Hlc)>,
}

impl std::fmt::Debug for BatchOps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchOps")
            .field("ops", &self.len)
            .field("plain_bytes", &self.plain.len())
            .field("revocations", &self.revocations)
            .finish_non_exhaustive()
    }
}

/// Equal payloads are equal ops (the decoded view is derived from them).
impl PartialEq for BatchOps {
    fn eq(&self, other: &Self) -> bool {
        self.plain == other.plain && self.len == other.len && self.revocations == other.revocations
    }
}

impl Eq for BatchOps {}

impl BatchOps {
    /// Encodes `ops` (which must be valid and in strictly increasing timestamp order, as
    /// sealing checks) and checks that the encoding decodes to as many ops.
    pub fn from_ops(ops: &[Op]) -> Result<Self, CodecError> {
        let mut plain = Vec::new();
        codec::encode_ops(ops, &mut plain);
        let decoded = Self::decode(Arc::new(plain), codec::decode)?;
        if decoded.get().len() != ops.len() {
            return Err(CodecError::Malformed("encoding lost ops"));
        }
        Ok(Self::from_decoded(decoded))
    }

    /// Decodes `plain` with `decode` into a view kept with the bytes.
    pub(crate) fn decode(
        plain: Arc<Vec<u8>>,
        decode: fn(&[u8]) -> Result<PayloadView<'_>, CodecError>,
    ) -> Result<Decoded, CodecError> {
        Yoke::try_attach_to_cart(plain, |b| decode(b))
    }

    /// From a payload already decoded (which validated it), keeping the view.
    pub(crate) fn from_decoded(decoded: Decoded) -> Self {
        let view = decoded.get();
        let revocations = view
            .ops()
            .iter()
            .filter_map(|o| match o {
                OpView::Revoke { token, hlc } => Some((token.to_string(), *hlc)),
                _ => None,
            })
            .collect();
        BatchOps {
            plain: decoded.backing_cart().clone(),
            len: view.len(),
            revocations,
            decoded: Arc::new(OnceLock::from(decoded)),
        }
    }

    /// From `len` ops just encoded into `plain` (sealing: the ops were checked; decoding is
    /// left to whoever reads the view, which still checks), with their revocations.
    pub(crate) fn from_encoded(
        len: usize,
        revocations: Vec<(String, Hlc)>,
        plain: Vec<u8>,
    ) -> Self {
        BatchOps {
            plain: Arc::new(plain),
            decoded: Arc::new(OnceLock::new()),
            len,
            revocations,
        }
    }

    /// Number of ops.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are no ops (never, for a verified batch).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether any op is a revocation (known without decoding).
    pub fn has_revokes(&self) -> bool {
        !self.revocations.is_empty()
    }

    /// The revocations among the ops, in order: (token id in hex, time).
    pub fn revocations(&self) -> &[(String, Hlc)] {
        &self.revocations
    }

    /// The uncompressed compact payload.
    pub fn plain(&self) -> &[u8] {
        &self.plain
    }

    /// The ops, borrowed from the payload: the view kept from verification, or, for a batch
    /// sealed here, decoded once on first use (its structure checked; the op rules it passed
    /// when sealed are not checked again) and kept.
    pub fn view(&self) -> Result<&PayloadView<'_>, CodecError> {
        if let Some(d) = self.decoded.get() {
            return Ok(d.get());
        }
        let decoded = Self::decode(self.plain.clone(), codec::decode_checked_before)?;
        if decoded.get().len() != self.len {
            return Err(CodecError::Malformed("op count changed"));
        }
        // Another thread may have set it meanwhile: either value is the same decoding.
        let _ = self.decoded.set(decoded);
        self.decoded
            .get()
            .map(Yoke::get)
            .ok_or(CodecError::Malformed("decoded view not kept"))
    }

    /// The ops' view where it is at hand already (kept from verification, or made by an
    /// earlier [`BatchOps::view`]); `None` where only a decode would make it. Never decodes.
    pub fn view_if_decoded(&self) -> Option<&PayloadView<'_>> {
        self.decoded.get().map(Yoke::get)
    }

    /// Decodes the payload again without keeping the result (structure checked, op rules
    /// not), returning the op count: what the first [`BatchOps::view`] of a batch sealed here
    /// costs. For benchmarks; readers use `view`.
    pub fn decode_uncached(&self) -> Result<usize, CodecError> {
        codec::decode_checked_before(&self.plain).map(|v| v.len())
    }

    /// The ops as owned values.
    pub fn to_vec(&self) -> Result<Vec<Op>, CodecError> {
        Ok(self.view()?.to_ops())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ops() -> Vec<Op> {
        vec![
            Op::Upsert {
                collection: "c".into(),
                key: "k".into(),
                hlc: Hlc(10),
                fields: crate::OpFields::from([("a".into(), 1.into())]),
            },
            Op::Revoke {
                token: "00".repeat(32),
                hlc: Hlc(11),
            },
        ]
    }

    #[test]
    fn round_trips_and_knows_its_revocations() {
        let ops = ops();
        let b = BatchOps::from_ops(&ops).unwrap();
        assert_eq!(b.len(), 2);
        assert_eq!(b.revocations(), &[("00".repeat(32), Hlc(11))]);
        assert_eq!(b.to_vec().unwrap(), ops);
        let only_upsert = BatchOps::from_ops(&ops[..1]).unwrap();
        assert!(!only_upsert.has_revokes());
        assert_eq!(only_upsert.view().unwrap().len(), 1);
    }

    /// The view is decoded once and shared: a built (validated) payload keeps the view it was
    /// checked with, a freshly encoded one decodes on first use, and clones share it.
    #[test]
    fn the_view_is_decoded_once_and_shared() {
        let ops = ops();
        let built = BatchOps::from_ops(&ops).unwrap();
        assert!(
            built.decoded.get().is_some(),
            "the validating decode is kept"
        );
        let clone = built.clone();
        assert!(std::ptr::eq(built.view().unwrap(), clone.view().unwrap()));

        let mut plain = Vec::new();
        codec::encode_ops(&ops, &mut plain);
        let revocations = vec![("00".repeat(32), Hlc(11))];
        let sealed = BatchOps::from_encoded(ops.len(), revocations, plain);
        assert!(
            sealed.decoded.get().is_none(),
            "nothing decoded before it is read"
        );
        let clone = sealed.clone();
        let first = sealed.view().unwrap();
        assert!(std::ptr::eq(first, sealed.view().unwrap()));
        assert!(std::ptr::eq(first, clone.view().unwrap()));
        assert_eq!(first.to_ops(), ops);
        assert_eq!(sealed, built);
    }

    /// A damaged payload is reported on every read, and nothing is kept.
    #[test]
    fn a_damaged_payload_is_an_error_each_time() {
        let ops = ops();
        let mut plain = Vec::new();
        codec::encode_ops(&ops, &mut plain);
        plain.truncate(plain.len() - 3);
        let b = BatchOps::from_encoded(ops.len(), Vec::new(), plain);
        assert!(b.view().is_err());
        assert!(b.view().is_err());
        assert!(b.decoded.get().is_none());
    }

    #[test]
    fn invalid_ops_are_refused() {
        let mut bad = ops();
        bad.swap(0, 1); // timestamps no longer increase
        assert!(BatchOps::from_ops(&bad).is_err());
    }
}
