//! When the writing node trains a zstd dictionary for a namespace: shell policy (peers never
//! need to agree on it; any dictionary within the limits is valid to them), pure (fed the
//! batches this node seals, no clock, no I/O), unit-tested.
//!
//! The node keeps the plain (compact, uncompressed) payloads of its last small batches in a
//! namespace, bounded by count and bytes. Once `first_after` small batches were sealed (and
//! the samples hold at least `min_sample_bytes`), it trains a dictionary from them and hands
//! it to the engine ([`blazedb_protocol::Engine::set_write_dict`]), which uses it for a batch
//! only when that makes the batch smaller. After `retrain_after` more small batches it trains
//! again from the recent samples: a new dictionary with a new id; the old one stays valid for
//! the batches that name it. Batches of [`DICT_OPS_MAX`] ops or more are neither sampled nor
//! compressed with a dictionary (it saves nothing there).

use std::collections::VecDeque;

use blazedb_protocol::batch::DICT_OPS_MAX;
use blazedb_protocol::{limits, Dict, VerifiedBatch};

/// The training policy's bounds. Defaults: first dictionary after 256 small batches, a new
/// one every 8,192, from at most the last 1,024 payloads / 1 MiB, 16 KiB each.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DictPolicy {
    /// Train and use dictionaries at all.
    pub enabled: bool,
    /// Most payloads kept as samples (the most recent).
    pub samples_max: usize,
    /// Most bytes of samples kept.
    pub sample_bytes_max: usize,
    /// Small batches sealed before the first dictionary.
    pub first_after: usize,
    /// Sample bytes needed to train (zstd's trainer needs a few times the dictionary size).
    pub min_sample_bytes: usize,
    /// Small batches sealed between two dictionaries.
    pub retrain_after: usize,
    /// Dictionary size asked of the trainer (at most [`limits::MAX_DICT_BYTES`]).
    pub dict_bytes: usize,
}

impl Default for DictPolicy {
    fn default() -> Self {
        Self {
            enabled: true,
            samples_max: 1_024,
            sample_bytes_max: 1024 * 1024,
            first_after: 256,
            min_sample_bytes: 16 * 1024,
            retrain_after: 8_192,
            dict_bytes: limits::MAX_DICT_BYTES,
        }
    }
}

/// One namespace's samples and training schedule.
#[derive(Debug)]
pub struct DictTrainer {
    policy: DictPolicy,
    samples: VecDeque<Vec<u8>>,
    sample_bytes: usize,
    /// Small batches sealed since the last training (or since the start).
    since: usize,
    /// Whether a dictionary was trained already (then `retrain_after` applies).
    trained: bool,
}

impl DictTrainer {
    /// A trainer with no samples.
    pub fn new(policy: DictPolicy) -> Self {
        Self {
            policy,
            samples: VecDeque::new(),
            sample_bytes: 0,
            since: 0,
            trained: false,
        }
    }

    /// A batch this node sealed: sampled if small.
    pub fn observe(&mut self, vb: &VerifiedBatch) {
        if !self.policy.enabled || vb.ops.len() >= DICT_OPS_MAX {
            return;
        }
        let plain = vb.ops.plain().to_vec();
        if plain.len() > self.policy.sample_bytes_max {
            return;
        }
        self.sample_bytes += plain.len();
        self.samples.push_back(plain);
        while self.samples.len() > self.policy.samples_max
            || self.sample_bytes > self.policy.sample_bytes_max
        {
            if let Some(old) = self.samples.pop_front() {
                self.sample_bytes -= old.len();
            }
        }
        self.since += 1;
    }

    /// Whether a (new) dictionary should be trained now.
    pub fn due(&self) -> bool {
        let after = match self.trained {
            false => self.policy.first_after,
            true => self.policy.retrain_after,
        };
        self.policy.enabled
            && self.since >= after
            && self.sample_bytes >= self.policy.min_sample_bytes
    }

