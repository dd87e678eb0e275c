//! Black-box tests across BlazeDB crates: multi-node convergence, crash/restart, bad input
//! from HTTP clients and from peers. Every test starts real nodes over real loopback sockets
//! with real redb files; nothing is mocked.
//!
//! This library holds the shared helpers; the tests live in `tests/`.

use std::future::Future;
use std::path::Path;
use std::time::{Duration, Instant};

use blazedb_node::{Node, NodeHandle};
use blazedb_protocol::EngineConfig;
use libp2p::Multiaddr;

/// Engine settings for tests: quick anti-entropy so catch-up does not wait for the default
/// interval.
pub fn fast_engine() -> EngineConfig {
    EngineConfig {
        anti_entropy_interval_ms: 300,
        fetch_timeout_ms: 2_000,
        ..Default::default()
    }
}

/// Loopback, any port.
pub fn loopback() -> Multiaddr {
    "/ip4/127.0.0.1/tcp/0".parse().expect("valid multiaddr")
}

/// Logs to the test output when `RUST_LOG` is set (once per test binary).
pub fn init_logs() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}

/// Starts a node in `dir` on loopback, mDNS off, dialing `bootstrap`.
pub async fn start_node(dir: &Path, bootstrap: &[Multiaddr]) -> anyhow::Result<NodeHandle> {
    init_logs();
    let mut b = Node::builder()
        .data_dir(dir)
        .listen(vec![loopback()])
        .mdns(false)
        .engine(fast_engine());
    for a in bootstrap {
        b = b.bootstrap(a.clone());
    }
    b.spawn().await
}

/// A counter from a `/metrics` text (panics naming it if it is missing).
pub fn metric(text: &str, name: &str) -> u64 {
    metric_as(text, name)
}

/// A counter with a fractional value (seconds) from a `/metrics` text.
pub fn metric_f64(text: &str, name: &str) -> f64 {
    metric_as(text, name)
}

fn metric_as<T: std::str::FromStr>(text: &str, name: &str) -> T {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} missing from /metrics"))
}

/// The text of `GET {base}/metrics` (`base`: an API's URL, as [`serve_api`] returns).
pub async fn scrape_metrics(base: &str) -> String {
    reqwest::get(format!("{base}/metrics"))
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("/metrics body")
}

/// Serves `node`'s HTTP API on a loopback port; returns its base URL.
pub async fn serve_api(node: &NodeHandle) -> String {
    let listener = blazedb_node::api::bind("127.0.0.1:0".parse().expect("valid address"))
        .await
        .expect("binding a loopback port");
    let base = format!("http://{}", listener.local_addr().expect("bound address"));
    tokio::spawn(blazedb_node::api::serve(
        node.clone(),
        listener,
        std::future::pending(),
    ));
    base
}

/// Polls `check` until it returns `Some`, or fails after `timeout` naming `what`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Waits until `node` has at least `n` connected peers.
pub async fn wait_peers(node: &NodeHandle, n: usize) {
    eventually("peers to connect", Duration::from_secs(20), || async {
        let s = node.status().await.ok()?;
        (s.peers.len() >= n).then_some(())
    })
    .await
}

/// Every record of `collection` in `default`, for comparing replicas.
pub fn snapshot(
    node: &NodeHandle,
    collection: &str,
) -> Vec<(String, serde_json::Map<String, serde_json::Value>)> {
    node.list("default", collection, "", 10_000).expect("list")
}

/// JSON object literal helper.
pub fn obj(v: serde_json::Value) -> serde_json::Map<String, serde_json::Value> {
    v.as_object().expect("object").clone()
}
