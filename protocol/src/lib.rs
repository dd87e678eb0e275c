//! BlazeDB protocol: wire types, the batch codec, merge rules and the sans-IO sync engine.
//!
//! This crate decides *what* is exchanged and *whether* it is valid; it never does I/O, never
//! reads the clock, never spawns tasks. Time comes in as `now_ms` arguments. That is what lets
//! `node/` drive it with real sockets and redb, and `simulations/` with virtual time, replaying
//! a seed exactly.
//!
//! - [`hlc`]: hybrid logical clock timestamps.
//! - [`op`]: operations (upsert, delete, counter add) and their naming/size rules.
//! - [`codec`]: the compact payload codec (interned names, borrowed zero-copy decoding).
//! - [`dict`]: content-addressed zstd dictionaries for small payloads.
//! - [`batch`]: the signed, hashed batch envelope: sealing and verification.
//! - [`merge`]: record states and the merge rules (a join-semilattice).
//! - [`record_codec`]: the stored form of record states (compact binary, private to a store).
//! - [`engine`]: the sync engine (gossip ingest, version-vector catch-up).
//! - [`coalesce`]: several local callers' writes sealed into one batch, equivalently.
//! - [`limits`]: every maximum the protocol enforces.

pub mod batch;
pub mod batch_ops;
pub mod build;
pub mod capability;
pub mod coalesce;
pub mod codec;
pub mod dict;
pub mod engine;
pub mod hlc;
pub mod limits;
pub mod merge;
pub mod name_map;
pub mod op;
pub mod prune;
pub mod record_codec;
pub mod squeeze;

pub use batch::{BatchError, BatchHeader, BatchId, VerifiedBatch};
pub use batch_ops::BatchOps;
pub use build::{FieldValue, OpsBuilder};
pub use dict::{Dict, DictId, DictLookup, DictRef, DictSet};
pub use engine::{
    preverify, Action, Engine, EngineConfig, GossipVerdict, PreVerified, SyncMessage, WriteMany,
};
pub use hlc::Hlc;
pub use merge::{FieldMap, FieldState, RecordState, Stamp};
pub use name_map::{NameMap, OpFields};
pub use op::{CheckedOps, Op, OpError, Value};

/// Encodes a sync message as CBOR.
pub fn encode_message(msg: &SyncMessage) -> Vec<u8> {
    let mut out = Vec::new();
    ciborium::into_writer(msg, &mut out).expect("serializing to a Vec cannot fail");
    out
}

/// Decodes a sync message, refusing oversized input.
pub fn decode_message(bytes: &[u8]) -> Result<SyncMessage, String> {
    if bytes.len() > limits::MAX_SYNC_MESSAGE_BYTES {
        return Err(format!(
            "sync message of {} bytes exceeds the limit",
            bytes.len()
        ));
    }
    ciborium::from_reader(bytes).map_err(|e| format!("malformed sync message: {e}"))
}
