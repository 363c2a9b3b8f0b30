//! Read-only queries, on their own connections so the API never waits behind the writer.
//!
//! Lists answer with JSON objects in the API's camelCase form; audit rows come back as
//! their tables hold them (column names camelCased), newest first.

use std::path::Path;

use possync_core::{EntityId, EntityKind, Seq, VersionVector};
use rusqlite::types::ValueRef;
use rusqlite::{Connection, OpenFlags, Params, Row};
use serde_json::{Map, Value, json};

use crate::error::{Result, StoreError};
use crate::meta::Origins;
use crate::records;
use crate::select::{self, Selection};
use crate::settings::{self, SettingRow};

/// A read-only connection to a node's database.
pub struct StoreReader {
    conn: Connection,
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

/// Filters for ticket lists.
#[derive(Debug, Clone, Default)]
pub struct TicketQuery {
    /// Tickets of this day only (`YYYY-MM-DD`, UTC).
    pub day: Option<String>,
    /// Tickets of this terminal only.
    pub pos_id: Option<String>,
    /// At most this many (default 100, at most 1000).
    pub limit: Option<u32>,
    /// Skip this many.
    pub offset: Option<u32>,
}

fn paging(limit: Option<u32>, offset: Option<u32>) -> (i64, i64) {
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
        select::select_changes(&self.conn, since, after_cursor, limit)
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
        let search_clause = match kind {
            EntityKind::Product => {
                "(?1 IS NULL OR name LIKE ?1 ESCAPE '\\' OR sku LIKE ?1 ESCAPE '\\' OR barcode = ?4)"
            }
            _ => "(?1 IS NULL OR name LIKE ?1 ESCAPE '\\' OR ?4 IS NULL)",
        };
        let category_clause =
            if kind == EntityKind::Product { "(?5 IS NULL OR category_id = ?5)" } else { "?5 IS NULL" };
        let sql = format!(
            "SELECT id FROM {table} WHERE deleted = 0 AND {search_clause} AND {category_clause}
             ORDER BY name COLLATE NOCASE, id LIMIT ?2 OFFSET ?3"
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

    /// A ticket with its lines and payments.
    pub fn ticket(&self, id: &EntityId) -> Result<Option<Value>> {
        ticket_json(&self.conn, id)
    }

    /// Tickets, newest first, by day and/or terminal.
    pub fn list_tickets(&self, query: &TicketQuery) -> Result<Vec<Value>> {
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
        self.audit_rows("p2p_conflicts", limit, offset)
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
                "tickets",
                "id, ticket_number, pos_id, customer_id, subtotal, discount_amount, total_amount, status, notes, created_at, updated_at",
            ),
            (
                "ticket_lines",
                "ticket_id, line_no, product_id, product_name, product_sku, quantity, unit_price, discount_rate, discount_amount, total_amount",
            ),
            ("ticket_payments", "ticket_id, line_no, method, amount, reference"),
            ("stock_movements", "id, product_id, type, quantity, reference, pos_id, created_at"),
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
        "SELECT id, ticket_number, pos_id, customer_id, subtotal, discount_amount, total_amount, status, notes,
                created_at, updated_at FROM tickets WHERE id = ?1",
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
    Ok(rows_json(conn, "SELECT * FROM p2p_conflicts WHERE id = ?1", [id])?.into_iter().next())
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
