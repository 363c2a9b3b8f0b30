//! Mutable records (products, categories, customers, and a ticket's status/notes): how a
//! [`RecordState`] maps to a table row, and the JSON the API shows.
//!
//! Column lists come from the entity field specs in `possync_core::entity`, so adding a field
//! there and a column in a migration is all it takes.

use std::sync::LazyLock;

use possync_core::entity::{FieldSpec, FieldType};
use possync_core::{EntityId, EntityKind, RecordState, decimal};
use rusqlite::types::{ToSqlOutput, Value as SqlValue, ValueRef};
use rusqlite::{Connection, OptionalExtension, Row, params_from_iter};
use rust_decimal::Decimal;
use serde_json::{Map, Value};

use crate::error::{Result, StoreError};
use crate::meta::{self, Origins};

/// The table holding a kind's rows.
pub(crate) fn table(kind: EntityKind) -> &'static str {
    match kind {
        EntityKind::Product => "products",
        EntityKind::Category => "categories",
        EntityKind::Customer => "customers",
        EntityKind::Ticket => "tickets",
        EntityKind::Stock => "stock_movements",
        EntityKind::User => "users",
        EntityKind::CashSession => "cash_sessions",
        EntityKind::ZReport => "z_reports",
        EntityKind::Terminal => "terminal_keys",
    }
}

struct KindSql {
    select: String,
    upsert: String,
}

fn build_sql(kind: EntityKind) -> KindSql {
    let columns: Vec<&str> = kind.fields().iter().map(|spec| spec.column).collect();
    let table = table(kind);
    // Tickets are never deleted: their `deleted` is a constant.
    let deleted = if kind == EntityKind::Ticket { "0" } else { "deleted" };
    let select = format!("SELECT {}, {deleted}, sync_meta FROM {table} WHERE id = ?1", columns.join(", "));
    let upsert = if kind == EntityKind::Ticket {
        // Tickets are inserted whole by the sale; later writes only touch the mutable part.
        let assignments: Vec<String> =
            columns.iter().enumerate().map(|(i, column)| format!("{column} = ?{}", i + 2)).collect();
        let n = columns.len();
        format!(
            "UPDATE tickets SET {}, updated_at = ?{}, sync_meta = ?{} WHERE id = ?1",
            assignments.join(", "),
            n + 2,
            n + 4
        )
    } else {
        let all: Vec<&str> = std::iter::once("id")
            .chain(columns.iter().copied())
            .chain(["updated_at", "deleted", "sync_meta"])
            .collect();
        let placeholders: Vec<String> = (1..=all.len()).map(|i| format!("?{i}")).collect();
        let updates: Vec<String> =
            all[1..].iter().map(|column| format!("{column} = excluded.{column}")).collect();
        format!(
            "INSERT INTO {table} ({}) VALUES ({}) ON CONFLICT (id) DO UPDATE SET {}",
            all.join(", "),
            placeholders.join(", "),
            updates.join(", ")
        )
    };
    KindSql { select, upsert }
}

static SQL: LazyLock<Vec<(EntityKind, KindSql)>> = LazyLock::new(|| {
    EntityKind::ALL
        .into_iter()
        .filter(|kind| kind.is_record() || *kind == EntityKind::Ticket)
        .map(|kind| (kind, build_sql(kind)))
        .collect()
});

fn sql(kind: EntityKind) -> Result<&'static KindSql> {
    SQL.iter()
        .find(|(candidate, _)| *candidate == kind)
        .map(|(_, sql)| sql)
        .ok_or_else(|| StoreError::InvalidState(format!("{kind} is not a mutable record")))
}

/// A field value as an SQL value (text is bound from the value, not copied).
fn to_sql<'a>(spec: &FieldSpec, value: &'a Value) -> ToSqlOutput<'a> {
    match (spec.ty, value) {
        (_, Value::Null) => ToSqlOutput::Borrowed(ValueRef::Null),
        (FieldType::Bool, Value::Bool(flag)) => ToSqlOutput::Owned(SqlValue::Integer(i64::from(*flag))),
        (FieldType::Int, Value::Number(number)) => number
            .as_i64()
            .map_or(ToSqlOutput::Borrowed(ValueRef::Null), |n| ToSqlOutput::Owned(SqlValue::Integer(n))),
        (_, Value::String(text)) => ToSqlOutput::Borrowed(ValueRef::Text(text.as_bytes())),
        (_, other) => ToSqlOutput::Owned(SqlValue::Text(other.to_string())),
    }
}

/// An SQL value as a canonical field value.
fn from_sql(spec: &FieldSpec, value: ValueRef<'_>) -> Result<Value> {
    Ok(match (spec.ty, value) {
        (_, ValueRef::Null) => Value::Null,
        (FieldType::Bool, ValueRef::Integer(flag)) => Value::Bool(flag != 0),
        (FieldType::Int, ValueRef::Integer(number)) => Value::from(number),
        (FieldType::StorePrices, ValueRef::Text(text)) => match serde_json::from_slice::<Value>(text) {
            Ok(prices @ Value::Object(_)) => prices,
            _ => return Err(StoreError::Corrupt(format!("column {} holds no JSON object", spec.column))),
        },
        (_, ValueRef::Text(text)) => Value::String(String::from_utf8_lossy(text).into_owned()),
        (_, other) => return Err(StoreError::Corrupt(format!("column {} holds {other:?}", spec.column))),
    })
}

fn state_from_row(kind: EntityKind, row: &Row<'_>, origins: &Origins) -> Result<RecordState> {
    let specs = kind.fields();
    let meta_raw: String = row.get(specs.len() + 1)?;
    let mut state = meta::decode(kind, &meta_raw, origins)?;
    for (i, spec) in specs.iter().enumerate() {
        if state.versions.contains_key(spec.name) {
            state.values.insert(spec.name, from_sql(spec, row.get_ref(i)?)?);
        }
    }
    Ok(state)
}

