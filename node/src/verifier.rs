//! The verifier: checks fetched batches off the actor's thread.
//!
//! A catch-up answer holds up to 64 batches (~8 MiB); verifying them (inflate, decode, hash,
//! signature: [`blazedb_protocol::preverify`]) took the actor ~100–200 ms per answer, and a
//! live gossiped write arriving meanwhile waited behind it (B6 measured 116–156 ms p50 for
//! live writes during a 4-stripe catch-up, read from the log without the actor). Here a
//! thread verifies answers while the actor keeps serving live traffic; the engine then takes
//! the verified batches ([`blazedb_protocol::Engine::handle_batches_preverified`]), in the
//! order the answers arrived.
//!
//! Bounded: at most [`QUEUED_MAX`] answers wait here. The request is acknowledged only once
//! its batches are handed to the engine, so the serving peer, which keeps at most a few bulk
//! answers unacknowledged per peer, slows down with us. A full queue sends the answer down the
//! old path (verified by the engine on the actor): never blocked, never dropped.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};

use blazedb_protocol::{preverify, PreVerified};
use libp2p::request_response::ResponseChannel;
use libp2p::PeerId;

use crate::net::{Ack, Class};

/// Most answers waiting to be verified (beyond the one being verified).
pub const QUEUED_MAX: usize = 4;

/// A `Batches` request from a peer, its batches as `B`.
pub struct Answer<B> {
    /// Who sent it.
    pub peer: PeerId,
    /// The traffic class it came on (its acknowledgement goes back on it).
    pub class: Class,
    /// To acknowledge once the engine has it.
    pub channel: ResponseChannel<Ack>,
    /// Namespace of the chain it answers.
    pub ns: String,
    /// Author of the chain.
    pub author: [u8; 32],
    /// The batches.
    pub batches: Vec<B>,
}

impl<B> Answer<B> {
    /// The same answer with its batches turned into `C`s.
    pub fn map_batches<C>(self, f: impl FnOnce(Vec<B>) -> Vec<C>) -> Answer<C> {
        Answer {
            peer: self.peer,
            class: self.class,
            channel: self.channel,
            ns: self.ns,
            author: self.author,
            batches: f(self.batches),
        }
    }
}

/// An answer to verify: its batches as received.
pub type Job = Answer<Vec<u8>>;
/// A verified answer, for the engine.
pub type Verified = Answer<PreVerified>;

/// The verifier thread and its queue.
pub struct Verifier {
    tx: Option<mpsc::SyncSender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Jobs queued, and taken off the queue by the thread (their difference: the depth).
    sent: u64,
    taken: Arc<AtomicU64>,
}

impl Verifier {
    /// Starts the thread; verified answers come back on `done` (at most as many as jobs in
    /// flight, `QUEUED_MAX` + 1).
    pub fn spawn(done: tokio::sync::mpsc::UnboundedSender<Verified>) -> Self {
        let (tx, rx) = mpsc::sync_channel::<Job>(QUEUED_MAX);
        let taken = Arc::new(AtomicU64::new(0));
        let counter = taken.clone();
        let thread = std::thread::Builder::new()
            .name("blazedb-verifier".into())
            .spawn(move || {
                for job in rx {
                    counter.fetch_add(1, Ordering::Relaxed);
                    if done.send(job.map_batches(preverify)).is_err() {
                        break;
                    }
                }
            })
            .expect("spawning the verifier thread");
        Verifier {
            tx: Some(tx),
            thread: Some(thread),
            sent: 0,
            taken,
        }
    }

    /// Queues a job; gives it back if the queue is full (or the thread is gone).
    pub fn try_send(&mut self, job: Job) -> Option<Job> {
        match &self.tx {
            Some(tx) => match tx.try_send(job) {
                Ok(()) => {
                    self.sent += 1;
                    None
                }
                Err(mpsc::TrySendError::Full(j) | mpsc::TrySendError::Disconnected(j)) => Some(j),
            },
            None => Some(job),
        }
    }

    /// Jobs queued and not yet taken by the thread (at most [`QUEUED_MAX`] + 1, as for the
    /// committer).
    pub fn depth(&self) -> u64 {
        self.sent.saturating_sub(self.taken.load(Ordering::Relaxed))
    }
}

impl Drop for Verifier {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
