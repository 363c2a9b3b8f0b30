//! Read-only queries, on their own connections so the API never waits behind the writer.
//!
//! Lists answer with JSON objects in the API's camelCase form; audit rows come back as
//! their tables hold them (column names camelCased), newest first.

use std::path::Path;

use possync_core::{EntityId, EntityKind, PosId, Seq, VersionVector};
use rusqlite::types::ValueRef;
use rusqlite::{Connection, OpenFlags, OptionalExtension, Params, Row};
use serde_json::{Map, Value, json};

use crate::error::{Result, StoreError};
use crate::meta::Origins;
use crate::records;
use crate::select::{self, Selection};
use crate::settings::{self, SettingRow};

/// A read-only connection to a node's database.
pub struct StoreReader {
    pub(crate) conn: Connection,
}

/// Paging and filters for record lists.
#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    /// At most this many (default 100, at most 1000).
    pub limit: Option<u32>,
    /// Skip this many.
    pub offset: Option<u32>,
    /// Products in this category only.
    pub category_id: Option<String>,
    /// Name (or SKU/barcode for products) contains this text.
    pub search: Option<String>,
}

/// Filters of the lists of dated facts (tickets by the day they were sold, Z reports by the
/// day of their close).
#[derive(Debug, Clone, Default)]
pub struct DayQuery {
    /// This day only (`YYYY-MM-DD`, UTC).
    pub day: Option<String>,
    /// This terminal only.
    pub pos_id: Option<String>,
    /// At most this many (default 100, at most 1000).
    pub limit: Option<u32>,
    /// Skip this many.
    pub offset: Option<u32>,
}

pub(crate) fn paging(limit: Option<u32>, offset: Option<u32>) -> (i64, i64) {
    (i64::from(limit.unwrap_or(100).min(1000)), i64::from(offset.unwrap_or(0)))
}

impl StoreReader {
    /// Opens a read-only connection.
    pub fn open(path: &Path) -> Result<StoreReader> {
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        // Readers are pooled and mostly scan (catch-up, lists): a small page cache each
        // keeps a node's memory flat however many peers it serves (SQLite's default is 2 MB).
        conn.pragma_update(None, "cache_size", -512)?;
        Ok(StoreReader { conn })
    }

    /// What this node holds, per origin.
    pub fn summary(&self) -> Result<VersionVector> {
        load_vv(&self.conn, &Origins::load(&self.conn)?)
    }

    /// The next batch of changes a peer holding `since` lacks (see [`Selection`]).
    pub fn select_changes(
        &self,
        since: &VersionVector,
        after_cursor: u64,
        limit: usize,
    ) -> Result<Selection> {
        select::select_changes(&self.conn, since, after_cursor, limit, None)
    }

    /// [`StoreReader::select_changes`] from the log's first `up_to` positions only: a node
    /// whose fsyncs are deferred ([`crate::Store::defer_fsync`]) serves a catch-up only what is
    /// durable, so that no peer ever holds a change its origin could still lose.
    pub fn select_changes_up_to(
        &self,
        since: &VersionVector,
        after_cursor: u64,
        limit: usize,
        up_to: u64,
    ) -> Result<Selection> {
        select::select_changes(&self.conn, since, after_cursor, limit, Some(up_to))
    }

    /// A live record as the API shows it.
    pub fn record(&self, kind: EntityKind, id: &EntityId) -> Result<Option<Value>> {
        let origins = Origins::load(&self.conn)?;
        let Some(state) = records::load(&self.conn, &origins, kind, id)? else { return Ok(None) };
        if state.deleted {
            return Ok(None);
        }
        let stock =
            if kind == EntityKind::Product { Some(records::product_stock(&self.conn, id)?) } else { None };
        Ok(Some(records::api_json(kind, id, &state, stock)))
    }

