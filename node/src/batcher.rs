//! Adaptive batching of local writes: when the actor seals what is queued.
//!
//! [`Batcher`] is a pure policy (no clock, no I/O, no tasks): the actor feeds it each write's
//! arrival (`arrive`, with the time the caller queued it) and asks it what to do now (`poll`):
//! flush at once, or wait until a given time for more writes to join the batch. Times are
//! microseconds on any monotonic scale the caller chooses.
//!
//! The rule, in short:
//!
//! - **Idle → no added latency.** The flush delay (`linger`) starts at zero: a write that
//!   arrives alone is sealed at once, together with whatever else is queued behind it.
//! - **Under load → batches grow.** A flush that carried two or more writes is a sign of load
//!   (writers queued while the last batch was being committed): the linger doubles, from
//!   [`LINGER_STEP_US`] up to the configured maximum. A flush that carried a single write
//!   halves it, back to zero below the step: as soon as load goes, so does the delay.
//! - **Stop waiting when the stream pauses.** While a batch is open the batcher tracks the
//!   gap between arrivals within batches (EWMA); once nothing arrived for
//!   [`QUIET_FACTOR`] × that gap (at least [`QUIET_MIN_US`], at most the linger), more writes
//!   are unlikely soon and the batch is sealed without waiting out the linger. Likewise once
//!   [`IDLE_ROUNDS_MAX`] rounds of the actor yielding to other tasks brought nothing new
//!   (`yielded`): the writers that were ready have all run, waiting longer only burns CPU.
//! - **Bounds.** A batch is sealed once it holds `max_ops` ops or `max_bytes` (approximate)
//!   bytes, and never later than `max_delay` after its oldest write was queued: the added
//!   latency is bounded whatever the load.
//!
//! It lives in `node/` because it is shell policy: how long this node holds its own callers'
//! writes trades their latency against its CPU and the number of batches, and peers never need
//! to agree on it; any batch within the protocol's limits is equally valid to them.

use std::time::Duration;

use blazedb_protocol::limits;

/// First non-zero flush delay, in microseconds (the linger doubles from here under load).
pub const LINGER_STEP_US: u64 = 100;
/// A batch is sealed once no write arrived for this many mean arrival gaps.
pub const QUIET_FACTOR: u64 = 4;
/// Shortest quiet period that seals a batch early, in microseconds.
pub const QUIET_MIN_US: u64 = 50;
/// A batch is sealed once this many consecutive rounds of yielding to the writers brought no
/// new write (every writer that could run has had its turn).
pub const IDLE_ROUNDS_MAX: u32 = 2;
/// Weight of a new gap in the arrival-gap average, as 1/N.
const GAP_EWMA_N: u64 = 4;

/// How local writes are batched.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchingConfig {
    /// Seal writes of several callers to one namespace, queued together, into one batch.
    /// Off: one batch per call (still group-committed in one durable transaction).
    pub coalesce: bool,
    /// Longest a write is held for others to join its batch (the bound on added latency).
    /// Zero: never wait (seal what is queued at once).
    pub max_delay: Duration,
    /// Most ops sealed per flush (at most the protocol's per-batch limit).
    pub max_ops: usize,
    /// Most approximate op bytes sealed per flush.
    pub max_bytes: usize,
}

impl Default for BatchingConfig {
    fn default() -> Self {
        Self {
            coalesce: true,
            max_delay: Duration::from_millis(2),
            max_ops: limits::MAX_OPS_PER_BATCH,
            max_bytes: limits::MAX_BATCH_BYTES,
        }
    }
}

impl BatchingConfig {
    /// No coalescing, no delay: one batch per write call, as before adaptive batching.
    pub fn off() -> Self {
        Self {
            coalesce: false,
            max_delay: Duration::ZERO,
            ..Self::default()
        }
    }
}

/// What the actor should do with the open batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Nothing is pending.
    Idle,
    /// Seal what is pending now.
    Flush(FlushReason),
    /// Wait for more writes until this time (µs), then ask again.
    WaitUntil(u64),
}

/// Why a batch is sealed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlushReason {
    /// No load: no delay.
    Immediate,
    /// The size bound is reached.
    Full,
    /// Every pending write is one the engine seals in a batch of its own (a bulk call, or a
    /// revocation): none can be joined, so waiting would only add latency.
    Alone,
    /// The flush delay has run out (the latency bound).
    Deadline,
    /// No write arrived for a while: the burst is over.
    Quiet,
}

