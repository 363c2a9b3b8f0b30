//! Version vectors: what a terminal (or a record) has seen, as the highest [`Seq`] per origin.
//!
//! Two uses, one type. A node's vector summarises its whole change log and is what a peer
//! sends at handshake so the other side can select exactly the changes it lacks. A record's
//! vector (its causal context) says which writes the record's current state incorporates, and
//! comparing it with an incoming change's context tells a sequential edit from a concurrent
//! one (SPEC rule 2) without trusting any wall clock.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::ids::{PosId, Seq};

/// Highest sequence number seen per origin terminal. Absent origins count as `Seq(0)`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct VersionVector(BTreeMap<PosId, Seq>);

/// How two version vectors relate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Causality {
    /// Both saw exactly the same writes.
    Equal,
    /// The left side saw a strict subset of what the right side saw.
    Before,
    /// The left side saw a strict superset of what the right side saw.
    After,
    /// Each side saw something the other did not: concurrent.
    Concurrent,
}

impl VersionVector {
    /// An empty vector (nothing seen).
    pub fn new() -> VersionVector {
        VersionVector::default()
    }

    /// The highest sequence seen from `origin`.
    pub fn get(&self, origin: &PosId) -> Seq {
        self.0.get(origin).copied().unwrap_or_default()
    }

    /// Records that `origin`'s changes up to `seq` are seen (never lowers an entry).
    pub fn observe(&mut self, origin: &PosId, seq: Seq) {
        if seq > self.get(origin) {
            self.0.insert(origin.clone(), seq);
        }
    }

    /// Takes the entry-wise maximum with `other`.
    pub fn merge(&mut self, other: &VersionVector) {
        for (origin, seq) in &other.0 {
            self.observe(origin, *seq);
        }
    }

    /// How `self` relates to `other`.
    pub fn compare(&self, other: &VersionVector) -> Causality {
        let mut less = false;
        let mut greater = false;
        for origin in self.0.keys().chain(other.0.keys()) {
            match self.get(origin).cmp(&other.get(origin)) {
                Ordering::Less => less = true,
                Ordering::Greater => greater = true,
                Ordering::Equal => {}
            }
        }
        match (less, greater) {
            (false, false) => Causality::Equal,
            (true, false) => Causality::Before,
            (false, true) => Causality::After,
            (true, true) => Causality::Concurrent,
        }
    }

    /// True when `self` has seen everything `other` has.
    pub fn dominates(&self, other: &VersionVector) -> bool {
        matches!(self.compare(other), Causality::Equal | Causality::After)
    }

    /// The (origin, highest seq) entries, ordered by origin.
    pub fn iter(&self) -> impl Iterator<Item = (&PosId, Seq)> {
        self.0.iter().map(|(origin, seq)| (origin, *seq))
    }

    /// True when nothing has been seen.
    pub fn is_empty(&self) -> bool {
        self.0.values().all(|seq| seq.0 == 0)
    }
}

impl FromIterator<(PosId, Seq)> for VersionVector {
    fn from_iter<I: IntoIterator<Item = (PosId, Seq)>>(entries: I) -> VersionVector {
        let mut vv = VersionVector::new();
        for (origin, seq) in entries {
            vv.observe(&origin, seq);
        }
        vv
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vv(entries: &[(&str, u64)]) -> VersionVector {
        entries.iter().map(|(origin, seq)| (PosId::parse(*origin).unwrap(), Seq(*seq))).collect()
    }

    #[test]
    fn compare_covers_all_four_cases() {
        let cases = [
            (vv(&[]), vv(&[]), Causality::Equal),
            (vv(&[("a", 1)]), vv(&[("a", 1), ("b", 0)]), Causality::Equal),
            (vv(&[("a", 1)]), vv(&[("a", 2)]), Causality::Before),
            (vv(&[("a", 1), ("b", 1)]), vv(&[("a", 1)]), Causality::After),
            (vv(&[("a", 2)]), vv(&[("a", 1), ("b", 1)]), Causality::Concurrent),
        ];
        for (left, right, expected) in cases {
            assert_eq!(left.compare(&right), expected, "{left:?} vs {right:?}");
        }
    }

    #[test]
    fn merge_is_entrywise_max_and_serializes_as_a_map() {
        let mut left = vv(&[("a", 3), ("b", 1)]);
        left.merge(&vv(&[("a", 1), ("c", 4)]));
        assert_eq!(left, vv(&[("a", 3), ("b", 1), ("c", 4)]));
        assert_eq!(serde_json::to_string(&left).unwrap(), r#"{"a":3,"b":1,"c":4}"#);
    }
}
