//! The log committer: makes batches durable off the actor's thread.
//!
//! The actor seals local writes and verifies peers' batches; storing them in the log is one
//! redb transaction with an fsync (a few milliseconds here). Done in line, the actor sat idle
//! for that long with every socket and every writer waiting behind it. Here the commit runs on
//! its own thread, so the actor seals or verifies the next group while the last one is being
//! made durable (a pipeline of two stages), and the groups that queue up during one fsync are
//! committed together by the next (group commit across actor rounds).
//!
//! What must wait for durability still does, in order:
//! - a writer's reply is sent by this thread after the commit that holds its batch;
//! - the actor runs everything else a group produced (publishing, relaying verdicts, answers
//!   to peers, which may read what was just stored) only when this thread reports the group
//!   durable ([`Done`]); actions produced while commits are in flight wait behind them;
//! - the batches are handed to the materializer (in log order, with any `Rebuild` job queued
//!   behind them) only once committed, after the replies and the report: a materializer
//!   that is behind holds up the next commits (its queue is bounded), not the answers for
//!   this one. A read after the reply still sees the write: the batches are counted as
//!   submitted to the materializer before their commit (so before any reply, and before any
//!   reader can see them in the log), and reads wait for what was submitted.
//!
//! Bounded: at most [`QUEUED_MAX`] groups wait here (the actor blocks on a full queue, which
//! backs pressure up to writers and peers, as an in-line commit did), and a transaction takes
//! at most [`COMMIT_BYTES_MAX`] of them. A failed commit fails every group after it (a later
//! link of a chain must never be durable without the one before): their writers get an
//! error and the actor stops the node.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};

use blazedb_protocol::{Op, VerifiedBatch};
use tokio::sync::oneshot;

use crate::materializer::Job;
use crate::node::{NodeError, Shared, WriteReceipt};

/// A log commit, or a hand-over to the materializer, taking longer than this is logged
/// (debug): where writers' calls wait.
const SLOW: std::time::Duration = std::time::Duration::from_millis(200);

/// Most groups queued for the committer (beyond the one being committed). Kept shallow: a
/// live batch queued behind bulk catch-up groups waits for all of them (8 measured no faster).
pub const QUEUED_MAX: usize = 2;
/// Most batch bytes committed in one transaction (several queued groups together).
pub const COMMIT_BYTES_MAX: usize = 32 * 1024 * 1024;

/// What a writer is answered: the outcome, and its ops back (sealed, no longer needed), so
/// that the writer's task frees what it allocated rather than the node's threads.
pub type WriteAnswer = (Result<WriteReceipt, NodeError>, Vec<Op>);

/// A writer waiting for its batch to be durable (with its spent ops, handed back then).
pub type Reply = (oneshot::Sender<WriteAnswer>, WriteReceipt, Vec<Op>);

/// Work for the committer, done in the order sent.
pub enum Work {
    /// Make these batches durable, then hand them to the materializer and answer the writers.
    Commit {
        /// Batches to append to the log.
        batches: Vec<VerifiedBatch>,
        /// Writers of local batches among them.
        replies: Vec<Reply>,
    },
    /// A materializer job that must follow the batches committed before it.
    Mat(Job),
}

/// Reported to the actor: this many `Commit` works, the oldest outstanding ones, are done.
#[derive(Debug)]
pub struct Done {
    /// How many commits this report covers.
    pub commits: usize,
    /// The outcome (an error: the node must stop).
    pub result: Result<(), String>,
}

/// The committer thread and its queue.
pub struct Committer {
    tx: Option<mpsc::SyncSender<Work>>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Works sent, and taken off the queue by the thread (their difference: the depth).
    sent: u64,
    taken: Arc<AtomicU64>,
}

impl Committer {
    /// Starts the thread. It owns the materializer's queue from now on (the only way jobs
    /// reach it), and reports each finished commit on `done`; that channel holds at most as
    /// many reports as commits in flight (`QUEUED_MAX` + 1), so it never grows beyond that.
    pub fn spawn(
        shared: Arc<Shared>,
        mat_tx: mpsc::SyncSender<Job>,
        done: tokio::sync::mpsc::UnboundedSender<Done>,
    ) -> Self {
        let (tx, rx) = mpsc::sync_channel::<Work>(QUEUED_MAX);
        let taken = Arc::new(AtomicU64::new(0));
        let counter = taken.clone();
        let thread = std::thread::Builder::new()
            .name("blazedb-committer".into())
            .spawn(move || run(&shared, rx, &counter, mat_tx, done))
            .expect("spawning the committer thread");
        Committer {
            tx: Some(tx),
            thread: Some(thread),
            sent: 0,
            taken,
        }
    }

