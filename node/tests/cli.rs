//! The built `blazedb` binary: two `blazedb node` processes with their own data directories
//! and ports; a `PUT` on one appears on the other through its API; both stop cleanly on
//! SIGTERM. Also the client subcommands against a running node.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_blazedb");

struct Proc {
    child: Child,
    api: String,
    p2p: String,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `blazedb node` on ephemeral loopback ports, mDNS off (`--data` follows).
const NODE: &[&str] = &[
    "node",
    "--no-mdns",
    "--listen",
    "/ip4/127.0.0.1/tcp/0",
    "--api",
    "127.0.0.1:0",
];

/// Starts `blazedb node` on ephemeral ports and reads the bound addresses from its log.
fn start(data: &std::path::Path, bootstrap: Option<&str>) -> Proc {
    start_with(data, bootstrap, &[])
}

/// [`start`] with more arguments for `blazedb node`.
fn start_with(data: &std::path::Path, bootstrap: Option<&str>, extra: &[&str]) -> Proc {
    let mut cmd = Command::new(BIN);
    cmd.args(NODE)
        .args(extra)
        .arg("--data")
        .arg(data)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some(b) = bootstrap {
        cmd.args(["--bootstrap", b]);
    }
    let mut child = cmd.spawn().expect("spawn blazedb node");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let (mut api, mut p2p) = (None, None);
    let deadline = Instant::now() + Duration::from_secs(30);
    while api.is_none() || p2p.is_none() {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx
            .recv_timeout(left)
            .expect("node did not report its addresses");
        if let Some(rest) = line.split("HTTP API on http://").nth(1) {
            api = Some(rest.trim().to_string());
        }
        if let Some(rest) = line.split("p2p listening on ").nth(1) {
            p2p = Some(rest.trim().to_string());
        }
    }
    // Keep draining the log so the child never blocks on a full pipe.
    std::thread::spawn(move || while rx.recv().is_ok() {});
    Proc {
        child,
        api: api.unwrap(),
        p2p: p2p.unwrap(),
    }
}

fn cli(api: &str, args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .args(["--api", api])
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// `blazedb check` on a stopped node's data directory must pass.
fn check_store(data: &std::path::Path, when: &str) {
    let out = Command::new(BIN)
        .args(["check", "--data"])
        .arg(data)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "check {when}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn sigterm_and_wait(mut p: Proc) {
    let status = Command::new("kill")
        .arg("-TERM")
        .arg(p.child.id().to_string())
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(st) = p.child.try_wait().unwrap() {
            assert!(st.success(), "node exited with {st} on SIGTERM");
            return;
        }
        assert!(Instant::now() < deadline, "node did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn two_processes_replicate_through_the_api() {
    let dir = tempfile::tempdir().unwrap();
    let a = start(&dir.path().join("a"), None);
    let b = start(&dir.path().join("b"), Some(&a.p2p));

    let out = cli(
        &a.api,
        &["put", "users", "ada", r#"{"name":"Ada","langs":["en"]}"#],
    );
    assert!(
        out.status.success(),
        "put failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let deadline = Instant::now() + Duration::from_secs(30);
    let record = loop {
        let out = cli(&b.api, &["get", "users", "ada"]);
        if out.status.success() {
            break serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap();
        }
        assert!(Instant::now() < deadline, "record never reached node B");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(record["fields"]["name"], "Ada");
    assert_eq!(record["fields"]["langs"][0], "en");

    // The other client subcommands, against B.
    let out = cli(&b.api, &["ls", "users"]);
    assert!(out.status.success());
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed["records"][0]["key"], "ada");
    let out = cli(&b.api, &["status"]);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(status["did"].as_str().unwrap().starts_with("did:key:z6Mk"));
    assert_eq!(status["peers"].as_array().unwrap().len(), 1);
    assert_eq!(status["peers"][0]["transport"], "tcp");
    assert_eq!(status["peers"][0]["key_exchange"], "X25519MLKEM768");
    let out = cli(&b.api, &["del", "users", "ada"]);
    assert!(out.status.success());
    let out = cli(&b.api, &["get", "users", "ada"]);
    assert!(!out.status.success(), "deleted record still readable");
    assert!(String::from_utf8_lossy(&out.stderr).contains("no such record"));

    // Bad CLI input: a clear error, non-zero exit.
    let out = cli(&a.api, &["put", "users", "x", "[1]"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("JSON object"));

    // Owned namespaces through the CLI: create on A, invite B (scoped write), join, write on
    // B, read on A; a write outside the scope is refused with a one-line error.
    let json = |out: std::process::Output| -> serde_json::Value {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let ns = json(cli(&a.api, &["ns", "create"]))["ns"]
        .as_str()
        .unwrap()
        .to_string();
    let did_b = status["did"].as_str().unwrap().to_string();
    let inv = json(cli(
        &a.api,
        &[
            "ns", "invite", &ns, "--to", &did_b, "--write", "--prefix", "docs/",
        ],
    ));
    let token = inv["token"].as_str().unwrap().to_string();
    assert_eq!(
        json(cli(&b.api, &["ns", "join", &token]))["ns"],
        ns.as_str()
    );
    json(cli(
        &b.api,
        &["put", "docs", "readme", r#"{"title":"hello"}"#, "--ns", &ns],
    ));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = cli(&a.api, &["get", "docs", "readme", "--ns", &ns]);
        if out.status.success() {
            break;
        }
        assert!(Instant::now() < deadline, "B's write never reached A");
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = cli(&b.api, &["put", "other", "x", "{}", "--ns", &ns]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("403") && err.contains("scope"), "{err}");
    assert_eq!(
        err.lines().count(),
        1,
        "errors are one line, not a backtrace: {err}"
    );

    sigterm_and_wait(b);
    sigterm_and_wait(a);

    // The stores are consistent after the shutdown.
    for n in ["a", "b"] {
        check_store(&dir.path().join(n), n);
    }
}

#[test]
fn client_without_a_node_fails_clearly() {
    // A port nobody listens on.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    drop(l);
    let out = cli(&addr, &["status"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach a node"));
}

#[test]
fn node_refuses_a_bad_key_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("node.key"), b"garbage").unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            dir.path().join("node.key"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
    }
    let out = Command::new(BIN)
        .args(NODE)
        .arg("--data")
        .arg(dir.path())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("32-byte"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Acknowledged means durable: writers keep several writes in flight (so the log committer
/// has work queued behind each fsync), the node is killed with SIGKILL in the middle of it,
/// and every write that was acknowledged before the kill is there after a restart; the store
/// checks clean.
#[test]
fn acknowledged_writes_survive_sigkill() {
    const WRITERS: usize = 6;
    const KILL_AFTER: usize = 60;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("n");
    let mut node = start(&data, None);
    let acked = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let threads: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (api, acked, stop) = (node.api.clone(), acked.clone(), stop.clone());
            std::thread::spawn(move || {
                for i in 0.. {
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        break;
                    }
                    let key = format!("w{w}-{i:04}");
                    let out = cli(&api, &["put", "crash", &key, r#"{"v":1}"#]);
                    if !out.status.success() {
                        break; // the node is gone
                    }
                    acked.lock().unwrap().push(key);
                }
            })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(120);
    while acked.lock().unwrap().len() < KILL_AFTER {
        assert!(Instant::now() < deadline, "writes were not acknowledged");
        std::thread::sleep(Duration::from_millis(5));
    }
    // SIGKILL: no shutdown path runs.
    node.child.kill().unwrap();
    node.child.wait().unwrap();
    let acked_before_kill: Vec<String> = acked.lock().unwrap().clone();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    drop(node);

    let node = start(&data, None);
    for key in &acked_before_kill {
        let out = cli(&node.api, &["get", "crash", key]);
        assert!(
            out.status.success(),
            "acknowledged write {key} lost after SIGKILL: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    sigterm_and_wait(node);
    check_store(&data, "after SIGKILL");
}

/// Runs `blazedb ARGS` to its end (killed after 60 s: a node that should have refused to
/// start and did not fails the test); returns whether it succeeded and its stderr.
fn run_to_end(args: &[&str], data: &std::path::Path) -> (bool, String) {
    let mut child = Command::new(BIN)
        .args(args)
        .arg("--data")
        .arg(data)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut stderr, &mut s).unwrap();
        s
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("blazedb {args:?} did not end");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stderr = reader.join().unwrap();
    assert!(
        !stderr.contains("panicked"),
        "blazedb {args:?} panicked: {stderr}"
    );
    (status.success(), stderr)
}

/// Damage to a stopped node's files, as a failing disk or an operator might cause it:
/// `blazedb check` names the damaged file and what to do, never panics; a damaged view is
/// set aside at start and the records come back whole from the log; a view ahead of its log
/// (the log replaced by an older copy, or lost) stops the start, with no log made in the
/// directory, until `blazedb repair` makes the records again from the log as it is.
#[test]
fn damaged_stores_get_clear_errors_and_lose_nothing_logged() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("n");
    let (log, view) = (data.join("store.redb"), data.join("records.redb"));
    let put = |node: &Proc, key: &str| {
        let out = cli(&node.api, &["put", "docs", key, r#"{"v":1}"#]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let node = start(&data, None);
    for k in ["k0", "k1", "k2"] {
        put(&node, k);
    }
    sigterm_and_wait(node);
    let older_log = dir.path().join("older-store.redb");
    std::fs::copy(&log, &older_log).unwrap();
    let node = start(&data, None);
    for k in ["k3", "k4"] {
        put(&node, k);
    }
    sigterm_and_wait(node);

    // The view cut in half.
    let len = std::fs::metadata(&view).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&view)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let (ok, err) = run_to_end(&["check"], &data);
    assert!(!ok);
    assert!(
        err.contains("records.redb is damaged") && err.contains("blazedb repair"),
        "{err}"
    );
    let node = start(&data, None);
    for k in ["k0", "k1", "k2", "k3", "k4"] {
        let out = cli(&node.api, &["get", "docs", k]);
        assert!(out.status.success(), "{k} lost with the view");
    }
    sigterm_and_wait(node);
    assert!(data.join("records.redb.damaged").exists());
    check_store(&data, "after the view was made again");

    // The log replaced by the copy taken after three writes: the view is ahead of it.
    std::fs::copy(&older_log, &log).unwrap();
    for args in [&["check"][..], NODE] {
        let (ok, err) = run_to_end(args, &data);
        assert!(!ok, "{args:?} accepted a view ahead of its log");
        assert!(
            err.contains("holds changes that the log does not")
                && err.contains("applied through seq 5, the log holds 3")
                && err.contains("blazedb repair"),
            "{args:?}: {err}"
        );
    }
    // The log lost: the node makes none in its place before refusing.
    std::fs::remove_file(&log).unwrap();
    let (ok, err) = run_to_end(NODE, &data);
    assert!(!ok && err.contains("the log holds 0"), "{err}");
    assert!(!log.exists(), "a refused start left a new log behind");
    // The operator's choice: the older log, and the records made again from it.
    std::fs::copy(&older_log, &log).unwrap();
    let (ok, err) = run_to_end(&["repair"], &data);
    assert!(ok, "{err}");
    let node = start(&data, None);
    for (k, held) in [("k0", true), ("k2", true), ("k3", false), ("k4", false)] {
        let out = cli(&node.api, &["get", "docs", k]);
        assert_eq!(out.status.success(), held, "{k}");
    }
    put(&node, "k5");
    let out = cli(&node.api, &["get", "docs", "k5"]);
    assert!(
        out.status.success(),
        "a write after the repair is not read back"
    );
    sigterm_and_wait(node);
    check_store(&data, "after the repair");

    // Every page of the view but its header overwritten: redb panics reading it (caught:
    // check reports it, the node sets the file aside and makes the records again).
    let mut bytes = std::fs::read(&view).unwrap();
    bytes[4096..].fill(0xff);
    std::fs::write(&view, bytes).unwrap();
    let (ok, err) = run_to_end(&["check"], &data);
    assert!(!ok && err.contains("records.redb is damaged"), "{err}");
    let node = start(&data, None);
    for k in ["k0", "k1", "k2", "k5"] {
        let out = cli(&node.api, &["get", "docs", k]);
        assert!(out.status.success(), "{k} lost with the view's pages");
    }
    sigterm_and_wait(node);
    check_store(&data, "after the view's pages were made again");
}

/// Flips one bit in the last byte of the first piece of the batch at chain position `nth`
/// (0-based, the log's chain order) of a stopped node's log.
fn damage_logged_batch(log: &std::path::Path, nth: usize) {
    use blazedb_node::store::{BATCHES, CHAINS};
    use redb::{ReadableDatabase, ReadableTable};
    let db = redb::Database::create(log).unwrap();
    let id: Vec<u8> = {
        let txn = db.begin_read().unwrap();
        let chains = txn.open_table(CHAINS).unwrap();
        let entry = chains.iter().unwrap().nth(nth).unwrap().unwrap();
        entry.1.value().to_vec()
    };
    let txn = db.begin_write().unwrap();
    {
        let mut batches = txn.open_table(BATCHES).unwrap();
        let key = [id.as_slice(), &0u16.to_be_bytes()].concat();
        let mut piece = batches
            .get(key.as_slice())
            .unwrap()
            .unwrap()
            .value()
            .to_vec();
        *piece.last_mut().unwrap() ^= 0x04;
        batches.insert(key.as_slice(), piece.as_slice()).unwrap();
    }
    txn.commit().unwrap();
}

/// Retries `put` until the node takes it (it may answer 503 while it settles its own
/// chain); returns the receipt's seq.
fn put_when_taken(node: &Proc, key: &str) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = cli(&node.api, &["put", "docs", key, r#"{"v":1}"#]);
        if out.status.success() {
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            return v["seq"].as_u64().unwrap();
        }
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("503"), "{err}");
        assert!(Instant::now() < deadline, "never taken: {err}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A batch of a node's own chain damaged in its log: `blazedb repair` names it and, with
/// `--cut-damaged`, removes it and the rest of the chain; restarted beside a peer, the node
/// takes the chain back from it before it writes again, so its next write follows it.
#[test]
fn a_damaged_own_batch_is_cut_and_fetched_back_before_the_next_write() {
    let dir = tempfile::tempdir().unwrap();
    let (a_data, b_data) = (dir.path().join("a"), dir.path().join("b"));
    let a = start(&a_data, None);
    let b = start(&b_data, Some(&a.p2p));
    for i in 0..6 {
        let out = cli(&a.api, &["put", "docs", &format!("k{i}"), r#"{"v":1}"#]);
        assert!(out.status.success());
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while !cli(&b.api, &["get", "docs", "k5"]).status.success() {
        assert!(Instant::now() < deadline, "B never held A's writes");
        std::thread::sleep(Duration::from_millis(20));
    }
    sigterm_and_wait(a);
    damage_logged_batch(&a_data.join("store.redb"), 3);

    let (ok, err) = run_to_end(&["repair"], &a_data);
    assert!(
        !ok && err.contains("seq 4") && err.contains("--cut-damaged"),
        "{err}"
    );
    let (ok, err) = run_to_end(&["repair", "--cut-damaged"], &a_data);
    assert!(ok, "{err}");
    check_store(&a_data, "after the cut");

    let a = start(&a_data, Some(&b.p2p));
    assert_eq!(
        put_when_taken(&a, "after"),
        7,
        "A's write did not follow its chain"
    );
    for k in ["k3", "k4", "k5"] {
        assert!(
            cli(&a.api, &["get", "docs", k]).status.success(),
            "{k} not back at A"
        );
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while !cli(&b.api, &["get", "docs", "after"]).status.success() {
        assert!(
            Instant::now() < deadline,
            "B never held A's write after the cut"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    sigterm_and_wait(a);
    sigterm_and_wait(b);
    check_store(&a_data, "after the chain came back");
}

/// `POST /v1/ns/default/ops` with `body`; the answer must be a success.
fn post_ops(api: &str, body: &serde_json::Value) {
    use std::io::{Read, Write};
    let body = serde_json::to_vec(body).unwrap();
    let mut conn = std::net::TcpStream::connect(api).unwrap();
    write!(
        conn,
        "POST /v1/ns/default/ops HTTP/1.1\r\nHost: {api}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .unwrap();
    conn.write_all(&body).unwrap();
    let mut answer = String::new();
    conn.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

/// `put docs k{i} {"v":1}` for each `i` of `keys`; each must be taken.
fn put_docs(api: &str, keys: std::ops::Range<usize>) {
    for i in keys {
        let out = cli(api, &["put", "docs", &format!("k{i}"), r#"{"v":1}"#]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Runs `blazedb ARGS` (no `--api`): whether it succeeded, its stdout and its stderr.
fn run(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(
        !stderr.contains("panicked"),
        "blazedb {args:?} panicked: {stderr}"
    );
    (out.status.success(), stdout, stderr)
}

/// A backup taken through the API while a writer goes on is one point of the log: restored
/// into a new directory it holds every write acknowledged before the backup began, a prefix
/// of the writer's chain and nothing after it; the restored node (a new identity) writes at
/// once. A stopped node is backed up from its directory; a running one's directory is not
/// touched; an existing file is never replaced; a damaged backup restores nothing.
#[test]
fn a_backup_taken_while_writing_restores_one_point_of_the_log() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name);
    let s = |name: &str| p(name).to_str().unwrap().to_string();
    let a = start(&p("a"), None);
    put_docs(&a.api, 0..5);
    // A log of some size, so that the writer below goes on while the copy is made.
    for call in 0..20 {
        let ops: Vec<serde_json::Value> = (0..5000)
            .map(|i| {
                serde_json::json!({"op": "upsert", "collection": "bulk",
                    "key": format!("b{call}-{i}"), "fields": {"v": "x".repeat(40)}})
            })
            .collect();
        post_ops(&a.api, &serde_json::json!({ "ops": ops }));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicUsize::new(0));
    let writer = {
        let (api, stop, acked) = (a.api.clone(), stop.clone(), acked.clone());
        std::thread::spawn(move || {
            let mut i = 0;
            while !stop.load(Ordering::Acquire) {
                let out = cli(&api, &["put", "docs", &format!("w{i:05}"), r#"{"v":2}"#]);
                assert!(
                    out.status.success(),
                    "{}",
                    String::from_utf8_lossy(&out.stderr)
                );
                i += 1;
                acked.store(i, Ordering::Release);
            }
            i
        })
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked.load(Ordering::Acquire) < 3 {
        assert!(Instant::now() < deadline, "the writer made no progress");
        std::thread::sleep(Duration::from_millis(5));
    }
    let before = acked.load(Ordering::Acquire);
    let (ok, out, err) = run(&["backup", &s("b1.redb"), "--api", &a.api]);
    assert!(ok && out.contains("verified"), "{out}{err}");
    let after = acked.load(Ordering::Acquire);
    // Writes acknowledged after the backup returned cannot be in it.
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked.load(Ordering::Acquire) < after + 2 {
        assert!(Instant::now() < deadline, "the writer stopped");
        std::thread::sleep(Duration::from_millis(5));
    }
    stop.store(true, Ordering::Release);
    let written = writer.join().unwrap();

    let (ok, _, err) = run(&["backup", &s("b1.redb"), "--api", &a.api]);
    assert!(!ok && err.contains("exists"), "{err}");
    let (ok, _, err) = run(&["backup", &s("b2.redb"), "--data", &s("a")]);
    assert!(!ok && err.contains("a node is running"), "{err}");
    assert!(!p("b2.redb").exists() && !p("b2.redb.part").exists());

    let (ok, out, err) = run(&["restore", &s("b1.redb"), "--data", &s("r")]);
    assert!(ok, "{out}{err}");
    check_store(&p("r"), "after the restore");
    let (ok, _, err) = run(&["restore", &s("b1.redb"), "--data", &s("r")]);
    assert!(!ok && err.contains("already holds a store"), "{err}");

    let r = start(&p("r"), None);
    for i in 0..5 {
        assert!(cli(&r.api, &["get", "docs", &format!("k{i}")])
            .status
            .success());
    }
    let held: Vec<bool> = (0..written)
        .map(|i| {
            cli(&r.api, &["get", "docs", &format!("w{i:05}")])
                .status
                .success()
        })
        .collect();
    let n = held.iter().take_while(|h| **h).count();
    assert!(
        held[n..].iter().all(|h| !h),
        "the backup holds a gap in the writer's chain: {held:?}"
    );
    assert!(
        n >= before,
        "a write acknowledged before the backup is missing ({n} < {before})"
    );
    assert!(
        n <= after,
        "the backup holds a write acknowledged after it ({n} > {after})"
    );
    // A new identity: nothing of its own anywhere, so it writes at once.
    let out = cli(&r.api, &["put", "docs", "new", r#"{"v":3}"#]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    sigterm_and_wait(r);

    sigterm_and_wait(a);
    let (ok, out, err) = run(&["backup", &s("b2.redb"), "--data", &s("a")]);
    assert!(ok && out.contains("verified"), "{out}{err}");
    // A damaged backup: refused, and nothing is left in the directory.
    damage_logged_batch(&p("b2.redb"), 2);
    let (ok, _, err) = run(&["restore", &s("b2.redb"), "--data", &s("d")]);
    assert!(!ok && err.contains("the backup is damaged"), "{err}");
    let left: Vec<_> = std::fs::read_dir(p("d")).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");
}

/// A node restored from a backup with its own identity: its chain went on after the backup,
/// so alone it refuses writes (503, saying why) instead of forking it; beside a peer that
/// holds the rest, it takes it back and its next write follows it. Restored `--alone`, it
/// writes at once.
#[test]
fn a_node_restored_with_its_identity_waits_for_a_peer_and_follows_its_chain() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name);
    let s = |name: &str| p(name).to_str().unwrap().to_string();
    let a = start(&p("a"), None);
    let b = start(&p("b"), Some(&a.p2p));
    put_docs(&a.api, 0..5);
    let (ok, out, err) = run(&["backup", &s("a.bak"), "--api", &a.api]);
    assert!(ok, "{out}{err}");
    put_docs(&a.api, 5..8);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !cli(&b.api, &["get", "docs", "k7"]).status.success() {
        assert!(Instant::now() < deadline, "B never held A's writes");
        std::thread::sleep(Duration::from_millis(20));
    }
    sigterm_and_wait(a);

    for (dir, extra) in [("r", None), ("alone", Some("--alone"))] {
        let mut args = vec!["restore".to_string(), s("a.bak"), "--data".into(), s(dir)];
        args.extend(extra.map(String::from));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (ok, out, err) = run(&args);
        assert!(ok, "{out}{err}");
        std::fs::copy(p("a").join("node.key"), p(dir).join("node.key")).unwrap();
    }
    let r = start(&p("r"), None);
    let out = cli(&r.api, &["put", "docs", "early", r#"{"v":2}"#]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("503") && err.contains("backup"),
        "a restored node wrote before a peer told it what it holds: {err}"
    );
    sigterm_and_wait(r);
    let r = start(&p("r"), Some(&b.p2p));
    assert_eq!(
        put_when_taken(&r, "after"),
        9,
        "the write did not follow A's chain"
    );
    for i in 5..8 {
        assert!(cli(&r.api, &["get", "docs", &format!("k{i}")])
            .status
            .success());
    }
    sigterm_and_wait(r);
    sigterm_and_wait(b);
    check_store(&p("r"), "after the chain came back");

    let alone = start(&p("alone"), None);
    let out = cli(&alone.api, &["put", "docs", "solo", r#"{"v":3}"#]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    sigterm_and_wait(alone);
}

/// `blazedb check` and `blazedb backup --data` read a store without changing a byte of it;
/// a store its node left without closing it (SIGKILL) is recovered first, opened for
/// writing, and the check says so.
#[test]
fn check_and_an_offline_backup_change_nothing_in_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("n");
    let mut node = start(&data, None);
    put_docs(&node.api, 0..5);
    node.child.kill().unwrap();
    node.child.wait().unwrap();
    drop(node);
    let d = data.to_str().unwrap();
    let (ok, out, err) = run(&["check", "--data", d]);
    assert!(ok, "{out}{err}");
    assert!(err.contains("not closed cleanly"), "{err}");

    let files = || -> Vec<Vec<u8>> {
        ["store.redb", "records.redb"]
            .iter()
            .map(|f| std::fs::read(data.join(f)).unwrap())
            .collect()
    };
    let before = files();
    let (ok, out, err) = run(&["check", "--data", d]);
    assert!(ok && out.contains("5 batches verified"), "{out}{err}");
    assert!(!err.contains("note"), "{err}");
    let bak = dir.path().join("n.bak");
    let (ok, out, err) = run(&["backup", bak.to_str().unwrap(), "--data", d]);
    assert!(ok && out.contains("5 batches"), "{out}{err}");
    assert!(
        files() == before,
        "check or backup changed the store's files"
    );
}

/// `GET PATH` on the node's API; the answer's body.
fn http_get(api: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(api).unwrap();
    write!(
        conn,
        "GET {path} HTTP/1.1\r\nHost: {api}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    conn.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    answer
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_string()
}

/// The value of the Prometheus counter `name` in the node's `/metrics`.
fn counter(api: &str, name: &str) -> u64 {
    let text = http_get(api, "/metrics");
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} not in /metrics"))
}

/// The log's background scrub re-verifies every stored batch, a pass at a time: on a
/// sound log it counts every batch and no damage; a batch damaged on disk, which no peer
/// asks for, is found and counted, the rest of its chain passed over.
#[test]
fn the_scrub_finds_a_damaged_batch_nobody_asked_for() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("n");
    let scrub = [
        "--scrub-after-s",
        "0",
        "--scrub-every-s",
        "1",
        "--scrub-mb-per-s",
        "64",
    ];
    let node = start_with(&data, None, &scrub);
    put_docs(&node.api, 0..6);
    // A pass that began after the writes counts all six, and nothing damaged.
    let deadline = Instant::now() + Duration::from_secs(60);
    let passes = counter(&node.api, "blazedb_scrub_passes_total");
    while counter(&node.api, "blazedb_scrub_passes_total") < passes + 2 {
        assert!(Instant::now() < deadline, "no scrub pass ended");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(counter(&node.api, "blazedb_scrub_batches_total") >= 6);
    assert_eq!(counter(&node.api, "blazedb_scrub_damaged_total"), 0);
    sigterm_and_wait(node);

    damage_logged_batch(&data.join("store.redb"), 2);
    let node = start_with(&data, None, &scrub);
    let deadline = Instant::now() + Duration::from_secs(60);
    while counter(&node.api, "blazedb_scrub_damaged_total") == 0 {
        assert!(
            Instant::now() < deadline,
            "the scrub did not find the damage"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // One damaged batch per pass: the first of its chain (seq 3), the rest passed over.
    let passes = counter(&node.api, "blazedb_scrub_passes_total");
    let damaged = counter(&node.api, "blazedb_scrub_damaged_total");
    let deadline = Instant::now() + Duration::from_secs(60);
    while counter(&node.api, "blazedb_scrub_passes_total") < passes + 2 {
        assert!(Instant::now() < deadline, "no scrub pass ended");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (passes_after, damaged_after) = (
        counter(&node.api, "blazedb_scrub_passes_total"),
        counter(&node.api, "blazedb_scrub_damaged_total"),
    );
    assert!(
        damaged_after - damaged <= passes_after - passes + 1,
        "more than one damaged batch a pass: {damaged}..{damaged_after} over passes {passes}..{passes_after}"
    );
    sigterm_and_wait(node);
    let (ok, err) = run_to_end(&["check"], &data);
    assert!(!ok && err.contains("seq 3"), "{err}");
}

/// `blazedb compact` shrinks a stopped node's files (their free pages let go), after which
/// the store verifies and the node serves what it held; a running node's are refused.
#[test]
fn compact_shrinks_a_stopped_nodes_files_and_keeps_everything() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("n");
    let d = data.to_str().unwrap();
    let node = start(&data, None);
    for call in 0..10 {
        let ops: Vec<serde_json::Value> = (0..5000)
            .map(|i| {
                serde_json::json!({"op": "upsert", "collection": "bulk",
                    "key": format!("b{}", (call * 5000 + i) % 20_000), "fields": {"v": "y".repeat(40)}})
            })
            .collect();
        post_ops(&node.api, &serde_json::json!({ "ops": ops }));
    }
    let (ok, _, err) = run(&["compact", "--data", d]);
    assert!(!ok && err.contains("a node is running"), "{err}");
    sigterm_and_wait(node);
    let size = |f: &str| std::fs::metadata(data.join(f)).unwrap().len();
    let log_before = size("store.redb");
    let (ok, out, err) = run(&["compact", "--data", d]);
    assert!(ok && out.contains("compacted"), "{out}{err}");
    assert!(size("store.redb") < log_before, "{out}");
    check_store(&data, "after compact");
    let node = start(&data, None);
    let out = cli(&node.api, &["get", "bulk", "b19999"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    sigterm_and_wait(node);
}
