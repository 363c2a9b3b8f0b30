//! A change: one local write, as it travels between terminals and sits in every change log.
//!
//! Every change is stamped by its origin terminal with a gap-free sequence number ([`Seq`]),
//! a hybrid-logical-clock time ([`Hlc`]) and the causal context of the record it wrote (which
//! writes to that record the writer had seen). The context is what tells a concurrent edit
//! from a sequential one; the clock is what orders concurrent edits (SPEC rules 1-2).
//!
//! This module also owns the wire form of a change (`{type, action, data}` with the entity in
//! `data` and the stamps in `data.sync`), used both in live messages and in catch-up batches,
//! and stored verbatim in the change log so that relaying never re-encodes.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::entity::{self, EntityError, EntityKind, FieldMap, Sale, StockMovement};
use crate::hlc::Hlc;
use crate::ids::{EntityId, PosId, Seq};
use crate::time::rfc3339_ms;
use crate::vv::VersionVector;

/// One write made on one terminal, ready to merge anywhere.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    /// The terminal that made the write.
    pub origin: PosId,
    /// Its position in the origin's change log (1, 2, 3... no gaps).
    pub seq: Seq,
    /// When it was made, on the origin's hybrid logical clock. `None` only for changes from
    /// legacy writers that carry no `updatedAt` (SPEC rule 1's edge cases).
    pub hlc: Option<Hlc>,
    /// The record's causal context after this write (includes `origin: seq`).
    pub ctx: VersionVector,
    /// What kind of entity it writes.
    pub entity: EntityKind,
    /// Which record it writes.
    pub id: EntityId,
    /// What it does.
    pub body: ChangeBody,
}

/// What a change does to its record.
#[derive(Debug, Clone, PartialEq)]
pub enum ChangeBody {
    /// Creates or updates fields of a product, category or customer.
    Upsert {
        /// True for a create (only informs the log's `message_action`).
        create: bool,
        /// The fields written, canonical.
        fields: FieldMap,
    },
    /// Deletes a product, category or customer (a tombstone).
    Delete,
    /// Records a completed sale: an immutable ticket with its sale movements.
    Sale(Box<Sale>),
    /// Changes a ticket's status (refund or cancel), with the stock returned.
    TicketStatus {
        /// Refund or cancel.
        action: TicketAction,
        /// `status` and optionally `notes`.
        fields: FieldMap,
        /// `return` movements, one per refunded line.
        returns: Vec<StockMovement>,
    },
    /// Records a stock movement (an adjustment or a count).
    Movement {
        /// True when it comes from a stock count.
        count: bool,
        /// The movement.
        movement: StockMovement,
    },
}

/// The two ways a ticket changes after the sale.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TicketAction {
    /// Some or all lines refunded.
    Refund,
    /// The whole ticket voided.
    Cancel,
}

/// Why a wire change could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChangeError {
    /// Type or action unknown, or not a valid pair.
    #[error("unsupported change {entity}/{action}")]
    Unsupported {
        /// The `type` received.
        entity: String,
        /// The `action` received.
        action: String,
    },
    /// `data` or `data.sync` is missing or malformed.
    #[error("malformed change: {0}")]
    Malformed(String),
    /// The entity inside is invalid.
    #[error(transparent)]
    Entity(#[from] EntityError),
}

/// The stamps of a change on the wire (`data.sync`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct WireStamp {
    origin: PosId,
    seq: Seq,
    #[serde(default)]
    hlc: Option<Hlc>,
    #[serde(default)]
    ctx: VersionVector,
}

/// The wire form of a change: `{type, action, data}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WireChange {
    /// The entity kind.
    #[serde(rename = "type")]
    pub entity: String,
    /// create, update, delete, refund, cancel, adjust, count.
    pub action: String,
    /// The entity (or the fields written) plus `sync` stamps.
    pub data: Value,
}

