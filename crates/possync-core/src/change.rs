//! A change: one local write, as it travels between terminals and sits in every change log.
//!
//! Every change is stamped by its origin terminal with a gap-free sequence number ([`Seq`]),
//! a hybrid-logical-clock time ([`Hlc`]) and the causal context of the record it wrote (which
//! writes to that record the writer had seen). The context is what tells a concurrent edit
//! from a sequential one; the clock is what orders concurrent edits (SPEC rules 1-2).
//!
//! This module also owns the wire form of a change (`{type, action, data}` with the entity in
//! `data` and the stamps in `data.sync`), used both in live messages and in catch-up batches,
//! and stored verbatim in the change log so that relaying never re-encodes. `data` is kept
//! as JSON text ([`RawValue`]): it is written once, by the origin, and from then on moves from
//! a sender's log into a frame, out of the frame and into the receiver's log as the same
//! bytes. Only the store's merge parses it ([`Change::from_wire`]), once per change applied.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};

use crate::entity::{self, EntityError, EntityKind, FieldMap, Sale, StockMovement};
use crate::hlc::Hlc;
use crate::ids::{EntityId, PosId, Seq};
use crate::merge::Version;
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
    /// Set on a head office's copy of a store's customer write (docs/CHAIN.md "Chain-wide
    /// customers"): the write it re-publishes. The copy carries that write's clock time,
    /// context and fields, and merges as that write ([`Change::version`]).
    pub copy_of: Option<CopyOf>,
}

/// The write a head-office copy re-publishes (`data.sync.copyOf`): its origin and seq.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyOf {
    /// The store till that made the write.
    pub origin: PosId,
    /// Its seq in that till's log.
    pub seq: Seq,
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
    /// Enrolls the origin's signing key (`terminal`/`enroll`, id = the origin): from this
    /// change on, every change of the origin is signed by it.
    Enroll {
        /// The public key (base64, 32 bytes).
        public_key: String,
    },
    /// Revokes a till (`terminal`/`revoke`, id = the revoked till's posId): its changes
    /// after `until_seq` are refused on every till.
    Revoke {
        /// The last seq of the revoked till that stays accepted.
        until_seq: Seq,
        /// Why (lost, stolen...).
        reason: Option<String>,
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
    #[serde(default, rename = "copyOf", skip_serializing_if = "Option::is_none")]
    copy_of: Option<CopyOf>,
}

/// The wire form of a change: `{type, action, data}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WireChange {
    /// The entity kind.
    #[serde(rename = "type")]
    pub entity: String,
    /// create, update, delete, refund, cancel, adjust, count.
    pub action: String,
    /// The entity (or the fields written) plus `sync` stamps, as the origin wrote it: JSON
    /// text, not checked to be an object until it is decoded.
    pub data: Box<RawValue>,
    /// The origin's Ed25519 signature of `type`, `action` and `data` (base64), absent on
    /// changes written before their origin enrolled a key ([`crate::signature`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sig: Option<String>,
}

/// Two wire changes are equal when they say the same thing in the same bytes.
impl PartialEq for WireChange {
    fn eq(&self, other: &WireChange) -> bool {
        self.entity == other.entity
            && self.action == other.action
            && self.data.get() == other.data.get()
            && self.sig == other.sig
    }
}

/// The stamps of a wire change as far as they can be read without decoding the rest.
#[derive(Debug, Clone, PartialEq)]
pub struct StampPeek {
    /// `data.sync.origin`.
    pub origin: PosId,
    /// `data.sync.seq`, at least 1.
    pub seq: Seq,
    /// `data.sync.hlc`, when present and well formed.
    pub hlc: Option<Hlc>,
}

impl WireChange {
    /// A short fingerprint of the change's content (the first 8 bytes of the SHA-256 of its
    /// `data` text, in hex). `data` travels byte for byte, so every terminal holding the
    /// same change computes the same fingerprint: comparing fingerprints at one origin and
    /// seq tells two histories of that origin apart without sending the changes
    /// (a handshake's `heads`).
    pub fn fingerprint(&self) -> String {
        use sha2::{Digest, Sha256};
        let digest = Sha256::digest(self.data.get().as_bytes());
        digest.iter().take(8).map(|byte| format!("{byte:02x}")).collect()
    }

