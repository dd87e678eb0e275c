//! The materializer: applies logged batches to the records, off the write path.
//!
//! A write is acknowledged once its batch is durable in the log (one small redb transaction
//! per group commit). The records — derived state — are brought up to date here, in two
//! stages on two threads:
//!
//! 1. **Stage** (this thread): each batch's ops are joined into an in-memory *delta*
//!    ([`Store::stage`]): per record, the join of the ops applied since the last flush. No
//!    B-tree is read or written, so this runs at in-memory speed, and a read sees the op as
//!    soon as it is staged (reads join delta and file, see [`Store::get`]).
//! 2. **Flush** (the flusher thread): once the delta holds [`STAGED_FLUSH_BYTES`], or the
//!    materializer is idle, it is frozen and written into the view file in one transaction,
//!    records in key order, each read, joined and written once ([`Store::flush_frozen`]),
//!    while the next delta is being staged. Random-key B-tree updates are the bound of this
//!    path; large, key-ordered flushes of deduplicated records are what make them cheaper.
//!
//! - **Read-your-writes**: a read sees every batch the log holds when it looks (every batch
//!   durable before it began among them) without waiting for their staging: it joins those
//!   not staged yet to the records itself ([`MatSync::unstaged_for_read`],
//!   [`Store::get_joining`], [`Store::list_joining`]; a listing joins them on the smallest
//!   keys they touch in its range). Counts, and the rare listing whose first records those
//!   keys do not cover (many of them deleted), wait until everything submitted before them
//!   has been staged ([`MatSync::wait_applied`]).
//! - **Bounded**: the job queue holds at most [`QUEUE_CAP`] jobs; when it is full the actor
//!   blocks on it, which backs pressure up to writers and peers. Memory: the staged delta is
//!   frozen at [`STAGED_FLUSH_BYTES`] and, while the previous one is still being flushed,
//!   staging stops at twice that (two and a half times while paced) until it is done.
//! - **Paced**: while a full delta is being flushed, staging may grow the next one only as
//!   far as that flush is through its expected time (the last full one's, per byte), to
//!   twice the flush size at its expected end ([`pace`]); past that, a flush running late
//!   lets it grow on at the same pace to [`PACED_BOUND_PCT`] of the flush size, the hard
//!   bound then. A writer that outpaces the view file is slowed evenly over each flush
//!   instead of stopped for the end of it: once flushes took seconds, that stop was a
//!   writer's call of seconds.
//! - **Crash-safe**: the view stores a per-chain watermark in the same transaction as the
//!   records it covers; after a crash, [`crate::store::Store::apply_unapplied`] finds what to apply
//!   again (staged deltas are only memory: losing them loses nothing the log does not hold).
//!   Flushes under load commit without fsync; an idle point and shutdown fsync the view.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::broadcast;

use blazedb_protocol::capability::TokenId;
use blazedb_protocol::{BatchOps, Hlc, VerifiedBatch};

use crate::run_filter::RunFilter;
use crate::store::{Change, Store};

/// Most jobs queued for the materializer.
pub const QUEUE_CAP: usize = 64;
/// Ops kept for reads and not yet staged from which the next commit's batches are kept with
/// a filter over their keys ([`Unstaged::filtered`]). Below it a `get` walks them all, up to
/// ~0.1 ms; a catch-up's backlog reached 100k–550k ops, and walking it was nearly all of a
/// `get`'s time then (0.4–5 ms; B6, 2026-12-07). Above it, building the filters costs the
/// committer ~10 ns per op.
pub const FILTER_FROM_BACKLOG_OPS: u64 = 32_768;
/// Most ops staged per job round (several queued jobs are taken together up to this).
const OPS_PER_TXN: usize = 50_000;
/// Default size (approximate bytes) at which a staged delta is handed to the flusher; at
/// twice this, staging waits for the flusher (so with the delta being flushed, itself at most
/// twice this, about four times this is held at most). `NodeConfig::view_delta_bytes` sets it.
pub const STAGED_FLUSH_BYTES: usize = 256 * 1024 * 1024;
/// How long the materializer must have had nothing to do before it writes a delta smaller
/// than the flush size into the view file (durably). Reads never need that write (they join
/// the delta); flushing at every short pause between jobs made each flush small, and a
/// small flush costs far more per op (B3: both nodes flushed after nearly every batch).
const IDLE_FLUSH_AFTER: Duration = Duration::from_millis(250);
/// Longest a read waits for the records to catch up.
const READ_WAIT: Duration = Duration::from_secs(30);
/// While staging is paced, the most it holds, in percent of the flush size (without pacing,
/// 200). With the delta being flushed, itself at most this, up to ~5x the flush size is
/// held; ~4x when flushes take about as long as expected.
const PACED_BOUND_PCT: usize = 250;
/// Longest the materializer waits at once before it looks at the pace again.
const PACE_WAIT_MAX: Duration = Duration::from_millis(100);

/// What staging may do next while a flush runs ([`pace`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pace {
    /// Stage the next job.
    Go,
    /// Wait until the flush ends or this long has passed, then ask again.
    Wait(Duration),
    /// The hard bound: wait for the flush to end.
    WaitForFlush,
}

/// Whether staging may go on with `staged` bytes in the delta, `elapsed` into a flush of a
/// full delta expected to take `expected` (`None` before the first such flush has been
/// timed, or for an idle point's flush). The allowance grows with the flush's expected
/// progress, from nothing to twice the flush size at its expected end; so staging, and the
/// writers behind it, go at the pace the flush takes their records, and the delta is as full
/// when the flush ends as without pacing. A flush running late (flush times on this VM vary
/// by 1.5x from one to the next) lets the allowance grow on at that pace up to the hard
/// bound, [`PACED_BOUND_PCT`] of the flush size. Without an expected time the hard bound is
/// twice the flush size, and below it staging is free.
fn pace(flush_at: usize, staged: usize, elapsed: Duration, expected: Option<Duration>) -> Pace {
    let full = flush_at.saturating_mul(2).max(1);
    let expected = expected.filter(|e| !e.is_zero());
    let hard = match expected {
        Some(_) => flush_at.saturating_mul(PACED_BOUND_PCT) / 100,
        None => full,
    };
    if staged >= hard {
        return Pace::WaitForFlush;
    }
    let Some(expected) = expected else {
        return Pace::Go;
    };
    // When in the flush's expected time `staged` is allowed.
    let at = expected.mul_f64(staged as f64 / full as f64);
    match at.checked_sub(elapsed) {
        Some(left) if !left.is_zero() => Pace::Wait(left.min(PACE_WAIT_MAX)),
        _ => Pace::Go,
    }
}

