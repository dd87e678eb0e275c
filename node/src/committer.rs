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
//!   durable ([`Done`]), and reports go oldest first; actions produced while commits are in
//!   flight wait behind them;
//! - the batches are handed to the materializer (in commit order, with any `Rebuild` job
//!   queued behind them) only once committed, after the replies and the report: a
//!   materializer that is behind holds up the next commits (its queue is bounded), not the
//!   answers for this one. A read after the reply still sees the write: the batches are
//!   counted as submitted to the materializer before their commit (so before any reply, and
//!   before any reader can see them in the log), and reads wait for what was submitted.
//!
//! **Live before bulk.** A transaction holds at most [`COMMIT_BYTES_MAX`] of batches: small
//! groups queued together are joined (one fsync for all), a larger group is committed in
//! several transactions. When the oldest group is heavy (a catch-up answer, or a catch-up's
//! out-of-order buffer released at once: ~50 MB measured), light groups queued behind it
//! ([`LIGHT_BYTES_MAX`]: a gossiped live write, a local write) go first when none of their
//! authors has a batch in a group before them, no materializer job stands between, and no
//! revocation is involved. Every chain stays contiguous in the log after every commit, so
//! reordering independent chains changes nothing a reader or a crash could see; a live
//! batch then waits for one bounded transaction instead of every catch-up answer ahead of it.
//!
//! Bounded: at most [`QUEUED_MAX`] groups wait in the queue (the actor blocks on a full
//! queue, which backs pressure up to writers and peers, as an in-line commit did) and
//! [`HELD_MAX`] more are held by this thread (taken off the queue so it can see past the
//! first). A failed commit fails every later one: their writers get an error and the actor
//! stops the node.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};

use blazedb_protocol::{Op, VerifiedBatch};
use tokio::sync::oneshot;

use crate::materializer::Job;
use crate::node::{NodeError, Shared, WriteReceipt};

/// A log commit, or a hand-over to the materializer, taking longer than this is logged
/// (debug): where writers' calls wait.
const SLOW: std::time::Duration = std::time::Duration::from_millis(200);

/// Most groups queued for the committer (beyond the [`HELD_MAX`] its thread holds). Kept
/// shallow: the actor waits on a full queue, which is the backpressure on writers and peers
/// (8 measured no faster).
pub const QUEUED_MAX: usize = 2;
/// Most batch bytes committed in one transaction: several small works together, or part of
/// a larger one (a catch-up's out-of-order buffer released at once is ~50 MB), so that a
/// light work waits for at most one such transaction.
pub const COMMIT_BYTES_MAX: usize = 4 * 1024 * 1024;
/// A work of at most this many batch bytes (and no revocation) is light: it may be committed
/// ahead of heavier works queued before it that hold no batch of its authors.
pub const LIGHT_BYTES_MAX: usize = 1024 * 1024;
/// Most works the thread holds, taken off the queue so it can look behind the first.
pub const HELD_MAX: usize = 4;

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

/// A commit work the thread holds: what of its batches is not yet durable, and its writers.
struct Held {
    /// Its place in the order the works were sent (`Done` reports follow it).
    id: u64,
    /// Batches not yet committed, in order (a work larger than a transaction is committed
    /// in several, front first).
    batches: VecDeque<VerifiedBatch>,
    replies: Vec<Reply>,
}

impl Held {
    fn bytes(&self) -> usize {
        self.batches.iter().map(|b| b.bytes.len()).sum()
    }

    /// Whether any of its batches revokes a token.
    fn has_revokes(&self) -> bool {
        self.batches.iter().any(|b| b.ops.has_revokes())
    }

    /// Whether it may be committed ahead of works before it: light, and no revocation
    /// (what a revocation voids is decided in log order; none is ever reordered). A work
    /// without batches (writers only) never goes ahead: it is answered in order.
    fn may_overtake(&self, limits: Limits) -> bool {
        !self.batches.is_empty() && self.bytes() <= limits.light_max && !self.has_revokes()
    }
}