    /// Live records of a kind, by name.
    pub fn list_records(&self, kind: EntityKind, query: &ListQuery) -> Result<Vec<Value>> {
        let table = records::table(kind);
        let (limit, offset) = paging(query.limit, query.offset);
        let search =
            query.search.as_ref().map(|text| format!("%{}%", text.replace('%', "\\%").replace('_', "\\_")));
        // Cashier accounts are named by their username.
        let name = if kind == EntityKind::User { "username" } else { "name" };
        let search_clause = match kind {
            EntityKind::Product => {
                "(?1 IS NULL OR name LIKE ?1 ESCAPE '\\' OR sku LIKE ?1 ESCAPE '\\' OR barcode = ?4)"
                    .to_string()
            }
            _ => format!("(?1 IS NULL OR {name} LIKE ?1 ESCAPE '\\' OR ?4 IS NULL)"),
        };
        let category_clause =
            if kind == EntityKind::Product { "(?5 IS NULL OR category_id = ?5)" } else { "?5 IS NULL" };
        let sql = format!(
            "SELECT id FROM {table} WHERE deleted = 0 AND {search_clause} AND {category_clause}
             ORDER BY {name} COLLATE NOCASE, id LIMIT ?2 OFFSET ?3"
        );
        let ids: Vec<String> = self
            .conn
            .prepare_cached(&sql)?
            .query_map(rusqlite::params![search, limit, offset, query.search, query.category_id], |row| {
                row.get(0)
            })?
            .collect::<rusqlite::Result<_>>()?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            let id = EntityId::parse(id).map_err(|err| StoreError::Corrupt(err.to_string()))?;
            out.extend(self.record(kind, &id)?);
        }
        Ok(out)
    }

    /// The live cashier accounts called `username` (one, unless two tills created the same
    /// name while apart), with their password hashes: for checking a login, never for display.
    pub fn users_named(&self, username: &str) -> Result<Vec<Value>> {
        let ids: Vec<String> = self
            .conn
            .prepare_cached("SELECT id FROM users WHERE username = ?1 AND deleted = 0 ORDER BY id")?
            .query_map([username], |row| row.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            let id = EntityId::parse(id).map_err(|err| StoreError::Corrupt(err.to_string()))?;
            out.extend(self.record(EntityKind::User, &id)?);
        }
        Ok(out)
    }

    /// A ticket with its lines and payments.
    pub fn ticket(&self, id: &EntityId) -> Result<Option<Value>> {
        ticket_json(&self.conn, id)
    }

    /// Tickets, newest first, by day and/or terminal.
    pub fn list_tickets(&self, query: &DayQuery) -> Result<Vec<Value>> {
        let (limit, offset) = paging(query.limit, query.offset);
        let ids: Vec<String> = self
            .conn
            .prepare_cached(
                "SELECT id FROM tickets WHERE (?1 IS NULL OR substr(created_at, 1, 10) = ?1) AND (?2 IS NULL OR pos_id = ?2)
                 ORDER BY created_at DESC, id DESC LIMIT ?3 OFFSET ?4",
            )?
            .query_map(rusqlite::params![query.day, query.pos_id, limit, offset], |row| row.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            let id = EntityId::parse(id).map_err(|err| StoreError::Corrupt(err.to_string()))?;
            out.extend(ticket_json(&self.conn, &id)?);
        }
        Ok(out)
    }

    /// Stock movements of a product, newest first.
    pub fn movements(
        &self,
        product_id: &EntityId,
        limit: Option<u32>,
        offset: Option<u32>,
    ) -> Result<Vec<Value>> {
        let (limit, offset) = paging(limit, offset);
        let rows = rows_json(
            &self.conn,
            "SELECT id, product_id, type, quantity, reference, pos_id, created_at FROM stock_movements
             WHERE product_id = ?1 ORDER BY created_at DESC, id DESC LIMIT ?2 OFFSET ?3",
            rusqlite::params![product_id.as_str(), limit, offset],
        )?;
        Ok(rows.into_iter().map(|row| amounts_to_numbers(row, &["quantity"])).collect())
    }

    /// `p2p_sync_logs`, newest first.
    pub fn sync_logs(&self, limit: Option<u32>, offset: Option<u32>) -> Result<Vec<Value>> {
        self.audit_rows("p2p_sync_logs", limit, offset)
    }

    /// `p2p_conflicts`, newest first.
    pub fn conflicts(&self, limit: Option<u32>, offset: Option<u32>) -> Result<Vec<Value>> {
        Ok(self.audit_rows("p2p_conflicts", limit, offset)?.into_iter().map(hide_secrets).collect())
    }

    /// One conflict row.
    pub fn conflict(&self, id: i64) -> Result<Option<Value>> {
        conflict_json(&self.conn, id)
    }

    /// `p2p_connection_metrics`, newest first.
    pub fn connection_metrics(&self, limit: Option<u32>, offset: Option<u32>) -> Result<Vec<Value>> {
        self.audit_rows("p2p_connection_metrics", limit, offset)
    }

    fn audit_rows(&self, table: &str, limit: Option<u32>, offset: Option<u32>) -> Result<Vec<Value>> {
        let (limit, offset) = paging(limit, offset);
        rows_json(
            &self.conn,
            &format!("SELECT * FROM {table} ORDER BY id DESC LIMIT ?1 OFFSET ?2"),
            [limit, offset],
        )
    }

    /// The settings table.
    pub fn settings(&self) -> Result<Vec<SettingRow>> {
        settings::rows(&self.conn)
    }

    /// Runs a read-only SQL query and returns its rows as JSON objects (for the dashboard's
    /// aggregates and for tests). The connection is read-only, so nothing can be changed.
    pub fn query_json(&self, sql: &str) -> Result<Vec<Value>> {
        rows_json(&self.conn, sql, [])
    }

    /// The entity tables in a canonical text form: identical on two terminals exactly when
    /// they hold the same data. Sync metadata is left out (its origin numbering is local).
    pub fn canonical_dump(&self) -> Result<String> {
        let mut out = String::new();
        for (table, columns) in [
            (
                "categories",
                "id, name, description, parent_id, display_order, is_active, created_at, updated_at, deleted",
            ),
            (
                "products",
                "id, sku, barcode, name, description, category_id, price, cost, discount_rate, stock, min_stock, max_stock, unit, is_active, image_url, created_at, updated_at, deleted",
            ),
            ("customers", "id, name, email, phone, notes, created_at, updated_at, deleted"),
            (
                "users",
                "id, username, first_name, last_name, email, role, is_active, password_hash, last_login, created_at, updated_at, deleted",
            ),
            (
                "tickets",
                "id, ticket_number, pos_id, customer_id, cash_session_id, subtotal, discount_amount, total_amount, status, notes, created_at, updated_at",
            ),
            (
                "ticket_lines",
                "ticket_id, line_no, product_id, product_name, product_sku, quantity, unit_price, discount_rate, discount_amount, total_amount",
            ),
            ("ticket_payments", "ticket_id, line_no, method, amount, reference"),
            ("stock_movements", "id, product_id, type, quantity, reference, pos_id, created_at"),
            (
                "cash_sessions",
                "id, pos_id, opened_by, opening_cash, opened_at, status, closed_by, closed_at, counted_cash, expected_cash, difference, z_report_id, notes, updated_at, deleted",
            ),
            (
                "z_reports",
                "id, session_id, pos_id, user_id, report_date, ticket_count, total_sales, total_discount, total_refunds, total_cash, total_card, total_transfer, total_check, total_other, opening_cash, counted_cash, expected_cash, difference, created_at, updated_at, deleted",
            ),
        ] {
            out.push_str(&format!("[{table}]\n"));
            for row in rows_json(&self.conn, &format!("SELECT {columns} FROM {table} ORDER BY 1, 2"), [])? {
                out.push_str(&row.to_string());
                out.push('\n');
            }
        }
        Ok(out)
    }
}

/// The node's version vector from `sync_vv`.
pub(crate) fn load_vv(conn: &Connection, origins: &Origins) -> Result<VersionVector> {
    let mut vv = VersionVector::new();
    let mut statement = conn.prepare("SELECT origin, seq FROM sync_vv")?;
    for row in statement.query_map([], |row| Ok((row.get::<_, i64>(0)?, row.get::<_, i64>(1)?)))? {
        let (origin, seq) = row?;
        vv.observe(origins.pos(origin)?, Seq(seq as u64));
    }
    Ok(vv)
}

