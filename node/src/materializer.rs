//! The materializer: applies logged batches to the records, off the write path.
//!
//! A write is acknowledged once its batch is durable in the log (one small redb transaction
//! per group commit). The records — derived state — are brought up to date by this thread, in
//! large non-durable view transactions (a durable one whenever it catches up), so the write
//! path never pays for thousands of random B-tree updates.
//!
//! - **Read-your-writes**: a read first waits until everything submitted before it has been
//!   applied ([`MatSync::wait_applied`]).
//! - **Bounded**: the job queue holds at most [`QUEUE_CAP`] jobs; when it is full the actor
//!   blocks on it, which backs pressure up to writers and peers.
//! - **Crash-safe**: the view stores a per-chain watermark in the same transaction as the
//!   records; after a crash, [`crate::store::Store::unapplied`] finds what to apply again.

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
/// Most ops applied in one view transaction.
const OPS_PER_TXN: usize = 50_000;
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

    fn fail(&self, e: String) {
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
) -> (mpsc::SyncSender<Job>, std::thread::JoinHandle<()>) {
    let (tx, rx) = mpsc::sync_channel::<Job>(QUEUE_CAP);
    let handle = std::thread::Builder::new()
        .name("blazedb-materializer".into())
        .spawn(move || run(&store, &sync, &changes, rx))
        .expect("spawning the materializer thread");
    (tx, handle)
}

fn run(
    store: &Store,
    sync: &MatSync,
    changes: &broadcast::Sender<Change>,
    rx: mpsc::Receiver<Job>,
) {
    let mut carry: Option<Job> = None;
    loop {
        let job = match carry.take() {
            Some(j) => j,
            None => match rx.recv() {
                Ok(j) => {
                    sync.took();
                    j
                }
                Err(_) => break,
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
                store.apply_with(&batches, false, listening).map(|ch| {
                    for c in ch {
                        let _ = changes.send(c);
                    }
                    n
                })
            }
            Job::Rebuild { ns, revocations } => match store.rebuild_namespace(&ns, &revocations) {
                Ok((applied, skipped)) => {
                    tracing::info!(%ns, applied, ineffective = skipped, "revocation learned: records rebuilt from the log");
                    Ok(0)
                }
                Err(e) => Err(e),
            },
        };
        match res {
            Ok(n) => {
                // Caught up: make the view durable (one fsync per idle point, not per txn).
                if carry.is_none() && sync.backlog() <= n {
                    if let Err(e) = store.sync_view() {
                        sync.fail(e.to_string());
                        break;
                    }
                }
                sync.applied(n);
            }
            Err(e) => {
                tracing::error!("applying batches to the records failed: {e}");
                sync.fail(e.to_string());
                break;
            }
        }
    }
    let _ = store.sync_view();
}