#[derive(Clone, Copy, Debug)]
struct Open {
    /// When the oldest pending write was queued.
    since_us: u64,
    /// When the newest pending write was queued.
    last_us: u64,
    writes: usize,
    /// Of those, writes other writes may share a batch with (not sealed alone).
    joinable: usize,
    ops: usize,
    bytes: usize,
}

/// The batching policy (see the module doc).
#[derive(Clone, Debug)]
pub struct Batcher {
    max_delay_us: u64,
    max_ops: usize,
    max_bytes: usize,
    open: Option<Open>,
    /// Current flush delay.
    linger_us: u64,
    /// Mean gap between arrivals within a batch.
    gap_us: u64,
    /// Consecutive yield rounds without a new write.
    idle_rounds: u32,
}

impl Batcher {
    /// A batcher with `cfg`'s bounds, idle (no delay).
    pub fn new(cfg: &BatchingConfig) -> Self {
        Self {
            max_delay_us: u64::try_from(cfg.max_delay.as_micros()).unwrap_or(u64::MAX),
            max_ops: cfg.max_ops.clamp(1, limits::MAX_OPS_PER_BATCH),
            max_bytes: cfg.max_bytes.max(1),
            open: None,
            linger_us: 0,
            gap_us: 0,
            idle_rounds: 0,
        }
    }

    /// A write of `ops` ops and about `bytes` bytes was queued at `at_us`; `alone`: the
    /// engine seals it in a batch of its own ([`blazedb_protocol::CheckedOps::sealed_alone`]).
    pub fn arrive(&mut self, at_us: u64, ops: usize, bytes: usize, alone: bool) {
        self.idle_rounds = 0;
        let joinable = usize::from(!alone);
        match &mut self.open {
            None => {
                self.open = Some(Open {
                    since_us: at_us,
                    last_us: at_us,
                    writes: 1,
                    joinable,
                    ops,
                    bytes,
                })
            }
            Some(o) => {
                // Only gaps within a batch: the gap across a flush is our own commit time.
                let gap = at_us.saturating_sub(o.last_us).min(self.max_delay_us);
                self.gap_us = (self.gap_us * (GAP_EWMA_N - 1) + gap) / GAP_EWMA_N;
                o.since_us = o.since_us.min(at_us);
                o.last_us = o.last_us.max(at_us);
                o.writes += 1;
                o.joinable += joinable;
                o.ops += ops;
                o.bytes += bytes;
            }
        }
    }

    /// What to do at `now_us`.
    pub fn poll(&self, now_us: u64) -> Decision {
        let Some(o) = &self.open else {
            return Decision::Idle;
        };
        if o.ops >= self.max_ops || o.bytes >= self.max_bytes {
            return Decision::Flush(FlushReason::Full);
        }
        if o.joinable == 0 {
            return Decision::Flush(FlushReason::Alone);
        }
        if self.linger_us == 0 {
            return Decision::Flush(FlushReason::Immediate);
        }
        let deadline = o.since_us.saturating_add(self.linger_us);
        if now_us >= deadline {
            return Decision::Flush(FlushReason::Deadline);
        }
        if self.idle_rounds >= IDLE_ROUNDS_MAX {
            return Decision::Flush(FlushReason::Quiet);
        }
        let quiet = (self.gap_us * QUIET_FACTOR).clamp(QUIET_MIN_US, self.linger_us);
        let quiet_at = o.last_us.saturating_add(quiet);
        if now_us >= quiet_at {
            return Decision::Flush(FlushReason::Quiet);
        }
        Decision::WaitUntil(deadline.min(quiet_at))
    }

    /// The actor let other tasks run while waiting, and no write came of it.
    pub fn yielded_idle(&mut self) {
        self.idle_rounds = self.idle_rounds.saturating_add(1);
    }

    /// The pending writes were sealed: adapt the delay to what the batch showed.
    pub fn flushed(&mut self) {
        self.idle_rounds = 0;
        let Some(o) = self.open.take() else {
            return;
        };
        // Load is writes that could have shared the batch: bulk calls queued together are
        // sealed one batch each whatever the delay, so they never lengthen it.
        self.linger_us = if o.joinable >= 2 {
            (self.linger_us * 2)
                .max(LINGER_STEP_US)
                .min(self.max_delay_us)
        } else if self.linger_us / 2 < LINGER_STEP_US {
            0
        } else {
            self.linger_us / 2
        };
    }

    /// Whether the size bound is reached (stop draining the queue and seal).
    pub fn is_full(&self) -> bool {
        self.open
            .is_some_and(|o| o.ops >= self.max_ops || o.bytes >= self.max_bytes)
    }

