//! BlazeDB node: the redb store, the libp2p swarm, the embedding API, the HTTP API and the
//! `blazedb` CLI.
//!
//! This crate is the shell around `blazedb-protocol`'s sans-IO sync engine: it owns sockets,
//! files and the clock, feeds the engine events and carries out its actions. It makes no
//! protocol decisions of its own (what to fetch, what is valid, what wins a merge).
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! let node = blazedb_node::Node::builder().data_dir("./data").spawn().await?;
//! let fields = serde_json::json!({"name": "Ada"}).as_object().unwrap().clone();
//! node.put("default", "users", "ada", fields).await?;
//! assert!(node.get("default", "users", "ada")?.is_some());
//! # Ok(()) }
//! ```

pub mod api;
pub mod batcher;
pub mod bench;
pub mod bench_adaptive;
pub mod bench_gossip;
pub mod bench_handshake;
pub mod bench_materialize;
mod committer;
mod delta_map;
pub mod dicts;
pub mod materializer;
pub mod net;
pub mod node;
mod run_filter;
pub mod scrub;
pub mod sim;
pub mod store;
mod verifier;

pub use batcher::BatchingConfig;
pub use blazedb_protocol::{FieldValue, OpsBuilder};
pub use dicts::DictPolicy;
pub use node::{
    Node, NodeBuilder, NodeConfig, NodeError, NodeHandle, QueueDepths, Status, WriteReceipt,
    DEFAULT_NAMESPACE,
};
pub use scrub::ScrubConfig;
pub use store::{Change, Fields};
