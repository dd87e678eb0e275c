//! Writes seed inputs for the fuzz targets in `fuzz/` (valid payloads, record states,
//! batches and sync messages, as the protocol makes them), so that `cargo fuzz` starts from
//! inputs that reach deep into each decoder instead of finding the formats byte by byte:
//!
//! ```sh
//! cargo run -p blazedb-protocol --example fuzz_seeds -- fuzz/corpus
//! ```

use std::path::Path;

use blazedb_identity::Keypair;
use blazedb_protocol::batch::{self, ChainPosition};
use blazedb_protocol::capability::{namespace_id, Chain, Rights};
use blazedb_protocol::codec::encode_ops;
use blazedb_protocol::engine::HaveEntry;
use blazedb_protocol::record_codec::encode_state;
use blazedb_protocol::{encode_message, Hlc, Op, OpFields, RecordState, SyncMessage, Value};

fn upsert(key: &str, hlc: u64, fields: &[(&str, Value)]) -> Op {
    Op::Upsert {
        collection: "users".into(),
        key: key.into(),
        hlc: Hlc(hlc),
        fields: fields
            .iter()
            .map(|(n, v)| (*n, v.clone()))
            .collect::<OpFields>(),
    }
}

/// A few op lists covering every op kind and value type.
fn op_lists() -> Vec<Vec<Op>> {
    let nested = serde_json::json!({"a": [1, -2, 3.5, true, null], "b": {"c": "d"}});
    vec![
        vec![upsert("ada", 1, &[("name", "Ada".into())])],
        vec![
            upsert("ada", 10, &[("langs", nested), ("name", "Ada".into())]),
            Op::Delete {
                collection: "users".into(),
                key: "bob".into(),
                hlc: Hlc(11),
            },
            Op::CounterAdd {
                collection: "stats".into(),
                key: "hits".into(),
                hlc: Hlc(12),
                field: "n".into(),
                delta: -3,
            },
            upsert("ada", 13, &[("name", "Ada L".into()), ("x", 1.into())]),
        ],
        vec![Op::Revoke {
            token: "ab".repeat(32),
            hlc: Hlc(5),
        }],
        (0..40u64)
            .map(|i| {
                upsert(
                    &format!("k{}", i % 7),
                    100 + i,
                    &[
                        ("a", "qwertyuiopasdfgh".into()),
                        ("b", (i * 1_000_003).into()),
                        ("c", "zxcvbnm".repeat(3).into()),
                    ],
                )
            })
            .collect(),
    ]
}