    /// A wire change whose `data` is the text of `data`.
    pub fn new(entity: impl Into<String>, action: impl Into<String>, data: &Value) -> WireChange {
        WireChange { entity: entity.into(), action: action.into(), data: raw_json(data), sig: None }
    }

    /// `data` parsed into a JSON object (the form [`Change::decode`] takes).
    pub fn data_object(&self) -> Result<Map<String, Value>, ChangeError> {
        match serde_json::from_str(self.data.get()) {
            Ok(Value::Object(data)) => Ok(data),
            Ok(_) => Err(ChangeError::Malformed("data is not an object".into())),
            Err(err) => Err(ChangeError::Malformed(format!("data: {err}"))),
        }
    }

    /// Rewrites `data` through `edit` (for tests and benches that forge changes). The
    /// signature, if any, is kept: it no longer matches.
    pub fn edit_data(&mut self, edit: impl FnOnce(&mut Value)) {
        let mut data = serde_json::from_str(self.data.get()).unwrap_or(Value::Null);
        edit(&mut data);
        self.data = raw_json(&data);
    }

    /// Reads `data.sync.origin`, `data.sync.seq` and `data.sync.hlc` without building the
    /// rest of `data` (its other fields are skipped over, not parsed into values). `None`
    /// when `data` is not an object, or origin or seq is missing or invalid.
    pub fn peek_stamp(&self) -> Option<StampPeek> {
        #[derive(Deserialize)]
        struct Data {
            sync: Option<Sync>,
        }
        #[derive(Deserialize)]
        struct Sync {
            origin: Option<Value>,
            seq: Option<Value>,
            hlc: Option<Value>,
        }
        let sync = serde_json::from_str::<Data>(self.data.get()).ok()?.sync?;
        let origin = PosId::parse(sync.origin?.as_str()?).ok()?;
        let seq = sync.seq?.as_u64().filter(|seq| *seq > 0)?;
        let hlc = sync.hlc.and_then(|hlc| hlc.as_str()?.parse().ok());
        Some(StampPeek { origin, seq: Seq(seq), hlc })
    }
}

/// `wire` with `data.sync.decidedBy = user`: the change is a person's decision on a conflict
/// (every till closes its copy of that conflict in that person's name). Merges ignore it.
pub fn with_decided_by(wire: &WireChange, user: &str) -> WireChange {
    let mut data: Value = serde_json::from_str(wire.data.get()).unwrap_or(Value::Null);
    if let Some(sync) = data.get_mut("sync").and_then(Value::as_object_mut) {
        sync.insert("decidedBy".into(), Value::String(user.to_string()));
    }
    WireChange::new(&wire.entity, &wire.action, &data)
}

/// `data.sync.decidedBy` of a parsed change data object (see [`with_decided_by`]).
pub fn decided_by(data: &Map<String, Value>) -> Option<&str> {
    data.get("sync")?
        .get("decidedBy")?
        .as_str()
        .filter(|user| !user.is_empty() && user.chars().count() <= 128)
}