/// A timed flush of a full delta ([`flush_estimate`]).
#[derive(Clone, Copy, Debug)]
struct LastFlush {
    /// How long it took in all.
    took: Duration,
    /// Of that, its fold of a slice of the file into the records' table.
    fold: Duration,
    /// Its delta, in staged bytes.
    bytes: usize,
}

/// Loaded flushes whose folds [`flush_estimate`] takes the longest of.
const FOLDS_KEPT: usize = 3;

/// How long a flush of a delta of `bytes` is expected to take, from the last one: a fold as
/// long as the longest of the last [`FOLDS_KEPT`] (`fold`; the slice folded is a share of
/// the file, whatever the delta's size, and grows with it; the slice that reaches the end of
/// the key space is short, once per sweep, and says nothing of the next), and the rest of
/// the last one's time in proportion to the delta. (Scaling the whole of the last time by
/// the delta made a small delta after a large one look quick: at 32M records, with folds of
/// 3–5 s, such flushes ran 1.3–1.5x late, or 4x after the sweep's short slice, the delta
/// reached the hard bound and staging stopped for up to 3.3 s.)
fn flush_estimate(last: &LastFlush, fold: Duration, bytes: usize) -> Duration {
    let rest = last.took.saturating_sub(last.fold);
    fold + rest.mul_f64(bytes as f64 / last.bytes.max(1) as f64)
}

/// Work for the materializer.
pub enum Job {
    /// Apply these (already durable) batches.
    Apply(Vec<VerifiedBatch>),
    /// A revocation was learned: recompute a namespace.
    Rebuild {
        /// Namespace.
        ns: String,
        /// All its revocations.
        revocations: BTreeMap<TokenId, Hlc>,
    },
}

/// A batch whose log commit has begun and that is not staged yet, as a read joins it
/// ([`Store::get_joining`]): what the materializer will stage of it, and where it is in the
/// log.
#[derive(Clone)]
pub struct Unstaged {
    /// Its namespace.
    pub ns: String,
    /// Its author's key.
    pub author: [u8; 32],
    /// Its place in its author's chain.
    pub seq: u64,
    /// Whether its ops count ([`VerifiedBatch::effective`]).
    pub effective: bool,
    /// Its ops (shared with the batch: no copy).
    pub ops: BatchOps,
    /// Its ops' record keys as a Bloom filter, where it was made with one
    /// ([`Unstaged::filtered`]).
    keys: Option<RunFilter>,
}

impl Unstaged {
    /// What a read joins of `b`.
    pub(crate) fn of(b: &VerifiedBatch) -> Self {
        Self {
            ns: b.header.ns.clone(),
            author: *b.author.as_bytes(),
            seq: b.header.seq,
            effective: b.effective,
            ops: b.ops.clone(),
            keys: None,
        }
    }

    /// [`Unstaged::of`] with a filter over its ops' record keys, so that a read of a key the
    /// batch does not hold reads one cache line of it instead of walking its ops
    /// ([`Unstaged::may_hold`]). Made where the materializer is behind
    /// ([`FILTER_FROM_BACKLOG_OPS`]); ~10 ns per op, on the committer's thread.
    ///
    /// Only for a batch whose ops are decoded already (a peer's, decoded to verify it): one
    /// sealed here is first decoded by staging, and decoding it here would lengthen the
    /// commit that four writers' calls wait on (B2, four writers: 2.41 against 2.69M ops/s,
    /// medians of eight alternating pairs). A read decodes such a batch if it walks it.
    /// Nor for a batch whose ops do not count: no read walks it.
    pub(crate) fn filtered(b: &VerifiedBatch) -> Self {
        let mut u = Self::of(b);
        if let Some(view) = b.ops.view_if_decoded().filter(|_| b.effective) {
            let ops = view.ops();
            let mut filter = RunFilter::with_capacity(ops.len() as u64);
            for op in ops {
                filter.insert(view.key(op).as_bytes());
            }
            u.keys = Some(filter);
        }
        u
    }

    /// False only if none of its ops is on a record keyed `key`, in any collection (always
    /// true for a batch without a filter).
    pub fn may_hold(&self, key: &str) -> bool {
        self.keys
            .as_ref()
            .is_none_or(|f| f.may_hold(key.as_bytes()))
    }
}

#[derive(Default)]
struct State {
    submitted: u64,
    applied: u64,
    /// Batches whose log commit succeeded (commits end in the order they were submitted).
    committed: u64,
    /// Each commit's batches from its submission until they are staged, oldest first, with
    /// `submitted` once they were counted ([`MatSync::submitting`]).
    unstaged: VecDeque<(u64, Arc<[Unstaged]>)>,
    /// The ops of the batches in `unstaged`.
    unstaged_ops: u64,
    /// Revocation rebuilds queued and not yet done ([`MatSync::rebuild_queued`]).
    rebuilds: u64,
    failed: Option<String>,
}

