//! Which stores are online, as the head office sees them.
//!
//! A store that sells nothing sends nothing on the UP stream, so silence alone cannot tell
//! a quiet store from one whose WAN is down. Each till of a store therefore reports its
//! uplink every few seconds on its status subject ([`crate::Subjects::status`], plain NATS:
//! only the latest report matters, nothing is kept): an [`UplinkReport`] with the number of
//! changes it holds that the backbone does not have yet. The head office keeps the latest
//! report of each till ([`Presence`]) and derives each store's state from it: online while
//! one of its tills reported recently, offline since its last report otherwise, its lag in
//! changes (the largest backlog its tills report) and in time (the clock time of the oldest
//! change its tills still hold for the backbone). Pure: the caller gives the times.

use std::collections::BTreeMap;

use possync_core::PosId;
use serde::{Deserialize, Serialize};

use crate::message::MessageError;
use crate::subject::StoreId;

/// Largest report accepted (a report is a few dozen bytes).
pub const MAX_REPORT_BYTES: usize = 1024;

/// Most tills the head office keeps a report of (1,000 stores of 5 tills fit twice): a
/// till beyond it is not tracked, so no publisher can grow the head office's memory.
pub const MAX_TRACKED_TILLS: usize = 10_000;

/// What a till reports about its uplink.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UplinkReport {
    /// Changes of its store that the till holds and the backbone does not have yet, as far
    /// as it knows (its publisher's backlog).
    pub backlog: u64,
    /// When the oldest of those changes was made (its clock time, Unix ms); absent when the
    /// backlog is empty or the till does not know it yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oldest_ms: Option<u64>,
    /// The conflicts this till logged (the store's conflicts summary for the head office).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conflicts: Option<ConflictSummary>,
}

/// A till's conflicts, as it reports them: the head office sees each store's merge trouble
/// without the stores sending their audit rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConflictSummary {
    /// Conflicts waiting for a person's decision (`manual` strategy, not resolved).
    pub open: u64,
    /// Conflicts logged in the last 24 hours.
    pub last_day: u64,
}

impl UplinkReport {
    /// The report's body.
    pub fn encode(&self) -> Vec<u8> {
        // Invariant: a struct of one integer always serializes.
        serde_json::to_vec(self).expect("serializing a report")
    }

    /// Reads a report's body.
    pub fn decode(bytes: &[u8]) -> Result<UplinkReport, MessageError> {
        if bytes.len() > MAX_REPORT_BYTES {
            return Err(MessageError::TooLarge { bytes: bytes.len() });
        }
        let malformed = |err: serde_json::Error| MessageError::Malformed(err.to_string());
        // An object only: serde would also read a struct from an array.
        match serde_json::from_slice::<serde_json::Value>(bytes).map_err(malformed)? {
            object @ serde_json::Value::Object(_) => serde_json::from_value(object).map_err(malformed),
            _ => Err(MessageError::Malformed("a report is a JSON object".into())),
        }
    }
}

/// The latest report of one till.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Heard {
    /// When it arrived (head office's clock, Unix ms).
    at_ms: u64,
    /// Its backlog.
    backlog: u64,
    /// The clock time of its oldest change not on the backbone.
    oldest_ms: Option<u64>,
    /// Its conflicts summary.
    conflicts: Option<ConflictSummary>,
}

/// A store's state as its tills' reports tell it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreState {
    /// One of its tills reported within the window.
    pub online: bool,
    /// When one of its tills last reported (Unix ms).
    pub last_report_ms: u64,
    /// When it went silent (its last report), while offline.
    pub offline_since_ms: Option<u64>,
    /// Changes of the store not on the backbone yet: the largest backlog reported by its
    /// tills that are online (by every till's last report while the store is offline).
    pub backlog: u64,
    /// The clock time (Unix ms, the tills' clocks) of the oldest change of the store not on
    /// the backbone, among the same reports; `None` when none is pending or none said.
    pub oldest_pending_ms: Option<u64>,
    /// The store's conflicts: the largest figures its tills report (the tills of a store see
    /// mostly the same conflicts), among the same reports; `None` when none said.
    pub conflicts: Option<ConflictSummary>,
}

