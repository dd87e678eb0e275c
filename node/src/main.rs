//! `blazedb`: run a node, talk to a running node, benchmark, check and repair stores.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use libp2p::Multiaddr;
use serde_json::Value;

use blazedb_node::store::{panic_message, Store, StoreError, VIEW_FILE};
use blazedb_node::{api, bench, node, Node, NodeConfig, DEFAULT_NAMESPACE};

/// mimalloc instead of glibc's malloc: ops are allocated on the actor's threads and freed on
/// the materializer's, a pattern glibc serves poorly (its free-list consolidation was ~15% of
/// B3's profile). Built with `no_thp` (node/Cargo.toml): no huge-page hint on its arenas, whose
/// first-touch zeroing of whole 2 MiB pages was 41% of the B3 window (ARCHITECTURE.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// How long mimalloc keeps memory freed by the program before giving it back to the kernel
/// (its default: 1 s). Under load the node frees and reallocates large buffers all the time
/// (375 KB batches, their copies in gossipsub, decode and compression buffers); with the
/// default, memory given back was soon faulted in and zeroed again: 0.9–1.05M page faults in
/// one `bench --only b2i,b3 --ops 1000000`, against ~0.38M at 10 s, and 6–8% less CPU for
/// the whole run (ARCHITECTURE.md, the mimalloc decision). Idle, the memory still goes back,
/// 10 s later. `MIMALLOC_PURGE_DELAY` in the environment overrides it.
const ALLOC_PURGE_DELAY_MS: std::ffi::c_long = 10_000;

/// mimalloc's `mi_option_purge_delay` (`mimalloc.h`, v3: the 16th option), which
/// `libmimalloc-sys` does not name.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Sets [`ALLOC_PURGE_DELAY_MS`] unless the environment chose a delay.
#[allow(unsafe_code)]
fn set_alloc_purge_delay() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: `mi_option_set` only stores an integer in mimalloc's option table; any
        // option id below `_mi_option_last` and any value are valid, and mimalloc reads the
        // option atomically wherever it purges.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, ALLOC_PURGE_DELAY_MS) };
    }
}

#[derive(Parser)]
#[command(
    name = "blazedb",
    version,
    about = "BlazeDB: a peer-to-peer mesh sync node"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args, Clone)]
