//! The redb stores: the change log (the truth) and the records derived from it.
//!
//! Two files, so that long record transactions never hold the log's write lock:
//! - the **log** (`store.redb`): [`BATCHES`] (batch id ++ piece index → envelope bytes, exactly
//!   as signed and received, in pieces of at most [`LOG_CHUNK_BYTES`]), [`CHAINS`]
//!   (`ns_len:u8 ns author:32 seq:u64be` → batch id; each author's chain per namespace,
//!   contiguous from seq 1), [`REVOCATIONS`], [`REVOKED_BY`],
//!   [`NAMESPACES`], [`META`] (`schema` = format version). Appended durably
//!   ([`Store::append_log`]) before a write is acknowledged.
//! - the **view** (`records.redb`): [`RECORDS`] (`ns_len:u8 ns coll_len:u8 coll key` → CBOR
//!   [`RecordState`], the join of every effective op in the log), up to [`MAX_RUNS`] sorted
//!   runs beside it ([`RUNS`], listed in [`RUN_LIST`]: deltas a flush appended instead of
//!   putting them among a large table's records, folded in later a key range at a time; a
//!   record is the join of its states in all of them) and
//!   [`APPLIED`] (per chain, the highest seq applied), updated together by [`Store::apply`]
//!   and [`Store::flush_frozen`]. Derived: it can lag the log (see `materializer`), and
//!   [`Store::rebuild_records`] recomputes it from the log.
//!
//! Table names carry a version; `docs/design.md` gives the byte layout.

use std::collections::BTreeMap;
use std::hash::BuildHasher;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use crate::delta_map::{prefetch, prefetch_lines, DeltaMap, Updated};
use crate::materializer::Unstaged;
use crate::run_filter::RunFilter;
use redb::{
    Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition, TableHandle,
};

use blazedb_protocol::batch::{BatchHeader, Envelope};
use blazedb_protocol::capability::TokenId;
use blazedb_protocol::codec::{OpView, PayloadView};
use blazedb_protocol::{
    record_codec, BatchId, Dict, DictRef, DictSet, Hlc, RecordState, VerifiedBatch,
};

/// Batch id (32 bytes) ++ chunk index (u16 big-endian) → that piece of the envelope bytes
/// (every piece [`LOG_CHUNK_BYTES`] long but the last). Read back whole by [`batch_bytes`].
pub const BATCHES: TableDefinition<'_, &[u8], &[u8]> = TableDefinition::new("batches-v2");
/// The log of schema 2: batch id → envelope bytes, one value each (moved into [`BATCHES`]
/// when such a store is opened).
const BATCHES_V1: TableDefinition<'_, &[u8], &[u8]> = TableDefinition::new("batches-v1");

/// The largest piece of a batch's bytes stored as one value. redb gives a value its own page
/// of the next power of two above it, zero-filled and written whole: a 375 KB batch of 5k W
/// ops took a 512 KiB page, and redb wrote 1.46 bytes per byte of batch. Pieces that fit a
/// 32 KiB page bring that to 1.13, and the committer's CPU per 375 KB transaction down by
/// 22–30% (990–1,760 against 690–1,370 µs, a scratch program against redb 4.6, 1,000
/// transactions each, three alternating runs).
pub const LOG_CHUNK_BYTES: usize = 32_000;

/// The key of piece `chunk` of batch `id` (an id of the wrong length, which only a damaged
/// chain entry could give, makes a key that finds nothing).
fn chunk_key(id: &[u8], chunk: u16) -> [u8; 34] {
    let mut k = [0u8; 34];
    let n = id.len().min(32);
    k[..n].copy_from_slice(&id[..n]);
    k[32..].copy_from_slice(&chunk.to_be_bytes());
    k
}

/// Stores `bytes` as batch `id`'s pieces.
fn put_batch(
    table: &mut redb::Table<'_, &[u8], &[u8]>,
    id: &[u8],
    bytes: &[u8],
) -> Result<(), StoreError> {
    for (i, piece) in bytes.chunks(LOG_CHUNK_BYTES).enumerate() {
        let i = u16::try_from(i)
            .map_err(|_| StoreError::Corrupt("batch too large for the log".into()))?;
        table.insert(chunk_key(id, i).as_slice(), piece)?;
    }
    Ok(())
}

/// Runs `f`, taking a panic inside it for damage: redb panics on some damaged pages (its
/// allocator state, a B-tree page) rather than returning an error. (The panic's message
/// still goes to the panic hook: `blazedb check` silences it.)
fn unpanicked<T>(f: impl FnOnce() -> Result<T, StoreError>) -> Result<T, StoreError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|p| {
        Err(StoreError::Redb(redb::Error::Corrupted(format!(
            "redb cannot read a damaged page: {}",
            panic_message(p.as_ref())
        ))))
    })
}

/// A caught panic's message (empty if it carried none).
pub fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_default()
}

/// The ids of the held dictionaries whose id starts with `r` (the table's keys are ids).
fn dict_ids(txn: &redb::ReadTransaction, r: DictRef) -> Vec<blazedb_protocol::DictId> {
    let Ok(table) = txn.open_table(DICTS) else {
        return Vec::new();
    };
    let Ok(range) = table.range(&r.0[..]..) else {
        return Vec::new();
    };
    range
        .map_while(|e| e.ok())
        .map_while(|(k, _)| {
            let k = k.value();
            (k.starts_with(&r.0)).then(|| <[u8; 32]>::try_from(k).ok())
        })
        .flatten()
        .map(blazedb_protocol::DictId)
        .collect()
}

/// A damaged batch in the log ([`Store::damaged_batches`]): the first of its chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogDamage {
    /// Namespace.
    pub ns: String,
    /// Author key.
    pub author: [u8; 32],
    /// Its position in the chain.
    pub seq: u64,
    /// What is wrong with it.
    pub why: String,
}

impl std::fmt::Display for LogDamage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let author = blazedb_identity::PublicKey::from_bytes(&self.author)
            .map_or_else(|_| hex::encode(self.author), |a| a.to_did());
        write!(
            f,
            "namespace {}, author {author}, seq {}: {}",
            self.ns, self.seq, self.why
        )
    }
}

/// Where a scrub of the log ([`Store::scrub_step`]) goes on from. A new one starts a pass at
/// the log's beginning.
#[derive(Clone, Debug, Default)]
pub struct ScrubCursor {
    /// The chain key of the last entry passed.
    after: Option<Vec<u8>>,
    /// The last batch checked sound: (namespace, author, seq, id), to link the next to.
    prev: Option<(String, [u8; 32], u64, BatchId)>,
}

/// What one [`Store::scrub_step`] found.
#[derive(Clone, Debug, Default)]
pub struct ScrubStep {
    /// Batches checked sound.
    pub batches: u64,
    /// Bytes of stored batches read.
    pub bytes: usize,
    /// Damaged batches found (the first of each chain).
    pub damaged: Vec<LogDamage>,
    /// The pass reached the log's end.
    pub done: bool,
}

/// Checks the logged batch `id` at chain position `at` (namespace, author, seq), as read
/// from `batches`: whole, verified (signature and all), and linked to `chained` (the seq and
/// id of the batch before it in its chain, if the walk met it). Says what is wrong.
fn verify_logged(
    batches: &impl ReadableTable<&'static [u8], &'static [u8]>,
    dicts: &DictSet,
    (ns, author, seq): (&str, &[u8; 32], u64),
    id: &[u8],
    chained: Option<(u64, BatchId)>,
    read: &mut usize,
) -> Result<BatchId, String> {
    let bytes = batch_bytes(batches, id)
        .map_err(|e| e.to_string())?
        .ok_or("the batch is missing")?;
    *read += bytes.len();
    let vb = blazedb_protocol::batch::verify_with(bytes, dicts).map_err(|e| e.to_string())?;
    if vb.id.0 != id || vb.header.ns != ns || vb.header.author != *author {
        return Err("batch/chain mismatch".to_string());
    }
    let expected_prev = match chained {
        Some((pseq, _)) if pseq + 1 != seq => return Err("a gap before it".into()),
        Some((_, pid)) => Some(pid),
        None if seq != 1 => return Err("the chain starts there".into()),
        None => None,
    };
    if vb.header.prev != expected_prev || vb.header.seq != seq {
        return Err("broken prev link".into());
    }
    Ok(vb.id)
}

/// At most how many logged batches [`Store::apply_unapplied`] applies at a time.
pub const UNAPPLIED_WINDOW_BATCHES: u32 = 4096;
/// About how many bytes of logged batches [`Store::apply_unapplied`] reads at a time.
/// A start that makes the view again from a log of 1M W ops (200 batches of 5k, 36 MB)
/// peaked at 478 MB with 2 MiB windows, 720 MB with 8 MiB, 1.31 GB holding the whole
/// backlog (as before), in about the same time (5.4–8 s, noisy).
pub const UNAPPLIED_WINDOW_BYTES: usize = 2 << 20;
/// The staged delta's size (the store's estimate) at which [`Store::apply_unapplied`]
/// writes it into the view file: half the node's default flush size, so that a replay's
/// peak stays below what the windows applied straight to the file reached (1M W ops: 450
/// MB at 128 MiB, 502 MB at 256 MiB, 1.51 against 1.69 s).
const REPLAY_FLUSH_BYTES: usize = 128 << 20;

/// Which batches [`Store::chain_range`] and [`Store::serve_range`] read: `author`'s in
/// namespace `ns` from `from_seq`, at most `limit` and about `max_bytes` (always at least
/// one if there is one), ending before the first whose `hlc_max` reaches `until`.
#[derive(Clone, Copy, Debug)]
pub struct ChainRange<'a> {
    /// Namespace.
    pub ns: &'a str,
    /// Author key.
    pub author: &'a [u8; 32],
    /// First seq.
    pub from_seq: u64,
    /// At most this many batches.
    pub limit: u32,
    /// About this many bytes.
    pub max_bytes: usize,
    /// Before the first batch whose `hlc_max` reaches it.
    pub until: Option<Hlc>,
}

/// Batch `id`'s envelope bytes, its pieces joined (`None` if the log does not hold it).
pub(crate) fn batch_bytes(
    table: &impl ReadableTable<&'static [u8], &'static [u8]>,
    id: &[u8],
) -> Result<Option<Vec<u8>>, StoreError> {
    let (first, last) = (chunk_key(id, 0), chunk_key(id, u16::MAX));
    let mut out: Option<Vec<u8>> = None;
    for (n, entry) in table.range(first.as_slice()..=last.as_slice())?.enumerate() {
        let (k, v) = entry?;
        if k.value()[32..] != (n as u16).to_be_bytes() {
            return Err(StoreError::Corrupt(format!(
                "batch {} is missing a piece",
                hex::encode(id)
            )));
        }
        out.get_or_insert_with(Vec::new)
            .extend_from_slice(v.value());
    }
    Ok(out)
}

/// `ns_len:u8 ns author:32 seq:u64be` → batch id (32 bytes).
pub const CHAINS: TableDefinition<'_, &[u8], &[u8]> = TableDefinition::new("chains-v1");
/// `ns_len:u8 ns coll_len:u8 coll key` → `RecordState` in the compact layout of
/// [`blazedb_protocol::record_codec`].
pub const RECORDS: TableDefinition<'_, &[u8], &[u8]> = TableDefinition::new("records-v2");
/// A flush splices its delta into the records' table only while the delta's keys that fall
/// among the file's (not past its last key) number less than this fraction (1/n) of the
/// file's records (and fewer than [`RUN_MIN_RECORDS`]); more are folded and written as a run
/// ([`flush_mode`]). redb has no replace-in-place for a cursor: a record the file holds is
/// removed and inserted again, and each removal makes the next step seek from the tree's
/// root; a new key inserted among the file's copies its leaf. 632k W records into a file of
/// 630k–870k took 4.5–5.7 s spliced against 1.5–2.0 s written in order into a fresh table
/// (ARCHITECTURE.md); 1.2M new random keys into a file of 6.8M took 28 s spliced. Keys past
/// the file's last key (appends: time series, sequential ids) are cheap to splice however
/// many, and do not count.
const REWRITE_DELTA_FRACTION: u64 = 10;
/// [`Store::counts`] walks the file's keys in order instead of looking each delta key up when
/// the delta holds at least this fraction (1/n) of as many keys as the file.
const COUNT_WALK_FRACTION: u64 = 8;
/// The view tables of earlier versions (serde/CBOR record states): dropped at open, after
/// which every logged batch counts as unapplied and is applied again (the view is derived).
const OLD_VIEW_TABLES: [&str; 2] = ["records-v1", "applied-v1"];
/// Metadata: `schema` → format version.
pub const META: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("meta-v1");
/// [`META`]'s key prefix marking a namespace where this node's own chain was cut
/// ([`Store::mark_own_chain_cut`]).
const OWN_CHAIN_CUT: &str = "own-chain-cut/";
/// [`META`]'s key marking the view to be made again ([`Store::mark_view_failed`]).
const VIEW_FAILED: &str = "view-failed";
/// [`META`]'s key marking a log begun beside an older identity
/// ([`Store::mark_identity_restored`]).
const IDENTITY_RESTORED: &str = "identity-restored";
/// [`META`]'s key prefix marking a namespace a backup held ([`Store::backup_log`]): this
/// node's own chain there may have gone on after the backup.
const FROM_BACKUP: &str = "from-backup/";
/// Entries copied per write transaction by [`Store::backup_log`] (batches are stored in
/// pieces of at most 32,000 bytes: ~16 MiB a transaction).
const BACKUP_TXN_ENTRIES: usize = 512;

/// Page cache of the copy [`Store::backup_log`] writes (the source is read through the
/// log's own cache, [`LOG_CACHE_BYTES`]).
const BACKUP_CACHE_BYTES: usize = 16 * 1024 * 1024;

/// What [`Store::backup_log`] copied.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackupInfo {
    /// Batches in the copy.
    pub batches: u64,
    /// Namespaces with a batch or joined.
    pub namespaces: usize,
    /// The copy's size in bytes.
    pub bytes: u64,
}

/// Copies the entries of `def` for which `keep` holds from `src` into the same table of
/// `dst`, [`BACKUP_TXN_ENTRIES`] to a transaction (not fsynced: the caller's last commit is);
/// gives up ([`StoreError::Closing`]) between transactions once `stop` is set.
fn copy_table<K: redb::Key + 'static, V: redb::Value + 'static>(
    src: &redb::ReadTransaction,
    dst: &Database,
    def: TableDefinition<'_, K, V>,
    keep: impl Fn(&K::SelfType<'_>) -> bool,
    stop: &std::sync::atomic::AtomicBool,
) -> Result<(), StoreError> {
    let table = src.open_table(def)?;
    let mut entries = table.iter()?;
    loop {
        if stop.load(std::sync::atomic::Ordering::Acquire) {
            return Err(StoreError::Closing);
        }
        let mut txn = dst.begin_write()?;
        txn.set_durability(redb::Durability::None)
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let mut n = 0;
        {
            let mut out = txn.open_table(def)?;
            for entry in entries.by_ref() {
                let (k, v) = entry?;
                let key = k.value();
                if keep(&key) {
                    out.insert(key, v.value())?;
                    n += 1;
                    if n == BACKUP_TXN_ENTRIES {
                        break;
                    }
                }
            }
        }
        txn.commit()?;
        if n < BACKUP_TXN_ENTRIES {
            return Ok(());
        }
    }
}

/// Joined namespaces: name → CBOR [`NamespaceRecord`].
pub const NAMESPACES: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("namespaces-v1");
/// Revocations: `ns_len:u8 ns token:32` → earliest revocation HLC (`u64`).
pub const REVOCATIONS: TableDefinition<'_, &[u8], u64> = TableDefinition::new("revocations-v1");

/// Which batch revoked a token: `ns_len:u8 ns token:32` → batch id (32 bytes).
pub const REVOKED_BY: TableDefinition<'_, &[u8], &[u8]> = TableDefinition::new("revoked-by-v1");

/// zstd dictionaries named by stored batches: dictionary id (blake3 of the bytes, 32 bytes) →
/// the dictionary's bytes. Written in the transaction of the first batch that names it.
pub const DICTS: TableDefinition<'_, &[u8], &[u8]> = TableDefinition::new("dicts-v1");

/// A joined namespace, as persisted.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct NamespaceRecord {
    /// Owned (capabilities required) or public.
    pub owned: bool,
    /// Our capability chain (encoded), for owned namespaces.
    pub chain: Option<serde_bytes::ByteBuf>,
}

/// The view's file name, beside the log's.
pub const VIEW_FILE: &str = "records.redb";

/// Store format version written in [`META`]. 3: the log's batches in pieces ([`BATCHES`]);
/// a store of version 2 is moved to it when opened.
pub const SCHEMA_VERSION: &[u8] = b"3";

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// redb failed (I/O, corruption, ...).
    #[error("storage: {0}")]
    Redb(#[from] redb::Error),
    /// The file holds data we cannot read.
    #[error("corrupt store: {0}")]
    Corrupt(String),
    /// A background record count gave up: the store is being closed
    /// ([`Store::stop_background_count`]).
    #[error("the store is closing")]
    Closing,
    /// A write on a store opened read-only ([`Store::open_read_only`]).
    #[error("the store is open for reading only")]
    ReadOnly,
    /// The files can be read only once opened for writing ([`Store::open_read_only`] says
    /// why).
    #[error("{0}")]
    NotReadOnly(String),
    /// A record state read back does not decode: the view file is damaged.
    #[error("a record state in the view does not decode ({0})")]
    DamagedState(String),
    /// A file of the store could not be opened (the error names which).
    #[error("{}: {source}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// What failed.
        #[source]
        source: Box<StoreError>,
    },
    /// The view file cannot be read: redb finds it damaged. It holds only what the log
    /// derives ([`Store::open_moving_damaged_view`] and `blazedb repair` make it again).
    #[error(
        "the view file {} is damaged ({reason}); it holds only records derived from the log, \
         which `blazedb repair` (or starting the node) makes again",
        path.display()
    )]
    ViewDamaged {
        /// The view file.
        path: PathBuf,
        /// redb's words.
        reason: String,
    },
    /// The view holds changes the log does not: the log was lost or replaced by an older
    /// copy ([`Store::view_ahead_of_log`]).
    #[error(
        "the view file holds changes that the log does not ({0}): the log (store.redb) was \
         lost or replaced by an older copy. Restore it, or run `blazedb repair` to make the \
         records again from the log as it is (what only the view holds is then dropped; \
         other authors' batches come back from peers that hold them)"
    )]
    ViewAheadOfLog(String),
}

impl StoreError {
    /// Whether the file is held by another process (a node running on it): redb takes an
    /// exclusive lock on each file it opens.
    pub fn is_locked(&self) -> bool {
        match self {
            StoreError::Redb(redb::Error::DatabaseAlreadyOpen) => true,
            StoreError::File { source, .. } => source.is_locked(),
            _ => false,
        }
    }

    /// Whether redb found the file damaged (rather than, say, failing to read it).
    pub fn is_damage(&self) -> bool {
        match self {
            StoreError::Redb(redb::Error::Corrupted(_))
            | StoreError::Corrupt(_)
            | StoreError::DamagedState(_) => true,
            StoreError::File { source, .. } => source.is_damage(),
            _ => false,
        }
    }
}

macro_rules! redb_from {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Redb(e.into())
            }
        }
    )*};
}
redb_from!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::CursorError,
    redb::CompactionError
);

/// One of the store's redb files, opened for writing (a node, `repair`) or only for reading
/// (`blazedb check`, `blazedb backup --data`: the files are not changed, and a read-only
/// copy can be checked).
pub(crate) enum Db {
    /// Opened for writing.
    Rw(Database),
    /// Opened read-only: writing is refused ([`StoreError::ReadOnly`]).
    Ro(redb::ReadOnlyDatabase),
}

impl Db {
    /// A read transaction.
    pub(crate) fn begin_read(&self) -> Result<redb::ReadTransaction, redb::TransactionError> {
        match self {
            Db::Rw(db) => db.begin_read(),
            Db::Ro(db) => db.begin_read(),
        }
    }

    /// A write transaction; refused on a file opened read-only.
    pub(crate) fn begin_write(&self) -> Result<redb::WriteTransaction, StoreError> {
        match self {
            Db::Rw(db) => Ok(db.begin_write()?),
            Db::Ro(_) => Err(StoreError::ReadOnly),
        }
    }
}

/// A record's visible fields.
pub type Fields = serde_json::Map<String, serde_json::Value>;

/// One record changed by a stored batch (for subscribers).
#[derive(Clone, Debug, serde::Serialize)]
pub struct Change {
    /// Namespace.
    pub ns: String,
    /// Collection.
    pub collection: String,
    /// Record key.
    pub key: String,
    /// The record's visible fields after the change; `None` if it is now deleted.
    pub fields: Option<Fields>,
    /// did:key of the batch author.
    pub author: String,
    /// Batch id (hex).
    pub batch: String,
}

/// A chain head found in the store at start-up.
#[derive(Clone, Debug)]
pub struct StoredHead {
    /// Namespace.
    pub ns: String,
    /// Author key.
    pub author: [u8; 32],
    /// Highest seq.
    pub seq: u64,
    /// Id of that batch.
    pub id: BatchId,
    /// Its last timestamp.
    pub hlc_max: Hlc,
}

/// The node's durable state.
pub struct Store {
    /// The log (durable truth): batches, chains, revocations, namespaces, metadata.
    db: Db,
    /// The view (derived): records and the per-chain watermark of what has been applied.
    view: Db,
    /// Ops applied since the last flush, not yet in the view file ([`Store::stage`]).
    staged: Staged,
    /// A frozen delta being written into the view file ([`Store::flush_frozen`]); readers
    /// still consult it until that commit is done.
    flushing: RwLock<Option<Arc<Delta>>>,
    /// View flushes that folded a slice of the runs into the records' table ([`Fold`]).
    folds: std::sync::atomic::AtomicU64,
    /// View flushes that wrote their delta as a run beside the records' table ([`RUNS`]).
    runs_written: std::sync::atomic::AtomicU64,
    /// View flushes committed, and the records they wrote ([`Store::view_flushes`]).
    flushes: std::sync::atomic::AtomicU64,
    flushed_records: std::sync::atomic::AtomicU64,
    /// How long the last flush's fold took, in microseconds (0 for a flush that folded
    /// nothing): a part of a flush's time that does not scale with its delta.
    last_fold_us: std::sync::atomic::AtomicU64,
    /// The distinct records of the view file (table and runs) at one generation of it
    /// ([`VIEW_META`]): counting them walks every level, once per generation.
    file_records: std::sync::Mutex<Option<(u64, u64)>>,
    /// Run id → its Bloom filter (`None`: the run has none stored; a read looks in it),
    /// loaded from [`RUN_FILTERS`] once per process. Ids are never reused in one view file
    /// (`next-run` in [`VIEW_META`]), so an entry never stands for another run.
    run_filters: std::sync::Mutex<std::collections::HashMap<u32, Option<Arc<RunFilter>>>>,
    /// Lookups into runs made by reads ([`Store::get`]), for tests.
    run_probes: std::sync::atomic::AtomicU64,
    /// The last count [`Store::counts_bounded`] took, and one count at a time.
    bounded_count: std::sync::Mutex<Option<TakenCount>>,
    counting: std::sync::Mutex<()>,
    /// The thread of the last count [`Store::counts_for_scrape`] started, while it runs
    /// (one at a time), or `None`.
    recount: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Set by [`Store::stop_background_count`]: a count on that thread gives up, and no
    /// other starts.
    closing: std::sync::atomic::AtomicBool,
    /// The next flush that would fold a slice folds everything instead ([`Fold::All`]).
    #[cfg(test)]
    fold_all_next: std::sync::atomic::AtomicBool,
    /// Every flush first waits this many milliseconds: a view file on a slow disk, for the
    /// materializer's pacing tests.
    #[cfg(test)]
    pub(crate) flush_delay_ms: std::sync::atomic::AtomicU64,
}

/// A record count and what it cost ([`Store::counts_bounded`]).
#[derive(Clone, Copy, Debug)]
struct TakenCount {
    records: u64,
    at: std::time::Instant,
    took: std::time::Duration,
}

/// [`Store::counts_bounded`] takes a new record count once the last one is older than this
/// many times what it took: counting then costs at most about a tenth of one core, however
/// often it is asked for.
const COUNT_COST_SHARE: u32 = 10;

/// [`Store::counts_for_scrape`] takes a due count in place if the last one took less than
/// this, and on a thread of its own behind the scrapes otherwise.
const COUNT_IN_PLACE_MAX: std::time::Duration = std::time::Duration::from_millis(100);

/// Whether a count taken `age` ago that took `took` is due again ([`COUNT_COST_SHARE`]).
fn count_due(age: std::time::Duration, took: std::time::Duration) -> bool {
    age >= took.saturating_mul(COUNT_COST_SHARE)
}

/// Record changes held in memory between view flushes: per record, the join of the ops
/// applied to it since the last flush (not the whole record: merging is a join, so the view
/// file's state joined with this delta is the record, and applying needs no read). This is
/// a delta frozen for its flush ([`Store::freeze`]); the one being staged is [`Staged`].
struct Delta {
    /// Record key → join of the ops applied since the last flush, split over [`SHARDS`]
    /// tables by the key's hash. A hash table: staging is one
    /// lookup per op (a B-tree of 200k keys was ~18 key comparisons, each a cache miss, half
    /// of staging's time); key order is needed only by the flush (sorted there, on the
    /// flusher thread) and by `list` (the keys in range, collected and sorted). Each slot
    /// keeps its key's hash and one block holding key and state ([`DeltaMap`]): growing the
    /// table touches no key, and a record staged is hashed once and placed in the table's
    /// arena of blocks.
    /// A state is held in its stored form ([`record_codec`]): one heap block per record
    /// instead of ~8 (names, values, the field vector), written straight from the payload
    /// for a record the delta does not hold yet, and written to the file as it is.
    records: [DeltaMap; SHARDS],
    meta: DeltaMeta,
}

/// What a delta holds besides its records.
#[derive(Default)]
struct DeltaMeta {
    /// Chain (`ns_len:u8 ns author:32`) → highest seq applied.
    applied: BTreeMap<Vec<u8>, u64>,
    /// Approximate memory held, in bytes (keys and states plus per-record overhead).
    bytes: usize,
}

/// The staged delta's record tables are split by key over this many shards, each behind
/// its own lock, so that a read of one record waits only while staging writes that record's
/// shard: staging takes each shard's lock in turn for the ops of a batch that fall in it
/// (about 1/8 of them), instead of one lock over the whole batch. During a catch-up the
/// materializer held the one lock 4–10 ms per 5k-op batch, and 17–53 ms now and then, and
/// a `get` at the catching-up node waited that long (B6's read max).
const SHARDS: usize = 1 << SHARD_BITS;
const SHARD_BITS: u32 = 3;

/// The shard of a key hashed to `hash`: its top bits (a table's first slot for it is the
/// top bits of the hash multiplied, which all bits feed). Shifted in two steps so that
/// `SHARD_BITS` 0 (one shard) is no overflow.
fn shard_of(hash: u64) -> usize {
    (hash >> (63 - SHARD_BITS) >> 1) as usize
}

/// The delta being staged ([`Store::stage`]): each shard's table behind its own lock, and the
/// watermarks and size behind one more.
///
/// Locks, in the order they are taken: `meta`, then shards in ascending order, then the
/// frozen delta's ([`Store::flushing`]), then a view-file snapshot. Staging holds `meta`
/// for writing over a whole batch and each shard's lock while it writes that shard's ops;
/// [`Store::freeze`] holds `meta` and every shard. A read of records takes the shards that
/// hold them (a `get`: one), and keeps them until it has read the frozen delta and begun
/// its file snapshot, so no record moves out of its sight on the way (staged → frozen →
/// file). A listing or a count also reads `meta`, so it sees each batch whole or not at
/// all.
struct Staged {
    meta: parking_lot::RwLock<DeltaMeta>,
    shards: [parking_lot::RwLock<DeltaMap>; SHARDS],
    /// The hasher of every shard's table, also of every later delta's (a key's hash, taken
    /// once, picks its shard and serves the table's lookup).
    hasher: foldhash::fast::RandomState,
}

impl Default for Staged {
    fn default() -> Staged {
        let hasher = foldhash::fast::RandomState::default();
        Staged {
            meta: Default::default(),
            shards: std::array::from_fn(|_| {
                parking_lot::RwLock::new(DeltaMap::with_hasher(hasher.clone()))
            }),
            hasher,
        }
    }
}

impl Staged {
    /// Every shard, read-locked in ascending order.
    fn read_all(&self) -> [parking_lot::RwLockReadGuard<'_, DeltaMap>; SHARDS] {
        std::array::from_fn(|i| self.shards[i].read())
    }
}

/// A delta's shards as a reader holds them (the staged delta's locked ones, or a frozen
/// delta's).
#[derive(Clone, Copy)]
struct Shards<'a>([&'a DeltaMap; SHARDS]);

impl<'a> Shards<'a> {
    fn of_guards(guards: &'a [parking_lot::RwLockReadGuard<'_, DeltaMap>; SHARDS]) -> Self {
        Shards(std::array::from_fn(|i| &*guards[i]))
    }

    /// The state held for `rk`, decoded.
    fn state(&self, rk: &[u8]) -> Result<Option<RecordState>, StoreError> {
        let map = self.0[shard_of(self.0[0].hash(rk))];
        map.get(rk).map(decode_state).transpose()
    }

    /// Every record's key, in no particular order.
    fn keys(self) -> impl Iterator<Item = &'a [u8]> {
        self.0.into_iter().flat_map(DeltaMap::keys)
    }

    /// Every block's key in the shards' arenas, in memory order, with where it is: blocks
    /// given up are among them ([`DeltaMap::arena_keys`]; [`Shards::holds_at`] tells).
    fn arena_keys(self) -> impl Iterator<Item = (&'a [u8], BlockAt<'a>)> {
        self.0
            .into_iter()
            .flat_map(|m| m.arena_keys().map(move |(k, loc)| (k, BlockAt(m, loc))))
    }

    fn len(&self) -> usize {
        self.0.iter().map(|m| m.len()).sum()
    }
}

