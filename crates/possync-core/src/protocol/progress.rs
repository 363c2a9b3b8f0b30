//! Incoming catch-up progress on one connection: how many changes the peer is known to hold
//! that this node lacks, and whether that number has stopped shrinking.
//!
//! Why: a change a node cannot take (too large for its frame limit, refused by a bug, lost by
//! a broken relay) leaves the origin's later changes waiting behind it, since the version
//! vector cannot skip it. The link still looks healthy: pings flow, the peer shows online.
//! Comparing what the peer holds (its handshake summary plus every change seen on the link)
//! with what this node holds makes that visible: "catching up, N behind" while it shrinks,
//! and a stall, reported once, when it stops shrinking for too long.

use crate::vv::VersionVector;

/// How many changes `holder` has that `ours` lacks (per origin, what passes `ours`).
pub fn changes_behind(holder: &VersionVector, ours: &VersionVector) -> u64 {
    holder.iter().map(|(origin, seq)| seq.0.saturating_sub(ours.get(origin).0)).sum()
}

/// Watches one connection; fed by the driver every few seconds.
#[derive(Debug, Clone)]
pub struct CatchUpWatch {
    /// No progress for this long while behind is a stall.
    stalled_after_ms: u64,
    /// Changes behind at the last observation.
    behind: u64,
    /// When `behind` last shrank (or was zero).
    last_progress_ms: u64,
    /// This stall was reported already.
    reported: bool,
}

/// A stalled catch-up, reported once per stall.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stall {
    /// Changes the peer holds that never arrived.
    pub behind: u64,
    /// For how long nothing has arrived of them (ms).
    pub for_ms: u64,
}

impl CatchUpWatch {
    /// A watch that reports a stall after `stalled_after_ms` without progress.
    pub fn new(now_ms: u64, stalled_after_ms: u64) -> CatchUpWatch {
        CatchUpWatch { stalled_after_ms, behind: 0, last_progress_ms: now_ms, reported: false }
    }

    /// Changes behind at the last observation.
    pub fn behind(&self) -> u64 {
        self.behind
    }

    /// Takes a new reading: what the peer is known to hold, and what this node holds now.
    /// Returns the stall the first time it passes the limit.
    pub fn observe(
        &mut self,
        now_ms: u64,
        peer_holds: &VersionVector,
        ours: &VersionVector,
    ) -> Option<Stall> {
        let behind = changes_behind(peer_holds, ours);
        let progressed = behind == 0 || behind < self.behind;
        self.behind = behind;
        if progressed {
            self.last_progress_ms = now_ms;
            self.reported = false;
            return None;
        }
        let for_ms = now_ms.saturating_sub(self.last_progress_ms);
        if for_ms >= self.stalled_after_ms && !self.reported {
            self.reported = true;
            return Some(Stall { behind, for_ms });
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{PosId, Seq};

    fn vv(entries: &[(&str, u64)]) -> VersionVector {
        let mut vv = VersionVector::new();
        for (origin, seq) in entries {
            vv.observe(&PosId::parse(*origin).unwrap(), Seq(*seq));
        }
        vv
    }

    #[test]
    fn counts_what_the_holder_has_beyond_ours() {
        assert_eq!(changes_behind(&vv(&[("a", 10), ("b", 3)]), &vv(&[("a", 4), ("b", 5), ("c", 9)])), 6);
        assert_eq!(changes_behind(&vv(&[]), &vv(&[("a", 1)])), 0);
    }

    #[test]
    fn a_shrinking_gap_is_progress_and_a_stuck_one_is_reported_once() {
        let mut watch = CatchUpWatch::new(0, 60_000);
        let peer = vv(&[("a", 3_000)]);
        assert_eq!(watch.observe(5_000, &peer, &vv(&[("a", 1_000)])), None);
        assert_eq!(watch.behind(), 2_000);
        assert_eq!(watch.observe(10_000, &peer, &vv(&[("a", 1_800)])), None, "progress");
        // Stuck at 1,800 (one change refused, the rest waiting behind it).
        assert_eq!(watch.observe(60_000, &peer, &vv(&[("a", 1_800)])), None, "not yet 60 s");
        let stall = watch.observe(70_000, &peer, &vv(&[("a", 1_800)]));
        assert_eq!(stall, Some(Stall { behind: 1_200, for_ms: 60_000 }));
        assert_eq!(watch.observe(75_000, &peer, &vv(&[("a", 1_800)])), None, "reported once");
        // The peer writes more while we stay stuck: still no progress.
        assert_eq!(watch.observe(80_000, &vv(&[("a", 3_100)]), &vv(&[("a", 1_800)])), None);
        assert_eq!(watch.behind(), 1_300);
        // Caught up: a later stall is a new one.
        assert_eq!(watch.observe(85_000, &peer, &vv(&[("a", 3_100)])), None);
        assert_eq!(watch.behind(), 0);
        assert_eq!(watch.observe(90_000, &vv(&[("a", 3_200)]), &vv(&[("a", 3_100)])), None);
        assert!(watch.observe(150_000, &vv(&[("a", 3_200)]), &vv(&[("a", 3_100)])).is_some());
    }
}