impl State {
    /// For a read that began with `target` batches submitted: `Some` (what it joins) once it
    /// may go on, `None` while it must wait.
    fn readable(&self, target: u64) -> Result<Option<ForRead>, String> {
        if self.applied >= target {
            return Ok(Some(ForRead::default()));
        }
        if let Some(e) = &self.failed {
            return Err(format!("records cannot be updated: {e}"));
        }
        if self.rebuilds > 0 {
            return Ok(None);
        }
        let (mut batches, mut read) = (0, ForRead::default());
        for (end, b) in self.unstaged.iter().take_while(|(end, _)| *end <= target) {
            batches += b.len() as u64;
            if *end <= self.committed {
                read.committed.push(b.clone());
            } else {
                read.under_way.push(b.clone());
            }
        }
        // Every batch submitted before the read and not applied is kept (always, unless some
        // were counted by `submitted` alone).
        Ok((self.applied + batches == target).then_some(read))
    }
}

/// What a read joins to the records ([`MatSync::unstaged_for_read`]).
#[derive(Default)]
pub struct ForRead {
    /// The kept batches of commits that have ended, oldest first.
    pub committed: UnstagedBatches,
    /// Then those of commits under way when the read began (the committer's current one, if
    /// any), oldest first: each is joined only if the log holds it already
    /// ([`ForRead::resolve`]).
    pub under_way: UnstagedBatches,
}

impl ForRead {
    /// The batches to join: the committed ones, then those of the commits under way that
    /// `logged` finds in the log (asked of each commit's last batch; commits end in order, so
    /// none after the first not found).
    ///
    /// Why not wait for those commits instead: a reader may have seen their batches in the
    /// log (`counts`, status, a peer's answer) a moment before the committer could mark them
    /// committed, and must then find them; one not yet in the log cannot have been seen, and
    /// must not be read (it may never be durable). redb makes a commit visible to readers
    /// only once it is durable, so what the log holds is durable. Waiting for the commit cost
    /// a read up to a whole 4 MiB transaction's fsync during a catch-up (~20 ms).
    pub fn resolve<E>(
        self,
        mut logged: impl FnMut(&Unstaged) -> Result<bool, E>,
    ) -> Result<UnstagedBatches, E> {
        let mut kept = self.committed;
        for b in self.under_way {
            match b.last() {
                Some(last) if !logged(last)? => break,
                _ => kept.push(b),
            }
        }
        Ok(kept)
    }
}

/// Progress shared between the actor (submits), the materializer (applies) and readers.
#[derive(Default)]
pub struct MatSync {
    state: Mutex<State>,
    cv: Condvar,
    /// Jobs taken off the queue (for its depth: jobs sent minus jobs taken).
    taken: AtomicU64,
    /// Microseconds staging waited for the view file's flush to go on at its pace.
    paced_us: AtomicU64,
    /// Microseconds staging waited at the hard bound for the view file's flush to end.
    stopped_us: AtomicU64,
    /// The most bytes the staged delta held after a job was staged.
    staged_max: AtomicU64,
    /// Reads that joined logged batches not yet staged instead of waiting for them.
    reads_joined: AtomicU64,
}

/// What a read joins to the records: kept batches not yet staged, each commit's together
/// ([`MatSync::unstaged_for_read`]).
pub type UnstagedBatches = Vec<Arc<[Unstaged]>>;

impl MatSync {
    /// Counts `n` batches handed to the materializer.
    pub fn submitted(&self, n: u64) {
        if let Ok(mut s) = self.state.lock() {
            s.submitted += n;
        }
    }

    /// Counts the batches of one log commit as submitted, before the commit makes them
    /// visible (as [`MatSync::submitted`]), and keeps them for reads until they are staged:
    /// a read joins them once they are in the log ([`ForRead`]), without waiting for their
    /// staging.
    ///
    /// Where the batches kept already hold [`FILTER_FROM_BACKLOG_OPS`] ops or more, these
    /// are kept with a filter over their keys ([`Unstaged::filtered`]), so that a `get`
    /// during a catch-up need not walk the whole backlog.
    pub fn submitting(&self, batches: &[VerifiedBatch]) {
        let behind = self.state.lock().map_or(0, |s| s.unstaged_ops);
        let kept: Arc<[Unstaged]> = if behind >= FILTER_FROM_BACKLOG_OPS {
            batches.iter().map(Unstaged::filtered).collect()
        } else {
            batches.iter().map(Unstaged::of).collect()
        };
        let ops: u64 = batches.iter().map(|b| b.ops.len() as u64).sum();
        if let Ok(mut s) = self.state.lock() {
            s.submitted += batches.len() as u64;
            let end = s.submitted;
            s.unstaged.push_back((end, kept));
            s.unstaged_ops += ops;
        }
    }

    /// Counts `n` batches submitted with [`MatSync::submitting`] as durable in the log (the
    /// oldest commit not yet counted): reads join them without looking in the log.
    pub fn committed(&self, n: u64) {
        if let Ok(mut s) = self.state.lock() {
            s.committed += n;
        }
    }

    /// A revocation's rebuild of a namespace was queued behind the batches submitted so far:
    /// until it is done, reads wait for the records (a rebuild changes which staged ops count).
    pub fn rebuild_queued(&self) {
        if let Ok(mut s) = self.state.lock() {
            s.rebuilds += 1;
        }
    }

    fn rebuilt(&self) {
        if let Ok(mut s) = self.state.lock() {
            s.rebuilds = s.rebuilds.saturating_sub(1);
        }
        self.cv.notify_all();
    }

    /// Counts `n` batches applied, from `jobs` apply jobs (their kept batches are let go).
    fn applied(&self, n: u64, jobs: usize) {
        if let Ok(mut s) = self.state.lock() {
            s.applied += n;
            for _ in 0..jobs {
                let Some((_, kept)) = s.unstaged.pop_front() else {
                    break;
                };
                let ops: u64 = kept.iter().map(|b| b.ops.len() as u64).sum();
                s.unstaged_ops = s.unstaged_ops.saturating_sub(ops);
            }
        }
        self.cv.notify_all();
    }

