//! Coalescing: the writes of several local callers sealed into one batch.
//!
//! A shell that has several callers' writes to one namespace queued at once may seal them into
//! a single batch ([`crate::Engine::write_many`]) instead of one batch per caller: one
//! signature, one header, one gossip message and one store row instead of N.
//!
//! **Why it is equivalent.** Sealed one by one, caller *i*'s batch gets timestamps before
//! caller *i+1*'s (the engine's clock is strictly increasing), all under the same author.
//! Coalesced, the callers' ops are concatenated in the same order and stamped by the same
//! clock, so every op gets the same relative order as before and the same author. The merge
//! rules compare only stamps (HLC, author), never batch boundaries, so the records are the
//! same; and op merging ([`crate::prune`]) stays exact across callers because its contract —
//! one author, strictly increasing timestamps within the batch — holds for the concatenation:
//! a later caller's op dominates an earlier caller's op exactly when its timestamp is later,
//! which is exactly when it would have won the merge as a separate batch.
//!
//! **What is not coalesced.** One bad caller must not fail the others, so each caller is
//! checked on its own (op count, our capability's rights, scope and validity window) before it
//! joins a group; a caller that fails gets its own error. A caller with a revocation is sealed
//! alone (a revocation needs admin rights and makes peers rebuild records: it should not
//! widen to other callers' ops), and so is a caller with more than [`CALLER_OPS_MAX`] ops. A group never exceeds the protocol's op limit, and is planned
//! to stay well under its byte limit ([`GROUP_BYTES_BUDGET`], by [`crate::Op::approx_len`]);
//! if a coalesced group still fails to seal, each of its callers is sealed on its own, so
//! every caller gets exactly the outcome it would have had alone.

use std::ops::Range;

use crate::limits;

/// Planned (approximate) payload bytes of one coalesced group: half the batch limit, leaving
/// room for the header, a capability chain and any estimate error.
pub const GROUP_BYTES_BUDGET: usize = limits::MAX_BATCH_BYTES / 2;

/// Callers with more ops than this are sealed alone: their batch already amortizes the
/// per-batch costs, and a coalesced group keeps a copy of its callers' ops to fall back on.
pub const CALLER_OPS_MAX: usize = 256;

/// What [`plan`] needs to know about one caller's write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CallerSize {
    /// Ops in the write.
    pub ops: usize,
    /// Approximate encoded bytes of the ops.
    pub bytes: usize,
    /// Must be sealed in a batch of its own.
    pub alone: bool,
}

/// Splits callers, in order, into consecutive groups of at most `max_ops` ops and `max_bytes`
/// approximate bytes each (a caller is never split; a caller over a bound, or marked `alone`,
/// is a group of its own). Every caller is in exactly one group, in order.
pub fn plan(callers: &[CallerSize], max_ops: usize, max_bytes: usize) -> Vec<Range<usize>> {
    let mut groups = Vec::new();
    let mut start = 0;
    let (mut ops, mut bytes) = (0usize, 0usize);
    for (i, c) in callers.iter().enumerate() {
        let fits = !c.alone && ops + c.ops <= max_ops && bytes + c.bytes <= max_bytes;
        if i > start && !fits {
            groups.push(start..i);
            start = i;
            ops = 0;
            bytes = 0;
        }
        ops += c.ops;
        bytes += c.bytes;
        if c.alone {
            groups.push(start..i + 1);
            start = i + 1;
            ops = 0;
            bytes = 0;
        }
    }
    if start < callers.len() {
        groups.push(start..callers.len());
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn c(ops: usize, bytes: usize, alone: bool) -> CallerSize {
        CallerSize { ops, bytes, alone }
    }

    #[test]
    fn groups_by_limits_and_isolates_alone() {
        let callers = [
            c(3, 30, false),
            c(4, 40, false),
            c(5, 50, false), // 12 ops > 10: new group
            c(1, 10, true),  // alone
            c(1, 10, false),
            c(20, 10, false), // over max_ops on its own: a group of its own
            c(1, 10, false),
        ];
        let g = plan(&callers, 10, 1_000);
        assert_eq!(g, vec![0..2, 2..3, 3..4, 4..5, 5..6, 6..7]);
        let g = plan(&callers[..3], 100, 65);
        assert_eq!(g, vec![0..1, 1..2, 2..3]);
        assert!(plan(&[], 10, 10).is_empty());
    }

    proptest! {
        /// Groups cover every caller once, in order, and respect the bounds unless a single
        /// caller exceeds them; `alone` callers are by themselves.
        #[test]
        fn plan_partitions_in_order(
            sizes in proptest::collection::vec((1usize..50, 1usize..500, proptest::bool::weighted(0.1)), 0..60),
            max_ops in 1usize..120,
            max_bytes in 1usize..1500,
        ) {
            let callers: Vec<CallerSize> = sizes.iter().map(|&(o, b, a)| c(o, b, a)).collect();
            let groups = plan(&callers, max_ops, max_bytes);
            let mut next = 0;
            for g in &groups {
                prop_assert_eq!(g.start, next);
                prop_assert!(g.end > g.start);
                next = g.end;
                let ops: usize = callers[g.clone()].iter().map(|c| c.ops).sum();
                let bytes: usize = callers[g.clone()].iter().map(|c| c.bytes).sum();
                if g.len() > 1 {
                    prop_assert!(ops <= max_ops && bytes <= max_bytes);
                    prop_assert!(callers[g.clone()].iter().all(|c| !c.alone));
                }
            }
            prop_assert_eq!(next, callers.len());
        }
    }
}
