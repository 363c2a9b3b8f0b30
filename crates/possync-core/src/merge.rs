//! The merge rules (SPEC section 2) as a pure function over a record's state and a remote
//! write. No SQL, no clock: the store loads the state, calls [`merge_record`], writes the
//! outcome and the audit rows the outcome describes.
//!
//! Each field of a record is a last-write-wins register stamped with the [`Version`] of the
//! write that set it; the record's existence (live or deleted) is one more such register. The
//! order of versions is total and the same on every terminal: clock time (`updatedAt`, a
//! missing one sorting first, so "no local timestamp, remote wins" and "no remote timestamp,
//! local wins"), then the HLC counter, then the origin posId. So with `last_write_wins` the
//! result does not depend on the order changes arrive in, and every terminal ends identical.
//!
//! Whether an edit is a *conflict* is a separate question answered by causality, not clocks: a
//! local field version is in conflict with a remote write when the remote writer had not seen
//! it (its context lacks that version's origin seq). Only such concurrent edits produce a
//! conflict row; an edit made after seeing the previous one never does.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::entity::FieldMap;
use crate::hlc::Hlc;
use crate::ids::{EntityId, PosId, Seq};
use crate::time::rfc3339_ms;
use crate::vv::{Causality, VersionVector};

/// The stamp of the write that set a field (or a record's existence).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Version {
    /// Clock time of the write; `None` for legacy data without `updatedAt`.
    pub hlc: Option<Hlc>,
    /// The terminal that wrote it.
    pub origin: PosId,
    /// The write's position in the origin's change log.
    pub seq: Seq,
}

impl Ord for Version {
    fn cmp(&self, other: &Version) -> Ordering {
        self.hlc
            .cmp(&other.hlc)
            .then_with(|| self.origin.cmp(&other.origin))
            .then_with(|| self.seq.cmp(&other.seq))
    }
}

impl PartialOrd for Version {
    fn partial_cmp(&self, other: &Version) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// What a strategy setting says to do with concurrent edits of the same field (SPEC rule 7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// The newer version wins (the only strategy that guarantees identical terminals).
    #[default]
    LastWriteWins,
    /// The receiving terminal keeps its version.
    LocalWins,
    /// The receiving terminal takes the incoming version.
    RemoteWins,
    /// Keep the local version and leave the conflict open for a person.
    Manual,
}

impl Strategy {
    /// The setting's text value.
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::LastWriteWins => "last_write_wins",
            Strategy::LocalWins => "local_wins",
            Strategy::RemoteWins => "remote_wins",
            Strategy::Manual => "manual",
        }
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Strategy {
    type Err = String;

    fn from_str(raw: &str) -> Result<Strategy, String> {
        [Strategy::LastWriteWins, Strategy::LocalWins, Strategy::RemoteWins, Strategy::Manual]
            .into_iter()
            .find(|strategy| strategy.as_str() == raw)
            .ok_or_else(|| {
                format!(
                    "unknown strategy {raw:?}: expected last_write_wins, local_wins, remote_wins or manual"
                )
            })
    }
}

/// A mutable record as the merge sees it: values, their versions, existence, causal context.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RecordState {
    /// Field values (canonical JSON).
    pub values: FieldMap,
    /// The version that set each field.
    pub versions: BTreeMap<&'static str, Version>,
    /// True when the record is deleted (a tombstone).
    pub deleted: bool,
    /// The version of the write that last set `deleted` (every create, update and delete does).
    pub existence: Option<Version>,
    /// Which writes this state incorporates.
    pub ctx: VersionVector,
}

impl RecordState {
    /// The newest version among the record's writes.
    pub fn newest(&self) -> Option<&Version> {
        self.versions.values().chain(self.existence.iter()).max()
    }

    /// `updatedAt` of the record: the clock time of its newest write.
    pub fn updated_at(&self) -> Option<String> {
        self.newest().and_then(|version| version.hlc).map(|hlc| rfc3339_ms(hlc.ms()))
    }

    /// The record as a JSON object (for snapshots and the API): id, fields, updatedAt.
    pub fn to_json(&self, id: &EntityId) -> Value {
        let mut object = Map::new();
        object.insert("id".into(), Value::String(id.to_string()));
        for (name, value) in &self.values {
            object.insert((*name).to_string(), value.clone());
        }
        object.insert("updatedAt".into(), self.updated_at().map_or(Value::Null, Value::String));
        if self.deleted {
            object.insert("deleted".into(), Value::Bool(true));
        }
        Value::Object(object)
    }
}

/// A remote write to a mutable record, as handed to [`merge_record`].
#[derive(Debug, Clone, Copy)]
pub struct RemoteWrite<'a> {
    /// The record id.
    pub id: &'a EntityId,
    /// The write's version.
    pub version: &'a Version,
    /// The record's context on the writer after the write.
    pub ctx: &'a VersionVector,
    /// The fields written, or `None` for a delete.
    pub fields: Option<&'a FieldMap>,
}