/// A ticket as the API shows it.
pub(crate) fn ticket_json(conn: &Connection, id: &EntityId) -> Result<Option<Value>> {
    let head = rows_json(
        conn,
        "SELECT id, ticket_number, pos_id, customer_id, cash_session_id, subtotal, discount_amount, total_amount,
                status, notes, created_at, updated_at FROM tickets WHERE id = ?1",
        [id.as_str()],
    )?;
    let Some(head) = head.into_iter().next() else { return Ok(None) };
    let mut ticket = amounts_to_numbers(head, &["subtotal", "discountAmount", "totalAmount"]);
    let lines = rows_json(
        conn,
        "SELECT product_id, product_name, product_sku, quantity, unit_price, discount_rate, discount_amount, total_amount
         FROM ticket_lines WHERE ticket_id = ?1 ORDER BY line_no",
        [id.as_str()],
    )?;
    let lines: Vec<Value> = lines
        .into_iter()
        .map(|line| {
            amounts_to_numbers(
                line,
                &["quantity", "unitPrice", "discountRate", "discountAmount", "totalAmount"],
            )
        })
        .collect();
    let payments = rows_json(
        conn,
        "SELECT method, amount, reference FROM ticket_payments WHERE ticket_id = ?1 ORDER BY line_no",
        [id.as_str()],
    )?;
    let payments: Vec<Value> =
        payments.into_iter().map(|payment| amounts_to_numbers(payment, &["amount"])).collect();
    if let Value::Object(object) = &mut ticket {
        object.insert("lines".into(), Value::Array(lines));
        object.insert("payments".into(), Value::Array(payments));
    }
    Ok(Some(ticket))
}

/// One conflict row as the API shows it.
pub(crate) fn conflict_json(conn: &Connection, id: i64) -> Result<Option<Value>> {
    Ok(rows_json(conn, "SELECT * FROM p2p_conflicts WHERE id = ?1", [id])?
        .into_iter()
        .next()
        .map(hide_secrets))
}

/// A conflict row as shown (API, dashboard, live feed): a cashier account's password hash
/// in its snapshots is replaced by `"(hidden)"`. The stored row keeps it: resolving the
/// conflict writes the chosen snapshot back.
fn hide_secrets(mut row: Value) -> Value {
    if row.get("entityType").and_then(Value::as_str) != Some(EntityKind::User.as_str()) {
        return row;
    }
    if let Value::Object(object) = &mut row {
        for (_, value) in object.iter_mut() {
            let Value::String(text) = value else { continue };
            let Ok(Value::Object(mut snapshot)) = serde_json::from_str::<Value>(text) else { continue };
            if let Some(hash) = snapshot.get_mut("passwordHash")
                && !hash.is_null()
            {
                *hash = Value::String("(hidden)".into());
                *value = Value::String(Value::Object(snapshot).to_string());
            }
        }
    }
    row
}

fn amounts_to_numbers(mut row: Value, fields: &[&str]) -> Value {
    if let Value::Object(object) = &mut row {
        for field in fields {
            if let Some(Value::String(text)) = object.get(*field)
                && let Ok(amount) = possync_core::decimal::parse(text)
            {
                object.insert((*field).to_string(), possync_core::decimal::to_json(amount));
            }
        }
    }
    row
}

fn camel_case(column: &str) -> String {
    let mut out = String::with_capacity(column.len());
    let mut upper = false;
    for c in column.chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            out.extend(c.to_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

fn cell(value: ValueRef<'_>) -> Value {
    match value {
        ValueRef::Null => Value::Null,
        ValueRef::Integer(number) => json!(number),
        ValueRef::Real(number) => json!(number),
        ValueRef::Text(text) => Value::String(String::from_utf8_lossy(text).into_owned()),
        ValueRef::Blob(blob) => json!(blob.len()),
    }
}

/// Rows as JSON objects with camelCase keys.
pub(crate) fn rows_json<P: Params>(conn: &Connection, sql: &str, params: P) -> Result<Vec<Value>> {
    let mut statement = conn.prepare_cached(sql)?;
    let names: Vec<String> = statement.column_names().iter().map(|name| camel_case(name)).collect();
    let to_object = |row: &Row<'_>| -> rusqlite::Result<Value> {
        let mut object = Map::with_capacity(names.len());
        for (i, name) in names.iter().enumerate() {
            object.insert(name.clone(), cell(row.get_ref(i)?));
        }
        Ok(Value::Object(object))
    };
    let rows = statement.query_map(params, to_object)?.collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(rows)
}

// The HTTP API's dashboard (docs/DASHBOARD.md) and its live conflict feed.

/// The rows behind `GET /api/dashboard`: each query of docs/DASHBOARD.md, run as written
/// with `:now` and `:since` bound from the node's clock. The API composes the answer.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DashboardRows {
    /// `uptime_by_peer`, last 24 h: connected and observed seconds per peer.
    pub uptime_by_peer: Vec<Value>,
    /// `avg_reconnect`, last 24 h: one row.
    pub avg_reconnect: Value,
    /// `sync_success_rate`, last 24 h: one row.
    pub sync_success_rate: Value,
    /// `conflicts_per_hour`, last 24 h: one row.
    pub conflicts_per_hour: Value,
    /// `daily_volume`: 14 rows, oldest first.
    pub daily_volume: Vec<Value>,
    /// `peer_reliability`, last 7 days, least reliable first.
    pub peer_reliability: Vec<Value>,
    /// `alert_slow_sync`: peers whose syncs got slower than usual.
    pub alert_slow_sync: Vec<Value>,
    /// `alert_sync_errors`: peers whose changes fail more than usual.
    pub alert_sync_errors: Vec<Value>,
    /// `rejected_connections`, last 24 h: connections that never authenticated, by address
    /// and reason.
    pub rejected_connections: Vec<Value>,
    /// `alert_handshake_failures`: addresses failing their handshake again and again.
    pub alert_handshake_failures: Vec<Value>,
    /// `alert_heartbeat_timeouts`: peers timing out again and again.
    pub alert_heartbeat_timeouts: Vec<Value>,
    /// `alert_sync_stalled`: peers whose catch-up stopped progressing in the last hour.
    pub alert_sync_stalled: Vec<Value>,
    /// `alert_clock_ahead`: origins whose changes are stamped far ahead of this clock.
    pub alert_clock_ahead: Vec<Value>,
    /// `alert_identity`: signs that another terminal uses this one's identity.
    pub alert_identity: Vec<Value>,
    /// `alert_forks`: changes refused as a second content for one (origin, seq).
    pub alert_forks: Vec<Value>,
    /// `alert_forged`: changes refused because their origin did not sign them, or is
    /// revoked.
    pub alert_forged: Vec<Value>,
}

