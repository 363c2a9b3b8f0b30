//! The hybrid logical clock (HLC) that orders every write in the shop.
//!
//! A timestamp is wall-clock milliseconds plus a counter, packed in one `u64`
//! (`ms << 16 | counter`) so that it sorts as an integer, fits a signed SQLite INTEGER until
//! the year 6429, and never overflows in 2038. The clock never goes backwards: if the wall
//! clock jumps back, it keeps the last millisecond and counts; after a restart the store
//! restores the last value it issued ([`HybridClock::new`]). When a remote timestamp is seen,
//! the clock moves past it, so an edit made after seeing another always sorts after it, even
//! when the terminals' wall clocks disagree. The clock reads no time itself: callers pass the
//! wall time in, which keeps it deterministic under simulation.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Largest millisecond value an [`Hlc`] can hold (2^47 - 1, about the year 6429).
pub const MAX_MS: u64 = (1 << 47) - 1;

/// How far ahead of its own wall clock a terminal lets a remote timestamp move its clock.
/// A remote change stamped further ahead (a till whose clock is wrong, or a forged stamp)
/// is still merged, by its stamp, the same way on every terminal; but this terminal's
/// clock does not follow it there, so that one bad stamp cannot carry every later local
/// edit of every record into the far future (and, at the end of the range, overflow). The
/// price: the fields that change wrote keep its value until the wall clock passes its stamp
/// (a later edit sorts before it); the node counts and alerts such changes.
pub const MAX_OBSERVED_AHEAD_MS: u64 = 60 * 60 * 1000;

/// One hybrid-logical-clock timestamp. Total order: milliseconds, then counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Hlc(u64);

/// Why a string or integer is not a valid [`Hlc`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HlcError {
    /// Not of the form `<ms>-<counter>`.
    #[error("malformed clock value {0:?}, expected <ms>-<counter>")]
    Malformed(String),
    /// The millisecond part is past [`MAX_MS`].
    #[error("clock value is out of range")]
    OutOfRange,
}

impl Hlc {
    /// The timestamp `ms`.`counter`; fails when `ms` is past [`MAX_MS`].
    pub fn new(ms: u64, counter: u16) -> Result<Hlc, HlcError> {
        if ms > MAX_MS {
            return Err(HlcError::OutOfRange);
        }
        Ok(Hlc((ms << 16) | u64::from(counter)))
    }

    /// Wall-clock milliseconds since the Unix epoch.
    pub fn ms(self) -> u64 {
        self.0 >> 16
    }

    /// The logical counter within the millisecond.
    pub fn counter(self) -> u16 {
        (self.0 & 0xFFFF) as u16
    }

    /// The packed form, as stored in SQLite (always non-negative as an `i64`).
    pub fn to_i64(self) -> i64 {
        // Invariant: ms <= MAX_MS, so the packed value is below 2^63.
        self.0 as i64
    }

    /// Reads the packed form back.
    pub fn from_i64(raw: i64) -> Result<Hlc, HlcError> {
        if raw < 0 {
            return Err(HlcError::OutOfRange);
        }
        Ok(Hlc(raw as u64))
    }

    /// The largest timestamp.
    pub const MAX: Hlc = Hlc((MAX_MS << 16) | 0xFFFF);

    /// The timestamp right after this one; `None` after [`Hlc::MAX`].
    pub fn next(self) -> Option<Hlc> {
        (self < Hlc::MAX).then(|| Hlc(self.0 + 1))
    }

    /// The next timestamp after this one (counter overflow carries into the milliseconds);
    /// [`Hlc::MAX`] stays [`Hlc::MAX`]: never past the range a signed SQLite INTEGER holds.
    fn successor(self) -> Hlc {
        Hlc(self.0.saturating_add(1).min(Hlc::MAX.0))
    }
}

impl fmt::Display for Hlc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms(), self.counter())
    }
}

impl FromStr for Hlc {
    type Err = HlcError;

    fn from_str(raw: &str) -> Result<Hlc, HlcError> {
        let malformed = || HlcError::Malformed(raw.chars().take(40).collect());
        let (ms, counter) = raw.split_once('-').ok_or_else(malformed)?;
        let ms = ms.parse::<u64>().map_err(|_| malformed())?;
        let counter = counter.parse::<u16>().map_err(|_| malformed())?;
        Hlc::new(ms, counter)
    }
}