struct ApiArgs {
    /// Address of the node's HTTP API.
    #[arg(
        long,
        global = true,
        env = "BLAZEDB_API",
        default_value = "127.0.0.1:7700"
    )]
    api: String,
    /// Namespace.
    #[arg(long, global = true, default_value = DEFAULT_NAMESPACE)]
    ns: String,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a node (works with no flags).
    Node {
        /// Data directory (key file and store).
        #[arg(long, default_value = "blazedb-data")]
        data: PathBuf,
        /// p2p listen address (repeatable).
        #[arg(long, default_value = "/ip4/0.0.0.0/tcp/7701")]
        listen: Vec<Multiaddr>,
        /// HTTP API address.
        #[arg(long, default_value = "127.0.0.1:7700")]
        api: SocketAddr,
        /// Peer to dial at start (repeatable).
        #[arg(long)]
        bootstrap: Vec<Multiaddr>,
        /// Do not discover peers on the local network.
        #[arg(long)]
        no_mdns: bool,
        /// Do not join the public `default` namespace.
        #[arg(long)]
        no_default_namespace: bool,
        /// Link key exchange: `strict` (hybrid X25519MLKEM768 only) or `compat` (also accept
        /// classical X25519; not post-quantum secure).
        #[arg(long, default_value = "strict")]
        pq_policy: blazedb_crypto::KxPolicy,
        /// Fetch windows in flight per (namespace, author) while catching up (1 = one at a
        /// time).
        #[arg(long, default_value_t = blazedb_protocol::EngineConfig::default().fetch_stripes)]
        fetch_stripes: u32,
        /// Longest a local write is held for others to join its batch, in milliseconds
        /// (adaptive: no delay when idle; 0 never waits).
        #[arg(long, default_value_t = 2)]
        batch_max_delay_ms: u64,
        /// One batch per write call (no coalescing of concurrent writers).
        #[arg(long)]
        no_coalesce: bool,
        /// Size in MiB at which record changes held in memory are written into the view file
        /// (under sustained ingest up to about four times this is held).
        #[arg(long, default_value_t = (blazedb_node::materializer::STAGED_FLUSH_BYTES >> 20) as u64,
              value_parser = clap::value_parser!(u64).range(1..=65536))]
        view_delta_mb: u64,
        /// The log's background check: MiB of stored batches re-verified per second at
        /// most (0: none). A damaged batch is logged and counted
        /// (`blazedb_scrub_damaged_total`).
        #[arg(long, default_value_t = 8)]
        scrub_mb_per_s: u64,
        /// Seconds after the start before the scrub's first pass.
        #[arg(long, default_value_t = 600)]
        scrub_after_s: u64,
        /// Least seconds from one scrub pass's start to the next one's.
        #[arg(long, default_value_t = 86_400)]
        scrub_every_s: u64,
    },
    /// Show a running node's identity, peers and namespaces.
    Status {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Upsert fields of a record: `blazedb put users ada '{"name":"Ada"}'`.
    Put {
        collection: String,
        key: String,
        /// JSON object of fields.
        fields: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Print a record.
    Get {
        collection: String,
        key: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Delete a record.
    Del {
        collection: String,
        key: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// List records of a collection.
    Ls {
        collection: String,
        #[arg(long, default_value = "")]
        prefix: String,
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Stream changes of a namespace as they happen.
    Watch {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Owned namespaces and capabilities.
    Ns {
        #[command(subcommand)]
        cmd: NsCmd,
    },
    /// Run the standard benchmarks and print a table.
    Bench(bench::BenchArgs),
    /// Simulate a mesh with the deterministic simulator.
    Sim(blazedb_node::sim::SimArgs),
    /// Verify a store: every batch re-verified, every chain contiguous.
    Check {
        #[arg(long, default_value = "blazedb-data")]
        data: PathBuf,
    },
    /// Rebuild the records (derived state) from the change log.
    Repair {
        #[arg(long, default_value = "blazedb-data")]
        data: PathBuf,
        /// Remove each damaged batch from the log with the rest of its chain (peers that
        /// hold them send them again; what no peer holds is lost).
        #[arg(long)]
        cut_damaged: bool,
    },
    /// Copy the log (the truth: every batch, namespaces, capabilities, revocations) into a
    /// new file, consistent at one point: a running node's through its API while it runs
    /// on, or a stopped node's with `--data`. The copy is verified before it gets its name.
    Backup {
        /// The file to write (it must not exist).
        file: PathBuf,
        /// Back up the stopped node in this data directory instead of asking a running one.
        #[arg(long)]
        data: Option<PathBuf>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Shrink a stopped node's files: the free pages of the log and the view let go.
    Compact {
        #[arg(long, default_value = "blazedb-data")]
        data: PathBuf,
    },
    /// Make a data directory from a backup: the log verified, the records made from it.
    Restore {
        /// The backup file (`blazedb backup`).
        file: PathBuf,
        /// The data directory to make (it must not hold a store).
        #[arg(long, default_value = "blazedb-data")]
        data: PathBuf,
        /// No peer can hold more of this node's chains than the backup: its writes need not
        /// wait for a peer to tell (without it, each namespace waits for one, so that a
        /// chain that went on after the backup is not forked).
        #[arg(long)]
        alone: bool,
    },
}

#[derive(Subcommand)]
enum NsCmd {
    /// Create a namespace owned by a fresh key (kept in the node's data directory).
    Create {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Issue a capability to another node's did:key; prints the token to give it.
    Invite {
        /// Namespace id.
        #[arg(value_name = "NS")]
        namespace: String,
        /// The invitee's did:key (see `blazedb status` on its node).
        #[arg(long)]
        to: String,
        #[arg(long, group = "rights")]
        read: bool,
        #[arg(long, group = "rights")]
        write: bool,
        #[arg(long, group = "rights")]
        admin: bool,
        /// Limit to records whose "collection/key" starts with this.
        #[arg(long)]
        prefix: Option<String>,
        /// Validity, from now: e.g. 30m, 12h, 7d.
        #[arg(long)]
        expires: Option<String>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Join a namespace with a token issued to this node.
    Join {
        token: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Revoke a token (and everything delegated from it) by its id.
    Revoke {
        /// Namespace id.
        #[arg(value_name = "NS")]
        namespace: String,
        /// Token id (printed by `ns invite`).
        token_id: String,
        #[command(flatten)]
        api: ApiArgs,
    },
}

fn parse_duration_ms(s: &str) -> Result<u64> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .with_context(|| format!("bad duration {s:?} (like 30m, 12h, 7d)"))?;
    let mult = match unit {
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => bail!("bad duration {s:?}: unit must be s, m, h or d"),
    };
    n.checked_mul(mult).context("duration too long")
}

fn main() -> std::process::ExitCode {
    set_alloc_purge_delay();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,libp2p=warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(run(cli)));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One clear line (with its causes), not a backtrace.
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Node {
            data,
            listen,
            api,
            bootstrap,
            no_mdns,
            no_default_namespace,
            pq_policy,
            fetch_stripes,
            batch_max_delay_ms,
            no_coalesce,
            view_delta_mb,
            scrub_mb_per_s,
            scrub_after_s,
            scrub_every_s,
        } => {
            let batching = blazedb_node::BatchingConfig {
                coalesce: !no_coalesce,
                max_delay: std::time::Duration::from_millis(batch_max_delay_ms),
                ..Default::default()
            };
            let mut cfg = NodeConfig {
                batching,
                data_dir: data,
                listen,
                bootstrap,
                mdns: !no_mdns,
                default_namespace: !no_default_namespace,
                pq_policy,
                ..NodeConfig::default()
            };
            cfg.engine.fetch_stripes = fetch_stripes.max(1);
            cfg.view_delta_bytes = (view_delta_mb as usize) << 20;
            cfg.scrub = blazedb_node::ScrubConfig {
                bytes_per_sec: scrub_mb_per_s.saturating_mul(1 << 20),
                first_after: Duration::from_secs(scrub_after_s),
                every: Duration::from_secs(scrub_every_s),
            };
            run_node(cfg, api).await
        }
        Cmd::Status { api } => print(client_get(&api, "/v1/status").await?),
        Cmd::Put {
            collection,
            key,
            fields,
            api,
        } => {
            let v: Value = serde_json::from_str(&fields).context("fields must be a JSON object")?;
            if !v.is_object() {
                bail!("fields must be a JSON object, like '{{\"name\": \"Ada\"}}'");
            }
            let path = record_path(&api, &collection, &key);
            print(client_send(reqwest::Method::PUT, &api, &path, Some(v)).await?)
        }
        Cmd::Get {
            collection,
            key,
            api,
        } => print(client_get(&api, &record_path(&api, &collection, &key)).await?),
        Cmd::Del {
            collection,
            key,
            api,
        } => {
            let path = record_path(&api, &collection, &key);
            print(client_send(reqwest::Method::DELETE, &api, &path, None).await?)
        }
        Cmd::Ls {
            collection,
            prefix,
            limit,
            api,
        } => {
            let path = format!(
                "/v1/ns/{}/{}?prefix={}&limit={limit}",
                enc(&api.ns),
                enc(&collection),
                enc(&prefix)
            );
            print(client_get(&api, &path).await?)
        }
        Cmd::Watch { api } => watch(&api).await,
        Cmd::Ns { cmd } => match cmd {
            NsCmd::Create { api } => {
                print(client_send(reqwest::Method::POST, &api, "/v1/ns", None).await?)
            }
            NsCmd::Invite {
                namespace: ns,
                to,
                read,
                write,
                admin,
                prefix,
                expires,
                api,
            } => {
                let rights = match (read, write, admin) {
                    (_, _, true) => "admin",
                    (_, true, _) => "write",
                    (true, _, _) => "read",
                    _ => bail!("say which rights: --read, --write or --admin"),
                };
                let expires_at_ms = match expires {
                    Some(e) => {
                        let now = std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)?
                            .as_millis() as u64;
                        Some(now + parse_duration_ms(&e)?)
                    }
                    None => None,
                };
                let body = serde_json::json!({
                    "to": to, "rights": rights, "prefix": prefix, "expires_at_ms": expires_at_ms
                });
                let path = format!("/v1/ns/{}/invites", enc(&ns));
                print(client_send(reqwest::Method::POST, &api, &path, Some(body)).await?)
            }
            NsCmd::Join { token, api } => {
                let body = serde_json::json!({ "token": token.trim() });
                print(client_send(reqwest::Method::POST, &api, "/v1/ns/join", Some(body)).await?)
            }
            NsCmd::Revoke {
                namespace: ns,
                token_id,
                api,
            } => {
                let body = serde_json::json!({ "token_id": token_id });
                let path = format!("/v1/ns/{}/revocations", enc(&ns));
                print(client_send(reqwest::Method::POST, &api, &path, Some(body)).await?)
            }
        },
        Cmd::Bench(args) => bench::run(args).await,
        Cmd::Sim(args) => tokio::task::block_in_place(|| blazedb_node::sim::main(args)),
        Cmd::Check { data } => check(&data),
        Cmd::Repair { data, cut_damaged } => repair(&data, cut_damaged),
        Cmd::Backup { file, data, api } => backup(&file, data.as_deref(), &api).await,
        Cmd::Restore { file, data, alone } => restore(&file, &data, alone),
        Cmd::Compact { data } => compact(&data),
    }
}

/// `blazedb check`: the log, then the view. Damage gets an error naming the file and what
/// to do, never a panic (redb panics on some damaged pages: caught and reported).
fn check(data: &std::path::Path) -> Result<()> {
    let path = existing_store(data)?;
    let view = path.with_file_name(VIEW_FILE);
    let (store, view_damage) = match open_for_reading(&path, &view) {
        Ok(store) => (store, None),
        Err(e @ StoreError::ViewDamaged { .. }) => {
            // The log is verified all the same.
            let store = open_log_alone(&path).map_err(|e| opening(e, &path))?;
            (store, Some(e))
        }
        Err(e) => return Err(opening(e, &path)),
    };
    let result = (|| {
        let n = caught(&path, || store.check().map_err(Into::into)).context(LOG_DAMAGED)?;
        println!("ok: {n} batches verified, chains contiguous");
        if let Some(e) = view_damage {
            return Err(e.into());
        }
        if let Some(why) = store.view_failed()? {
            bail!(
                "updating the view file {} failed while the node ran ({why}): the next start \
                 (or `blazedb repair`) makes it again from the log",
                view.display()
            );
        }
        let heads = store.heads()?;
        if let Some(chain) = store.view_ahead_of_log(&heads)? {
            return Err(StoreError::ViewAheadOfLog(chain).into());
        }
        let (table, runs, in_runs) = caught(&view, || store.check_view().map_err(Into::into))
            .context(
                "the view (records derived from the log) is damaged: `blazedb repair` rebuilds it",
            )?;
        println!("ok: view: {table} records in the table, {in_runs} in {runs} runs beside it, all decode");
        Ok(())
    })();
    drop(store);
    result
}

/// Opens the store at `log` with its view at `view` for reading only, so that checking or
/// copying it changes neither file; where only opening it for writing can read it (redb's
/// recovery after a crash, an older layout), opens it so and says why on stderr.
fn open_for_reading(log: &std::path::Path, view: &std::path::Path) -> Result<Store, StoreError> {
    match quietly(|| Store::open_read_only(log, view)) {
        Err(StoreError::NotReadOnly(why)) => {
            eprintln!("note: {why}; opened for writing");
            quietly(|| Store::open_at(log, view))
        }
        other => other,
    }
}

/// [`open_for_reading`] the log at `log` beside an empty scratch view of its own (in the
/// temporary directory, unlinked at once: gone when the store is), for what reads the log
/// alone: verifying it beside a damaged view, copying it, checking a copy.
fn open_log_alone(log: &std::path::Path) -> Result<Store, StoreError> {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let scratch = std::env::temp_dir().join(format!(
        "blazedb-scratch-view-{}-{}.redb",
        std::process::id(),
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let opened = quietly(|| Store::create_view_file(&scratch))
        .and_then(|()| open_for_reading(log, &scratch));
    let _ = std::fs::remove_file(&scratch);
    opened
}

/// An error opening the store at `log`: damage to the log says what that means.
fn opening(e: StoreError, log: &std::path::Path) -> anyhow::Error {
    if e.is_locked() {
        return anyhow::anyhow!(
            "{}: a node is running on this data directory: stop it first",
            log.display()
        );
    }
    let log_damaged = matches!(&e, StoreError::File { path, .. } if path == log) && e.is_damage();
    match log_damaged {
        true => anyhow::Error::from(e).context(LOG_DAMAGED),
        false => e.into(),
    }
}

const LOG_DAMAGED: &str = "the log (store.redb, the truth) is damaged: `blazedb repair` cannot \
     fix that; restore it from a backup (`blazedb restore FILE --data NEW_DIR`, then move this \
     directory's node.key there)";

/// `blazedb repair`: the records made again from the log, in a fresh view file (the old one
/// is set aside first, so damage in it cannot stop the rebuild, and put back if the log
/// itself turns out damaged).
fn repair(data: &std::path::Path, cut_damaged: bool) -> Result<()> {
    let path = existing_store(data)?;
    let view = path.with_file_name(VIEW_FILE);
    let aside = path.with_file_name(format!("{VIEW_FILE}.old"));
    let had_view = view.exists();
    if had_view {
        std::fs::rename(&view, &aside)
            .with_context(|| format!("moving {} aside", view.display()))?;
    }
    let put_back = || {
        if had_view {
            let _ = std::fs::rename(&aside, &view);
        }
    };
    let store = match quietly(|| Store::open(&path)) {
        Ok(store) => store,
        Err(e) => {
            put_back();
            return Err(opening(e, &path));
        }
    };
    let damaged = match caught(&path, || store.damaged_batches().map_err(Into::into)) {
        Ok(d) => d,
        Err(e) => {
            drop(store);
            put_back();
            return Err(e).context(LOG_DAMAGED);
        }
    };
    if !damaged.is_empty() && !cut_damaged {
        drop(store);
        put_back();
        let list: Vec<String> = damaged.iter().map(|d| format!("  {d}")).collect();
        bail!(
            "the log has damaged batches (the first of each chain):\n{}\n`blazedb repair \
             --cut-damaged` removes each with the rest of its chain: peers that hold them send \
             them again, and what no peer holds is lost",
            list.join("\n")
        );
    }
    let own = blazedb_identity::Keypair::load(&node::key_path(data))
        .ok()
        .map(|k| *k.public().as_bytes());
    for d in &damaged {
        let removed = store.cut_chain(&d.ns, &d.author, d.seq)?;
        if Some(d.author) == own {
            // Its next write there must follow what its peers hold.
            store.mark_own_chain_cut(&d.ns)?;
        }
        println!("cut {removed} batches from {d}");
    }
    let n = caught(&path, || store.check().map_err(Into::into)).context(LOG_DAMAGED)?;
    let records = store.rebuild_records()?;
    store.clear_view_failed()?;
    drop(store);
    if had_view {
        std::fs::remove_file(&aside).with_context(|| format!("removing {}", aside.display()))?;
    }
    println!("rebuilt {records} records from {n} batches");
    Ok(())
}

/// `blazedb backup`: the copy is written beside `file` (`FILE.part`), verified as `blazedb
/// check` verifies a log, fsynced, and only then renamed to `file`.
async fn backup(
    file: &std::path::Path,
    data: Option<&std::path::Path>,
    api: &ApiArgs,
) -> Result<()> {
    if file.exists() {
        bail!(
            "{} exists: name a new file (a backup never replaces one)",
            file.display()
        );
    }
    let mut part = file.as_os_str().to_owned();
    part.push(".part");
    let part = PathBuf::from(part);
    if part.exists() {
        bail!(
            "{} exists (a backup that stopped half way?): remove it first",
            part.display()
        );
    }
    let made = match data {
        Some(dir) => {
            let path = existing_store(dir)?;
            // Only the log is copied (the node's view may be damaged, and is not needed).
            let store = open_log_alone(&path).map_err(|e| match e.is_locked() {
                true => anyhow::anyhow!(
                    "a node is running on {}: back it up through its API (leave out --data)",
                    dir.display()
                ),
                false => opening(e, &path),
            })?;
            caught(&path, || store.backup_log(&part, true).map_err(Into::into)).map(|_| ())
        }
        None => download_backup(api, &part).await,
    };
    let verified = made.and_then(|()| {
        open_log_alone(&part)
            .map_err(anyhow::Error::from)
            .and_then(|store| caught(&part, || store.check().map_err(Into::into)))
            .context("the copy does not verify: no backup was made")
    });
    let batches = match verified {
        Ok(n) => n,
        Err(e) => {
            let _ = std::fs::remove_file(&part);
            return Err(e);
        }
    };
    std::fs::File::open(&part)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("syncing {}", part.display()))?;
    std::fs::rename(&part, file).with_context(|| format!("naming {}", file.display()))?;
    sync_dir(file);
    let bytes = std::fs::metadata(file).map(|m| m.len()).unwrap_or(0);
    println!(
        "backup: {} ({batches} batches, {bytes} bytes), verified",
        file.display()
    );
    Ok(())
}

/// `GET /v1/backup` into `part` (a new file).
async fn download_backup(api: &ApiArgs, part: &std::path::Path) -> Result<()> {
    use tokio::io::AsyncWriteExt;
    let url = format!("{}/v1/backup", base_url(api));
    // No overall timeout: a large log takes as long as it takes; a dead link still ends.
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .read_timeout(Duration::from_secs(600))
        .build()?;
    let resp = client.get(&url).send().await.with_context(|| {
        format!(
            "cannot reach a node at {} (is `blazedb node` running?)",
            api.api
        )
    })?;
    let status = resp.status();
    if !status.is_success() {
        let v: Value = resp.json().await.unwrap_or(Value::Null);
        let msg = v["error"]["message"].as_str().unwrap_or("unknown error");
        bail!("{status}: {msg}");
    }
    let mut out = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(part)
        .await
        .with_context(|| format!("creating {}", part.display()))?;
    let mut resp = resp;
    let written = async {
        while let Some(chunk) = resp.chunk().await.context("the node's answer broke off")? {
            out.write_all(&chunk)
                .await
                .with_context(|| format!("writing {}", part.display()))?;
        }
        out.flush().await?;
        anyhow::Ok(())
    }
    .await;
    if written.is_err() {
        let _ = std::fs::remove_file(part);
    }
    written
}

/// `blazedb restore`: the backup copied into the data directory under a passing name,
/// verified, its records made in a fresh view, then both files named as a node expects;
/// anything wrong leaves the directory as it was.
fn restore(file: &std::path::Path, data: &std::path::Path, alone: bool) -> Result<()> {
    let log = node::store_path(data);
    let view = log.with_file_name(VIEW_FILE);
    if log.exists() {
        bail!(
            "{} already holds a store: restore into an empty data directory (nothing was \
             changed)",
            data.display()
        );
    }
    if view.exists() {
        bail!(
            "{} holds a view file without its log: remove {} first (nothing was changed)",
            data.display(),
            view.display()
        );
    }
    if !file.is_file() {
        bail!("no backup file at {}", file.display());
    }
    std::fs::create_dir_all(data).with_context(|| format!("creating {}", data.display()))?;
    let log_part = data.join("store.redb.restoring");
    let view_part = data.join(format!("{VIEW_FILE}.restoring"));
    let remove_parts = || {
        let _ = std::fs::remove_file(&log_part);
        let _ = std::fs::remove_file(&view_part);
    };
    remove_parts();
    let restored = (|| {
        std::fs::copy(file, &log_part)
            .with_context(|| format!("copying {} into {}", file.display(), data.display()))?;
        let store = quietly(|| Store::open_at(&log_part, &view_part))
            .map_err(anyhow::Error::from)
            .context("the backup is not a log BlazeDB can open: nothing was restored")?;
        let batches = caught(&log_part, || store.check().map_err(Into::into))
            .context("the backup is damaged: nothing was restored")?;
        let records = store.rebuild_records()?;
        if alone {
            store.clear_own_chain_doubts()?;
        }
        drop(store);
        for f in [&log_part, &view_part] {
            std::fs::File::open(f)
                .and_then(|f| f.sync_all())
                .with_context(|| format!("syncing {}", f.display()))?;
        }
        // The log first: a view without its log would stop the node from starting.
        std::fs::rename(&log_part, &log)?;
        std::fs::rename(&view_part, &view)?;
        sync_dir(&log);
        anyhow::Ok((batches, records))
    })();
    let (batches, records) = match restored {
        Ok(r) => r,
        Err(e) => {
            remove_parts();
            return Err(e);
        }
    };
    println!(
        "restored {batches} batches ({records} records) into {}",
        data.display()
    );
    if !node::key_path(data).exists() {
        println!(
            "put the node's node.key into {} to keep its identity (capabilities name it; \
             without it the node starts with a new one), and its namespaces/*.key (the owner \
             keys of namespaces it created): secrets, not in the backup",
            data.display()
        );
    }
    if !alone {
        println!(
            "with its own identity, the node writes in a namespace once a peer has told it what \
             it holds of the node's own chain there (it may have gone on after the backup); \
             restore with --alone if no peer can hold more"
        );
    }
    Ok(())
}

/// `blazedb compact`: both files of a stopped node compacted; sizes before and after.
fn compact(data: &std::path::Path) -> Result<()> {
    let path = existing_store(data)?;
    let view = path.with_file_name(VIEW_FILE);
    let size = |p: &std::path::Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    let before = (size(&path), size(&view));
    let mut store = quietly(|| Store::open(&path)).map_err(|e| opening(e, &path))?;
    caught(&path, || store.compact().map_err(Into::into))
        .context("compacting the store (its files are as a commit left them: nothing is lost)")?;
    drop(store);
    let after = (size(&path), size(&view));
    println!(
        "compacted: log {} -> {} bytes, view {} -> {} bytes",
        before.0, after.0, before.1, after.1
    );
    Ok(())
}

/// fsyncs the directory holding `file`, so that a rename into it lasts.
fn sync_dir(file: &std::path::Path) {
    if let Some(dir) = file.parent() {
        let dir = if dir.as_os_str().is_empty() {
            std::path::Path::new(".")
        } else {
            dir
        };
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
}

/// Runs `f` with panic messages silenced: redb panics on some damaged pages, and where
/// that is caught (here, or in [`Store::open`]) the error says so instead.
fn quietly<T>(f: impl FnOnce() -> T) -> T {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    std::panic::set_hook(hook);
    r.unwrap_or_else(|p| std::panic::resume_unwind(p))
}

/// Runs `f`, turning a panic inside it (redb panics on some damaged pages) into an error
/// naming `file`, without the panic's message on stderr.
fn caught<T>(file: &std::path::Path, f: impl FnOnce() -> Result<T>) -> Result<T> {
    quietly(|| std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))).unwrap_or_else(|p| {
        bail!(
            "{}: redb cannot read a damaged page ({})",
            file.display(),
            panic_message(p.as_ref())
        )
    })
}

fn existing_store(data: &std::path::Path) -> Result<PathBuf> {
    let path = node::store_path(data);
    if !path.exists() {
        bail!("no store at {} (is --data right?)", path.display());
    }
    Ok(path)
}

async fn run_node(cfg: NodeConfig, api_addr: SocketAddr) -> Result<()> {
    // Bind the API first: a port clash is reported before anything else starts.
    let listener = api::bind(api_addr)
        .await
        .with_context(|| format!("binding the HTTP API on {api_addr} (use --api HOST:PORT)"))?;
    let handle = Node::builder().config(cfg).spawn().await?;
    for a in handle.listen_addrs() {
        tracing::info!("p2p listening on {a}/p2p/{}", handle.peer_id());
    }
    tracing::info!("HTTP API on http://{}", listener.local_addr()?);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(api::serve(handle.clone(), listener, async {
        let _ = stop_rx.await;
    }));
    shutdown_signal().await;
    tracing::info!("shutting down");
    let _ = stop_tx.send(());
    let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
    handle.shutdown().await;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}

fn enc(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn record_path(api: &ApiArgs, collection: &str, key: &str) -> String {
    format!("/v1/ns/{}/{}/{}", enc(&api.ns), enc(collection), enc(key))
}

fn base_url(api: &ApiArgs) -> String {
    if api.api.starts_with("http://") || api.api.starts_with("https://") {
        api.api.trim_end_matches('/').to_string()
    } else {
        format!("http://{}", api.api)
    }
}

async fn client_get(api: &ApiArgs, path: &str) -> Result<Value> {
    client_send(reqwest::Method::GET, api, path, None).await
}

async fn client_send(
    method: reqwest::Method,
    api: &ApiArgs,
    path: &str,
    body: Option<Value>,
) -> Result<Value> {
    let url = format!("{}{path}", base_url(api));
    let client = reqwest::Client::new();
    let mut req = client
        .request(method, &url)
        .timeout(Duration::from_secs(30));
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.with_context(|| {
        format!(
            "cannot reach a node at {} (is `blazedb node` running?)",
            api.api
        )
    })?;
    let status = resp.status();
    let v: Value = resp
        .json()
        .await
        .context("node answered with something other than JSON")?;
    if !status.is_success() {
        let msg = v["error"]["message"].as_str().unwrap_or("unknown error");
        bail!("{status}: {msg}");
    }
    Ok(v)
}

fn print(v: Value) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(())
}

async fn watch(api: &ApiArgs) -> Result<()> {
    use futures::StreamExt;
    let url = format!("{}/v1/ns/{}/events", base_url(api), enc(&api.ns));
    let resp = reqwest::Client::new()
        .get(&url)
        .send()
        .await
        .with_context(|| format!("cannot reach a node at {}", api.api))?;
    if !resp.status().is_success() {
        let v: Value = resp.json().await.unwrap_or_default();
        bail!(
            "{}",
            v["error"]["message"].as_str().unwrap_or("request failed")
        );
    }
    let mut stream = resp.bytes_stream();
    let mut buf = String::new();
    while let Some(chunk) = stream.next().await {
        buf.push_str(&String::from_utf8_lossy(&chunk?));
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            for line in event.lines() {
                if let Some(data) = line.strip_prefix("data:") {
                    println!("{}", data.trim());
                }
            }
        }
    }
    Ok(())
}