impl StoreReader {
    /// Runs every dashboard query at `now_ms` (Unix ms).
    pub fn dashboard_rows(&self, now_ms: u64) -> Result<DashboardRows> {
        let now = possync_core::time::sqlite_datetime(now_ms);
        let day = possync_core::time::sqlite_datetime(now_ms.saturating_sub(86_400_000));
        let week = possync_core::time::sqlite_datetime(now_ms.saturating_sub(7 * 86_400_000));
        let day_window = [(":now", now.as_str()), (":since", day.as_str())];
        let week_window = [(":now", now.as_str()), (":since", week.as_str())];
        let one = |sql: &str| -> Result<Value> {
            Ok(rows_json_named(&self.conn, sql, &day_window)?.into_iter().next().unwrap_or(Value::Null))
        };
        Ok(DashboardRows {
            uptime_by_peer: rows_json_named(&self.conn, UPTIME_BY_PEER_SQL, &day_window)?,
            avg_reconnect: one(AVG_RECONNECT_SQL)?,
            sync_success_rate: one(SYNC_SUCCESS_RATE_SQL)?,
            conflicts_per_hour: one(CONFLICTS_PER_HOUR_SQL)?,
            daily_volume: rows_json_named(&self.conn, DAILY_VOLUME_SQL, &day_window)?,
            peer_reliability: rows_json_named(&self.conn, PEER_RELIABILITY_SQL, &week_window)?,
            alert_slow_sync: rows_json_named(&self.conn, ALERT_SLOW_SYNC_SQL, &day_window)?,
            alert_sync_errors: rows_json_named(&self.conn, ALERT_SYNC_ERRORS_SQL, &day_window)?,
            rejected_connections: rows_json_named(&self.conn, REJECTED_CONNECTIONS_SQL, &day_window)?,
            alert_handshake_failures: rows_json_named(&self.conn, ALERT_HANDSHAKE_FAILURES_SQL, &day_window)?,
            alert_heartbeat_timeouts: rows_json_named(&self.conn, ALERT_HEARTBEAT_TIMEOUTS_SQL, &day_window)?,
            alert_sync_stalled: rows_json_named(&self.conn, ALERT_SYNC_STALLED_SQL, &day_window)?,
            alert_clock_ahead: rows_json_named(&self.conn, ALERT_CLOCK_AHEAD_SQL, &day_window)?,
            alert_identity: rows_json_named(&self.conn, ALERT_IDENTITY_SQL, &day_window)?,
            alert_forks: rows_json_named(&self.conn, ALERT_FORKS_SQL, &day_window)?,
            alert_forged: rows_json_named(&self.conn, ALERT_FORGED_SQL, &day_window)?,
        })
    }

    /// The tills this one knows by key: enrolled public keys and revocations, by posId.
    pub fn terminals(&self) -> Result<Vec<Value>> {
        rows_json(&self.conn, TERMINALS_SQL, [])
    }

    /// Conflict rows with an id above `after_id`, oldest first (the live feed of new rows).
    pub fn conflicts_after(&self, after_id: i64, limit: u32) -> Result<Vec<Value>> {
        Ok(rows_json(
            &self.conn,
            "SELECT * FROM p2p_conflicts WHERE id > ?1 ORDER BY id LIMIT ?2",
            rusqlite::params![after_id, i64::from(limit)],
        )?
        .into_iter()
        .map(hide_secrets)
        .collect())
    }

    /// The change feed (`GET /api/changes`): the changes this node holds after log position
    /// `after`, in commit order, at most `limit`: each with its `cursor` (the log position,
    /// stable across restarts), the record it touched and where the change was made. Refused
    /// changes are left out (they changed nothing), and so are till keys and revocations
    /// (not records an app shows). Only up to log position `up_to`: what is durable on a node
    /// whose fsyncs are deferred (a cursor handed out is never taken back by a power cut).
    pub fn changes_after(&self, after: u64, limit: u32, up_to: u64) -> Result<Vec<Value>> {
        let position = |value: u64| i64::try_from(value).unwrap_or(i64::MAX);
        rows_json(
            &self.conn,
            "SELECT c.log_id AS cursor, c.entity_type, c.entity_id, c.action, o.pos_id AS origin, c.seq
             FROM sync_changes c JOIN sync_origins o ON o.idx = c.origin
             WHERE c.log_id > ?1 AND c.log_id <= ?3 AND c.rejected = 0 AND c.entity_type <> 'terminal'
             ORDER BY c.log_id LIMIT ?2",
            rusqlite::params![position(after), i64::from(limit), position(up_to)],
        )
    }

    /// Every peer that ever authenticated, with its last connection event (for `possync
    /// status` on a stopped node).
    pub fn known_peers(&self) -> Result<Vec<Value>> {
        rows_json(
            &self.conn,
            "SELECT peer_id AS id, peer_name AS name, event_type AS last_event, created_at AS last_seen
             FROM p2p_connection_metrics m
             WHERE peer_name IS NOT NULL
               AND id = (SELECT MAX(id) FROM p2p_connection_metrics m2
                         WHERE m2.peer_id = m.peer_id AND m2.peer_name IS NOT NULL)
             ORDER BY name, id",
            [],
        )
    }

    /// The highest conflict id so far (0 when there is none).
    pub fn last_conflict_id(&self) -> Result<i64> {
        Ok(self.conn.query_row("SELECT COALESCE(MAX(id), 0) FROM p2p_conflicts", [], |row| row.get(0))?)
    }

    /// The origins whose history differs between this node and a peer: for each origin of the
    /// peer's `heads` whose number (in the peer's `summary`) this node holds too, the
    /// fingerprint of the change this node holds at that number is compared with the peer's.
    /// Returns each origin that differs, with the number compared.
    pub fn diverged_heads(
        &self,
        summary: &VersionVector,
        heads: &std::collections::BTreeMap<PosId, String>,
    ) -> Result<Vec<(PosId, Seq)>> {
        let held = self.summary()?;
        let mut diverged = Vec::new();
        for (origin, theirs) in heads {
            let seq = summary.get(origin);
            if seq == Seq(0) || held.get(origin) < seq {
                continue;
            }
            if fingerprint_at(&self.conn, origin, seq)?.is_some_and(|ours| &ours != theirs) {
                diverged.push((origin.clone(), seq));
            }
        }
        Ok(diverged)
    }

