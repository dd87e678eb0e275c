//! The sync engine fed by peers (`Engine::handle_message`, `handle_gossip`, peers coming and
//! going, time passing): whatever a peer sends, in whatever order, the engine answers with
//! actions or rejects the peer; it never panics. Steps are read from the input one after
//! another: a kind byte, a peer byte, a 16-bit length and that many bytes. Besides raw
//! messages (CBOR, as the node's codec reads them), a step can send a batch sealed by one of
//! two keys at a chosen position of its chain, in the public namespace or in an owned one
//! (with the writer's capability chain: one key may write, the other is an admin; a batch
//! may revoke the first key's token), so that chains, gaps, forks, duplicates, capability
//! checks and revocations reach the engine's bookkeeping with valid signatures. Batches
//! arrive either as messages or, as the node's fetch answers do, verified ahead
//! (`preverify`). Peers come up with or without their key; each peer's key holds a
//! different capability (none, read, write, admin), which seeds present (`World` is the
//! same in `protocol/examples/fuzz_seeds.rs`).
#![no_main]

use std::sync::OnceLock;

use blazedb_identity::Keypair;
use blazedb_protocol::batch::{self, BatchId, ChainPosition};
use blazedb_protocol::capability::{namespace_id, Chain, Rights};
use blazedb_protocol::{preverify, Action, Engine, EngineConfig, Hlc, Op, SyncMessage};
use libfuzzer_sys::fuzz_target;

/// The keys and capabilities every run shares (signing them once per process).
struct World {
    /// The batch authors.
    writers: [Keypair; 4],
    /// The owned namespace (owned by a key of its own, the engine's node's).
    owned: String,
    /// The writers' chains in the owned namespace: write, admin, read (may not write); the
    /// fourth writer has none.
    caps: [Chain; 3],
    /// The four peers' keys: their chains hold no right, read, write, admin.
    peers: [Keypair; 4],
    /// The chains of peers 1-3 (read, write, admin), as the seeds present them.
    reader_caps: [Chain; 3],
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let owner = Keypair::from_seed([9; 32]);
        let owned = namespace_id(&owner.public());
        let root = |to: &Keypair, rights, nonce| {
            Chain::issue_root(&owner, &owned, &to.public(), rights, None, 0, None, nonce)
                .expect("a root chain")
        };
        let writers = [1u8, 2, 3, 4].map(|s| Keypair::from_seed([s; 32]));
        let caps = [
            root(&writers[0], Rights::Write, 1),
            root(&writers[1], Rights::Admin, 2),
            root(&writers[2], Rights::Read, 3),
        ];
        let peers = [11u8, 12, 13, 14].map(|s| Keypair::from_seed([s; 32]));
        let reader_caps = [
            root(&peers[1], Rights::Read, 7),
            root(&peers[2], Rights::Write, 7),
            root(&peers[3], Rights::Admin, 7),
        ];
        World {
            writers,
            owned,
            caps,
            peers,
            reader_caps,
        }
    })
}

/// A one-op batch of `kp` in `ns` at `seq`: a delete, or a revocation of `revoke`.
fn sealed(
    kp: &Keypair,
    ns: &str,
    cap: Option<&Chain>,
    pos: ChainPosition,
    revoke: Option<String>,
    salt: u8,
) -> Option<(BatchId, Vec<u8>)> {
    let hlc = Hlc(1_000 + pos.seq * 10 + u64::from(salt % 10));
    let op = match revoke {
        Some(token) => Op::Revoke { token, hlc },
        None => Op::Delete {
            collection: "c".into(),
            key: format!("k{salt}"),
            hlc,
        },
    };
    let vb = batch::seal(kp, ns, pos, vec![op], cap).ok()?;
    Some((vb.id, vb.bytes.to_vec()))
}

