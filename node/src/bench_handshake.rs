//! B7: the cost of a link's security handshake.
//!
//! Handshakes measured in the same run on the same machine:
//! - **hybrid TLS**: [`PqTlsConfig`] with [`KxPolicy::Strict`] on both ends (TLS 1.3,
//!   X25519MLKEM768) — what BlazeDB links use;
//! - **classical TLS**: TLS 1.3 with X25519 only. [`PqTlsConfig::classical_only`] plays it,
//!   but its certificate verifier accepts anything, while libp2p's (used by every
//!   [`PqTlsConfig::new`] config) parses and checks the peer's certificate twice and verifies
//!   its handshake signature — about half the CPU of a handshake. So it is also measured with
//!   a [`PqTlsConfig`] listener (compat policy, libp2p's verifier) facing a classical-only
//!   dialer, and the fair baseline — both ends checking — is estimated as
//!   `2 × (listener checks) − (no checks)`, taking the dialer's checks to cost what the
//!   listener's do (the same checks on the same kind of certificate). Both figures are shown;
//!   the ratio uses the fair one.
//! - **Noise XX**: `libp2p::noise::Config` on both ends (X25519, ChaChaPoly, SHA-256) — the
//!   usual libp2p security protocol. Only measured here; a node never offers it.
//!
//! What is measured:
//! - **CPU per handshake**, dialer and listener together. Both ends run on one dedicated
//!   thread (a current-thread tokio runtime, logging off); the figure is that thread's CPU
//!   time (user + system, so loopback TCP included) from `/proc/thread-self/schedstat`
//!   (nanoseconds, read right after a `sched_yield` so that it is current), divided by the
//!   number of sequential handshakes. Where that file is unreadable it falls back to wall
//!   time of the same sequential handshakes, and the rows say so. The TCP connections are set
//!   up before the clock starts, and each end's config is built once and cloned per
//!   connection, as a swarm does — so certificate generation is not counted.
//! - **Bytes per handshake**, both directions, as written by each end during its handshake.
//! - **Round trips**, over a loopback link that delays every byte by a one-way delay D
//!   (an in-process relay): the time until the dialer may send application data, and until
//!   the first application byte (sent by the dialer right away) reaches the listener, in units
//!   of 2·D, rounded to the nearest half. This is the security handshake alone: over a libp2p
//!   transport, multistream-select negotiates the security protocol before it and the muxer
//!   after it (the node's swarm uses `Version::V1Lazy`, where the dialer sends its data right
//!   behind its proposal); that is not measured here.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::core::upgrade::{InboundConnectionUpgrade, OutboundConnectionUpgrade};
use libp2p::identity::Keypair;
use libp2p::tcp::tokio::TcpStream;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use blazedb_crypto::{KxPolicy, LinkRegistry, PqTlsConfig};

use crate::bench::Row;

/// Sequential handshakes per CPU figure.
pub const HANDSHAKES: usize = 200;
/// One-way delay of the link on which round trips are counted.
pub const ONE_WAY_DELAY: Duration = Duration::from_millis(20);
/// Handshakes over the delayed link per run (the median is used).
const DELAYED_HANDSHAKES: usize = 3;

/// B7 with the standard parameters ([`HANDSHAKES`] handshakes per figure, [`ONE_WAY_DELAY`]);
/// figures are medians of `runs` runs.
pub async fn b7(runs: usize) -> Result<Vec<Row>> {
    b7_with(runs, HANDSHAKES, ONE_WAY_DELAY).await
}