    /// How many live records of `kind` this terminal holds (tickets and stock movements: all).
    pub fn count_records(&self, kind: EntityKind) -> Result<u64> {
        let table = records::table(kind);
        let live = match kind {
            EntityKind::Ticket | EntityKind::Stock | EntityKind::Terminal => "",
            _ => " WHERE deleted = 0",
        };
        let count: i64 =
            self.conn.query_row(&format!("SELECT COUNT(*) FROM {table}{live}"), [], |row| row.get(0))?;
        Ok(count.unsigned_abs())
    }

    /// How many tickets the till `pos_id` made that this terminal holds.
    pub fn ticket_count_of(&self, pos_id: &PosId) -> Result<u64> {
        let count: i64 = self
            .conn
            .prepare_cached("SELECT COUNT(*) FROM tickets WHERE pos_id = ?1")?
            .query_row([pos_id.as_str()], |row| row.get(0))?;
        Ok(count.unsigned_abs())
    }

    /// How many tickets share their ticket number with another one (0 when numbers are unique,
    /// as they must be across a shop and a chain).
    pub fn duplicate_ticket_numbers(&self) -> Result<u64> {
        let count: i64 = self.conn.query_row(
            "SELECT COUNT(*) - COUNT(DISTINCT ticket_number) FROM tickets",
            [],
            |row| row.get(0),
        )?;
        Ok(count.unsigned_abs())
    }

    /// Conflicts waiting for a person's decision, and conflicts logged in the last 24 hours
    /// (what a chain store's till reports to the head office).
    pub fn conflict_summary(&self) -> Result<(u64, u64)> {
        let (open, last_day): (i64, i64) = self.conn.query_row(
            "SELECT (SELECT COUNT(*) FROM p2p_conflicts WHERE resolved_by IS NULL),
                    (SELECT COUNT(*) FROM p2p_conflicts WHERE created_at >= datetime('now', '-24 hours'))",
            [],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )?;
        Ok((open.unsigned_abs(), last_day.unsigned_abs()))
    }

    /// How many conflicts this terminal logged.
    pub fn conflict_count(&self) -> Result<u64> {
        let count: i64 = self.conn.query_row("SELECT COUNT(*) FROM p2p_conflicts", [], |row| row.get(0))?;
        Ok(count.unsigned_abs())
    }

    /// Does a setting with this key exist?
    pub fn has_setting(&self, key: &str) -> Result<bool> {
        Ok(self
            .conn
            .query_row("SELECT EXISTS (SELECT 1 FROM settings WHERE key = ?1)", [key], |row| row.get(0))?)
    }
}

/// The fingerprint ([`possync_core::WireChange::fingerprint`]) of the change numbered `seq`
/// of `origin` in the log, if it is there.
pub(crate) fn fingerprint_at(conn: &Connection, origin: &PosId, seq: Seq) -> Result<Option<String>> {
    let payload: Option<String> = conn
        .prepare_cached(
            "SELECT c.payload FROM sync_changes c JOIN sync_origins o ON o.idx = c.origin
             WHERE o.pos_id = ?1 AND c.seq = ?2",
        )?
        .query_row(rusqlite::params![origin.as_str(), seq.0 as i64], |row| row.get(0))
        .optional()?;
    payload
        .map(|payload| {
            serde_json::from_str::<possync_core::WireChange>(&payload)
                .map(|wire| wire.fingerprint())
                .map_err(|err| StoreError::Corrupt(format!("sync_changes.payload: {err}")))
        })
        .transpose()
}

/// Like [`rows_json`], with named text parameters; a name the query does not use is skipped.
fn rows_json_named(conn: &Connection, sql: &str, bindings: &[(&str, &str)]) -> Result<Vec<Value>> {
    let mut statement = conn.prepare_cached(sql)?;
    for (name, value) in bindings {
        if let Some(index) = statement.parameter_index(name)? {
            statement.raw_bind_parameter(index, value)?;
        }
    }
    let names: Vec<String> = statement.column_names().iter().map(|name| camel_case(name)).collect();
    let mut rows = statement.raw_query();
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        let mut object = Map::with_capacity(names.len());
        for (i, name) in names.iter().enumerate() {
            object.insert(name.clone(), cell(row.get_ref(i)?));
        }
        out.push(Value::Object(object));
    }
    Ok(out)
}

/// The CTEs shared by the per-peer uptime queries of docs/DASHBOARD.md: every state event
/// (up or down) of each peer, each peer's state when the window opens, and the timeline of
/// the window. A macro, so that the queries stay `&'static str` built by `concat!`.
macro_rules! peer_state_timeline_ctes {
    () => {
        r#"WITH state_events AS (
  SELECT id, peer_id, peer_name, created_at,
         CASE WHEN event_type IN ('connected', 'reconnected') THEN 1 ELSE 0 END AS up
  FROM p2p_connection_metrics
  WHERE event_type IN ('connected', 'reconnected', 'disconnected', 'heartbeat_timeout')
    AND created_at <= :now
),
opening AS (
  SELECT id, peer_id, peer_name, :since AS created_at, up, 0 AS in_window
  FROM (SELECT *, ROW_NUMBER() OVER (PARTITION BY peer_id ORDER BY created_at DESC, id DESC) AS rn
        FROM state_events WHERE created_at < :since)
  WHERE rn = 1
),
timeline AS (
  SELECT id, peer_id, peer_name, created_at, up, in_window FROM opening
  UNION ALL
  SELECT id, peer_id, peer_name, created_at, up, 1 FROM state_events WHERE created_at >= :since
),
"#
    };
}

/// `uptime_by_peer` of docs/DASHBOARD.md.
const UPTIME_BY_PEER_SQL: &str = concat!(
    peer_state_timeline_ctes!(),
    r#"intervals AS (
  SELECT peer_id, up, in_window, created_at AS start_at,
         COALESCE(LEAD(created_at) OVER (PARTITION BY peer_id ORDER BY created_at, id), :now) AS end_at,
         FIRST_VALUE(peer_name) OVER (PARTITION BY peer_id ORDER BY created_at DESC, id DESC) AS peer_name
  FROM timeline
)
SELECT peer_id,
       MAX(peer_name) AS peer_name,
       SUM(CASE WHEN up = 1 THEN julianday(end_at) - julianday(start_at) ELSE 0 END) * 86400.0 AS connected_seconds,
       SUM(julianday(end_at) - julianday(start_at)) * 86400.0 AS observed_seconds