    /// The current flush delay, in microseconds.
    pub fn linger_us(&self) -> u64 {
        self.linger_us
    }

    /// Writes pending.
    pub fn pending_writes(&self) -> usize {
        self.open.map_or(0, |o| o.writes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cfg(max_delay_us: u64) -> BatchingConfig {
        BatchingConfig {
            max_delay: Duration::from_micros(max_delay_us),
            ..BatchingConfig::default()
        }
    }

    /// A burst: `n` writes 5 µs apart from `t`, then a flush. Returns the time after it.
    fn burst(b: &mut Batcher, t: u64, n: u64) -> u64 {
        for i in 0..n {
            b.arrive(t + i * 5, 1, 100, false);
        }
        b.flushed();
        t + n * 5
    }

    /// Load: `rounds` bursts of `n` writes, 1 ms apart, from time 0. Returns the time after.
    fn bursts(b: &mut Batcher, rounds: usize, n: u64) -> u64 {
        (0..rounds).fold(0, |t, _| burst(b, t + 1_000, n))
    }

    #[test]
    fn idle_write_is_sealed_at_once() {
        let mut b = Batcher::new(&BatchingConfig::default());
        assert_eq!(b.poll(0), Decision::Idle);
        b.arrive(1_000, 1, 100, false);
        assert_eq!(b.poll(1_000), Decision::Flush(FlushReason::Immediate));
        b.flushed();
        assert_eq!(b.linger_us(), 0);
        assert_eq!(b.poll(1_001), Decision::Idle);
        // One write at a time stays immediate, however fast they come.
        for t in 0..100 {
            b.arrive(2_000 + t * 10, 1, 100, false);
            assert_eq!(
                b.poll(2_000 + t * 10),
                Decision::Flush(FlushReason::Immediate)
            );
            b.flushed();
        }
    }

    #[test]
    fn load_grows_the_delay_and_idleness_shrinks_it() {
        let mut b = Batcher::new(&cfg(2_000));
        let mut t = 0;
        let mut lingers = Vec::new();
        for _ in 0..8 {
            t = burst(&mut b, t + 1_000, 32);
            lingers.push(b.linger_us());
        }
        assert_eq!(lingers[0], LINGER_STEP_US);
        assert!(lingers.windows(2).all(|w| w[1] >= w[0]), "{lingers:?}");
        assert_eq!(*lingers.last().unwrap(), 2_000, "capped at max_delay");
        // Under load a new write waits for company instead of being sealed alone.
        b.arrive(t + 1_000, 1, 100, false);
        assert!(matches!(b.poll(t + 1_000), Decision::WaitUntil(_)));
        b.arrive(t + 1_005, 1, 100, false);
        b.flushed();
        // Single writes: the delay halves each time, down to zero.
        let mut steps = 0;
        while b.linger_us() > 0 {
            t += 10_000;
            b.arrive(t, 1, 100, false);
            b.flushed();
            steps += 1;
            assert!(steps < 20);
        }
        t += 10_000;
        b.arrive(t, 1, 100, false);
        assert_eq!(b.poll(t), Decision::Flush(FlushReason::Immediate));
    }

    /// A write the engine seals alone (a bulk call) is sealed at once even under load: no
    /// other write can join it. Bulk calls queued together do not lengthen the delay, and a
    /// small write beside one still waits for company.
    #[test]
    fn a_write_sealed_alone_never_waits() {
        let mut b = Batcher::new(&cfg(2_000));
        let mut t = bursts(&mut b, 8, 32);
        assert_eq!(b.linger_us(), 2_000);
        t += 1_000;
        b.arrive(t, 1_000, 100_000, true);
        assert_eq!(b.poll(t), Decision::Flush(FlushReason::Alone));
        b.arrive(t + 1, 1_000, 100_000, true);
        assert_eq!(b.poll(t + 1), Decision::Flush(FlushReason::Alone));
        b.flushed();
        assert_eq!(b.linger_us(), 1_000, "two bulk calls are not load");
        b.arrive(t + 10, 1_000, 100_000, true);
        b.arrive(t + 11, 1, 100, false);
        assert!(matches!(b.poll(t + 11), Decision::WaitUntil(_)));
        b.flushed();
        // Bulk calls alone, back to back: the delay falls to zero as for single writes.
        for i in 0..20 {
            b.arrive(t + 100 + i, 1_000, 100_000, true);
            b.arrive(t + 100 + i, 1_000, 100_000, true);
            b.flushed();
        }
        assert_eq!(b.linger_us(), 0);
    }

    #[test]
    fn a_burst_is_sealed_when_it_pauses() {
        let mut b = Batcher::new(&cfg(5_000));
        let t = bursts(&mut b, 10, 16);
        assert_eq!(b.linger_us(), 5_000);
        // Arrivals every 5 µs: the quiet period is QUIET_MIN_US, far below the linger.
        let start = t + 1_000;
        for i in 0..16 {
            b.arrive(start + i * 5, 1, 100, false);
            assert!(matches!(b.poll(start + i * 5), Decision::WaitUntil(_)));
        }
        let last = start + 15 * 5;
        assert_eq!(
            b.poll(last + QUIET_MIN_US - 1),
            Decision::WaitUntil(last + QUIET_MIN_US)
        );
        assert_eq!(
            b.poll(last + QUIET_MIN_US),
            Decision::Flush(FlushReason::Quiet)
        );
    }

    #[test]
    fn idle_yield_rounds_seal() {
        let mut b = Batcher::new(&cfg(5_000));
        let t = bursts(&mut b, 10, 16);
        b.arrive(t + 1_000, 1, 10, false);
        assert!(matches!(b.poll(t + 1_000), Decision::WaitUntil(_)));
        b.yielded_idle();
        assert!(matches!(b.poll(t + 1_001), Decision::WaitUntil(_)));
        // A write in between starts the count again.
        b.arrive(t + 1_002, 1, 10, false);
        b.yielded_idle();
        assert!(matches!(b.poll(t + 1_003), Decision::WaitUntil(_)));
        b.yielded_idle();
        assert_eq!(b.poll(t + 1_004), Decision::Flush(FlushReason::Quiet));
    }

    #[test]
    fn size_bound_seals() {
        let c = BatchingConfig {
            max_ops: 100,
            max_bytes: 10_000,
            ..cfg(2_000)
        };
        let mut b = Batcher::new(&c);
        let t = bursts(&mut b, 6, 8);
        let t = t + 1_000;
        for i in 0..99 {
            b.arrive(t + i, 1, 10, false);
            assert!(!b.is_full());
            assert!(matches!(b.poll(t + i), Decision::WaitUntil(_)));
        }
        b.arrive(t + 99, 1, 10, false);
        assert!(b.is_full());
        assert_eq!(b.poll(t + 99), Decision::Flush(FlushReason::Full));
        b.flushed();
        // Bytes bound too.
        b.arrive(t + 200, 1, 10_000, false);
        assert_eq!(b.poll(t + 200), Decision::Flush(FlushReason::Full));
    }

    #[test]
    fn off_never_waits() {
        let mut b = Batcher::new(&BatchingConfig::off());
        let t = bursts(&mut b, 10, 50);
        assert_eq!(b.linger_us(), 0);
        b.arrive(t, 1, 1, false);
        assert_eq!(b.poll(t), Decision::Flush(FlushReason::Immediate));
    }

    proptest! {
        /// Whatever the arrivals, a write is sealed no later than `max_delay` after it was
        /// queued (the actor waking when told to), a wait never ends past that bound, and a
        /// batch never exceeds the ops bound.
        #[test]
        fn latency_and_size_are_bounded(
            gaps in proptest::collection::vec(0u64..3_000, 1..300),
            max_delay_us in 0u64..5_000,
            max_ops in 1usize..64,
        ) {
            let c = BatchingConfig { max_ops, ..cfg(max_delay_us) };
            let mut b = Batcher::new(&c);
            let mut now = 0u64;
            let mut oldest: Option<u64> = None;
            let mut ops = 0usize;
            for (i, gap) in gaps.iter().enumerate() {
                now += gap;
                b.arrive(now, 1, 10, false);
                oldest.get_or_insert(now);
                ops += 1;
                prop_assert!(ops <= max_ops);
                let next = gaps.get(i + 1).map_or(u64::MAX, |g| now + g);
                // The actor polls at the arrival, then when a wait ends, until the next write.
                let mut t = now;
                loop {
                    match b.poll(t) {
                        Decision::Idle => prop_assert!(false, "pending writes but idle"),
                        Decision::Flush(_) => {
                            prop_assert!(t <= oldest.unwrap() + max_delay_us);
                            b.flushed();
                            oldest = None;
                            ops = 0;
                            break;
                        }
                        Decision::WaitUntil(w) => {
                            prop_assert!(w > t);
                            prop_assert!(w <= oldest.unwrap() + max_delay_us);
                            if next < w {
                                break;
                            }
                            t = w;
                        }
                    }
                }
            }
        }
    }
}