/// The latest report of every till, at the head office.
#[derive(Debug, Default)]
pub struct Presence {
    tills: BTreeMap<StoreId, BTreeMap<PosId, Heard>>,
    tracked: usize,
}

impl Presence {
    /// Records `report` from till `till` of store `store`, received at `now_ms`. False when
    /// the till is new and [`MAX_TRACKED_TILLS`] are tracked already (not recorded).
    pub fn heard(&mut self, store: &StoreId, till: &PosId, report: UplinkReport, now_ms: u64) -> bool {
        let known = self.tills.get(store).is_some_and(|tills| tills.contains_key(till));
        if !known {
            if self.tracked >= MAX_TRACKED_TILLS {
                return false;
            }
            self.tracked += 1;
        }
        let oldest_ms = report.oldest_ms.filter(|_| report.backlog > 0);
        let heard = Heard { at_ms: now_ms, backlog: report.backlog, oldest_ms, conflicts: report.conflicts };
        self.tills.entry(store.clone()).or_default().insert(till.clone(), heard);
        true
    }

    /// The stores some till of which has reported, with their state at `now_ms`: online when
    /// a till reported within `window_ms`.
    pub fn stores(&self, now_ms: u64, window_ms: u64) -> BTreeMap<StoreId, StoreState> {
        self.tills
            .iter()
            .filter_map(|(store, tills)| {
                let last = tills.values().map(|heard| heard.at_ms).max()?;
                let recent = |heard: &&Heard| now_ms.saturating_sub(heard.at_ms) <= window_ms;
                let online = tills.values().any(|heard| recent(&heard));
                let counted = || tills.values().filter(|heard| !online || recent(heard));
                let backlog = counted().map(|heard| heard.backlog).max().unwrap_or(0);
                let oldest_pending_ms = counted().filter_map(|heard| heard.oldest_ms).min();
                let conflicts = counted().filter_map(|heard| heard.conflicts).reduce(|a, b| {
                    ConflictSummary { open: a.open.max(b.open), last_day: a.last_day.max(b.last_day) }
                });
                let offline_since_ms = (!online).then_some(last);
                let state = StoreState {
                    online,
                    last_report_ms: last,
                    offline_since_ms,
                    backlog,
                    oldest_pending_ms,
                    conflicts,
                };
                Some((store.clone(), state))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(id: &str) -> StoreId {
        StoreId::parse(id).unwrap()
    }

    fn till(id: &str) -> PosId {
        PosId::parse(id).unwrap()
    }

    fn report(backlog: u64) -> UplinkReport {
        UplinkReport { backlog, oldest_ms: None, conflicts: None }
    }

    #[test]
    fn reports_round_trip_and_bad_ones_are_refused() {
        let report = UplinkReport { backlog: 42, oldest_ms: None, conflicts: None };
        assert_eq!(report.encode(), br#"{"backlog":42}"#);
        assert_eq!(UplinkReport::decode(&report.encode()).unwrap(), report);
        let report = UplinkReport { backlog: 42, oldest_ms: Some(1_800_000_000_000), conflicts: None };
        assert_eq!(report.encode(), br#"{"backlog":42,"oldestMs":1800000000000}"#);
        assert_eq!(UplinkReport::decode(&report.encode()).unwrap(), report);
        let conflicts = Some(ConflictSummary { open: 2, last_day: 5 });
        let report = UplinkReport { backlog: 0, oldest_ms: None, conflicts };
        assert_eq!(report.encode(), br#"{"backlog":0,"conflicts":{"open":2,"lastDay":5}}"#);
        assert_eq!(UplinkReport::decode(&report.encode()).unwrap(), report);
        for bad in [&b"{}"[..], b"{\"backlog\":-1}", b"{\"backlog\":1,\"x\":2}", b"[1]", b"\xff", b""] {
            assert!(matches!(UplinkReport::decode(bad), Err(MessageError::Malformed(_))), "{bad:?}");
        }
        let huge = vec![b' '; MAX_REPORT_BYTES + 1];
        assert!(matches!(UplinkReport::decode(&huge), Err(MessageError::TooLarge { .. })));
    }

    #[test]
    fn a_store_is_online_while_a_till_reports_and_offline_since_the_last_report() {
        let mut presence = Presence::default();
        let (s1, s2) = (store("s1"), store("s2"));
        assert!(presence.stores(0, 15_000).is_empty());
        presence.heard(&s1, &till("a"), report(0), 1_000);
        presence.heard(&s1, &till("b"), report(7), 2_000);
        presence.heard(&s2, &till("c"), report(3), 2_000);
        let states = presence.stores(10_000, 15_000);
        assert_eq!(
            states[&s1],
            StoreState {
                online: true,
                last_report_ms: 2_000,
                offline_since_ms: None,
                backlog: 7,
                oldest_pending_ms: None,
                conflicts: None
            }
        );
        // Till b goes quiet; a keeps reporting: online, and b's old backlog no longer counts.
        presence.heard(&s1, &till("a"), report(1), 16_000);
        let states = presence.stores(20_000, 15_000);
        assert_eq!(
            states[&s1],
            StoreState {
                online: true,
                last_report_ms: 16_000,
                offline_since_ms: None,
                backlog: 1,
                oldest_pending_ms: None,
                conflicts: None
            }
        );
        // Store s2 has been silent longer than the window: offline since its last report,
        // with the backlog it last reported.
        assert_eq!(
            states[&s2],
            StoreState {
                online: false,
                last_report_ms: 2_000,
                offline_since_ms: Some(2_000),
                backlog: 3,
                oldest_pending_ms: None,
                conflicts: None
            }
        );
    }

    #[test]
    fn a_stores_lag_in_time_is_its_oldest_pending_change_among_the_reports_that_count() {
        let mut presence = Presence::default();
        let s1 = store("s1");
        let pending =
            |backlog, oldest_ms| UplinkReport { backlog, oldest_ms: Some(oldest_ms), conflicts: None };
        presence.heard(&s1, &till("a"), pending(4, 5_000), 10_000);
        presence.heard(&s1, &till("b"), pending(2, 3_000), 11_000);
        assert_eq!(presence.stores(12_000, 15_000)[&s1].oldest_pending_ms, Some(3_000));
        // An empty backlog says nothing about time, whatever the report carries.
        presence.heard(&s1, &till("b"), pending(0, 1_000), 12_000);
        assert_eq!(presence.stores(12_000, 15_000)[&s1].oldest_pending_ms, Some(5_000));
        // Till a goes quiet while b keeps reporting: a's old figure no longer counts.
        presence.heard(&s1, &till("b"), report(0), 30_000);
        assert_eq!(presence.stores(30_000, 15_000)[&s1].oldest_pending_ms, None);
    }

    #[test]
    fn a_stores_conflicts_are_the_largest_figures_its_tills_report() {
        let mut presence = Presence::default();
        let s1 = store("s1");
        let with = |open, last_day| UplinkReport {
            backlog: 0,
            oldest_ms: None,
            conflicts: Some(ConflictSummary { open, last_day }),
        };
        presence.heard(&s1, &till("a"), report(0), 1_000);
        assert_eq!(presence.stores(1_000, 15_000)[&s1].conflicts, None);
        presence.heard(&s1, &till("b"), with(1, 9), 1_000);
        presence.heard(&s1, &till("c"), with(3, 4), 1_000);
        assert_eq!(
            presence.stores(1_000, 15_000)[&s1].conflicts,
            Some(ConflictSummary { open: 3, last_day: 9 })
        );
    }

    #[test]
    fn the_number_of_tills_tracked_is_bounded() {
        let mut presence = Presence::default();
        let s1 = store("s1");
        for n in 0..MAX_TRACKED_TILLS {
            assert!(presence.heard(&s1, &till(&format!("t{n}")), report(0), 1));
        }
        assert!(!presence.heard(&s1, &till("one-more"), report(0), 2));
        assert!(presence.heard(&s1, &till("t0"), report(5), 3), "a known till is updated");
        assert_eq!(presence.stores(3, 10)[&s1].backlog, 5);
    }
}