FROM intervals
GROUP BY peer_id
HAVING MAX(in_window) = 1 OR SUM(up) > 0
ORDER BY peer_id;"#
);

/// `avg_reconnect` of docs/DASHBOARD.md.
const AVG_RECONNECT_SQL: &str = r#"WITH state_events AS (
  SELECT id, peer_id, created_at,
         CASE WHEN event_type IN ('connected', 'reconnected') THEN 1 ELSE 0 END AS up
  FROM p2p_connection_metrics
  WHERE event_type IN ('connected', 'reconnected', 'disconnected', 'heartbeat_timeout')
    AND created_at <= :now
),
flagged AS (
  SELECT *, LAG(up) OVER (PARTITION BY peer_id ORDER BY created_at, id) AS previous_up
  FROM state_events
),
outages AS (
  SELECT d.peer_id, d.created_at AS down_at,
         (SELECT MIN(u.created_at) FROM state_events u
           WHERE u.peer_id = d.peer_id AND u.up = 1
             AND (u.created_at > d.created_at OR (u.created_at = d.created_at AND u.id > d.id))) AS up_at
  FROM flagged d
  WHERE d.up = 0 AND COALESCE(d.previous_up, 1) = 1 AND d.created_at >= :since
)
SELECT CAST(ROUND(AVG((julianday(up_at) - julianday(down_at)) * 86400000.0)) AS INTEGER) AS avg_reconnect_ms,
       COUNT(up_at) AS ended_outages,
       COUNT(*) - COUNT(up_at) AS ongoing_outages
FROM outages;"#;

/// `sync_success_rate` of docs/DASHBOARD.md.
const SYNC_SUCCESS_RATE_SQL: &str = r#"SELECT CASE WHEN COUNT(*) = 0 THEN NULL
            ELSE ROUND(100.0 * SUM(status IN ('success', 'conflict', 'skipped')) / COUNT(*), 2)
       END AS sync_success_rate,
       COUNT(*) AS changes,
       COALESCE(SUM(status = 'error'), 0) AS errors
FROM p2p_sync_logs
WHERE created_at >= :since AND created_at <= :now;"#;

/// `conflicts_per_hour` of docs/DASHBOARD.md.
const CONFLICTS_PER_HOUR_SQL: &str = r#"SELECT CASE
         WHEN NOT EXISTS (SELECT 1 FROM p2p_sync_logs WHERE created_at >= :since AND created_at <= :now)
          AND NOT EXISTS (SELECT 1 FROM p2p_conflicts WHERE created_at >= :since AND created_at <= :now)
          AND NOT EXISTS (SELECT 1 FROM p2p_connection_metrics WHERE created_at >= :since AND created_at <= :now)
         THEN NULL
         ELSE ROUND((SELECT COUNT(*) FROM p2p_conflicts WHERE created_at >= :since AND created_at <= :now)
                    / ((julianday(:now) - julianday(:since)) * 24.0), 2)
       END AS conflicts_per_hour;"#;

/// `daily_volume` of docs/DASHBOARD.md.
const DAILY_VOLUME_SQL: &str = r#"WITH RECURSIVE days(day) AS (
  SELECT date(:now, '-13 days')
  UNION ALL
  SELECT date(day, '+1 day') FROM days WHERE day < date(:now)
),
logs AS (
  SELECT date(created_at) AS day,
         SUM(NOT (status = 'skipped' AND COALESCE(conflict_reason, '') IN ('duplicate: already applied', 'already incorporated'))) AS changes,
         SUM(status = 'skipped' AND conflict_reason IN ('duplicate: already applied', 'already incorporated')) AS duplicates,
         SUM(status = 'error') AS errors
  FROM p2p_sync_logs
  WHERE created_at >= date(:now, '-13 days') AND created_at <= :now
  GROUP BY date(created_at)
),
conflicts AS (
  SELECT date(created_at) AS day, COUNT(*) AS conflicts
  FROM p2p_conflicts
  WHERE created_at >= date(:now, '-13 days') AND created_at <= :now
  GROUP BY date(created_at)
)
SELECT days.day,
       COALESCE(logs.changes, 0) AS changes,
       COALESCE(logs.duplicates, 0) AS duplicates,
       COALESCE(conflicts.conflicts, 0) AS conflicts,
       COALESCE(logs.errors, 0) AS errors
FROM days
LEFT JOIN logs ON logs.day = days.day
LEFT JOIN conflicts ON conflicts.day = days.day
ORDER BY days.day;"#;

/// `peer_reliability` of docs/DASHBOARD.md.
const PEER_RELIABILITY_SQL: &str = concat!(
    peer_state_timeline_ctes!(),
    r#"intervals AS (
  SELECT peer_id, up, in_window, created_at AS start_at,
         COALESCE(LEAD(created_at) OVER (PARTITION BY peer_id ORDER BY created_at, id), :now) AS end_at
  FROM timeline
),
uptime AS (
  SELECT peer_id,
         100.0 * SUM(CASE WHEN up = 1 THEN julianday(end_at) - julianday(start_at) ELSE 0 END)
               / NULLIF(SUM(julianday(end_at) - julianday(start_at)), 0) AS u
  FROM intervals
  GROUP BY peer_id
  HAVING MAX(in_window) = 1 OR SUM(up) > 0
),
sync AS (
  SELECT peer_id, 100.0 * SUM(status IN ('success', 'conflict', 'skipped')) / COUNT(*) AS s
  FROM p2p_sync_logs
  WHERE created_at >= :since AND created_at <= :now AND peer_id IS NOT NULL AND peer_name IS NOT NULL
  GROUP BY peer_id
),
events AS (
  SELECT peer_id,
         SUM(event_type IN ('heartbeat_timeout', 'sync_failed')) AS failures,
         100.0 * SUM(event_type = 'sync_failed')
               / NULLIF(SUM(event_type IN ('sync_completed', 'sync_failed')), 0) AS f
  FROM p2p_connection_metrics
  WHERE created_at >= :since AND created_at <= :now AND peer_name IS NOT NULL
  GROUP BY peer_id
),
peers AS (
  SELECT peer_id FROM uptime
  UNION SELECT peer_id FROM sync
  UNION SELECT peer_id FROM events
),
names AS (
  SELECT peer_id, peer_name FROM (
    SELECT peer_id, peer_name,
           ROW_NUMBER() OVER (PARTITION BY peer_id ORDER BY created_at DESC, source) AS rn
    FROM (SELECT peer_id, peer_name, created_at, 0 AS source FROM p2p_connection_metrics
          WHERE peer_name IS NOT NULL AND created_at <= :now
          UNION ALL
          SELECT peer_id, peer_name, created_at, 1 FROM p2p_sync_logs
          WHERE peer_name IS NOT NULL AND created_at <= :now))
  WHERE rn = 1
)
SELECT peers.peer_id,
       names.peer_name,
       CAST(ROUND((0.5 * COALESCE(uptime.u, 0) + 0.3 * COALESCE(sync.s, 0) + 0.2 * COALESCE(100 - events.f, 0))
                  / NULLIF(0.5 * (uptime.u IS NOT NULL) + 0.3 * (sync.s IS NOT NULL) + 0.2 * (events.f IS NOT NULL), 0))
            AS INTEGER) AS reliability,
       ROUND(uptime.u, 2) AS uptime_percent,
       COALESCE(events.failures, 0) AS failures