/// B7 with `n` sequential handshakes per CPU figure and a link delay of `delay` one way.
pub async fn b7_with(runs: usize, n: usize, delay: Duration) -> Result<Vec<Row>> {
    let (runs, n) = (runs.max(1), n.max(1));
    // A thread of its own, so that its CPU time is the handshakes' and nothing else's.
    let (tx, rx) = futures::channel::oneshot::channel();
    std::thread::Builder::new()
        .name("b7-handshakes".into())
        .spawn(move || {
            let res = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("building the B7 runtime")
                .and_then(|rt| {
                    // No logging on this thread: the compat listener warns about every
                    // classical link, and formatting that would be counted as handshake CPU.
                    tracing::subscriber::with_default(
                        tracing::subscriber::NoSubscriber::default(),
                        || rt.block_on(measure(runs, n, delay)),
                    )
                });
            let _ = tx.send(res);
        })
        .context("spawning the B7 thread")?;
    let m = rx.await.context("the B7 thread died")??;
    Ok(m.rows(n, delay))
}

/// The handshakes compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// [`PqTlsConfig`], strict, both ends.
    HybridTls,
    /// [`PqTlsConfig::classical_only`] both ends: X25519, and no certificate checks in
    /// rustls' verifier (only the libp2p certificate parse after the handshake).
    ClassicalTls,
    /// X25519; the listener is a [`PqTlsConfig`] (compat policy: libp2p's certificate
    /// verifier), the dialer [`PqTlsConfig::classical_only`].
    ClassicalTlsListenerChecks,
    /// `libp2p::noise` both ends.
    NoiseXx,
}

/// Order of [`Measured::figures`].
const KINDS: [Kind; 4] = [
    Kind::HybridTls,
    Kind::ClassicalTls,
    Kind::ClassicalTlsListenerChecks,
    Kind::NoiseXx,
];

/// Medians of one kind's figures.
#[derive(Clone, Copy, Debug, Default)]
struct Figures {
    /// CPU (or wall, see [`Measured::wall_clock`]) µs per handshake, both ends.
    us: f64,
    /// Bytes written by the dialer and by the listener during the handshake.
    bytes: (f64, f64),
    /// Until the dialer may send, in round trips.
    dialer_rtt: f64,
    /// Until the first application byte reaches the listener, in round trips.
    first_byte_rtt: f64,
}

struct Measured {
    /// In the order of [`KINDS`].
    figures: [Figures; 4],
    /// `/proc/thread-self/schedstat` was unreadable: `us` is wall time.
    wall_clock: bool,
}

async fn measure(runs: usize, n: usize, delay: Duration) -> Result<Measured> {
    let ends = KINDS.map(Ends::new);
    let ends = ends.into_iter().collect::<Result<Vec<_>>>()?;
    let wall_clock = thread_cpu_ns().is_none();
    for e in &ends {
        // Warm-up (first use of each code path), not counted.
        cpu_per_handshake(e, 1).await?;
    }
    let mut samples: [Vec<[f64; 5]>; 4] = Default::default();
    for _ in 0..runs {
        // Kinds interleaved within each run, so that they share the machine's conditions.
        for ((e, s), kind) in ends.iter().zip(&mut samples).zip(KINDS) {
            let us = cpu_per_handshake(e, n).await?;
            if kind == Kind::ClassicalTlsListenerChecks {
                // Only its CPU is used.
                s.push([us, 0.0, 0.0, 0.0, 0.0]);
                continue;
            }
            let (dialer_bytes, listener_bytes) = bytes_per_handshake(e).await?;
            let mut dialer = Vec::new();
            let mut first = Vec::new();
            for _ in 0..DELAYED_HANDSHAKES {
                let (d, f) = round_trips(e, delay).await?;
                dialer.push(d);
                first.push(f);
            }
            s.push([
                us,
                dialer_bytes as f64,
                listener_bytes as f64,
                median(dialer),
                median(first),
            ]);
        }
    }
    let figures = samples.map(|s| {
        let col = |i: usize| median(s.iter().map(|r| r[i]).collect());
        Figures {
            us: col(0),
            bytes: (col(1), col(2)),
            dialer_rtt: col(3),
            first_byte_rtt: col(4),
        }
    });
    Ok(Measured {
        figures,
        wall_clock,
    })
}

