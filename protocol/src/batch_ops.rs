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

use std::sync::Arc;

use crate::codec::{self, CodecError, OpView, PayloadView};
use crate::hlc::Hlc;
use crate::op::Op;

/// The ops of a batch, in order, as the uncompressed compact payload ([`crate::codec`]).
/// Cheap to clone (the bytes are shared).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchOps {
    plain: Arc<[u8]>,
    len: usize,
    /// The revocations among the ops (token id in hex, time): rare, and needed where the
    /// rest of the ops are not (the engine's admission, the log's revocation table).
    revocations: Vec<(String, Hlc)>,
}

impl BatchOps {
    /// Encodes `ops` (which must be valid and in strictly increasing timestamp order, as
    /// sealing checks) and checks that the encoding decodes to as many ops.
    pub fn from_ops(ops: &[Op]) -> Result<Self, CodecError> {
        let mut plain = Vec::new();
        codec::encode_ops(ops, &mut plain);
        let view = codec::decode(&plain)?;
        if view.len() != ops.len() {
            return Err(CodecError::Malformed("encoding lost ops"));
        }
        Ok(Self::from_view(&view, &plain))
    }

    /// From a payload already decoded into `view` (which validated it).
    pub(crate) fn from_view(view: &PayloadView<'_>, plain: &[u8]) -> Self {
        BatchOps {
            plain: plain.into(),
            len: view.len(),
            revocations: view
                .ops()
                .iter()
                .filter_map(|o| match o {
                    OpView::Revoke { token, hlc } => Some((token.to_string(), *hlc)),
                    _ => None,
                })
                .collect(),
        }
    }

    /// From ops just encoded into `plain` by [`codec::encode_ops`] (sealing: the ops were
    /// checked; decoding is left to whoever reads the view, which still checks).
    pub(crate) fn from_encoded(ops: &[Op], plain: Vec<u8>) -> Self {
        BatchOps {
            plain: plain.into(),
            len: ops.len(),
            revocations: ops
                .iter()
                .filter_map(|o| match o {
                    Op::Revoke { token, hlc } => Some((token.clone(), *hlc)),
                    _ => None,
                })
                .collect(),
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

    /// The ops, borrowed from the payload (decoded again, nothing allocated per op; the op
    /// rules the payload passed when this value was built are not checked again).
    pub fn view(&self) -> Result<PayloadView<'_>, CodecError> {
        let view = codec::decode_checked_before(&self.plain)?;
        if view.len() != self.len {
            return Err(CodecError::Malformed("op count changed"));
        }
        Ok(view)
    }

    /// The ops as owned values.
    pub fn to_vec(&self) -> Result<Vec<Op>, CodecError> {
        Ok(self.view()?.to_ops())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn ops() -> Vec<Op> {
        vec![
            Op::Upsert {
                collection: "c".into(),
                key: "k".into(),
                hlc: Hlc(10),
                fields: BTreeMap::from([("a".into(), 1.into())]),
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

    #[test]
    fn invalid_ops_are_refused() {
        let mut bad = ops();
        bad.swap(0, 1); // timestamps no longer increase
        assert!(BatchOps::from_ops(&bad).is_err());
    }
}
