//! Local writes of mutable records: create, partial update, delete of products, categories
//! and customers. Each is validated first (SPEC section 8), then written with its change in
//! one transaction; a rejected write leaves nothing behind. [`Store::upsert_record`] is the
//! write an import makes: it creates nothing twice and writes only the fields that differ.

use possync_core::entity::{self, FieldMap};
use possync_core::{ChangeBody, EntityId, EntityKind, RecordState, Version};
use rusqlite::OptionalExtension;
use serde_json::Value;

use crate::Store;
use crate::error::{Result, StoreError};
use crate::records;

impl Store {
    /// Creates a record from a JSON object of fields; `id` may be supplied, else a UUIDv7 is
    /// made. Returns the record as the API shows it.
    pub fn create_record(&mut self, kind: EntityKind, body: &Value) -> Result<Value> {
        check_mutable(kind, "create")?;
        let id = match body.get("id") {
            None | Some(Value::Null) => self.new_id(),
            Some(Value::String(raw)) => {
                EntityId::parse(raw.as_str()).map_err(|err| StoreError::invalid("id", err.to_string()))?
            }
            Some(_) => return Err(StoreError::invalid("id", "expected a string")),
        };
        let mut fields = entity::parse_fields(kind, body)?;
        entity::check_required(kind, &fields)?;
        self.fill_defaults(kind, &mut fields);
        self.write(true, |store| {
            if records::load(&store.conn, &store.origins, kind, &id)?.is_some() {
                return Err(StoreError::AlreadyExists { kind, id: id.clone() });
            }
            store.check_references(kind, &id, &fields)?;
            store.write_fields(kind, &id, RecordState::default(), fields, true)
        })
    }

    /// Creates the record `id` from `body`, or brings a live one to `body`'s values: only the
    /// fields whose value differs are written (one change), so running the same upsert twice
    /// writes nothing the second time. A record deleted on this terminal stays deleted (its
    /// deletion was a decision taken after whatever is being imported).
    pub fn upsert_record(&mut self, kind: EntityKind, id: &EntityId, body: &Value) -> Result<Upserted> {
        check_mutable(kind, "create")?;
        let mut fields = entity::parse_fields(kind, body)?;
        self.write(true, |store| match records::load(&store.conn, &store.origins, kind, id)? {
            None => {
                entity::check_required(kind, &fields)?;
                store.fill_defaults(kind, &mut fields);
                store.check_references(kind, id, &fields)?;
                store.write_fields(kind, id, RecordState::default(), fields, true)?;
                Ok(Upserted::Created)
            }
            Some(state) if state.deleted => Ok(Upserted::Deleted),
            Some(state) => {
                fields.retain(|name, value| match state.values.get(name) {
                    Some(held) => held != value,
                    None => !value.is_null(),
                });
                if fields.is_empty() {
                    return Ok(Upserted::Unchanged);
                }
                check_mutable(kind, "update")?;
                store.check_references(kind, id, &fields)?;
                store.write_fields(kind, id, state, fields, false)?;
                Ok(Upserted::Updated)
            }
        })
    }

    /// The live product whose `sku` or `barcode` (`field`) is `value`, if there is one.
    pub fn live_product_by(&self, field: ProductKey, value: &str) -> Result<Option<EntityId>> {
        let sql = match field {
            ProductKey::Sku => "SELECT id FROM products WHERE sku = ?1 AND deleted = 0 LIMIT 1",
            ProductKey::Barcode => "SELECT id FROM products WHERE barcode = ?1 AND deleted = 0 LIMIT 1",
        };
        let id: Option<String> =
            self.conn.prepare_cached(sql)?.query_row([value], |row| row.get(0)).optional()?;
        id.map(|id| EntityId::parse(id).map_err(|err| StoreError::Corrupt(err.to_string()))).transpose()
    }

