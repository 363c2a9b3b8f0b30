//! The audit trail: sync logs, conflicts, connection metrics (SPEC section 5), manual
//! conflict resolution, and retention.
//!
//! Sync log and conflict rows are written in the same transaction as the changes they
//! describe, so the trail never disagrees with the data. Connection events are written by
//! the node through [`Store::log_connection_event`], off the sync path.

use possync_core::merge::ConflictReport;
use possync_core::{EntityId, EntityKind, PosId, entity};
use rusqlite::{OptionalExtension, params};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Result, StoreError};
use crate::{Store, records};

/// Who sent a batch (for the audit rows).
#[derive(Debug, Clone, Copy)]
pub struct PeerRef<'a> {
    /// The peer's posId.
    pub id: &'a str,
    /// The peer's name.
    pub name: &'a str,
}

/// The `status` of a sync log row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncStatus {
    /// Applied.
    Success,
    /// Applied as a resolved concurrent edit.
    Conflict,
    /// Not applied, with the reason (duplicate, gap...).
    Skipped,
    /// Refused as invalid.
    Error,
}

impl SyncStatus {
    /// The column value.
    pub fn as_str(self) -> &'static str {
        match self {
            SyncStatus::Success => "success",
            SyncStatus::Conflict => "conflict",
            SyncStatus::Skipped => "skipped",
            SyncStatus::Error => "error",
        }
    }
}

/// What a sync log row is about.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SyncLog<'a> {
    pub(crate) peer_id: &'a str,
    /// None for a connection that never authenticated (stored as NULL: not a peer).
    pub(crate) peer_name: Option<&'a str>,
    pub(crate) message_type: &'a str,
    pub(crate) message_action: &'a str,
    pub(crate) entity_type: Option<EntityKind>,
    pub(crate) entity_id: Option<&'a str>,
}

/// A conflict to record.
#[derive(Debug, Clone)]
pub(crate) struct ConflictRow {
    pub(crate) entity: EntityKind,
    pub(crate) id: EntityId,
    pub(crate) report: ConflictReport,
    /// The record's context right after the merge: both sides of the clash.
    pub(crate) ctx: possync_core::VersionVector,
}

/// The connection events of `p2p_connection_metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConnectionEventKind {
    /// A peer connected (first time in this run).
    Connected,
    /// A peer's connection ended (with the final counters).
    Disconnected,
    /// A known peer came back.
    Reconnected,
    /// A peer went silent past the heartbeat deadline.
    HeartbeatTimeout,
    /// A catch-up finished (with its duration).
    SyncCompleted,
    /// A catch-up or handshake failed (with the error).
    SyncFailed,
}

impl ConnectionEventKind {
    /// The column value.
    pub fn as_str(self) -> &'static str {
        match self {
            ConnectionEventKind::Connected => "connected",
            ConnectionEventKind::Disconnected => "disconnected",
            ConnectionEventKind::Reconnected => "reconnected",
            ConnectionEventKind::HeartbeatTimeout => "heartbeat_timeout",
            ConnectionEventKind::SyncCompleted => "sync_completed",
            ConnectionEventKind::SyncFailed => "sync_failed",
        }
    }
}

/// One row of `p2p_connection_metrics`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionEvent {
    /// The peer's posId, or, for a connection that never authenticated, its address (the
    /// IP alone for an inbound one: its port is ephemeral).
    pub peer_id: String,
    /// The peer's name; `None` for a connection that never authenticated, stored as NULL.
    /// Such a row is a rejected connection, never a peer: the dashboard's peer lists,
    /// uptime, reliability and sync alerts leave NULL-named rows out (docs/DASHBOARD.md).
    pub peer_name: Option<String>,
    /// What happened.
    pub kind: ConnectionEventKind,
    /// Counters at the time (final ones for `disconnected`).
    pub messages_sent: u64,
    /// See `messages_sent`.
    pub messages_received: u64,
    /// See `messages_sent`.
    pub bytes_sent: u64,
    /// See `messages_sent`.
    pub bytes_received: u64,
    /// For `sync_completed`.
    pub sync_duration_ms: Option<u64>,
    /// For `sync_failed`.
    pub error_message: Option<String>,
    /// When it happened (Unix ms).
    pub at_ms: u64,
}