    /// Trains a dictionary from the samples (the schedule restarts either way: a failed
    /// training is retried after another `retrain_after` batches, not on every write).
    pub fn train(&mut self) -> Option<Dict> {
        self.since = 0;
        self.trained = true;
        let samples: Vec<&[u8]> = self.samples.iter().map(Vec::as_slice).collect();
        let size = self.policy.dict_bytes.min(limits::MAX_DICT_BYTES);
        let bytes = zstd::dict::from_samples(&samples, size).ok()?;
        Dict::new(bytes).ok()
    }

    /// Samples held: (count, bytes).
    pub fn samples(&self) -> (usize, usize) {
        (self.samples.len(), self.sample_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use blazedb_identity::Keypair;
    use blazedb_protocol::batch::{self, ChainPosition};
    use blazedb_protocol::{Hlc, Op};

    fn batch_of(n: usize, i: u64) -> VerifiedBatch {
        let ops = (0..n as u64)
            .map(|k| Op::Upsert {
                collection: "players".into(),
                key: format!("p{}", (i * 7 + k) % 50),
                hlc: Hlc::new(1_000 + i * 1_000 + k, 0),
                fields: blazedb_protocol::OpFields::from([
                    ("x".to_string(), serde_json::json!((i * 13 + k) % 997)),
                    ("y".to_string(), serde_json::json!((i * 31 + k) % 991)),
                    (
                        "name".to_string(),
                        serde_json::json!(format!("player-{}", i % 50)),
                    ),
                ]),
            })
            .collect();
        let pos = ChainPosition { seq: 1, prev: None };
        batch::seal(&Keypair::from_seed([3; 32]), "default", pos, ops, None).unwrap()
    }

    #[test]
    fn trains_after_first_after_then_every_retrain_after() {
        let policy = DictPolicy {
            first_after: 300,
            retrain_after: 500,
            ..DictPolicy::default()
        };
        let mut t = DictTrainer::new(policy);
        for i in 0..299 {
            t.observe(&batch_of(1, i));
            assert!(!t.due());
        }
        t.observe(&batch_of(1, 299));
        assert!(t.due());
        let d = t.train().expect("enough samples to train");
        assert!(d.bytes().len() <= limits::MAX_DICT_BYTES);
        assert!(!t.due());
        for i in 0..499 {
            t.observe(&batch_of(1, 1_000 + i));
        }
        assert!(!t.due());
        t.observe(&batch_of(1, 2_000));
        assert!(t.due());
        let d2 = t.train().expect("trains again");
        assert_ne!(d.id(), d2.id(), "a new dictionary is a new id");
    }

    #[test]
    fn large_batches_are_not_sampled_and_samples_are_bounded() {
        let policy = DictPolicy {
            samples_max: 10,
            ..DictPolicy::default()
        };
        let mut t = DictTrainer::new(policy.clone());
        t.observe(&batch_of(DICT_OPS_MAX, 0));
        assert_eq!(t.samples(), (0, 0));
        for i in 0..100 {
            t.observe(&batch_of(2, i));
        }
        assert_eq!(t.samples().0, 10);
        let mut off = DictTrainer::new(DictPolicy {
            enabled: false,
            first_after: 0,
            min_sample_bytes: 0,
            ..policy
        });
        off.observe(&batch_of(1, 0));
        assert!(!off.due());
    }

    /// The dictionary trained by the policy is what makes small batches smaller.
    #[test]
    fn the_trained_dictionary_shrinks_small_batches() {
        let mut t = DictTrainer::new(DictPolicy::default());
        for i in 0..256 {
            t.observe(&batch_of(1, i));
        }
        let d = t.train().unwrap();
        let kp = Keypair::from_seed([3; 32]);
        let pos = ChainPosition { seq: 1, prev: None };
        let ops = batch_of(1, 9_999).ops.to_vec().unwrap();
        let with = batch::seal_with(&kp, "default", pos, ops.clone(), None, Some(&d)).unwrap();
        let without = batch::seal(&kp, "default", pos, ops, None).unwrap();
        assert_eq!(with.header.enc, batch::ENC_COMPACT_ZSTD_DICT);
        assert!(with.bytes.len() < without.bytes.len());
    }
}
