//! The sync engine fed by peers (`Engine::handle_message`, `handle_gossip`, peers coming and
//! going, time passing): whatever a peer sends, in whatever order, the engine answers with
//! actions or rejects the peer; it never panics. Steps are read from the input one after
//! another: a kind byte, a peer byte, a 16-bit length and that many bytes. Besides raw
//! messages (CBOR, as the node's codec reads them), a step can send a batch sealed by one of
//! two keys at a chosen position of its chain, so that chains, gaps, forks and duplicates
//! reach the engine's bookkeeping with valid signatures. Batches arrive either as messages
//! or, as the node's fetch answers do, verified ahead (`preverify`).
#![no_main]

use blazedb_identity::Keypair;
use blazedb_protocol::batch::{self, BatchId, ChainPosition};
use blazedb_protocol::{preverify, Action, Engine, EngineConfig, Hlc, Op, SyncMessage};
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

/// Hands `msg` from `peer` to the engine: batches either as the node's actor does with
/// messages (`handle_message`) or as it does with fetch answers verified on its verifier
/// thread first (`preverify`, then `handle_batches_preverified`).
fn deliver(
    engine: &mut Engine<u8>,
    peer: u8,
    msg: SyncMessage,
    preverified: bool,
    now: u64,
) -> Vec<Action<u8>> {
    match msg {
        SyncMessage::Batches {
            ns,
            author,
            batches,
        } if preverified => {
            let checked = preverify(batches.into_iter().map(|b| b.into_vec()).collect());
            engine.handle_batches_preverified(peer, ns, author, checked, now)
        }
        msg => engine.handle_message(peer, msg, now),
    }
}

fuzz_target!(|data: &[u8]| {
    let keys = [Keypair::from_seed([1; 32]), Keypair::from_seed([2; 32])];
    let mut engine: Engine<u8> = Engine::new(EngineConfig::default());
    engine.join("default");
    // FUZZ_ENGINE_TRACE=1 prints each step's actions (to check what seeds reach).
    let trace = std::env::var_os("FUZZ_ENGINE_TRACE").is_some();
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
                Ok(msg) => deliver(&mut engine, peer, msg, kind & 0x40 != 0, now),
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
                deliver(&mut engine, peer, msg, pick & 0x40 != 0, now)
            }
        };
        if trace {
            let names: Vec<String> = actions
                .iter()
                .map(|a| format!("{a:?}").chars().take(40).collect())
                .collect();
            eprintln!("step kind {} peer {peer}: {names:?}", kind % 6);
        }
        // What the engine asks to send must be sendable.
        for a in actions {
            if let Action::Send { msg, .. } = a {
                cbor4ii::serde::to_vec(Vec::new(), &msg).expect("an engine message encodes");
            }
        }
    }
});