    /// Records that some submitted batches will never be applied: readers waiting for them
    /// get this error.
    pub(crate) fn fail(&self, e: String) {
        if let Ok(mut s) = self.state.lock() {
            s.failed = Some(e);
        }
        self.cv.notify_all();
    }

    /// Jobs the materializer has taken off its queue so far.
    pub fn taken(&self) -> u64 {
        self.taken.load(Ordering::Relaxed)
    }

    fn took(&self) {
        self.taken.fetch_add(1, Ordering::Relaxed);
    }

    /// How long staging has waited so far for the view file's flushes to go on, staging no
    /// faster than they ([`pace`]), and how long it has waited at the hard bound for a flush
    /// to end. A writer that outpaces the view file is slowed by the sum.
    pub fn paced(&self) -> (Duration, Duration) {
        let us = |a: &AtomicU64| Duration::from_micros(a.load(Ordering::Relaxed));
        (us(&self.paced_us), us(&self.stopped_us))
    }

    /// The most bytes (by the store's estimate) the staged delta has held so far.
    pub fn staged_bytes_max(&self) -> u64 {
        self.staged_max.load(Ordering::Relaxed)
    }

    /// Batches submitted but not yet applied.
    pub fn backlog(&self) -> u64 {
        self.state
            .lock()
            .map(|s| s.submitted - s.applied)
            .unwrap_or(0)
    }

    /// Reads that joined unstaged batches instead of waiting for them so far.
    pub fn reads_joined(&self) -> u64 {
        self.reads_joined.load(Ordering::Relaxed)
    }

    /// Counts a read that joined unstaged batches.
    pub(crate) fn joined_read(&self) {
        self.reads_joined.fetch_add(1, Ordering::Relaxed);
    }

    /// For a read: the batches submitted before this call and not yet staged, oldest first,
    /// for the read to join to the records ([`ForRead`]; their ops are joined again where the
    /// materializer has staged them since: a join is idempotent). Batches submitted after
    /// the call are left out. Waits for the records instead (and returns nothing to join)
    /// while a revocation's rebuild is queued, or where batches were submitted without being
    /// kept ([`MatSync::submitted`]).
    ///
    /// Taken before the records are read (`Store::get_joining`): a batch staged and let go
    /// between the two is then in the records, never in neither.
    pub fn unstaged_for_read(&self) -> Result<ForRead, String> {
        self.wait_for(State::readable)
    }

    /// Waits until every batch submitted before this call has been applied.
    pub fn wait_applied(&self) -> Result<(), String> {
        self.wait_for(|s, target| {
            if s.applied >= target {
                return Ok(Some(()));
            }
            match &s.failed {
                Some(e) => Err(format!("records cannot be updated: {e}")),
                None => Ok(None),
            }
        })
    }

    /// Waits (at most [`READ_WAIT`]) until `ready`, asked with the batches submitted before
    /// this call, gives an answer.
    fn wait_for<T>(
        &self,
        mut ready: impl FnMut(&State, u64) -> Result<Option<T>, String>,
    ) -> Result<T, String> {
        let mut s = self
            .state
            .lock()
            .map_err(|_| "materializer state poisoned".to_string())?;
        let target = s.submitted;
        let deadline = Instant::now() + READ_WAIT;
        loop {
            if let Some(answer) = ready(&s, target)? {
                return Ok(answer);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err("records are still catching up with the log; retry".into());
            }
            s = self
                .cv
                .wait_timeout(s, left)
                .map_err(|_| "poisoned".to_string())?
                .0;
        }
    }
}

/// Starts the materializer thread. It stops when the returned sender is dropped, after
/// applying everything queued and making the view durable.
pub fn spawn(
    store: Arc<Store>,
    sync: Arc<MatSync>,
    changes: broadcast::Sender<Change>,
    flush_bytes: usize,
) -> (mpsc::SyncSender<Job>, std::thread::JoinHandle<()>) {
    let (tx, rx) = mpsc::sync_channel::<Job>(QUEUE_CAP);
    let handle = std::thread::Builder::new()
        .name("blazedb-materializer".into())
        .spawn(move || {
            let flusher = Flusher::spawn(store.clone());
            // redb panics on some damaged pages: that fails the records like any error.
            let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                run(&store, &sync, &changes, rx, flusher, flush_bytes)
            }));
            if let Err(p) = ran {
                let e = format!(
                    "the materializer panicked (redb cannot read a damaged page?): {}",
                    crate::store::panic_message(p.as_ref())
                );
                failed(&store, &sync, e);
            }
        })
        .expect("spawning the materializer thread");
    (tx, handle)
}