/// Where a key met in a walk of the arenas lies: its table and block.
#[derive(Clone, Copy)]
struct BlockAt<'a>(&'a DeltaMap, u32);

impl BlockAt<'_> {
    /// Whether the block is its record's own (not one given up).
    fn live(self, key: &[u8]) -> bool {
        self.0.holds_at(key, self.1)
    }
}

impl Delta {
    fn shards(&self) -> Shards<'_> {
        Shards(std::array::from_fn(|i| &self.records[i]))
    }
}

/// Per-record memory of the delta beyond its key's and its state's bytes (the table's 16-byte
/// slots at a load between 1/4 and 1/2: 32–64 bytes; the block's 8-byte header and its
/// rounding to 16 bytes; the unfilled tails of the blocks' chunks), in bytes. Kept high:
/// the bound must hold on the allocator's worst day, not its average. B2m prints the
/// estimate next to the table's own bytes per staged op ([`Store::staged_heap_bytes`]):
/// at 200k W ops ~310 against 249 measured, at 1M ~240 against 180 (160 bytes here with
/// the 32-byte slots before 2026-12-07: ~340 against ~260 at 200k).
const STAGED_RECORD_OVERHEAD_BYTES: usize = 128;

/// Deltas' keys a listing walks beyond twice its `limit` before it stops at the cut
/// ([`Store::list_taking`]).
const LIST_DELTA_SLACK: usize = 64;

/// The delta's records in key order. Keys live in their own heap blocks: a sort comparing
/// them through their pointers misses the cache at nearly every comparison once the delta
/// outgrows it (~20 comparisons per record for 10^6 records). So each record is sorted by the
/// 8 bytes that follow the prefix every key shares (the namespace and collection, mostly),
/// read once per key and held inline, as a big-endian integer (zero-padded: a key that ends
/// sooner sorts first, as in byte order); only keys equal in those bytes are compared whole.
///
/// The shared prefix is guessed from the first keys the walk meets and checked on every key
/// as the walk reads it (in cache then), so the map is walked once: a walk of its own for the
/// prefix missed the cache on every record again (1.5M records: ~0.2–0.4 s of a flush). In
/// the rare delta whose keys share less than the guess (several collections), the words are
/// taken again after the prefix really shared; any shorter prefix would order the same, only
/// with more keys compared whole.
fn sorted_records(records: &[DeltaMap]) -> Vec<(&[u8], &[u8])> {
    let guess = records
        .iter()
        .flat_map(DeltaMap::keys)
        .take(PREFIX_GUESS_KEYS)
        .fold(None, |c: Option<&[u8]>, k| {
            Some(c.map_or(k, |c| &c[..common_len(c, k)]))
        });
    let guess = guess.unwrap_or_default();
    let mut shared = guess.len();
    let len = records.iter().map(DeltaMap::len).sum();
    let mut keyed: Vec<(u64, &[u8], &[u8])> = Vec::with_capacity(len);
    for (k, v) in records.iter().flat_map(DeltaMap::iter) {
        if !k.starts_with(&guess[..shared]) {
            shared = common_len(&guess[..shared], k);
        }
        keyed.push((sort_word(k, guess.len()), k, v));
    }
    if shared < guess.len() {
        for e in &mut keyed {
            e.0 = sort_word(e.1, shared);
        }
    }
    keyed.sort_unstable_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.cmp(b.1)));
    keyed.into_iter().map(|(_, k, v)| (k, v)).collect()
}

/// How many keys [`sorted_records`] guesses the shared prefix from.
const PREFIX_GUESS_KEYS: usize = 32;

/// The length of the prefix `a` and `b` share.
fn common_len(a: &[u8], b: &[u8]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// The length of the prefix all `keys` share (0 for none).
fn common_prefix_len<'k>(keys: impl Iterator<Item = &'k [u8]>) -> usize {
    let mut common: Option<&[u8]> = None;
    for k in keys {
        let c = common.get_or_insert(k);
        *c = &c[..common_len(c, k)];
    }
    common.map_or(0, <[u8]>::len)
}

/// The 8 bytes of `key` after its first `skip`, as a big-endian integer, zero-padded: keys
/// sharing those `skip` bytes sort in this integer's order where it differs.
fn sort_word(key: &[u8], skip: usize) -> u64 {
    let mut word = [0u8; 8];
    let rest = &key[skip.min(key.len())..];
    let n = rest.len().min(8);
    word[..n].copy_from_slice(&rest[..n]);
    u64::from_be_bytes(word)
}

/// An op of a batch being staged: its record key's hash, where the key is in the batch's
/// key buffer, and the op's index ([`Store::place_ops`]).
#[derive(Clone, Copy, Default)]
struct Placed {
    hash: u64,
    key: (u32, u32),
    op: u32,
}

/// A batch's ops placed for staging ([`Store::place_ops`]): their record keys, one after
/// another, and the ops grouped by shard (shard `s`'s are `grouped[first[s]..first[s + 1]]`).
struct PlacedOps {
    keys: Vec<u8>,
    grouped: Vec<Placed>,
    first: [usize; SHARDS + 1],
}

/// How many ops ahead staging prefetches a record's first slot in the delta's table
/// ([`DeltaMap::prefetch_slot`]), and, once that slot is in cache, the record's block
/// ([`DeltaMap::prefetch_block`]). (Before real prefetches, reading 16 keys ahead took B2m
/// staging of 1M W ops from ~1.5M to ~1.8M ops/s; the reads still stalled on their misses.)
const SLOT_AHEAD: usize = 16;
/// How many records ahead a flush prefetches the delta's keys (in the arena's staging order,
/// not the key order the flush walks them in).
const FLUSH_AHEAD_RECORDS: usize = 16;

/// Prefetches the record [`FLUSH_AHEAD_RECORDS`] after the `i`th of a flush's sorted
/// records: every cache line of its block (key, then state, contiguous in the delta's
/// arena), not only the first. A W record's block spans 2–4 lines; prefetching the first
/// alone left the run's write loop stalled on the rest (perf: ~18% of the flusher's samples
/// at 16M growing ops); all of them made the runs' flushes ~8% shorter (four alternating
/// pairs, B2l over 10^9 keys at 8M ops).
fn prefetch_key_ahead(keyed: &[(&[u8], &[u8])], i: usize) {
    if let Some((rk, state)) = keyed.get(i + FLUSH_AHEAD_RECORDS) {
        // (At most 8 lines: a large record's tail waits, as it did.)
        let span = (state.as_ptr() as usize + state.len())
            .saturating_sub(rk.as_ptr() as usize)
            .min(512);
        prefetch_lines(rk.as_ptr(), span);
    }
}
const BLOCK_AHEAD: usize = 8;

/// View table: `ns_len:u8 ns author:32` → highest seq applied to the records (in [`RECORDS`]
/// and [`RUNS`] together). Named `-v4` since the runs are folded away by a sweep (up to
/// [`MAX_RUNS`] of them, more than a binary before that reads): a binary that predates that
/// finds no watermark of its own name, so it applies the whole log again into [`RECORDS`]
/// (a join, so that is the full record), and never sees runs it could not read (their
/// tables were renamed too).
pub const APPLIED: TableDefinition<'_, &[u8], u64> = TableDefinition::new("applied-v4");
/// The watermark's name before the runs; taken over (by maximum per chain) and dropped at open.
const APPLIED_V2: TableDefinition<'_, &[u8], u64> = TableDefinition::new("applied-v2");
/// The watermark's name while runs were merged among themselves (`-v1` run tables). A file
/// with it and no [`APPLIED`] is upgraded at open (the four tables renamed); one with both
/// was written by such a binary after ours, and its view is rebuilt from the log.
const APPLIED_V3: TableDefinition<'_, &[u8], u64> = TableDefinition::new("applied-v3");
/// The view tables an upgrade renames, (name while runs were merged among themselves, ours):
/// the watermark, the runs, their list, their filters.
const UPGRADE_RENAMES: [(&str, &str); 4] = [
    ("applied-v3", "applied-v4"),
    ("records-runs-v1", "records-runs-v2"),
    ("records-run-list-v1", "records-run-list-v2"),
    ("records-run-filter-v1", "records-run-filter-v2"),
];

/// View table: sorted runs of records that flushes wrote beside [`RECORDS`] instead of
/// rewriting it (`run:u32be ++ record key` → stored state: the join of the ops that flush's
/// delta held for the record). A record is the join of its states in [`RECORDS`] and in every
/// run (a join is idempotent, so a record held in several places reads right whatever the
/// order). Written by [`Store::flush_frozen`], and folded into [`RECORDS`] by later flushes,
/// a key range at a time.
pub const RUNS: TableDefinition<'_, &[u8], &[u8]> = TableDefinition::new("records-runs-v2");
/// View table: run id → records the run holds (written into it, less those a fold took
/// since). Ids increase; [`RUNS`] holds nothing of a run not listed here (both change in one
/// transaction).
pub const RUN_LIST: TableDefinition<'_, u32, u64> = TableDefinition::new("records-run-list-v2");
/// The most runs held beside [`RECORDS`]: a read looks a record up in each whose filter may
/// hold it, and a walk in key order (`list`, counts, a fold) merges them all. A flush that
/// would make one more folds every run into the table instead ([`Fold::All`]).
const MAX_RUNS: usize = 16;

/// Flushes per sweep of the fold over the whole key space, at most ([`Fold::Slice`]): each
/// flush folds at least this fraction (1/n) of the view file's records (the table's and
/// the runs'), so a run is folded away within this many flushes after it was written, and
/// the runs number about one more (below [`MAX_RUNS`], which then stays a backstop).
const FOLD_SWEEP_FLUSHES: u64 = 12;

/// A delta with fewer keys among the table's than this, and fewer than a tenth of the
/// table's records ([`REWRITE_DELTA_FRACTION`]), is spliced into the table; more are written
/// as a run. A splice writes a whole leaf (4 KiB, ~18 W records) again for each record it
/// puts among the file's, so a run is far cheaper for random keys: splicing 380k into a file
/// of 12M took 21 s (B2l over 10^9 keys), a run of 1.5M takes 2–5 s. Below this the leaves a
/// splice writes are few (≤ 16 MiB), and a run would only add a level to every read.
const RUN_MIN_RECORDS: u64 = 4_096;

/// How a flush writes a delta with `interleaved` records among the records' table's
/// `file_len` (not past its last key), beside `runs` (oldest first; records held).
///
/// Appends and small deltas splice. Otherwise the flush folds a slice of the key space into
/// the table — from where the last fold ended, the table's records there joined with every
/// run's and the delta's — and writes the rest of the delta as a run. Runs are never merged
/// with each other: the sweep folds them away range by range, so no flush rewrites more
/// than about a [`FOLD_SWEEP_FLUSHES`]th of the file, however large it grows. Past [`MAX_RUNS`], everything is folded at once.
fn flush_mode(runs: &[(u32, u64)], interleaved: u64, file_len: u64) -> FlushMode {
    if interleaved == 0
        || (interleaved < RUN_MIN_RECORDS && interleaved * REWRITE_DELTA_FRACTION < file_len)
    {
        return FlushMode::Splice;
    }
    if runs.len() + 1 > MAX_RUNS {
        return FlushMode::Run { fold: Fold::All };
    }
    let held = file_len + runs.iter().map(|&(_, n)| n).sum::<u64>();
    FlushMode::Run {
        fold: Fold::Slice {
            file_records: held.div_ceil(FOLD_SWEEP_FLUSHES).max(1),
        },
    }
}

/// How a flush writes its delta into the view file ([`Store::flush_frozen`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FlushMode {
    /// Into the records' table, by a cursor's sweep.
    Splice,
    /// A fold of part of the key space into the records' table (the delta's records there
    /// with it), and the rest of the delta as a run of its own ([`RUNS`]).
    Run { fold: Fold },
}

/// What a flush folds into the records' table ([`flush_mode`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fold {
    /// From the sweep's position ([`VIEW_SWEEP`]) up to where `file_records` of the file's
    /// records (the table's and the runs') have been passed, or the end of the key space
    /// (the next fold starts over from the beginning).
    Slice { file_records: u64 },
    /// The whole key space: every run goes.
    All,
}

/// View table: `"from"` → the record key where the next fold starts ([`Fold::Slice`]);
/// none, or empty, is the start of the key space.
pub const VIEW_SWEEP: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("view-sweep-v1");

/// View table: `generation` → a number every write transaction of the view file raises
/// ([`bump_generation`]), so that something computed from one snapshot of the file (the
/// records it holds across the table and the runs: [`Store::counts`]) can be kept for as
/// long as the file is unchanged, and told apart from any later snapshot's.
pub const VIEW_META: TableDefinition<'_, &str, u64> = TableDefinition::new("view-meta-v1");

/// Raises the view file's generation ([`VIEW_META`]) in `txn`, and records that the run
/// filters were kept up to date up to it (`filters-at`): a binary that predates the filters
/// raises the generation without that, and [`Store::open`] then drops every filter (it may
/// have rewritten or absorbed the runs they were made for, and reused their ids).
fn bump_generation(txn: &redb::WriteTransaction) -> Result<(), StoreError> {
    let mut meta = txn.open_table(VIEW_META)?;
    let next = meta.get("generation")?.map_or(0, |v| v.value()) + 1;
    meta.insert("generation", next)?;
    meta.insert("filters-at", next)?;
    Ok(())
}

/// View table: run id → the run's Bloom filter ([`RunFilter`]'s stored form), written in
/// the transaction that writes the run and removed with it. A run without one (or with one
/// that does not decode) is looked in on every read.
pub const RUN_FILTERS: TableDefinition<'_, u32, &[u8]> =
    TableDefinition::new("records-run-filter-v2");

/// The runs of one view snapshot: (id, records written), oldest first, and each one's filter.
struct Runs {
    list: Vec<(u32, u64)>,
    filters: Vec<Option<Arc<RunFilter>>>,
}

impl Runs {
    fn is_empty(&self) -> bool {
        self.list.is_empty()
    }
}

/// `run:u32be ++ rk` into `out`.
fn run_key(run: u32, rk: &[u8], out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&run.to_be_bytes());
    out.extend_from_slice(rk);
}

/// Calls `f` with the state each of `runs` holds for the record `rk` (oldest run first),
/// looking only in runs whose filter may hold it. Returns the runs looked in.
fn run_states(
    run_table: &impl ReadableTable<&'static [u8], &'static [u8]>,
    runs: &Runs,
    rk: &[u8],
    mut f: impl FnMut(&[u8]) -> Result<(), StoreError>,
) -> Result<u64, StoreError> {
    let mut key = Vec::with_capacity(4 + rk.len());
    let mut probes = 0;
    for (&(id, _), filter) in runs.list.iter().zip(&runs.filters) {
        if filter.as_ref().is_some_and(|f| !f.may_hold(rk)) {
            continue;
        }
        probes += 1;
        run_key(id, rk, &mut key);
        if let Some(v) = run_table.get(key.as_slice())? {
            f(v.value())?;
        }
    }
    Ok(probes)
}

/// The runs listed in a view snapshot: (id, records written), oldest first.
fn run_list(table: &impl ReadableTable<u32, u64>) -> Result<Vec<(u32, u64)>, StoreError> {
    let mut out = Vec::new();
    for entry in table.iter()? {
        let (id, n) = entry?;
        out.push((id.value(), n.value()));
    }
    Ok(out)
}

/// Removes every run's records with keys in `[lo, hi)` (`hi` none: to the end), keeps the
/// run list's counts exact, and drops each run left empty with its filter. Returns the runs
/// dropped.
fn remove_run_range(
    run_table: &mut redb::Table<'_, &'static [u8], &'static [u8]>,
    run_index: &mut redb::Table<'_, u32, u64>,
    filter_table: &mut redb::Table<'_, u32, &'static [u8]>,
    runs: &[(u32, u64)],
    lo: &[u8],
    hi: Option<&[u8]>,
) -> Result<Vec<u32>, StoreError> {
    let mut dropped = Vec::new();
    for &(id, n) in runs {
        let (mut from, mut to) = (Vec::new(), Vec::new());
        run_key(id, lo, &mut from);
        let mut removed = 0u64;
        let mut count = |_: &[u8], _: &[u8]| {
            removed += 1;
            false
        };
        match (hi, id.checked_add(1)) {
            (Some(hi), _) => {
                run_key(id, hi, &mut to);
                run_table.retain_in(from.as_slice()..to.as_slice(), &mut count)?;
            }
            (None, Some(next)) => {
                run_key(next, &[], &mut to);
                run_table.retain_in(from.as_slice()..to.as_slice(), &mut count)?;
            }
            (None, None) => run_table.retain_in(from.as_slice().., &mut count)?,
        }
        let left = n.checked_sub(removed).ok_or_else(|| {
            StoreError::Corrupt(format!(
                "run {id} held {removed} records in a range, {n} listed"
            ))
        })?;
        if left == 0 {
            run_index.remove(id)?;
            filter_table.remove(id)?;
            dropped.push(id);
        } else if removed > 0 {
            run_index.insert(id, left)?;
        }
    }
    Ok(dropped)
}

type Guard<'a> = redb::AccessGuard<'a, &'static [u8]>;

/// One sorted source of stored record states in the view file, over a key range: [`RECORDS`]
/// or one run (whose keys carry the run's 4-byte id first, skipped here).
struct Level<'a> {
    range: redb::Range<'a, &'static [u8], &'static [u8]>,
    skip: usize,
    head: Option<(Guard<'a>, Guard<'a>)>,
}

impl<'a> Level<'a> {
    fn new(
        mut range: redb::Range<'a, &'static [u8], &'static [u8]>,
        skip: usize,
    ) -> Result<Self, StoreError> {
        let head = range.next().transpose()?;
        Ok(Self { range, skip, head })
    }

    /// The record key at the head, if any.
    fn key(&self) -> Option<&[u8]> {
        self.head.as_ref().map(|(k, _)| &k.value()[self.skip..])
    }

    fn state(&self) -> &[u8] {
        self.head.as_ref().map_or(&[], |(_, v)| v.value())
    }

    fn advance(&mut self) -> Result<(), StoreError> {
        self.head = self.range.next().transpose()?;
        Ok(())
    }
}

/// The view file's levels over record keys from `start` (up to `end`, exclusive, if any):
/// [`RECORDS`] first, then each run in `runs`, oldest first.
fn levels<'t>(
    records: &'t impl ReadableTable<&'static [u8], &'static [u8]>,
    run_table: &'t impl ReadableTable<&'static [u8], &'static [u8]>,
    runs: &[(u32, u64)],
    start: &[u8],
    end: Option<&[u8]>,
) -> Result<Vec<Level<'t>>, StoreError> {
    let mut out = Vec::with_capacity(runs.len() + 1);
    out.push(Level::new(
        match end {
            Some(end) => records.range(start..end)?,
            None => records.range(start..)?,
        },
        0,
    )?);
    out.extend(run_levels(run_table, runs, start, end)?);
    Ok(out)
}

/// The levels of the runs in `runs` alone (see [`levels`]), oldest first.
fn run_levels<'t>(
    run_table: &'t impl ReadableTable<&'static [u8], &'static [u8]>,
    runs: &[(u32, u64)],
    start: &[u8],
    end: Option<&[u8]>,
) -> Result<Vec<Level<'t>>, StoreError> {
    let mut out = Vec::with_capacity(runs.len());
    for &(id, _) in runs {
        let (mut lo, mut hi) = (Vec::new(), Vec::new());
        run_key(id, start, &mut lo);
        let range = match (end, id.checked_add(1)) {
            (Some(end), _) => {
                run_key(id, end, &mut hi);
                run_table.range(lo.as_slice()..hi.as_slice())?
            }
            (None, Some(next)) => {
                run_key(next, &[], &mut hi);
                run_table.range(lo.as_slice()..hi.as_slice())?
            }
            (None, None) => run_table.range(lo.as_slice()..)?,
        };
        out.push(Level::new(range, 4)?);
    }
    Ok(out)
}

/// The `take` smallest of the `keys` that are `live` (unordered; a key met twice may be
/// there twice) and, where some were left out, the smallest of those (the cut: every live
/// key below it is taken). One pass, holding at most `take` keys; `live` is asked only of a
/// key that would be taken or would lower the cut (a few thousand of a pass over hundreds
/// of thousands, for a take of a few hundred).
fn smallest<'k, T: Copy>(
    keys: impl Iterator<Item = (&'k [u8], T)>,
    take: usize,
    live: impl Fn(&'k [u8], T) -> bool,
) -> (Vec<&'k [u8]>, Option<&'k [u8]>) {
    let mut heap: std::collections::BinaryHeap<&[u8]> = std::collections::BinaryHeap::new();
    let mut cut: Option<&[u8]> = None;
    let left_out = |k: &'k [u8], cut: &mut Option<&'k [u8]>| {
        if cut.is_none_or(|c| k < c) {
            *cut = Some(k);
        }
    };
    for (k, at) in keys {
        if cut.is_some_and(|c| k >= c) {
            continue;
        }
        if heap.len() < take {
            if live(k, at) {
                heap.push(k);
            }
        } else if heap.peek().is_some_and(|&max| k < max) {
            if live(k, at) {
                if let Some(max) = heap.pop() {
                    left_out(max, &mut cut);
                }
                heap.push(k);
            }
        } else if live(k, at) {
            left_out(k, &mut cut);
        }
    }
    (heap.into_vec(), cut)
}

/// Walks `levels` and the sorted, distinct keys of `extra` together in key order, calling `f`
/// once per distinct key with the states held for it (the levels' in their order, then
/// `extra`'s if it has one). Stops early when `f` returns false.
fn walk_levels<'s>(
    levels: &mut [Level<'_>],
    extra: impl Iterator<Item = (&'s [u8], Option<&'s [u8]>)>,
    mut f: impl FnMut(&[u8], &[&[u8]]) -> Result<bool, StoreError>,
) -> Result<(), StoreError> {
    const MOST: usize = MAX_RUNS + 1;
    if levels.len() > MOST {
        return Err(StoreError::Corrupt(format!(
            "{} runs listed, at most {MAX_RUNS} are written",
            levels.len() - 1
        )));
    }
    let mut extra = extra.peekable();
    loop {
        let from_extra = extra.peek().copied();
        let mut min = from_extra.map(|(k, _)| k);
        for l in levels.iter() {
            if let Some(k) = l.key() {
                if min.is_none_or(|m| k < m) {
                    min = Some(k);
                }
            }
        }
        let Some(min) = min else { return Ok(()) };
        let mut states: [&[u8]; MOST + 1] = [&[]; MOST + 1];
        let (mut n, mut hit) = (0, [false; MOST]);
        for (i, l) in levels.iter().enumerate() {
            if l.key() == Some(min) {
                states[n] = l.state();
                n += 1;
                hit[i] = true;
            }
        }
        let extra_hit = from_extra.is_some_and(|(k, _)| k == min);
        if let Some((_, Some(state))) = from_extra.filter(|_| extra_hit) {
            states[n] = state;
            n += 1;
        }
        if !f(min, &states[..n])? {
            return Ok(());
        }
        for (l, _) in levels.iter_mut().zip(hit).filter(|(_, hit)| *hit) {
            l.advance()?;
        }
        if extra_hit {
            extra.next();
        }
    }
}

/// The stored join of `states` (at least one): the state itself if only one, else into `out`
/// (`tmp` is scratch).
fn join_all<'o>(
    states: &[&'o [u8]],
    out: &'o mut Vec<u8>,
    tmp: &mut Vec<u8>,
) -> Result<&'o [u8], StoreError> {
    match states {
        [] => Ok(&[]),
        [one] => Ok(one),
        [first, rest @ ..] => {
            out.clear();
            out.extend_from_slice(first);
            for s in rest {
                tmp.clear();
                join_states(out, s, tmp)?;
                std::mem::swap(out, tmp);
            }
            Ok(out.as_slice())
        }
    }
}

/// A batch's ops, read in place. Its payload decoded when the batch was verified; a failure
/// here means memory or the code is wrong, reported as a damaged store, not a panic.
fn ops_view(vb: &VerifiedBatch) -> Result<&PayloadView<'_>, StoreError> {
    vb.ops
        .view()
        .map_err(|e| StoreError::Corrupt(format!("batch {}: ops: {e}", vb.id)))
}

/// An op of a batch not yet staged, with its batch's view and author.
type KeptOp<'a> = (&'a PayloadView<'a>, &'a OpView<'a>, [u8; 32]);

/// Which record keys [`kept_ops`] keeps.
#[derive(Clone, Copy)]
enum KeptKeys<'k> {
    /// This one (a batch whose key filter rules it out is not walked: [`Unstaged::may_hold`]).
    Exactly(&'k str),
    /// Those that begin with this.
    Prefixed(&'k str),
}

/// The ops of `unstaged` that count, on records of `collection` in `ns` whose key is one
/// of `keys`, oldest first.
fn kept_ops<'a>(
    unstaged: &'a [Arc<[Unstaged]>],
    ns: &str,
    collection: &str,
    keys: KeptKeys<'_>,
) -> Result<Vec<KeptOp<'a>>, StoreError> {
    let mut out = Vec::new();
    each_kept_op(unstaged, ns, collection, keys, |op| out.push(op))?;
    Ok(out)
}

/// [`kept_ops`], each handed to `each` in turn instead of collected.
fn each_kept_op<'a>(
    unstaged: &'a [Arc<[Unstaged]>],
    ns: &str,
    collection: &str,
    keys: KeptKeys<'_>,
    mut each: impl FnMut(KeptOp<'a>),
) -> Result<(), StoreError> {
    for b in unstaged.iter().flat_map(|kept| kept.iter()) {
        if !b.effective || b.ns != ns {
            continue;
        }
        if let KeptKeys::Exactly(key) = keys {
            if !b.may_hold(key) {
                continue;
            }
        }
        let view = b
            .ops
            .view()
            .map_err(|e| StoreError::Corrupt(format!("a logged batch's ops: {e}")))?;
        for op in view.ops() {
            let k = view.key(op);
            let kept = match keys {
                KeptKeys::Exactly(key) => k == key,
                KeptKeys::Prefixed(prefix) => k.starts_with(prefix),
            };
            if kept && view.collection(op) == collection {
                each((view, op, b.author));
            }
        }
    }
    Ok(())
}

/// A record's state with `ops` (its kept ops, oldest first) joined to it.
fn join_kept(mut state: Option<RecordState>, ops: &[KeptOp<'_>]) -> Option<RecordState> {
    for &(view, op, author) in ops {
        state
            .get_or_insert_with(RecordState::default)
            .apply_view(view, op, author);
    }
    state
}

/// The stored form of the join of two stored states, into `out`. Where the delta's state
/// absorbs the file's (a newer overwrite or delete: [`record_codec::absorbs`]), it is the
/// join, and neither is decoded.
fn join_states(file: &[u8], delta: &[u8], out: &mut Vec<u8>) -> Result<(), StoreError> {
    if record_codec::absorbs(delta, file) {
        out.extend_from_slice(delta);
        return Ok(());
    }
    let mut state = decode_state(file)?;
    state.merge(&decode_state(delta)?);
    record_codec::encode_state(&state, out);
    Ok(())
}

fn chain_prefix(ns: &str, author: &[u8; 32]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + ns.len() + 32 + 8);
    k.push(ns.len() as u8);
    k.extend_from_slice(ns.as_bytes());
    k.extend_from_slice(author);
    k
}

fn chain_key(ns: &str, author: &[u8; 32], seq: u64) -> Vec<u8> {
    let mut k = chain_prefix(ns, author);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn parse_chain_key(k: &[u8]) -> Option<(String, [u8; 32], u64)> {
    let (&n, rest) = k.split_first()?;
    let n = n as usize;
    if rest.len() != n + 32 + 8 {
        return None;
    }
    let ns = std::str::from_utf8(&rest[..n]).ok()?.to_string();
    let author: [u8; 32] = rest[n..n + 32].try_into().ok()?;
    let seq = u64::from_be_bytes(rest[n + 32..].try_into().ok()?);
    Some((ns, author, seq))
}

fn ns_prefix(ns: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + ns.len());
    k.push(ns.len() as u8);
    k.extend_from_slice(ns.as_bytes());
    k
}

fn revocation_key(ns: &str, token: &TokenId) -> Vec<u8> {
    let mut k = ns_prefix(ns);
    k.extend_from_slice(&token.0);
    k
}

fn collection_prefix(ns: &str, collection: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + ns.len() + collection.len() + 32);
    k.push(ns.len() as u8);
    k.extend_from_slice(ns.as_bytes());
    k.push(collection.len() as u8);
    k.extend_from_slice(collection.as_bytes());
    k
}

/// Key of a record in [`RECORDS`] (and in the staged delta).
pub fn record_key(ns: &str, collection: &str, key: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + ns.len() + collection.len() + key.len());
    write_record_key(&mut k, ns, collection, key);
    k
}

/// [`record_key`] into a buffer the caller reuses.
fn write_record_key(out: &mut Vec<u8>, ns: &str, collection: &str, key: &str) {
    out.push(ns.len() as u8);
    out.extend_from_slice(ns.as_bytes());
    out.push(collection.len() as u8);
    out.extend_from_slice(collection.as_bytes());
    out.extend_from_slice(key.as_bytes());
}

/// The smallest byte string greater than every string starting with `prefix`.
fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// Read access to a lock; a poisoned lock (a panic elsewhere while holding it) still holds
/// consistent data here (every writer leaves it whole), so it is used as is.
fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|p| p.into_inner())
}

/// Write access to a lock (see [`read`]).
fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|p| p.into_inner())
}

/// Page cache of the log file. redb's default is 1 GiB per database; the log is written
/// append-only and read in chain order, so a small cache serves it (measured with B6).
const LOG_CACHE_BYTES: usize = 64 * 1024 * 1024;
/// Page cache of the records file: random-key updates want its interior pages cached.
const VIEW_CACHE_BYTES: usize = 256 * 1024 * 1024;

