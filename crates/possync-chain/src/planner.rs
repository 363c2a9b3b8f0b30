//! The upload planner: what to publish next.
//!
//! Inputs: the local version vector (what this node holds), which origins this node uploads,
//! and what the backbone holds per origin (learnt by reading the last message of the
//! origin's subject, or from the ack of our own last publish). Output: a [`Step`], either
//! "read the subject's last message" (we do not know, or no longer trust, what it holds) or
//! "publish seqs `first..=last` of this origin, expecting the subject's last stream sequence
//! to be `n`".
//!
//! Why this is exact without the duplicate window: a publish carries
//! `Nats-Expected-Last-Subject-Sequence`, so the server appends it only if nobody appended to
//! the subject since we read it. Two tills racing on one origin: one wins, the other gets
//! "wrong last sequence", calls [`Planner::on_wrong_sequence`], reads again and plans from
//! what the winner published. The subject therefore holds each seq of the origin once, in
//! order, and HQ's apply skips anything it already holds by (origin, seq).
//!
//! Run loop of a driver:
//! 1. `planner.next(&vv, uploads)`; `None`: wait for a new local change (or a tick).
//! 2. `Step::Read`: read the subject's last message; [`Planner::on_read`] with its stream
//!    sequence and `Possync-Last-Seq` (or `None` when the subject is empty).
//! 3. `Step::Publish`: select the changes `first..=last` (a shorter run is fine), publish
//!    with the expected sequence, wait for the ack; [`Planner::on_published`] with the ack's
//!    sequence and the last seq sent, or [`Planner::on_wrong_sequence`]; any other failure:
//!    [`Planner::forget`] the origin and back off.

use std::collections::BTreeMap;

use possync_core::{PosId, Seq, VersionVector};

/// What the backbone holds for one origin, as far as this node knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held {
    /// The origin's last seq on the backbone (0: none).
    pub seq: Seq,
    /// The stream sequence of the subject's last message (0: the subject is empty).
    pub subject_seq: u64,
}

/// What the driver should do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Read the last message of `origin`'s subject, then call [`Planner::on_read`].
    Read {
        /// The origin.
        origin: PosId,
    },
    /// Publish `origin`'s changes `first..=last` (or a prefix of them) with
    /// `Nats-Expected-Last-Subject-Sequence: expected_subject_seq`.
    Publish {
        /// The origin.
        origin: PosId,
        /// First seq to send (the backbone's next).
        first: Seq,
        /// Last seq to send at most.
        last: Seq,
        /// The subject's last stream sequence we build on.
        expected_subject_seq: u64,
    },
}

/// Tracks what the backbone holds per origin and plans the next publish.
#[derive(Debug, Clone)]
pub struct Planner {
    /// Known state per origin; absent: read it first.
    held: BTreeMap<PosId, Held>,
    /// The highest seq of each origin the backbone was ever seen to hold (a read or an
    /// ack). Kept when `held` is forgotten: a stored message stays stored, so the backlog
    /// this node reports stays right while it cannot reach the backbone.
    confirmed: BTreeMap<PosId, Seq>,
    /// Most changes in one message.
    max_changes: u64,
}

impl Planner {
    /// A planner that sends at most `max_changes` changes per message.
    pub fn new(max_changes: usize) -> Planner {
        Planner { held: BTreeMap::new(), confirmed: BTreeMap::new(), max_changes: max_changes.max(1) as u64 }
    }

    // Getters.

    /// What the backbone holds for `origin`, if known.
    pub fn held(&self, origin: &PosId) -> Option<Held> {
        self.held.get(origin).copied()
    }

    /// Changes held locally but not (known to be) on the backbone, over the uploaded
    /// origins; origins never read count in full.
    pub fn backlog(&self, local: &VersionVector, uploads: impl Fn(&PosId) -> bool) -> u64 {
        local
            .iter()
            .filter(|(origin, _)| uploads(origin))
            .map(|(origin, seq)| seq.0.saturating_sub(self.on_backbone(origin).map_or(0, |held| held.0)))
            .sum()
    }

