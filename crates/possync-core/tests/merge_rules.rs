//! Table-driven tests of `merge_record`, the pure merge function (SPEC section 2, rules 1, 2,
//! 3, 6 and 7).
//!
//! Each topic is one table of [`Case`]s run through one [`check`] helper: a case names the
//! local state (or none), the remote write, the strategy, and what must come out (field
//! values, `deleted`, the verdict with its conflict type, winner and `open` flag, and the
//! merged causal context). After the tables come the convergence tests: the same two
//! concurrent writes merged in both orders must give the same state, first for hand-picked
//! version pairs, then for generated pairs and for generated multi-terminal histories
//! delivered in random causal orders (a tiny inline PRNG, so no new dependency).
//!
//! Vocabulary used in the tables: terminal `a` created the record (`a1`), and the versions
//! are named `<origin><seq>`.

use std::collections::BTreeMap;

use possync_core::merge::RemoteWrite;
use possync_core::time::rfc3339_ms;
use possync_core::{
    Causality, ConflictType, EntityId, FieldMap, Hlc, HybridClock, MergeOutcome, PosId, RecordState, Seq,
    Strategy, Verdict, Version, VersionVector, Winner, merge_record,
};
use serde_json::{Value, json};

use ConflictType::{DeleteConflict, FieldMerge, UpdateConflict};
use Strategy::{LastWriteWins, LocalWins, Manual, RemoteWins};

// ---------------------------------------------------------------------------------------------
// Builders
// ---------------------------------------------------------------------------------------------

const LIVE: bool = false;
const DELETED: bool = true;

fn pos(id: &str) -> PosId {
    PosId::parse(id).unwrap()
}

fn record_id() -> EntityId {
    EntityId::parse("p1").unwrap()
}

/// The stamp of write number `seq` of terminal `origin`, made at `hlc_ms`.`counter`.
fn version(hlc_ms: u64, counter: u16, origin: &str, seq: u64) -> Version {
    Version { hlc: Some(Hlc::new(hlc_ms, counter).unwrap()), origin: pos(origin), seq: Seq(seq) }
}

/// A write without `updatedAt` (legacy data).
fn legacy(origin: &str, seq: u64) -> Version {
    Version { hlc: None, origin: pos(origin), seq: Seq(seq) }
}

fn vv(entries: &[(&str, u64)]) -> VersionVector {
    entries.iter().map(|(origin, seq)| (pos(origin), Seq(*seq))).collect()
}