impl Serialize for Hlc {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Hlc {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Hlc, D::Error> {
        let raw = String::deserialize(deserializer)?;
        raw.parse().map_err(serde::de::Error::custom)
    }
}

/// A terminal's clock: issues strictly increasing [`Hlc`]s for local writes.
#[derive(Debug, Clone)]
pub struct HybridClock {
    /// The last timestamp issued or observed; every new one sorts after it.
    last: Hlc,
}

impl HybridClock {
    /// A clock that resumes after `restored`, the last value issued before a restart.
    pub fn new(restored: Hlc) -> HybridClock {
        HybridClock { last: restored }
    }

    /// The last value issued or observed.
    pub fn last(&self) -> Hlc {
        self.last
    }

    /// A timestamp for a local write at wall time `wall_ms`, greater than any seen before.
    pub fn tick(&mut self, wall_ms: u64) -> Hlc {
        let wall = wall_ms.min(MAX_MS);
        self.last = if wall > self.last.ms() {
            // Invariant: wall <= MAX_MS.
            Hlc(wall << 16)
        } else {
            self.last.successor()
        };
        self.last
    }

    /// Moves the clock past a timestamp seen in a remote change, so that the next local
    /// write sorts after it. Returns how far ahead of the local wall clock the remote
    /// timestamp was, in milliseconds (0 when not ahead), for drift warnings.
    /// The clock follows no further than [`MAX_OBSERVED_AHEAD_MS`] past `wall_ms`.
    pub fn observe(&mut self, remote: Hlc, wall_ms: u64) -> u64 {
        let limit = Hlc(wall_ms.saturating_add(MAX_OBSERVED_AHEAD_MS).min(MAX_MS) << 16);
        let followed = remote.min(limit);
        if followed > self.last {
            self.last = followed;
        }
        remote.ms().saturating_sub(wall_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tick_is_strictly_increasing_even_when_the_wall_clock_goes_back() {
        let mut clock = HybridClock::new(Hlc::default());
        let a = clock.tick(1_000);
        let b = clock.tick(1_000);
        let c = clock.tick(500);
        let d = clock.tick(2_000);
        assert!(a < b && b < c && c < d, "{a} {b} {c} {d}");
        assert_eq!(c.ms(), 1_000);
        assert_eq!(d, Hlc::new(2_000, 0).unwrap());
    }

    #[test]
    fn a_write_after_observing_a_remote_sorts_after_it() {
        let mut clock = HybridClock::new(Hlc::default());
        let remote = Hlc::new(10_000, 7).unwrap();
        assert_eq!(clock.observe(remote, 4_000), 6_000);
        assert!(clock.tick(4_001) > remote);
    }

    #[test]
    fn a_stamp_from_the_far_future_does_not_carry_the_clock_and_the_clock_never_overflows() {
        let mut clock = HybridClock::new(Hlc::default());
        let wall = 1_764_000_000_000;
        let poisoned = Hlc::new(MAX_MS, u16::MAX).unwrap();
        assert_eq!(clock.observe(poisoned, wall), MAX_MS - wall);
        let next = clock.tick(wall);
        assert!(next.ms() <= wall + MAX_OBSERVED_AHEAD_MS, "{next}");
        // At the very end of the range, the clock stays there instead of wrapping negative.
        let mut ended = HybridClock::new(Hlc::MAX);
        for _ in 0..3 {
            let stamp = ended.tick(MAX_MS);
            assert_eq!(stamp, Hlc::MAX);
            assert!(stamp.to_i64() > 0);
        }
    }

    #[test]
    fn restored_clock_never_goes_back() {
        let before = Hlc::new(5_000, 3).unwrap();
        let mut clock = HybridClock::new(before);
        assert!(clock.tick(1) > before);
    }

    #[test]
    fn counter_overflow_carries() {
        let mut clock = HybridClock::new(Hlc::new(7, u16::MAX).unwrap());
        assert_eq!(clock.tick(7), Hlc::new(8, 0).unwrap());
    }

    #[test]
    fn text_and_integer_forms_round_trip_and_sort() {
        let h = Hlc::new(1_764_071_234_567, 42).unwrap();
        assert_eq!(h.to_string().parse::<Hlc>().unwrap(), h);
        assert_eq!(Hlc::from_i64(h.to_i64()).unwrap(), h);
        assert!(Hlc::new(MAX_MS, 0).unwrap().to_i64() > 0);
        assert!(Hlc::new(MAX_MS + 1, 0).is_err());
        assert!("12".parse::<Hlc>().is_err());
        assert!("a-1".parse::<Hlc>().is_err());
        assert!(Hlc::from_i64(-1).is_err());
    }
}