    /// The defaults a record gets when it is created without them.
    fn fill_defaults(&self, kind: EntityKind, fields: &mut FieldMap) {
        fields.entry("createdAt").or_insert_with(|| Value::String(self.now_rfc3339()));
        for (name, default) in [
            ("isActive", Value::Bool(true)),
            ("discountRate", Value::from("0")),
            ("displayOrder", Value::from(0)),
        ] {
            if let Some(spec) = kind.field(name) {
                fields.entry(spec.name).or_insert(default);
            }
        }
    }

    /// Changes some fields of a live record. Returns the record as the API shows it.
    pub fn update_record(&mut self, kind: EntityKind, id: &EntityId, body: &Value) -> Result<Value> {
        check_mutable(kind, "update")?;
        let fields = entity::parse_fields(kind, body)?;
        if fields.is_empty() {
            return Err(StoreError::invalid("body", "no field to update"));
        }
        self.write(true, |store| {
            let state = store.live_record(kind, id)?;
            store.check_references(kind, id, &fields)?;
            store.write_fields(kind, id, state, fields, false)
        })
    }

    /// Deletes a live record (a tombstone that travels to every terminal).
    pub fn delete_record(&mut self, kind: EntityKind, id: &EntityId) -> Result<()> {
        check_mutable(kind, "delete")?;
        self.write(true, |store| {
            let mut state = store.live_record(kind, id)?;
            let newest = state.newest().cloned();
            let change = store.emit_local(kind, id, ChangeBody::Delete, &state.ctx, newest.as_ref())?;
            state.deleted = true;
            state.existence = Some(local_version(&change));
            state.ctx = change.ctx;
            records::save(&store.conn, &mut store.origins, kind, id, &state)
        })
    }

    /// The state of a live record, or NotFound.
    pub(crate) fn live_record(&self, kind: EntityKind, id: &EntityId) -> Result<RecordState> {
        match records::load(&self.conn, &self.origins, kind, id)? {
            Some(state) if !state.deleted => Ok(state),
            _ => Err(StoreError::not_found(kind, id)),
        }
    }

    /// Whether a live (not deleted) record `id` of `kind` exists: one indexed read, without
    /// decoding its fields and metadata as [`Store::live_record`] does.
    pub(crate) fn is_live(&self, kind: EntityKind, id: &EntityId) -> Result<bool> {
        let sql = match kind {
            EntityKind::Product => "SELECT 1 FROM products WHERE id = ?1 AND deleted = 0",
            EntityKind::Category => "SELECT 1 FROM categories WHERE id = ?1 AND deleted = 0",
            EntityKind::Customer => "SELECT 1 FROM customers WHERE id = ?1 AND deleted = 0",
            EntityKind::User => "SELECT 1 FROM users WHERE id = ?1 AND deleted = 0",
            EntityKind::CashSession => "SELECT 1 FROM cash_sessions WHERE id = ?1 AND deleted = 0",
            EntityKind::ZReport => "SELECT 1 FROM z_reports WHERE id = ?1 AND deleted = 0",
            EntityKind::Terminal => "SELECT 1 FROM terminal_keys WHERE pos_id = ?1",
            EntityKind::Ticket => "SELECT 1 FROM tickets WHERE id = ?1",
            EntityKind::Stock => "SELECT 1 FROM stock_movements WHERE id = ?1",
        };
        Ok(self.conn.prepare_cached(sql)?.query_row([id.as_str()], |_| Ok(())).optional()?.is_some())
    }