/// How a person resolves an open conflict.
#[derive(Debug, Clone, PartialEq)]
pub enum Resolution {
    /// Keep the local version.
    Local,
    /// Take the remote version.
    Remote,
    /// Use this merged record (a JSON object of fields).
    Merged(Value),
}

impl Store {
    pub(crate) fn log_sync(
        &mut self,
        log: &SyncLog<'_>,
        status: SyncStatus,
        reason: Option<&str>,
        strategy: Option<&str>,
        details: Option<&str>,
    ) -> Result<()> {
        let now = self.now_sqlite();
        self.conn
            .prepare_cached(
                "INSERT INTO p2p_sync_logs (peer_id, peer_name, message_type, message_action, entity_type, entity_id,
                                            status, conflict_reason, resolution_strategy, details, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            )?
            .execute(params![
                log.peer_id,
                log.peer_name,
                truncate(log.message_type, 64),
                truncate(log.message_action, 64),
                log.entity_type.map(EntityKind::as_str),
                log.entity_id,
                status.as_str(),
                reason,
                strategy,
                details,
                now,
            ])?;
        Ok(())
    }

    /// Remembers a terminal's name (from a peer's handshake), for naming the origin of
    /// edits in the audit trail.
    pub(crate) fn note_terminal(&mut self, pos_id: &str, name: &str) -> Result<()> {
        let now = self.now_sqlite();
        self.conn
            .prepare_cached(
                "INSERT INTO sync_terminals (pos_id, name, seen_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT (pos_id) DO UPDATE SET name = excluded.name, seen_at = excluded.seen_at
                 WHERE name <> excluded.name OR seen_at < date(excluded.seen_at)",
            )?
            .execute(params![pos_id, truncate(name, 256), now])?;
        Ok(())
    }

    /// The name of a terminal this node has heard of, if any.
    fn terminal_name(&self, pos_id: &str) -> Result<Option<String>> {
        Ok(self
            .conn
            .prepare_cached("SELECT name FROM sync_terminals WHERE pos_id = ?1")?
            .query_row([pos_id], |row| row.get(0))
            .optional()?)
    }

