//! The scrub: a background check of the log, at a bounded rate.
//!
//! A batch damaged on disk is found when it is served (the answer stops before it) or by
//! `blazedb check` on a stopped node. One that no peer asks for again — every peer holds
//! it — would stay unnoticed until the day one does, by which time the peers that could
//! give it back may be gone. The scrub re-verifies every stored batch, a pass at a time,
//! as `check` does ([`Store::scrub_step`]: signature, hash, chain links), and reports what
//! it finds: an error log line per damaged batch (once each) and
//! `blazedb_scrub_damaged_total`. `blazedb repair --cut-damaged`, on the stopped node,
//! removes it for peers to send again.
//!
//! Bounded: it reads [`STEP_BYTES`] at a time in a read transaction of its own and then
//! waits as long as reading them may take at [`ScrubConfig::bytes_per_sec`]; a pass starts
//! at most every [`ScrubConfig::every`]. It stops with the node (the wait is on a channel
//! the node drops).

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use crate::node::Shared;
use crate::store::ScrubCursor;

/// Bytes of stored batches one step reads (then the scrub waits its share of time).
pub const STEP_BYTES: usize = 1 << 20;
/// Damaged batches reported by name at most (each once; all are counted).
const REPORTS_MAX: usize = 256;

/// How the log is scrubbed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScrubConfig {
    /// Bytes of stored batches checked per second at most; 0: no scrub. Unpaced, a pass
    /// over a 4.5M-op log (900 batches, ~400 MB) took 1.6 s on one core of the reference
    /// machine (~250 MB/s); at the default, 8 MiB/s, the whole node used 3.3% of a core
    /// while it scrubbed.
    pub bytes_per_sec: u64,
    /// How long after the start the first pass begins (a node that starts is busy catching
    /// up first).
    pub first_after: Duration,
    /// The least time from one pass's start to the next one's.
    pub every: Duration,
}

impl Default for ScrubConfig {
    fn default() -> Self {
        Self {
            bytes_per_sec: 8 << 20,
            first_after: Duration::from_secs(10 * 60),
            every: Duration::from_secs(24 * 60 * 60),
        }
    }
}

/// The scrub's thread; dropping it stops the thread and waits for it.
pub struct Scrub {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Scrub {
    /// Starts scrubbing the node's log as `cfg` says (nothing if its rate is 0).
    pub(crate) fn spawn(shared: Arc<Shared>, cfg: ScrubConfig) -> Self {
        if cfg.bytes_per_sec == 0 {
            return Self {
                stop: None,
                thread: None,
            };
        }
        let (stop, stopped) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("blazedb-scrub".into())
            .spawn(move || run(&shared, cfg, &stopped))
            .expect("spawning the scrub thread");
        Self {
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for Scrub {
    fn drop(&mut self) {
        self.stop.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(shared: &Shared, cfg: ScrubConfig, stopped: &mpsc::Receiver<()>) {
    let (store, metrics) = (&shared.store, &shared.metrics);
    // Waits `d`; false once the node stops.
    let wait = |d: Duration| {
        matches!(
            stopped.recv_timeout(d),
            Err(mpsc::RecvTimeoutError::Timeout)
        )
    };
    let mut reported = HashSet::new();
    if !wait(cfg.first_after) {
        return;
    }
    loop {
        let started = Instant::now();
        let mut cursor = ScrubCursor::default();
        let (mut batches, mut damaged) = (0u64, 0u64);
        loop {
            let step = match store.scrub_step(&mut cursor, STEP_BYTES) {
                Ok(step) => step,
                Err(e) => {
                    tracing::warn!("the log's scrub stopped this pass: {e}");
                    break;
                }
            };
            batches += step.batches;
            metrics
                .scrub_batches
                .fetch_add(step.batches, Ordering::Relaxed);
            for d in step.damaged {
                damaged += 1;
                metrics.scrub_damaged.fetch_add(1, Ordering::Relaxed);
                let named = d.to_string();
                if reported.len() < REPORTS_MAX && reported.insert(named.clone()) {
                    tracing::error!(
                        "the log's scrub found a damaged batch ({named}): it is not served; \
                         stop the node and run `blazedb repair --cut-damaged` for peers to \
                         send it again"
                    );
                }
            }
            if step.done {
                metrics.scrub_passes.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    batches,
                    damaged,
                    secs = started.elapsed().as_secs_f64(),
                    "the log's scrub finished a pass"
                );
                break;
            }
            let share = Duration::from_secs_f64(step.bytes as f64 / cfg.bytes_per_sec as f64);
            if !wait(share) {
                return;
            }
        }
        if !wait(cfg.every.saturating_sub(started.elapsed())) {
            return;
        }
    }
}