    /// Writes local field values over `state` as one change; returns the API form.
    pub(crate) fn write_fields(
        &mut self,
        kind: EntityKind,
        id: &EntityId,
        mut state: RecordState,
        fields: FieldMap,
        create: bool,
    ) -> Result<Value> {
        let newest = state.newest().cloned();
        let body = ChangeBody::Upsert { create, fields: fields.clone() };
        let change = self.emit_local(kind, id, body, &state.ctx, newest.as_ref())?;
        let version = local_version(&change);
        for (name, value) in fields {
            state.values.insert(name, value);
            state.versions.insert(name, version.clone());
        }
        state.deleted = false;
        state.existence = Some(version);
        state.ctx = change.ctx;
        records::save(&self.conn, &mut self.origins, kind, id, &state)?;
        let stock = if kind == EntityKind::Product {
            let stock = records::sum_movements(&self.conn, id)?;
            if create {
                self.conn.execute(
                    "UPDATE products SET stock = ?2 WHERE id = ?1",
                    rusqlite::params![id.as_str(), possync_core::decimal::to_text(stock)],
                )?;
            }
            Some(stock)
        } else {
            None
        };
        Ok(records::api_json(kind, id, &state, stock))
    }

    /// Local writes keep references valid and SKUs/barcodes unique among live products.
    fn check_references(&self, kind: EntityKind, id: &EntityId, fields: &FieldMap) -> Result<()> {
        let reference = match kind {
            EntityKind::Product => {
                fields.get("categoryId").map(|value| (value, EntityKind::Category, "categoryId"))
            }
            EntityKind::Category => {
                fields.get("parentId").map(|value| (value, EntityKind::Category, "parentId"))
            }
            _ => None,
        };
        if let Some((Value::String(target), target_kind, field)) = reference {
            let target = EntityId::parse(target.as_str())
                .map_err(|err| StoreError::invalid(field, err.to_string()))?;
            if kind == EntityKind::Category && &target == id {
                return Err(StoreError::invalid(field, "a category cannot be its own parent"));
            }
            if !self.is_live(target_kind, &target)? {
                return Err(StoreError::invalid(field, format!("{target_kind} {target} does not exist")));
            }
        }
        // Keys unique among the live records of a kind (for local writes: two tills may
        // still create the same one while apart; both records then exist).
        let unique: &[&str] = match kind {
            EntityKind::Product => &["sku", "barcode"],
            EntityKind::User => &["username"],
            _ => &[],
        };
        if !unique.is_empty() {
            let table = records::table(kind);
            for &field in unique {
                let Some(Value::String(value)) = fields.get(field) else { continue };
                let other: Option<String> = self
                    .conn
                    .prepare_cached(&format!(
                        "SELECT id FROM {table} WHERE {field} = ?1 AND deleted = 0 AND id <> ?2 LIMIT 1"
                    ))?
                    .query_row([value.as_str(), id.as_str()], |row| row.get(0))
                    .optional()?;
                if let Some(other) = other {
                    let other = EntityId::parse(other).map_err(|err| StoreError::Corrupt(err.to_string()))?;
                    return Err(StoreError::Duplicate { kind, field, value: value.clone(), other });
                }
            }
        }
        Ok(())
    }
}

/// What [`Store::upsert_record`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upserted {
    /// The record did not exist: it was created.
    Created,
    /// It existed and some fields differed: they were written (one change).
    Updated,
    /// It existed with the same values: nothing was written.
    Unchanged,
    /// It was deleted on this terminal: nothing was written.
    Deleted,
}

/// The keys a product can be found by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProductKey {
    /// The SKU (unique among live products).
    Sku,
    /// The barcode (unique among live products that have one).
    Barcode,
}

/// A local write may only make changes every peer accepts: no edit of a Z report, no
/// deletion of a cash session ([`EntityKind::allows_record_action`]), no record write of a
/// fact.
fn check_mutable(kind: EntityKind, action: &str) -> Result<()> {
    if kind.allows_record_action(action) {
        Ok(())
    } else {
        Err(StoreError::InvalidState(format!("{kind} records cannot be {action}d this way")))
    }
}

/// The version a local change gives the fields it writes.
pub(crate) fn local_version(change: &possync_core::Change) -> Version {
    Version { hlc: change.hlc, origin: change.origin.clone(), seq: change.seq }
}