/// The JSON text of `value`.
fn raw_json(value: &Value) -> Box<RawValue> {
    // Invariant: a `Value` always serializes (its map keys are strings), and serde_json's
    // output is valid JSON, which is all `RawValue` checks.
    serde_json::value::to_raw_value(value).expect("a JSON value serializes")
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
            ChangeBody::Enroll { .. } => "enroll",
            ChangeBody::Revoke { .. } => "revoke",
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
            ChangeBody::Enroll { public_key } => {
                let mut data = Map::new();
                data.insert("publicKey".into(), Value::String(public_key.clone()));
                data
            }
            ChangeBody::Revoke { until_seq, reason } => {
                let mut data = Map::new();
                data.insert("untilSeq".into(), json!(until_seq.0));
                data.insert("reason".into(), json!(reason));
                data
            }
        };
        data.insert("id".into(), Value::String(self.id.to_string()));
        if let Some(updated_at) = self.updated_at() {
            data.insert("updatedAt".into(), Value::String(updated_at));
        }
        let stamp = WireStamp {
            origin: self.origin.clone(),
            seq: self.seq,
            hlc: self.hlc,
            ctx: self.ctx.clone(),
            copy_of: self.copy_of.clone(),
        };
        data.insert("sync".into(), json!(stamp));
        WireChange::new(self.entity.as_str(), self.action(), &Value::Object(data))
    }

    /// Decodes and validates a wire change. Nothing unchecked gets through: the entity's
    /// fields pass their rules, sales add up, the id and stamps are well formed.
    pub fn from_wire(wire: &WireChange) -> Result<Change, ChangeError> {
        Change::decode(&wire.entity, &wire.action, wire.data_object()?)
    }

    /// [`Change::from_wire`] on a change whose `data` is already parsed
    /// ([`WireChange::data_object`]), taking it by value.
    pub fn decode(entity: &str, action: &str, mut data: Map<String, Value>) -> Result<Change, ChangeError> {
        let unsupported = || ChangeError::Unsupported {
            entity: entity.chars().take(40).collect(),
            action: action.chars().take(40).collect(),
        };
        let kind: EntityKind = entity.parse().map_err(|_| unsupported())?;
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
        let body = match (kind, action) {
            (kind, "create" | "update") if kind.allows_record_action(action) => {
                data.remove("sync");
                ChangeBody::Upsert {
                    create: action == "create",
                    fields: entity::parse_field_object(kind, data)?,
                }
            }
            (kind, "delete") if kind.allows_record_action(action) => ChangeBody::Delete,
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
                let fields = entity::parse_field_object(kind, data)?;
                entity::check_required(kind, &fields)?;
                let action = if action == "refund" { TicketAction::Refund } else { TicketAction::Cancel };
                ChangeBody::TicketStatus { action, fields, returns }
            }
            (EntityKind::Stock, "adjust" | "count") => {
                let movement: StockMovement = decode(data)?;
                if let Some(reference) = &movement.reference {
                    entity::check_text("reference", reference, entity::REFERENCE_CHARS)?;
                }
                if movement.id != id {
                    return Err(ChangeError::Malformed("movement id differs from data.id".into()));
                }
                ChangeBody::Movement { count: action == "count", movement }
            }
            (EntityKind::Terminal, "enroll") => {
                let public_key = data
                    .get("publicKey")
                    .and_then(Value::as_str)
                    .ok_or_else(|| ChangeError::Malformed("data.publicKey is missing".into()))?;
                crate::signature::PublicKey::parse(public_key)
                    .map_err(|err| ChangeError::Malformed(format!("data.publicKey: {err}")))?;
                if id.as_str() != stamp.origin.as_str() {
                    return Err(ChangeError::Malformed("a till enrolls only its own key".into()));
                }
                ChangeBody::Enroll { public_key: public_key.to_string() }
            }
            (EntityKind::Terminal, "revoke") => {
                PosId::parse(id.as_str()).map_err(|err| ChangeError::Malformed(format!("data.id: {err}")))?;
                let until_seq = data
                    .get("untilSeq")
                    .and_then(Value::as_u64)
                    .ok_or_else(|| ChangeError::Malformed("data.untilSeq is missing".into()))?;
                let reason = match data.get("reason") {
                    None | Some(Value::Null) => None,
                    Some(Value::String(reason)) => {
                        entity::check_text("reason", reason, 500)?;
                        Some(reason.clone())
                    }
                    Some(_) => return Err(ChangeError::Malformed("data.reason: expected a string".into())),
                };
                ChangeBody::Revoke { until_seq: Seq(until_seq), reason }
            }
            _ => return Err(unsupported()),
        };
        if let Some(copy_of) = &stamp.copy_of {
            check_copy(kind, &body, &stamp, copy_of)?;
        }
        Ok(Change {
            origin: stamp.origin,
            seq: stamp.seq,
            hlc: stamp.hlc,
            ctx: stamp.ctx,
            entity: kind,
            id,
            body,
            copy_of: stamp.copy_of,
        })
    }

    /// The version this change gives the fields it writes: its own stamp, or for a head
    /// office's copy the stamp of the write it re-publishes, so that every node ranks the
    /// write the same whichever way it arrived.
    pub fn version(&self) -> Version {
        match &self.copy_of {
            Some(copy_of) => Version { hlc: self.hlc, origin: copy_of.origin.clone(), seq: copy_of.seq },
            None => Version { hlc: self.hlc, origin: self.origin.clone(), seq: self.seq },
        }
    }
}

