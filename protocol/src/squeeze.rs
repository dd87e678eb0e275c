//! How hard a writer compresses large payloads, chosen per namespace by measured gain.
//!
//! zstd level 1 spends most of its time looking for matches. On payloads with little
//! repetition beyond single bytes (workload W: random-letter values; random identifiers) the
//! matches save a few percent at a large CPU cost; on text with repeated phrases they are
//! most of the gain. Three efforts, 5,000 W ops on the 2-vCPU machine (`cargo bench -p
//! blazedb-protocol --bench codec -- zstd/seal`, 2026-12-05, AMD EPYC host):
//!
//! | effort | level | time | W bytes/op |
//! |---|---|---|---|
//! | strong | 1 | 1.41 ms | 74.2 |
//! | fast | -5 | 0.82 ms | 75.9 |
//! | fastest | -20 | 0.56 ms | 77.5 |
//!
//! (Negative levels skip most match finding; literal compression is forced on, so they still
//! Huffman-code the bytes: that is nearly all of W's gain. Levels below -20 save little more
//! time: -50 is 77.7 B/op.) So a writer probes one large payload in [`PROBE_EVERY`]: it
//! compresses it with the fastest and the fast effort, and with the strong one too only if the
//! fast one saved at least [`STRONG_GAIN_MIN_PCT`] percent over the fastest; each step up is
//! kept for the payloads until the next probe only if it saved that share over the step
//! below. The probe keeps the smallest result.
//!
//! Which level sealed a batch is invisible to readers: all are plain zstd frames (`enc` 3),
//! decoded alike; the batch id covers the bytes actually sent. The choice is deterministic
//! (a counter, no clock), so the engine stays replayable.

use std::borrow::Cow;
use std::cell::RefCell;

/// Payloads smaller than this are always compressed with the strong level (their CPU cost
/// is small in absolute terms; a 1,000-op batch of W is ~118 KB).
pub const FAST_MIN_BYTES: usize = 64 * 1024;
/// One large payload in this many is compressed at two or three levels to re-decide.
pub const PROBE_EVERY: u32 = 32;
/// A stronger effort is kept only if it saves at least this share of the size the effort
/// below it made.
pub const STRONG_GAIN_MIN_PCT: usize = 5;
/// The strong level (match finding plus entropy coding): level 1 compresses workload W as
/// well as level 3 at 1.35x the speed (measured with `blazedb bench` B1/B4).
pub const STRONG_LEVEL: i32 = 1;
/// The fast level: zstd's negative levels skip most match finding; with literal
/// compression forced on they still Huffman-code the bytes.
pub const FAST_LEVEL: i32 = -5;
/// The fastest level: even less match finding, the same entropy coding of the literals.
pub const FASTEST_LEVEL: i32 = -20;

/// A writer's running choice of compression effort for one namespace.
#[derive(Clone, Copy, Debug)]
pub struct Squeeze {
    adaptive: bool,
    /// The level large payloads are compressed at until the next probe.
    level: i32,
    until_probe: u32,
    probes: u64,
    fast_batches: u64,
    fastest_batches: u64,
    ahead_taken: u64,
}

impl Default for Squeeze {
    fn default() -> Self {
        Self::adaptive()
    }
}

/// Whether `stronger` saved at least [`STRONG_GAIN_MIN_PCT`] percent of `weaker`'s size.
fn worth(weaker: &Frames<'_>, stronger: &Frames<'_>) -> bool {
    let (weaker, stronger) = (weaker.len(), stronger.len());
    weaker.saturating_sub(stronger) * 100 >= weaker * STRONG_GAIN_MIN_PCT
}

/// A payload compressed as two zstd frames ([`Squeeze::compress_split`]): the head's, and
/// the ops' (borrowed from the writer's [`Precompressed`] frame when that one is taken).
/// They are kept apart so that the sealer writes both straight into the envelope: a frame
/// compressed ahead is copied once, into the envelope, instead of first being joined to its
/// head (a ~375 KB copy per 5,000-op batch of W, on the sealer every write passes through).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frames<'a> {
    /// The head's frame (the name table and the first timestamp).
    pub head: Vec<u8>,
    /// The ops' frame.
    pub body: Cow<'a, [u8]>,
}