/// How transactions are cut: [`COMMIT_BYTES_MAX`] and [`LIGHT_BYTES_MAX`] (smaller in tests).
#[derive(Clone, Copy, Debug)]
struct Limits {
    commit_max: usize,
    light_max: usize,
}

const LIMITS: Limits = Limits {
    commit_max: COMMIT_BYTES_MAX,
    light_max: LIGHT_BYTES_MAX,
};

/// What the thread holds, in the order sent.
enum Item {
    Commit(Held),
    Mat(Job),
}

/// Outcomes of commit works, reported to the actor oldest first: its [`Done`] counts the
/// oldest outstanding works, so a work finished ahead of older ones (a light work committed
/// before a heavy one) is reported with them, once they are finished too.
#[derive(Default)]
struct Reports {
    /// Works reported so far (every id below it).
    reported: u64,
    /// Finished and not yet reported (some older work is not finished).
    finished: BTreeMap<u64, Result<(), String>>,
}

impl Reports {
    fn finished(&mut self, id: u64, result: Result<(), String>) {
        self.finished.insert(id, result);
    }

    /// The report of the oldest works, if they are finished: how many, and the first error
    /// among them.
    fn ready(&mut self) -> Option<Done> {
        let mut report = Done {
            commits: 0,
            result: Ok(()),
        };
        while let Some(r) = self.finished.remove(&self.reported) {
            self.reported += 1;
            report.commits += 1;
            if report.result.is_ok() {
                report.result = r;
            }
        }
        (report.commits > 0).then_some(report)
    }
}

/// Takes the works to commit in the next transaction out of `held` (which starts with a
/// commit work): returns the batches, in the order they are to be appended, and the works
/// this transaction finishes (all of their batches then durable).
///
/// Normally the oldest batches, up to `commit_max` bytes (a larger work is split, the
/// works behind a small one are joined: one fsync for all). But when the oldest work is
/// heavy, the light works queued behind it that share no author with any batch before them
/// (and no materializer job or revocation stands between) go first, alone: a live batch arriving during a
/// catch-up then waits for one bounded transaction, not for every catch-up answer queued
/// before it. Each author's batches stay in order, so every chain stays contiguous in the
/// log at every commit.
fn next_transaction(held: &mut VecDeque<Item>, limits: Limits) -> Transaction {
    let heavy_first = match held.front() {
        Some(Item::Commit(h)) => h.bytes() > limits.light_max,
        _ => false,
    };
    if heavy_first {
        let mut before: HashSet<[u8; 32]> = HashSet::new();
        let mut overtaking = Vec::new();
        for (i, item) in held.iter().enumerate() {
            let Item::Commit(h) = item else { break };
            let authors = || h.batches.iter().map(|b| *b.author.as_bytes());
            if i > 0 && h.may_overtake(limits) && !authors().any(|a| before.contains(&a)) {
                overtaking.push(i);
            } else if h.has_revokes() {
                // Nothing goes ahead of a revocation.
                break;
            } else {
                before.extend(authors());
            }
        }
        if !overtaking.is_empty() {
            let mut batches = Vec::new();
            let mut finished = Vec::new();
            for i in overtaking.into_iter().rev() {
                if let Some(Item::Commit(mut h)) = held.remove(i) {
                    batches.splice(0..0, h.batches.drain(..));
                    finished.push(h);
                }
            }
            finished.reverse();
            return Transaction {
                batches,
                finished,
                cut: Cut::Ahead,
            };
        }
    }
    let mut batches = Vec::new();
    let mut finished = Vec::new();
    let mut bytes = 0usize;
    let mut cut = Cut::InOrder;
    while bytes < limits.commit_max {
        let Some(Item::Commit(h)) = held.front_mut() else {
            break;
        };
        while bytes < limits.commit_max {
            let Some(b) = h.batches.pop_front() else {
                break;
            };
            bytes += b.bytes.len();
            batches.push(b);
        }
        if !h.batches.is_empty() {
            cut = Cut::Split;
            break;
        }
        if let Some(Item::Commit(h)) = held.pop_front() {
            finished.push(h);
        }
    }
    Transaction {
        batches,
        finished,
        cut,
    }
}