/// The thread that writes frozen deltas into the view file, so that applying the next ops
/// (in memory) and writing the last ones (B-tree updates) run at the same time.
struct Flusher {
    /// Flush requests (`true`: fsync the commit). One at a time.
    tx: Option<mpsc::SyncSender<bool>>,
    /// Outcome of each flush: the time it took, and of that its fold's.
    done: mpsc::Receiver<Result<(Duration, Duration), String>>,
    busy: bool,
    /// When the running flush started.
    started: Instant,
    /// Whether the running flush was started under load (a full delta, not an idle point).
    loaded: bool,
    /// The running flush's delta, in staged bytes.
    bytes: usize,
    /// The last flush started under load: the running one is expected to take about as long
    /// ([`flush_estimate`]). (An idle point's small flush says little about a full one.)
    last: Option<LastFlush>,
    /// The folds of the last [`FOLDS_KEPT`] loaded flushes, newest last.
    folds: std::collections::VecDeque<Duration>,
    /// A flush without fsync committed since the last durable one.
    needs_sync: bool,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Flusher {
    fn spawn(store: Arc<Store>) -> Self {
        let (tx, rx) = mpsc::sync_channel::<bool>(1);
        let (done_tx, done) = mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("blazedb-flusher".into())
            .spawn(move || {
                for durable in rx {
                    let started = Instant::now();
                    let flushed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        store.flush_frozen(durable)
                    }));
                    let r = match flushed {
                        Ok(r) => r
                            .map(|_| (started.elapsed(), store.last_fold()))
                            .map_err(|e| e.to_string()),
                        Err(p) => Err(format!(
                            "a view flush panicked (redb cannot read a damaged page?): {}",
                            crate::store::panic_message(p.as_ref())
                        )),
                    };
                    if done_tx.send(r).is_err() {
                        break;
                    }
                }
            })
            .expect("spawning the flusher thread");
        Flusher {
            tx: Some(tx),
            done,
            busy: false,
            started: Instant::now(),
            loaded: false,
            bytes: 0,
            last: None,
            folds: Default::default(),
            needs_sync: false,
            thread: Some(thread),
        }
    }

    /// Freezes what is staged and starts writing it, if the flusher is idle. Returns whether
    /// a flush started.
    fn start(&mut self, store: &Store, durable: bool) -> Result<bool, String> {
        if !self.poll_idle()? {
            return Ok(false);
        }
        // (Only this thread stages: what is staged now is what is frozen.)
        let bytes = store.staged_bytes();
        if !store.freeze() {
            return Ok(false);
        }
        self.bytes = bytes;
        let tx = self.tx.as_ref().ok_or("flusher stopped")?;
        tx.send(durable)
            .map_err(|_| "flusher thread ended".to_string())?;
        self.busy = true;
        self.started = Instant::now();
        self.loaded = !durable;
        self.needs_sync = !durable;
        Ok(true)
    }

    /// Takes a finished flush's outcome.
    fn finished(&mut self, r: Result<(Duration, Duration), String>) -> Result<(), String> {
        self.busy = false;
        let (took, fold) = r?;
        if self.loaded {
            self.last = Some(LastFlush {
                took,
                fold,
                bytes: self.bytes,
            });
            if self.folds.len() == FOLDS_KEPT {
                self.folds.pop_front();
            }
            self.folds.push_back(fold);
        }
        Ok(())
    }

    /// How long the running flush is expected to take, if it is a full delta's and one has
    /// been timed ([`flush_estimate`]).
    fn expected(&self) -> Option<Duration> {
        let last = self.last.filter(|_| self.loaded)?;
        let fold = self.folds.iter().max().copied().unwrap_or_default();
        Some(flush_estimate(&last, fold, self.bytes))
    }

    /// Whether a flush of a full delta runs, with an expected time to pace staging by.
    fn pacing(&self) -> bool {
        self.busy && self.expected().is_some()
    }

    /// While a flush runs: waits as long as [`pace`] says, and starts the next flush if this
    /// one ends meanwhile with a full delta staged.
    fn pace(&mut self, store: &Store, sync: &MatSync, flush_at: usize) -> Result<(), String> {
        let (mut paced, mut stopped) = (Duration::ZERO, Duration::ZERO);
        while self.busy {
            let expected = self.expected();
            let step = pace(
                flush_at,
                store.staged_bytes(),
                self.started.elapsed(),
                expected,
            );
            let began = Instant::now();
            match step {
                Pace::Go => break,
                Pace::Wait(d) => {
                    match self.done.recv_timeout(d) {
                        Ok(r) => self.finished(r)?,
                        Err(mpsc::RecvTimeoutError::Timeout) => {}
                        Err(mpsc::RecvTimeoutError::Disconnected) => {
                            return Err("flusher thread ended".into())
                        }
                    }
                    paced += began.elapsed();
                }
                Pace::WaitForFlush => {
                    self.wait_idle()?;
                    stopped += began.elapsed();
                }
            }
        }
        if !(paced + stopped).is_zero() {
            sync.paced_us
                .fetch_add(paced.as_micros() as u64, Ordering::Relaxed);
            sync.stopped_us
                .fetch_add(stopped.as_micros() as u64, Ordering::Relaxed);
            tracing::trace!(
                paced_ms = paced.as_secs_f64() * 1e3,
                stopped_ms = stopped.as_secs_f64() * 1e3,
                "staging waited for the flush"
            );
        }
        if !self.busy && store.staged_bytes() >= flush_at {
            self.start(store, false)?;
        }
        Ok(())
    }

    /// Whether no flush is running (collecting the outcome of a finished one).
    fn poll_idle(&mut self) -> Result<bool, String> {
        if self.busy {
            match self.done.try_recv() {
                Ok(r) => self.finished(r)?,
                Err(mpsc::TryRecvError::Empty) => return Ok(false),
                Err(mpsc::TryRecvError::Disconnected) => return Err("flusher thread ended".into()),
            }
        }
        Ok(true)
    }

    /// Waits for the running flush, if any.
    fn wait_idle(&mut self) -> Result<(), String> {
        if self.busy {
            let r = self
                .done
                .recv()
                .map_err(|_| "flusher thread ended".to_string())?;
            self.finished(r)?;
        }
        Ok(())
    }

    /// Writes everything staged into the view file and waits for it.
    fn flush_all(&mut self, store: &Store, durable: bool) -> Result<(), String> {
        self.wait_idle()?;
        if self.start(store, durable)? {
            self.wait_idle()?;
        } else if durable && self.needs_sync {
            store.sync_view().map_err(|e| e.to_string())?;
            self.needs_sync = false;
        }
        Ok(())
    }
}