/// The rules of a copy: only customer writes are copied (creates, updates, deletes), a copy
/// names another origin than its own, and it carries the original's context, which names
/// the original's own stamp.
fn check_copy(
    kind: EntityKind,
    body: &ChangeBody,
    stamp: &WireStamp,
    copy_of: &CopyOf,
) -> Result<(), ChangeError> {
    if kind != EntityKind::Customer || !matches!(body, ChangeBody::Upsert { .. } | ChangeBody::Delete) {
        return Err(ChangeError::Malformed("data.sync.copyOf: only customer writes are copied".into()));
    }
    if copy_of.origin == stamp.origin || copy_of.seq.0 == 0 {
        return Err(ChangeError::Malformed("data.sync.copyOf: a copy names another till's write".into()));
    }
    if stamp.ctx.get(&copy_of.origin) != copy_of.seq || stamp.ctx.get(&stamp.origin) >= stamp.seq {
        return Err(ChangeError::Malformed(
            "data.sync.copyOf: a copy carries the context of the write it copies".into(),
        ));
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn category(origin: &str, seq: u64) -> Change {
        let mut fields = FieldMap::new();
        fields.insert("name", json!("Drinks"));
        let origin = PosId::parse(origin).unwrap();
        let mut ctx = VersionVector::new();
        ctx.observe(&origin, Seq(seq));
        Change {
            origin,
            seq: Seq(seq),
            hlc: Some(Hlc::new(1_764_000_000_000, 3).unwrap()),
            ctx,
            entity: EntityKind::Category,
            id: EntityId::parse("cat-1").unwrap(),
            body: ChangeBody::Upsert { create: true, fields },
            copy_of: None,
        }
    }

    /// A head office's copy of `category`'s write... but of a customer (only those are copied).
    fn customer_copy() -> Change {
        let mut original = category("till-1", 7);
        original.entity = EntityKind::Customer;
        original.id = EntityId::parse("cust-1").unwrap();
        let mut fields = FieldMap::new();
        fields.insert("name", json!("Ana"));
        original.body = ChangeBody::Upsert { create: true, fields };
        Change {
            origin: PosId::parse("hq").unwrap(),
            seq: Seq(40),
            copy_of: Some(CopyOf { origin: original.origin.clone(), seq: original.seq }),
            ..original
        }
    }

    #[test]
    fn a_copy_round_trips_and_ranks_as_the_write_it_copies() {
        let copy = customer_copy();
        let back = Change::from_wire(&copy.to_wire()).unwrap();
        assert_eq!(back, copy);
        let version = back.version();
        assert_eq!((version.origin.as_str(), version.seq), ("till-1", Seq(7)));
        assert_eq!(version.hlc, copy.hlc);
    }

    #[test]
    fn a_copy_is_only_of_a_customer_write_of_another_till_with_its_context() {
        let refused = |edit: &dyn Fn(&mut Change)| {
            let mut copy = customer_copy();
            edit(&mut copy);
            match Change::from_wire(&copy.to_wire()) {
                Err(ChangeError::Malformed(reason)) => assert!(reason.contains("copyOf"), "{reason}"),
                other => panic!("accepted: {other:?}"),
            }
        };
        refused(&|copy| copy.entity = EntityKind::Category);
        refused(&|copy| copy.copy_of = Some(CopyOf { origin: copy.origin.clone(), seq: Seq(7) }));
        refused(&|copy| copy.copy_of = Some(CopyOf { origin: PosId::parse("till-1").unwrap(), seq: Seq(6) }));
        refused(&|copy| copy.ctx.observe(&PosId::parse("hq").unwrap(), Seq(40)));
    }

    #[test]
    fn wire_form_round_trips_and_keeps_its_text() {
        let change = category("till-1", 7);
        let wire = change.to_wire();
        assert_eq!(Change::from_wire(&wire).as_ref(), Ok(&change));
        // The change log's text: `data` is copied, not re-encoded.
        let text = serde_json::to_string(&wire).unwrap();
        let back: WireChange = serde_json::from_str(&text).unwrap();
        assert_eq!(back.data.get(), wire.data.get());
        assert_eq!(back, wire);
    }

    #[test]
    fn data_is_carried_byte_for_byte() {
        // Another writer's spacing and key order survive a trip through the log's text.
        let text = r#"{"type":"category","action":"create","data":{ "sync" : {"seq":1,"origin":"b"}, "name":"Tea","id":"cat-9" }}"#;
        let wire: WireChange = serde_json::from_str(text).unwrap();
        assert_eq!(wire.data.get(), r#"{ "sync" : {"seq":1,"origin":"b"}, "name":"Tea","id":"cat-9" }"#);
        assert_eq!(serde_json::to_string(&wire).unwrap(), text);
    }

    #[test]
    fn peek_stamp_reads_only_the_stamps() {
        let wire = category("till-1", 7).to_wire();
        let peek = wire.peek_stamp().unwrap();
        assert_eq!((peek.origin.as_str(), peek.seq), ("till-1", Seq(7)));
        assert_eq!(peek.hlc, Some(Hlc::new(1_764_000_000_000, 3).unwrap()));

        let forged = |data: Value| WireChange::new("category", "create", &data);
        assert_eq!(forged(json!([1, 2])).peek_stamp(), None, "not an object");
        assert_eq!(forged(json!({"id": "cat-1"})).peek_stamp(), None, "no sync");
        assert_eq!(forged(json!({"sync": {"origin": "a", "seq": 0}})).peek_stamp(), None, "seq 0");
        assert_eq!(forged(json!({"sync": {"origin": "", "seq": 1}})).peek_stamp(), None, "bad origin");
        let no_clock =
            forged(json!({"sync": {"origin": "a", "seq": 2, "hlc": "soon"}})).peek_stamp().unwrap();
        assert_eq!((no_clock.seq, no_clock.hlc), (Seq(2), None));
    }

    #[test]
    fn data_that_is_not_an_object_is_malformed() {
        let wire = WireChange::new("category", "create", &json!("cat-1"));
        assert_eq!(wire.data_object(), Err(ChangeError::Malformed("data is not an object".into())));
        assert!(matches!(Change::from_wire(&wire), Err(ChangeError::Malformed(_))));
    }

    #[test]
    fn a_peers_text_with_control_characters_is_refused() {
        // The same field rules as the API (issue 13, item 8): a NUL in a name from a peer
        // is an invalid change, never stored.
        let mut wire = category("till-1", 7).to_wire();
        wire.edit_data(|data| data["name"] = json!("Dri\u{0}nks"));
        assert!(
            matches!(Change::from_wire(&wire), Err(ChangeError::Entity(_))),
            "{:?}",
            Change::from_wire(&wire)
        );
    }

    #[test]
    fn a_z_report_is_only_ever_created_and_a_cash_session_never_deleted() {
        let stamp = json!({"origin": "till-1", "seq": 3});
        let decode = |entity: &str, action: &str| {
            Change::from_wire(&WireChange::new(entity, action, &json!({"id": "r-1", "sync": stamp})))
        };
        for (entity, action) in [("z_report", "update"), ("z_report", "delete"), ("cash_session", "delete")] {
            assert!(
                matches!(decode(entity, action), Err(ChangeError::Unsupported { .. })),
                "{entity}/{action}"
            );
        }
        assert!(matches!(
            decode("cash_session", "update"),
            Ok(Change { entity: EntityKind::CashSession, .. })
        ));
    }

    #[test]
    fn edit_data_rewrites_the_text() {
        let mut wire = category("till-1", 7).to_wire();
        wire.edit_data(|data| data["name"] = json!("Snacks"));
        let change = Change::from_wire(&wire).unwrap();
        let ChangeBody::Upsert { fields, .. } = change.body else { panic!("an upsert") };
        assert_eq!(fields.get("name"), Some(&json!("Snacks")));
    }
}