/// One log transaction's worth of batches ([`next_transaction`]).
struct Transaction {
    /// The batches, in the order they are appended.
    batches: Vec<VerifiedBatch>,
    /// The works it finishes (all of their batches durable once it commits).
    finished: Vec<Held>,
    cut: Cut,
}

/// How a transaction was cut from what is held.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cut {
    /// The oldest batches.
    InOrder,
    /// The oldest batches, ending inside a work too large for one transaction.
    Split,
    /// Light works taken ahead of a heavier one before them.
    Ahead,
}

fn run(
    shared: &Shared,
    rx: mpsc::Receiver<Work>,
    taken: &AtomicU64,
    mat_tx: mpsc::SyncSender<Job>,
    done: tokio::sync::mpsc::UnboundedSender<Done>,
) {
    let mut failed: Option<String> = None;
    let mut held: VecDeque<Item> = VecDeque::new();
    // Works sent so far (each commit work's id is its place among them).
    let mut received = 0u64;
    let mut reports = Reports::default();
    loop {
        // Wait for work only when none is held; then take what else is queued, so that a
        // light work behind a heavy one is seen.
        let mut take = |w: Work, held: &mut VecDeque<Item>| {
            taken.fetch_add(1, Ordering::Relaxed);
            held.push_back(match w {
                Work::Mat(job) => Item::Mat(job),
                Work::Commit { batches, replies } => {
                    received += 1;
                    Item::Commit(Held {
                        id: received - 1,
                        batches: batches.into(),
                        replies,
                    })
                }
            });
        };
        if held.is_empty() {
            match rx.recv() {
                Ok(w) => take(w, &mut held),
                Err(_) => break,
            }
        }
        while held.len() < HELD_MAX {
            match rx.try_recv() {
                Ok(w) => take(w, &mut held),
                Err(_) => break,
            }
        }
        // A materializer job first in line: every batch sent before it is durable (and
        // handed over), as it must be.
        if matches!(held.front(), Some(Item::Mat(_))) {
            if let Some(Item::Mat(job)) = held.pop_front() {
                if failed.is_none() && mat_tx.send(job).is_ok() {
                    shared.mat_handed_over();
                }
            }
            continue;
        }
        let Transaction {
            batches,
            finished: finishing,
            cut,
        } = next_transaction(&mut held, LIMITS);
        let works = finishing.len();
        let result = match &failed {
            Some(e) => Err(format!("an earlier commit failed: {e}")),
            None if batches.is_empty() => Ok(()),
            None => {
                // Counted as submitted, and kept for reads until staged, before the commit
                // makes them visible: a read that sees these batches in the log (`counts`, a
                // peer's answer) and then reads records finds them. Counted after the commit,
                // a reader could slip between the two and miss the records of batches it had
                // just counted.
                shared.mat.submitting(&batches);
                let t = std::time::Instant::now();
                let r = shared.store.append_log(&batches).map_err(|e| e.to_string());
                if t.elapsed() > SLOW {
                    tracing::debug!(
                        ms = t.elapsed().as_millis() as u64,
                        batches = batches.len(),
                        "log commit slow (fsync)"
                    );
                }
                if r.is_ok() {
                    // Reads join these batches without looking them up in the log.
                    shared.mat.committed(batches.len() as u64);
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
                if !batches.is_empty() {
                    let me = *shared.keypair.public().as_bytes();
                    let remote = batches.iter().filter(|b| b.header.author != me).count() as u64;
                    m.commits.fetch_add(1, Ordering::Relaxed);
                    m.remote_batches.fetch_add(remote, Ordering::Relaxed);
                    m.commit_groups_max
                        .fetch_max(works.max(1) as u64, Ordering::Relaxed);
                    match cut {
                        Cut::Ahead => m.commits_ahead.fetch_add(1, Ordering::Relaxed),
                        Cut::Split => m.commits_split.fetch_add(1, Ordering::Relaxed),
                        Cut::InOrder => 0,
                    };
                    shared.mark_durable(&batches);
                    to_mat = Some(batches);
                }
                for h in finishing.iter() {
                    m.writes_acked
                        .fetch_add(h.replies.len() as u64, Ordering::Relaxed);
                }
            }
            Err(e) => {
                if failed.is_none() {
                    tracing::error!("storing batches failed, stopping the node: {e}");
                    failed = Some(e.clone());
                }
            }
        }
        for h in finishing {
            for (reply, receipt, spent) in h.replies {
                let answer = match &result {
                    Ok(()) => Ok(receipt),
                    Err(_) => Err(NodeError::Stopped),
                };
                let _ = reply.send((answer, spent));
            }
            reports.finished(h.id, result.clone());
        }
        // The actor is gone if this fails; what is held is finished all the same (writers
        // are waiting).
        if let Some(report) = reports.ready() {
            let _ = done.send(report);
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use blazedb_identity::Keypair;
    use blazedb_protocol::batch::{seal, ChainPosition};
    use blazedb_protocol::{Hlc, OpFields};
    use proptest::prelude::*;
    use rand::SeedableRng;
    use std::sync::OnceLock;

    /// Transactions cut small, for batches of a few KB.
    const TEST: Limits = Limits {
        commit_max: 100_000,
        light_max: 10_000,
    };

    /// An author's chain of batches: `big` ones hold ~45 KB of incompressible text, the others
    /// one short field; `revoke_at` seqs hold a revocation.
    fn chain(seed: u8, sizes: &[bool], revoke_at: &[u64]) -> Vec<VerifiedBatch> {
        let kp = Keypair::from_seed([seed; 32]);
        let mut rng = rand::rngs::StdRng::seed_from_u64(u64::from(seed));
        let mut prev = None;
        let mut out = Vec::new();
        for (i, &big) in sizes.iter().enumerate() {
            let seq = i as u64 + 1;
            let len = if big { 60_000 } else { 8 };
            let text: String = (0..len)
                .map(|_| char::from(rand::Rng::gen_range(&mut rng, b'!'..=b'~')))
                .collect();
            let hlc = Hlc(1_000 + seq);
            let mut ops = vec![Op::Upsert {
                collection: "c".into(),
                key: format!("k{seq}"),
                hlc,
                fields: OpFields::from_iter([("f".to_string(), text.into())]),
            }];
            if revoke_at.contains(&seq) {
                ops.push(Op::Revoke {
                    token: "ab".repeat(32),
                    hlc: Hlc(hlc.0 + 1),
                });
            }
            let vb = seal(&kp, "default", ChainPosition { seq, prev }, ops, None)
                .expect("sealing a test batch");
            prev = Some(vb.id);
            out.push(vb);
        }
        out
    }

    fn work(id: u64, batches: &[VerifiedBatch]) -> Item {
        Item::Commit(Held {
            id,
            batches: batches.iter().cloned().collect(),
            replies: Vec::new(),
        })
    }

    fn mat() -> Item {
        Item::Mat(Job::Rebuild {
            ns: "default".into(),
            revocations: BTreeMap::new(),
        })
    }

    /// (author's first key byte, seq) of each batch, in the order given.
    fn order(batches: &[VerifiedBatch]) -> Vec<(u8, u64)> {
        batches
            .iter()
            .map(|b| (b.author.as_bytes()[0], b.header.seq))
            .collect()
    }

    fn cut(held: &mut VecDeque<Item>) -> (Vec<VerifiedBatch>, Vec<Held>, Cut) {
        let t = next_transaction(held, TEST);
        (t.batches, t.finished, t.cut)
    }

    fn ids(finished: &[Held]) -> Vec<u64> {
        finished.iter().map(|h| h.id).collect()
    }

    #[test]
    fn a_light_work_goes_ahead_of_a_heavy_one_it_shares_no_author_with() {
        let a = chain(1, &[true; 5], &[]);
        let c = chain(2, &[false], &[]);
        assert!(a.iter().map(|b| b.bytes.len()).sum::<usize>() > TEST.commit_max);
        let mut held: VecDeque<Item> = [work(0, &a), work(1, &c)].into();
        let (first, done, how) = cut(&mut held);
        assert_eq!(order(&first), order(&c), "the light work alone, first");
        assert_eq!(how, Cut::Ahead);
        assert_eq!(ids(&done), [1]);
        // Then the heavy work, in order, in transactions of at most `commit_max` (the last
        // batch taken may cross it).
        let mut rest = Vec::new();
        let mut finished = Vec::new();
        while !held.is_empty() {
            let (t, done, how) = cut(&mut held);
            assert_eq!(how == Cut::Split, !held.is_empty(), "split until the last");
            let sizes: Vec<usize> = t.iter().map(|b| b.bytes.len()).collect();
            assert!(
                sizes[..sizes.len() - 1].iter().sum::<usize>() < TEST.commit_max,
                "a transaction went on past the limit: {sizes:?}"
            );
            rest.extend(t);
            finished.extend(ids(&done));
        }
        assert_eq!(order(&rest), order(&a));
        assert_eq!(finished, [0], "the heavy work finishes with its last batch");
    }

    #[test]
    fn a_light_work_waits_for_its_authors_a_materializer_job_and_revocations() {
        let a = chain(1, &[true, true, true, false], &[]);
        let c = chain(2, &[true, true, true, false], &[]);
        let r = chain(3, &[false], &[1]);
        let cases: Vec<(&str, Vec<Item>)> = vec![
            ("same author", vec![work(0, &a[..3]), work(1, &a[3..])]),
            (
                "its author in a work before it",
                vec![work(0, &a[..3]), work(1, &c[..3]), work(2, &c[3..])],
            ),
            (
                "a materializer job between",
                vec![work(0, &a[..3]), mat(), work(1, &c[3..])],
            ),
            ("a revocation in it", vec![work(0, &a[..3]), work(1, &r)]),
            (
                "no batch in it (writers only)",
                vec![work(0, &a[..3]), work(1, &[])],
            ),
            (
                "behind a revocation",
                vec![
                    work(0, &chain(4, &[true, true, true], &[2])),
                    work(1, &c[3..]),
                ],
            ),
        ];
        for (what, items) in cases {
            let first = match &items[0] {
                Item::Commit(h) => order(&h.batches.iter().cloned().collect::<Vec<_>>()),
                Item::Mat(_) => unreachable!(),
            };
            let mut held: VecDeque<Item> = items.into();
            let (t, _, how) = cut(&mut held);
            assert_ne!(how, Cut::Ahead, "{what}");
            assert_eq!(
                order(&t)[0],
                first[0],
                "{what}: the oldest batch must go first"
            );
        }
        // Light works behind a light one: joined, in order (group commit).
        let s1 = chain(5, &[false, false], &[]);
        let s2 = chain(6, &[false], &[]);
        let mut held: VecDeque<Item> = [work(0, &s1), work(1, &s2)].into();
        let (t, done, how) = cut(&mut held);
        assert_eq!(how, Cut::InOrder);
        assert_eq!(order(&t), [order(&s1), order(&s2)].concat());
        assert_eq!(ids(&done), [0, 1]);
    }

    /// Three authors' chains, each a mix of big and small batches, one with revocations.
    fn pool() -> &'static [Vec<VerifiedBatch>] {
        static POOL: OnceLock<Vec<Vec<VerifiedBatch>>> = OnceLock::new();
        POOL.get_or_init(|| {
            let sizes = |k: usize| (0..24).map(|i| (i * 7 + k) % 5 < 2).collect::<Vec<_>>();
            vec![
                chain(11, &sizes(0), &[]),
                chain(12, &sizes(1), &[5, 17]),
                chain(13, &sizes(3), &[]),
            ]
        })
    }

    #[test]
    fn works_finished_ahead_of_older_ones_are_reported_with_them() {
        let mut r = Reports::default();
        r.finished(1, Ok(()));
        r.finished(2, Err("disk".into()));
        assert!(r.ready().is_none(), "work 0 is not finished");
        r.finished(0, Ok(()));
        let d = r.ready().expect("0, 1 and 2 finished");
        assert_eq!(d.commits, 3);
        assert_eq!(
            d.result,
            Err("disk".into()),
            "an error among them is reported"
        );
        assert!(r.ready().is_none(), "nothing reported twice");
        r.finished(3, Ok(()));
        let d = r.ready().expect("3 finished");
        assert_eq!((d.commits, d.result), (1, Ok(())));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// Whatever is held, taking transactions until nothing is left (a materializer job
        /// first in line handed over, as the thread does) commits every batch exactly once,
        /// each author's in chain order, none across a materializer job, each transaction
        /// within the limit, and every work finished once, with its last batch.
        #[test]
        fn transactions_keep_every_chain_in_order(
            plan in prop::collection::vec((0usize..4, 1usize..4), 1..14),
        ) {
            let pool = pool();
            let mut next = [0usize; 3];
            let mut items = Vec::new();
            let mut sent = Vec::new();
            for (id, (who, n)) in plan.into_iter().enumerate() {
                if who == 3 {
                    items.push(mat());
                    continue;
                }
                let from = next[who];
                let to = (from + n).min(pool[who].len());
                next[who] = to;
                let batches = &pool[who][from..to];
                sent.push((id as u64, batches.to_vec()));
                items.push(work(id as u64, batches));
            }
            // Which works each materializer job must follow.
            let mut before_mat = Vec::new();
            let mut seen_works = 0;
            for item in &items {
                match item {
                    Item::Mat(_) => before_mat.push(seen_works),
                    Item::Commit(_) => seen_works += 1,
                }
            }
            let mut held: VecDeque<Item> = items.into();
            let mut committed: Vec<VerifiedBatch> = Vec::new();
            let mut finished: Vec<u64> = Vec::new();
            let mut mats = 0;
            while let Some(front) = held.front() {
                if let Item::Mat(_) = front {
                    let must = before_mat[mats];
                    prop_assert_eq!(
                        finished.len(), must,
                        "a materializer job handed over before the works sent ahead of it"
                    );
                    held.pop_front();
                    mats += 1;
                    continue;
                }
                let (t, done, _) = cut(&mut held);
                prop_assert!(!t.is_empty() || done.iter().all(|h| h.batches.is_empty()));
                let sizes: Vec<usize> = t.iter().map(|b| b.bytes.len()).collect();
                if let Some((_, but_last)) = sizes.split_last() {
                    prop_assert!(but_last.iter().sum::<usize>() < TEST.commit_max);
                }
                committed.extend(t);
                for h in done {
                    prop_assert!(h.batches.is_empty(), "finished with batches left");
                    prop_assert!(!finished.contains(&h.id), "finished twice");
                    // Every batch of it is committed by now.
                    let (_, mine) = sent.iter().find(|(id, _)| *id == h.id).unwrap();
                    for b in mine {
                        prop_assert!(committed.iter().any(|c| c.id == b.id));
                    }
                    finished.push(h.id);
                }
            }
            prop_assert_eq!(finished.len(), sent.len());
            let want: usize = sent.iter().map(|(_, b)| b.len()).sum();
            prop_assert_eq!(committed.len(), want);
            // Each author's chain contiguous from seq 1 at every point: in commit order, each
            // author's seqs are 1, 2, 3, ...
            for chain in pool {
                let key = chain[0].author.as_bytes()[0];
                let seqs: Vec<u64> = order(&committed)
                    .into_iter()
                    .filter(|(a, _)| *a == key)
                    .map(|(_, s)| s)
                    .collect();
                let expect: Vec<u64> = (1..=seqs.len() as u64).collect();
                prop_assert_eq!(seqs, expect);
            }
        }
    }
}