/// The kinds of conflict (the `conflict_type` column).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConflictType {
    /// The same field edited on both sides.
    UpdateConflict,
    /// Different fields edited on both sides: both kept.
    FieldMerge,
    /// A delete against a concurrent update.
    DeleteConflict,
}

impl ConflictType {
    /// The column value.
    pub fn as_str(self) -> &'static str {
        match self {
            ConflictType::UpdateConflict => "update_conflict",
            ConflictType::FieldMerge => "field_merge",
            ConflictType::DeleteConflict => "delete_conflict",
        }
    }
}

/// Which side a conflict's outcome favours.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Winner {
    /// Every contested value kept the local version.
    Local,
    /// Every contested value took the remote version.
    Remote,
    /// Contested values went both ways, or nothing was contested (field merge).
    Both,
}

/// Everything a `p2p_conflicts` row says, except who the peer was.
#[derive(Debug, Clone, PartialEq)]
pub struct ConflictReport {
    /// What kind of clash.
    pub conflict_type: ConflictType,
    /// The strategy that decided it.
    pub strategy: Strategy,
    /// Which side won.
    pub winner: Winner,
    /// The local record before the merge.
    pub local_data: Value,
    /// The remote write.
    pub remote_data: Value,
    /// `updatedAt` of the local record.
    pub local_updated_at: Option<String>,
    /// `updatedAt` of the remote write.
    pub remote_updated_at: Option<String>,
    /// The record after the merge.
    pub final_data: Value,
    /// True when a person must still resolve it (`manual`).
    pub open: bool,
    /// The fields whose values clashed (empty for a pure delete conflict or a field merge).
    /// An open conflict is superseded only by a later write that sets all of them: until
    /// then the till keeps a value the others may not hold.
    pub contested: Vec<&'static str>,
    /// A readable explanation.
    pub notes: String,
}

/// What merging one remote write did.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Applied: a new record, or a write that clashes with nothing the local record holds (an
    /// edit made after the local version, or a delete of a record already deleted): no conflict.
    Applied,
    /// Nothing to do: the local state already incorporates this write.
    AlreadySeen,
    /// A concurrent edit, resolved as the report says.
    Conflict(Box<ConflictReport>),
}

/// The outcome of [`merge_record`].
#[derive(Debug, Clone, PartialEq)]
pub struct MergeOutcome {
    /// The record's new state.
    pub state: RecordState,
    /// True when `state` differs from the local state (the store must write it).
    pub changed: bool,
    /// How to log it.
    pub verdict: Verdict,
}