impl Frames<'_> {
    /// One frame: the whole payload's.
    pub fn one(frame: Vec<u8>) -> Frames<'static> {
        Frames {
            head: frame,
            body: Cow::Borrowed(&[]),
        }
    }

    /// Bytes of both frames.
    pub fn len(&self) -> usize {
        self.head.len() + self.body.len()
    }

    /// Whether both frames are empty (never, for frames zstd made).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Both frames in one buffer, as the envelope carries them.
    pub fn to_vec(&self) -> Vec<u8> {
        [&self.head[..], &self.body[..]].concat()
    }
}

impl Squeeze {
    /// Probes the first large payload, then one in [`PROBE_EVERY`].
    pub fn adaptive() -> Self {
        Self {
            adaptive: true,
            level: STRONG_LEVEL,
            until_probe: 0,
            probes: 0,
            fast_batches: 0,
            fastest_batches: 0,
            ahead_taken: 0,
        }
    }

    /// Always the strong level (what sealing did before the choice existed).
    pub fn strong() -> Self {
        Self {
            adaptive: false,
            ..Self::adaptive()
        }
    }

    /// Whether the latest decision is the strong level.
    pub fn is_strong(&self) -> bool {
        self.level() == STRONG_LEVEL
    }

    /// Payloads compressed more than one way so far.
    pub fn probes(&self) -> u64 {
        self.probes
    }

    /// Large payloads sealed below the strong level so far (the fast or the fastest; probes
    /// included when one of those won).
    pub fn fast_batches(&self) -> u64 {
        self.fast_batches
    }

    /// Large payloads sealed at the fastest level so far (part of [`Squeeze::fast_batches`]).
    pub fn fastest_batches(&self) -> u64 {
        self.fastest_batches
    }

    /// Payloads sealed with an ops frame their writer compressed ahead
    /// ([`Squeeze::compress_split`]).
    pub fn ahead_taken(&self) -> u64 {
        self.ahead_taken
    }

    /// The level the next large payload is compressed at unless it is probed: what a writer
    /// compresses a body ahead at ([`Squeeze::compress_split`]).
    pub fn level(&self) -> i32 {
        match self.adaptive {
            true => self.level,
            false => STRONG_LEVEL,
        }
    }

    /// Compresses `plain` as this writer currently chooses; `None` if zstd failed (the
    /// caller then sends the payload uncompressed).
    pub fn compress(&mut self, plain: &[u8]) -> Option<Vec<u8>> {
        let made = self.choose(plain.len(), |level| compress(plain, level).map(Frames::one));
        made.0.map(|f| f.head)
    }