FROM peers
LEFT JOIN names USING (peer_id)
LEFT JOIN uptime USING (peer_id)
LEFT JOIN sync USING (peer_id)
LEFT JOIN events USING (peer_id)
ORDER BY reliability IS NULL, reliability, peer_id;"#
);

/// `alert_slow_sync` of docs/DASHBOARD.md.
const ALERT_SLOW_SYNC_SQL: &str = r#"WITH durations AS (
  SELECT id, peer_id, peer_name, sync_duration_ms AS ms, created_at
  FROM p2p_connection_metrics
  WHERE event_type = 'sync_completed' AND sync_duration_ms IS NOT NULL
    AND created_at >= datetime(:now, '-7 days') AND created_at <= :now
),
baseline AS (
  SELECT peer_id, ms,
         ROW_NUMBER() OVER (PARTITION BY peer_id ORDER BY ms) AS rn,
         COUNT(*) OVER (PARTITION BY peer_id) AS n
  FROM durations
  WHERE created_at < datetime(:now, '-1 hour')
),
median AS (
  SELECT peer_id, AVG(ms) AS baseline_median, MAX(n) AS baseline_count
  FROM baseline
  WHERE rn IN ((n + 1) / 2, (n + 2) / 2)
  GROUP BY peer_id
),
recent AS (
  SELECT peer_id, AVG(ms) AS recent_mean, COUNT(*) AS recent_count,
         (SELECT d2.peer_name FROM durations d2 WHERE d2.peer_id = d.peer_id
           ORDER BY d2.created_at DESC, d2.id DESC LIMIT 1) AS peer_name
  FROM durations d
  WHERE created_at >= datetime(:now, '-1 hour')
  GROUP BY peer_id
)
SELECT recent.peer_id, COALESCE(recent.peer_name, recent.peer_id) AS peer,
       CASE WHEN recent.recent_mean > 4 * median.baseline_median THEN 'critical' ELSE 'warning' END AS level,
       ROUND(recent.recent_mean) AS recent_mean_ms, recent.recent_count,
       ROUND(median.baseline_median) AS baseline_median_ms, median.baseline_count,
       ROUND(recent.recent_mean / median.baseline_median, 1) AS ratio
FROM recent JOIN median USING (peer_id)
WHERE recent.recent_count >= 3 AND median.baseline_count >= 10 AND median.baseline_median > 0
  AND recent.recent_mean > 2 * median.baseline_median
  AND recent.recent_mean - median.baseline_median >= 100
ORDER BY level = 'warning', peer;"#;

/// `alert_sync_errors` of docs/DASHBOARD.md.
const ALERT_SYNC_ERRORS_SQL: &str = r#"WITH logs AS (
  SELECT id, peer_id, peer_name, status, created_at
  FROM p2p_sync_logs
  WHERE created_at >= datetime(:now, '-7 days') AND created_at <= :now AND peer_name IS NOT NULL
),
recent AS (
  SELECT peer_id, COUNT(*) AS n, SUM(status = 'error') AS errors,
         (SELECT l2.peer_name FROM logs l2 WHERE l2.peer_id IS l.peer_id
           ORDER BY l2.created_at DESC, l2.id DESC LIMIT 1) AS peer_name
  FROM logs l
  WHERE created_at >= datetime(:now, '-1 hour')
  GROUP BY peer_id
),
baseline AS (
  SELECT peer_id, COUNT(*) AS n, SUM(status = 'error') AS errors
  FROM logs
  WHERE created_at < datetime(:now, '-1 hour')
  GROUP BY peer_id
),
shares AS (
  SELECT recent.peer_id, COALESCE(recent.peer_name, recent.peer_id, 'an unknown peer') AS peer,
         recent.n AS recent_rows, recent.errors AS recent_errors,
         1.0 * recent.errors / recent.n AS recent_share,
         COALESCE(1.0 * baseline.errors / NULLIF(baseline.n, 0), 0) AS baseline_share
  FROM recent LEFT JOIN baseline ON baseline.peer_id IS recent.peer_id
)
SELECT peer_id, peer,
       CASE WHEN recent_share > MAX(0.20, 4 * baseline_share) THEN 'critical' ELSE 'warning' END AS level,
       recent_rows, recent_errors,
       ROUND(100 * recent_share, 1) AS recent_share_percent,
       ROUND(100 * baseline_share, 1) AS baseline_share_percent
FROM shares
WHERE recent_rows >= 10 AND recent_share > MAX(0.05, 2 * baseline_share)
ORDER BY level = 'warning', peer;"#;

/// `rejected_connections` of docs/DASHBOARD.md.
const REJECTED_CONNECTIONS_SQL: &str = r#"SELECT peer_id AS address, error_message AS reason,
       COUNT(*) AS attempts,
       SUM(created_at >= datetime(:now, '-1 hour')) AS last_hour,
       MIN(created_at) AS first_seen, MAX(created_at) AS last_seen
FROM p2p_connection_metrics
WHERE event_type = 'sync_failed' AND peer_name IS NULL
  AND created_at >= :since AND created_at <= :now
