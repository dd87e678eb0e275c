//! The sync engine fed by peers (`Engine::handle_message`, `handle_gossip`, peers coming and
//! going, time passing): whatever a peer sends, in whatever order, the engine answers with
//! actions or rejects the peer; it never panics. Steps are read from the input one after
//! another: a kind byte, a peer byte, a 16-bit length and that many bytes. Besides raw
//! messages (CBOR, as the node's codec reads them), a step can send a batch sealed by one of
//! two keys at a chosen position of its chain, so that chains, gaps, forks and duplicates
//! reach the engine's bookkeeping with valid signatures.
#![no_main]

use blazedb_identity::Keypair;
use blazedb_protocol::batch::{self, BatchId, ChainPosition};
use blazedb_protocol::{Action, Engine, EngineConfig, Hlc, Op, SyncMessage};
use libfuzzer_sys::fuzz_target;

fn sealed(kp: &Keypair, seq: u64, prev: Option<BatchId>, salt: u8) -> Option<(BatchId, Vec<u8>)> {
    let op = Op::Delete {
        collection: "c".into(),
        key: format!("k{salt}"),
        hlc: Hlc(1_000 + seq * 10 + u64::from(salt % 10)),
    };
    let vb = batch::seal(kp, "default", ChainPosition { seq, prev }, vec![op], None).ok()?;
    Some((vb.id, vb.bytes.to_vec()))
}

fuzz_target!(|data: &[u8]| {
    let keys = [Keypair::from_seed([1; 32]), Keypair::from_seed([2; 32])];
    let mut engine: Engine<u8> = Engine::new(EngineConfig::default());
    engine.join("default");
    let mut chains: [Vec<BatchId>; 2] = [Vec::new(), Vec::new()];
    let mut now = 1_000u64;
    let mut rest = data;
    while rest.len() >= 4 {
        let (kind, peer) = (rest[0], rest[1] % 4);
        let len = usize::from(u16::from_le_bytes([rest[2], rest[3]])).min(rest.len() - 4);
        let bytes = &rest[4..4 + len];
        rest = &rest[4 + len..];
        now += u64::from(kind >> 4) * 97;
        let actions = match kind % 6 {
            0 => match cbor4ii::serde::from_slice::<SyncMessage>(bytes) {
                Ok(msg) => engine.handle_message(peer, msg, now),
                Err(_) => Vec::new(),
            },
            1 => engine.handle_gossip(peer, "default", bytes.to_vec(), now).1,
            2 => engine.peer_up(peer, now),
            3 => engine.peer_down(&peer, now),
            4 => engine.tick(now),
            _ => {
                // A validly signed batch: the next of one of two chains, or (high bit) one at
                // a chosen seq whose `prev` is made up (a gap or a fork).
                let k = usize::from(bytes.first().copied().unwrap_or(0) & 1);
                let (kp, pick) = (&keys[k], bytes.get(1).copied().unwrap_or(0));
                let salt = bytes.get(2).copied().unwrap_or(0);
                let made = if pick & 0x80 == 0 {
                    let seq = chains[k].len() as u64 + 1;
                    let made = sealed(kp, seq, chains[k].last().copied(), salt);
                    if let Some((id, _)) = &made {
                        chains[k].push(*id);
                    }
                    made
                } else {
                    let seq = u64::from(pick & 0x0f).max(1);
                    sealed(kp, seq, (seq > 1).then_some(BatchId([salt; 32])), salt)
                };
                let Some((_, b)) = made else { continue };
                let msg = SyncMessage::Batches {
                    ns: "default".into(),
                    author: *kp.public().as_bytes(),
                    batches: vec![serde_bytes::ByteBuf::from(b)],
                };
                engine.handle_message(peer, msg, now)
            }
        };
        // What the engine asks to send must be sendable.
        for a in actions {
            if let Action::Send { msg, .. } = a {
                cbor4ii::serde::to_vec(Vec::new(), &msg).expect("an engine message encodes");
            }
        }
    }
});