/// Field values; every value in these tests is a JSON string.
fn fields(pairs: &[(&'static str, &str)]) -> FieldMap {
    pairs.iter().map(|(name, value)| (*name, json!(value))).collect()
}

/// An empty record with the given causal context; fill it in with [`Build`].
fn record(ctx: &[(&str, u64)]) -> RecordState {
    RecordState { ctx: vv(ctx), ..RecordState::default() }
}

trait Build {
    /// Sets field `name` to `value`, written by `version`.
    fn set(self, name: &'static str, value: &str, version: &Version) -> Self;
    /// The record is live; its existence was last written by `version`.
    fn live(self, version: &Version) -> Self;
    /// The record is a tombstone written by `version`.
    fn gone(self, version: &Version) -> Self;
}

impl Build for RecordState {
    fn set(mut self, name: &'static str, value: &str, version: &Version) -> Self {
        self.values.insert(name, json!(value));
        self.versions.insert(name, version.clone());
        self
    }

    fn live(mut self, version: &Version) -> Self {
        self.deleted = false;
        self.existence = Some(version.clone());
        self
    }

    fn gone(mut self, version: &Version) -> Self {
        self.deleted = true;
        self.existence = Some(version.clone());
        self
    }
}

/// An owned remote write (a [`RemoteWrite`] borrows).
#[derive(Debug, Clone)]
struct Remote {
    version: Version,
    ctx: VersionVector,
    fields: Option<FieldMap>,
}

impl Remote {
    fn write<'a>(&'a self, id: &'a EntityId) -> RemoteWrite<'a> {
        RemoteWrite { id, version: &self.version, ctx: &self.ctx, fields: self.fields.as_ref() }
    }
}

fn update(version: &Version, ctx: &[(&str, u64)], values: &[(&'static str, &str)]) -> Remote {
    Remote { version: version.clone(), ctx: vv(ctx), fields: Some(fields(values)) }
}

fn delete(version: &Version, ctx: &[(&str, u64)]) -> Remote {
    Remote { version: version.clone(), ctx: vv(ctx), fields: None }
}

/// The verdict a case expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    Applied,
    AlreadySeen,
    /// Conflict type, winner, open.
    Conflict(ConflictType, Winner, bool),
}

fn want_of(verdict: &Verdict) -> Want {
    match verdict {
        Verdict::Applied => Want::Applied,
        Verdict::AlreadySeen => Want::AlreadySeen,
        Verdict::Conflict(report) => Want::Conflict(report.conflict_type, report.winner, report.open),
    }
}

fn conflict(kind: ConflictType, winner: Winner) -> Want {
    Want::Conflict(kind, winner, false)
}

fn open_conflict(kind: ConflictType, winner: Winner) -> Want {
    Want::Conflict(kind, winner, true)
}

struct Expected {
    values: FieldMap,
    deleted: bool,
    verdict: Want,
    ctx: VersionVector,
}

fn expect(values: &[(&'static str, &str)], deleted: bool, ctx: &[(&str, u64)], verdict: Want) -> Expected {
    Expected { values: fields(values), deleted, verdict, ctx: vv(ctx) }
}

struct Case {
    name: &'static str,
    local: Option<RecordState>,
    remote: Remote,
    strategy: Strategy,
    expected: Expected,
}

/// Runs one case and asserts everything it expects, plus the invariants every merge keeps.
fn check(case: &Case) -> MergeOutcome {
    let id = record_id();
    let outcome = merge_record(case.local.as_ref(), case.remote.write(&id), case.strategy);
    let name = case.name;
    let state = &outcome.state;
    assert_eq!(state.values, case.expected.values, "{name}: field values");
    assert_eq!(state.deleted, case.expected.deleted, "{name}: deleted");
    assert_eq!(want_of(&outcome.verdict), case.expected.verdict, "{name}: verdict");
    assert_eq!(state.ctx, case.expected.ctx, "{name}: merged ctx");

    // `changed` says exactly whether the store has something to write.
    let unchanged = case.local.as_ref() == Some(state);
    assert_eq!(outcome.changed, !unchanged, "{name}: changed flag");
    if outcome.verdict == Verdict::AlreadySeen {
        assert!(unchanged, "{name}: AlreadySeen must leave the state alone");
    }
    // Every value has the version that set it, and the context covers both sides.
    for field in state.values.keys() {
        assert!(state.versions.contains_key(field), "{name}: {field} has no version");
    }
    assert!(state.existence.is_some(), "{name}: existence version missing");
    assert!(state.ctx.dominates(&case.remote.ctx), "{name}: ctx misses the remote write");
    if let Some(local) = &case.local {
        assert!(state.ctx.dominates(&local.ctx), "{name}: ctx lost local history");
    }
    if let Verdict::Conflict(report) = &outcome.verdict {
        assert_eq!(report.strategy, case.strategy, "{name}: report strategy");
        assert!(!report.notes.trim().is_empty(), "{name}: empty notes");
        assert_eq!(report.final_data, state.to_json(&id), "{name}: final_data is the merged state");
        let local = case.local.as_ref().expect("a conflict needs a local record");
        assert_eq!(report.local_data, local.to_json(&id), "{name}: local_data is the state before");
        assert_eq!(
            local.ctx.compare(&case.remote.ctx),
            Causality::Concurrent,
            "{name}: only concurrent writes may conflict"
        );
    }
    outcome
}

/// Checks every case of a table, then fails listing every case that failed.
fn run(cases: &[Case]) {
    let mut names = std::collections::BTreeSet::new();
    let mut failed = Vec::new();
    for case in cases {
        assert!(names.insert(case.name), "duplicate case name {}", case.name);
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(case))).is_err() {
            failed.push(case.name);
        }
    }
    assert!(failed.is_empty(), "{} of {} cases failed: {failed:#?}", failed.len(), cases.len());
}

// Versions shared by the tables. `a1` created the record {name: Tea, price: 2.5}.
fn a1() -> Version {
    version(1_000, 0, "a", 1)
}

/// The record as everyone has it after `a1`.
fn base() -> RecordState {
    record(&[("a", 1)]).set("name", "Tea", &a1()).set("price", "2.5", &a1()).live(&a1())
}

/// Terminal `a` edited the price again (`a2` at `ms`.`counter`); nobody else has seen it.
fn local_price_edit(ms: u64, counter: u16, price: &str) -> RecordState {
    let a2 = version(ms, counter, "a", 2);
    record(&[("a", 2)]).set("name", "Tea", &a1()).set("price", price, &a2).live(&a2)
}

// ---------------------------------------------------------------------------------------------
// Rule 1: last-write-wins, with a deterministic tie-break
// ---------------------------------------------------------------------------------------------

#[test]
fn rule1_newest_write_wins_with_deterministic_ties() {
    let legacy_local = || {
        let a1 = legacy("a", 1);
        let a2 = legacy("a", 2);
        record(&[("a", 2)]).set("name", "Tea", &a1).set("price", "3", &a2).live(&a2)
    };
    let cases = [
        Case {
            name: "newer remote wins",
            local: Some(local_price_edit(2_000, 0, "3")),
            remote: update(&version(3_000, 0, "b", 1), &[("a", 1), ("b", 1)], &[("price", "4")]),
            strategy: LastWriteWins,
            expected: expect(
                &[("name", "Tea"), ("price", "4")],
                LIVE,
                &[("a", 2), ("b", 1)],
                conflict(UpdateConflict, Winner::Remote),
            ),
        },
        Case {
            name: "older remote loses",
            local: Some(local_price_edit(2_000, 0, "3")),
            remote: update(&version(1_500, 0, "b", 1), &[("a", 1), ("b", 1)], &[("price", "4")]),
            strategy: LastWriteWins,
            expected: expect(
                &[("name", "Tea"), ("price", "3")],
                LIVE,
                &[("a", 2), ("b", 1)],
                conflict(UpdateConflict, Winner::Local),
            ),
        },
        Case {
            name: "no local updatedAt: remote wins",
            local: Some(legacy_local()),
            remote: update(&version(1, 0, "b", 1), &[("a", 1), ("b", 1)], &[("price", "4")]),
            strategy: LastWriteWins,
            expected: expect(
                &[("name", "Tea"), ("price", "4")],
                LIVE,
                &[("a", 2), ("b", 1)],
                conflict(UpdateConflict, Winner::Remote),
            ),
        },
        Case {
            name: "no remote updatedAt: local wins",
            local: Some(local_price_edit(2_000, 0, "3")),
            remote: update(&legacy("b", 1), &[("a", 1), ("b", 1)], &[("price", "4")]),
            strategy: LastWriteWins,
            expected: expect(
                &[("name", "Tea"), ("price", "3")],
                LIVE,
                &[("a", 2), ("b", 1)],
                conflict(UpdateConflict, Winner::Local),
            ),
        },
        Case {
            name: "both missing: higher origin posId wins (remote b over local a)",
            local: Some(legacy_local()),
            remote: update(&legacy("b", 1), &[("a", 1), ("b", 1)], &[("price", "4")]),
            strategy: LastWriteWins,
            expected: expect(
                &[("name", "Tea"), ("price", "4")],
                LIVE,
                &[("a", 2), ("b", 1)],
                conflict(UpdateConflict, Winner::Remote),
            ),
        },
        Case {
            name: "both missing: higher origin posId wins (local c over remote b)",
            local: Some(
                record(&[("a", 1), ("c", 1)])
                    .set("name", "Tea", &legacy("a", 1))
                    .set("price", "3", &legacy("c", 1))
                    .live(&legacy("c", 1)),
            ),
            remote: update(&legacy("b", 1), &[("a", 1), ("b", 1)], &[("price", "4")]),
            strategy: LastWriteWins,
            expected: expect(
                &[("name", "Tea"), ("price", "3")],
                LIVE,
                &[("a", 1), ("b", 1), ("c", 1)],
                conflict(UpdateConflict, Winner::Local),
            ),
        },
        Case {
            name: "same ms: higher HLC counter wins even from the lower posId",
            local: Some(local_price_edit(2_000, 5, "3")),
            remote: update(&version(2_000, 3, "b", 1), &[("a", 1), ("b", 1)], &[("price", "4")]),
            strategy: LastWriteWins,
            expected: expect(
                &[("name", "Tea"), ("price", "3")],
                LIVE,
                &[("a", 2), ("b", 1)],
                conflict(UpdateConflict, Winner::Local),
            ),
        },
        Case {
            name: "same ms: higher HLC counter wins (remote)",
            local: Some(local_price_edit(2_000, 3, "3")),
            remote: update(&version(2_000, 5, "b", 1), &[("a", 1), ("b", 1)], &[("price", "4")]),
            strategy: LastWriteWins,
            expected: expect(
                &[("name", "Tea"), ("price", "4")],
                LIVE,
                &[("a", 2), ("b", 1)],
                conflict(UpdateConflict, Winner::Remote),
            ),
        },
        Case {
            name: "identical HLC: higher origin posId wins (remote b over local a)",
            local: Some(local_price_edit(2_000, 0, "3")),
            remote: update(&version(2_000, 0, "b", 1), &[("a", 1), ("b", 1)], &[("price", "4")]),
            strategy: LastWriteWins,
            expected: expect(
                &[("name", "Tea"), ("price", "4")],
                LIVE,
                &[("a", 2), ("b", 1)],
                conflict(UpdateConflict, Winner::Remote),
            ),
        },
        Case {
            name: "identical HLC: higher origin posId wins (local c over remote b)",
            local: Some(
                record(&[("a", 1), ("c", 1)])
                    .set("name", "Tea", &a1())
                    .set("price", "3", &version(2_000, 0, "c", 1))
                    .live(&version(2_000, 0, "c", 1)),
            ),
            remote: update(&version(2_000, 0, "b", 1), &[("a", 1), ("b", 1)], &[("price", "4")]),
            strategy: LastWriteWins,
            expected: expect(
                &[("name", "Tea"), ("price", "3")],
                LIVE,
                &[("a", 1), ("b", 1), ("c", 1)],
                conflict(UpdateConflict, Winner::Local),
            ),
        },
        Case {
            name: "tie is not 'local wins': the seed's rule would keep a here",
            local: Some(local_price_edit(2_000, 0, "3")),
            remote: update(&version(2_000, 0, "z", 1), &[("a", 1), ("z", 1)], &[("price", "9")]),
            strategy: LastWriteWins,
            expected: expect(
                &[("name", "Tea"), ("price", "9")],
                LIVE,
                &[("a", 2), ("z", 1)],
                conflict(UpdateConflict, Winner::Remote),
            ),
        },
    ];
    run(&cases);
}

// ---------------------------------------------------------------------------------------------
// Rule 2: a conflict is a concurrent edit, decided by causality
// ---------------------------------------------------------------------------------------------

#[test]
fn rule2_sequential_concurrent_and_stale_writes() {
    let b1 = version(2_000, 0, "b", 1);
    let merged = || {
        // a's edit and b's edit, both merged (ctx {a:2, b:1}).
        let a2 = version(1_500, 0, "a", 2);
        record(&[("a", 2), ("b", 1)]).set("name", "Green tea", &a2).set("price", "3", &b1).live(&b1)
    };
    let cases = [
        Case {
            name: "sequential edit (remote saw the local version): applied, no conflict",
            local: Some(base()),
            remote: update(&b1, &[("a", 1), ("b", 1)], &[("price", "3")]),
            strategy: LastWriteWins,
            expected: expect(&[("name", "Tea"), ("price", "3")], LIVE, &[("a", 1), ("b", 1)], Want::Applied),
        },
        Case {
            name: "sequential edit is applied whatever the strategy (local_wins)",
            local: Some(base()),
            remote: update(&b1, &[("a", 1), ("b", 1)], &[("price", "3")]),
            strategy: LocalWins,
            expected: expect(&[("name", "Tea"), ("price", "3")], LIVE, &[("a", 1), ("b", 1)], Want::Applied),
        },
        Case {
            name: "sequential edit under manual: applied, nothing open",
            local: Some(base()),
            remote: update(&b1, &[("a", 1), ("b", 1)], &[("price", "3")]),
            strategy: Manual,
            expected: expect(&[("name", "Tea"), ("price", "3")], LIVE, &[("a", 1), ("b", 1)], Want::Applied),
        },
        Case {
            name: "sequential edit on top of a merged state",
            local: Some(merged()),
            remote: update(&version(2_500, 0, "a", 3), &[("a", 3), ("b", 1)], &[("price", "3.5")]),
            strategy: LastWriteWins,
            expected: expect(
                &[("name", "Green tea"), ("price", "3.5")],
                LIVE,
                &[("a", 3), ("b", 1)],
                Want::Applied,
            ),
        },
        Case {
            // a2 (price 2.8) lost to b1 on a already; b2 saw a1 and b1, everything the record
            // still holds, so nothing clashes although the contexts are concurrent.
            name: "concurrent ctx but nothing unseen left in the record: applied",
            local: Some(
                record(&[("a", 2), ("b", 1)]).set("name", "Tea", &a1()).set("price", "3", &b1).live(&b1),
            ),
            remote: update(&version(2_500, 0, "b", 2), &[("a", 1), ("b", 2)], &[("name", "Green tea")]),
            strategy: Manual,
            expected: expect(
                &[("name", "Green tea"), ("price", "3")],
                LIVE,
                &[("a", 2), ("b", 2)],
                Want::Applied,
            ),
        },
        Case {
            name: "concurrent edit of the same field: conflict",
            local: Some(local_price_edit(1_500, 0, "3")),
            remote: update(&b1, &[("a", 1), ("b", 1)], &[("price", "4")]),
            strategy: LastWriteWins,
            expected: expect(
                &[("name", "Tea"), ("price", "4")],
                LIVE,
                &[("a", 2), ("b", 1)],
                conflict(UpdateConflict, Winner::Remote),
            ),
        },
        Case {
            name: "duplicate (ctx equal): already seen, unchanged",
            local: Some(merged()),
            remote: update(&b1, &[("a", 2), ("b", 1)], &[("price", "3")]),
            strategy: LastWriteWins,
            expected: expect(
                &[("name", "Green tea"), ("price", "3")],
                LIVE,
                &[("a", 2), ("b", 1)],
                Want::AlreadySeen,
            ),
        },
        Case {
            name: "stale (local ctx dominates): already seen, older value not restored",
            local: Some(merged()),
            remote: update(&a1(), &[("a", 1)], &[("name", "Tea"), ("price", "2.5")]),
            strategy: RemoteWins,
            expected: expect(
                &[("name", "Green tea"), ("price", "3")],
                LIVE,
                &[("a", 2), ("b", 1)],
                Want::AlreadySeen,
            ),
        },
        Case {
            name: "stale even with a newer-looking clock: causality, not clocks, decides",
            local: Some(merged()),
            remote: update(&version(9_999, 0, "b", 1), &[("a", 1), ("b", 1)], &[("price", "7")]),
            strategy: LastWriteWins,
            expected: expect(
                &[("name", "Green tea"), ("price", "3")],
                LIVE,
                &[("a", 2), ("b", 1)],
                Want::AlreadySeen,
            ),
        },
    ];
    run(&cases);
}

// ---------------------------------------------------------------------------------------------
// Rule 3: field-level merge
// ---------------------------------------------------------------------------------------------

#[test]
fn rule3_field_level_merge() {
    let a2 = version(2_000, 0, "a", 2);
    let a3 = version(4_000, 0, "a", 3);
    let local_name_edit =
        || record(&[("a", 2)]).set("name", "Green tea", &a2).set("price", "2.5", &a1()).live(&a2);
    let cases = [
        Case {
            name: "different fields, remote newer: both survive",
            local: Some(local_name_edit()),
            remote: update(&version(3_000, 0, "b", 1), &[("a", 1), ("b", 1)], &[("price", "3")]),
            strategy: LastWriteWins,
            expected: expect(
                &[("name", "Green tea"), ("price", "3")],
                LIVE,
                &[("a", 2), ("b", 1)],
                conflict(FieldMerge, Winner::Both),
            ),
        },
        Case {
            name: "different fields, remote older: both survive all the same",
            local: Some(local_name_edit()),
            remote: update(&version(1_500, 0, "b", 1), &[("a", 1), ("b", 1)], &[("price", "3")]),
            strategy: LastWriteWins,
            expected: expect(
                &[("name", "Green tea"), ("price", "3")],
                LIVE,
                &[("a", 2), ("b", 1)],
                conflict(FieldMerge, Winner::Both),
            ),
        },
        Case {
            name: "different fields under local_wins: the remote field is not contested, so it is kept",
            local: Some(local_name_edit()),
            remote: update(&version(3_000, 0, "b", 1), &[("a", 1), ("b", 1)], &[("price", "3")]),
            strategy: LocalWins,
            expected: expect(
                &[("name", "Green tea"), ("price", "3")],
                LIVE,
                &[("a", 2), ("b", 1)],
                conflict(FieldMerge, Winner::Both),
            ),
        },
        Case {
            name: "remote adds a field the record never had",
            local: Some(local_name_edit()),
            remote: update(&version(3_000, 0, "b", 1), &[("a", 1), ("b", 1)], &[("notes", "decaf")]),
            strategy: LastWriteWins,
            expected: expect(
                &[("name", "Green tea"), ("notes", "decaf"), ("price", "2.5")],
                LIVE,
                &[("a", 2), ("b", 1)],
                conflict(FieldMerge, Winner::Both),
            ),
        },
        Case {
            name: "same field, remote newer: update conflict won by remote",
            local: Some(local_name_edit()),
            remote: update(&version(3_000, 0, "b", 1), &[("a", 1), ("b", 1)], &[("name", "Black tea")]),
            strategy: LastWriteWins,
            expected: expect(
                &[("name", "Black tea"), ("price", "2.5")],
                LIVE,
                &[("a", 2), ("b", 1)],
                conflict(UpdateConflict, Winner::Remote),
            ),
        },
        Case {
            name: "same field, remote older: update conflict won by local",
            local: Some(local_name_edit()),
            remote: update(&version(1_500, 0, "b", 1), &[("a", 1), ("b", 1)], &[("name", "Black tea")]),
            strategy: LastWriteWins,
            expected: expect(
                &[("name", "Green tea"), ("price", "2.5")],
                LIVE,
                &[("a", 2), ("b", 1)],
                conflict(UpdateConflict, Winner::Local),
            ),
        },
        Case {
            name: "one field contested (lost by remote), one not (taken)",
            local: Some(local_name_edit()),
            remote: update(
                &version(1_500, 0, "b", 1),
                &[("a", 1), ("b", 1)],
                &[("name", "Black tea"), ("price", "3")],
            ),
            strategy: LastWriteWins,
            expected: expect(
                &[("name", "Green tea"), ("price", "3")],
                LIVE,
                &[("a", 2), ("b", 1)],
                conflict(UpdateConflict, Winner::Local),
            ),
        },
        Case {
            name: "two contested fields going different ways: winner both",
            local: Some(record(&[("a", 3)]).set("name", "Green tea", &a2).set("price", "3", &a3).live(&a3)),
            remote: update(
                &version(3_000, 0, "b", 1),
                &[("a", 1), ("b", 1)],
                &[("name", "Black tea"), ("price", "4")],
            ),
            strategy: LastWriteWins,
            expected: expect(
                &[("name", "Black tea"), ("price", "3")],
                LIVE,
                &[("a", 3), ("b", 1)],
                conflict(UpdateConflict, Winner::Both),
            ),
        },
        Case {
            name: "remote saw a2 but not a3: only the a3 field is contested",
            local: Some(record(&[("a", 3)]).set("name", "Green tea", &a2).set("price", "3", &a3).live(&a3)),
            remote: update(
                &version(5_000, 0, "b", 1),
                &[("a", 2), ("b", 1)],
                &[("name", "Black tea"), ("price", "4")],
            ),
            strategy: LocalWins,
            expected: expect(
                &[("name", "Black tea"), ("price", "3")],
                LIVE,
                &[("a", 3), ("b", 1)],
                conflict(UpdateConflict, Winner::Local),
            ),
        },
    ];
    run(&cases);
}

// ---------------------------------------------------------------------------------------------
// Rule 6: deletes are tombstones that win or lose by rule 1
// ---------------------------------------------------------------------------------------------

#[test]
fn rule6_deletes_against_updates() {
    let a2 = version(2_000, 0, "a", 2);
    let local_deleted =
        |at: &Version| record(&[("a", 2)]).set("name", "Tea", &a1()).set("price", "2.5", &a1()).gone(at);
    // The two-terminal case where the delete clashes with an edit that is not the record's
    // newest write: a1 created, b1 (clock ahead, 5000) and a2 (2000) edited concurrently, a
    // merged both, then b deleted (b2) having seen a1 and b1 but not a2.
    let b1 = version(5_000, 0, "b", 1);
    let hidden_edit =
        || record(&[("a", 2), ("b", 1)]).set("name", "Green tea", &a2).set("price", "3", &b1).live(&b1);
    let b2 = version(6_000, 0, "b", 2);
    let cases = [
        Case {
            name: "remote delete newer than a concurrent local update: deleted",
            local: Some(local_price_edit(2_000, 0, "3")),
            remote: delete(&version(3_000, 0, "b", 1), &[("a", 1), ("b", 1)]),
            strategy: LastWriteWins,
            expected: expect(
                &[("name", "Tea"), ("price", "3")],
                DELETED,
                &[("a", 2), ("b", 1)],
                conflict(DeleteConflict, Winner::Remote),
            ),
        },
        Case {
            name: "remote delete older than a concurrent local update: stays live",
            local: Some(local_price_edit(2_000, 0, "3")),
            remote: delete(&version(1_500, 0, "b", 1), &[("a", 1), ("b", 1)]),
            strategy: LastWriteWins,
            expected: expect(
                &[("name", "Tea"), ("price", "3")],
                LIVE,
                &[("a", 2), ("b", 1)],
                conflict(DeleteConflict, Winner::Local),
            ),
        },
        Case {
            name: "remote update newer than a concurrent local delete: comes back with the update",
            local: Some(local_deleted(&a2)),
            remote: update(&version(3_000, 0, "b", 1), &[("a", 1), ("b", 1)], &[("price", "4")]),
            strategy: LastWriteWins,
            expected: expect(
                &[("name", "Tea"), ("price", "4")],
                LIVE,
                &[("a", 2), ("b", 1)],
                conflict(DeleteConflict, Winner::Remote),
            ),
        },
        Case {
            // The field register still takes the value (the other side, which applied the
            // update first, holds it too), but the record stays deleted.
            name: "older concurrent update never resurrects a deleted record",
            local: Some(local_deleted(&a2)),
            remote: update(&version(1_500, 0, "b", 1), &[("a", 1), ("b", 1)], &[("price", "4")]),
            strategy: LastWriteWins,
            expected: expect(
                &[("name", "Tea"), ("price", "4")],
                DELETED,
                &[("a", 2), ("b", 1)],
                conflict(DeleteConflict, Winner::Local),
            ),
        },
        Case {
            // Nor does it overwrite a1's timestamped price: no remote timestamp, local wins.
            name: "update without updatedAt never resurrects a timestamped delete",
            local: Some(local_deleted(&a2)),
            remote: update(&legacy("b", 1), &[("a", 1), ("b", 1)], &[("price", "4")]),
            strategy: LastWriteWins,
            expected: expect(
                &[("name", "Tea"), ("price", "2.5")],
                DELETED,
                &[("a", 2), ("b", 1)],
                conflict(DeleteConflict, Winner::Local),
            ),
        },
        Case {
            name: "a pre-delete copy arriving again is already seen: stays deleted",
            local: Some(
                record(&[("a", 2), ("b", 1)])
                    .set("name", "Tea", &a1())
                    .set("price", "4", &b1)
                    .gone(&version(6_000, 0, "a", 2)),
            ),
            remote: update(&b1, &[("a", 1), ("b", 1)], &[("price", "4")]),
            strategy: RemoteWins,
            expected: expect(
                &[("name", "Tea"), ("price", "4")],
                DELETED,
                &[("a", 2), ("b", 1)],
                Want::AlreadySeen,
            ),
        },
        Case {
            name: "delete of a record the deleter had fully seen: applied",
            local: Some(local_price_edit(2_000, 0, "3")),
            remote: delete(&version(3_000, 0, "b", 1), &[("a", 2), ("b", 1)]),
            strategy: LastWriteWins,
            expected: expect(
                &[("name", "Tea"), ("price", "3")],
                DELETED,
                &[("a", 2), ("b", 1)],
                Want::Applied,
            ),
        },
        Case {
            name: "delete of a seen record under manual: applied, nothing open",
            local: Some(base()),
            remote: delete(&version(3_000, 0, "b", 1), &[("a", 1), ("b", 1)]),
            strategy: Manual,
            expected: expect(
                &[("name", "Tea"), ("price", "2.5")],
                DELETED,
                &[("a", 1), ("b", 1)],
                Want::Applied,
            ),
        },
        Case {
            name: "re-create after seeing the delete: applied",
            local: Some(local_deleted(&a2)),
            remote: update(&version(3_000, 0, "b", 1), &[("a", 2), ("b", 1)], &[("price", "4")]),
            strategy: LocalWins,
            expected: expect(&[("name", "Tea"), ("price", "4")], LIVE, &[("a", 2), ("b", 1)], Want::Applied),
        },
        Case {
            name: "delete clashing with an unseen edit that is not the newest write: lww deletes",
            local: Some(hidden_edit()),
            remote: delete(&b2, &[("a", 1), ("b", 2)]),
            strategy: LastWriteWins,
            expected: expect(
                &[("name", "Green tea"), ("price", "3")],
                DELETED,
                &[("a", 2), ("b", 2)],
                conflict(DeleteConflict, Winner::Remote),
            ),
        },
        Case {
            name: "delete clashing with an unseen edit that is not the newest write: local_wins keeps it",
            local: Some(hidden_edit()),
            remote: delete(&b2, &[("a", 1), ("b", 2)]),
            strategy: LocalWins,
            expected: expect(
                &[("name", "Green tea"), ("price", "3")],
                LIVE,
                &[("a", 2), ("b", 2)],
                conflict(DeleteConflict, Winner::Local),
            ),
        },
        Case {
            name: "delete clashing with an unseen edit that is not the newest write: manual keeps it open",
            local: Some(hidden_edit()),
            remote: delete(&b2, &[("a", 1), ("b", 2)]),
            strategy: Manual,
            expected: expect(
                &[("name", "Green tea"), ("price", "3")],
                LIVE,
                &[("a", 2), ("b", 2)],
                open_conflict(DeleteConflict, Winner::Local),
            ),
        },
        Case {
            name: "two concurrent deletes agree: no conflict, newer tombstone kept",
            local: Some(local_deleted(&a2)),
            remote: delete(&version(3_000, 0, "b", 1), &[("a", 1), ("b", 1)]),
            strategy: Manual,
            expected: expect(
                &[("name", "Tea"), ("price", "2.5")],
                DELETED,
                &[("a", 2), ("b", 1)],
                Want::Applied,
            ),
        },
        Case {
            name: "delete of an unknown record: applied, a tombstone",
            local: None,
            remote: delete(&version(3_000, 0, "b", 1), &[("a", 1), ("b", 1)]),
            strategy: LastWriteWins,
            expected: expect(&[], DELETED, &[("a", 1), ("b", 1)], Want::Applied),
        },
    ];
    run(&cases);

    // The tombstone of a concurrent double delete carries the newer delete's version.
    let double_delete = cases.iter().find(|case| case.name.starts_with("two concurrent deletes")).unwrap();
    let outcome = check(double_delete);
    assert_eq!(outcome.state.existence, Some(version(3_000, 0, "b", 1)));
}

// ---------------------------------------------------------------------------------------------
// Rule 7: strategies
// ---------------------------------------------------------------------------------------------

#[test]
fn rule7_strategies_decide_contested_fields() {
    let newer = || update(&version(3_000, 0, "b", 1), &[("a", 1), ("b", 1)], &[("price", "4")]);
    let older = || update(&version(1_500, 0, "b", 1), &[("a", 1), ("b", 1)], &[("price", "4")]);
    let local = || Some(local_price_edit(2_000, 0, "3"));
    let ctx = [("a", 2), ("b", 1)];
    let kept = [("name", "Tea"), ("price", "3")];
    let taken = [("name", "Tea"), ("price", "4")];
    let cases = [
        Case {
            name: "last_write_wins, remote newer",
            local: local(),
            remote: newer(),
            strategy: LastWriteWins,
            expected: expect(&taken, LIVE, &ctx, conflict(UpdateConflict, Winner::Remote)),
        },
        Case {
            name: "last_write_wins, remote older",
            local: local(),
            remote: older(),
            strategy: LastWriteWins,
            expected: expect(&kept, LIVE, &ctx, conflict(UpdateConflict, Winner::Local)),
        },
        Case {
            name: "local_wins, remote newer",
            local: local(),
            remote: newer(),
            strategy: LocalWins,
            expected: expect(&kept, LIVE, &ctx, conflict(UpdateConflict, Winner::Local)),
        },
        Case {
            name: "local_wins, remote older",
            local: local(),
            remote: older(),
            strategy: LocalWins,
            expected: expect(&kept, LIVE, &ctx, conflict(UpdateConflict, Winner::Local)),
        },
        Case {
            name: "remote_wins, remote newer",
            local: local(),
            remote: newer(),
            strategy: RemoteWins,
            expected: expect(&taken, LIVE, &ctx, conflict(UpdateConflict, Winner::Remote)),
        },
        Case {
            name: "remote_wins, remote older",
            local: local(),
            remote: older(),
            strategy: RemoteWins,
            expected: expect(&taken, LIVE, &ctx, conflict(UpdateConflict, Winner::Remote)),
        },
        Case {
            name: "manual, remote newer: keeps local, open",
            local: local(),
            remote: newer(),
            strategy: Manual,
            expected: expect(&kept, LIVE, &ctx, open_conflict(UpdateConflict, Winner::Local)),
        },
        Case {
            name: "manual, remote older: keeps local, open",
            local: local(),
            remote: older(),
            strategy: Manual,
            expected: expect(&kept, LIVE, &ctx, open_conflict(UpdateConflict, Winner::Local)),
        },
        Case {
            name: "manual, newer remote delete: keeps the local record, open",
            local: local(),
            remote: delete(&version(3_000, 0, "b", 1), &[("a", 1), ("b", 1)]),
            strategy: Manual,
            expected: expect(&kept, LIVE, &ctx, open_conflict(DeleteConflict, Winner::Local)),
        },
        Case {
            name: "remote_wins, older remote delete: deleted",
            local: local(),
            remote: delete(&version(1_500, 0, "b", 1), &[("a", 1), ("b", 1)]),
            strategy: RemoteWins,
            expected: expect(&kept, DELETED, &ctx, conflict(DeleteConflict, Winner::Remote)),
        },
        Case {
            name: "local_wins, newer remote update against a local delete: stays deleted",
            local: Some(record(&[("a", 2)]).set("price", "2.5", &a1()).gone(&version(2_000, 0, "a", 2))),
            remote: update(&version(3_000, 0, "b", 1), &[("a", 1), ("b", 1)], &[("price", "4")]),
            strategy: LocalWins,
            expected: expect(&[("price", "4")], DELETED, &ctx, conflict(DeleteConflict, Winner::Local)),
        },
        Case {
            name: "manual, different fields: nothing contested, both kept, not open",
            local: Some(
                record(&[("a", 2)])
                    .set("name", "Green tea", &version(2_000, 0, "a", 2))
                    .live(&version(2_000, 0, "a", 2)),
            ),
            remote: newer(),
            strategy: Manual,
            expected: expect(
                &[("name", "Green tea"), ("price", "4")],
                LIVE,
                &ctx,
                conflict(FieldMerge, Winner::Both),
            ),
        },
    ];
    run(&cases);
}

#[test]
fn rule7_strategy_setting_text_round_trips() {
    let all = [
        (LastWriteWins, "last_write_wins"),
        (LocalWins, "local_wins"),
        (RemoteWins, "remote_wins"),
        (Manual, "manual"),
    ];
    for (strategy, text) in all {
        assert_eq!(strategy.as_str(), text);
        assert_eq!(strategy.to_string(), text);
        assert_eq!(text.parse::<Strategy>(), Ok(strategy), "{text}");
        assert_eq!(serde_json::to_value(strategy).unwrap(), json!(text));
        assert_eq!(serde_json::from_value::<Strategy>(json!(text)).unwrap(), strategy);
    }
    assert_eq!(Strategy::default(), LastWriteWins);
    for bad in ["", "LastWriteWins", "last-write-wins", "Manual", " manual", "lww"] {
        let error = bad.parse::<Strategy>().unwrap_err();
        assert!(error.contains("last_write_wins"), "{bad:?}: {error}");
    }
    assert_eq!(UpdateConflict.as_str(), "update_conflict");
    assert_eq!(FieldMerge.as_str(), "field_merge");
    assert_eq!(DeleteConflict.as_str(), "delete_conflict");
}

// ---------------------------------------------------------------------------------------------
// New records
// ---------------------------------------------------------------------------------------------

#[test]
fn remote_write_to_an_unknown_record_creates_it() {
    let b1 = version(3_000, 0, "b", 1);
    let cases: Vec<Case> = [LastWriteWins, LocalWins, RemoteWins, Manual]
        .into_iter()
        .map(|strategy| Case {
            name: strategy.as_str(),
            local: None,
            remote: update(&b1, &[("b", 1)], &[("name", "Tea"), ("price", "2.5")]),
            strategy,
            expected: expect(&[("name", "Tea"), ("price", "2.5")], LIVE, &[("b", 1)], Want::Applied),
        })
        .collect();
    run(&cases);
    let outcome = check(&cases[0]);
    assert!(outcome.changed);
    assert_eq!(outcome.state.existence, Some(b1.clone()));
    assert!(outcome.state.versions.values().all(|version| *version == b1));
    assert_eq!(outcome.state.updated_at(), Some(rfc3339_ms(3_000)));

    // A write from a legacy terminal without updatedAt still creates the record.
    let legacy_case = Case {
        name: "legacy create",
        local: None,
        remote: update(&legacy("b", 1), &[("b", 1)], &[("name", "Tea")]),
        strategy: LastWriteWins,
        expected: expect(&[("name", "Tea")], LIVE, &[("b", 1)], Want::Applied),
    };
    assert_eq!(check(&legacy_case).state.updated_at(), None);
}

// ---------------------------------------------------------------------------------------------
// Conflict reports
// ---------------------------------------------------------------------------------------------

fn report_of(outcome: &MergeOutcome) -> &possync_core::ConflictReport {
    match &outcome.verdict {
        Verdict::Conflict(report) => report,
        other => panic!("expected a conflict, got {other:?}"),
    }
}

#[test]
fn conflict_reports_carry_snapshots_timestamps_and_notes() {
    let t_local = 1_763_892_300_123; // 2025-11-23T10:05:00.123Z
    let t_remote = t_local + 2_000; // 2025-11-23T10:05:02.123Z
    assert_eq!(rfc3339_ms(t_local), "2025-11-23T10:05:00.123Z");

    // Update conflict, remote wins.
    let case = Case {
        name: "report: update conflict",
        local: Some(local_price_edit(t_local, 0, "3")),
        remote: update(&version(t_remote, 4, "b", 1), &[("a", 1), ("b", 1)], &[("price", "4")]),
        strategy: LastWriteWins,
        expected: expect(
            &[("name", "Tea"), ("price", "4")],
            LIVE,
            &[("a", 2), ("b", 1)],
            conflict(UpdateConflict, Winner::Remote),
        ),
    };
    let outcome = check(&case);
    let report = report_of(&outcome);
    assert_eq!(
        report.local_data,
        json!({"id": "p1", "name": "Tea", "price": "3", "updatedAt": "2025-11-23T10:05:00.123Z"})
    );
    // The record as the remote edit makes it (a full record, comparable field by field).
    assert_eq!(
        report.remote_data,
        json!({"id": "p1", "name": "Tea", "price": "4", "updatedAt": "2025-11-23T10:05:02.123Z"})
    );
    assert_eq!(
        report.final_data,
        json!({"id": "p1", "name": "Tea", "price": "4", "updatedAt": "2025-11-23T10:05:02.123Z"})
    );
    assert_eq!(report.local_updated_at.as_deref(), Some("2025-11-23T10:05:00.123Z"));
    assert_eq!(report.remote_updated_at.as_deref(), Some("2025-11-23T10:05:02.123Z"));
    assert!(!report.open);
    for needle in
        ["price", "2025-11-23T10:05:00.123Z", "2025-11-23T10:05:02.123Z", "last_write_wins", "remote"]
    {
        assert!(report.notes.contains(needle), "notes lack {needle:?}: {}", report.notes);
    }

    // Delete conflict under manual: local kept, open; the snapshots show the delete.
    let case = Case {
        name: "report: manual delete conflict",
        local: Some(local_price_edit(t_local, 0, "3")),
        remote: delete(&version(t_remote, 0, "b", 1), &[("a", 1), ("b", 1)]),
        strategy: Manual,
        expected: expect(
            &[("name", "Tea"), ("price", "3")],
            LIVE,
            &[("a", 2), ("b", 1)],
            open_conflict(DeleteConflict, Winner::Local),
        ),
    };
    let outcome = check(&case);
    let report = report_of(&outcome);
    assert_eq!(
        report.remote_data,
        json!({"id": "p1", "deleted": true, "updatedAt": "2025-11-23T10:05:02.123Z"})
    );
    assert_eq!(report.final_data, report.local_data, "manual keeps the local record as it was");
    assert_eq!(report.final_data.get("deleted"), None);
    assert!(report.notes.contains("delete"), "{}", report.notes);
    assert!(report.notes.contains("manual"), "{}", report.notes);

    // Delete wins: final snapshot is a tombstone.
    let case = Case {
        name: "report: delete wins",
        local: Some(local_price_edit(t_local, 0, "3")),
        remote: delete(&version(t_remote, 0, "b", 1), &[("a", 1), ("b", 1)]),
        strategy: LastWriteWins,
        expected: expect(
            &[("name", "Tea"), ("price", "3")],
            DELETED,
            &[("a", 2), ("b", 1)],
            conflict(DeleteConflict, Winner::Remote),
        ),
    };
    let outcome = check(&case);
    let report = report_of(&outcome);
    assert_eq!(
        report.final_data,
        json!({"id": "p1", "name": "Tea", "price": "3", "deleted": true, "updatedAt": "2025-11-23T10:05:02.123Z"})
    );

    // No timestamps at all: updatedAt is null / None, notes say so.
    let case = Case {
        name: "report: legacy",
        local: Some(
            record(&[("a", 2)])
                .set("name", "Tea", &legacy("a", 1))
                .set("price", "3", &legacy("a", 2))
                .live(&legacy("a", 2)),
        ),
        remote: update(&legacy("b", 1), &[("a", 1), ("b", 1)], &[("price", "4")]),
        strategy: LastWriteWins,
        expected: expect(
            &[("name", "Tea"), ("price", "4")],
            LIVE,
            &[("a", 2), ("b", 1)],
            conflict(UpdateConflict, Winner::Remote),
        ),
    };
    let outcome = check(&case);
    let report = report_of(&outcome);
    assert_eq!(report.local_updated_at, None);
    assert_eq!(report.remote_updated_at, None);
    assert_eq!(report.local_data["updatedAt"], Value::Null);
    assert_eq!(report.remote_data["updatedAt"], Value::Null);
    assert!(report.notes.contains("no timestamp"), "{}", report.notes);

    // Field merge: the notes say both were kept.
    let case = Case {
        name: "report: field merge",
        local: Some(
            record(&[("a", 2)])
                .set("name", "Green tea", &version(t_local, 0, "a", 2))
                .set("price", "2.5", &a1())
                .live(&version(t_local, 0, "a", 2)),
        ),
        remote: update(&version(t_remote, 0, "b", 1), &[("a", 1), ("b", 1)], &[("price", "4")]),
        strategy: LastWriteWins,
        expected: expect(
            &[("name", "Green tea"), ("price", "4")],
            LIVE,
            &[("a", 2), ("b", 1)],
            conflict(FieldMerge, Winner::Both),
        ),
    };
    let outcome = check(&case);
    let report = report_of(&outcome);
    assert!(report.notes.contains("both kept"), "{}", report.notes);
    assert_eq!(report.final_data["name"], json!("Green tea"));
    assert_eq!(report.final_data["price"], json!("4"));
}

// ---------------------------------------------------------------------------------------------
// Convergence: the same state whichever side receives first
// ---------------------------------------------------------------------------------------------

fn apply(local: Option<&RecordState>, remote: &Remote, strategy: Strategy) -> MergeOutcome {
    let id = record_id();
    merge_record(local, remote.write(&id), strategy)
}

/// Two terminals start from `base`; one makes write `wa`, the other `wb`, concurrently. Each
/// then receives the other's write. With last_write_wins both must end in the same state.
///
/// When the clocks are well formed (each write sorts after everything in `base`, as the HLC
/// guarantees for any write made after seeing `base`), both must also log the clash (or not)
/// the same way, with mirrored winners. A write without `updatedAt` made after a timestamped
/// one sorts before it and loses even on its own terminal, so there the logs may differ.
fn assert_converges(label: &str, base: Option<&RecordState>, wa: &Remote, wb: &Remote) -> bool {
    let on_a = apply(base, wa, LastWriteWins);
    let on_b = apply(base, wb, LastWriteWins);
    assert_eq!(on_a.verdict, Verdict::Applied, "{label}: own write on a");
    assert_eq!(on_b.verdict, Verdict::Applied, "{label}: own write on b");
    let a_then_b = apply(Some(&on_a.state), wb, LastWriteWins);
    let b_then_a = apply(Some(&on_b.state), wa, LastWriteWins);
    assert_eq!(a_then_b.state, b_then_a.state, "{label}: terminals disagree");
    assert_eq!(a_then_b.state.values, b_then_a.state.values, "{label}: values");
    assert_eq!(a_then_b.state.deleted, b_then_a.state.deleted, "{label}: deleted");

    let base_newest = base.and_then(RecordState::newest);
    let well_formed = [wa, wb].iter().all(|write| Some(&write.version) > base_newest);
    let mirror = |want: Want| match want {
        Want::Conflict(kind, Winner::Local, open) => Want::Conflict(kind, Winner::Remote, open),
        Want::Conflict(kind, Winner::Remote, open) => Want::Conflict(kind, Winner::Local, open),
        other => other,
    };
    let on_a_side = want_of(&a_then_b.verdict);
    let on_b_side = want_of(&b_then_a.verdict);
    if well_formed {
        assert_eq!(on_a_side, mirror(on_b_side), "{label}: sides classify differently");
    }
    // Merging the same write again changes nothing.
    let again = apply(Some(&a_then_b.state), wb, LastWriteWins);
    assert_eq!(again.verdict, Verdict::AlreadySeen, "{label}: redelivery");
    well_formed
}

#[test]
fn convergence_for_the_rule1_version_pairs() {
    // (a's version, b's version) of a concurrent edit of the same field, on top of a1.
    let pairs = [
        ("newer b", version(2_000, 0, "a", 2), version(3_000, 0, "b", 1)),
        ("newer a", version(3_000, 0, "a", 2), version(2_000, 0, "b", 1)),
        ("a without timestamp", legacy("a", 2), version(2_000, 0, "b", 1)),
        ("b without timestamp", version(2_000, 0, "a", 2), legacy("b", 1)),
        ("both without timestamp", legacy("a", 2), legacy("b", 1)),
        ("same ms, counter", version(2_000, 7, "a", 2), version(2_000, 3, "b", 1)),
        ("identical hlc", version(2_000, 0, "a", 2), version(2_000, 0, "b", 1)),
    ];
    for (label, va, vb) in pairs {
        // Legacy writes come from legacy data: then the record was made without a timestamp too.
        let base = if va.hlc.is_none() || vb.hlc.is_none() {
            record(&[("a", 1)])
                .set("name", "Tea", &legacy("a", 1))
                .set("price", "2.5", &legacy("a", 1))
                .live(&legacy("a", 1))
        } else {
            base()
        };
        let edits: [(&str, Remote, Remote); 5] = [
            (
                "same field",
                update(&va, &[("a", 2)], &[("price", "3")]),
                update(&vb, &[("a", 1), ("b", 1)], &[("price", "4")]),
            ),
            (
                "different fields",
                update(&va, &[("a", 2)], &[("name", "Green tea")]),
                update(&vb, &[("a", 1), ("b", 1)], &[("price", "4")]),
            ),
            ("a deletes", delete(&va, &[("a", 2)]), update(&vb, &[("a", 1), ("b", 1)], &[("price", "4")])),
            ("b deletes", update(&va, &[("a", 2)], &[("price", "3")]), delete(&vb, &[("a", 1), ("b", 1)])),
            ("both delete", delete(&va, &[("a", 2)]), delete(&vb, &[("a", 1), ("b", 1)])),
        ];
        for (edit, wa, wb) in &edits {
            assert!(assert_converges(&format!("{label}, {edit}"), Some(&base), wa, wb), "{label}");
        }
        // Two terminals creating the same id without knowing of each other.
        let wa = update(&va, &[("a", 2)], &[("name", "Tea"), ("price", "3")]);
        let wb = update(&vb, &[("b", 1)], &[("name", "Tea"), ("price", "4")]);
        assert!(assert_converges(&format!("{label}, both create"), None, &wa, &wb), "{label}");
    }
}

/// xorshift64*: a tiny deterministic PRNG, enough to generate cases.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn chance(&mut self, one_in: u64) -> bool {
        self.below(one_in) == 0
    }
}

const FIELD_NAMES: [&str; 3] = ["name", "price", "notes"];

/// A random edit (non-empty subset of the fields) or, one time in `delete_one_in`, a delete.
fn random_fields(rng: &mut Rng, tag: &str, delete_one_in: u64) -> Option<FieldMap> {
    if rng.chance(delete_one_in) {
        return None;
    }
    let mask = 1 + rng.below(7);
    let mut map = FieldMap::new();
    for (bit, name) in FIELD_NAMES.iter().enumerate() {
        if mask & (1 << bit) != 0 {
            map.insert(*name, json!(format!("{name}@{tag}")));
        }
    }
    Some(map)
}

/// A clock time from a small set, so that ties on ms, counter and missing clocks are common.
fn random_hlc(rng: &mut Rng) -> Option<Hlc> {
    match rng.below(6) {
        0 => None,
        n => Some(Hlc::new(1_000 * (1 + rng.below(3)), (n % 3) as u16).unwrap()),
    }
}

#[test]
fn convergence_for_generated_version_pairs() {
    let origins = ["a", "b", "c"];
    let mut rng = Rng::new(7);
    let mut well_formed = 0;
    for round in 0..3_000 {
        // The base: none, or a1 (live or, rarely, deleted).
        let base = match rng.below(5) {
            0 => None,
            _ => {
                let a1 = Version { hlc: random_hlc(&mut rng), origin: pos("a"), seq: Seq(1) };
                let mut state =
                    record(&[("a", 1)]).set("name", "Tea", &a1).set("price", "2.5", &a1).live(&a1);
                if rng.chance(6) {
                    state = state.gone(&a1);
                }
                Some(state)
            }
        };
        let x = rng.below(3) as usize;
        let y = (x + 1 + rng.below(2) as usize) % 3;
        let write = |rng: &mut Rng, origin: &str| {
            let ctx0 = base.as_ref().map(|state| state.ctx.clone()).unwrap_or_default();
            let seq = Seq(ctx0.get(&pos(origin)).0 + 1);
            let mut ctx = ctx0;
            ctx.observe(&pos(origin), seq);
            let version = Version { hlc: random_hlc(rng), origin: pos(origin), seq };
            let tag = format!("{origin}{}", seq.0);
            Remote { version, ctx, fields: random_fields(rng, &tag, 4) }
        };
        let wa = write(&mut rng, origins[x]);
        let wb = write(&mut rng, origins[y]);
        if assert_converges(&format!("round {round}: {wa:?} / {wb:?}"), base.as_ref(), &wa, &wb) {
            well_formed += 1;
        }
    }
    assert!(well_formed > 1_000, "only {well_formed} rounds checked the conflict classification");
}

/// A write as it sits in its origin's change log.
#[derive(Debug, Clone)]
struct Logged {
    remote: Remote,
}

struct Terminal {
    id: PosId,
    clock: HybridClock,
    wall: u64,
    seq: u64,
    state: Option<RecordState>,
}

impl Terminal {
    fn ctx(&self) -> VersionVector {
        self.state.as_ref().map(|state| state.ctx.clone()).unwrap_or_default()
    }

    fn has(&self, write: &Remote) -> bool {
        self.ctx().get(&write.version.origin) >= write.version.seq
    }

    /// Causal delivery: the origin's previous write and everything the writer had seen are here.
    fn can_take(&self, write: &Remote) -> bool {
        let ctx = self.ctx();
        ctx.get(&write.version.origin).next() == write.version.seq
            && write.ctx.iter().all(|(origin, seq)| *origin == write.version.origin || ctx.get(origin) >= seq)
    }
}

/// Merges `write` into `terminal` and checks what every merge must do under last_write_wins.
fn receive(terminal: &mut Terminal, write: &Remote, label: &str) {
    let before = terminal.state.clone();
    let outcome = apply(before.as_ref(), write, LastWriteWins);
    let state = &outcome.state;
    // The verdict agrees with causality.
    match (&before, &outcome.verdict) {
        (None, verdict) => assert_eq!(*verdict, Verdict::Applied, "{label}"),
        (Some(local), Verdict::AlreadySeen) => {
            assert!(local.ctx.dominates(&write.ctx), "{label}: AlreadySeen for an unseen write");
            assert_eq!(state, local, "{label}");
        }
        (Some(local), Verdict::Applied) => {
            assert!(!local.ctx.dominates(&write.ctx), "{label}: applied a seen write");
        }
        (Some(local), Verdict::Conflict(report)) => {
            assert_eq!(
                local.ctx.compare(&write.ctx),
                Causality::Concurrent,
                "{label}: conflict without concurrency"
            );
            assert!(!report.open, "{label}: open conflict under last_write_wins");
        }
    }
    if let Some(local) = &before {
        if local.ctx.dominates(&write.ctx) {
            assert_eq!(outcome.verdict, Verdict::AlreadySeen, "{label}: seen write not skipped");
        }
        if write.ctx.compare(&local.ctx) == Causality::After {
            assert_eq!(outcome.verdict, Verdict::Applied, "{label}: sequential write logged as a conflict");
        }
        // Every register ends at the newest version written to it.
        if outcome.verdict != Verdict::AlreadySeen {
            fn newest<'v>(old: Option<&'v Version>, new: &'v Version) -> &'v Version {
                old.filter(|old| *old > new).unwrap_or(new)
            }
            assert_eq!(
                state.existence.as_ref(),
                Some(newest(local.existence.as_ref(), &write.version)),
                "{label}: existence"
            );
            for name in write.fields.iter().flat_map(|fields| fields.keys()) {
                assert_eq!(
                    state.versions.get(name),
                    Some(newest(local.versions.get(name), &write.version)),
                    "{label}: {name}"
                );
            }
            // Rule 6: a deleted record only comes back through a newer write.
            if local.deleted && !state.deleted {
                assert!(
                    write.fields.is_some() && Some(&write.version) > local.existence.as_ref(),
                    "{label}: resurrected by an older copy"
                );
            }
        }
    }
    if let Some(hlc) = write.version.hlc {
        terminal.clock.observe(hlc, terminal.wall);
    }
    terminal.state = Some(outcome.state);
}

/// Random histories over three terminals: local writes (with skewed clocks, some without
/// timestamps) interleaved with causal deliveries in random order, then everything delivered
/// everywhere. All terminals must end identical.
#[test]
fn convergence_for_generated_histories_in_random_delivery_orders() {
    for seed in 0..1_500 {
        let mut rng = Rng::new(seed + 1_000);
        let mut terminals: Vec<Terminal> = ["a", "b", "c"]
            .iter()
            .map(|id| Terminal {
                id: pos(id),
                clock: HybridClock::new(Hlc::default()),
                wall: 1_000 + rng.below(50),
                seq: 0,
                state: None,
            })
            .collect();
        let mut log: Vec<Logged> = Vec::new();
        let steps = 4 + rng.below(24);
        for step in 0..steps {
            let t = rng.below(3) as usize;
            let label = format!("seed {seed} step {step}");
            let terminal = &mut terminals[t];
            let deliverable: Vec<usize> = (0..log.len())
                .filter(|&i| !terminal.has(&log[i].remote) && terminal.can_take(&log[i].remote))
                .collect();
            if deliverable.is_empty() || rng.chance(3) {
                // A local write.
                terminal.wall += rng.below(30);
                let hlc = if rng.chance(10) { None } else { Some(terminal.clock.tick(terminal.wall)) };
                terminal.seq += 1;
                let seq = Seq(terminal.seq);
                let mut ctx = terminal.ctx();
                ctx.observe(&terminal.id, seq);
                let version = Version { hlc, origin: terminal.id.clone(), seq };
                let tag = format!("{}{}", terminal.id, seq);
                let delete_one_in = if terminal.state.is_none() { 8 } else { 4 };
                let remote = Remote { version, ctx, fields: random_fields(&mut rng, &tag, delete_one_in) };
                receive(terminal, &remote, &format!("{label}: local write"));
                log.push(Logged { remote });
            } else {
                let pick = deliverable[rng.below(deliverable.len() as u64) as usize];
                let write = log[pick].remote.clone();
                receive(terminal, &write, &format!("{label}: deliver {:?}", write.version));
                if rng.chance(4) {
                    // A duplicate delivery.
                    receive(terminal, &write, &format!("{label}: redeliver"));
                }
            }
        }
        // Catch-up: deliver everything everywhere, in random causal order.
        loop {
            let mut pending: Vec<(usize, usize)> = Vec::new();
            for (t, terminal) in terminals.iter().enumerate() {
                for (i, logged) in log.iter().enumerate() {
                    if !terminal.has(&logged.remote) && terminal.can_take(&logged.remote) {
                        pending.push((t, i));
                    }
                }
            }
            if pending.is_empty() {
                break;
            }
            let (t, i) = pending[rng.below(pending.len() as u64) as usize];
            let write = log[i].remote.clone();
            receive(&mut terminals[t], &write, &format!("seed {seed} catch-up"));
        }
        let first = terminals[0].state.clone();
        for terminal in &terminals {
            for logged in &log {
                assert!(
                    terminal.has(&logged.remote),
                    "seed {seed}: {} never got {:?}",
                    terminal.id,
                    logged.remote
                );
            }
            assert_eq!(terminal.state, first, "seed {seed}: {} differs from a", terminal.id);
        }
    }
}

/// Three concurrent writes on top of a1, delivered in all six orders: one final state.
#[test]
fn convergence_for_all_orders_of_three_concurrent_writes() {
    let mut rng = Rng::new(99);
    let orders = [[0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]];
    for round in 0..500 {
        let writes: Vec<Remote> = ["b", "c", "d"]
            .iter()
            .map(|origin| {
                let version = Version { hlc: random_hlc(&mut rng), origin: pos(origin), seq: Seq(1) };
                Remote {
                    version,
                    ctx: vv(&[("a", 1), (origin, 1)]),
                    fields: random_fields(&mut rng, origin, 4),
                }
            })
            .collect();
        let mut finals: BTreeMap<String, RecordState> = BTreeMap::new();
        for order in orders {
            let mut state = base();
            for &i in &order {
                state = apply(Some(&state), &writes[i], LastWriteWins).state;
            }
            finals.insert(format!("{order:?}"), state);
        }
        let first = finals.values().next().unwrap();
        for (order, state) in &finals {
            assert_eq!(state, first, "round {round}, order {order}: {writes:?}");
        }
        assert_eq!(first.ctx, vv(&[("a", 1), ("b", 1), ("c", 1), ("d", 1)]));
    }
}