    /// One `p2p_conflicts` row. It names the till where the remote edit was made (the
    /// change's origin), by name when known, and says in its notes which peer passed it on
    /// when that is another till.
    pub(crate) fn log_conflict(
        &mut self,
        origin: &PosId,
        peer: PeerRef<'_>,
        row: &ConflictRow,
    ) -> Result<()> {
        let now = self.now_sqlite();
        let report = &row.report;
        let origin_name = if origin.as_str() == peer.id {
            peer.name.to_string()
        } else {
            self.terminal_name(origin.as_str())?.unwrap_or_else(|| origin.to_string())
        };
        let notes = if origin.as_str() == peer.id {
            report.notes.clone()
        } else {
            format!("{} (edit made on {origin_name}, received through {})", report.notes, peer.name)
        };
        self.conn
            .prepare_cached(
                "INSERT INTO p2p_conflicts (peer_id, peer_name, entity_type, entity_id, conflict_type, local_data,
                                            remote_data, local_updated_at, remote_updated_at, resolution_strategy,
                                            final_data, resolved_by, resolved_at, notes, created_at, entity_name)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)",
            )?
            .execute(params![
                origin.as_str(),
                origin_name,
                row.entity.as_str(),
                row.id.as_str(),
                report.conflict_type.as_str(),
                records::snapshot_json(row.entity, &report.local_data).to_string(),
                records::snapshot_json(row.entity, &report.remote_data).to_string(),
                report.local_updated_at,
                report.remote_updated_at,
                report.strategy.as_str(),
                records::snapshot_json(row.entity, &report.final_data).to_string(),
                if report.open { None } else { Some("system") },
                if report.open { None } else { Some(now.clone()) },
                notes,
                now,
                readable_name(&[&report.final_data, &report.local_data, &report.remote_data]),
            ])?;
        if report.open {
            let ctx = serde_json::to_string(&row.ctx).map_err(|err| StoreError::Corrupt(err.to_string()))?;
            let fields = serde_json::to_string(&report.contested)
                .map_err(|err| StoreError::Corrupt(err.to_string()))?;
            self.conn
                .prepare_cached(
                    "INSERT INTO conflict_sides (conflict_id, ctx, fields) VALUES (last_insert_rowid(), ?1, ?2)",
                )?
                .execute([ctx, fields])?;
            self.open_decidable = true;
        }
        Ok(())
    }

    /// Closes the open conflicts on a record that `change` (remote, just merged) decides: it
    /// was written having seen both sides. With `decided_by` (a person's decision on another
    /// till) the conflict is closed in that person's name; otherwise it was superseded by a
    /// later edit, but only if that edit writes every field the conflict contests: the value
    /// this till kept for a field the edit leaves alone may not be the one the other tills
    /// hold (they followed their own strategy), so the conflict stays open for a person.
    /// Returns how many were closed.
    pub(crate) fn close_decided_conflicts(
        &mut self,
        change: &possync_core::Change,
        decided_by: Option<&str>,
        origin_name: &str,
    ) -> Result<usize> {
        let open: Vec<(i64, String, Option<String>)> = self
            .conn
            .prepare_cached(
                "SELECT c.id, s.ctx, s.fields FROM p2p_conflicts c JOIN conflict_sides s ON s.conflict_id = c.id
                 WHERE c.entity_type = ?1 AND c.entity_id = ?2 AND c.resolved_by IS NULL",
            )?
            .query_map(params![change.entity.as_str(), change.id.as_str()], |row| {
                Ok((row.get(0)?, row.get(1)?, row.get(2)?))
            })?
            .collect::<rusqlite::Result<_>>()?;
        let written: Vec<&str> = match &change.body {
            possync_core::ChangeBody::Upsert { fields, .. }
            | possync_core::ChangeBody::TicketStatus { fields, .. } => fields.keys().copied().collect(),
            _ => Vec::new(),
        };
        if open.is_empty() {
            return Ok(0);
        }
        let final_data = match records::load(&self.conn, &self.origins, change.entity, &change.id)? {
            Some(state) if !state.deleted => {
                let stock = if change.entity == EntityKind::Product {
                    Some(records::product_stock(&self.conn, &change.id)?)
                } else {
                    None
                };
                records::api_json(change.entity, &change.id, &state, stock)
            }
            _ => serde_json::json!({"id": change.id, "deleted": true}),
        };
        let now = self.now_sqlite();
        let mut closed = 0;
        for (conflict_id, sides, contested) in open {
            let sides: possync_core::VersionVector = serde_json::from_str(&sides)
                .map_err(|err| StoreError::Corrupt(format!("conflict_sides {conflict_id}: {err}")))?;
            if !change.ctx.dominates(&sides) {
                continue;
            }
            // (A row from before the `fields` column: closed as before.)
            let contested: Vec<String> = match contested {
                Some(raw) => serde_json::from_str(&raw).map_err(|err| {
                    StoreError::Corrupt(format!("conflict_sides {conflict_id} fields: {err}"))
                })?,
                None => Vec::new(),
            };
            if decided_by.is_none() && !contested.iter().all(|field| written.contains(&field.as_str())) {
                continue;
            }
            let final_data = records::snapshot_json(change.entity, &final_data);
            let (resolved_by, note) = match decided_by {
                Some(user) => (user.to_string(), format!(" Decided by {user} on {origin_name}.")),
                None => (
                    "superseded".to_string(),
                    format!(" Superseded by a later edit made on {origin_name} with both versions in view."),
                ),
            };
            self.conn.execute(
                "UPDATE p2p_conflicts SET resolved_by = ?2, resolved_at = ?3, final_data = ?4,
                        notes = COALESCE(notes, '') || ?5 WHERE id = ?1",
                params![conflict_id, resolved_by, now, final_data.to_string(), note],
            )?;
            closed += 1;
        }
        Ok(closed)
    }

    /// Records a connection event (connected, disconnected with counters, sync_completed...).
    pub fn log_connection_event(&mut self, event: &ConnectionEvent) -> Result<()> {
        let as_i64 = |value: u64| i64::try_from(value).unwrap_or(i64::MAX);
        self.conn
            .prepare_cached(
                "INSERT INTO p2p_connection_metrics (peer_id, peer_name, event_type, messages_sent, messages_received,
                                                     bytes_sent, bytes_received, sync_duration_ms, error_message,
                                                     created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            )?
            .execute(params![
                truncate(&event.peer_id, 128),
                event.peer_name.as_deref().map(|name| truncate(name, 256)),
                event.kind.as_str(),
                as_i64(event.messages_sent),
                as_i64(event.messages_received),
                as_i64(event.bytes_sent),
                as_i64(event.bytes_received),
                event.sync_duration_ms.map(as_i64),
                event.error_message.as_deref().map(|message| truncate(message, 2000)),
                possync_core::time::sqlite_datetime(event.at_ms),
            ])?;
        Ok(())
    }

    /// Records several connection events in one transaction (the node batches them).
    pub fn log_connection_events(&mut self, events: &[ConnectionEvent]) -> Result<()> {
        self.write(false, |store| events.iter().try_for_each(|event| store.log_connection_event(event)))
    }

    /// Resolves an open (manual) conflict: writes the chosen version as a new local edit,
    /// which every terminal then takes as a sequential change, and records who resolved it.
    /// Returns the conflict row as the API shows it.
    pub fn resolve_conflict(
        &mut self,
        conflict_id: i64,
        resolution: &Resolution,
        user: &str,
    ) -> Result<Value> {
        let user = user.trim();
        if user.is_empty() || user.chars().count() > 128 {
            return Err(StoreError::invalid("resolvedBy", "a user id of 1 to 128 characters is required"));
        }
        self.write(true, |store| {
            let row: Option<ConflictColumns> = store
                .conn
                .query_row(
                    "SELECT entity_type, entity_id, local_data, remote_data, resolved_by FROM p2p_conflicts WHERE id = ?1",
                    [conflict_id],
                    |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?, row.get(4)?)),
                )
                .optional()?;
            let (kind, id, local_data, remote_data, resolved_by) = row.ok_or(StoreError::ConflictNotFound(conflict_id))?;
            if resolved_by.is_some() {
                return Err(StoreError::ConflictResolved(conflict_id));
            }
            let kind: EntityKind = kind.parse().map_err(|_| StoreError::Corrupt(format!("conflict {conflict_id} entity type")))?;
            let id = EntityId::parse(id).map_err(|err| StoreError::Corrupt(err.to_string()))?;
            let parse = |raw: Option<String>| -> Value { raw.and_then(|raw| serde_json::from_str(&raw).ok()).unwrap_or(Value::Null) };
            let chosen = match resolution {
                Resolution::Local => parse(local_data),
                Resolution::Remote => parse(remote_data),
                Resolution::Merged(value) => value.clone(),
            };
            let state = records::load(&store.conn, &store.origins, kind, &id)?
                .ok_or_else(|| StoreError::not_found(kind, &id))?;
            let wants_deleted = chosen.get("deleted").and_then(Value::as_bool).unwrap_or(false);
            let final_data = if wants_deleted {
                // The other tills may hold other values in this record's fields (each kept
                // what its own strategy chose), and a tombstone keeps its fields (a later
                // concurrent edit can bring the record back with them): the decision first
                // writes the fields as this till holds them, so that every till holds the
                // same, then the delete.
                let mut state = state;
                let held: possync_core::FieldMap = state.values.iter().map(|(name, value)| (*name, value.clone())).collect();
                if !held.is_empty() {
                    store.decided_by = Some(user.to_string());
                    let written = store.write_fields(kind, &id, state, held, false);
                    store.decided_by = None;
                    written?;
                    state = records::load(&store.conn, &store.origins, kind, &id)?
                        .ok_or_else(|| StoreError::not_found(kind, &id))?;
                }
                if !state.deleted {
                    let newest = state.newest().cloned();
                    store.decided_by = Some(user.to_string());
                    let change = store.emit_local(
                        kind,
                        &id,
                        possync_core::ChangeBody::Delete,
                        &state.ctx,
                        newest.as_ref(),
                    );
                    store.decided_by = None;
                    let change = change?;
                    let mut state = state;
                    state.deleted = true;
                    state.existence = Some(crate::local::local_version(&change));
                    state.ctx = change.ctx;
                    records::save(&store.conn, &mut store.origins, kind, &id, &state)?;
                }
                serde_json::json!({"id": id, "deleted": true})
            } else {
                let mut object = chosen.as_object().cloned().ok_or_else(|| StoreError::invalid("data", "expected a record object"))?;
                object.remove("deleted");
                let fields = entity::parse_fields(kind, &Value::Object(object))?;
                if fields.is_empty() {
                    return Err(StoreError::invalid("data", "the chosen version holds no field"));
                }
                store.decided_by = Some(user.to_string());
                let written = if kind == EntityKind::Ticket {
                    // A ticket takes no plain update after its sale (every till would refuse
                    // one): its status travels as a status change.
                    store.decide_ticket_status(&id, state, fields)
                } else {
                    store.write_fields(kind, &id, state, fields, false)
                };
                store.decided_by = None;
                written?
            };
            let now = store.now_sqlite();
            store.conn.execute(
                "UPDATE p2p_conflicts SET resolved_by = ?2, resolved_at = ?3, final_data = ?4,
                        notes = COALESCE(notes, '') || ?5 WHERE id = ?1",
                params![
                    conflict_id,
                    user,
                    now,
                    records::snapshot_json(kind, &final_data).to_string(),
                    format!(" Resolved by {user}: {}.", match resolution {
                        Resolution::Local => "kept the local version",
                        Resolution::Remote => "took the remote version",
                        Resolution::Merged(_) => "supplied a merged version",
                    })
                ],
            )?;
            crate::reader::conflict_json(&store.conn, conflict_id)?.ok_or(StoreError::ConflictNotFound(conflict_id))
        })
    }

    /// Deletes audit rows older than `days` days. Returns how many rows went.
    pub fn cleanup_logs(&mut self, days: u32) -> Result<u64> {
        let cutoff = possync_core::time::sqlite_datetime(
            self.env.now_ms().saturating_sub(u64::from(days) * 86_400_000),
        );
        self.write(false, |store| {
            let mut removed = 0u64;
            for table in ["p2p_sync_logs", "p2p_connection_metrics"] {
                removed +=
                    store.conn.execute(&format!("DELETE FROM {table} WHERE created_at < ?1"), [&cutoff])?
                        as u64;
            }
            // Open conflicts wait for a person, whatever their age.
            removed += store.conn.execute(
                "DELETE FROM p2p_conflicts WHERE created_at < ?1 AND resolved_by IS NOT NULL",
                [&cutoff],
            )? as u64;
            Ok(removed)
        })
    }
}

/// entity_type, entity_id, local_data, remote_data, resolved_by of a conflict row.
type ConflictColumns = (String, String, Option<String>, Option<String>, Option<String>);

fn truncate(text: &str, max: usize) -> String {
    text.chars().take(max).collect()
}

/// A record's readable name for `p2p_conflicts.entity_name` (POSPlus migration 007): its
/// `name`, a cashier's `username`, a ticket's `ticketNumber` or a product's `sku`, from the
/// first snapshot that has one.
fn readable_name(snapshots: &[&Value]) -> Option<String> {
    ["name", "username", "ticketNumber", "sku"].iter().find_map(|field| {
        snapshots.iter().find_map(|snapshot| {
            snapshot.get(*field).and_then(Value::as_str).filter(|text| !text.is_empty()).map(str::to_string)
        })
    })
}