/// Loads a record's state (deleted ones included), or `None` if it was never seen.
pub(crate) fn load(
    conn: &Connection,
    origins: &Origins,
    kind: EntityKind,
    id: &EntityId,
) -> Result<Option<RecordState>> {
    let mut statement = conn.prepare_cached(&sql(kind)?.select)?;
    let mut rows = statement.query([id.as_str()])?;
    match rows.next()? {
        Some(row) => Ok(Some(state_from_row(kind, row, origins)?)),
        None => Ok(None),
    }
}

/// Writes a record's state (insert or update).
pub(crate) fn save(
    conn: &Connection,
    origins: &mut Origins,
    kind: EntityKind,
    id: &EntityId,
    state: &RecordState,
) -> Result<()> {
    let meta = meta::encode(kind, state, origins, conn)?;
    let mut values: Vec<ToSqlOutput<'_>> = Vec::with_capacity(kind.fields().len() + 4);
    values.push(ToSqlOutput::Borrowed(ValueRef::Text(id.as_str().as_bytes())));
    for spec in kind.fields() {
        values.push(
            state
                .values
                .get(spec.name)
                .map_or(ToSqlOutput::Borrowed(ValueRef::Null), |value| to_sql(spec, value)),
        );
    }
    values.push(ToSqlOutput::Owned(state.updated_at().map_or(SqlValue::Null, SqlValue::Text)));
    values.push(ToSqlOutput::Owned(SqlValue::Integer(i64::from(state.deleted))));
    values.push(ToSqlOutput::Owned(SqlValue::Text(meta)));
    let mut statement = conn.prepare_cached(&sql(kind)?.upsert)?;
    statement.execute(params_from_iter(values))?;
    Ok(())
}

/// The product's cached stock (sum of its movements).
pub(crate) fn product_stock(conn: &Connection, id: &EntityId) -> Result<Decimal> {
    let stock: Option<String> = conn
        .prepare_cached("SELECT stock FROM products WHERE id = ?1")?
        .query_row([id.as_str()], |row| row.get(0))
        .optional()?;
    match stock {
        Some(stock) => {
            decimal::parse_stored(&stock).map_err(|err| StoreError::Corrupt(format!("products.stock: {err}")))
        }
        None => sum_movements(conn, id),
    }
}

/// Sums a product's stock movements (used when a product row appears after its movements).
pub(crate) fn sum_movements(conn: &Connection, id: &EntityId) -> Result<Decimal> {
    let mut statement = conn.prepare_cached("SELECT quantity FROM stock_movements WHERE product_id = ?1")?;
    let mut total = Decimal::ZERO;
    for quantity in statement.query_map([id.as_str()], |row| row.get::<_, String>(0))? {
        let quantity = quantity?;
        let quantity = decimal::parse_stored(&quantity)
            .map_err(|err| StoreError::Corrupt(format!("movement quantity: {err}")))?;
        total = total
            .checked_add(quantity)
            .ok_or_else(|| StoreError::Corrupt(format!("stock of {id} overflows")))?;
    }
    Ok(total)
}

/// The API form of a record: every field (null when unset), amounts as JSON numbers, `id`,
/// `updatedAt`, and for products `stock`.
pub(crate) fn api_json(
    kind: EntityKind,
    id: &EntityId,
    state: &RecordState,
    stock: Option<Decimal>,
) -> Value {
    let mut object = Map::new();
    object.insert("id".into(), Value::String(id.to_string()));
    for spec in kind.fields() {
        let value = state.values.get(spec.name).cloned().unwrap_or(Value::Null);
        object.insert(spec.name.to_string(), api_value(spec, value));
    }
    if let Some(stock) = stock {
        object.insert("stock".into(), decimal::to_json(stock));
    }
    object.insert("updatedAt".into(), state.updated_at().map_or(Value::Null, Value::String));
    Value::Object(object)
}

/// A conflict snapshot (local, remote or final record) in one form for every row, so that a
/// report can diff them: the id, every field of the kind in API form (amounts as JSON
/// numbers, a field the record lacks as null), `updatedAt`, and `deleted: true` for a
/// tombstone.
pub(crate) fn snapshot_json(kind: EntityKind, record: &Value) -> Value {
    let mut object = Map::new();
    object.insert("id".into(), record.get("id").cloned().unwrap_or(Value::Null));
    for spec in kind.fields() {
        let value = record.get(spec.name).cloned().unwrap_or(Value::Null);
        object.insert(spec.name.to_string(), api_value(spec, value));
    }
    object.insert("updatedAt".into(), record.get("updatedAt").cloned().unwrap_or(Value::Null));
    if record.get("deleted") == Some(&Value::Bool(true)) {
        object.insert("deleted".into(), Value::Bool(true));
    }
    Value::Object(object)
}

/// A canonical field value in API form (amounts become numbers).
pub(crate) fn api_value(spec: &FieldSpec, value: Value) -> Value {
    match (spec.ty, &value) {
        (
            FieldType::Amount { .. } | FieldType::OptAmount | FieldType::OptSignedAmount,
            Value::String(text),
        ) => decimal::parse(text).map_or(value, decimal::to_json),
        (FieldType::StorePrices, Value::Object(prices)) => Value::Object(
            prices
                .iter()
                .map(|(store, price)| {
                    let number =
                        price.as_str().and_then(|text| decimal::parse(text).ok()).map(decimal::to_json);
                    (store.clone(), number.unwrap_or_else(|| price.clone()))
                })
                .collect(),
        ),
        _ => value,
    }
}