    /// [`Squeeze::compress`] of a large payload as two zstd frames, one of `plain[..split]`
    /// (a batch payload's name table and first timestamp, a few dozen bytes) and one of the
    /// rest (its ops), which decode as one payload (zstd reads concatenated frames). The ops
    /// frame may have been compressed ahead by the payload's writer (`ahead`, used if it was
    /// compressed at the level chosen here): the result is the same either way, so who
    /// compressed it never shows in the batch.
    pub fn compress_split<'a>(
        &mut self,
        plain: &[u8],
        split: usize,
        ahead: Option<&'a Precompressed>,
    ) -> Option<Frames<'a>> {
        let (prefix, body) = plain.split_at(split.min(plain.len()));
        let (out, level) = self.choose(plain.len(), |level| {
            let head = compress(prefix, level)?;
            let body = match ahead {
                Some(a) if a.level == level => Cow::Borrowed(&a.frame[..]),
                _ => Cow::Owned(compress(body, level)?),
            };
            Some(Frames { head, body })
        });
        if out.is_some() && ahead.is_some_and(|a| a.level == level) {
            self.ahead_taken += 1;
        }
        out
    }

    /// Picks the level(s) for a payload of `len` bytes, compresses with `at`, and updates
    /// the choice after a probe. Returns the result and the level it was made at.
    fn choose<'a>(
        &mut self,
        len: usize,
        at: impl Fn(i32) -> Option<Frames<'a>>,
    ) -> (Option<Frames<'a>>, i32) {
        if !self.adaptive || len < FAST_MIN_BYTES {
            return (at(STRONG_LEVEL), STRONG_LEVEL);
        }
        let made = if self.until_probe == 0 {
            self.until_probe = PROBE_EVERY - 1;
            self.probes += 1;
            self.probe(&at)
        } else {
            self.until_probe -= 1;
            (at(self.level), self.level)
        };
        if made.0.is_some() {
            self.fast_batches += u64::from(made.1 < STRONG_LEVEL);
            self.fastest_batches += u64::from(made.1 == FASTEST_LEVEL);
        }
        made
    }

    /// Compresses with the fastest and the fast level, and the strong one too if the fast
    /// one was worth it; sets the level for the payloads until the next probe, and returns
    /// the smallest result. (A level whose compression failed is not chosen.)
    fn probe<'a>(&mut self, at: &impl Fn(i32) -> Option<Frames<'a>>) -> (Option<Frames<'a>>, i32) {
        let mut made: Vec<(Frames<'a>, i32)> = Vec::with_capacity(3);
        let fastest = at(FASTEST_LEVEL);
        let fast = at(FAST_LEVEL);
        self.level = match (&fastest, &fast) {
            (Some(a), Some(b)) if !worth(a, b) => FASTEST_LEVEL,
            (Some(_), None) => FASTEST_LEVEL,
            _ => FAST_LEVEL,
        };
        made.extend(fastest.map(|f| (f, FASTEST_LEVEL)));
        if self.level == FAST_LEVEL {
            let strong = at(STRONG_LEVEL);
            if let Some(s) = &strong {
                if fast.as_ref().is_none_or(|f| worth(f, s)) {
                    self.level = STRONG_LEVEL;
                }
            }
            made.extend(strong.map(|s| (s, STRONG_LEVEL)));
        }
        made.extend(fast.map(|f| (f, FAST_LEVEL)));
        match made.into_iter().min_by_key(|(f, _)| f.len()) {
            Some((f, level)) => (Some(f), level),
            None => (None, self.level),
        }
    }
}

/// A payload's ops compressed by its writer ahead of sealing, as one zstd frame at `level`
/// ([`Squeeze::compress_split`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Precompressed {
    level: i32,
    frame: Vec<u8>,
}

impl Precompressed {
    /// Compresses `body` at `level` (`None` if zstd failed).
    pub fn new(body: &[u8], level: i32) -> Option<Self> {
        compress(body, level).map(|frame| Self { level, frame })
    }
}

thread_local! {
    /// One compression context per level and thread, reused: creating one per payload
    /// allocates and clears its tables every time.
    static CONTEXTS: RefCell<Vec<(i32, zstd::bulk::Compressor<'static>)>> =
        const { RefCell::new(Vec::new()) };
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { RefCell::new(None) };
}

fn new_compressor(level: i32) -> std::io::Result<zstd::bulk::Compressor<'static>> {
    use zstd::zstd_safe::{CParameter, ParamSwitch};
    let mut c = zstd::bulk::Compressor::new(level)?;
    if level < 0 {
        c.set_parameter(CParameter::LiteralCompressionMode(ParamSwitch::Enable))?;
    }
    Ok(c)
}

/// zstd-compresses `plain` at `level` (negative levels with literal compression on) with this
/// thread's context for that level.
pub fn compress(plain: &[u8], level: i32) -> Option<Vec<u8>> {
    CONTEXTS.with(|cell| {
        let mut contexts = cell.borrow_mut();
        let i = match contexts.iter().position(|(l, _)| *l == level) {
            Some(i) => i,
            None => {
                contexts.push((level, new_compressor(level).ok()?));
                contexts.len() - 1
            }
        };
        contexts[i].1.compress(plain).ok()
    })
}