/// Merges one remote write into the local state of its record (SPEC rules 1, 2, 3, 6, 7).
pub fn merge_record(
    local: Option<&RecordState>,
    remote: RemoteWrite<'_>,
    strategy: Strategy,
) -> MergeOutcome {
    let empty = RecordState::default();
    let before = local.unwrap_or(&empty);
    if local.is_some() && matches!(before.ctx.compare(remote.ctx), Causality::After | Causality::Equal) {
        return MergeOutcome { state: before.clone(), changed: false, verdict: Verdict::AlreadySeen };
    }
    let unseen_by_remote = |version: &Version| remote.ctx.get(&version.origin) < version.seq;

    let mut state = before.clone();
    let mut contested: Vec<&'static str> = Vec::new();
    let mut existence_contested = false;
    let mut remote_took = 0usize;
    let mut local_kept = 0usize;
    // Decides one register, a field (`Some(name)`) or the record's existence (`None`):
    // `concurrent` says whether the local value clashes with the remote write (then the
    // strategy decides); otherwise the newer version wins. Contested fields are listed for
    // the conflict's notes; a contested existence makes it a delete conflict.
    let mut decide =
        |field: Option<&'static str>, local_version: Option<&Version>, concurrent: bool| -> bool {
            let Some(local_version) = local_version else { return true };
            let remote_newer = remote.version > local_version;
            if !concurrent {
                return remote_newer;
            }
            match field {
                Some(name) => contested.push(name),
                None => existence_contested = true,
            }
            let take = match strategy {
                Strategy::LastWriteWins => remote_newer,
                Strategy::RemoteWins => true,
                Strategy::LocalWins | Strategy::Manual => false,
            };
            if take {
                remote_took += 1;
            } else {
                local_kept += 1;
            }
            take
        };

    // Existence: every write sets it; a delete sets it to "deleted". A delete clashes with a
    // live record holding any write the deleter had not seen (not only the newest one, which
    // is the existence version); an update clashes with a tombstone the writer had not seen.
    let remote_deletes = remote.fields.is_none();
    let delete_clash = if remote_deletes {
        !before.deleted && before.versions.values().chain(before.existence.iter()).any(unseen_by_remote)
    } else {
        before.deleted && before.existence.as_ref().is_some_and(unseen_by_remote)
    };
    let take_existence = if delete_clash {
        decide(None, before.existence.as_ref(), true)
    } else {
        before.existence.as_ref().is_none_or(|version| remote.version > version)
    };
    if take_existence {
        state.deleted = remote_deletes;
        state.existence = Some(remote.version.clone());
    }

    if let Some(fields) = remote.fields {
        for (name, value) in fields {
            let local_version = before.versions.get(name);
            if decide(Some(name), local_version, local_version.is_some_and(unseen_by_remote)) {
                state.values.insert(name, value.clone());
                state.versions.insert(name, remote.version.clone());
            }
        }
    }
    state.ctx.merge(remote.ctx);

    // Concurrent contexts alone do not make a conflict: there must be a clash, i.e. a
    // contested register, or (field merge) the remote edits fields while the local record
    // holds a field edit the remote had not seen. Two concurrent deletes agree: no conflict.
    let field_merge = remote.fields.is_some() && before.versions.values().any(unseen_by_remote);
    let clash = delete_clash || !contested.is_empty() || field_merge;
    let concurrent = local.is_some() && before.ctx.compare(remote.ctx) == Causality::Concurrent;
    let changed = state != *before;
    if !concurrent || !clash {
        return MergeOutcome { state, changed, verdict: Verdict::Applied };
    }

    let conflict_type = if delete_clash {
        ConflictType::DeleteConflict
    } else if contested.is_empty() {
        ConflictType::FieldMerge
    } else {
        ConflictType::UpdateConflict
    };
    let winner = match (remote_took, local_kept) {
        (0, 0) => Winner::Both,
        (_, 0) => Winner::Remote,
        (0, _) => Winner::Local,
        _ => Winner::Both,
    };
    let remote_data = remote_json(before, remote);
    let notes = conflict_notes(conflict_type, strategy, winner, &contested, before, remote);
    let report = ConflictReport {
        conflict_type,
        strategy,
        winner,
        local_data: before.to_json(remote.id),
        remote_data,
        local_updated_at: before.updated_at(),
        remote_updated_at: remote.version.hlc.map(|hlc| rfc3339_ms(hlc.ms())),
        final_data: state.to_json(remote.id),
        open: strategy == Strategy::Manual && (existence_contested || !contested.is_empty()),
        notes,
        contested,
    };
    MergeOutcome { state, changed, verdict: Verdict::Conflict(Box::new(report)) }
}

/// The record as the remote edit makes it: the local record with the remote write's fields
/// (a full record, so that the two snapshots of a conflict can be compared field by field),
/// or a tombstone for a delete.
fn remote_json(before: &RecordState, remote: RemoteWrite<'_>) -> Value {
    let mut object = Map::new();
    object.insert("id".into(), Value::String(remote.id.to_string()));
    match remote.fields {
        Some(fields) => {
            for (name, value) in &before.values {
                object.insert((*name).to_string(), value.clone());
            }
            for (name, value) in fields {
                object.insert((*name).to_string(), value.clone());
            }
        }
        None => {
            object.insert("deleted".into(), Value::Bool(true));
        }
    }
    let updated_at = remote.version.hlc.map(|hlc| rfc3339_ms(hlc.ms()));
    object.insert("updatedAt".into(), updated_at.map_or(Value::Null, Value::String));
    Value::Object(object)
}

fn conflict_notes(
    conflict_type: ConflictType,
    strategy: Strategy,
    winner: Winner,
    contested: &[&str],
    local: &RecordState,
    remote: RemoteWrite<'_>,
) -> String {
    let local_at = local.updated_at().unwrap_or_else(|| "no timestamp".into());
    let remote_at = remote.version.hlc.map_or_else(|| "no timestamp".into(), |hlc| rfc3339_ms(hlc.ms()));
    let who = &remote.version.origin;
    let what = match conflict_type {
        ConflictType::FieldMerge => {
            return format!(
                "Concurrent edits of different fields (local {local_at}, {who} {remote_at}); both kept."
            );
        }
        ConflictType::DeleteConflict if remote.fields.is_none() => {
            "remote delete against a local edit".to_string()
        }
        ConflictType::DeleteConflict => "remote edit against a local delete".to_string(),
        ConflictType::UpdateConflict => format!("concurrent edit of {}", contested.join(", ")),
    };
    let outcome = match (strategy, winner) {
        (Strategy::Manual, _) => "kept the local version; open for manual resolution".to_string(),
        (_, Winner::Remote) => format!("{strategy} took the remote version"),
        (_, Winner::Local) => format!("{strategy} kept the local version"),
        (_, Winner::Both) => format!("{strategy} kept the newer version of each field"),
    };
    format!("{what} (local {local_at}, {who} {remote_at}): {outcome}.")
}