    /// Queues work; blocks while [`QUEUED_MAX`] works wait. Returns the queue's depth once
    /// it is queued (at most `QUEUED_MAX` + 1: the thread may not have taken the one it is
    /// about to take). Err once the thread has ended.
    pub fn send(&mut self, work: Work) -> Result<u64, ()> {
        let tx = self.tx.as_ref().ok_or(())?;
        tx.send(work).map_err(|_| ())?;
        self.sent += 1;
        Ok(self.sent.saturating_sub(self.taken.load(Ordering::Relaxed)))
    }

    /// Finishes what is queued (commits, replies, materializer jobs), then stops the thread.
    pub fn close(&mut self) -> Option<std::thread::JoinHandle<()>> {
        self.tx.take();
        self.thread.take()
    }
}

impl Drop for Committer {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(
    shared: &Shared,
    rx: mpsc::Receiver<Work>,
    taken: &AtomicU64,
    mat_tx: mpsc::SyncSender<Job>,
    done: tokio::sync::mpsc::UnboundedSender<Done>,
) {
    let mut failed: Option<String> = None;
    let mut carry: Option<Work> = None;
    loop {
        let first = match carry.take() {
            Some(w) => w,
            None => match rx.recv() {
                Ok(w) => {
                    taken.fetch_add(1, Ordering::Relaxed);
                    w
                }
                Err(_) => break,
            },
        };
        let (mut batches, mut replies) = match first {
            Work::Mat(job) => {
                if failed.is_none() && mat_tx.send(job).is_ok() {
                    shared.mat_handed_over();
                }
                continue;
            }
            Work::Commit { batches, replies } => (batches, replies),
        };
        // Everything else queued behind it, up to a transaction's worth: one fsync for all.
        let mut commits = 1usize;
        let mut bytes: usize = batches.iter().map(|b| b.bytes.len()).sum();
        while bytes < COMMIT_BYTES_MAX {
            let next = rx.try_recv();
            if next.is_ok() {
                taken.fetch_add(1, Ordering::Relaxed);
            }
            match next {
                Ok(Work::Commit {
                    batches: more,
                    replies: more_replies,
                }) => {
                    bytes += more.iter().map(|b| b.bytes.len()).sum::<usize>();
                    batches.extend(more);
                    replies.extend(more_replies);
                    commits += 1;
                }
                Ok(other) => {
                    carry = Some(other);
                    break;
                }
                Err(_) => break,
            }
        }
        let result = match &failed {
            Some(e) => Err(format!("an earlier commit failed: {e}")),
            None => {
                // Counted as submitted before the commit makes them visible: a read that sees
                // these batches in the log (`counts`, a peer's answer) and then reads records
                // waits for them to be applied. Counted after the commit, a reader could
                // slip between the two and miss the records of batches it had just counted.
                shared.mat.submitted(batches.len() as u64);
                let t = std::time::Instant::now();
                let r = shared.store.append_log(&batches).map_err(|e| e.to_string());
                if t.elapsed() > SLOW {
                    tracing::debug!(
                        ms = t.elapsed().as_millis() as u64,
                        batches = batches.len(),
                        "log commit slow (fsync)"
                    );
                }
                if let Err(e) = &r {
                    // Never applied: readers waiting for them hear why instead of timing out.
                    shared.mat.fail(format!("storing batches failed: {e}"));
                }
                r
            }
        };
        let mut to_mat = None;
        match &result {
            Ok(()) => {
                let m = &shared.metrics;
                let me = *shared.keypair.public().as_bytes();
                let remote = batches.iter().filter(|b| b.header.author != me).count() as u64;
                m.commits.fetch_add(1, Ordering::Relaxed);
                m.remote_batches.fetch_add(remote, Ordering::Relaxed);
                m.commit_groups_max
                    .fetch_max(commits as u64, Ordering::Relaxed);
                shared.mark_durable(&batches);
                m.writes_acked
                    .fetch_add(replies.len() as u64, Ordering::Relaxed);
                for (reply, receipt, spent) in replies {
                    let _ = reply.send((Ok(receipt), spent));
                }
                to_mat = Some(batches);
            }
            Err(e) => {
                if failed.is_none() {
                    tracing::error!("storing batches failed, stopping the node: {e}");
                    failed = Some(e.clone());
                }
                for (reply, _, spent) in replies {
                    let _ = reply.send((Err(NodeError::Stopped), spent));
                }
            }
        }
        // The actor is gone if this fails; what is queued is finished all the same (writers
        // are waiting).
        let _ = done.send(Done { commits, result });
        // Last: this blocks while the materializer is its queue's length behind
        // (backpressure on the next commits, and through them on the actor), but the writers
        // and the actor have already heard that these batches are durable.
        if let Some(batches) = to_mat {
            let t = std::time::Instant::now();
            if mat_tx.send(Job::Apply(batches)).is_ok() {
                shared.mat_handed_over();
            }
            if t.elapsed() > SLOW {
                tracing::debug!(
                    ms = t.elapsed().as_millis() as u64,
                    "waited for room in the materializer queue"
                );
            }
        }
    }
}