    /// The highest seq of `origin` known to be on the backbone, if it was ever seen.
    fn on_backbone(&self, origin: &PosId) -> Option<Seq> {
        self.held.get(origin).map(|held| held.seq).or_else(|| self.confirmed.get(origin).copied())
    }

    /// Per origin this node uploads whose backbone state is known: the first change the
    /// backbone does not hold yet, when there is one (for the age of the backlog).
    pub fn first_pending(
        &self,
        local: &VersionVector,
        uploads: impl Fn(&PosId) -> bool,
    ) -> Vec<(PosId, Seq)> {
        local
            .iter()
            .filter(|(origin, _)| uploads(origin))
            .filter_map(|(origin, seq)| {
                let held = self.on_backbone(origin)?;
                (held < seq).then(|| (origin.clone(), held.next()))
            })
            .collect()
    }

    // Output.

    /// The next step, or `None` when the backbone holds everything this node uploads.
    /// Origins are taken in order; an origin whose state is unknown is read first.
    pub fn next(&self, local: &VersionVector, uploads: impl Fn(&PosId) -> bool) -> Option<Step> {
        for (origin, local_seq) in local.iter().filter(|(origin, _)| uploads(origin)) {
            let Some(held) = self.held.get(origin) else {
                return Some(Step::Read { origin: origin.clone() });
            };
            if held.seq < local_seq {
                let last = Seq(local_seq.0.min(held.seq.0 + self.max_changes));
                return Some(Step::Publish {
                    origin: origin.clone(),
                    first: held.seq.next(),
                    last,
                    expected_subject_seq: held.subject_seq,
                });
            }
        }
        None
    }

    // Inputs.

    /// The subject's last message was read: `None` when the subject is empty, else its
    /// stream sequence and its `Possync-Last-Seq`.
    pub fn on_read(&mut self, origin: &PosId, last: Option<(u64, Seq)>) {
        let (subject_seq, seq) = last.unwrap_or((0, Seq(0)));
        self.held.insert(origin.clone(), Held { seq, subject_seq });
        self.confirm(origin, seq);
    }

    /// Our publish of `origin`'s run ending at `last` was acknowledged at stream sequence
    /// `subject_seq`.
    pub fn on_published(&mut self, origin: &PosId, subject_seq: u64, last: Seq) {
        self.held.insert(origin.clone(), Held { seq: last, subject_seq });
        self.confirm(origin, last);
    }

    fn confirm(&mut self, origin: &PosId, seq: Seq) {
        let confirmed = self.confirmed.entry(origin.clone()).or_default();
        *confirmed = (*confirmed).max(seq);
    }

    /// The server refused our publish: someone appended to the subject since we read it.
    pub fn on_wrong_sequence(&mut self, origin: &PosId) {
        self.forget(origin);
    }

    /// Forgets what we knew of `origin` (after an error whose outcome is unknown, such as
    /// an ack that timed out: the message may or may not be stored).
    pub fn forget(&mut self, origin: &PosId) {
        self.held.remove(origin);
    }