/// Keeps the earlier of `at` and what `t` holds.
fn earliest(t: &mut Option<Hlc>, at: Hlc) {
    *t = Some(t.map_or(at, |t| t.min(at)));
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
    let w = world();
    let mut engine: Engine<u8> = Engine::new(EngineConfig::default());
    engine.join("default");
    // The node holds the owner key: no chain of its own.
    engine.join_owned(&w.owned, None);
    // FUZZ_ENGINE_TRACE=1 prints each step's actions (to check what seeds reach).
    let trace = std::env::var_os("FUZZ_ENGINE_TRACE").is_some();
    // Each writer's chain so far, per namespace (public, owned).
    let mut chains: [[Vec<BatchId>; 4]; 2] = Default::default();
    // Which peers came up with their key, and which presented a chain granting their key
    // read access: an over-approximation of who may receive the owned namespace.
    let (mut keyed, mut presented) = ([false; 4], [false; 4]);
    // When each peer's token was revoked, by a batch the engine stored (the earliest).
    let mut revoked: [Option<Hlc>; 4] = [None; 4];
    // When the first writer's token was revoked, likewise.
    let mut writer_revoked: Option<Hlc> = None;
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
                Ok(msg) => {
                    if let SyncMessage::Present { ns, chain } = &msg {
                        let key = w.peers[usize::from(peer)].public();
                        presented[usize::from(peer)] |= *ns == w.owned
                            && Chain::decode(chain).is_ok_and(|c| {
                                c.authorizes(&w.owned, key.as_bytes(), Rights::Read, now)
                                    .is_ok()
                            });
                    }
                    deliver(&mut engine, peer, msg, kind & 0x40 != 0, now)
                }
                Err(_) => Vec::new(),
            },
            1 => engine.handle_gossip(peer, "default", bytes.to_vec(), now).1,
            // Up with its key (as the node's links authenticate it) or without.
            2 if kind & 0x40 != 0 => {
                keyed[usize::from(peer)] = true;
                let key = *w.peers[usize::from(peer)].public().as_bytes();
                engine.peer_up_with_key(peer, Some(key), now)
            }
            2 => engine.peer_up(peer, now),
            3 => engine.peer_down(&peer, now),
            4 => engine.tick(now),
            _ => {
                // A validly signed batch: the next of one of four chains, or (high bit) one at
                // a chosen seq whose `prev` is made up (a gap or a fork); in the owned
                // namespace with bit 0x20, revoking with bit 0x10 the first writer's token or
                // (low bits) peer 1, 2 or 3's.
                let k = usize::from(bytes.first().copied().unwrap_or(0) & 3);
                let (kp, pick) = (&w.writers[k], bytes.get(1).copied().unwrap_or(0));
                let salt = bytes.get(2).copied().unwrap_or(0);
                let n = usize::from(pick & 0x20 != 0);
                let (ns, cap) = match n {
                    0 => ("default", None),
                    _ => (w.owned.as_str(), w.caps.get(k)),
                };
                let revoke = (pick & 0x10 != 0).then(|| {
                    let chain = match pick & 0x03 {
                        0 => &w.caps[0],
                        i => &w.reader_caps[usize::from(i) - 1],
                    };
                    chain.leaf().id.to_hex()
                });
                let made = if pick & 0x80 == 0 {
                    let seq = chains[n][k].len() as u64 + 1;
                    let prev = chains[n][k].last().copied();
                    let made = sealed(kp, ns, cap, ChainPosition { seq, prev }, revoke, salt);
                    if let Some((id, _)) = &made {
                        chains[n][k].push(*id);
                    }
                    made
                } else {
                    let seq = u64::from(pick & 0x0f).max(1);
                    let prev = (seq > 1).then_some(BatchId([salt; 32]));
                    sealed(kp, ns, cap, ChainPosition { seq, prev }, revoke, salt)
                };
                let Some((_, b)) = made else { continue };
                let msg = SyncMessage::Batches {
                    ns: ns.to_string(),
                    author: *kp.public().as_bytes(),
                    batches: vec![serde_bytes::ByteBuf::from(b)],
                };
                deliver(&mut engine, peer, msg, pick & 0x40 != 0, now)
            }
        };
        if trace {
            let names: Vec<String> = actions
                .iter()
                .map(|a| format!("{a:?}").chars().take(160).collect())
                .collect();
            eprintln!("step kind {} peer {peer}: {names:?}", kind % 6);
        }
        let (mut later_revoked, mut later_writer_revoked) = (revoked, writer_revoked);
        for a in actions {
            // The owned namespace's batches and heads go only to peers that came up with
            // their key and presented a chain that lets that key read.
            let owned_to = match &a {
                Action::Send {
                    peer,
                    msg: SyncMessage::Batches { ns, batches, .. },
                } if !batches.is_empty() => Some((peer, ns)),
                Action::Send {
                    peer,
                    msg: SyncMessage::Have { ns, .. } | SyncMessage::Announce { ns, .. },
                }
                | Action::Serve { peer, ns, .. } => Some((peer, ns)),
                _ => None,
            };
            if let Some((&to, ns)) = owned_to.filter(|(_, ns)| **ns == w.owned) {
                let p = usize::from(to);
                assert!(
                    keyed[p] && presented[p],
                    "owned {ns} sent to peer {to}: {a:?}"
                );
            }
            // A revoked reader gets nothing written at or after its revocation.
            match &a {
                Action::Send {
                    peer,
                    msg: SyncMessage::Batches { ns, batches, .. },
                } if *ns == w.owned => {
                    if let Some(t) = revoked[usize::from(*peer)] {
                        for b in batches {
                            let (h, _) = batch::verify_header(b).expect("a batch we send");
                            assert!(h.hlc_max < t, "revoked at {t:?}, sent {h:?}");
                        }
                    }
                }
                Action::Serve {
                    peer, ns, until, ..
                } if *ns == w.owned => {
                    if let Some(t) = revoked[usize::from(*peer)] {
                        assert!(until.is_some_and(|u| u <= t), "revoked at {t:?}: {a:?}");
                    }
                }
                _ => {}
            }
            // What the engine asks to send must be sendable.
            if let Action::Send { msg, .. } = &a {
                cbor4ii::serde::to_vec(Vec::new(), msg).expect("an engine message encodes");
            }
            if let Action::Store(vb) = &a {
                let by = |i: usize| vb.author.as_bytes() == w.writers[i].public().as_bytes();
                if vb.header.ns == w.owned && vb.effective {
                    // A batch counts only if its author may write, and its token was not
                    // revoked at or before its last timestamp.
                    assert!(!by(2) && !by(3), "counted without write rights: {vb:?}");
                    if let Some(t) = writer_revoked.filter(|_| by(0)) {
                        assert!(vb.header.hlc_max < t, "counted after revocation at {t:?}");
                    }
                    // The admin's revocations, once stored: checked from the next step on
                    // (a push of the revoking batch itself may go out with it).
                    for (token, at) in vb.ops.revocations().iter().filter(|_| by(1)) {
                        if w.caps[0].leaf().id.to_hex() == *token {
                            earliest(&mut later_writer_revoked, *at);
                        }
                        for (i, chain) in w.reader_caps.iter().enumerate() {
                            if chain.leaf().id.to_hex() == *token {
                                earliest(&mut later_revoked[i + 1], *at);
                            }
                        }
                    }
                }
            }
        }
        revoked = later_revoked;
        writer_revoked = later_writer_revoked;
    }
});
