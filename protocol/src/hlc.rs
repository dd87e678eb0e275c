//! Hybrid logical clock.
//!
//! A timestamp is one `u64`: the upper 48 bits are wall-clock milliseconds since the Unix epoch,
//! the lower 16 bits a logical counter. Integer order is causal-consistent time order, and the
//! packed form costs 8 bytes on the wire. The clock never reads the system time: the caller
//! passes `now_ms` (that is what keeps `protocol/` deterministic under simulation).

use serde::{Deserialize, Serialize};

const COUNTER_BITS: u32 = 16;
const COUNTER_MASK: u64 = (1 << COUNTER_BITS) - 1;

/// A hybrid logical clock timestamp.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Hlc(pub u64);

impl Hlc {
    /// The zero timestamp (before everything).
    pub const ZERO: Hlc = Hlc(0);

    /// Builds a timestamp from wall milliseconds and a counter.
    pub fn new(wall_ms: u64, counter: u16) -> Self {
        Hlc((wall_ms << COUNTER_BITS) | u64::from(counter))
    }

    /// Wall-clock part, in milliseconds since the Unix epoch.
    pub fn wall_ms(self) -> u64 {
        self.0 >> COUNTER_BITS
    }

    /// Logical counter part.
    pub fn counter(self) -> u16 {
        (self.0 & COUNTER_MASK) as u16
    }
}

/// A hybrid logical clock: hands out strictly increasing timestamps that stay close to wall
/// time and never fall behind any timestamp it has observed.
#[derive(Clone, Debug, Default)]
pub struct Clock {
    last: Hlc,
}

impl Clock {
    /// A clock that has seen nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The next timestamp, strictly greater than every one issued or observed before.
    pub fn tick(&mut self, now_ms: u64) -> Hlc {
        let candidate = Hlc::new(now_ms, 0);
        self.last = if candidate > self.last {
            candidate
        } else {
            // Same (or earlier) millisecond: bump the logical counter; when it overflows the
            // packed form carries into the wall part, which is still strictly increasing.
            Hlc(self.last.0 + 1)
        };
        self.last
    }

    /// Takes note of a timestamp seen elsewhere, so later ticks come after it.
    pub fn observe(&mut self, seen: Hlc) {
        if seen > self.last {
            self.last = seen;
        }
    }

    /// The last timestamp issued or observed.
    pub fn last(&self) -> Hlc {
        self.last
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_strictly_increase_even_when_wall_time_stalls_or_goes_back() {
        let mut c = Clock::new();
        let a = c.tick(1_000);
        let b = c.tick(1_000);
        let d = c.tick(900);
        let e = c.tick(2_000);
        assert!(a < b && b < d && d < e);
        assert_eq!(e, Hlc::new(2_000, 0));
        assert_eq!(b.counter(), 1);
        assert_eq!(a.wall_ms(), 1_000);
    }

    #[test]
    fn observe_moves_clock_past_remote_time() {
        let mut c = Clock::new();
        c.observe(Hlc::new(5_000, 7));
        let t = c.tick(1_000);
        assert!(t > Hlc::new(5_000, 7));
    }

    #[test]
    fn counter_overflow_carries_into_wall_time() {
        let mut c = Clock::new();
        c.observe(Hlc::new(10, u16::MAX));
        let t = c.tick(10);
        assert_eq!(t, Hlc::new(11, 0));
    }
}