impl Measured {
    fn rows(&self, n: usize, delay: Duration) -> Vec<Row> {
        let [hy, cl, cl_half, no] = self.figures;
        // Classical TLS with the certificate checks libp2p's verifier makes, on both ends: the
        // listener's measured, the dialer's taken to cost the same (the same checks on the same
        // kind of certificate).
        let cl_checked = (2.0 * cl_half.us - cl.us).max(cl.us);
        let clock = if self.wall_clock {
            "wall time of sequential handshakes"
        } else {
            "CPU"
        };
        let total = |f: &Figures| f.bytes.0 + f.bytes.1;
        let d_ms = delay.as_secs_f64() * 1e3;
        let scope = format!(
            "security handshake only, {d_ms:.0} ms one-way delay; multistream-select not included"
        );
        let what = format!("{clock} per hybrid TLS 1.3 handshake (X25519MLKEM768, both ends)");
        vec![
            Row {
                id: "B7",
                what: what.clone(),
                value: hy.us,
                unit: "us",
                ratio: Some(hy.us / no.us),
                baseline: Some(format!("classical Noise XX {:.0} us (n = {n})", no.us)),
            },
            Row {
                id: "B7",
                what,
                value: hy.us,
                unit: "us",
                ratio: Some(hy.us / cl_checked),
                baseline: Some(format!(
                    "classical TLS 1.3 (X25519 only) with libp2p's certificate checks {cl_checked:.0} us \
                     (est.: listener checks measured, dialer's assumed equal); \
                     without them {:.0} us",
                    cl.us
                )),
            },
            Row {
                id: "B7",
                what: "bytes per hybrid TLS 1.3 handshake (dialer + listener)".into(),
                value: total(&hy),
                unit: "B",
                ratio: Some(total(&hy) / total(&cl)),
                baseline: Some(format!(
                    "classical TLS {:.0} B (dialer {:.0} + listener {:.0}; hybrid {:.0} + {:.0}); Noise XX {:.0} B",
                    total(&cl),
                    cl.bytes.0,
                    cl.bytes.1,
                    hy.bytes.0,
                    hy.bytes.1,
                    total(&no)
                )),
            },
            Row {
                id: "B7",
                what: "round trips until the dialer may send (hybrid TLS 1.3)".into(),
                value: hy.dialer_rtt,
                unit: "RTT",
                ratio: None,
                baseline: Some(format!(
                    "classical TLS {}, Noise XX {}; {scope}",
                    cl.dialer_rtt, no.dialer_rtt
                )),
            },
            Row {
                id: "B7",
                what: "round trips until the first app byte reaches the listener (hybrid TLS)"
                    .into(),
                value: hy.first_byte_rtt,
                unit: "RTT",
                ratio: None,
                baseline: Some(format!(
                    "classical TLS {}, Noise XX {}; {scope}",
                    cl.first_byte_rtt, no.first_byte_rtt
                )),
            },
        ]
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// CPU time of the calling thread in nanoseconds (user + system), from
/// `/proc/thread-self/schedstat`; `None` where that is unavailable. The kernel brings that
/// figure up to date only when the thread passes through the scheduler, so it yields first
/// (without that, the figure lags by up to a scheduler tick).
fn thread_cpu_ns() -> Option<u64> {
    std::thread::yield_now();
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Both ends' configs for one kind, built once (as a swarm builds its transport) and cloned
/// for every connection.
enum Ends {
    Tls {
        listener: PqTlsConfig,
        dialer: PqTlsConfig,
    },
    Noise {
        listener: Box<libp2p::noise::Config>,
        dialer: Box<libp2p::noise::Config>,
    },
}

impl Ends {
    fn new(kind: Kind) -> Result<Self> {
        let (kl, kd) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
        let strict = |k: &Keypair| PqTlsConfig::new(k, KxPolicy::Strict, LinkRegistry::default());
        Ok(match kind {
            Kind::HybridTls => Ends::Tls {
                listener: strict(&kl)?,
                dialer: strict(&kd)?,
            },
            Kind::ClassicalTls => Ends::Tls {
                listener: PqTlsConfig::classical_only(&kl)?,
                dialer: PqTlsConfig::classical_only(&kd)?,
            },
            Kind::ClassicalTlsListenerChecks => Ends::Tls {
                listener: PqTlsConfig::new(&kl, KxPolicy::Compat, LinkRegistry::default())?,
                dialer: PqTlsConfig::classical_only(&kd)?,
            },
            Kind::NoiseXx => Ends::Noise {
                listener: Box::new(libp2p::noise::Config::new(&kl)?),
                dialer: Box::new(libp2p::noise::Config::new(&kd)?),
            },
        })
    }

    /// One handshake: the dialer upgrades `dialer_io`, the listener `listener_io`,
    /// concurrently. With `first_byte`, the dialer then sends one application byte and the
    /// listener reads it.
    async fn handshake<L, D>(&self, listener_io: L, dialer_io: D, first_byte: bool) -> Result<Done>
    where
        L: AsyncRead + AsyncWrite + Send + Unpin + 'static,
        D: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let listener = async {
            let mut io: Io = match self {
                Ends::Tls { listener, .. } => Box::new(
                    listener
                        .clone()
                        .upgrade_inbound(listener_io, "/tls/1.0.0")
                        .await?
                        .1,
                ),
                Ends::Noise { listener, .. } => Box::new(
                    (**listener)
                        .clone()
                        .upgrade_inbound(listener_io, "/noise")
                        .await?
                        .1,
                ),
            };
            let mut got = None;
            if first_byte {
                let mut b = [0u8; 1];
                io.read_exact(&mut b).await?;
                got = Some(Instant::now());
            }
            anyhow::Ok((io, got))
        };
        let dialer = async {
            let mut io: Io = match self {
                Ends::Tls { dialer, .. } => Box::new(
                    dialer
                        .clone()
                        .upgrade_outbound(dialer_io, "/tls/1.0.0")
                        .await?
                        .1,
                ),
                Ends::Noise { dialer, .. } => Box::new(
                    (**dialer)
                        .clone()
                        .upgrade_outbound(dialer_io, "/noise")
                        .await?
                        .1,
                ),
            };
            let ready = Instant::now();
            if first_byte {
                io.write_all(b"x").await?;
                io.flush().await?;
            }
            anyhow::Ok((io, ready))
        };
        let (l, d) = futures::join!(listener, dialer);
        let ((listener, first_byte_at), (dialer, dialer_ready)) = (l?, d?);
        Ok(Done {
            _streams: (listener, dialer),
            dialer_ready,
            first_byte_at,
        })
    }
}

trait AsyncRw: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> AsyncRw for T {}
type Io = Box<dyn AsyncRw>;

/// A completed handshake.
struct Done {
    /// Kept open until the caller drops them.
    _streams: (Io, Io),
    dialer_ready: Instant,
    first_byte_at: Option<Instant>,
}

/// `n` connected loopback TCP pairs (listener end, dialer end), Nagle off.
async fn tcp_pairs(n: usize) -> Result<Vec<(tokio::net::TcpStream, tokio::net::TcpStream)>> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let mut pairs = Vec::with_capacity(n);
    for _ in 0..n {
        let (accepted, connected) =
            tokio::join!(listener.accept(), tokio::net::TcpStream::connect(addr));
        let (accepted, connected) = (accepted?.0, connected?);
        accepted.set_nodelay(true)?;
        connected.set_nodelay(true)?;
        pairs.push((accepted, connected));
    }
    Ok(pairs)
}

/// µs of this thread's CPU (wall time as a fallback) per handshake, over `n` sequential
/// handshakes on connections set up beforehand.
async fn cpu_per_handshake(ends: &Ends, n: usize) -> Result<f64> {
    let pairs = tcp_pairs(n).await?;
    let mut done = Vec::with_capacity(n);
    let (cpu0, t0) = (thread_cpu_ns(), Instant::now());
    for (l, d) in pairs {
        done.push(ends.handshake(TcpStream(l), TcpStream(d), false).await?);
    }
    let (cpu1, wall) = (thread_cpu_ns(), t0.elapsed());
    drop(done);
    let us = match (cpu0, cpu1) {
        (Some(a), Some(b)) => b.saturating_sub(a) as f64 / 1e3,
        _ => wall.as_secs_f64() * 1e6,
    };
    Ok(us / n as f64)
}

/// Bytes written by the dialer and by the listener during one handshake.
async fn bytes_per_handshake(ends: &Ends) -> Result<(u64, u64)> {
    let (l, d) = tcp_pairs(1).await?.pop().context("no connection")?;
    let (l, d) = (Counting::new(TcpStream(l)), Counting::new(TcpStream(d)));
    let (lw, dw) = (l.written.clone(), d.written.clone());
    let _done = ends.handshake(l, d, false).await?;
    Ok((dw.load(Relaxed), lw.load(Relaxed)))
}

/// One handshake over a link that delays each direction by `delay`: (round trips until the
/// dialer may send, round trips until its first byte reaches the listener), each rounded to
/// the nearest half.
async fn round_trips(ends: &Ends, delay: Duration) -> Result<(f64, f64)> {
    let (l, d) = delayed_pair(delay).await?;
    let t0 = Instant::now();
    let done = ends.handshake(TcpStream(l), TcpStream(d), true).await?;
    let rtt = |t: Instant| {
        let x = t.duration_since(t0).as_secs_f64() / (2.0 * delay.as_secs_f64());
        (x * 2.0).round() / 2.0
    };
    let first = done.first_byte_at.context("first byte not timed")?;
    Ok((rtt(done.dialer_ready), rtt(first)))
}

/// A connected (listener end, dialer end) pair whose bytes pass through a relay that
/// delivers each chunk `delay` after it was sent, in both directions (writes never wait: the
/// link is pipelined, like a long wire). TCP setup itself is not delayed.
async fn delayed_pair(delay: Duration) -> Result<(tokio::net::TcpStream, tokio::net::TcpStream)> {
    let (server_side, relay_to_server) = tcp_pairs(1).await?.pop().context("no connection")?;
    let (relay_to_dialer, dialer_side) = tcp_pairs(1).await?.pop().context("no connection")?;
    let (sr, sw) = relay_to_server.into_split();
    let (dr, dw) = relay_to_dialer.into_split();
    tokio::spawn(pump(dr, sw, delay));
    tokio::spawn(pump(sr, dw, delay));
    Ok((server_side, dialer_side))
}

/// Copies `from` to `to`, each chunk `delay` after it was read.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Duration,
) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let writer = tokio::spawn(async move {
        while let Some((at, chunk)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    });
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if tx
                    .send((tokio::time::Instant::now() + delay, buf[..n].to_vec()))
                    .is_err()
                {
                    break;
                }
            }
        }
    }
    drop(tx);
    let _ = writer.await;
}

/// Counts the bytes written through it.
struct Counting<S> {
    inner: S,
    written: Arc<AtomicU64>,
}

impl<S> Counting<S> {
    fn new(inner: S) -> Self {
        Self {
            inner,
            written: Arc::default(),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counting<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut [u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counting<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let res = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &res {
            self.written.fetch_add(*n as u64, Relaxed);
        }
        res
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_close(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_close(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The benchmark machinery works end to end (no timing is asserted).
    #[tokio::test]
    async fn b7_reports_cpu_bytes_and_round_trips() {
        let rows = b7_with(1, 3, Duration::from_millis(5)).await.unwrap();
        assert_eq!(rows.len(), 5, "{rows:#?}");
        for r in &rows {
            assert_eq!(r.id, "B7");
            assert!(r.value.is_finite() && r.value > 0.0, "{r:?}");
            if let Some(x) = r.ratio {
                assert!(x.is_finite() && x > 0.0, "{r:?}");
            }
        }
        // The hybrid key shares (1,184 + 1,088 bytes) make the hybrid handshake bigger than
        // the classical one (32 + 32): a byte count, not a timing.
        assert!(rows[2].ratio.unwrap() > 1.0, "{:?}", rows[2]);
    }
}