fn write(dir: &Path, target: &str, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    let d = dir.join(target);
    std::fs::create_dir_all(&d)?;
    std::fs::write(d.join(name), bytes)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args()
        .nth(1)
        .ok_or("usage: fuzz_seeds DIR (e.g. fuzz/corpus)")?;
    let dir = Path::new(&dir);
    let kp = Keypair::from_seed([3; 32]);
    let author = *kp.public().as_bytes();
    let mut prev = None;
    for (i, ops) in op_lists().into_iter().enumerate() {
        let mut payload = Vec::new();
        encode_ops(&ops, &mut payload);
        write(dir, "payload", &format!("ops{i}"), &payload)?;
        // The batch target reads a mode byte, then the payload: plain (0) and compressed (1);
        // with a dictionary (4: its length in 64-byte units, the dictionary, the payload).
        for mode in [0u8, 1] {
            let mut input = vec![mode];
            input.extend_from_slice(&payload);
            write(dir, "batch", &format!("ops{i}-mode{mode}"), &input)?;
        }
        let mut input = vec![4u8, 2];
        input.extend(payload.iter().cycle().take(128));
        input.extend_from_slice(&payload);
        write(dir, "batch", &format!("ops{i}-dict"), &input)?;
        // Record states: each op's own, and the join of them all; two of them side by side
        // for the shortcut that keeps a state absorbing another.
        let mut joined = RecordState::default();
        let mut states = Vec::new();
        for op in &ops {
            let s = RecordState::from_op(op, author);
            joined.merge(&s);
            let mut out = Vec::new();
            encode_state(&s, &mut out);
            states.push(out);
        }
        let mut out = Vec::new();
        encode_state(&joined, &mut out);
        write(dir, "record_state", &format!("joined{i}"), &out)?;
        if let [.., older, newer] = &states[..] {
            let mut pair = vec![newer.len().min(255) as u8];
            pair.extend_from_slice(newer);
            pair.extend_from_slice(older);
            write(dir, "record_state", &format!("pair{i}"), &pair)?;
        }
        // A sealed batch, whole (the batch target's raw path), and in sync messages.
        let seq = i as u64 + 1;
        let vb = batch::seal(&kp, "default", ChainPosition { seq, prev }, ops, None)?;
        prev = Some(vb.id);
        write(dir, "batch", &format!("sealed{i}"), &vb.bytes)?;
        let msg = SyncMessage::Batches {
            ns: "default".into(),
            author,
            batches: vec![serde_bytes::ByteBuf::from(vb.bytes.to_vec())],
        };
        write(
            dir,
            "sync_message",
            &format!("batches{i}"),
            &encode_message(&msg),
        )?;
    }
    let messages = [
        SyncMessage::Have {
            ns: "default".into(),
            heads: vec![HaveEntry { author, seq: 4 }],
        },
        SyncMessage::Fetch {
            ns: "default".into(),
            author,
            from_seq: 2,
            limit: 64,
            max_bytes: Some(1 << 20),
        },
        SyncMessage::Present {
            ns: "default".into(),
            chain: serde_bytes::ByteBuf::from(vec![0x80]),
        },
    ];
    for (i, msg) in messages.iter().enumerate() {
        write(
            dir,
            "sync_message",
            &format!("msg{i}"),
            &encode_message(msg),
        )?;
    }
    // The engine target's steps: kind, peer, 16-bit length, bytes (see its header).
    let step = |out: &mut Vec<u8>, kind: u8, peer: u8, bytes: &[u8]| {
        out.extend_from_slice(&[kind, peer]);
        out.extend_from_slice(&(bytes.len() as u16).to_le_bytes());
        out.extend_from_slice(bytes);
    };
    let mut steps = Vec::new();
    step(&mut steps, 2, 1, &[]); // peer 1 up
    for salt in 0..3 {
        step(&mut steps, 5, 1, &[0, 0, salt]); // the next batch of chain 0, from peer 1
    }
    step(&mut steps, 5, 2, &[1, 0x83, 9]); // chain 1 at seq 3, its prev made up
    for (i, msg) in messages.iter().enumerate() {
        step(&mut steps, 0x30, 2 + i as u8, &encode_message(msg));
    }
    let first = batch::seal(
        &kp,
        "default",
        ChainPosition { seq: 1, prev: None },
        op_lists().remove(0),
        None,
    )?;
    step(&mut steps, 0x31, 3, &first.bytes); // gossip
    step(&mut steps, 5, 1, &[0, 0x40, 7]); // chain 0's next, verified ahead
    let answer = SyncMessage::Batches {
        ns: "default".into(),
        author,
        batches: vec![serde_bytes::ByteBuf::from(first.bytes.to_vec())],
    };
    step(&mut steps, 0x42, 2, &encode_message(&answer)); // a fetch answer, verified ahead
    step(&mut steps, 0xf4, 0, &[]); // time passes
    step(&mut steps, 3, 1, &[]); // peer 1 down
    write(dir, "engine", "steps", &steps)?;
    // The owned namespace of the engine target's world: the owner's key is [9; 32], the
    // writers' [1..=4; 32] (their chains: write, admin, read, none), the peers' keys
    // [11..=14; 32] (their chains: none, read, write, admin).
    let owner = Keypair::from_seed([9; 32]);
    let owned = namespace_id(&owner.public());
    let mut steps = Vec::new();
    for (peer, rights) in [(1u8, Rights::Read), (2, Rights::Write), (3, Rights::Admin)] {
        let key = Keypair::from_seed([10 + peer + 1; 32]);
        let chain = Chain::issue_root(&owner, &owned, &key.public(), rights, None, 0, None, 7)?;
        step(&mut steps, 0x44, peer, &[]); // up, with its key
        let present = SyncMessage::Present {
            ns: owned.clone(),
            chain: serde_bytes::ByteBuf::from(chain.encode()),
        };
        step(&mut steps, 0x30, peer, &encode_message(&present));
    }
    step(&mut steps, 5, 2, &[0, 0x20, 1]); // writer 0's first owned batch
    step(&mut steps, 5, 2, &[1, 0x20, 2]); // the admin's
    step(&mut steps, 5, 3, &[1, 0x30, 3]); // the admin revokes writer 0's token
    step(&mut steps, 5, 2, &[0, 0x20, 4]); // writer 0 writes again
    step(&mut steps, 5, 3, &[1, 0x31, 5]); // the admin revokes peer 1's (the reader's) token
    step(&mut steps, 5, 3, &[1, 0x20, 6]); // and writes again
    step(&mut steps, 5, 2, &[2, 0x20, 7]); // a writer whose chain only reads
    step(&mut steps, 5, 2, &[3, 0x20, 8]); // a writer with no chain
    let fetch = SyncMessage::Fetch {
        ns: owned,
        author: *Keypair::from_seed([1; 32]).public().as_bytes(),
        from_seq: 1,
        limit: 8,
        max_bytes: None,
    };
    step(&mut steps, 0x30, 1, &encode_message(&fetch)); // the reader fetches
    step(&mut steps, 0xf4, 0, &[]);
    write(dir, "engine", "owned", &steps)?;
    // Capability chains: a root, and one delegated from it, as bytes and as text.
    let owner = Keypair::from_seed([5; 32]);
    let ns = namespace_id(&owner.public());
    let admin = Keypair::from_seed([6; 32]);
    let root = Chain::issue_root(
        &owner,
        &ns,
        &admin.public(),
        Rights::Admin,
        None,
        0,
        None,
        1,
    )?;
    let leaf = root.delegate_within(
        &admin,
        &kp.public(),
        Rights::Write,
        Some("docs/".into()),
        None,
        2,
    )?;
    for (i, chain) in [root, leaf].iter().enumerate() {
        write(dir, "capability", &format!("chain{i}"), &chain.encode())?;
        write(
            dir,
            "capability",
            &format!("text{i}"),
            chain.to_text().as_bytes(),
        )?;
    }
    Ok(())
}