    /// Forgets everything (after a reconnect).
    pub fn forget_all(&mut self) {
        self.held.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pos(id: &str) -> PosId {
        PosId::parse(id).unwrap()
    }

    fn vv(entries: &[(&str, u64)]) -> VersionVector {
        let mut vv = VersionVector::new();
        for (origin, seq) in entries {
            vv.observe(&pos(origin), Seq(*seq));
        }
        vv
    }

    fn publish(origin: &str, first: u64, last: u64, expected: u64) -> Option<Step> {
        Some(Step::Publish {
            origin: pos(origin),
            first: Seq(first),
            last: Seq(last),
            expected_subject_seq: expected,
        })
    }

    #[test]
    fn reads_first_then_publishes_runs_up_to_the_limit() {
        let local = vv(&[("t1", 250)]);
        let mut planner = Planner::new(100);
        assert_eq!(planner.next(&local, |_| true), Some(Step::Read { origin: pos("t1") }));
        planner.on_read(&pos("t1"), None);
        assert_eq!(planner.next(&local, |_| true), publish("t1", 1, 100, 0));
        planner.on_published(&pos("t1"), 17, Seq(100));
        assert_eq!(planner.next(&local, |_| true), publish("t1", 101, 200, 17));
        planner.on_published(&pos("t1"), 18, Seq(160)); // a shorter run was sent (size limit)
        assert_eq!(planner.next(&local, |_| true), publish("t1", 161, 250, 18));
        planner.on_published(&pos("t1"), 19, Seq(250));
        assert_eq!(planner.next(&local, |_| true), None);
        assert_eq!(planner.backlog(&local, |_| true), 0);
    }

    #[test]
    fn only_uploaded_origins_are_planned() {
        let local = vv(&[("hq", 40), ("t1", 2)]);
        let mut planner = Planner::new(100);
        let uploads = |origin: &PosId| origin.as_str() != "hq";
        assert_eq!(planner.next(&local, uploads), Some(Step::Read { origin: pos("t1") }));
        planner.on_read(&pos("t1"), Some((5, Seq(2))));
        assert_eq!(planner.next(&local, uploads), None);
        assert_eq!(planner.backlog(&local, uploads), 0);
        assert_eq!(planner.first_pending(&local, uploads), vec![]);
    }

    #[test]
    fn the_first_pending_change_of_each_known_origin_is_the_one_after_what_the_backbone_holds() {
        let local = vv(&[("t1", 10), ("t2", 5), ("t3", 7)]);
        let mut planner = Planner::new(100);
        planner.on_read(&pos("t1"), Some((3, Seq(4))));
        planner.on_read(&pos("t2"), Some((4, Seq(5))));
        // t3's state is unknown until read: it is not counted.
        assert_eq!(planner.first_pending(&local, |_| true), vec![(pos("t1"), Seq(5))]);
        // Forgotten after a failure, t1 is still known to be on the backbone up to 4.
        planner.forget_all();
        assert_eq!(planner.first_pending(&local, |_| true), vec![(pos("t1"), Seq(5))]);
    }

    #[test]
    fn a_racing_uploader_makes_us_read_again_and_go_on_from_its_run() {
        let local = vv(&[("t1", 10)]);
        let mut planner = Planner::new(100);
        planner.on_read(&pos("t1"), Some((3, Seq(4))));
        assert_eq!(planner.next(&local, |_| true), publish("t1", 5, 10, 3));
        // Another till appended 5..=8 first: our publish is refused.
        planner.on_wrong_sequence(&pos("t1"));
        assert_eq!(planner.next(&local, |_| true), Some(Step::Read { origin: pos("t1") }));
        planner.on_read(&pos("t1"), Some((4, Seq(8))));
        assert_eq!(planner.next(&local, |_| true), publish("t1", 9, 10, 4));
    }

    #[test]
    fn a_backbone_ahead_of_us_needs_nothing() {
        let local = vv(&[("t1", 3)]);
        let mut planner = Planner::new(100);
        planner.on_read(&pos("t1"), Some((9, Seq(7))));
        assert_eq!(planner.next(&local, |_| true), None);
        planner.forget_all();
        assert_eq!(planner.held(&pos("t1")), None);
        assert_eq!(planner.next(&local, |_| true), Some(Step::Read { origin: pos("t1") }));
        // What the backbone was seen to hold still counts as held for the backlog; an origin
        // never read counts in full.
        assert_eq!(planner.backlog(&local, |_| true), 0);
        assert_eq!(planner.backlog(&vv(&[("t1", 9), ("t2", 4)]), |_| true), 2 + 4);
    }
}