/// Decompresses zstd frames (one or more, concatenated) of at most `max` bytes in all with
/// this thread's context. The output is sized from zstd's bound on what the frames inflate
/// to (exact when they declare their content sizes, as this crate's compressors' do), never
/// beyond `max`: frames that inflate further fail.
pub fn decompress(frames: &[u8], max: usize) -> std::io::Result<Vec<u8>> {
    let capacity = zstd::zstd_safe::decompress_bound(frames)
        .map_or(max, |bound| bound.min(max as u64) as usize);
    DECOMPRESSOR.with(|cell| {
        let mut d = cell.borrow_mut();
        if d.is_none() {
            *d = Some(zstd::bulk::Decompressor::new()?);
        }
        d.as_mut().expect("just set").decompress(frames, capacity)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random_letters(n: usize, seed: u64) -> Vec<u8> {
        let mut s = seed | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                b'a' + (s % 26) as u8
            })
            .collect()
    }

    fn repetitive(n: usize) -> Vec<u8> {
        let phrases = [
            "the quick brown fox jumps over the lazy dog; ",
            "lorem ipsum dolor sit amet, consectetur adipiscing elit; ",
            "{\"status\":\"active\",\"region\":\"eu-west\",\"tier\":\"gold\"} ",
        ];
        let mut out = Vec::with_capacity(n);
        let mut i = 0usize;
        while out.len() < n {
            out.extend_from_slice(phrases[i % 3].as_bytes());
            out.extend_from_slice(format!("{i:x}").as_bytes());
            i = i.wrapping_mul(7).wrapping_add(3) % 1000;
        }
        out.truncate(n);
        out
    }

    #[test]
    fn every_level_round_trips() {
        let plain = random_letters(200_000, 7);
        for level in [STRONG_LEVEL, FAST_LEVEL, FASTEST_LEVEL] {
            let z = compress(&plain, level).unwrap();
            assert!(z.len() < plain.len(), "level {level} still entropy-codes");
            assert_eq!(decompress(&z, plain.len()).unwrap(), plain);
        }
    }

    #[test]
    fn random_letters_go_fastest_and_repetition_stays_strong() {
        let mut s = Squeeze::adaptive();
        s.compress(&random_letters(200_000, 1)).unwrap();
        assert_eq!(
            s.level(),
            FASTEST_LEVEL,
            "matches save little on random letters"
        );
        assert!(!s.is_strong());
        let mut s = Squeeze::adaptive();
        s.compress(&repetitive(200_000)).unwrap();
        assert!(
            s.is_strong(),
            "matches are most of the gain on repeated text"
        );
    }

    #[test]
    fn each_step_up_must_save_its_share() {
        // Random letters with a repeated phrase every so often: some matches, few.
        let mut plain = random_letters(300_000, 11);
        let phrase = b"{\"status\":\"active\",\"region\":\"eu-west-1\"} ";
        for at in (0..plain.len() - 64).step_by(4096) {
            plain[at..at + phrase.len()].copy_from_slice(phrase);
        }
        let sizes: Vec<usize> = [FASTEST_LEVEL, FAST_LEVEL, STRONG_LEVEL]
            .iter()
            .map(|&l| compress(&plain, l).unwrap().len())
            .collect();
        let worth = |weaker: usize, stronger: usize| {
            weaker.saturating_sub(stronger) * 100 >= weaker * STRONG_GAIN_MIN_PCT
        };
        let want = if !worth(sizes[0], sizes[1]) {
            FASTEST_LEVEL
        } else if worth(sizes[1], sizes[2]) {
            STRONG_LEVEL
        } else {
            FAST_LEVEL
        };
        let mut s = Squeeze::adaptive();
        let got = s.compress(&plain).unwrap();
        assert_eq!(s.level(), want, "sizes {sizes:?}");
        let smallest = match want {
            FASTEST_LEVEL => sizes[0].min(sizes[1]),
            _ => *sizes.iter().min().unwrap(),
        };
        assert_eq!(got.len(), smallest);
    }

    #[test]
    fn probes_once_per_period_and_small_payloads_are_strong() {
        let mut s = Squeeze::adaptive();
        let big = random_letters(FAST_MIN_BYTES, 3);
        for _ in 0..(2 * PROBE_EVERY + 1) {
            s.compress(&big).unwrap();
        }
        assert_eq!(s.probes(), 3);
        // Every payload between the probes went fast (a probe keeps the smaller frame).
        assert!(s.fast_batches() >= u64::from(2 * (PROBE_EVERY - 1)));
        let before = s.fast_batches();
        s.compress(&random_letters(FAST_MIN_BYTES - 1, 4)).unwrap();
        assert_eq!(
            s.fast_batches(),
            before,
            "small payloads use the strong level"
        );
        let mut fixed = Squeeze::strong();
        fixed.compress(&big).unwrap();
        assert_eq!((fixed.probes(), fixed.fast_batches()), (0, 0));
    }

    #[test]
    fn a_probe_keeps_the_smaller_frame() {
        let plain = repetitive(300_000);
        let smallest = [STRONG_LEVEL, FAST_LEVEL, FASTEST_LEVEL]
            .iter()
            .map(|&l| compress(&plain, l).unwrap().len())
            .min();
        let got = Squeeze::adaptive().compress(&plain).unwrap();
        assert_eq!(Some(got.len()), smallest);
    }

    #[test]
    fn split_payloads_inflate_to_the_whole() {
        let plain = random_letters(100_000, 5);
        for split in [0, 1, 37, 99_999, 100_000] {
            let z = Squeeze::strong()
                .compress_split(&plain, split, None)
                .unwrap()
                .to_vec();
            assert_eq!(
                decompress(&z, plain.len()).unwrap(),
                plain,
                "split at {split}"
            );
            assert!(
                decompress(&z, plain.len() - 1).is_err(),
                "both frames count against the bound"
            );
        }
    }

    #[test]
    fn a_body_compressed_ahead_changes_nothing_and_is_used_at_its_level() {
        let plain = random_letters(200_000, 9);
        let split = 40;
        let levels = [STRONG_LEVEL, FAST_LEVEL, FASTEST_LEVEL];
        // Through a probe and the payloads after it (the fastest level on random letters).
        let mut alone = Squeeze::adaptive();
        let mut offered = [Squeeze::adaptive(); 3];
        for _ in 0..3 {
            let want = alone.compress_split(&plain, split, None).unwrap();
            for (s, level) in offered.iter_mut().zip(levels) {
                let ahead = Precompressed::new(&plain[split..], level).unwrap();
                assert_eq!(s.compress_split(&plain, split, Some(&ahead)).unwrap(), want);
            }
        }
        // Each payload was made at one level, offered ahead to exactly one of the three: the
        // probe's smallest result, then the fastest level it chose.
        assert_eq!(alone.ahead_taken(), 0);
        let taken: Vec<u64> = offered.iter().map(Squeeze::ahead_taken).collect();
        assert_eq!(taken.iter().sum::<u64>(), 3, "{taken:?}");
        assert!(taken[2] >= 2, "{taken:?}");
        // The frame given is the one used, at its level only.
        let marker = Precompressed {
            level: alone.level(),
            frame: b"not zstd, but the sealer's to take".to_vec(),
        };
        let got = alone.compress_split(&plain, split, Some(&marker)).unwrap();
        assert!(
            matches!(got.body, Cow::Borrowed(_)),
            "taken as it is, not copied"
        );
        assert!(got.to_vec().ends_with(&marker.frame));
        let other = Precompressed {
            level: STRONG_LEVEL,
            ..marker.clone()
        };
        let got = alone
            .compress_split(&plain, split, Some(&other))
            .unwrap()
            .to_vec();
        assert!(!got.ends_with(&other.frame));
        assert_eq!(decompress(&got, plain.len()).unwrap(), plain);
    }
}