impl Change {
    /// The log's `message_action` for this change.
    pub fn action(&self) -> &'static str {
        match &self.body {
            ChangeBody::Upsert { create: true, .. } | ChangeBody::Sale(_) => "create",
            ChangeBody::Upsert { create: false, .. } => "update",
            ChangeBody::Delete => "delete",
            ChangeBody::TicketStatus { action: TicketAction::Refund, .. } => "refund",
            ChangeBody::TicketStatus { action: TicketAction::Cancel, .. } => "cancel",
            ChangeBody::Movement { count: true, .. } => "count",
            ChangeBody::Movement { count: false, .. } => "adjust",
        }
    }

    /// `updatedAt` of the write (RFC 3339), if it has a clock time.
    pub fn updated_at(&self) -> Option<String> {
        self.hlc.map(|hlc| rfc3339_ms(hlc.ms()))
    }

    /// Encodes the change for the wire and the change log.
    pub fn to_wire(&self) -> WireChange {
        let mut data = match &self.body {
            ChangeBody::Upsert { fields, .. } => fields_object(fields),
            ChangeBody::Delete => Map::new(),
            ChangeBody::Sale(sale) => object_of(sale),
            ChangeBody::TicketStatus { fields, returns, .. } => {
                let mut data = fields_object(fields);
                data.insert("returns".into(), json!(returns));
                data
            }
            ChangeBody::Movement { movement, .. } => object_of(movement),
        };
        data.insert("id".into(), Value::String(self.id.to_string()));
        if let Some(updated_at) = self.updated_at() {
            data.insert("updatedAt".into(), Value::String(updated_at));
        }
        let stamp =
            WireStamp { origin: self.origin.clone(), seq: self.seq, hlc: self.hlc, ctx: self.ctx.clone() };
        data.insert("sync".into(), json!(stamp));
        WireChange {
            entity: self.entity.as_str().to_string(),
            action: self.action().to_string(),
            data: Value::Object(data),
        }
    }

    /// Decodes and validates a wire change. Nothing unchecked gets through: the entity's
    /// fields pass their rules, sales add up, the id and stamps are well formed.
    pub fn from_wire(wire: &WireChange) -> Result<Change, ChangeError> {
        let unsupported = || ChangeError::Unsupported {
            entity: wire.entity.chars().take(40).collect(),
            action: wire.action.chars().take(40).collect(),
        };
        let entity: EntityKind = wire.entity.parse().map_err(|_| unsupported())?;
        let mut data = wire
            .data
            .as_object()
            .cloned()
            .ok_or_else(|| ChangeError::Malformed("data is not an object".into()))?;
        let stamp =
            data.remove("sync").ok_or_else(|| ChangeError::Malformed("data.sync is missing".into()))?;
        let stamp: WireStamp = serde_json::from_value(stamp)
            .map_err(|err| ChangeError::Malformed(format!("data.sync: {err}")))?;
        let id = data
            .get("id")
            .and_then(Value::as_str)
            .ok_or_else(|| ChangeError::Malformed("data.id is missing".into()))?;
        let id = EntityId::parse(id).map_err(|err| ChangeError::Malformed(format!("data.id: {err}")))?;
        if stamp.seq.0 == 0 {
            return Err(ChangeError::Malformed("data.sync.seq must be at least 1".into()));
        }
        let body = match (entity, wire.action.as_str()) {
            (EntityKind::Product | EntityKind::Category | EntityKind::Customer, "create" | "update") => {
                data.remove("sync");
                ChangeBody::Upsert {
                    create: wire.action == "create",
                    fields: entity::parse_fields(entity, &Value::Object(data))?,
                }
            }
            (EntityKind::Product | EntityKind::Category | EntityKind::Customer, "delete") => {
                ChangeBody::Delete
            }
            (EntityKind::Ticket, "create") => {
                let sale: Sale = decode(data)?;
                sale.validate()?;
                if sale.id != id {
                    return Err(ChangeError::Malformed("sale id differs from data.id".into()));
                }
                ChangeBody::Sale(Box::new(sale))
            }
            (EntityKind::Ticket, "refund" | "cancel") => {
                let returns: Vec<StockMovement> = match data.remove("returns") {
                    Some(returns) => decode(returns)?,
                    None => Vec::new(),
                };
                let fields = entity::parse_fields(entity, &Value::Object(data))?;
                entity::check_required(entity, &fields)?;
                let action =
                    if wire.action == "refund" { TicketAction::Refund } else { TicketAction::Cancel };
                ChangeBody::TicketStatus { action, fields, returns }
            }
            (EntityKind::Stock, "adjust" | "count") => {
                let movement: StockMovement = decode(data)?;
                if movement.id != id {
                    return Err(ChangeError::Malformed("movement id differs from data.id".into()));
                }
                ChangeBody::Movement { count: wire.action == "count", movement }
            }
            _ => return Err(unsupported()),
        };
        Ok(Change { origin: stamp.origin, seq: stamp.seq, hlc: stamp.hlc, ctx: stamp.ctx, entity, id, body })
    }
}

fn fields_object(fields: &FieldMap) -> Map<String, Value> {
    fields.iter().map(|(name, value)| ((*name).to_string(), value.clone())).collect()
}

fn object_of<T: Serialize>(value: &T) -> Map<String, Value> {
    match serde_json::to_value(value) {
        Ok(Value::Object(map)) => map,
        // Invariant: Sale and StockMovement serialize to JSON objects.
        _ => Map::new(),
    }
}

fn decode<T: for<'de> Deserialize<'de>>(data: impl Into<Value>) -> Result<T, ChangeError> {
    let mut value = data.into();
    if let Value::Object(map) = &mut value {
        map.remove("updatedAt");
        map.remove("sync");
        map.remove("status");
    }
    serde_json::from_value(value).map_err(|err| ChangeError::Malformed(err.to_string()))
}