GROUP BY peer_id, error_message
ORDER BY last_seen DESC, address, reason
LIMIT 50;"#;

/// `alert_handshake_failures` of docs/DASHBOARD.md.
const ALERT_HANDSHAKE_FAILURES_SQL: &str = r#"WITH failures AS (
  SELECT id, peer_id, error_message, created_at
  FROM p2p_connection_metrics
  WHERE event_type = 'sync_failed' AND peer_name IS NULL
    AND created_at >= datetime(:now, '-1 hour') AND created_at <= :now
)
SELECT peer_id AS address, COUNT(*) AS attempts,
       (SELECT f2.error_message FROM failures f2 WHERE f2.peer_id = f.peer_id
         ORDER BY f2.created_at DESC, f2.id DESC LIMIT 1) AS reason,
       CASE WHEN COUNT(*) >= 30 THEN 'critical' ELSE 'warning' END AS level
FROM failures f
GROUP BY peer_id
HAVING COUNT(*) >= 3
ORDER BY level = 'warning', address;"#;

/// `alert_heartbeat_timeouts` of docs/DASHBOARD.md.
const ALERT_HEARTBEAT_TIMEOUTS_SQL: &str = r#"SELECT peer_id,
       (SELECT m2.peer_name FROM p2p_connection_metrics m2 WHERE m2.peer_id = m.peer_id
         AND m2.peer_name IS NOT NULL ORDER BY m2.created_at DESC, m2.id DESC LIMIT 1) AS peer,
       COUNT(*) AS timeouts,
       CASE WHEN COUNT(*) >= 10 THEN 'critical' ELSE 'warning' END AS level
FROM p2p_connection_metrics m
WHERE event_type = 'heartbeat_timeout' AND peer_name IS NOT NULL
  AND created_at >= datetime(:now, '-1 hour') AND created_at <= :now
GROUP BY peer_id
HAVING COUNT(*) >= 3
ORDER BY level = 'warning', peer;"#;

/// `alert_sync_stalled` of docs/DASHBOARD.md.
const ALERT_SYNC_STALLED_SQL: &str = r#"SELECT peer_id, COALESCE(MAX(peer_name), peer_id) AS peer,
       COUNT(*) AS stalls,
       (SELECT m2.error_message FROM p2p_connection_metrics m2 WHERE m2.peer_id = m.peer_id
         AND m2.event_type = 'sync_failed' AND m2.error_message LIKE 'catch-up stalled:%'
         ORDER BY m2.created_at DESC, m2.id DESC LIMIT 1) AS message,
       'critical' AS level
FROM p2p_connection_metrics m
WHERE event_type = 'sync_failed' AND peer_name IS NOT NULL AND error_message LIKE 'catch-up stalled:%'
  AND created_at >= datetime(:now, '-1 hour') AND created_at <= :now
GROUP BY peer_id
ORDER BY peer;"#;

/// `alert_clock_ahead` of docs/DASHBOARD.md.
const ALERT_CLOCK_AHEAD_SQL: &str = r#"SELECT json_extract(details, '$.origin') AS origin, COUNT(*) AS changes,
       MAX(json_extract(details, '$.clockAheadMs')) AS max_ahead_ms,
       SUM(json_extract(details, '$.heldBack') IS 1) AS held_back, 'critical' AS level
FROM p2p_sync_logs
WHERE created_at >= datetime(:now, '-1 hour') AND created_at <= :now
  AND details LIKE '%"clockAheadMs"%'
GROUP BY origin
ORDER BY origin;"#;

/// `alert_identity` of docs/DASHBOARD.md.
const ALERT_IDENTITY_SQL: &str = r#"SELECT COUNT(*) AS events, MAX(created_at) AS last_seen,
       (SELECT m2.error_message FROM p2p_connection_metrics m2 WHERE m2.event_type = 'sync_failed'
         AND (m2.error_message LIKE 'identity clash:%' OR m2.error_message LIKE 'own changes behind:%'
              OR m2.error_message LIKE 'own history diverged:%')
         ORDER BY m2.created_at DESC, m2.id DESC LIMIT 1) AS message,
       'critical' AS level
FROM p2p_connection_metrics
WHERE event_type = 'sync_failed'
  AND (error_message LIKE 'identity clash:%' OR error_message LIKE 'own changes behind:%'
       OR error_message LIKE 'own history diverged:%')
  AND created_at >= :since AND created_at <= :now
HAVING COUNT(*) > 0;"#;

/// Every till known by key or revoked, with both.
const TERMINALS_SQL: &str = r#"SELECT pos_id, public_key, since_seq, enrolled_at, revoked_after_seq, revoke_reason,
       revoked_by, revoked_at
FROM (SELECT k.pos_id, k.public_key, k.since_seq, k.enrolled_at, r.until_seq AS revoked_after_seq,
             r.reason AS revoke_reason, r.revoked_by, r.revoked_at
      FROM terminal_keys k LEFT JOIN terminal_revocations r ON r.pos_id = k.pos_id
      UNION ALL
      SELECT r.pos_id, NULL, NULL, NULL, r.until_seq, r.reason, r.revoked_by, r.revoked_at
      FROM terminal_revocations r WHERE r.pos_id NOT IN (SELECT pos_id FROM terminal_keys))
ORDER BY pos_id;"#;

/// `alert_forged` of docs/DASHBOARD.md.
const ALERT_FORGED_SQL: &str = r#"SELECT json_extract(details, '$.origin') AS origin, COUNT(*) AS changes,
       SUM(conflict_reason LIKE 'revoked:%') AS revoked,
       COALESCE(MAX(peer_name), MAX(peer_id)) AS peer, 'critical' AS level
FROM p2p_sync_logs
WHERE status = 'error' AND json_extract(details, '$.forged') IS 1
  AND created_at >= :since AND created_at <= :now
GROUP BY origin
ORDER BY origin;"#;

/// `alert_forks` of docs/DASHBOARD.md.
const ALERT_FORKS_SQL: &str = r#"SELECT json_extract(details, '$.origin') AS origin, COUNT(*) AS changes,
       COALESCE(MAX(peer_name), MAX(peer_id)) AS peer, 'critical' AS level
FROM p2p_sync_logs
WHERE status = 'error' AND conflict_reason LIKE 'fork:%'
  AND created_at >= :since AND created_at <= :now
GROUP BY origin
ORDER BY origin;"#;
