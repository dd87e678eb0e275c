//! Every size BlazeDB accepts has a maximum. Exceeding one is a clear error, never a crash or
//! a silent truncation. These are protocol constants: peers must agree on them.

/// Largest encoded batch (envelope: header + signature + payload), in bytes.
pub const MAX_BATCH_BYTES: usize = 4 * 1024 * 1024;
/// Largest encoded batch header, in bytes (room for a capability chain of full depth).
pub const MAX_HEADER_BYTES: usize = 16 * 1024;
/// Most ops in one batch.
pub const MAX_OPS_PER_BATCH: usize = 10_000;
/// Longest namespace name, in bytes.
pub const MAX_NAMESPACE_LEN: usize = 64;
/// Longest collection name, in bytes.
pub const MAX_COLLECTION_LEN: usize = 64;
/// Longest record key, in bytes.
pub const MAX_KEY_LEN: usize = 256;
/// Longest field name, in bytes.
pub const MAX_FIELD_NAME_LEN: usize = 128;
/// Most fields in one upsert.
pub const MAX_FIELDS_PER_UPSERT: usize = 256;
/// Largest single field value (approximate encoded size), in bytes.
pub const MAX_VALUE_BYTES: usize = 64 * 1024;
/// Deepest nesting of arrays/objects inside a value.
pub const MAX_VALUE_DEPTH: usize = 32;
/// Most batches served in answer to one fetch.
pub const MAX_FETCH_BATCHES: u32 = 256;
/// Largest sync message, in bytes (a `Batches` answer carries many batches).
pub const MAX_SYNC_MESSAGE_BYTES: usize = 16 * 1024 * 1024;
/// Most authors listed in one `Have` message.
pub const MAX_HAVE_AUTHORS: usize = 100_000;
/// Largest payload after decompression, in bytes.
pub const MAX_PAYLOAD_PLAIN_BYTES: usize = 16 * 1024 * 1024;
/// Largest zstd dictionary a batch may name, in bytes.
pub const MAX_DICT_BYTES: usize = 16 * 1024;
/// Most dictionaries asked for or carried in one sync message.
pub const MAX_DICTS_PER_MESSAGE: usize = 8;

/// Envelope bytes from which a public namespace's batch goes around gossip (pushed and
/// announced over sync streams, see `EngineConfig::push_min_bytes`): gossipsub copies each
/// message several times on the way out and in, which is most of its cost for large ones.
pub const PUSH_MIN_BYTES: usize = 64 * 1024;

/// Authors per namespace whose push tree an engine keeps (the links it or its peers
/// `Prune`d for that author's large batches). Past it, a new author's tree replaces the one
/// pruned least recently, whose next large batch goes over every link again and re-forms it
/// (more copies, never fewer deliveries).
pub const MAX_TREE_AUTHORS: usize = 4_096;

/// Most bytes a node asks for in its first fetch of an author's chain while it has seen no
/// batch of the namespace (see the engine's fetch scheduling): one large batch, or many
/// small ones.
pub const FIRST_FETCH_BYTES: u32 = 256 * 1024;