fn decode_state(bytes: &[u8]) -> Result<RecordState, StoreError> {
    record_codec::decode_state(bytes).map_err(|e| StoreError::DamagedState(e.to_string()))
}

fn encode_state(state: &RecordState) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    record_codec::encode_state(state, &mut out);
    out
}

/// Decodes the header of stored envelope bytes (already verified when stored): the whole
/// envelope, or any front of it that holds the header (its first piece in the log).
pub fn stored_header(bytes: &[u8]) -> Result<BatchHeader, StoreError> {
    let header = Envelope::header_of(bytes).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    ciborium::from_reader(header).map_err(|e| StoreError::Corrupt(format!("header: {e}")))
}

impl Store {
    /// Opens (or creates) the store: the log at `path`, the view beside it
    /// ([`VIEW_FILE`]). Errors name the file; a view redb finds damaged is
    /// [`StoreError::ViewDamaged`].
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_at(path, &path.with_file_name(VIEW_FILE))
    }

    /// [`Store::open`] with the view file at `view_path` (`blazedb check` verifies a log
    /// whose view is damaged beside a scratch view).
    pub fn open_at(path: &Path, view_path: &Path) -> Result<Self, StoreError> {
        let in_file = |path: &Path| {
            let path = path.to_path_buf();
            move |e| StoreError::File {
                path,
                source: Box::new(e),
            }
        };
        let db = unpanicked(|| Self::open_log(path)).map_err(in_file(path))?;
        let view = unpanicked(|| Self::open_view(view_path)).map_err(|e| {
            if e.is_damage() {
                StoreError::ViewDamaged {
                    path: view_path.to_path_buf(),
                    reason: e.to_string(),
                }
            } else {
                in_file(view_path)(e)
            }
        })?;
        Ok(Self::with(Db::Rw(db), Db::Rw(view)))
    }

    /// A store over `db` (the log) and `view`, nothing staged.
    fn with(db: Db, view: Db) -> Self {
        Self {
            db,
            view,
            staged: Staged::default(),
            flushing: RwLock::default(),
            folds: Default::default(),
            runs_written: Default::default(),
            flushes: Default::default(),
            flushed_records: Default::default(),
            last_fold_us: Default::default(),
            file_records: Default::default(),
            bounded_count: Default::default(),
            run_filters: Default::default(),
            run_probes: Default::default(),
            counting: Default::default(),
            recount: Default::default(),
            closing: Default::default(),
            #[cfg(test)]
            fold_all_next: Default::default(),
            #[cfg(test)]
            flush_delay_ms: Default::default(),
        }
    }

    /// Opens the log at `path` and the view at `view_path` for reading only: nothing in
    /// either file changes (no transaction is committed, as [`Store::open`] commits one to
    /// bring an older layout up to date), so a copy on read-only storage can be checked.
    /// Refused with [`StoreError::NotReadOnly`] where only opening for writing can read the
    /// files: one that needs redb's recovery (the process writing it stopped without closing
    /// it), a layout of another version, a missing view file. Everything that writes is
    /// refused on it ([`StoreError::ReadOnly`]).
    pub fn open_read_only(path: &Path, view_path: &Path) -> Result<Self, StoreError> {
        let open = |path: &Path, cache: usize| {
            let path_buf = path.to_path_buf();
            unpanicked(|| {
                redb::Builder::new()
                    .set_cache_size(cache)
                    .open_read_only(path)
                    .map_err(StoreError::from)
            })
            .map_err(|e| match e {
                StoreError::Redb(redb::Error::RepairAborted) => StoreError::NotReadOnly(format!(
                    "{} was not closed cleanly (its process stopped without closing it): redb \
                     recovers it when it is opened for writing",
                    path_buf.display()
                )),
                StoreError::Redb(redb::Error::Io(io))
                    if io.kind() == std::io::ErrorKind::NotFound =>
                {
                    StoreError::NotReadOnly(format!("{} does not exist", path_buf.display()))
                }
                e => StoreError::File {
                    path: path_buf.clone(),
                    source: Box::new(e),
                },
            })
        };
        let db = open(path, LOG_CACHE_BYTES)?;
        let view = open(view_path, VIEW_CACHE_BYTES).map_err(|e| match e {
            StoreError::File { source, .. } if source.is_damage() => StoreError::ViewDamaged {
                path: view_path.to_path_buf(),
                reason: source.to_string(),
            },
            e => e,
        })?;
        let older_file = |file: &Path, what: &str| {
            StoreError::NotReadOnly(format!(
                "{} {what}: opening it for writing brings it up to date",
                file.display()
            ))
        };
        {
            let txn = db.begin_read()?;
            let schema = match txn.open_table(META) {
                Ok(meta) => meta.get("schema")?.map(|v| v.value().to_vec()),
                Err(redb::TableError::TableDoesNotExist(_)) => None,
                Err(e) => return Err(e.into()),
            };
            if schema.as_deref() != Some(SCHEMA_VERSION) {
                return Err(older_file(path, "holds a log of another version"));
            }
            let tables: Vec<String> = txn.list_tables()?.map(|t| t.name().to_string()).collect();
            let log_tables = [
                BATCHES.name(),
                CHAINS.name(),
                NAMESPACES.name(),
                REVOCATIONS.name(),
                REVOKED_BY.name(),
                DICTS.name(),
            ];
            if !log_tables.iter().all(|t| tables.iter().any(|h| h == t)) {
                return Err(older_file(path, "lacks a table of this version"));
            }
        }
        {
            // What `open_view` would change: older tables, missing ones, stale run filters.
            let txn = view.begin_read()?;
            let tables: Vec<String> = txn.list_tables()?.map(|t| t.name().to_string()).collect();
            let has = |name: &str| tables.iter().any(|t| t == name);
            let current = [
                RECORDS.name(),
                APPLIED.name(),
                RUNS.name(),
                RUN_LIST.name(),
                RUN_FILTERS.name(),
                VIEW_SWEEP.name(),
                VIEW_META.name(),
            ];
            let older = OLD_VIEW_TABLES.iter().any(|t| has(t))
                || has(APPLIED_V2.name())
                || has(APPLIED_V3.name())
                || !current.iter().all(|t| has(t));
            let stale_filters = !older && {
                let meta = txn.open_table(VIEW_META)?;
                let at =
                    |k| -> Result<Option<u64>, StoreError> { Ok(meta.get(k)?.map(|v| v.value())) };
                at("generation")? != at("filters-at")?
            };
            if older || stale_filters {
                return Err(older_file(view_path, "is a view of another version"));
            }
        }
        Ok(Self::with(Db::Ro(db), Db::Ro(view)))
    }

    /// [`Store::open`], but a view file redb finds damaged is moved aside (to
    /// `records.redb.damaged`, replacing an older one) and an empty view made in its place:
    /// every logged batch then counts as unapplied and is applied
    /// again ([`Store::apply_unapplied`]). The view holds
    /// nothing the log does not, so nothing is lost. Returns where the damaged file went.
    pub fn open_moving_damaged_view(path: &Path) -> Result<(Self, Option<PathBuf>), StoreError> {
        let opened = Self::open(path).and_then(|store| {
            // Updating the view failed last time (`mark_view_failed`): damaged too.
            match store.view_failed()? {
                None => Ok(store),
                Some(why) => {
                    let view = path.with_file_name(VIEW_FILE);
                    drop(store);
                    Err(StoreError::ViewDamaged {
                        path: view,
                        reason: format!("updating it failed: {why}"),
                    })
                }
            }
        });
        let moved = match opened {
            Err(StoreError::ViewDamaged { path: view, reason }) => {
                let aside = view.with_file_name(format!("{VIEW_FILE}.damaged"));
                tracing::error!(
                    view = %view.display(),
                    moved_to = %aside.display(),
                    "the view file is damaged ({reason}): moved aside; the records are made \
                     again from the log"
                );
                std::fs::rename(&view, &aside).map_err(|e| StoreError::File {
                    path: view.clone(),
                    source: Box::new(StoreError::Redb(e.into())),
                })?;
                Some(aside)
            }
            other => return other.map(|s| (s, None)),
        };
        let store = Self::open(path)?;
        // The fresh view's watermark is empty: everything is applied again, even if this
        // start stops half way, so the mark can go now.
        store.clear_view_failed()?;
        Ok((store, moved))
    }

    /// Opens (or creates) the log file and moves an older layout to this one.
    fn open_log(path: &Path) -> Result<Database, StoreError> {
        let db = Database::builder()
            .set_cache_size(LOG_CACHE_BYTES)
            .create(path)?;
        let txn = db.begin_write()?;
        {
            let mut meta = txn.open_table(META)?;
            let existing = meta.get("schema")?.map(|v| v.value().to_vec());
            match existing {
                None => {
                    meta.insert("schema", SCHEMA_VERSION)?;
                }
                Some(v) if v == SCHEMA_VERSION => {}
                Some(v) if v == b"2" => {
                    // Every batch moved into pieces, in this one transaction: a crash leaves
                    // the store as it was, at version 2.
                    let old = txn.open_table(BATCHES_V1)?;
                    let mut new = txn.open_table(BATCHES)?;
                    let mut moved = 0u64;
                    for entry in old.iter()? {
                        let (id, bytes) = entry?;
                        put_batch(&mut new, id.value(), bytes.value())?;
                        moved += 1;
                    }
                    drop((old, new));
                    txn.delete_table(BATCHES_V1)?;
                    meta.insert("schema", SCHEMA_VERSION)?;
                    tracing::info!(
                        batches = moved,
                        "log moved to the schema 3 layout (batches in pieces)"
                    );
                }
                Some(v) => {
                    return Err(StoreError::Corrupt(format!(
                        "store schema {:?} is not the supported {:?}",
                        String::from_utf8_lossy(&v),
                        String::from_utf8_lossy(SCHEMA_VERSION)
                    )))
                }
            }
            txn.open_table(BATCHES)?;
            txn.open_table(CHAINS)?;
            txn.open_table(NAMESPACES)?;
            txn.open_table(REVOCATIONS)?;
            txn.open_table(REVOKED_BY)?;
            txn.open_table(DICTS)?;
        }
        txn.commit()?;
        Ok(db)
    }

    /// Lets the free pages of both files go (redb's `compact`: the files shrink; a log of 1M
    /// W ops by a third). Needs the store to itself: nothing staged, no transaction open,
    /// opened for writing (`blazedb compact`, on a stopped node).
    pub fn compact(&mut self) -> Result<(), StoreError> {
        for db in [&mut self.db, &mut self.view] {
            match db {
                Db::Rw(db) => {
                    db.compact()?;
                }
                Db::Ro(_) => return Err(StoreError::ReadOnly),
            }
        }
        Ok(())
    }

    /// Makes an empty view file at `path` (or brings an existing one up to date), for
    /// [`Store::open_read_only`] beside a log whose own view cannot be read.
    pub fn create_view_file(path: &Path) -> Result<(), StoreError> {
        unpanicked(|| Self::open_view(path)).map(drop)
    }

    /// Opens (or creates) the view file and moves an older layout to this one.
    fn open_view(path: &Path) -> Result<Database, StoreError> {
        let view = Database::builder()
            .set_cache_size(VIEW_CACHE_BYTES)
            .create(path)?;
        let txn = view.begin_write()?;
        for old in OLD_VIEW_TABLES {
            let def: TableDefinition<'_, &[u8], &[u8]> = TableDefinition::new(old);
            // Table types differ between the old tables; delete_table only needs the name.
            if txn.delete_table(def).map_err(redb::Error::from)? {
                tracing::info!(
                    table = old,
                    "dropped a view table of an older format: records are rebuilt from the log"
                );
            }
        }
        let tables: Vec<String> = txn.list_tables()?.map(|t| t.name().to_string()).collect();
        let has = |name: &str| tables.iter().any(|t| t == name);
        if has(APPLIED_V3.name()) {
            if has(APPLIED.name()) {
                // A binary that merges runs among themselves wrote after ours: it applied the
                // whole log again into the table and runs of its own. Rather than join three
                // kinds of levels, the view is made again from the log (at start).
                tracing::warn!(
                    "the view file was written by an older binary since: its records are \
                     rebuilt from the log"
                );
                let renamed = UPGRADE_RENAMES.iter().flat_map(|&(old, new)| [old, new]);
                for name in [RECORDS.name(), VIEW_SWEEP.name()]
                    .into_iter()
                    .chain(renamed)
                {
                    let def: TableDefinition<'_, &[u8], &[u8]> = TableDefinition::new(name);
                    txn.delete_table(def).map_err(redb::Error::from)?;
                }
            } else {
                // Upgraded: its runs are ours (a record is the join of the table and every
                // run either way), under the names an older binary does not read.
                for (old, new) in UPGRADE_RENAMES {
                    if has(old) {
                        let old: TableDefinition<'_, &[u8], &[u8]> = TableDefinition::new(old);
                        let new: TableDefinition<'_, &[u8], &[u8]> = TableDefinition::new(new);
                        txn.rename_table(old, new).map_err(redb::Error::from)?;
                    }
                }
            }
        }
        txn.open_table(RECORDS)?;
        {
            let mut applied = txn.open_table(APPLIED)?;
            // A view file from before the runs: its watermark is taken over. One written by
            // such a binary after ours (it applied the whole log again into RECORDS) is too:
            // the higher seq per chain holds, and what our runs hold is joined on read.
            let old = txn.open_table(APPLIED_V2)?;
            for entry in old.iter()? {
                let (ck, seq) = entry?;
                let (ck, seq) = (ck.value(), seq.value());
                if applied.get(ck)?.is_none_or(|v| v.value() < seq) {
                    applied.insert(ck, seq)?;
                }
            }
        }
        txn.delete_table(APPLIED_V2).map_err(redb::Error::from)?;
        txn.open_table(RUNS)?;
        txn.open_table(RUN_LIST)?;
        {
            // Written by a binary that predates the run filters since our last write (it
            // raised the generation without `filters-at`): its runs may be other ones under
            // the same ids, so every filter goes and those runs are looked in on every read
            // until the sweep folds them away.
            let meta = txn.open_table(VIEW_META)?;
            let at = |k| -> Result<Option<u64>, StoreError> { Ok(meta.get(k)?.map(|v| v.value())) };
            if at("generation")? != at("filters-at")? {
                drop(meta);
                if txn.delete_table(RUN_FILTERS).map_err(redb::Error::from)? {
                    tracing::info!(
                        "run filters dropped: the view file was written by an older binary"
                    );
                }
            }
        }
        txn.open_table(RUN_FILTERS)?;
        txn.open_table(VIEW_SWEEP)?;
        // (Also makes the generation's table, which every count opens.)
        bump_generation(&txn)?;
        txn.commit()?;
        Ok(view)
    }

    /// The head of every author chain in every namespace.
    pub fn heads(&self) -> Result<Vec<StoredHead>, StoreError> {
        let txn = self.db.begin_read()?;
        let chains = txn.open_table(CHAINS)?;
        let batches = txn.open_table(BATCHES)?;
        let mut heads: Vec<StoredHead> = Vec::new();
        for entry in chains.iter()? {
            let (k, v) = entry?;
            let (ns, author, seq) = parse_chain_key(k.value())
                .ok_or_else(|| StoreError::Corrupt("chain key".into()))?;
            let id = BatchId(
                v.value()
                    .try_into()
                    .map_err(|_| StoreError::Corrupt("chain value".into()))?,
            );
            // Keys sort by (ns, author, seq): the last entry of each run is its head.
            match heads.last_mut() {
                Some(h) if h.ns == ns && h.author == author => {
                    h.seq = seq;
                    h.id = id;
                }
                _ => heads.push(StoredHead {
                    ns,
                    author,
                    seq,
                    id,
                    hlc_max: Hlc::ZERO,
                }),
            }
        }
        for h in &mut heads {
            // The header is at the front: the first piece holds it.
            let first = batches
                .get(chunk_key(&h.id.0, 0).as_slice())?
                .ok_or_else(|| StoreError::Corrupt(format!("missing batch {}", h.id)))?;
            h.hlc_max = stored_header(first.value())?.hlc_max;
        }
        Ok(heads)
    }

    /// Durably stores verified, chain-checked batches and applies the ops of the effective
    /// ones to the records. Returns the record changes.
    pub fn write_batches(&self, batches: &[VerifiedBatch]) -> Result<Vec<Change>, StoreError> {
        self.append_log(batches)?;
        self.apply(batches, true)
    }

    /// Durably appends batches to the log (one transaction, immediate durability). This is
    /// what a write waits for; records follow through [`Store::apply`].
    pub fn append_log(&self, batches: &[VerifiedBatch]) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        {
            let mut batch_t = txn.open_table(BATCHES)?;
            let mut chain_t = txn.open_table(CHAINS)?;
            let mut revocations = txn.open_table(REVOCATIONS)?;
            let mut revoked_by = txn.open_table(REVOKED_BY)?;
            let mut dicts = txn.open_table(DICTS)?;
            for vb in batches {
                let ns = &vb.header.ns;
                put_batch(&mut batch_t, &vb.id.0[..], &vb.bytes[..])?;
                // Every dictionary a stored batch names is stored with it (to serve it and
                // to verify the batch again).
                if let Some(d) = &vb.dict {
                    if dicts.get(&d.id().0[..])?.is_none() {
                        dicts.insert(&d.id().0[..], d.bytes())?;
                    }
                }
                chain_t.insert(
                    chain_key(ns, &vb.header.author, vb.header.seq).as_slice(),
                    &vb.id.0[..],
                )?;
                // Revocations count whether or not the batch is effective (see the engine).
                for (token, hlc) in vb.ops.revocations() {
                    if let Some(id) = TokenId::from_hex(token) {
                        let k = revocation_key(ns, &id);
                        let old = revocations.get(k.as_slice())?.map(|v| v.value());
                        if old.is_none_or(|o| hlc.0 < o) {
                            revocations.insert(k.as_slice(), hlc.0)?;
                            revoked_by.insert(k.as_slice(), &vb.id.0[..])?;
                        }
                    }
                }
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// Every stored dictionary (to verify stored batches, and for the engine at start-up).
    pub fn dicts(&self) -> Result<DictSet, StoreError> {
        let txn = self.db.begin_read()?;
        let mut set = DictSet::new();
        for entry in txn.open_table(DICTS)?.iter()? {
            let (_, v) = entry?;
            let d =
                Dict::new(v.value().to_vec()).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            set.insert(d);
        }
        Ok(set)
    }

    /// The stored dictionaries whose id starts with one of `refs`.
    pub fn dicts_by_ref(&self, refs: &[DictRef]) -> Result<Vec<Dict>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(DICTS)?;
        let mut out = Vec::new();
        for r in refs {
            for entry in table.range(&r.0[..]..)? {
                let (k, v) = entry?;
                if !k.value().starts_with(&r.0) {
                    break;
                }
                let d = Dict::new(v.value().to_vec())
                    .map_err(|e| StoreError::Corrupt(e.to_string()))?;
                out.push(d);
            }
        }
        Ok(out)
    }

    /// Applies logged batches to the records (effective ones only) and advances the applied
    /// watermark, in one view transaction. `durable: false` skips the fsync: the view is
    /// derived, and after a crash [`Store::apply_unapplied`] finds what to apply again. Ops are
    /// applied record by record in key order (B-tree locality); per record, in batch order.
    pub fn apply(
        &self,
        batches: &[VerifiedBatch],
        durable: bool,
    ) -> Result<Vec<Change>, StoreError> {
        self.apply_with(batches, durable, true)
    }

    /// [`Store::apply`], building the list of changes only if `want_changes` (nobody may be
    /// listening: building a change per op costs more than applying it).
    pub fn apply_with(
        &self,
        batches: &[VerifiedBatch],
        durable: bool,
        want_changes: bool,
    ) -> Result<Vec<Change>, StoreError> {
        let mut txn = self.view.begin_write()?;
        if !durable {
            txn.set_durability(redb::Durability::None)
                .map_err(|e| StoreError::Corrupt(format!("durability: {e}")))?;
        }
        let mut changes = Vec::new();
        {
            let mut records = txn.open_table(RECORDS)?;
            let mut applied = txn.open_table(APPLIED)?;
            // The runs are left as they are (a record is the join of every level), but a
            // change event carries the whole record, so they are read for it.
            let run_table = txn.open_table(RUNS)?;
            let runs = self.runs(&txn.open_table(RUN_LIST)?, &txn.open_table(RUN_FILTERS)?)?;
            // Group the ops by record so each record is read and written once.
            let views = batches
                .iter()
                .map(ops_view)
                .collect::<Result<Vec<_>, _>>()?;
            let mut by_record: BTreeMap<Vec<u8>, Vec<(usize, usize)>> = BTreeMap::new();
            for (bi, vb) in batches.iter().enumerate() {
                let ck = chain_prefix(&vb.header.ns, &vb.header.author);
                if applied
                    .get(ck.as_slice())?
                    .is_some_and(|v| v.value() >= vb.header.seq)
                {
                    continue; // already applied (replayed after a crash)
                }
                applied.insert(ck.as_slice(), vb.header.seq)?;
                if !vb.effective {
                    continue;
                }
                let view = &views[bi];
                for (oi, op) in view.ops().iter().enumerate() {
                    by_record
                        .entry(record_key(&vb.header.ns, view.collection(op), view.key(op)))
                        .or_default()
                        .push((bi, oi));
                }
            }
            // Each batch's author DID and id in text, made once per batch, not per op.
            let mut names: Vec<Option<(String, String)>> = vec![None; batches.len()];
            for (rk, ops) in by_record {
                let mut state = match records.get(rk.as_slice())? {
                    Some(v) => decode_state(v.value())?,
                    None => RecordState::default(),
                };
                for (bi, oi) in &ops {
                    let view = &views[*bi];
                    state.apply_view(view, &view.ops()[*oi], batches[*bi].header.author);
                }
                records.insert(rk.as_slice(), encode_state(&state).as_slice())?;
                if !want_changes {
                    continue;
                }
                let fields = if runs.is_empty() {
                    state.visible()
                } else {
                    let mut whole = state.clone();
                    run_states(&run_table, &runs, &rk, |held| {
                        whole.merge(&decode_state(held)?);
                        Ok(())
                    })?;
                    whole.visible()
                };
                for (bi, oi) in ops {
                    let vb = &batches[bi];
                    let (view, op) = (&views[bi], &views[bi].ops()[oi]);
                    let (author, batch) = names[bi]
                        .get_or_insert_with(|| (vb.author.to_did(), vb.id.to_hex()))
                        .clone();
                    changes.push(Change {
                        ns: vb.header.ns.clone(),
                        collection: view.collection(op).to_string(),
                        key: view.key(op).to_string(),
                        fields: fields.clone(),
                        author,
                        batch,
                    });
                }
            }
        }
        bump_generation(&txn)?;
        txn.commit()?;
        Ok(changes)
    }

    /// Applies logged batches to the in-memory delta (effective ones only), advancing the
    /// applied watermark there: what the materializer does per job. Nothing is read from the
    /// view file unless `want_changes` (a change event carries the record's whole visible
    /// state). The view file catches up through [`Store::freeze`] and [`Store::flush_frozen`].
    /// Returns the record changes (if wanted).
    pub fn stage(
        &self,
        batches: Vec<VerifiedBatch>,
        want_changes: bool,
    ) -> Result<Vec<Change>, StoreError> {
        // The view file's watermarks are read only for a chain neither delta has seen: theirs
        // are newer. (Under sustained ingest, that read of the file per call could wait
        // behind a running flush's writes: a 5k-op job took up to ~1.7 s to stage, and the
        // writers behind it waited as long.)
        let mut applied_t = None;
        let mut changes = Vec::new();
        for vb in batches {
            let ck = chain_prefix(&vb.header.ns, &vb.header.author);
            let seq = vb.header.seq;
            let done = {
                let staged = self.staged.meta.read().applied.get(&ck).copied();
                let flushing = read(&self.flushing)
                    .as_ref()
                    .and_then(|f| f.meta.applied.get(&ck).copied());
                match staged.max(flushing) {
                    Some(d) => Some(d),
                    None => {
                        let t = match &mut applied_t {
                            Some(t) => t,
                            None => applied_t.insert(self.view.begin_read()?.open_table(APPLIED)?),
                        };
                        t.get(ck.as_slice())?.map(|v| v.value())
                    }
                }
            };
            if done.is_some_and(|d| d >= seq) {
                continue; // already applied (replayed after a crash)
            }
            // Read in place: names and values are copied only into the states they land in.
            let view = ops_view(&vb)?;
            // (collection, key) of each op, for change events.
            let mut touched: Vec<(String, String, Vec<u8>)> = Vec::new();
            {
                // Placed before the lock is taken: listings and counts wait for it.
                let placed = vb
                    .effective
                    .then(|| self.place_ops(view, &vb.header.ns, want_changes, &mut touched));
                let mut meta = self.staged.meta.write();
                meta.applied.insert(ck, seq);
                if let Some(placed) = &placed {
                    meta.bytes += self.stage_placed(view, &vb.header.author, placed)?;
                }
                // Handed straight to a reader waiting for it, if any (a listing or a count).
                parking_lot::RwLockWriteGuard::unlock_fair(meta);
            }
            if !touched.is_empty() {
                let (author, batch) = (vb.author.to_did(), vb.id.to_hex());
                for (collection, key, rk) in touched {
                    let fields = self.record_state(&rk)?.and_then(|s| s.visible());
                    changes.push(Change {
                        ns: vb.header.ns.clone(),
                        collection,
                        key,
                        fields,
                        author: author.clone(),
                        batch: batch.clone(),
                    });
                }
            }
        }
        Ok(changes)
    }

    /// Places the ops of one effective batch for [`Store::stage_placed`], under no lock:
    /// every op's record key (the key's `ns collection` prefix written again only when the
    /// collection changes) and its hash, in one pass over the payload, then grouped by
    /// shard, in batch order within each (ops on one record stay in order). Adds each op's
    /// (collection, key, record key) to `touched` if `want_changes`.
    fn place_ops(
        &self,
        view: &PayloadView<'_>,
        ns: &str,
        want_changes: bool,
        touched: &mut Vec<(String, String, Vec<u8>)>,
    ) -> PlacedOps {
        let ops = view.ops();
        let (mut keys, mut at) = (Vec::with_capacity(ops.len() * 32), Vec::new());
        at.reserve(ops.len());
        let mut per_shard = [0usize; SHARDS];
        let (mut prefix_of, mut prefix) = (None, Vec::new());
        for (i, op) in ops.iter().enumerate() {
            let collection = view.collection(op);
            if prefix_of != Some(collection) {
                prefix.clear();
                write_record_key(&mut prefix, ns, collection, "");
                prefix_of = Some(collection);
            }
            let start = keys.len();
            keys.extend_from_slice(&prefix);
            keys.extend_from_slice(view.key(op).as_bytes());
            let hash = self.staged.hasher.hash_one(&keys[start..]);
            per_shard[shard_of(hash)] += 1;
            at.push(Placed {
                hash,
                key: (start as u32, keys.len() as u32),
                op: i as u32,
            });
            if want_changes {
                touched.push((
                    collection.to_string(),
                    view.key(op).to_string(),
                    keys[start..].to_vec(),
                ));
            }
        }
        // Grouped by shard, in batch order within each (a counting sort), and copied: each
        // group is then read in order (read through indices, the entries missed the cache).
        let mut first = [0usize; SHARDS + 1];
        for s in 0..SHARDS {
            first[s + 1] = first[s] + per_shard[s];
        }
        let mut grouped = vec![Placed::default(); at.len()];
        let mut next = first;
        for p in &at {
            let s = shard_of(p.hash);
            grouped[next[s]] = *p;
            next[s] += 1;
        }
        PlacedOps {
            keys,
            grouped,
            first,
        }
    }

    /// Stages a batch's placed ops ([`Store::place_ops`]) into the shards' tables (the
    /// caller holds the delta's `meta` for writing), taking each shard's lock only for its
    /// own ops. Within a shard each update prefetches the table's slot `SLOT_AHEAD` ops
    /// ahead and the record's block `BLOCK_AHEAD` ops ahead, so that the cache misses of
    /// many records are in flight together instead of being waited for one at a time.
    /// Returns the bytes the delta grew by.
    fn stage_placed(
        &self,
        view: &PayloadView<'_>,
        author: &[u8; 32],
        placed: &PlacedOps,
    ) -> Result<usize, StoreError> {
        let buf = &mut Vec::with_capacity(256);
        let (ops, keys) = (view.ops(), &placed.keys);
        let (grouped, first) = (&placed.grouped, &placed.first);
        let mut grew = 0;
        for s in 0..SHARDS {
            let group = &grouped[first[s]..first[s + 1]];
            if group.is_empty() {
                continue;
            }
            let mut map = self.staged.shards[s].write();
            // No growth within the group: the slots prefetched stay where they are.
            map.reserve(group.len());
            for p in group.iter().take(SLOT_AHEAD) {
                map.prefetch_slot(p.hash);
            }
            for p in group.iter().take(BLOCK_AHEAD) {
                map.prefetch_block(p.hash);
            }
            for (j, p) in group.iter().enumerate() {
                if let Some(ahead) = group.get(j + SLOT_AHEAD) {
                    map.prefetch_slot(ahead.hash);
                    prefetch((&ops[ahead.op as usize] as *const OpView<'_>).cast());
                }
                if let Some(ahead) = group.get(j + BLOCK_AHEAD) {
                    map.prefetch_block(ahead.hash);
                    // The ops' own bytes too: taken shard by shard, they are read 1 in 8
                    // across the payload, which the hardware does not see coming. The op
                    // itself first, then (in cache by then) its key and fields.
                    prefetch(keys[ahead.key.0 as usize..].as_ptr());
                    let op = &ops[ahead.op as usize];
                    prefetch(view.key(op).as_ptr());
                    let fields = view.field_entries(op);
                    prefetch_lines(fields.as_ptr().cast(), std::mem::size_of_val(fields));
                }
                if let Some(ahead) = group.get(j + BLOCK_AHEAD / 2) {
                    for (_, v) in view.field_entries(&ops[ahead.op as usize]) {
                        prefetch(v.0.as_ptr());
                    }
                }
                let hash = p.hash;
                let op = &ops[p.op as usize];
                let rk = &keys[p.key.0 as usize..p.key.1 as usize];
                let updated = map.update_hashed(hash, rk, buf, |held, out| {
                    match held {
                        // A newer overwrite (or delete) of all of it: no decode.
                        Some(held) if !record_codec::dominated_by(held, view, op) => {
                            let mut state = decode_state(held)?;
                            state.apply_view(view, op, *author);
                            record_codec::encode_state(&state, out);
                        }
                        _ => record_codec::encode_op_state(view, op, author, out),
                    }
                    Ok::<(), StoreError>(())
                })?;
                grew += match updated {
                    // What a state that outgrew its block took from the ends of the arena's
                    // chunks (its old block is reused later).
                    Updated::Replaced { grown, .. } => grown,
                    Updated::Inserted { state_len } => {
                        rk.len() + state_len + STAGED_RECORD_OVERHEAD_BYTES
                    }
                };
            }
            // Handed straight to a reader waiting for it, if any. Released plainly and
            // taken again at once, the lock went back to this thread ahead of the readers
            // woken for it, batch after batch: a `get` during a catch-up (B6) measured up
            // to 133-149 ms waiting for it.
            parking_lot::RwLockWriteGuard::unlock_fair(map);
        }
        Ok(grew)
    }

    /// View flushes so far that folded part of the runs (and of the delta) into the
    /// records' table ([`Fold`]).
    pub fn view_folds(&self) -> u64 {
        self.folds.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// View flushes so far that wrote their delta as a run beside the records' table.
    pub fn view_runs_written(&self) -> u64 {
        self.runs_written.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// View flushes committed so far, and the records they wrote (a record written by two
    /// flushes counts twice): what sustained ingest pays to keep the view file current.
    pub fn view_flushes(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.flushes.load(Relaxed),
            self.flushed_records.load(Relaxed),
        )
    }

    /// Approximate memory held by the staged delta, in bytes.
    pub fn staged_bytes(&self) -> usize {
        self.staged.meta.read().bytes
    }

    /// The bytes the staged delta's record table holds: its slots and the chunks its records'
    /// blocks live in (whole chunks, filled or not; the allocator's own overhead on those few
    /// large allocations not counted). For benchmarks and diagnostics.
    pub fn staged_heap_bytes(&self) -> usize {
        self.staged.read_all().iter().map(|m| m.heap_bytes()).sum()
    }

    /// Whether anything is staged or being flushed (the view file is behind).
    pub fn view_pending(&self) -> bool {
        let meta = self.staged.meta.read();
        !meta.applied.is_empty()
            || self.staged.read_all().iter().any(|m| !m.is_empty())
            || read(&self.flushing).is_some()
    }

    /// Freezes the staged delta for [`Store::flush_frozen`] and starts an empty one. Returns
    /// false (and does nothing) if a frozen delta is still being flushed or nothing is staged.
    pub fn freeze(&self) -> bool {
        let mut meta = self.staged.meta.write();
        let mut shards: [_; SHARDS] = std::array::from_fn(|i| self.staged.shards[i].write());
        let mut flushing = write(&self.flushing);
        if flushing.is_some() || (shards.iter().all(|m| m.is_empty()) && meta.applied.is_empty()) {
            return false;
        }
        // The next delta starts with room for as many records as this one reached: under
        // sustained ingest it then never rehashes (each doubling of a table of hundreds of MB
        // faulted in and zeroed fresh pages: ~10% of the materializer's time in B3); after a
        // small or idle delta it starts small.
        // (Per shard.)
        let records = std::array::from_fn(|i| {
            let mut next = DeltaMap::with_hasher(self.staged.hasher.clone());
            next.reserve(shards[i].len());
            std::mem::replace(&mut *shards[i], next)
        });
        let meta = std::mem::take(&mut *meta);
        *flushing = Some(Arc::new(Delta { records, meta }));
        true
    }

    /// How long the last committed flush spent folding a slice of the file's key space into
    /// the records' table ([`Fold`]; zero if it folded nothing). That part grows with the
    /// file, not with the delta: the materializer's pacing estimates a flush's time from it
    /// and from the rest of the last one's time per byte.
    pub fn last_fold(&self) -> std::time::Duration {
        std::time::Duration::from_micros(
            self.last_fold_us.load(std::sync::atomic::Ordering::Relaxed),
        )
    }

    /// Writes the frozen delta into the view file in one transaction (records in key order:
    /// each read once, joined with its delta, written once; watermarks advanced), then drops
    /// it. `durable` fsyncs the commit (otherwise redb's `Durability::None`: after a crash the
    /// watermark tells [`Store::apply_unapplied`] what to apply again). Returns the records written.
    pub fn flush_frozen(&self, durable: bool) -> Result<usize, StoreError> {
        let Some(delta) = read(&self.flushing).clone() else {
            return Ok(0);
        };
        let started = std::time::Instant::now();
        #[cfg(test)]
        std::thread::sleep(std::time::Duration::from_millis(
            self.flush_delay_ms
                .load(std::sync::atomic::Ordering::Relaxed),
        ));
        let mut txn = self.view.begin_write()?;
        if !durable {
            txn.set_durability(redb::Durability::None)
                .map_err(|e| StoreError::Corrupt(format!("durability: {e}")))?;
        }
        let (mut new_run, mut dropped, mut folded) = (None, Vec::new(), 0u64);
        // Where the time went, for the debug log: the sort, the fold, the run.
        let sort_ms: f64;
        let (mut fold_ms, mut run_ms) = (0.0, 0.0);
        let ms_since = |t: std::time::Instant| t.elapsed().as_secs_f64() * 1e3;
        let mode = {
            let mut records = txn.open_table(RECORDS)?;
            let mut applied = txn.open_table(APPLIED)?;
            let mut run_table = txn.open_table(RUNS)?;
            let mut run_index = txn.open_table(RUN_LIST)?;
            let mut filter_table = txn.open_table(RUN_FILTERS)?;
            let runs = run_list(&run_index)?;
            let mut buf = Vec::with_capacity(512);
            // Key order, every way ([`flush_mode`]). A delta dense among the table's records
            // is written in two parts. A slice of the key space, from where the last fold
            // ended, is folded into the table: the table's records there are removed and
            // written again in order, each joined with every run's and the delta's records
            // there, and the runs' records there removed (a run left empty goes). The rest of
            // the delta becomes a run of its own beside the table ([`RUNS`]: one append of
            // its records, whatever the file's size). A small or appending delta is spliced:
            // one sweep of a cursor over the records, from the first key the delta holds:
            // records between the delta's keys are stepped over (a leaf read each); a delta
            // key the file holds is joined with it and put back in its place; a new one is
            // inserted at the cursor. No record is looked up from the tree's root.
            let sorting = std::time::Instant::now();
            let keyed = sorted_records(&delta.records);
            sort_ms = ms_since(sorting);
            let file_len = records.len()?;
            let interleaved = match records.last()? {
                Some((last, _)) => {
                    let last = last.value();
                    keyed.partition_point(|(rk, _)| *rk <= last)
                }
                None => 0,
            };
            let mode = flush_mode(&runs, interleaved as u64, file_len);
            // (Tests reach the backstop, a fold of everything, without seventeen runs.)
            #[cfg(test)]
            let mode = match mode {
                FlushMode::Run { .. }
                    if self
                        .fold_all_next
                        .swap(false, std::sync::atomic::Ordering::Relaxed) =>
                {
                    FlushMode::Run { fold: Fold::All }
                }
                mode => mode,
            };
            match mode {
                FlushMode::Run { fold } => {
                    // The fold and the runs it takes records from are read from a snapshot of
                    // the file as this transaction found it (no other write can commit
                    // meanwhile: redb has one writer at a time), while this one writes.
                    let folding = std::time::Instant::now();
                    let snapshot = self.view.begin_read()?;
                    let held_table = snapshot.open_table(RECORDS)?;
                    let held_runs = snapshot.open_table(RUNS)?;
                    let mut sweep = txn.open_table(VIEW_SWEEP)?;
                    let lo = match fold {
                        Fold::All => Vec::new(),
                        Fold::Slice { .. } => sweep
                            .get("from")?
                            .map(|v| v.value().to_vec())
                            .unwrap_or_default(),
                    };
                    // Where the fold ends: the first key past `file_records` of the file's
                    // records from `lo`, or the end of the key space.
                    let hi = match fold {
                        Fold::All => None,
                        Fold::Slice { file_records } => {
                            let mut levels = levels(&held_table, &held_runs, &runs, &lo, None)?;
                            let (mut passed, mut hi) = (0u64, None);
                            walk_levels(&mut levels, std::iter::empty(), |k, states| {
                                if passed >= file_records {
                                    hi = Some(k.to_vec());
                                    return Ok(false);
                                }
                                passed += states.len() as u64;
                                Ok(true)
                            })?;
                            hi
                        }
                    };
                    let below_hi = |rk: &[u8]| hi.as_deref().is_none_or(|h| rk < h);
                    let start = keyed.partition_point(|(rk, _)| *rk < lo.as_slice());
                    let stop = start + keyed[start..].partition_point(|(rk, _)| below_hi(rk));
                    // The fold: the table's records in [lo, hi) go, and the same range is
                    // written again in key order, each record joined with what the runs and
                    // the delta hold for it (an ordered insert into the gap costs about what
                    // an append does; a removal and insert per record, far more).
                    match &hi {
                        Some(h) => records.retain_in(lo.as_slice()..h.as_slice(), |_, _| false)?,
                        None => records.retain_in(lo.as_slice().., |_, _| false)?,
                    }
                    {
                        let mut levels =
                            levels(&held_table, &held_runs, &runs, &lo, hi.as_deref())?;
                        let mut cursor = records.lower_bound_mut(Bound::Included(lo.as_slice()))?;
                        let deltas = (start..stop).map(|i| {
                            prefetch_key_ahead(&keyed, i);
                            (keyed[i].0, Some(keyed[i].1))
                        });
                        let mut tmp = Vec::with_capacity(512);
                        walk_levels(&mut levels, deltas, |k, states| {
                            cursor.insert_before(k, join_all(states, &mut buf, &mut tmp)?)?;
                            folded += 1;
                            Ok(true)
                        })?;
                        cursor.close()?;
                    }
                    // The runs' records in [lo, hi) are in the table now: they go, and a run
                    // left empty goes with its filter.
                    dropped = remove_run_range(
                        &mut run_table,
                        &mut run_index,
                        &mut filter_table,
                        &runs,
                        &lo,
                        hi.as_deref(),
                    )?;
                    match &hi {
                        Some(h) => sweep.insert("from", h.as_slice())?,
                        None => sweep.remove("from")?,
                    };
                    fold_ms = ms_since(folding);
                    let running = std::time::Instant::now();
                    // The rest of the delta, before and past the fold: a run of its own.
                    let rest = (0..start).chain(stop..keyed.len());
                    let rest_len = (start + keyed.len() - stop) as u64;
                    if rest_len > 0 {
                        // Ids are never reused in a file (so a filter held in memory for one
                        // never stands for another run).
                        let mut meta = txn.open_table(VIEW_META)?;
                        let id = runs.last().map_or(1, |&(id, _)| id + 1).max(
                            meta.get("next-run")?
                                .map_or(1, |v| u32::try_from(v.value()).unwrap_or(u32::MAX)),
                        );
                        meta.insert("next-run", u64::from(id) + 1)?;
                        drop(meta);
                        let mut filter = RunFilter::with_capacity(rest_len);
                        let mut key = Vec::with_capacity(256);
                        run_key(id, &[], &mut key);
                        // Past every key of the table: the run is appended.
                        let mut cursor =
                            run_table.lower_bound_mut(Bound::Included(key.as_slice()))?;
                        for i in rest {
                            prefetch_key_ahead(&keyed, i);
                            let (rk, d) = keyed[i];
                            filter.insert(rk);
                            run_key(id, rk, &mut key);
                            cursor.insert_before(key.as_slice(), d)?;
                        }
                        cursor.close()?;
                        run_index.insert(id, rest_len)?;
                        filter_table.insert(id, filter.encode().as_slice())?;
                        new_run = Some((id, Arc::new(filter)));
                    }
                    run_ms = ms_since(running);
                }
                FlushMode::Splice => {
                    if let Some((first, _)) = keyed.first() {
                        let mut cursor = records.lower_bound_mut(Bound::Included(*first))?;
                        for (i, &(rk, d)) in keyed.iter().enumerate() {
                            prefetch_key_ahead(&keyed, i);
                            let held = loop {
                                let next = cursor.peek_next()?;
                                match next.as_ref().map(|(k, _)| k.value().cmp(rk)) {
                                    Some(std::cmp::Ordering::Less) => {
                                        drop(next);
                                        cursor.next()?;
                                    }
                                    Some(std::cmp::Ordering::Equal) => {
                                        break next.map(|(_, v)| v.value().to_vec());
                                    }
                                    _ => break None,
                                }
                            };
                            match held {
                                Some(old) => {
                                    buf.clear();
                                    join_states(&old, d, &mut buf)?;
                                    cursor.remove_next()?;
                                    cursor.insert_before(rk, buf.as_slice())?;
                                }
                                None => cursor.insert_before(rk, d)?,
                            }
                        }
                        cursor.close()?;
                    }
                }
            }
            for (ck, seq) in &delta.meta.applied {
                let old = applied.get(ck.as_slice())?.map(|v| v.value());
                if old.is_none_or(|o| o < *seq) {
                    applied.insert(ck.as_slice(), *seq)?;
                }
            }
            mode
        };
        bump_generation(&txn)?;
        let committing = std::time::Instant::now();
        txn.commit()?;
        self.last_fold_us
            .store((fold_ms * 1e3) as u64, std::sync::atomic::Ordering::Relaxed);
        tracing::debug!(
            records = delta.shards().len(),
            ?mode,
            folded,
            runs_gone = dropped.len(),
            ms = ms_since(started),
            sort_ms,
            fold_ms,
            run_ms,
            commit_ms = ms_since(committing),
            "view flush: committed"
        );
        {
            let mut filters = self.run_filters.lock().unwrap_or_else(|e| e.into_inner());
            for id in &dropped {
                filters.remove(id);
            }
            if let Some((id, filter)) = new_run.take() {
                filters.insert(id, Some(filter));
                self.runs_written
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
        {
            use std::sync::atomic::Ordering::Relaxed;
            if folded > 0 {
                self.folds.fetch_add(1, Relaxed);
            }
            self.flushes.fetch_add(1, Relaxed);
            self.flushed_records
                .fetch_add(delta.shards().len() as u64, Relaxed);
        }
        *write(&self.flushing) = None;
        Ok(delta.shards().len())
    }

    /// Applies every logged batch the records lack (after a crash, a stop with work queued,
    /// or into a view made again), read a window at a time (at most
    /// [`UNAPPLIED_WINDOW_BATCHES`], about [`UNAPPLIED_WINDOW_BYTES`]) and staged into the
    /// in-memory delta as the materializer stages; the delta is written into the view file
    /// as the flusher writes it (records in key order, each once) whenever it reaches
    /// [`REPLAY_FLUSH_BYTES`], and at the end durably. Applying each window straight to the
    /// file instead (a random-key B-tree update per op) took 12 s for a view made again from
    /// 1M W ops; this, 1.7 s, at a lower peak (450 against 476 MB). `heads` are the log's
    /// chain heads ([`Store::heads`]). Returns the batches applied.
    pub fn apply_unapplied(&self, heads: &[StoredHead]) -> Result<u64, StoreError> {
        self.apply_unapplied_in(heads, UNAPPLIED_WINDOW_BATCHES, REPLAY_FLUSH_BYTES)
    }

    /// [`Store::apply_unapplied`], `window` batches at most at a time, writing the staged
    /// delta into the view file whenever it reaches `flush_bytes`.
    fn apply_unapplied_in(
        &self,
        heads: &[StoredHead],
        window: u32,
        flush_bytes: usize,
    ) -> Result<u64, StoreError> {
        // Nothing may be staged beside it (no materializer runs yet): the delta it fills is
        // flushed whole, and its watermark must be the log's.
        debug_assert!(!self.view_pending(), "replaying beside a staged delta");
        let given = self.for_each_unapplied(heads, window, |chunk| {
            self.stage(chunk, false)?;
            if self.staged_bytes() >= flush_bytes {
                self.freeze();
                self.flush_frozen(false)?;
            }
            Ok(())
        })?;
        // The last flush is durable: it makes every earlier one durable too.
        self.freeze();
        self.flush_frozen(true)?;
        Ok(given)
    }

    /// Logged batches not yet applied to the records, verified, in chain order, with their
    /// effectiveness under the namespace's revocations, all at once (tests compare them;
    /// the node streams them with [`Store::apply_unapplied`]).
    #[cfg(test)]
    pub fn unapplied(&self, heads: &[StoredHead]) -> Result<Vec<VerifiedBatch>, StoreError> {
        let mut out = Vec::new();
        self.for_each_unapplied(heads, u32::MAX, |batches| {
            out.extend(batches);
            Ok(())
        })?;
        Ok(out)
    }

    /// [`Store::apply_unapplied`], handed to `f` at most `window` batches (and about
    /// [`UNAPPLIED_WINDOW_BYTES`]) at a time, so that a start after a crash, or with a view
    /// made again from a large log, never holds the whole backlog in memory. Returns how
    /// many batches `f` was given.
    fn for_each_unapplied(
        &self,
        heads: &[StoredHead],
        window: u32,
        mut f: impl FnMut(Vec<VerifiedBatch>) -> Result<(), StoreError>,
    ) -> Result<u64, StoreError> {
        let done: Vec<u64> = {
            let vtxn = self.view.begin_read()?;
            let applied = vtxn.open_table(APPLIED)?;
            let mut done = Vec::with_capacity(heads.len());
            for h in heads {
                let at = applied.get(chain_prefix(&h.ns, &h.author).as_slice())?;
                done.push(at.map_or(0, |v| v.value()));
            }
            done
        };
        let dicts = self.dicts()?;
        let mut given = 0u64;
        for (h, done) in heads.iter().zip(done) {
            if done >= h.seq {
                continue;
            }
            let revocations = self.revocations(&h.ns)?;
            let mut next = done + 1;
            while next <= h.seq {
                let range = ChainRange {
                    ns: &h.ns,
                    author: &h.author,
                    from_seq: next,
                    limit: window.max(1),
                    max_bytes: UNAPPLIED_WINDOW_BYTES,
                    until: None,
                };
                let read = self.chain_range_with(range, false)?.0;
                if read.is_empty() {
                    break;
                }
                next += read.len() as u64;
                let mut batches = Vec::with_capacity(read.len());
                for bytes in read {
                    let mut vb = blazedb_protocol::batch::verify_with(bytes, &dicts)
                        .map_err(|e| StoreError::Corrupt(e.to_string()))?;
                    vb.effective = blazedb_protocol::engine::batch_effective(&vb, &revocations);
                    batches.push(vb);
                }
                given += batches.len() as u64;
                f(batches)?;
            }
        }
        Ok(given)
    }

    /// Whether the view holds changes the log does not: a chain the view applied further
    /// than the log holds it (`heads`: the log's, [`Store::heads`]), which happens only when
    /// the log was lost or replaced by an older copy. Such a view must not be trusted: its
    /// watermark would skip the chain's next batches, so writes acknowledged from then on
    /// would never show in the records. `Some` names the first such chain. The node refuses
    /// to start on it ([`StoreError::ViewAheadOfLog`]); `blazedb repair` makes the view again
    /// from the log.
    pub fn view_ahead_of_log(&self, heads: &[StoredHead]) -> Result<Option<String>, StoreError> {
        let logged: std::collections::HashMap<Vec<u8>, u64> = heads
            .iter()
            .map(|h| (chain_prefix(&h.ns, &h.author), h.seq))
            .collect();
        let txn = self.view.begin_read()?;
        for entry in txn.open_table(APPLIED)?.iter()? {
            let (k, applied) = entry?;
            let (k, applied) = (k.value(), applied.value());
            let held = logged.get(k).copied().unwrap_or(0);
            if applied > held {
                let chain = match k.split_first() {
                    Some((&n, rest)) if rest.len() == n as usize + 32 => {
                        let ns = String::from_utf8_lossy(&rest[..n as usize]);
                        let author = blazedb_identity::PublicKey::from_bytes(&rest[n as usize..])
                            .map_or_else(|_| hex::encode(&rest[n as usize..]), |a| a.to_did());
                        format!("namespace {ns}, author {author}")
                    }
                    _ => format!("chain {}", hex::encode(k)),
                };
                return Ok(Some(format!(
                    "{chain}: applied through seq {applied}, the log holds {held}"
                )));
            }
        }
        Ok(None)
    }

    /// Stored record states in the view file (the records' table and the runs: a record held
    /// in several counts once for each) and their bytes.
    pub fn view_size(&self) -> Result<(u64, u64), StoreError> {
        let txn = self.view.begin_read()?;
        let (mut n, mut bytes) = (0u64, 0u64);
        for table in [RECORDS, RUNS] {
            for entry in txn.open_table(table)?.iter()? {
                let (_, v) = entry?;
                n += 1;
                bytes += v.value().len() as u64;
            }
        }
        Ok((n, bytes))
    }

    /// Makes every applied view transaction durable (an empty durable commit).
    pub fn sync_view(&self) -> Result<(), StoreError> {
        let txn = self.view.begin_write()?;
        txn.commit()?;
        Ok(())
    }

    /// A record's visible fields, or `None` if it does not exist.
    pub fn get(&self, ns: &str, collection: &str, key: &str) -> Result<Option<Fields>, StoreError> {
        let rk = record_key(ns, collection, key);
        Ok(self.record_state(&rk)?.and_then(|s| s.visible()))
    }

    /// Whether the log holds `b` (a commit is visible only once it is durable).
    pub fn logged(&self, b: &Unstaged) -> Result<bool, StoreError> {
        let txn = self.db.begin_read()?;
        let chains = txn.open_table(CHAINS)?;
        Ok(chains
            .get(chain_key(&b.ns, &b.author, b.seq).as_slice())?
            .is_some())
    }

    /// [`Store::get`] with the ops on this record of `unstaged` (batches logged and not yet
    /// staged, oldest first: [`crate::materializer::MatSync::unstaged_for_read`], taken
    /// before this call) joined to it, as staging them will. An op joined again where it was
    /// staged since changes nothing (a join is idempotent).
    pub fn get_joining(
        &self,
        ns: &str,
        collection: &str,
        key: &str,
        unstaged: &[Arc<[Unstaged]>],
    ) -> Result<Option<Fields>, StoreError> {
        let ops = kept_ops(unstaged, ns, collection, KeptKeys::Exactly(key))?;
        let state = self.record_state(&record_key(ns, collection, key))?;
        Ok(join_kept(state, &ops).and_then(|s| s.visible()))
    }

    /// [`Store::list`] with the ops of `unstaged` on records in its range joined to them, as
    /// [`Store::get_joining`] does. Only the `kept_max` smallest keys those ops touch are
    /// joined (each record is read whole); the listing is then exact below the next key they
    /// touch (the cut), and `None` (nothing more read) where fewer than `limit` records lie
    /// below it: the caller waits for the materializer instead. Each record is at least as
    /// new as `unstaged`.
    pub fn list_joining(
        &self,
        ns: &str,
        collection: &str,
        prefix: &str,
        limit: usize,
        unstaged: &[Arc<[Unstaged]>],
        kept_max: usize,
    ) -> Result<Option<Vec<(String, Fields)>>, StoreError> {
        // The kept ops of the smallest keys touched; `cut`: the smallest key touched and left
        // out. It only falls, so every touched key below it is in `by_key`, with all its ops.
        let mut by_key: BTreeMap<&str, Vec<KeptOp<'_>>> = BTreeMap::new();
        let mut cut: Option<&str> = None;
        each_kept_op(
            unstaged,
            ns,
            collection,
            KeptKeys::Prefixed(prefix),
            |(view, op, author)| {
                let key = view.key(op);
                if cut.is_some_and(|c| key >= c) {
                    return;
                }
                by_key.entry(key).or_default().push((view, op, author));
                if by_key.len() > kept_max {
                    cut = by_key.pop_last().map(|(k, _)| k);
                }
            },
        )?;
        // The records the kept ops touch, whole; then the listing, long enough that those
        // taken out of it leave `limit` (it holds every other record in range up to there).
        let rks: Vec<Vec<u8>> = by_key
            .keys()
            .map(|key| record_key(ns, collection, key))
            .collect();
        let mut joined = BTreeMap::new();
        let mut kept = by_key.into_iter();
        self.record_states(rks.iter().map(Vec::as_slice), |state| {
            let Some((key, ops)) = kept.next() else {
                return Ok(());
            };
            let state = join_kept(state, &ops);
            joined.insert(key.to_string(), state.and_then(|s| s.visible()));
            Ok(())
        })?;
        let listed = self.list(ns, collection, prefix, limit.saturating_add(joined.len()))?;
        let mut out: BTreeMap<String, Fields> = listed
            .into_iter()
            .filter(|(k, _)| !joined.contains_key(k))
            .collect();
        out.extend(joined.into_iter().filter_map(|(k, f)| Some((k, f?))));
        let below: Vec<(String, Fields)> = out
            .into_iter()
            .take_while(|(k, _)| cut.is_none_or(|c| k.as_str() < c))
            .take(limit)
            .collect();
        Ok((cut.is_none() || below.len() == limit).then_some(below))
    }

    /// A record's whole state: staged delta, then the one being flushed, then the view file,
    /// joined. This order is what makes it exact while the materializer freezes and flushes
    /// concurrently: a delta moves staged → flushing → file, so looking in that order cannot
    /// miss it, at worst sees it twice (a join is idempotent).
    fn record_state(&self, rk: &[u8]) -> Result<Option<RecordState>, StoreError> {
        let mut state = None;
        self.record_states([rk], |s| {
            state = s;
            Ok(())
        })?;
        Ok(state)
    }

    /// [`Store::record_state`] of each of `rks`, in order, handed to `each`: the locks taken
    /// once for all of them (during a catch-up, taking a shard's lock can wait a
    /// millisecond or so each time), the staged shards holding them held throughout (so
    /// nothing moves from them to the delta being flushed meanwhile: [`Store::freeze`]
    /// takes every shard), the one being flushed read before the file.
    fn record_states<'k>(
        &self,
        rks: impl IntoIterator<Item = &'k [u8]>,
        mut each: impl FnMut(Option<RecordState>) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let rks: Vec<(&[u8], usize)> = rks
            .into_iter()
            .map(|rk| (rk, shard_of(self.staged.hasher.hash_one(rk))))
            .collect();
        let mut wanted = [false; SHARDS];
        for &(_, s) in &rks {
            wanted[s] = true;
        }
        // Ascending, as every taker of several shards does.
        let shards: [_; SHARDS] =
            std::array::from_fn(|s| wanted[s].then(|| self.staged.shards[s].read()));
        let flushing = read(&self.flushing);
        let txn = self.view.begin_read()?;
        let records = txn.open_table(RECORDS)?;
        let runs = self.runs(&txn.open_table(RUN_LIST)?, &txn.open_table(RUN_FILTERS)?)?;
        let run_table = match runs.is_empty() {
            true => None,
            false => Some(txn.open_table(RUNS)?),
        };
        for (rk, s) in rks {
            let mut state: Option<RecordState> = None;
            let mut join = |d: RecordState| match &mut state {
                Some(s) => s.merge(&d),
                None => state = Some(d),
            };
            let staged = shards[s].as_ref().and_then(|m| m.get(rk));
            if let Some(d) = staged.map(decode_state).transpose()? {
                join(d);
            }
            if let Some(d) = flushing
                .as_ref()
                .map(|f| f.shards().state(rk))
                .transpose()?
                .flatten()
            {
                join(d);
            }
            if let Some(v) = records.get(rk)? {
                join(decode_state(v.value())?);
            }
            if let Some(run_table) = &run_table {
                let probes = run_states(run_table, &runs, rk, |held| {
                    join(decode_state(held)?);
                    Ok(())
                })?;
                self.run_probes
                    .fetch_add(probes, std::sync::atomic::Ordering::Relaxed);
            }
            each(state)?;
        }
        Ok(())
    }

    /// Existing records of a collection whose key starts with `prefix`, in key order, at most
    /// `limit`.
    pub fn list(
        &self,
        ns: &str,
        collection: &str,
        prefix: &str,
        limit: usize,
    ) -> Result<Vec<(String, Fields)>, StoreError> {
        let take = limit.saturating_mul(2).saturating_add(LIST_DELTA_SLACK);
        match self.list_taking(ns, collection, prefix, limit, Some(take))? {
            Some(out) => Ok(out),
            None => Ok(self
                .list_taking(ns, collection, prefix, limit, None)?
                .unwrap_or_default()),
        }
    }

    /// [`Store::list`] with at most `take` of the deltas' keys in range walked (the smallest;
    /// `None`: all of them). The deltas are hash tables: their keys in range are found by a
    /// pass over every key they hold, and sorting all of them (hundreds of thousands during
    /// a catch-up) took most of a listing (~100-160 ms of ~150-200 at ~400k keys), where a
    /// page of 100 needs the smallest few. The listing is exact below the smallest key in
    /// range left out (the cut); `None` where it stops there with fewer than `limit` records
    /// (many of the keys taken are deleted): the caller takes all of them.
    fn list_taking(
        &self,
        ns: &str,
        collection: &str,
        prefix: &str,
        limit: usize,
        take: Option<usize>,
    ) -> Result<Option<Vec<(String, Fields)>>, StoreError> {
        // Same order as `record_state`: staged, flushing, file (guards held for the listing;
        // `meta` too, so that each batch is seen whole or not at all).
        let _meta = self.staged.meta.read();
        let guards = self.staged.read_all();
        let staged = Shards::of_guards(&guards);
        let flushing = read(&self.flushing);
        let txn = self.view.begin_read()?;
        let records = txn.open_table(RECORDS)?;
        let run_table = txn.open_table(RUNS)?;
        let runs = run_list(&txn.open_table(RUN_LIST)?)?;
        let coll = collection_prefix(ns, collection);
        let mut start = coll.clone();
        start.extend_from_slice(prefix.as_bytes());
        let end = prefix_end(&start);
        let mut out = Vec::new();
        if limit == 0 {
            return Ok(Some(out));
        }
        // Keys of the two deltas in the range (a bounded set: deltas are bounded), the
        // smallest `take` of them if that many, and the cut.
        let in_range =
            |k: &&[u8]| *k >= start.as_slice() && end.as_ref().is_none_or(|e| *k < e.as_slice());
        let (mut delta_keys, cut) = match take {
            // In the arenas' memory order (a pass in table order waited on a cache miss per
            // record), blocks given up told apart only for the few keys that matter.
            Some(take) => {
                let keys = staged
                    .arena_keys()
                    .chain(flushing.iter().flat_map(|f| f.shards().arena_keys()));
                smallest(
                    keys.filter(|(k, _)| in_range(k)),
                    take,
                    |k, at: BlockAt<'_>| at.live(k),
                )
            }
            None => {
                let keys = staged
                    .keys()
                    .chain(flushing.iter().flat_map(|f| f.shards().keys()));
                (keys.filter(in_range).collect(), None)
            }
        };
        delta_keys.sort_unstable();
        delta_keys.dedup();
        // The file's levels (records, then runs) and the delta keys merged in key order; each
        // record is the join of what every level and both deltas hold for it.
        let mut levels = levels(&records, &run_table, &runs, &start, end.as_deref())?;
        walk_levels(
            &mut levels,
            delta_keys.into_iter().map(|k| (k, None)),
            |k, states| {
                if cut.is_some_and(|c| k >= c) {
                    return Ok(false);
                }
                let mut state: Option<RecordState> = None;
                let deltas = [Some(staged), flushing.as_deref().map(Delta::shards)];
                let held = states.iter().map(|s| decode_state(s)).chain(
                    deltas
                        .into_iter()
                        .flatten()
                        .filter_map(|d| d.state(k).transpose()),
                );
                for d in held {
                    let d = d?;
                    match &mut state {
                        Some(s) => s.merge(&d),
                        None => state = Some(d),
                    }
                }
                if let Some(fields) = state.and_then(|s| s.visible()) {
                    let key = std::str::from_utf8(&k[coll.len()..])
                        .map_err(|_| StoreError::Corrupt("record key".into()))?
                        .to_string();
                    out.push((key, fields));
                }
                Ok(out.len() < limit)
            },
        )?;
        // Short of `limit` with keys left out: those at the cut or past it may be records.
        Ok((cut.is_none() || out.len() == limit).then_some(out))
    }

    /// Envelope bytes of `author`'s batches from `from_seq`, at most `limit` and about
    /// `max_bytes` (always at least one if there is one).
    pub fn chain_range(
        &self,
        ns: &str,
        author: &[u8; 32],
        from_seq: u64,
        limit: u32,
        max_bytes: usize,
        until: Option<Hlc>,
    ) -> Result<Vec<Vec<u8>>, StoreError> {
        let range = ChainRange {
            ns,
            author,
            from_seq,
            limit,
            max_bytes,
            until,
        };
        Ok(self.chain_range_with(range, false)?.0)
    }

    /// [`Store::chain_range`] for sending to a peer: each batch is first checked to be intact
    /// ([`blazedb_protocol::batch::check_stored`]: hash, signature, payload hash; no
    /// inflating or decoding). The range ends before the first damaged batch, which is
    /// named in the second part of the answer (the log's damage is reported here, not by
    /// the peer, which would take the batch for a forgery and close the link).
    pub fn serve_range(
        &self,
        range: ChainRange<'_>,
    ) -> Result<(Vec<Vec<u8>>, Option<String>), StoreError> {
        self.chain_range_with(range, true)
    }

    fn chain_range_with(
        &self,
        range: ChainRange<'_>,
        check: bool,
    ) -> Result<(Vec<Vec<u8>>, Option<String>), StoreError> {
        let ChainRange {
            ns,
            author,
            from_seq,
            limit,
            max_bytes,
            until,
        } = range;
        let txn = self.db.begin_read()?;
        let chains = txn.open_table(CHAINS)?;
        let batches = txn.open_table(BATCHES)?;
        let start = chain_key(ns, author, from_seq);
        let end = chain_key(ns, author, u64::MAX);
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for entry in chains.range(start.as_slice()..=end.as_slice())? {
            if out.len() as u32 >= limit {
                break;
            }
            let (k, id) = entry?;
            let b = batch_bytes(&batches, id.value())?
                .ok_or_else(|| StoreError::Corrupt("chain names a missing batch".into()))?;
            if check {
                let damage = match <[u8; 32]>::try_from(id.value()) {
                    Ok(id) => blazedb_protocol::batch::check_stored(&b, &BatchId(id), |r| {
                        dict_ids(&txn, r)
                    })
                    .err()
                    .map(|e| e.to_string()),
                    Err(_) => Some("the chain's entry is not a batch id".into()),
                };
                if let Some(damage) = damage {
                    let seq = parse_chain_key(k.value()).map_or(0, |(_, _, seq)| seq);
                    let author = blazedb_identity::PublicKey::from_bytes(author)
                        .map_or_else(|_| hex::encode(author), |a| a.to_did());
                    let at = format!(
                        "namespace {ns}, author {author}, seq {seq}, batch {}: {damage}",
                        hex::encode(id.value())
                    );
                    return Ok((out, Some(at)));
                }
            }
            if let Some(until) = until {
                // Chains are in time order: the first batch at or after `until` ends it.
                if stored_header(&b)?.hlc_max >= until {
                    break;
                }
            }
            if !out.is_empty() && bytes + b.len() > max_bytes {
                break;
            }
            bytes += b.len();
            out.push(b);
        }
        Ok((out, None))
    }

    /// Joined namespaces.
    pub fn namespaces(&self) -> Result<Vec<(String, NamespaceRecord)>, StoreError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(NAMESPACES)?;
        let mut out = Vec::new();
        for e in t.iter()? {
            let (k, v) = e?;
            let rec: NamespaceRecord = ciborium::from_reader(v.value())
                .map_err(|e| StoreError::Corrupt(format!("namespace record: {e}")))?;
            out.push((k.value().to_string(), rec));
        }
        Ok(out)
    }

    /// Records (durably) that we joined `ns`.
    pub fn put_namespace(&self, ns: &str, rec: &NamespaceRecord) -> Result<(), StoreError> {
        let mut bytes = Vec::new();
        ciborium::into_writer(rec, &mut bytes).expect("serializing to a Vec cannot fail");
        let txn = self.db.begin_write()?;
        txn.open_table(NAMESPACES)?.insert(ns, bytes.as_slice())?;
        txn.commit()?;
        Ok(())
    }

    /// Marks the log as begun beside an identity that existed before it (`node.key` kept,
    /// the log lost, moved or never copied with it): this node may have written chains its
    /// peers hold and this log does not. Kept for good ([`Store::identity_restored`]).
    pub fn mark_identity_restored(&self) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        txn.open_table(META)?
            .insert(IDENTITY_RESTORED, b"1".as_slice())?;
        txn.commit()?;
        Ok(())
    }

    /// Marks the view file to be set aside and made again from the log at the next open
    /// ([`Store::open_moving_damaged_view`]): updating it failed (`why`), perhaps on a
    /// damaged page that opening it did not reach.
    pub fn mark_view_failed(&self, why: &str) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        txn.open_table(META)?.insert(VIEW_FAILED, why.as_bytes())?;
        txn.commit()?;
        Ok(())
    }

    /// Marks `ns` as a namespace whose chain of this node's own was cut at a damaged batch
    /// ([`Store::cut_chain`]): the node writes there again only once a peer has told it
    /// what it holds of that chain. Kept until [`Store::clear_own_chain_cut`].
    pub fn mark_own_chain_cut(&self, ns: &str) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        txn.open_table(META)?
            .insert(format!("{OWN_CHAIN_CUT}{ns}").as_str(), b"1".as_slice())?;
        txn.commit()?;
        Ok(())
    }

    /// The namespaces [`Store::mark_own_chain_cut`] marked.
    pub fn own_chain_cuts(&self) -> Result<Vec<String>, StoreError> {
        self.marked(OWN_CHAIN_CUT)
    }

    /// Takes [`Store::mark_own_chain_cut`]'s mark on `ns` away.
    pub fn clear_own_chain_cut(&self, ns: &str) -> Result<(), StoreError> {
        self.unmark(OWN_CHAIN_CUT, ns)
    }

    /// Why [`Store::mark_view_failed`] marked the view, if it did.
    pub fn view_failed(&self) -> Result<Option<String>, StoreError> {
        let txn = self.db.begin_read()?;
        let why = txn.open_table(META)?.get(VIEW_FAILED)?;
        Ok(why.map(|v| String::from_utf8_lossy(v.value()).into_owned()))
    }

    /// Takes [`Store::mark_view_failed`]'s mark away: the view was made again.
    pub fn clear_view_failed(&self) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        txn.open_table(META)?.remove(VIEW_FAILED)?;
        txn.commit()?;
        Ok(())
    }

    /// Whether [`Store::mark_identity_restored`] marked this log.
    pub fn identity_restored(&self) -> Result<bool, StoreError> {
        let txn = self.db.begin_read()?;
        Ok(txn.open_table(META)?.get(IDENTITY_RESTORED)?.is_some())
    }

    /// Takes [`Store::mark_identity_restored`]'s mark and every [`Store::backup_marks`] and
    /// [`Store::own_chain_cuts`] mark away: the node writing on this log has a new identity
    /// (nothing of its own can be anywhere else), or its operator said no peer holds more of
    /// its chains than its log (`blazedb restore --alone`).
    pub fn clear_own_chain_doubts(&self) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        {
            let mut meta = txn.open_table(META)?;
            meta.remove(IDENTITY_RESTORED)?;
            meta.retain_in(FROM_BACKUP.., |k, _| !k.starts_with(FROM_BACKUP))?;
            meta.retain_in(OWN_CHAIN_CUT.., |k, _| !k.starts_with(OWN_CHAIN_CUT))?;
        }
        txn.commit()?;
        Ok(())
    }

    /// The namespaces a log restored from a backup ([`Store::backup_log`]) holds and the
    /// node has not yet heard a peer on: its own chain there may have gone on after the
    /// backup was made.
    pub fn backup_marks(&self) -> Result<Vec<String>, StoreError> {
        self.marked(FROM_BACKUP)
    }

    /// Takes [`Store::backup_marks`]'s mark on `ns` away: a peer told what it holds there.
    pub fn clear_backup_mark(&self, ns: &str) -> Result<(), StoreError> {
        self.unmark(FROM_BACKUP, ns)
    }

    /// Takes the mark under `prefix` on `ns` away from [`META`].
    fn unmark(&self, prefix: &str, ns: &str) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        txn.open_table(META)?
            .remove(format!("{prefix}{ns}").as_str())?;
        txn.commit()?;
        Ok(())
    }

    /// The namespaces marked under `prefix` in [`META`].
    fn marked(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let txn = self.db.begin_read()?;
        let meta = txn.open_table(META)?;
        let mut out = Vec::new();
        for entry in meta.range(prefix..)? {
            let (k, _) = entry?;
            match k.value().strip_prefix(prefix) {
                Some(ns) => out.push(ns.to_string()),
                None => break,
            }
        }
        Ok(out)
    }

    /// Writes a copy of the log as one read transaction sees it (a consistent point: every
    /// chain contiguous, nothing half committed) into a new redb file at `to`, which must
    /// not exist. The copy is a log a node starts from (its view is made from it at the
    /// first start, or by `blazedb restore`); the node may run on meanwhile. Its metadata
    /// says it came from a backup: a node that writes on it with this node's identity
    /// waits, in each namespace, until a peer has told it what it holds of its own chain
    /// there (its chain may have gone on after the backup), as after a lost log. `durable`
    /// fsyncs the copy at the end. Memory is bounded: the copy is committed every
    /// [`BACKUP_TXN_ENTRIES`] entries.
    pub fn backup_log(&self, to: &Path, durable: bool) -> Result<BackupInfo, StoreError> {
        let file_error = |e: std::io::Error| StoreError::File {
            path: to.to_path_buf(),
            source: Box::new(StoreError::Redb(e.into())),
        };
        if self.closing.load(std::sync::atomic::Ordering::Acquire) {
            return Err(StoreError::Closing);
        }
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(to)
            .map_err(file_error)?;
        // Nothing half made is left behind: a failed copy (or one the store's closing
        // stopped) is removed.
        self.backup_into(to, durable).inspect_err(|_| {
            let _ = std::fs::remove_file(to);
        })
    }

    /// [`Store::backup_log`] into the new, empty file `to`.
    fn backup_into(&self, to: &Path, durable: bool) -> Result<BackupInfo, StoreError> {
        let src = self.db.begin_read()?;
        // redb's default cache (1 GiB) would hold the copy's pages while it is made; it is
        // only written.
        let mut dst = Database::builder()
            .set_cache_size(BACKUP_CACHE_BYTES)
            .create(to)?;
        let mut info = BackupInfo::default();
        let mut namespaces = std::collections::BTreeSet::new();
        for entry in src.open_table(NAMESPACES)?.iter()? {
            namespaces.insert(entry?.0.value().to_string());
        }
        {
            let chains = src.open_table(CHAINS)?;
            for entry in chains.iter()? {
                let (k, _) = entry?;
                let (ns, _, _) = parse_chain_key(k.value())
                    .ok_or_else(|| StoreError::Corrupt("chain key".into()))?;
                info.batches += 1;
                if !namespaces.contains(&ns) {
                    namespaces.insert(ns);
                }
            }
        }
        info.namespaces = namespaces.len();
        let stop = &self.closing;
        copy_table(&src, &dst, BATCHES, |_| true, stop)?;
        copy_table(&src, &dst, CHAINS, |_| true, stop)?;
        copy_table(&src, &dst, NAMESPACES, |_| true, stop)?;
        copy_table(&src, &dst, REVOCATIONS, |_| true, stop)?;
        copy_table(&src, &dst, REVOKED_BY, |_| true, stop)?;
        copy_table(&src, &dst, DICTS, |_| true, stop)?;
        // The view's failure mark concerns this node's view file, which is not copied.
        copy_table(&src, &dst, META, |k| *k != VIEW_FAILED, stop)?;
        let mut txn = dst.begin_write()?;
        if !durable {
            txn.set_durability(redb::Durability::None)
                .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        }
        {
            let mut meta = txn.open_table(META)?;
            meta.insert(IDENTITY_RESTORED, b"1".as_slice())?;
            for ns in &namespaces {
                meta.insert(format!("{FROM_BACKUP}{ns}").as_str(), b"1".as_slice())?;
            }
        }
        txn.commit()?;
        // The copy's file holds free pages its growth left (a third of it for a 1M-op log:
        // 142 MB, 93 MB compacted, in 80 ms): let them go before it is handed out.
        dst.compact()?;
        drop(dst);
        info.bytes = std::fs::metadata(to)
            .map_err(|e| StoreError::File {
                path: to.to_path_buf(),
                source: Box::new(StoreError::Redb(e.into())),
            })?
            .len();
        Ok(info)
    }

    /// Every revocation in `ns`: token → earliest revocation time.
    pub fn revocations(&self, ns: &str) -> Result<BTreeMap<TokenId, Hlc>, StoreError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(REVOCATIONS)?;
        let prefix = ns_prefix(ns);
        let end = prefix_end(&prefix);
        let range = match &end {
            Some(end) => t.range(prefix.as_slice()..end.as_slice())?,
            None => t.range(prefix.as_slice()..)?,
        };
        let mut out = BTreeMap::new();
        for e in range {
            let (k, v) = e?;
            let id: [u8; 32] = k.value()[prefix.len()..]
                .try_into()
                .map_err(|_| StoreError::Corrupt("revocation key".into()))?;
            out.insert(TokenId(id), Hlc(v.value()));
        }
        Ok(out)
    }

    /// Envelope bytes of the batches that revoked `tokens` in `ns` (those we hold).
    pub fn revoking_batches(
        &self,
        ns: &str,
        tokens: &[TokenId],
    ) -> Result<Vec<Vec<u8>>, StoreError> {
        let txn = self.db.begin_read()?;
        let by = txn.open_table(REVOKED_BY)?;
        let batches = txn.open_table(BATCHES)?;
        let mut ids = std::collections::BTreeSet::new();
        for t in tokens {
            if let Some(id) = by.get(revocation_key(ns, t).as_slice())? {
                ids.insert(id.value().to_vec());
            }
        }
        let mut out = Vec::new();
        for id in ids {
            if let Some(b) = batch_bytes(&batches, &id)? {
                out.push(b);
            }
        }
        Ok(out)
    }

    /// Records `revocations` (keeping the earliest time per token), then recomputes the
    /// records of one namespace from its log, counting only batches that are effective (see
    /// `blazedb_protocol::engine::batch_effective`). Returns (batches applied, ineffective).
    pub fn rebuild_namespace(
        &self,
        ns: &str,
        revocations: &BTreeMap<TokenId, Hlc>,
    ) -> Result<(u64, u64), StoreError> {
        let txn = self.db.begin_write()?;
        let (mut applied, mut skipped) = (0u64, 0u64);
        {
            let mut revs = txn.open_table(REVOCATIONS)?;
            for (token, at) in revocations {
                let k = revocation_key(ns, token);
                let old = revs.get(k.as_slice())?.map(|v| v.value());
                if old.is_none_or(|o| at.0 < o) {
                    revs.insert(k.as_slice(), at.0)?;
                }
            }
        }
        txn.commit()?;
        let rtxn = self.db.begin_read()?;
        let txn = self.view.begin_write()?;
        {
            let prefix = ns_prefix(ns);
            let end = prefix_end(&prefix);
            let mut records = txn.open_table(RECORDS)?;
            records.retain(|k, _| !k.starts_with(&prefix))?;
            // The namespace's states in the runs go too (a run left empty with them).
            let mut run_index = txn.open_table(RUN_LIST)?;
            let runs = run_list(&run_index)?;
            remove_run_range(
                &mut txn.open_table(RUNS)?,
                &mut run_index,
                &mut txn.open_table(RUN_FILTERS)?,
                &runs,
                &prefix,
                end.as_deref(),
            )?;
            let mut applied_t = txn.open_table(APPLIED)?;
            let dicts = self.dicts()?;
            let chains = rtxn.open_table(CHAINS)?;
            let batches = rtxn.open_table(BATCHES)?;
            let mut states: BTreeMap<Vec<u8>, RecordState> = BTreeMap::new();
            let range = match &end {
                Some(end) => chains.range(prefix.as_slice()..end.as_slice())?,
                None => chains.range(prefix.as_slice()..)?,
            };
            for entry in range {
                let (_, id) = entry?;
                let bytes = batch_bytes(&batches, id.value())?
                    .ok_or_else(|| StoreError::Corrupt("chain names a missing batch".into()))?;
                let vb = blazedb_protocol::batch::verify_with(bytes, &dicts)
                    .map_err(|e| StoreError::Corrupt(e.to_string()))?;
                applied_t.insert(
                    chain_prefix(ns, &vb.header.author).as_slice(),
                    vb.header.seq,
                )?;
                if !blazedb_protocol::engine::batch_effective(&vb, revocations) {
                    skipped += 1;
                    continue;
                }
                applied += 1;
                let view = ops_view(&vb)?;
                for op in view.ops() {
                    states
                        .entry(record_key(ns, view.collection(op), view.key(op)))
                        .or_default()
                        .apply_view(view, op, vb.header.author);
                }
            }
            for (k, s) in states {
                records.insert(k.as_slice(), encode_state(&s).as_slice())?;
            }
        }
        bump_generation(&txn)?;
        txn.commit()?;
        Ok((applied, skipped))
    }

    /// The runs a view snapshot lists (`list`), with their filters: from memory, or read
    /// from the snapshot's `filters` once per run and process.
    fn runs(
        &self,
        list: &impl ReadableTable<u32, u64>,
        filters: &impl ReadableTable<u32, &'static [u8]>,
    ) -> Result<Runs, StoreError> {
        let list = run_list(list)?;
        let mut cache = self.run_filters.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::with_capacity(list.len());
        for &(id, _) in &list {
            let filter = match cache.get(&id) {
                Some(f) => f.clone(),
                None => {
                    let f = filters
                        .get(id)?
                        .and_then(|v| RunFilter::decode(v.value()))
                        .map(Arc::new);
                    if cache.len() >= 2 * MAX_RUNS {
                        // Runs folded away since: gone from every later snapshot.
                        cache.retain(|held, _| list.iter().any(|&(id, _)| id == *held));
                    }
                    cache.insert(id, f.clone());
                    f
                }
            };
            out.push(filter);
        }
        Ok(Runs { list, filters: out })
    }

    /// Bytes of run filters held in memory (about 1.25 per record held in runs whose filter
    /// has been read or written by this process).
    pub fn run_filter_bytes(&self) -> u64 {
        let filters = self.run_filters.lock().unwrap_or_else(|e| e.into_inner());
        filters.values().flatten().map(|f| f.bytes() as u64).sum()
    }

    /// Runs listed beside the records' table now.
    pub fn view_runs_held(&self) -> Result<usize, StoreError> {
        let txn = self.view.begin_read()?;
        Ok(run_list(&txn.open_table(RUN_LIST)?)?.len())
    }

    /// Counts: (batches, records).
    pub fn counts(&self) -> Result<(u64, u64), StoreError> {
        self.counts_until(None)
    }

    /// [`Store::counts`], giving up with [`StoreError::Closing`] once `stop` is set.
    fn counts_until(
        &self,
        stop: Option<&std::sync::atomic::AtomicBool>,
    ) -> Result<(u64, u64), StoreError> {
        let stopped = || -> Result<(), StoreError> {
            match stop {
                Some(s) if s.load(std::sync::atomic::Ordering::Relaxed) => Err(StoreError::Closing),
                _ => Ok(()),
            }
        };
        let batches = self.batches()?;
        // Records in the file, plus those only staged or being flushed so far. The file
        // snapshot and the delta keys are taken together (copied into one buffer); the file
        // is searched after the locks are released, so a metrics scrape never holds up
        // staging.
        let (txn, buf, mut spans) = {
            let _meta = self.staged.meta.read();
            let guards = self.staged.read_all();
            let flushing = read(&self.flushing);
            let txn = self.view.begin_read()?;
            let (mut buf, mut spans) = (Vec::new(), Vec::new());
            for k in Shards::of_guards(&guards)
                .keys()
                .chain(flushing.iter().flat_map(|f| f.shards().keys()))
            {
                spans.push((buf.len(), buf.len() + k.len()));
                buf.extend_from_slice(k);
            }
            (txn, buf, spans)
        };
        let key = |&(a, b): &(usize, usize)| &buf[a..b];
        // Sorted as a flush sorts its records ([`sorted_records`]): by the 8 bytes after the
        // shared prefix, held inline, and whole keys only where those are equal (sorting the
        // spans by their bytes alone was ~40% of a count).
        let skip = common_prefix_len(spans.iter().map(key));
        let mut worded: Vec<(u64, (usize, usize))> = spans
            .drain(..)
            .map(|span| (sort_word(key(&span), skip), span))
            .collect();
        worded.sort_unstable_by(|x, y| x.0.cmp(&y.0).then_with(|| key(&x.1).cmp(key(&y.1))));
        spans.extend(worded.into_iter().map(|(_, span)| span));
        spans.dedup_by(|x, y| key(x) == key(y));
        stopped()?;
        let table = txn.open_table(RECORDS)?;
        let runs = self.runs(&txn.open_table(RUN_LIST)?, &txn.open_table(RUN_FILTERS)?)?;
        if !runs.is_empty() {
            // A record may be held by the table, by several runs and by the delta. The file's
            // distinct records are counted by one ordered walk over every level, kept for as
            // long as the file is unchanged (its generation); a delta key adds a record if no
            // level holds it. Many delta keys next to the file are joined with that walk
            // instead of looked up one by one.
            let generation = txn
                .open_table(VIEW_META)?
                .get("generation")?
                .map_or(0, |v| v.value());
            let run_table = txn.open_table(RUNS)?;
            let held = *self.file_records.lock().unwrap_or_else(|e| e.into_inner());
            let in_file: u64 = table.len()? + runs.list.iter().map(|&(_, n)| n).sum::<u64>();
            let walk_all = spans.len() as u64 * COUNT_WALK_FRACTION >= in_file;
            let file_records = match held {
                Some((g, n)) if g == generation && !walk_all => n,
                _ => {
                    let mut levels = levels(&table, &run_table, &runs.list, &[], None)?;
                    let delta = spans.iter().map(|s| (key(s), None)).filter(|_| walk_all);
                    let (mut file, mut all) = (0u64, 0u64);
                    walk_levels(&mut levels, delta, |_, states| {
                        file += u64::from(!states.is_empty());
                        all += 1;
                        stopped()?;
                        Ok(true)
                    })?;
                    *self.file_records.lock().unwrap_or_else(|e| e.into_inner()) =
                        Some((generation, file));
                    if walk_all {
                        return Ok((batches, all));
                    }
                    file
                }
            };
            let mut records = file_records;
            for span in &spans {
                stopped()?;
                let k = key(span);
                let mut held = table.get(k)?.is_some();
                if !held {
                    run_states(&run_table, &runs, k, |_| {
                        held = true;
                        Ok(())
                    })?;
                }
                records += u64::from(!held);
            }
            return Ok((batches, records));
        }
        let file = table.len()?;
        let mut records = file;
        match spans.first() {
            // Many delta keys next to the file: one ordered walk over the file's keys from
            // the first of them, joined with the sorted delta keys, instead of a lookup from
            // the root per key (with the bytewise sort, a count right after B2l's window,
            // ~1M delta keys and a 630k-record file, took 0.9–1.5 s; now 0.5–0.8 s).
            Some(first) if spans.len() as u64 * COUNT_WALK_FRACTION >= file => {
                let mut held = table.range(key(first)..)?;
                let mut next = held.next().transpose()?;
                for span in &spans {
                    stopped()?;
                    let k = key(span);
                    while next.as_ref().is_some_and(|(fk, _)| fk.value() < k) {
                        next = held.next().transpose()?;
                    }
                    if next.as_ref().is_none_or(|(fk, _)| fk.value() != k) {
                        records += 1;
                    }
                }
            }
            _ => {
                for span in &spans {
                    stopped()?;
                    if table.get(key(span))?.is_none() {
                        records += 1;
                    }
                }
            }
        }
        Ok((batches, records))
    }

    /// [`Store::counts_bounded`] for a caller that must not wait for a long record count
    /// (`/metrics`: counting tens of millions of records takes tens of seconds, longer than a
    /// scraper waits). A due count whose last one took [`COUNT_IN_PLACE_MAX`] or more is
    /// taken on a thread of its own, one at a time, and this returns the last one meanwhile;
    /// a quicker one (a small store's), and the first, are taken in place, so a small store
    /// is exact on every scrape. The batches are counted every time (one table length).
    pub fn counts_for_scrape(self: &Arc<Self>) -> Result<(u64, u64), StoreError> {
        let Some(last) = self.last_count().filter(|c| c.took >= COUNT_IN_PLACE_MAX) else {
            return self.counts_bounded();
        };
        if count_due(last.at.elapsed(), last.took) {
            let mut recount = self.recount.lock().unwrap_or_else(|e| e.into_inner());
            let idle = recount.as_ref().is_none_or(|t| t.is_finished());
            if idle && !self.closing.load(std::sync::atomic::Ordering::Acquire) {
                // A weak share: a store its owners have dropped is not kept open for a
                // count (its thread then only ends).
                let store = Arc::downgrade(self);
                let spawned = std::thread::Builder::new()
                    .name("blazedb-count".into())
                    .spawn(move || {
                        let Some(store) = store.upgrade() else { return };
                        match store.counts_bounded_until(Some(&store.closing)) {
                            Ok(_) | Err(StoreError::Closing) => {}
                            Err(e) => {
                                tracing::warn!(error = %e, "counting the records for /metrics failed")
                            }
                        }
                    });
                match spawned {
                    Ok(t) => *recount = Some(t),
                    Err(e) => {
                        tracing::warn!(error = %e, "no thread to count the records for /metrics")
                    }
                }
            }
        }
        Ok((self.batches()?, last.records))
    }

    /// Stops a record count [`Store::counts_for_scrape`] runs behind the scrapes, and waits
    /// for its thread to end: that thread shares the store, so until then the store's files
    /// stay open (at tens of millions of records a count takes tens of seconds). Later
    /// scrapes return the last count and start none; a backup being made gives up (its file
    /// removed) and none starts. Called when a node shuts down.
    pub fn stop_background_count(&self) {
        self.closing
            .store(true, std::sync::atomic::Ordering::Release);
        let thread = self
            .recount
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(t) = thread {
            let _ = t.join();
        }
    }

    fn last_count(&self) -> Option<TakenCount> {
        *self.bounded_count.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Batches held: one chain entry each (the log keeps each batch in pieces).
    fn batches(&self) -> Result<u64, StoreError> {
        Ok(self.db.begin_read()?.open_table(CHAINS)?.len()?)
    }

    /// Counts as [`Store::counts`] takes them, for callers that may ask often (`/metrics`):
    /// the batches are counted every time (one table length), the records only once the
    /// last record count is older than [`COUNT_COST_SHARE`] times what it took, and by one
    /// caller at a time; otherwise the last one is returned. Counting records is a lookup per
    /// staged key, and with runs beside the records' table a walk over the file whenever it
    /// changed (seconds at millions of records, O(records) under sustained ingest), so this
    /// bounds what scrapes cost: at most about a tenth of one core, and a count at most ten
    /// times its own cost old. A small store's count takes well under a millisecond, so it
    /// is exact on every scrape.
    pub fn counts_bounded(&self) -> Result<(u64, u64), StoreError> {
        self.counts_bounded_until(None)
    }

    /// [`Store::counts_bounded`], giving up with [`StoreError::Closing`] once `stop` is set.
    fn counts_bounded_until(
        &self,
        stop: Option<&std::sync::atomic::AtomicBool>,
    ) -> Result<(u64, u64), StoreError> {
        let last = || self.last_count();
        let fresh = |c: &TakenCount| !count_due(c.at.elapsed(), c.took);
        let with_batches =
            |c: TakenCount| -> Result<(u64, u64), StoreError> { Ok((self.batches()?, c.records)) };
        if let Some(c) = last().filter(fresh) {
            return with_batches(c);
        }
        let _one = match self.counting.try_lock() {
            Ok(guard) => guard,
            Err(std::sync::TryLockError::WouldBlock) => match last() {
                // Another caller is counting: the last count stands until it is done.
                Some(c) => return with_batches(c),
                None => self.counting.lock().unwrap_or_else(|e| e.into_inner()),
            },
            Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
        };
        // Whoever held the lock may have just counted.
        if let Some(c) = last().filter(fresh) {
            return with_batches(c);
        }
        let started = std::time::Instant::now();
        let (batches, records) = self.counts_until(stop)?;
        *self.bounded_count.lock().unwrap_or_else(|e| e.into_inner()) = Some(TakenCount {
            records,
            at: std::time::Instant::now(),
            took: started.elapsed(),
        });
        Ok((batches, records))
    }

    /// Verifies the whole log: every batch re-verified (hash, signature, ops), every chain
    /// contiguous from 1 with matching `prev` links. Returns the number of batches checked;
    /// the first damage found is the error.
    pub fn check(&self) -> Result<u64, StoreError> {
        let (n, damage) = self.walk_log(true)?;
        match damage.into_iter().next() {
            Some(d) => Err(StoreError::Corrupt(d.to_string())),
            None => Ok(n),
        }
    }

    /// The first damaged batch of each chain in the log ([`Store::check`]'s tests, all
    /// chains walked), in chain order. [`Store::cut_chain`] removes it and what follows.
    pub fn damaged_batches(&self) -> Result<Vec<LogDamage>, StoreError> {
        Ok(self.walk_log(false)?.1)
    }

    fn walk_log(&self, first_only: bool) -> Result<(u64, Vec<LogDamage>), StoreError> {
        let txn = self.db.begin_read()?;
        let chains = txn.open_table(CHAINS)?;
        let batches = txn.open_table(BATCHES)?;
        let dicts = self.dicts()?;
        let mut prev: Option<(String, [u8; 32], u64, BatchId)> = None;
        let mut n = 0u64;
        let mut found: Vec<LogDamage> = Vec::new();
        for entry in chains.iter()? {
            let (k, v) = entry?;
            let (ns, author, seq) = parse_chain_key(k.value())
                .ok_or_else(|| StoreError::Corrupt("chain key".into()))?;
            if found
                .last()
                .is_some_and(|d| d.ns == ns && d.author == author)
            {
                continue; // the rest of a damaged chain
            }
            let chained = match &prev {
                Some((pns, pa, pseq, pid)) if *pns == ns && *pa == author => Some((*pseq, *pid)),
                _ => None,
            };
            let verdict = verify_logged(
                &batches,
                &dicts,
                (&ns, &author, seq),
                v.value(),
                chained,
                &mut 0,
            );
            match verdict {
                Ok(id) => {
                    prev = Some((ns, author, seq, id));
                    n += 1;
                }
                Err(why) => {
                    found.push(LogDamage {
                        ns,
                        author,
                        seq,
                        why,
                    });
                    if first_only {
                        break;
                    }
                }
            }
        }
        Ok((n, found))
    }

    /// Checks the log's batches from `cursor` on, in chain order, as [`Store::check`] does
    /// (each re-verified, signature and all, and linked to the one before it), until about
    /// `max_bytes` of them were read (one at least), in a read transaction of its own (a
    /// scrub that holds one for its whole pass would keep the log from reusing the pages
    /// the committer frees meanwhile). Moves `cursor` past them; the first damaged batch of
    /// a chain is reported and the rest of that chain passed over. Batches written behind
    /// the cursor are met later in the same pass (the log only grows at chain heads).
    pub fn scrub_step(
        &self,
        cursor: &mut ScrubCursor,
        max_bytes: usize,
    ) -> Result<ScrubStep, StoreError> {
        let txn = self.db.begin_read()?;
        let chains = txn.open_table(CHAINS)?;
        let batches = txn.open_table(BATCHES)?;
        let dicts = self.dicts()?;
        let mut step = ScrubStep::default();
        let range = match &cursor.after {
            Some(k) => chains.range::<&[u8]>((
                std::ops::Bound::Excluded(k.as_slice()),
                std::ops::Bound::Unbounded,
            ))?,
            None => chains.range::<&[u8]>(..)?,
        };
        for entry in range {
            if step.bytes >= max_bytes {
                return Ok(step);
            }
            let (k, v) = entry?;
            let key = k.value();
            if cursor.after.as_deref().is_some_and(|after| key <= after) {
                continue; // the rest of a damaged chain
            }
            let (ns, author, seq) =
                parse_chain_key(key).ok_or_else(|| StoreError::Corrupt("chain key".into()))?;
            let chained = match &cursor.prev {
                Some((pns, pa, pseq, pid)) if *pns == ns && *pa == author => Some((*pseq, *pid)),
                _ => None,
            };
            // (A batch that cannot be read counts a byte: every step moves on.)
            step.bytes += 1;
            let (at, id) = ((&ns[..], &author, seq), v.value());
            match verify_logged(&batches, &dicts, at, id, chained, &mut step.bytes) {
                Ok(id) => {
                    step.batches += 1;
                    cursor.after = Some(key.to_vec());
                    cursor.prev = Some((ns, author, seq, id));
                }
                Err(why) => {
                    // Nothing after it in the chain can be linked: on to the next chain.
                    cursor.after = Some(chain_key(&ns, &author, u64::MAX));
                    cursor.prev = None;
                    step.damaged.push(LogDamage {
                        ns,
                        author,
                        seq,
                        why,
                    });
                }
            }
        }
        step.done = true;
        Ok(step)
    }

    /// Removes `author`'s batches in `ns` from `from_seq` on (chain entries and their bytes),
    /// in one transaction: what `blazedb repair --cut-damaged` does to a damaged chain, so
    /// that catch-up fetches it again from peers. Returns the batches removed.
    pub fn cut_chain(&self, ns: &str, author: &[u8; 32], from_seq: u64) -> Result<u64, StoreError> {
        let txn = self.db.begin_write()?;
        let mut removed = 0u64;
        {
            let mut chains = txn.open_table(CHAINS)?;
            let mut batches = txn.open_table(BATCHES)?;
            let (start, end) = (
                chain_key(ns, author, from_seq),
                chain_key(ns, author, u64::MAX),
            );
            let ids: Vec<Vec<u8>> = chains
                .range(start.as_slice()..=end.as_slice())?
                .map(|e| e.map(|(_, id)| id.value().to_vec()))
                .collect::<Result<_, _>>()?;
            for id in &ids {
                let (first, last) = (chunk_key(id, 0), chunk_key(id, u16::MAX));
                batches.retain_in(first.as_slice()..=last.as_slice(), |_, _| false)?;
            }
            chains.retain_in(start.as_slice()..=end.as_slice(), |_, _| false)?;
            removed += ids.len() as u64;
        }
        txn.commit()?;
        Ok(removed)
    }

    /// Verifies the view file: every stored record state decodes, in the records' table and
    /// in the runs; every run's records belong to a listed run, and each run holds as many
    /// as its list entry says; at most [`MAX_RUNS`] runs. Returns (states
    /// in the table, runs, states in the runs). (Damage here is repaired by
    /// [`Store::rebuild_records`]: the view is derived from the log.)
    pub fn check_view(&self) -> Result<(u64, usize, u64), StoreError> {
        let txn = self.view.begin_read()?;
        let mut table = 0u64;
        for entry in txn.open_table(RECORDS)?.iter()? {
            let (_, v) = entry?;
            decode_state(v.value())?;
            table += 1;
        }
        let runs = run_list(&txn.open_table(RUN_LIST)?)?;
        if runs.len() > MAX_RUNS {
            return Err(StoreError::Corrupt(format!(
                "{} runs listed, at most {MAX_RUNS} are written",
                runs.len()
            )));
        }
        // Every filter stored is a listed run's, reads back, and holds each of its keys.
        let mut filters: Vec<Option<RunFilter>> = vec![None; runs.len()];
        for entry in txn.open_table(RUN_FILTERS)?.iter()? {
            let (id, bytes) = entry?;
            let id = id.value();
            let i = runs.iter().position(|&(run, _)| run == id).ok_or_else(|| {
                StoreError::Corrupt(format!("a filter of run {id}, which is not listed"))
            })?;
            filters[i] = Some(RunFilter::decode(bytes.value()).ok_or_else(|| {
                StoreError::Corrupt(format!("run {id}'s filter does not read back"))
            })?);
        }
        let mut held = vec![0u64; runs.len()];
        for entry in txn.open_table(RUNS)?.iter()? {
            let (k, v) = entry?;
            let id = k
                .value()
                .get(..4)
                .and_then(|b| <[u8; 4]>::try_from(b).ok())
                .map(u32::from_be_bytes);
            let i = runs
                .iter()
                .position(|&(run, _)| Some(run) == id)
                .ok_or_else(|| {
                    StoreError::Corrupt(match id {
                        Some(id) => format!("a record of run {id}, which is not listed"),
                        None => "a record of the runs without a run id".into(),
                    })
                })?;
            decode_state(v.value())?;
            if filters[i]
                .as_ref()
                .is_some_and(|f| !f.may_hold(&k.value()[4..]))
            {
                return Err(StoreError::Corrupt(format!(
                    "run {} holds a record its filter does not",
                    runs[i].0
                )));
            }
            held[i] += 1;
        }
        for (&(id, listed), &n) in runs.iter().zip(&held) {
            if n != listed {
                return Err(StoreError::Corrupt(format!(
                    "run {id} holds {n} records, {listed} listed"
                )));
            }
        }
        Ok((table, runs.len(), held.iter().sum()))
    }

    /// Recomputes every record from the log (the log is the truth), honouring revocations:
    /// the view emptied, then every logged batch applied a window at a time
    /// ([`Store::apply_unapplied`]), so memory stays bounded whatever the log's size.
    /// Returns the number of records afterwards.
    pub fn rebuild_records(&self) -> Result<u64, StoreError> {
        {
            // Records of namespaces without any batch left are stale too.
            let txn = self.view.begin_write()?;
            txn.open_table(RECORDS)?.retain(|_, _| false)?;
            txn.open_table(RUNS)?.retain(|_, _| false)?;
            txn.open_table(RUN_LIST)?.retain(|_, _| false)?;
            txn.open_table(RUN_FILTERS)?.retain(|_, _| false)?;
            txn.open_table(APPLIED)?.retain(|_, _| false)?;
            bump_generation(&txn)?;
            txn.commit()?;
        }
        self.apply_unapplied(&self.heads()?)?;
        Ok(self.counts()?.1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use blazedb_identity::Keypair;
    use blazedb_protocol::{Engine, EngineConfig, Op};

    proptest::proptest! {
        /// The delta's records come out in byte order of their keys, each with its state:
        /// keys sharing long prefixes, equal in the 8 bytes after them, shorter than those 8
        /// bytes, or holding zero bytes (which the padding must not confuse with an end).
        #[test]
        fn delta_records_sort_in_key_order(
            shared in proptest::collection::vec(0u8..3, 0..20),
            longer in proptest::collection::vec(0u8..3, 0..6),
            odd in 0usize..3,
            tails in proptest::collection::vec(proptest::collection::vec(0u8..3, 0..12), 1..200),
        ) {
            let mut map = DeltaMap::default();
            let mut buf = Vec::new();
            let mut want = std::collections::BTreeMap::new();
            for (i, tail) in tails.iter().enumerate() {
                // All but the first `odd` keys share `longer` too: the first keys the sort
                // meets then mostly share more than all of them do.
                let more: &[u8] = if i < odd { &[] } else { &longer };
                let key = [shared.as_slice(), more, tail].concat();
                let state = (i as u32).to_be_bytes();
                map.update(&key, &mut buf, |_, out| {
                    out.extend_from_slice(&state);
                    Ok::<(), ()>(())
                })
                .unwrap();
                want.insert(key, state.to_vec());
            }
            let got: Vec<(Vec<u8>, Vec<u8>)> = sorted_records(std::slice::from_ref(&map))
                .into_iter()
                .map(|(k, v)| (k.to_vec(), v.to_vec()))
                .collect();
            let want: Vec<(Vec<u8>, Vec<u8>)> = want.into_iter().collect();
            proptest::prop_assert_eq!(got, want);
        }
    }

    fn upsert(key: &str, v: i64) -> Op {
        Op::Upsert {
            collection: "c".into(),
            key: key.into(),
            hlc: Hlc::ZERO,
            fields: [("v".to_string(), serde_json::json!(v))]
                .into_iter()
                .collect(),
        }
    }

    /// One step of a staging schedule: write a batch, or move the materializer along.
    #[derive(Clone, Debug)]
    enum Step {
        /// A batch of (key index, op kind, value) ops.
        Write(Vec<(u8, u8, i64)>),
        Freeze,
        Flush,
    }

    /// Two fresh stores under `dir` (one to stage into, one to apply directly to) and an
    /// engine writing to "default" with its key.
    fn staged_and_direct(dir: &Path) -> (Store, Store, Keypair, Engine<u32>) {
        let staged = Store::open(&dir.join("a").join("store.redb").tap_mkdir()).unwrap();
        let direct = Store::open(&dir.join("b").join("store.redb").tap_mkdir()).unwrap();
        let mut engine: Engine<u32> = Engine::new(EngineConfig::default());
        engine.join("default");
        (staged, direct, Keypair::from_seed([7; 32]), engine)
    }

    /// A read of one record waits only for its own shard: while staging holds one shard's
    /// lock, a `get` of a record in another shard answers, and one in the held shard
    /// answers once the lock is let go. A listing waits for a batch being staged.
    #[test]
    fn a_get_waits_only_for_its_own_shard() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _, kp, mut engine) = staged_and_direct(dir.path());
        let ops: Vec<Op> = (0..64).map(|i| upsert(&format!("k{i:02}"), i)).collect();
        let (vb, _) = engine.write("default", &kp, ops, 1_000).unwrap();
        store.append_log(std::slice::from_ref(&vb)).unwrap();
        store.stage(vec![vb], false).unwrap();
        let shard = |k: &str| shard_of(store.staged.hasher.hash_one(record_key("default", "c", k)));
        let held = shard("k00");
        let other = (1..64)
            .map(|i| format!("k{i:02}"))
            .find(|k| shard(k) != held)
            .expect("64 keys over 8 shards");
        let store = Arc::new(store);
        let (tx, rx) = std::sync::mpsc::channel();
        let read = |key: String, tag: &'static str| {
            let (store, tx) = (store.clone(), tx.clone());
            std::thread::spawn(move || {
                let got = store.get("default", "c", &key).unwrap();
                tx.send((tag, got.is_some())).unwrap();
            })
        };
        let deadline = std::time::Duration::from_secs(30);
        let meta = store.staged.meta.write();
        let guard = store.staged.shards[held].write();
        let (a, b) = (read(other, "other"), read("k00".into(), "held"));
        // The other shard's record answers while the held shard (and the batch) stay held.
        assert_eq!(rx.recv_timeout(deadline).unwrap(), ("other", true));
        // A listing waits for the batch's lock.
        let lister = {
            let (store, tx) = (store.clone(), tx.clone());
            std::thread::spawn(move || {
                let n = store.list("default", "c", "", 100).unwrap().len();
                tx.send(("list", n == 64)).unwrap();
            })
        };
        drop(guard);
        assert_eq!(rx.recv_timeout(deadline).unwrap(), ("held", true));
        drop(meta);
        assert_eq!(rx.recv_timeout(deadline).unwrap(), ("list", true));
        for t in [a, b, lister] {
            t.join().unwrap();
        }
    }

    proptest::proptest! {
        /// `smallest` keeps the `take` smallest live keys (duplicates too) and the smallest
        /// live key it left out: every live key below that cut is kept; keys not live (blocks
        /// given up) are neither kept nor the cut.
        #[test]
        fn smallest_keeps_every_live_key_below_its_cut(
            keys in proptest::collection::vec(
                (proptest::collection::vec(0u8..4, 0..3), proptest::bool::weighted(0.8)),
                0..40,
            ),
            take in 0usize..12,
        ) {
            let items = keys.iter().map(|(k, live)| (k.as_slice(), *live));
            let (kept, cut) = smallest(items, take, |_, live| live);
            let mut sorted: Vec<&[u8]> =
                keys.iter().filter(|(_, live)| *live).map(|(k, _)| k.as_slice()).collect();
            sorted.sort_unstable();
            proptest::prop_assert_eq!(kept.len(), sorted.len().min(take));
            let mut kept_sorted = kept.clone();
            kept_sorted.sort_unstable();
            // The smallest `take`, duplicates and all; the cut is the next one.
            proptest::prop_assert_eq!(&kept_sorted[..], &sorted[..kept.len()]);
            proptest::prop_assert_eq!(cut, sorted.get(take).copied());
        }
    }

    fn arb_steps() -> impl proptest::strategy::Strategy<Value = Vec<Step>> {
        use proptest::prelude::*;
        let op = (0u8..12, 0u8..3, -3i64..3);
        let step = prop_oneof![
            6 => proptest::collection::vec(op, 1..6).prop_map(Step::Write),
            1 => Just(Step::Freeze),
            1 => Just(Step::Flush),
        ];
        proptest::collection::vec(step, 1..30)
    }

    fn ops_of(spec: &[(u8, u8, i64)]) -> Vec<Op> {
        spec.iter()
            .map(|&(k, kind, v)| {
                let (collection, key, hlc) = ("c".to_string(), format!("k{k:02}"), Hlc::ZERO);
                match kind {
                    0 => upsert(&key, v),
                    1 => Op::Delete {
                        collection,
                        key,
                        hlc,
                    },
                    _ => Op::CounterAdd {
                        collection,
                        key,
                        hlc,
                        field: "n".into(),
                        delta: v,
                    },
                }
            })
            .collect()
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]
        /// Staging into the in-memory delta, freezing and flushing at arbitrary points reads
        /// exactly like applying every batch straight to the view file — after every step
        /// (get, list with and without a limit, counts) and after reopening.
        #[test]
        fn staged_frozen_and_flushed_reads_equal_direct_application(steps in arb_steps()) {
            let dir = tempfile::tempdir().unwrap();
            let (staged, direct, kp, mut engine) = staged_and_direct(dir.path());
            let mut frozen = false;
            for step in steps {
                match step {
                    Step::Write(spec) => {
                        let (vb, _) = engine.write("default", &kp, ops_of(&spec), 1_000).unwrap();
                        let batches = vec![vb];
                        staged.append_log(&batches).unwrap();
                        direct.write_batches(&batches).unwrap();
                        staged.stage(batches, false).unwrap();
                    }
                    Step::Freeze => frozen |= staged.freeze(),
                    Step::Flush => {
                        staged.flush_frozen(false).unwrap();
                        frozen = false;
                        staged.check_view().unwrap();
                    }
                }
                for k in 0..12 {
                    let key = format!("k{k:02}");
                    proptest::prop_assert_eq!(
                        staged.get("default", "c", &key).unwrap(),
                        direct.get("default", "c", &key).unwrap()
                    );
                }
                for (prefix, limit) in [("", 100), ("", 3), ("k0", 100), ("k1", 1)] {
                    let want = direct.list("default", "c", prefix, limit).unwrap();
                    proptest::prop_assert_eq!(
                        &staged.list("default", "c", prefix, limit).unwrap(),
                        &want
                    );
                    // Walking only the deltas' smallest keys: exact, or nothing where it stops
                    // at the cut short of `limit` (a wrong cut would drop or misplace records).
                    for take in [0, 1, 2, 5] {
                        if let Some(got) =
                            staged.list_taking("default", "c", prefix, limit, Some(take)).unwrap()
                        {
                            proptest::prop_assert_eq!(&got, &want);
                        }
                    }
                }
                proptest::prop_assert_eq!(staged.counts().unwrap(), direct.counts().unwrap());
            }
            let _ = frozen;
            // Flush the rest; what the file holds alone must be the same records.
            staged.flush_frozen(true).unwrap();
            staged.freeze();
            staged.flush_frozen(true).unwrap();
            proptest::prop_assert!(!staged.view_pending());
            let path = dir.path().join("a").join("store.redb");
            drop(staged);
            let reopened = Store::open(&path).unwrap();
            proptest::prop_assert_eq!(
                reopened.list("default", "c", "", 100).unwrap(),
                direct.list("default", "c", "", 100).unwrap()
            );
            proptest::prop_assert!(reopened.unapplied(&reopened.heads().unwrap()).unwrap().is_empty());
        }
    }

    /// One step of a read-joining schedule ([`arb_join_steps`]).
    #[derive(Clone, Debug)]
    enum JoinStep {
        /// A batch of (key index, op kind, value) ops, logged; staged at once if `now` and
        /// no older batch waits, otherwise queued unstaged.
        Write(Vec<(u8, u8, i64)>, bool),
        /// The oldest queued batch is staged; reads still join it until `Forget`.
        StageOldest,
        /// Reads stop joining the batches staged so far.
        Forget,
        Freeze,
        Flush,
    }

    fn arb_join_steps() -> impl proptest::strategy::Strategy<Value = Vec<JoinStep>> {
        use proptest::prelude::*;
        let op = (0u8..12, 0u8..3, -3i64..3);
        let step = prop_oneof![
            6 => (proptest::collection::vec(op, 1..6), any::<bool>())
                .prop_map(|(spec, now)| JoinStep::Write(spec, now)),
            3 => Just(JoinStep::StageOldest),
            2 => Just(JoinStep::Forget),
            1 => Just(JoinStep::Freeze),
            1 => Just(JoinStep::Flush),
        ];
        proptest::collection::vec(step, 1..30)
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]
        /// A point read or a listing that joins the logged batches not yet staged (some of
        /// them staged meanwhile: joined twice) reads exactly like applying every logged
        /// batch straight to the view file, whatever was staged, frozen or flushed; without
        /// the join it would miss every batch still queued (and with a key filter that
        /// missed a key, that key's ops). A listing joined to only the smallest keys the
        /// batches touch is exact below the next one, and reads nothing where fewer records
        /// than its limit lie below it.
        #[test]
        fn reads_and_listings_joining_unstaged_batches_equal_direct_application(steps in arb_join_steps()) {
            use crate::materializer::Unstaged;
            let dir = tempfile::tempdir().unwrap();
            let (staged, direct, kp, mut engine) = staged_and_direct(dir.path());
            // Logged batches reads join, oldest first, and how many of them are staged.
            let mut joined: std::collections::VecDeque<VerifiedBatch> = Default::default();
            let mut staged_of_joined = 0;
            for step in steps {
                match step {
                    JoinStep::Write(spec, now) => {
                        let (vb, _) = engine.write("default", &kp, ops_of(&spec), 1_000).unwrap();
                        let batches = vec![vb];
                        staged.append_log(&batches).unwrap();
                        direct.write_batches(&batches).unwrap();
                        if now && staged_of_joined == joined.len() {
                            staged.stage(batches, false).unwrap();
                        } else {
                            joined.extend(batches);
                        }
                    }
                    JoinStep::StageOldest => {
                        if let Some(b) = joined.get(staged_of_joined) {
                            staged.stage(vec![b.clone()], false).unwrap();
                            staged_of_joined += 1;
                        }
                    }
                    JoinStep::Forget => {
                        joined.drain(..staged_of_joined);
                        staged_of_joined = 0;
                    }
                    JoinStep::Freeze => {
                        staged.freeze();
                    }
                    JoinStep::Flush => {
                        staged.flush_frozen(false).unwrap();
                    }
                }
                // Every other batch kept with a key filter, as a backlog keeps them: a read
                // skips a batch its filter rules out (a filter that missed a key would
                // drop that key's ops from the read).
                let unstaged: Vec<Arc<[Unstaged]>> = joined
                    .iter()
                    .enumerate()
                    .map(|(i, b)| {
                        // Decoded first, as a peer's batch is (a batch sealed here and not
                        // decoded yet gets no filter).
                        b.ops.view().unwrap();
                        let kept = if i % 2 == 0 { Unstaged::filtered(b) } else { Unstaged::of(b) };
                        Arc::from([kept])
                    })
                    .collect();
                for k in 0..12 {
                    let key = format!("k{k:02}");
                    proptest::prop_assert_eq!(
                        staged.get_joining("default", "c", &key, &unstaged).unwrap(),
                        direct.get("default", "c", &key).unwrap()
                    );
                }
                for (prefix, limit) in [("", 100), ("", 3), ("k0", 100), ("k1", 1), ("", 0)] {
                    proptest::prop_assert_eq!(
                        staged
                            .list_joining("default", "c", prefix, limit, &unstaged, 12)
                            .unwrap(),
                        Some(direct.list("default", "c", prefix, limit).unwrap())
                    );
                }
                // Joined to only the `kept_max` smallest keys touched in range: exact below
                // the next key touched (the cut), and nothing read where fewer than `limit`
                // records lie below it.
                let touched: Vec<&str> = unstaged
                    .iter()
                    .flat_map(|kept| kept.iter())
                    .flat_map(|b| {
                        let view = b.ops.view().unwrap();
                        view.ops().iter().map(|op| view.key(op)).collect::<Vec<_>>()
                    })
                    .collect::<std::collections::BTreeSet<_>>()
                    .into_iter()
                    .collect();
                for kept_max in [0, 1, 3] {
                    for (prefix, limit) in [("", 100), ("", 1), ("", 2), ("k0", 3), ("k1", 1)] {
                        let in_range: Vec<&str> =
                            touched.iter().copied().filter(|k| k.starts_with(prefix)).collect();
                        let cut = in_range.get(kept_max).copied();
                        let all = direct.list("default", "c", prefix, 10_000).unwrap();
                        let below = all.iter().filter(|(k, _)| cut.is_none_or(|c| k.as_str() < c));
                        let want = match cut.is_none() || below.count() >= limit {
                            true => Some(all.into_iter().take(limit).collect::<Vec<_>>()),
                            false => None,
                        };
                        proptest::prop_assert_eq!(
                            staged
                                .list_joining("default", "c", prefix, limit, &unstaged, kept_max)
                                .unwrap(),
                            want,
                            "kept_max {}, prefix {:?}, limit {}", kept_max, prefix, limit
                        );
                    }
                }
            }
        }
    }

    /// Flushes into a file of thousands of records over many B-tree pages (keys new, held,
    /// and in between the delta's, deleted, merged) read exactly like direct application,
    /// every way a flush writes: the sweep of the file's cursor steps, joins and inserts in
    /// the right places; a delta written as a run beside the table is joined on every read
    /// (get, list, counts); a whole rewrite merges the table, the runs and the delta.
    #[test]
    fn flushes_into_a_large_file_equal_direct_application() {
        let dir = tempfile::tempdir().unwrap();
        let staged = Store::open(&dir.path().join("a").join("store.redb").tap_mkdir()).unwrap();
        let direct = Store::open(&dir.path().join("b").join("store.redb").tap_mkdir()).unwrap();
        let kp = Keypair::from_seed([9; 32]);
        let mut engine: Engine<u32> = Engine::new(EngineConfig::default());
        engine.join("default");
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut next = move |m: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % m
        };
        for round in 0..16 {
            // Even rounds stage a delta as large as a good part of the file (a slice of the
            // key space folded into the table, the rest written as a run), odd rounds a small
            // one (spliced in with the cursor).
            let (calls, per_call) = if round % 2 == 0 { (2, 500) } else { (1, 60) };
            for _ in 0..calls {
                let ops: Vec<Op> = (0..per_call)
                    .map(|_| {
                        // Long keys: few records per page, many pages.
                        let key = format!("{:06}-{}", next(6_000), "p".repeat(40));
                        let hlc = Hlc::ZERO;
                        match next(10) {
                            0 => Op::Delete {
                                collection: "c".into(),
                                key,
                                hlc,
                            },
                            1 => Op::CounterAdd {
                                collection: "c".into(),
                                key,
                                hlc,
                                field: "n".into(),
                                delta: 1,
                            },
                            _ => upsert(&key, next(100) as i64),
                        }
                    })
                    .collect();
                let (vb, _) = engine.write("default", &kp, ops, 1_000 + round).unwrap();
                let batches = vec![vb];
                staged.append_log(&batches).unwrap();
                direct.write_batches(&batches).unwrap();
                staged.stage(batches, false).unwrap();
            }
            // Counted with the delta still in memory: by a walk over the file's keys when the
            // delta is large next to it (even rounds), by lookups otherwise.
            assert_eq!(
                staged.counts().unwrap(),
                direct.counts().unwrap(),
                "staged, round {round}"
            );
            assert!(staged.freeze());
            assert!(staged.flush_frozen(false).unwrap() > 0);
            assert_eq!(
                staged.list("default", "c", "", 10_000).unwrap(),
                direct.list("default", "c", "", 10_000).unwrap(),
                "after flush {round}"
            );
            assert_eq!(staged.counts().unwrap(), direct.counts().unwrap());
            for _ in 0..50 {
                let key = format!("{:06}-{}", next(6_000), "p".repeat(40));
                assert_eq!(
                    staged.get("default", "c", &key).unwrap(),
                    direct.get("default", "c", &key).unwrap(),
                    "{key} after flush {round}"
                );
            }
        }
        assert!(
            direct.counts().unwrap().1 > 3_000,
            "records over many pages"
        );
        assert_eq!(staged.counts().unwrap(), direct.counts().unwrap());
        // Every way was taken (round 0 lands in an empty file, so splices): each later even
        // round folded a slice into the table and wrote the rest of its delta as a run.
        assert_eq!(
            (staged.view_runs_written(), staged.view_folds()),
            (7, 7),
            "runs written and folds"
        );
        // A delta of new keys past the file's last one (appends), as many as half the file's
        // records: spliced at the end, not rewritten, and still equal.
        let file_records = direct.counts().unwrap().1;
        let appended: Vec<Op> = (0..file_records / 2)
            .map(|i| upsert(&format!("9{i:07}-{}", "p".repeat(40)), i as i64))
            .collect();
        let (vb, _) = engine.write("default", &kp, appended, 2_000).unwrap();
        let batches = vec![vb];
        staged.append_log(&batches).unwrap();
        direct.write_batches(&batches).unwrap();
        staged.stage(batches, false).unwrap();
        assert!(staged.freeze());
        staged.flush_frozen(false).unwrap();
        assert_eq!(
            (staged.view_runs_written(), staged.view_folds()),
            (7, 7),
            "the appends were spliced"
        );
        assert_eq!(
            staged.list("default", "c", "", 100_000).unwrap(),
            direct.list("default", "c", "", 100_000).unwrap(),
            "after the appends"
        );
        assert_eq!(staged.counts().unwrap(), direct.counts().unwrap());
    }

    /// The flush's choice: appends and small deltas splice; a delta among the table's keys
    /// folds a twelfth of the file (table and runs) and makes a run of the rest; a
    /// seventeenth run would fold everything.
    #[test]
    fn flush_mode_splices_small_deltas_and_folds_a_slice_of_the_file() {
        use FlushMode::*;
        let m = flush_mode;
        let slice = |file_records| Run {
            fold: Fold::Slice { file_records },
        };
        // Appends, and a small delta among a large table's keys, splice.
        assert_eq!(m(&[], 0, 5_000_000), Splice);
        assert_eq!(m(&[], 3_000, 5_000_000), Splice);
        // Dense next to a small table (a tenth of it), or many keys: a slice and a run.
        assert_eq!(m(&[], 100, 1_000), slice(84));
        assert_eq!(m(&[], 5_000, 5_000_000), slice(416_667));
        // The runs' records count with the table's.
        let runs = [(1, 4_000_000), (2, 2_000_000)];
        assert_eq!(m(&runs, 1_000_000, 6_000_000), slice(1_000_000));
        // Sixteen runs: the seventeenth would be one too many, so all are folded.
        let sixteen: Vec<(u32, u64)> = (1..=16).map(|i| (i, 10)).collect();
        assert_eq!(m(&sixteen[..15], 10, 50), slice(17));
        assert_eq!(m(&sixteen, 10, 50), Run { fold: Fold::All });
    }

    /// Runs beside the table, folded away by the sweep: each dense delta folds a slice of the
    /// key space into the table (from where the last fold ended) and becomes a run for the
    /// rest; runs shrink as the sweep passes them and go once empty, so the first is gone
    /// within a sweep and the runs stay few. Every read joins them right throughout, across
    /// a reopening mid-sweep, and the view checks out after every flush.
    #[test]
    fn runs_are_folded_away_by_the_sweep() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a").join("store.redb").tap_mkdir();
        let mut staged = Store::open(&path).unwrap();
        let mut twin = Twin::new(&dir.path().join("b").join("store.redb"), 5);
        let key = |i: i64| format!("{i:07}");
        // 5,000 records, keys 0, 16, 32, ...: spliced into the empty table.
        twin.write(
            &staged,
            (0..5_000).map(|i| upsert(&key(i * 16), i)).collect(),
            true,
        );
        let listed = |staged: &Store| {
            let txn = staged.view.begin_read().unwrap();
            run_list(&txn.open_table(RUN_LIST).unwrap()).unwrap()
        };
        let sweep = |staged: &Store| {
            let txn = staged.view.begin_read().unwrap();
            let t = txn.open_table(VIEW_SWEEP).unwrap();
            t.get("from").unwrap().map(|v| v.value().to_vec())
        };
        let (mut first_run, mut most_runs) = (None, 0);
        for d in 1i64..=16 {
            // Dense (as many keys as a run takes at least), spread over the table's keys:
            // new ones, and the table's own with the sixteenth; a delete and a counter.
            let mut ops: Vec<Op> = (0..RUN_MIN_RECORDS as i64 + 100)
                .map(|i| upsert(&key(i * 16 + d % 16), d * 10_000 + i))
                .collect();
            ops.push(Op::Delete {
                collection: "c".into(),
                key: key(d * 48),
                hlc: Hlc::ZERO,
            });
            ops.push(Op::CounterAdd {
                collection: "c".into(),
                key: key(d * 32 + 1),
                hlc: Hlc::ZERO,
                field: "n".into(),
                delta: d,
            });
            twin.write(&staged, ops, true);
            let runs = listed(&staged);
            first_run = first_run.or(runs.first().map(|&(id, _)| id));
            most_runs = most_runs.max(runs.len());
            let (table, held, in_runs) = staged.check_view().unwrap();
            assert_eq!(held, runs.len());
            assert_eq!(in_runs, runs.iter().map(|&(_, n)| n).sum::<u64>());
            assert_eq!(staged.view_size().unwrap().0, table + in_runs);
            assert_eq!(staged.counts().unwrap(), twin.direct.counts().unwrap());
            assert_eq!(
                staged.list("default", "c", "", 100_000).unwrap(),
                twin.direct.list("default", "c", "", 100_000).unwrap(),
                "delta {d}"
            );
            for i in [0, 1, 16, 33, 48, 65, 4_000, 4_097, 65_535, 79_984, 79_999] {
                assert_eq!(
                    staged.get("default", "c", &key(i)).unwrap(),
                    twin.direct.get("default", "c", &key(i)).unwrap(),
                    "{i} after delta {d}"
                );
            }
            // A small delta left staged (a new key, one the table holds, a counter a run
            // may hold), counted twice: the file's part is kept between counts of one
            // generation of the file, and the delta's keys are looked up in every level.
            let small = vec![
                upsert(&key(90_000 + d), 1),
                upsert(&key(16), d),
                Op::CounterAdd {
                    collection: "c".into(),
                    key: key(d * 32 + 1),
                    hlc: Hlc::ZERO,
                    field: "n".into(),
                    delta: 1,
                },
            ];
            twin.write(&staged, small, false);
            for _ in 0..2 {
                assert_eq!(
                    staged.counts().unwrap(),
                    twin.direct.counts().unwrap(),
                    "delta {d}"
                );
            }
            if d == 6 {
                // Reopened mid-sweep: the same records, and the sweep goes on from where it
                // was.
                let at = sweep(&staged);
                assert!(at.as_ref().is_some_and(|k| !k.is_empty()), "mid-sweep");
                drop(staged);
                staged = Store::open(&path).unwrap();
                assert_eq!(sweep(&staged), at);
                // The small delta staged before was lost with the process: applied from the
                // log again, straight into the table, as a node does at start.
                let behind = staged.unapplied(&staged.heads().unwrap()).unwrap();
                assert_eq!(behind.len(), 1);
                let changes = staged.apply(&behind, false).unwrap();
                // A change carries the whole record, runs included.
                let whole = |k: &str| staged.get("default", "c", k).unwrap();
                for c in &changes {
                    assert_eq!(c.fields, whole(&c.key), "{}", c.key);
                }
                assert_eq!(
                    staged.list("default", "c", "", 100_000).unwrap(),
                    twin.direct.list("default", "c", "", 100_000).unwrap(),
                    "reopened"
                );
            }
        }
        // The sweep folded the first run away, and the runs stayed few.
        let runs = listed(&staged);
        let first_run = first_run.expect("a run was written");
        assert!(runs.iter().all(|&(id, _)| id != first_run), "{runs:?}");
        assert!(
            most_runs <= FOLD_SWEEP_FLUSHES as usize + 2,
            "{most_runs} runs at once"
        );
        assert!(staged.view_folds() >= 10, "{} folds", staged.view_folds());
        // Ids go on past the runs folded away (a run's filter held in memory must never
        // stand for another run).
        assert!(runs.iter().all(|&(id, _)| id > first_run), "{runs:?}");
        // The backstop (a seventeenth run would be one too many): a dense delta folds every
        // run and itself into the table, and reads stay the same.
        let before = listed(&staged);
        assert!(before.len() >= 2);
        staged
            .fold_all_next
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let ops: Vec<Op> = (0..RUN_MIN_RECORDS as i64 + 100)
            .map(|i| upsert(&key(i * 16 + 3), 500_000 + i))
            .collect();
        twin.write(&staged, ops, true);
        assert!(listed(&staged).is_empty(), "every run folded");
        assert_eq!(sweep(&staged), None, "the sweep starts over");
        assert_eq!(staged.check_view().unwrap().1, 0);
        assert_eq!(
            staged.list("default", "c", "", 100_000).unwrap(),
            twin.direct.list("default", "c", "", 100_000).unwrap(),
            "after folding everything"
        );
        // Then runs again, as before.
        for d in 20i64..=23 {
            let ops: Vec<Op> = (0..RUN_MIN_RECORDS as i64 + 100)
                .map(|i| upsert(&key(i * 16 + d % 16), d * 10_000 + i))
                .collect();
            twin.write(&staged, ops, true);
        }
        let runs = listed(&staged);
        assert!(!runs.is_empty(), "runs again after the backstop");
        // A record of a run not listed (as a damaged file could hold) fails the check, and
        // so does a listed run's record whose state does not decode.
        let listed = runs[0].0;
        let (held, stored) = {
            let txn = staged.view.begin_read().unwrap();
            let runs = txn.open_table(RUNS).unwrap();
            let mut from = Vec::new();
            run_key(listed, &[], &mut from);
            let (k, v) = runs
                .range(from.as_slice()..)
                .unwrap()
                .next()
                .unwrap()
                .unwrap();
            (k.value().to_vec(), v.value().to_vec())
        };
        let mut unlisted = Vec::new();
        run_key(runs.last().unwrap().0 + 1, b"zz", &mut unlisted);
        // Each damage made, checked, and undone (the unlisted record removed, the state put
        // back).
        let put = |key: &[u8], state: Option<&[u8]>| {
            let txn = staged.view.begin_write().unwrap();
            {
                let mut runs = txn.open_table(RUNS).unwrap();
                match state {
                    Some(state) => runs.insert(key, state).unwrap(),
                    None => runs.remove(key).unwrap(),
                };
            }
            txn.commit().unwrap();
        };
        put(&unlisted, Some(&stored));
        assert!(staged.check_view().is_err(), "a run not listed");
        put(&unlisted, None);
        put(&held, Some(b"?"));
        assert!(staged.check_view().is_err(), "a state that does not decode");
        put(&held, Some(&stored));
        assert!(staged.check_view().is_ok());
        // A filter that does not hold its run's keys, or does not read back, fails it too.
        let put_filter = |filter: &[u8]| {
            let txn = staged.view.begin_write().unwrap();
            let old = {
                let mut filters = txn.open_table(RUN_FILTERS).unwrap();
                let old = filters.get(listed).unwrap().unwrap().value().to_vec();
                filters.insert(listed, filter).unwrap();
                old
            };
            txn.commit().unwrap();
            old
        };
        let kept = put_filter(&RunFilter::with_capacity(1).encode());
        assert!(
            staged.check_view().is_err(),
            "a filter missing its run's keys"
        );
        put_filter(b"?");
        assert!(
            staged.check_view().is_err(),
            "a filter that does not read back"
        );
        put_filter(&kept);
        assert!(staged.check_view().is_ok());
        drop(staged);
        // Reopened: nothing left to apply again (every write since the last small delta was
        // flushed, that delta with it), and the same records.
        let reopened = Store::open(&path).unwrap();
        assert!(reopened
            .unapplied(&reopened.heads().unwrap())
            .unwrap()
            .is_empty());
        assert_eq!(
            reopened.list("default", "c", "", 100_000).unwrap(),
            twin.direct.list("default", "c", "", 100_000).unwrap()
        );
        // The namespace rebuilt from its log (as a late revocation does): its records leave
        // the runs, the emptied runs go, and the view still checks out.
        assert!(reopened.check_view().unwrap().1 > 0);
        reopened
            .rebuild_namespace("default", &BTreeMap::new())
            .unwrap();
        let (table, runs, in_runs) = reopened.check_view().unwrap();
        assert_eq!((runs, in_runs), (0, 0));
        assert_eq!(table, twin.direct.counts().unwrap().1);
        assert_eq!(
            reopened.list("default", "c", "", 100_000).unwrap(),
            twin.direct.list("default", "c", "", 100_000).unwrap()
        );
    }

    /// Each run is written with a Bloom filter, stored beside it: a get of a key no run
    /// holds looks in (nearly) none of them, before and after a restart, and no key a run
    /// holds is missed. A file written by a binary that predates the filters since (it may
    /// have made other runs under the same ids) has every filter dropped at open.
    #[test]
    fn run_filters_spare_gets_the_runs_and_go_when_an_older_binary_wrote() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a").join("store.redb").tap_mkdir();
        let mut staged = Store::open(&path).unwrap();
        let mut twin = Twin::new(&dir.path().join("b").join("store.redb"), 6);
        twin.flushed(
            &staged,
            (0..1_000)
                .map(|i| upsert(&format!("{:05}", i * 10), i))
                .collect(),
        );
        // Three dense deltas among the table's keys, each smaller than the last: three runs.
        for (d, size) in [(1i64, 400i64), (2, 300), (3, 200)] {
            twin.flushed(
                &staged,
                (0..size)
                    .map(|i| upsert(&format!("{:05}", i * 20 + d), d * 1_000 + i))
                    .collect(),
            );
        }
        assert_eq!(staged.check_view().unwrap().1, 3);
        let stored_filters = |store: &Store| {
            let txn = store.view.begin_read().unwrap();
            let t = txn.open_table(RUN_FILTERS).unwrap();
            t.len().unwrap()
        };
        assert_eq!(stored_filters(&staged), 3);
        let every_key: Vec<String> = (0..10_000).map(|i| format!("{i:05}")).collect();
        let same_as_direct = |store: &Store, direct: &Store, when: &str| {
            for k in &every_key {
                assert_eq!(
                    store.get("default", "c", k).unwrap(),
                    direct.get("default", "c", k).unwrap(),
                    "{k} {when}"
                );
            }
        };
        // Run lookups made by 1,000 gets of keys no level holds.
        let absent_probes = |store: &Store| {
            let before = store.run_probes.load(std::sync::atomic::Ordering::Relaxed);
            for i in 0..1_000 {
                assert!(store
                    .get("default", "c", &format!("x{i}"))
                    .unwrap()
                    .is_none());
            }
            store.run_probes.load(std::sync::atomic::Ordering::Relaxed) - before
        };
        same_as_direct(&staged, &twin.direct, "with filters");
        let probes = absent_probes(&staged);
        assert!(
            probes < 100,
            "{probes} run lookups for 3,000 (get, run) pairs"
        );
        drop(staged);
        staged = Store::open(&path).unwrap();
        same_as_direct(&staged, &twin.direct, "reopened");
        let probes = absent_probes(&staged);
        assert!(probes < 100, "{probes} run lookups after a restart");
        // An older binary's write: the generation raised without `filters-at`, and (as if it
        // had folded the runs and made others under the same ids) the newest run's filter
        // now stands for nothing it holds.
        drop(staged);
        {
            let view = Database::builder()
                .create(path.with_file_name("records.redb"))
                .unwrap();
            let txn = view.begin_write().unwrap();
            {
                let mut meta = txn.open_table(VIEW_META).unwrap();
                let g = meta.get("generation").unwrap().unwrap().value();
                meta.insert("generation", g + 1).unwrap();
                let mut filters = txn.open_table(RUN_FILTERS).unwrap();
                let newest = filters.last().unwrap().unwrap().0.value();
                filters
                    .insert(newest, RunFilter::with_capacity(1).encode().as_slice())
                    .unwrap();
            }
            txn.commit().unwrap();
        }
        staged = Store::open(&path).unwrap();
        assert_eq!(stored_filters(&staged), 0, "filters dropped at open");
        same_as_direct(&staged, &twin.direct, "after an older binary wrote");
        assert_eq!(
            absent_probes(&staged),
            3_000,
            "no filter: every run looked in"
        );
        // The next run has a filter again, under a new id.
        twin.flushed(
            &staged,
            (0..150)
                .map(|i| upsert(&format!("{:05}", i * 20 + 7), i))
                .collect(),
        );
        assert_eq!(stored_filters(&staged), 1);
        same_as_direct(&staged, &twin.direct, "after a run with a filter");
        assert!(staged.check_view().is_ok());
        // Repair rebuilds the records into the table: no run is left, nor any filter.
        staged.rebuild_records().unwrap();
        assert_eq!(stored_filters(&staged), 0);
        assert_eq!(staged.check_view().unwrap().1, 0);
        same_as_direct(&staged, &twin.direct, "after a repair");
    }

    /// A view file from before the runs keeps its watermark (`applied-v2`, taken over by
    /// ours at open), so nothing is applied again; the old table is gone afterwards.
    #[test]
    fn a_view_file_from_before_the_runs_keeps_its_watermark() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        let kp = Keypair::from_seed([3; 32]);
        let mut engine: Engine<u32> = Engine::new(EngineConfig::default());
        engine.join("default");
        let store = Store::open(&path).unwrap();
        for t in 0..3 {
            let (vb, _) = engine
                .write(
                    "default",
                    &kp,
                    vec![upsert(&format!("k{t}"), t)],
                    1_000 + t as u64,
                )
                .unwrap();
            store.write_batches(&[vb]).unwrap();
        }
        let want = store.list("default", "c", "", 100).unwrap();
        drop(store);
        // Made old: the watermark moved under its earlier name.
        copy_watermark(&dir.path().join("records.redb"), APPLIED_V2, true);
        let store = Store::open(&path).unwrap();
        assert!(store.unapplied(&store.heads().unwrap()).unwrap().is_empty());
        assert_eq!(store.list("default", "c", "", 100).unwrap(), want);
        let txn = store.view.begin_read().unwrap();
        assert!(
            txn.open_table(APPLIED_V2).is_err(),
            "the old table is dropped"
        );
    }

    /// A view file whose runs a binary of the merged runs wrote (`-v1` run tables, watermark
    /// `applied-v3`) is taken over at open: the same records, its runs under our names. One
    /// such a binary wrote after ours (both watermarks there) is rebuilt from the log: every
    /// batch is applied again at start, and reads come out the same.
    #[test]
    fn a_view_file_of_merged_runs_is_taken_over_or_rebuilt() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a").join("store.redb").tap_mkdir();
        let staged = Store::open(&path).unwrap();
        let mut twin = Twin::new(&dir.path().join("b").join("store.redb"), 7);
        let key = |i: i64| format!("{i:06}");
        twin.flushed(
            &staged,
            (0..2_000).map(|i| upsert(&key(i * 4), i)).collect(),
        );
        for d in 1..=2 {
            let ops = (0..RUN_MIN_RECORDS as i64 + 1)
                .map(|i| upsert(&key(i * 2 + d % 2), d * 100_000 + i))
                .collect();
            twin.flushed(&staged, ops);
        }
        let want = twin.direct.list("default", "c", "", 100_000).unwrap();
        let runs = staged.check_view().unwrap().1;
        assert!(runs >= 1, "runs beside the table");
        drop(staged);
        let rename = |pairs: &[(&str, &str)]| {
            let view = Database::create(dir.path().join("a").join("records.redb")).unwrap();
            let txn = view.begin_write().unwrap();
            for &(from, to) in pairs {
                let from: TableDefinition<'_, &[u8], &[u8]> = TableDefinition::new(from);
                let to: TableDefinition<'_, &[u8], &[u8]> = TableDefinition::new(to);
                txn.rename_table(from, to).unwrap();
            }
            txn.commit().unwrap();
        };
        let ours = [
            APPLIED.name(),
            RUNS.name(),
            RUN_LIST.name(),
            RUN_FILTERS.name(),
        ];
        let theirs = [APPLIED_V3.name(), "records-runs-v1", "records-run-list-v1"];
        let theirs = theirs.into_iter().chain(["records-run-filter-v1"]);
        let back: Vec<(&str, &str)> = ours.into_iter().zip(theirs).collect();
        // (The renames name our tables as they are defined.)
        let renames: Vec<(&str, &str)> = back.iter().map(|&(new, old)| (old, new)).collect();
        assert_eq!(renames, UPGRADE_RENAMES);
        rename(&back);
        let staged = Store::open(&path).unwrap();
        assert!(staged
            .unapplied(&staged.heads().unwrap())
            .unwrap()
            .is_empty());
        assert_eq!(staged.list("default", "c", "", 100_000).unwrap(), want);
        assert_eq!(staged.check_view().unwrap().1, runs, "the runs taken over");
        {
            let txn = staged.view.begin_read().unwrap();
            assert!(txn.open_table(APPLIED_V3).is_err(), "the old name is gone");
        }
        drop(staged);
        // An older binary wrote since: its watermark beside ours.
        copy_watermark(
            &dir.path().join("a").join("records.redb"),
            APPLIED_V3,
            false,
        );
        let staged = Store::open(&path).unwrap();
        assert_eq!(staged.check_view().unwrap(), (0, 0, 0), "the view emptied");
        let behind = staged.unapplied(&staged.heads().unwrap()).unwrap();
        assert_eq!(behind.len(), 3, "the whole log applied again");
        staged.apply(&behind, false).unwrap();
        assert_eq!(staged.list("default", "c", "", 100_000).unwrap(), want);
    }

    /// Copies the view file's watermark ([`APPLIED`]) under another name (`to`), as an
    /// earlier binary would have kept it; `moved` drops ours.
    fn copy_watermark(view: &Path, to: TableDefinition<'_, &[u8], u64>, moved: bool) {
        let view = Database::create(view).unwrap();
        let txn = view.begin_write().unwrap();
        {
            let ours = txn.open_table(APPLIED).unwrap();
            let mut theirs = txn.open_table(to).unwrap();
            for entry in ours.iter().unwrap() {
                let (ck, seq) = entry.unwrap();
                theirs.insert(ck.value(), seq.value()).unwrap();
            }
        }
        if moved {
            txn.delete_table(APPLIED).unwrap();
        }
        txn.commit().unwrap();
    }

    /// A store staged, frozen and flushed by hand is compared with one every batch is applied
    /// to straight away (`direct`); both are given the same batches by one author.
    struct Twin {
        direct: Store,
        engine: Engine<u32>,
        kp: Keypair,
        now: u64,
    }

    impl Twin {
        fn new(direct: &Path, seed: u8) -> Self {
            let mut engine: Engine<u32> = Engine::new(EngineConfig::default());
            engine.join("default");
            Twin {
                direct: Store::open(&direct.to_path_buf().tap_mkdir()).unwrap(),
                engine,
                kp: Keypair::from_seed([seed; 32]),
                now: 1_000,
            }
        }

        /// `ops` as one batch: logged and staged in `staged` (and flushed if `flush`),
        /// applied to `direct`.
        fn write(&mut self, staged: &Store, ops: Vec<Op>, flush: bool) {
            self.now += 1;
            let (vb, _) = self
                .engine
                .write("default", &self.kp, ops, self.now)
                .unwrap();
            let batches = vec![vb];
            staged.append_log(&batches).unwrap();
            self.direct.write_batches(&batches).unwrap();
            staged.stage(batches, false).unwrap();
            if flush {
                assert!(staged.freeze());
                staged.flush_frozen(false).unwrap();
            }
        }

        /// [`Twin::write`], flushed.
        fn flushed(&mut self, staged: &Store, ops: Vec<Op>) {
            self.write(staged, ops, true);
        }
    }

    trait TapMkdir {
        fn tap_mkdir(self) -> Self;
    }

    impl TapMkdir for std::path::PathBuf {
        fn tap_mkdir(self) -> Self {
            if let Some(parent) = self.parent() {
                std::fs::create_dir_all(parent).unwrap();
            }
            self
        }
    }

    /// A batch's dictionary is stored with it (once), found by ref to serve it, and used to
    /// re-verify the batch (`check`, `unapplied`, `rebuild_records`).
    #[test]
    fn dictionaries_are_stored_with_their_batches() {
        let dir = tempfile::tempdir().unwrap();
        let kp = Keypair::generate();
        let mut engine: Engine<u32> = Engine::new(EngineConfig::default());
        engine.join("default");
        let op = |i: i64| Op::Upsert {
            collection: "players".into(),
            key: format!("player-{}", i % 8),
            hlc: Hlc::ZERO,
            fields: [
                (
                    "name".to_string(),
                    serde_json::json!(format!("player number {}", i % 8)),
                ),
                (
                    "state".to_string(),
                    serde_json::json!("running to the north gate"),
                ),
            ]
            .into_iter()
            .collect(),
        };
        let mut sample = Vec::new();
        for i in 0..32 {
            blazedb_protocol::codec::encode_ops(&[op(i)], &mut sample);
        }
        let dict = blazedb_protocol::Dict::new(sample).unwrap();
        engine.set_write_dict("default", dict.clone());
        let stored: Vec<VerifiedBatch> = (0..3)
            .map(|i| engine.write("default", &kp, vec![op(i)], 1_000).unwrap().0)
            .collect();
        assert!(stored.iter().all(|b| b.dict.as_ref() == Some(&dict)));
        let store = Store::open(&dir.path().join("db.redb")).unwrap();
        store.write_batches(&stored).unwrap();
        assert_eq!(store.dicts().unwrap().len(), 1);
        assert_eq!(
            store.dicts_by_ref(&[dict.dict_ref()]).unwrap(),
            vec![dict.clone()]
        );
        assert!(store.dicts_by_ref(&[DictRef([0; 8])]).unwrap().is_empty());
        assert_eq!(store.check().unwrap(), 3);
        assert_eq!(store.rebuild_records().unwrap(), 3);
        assert_eq!(store.unapplied(&store.heads().unwrap()).unwrap().len(), 0);
    }

    #[test]
    fn batches_persist_and_records_rebuild_identically() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.redb");
        let kp = Keypair::generate();
        let mut engine: Engine<u32> = Engine::new(EngineConfig::default());
        engine.join("default");
        let mut stored = Vec::new();
        for i in 0..5 {
            let (vb, _) = engine
                .write(
                    "default",
                    &kp,
                    vec![upsert("a", i), upsert(&format!("k{i}"), i)],
                    1_000,
                )
                .unwrap();
            stored.push(vb);
        }
        {
            let store = Store::open(&path).unwrap();
            let changes = store.write_batches(&stored).unwrap();
            assert_eq!(changes.len(), 10);
        }
        let store = Store::open(&path).unwrap();
        let heads = store.heads().unwrap();
        assert_eq!(heads.len(), 1);
        assert_eq!(heads[0].seq, 5);
        assert_eq!(heads[0].id, stored[4].id);
        assert_eq!(store.get("default", "c", "a").unwrap().unwrap()["v"], 4);
        let before = store.list("default", "c", "", 100).unwrap();
        assert_eq!(before.len(), 6);
        assert_eq!(store.list("default", "c", "k", 100).unwrap().len(), 5);
        assert_eq!(store.list("default", "c", "k", 2).unwrap().len(), 2);
        assert_eq!(store.check().unwrap(), 5);
        store.rebuild_records().unwrap();
        assert_eq!(store.list("default", "c", "", 100).unwrap(), before);
        let range = store
            .chain_range("default", kp.public().as_bytes(), 2, 10, 1 << 20, None)
            .unwrap();
        assert_eq!(range.len(), 4);
        assert_eq!(range[0], stored[1].bytes);
    }

    /// A backup holds every entry of the log's tables (here more than one copying
    /// transaction's worth), two namespaces' marks and the restored-identity mark, and not
    /// the view's failure mark; the copy opens as a store whose records rebuild to the
    /// original's; marks go when cleared; an existing file is never written over.
    #[test]
    fn a_backup_copies_the_log_and_marks_its_namespaces() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        let kp = Keypair::generate();
        let mut engine: Engine<u32> = Engine::new(EngineConfig::default());
        let mut batches = Vec::new();
        for ns in ["default", "other"] {
            engine.join(ns);
            for i in 0..(BACKUP_TXN_ENTRIES as i64 / 2 + 10) {
                let ops = vec![upsert(&format!("k{}", i % 50), i)];
                batches.push(engine.write(ns, &kp, ops, 1_000).unwrap().0);
            }
        }
        let store = Store::open(&path).unwrap();
        store.write_batches(&batches).unwrap();
        store.mark_view_failed("a test").unwrap();
        let to = dir.path().join("backup.redb");
        let info = store.backup_log(&to, true).unwrap();
        assert_eq!(info.batches, batches.len() as u64);
        assert_eq!(info.namespaces, 2);
        assert_eq!(info.bytes, std::fs::metadata(&to).unwrap().len());
        assert!(matches!(
            store.backup_log(&to, true),
            Err(StoreError::File { .. })
        ));
        assert_eq!(std::fs::metadata(&to).unwrap().len(), info.bytes);
        // A store being closed makes none (and leaves no file).
        let closing =
            Store::open(&dir.path().join("closing").join("store.redb").tap_mkdir()).unwrap();
        closing.write_batches(&batches[..3]).unwrap();
        closing.stop_background_count();
        let never = dir.path().join("never.redb");
        assert!(matches!(
            closing.backup_log(&never, true),
            Err(StoreError::Closing)
        ));
        assert!(!never.exists());

        let all = |db: &Db| -> Vec<(Vec<u8>, Vec<u8>)> {
            let txn = db.begin_read().unwrap();
            let mut out = Vec::new();
            for def in [BATCHES, CHAINS, DICTS, REVOKED_BY] {
                for e in txn.open_table(def).unwrap().iter().unwrap() {
                    let (k, v) = e.unwrap();
                    out.push((k.value().to_vec(), v.value().to_vec()));
                }
            }
            out
        };
        let copy = Store::open_at(&to, &dir.path().join("copy-view.redb")).unwrap();
        let entries = all(&copy.db);
        assert!(entries.len() > BACKUP_TXN_ENTRIES, "{}", entries.len());
        assert_eq!(entries, all(&store.db));
        assert_eq!(copy.view_failed().unwrap(), None);
        assert!(copy.identity_restored().unwrap());
        assert_eq!(copy.backup_marks().unwrap(), vec!["default", "other"]);
        assert_eq!(copy.check().unwrap(), batches.len() as u64);
        copy.rebuild_records().unwrap();
        store.rebuild_records().unwrap();
        for ns in ["default", "other"] {
            assert_eq!(
                copy.list(ns, "c", "", 100).unwrap(),
                store.list(ns, "c", "", 100).unwrap()
            );
        }
        copy.clear_backup_mark("default").unwrap();
        assert_eq!(copy.backup_marks().unwrap(), vec!["other"]);
        copy.mark_own_chain_cut("default").unwrap();
        copy.clear_own_chain_doubts().unwrap();
        assert!(copy.backup_marks().unwrap().is_empty());
        assert!(!copy.identity_restored().unwrap());
        assert!(copy.own_chain_cuts().unwrap().is_empty());
        assert_eq!(copy.view_failed().unwrap(), None);
        copy.mark_view_failed("kept").unwrap();
        copy.clear_own_chain_doubts().unwrap();
        assert_eq!(copy.view_failed().unwrap().as_deref(), Some("kept"));
    }

    /// `/metrics`' count: the batches always counted, the records again only once the last
    /// count is ten times its cost old, and then exactly.
    #[test]
    fn a_bounded_count_is_taken_again_only_when_due() {
        use std::time::Duration;
        assert!(!count_due(
            Duration::from_millis(99),
            Duration::from_millis(10)
        ));
        assert!(count_due(
            Duration::from_millis(100),
            Duration::from_millis(10)
        ));
        assert!(count_due(Duration::ZERO, Duration::ZERO));

        let (_dir, store, mut put) = counted_store();
        let mut write = |i: i64| put(&store, i);
        write(0);
        assert_eq!(store.counts_bounded().unwrap(), (1, 1));
        // The last count as if it had taken an hour: not due, so it stands, while the
        // batches are counted afresh.
        let expensive = |records| TakenCount {
            records,
            at: std::time::Instant::now(),
            took: Duration::from_secs(3600),
        };
        *store.bounded_count.lock().unwrap() = Some(expensive(1));
        write(1);
        write(2);
        assert_eq!(store.counts().unwrap(), (3, 3));
        assert_eq!(store.counts_bounded().unwrap(), (3, 1));
        // While another caller counts, the last count is returned at once.
        *store.bounded_count.lock().unwrap() = Some(TakenCount {
            took: Duration::ZERO,
            ..expensive(1)
        });
        {
            let _busy = store.counting.lock().unwrap();
            assert_eq!(store.counts_bounded().unwrap(), (3, 1));
        }
        // Due: counted again, exactly, and kept.
        assert_eq!(store.counts_bounded().unwrap(), (3, 3));
        assert_eq!(store.bounded_count.lock().unwrap().unwrap().records, 3);
    }

    /// A fresh store, and a writer of one-record batches (record `k{i}`) into it, for the
    /// count tests.
    fn counted_store() -> (tempfile::TempDir, Arc<Store>, impl FnMut(&Store, i64)) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(&dir.path().join("store.redb")).unwrap());
        let kp = Keypair::generate();
        let mut engine: Engine<u32> = Engine::new(EngineConfig::default());
        engine.join("default");
        let put = move |store: &Store, i: i64| {
            let (vb, _) = engine
                .write("default", &kp, vec![upsert(&format!("k{i}"), i)], 1_000)
                .unwrap();
            store.write_batches(&[vb]).unwrap();
        };
        (dir, store, put)
    }

    /// A scrape never waits for a due record count that took long last time: it gets the last
    /// one, and the count is taken again on a thread of its own (a scrape that counted in place
    /// would see 3). A quick count (a small store's) is taken in place: exact.
    #[test]
    fn a_scrape_returns_the_last_count_and_recounts_behind_it() {
        use std::time::Duration;
        let (_dir, store, mut put) = counted_store();
        let mut write = |i: i64| put(&store, i);
        write(0);
        // The first count is taken in place.
        assert_eq!(store.counts_for_scrape().unwrap(), (1, 1));
        write(1);
        write(2);
        // A quick count, due: taken again in place.
        let taken = |records, took| TakenCount {
            records,
            at: std::time::Instant::now()
                .checked_sub(Duration::from_secs(2))
                .expect("up for two seconds"),
            took,
        };
        *store.bounded_count.lock().unwrap() = Some(taken(1, Duration::ZERO));
        assert_eq!(store.counts_for_scrape().unwrap(), (3, 3));
        // A long one, due: the last count comes back, the batches counted anew.
        *store.bounded_count.lock().unwrap() = Some(taken(1, COUNT_IN_PLACE_MAX));
        assert_eq!(store.counts_for_scrape().unwrap(), (3, 1));
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while store.last_count().unwrap().records != 3 {
            assert!(std::time::Instant::now() < deadline, "never counted again");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(store.counts_for_scrape().unwrap(), (3, 3));
    }

    /// Stopping the count behind the scrapes (a node shutting down) ends it without waiting
    /// for it to finish, releases the store (its files can be opened again), and starts no
    /// other. The count is held up by the staged delta's lock, so it is still running when
    /// the stop comes; a count that ran on would record 3.
    #[test]
    fn stopping_the_count_behind_the_scrapes_releases_the_store() {
        use std::time::{Duration, Instant};
        let (_dir, store, mut put) = counted_store();
        put(&store, 0);
        assert_eq!(store.counts_for_scrape().unwrap(), (1, 1));
        put(&store, 1);
        put(&store, 2);
        *store.bounded_count.lock().unwrap() = Some(TakenCount {
            records: 1,
            at: Instant::now()
                .checked_sub(Duration::from_secs(2))
                .expect("up for two seconds"),
            took: COUNT_IN_PLACE_MAX,
        });
        let held = store.staged.meta.write();
        assert_eq!(store.counts_for_scrape().unwrap(), (3, 1));
        assert!(store.recount.lock().unwrap().is_some(), "no count started");
        let stopping = {
            let store = Arc::clone(&store);
            std::thread::spawn(move || store.stop_background_count())
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !store.closing.load(std::sync::atomic::Ordering::Acquire) {
            assert!(Instant::now() < deadline, "never stopped");
            std::thread::sleep(Duration::from_millis(1));
        }
        drop(held);
        stopping.join().unwrap();
        assert!(store.recount.lock().unwrap().is_none());
        assert_eq!(store.last_count().unwrap().records, 1, "the count ran on");
        assert_eq!(Arc::strong_count(&store), 1, "the store is still shared");
        // Due still, but no count starts once stopped.
        assert_eq!(store.counts_for_scrape().unwrap(), (3, 1));
        assert!(store.recount.lock().unwrap().is_none());
    }

    /// A crash between the durable log append and the (non-durable) record update leaves the
    /// records behind the log; reopening finds exactly the missing batches to apply.
    #[test]
    fn records_behind_the_log_are_found_after_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        let (batches, _) = four_batches(&path, 1);
        // "Crash": the next three reach the log only.
        Store::open(&path)
            .unwrap()
            .append_log(&batches[1..])
            .unwrap();
        let store = Store::open(&path).unwrap();
        assert!(store.get("default", "c", "k2").unwrap().is_none());
        let behind = store.unapplied(&store.heads().unwrap()).unwrap();
        assert_eq!(
            behind.iter().map(|b| b.header.seq).collect::<Vec<_>>(),
            vec![2, 3, 4]
        );
        // Streamed, two at a time: the same batches, in the same order.
        let mut streamed = Vec::new();
        let given = store
            .for_each_unapplied(&store.heads().unwrap(), 2, |b| {
                streamed.push(b.iter().map(|b| b.header.seq).collect::<Vec<_>>());
                Ok(())
            })
            .unwrap();
        assert_eq!((given, streamed), (3, vec![vec![2, 3], vec![4]]));
        store.apply(&behind, true).unwrap();
        assert_eq!(store.get("default", "c", "k2").unwrap().unwrap()["v"], 2);
        assert!(store.unapplied(&store.heads().unwrap()).unwrap().is_empty());
        // Applying again is a no-op (watermark), not a double apply.
        store.apply(&behind, true).unwrap();
        assert_eq!(store.counts().unwrap(), (4, 4));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]
        /// Replaying the log into the view (staged a window at a time, flushed whenever the
        /// delta reaches a bound, here as small as one byte: several flushes, splices, folds
        /// and runs) gives the records applying every batch straight to the file gives,
        /// upserts, deletes and counter adds of two authors alike, whatever part of the log
        /// the view already held (a crash: the watermark).
        #[test]
        fn a_replayed_log_gives_the_records_direct_application_gives(
            batches in proptest::collection::vec(
                proptest::collection::vec((0u8..12, 0u8..3, -3i64..3), 1..6), 1..24),
            held in 0usize..24,
            window in 1u32..4,
            tiny in proptest::bool::ANY,
        ) {
            let dir = tempfile::tempdir().unwrap();
            let mut engine: Engine<u32> = Engine::new(EngineConfig::default());
            engine.join("default");
            let authors = [Keypair::from_seed([1; 32]), Keypair::from_seed([2; 32])];
            let logged: Vec<VerifiedBatch> = batches
                .iter()
                .enumerate()
                .map(|(i, spec)| {
                    let kp = &authors[i % 2];
                    engine.write("default", kp, ops_of(spec), 1_000 + i as u64).unwrap().0
                })
                .collect();
            let direct = Store::open(&dir.path().join("direct").join("store.redb").tap_mkdir())
                .unwrap();
            direct.write_batches(&logged).unwrap();
            let replayed =
                Store::open(&dir.path().join("replayed").join("store.redb").tap_mkdir()).unwrap();
            let held = held.min(logged.len());
            replayed.write_batches(&logged[..held]).unwrap();
            replayed.append_log(&logged[held..]).unwrap();
            let flush_bytes = if tiny { 1 } else { usize::MAX };
            let given = replayed
                .apply_unapplied_in(&replayed.heads().unwrap(), window, flush_bytes)
                .unwrap();
            proptest::prop_assert_eq!(given, (logged.len() - held) as u64);
            proptest::prop_assert!(!replayed.view_pending());
            proptest::prop_assert_eq!(
                replayed.list("default", "c", "", 1000).unwrap(),
                direct.list("default", "c", "", 1000).unwrap()
            );
            proptest::prop_assert_eq!(replayed.counts().unwrap(), direct.counts().unwrap());
            // Nothing is left to apply, and nothing is applied twice on the next start.
            proptest::prop_assert_eq!(replayed.apply_unapplied(&replayed.heads().unwrap()).unwrap(), 0);
            proptest::prop_assert!(replayed.check_view().is_ok());
        }
    }

    /// A store opened read-only reads as opened for writing, refuses every write, and is
    /// refused where only a writable open can read it (no view file, a log of another
    /// version); a running node's store (locked) is refused as locked.
    #[test]
    fn a_store_opened_read_only_reads_and_refuses_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        let view = path.with_file_name(VIEW_FILE);
        let (batches, _) = four_batches(&path, 3);
        {
            let store = Store::open_read_only(&path, &view).unwrap();
            assert_eq!(store.check().unwrap(), 3);
            assert_eq!(store.check_view().unwrap().0, 3);
            assert_eq!(store.get("default", "c", "k2").unwrap().unwrap()["v"], 2);
            assert!(matches!(
                store.append_log(&batches[3..]),
                Err(StoreError::ReadOnly)
            ));
            assert!(matches!(
                store.mark_view_failed("no"),
                Err(StoreError::ReadOnly)
            ));
            // Readers do not exclude each other.
            let other = Store::open_read_only(&path, &view).unwrap();
            assert_eq!(other.heads().unwrap()[0].seq, 3);
        }
        {
            let writer = Store::open(&path).unwrap();
            let refused = Store::open_read_only(&path, &view).err().unwrap();
            assert!(refused.is_locked(), "{refused}");
            drop(writer);
        }
        let missing = Store::open_read_only(&path, &dir.path().join("none.redb"));
        assert!(matches!(missing, Err(StoreError::NotReadOnly(_))));
        {
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_table(META)
                .unwrap()
                .insert("schema", &b"2"[..])
                .unwrap();
            txn.commit().unwrap();
        }
        let older = Store::open_read_only(&path, &view).err().unwrap();
        assert!(
            matches!(&older, StoreError::NotReadOnly(why) if why.contains("another version")),
            "{older}"
        );
    }

    /// The scrub walks the log a step at a time in chain order: it finds the first damaged
    /// batch of a chain (and passes over the rest of that chain), checks every other batch,
    /// meets batches written behind its cursor in the same pass, and ends; a new pass finds
    /// the same.
    #[test]
    fn the_scrub_finds_a_damaged_batch_a_step_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        let (damaged_chain, kp) = four_batches(&path, 4);
        let other = Keypair::from_seed([9; 32]);
        let mut engine: Engine<u32> = Engine::new(EngineConfig::default());
        engine.join("default");
        let mut more = |n: i64| {
            (0..n)
                .map(|i| {
                    let ops = vec![upsert(&format!("o{i}"), i)];
                    engine.write("default", &other, ops, 2_000).unwrap().0
                })
                .collect::<Vec<_>>()
        };
        let others = more(6);
        {
            let store = Store::open(&path).unwrap();
            store.write_batches(&others[..3]).unwrap();
            let db = &store.db;
            let txn = db.begin_write().unwrap();
            {
                let mut t = txn.open_table(BATCHES).unwrap();
                let id = &damaged_chain[1].id.0;
                let mut bytes = batch_bytes(&t, id).unwrap().unwrap();
                *bytes.last_mut().unwrap() ^= 0x20;
                put_batch(&mut t, id, &bytes).unwrap();
            }
            txn.commit().unwrap();
        }
        let store = Store::open(&path).unwrap();
        let pass = |appending: &[VerifiedBatch]| {
            let mut cursor = ScrubCursor::default();
            let (mut sound, mut damaged, mut steps) = (0, Vec::new(), 0);
            loop {
                let step = store.scrub_step(&mut cursor, 1).unwrap();
                steps += 1;
                if steps == 1 {
                    store.write_batches(appending).unwrap();
                }
                sound += step.batches;
                damaged.extend(step.damaged);
                if step.done {
                    return (sound, damaged, steps);
                }
            }
        };
        let first = pass(&others[3..]);
        let second = pass(&[]);
        for (sound, damaged, steps) in [first, second] {
            // Seq 1 of the damaged chain and all six of the other, one batch a step.
            assert_eq!(sound, 7);
            assert_eq!(damaged.len(), 1, "{damaged:?}");
            assert_eq!(
                (damaged[0].author, damaged[0].seq),
                (*kp.public().as_bytes(), 2)
            );
            assert!(steps >= 8, "{steps}");
        }
        // One step with room for everything: the same, done at once.
        let step = store
            .scrub_step(&mut ScrubCursor::default(), usize::MAX)
            .unwrap();
        assert!(step.done && step.batches == 7 && step.damaged.len() == 1);
    }

    /// Four one-op batches of one author (keys k0–k3), the first `logged` of them written
    /// to the store at `path` (log and view), the store then closed.
    fn four_batches(path: &Path, logged: usize) -> (Vec<VerifiedBatch>, Keypair) {
        let kp = Keypair::generate();
        let mut engine: Engine<u32> = Engine::new(EngineConfig::default());
        engine.join("default");
        let batches: Vec<VerifiedBatch> = (0..4)
            .map(|i| {
                engine
                    .write("default", &kp, vec![upsert(&format!("k{i}"), i)], 1_000)
                    .unwrap()
                    .0
            })
            .collect();
        Store::open(path)
            .unwrap()
            .write_batches(&batches[..logged])
            .unwrap();
        (batches, kp)
    }

    /// A view file redb cannot open is reported as the view's damage, naming it; opening
    /// with `open_moving_damaged_view` sets it aside and every logged batch counts as
    /// unapplied, so the records come back whole from the log.
    #[test]
    fn a_damaged_view_is_set_aside_and_made_again_from_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        let view = dir.path().join(VIEW_FILE);
        four_batches(&path, 4);
        let len = std::fs::metadata(&view).unwrap().len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&view)
            .unwrap()
            .set_len(len / 2)
            .unwrap();
        match Store::open(&path) {
            Err(StoreError::ViewDamaged { path, .. }) => assert_eq!(path, view),
            Err(e) => panic!("not the view's damage: {e}"),
            Ok(_) => panic!("a truncated view opened"),
        }
        let (store, aside) = Store::open_moving_damaged_view(&path).unwrap();
        let aside = aside.expect("moved aside");
        assert_eq!(std::fs::metadata(&aside).unwrap().len(), len / 2);
        assert!(store.get("default", "c", "k2").unwrap().is_none());
        let behind = store.unapplied(&store.heads().unwrap()).unwrap();
        assert_eq!(behind.len(), 4);
        store.apply(&behind, true).unwrap();
        for i in 0..4 {
            let got = store
                .get("default", "c", &format!("k{i}"))
                .unwrap()
                .unwrap();
            assert_eq!(got["v"], i);
        }
        assert_eq!(store.check_view().unwrap().0, 4);
        // A view that failed while the node ran (a damaged page opening did not reach) is
        // marked in the log: the next open sets it aside too, once.
        store.mark_view_failed("a flush failed").unwrap();
        drop(store);
        std::fs::remove_file(&aside).unwrap();
        let (store, again) = Store::open_moving_damaged_view(&path).unwrap();
        assert_eq!(again.as_deref(), Some(aside.as_path()));
        assert_eq!(store.view_failed().unwrap(), None);
        assert_eq!(store.unapplied(&store.heads().unwrap()).unwrap().len(), 4);
        drop(store);
        let (store, none) = Store::open_moving_damaged_view(&path).unwrap();
        assert_eq!(none, None);
        // A log redb cannot open is not moved anywhere: it is the truth.
        drop(store);
        let len = std::fs::metadata(&path).unwrap().len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(len / 2)
            .unwrap();
        match Store::open_moving_damaged_view(&path) {
            Err(e @ StoreError::File { .. }) => {
                assert!(e.is_damage());
                assert!(e.to_string().starts_with(&path.display().to_string()));
            }
            Err(e) => panic!("not the log's damage: {e}"),
            Ok(_) => panic!("a truncated log opened"),
        }
    }

    /// A view that applied a chain further than the log holds it (the log lost or replaced
    /// by an older copy) is found, naming the chain; a view beside its own log is not, nor
    /// one that lags the log (the usual state after a crash).
    #[test]
    fn a_view_ahead_of_its_log_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        let (batches, kp) = four_batches(&path, 3);
        let store = Store::open(&path).unwrap();
        assert_eq!(
            store.view_ahead_of_log(&store.heads().unwrap()).unwrap(),
            None
        );
        store.append_log(&batches[3..]).unwrap();
        assert_eq!(
            store.view_ahead_of_log(&store.heads().unwrap()).unwrap(),
            None
        );
        drop(store);
        // The log replaced by a copy taken after two batches.
        let older = dir.path().join("older").join("store.redb").tap_mkdir();
        Store::open(&older)
            .unwrap()
            .append_log(&batches[..2])
            .unwrap();
        let store = Store::open_at(&older, &dir.path().join(VIEW_FILE)).unwrap();
        let ahead = store
            .view_ahead_of_log(&store.heads().unwrap())
            .unwrap()
            .expect("ahead");
        assert!(ahead.contains(&kp.public().to_did()), "{ahead}");
        assert!(
            ahead.contains("applied through seq 3, the log holds 2"),
            "{ahead}"
        );
        drop(store);
        // Or lost: an empty log.
        let empty = dir.path().join("empty").join("store.redb").tap_mkdir();
        let store = Store::open_at(&empty, &dir.path().join(VIEW_FILE)).unwrap();
        let ahead = store.view_ahead_of_log(&[]).unwrap().expect("ahead");
        assert!(ahead.contains("the log holds 0"), "{ahead}");
    }

    /// Serving checks each batch read back from the log: a damaged one ends the range (the
    /// batches before it are served) and is named; the unchecked read returns it as stored.
    #[test]
    fn serving_stops_before_a_damaged_batch() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        let (batches, kp) = four_batches(&path, 4);
        let author = *kp.public().as_bytes();
        let range = ChainRange {
            ns: "default",
            author: &author,
            from_seq: 1,
            limit: 10,
            max_bytes: 1 << 20,
            until: None,
        };
        {
            let store = Store::open(&path).unwrap();
            let (all, damage) = store.serve_range(range).unwrap();
            assert_eq!(damage, None);
            assert_eq!(all.len(), 4);
        }
        // One byte of the third batch's payload (its last byte) flipped on disk.
        {
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut t = txn.open_table(BATCHES).unwrap();
                let mut bytes = batch_bytes(&t, &batches[2].id.0).unwrap().unwrap();
                *bytes.last_mut().unwrap() ^= 0x20;
                put_batch(&mut t, &batches[2].id.0, &bytes).unwrap();
            }
            txn.commit().unwrap();
        }
        let store = Store::open(&path).unwrap();
        let (served, damage) = store.serve_range(range).unwrap();
        assert_eq!(
            served,
            vec![batches[0].bytes.to_vec(), batches[1].bytes.to_vec()]
        );
        let damage = damage.expect("damage named");
        assert!(damage.contains("seq 3"), "{damage}");
        assert!(damage.contains(&hex::encode(batches[2].id.0)), "{damage}");
        // From the damaged batch on: nothing served, the damage named again.
        let (served, damage) = store
            .serve_range(ChainRange {
                from_seq: 3,
                ..range
            })
            .unwrap();
        assert!(served.is_empty() && damage.is_some());
        assert_eq!(
            store
                .chain_range("default", &author, 1, 10, 1 << 20, None)
                .unwrap()
                .len(),
            4
        );
        let e = store.check().unwrap_err().to_string();
        assert!(
            e.contains("seq 3") && e.contains(&kp.public().to_did()),
            "{e}"
        );
        // The whole walk names the same batch; cutting the chain there leaves a log that
        // checks clean and serves what precedes it.
        let damaged = store.damaged_batches().unwrap();
        assert_eq!(damaged.len(), 1);
        assert_eq!((damaged[0].seq, damaged[0].author), (3, author));
        assert_eq!(store.cut_chain("default", &author, 3).unwrap(), 2);
        assert_eq!(store.check().unwrap(), 2);
        assert!(store.damaged_batches().unwrap().is_empty());
        assert_eq!(store.heads().unwrap()[0].seq, 2);
        {
            let txn = store.db.begin_read().unwrap();
            let t = txn.open_table(BATCHES).unwrap();
            for b in &batches[2..] {
                assert_eq!(batch_bytes(&t, &b.id.0).unwrap(), None);
            }
        }
        let (served, damage) = store.serve_range(range).unwrap();
        assert_eq!((served.len(), damage), (2, None));
        // Marks of a cut own chain, kept per namespace until cleared.
        store.mark_own_chain_cut("default").unwrap();
        store.mark_own_chain_cut("other").unwrap();
        assert_eq!(store.own_chain_cuts().unwrap(), ["default", "other"]);
        store.clear_own_chain_cut("default").unwrap();
        assert_eq!(store.own_chain_cuts().unwrap(), ["other"]);
    }

    /// A node that stops without flushing its in-memory delta (a crash) loses nothing: the
    /// view file's watermark names exactly the batches to apply again, and applying them gives
    /// the records of a node that never crashed.
    #[test]
    fn a_lost_delta_is_reapplied_from_the_log_after_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a").join("store.redb").tap_mkdir();
        let direct = Store::open(&dir.path().join("b").join("store.redb").tap_mkdir()).unwrap();
        let kp = Keypair::generate();
        let mut engine: Engine<u32> = Engine::new(EngineConfig::default());
        engine.join("default");
        let mut batch = |i: i64| {
            let ops = vec![
                upsert(&format!("k{}", i % 3), i),
                upsert(&format!("n{i}"), i),
            ];
            engine.write("default", &kp, ops, 1_000).unwrap().0
        };
        let batches: Vec<VerifiedBatch> = (0..6).map(&mut batch).collect();
        direct.write_batches(&batches).unwrap();
        {
            let store = Store::open(&path).unwrap();
            store.append_log(&batches).unwrap();
            // Seqs 1-2 reach the file durably, 3-4 are frozen but their flush never runs,
            // 5-6 are only staged: then the process "dies".
            store.stage(batches[..2].to_vec(), false).unwrap();
            assert!(store.freeze());
            store.flush_frozen(true).unwrap();
            store.stage(batches[2..4].to_vec(), false).unwrap();
            assert!(store.freeze());
            store.stage(batches[4..].to_vec(), false).unwrap();
            // Reads saw everything while it was only in memory.
            assert_eq!(
                store.list("default", "c", "", 100).unwrap(),
                direct.list("default", "c", "", 100).unwrap()
            );
        }
        let store = Store::open(&path).unwrap();
        let behind = store.unapplied(&store.heads().unwrap()).unwrap();
        assert_eq!(
            behind.iter().map(|b| b.header.seq).collect::<Vec<_>>(),
            vec![3, 4, 5, 6]
        );
        store.apply(&behind, true).unwrap();
        assert_eq!(
            store.list("default", "c", "", 100).unwrap(),
            direct.list("default", "c", "", 100).unwrap()
        );
        assert_eq!(store.counts().unwrap(), direct.counts().unwrap());
    }

    /// Batches of incompressible text and their store: the large one spans several pieces of
    /// the log, a small one one piece.
    fn large_and_small_batches(path: &Path) -> (Vec<VerifiedBatch>, Keypair) {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let kp = Keypair::generate();
        let mut engine: Engine<u32> = Engine::new(EngineConfig::default());
        engine.join("default");
        let text = |rng: &mut rand::rngs::StdRng, n: usize| -> String {
            (0..n).map(|_| rng.gen_range('a'..='z')).collect()
        };
        let big: Vec<Op> = (0..2_000)
            .map(|i| Op::Upsert {
                collection: "c".into(),
                key: format!("k{i}"),
                hlc: Hlc::ZERO,
                fields: [("v".to_string(), serde_json::json!(text(&mut rng, 60)))]
                    .into_iter()
                    .collect(),
            })
            .collect();
        let (a, _) = engine.write("default", &kp, big, 1_000).unwrap();
        let (b, _) = engine
            .write("default", &kp, vec![upsert("small", 1)], 1_001)
            .unwrap();
        let store = Store::open(path).unwrap();
        store.write_batches(&[a.clone(), b.clone()]).unwrap();
        (vec![a, b], kp)
    }

    /// Pieces of the log held for batch `id`.
    fn pieces(path: &Path, id: &BatchId) -> usize {
        let db = Database::open(path).unwrap();
        let txn = db.begin_read().unwrap();
        let t = txn.open_table(BATCHES).unwrap();
        let (lo, hi) = (chunk_key(&id.0, 0), chunk_key(&id.0, u16::MAX));
        t.range(lo.as_slice()..=hi.as_slice()).unwrap().count()
    }

    #[test]
    fn large_batches_are_stored_in_pieces_and_read_back_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.redb");
        let (stored, kp) = large_and_small_batches(&path);
        let big = &stored[0];
        assert!(
            big.bytes.len() > 2 * LOG_CHUNK_BYTES,
            "{} bytes",
            big.bytes.len()
        );
        assert_eq!(
            pieces(&path, &big.id),
            big.bytes.len().div_ceil(LOG_CHUNK_BYTES)
        );
        assert_eq!(pieces(&path, &stored[1].id), 1);
        let store = Store::open(&path).unwrap();
        let range = store
            .chain_range("default", kp.public().as_bytes(), 1, 10, 64 << 20, None)
            .unwrap();
        assert_eq!(range, vec![big.bytes.to_vec(), stored[1].bytes.to_vec()]);
        assert_eq!(store.check().unwrap(), 2);
        assert_eq!(store.counts().unwrap().0, 2);
        assert_eq!(store.heads().unwrap()[0].id, stored[1].id);
        store.rebuild_records().unwrap();
        assert_eq!(store.list("default", "c", "", 10_000).unwrap().len(), 2_001);
        drop(store);
        // A large batch at a chain's head: its header is read from its first piece alone
        // (every start reads the heads; a whole-envelope parse of that piece failed).
        let other = dir.path().join("big-head").join("db.redb").tap_mkdir();
        let store = Store::open(&other).unwrap();
        store.write_batches(&stored[..1]).unwrap();
        drop(store);
        let store = Store::open(&other).unwrap();
        let heads = store.heads().unwrap();
        assert_eq!((heads[0].seq, heads[0].id), (1, big.id));
        assert_eq!(heads[0].hlc_max, big.header.hlc_max);
    }

    #[test]
    fn a_log_of_schema_2_is_moved_into_pieces_when_opened() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.redb");
        let (stored, kp) = large_and_small_batches(&path);
        // Rewrite the log as schema 2 kept it: one value per batch, in `batches-v1`.
        {
            let db = Database::open(&path).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut old = txn.open_table(BATCHES_V1).unwrap();
                for vb in &stored {
                    old.insert(&vb.id.0[..], &vb.bytes[..]).unwrap();
                }
                txn.open_table(META)
                    .unwrap()
                    .insert("schema", &b"2"[..])
                    .unwrap();
            }
            txn.delete_table(BATCHES).unwrap();
            txn.commit().unwrap();
        }
        let store = Store::open(&path).unwrap();
        let range = store
            .chain_range("default", kp.public().as_bytes(), 1, 10, 64 << 20, None)
            .unwrap();
        assert_eq!(
            range,
            vec![stored[0].bytes.to_vec(), stored[1].bytes.to_vec()]
        );
        assert_eq!(store.check().unwrap(), 2);
        drop(store);
        assert!(pieces(&path, &stored[0].id) > 1);
        let db = Database::open(&path).unwrap();
        let txn = db.begin_read().unwrap();
        assert!(txn.open_table(BATCHES_V1).is_err(), "the old table is gone");
        let schema = txn
            .open_table(META)
            .unwrap()
            .get("schema")
            .unwrap()
            .unwrap()
            .value()
            .to_vec();
        assert_eq!(schema, SCHEMA_VERSION);
    }

    #[test]
    fn prefix_end_is_exclusive_upper_bound() {
        assert_eq!(prefix_end(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(prefix_end(&[1, 0xff]), Some(vec![2]));
        assert_eq!(prefix_end(&[0xff]), None);
    }
}