impl Drop for Flusher {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The records can no longer be updated: readers waiting for newer batches get `e`, and
/// the log is marked so that the next start sets the view file aside and makes it again
/// from the log ([`Store::mark_view_failed`]; writes stay durable in the log meanwhile).
fn failed(store: &Store, sync: &MatSync, e: String) {
    tracing::error!(
        "updating the records failed: {e}. Writes are still logged; the next start makes \
         the view file again from the log"
    );
    if let Err(mark) = store.mark_view_failed(&e) {
        tracing::error!("marking the view to be made again failed too: {mark}");
    }
    sync.fail(format!(
        "{e} (the node keeps logging writes; restart it to make the view again from the log)"
    ));
}

fn run(
    store: &Store,
    sync: &MatSync,
    changes: &broadcast::Sender<Change>,
    rx: mpsc::Receiver<Job>,
    mut flusher: Flusher,
    flush_at: usize,
) {
    let mut carry: Option<Job> = None;
    let fail = |e: String| failed(store, sync, e);
    loop {
        let job = match carry.take() {
            Some(j) => j,
            None => match next_job(store, sync, &rx, &mut flusher) {
                Ok(Some(j)) => j,
                Ok(None) => break,
                Err(e) => return fail(e),
            },
        };
        let res = match job {
            Job::Apply(mut batches) => {
                let mut jobs = 1;
                // Take whatever else is queued, up to a transaction's worth; one job at a
                // time while staging is paced, so that the queue, and the writers behind
                // it, move on as evenly as the pace lets them.
                let mut ops: usize = batches.iter().map(|b| b.ops.len()).sum();
                while ops < OPS_PER_TXN && !flusher.pacing() {
                    match rx.try_recv() {
                        Ok(Job::Apply(more)) => {
                            sync.took();
                            jobs += 1;
                            ops += more.iter().map(|b| b.ops.len()).sum::<usize>();
                            batches.extend(more);
                        }
                        Ok(other) => {
                            sync.took();
                            carry = Some(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                let (n, jobs) = (batches.len() as u64, jobs);
                let listening = changes.receiver_count() > 0;
                store
                    .stage(batches, listening)
                    .map_err(|e| e.to_string())
                    .and_then(|ch| {
                        for c in ch {
                            let _ = changes.send(c);
                        }
                        // Hand a full delta to the flusher; while it is busy, stage no faster
                        // than it goes, and past the hard bound wait for it (backpressure: the
                        // queue fills, then the actor, then writers wait).
                        let staged = store.staged_bytes();
                        sync.staged_max.fetch_max(staged as u64, Ordering::Relaxed);
                        if !(staged >= flush_at && flusher.start(store, false)?) {
                            flusher.pace(store, sync, flush_at)?;
                        }
                        Ok((n, jobs))
                    })
            }
            Job::Rebuild { ns, revocations } => flusher
                .flush_all(store, false)
                .and_then(|()| {
                    store
                        .rebuild_namespace(&ns, &revocations)
                        .map_err(|e| e.to_string())
                })
                .map(|(applied, skipped)| {
                    tracing::info!(%ns, applied, ineffective = skipped, "revocation learned: records rebuilt from the log");
                    sync.rebuilt();
                    (0, 0)
                }),
        };
        match res {
            Ok((n, jobs)) => sync.applied(n, jobs),
            Err(e) => return fail(e),
        }
    }
    if let Err(e) = flusher.flush_all(store, true) {
        fail(e);
    }
}

/// The next job; while none is queued, brings the view file up to date (everything staged
/// is flushed, durably, once the materializer is idle). `None` once the queue is closed.
fn next_job(
    store: &Store,
    sync: &MatSync,
    rx: &mpsc::Receiver<Job>,
    flusher: &mut Flusher,
) -> Result<Option<Job>, String> {
    loop {
        if !store.view_pending() && flusher.poll_idle()? {
            if flusher.needs_sync {
                // Caught up: make the view durable (one fsync per idle point).
                store.sync_view().map_err(|e| e.to_string())?;
                flusher.needs_sync = false;
            }
            return Ok(rx.recv().ok().inspect(|_| sync.took()));
        }
        match rx.recv_timeout(IDLE_FLUSH_AFTER) {
            Ok(j) => {
                sync.took();
                return Ok(Some(j));
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                // Idle: flush what is staged, durably (one fsync per idle point).
                if flusher.poll_idle()? && store.view_pending() {
                    flusher.start(store, true)?;
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: usize = 1 << 20;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// A writer that outpaces the view file (each flush first waits 150 ms, a slow disk) is
    /// paced by the flushes: staging waits below the hard bound, the delta never holds more
    /// than the paced bound (plus the one round staged before the check), and the records
    /// read the same as where every batch was applied straight to the file.
    #[test]
    fn staging_is_paced_by_a_slow_view_file_and_loses_nothing() {
        use crate::node::DEFAULT_NAMESPACE;
        use crate::store::record_key;
        let batches = crate::bench_materialize::sealed_batches(11, 300_000).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(&dir.path().join("store.redb")).unwrap());
        store.flush_delay_ms.store(150, Ordering::Relaxed);
        std::fs::create_dir(dir.path().join("direct")).unwrap();
        let direct = Store::open(&dir.path().join("direct").join("store.redb")).unwrap();
        direct.apply_with(&batches, false, false).unwrap();
        let mut keys = Vec::new();
        for b in &batches {
            let view = b.ops.view().unwrap();
            for op in view.ops().iter().step_by(7) {
                keys.push((view.collection(op).to_string(), view.key(op).to_string()));
            }
        }
        // A job is 5,000 W ops (~1.7 MB by the store's estimate): a few make a full delta. A
        // round staged before the bound is looked at is up to ten jobs.
        let flush_at = 8 << 20;
        let round_bytes_max = 20 << 20;
        let sync = Arc::new(MatSync::default());
        let (changes, _) = broadcast::channel(16);
        let (tx, thread) = spawn(store.clone(), sync.clone(), changes, flush_at);
        for b in batches {
            sync.submitted(1);
            tx.send(Job::Apply(vec![b])).unwrap();
        }
        sync.wait_applied().unwrap();
        drop(tx);
        thread.join().unwrap();
        let (paced, stopped) = sync.paced();
        assert!(
            paced > Duration::ZERO,
            "staging was never paced (stopped at the bound for {stopped:?})"
        );
        let bound = (flush_at * PACED_BOUND_PCT / 100 + round_bytes_max) as u64;
        assert!(
            sync.staged_bytes_max() <= bound,
            "the delta held {} bytes, bound {bound}",
            sync.staged_bytes_max()
        );
        let (flushes, _) = store.view_flushes();
        assert!(flushes >= 4, "{flushes} flushes");
        for (collection, key) in &keys {
            assert_eq!(
                store.get(DEFAULT_NAMESPACE, collection, key).unwrap(),
                direct.get(DEFAULT_NAMESPACE, collection, key).unwrap(),
                "{}",
                String::from_utf8_lossy(&record_key(DEFAULT_NAMESPACE, collection, key))
            );
        }
    }

    /// Once the batches kept for reads hold [`FILTER_FROM_BACKLOG_OPS`] ops, the next
    /// commit's are kept with a filter over their keys: it holds every key of theirs (a get
    /// of one still walks the batch) and rules out nearly every other, so a get of a key
    /// they do not hold skips them. A batch sealed here and not decoded yet gets none.
    /// Staging the kept batches lets their ops go from the count, and the commit after is
    /// kept without a filter again.
    #[test]
    fn a_backlog_keeps_its_batches_with_key_filters() {
        let batches = crate::bench_materialize::sealed_batches(13, 60_000).unwrap();
        // Decoded, as a peer's batches are once verified; the last one is left as sealed.
        let (last, decoded) = batches.split_last().unwrap();
        for b in decoded {
            b.ops.view().unwrap();
        }
        let per = batches[0].ops.len() as u64;
        let under = (FILTER_FROM_BACKLOG_OPS / per) as usize;
        assert!(under >= 1 && under + 4 <= batches.len());
        let sync = MatSync::default();
        let filtered = |sync: &MatSync| {
            let s = sync.state.lock().unwrap();
            let kept = &s.unstaged.back().unwrap().1;
            kept.iter().map(|b| b.keys.is_some()).collect::<Vec<_>>()
        };
        sync.submitting(&batches[..under]);
        assert!(
            filtered(&sync).iter().all(|f| !f),
            "filtered below the backlog"
        );
        // Now at least the threshold is kept: the next commit is filtered.
        sync.submitting(&batches[under..under + 1]);
        assert!(
            sync.state.lock().unwrap().unstaged_ops >= FILTER_FROM_BACKLOG_OPS,
            "the backlog does not reach the threshold"
        );
        sync.submitting(&batches[under + 1..under + 2]);
        assert_eq!(filtered(&sync), [true]);
        let kept = sync
            .state
            .lock()
            .unwrap()
            .unstaged
            .back()
            .unwrap()
            .1
            .clone();
        let b = &kept[0];
        let view = b.ops.view().unwrap();
        for op in view.ops() {
            assert!(b.may_hold(view.key(op)), "{} ruled out", view.key(op));
        }
        let theirs: std::collections::HashSet<&str> =
            view.ops().iter().map(|op| view.key(op)).collect();
        let absent: Vec<String> = (0..10_000)
            .map(|i| format!("absent-{i}"))
            .filter(|k| !theirs.contains(k.as_str()))
            .collect();
        let maybe = absent.iter().filter(|k| b.may_hold(k)).count();
        assert!(
            maybe * 20 < absent.len(),
            "{maybe} of {} absent keys not ruled out",
            absent.len()
        );
        // A batch sealed here and not decoded yet gets none (decoding it would lengthen the
        // commit); one decoded does.
        sync.submitting(std::slice::from_ref(last));
        assert_eq!(filtered(&sync), [false]);
        assert!(
            last.ops.view_if_decoded().is_none(),
            "decoded to be filtered"
        );
        // Staged, the backlog lets its ops go; the next commit is kept plain.
        sync.applied(under as u64 + 3, 4);
        assert_eq!(sync.state.lock().unwrap().unstaged_ops, 0);
        sync.submitting(&batches[under + 2..under + 3]);
        assert_eq!(filtered(&sync), [false]);
    }

    /// A read joins every batch submitted before it that the log holds, whether or not the
    /// committer has marked its commit ended, and leaves out one not in the log yet, what
    /// was submitted after it began, and what staging would not apply; it waits for the
    /// records while a rebuild is queued, and joins nothing once they are staged.
    #[test]
    fn a_read_joins_logged_batches_until_they_are_staged() {
        use crate::node::DEFAULT_NAMESPACE;
        let batches = crate::bench_materialize::sealed_batches(12, 15_000).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(&dir.path().join("store.redb")).unwrap());
        std::fs::create_dir(dir.path().join("direct")).unwrap();
        let direct = Store::open(&dir.path().join("direct").join("store.redb")).unwrap();
        direct.apply_with(&batches[..2], false, false).unwrap();
        let view = batches[1].ops.view().unwrap();
        let op = &view.ops()[0];
        let (collection, key) = (view.collection(op), view.key(op));
        let want = direct.get(DEFAULT_NAMESPACE, collection, key).unwrap();
        assert!(want.is_some());
        let sync = Arc::new(MatSync::default());
        let readable = |target| {
            sync.state
                .lock()
                .unwrap()
                .readable(target)
                .unwrap()
                .expect("nothing to wait for")
        };
        let lens = |kept: &UnstagedBatches| kept.iter().map(|k| k.len()).collect::<Vec<_>>();
        let parts = |r: &ForRead| (lens(&r.committed), lens(&r.under_way));
        let logged = |b: &Unstaged| store.logged(b);

        sync.submitting(&batches[..2]);
        let read = readable(2);
        assert_eq!(parts(&read), (vec![], vec![2]));
        assert!(
            read.resolve(logged).unwrap().is_empty(),
            "read before the commit"
        );
        store.append_log(&batches[..2]).unwrap();
        // In the log, its commit not yet marked ended: joined.
        let kept = readable(2).resolve(logged).unwrap();
        assert_eq!(lens(&kept), [2]);
        assert_eq!(store.get(DEFAULT_NAMESPACE, collection, key).unwrap(), None);
        assert_eq!(
            store
                .get_joining(DEFAULT_NAMESPACE, collection, key, &kept)
                .unwrap(),
            want
        );
        // What staging would not apply is not joined either: a batch whose ops do not count
        // (a revoked writer's), or one of another namespace.
        for (ns, effective) in [(DEFAULT_NAMESPACE, false), ("other", true)] {
            let unlike: UnstagedBatches = kept
                .iter()
                .map(|k| {
                    k.iter()
                        .map(|b| Unstaged {
                            ns: ns.to_string(),
                            effective,
                            ..b.clone()
                        })
                        .collect()
                })
                .collect();
            assert_eq!(
                store
                    .get_joining(DEFAULT_NAMESPACE, collection, key, &unlike)
                    .unwrap(),
                None
            );
        }
        sync.committed(2);
        assert_eq!(parts(&readable(2)), (vec![2], vec![]));
        // A later commit under way: a read that began before it leaves it out; one that began
        // after it joins it once it is in the log.
        sync.submitting(&batches[2..]);
        assert_eq!(parts(&readable(2)), (vec![2], vec![]));
        assert_eq!(parts(&readable(3)), (vec![2], vec![1]));
        assert_eq!(lens(&readable(3).resolve(logged).unwrap()), [2]);
        store.append_log(&batches[2..]).unwrap();
        assert_eq!(lens(&readable(3).resolve(logged).unwrap()), [2, 1]);
        sync.committed(1);
        assert_eq!(parts(&readable(3)), (vec![2, 1], vec![]));
        sync.rebuild_queued();
        assert!(
            sync.state.lock().unwrap().readable(3).unwrap().is_none(),
            "read around a queued rebuild"
        );
        sync.rebuilt();

        let (changes, _) = broadcast::channel(16);
        let (tx, thread) = spawn(store.clone(), sync.clone(), changes, 64 << 20);
        tx.send(Job::Apply(batches[..2].to_vec())).unwrap();
        tx.send(Job::Apply(batches[2..].to_vec())).unwrap();
        sync.wait_applied().unwrap();
        assert_eq!(parts(&sync.unstaged_for_read().unwrap()), (vec![], vec![]));
        assert!(sync.state.lock().unwrap().unstaged.is_empty());
        assert_eq!(store.get(DEFAULT_NAMESPACE, collection, key).unwrap(), want);
        drop(tx);
        thread.join().unwrap();
    }

    /// A flush's fold is expected to take as long as the recent ones' whatever the delta's
    /// size; the rest scales with the delta (a fold-free flush scales whole).
    #[test]
    fn a_flush_is_expected_to_fold_as_long_as_the_last() {
        let last = LastFlush {
            took: ms(7000),
            fold: ms(4000),
            bytes: 400 * MB,
        };
        let fold = last.fold;
        assert_eq!(flush_estimate(&last, fold, 400 * MB), ms(7000));
        assert_eq!(flush_estimate(&last, fold, 200 * MB), ms(5500));
        assert_eq!(flush_estimate(&last, fold, 800 * MB), ms(10000));
        // After the sweep's short slice, the fold expected is an earlier, longer one's.
        let short = LastFlush {
            took: ms(3100),
            fold: ms(100),
            ..last
        };
        assert_eq!(flush_estimate(&short, fold, 200 * MB), ms(5500));
        let no_fold = LastFlush {
            fold: ms(0),
            ..last
        };
        assert_eq!(flush_estimate(&no_fold, ms(0), 200 * MB), ms(3500));
        // A fold timed longer than its flush (clocks read apart) leaves nothing to scale.
        let odd = LastFlush {
            fold: ms(9000),
            ..last
        };
        assert_eq!(flush_estimate(&odd, ms(9000), 200 * MB), ms(9000));
    }

    #[test]
    fn without_an_expected_time_only_twice_the_flush_size_stops_staging() {
        assert_eq!(pace(256 * MB, 0, ms(0), None), Pace::Go);
        assert_eq!(pace(256 * MB, 511 * MB, ms(0), None), Pace::Go);
        assert_eq!(pace(256 * MB, 512 * MB, ms(0), None), Pace::WaitForFlush);
    }

    #[test]
    fn staging_follows_the_flush_expected_time() {
        let expected = Some(ms(4000));
        // The flush size is allowed halfway through the flush, twice it at the expected end.
        assert_eq!(
            pace(256 * MB, 256 * MB, ms(1000), expected),
            Pace::Wait(PACE_WAIT_MAX)
        );
        assert_eq!(
            pace(256 * MB, 256 * MB, ms(1950), expected),
            Pace::Wait(ms(50))
        );
        assert_eq!(pace(256 * MB, 256 * MB, ms(2000), expected), Pace::Go);
        assert_eq!(
            pace(256 * MB, 512 * MB, ms(3990), expected),
            Pace::Wait(ms(10))
        );
        assert_eq!(pace(256 * MB, 0, ms(0), expected), Pace::Go);
        // A flush running late: the allowance grows on at the same pace, to the hard bound.
        let hard = 256 * MB * PACED_BOUND_PCT / 100;
        assert_eq!(
            pace(256 * MB, hard - 1, ms(4000), expected),
            Pace::Wait(PACE_WAIT_MAX)
        );
        assert_eq!(pace(256 * MB, hard - 1, ms(9000), expected), Pace::Go);
        assert_eq!(pace(256 * MB, hard, ms(9000), expected), Pace::WaitForFlush);
        // The allowance only grows with the elapsed time.
        let mut last_allowed = 0;
        for t in (0..=6000).step_by(250) {
            let allowed = (0..hard / MB)
                .map(|m| m * MB)
                .take_while(|&s| pace(256 * MB, s, ms(t), expected) == Pace::Go)
                .last()
                .unwrap_or(0);
            assert!(
                allowed >= last_allowed,
                "at {t} ms: {allowed} < {last_allowed}"
            );
            last_allowed = allowed;
        }
        assert_eq!(last_allowed, hard - MB);
    }
}
