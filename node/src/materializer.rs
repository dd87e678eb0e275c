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
//! - **Read-your-writes**: a read first waits until everything submitted before it has been
//!   staged ([`MatSync::wait_applied`]).
//! - **Bounded**: the job queue holds at most [`QUEUE_CAP`] jobs; when it is full the actor
//!   blocks on it, which backs pressure up to writers and peers. Memory: the staged delta is
//!   frozen at [`STAGED_FLUSH_BYTES`] and, while the previous one is still being flushed,
//!   staging stops at twice that until it is done.
//! - **Crash-safe**: the view stores a per-chain watermark in the same transaction as the
//!   records it covers; after a crash, [`crate::store::Store::unapplied`] finds what to apply
//!   again (staged deltas are only memory: losing them loses nothing the log does not hold).
//!   Flushes under load commit without fsync; an idle point and shutdown fsync the view.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::broadcast;

use blazedb_protocol::capability::TokenId;
use blazedb_protocol::{Hlc, VerifiedBatch};

use crate::store::{Change, Store};

/// Most jobs queued for the materializer.
pub const QUEUE_CAP: usize = 64;
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

#[derive(Default)]
struct State {
    submitted: u64,
    applied: u64,
    failed: Option<String>,
}

/// Progress shared between the actor (submits), the materializer (applies) and readers.
#[derive(Default)]
pub struct MatSync {
    state: Mutex<State>,
    cv: Condvar,
    /// Jobs taken off the queue (for its depth: jobs sent minus jobs taken).
    taken: AtomicU64,
}

impl MatSync {
    /// Counts `n` batches handed to the materializer.
    pub fn submitted(&self, n: u64) {
        if let Ok(mut s) = self.state.lock() {
            s.submitted += n;
        }
    }

    fn applied(&self, n: u64) {
        if let Ok(mut s) = self.state.lock() {
            s.applied += n;
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

    /// Batches submitted but not yet applied.
    pub fn backlog(&self) -> u64 {
        self.state
            .lock()
            .map(|s| s.submitted - s.applied)
            .unwrap_or(0)
    }

    /// Waits until every batch submitted before this call has been applied.
    pub fn wait_applied(&self) -> Result<(), String> {
        let mut s = self
            .state
            .lock()
            .map_err(|_| "materializer state poisoned".to_string())?;
        let target = s.submitted;
        let deadline = Instant::now() + READ_WAIT;
        while s.applied < target {
            if let Some(e) = &s.failed {
                return Err(format!("records cannot be updated: {e}"));
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
        Ok(())
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
            run(&store, &sync, &changes, rx, flusher, flush_bytes)
        })
        .expect("spawning the materializer thread");
    (tx, handle)
}

/// The thread that writes frozen deltas into the view file, so that applying the next ops
/// (in memory) and writing the last ones (B-tree updates) run at the same time.
struct Flusher {
    /// Flush requests (`true`: fsync the commit). One at a time.
    tx: Option<mpsc::SyncSender<bool>>,
    /// Outcome of each flush.
    done: mpsc::Receiver<Result<(), String>>,
    busy: bool,
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
                    let r = store
                        .flush_frozen(durable)
                        .map(|_| ())
                        .map_err(|e| e.to_string());
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
            needs_sync: false,
            thread: Some(thread),
        }
    }

    /// Freezes what is staged and starts writing it, if the flusher is idle. Returns whether
    /// a flush started.
    fn start(&mut self, store: &Store, durable: bool) -> Result<bool, String> {
        if !self.poll_idle()? || !store.freeze() {
            return Ok(false);
        }
        let tx = self.tx.as_ref().ok_or("flusher stopped")?;
        tx.send(durable)
            .map_err(|_| "flusher thread ended".to_string())?;
        self.busy = true;
        self.needs_sync = !durable;
        Ok(true)
    }

    /// Whether no flush is running (collecting the outcome of a finished one).
    fn poll_idle(&mut self) -> Result<bool, String> {
        if self.busy {
            match self.done.try_recv() {
                Ok(r) => {
                    self.busy = false;
                    r?;
                }
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
            self.busy = false;
            r?;
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

fn run(
    store: &Store,
    sync: &MatSync,
    changes: &broadcast::Sender<Change>,
    rx: mpsc::Receiver<Job>,
    mut flusher: Flusher,
    flush_at: usize,
) {
    let mut carry: Option<Job> = None;
    let fail = |e: String| {
        tracing::error!("updating the records failed: {e}");
        sync.fail(e);
    };
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
                // Take whatever else is queued, up to a transaction's worth.
                let mut ops: usize = batches.iter().map(|b| b.ops.len()).sum();
                while ops < OPS_PER_TXN {
                    match rx.try_recv() {
                        Ok(Job::Apply(more)) => {
                            sync.took();
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
                let n = batches.len() as u64;
                let listening = changes.receiver_count() > 0;
                store
                    .stage(batches, listening)
                    .map_err(|e| e.to_string())
                    .and_then(|ch| {
                        for c in ch {
                            let _ = changes.send(c);
                        }
                        // Hand a full delta to the flusher; past the hard bound, wait for it
                        // (backpressure: the queue fills, then the actor, then writers wait).
                        let bytes = store.staged_bytes();
                        if bytes >= flush_at
                            && !flusher.start(store, false)?
                            && bytes >= 2 * flush_at
                        {
                            flusher.wait_idle()?;
                            flusher.start(store, false)?;
                        }
                        Ok(n)
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
                    0
                }),
        };
        match res {
            Ok(n) => sync.applied(n),
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
