//! The wire messages between two terminals, and the one function that turns a peer's text
//! frame into one of them.
//!
//! Every frame is a JSON envelope `{id, type, action, data, timestamp, sourcePos}`. A frame
//! is parsed once, here, into a typed [`Message`]: after [`Message::parse`] the session never
//! looks at raw JSON again except inside a change's `data`, which it carries verbatim as a
//! [`WireChange`] (the store decodes and validates it with [`crate::Change::from_wire`], and
//! relays it without re-encoding). Of a change, parsing checks only what the protocol itself
//! needs: the sync stamps `data.sync.origin` and `data.sync.seq`.
//!
//! Everything that can be wrong with a frame is a [`ProtocolError`], and every variant has
//! the wire `code` sent back to the peer in an `error` frame. Nothing in this module panics
//! on peer input.

use std::collections::{BTreeMap, HashMap};

use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::change::WireChange;
use crate::entity::EntityKind;
use crate::ids::{PosId, Seq};
use crate::vv::VersionVector;

/// The protocol version this node speaks (`protocolVersion` in `hello` and `hello-ack`).
pub const PROTOCOL_VERSION: u64 = 1;

/// Largest frame accepted from a peer, in bytes of text. The two limits below keep every
/// frame this node sends under it: one change is at most [`MAX_CHANGE_BYTES`], and a catch-up
/// batch is cut before its changes pass [`MAX_BATCH_BYTES`] (a batch always holds at least one
/// change), so a frame is at most `max(MAX_BATCH_BYTES, MAX_CHANGE_BYTES)` plus the envelope.
pub const MAX_FRAME_LEN: usize = 8 * 1024 * 1024;

/// Largest change (its JSON `data` text) a node writes. A local write whose change would pass
/// it is refused before anything is stored: a change no peer can receive would otherwise stop
/// its origin's later changes at every peer (they cannot be applied over the gap). 4 MiB holds
/// a sale of about 10,000 lines.
pub const MAX_CHANGE_BYTES: usize = 4 * 1024 * 1024;

/// Most bytes of change data selected into one catch-up batch (see [`MAX_FRAME_LEN`]).
pub const MAX_BATCH_BYTES: usize = 4 * 1024 * 1024;

// Room for the envelope and each change's `type`/`action` wrapping.
const _: () =
    assert!(MAX_CHANGE_BYTES + 1024 * 1024 < MAX_FRAME_LEN && MAX_BATCH_BYTES + 1024 * 1024 < MAX_FRAME_LEN);

/// The `error` code a node sends before closing a connection that lost the tie-break between
/// two connections of the same pair of terminals (both dialled at once): the link goes on
/// through the other connection.
pub const DUPLICATE_CONNECTION: &str = "duplicate_connection";

/// The `error` code a node sends when a peer introduces itself with this node's own posId
/// from another running node (a different `instance`): two terminals share one identity.
pub const IDENTITY_CLASH: &str = "identity_clash";

/// Longest piece of peer-supplied text echoed back in an error message or a log row.
const ECHO_LEN: usize = 64;

/// Why a frame from a peer was refused. Each variant maps to the `code` of the `error`
/// frame sent back ([`ProtocolError::code`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// The frame is not JSON, or not a JSON object (`bad_json`).
    #[error("malformed JSON: {0}")]
    BadJson(String),
    /// The frame is longer than [`MAX_FRAME_LEN`] (`frame_too_large`).
    #[error("frame of {0} bytes is over the limit of {MAX_FRAME_LEN}")]
    FrameTooLarge(usize),
    /// `type` names no message of this protocol (`unknown_type`).
    #[error("unknown message type {0:?}")]
    UnknownType(String),
    /// A field is missing, has the wrong JSON type or an impossible value (`invalid_field`).
    #[error("invalid field {field}: {reason}")]
    InvalidField {
        /// The field's path, such as `data.sync.seq` or `sourcePos`.
        field: String,
        /// What is wrong with it, in words.
        reason: String,
    },
    /// The peer speaks another protocol version (`version_mismatch`); fatal.
    #[error("protocol version {0} is not supported, this node speaks {PROTOCOL_VERSION}")]
    VersionMismatch(u64),
    /// A message other than the handshake arrived before the handshake completed
    /// (`handshake_required`); fatal.
    #[error("{0:?} received before the handshake completed")]
    HandshakeRequired(String),
    /// A well-formed message that makes no sense now: a second hello, a `sync_ack` with no
    /// batch in flight, a second `sync_batch` before the first was acknowledged
    /// (`unexpected_message`).
    #[error("unexpected message: {0}")]
    UnexpectedMessage(String),
    /// The peer announced this node's own posId (`self_connection`); fatal.
    #[error("the peer announced this node's own posId")]
    SelfConnection,
    /// The peer announced the receiver's own posId from another running node
    /// (`identity_clash`): two terminals share one identity; fatal.
    #[error("another running terminal uses this terminal's posId: a cloned disk or a copied data directory")]
    IdentityClash,
    /// The peer broke the protocol too often on this connection (`too_many_errors`); fatal.
    #[error("{0} protocol errors on this connection, closing")]
    TooManyErrors(u32),
}

impl ProtocolError {
    /// The `code` of the `error` frame that reports this error to the peer.
    pub fn code(&self) -> &'static str {
        match self {
            ProtocolError::BadJson(_) => "bad_json",
            ProtocolError::FrameTooLarge(_) => "frame_too_large",
            ProtocolError::UnknownType(_) => "unknown_type",
            ProtocolError::InvalidField { .. } => "invalid_field",
            ProtocolError::VersionMismatch(_) => "version_mismatch",
            ProtocolError::HandshakeRequired(_) => "handshake_required",
            ProtocolError::UnexpectedMessage(_) => "unexpected_message",
            ProtocolError::SelfConnection => "self_connection",
            ProtocolError::IdentityClash => IDENTITY_CLASH,
            ProtocolError::TooManyErrors(_) => "too_many_errors",
        }
    }

    /// True when the connection cannot go on after this error, whatever the error budget.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            ProtocolError::VersionMismatch(_)
                | ProtocolError::HandshakeRequired(_)
                | ProtocolError::SelfConnection
                | ProtocolError::IdentityClash
                | ProtocolError::TooManyErrors(_)
        )
    }
}

/// One parsed frame: the envelope's fields plus its typed body.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// `"<sourcePos>-<n>"`, unique per connection and sender; a `pong` quotes the ping's id.
    pub id: String,
    /// When the sender sent it (RFC 3339 ms). Informational only: no decision reads it.
    pub timestamp: String,
    /// The terminal that sent this frame (not necessarily the origin of a relayed change).
    pub source_pos: PosId,
    /// What the message says (`type`, `action` and `data`).
    pub body: Body,
}

/// The typed content of a message: one variant per `type`.
#[derive(Debug, Clone, PartialEq)]
pub enum Body {
    /// `hello` / `request`: the initiator introduces itself.
    Hello(Hello),
    /// `hello-ack` / `accept`: the responder introduces itself back.
    HelloAck(Hello),
    /// `ping` / `heartbeat`: "are you there?".
    Ping,
    /// `pong` / `heartbeat`: the answer to a ping.
    Pong(Pong),
    /// A live change: `type` is the entity kind, `action` and `data` the [`WireChange`]'s.
    Change(StampedChange),
    /// `sync_batch` / `push`: one batch of catch-up.
    SyncBatch(SyncBatch),
    /// `sync_ack` / `ack`: the receiver applied a batch.
    SyncAck(SyncAck),
    /// `sync_request` / `request`: "send me what I lack since this summary".
    SyncRequest(SyncRequest),
    /// `peers` / `update`: the terminals the sender is directly connected to now, so that
    /// the receiver does not relay their changes to it (it gets them first-hand).
    Peers(Peers),
    /// `error` / `reject`: the peer refused something we sent.
    Error(ErrorData),
}

/// The data of `hello` and `hello-ack`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Hello {
    /// The sender's terminal id (must equal the envelope's `sourcePos`).
    pub pos_id: PosId,
    /// The sender's display name.
    pub pos_name: String,
    /// Always [`PROTOCOL_VERSION`] once parsed (another version is refused while parsing).
    pub protocol_version: u64,
    /// The sender's node version vector: the highest seq it holds per origin, so that the
    /// other side can select exactly what it lacks.
    pub summary: VersionVector,
    /// A random id of the sender's running node, new at each start (optional): two live
    /// terminals with one posId (a cloned disk, a copied data directory) differ here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    /// For each origin of `summary`, the fingerprint of the change the sender holds at that
    /// number ([`crate::WireChange::fingerprint`]; optional). The receiver compares those it
    /// holds too: a difference is two histories of one origin (a till restored from a
    /// backup or cloned, or a fork), found at the handshake instead of never.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub heads: BTreeMap<PosId, String>,
}

/// Longest fingerprint accepted in a `hello`'s `heads`.
pub const MAX_HEAD_LEN: usize = 64;

/// The data of `pong`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pong {
    /// The id of the ping being answered.
    pub ping: String,
}

/// A change whose sync stamps were found, with the change itself untouched.
#[derive(Debug, Clone, PartialEq)]
pub struct StampedChange {
    /// `data.sync.origin`: the terminal that made the write.
    pub origin: PosId,
    /// `data.sync.seq`: its position in the origin's log (at least 1).
    pub seq: Seq,
    /// The change exactly as received, for the store to decode and the log to keep.
    pub wire: WireChange,
}

/// The data of `sync_batch`.
#[derive(Debug, Clone, PartialEq)]
pub struct SyncBatch {
    /// The changes, in the sender's log order (causal order).
    pub changes: Vec<StampedChange>,
    /// True when more batches follow in this catch-up.
    pub has_more: bool,
}

/// The data of `sync_ack`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncAck {
    /// How many changes the acknowledged batch held.
    pub count: u64,
}

/// The data of `sync_request`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SyncRequest {
    /// The requester's node version vector: send everything above it.
    pub summary: VersionVector,
}

/// The data of `peers`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peers {
    /// posIds of the sender's live connections.
    pub connected: Vec<PosId>,
}

/// The data of `error`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorData {
    /// Machine-readable code ([`ProtocolError::code`]).
    pub code: String,
    /// Human-readable explanation.
    pub message: String,
}

/// How `sync_batch` looks on the wire, before its changes' stamps are checked.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawSyncBatch {
    /// The changes as sent.
    changes: Vec<WireChange>,
    /// More to come.
    has_more: bool,
}

/// How `sync_batch` is written, borrowing the changes.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SyncBatchOut<'a> {
    /// The changes, verbatim.
    changes: Vec<&'a WireChange>,
    /// More to come.
    has_more: bool,
}

/// The envelope as written, with the data borrowed from the body.
#[derive(Serialize)]
struct EnvelopeOut<'a, D: Serialize> {
    /// Message id.
    id: &'a str,
    /// Message type.
    #[serde(rename = "type")]
    kind: &'a str,
    /// Message action.
    action: &'a str,
    /// Type-specific data.
    data: D,
    /// Send time.
    timestamp: &'a str,
    /// The sender.
    #[serde(rename = "sourcePos")]
    source_pos: &'a PosId,
    /// A live change's origin signature (beside `data`, as in a batch's changes).
    #[serde(skip_serializing_if = "Option::is_none")]
    sig: Option<&'a str>,
}

impl Message {
    /// Parses one text frame from a peer. Refuses anything that is not exactly a message of
    /// this protocol version; never panics.
    pub fn parse(text: &str) -> Result<Message, ProtocolError> {
        if text.len() > MAX_FRAME_LEN {
            return Err(ProtocolError::FrameTooLarge(text.len()));
        }
        let mut envelope = parse_envelope(text)?;
        // `type` first, so that an unknown type is reported as such rather than as whatever
        // else is wrong with the frame.
        let kind = take_string(&mut envelope, "type")?;
        if !is_known_type(&kind) {
            return Err(ProtocolError::UnknownType(echo(&kind)));
        }
        let action = take_string(&mut envelope, "action")?;
        let id = take_string(&mut envelope, "id")?;
        let timestamp = take_string(&mut envelope, "timestamp")?;
        let source_pos = take_string(&mut envelope, "sourcePos")?;
        let source_pos = PosId::parse(source_pos).map_err(|err| invalid("sourcePos", err))?;
        let data = match envelope.remove("data") {
            Some(data) if data.get().starts_with('{') => data,
            Some(_) => return Err(invalid("data", "expected an object")),
            None => return Err(invalid("data", "missing")),
        };
        let sig = match envelope.remove("sig") {
            None => None,
            Some(sig) => match serde_json::from_str::<String>(sig.get()) {
                Ok(sig) if sig.len() <= 128 => Some(sig),
                _ => return Err(invalid("sig", "expected a base64 signature")),
            },
        };
        let body = Body::parse(kind, action, data, sig)?;
        Ok(Message { id, timestamp, source_pos, body })
    }

    /// The frame's text.
    pub fn encode(&self) -> String {
        match &self.body {
            Body::Hello(hello) | Body::HelloAck(hello) => self.encode_with(hello),
            Body::Ping => self.encode_with(Map::new()),
            Body::Pong(pong) => self.encode_with(pong),
            Body::Change(change) => self.encode_with(&change.wire.data),
            Body::SyncBatch(batch) => self.encode_with(SyncBatchOut {
                changes: batch.changes.iter().map(|change| &change.wire).collect(),
                has_more: batch.has_more,
            }),
            Body::SyncAck(ack) => self.encode_with(ack),
            Body::SyncRequest(request) => self.encode_with(request),
            Body::Peers(peers) => self.encode_with(peers),
            Body::Error(error) => self.encode_with(error),
        }
    }

    /// The envelope around `data`, as text.
    fn encode_with<D: Serialize>(&self, data: D) -> String {
        let envelope = EnvelopeOut {
            id: &self.id,
            kind: self.body.kind(),
            action: self.body.action(),
            data,
            timestamp: &self.timestamp,
            source_pos: &self.source_pos,
            sig: match &self.body {
                Body::Change(change) => change.wire.sig.as_deref(),
                _ => None,
            },
        };
        // Invariant: serde_json only fails on maps with non-string keys or on failing
        // Serialize impls; every map here is keyed by strings (posIds, field names) and every
        // impl is derived or infallible.
        serde_json::to_string(&envelope).expect("message serialization cannot fail")
    }
}

impl Body {
    /// The envelope's `type`.
    pub fn kind(&self) -> &str {
        match self {
            Body::Hello(_) => "hello",
            Body::HelloAck(_) => "hello-ack",
            Body::Ping => "ping",
            Body::Pong(_) => "pong",
            Body::Change(change) => &change.wire.entity,
            Body::SyncBatch(_) => "sync_batch",
            Body::SyncAck(_) => "sync_ack",
            Body::SyncRequest(_) => "sync_request",
            Body::Peers(_) => "peers",
            Body::Error(_) => "error",
        }
    }

    /// The envelope's `action`.
    pub fn action(&self) -> &str {
        match self {
            Body::Change(change) => &change.wire.action,
            _ => control_action(self.kind()).unwrap_or_default(),
        }
    }

    /// Builds the body of a `kind`/`action` message from its `data` (JSON text of an object).
    /// A change's data is kept as text; a batch's changes are cut out of it as text.
    fn parse(
        kind: String,
        action: String,
        data: &RawValue,
        sig: Option<String>,
    ) -> Result<Body, ProtocolError> {
        if let Some(expected) = control_action(&kind)
            && action != expected
        {
            return Err(invalid(
                "action",
                format!("expected {expected:?} for {kind}, got {:?}", echo(&action)),
            ));
        }
        let body = match kind.as_str() {
            "hello" => Body::Hello(parse_hello(object(data)?)?),
            "hello-ack" => Body::HelloAck(parse_hello(object(data)?)?),
            "ping" => Body::Ping,
            "pong" => Body::Pong(decode(data)?),
            "sync_batch" => {
                let raw: RawSyncBatch = decode(data)?;
                let changes = raw
                    .changes
                    .into_iter()
                    .enumerate()
                    .map(|(index, wire)| StampedChange::new(wire, &format!("data.changes[{index}]")))
                    .collect::<Result<Vec<_>, _>>()?;
                Body::SyncBatch(SyncBatch { changes, has_more: raw.has_more })
            }
            "sync_ack" => Body::SyncAck(decode(data)?),
            "sync_request" => Body::SyncRequest(decode(data)?),
            "peers" => Body::Peers(decode(data)?),
            "error" => Body::Error(decode(data)?),
            _ => {
                // Invariant: `parse` only calls this with a known type, and every known type
                // that is not a control message is an entity kind.
                let wire = WireChange { entity: kind, action, data: data.to_owned(), sig };
                Body::Change(StampedChange::new(wire, "data")?)
            }
        };
        Ok(body)
    }
}

impl StampedChange {
    /// Finds the sync stamps of `wire` (`<path>.sync.origin`, `<path>.sync.seq`); `path` names
    /// the change in error messages.
    /// Only `data.sync` is parsed into values; the rest of `data` is skipped over.
    pub fn new(wire: WireChange, path: &str) -> Result<StampedChange, ProtocolError> {
        /// `data` with everything but `sync` skipped.
        #[derive(Deserialize)]
        struct Data {
            sync: Option<Value>,
        }
        if !wire.data.get().starts_with('{') {
            return Err(invalid(path, "expected an object"));
        }
        let data: Data = serde_json::from_str(wire.data.get()).map_err(|err| invalid(path, err))?;
        let Some(sync) = data.sync.as_ref().and_then(Value::as_object) else {
            return Err(invalid(&format!("{path}.sync"), "expected an object with origin and seq"));
        };
        let origin = match sync.get("origin") {
            Some(Value::String(origin)) => {
                PosId::parse(origin.as_str()).map_err(|err| invalid(&format!("{path}.sync.origin"), err))?
            }
            _ => return Err(invalid(&format!("{path}.sync.origin"), "expected a posId string")),
        };
        let seq = match sync.get("seq").and_then(Value::as_u64) {
            Some(seq) if seq >= 1 => Seq(seq),
            _ => return Err(invalid(&format!("{path}.sync.seq"), "expected an integer of at least 1")),
        };
        Ok(StampedChange { origin, seq, wire })
    }
}

/// The `type` and `action` of a frame that failed to parse, as far as they can be read (empty
/// when not), for the violation report. Both are cut to a short length.
pub fn peek_type_action(text: &str) -> (String, String) {
    if text.len() > MAX_FRAME_LEN {
        return (String::new(), String::new());
    }
    let Ok(Value::Object(envelope)) = serde_json::from_str::<Value>(text) else {
        return (String::new(), String::new());
    };
    let field = |name: &str| envelope.get(name).and_then(Value::as_str).map(echo).unwrap_or_default();
    (field("type"), field("action"))
}

/// The only `action` allowed with a control `type`; `None` for entity kinds (their actions
/// are the store's to judge) and unknown types.
fn control_action(kind: &str) -> Option<&'static str> {
    match kind {
        "hello" => Some("request"),
        "hello-ack" => Some("accept"),
        "ping" | "pong" => Some("heartbeat"),
        "sync_batch" => Some("push"),
        "sync_ack" => Some("ack"),
        "sync_request" => Some("request"),
        "peers" => Some("update"),
        "error" => Some("reject"),
        _ => None,
    }
}

/// True for the control types and the entity kinds.
fn is_known_type(kind: &str) -> bool {
    control_action(kind).is_some() || kind.parse::<EntityKind>().is_ok()
}

/// Parses hello data, checking the protocol version before the rest: a peer of another
/// version may have changed anything else, and "version mismatch" is the useful answer.
fn parse_hello(data: Map<String, Value>) -> Result<Hello, ProtocolError> {
    match data.get("protocolVersion").map(Value::as_u64) {
        Some(Some(PROTOCOL_VERSION)) => {}
        Some(Some(theirs)) => return Err(ProtocolError::VersionMismatch(theirs)),
        Some(None) => return Err(invalid("data.protocolVersion", "expected an integer")),
        None => return Err(invalid("data.protocolVersion", "missing")),
    }
    let hello: Hello = serde_json::from_value(Value::Object(data)).map_err(|err| invalid("data", err))?;
    if hello.heads.values().any(|head| head.len() > MAX_HEAD_LEN) {
        return Err(invalid("data.heads", format!("a fingerprint longer than {MAX_HEAD_LEN} characters")));
    }
    Ok(hello)
}

/// The envelope's fields, each still JSON text (borrowed from the frame).
type Envelope<'a> = HashMap<String, &'a RawValue>;

/// Splits a frame into its top-level fields without parsing their values.
fn parse_envelope(text: &str) -> Result<Envelope<'_>, ProtocolError> {
    serde_json::from_str(text).map_err(|err| {
        // Tell "not JSON" from "JSON, but not an object".
        match serde_json::from_str::<IgnoredAny>(text) {
            Ok(_) => ProtocolError::BadJson("expected a JSON object".into()),
            Err(_) => ProtocolError::BadJson(err.to_string()),
        }
    })
}

/// Removes a string field from the envelope.
fn take_string(envelope: &mut Envelope<'_>, field: &str) -> Result<String, ProtocolError> {
    match envelope.remove(field).map(|raw| serde_json::from_str::<Value>(raw.get())) {
        Some(Ok(Value::String(text))) => Ok(text),
        Some(_) => Err(invalid(field, "expected a string")),
        None => Err(invalid(field, "missing")),
    }
}

/// A message's data as a JSON object (the caller checked that it is one).
fn object(data: &RawValue) -> Result<Map<String, Value>, ProtocolError> {
    serde_json::from_str(data.get()).map_err(|err| invalid("data", err))
}

/// Decodes a message's data into its typed form.
fn decode<'a, T: Deserialize<'a>>(data: &'a RawValue) -> Result<T, ProtocolError> {
    serde_json::from_str(data.get()).map_err(|err| invalid("data", err))
}

fn invalid(field: &str, reason: impl ToString) -> ProtocolError {
    ProtocolError::InvalidField { field: field.to_string(), reason: reason.to_string() }
}

/// Peer text, cut short enough to echo in an error.
fn echo(text: &str) -> String {
    text.chars().take(ECHO_LEN).collect()
}

#[cfg(test)]
mod tests {
    use rust_decimal::Decimal;
    use serde_json::json;

    use super::*;
    use crate::change::{Change, ChangeBody, TicketAction};
    use crate::entity::{MovementType, Payment, PaymentMethod, Sale, StockMovement, TicketLine};
    use crate::hlc::Hlc;
    use crate::ids::EntityId;
    use crate::protocol::test_util::{change, data_json, pos, vv};

    fn message(body: Body) -> Message {
        Message { id: "a-7".into(), timestamp: "2025-11-23T10:05:00.123Z".into(), source_pos: pos("a"), body }
    }

    fn envelope(kind: &str, action: &str, data: Value) -> Value {
        json!({"id": "a-7", "type": kind, "action": action, "data": data,
               "timestamp": "2025-11-23T10:05:00.123Z", "sourcePos": "a"})
    }

    #[test]
    fn a_hello_with_an_overlong_head_is_refused() {
        let frame = |head: &str| {
            json!({"id": "a-1", "type": "hello", "action": "request", "timestamp": "2025-11-23T10:05:00.000Z",
                   "sourcePos": "a", "data": {"posId": "a", "posName": "Till", "protocolVersion": 1,
                   "summary": {"a": 1}, "heads": {"a": head}}})
            .to_string()
        };
        assert!(Message::parse(&frame("0123456789abcdef")).is_ok());
        assert!(matches!(
            Message::parse(&frame(&"f".repeat(MAX_HEAD_LEN + 1))),
            Err(ProtocolError::InvalidField { .. })
        ));
    }

    #[test]
    fn every_message_round_trips() {
        let stamped = |origin, seq| StampedChange::new(change(origin, seq), "data").unwrap();
        let hello = Hello {
            pos_id: pos("a"),
            pos_name: "Till 1".into(),
            protocol_version: 1,
            summary: vv(&[("a", 4)]),
            instance: None,
            heads: [(pos("a"), "0123456789abcdef".to_string())].into_iter().collect(),
        };
        let bodies = [
            Body::Hello(hello.clone()),
            Body::HelloAck(hello),
            Body::Ping,
            Body::Pong(Pong { ping: "b-3".into() }),
            Body::Change(stamped("a", 2)),
            Body::SyncBatch(SyncBatch { changes: vec![stamped("a", 1), stamped("c", 9)], has_more: true }),
            Body::SyncBatch(SyncBatch { changes: vec![], has_more: false }),
            Body::SyncAck(SyncAck { count: 2 }),
            Body::SyncRequest(SyncRequest { summary: vv(&[("a", 1), ("b", 2)]) }),
            Body::Error(ErrorData { code: "bad_json".into(), message: "oops".into() }),
        ];
        for body in bodies {
            let original = message(body);
            let text = original.encode();
            assert_eq!(Message::parse(&text), Ok(original), "{text}");
            assert!(text.starts_with(r#"{"id":"a-7","type":""#), "{text}");
        }
    }

    #[test]
    fn the_envelope_is_as_documented() {
        let text = message(Body::Pong(Pong { ping: "b-3".into() })).encode();
        assert_eq!(
            text,
            r#"{"id":"a-7","type":"pong","action":"heartbeat","data":{"ping":"b-3"},"timestamp":"2025-11-23T10:05:00.123Z","sourcePos":"a"}"#
        );
        let live = change("b", 5);
        let text = message(Body::Change(StampedChange::new(live.clone(), "data").unwrap())).encode();
        let value: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(value, envelope("category", "create", data_json(&live)));
    }

    #[test]
    fn bad_frames_are_refused_with_the_right_code() {
        let hello =
            |version: Value| json!({"posId": "a", "posName": "x", "protocolVersion": version, "summary": {}});
        let stamped = |sync: Value| json!({"id": "c1", "name": "Tea", "sync": sync});
        let cases: Vec<(String, &str)> = vec![
            ("".into(), "bad_json"),
            ("{\"type\":".into(), "bad_json"),
            ("[1,2]".into(), "bad_json"),
            ("\"hello\"".into(), "bad_json"),
            (" ".repeat(MAX_FRAME_LEN + 1), "frame_too_large"),
            (envelope("sale", "create", json!({})).to_string(), "unknown_type"),
            (envelope("HELLO", "request", json!({})).to_string(), "unknown_type"),
            (json!({"type": 7}).to_string(), "invalid_field"),
            (json!({"action": "request"}).to_string(), "invalid_field"),
            (envelope("ping", "pong", json!({})).to_string(), "invalid_field"),
            (envelope("ping", "heartbeat", json!([])).to_string(), "invalid_field"),
            (envelope("hello", "request", hello(json!(2))).to_string(), "version_mismatch"),
            (envelope("hello", "request", hello(json!("1"))).to_string(), "invalid_field"),
            (envelope("hello", "request", json!({"posId": "a"})).to_string(), "invalid_field"),
            (envelope("hello", "request", json!({"posId": "a", "posName": "x", "protocolVersion": 1, "summary": {"a": -1}})).to_string(), "invalid_field"),
            (envelope("hello-ack", "accept", json!({"posId": "a b", "posName": "x", "protocolVersion": 1, "summary": {}})).to_string(), "invalid_field"),
            (envelope("pong", "heartbeat", json!({"ping": 3})).to_string(), "invalid_field"),
            (envelope("sync_ack", "ack", json!({"count": "2"})).to_string(), "invalid_field"),
            (envelope("sync_batch", "push", json!({"changes": [], "hasMore": "no"})).to_string(), "invalid_field"),
            (envelope("sync_batch", "push", json!({"changes": {}, "hasMore": false})).to_string(), "invalid_field"),
            (envelope("sync_batch", "push", json!({"changes": [{"type": "category", "action": "create", "data": stamped(json!({"origin": "a"}))}], "hasMore": false})).to_string(), "invalid_field"),
            (envelope("sync_request", "request", json!({})).to_string(), "invalid_field"),
            (envelope("error", "reject", json!({"code": 1, "message": "x"})).to_string(), "invalid_field"),
            (envelope("category", "create", json!({"id": "c1", "name": "Tea"})).to_string(), "invalid_field"),
            (envelope("category", "create", stamped(json!({"origin": "a", "seq": 0}))).to_string(), "invalid_field"),
            (envelope("category", "create", stamped(json!({"origin": "a", "seq": -3}))).to_string(), "invalid_field"),
            (envelope("category", "create", stamped(json!({"origin": "", "seq": 1}))).to_string(), "invalid_field"),
            (envelope("category", "create", stamped(json!({"origin": 5, "seq": 1}))).to_string(), "invalid_field"),
            (json!({"id": "a-1", "type": "ping", "action": "heartbeat", "data": {}, "sourcePos": "a"}).to_string(), "invalid_field"),
        ];
        for (text, code) in cases {
            let error = Message::parse(&text).expect_err(&text.chars().take(200).collect::<String>());
            assert_eq!(error.code(), code, "{error} for {}", text.chars().take(200).collect::<String>());
        }
    }

    #[test]
    fn a_change_action_is_left_to_the_store() {
        let mut odd = change("a", 1);
        odd.action = "explode".into();
        let text = envelope("category", "explode", data_json(&odd)).to_string();
        let Ok(Message { body: Body::Change(parsed), .. }) = Message::parse(&text) else {
            panic!("a stamped change parses whatever its action");
        };
        assert_eq!((parsed.origin, parsed.seq, parsed.wire), (pos("a"), Seq(1), odd));
    }

    #[test]
    fn changes_are_relayed_byte_for_byte() {
        // A change's data is never re-encoded: spacing and key order as the origin wrote them.
        let data = r#"{ "sync": {"seq": 2, "origin": "c"},  "name": "Tea", "id": "cat-1" }"#;
        let live = format!(
            r#"{{"id":"b-1","type":"category","action":"update","data":{data},"timestamp":"t","sourcePos":"b"}}"#
        );
        let batch = format!(
            r#"{{"id":"b-2","type":"sync_batch","action":"push","data":{{"changes":[{{"type":"category","action":"update","data":{data}}}],"hasMore":false}},"timestamp":"t","sourcePos":"b"}}"#
        );
        for text in [live, batch] {
            let parsed = Message::parse(&text).unwrap();
            let changes = match &parsed.body {
                Body::Change(change) => vec![change.clone()],
                Body::SyncBatch(batch) => batch.changes.clone(),
                other => panic!("parsed as {other:?}"),
            };
            assert_eq!(changes.len(), 1);
            assert_eq!(
                (changes[0].origin.as_str(), changes[0].seq, changes[0].wire.data.get()),
                ("c", Seq(2), data)
            );
            assert_eq!(parsed.encode(), text, "encoding a parsed frame gives its text back");
        }
    }

    #[test]
    fn type_and_action_are_peeked_for_reports() {
        assert_eq!(peek_type_action(r#"{"type":"ticket","action":7}"#), ("ticket".into(), "".into()));
        assert_eq!(peek_type_action("nope"), ("".into(), "".into()));
        let long = format!(r#"{{"type":"{}"}}"#, "x".repeat(500));
        assert_eq!(peek_type_action(&long).0.len(), ECHO_LEN);
    }

    #[test]
    fn every_example_in_the_protocol_document_parses() {
        let document = include_str!("../../../../docs/PROTOCOL.md");
        let blocks: Vec<&str> =
            document.split("```json\n").skip(1).filter_map(|rest| rest.split("\n```").next()).collect();
        assert!(blocks.len() >= 18, "found {} examples", blocks.len());
        for block in blocks {
            let parsed = Message::parse(block);
            assert!(parsed.is_ok(), "{parsed:?} for\n{block}");
            let changes = match parsed {
                Ok(Message { body: Body::Change(change), .. }) => vec![change],
                Ok(Message { body: Body::SyncBatch(batch), .. }) => batch.changes,
                _ => vec![],
            };
            for change in changes {
                assert!(Change::from_wire(&change.wire).is_ok(), "{block}");
            }
        }
    }

    /// The examples in `docs/PROTOCOL.md`, from the real encoders. Run with
    /// `cargo test -p possync-core print_protocol_examples -- --ignored --nocapture`.
    #[test]
    #[ignore = "prints the documentation examples"]
    fn print_protocol_examples() {
        let ms = 1_763_892_300_123;
        let hlc = |offset: u64, counter| Some(Hlc::new(ms + offset, counter).unwrap());
        let id = |raw: &str| EntityId::parse(raw).unwrap();
        let dec = |raw: &str| raw.parse::<Decimal>().unwrap();
        let fields =
            |pairs: Value| crate::entity::parse_fields(crate::entity::EntityKind::Product, &pairs).unwrap();
        let till1 = pos("till-1");
        let base = |seq: u64, entity, record: &str, body, offset| Change {
            origin: till1.clone(),
            seq: Seq(seq),
            hlc: hlc(offset, 0),
            ctx: vv(&[("till-1", seq)]),
            entity,
            id: id(record),
            body,
            copy_of: None,
        };
        use crate::entity::EntityKind::*;
        let movement = |record: &str, kind, quantity: &str, reference: &str| StockMovement {
            id: id(record),
            product_id: id("prod-tea"),
            kind,
            quantity: dec(quantity),
            reference: Some(reference.into()),
            pos_id: till1.clone(),
            created_at: "2025-11-23T10:05:00.123Z".into(),
        };
        let sale = Sale {
            id: id("tkt-0001"),
            ticket_number: "T1-000001".into(),
            pos_id: till1.clone(),
            customer_id: Some(id("cust-ana")),
            cash_session_id: None,
            lines: vec![TicketLine {
                product_id: id("prod-tea"),
                product_name: "Green tea".into(),
                product_sku: "TEA-01".into(),
                quantity: dec("2"),
                unit_price: dec("2.5"),
                discount_rate: dec("0"),
                discount_amount: dec("0"),
                total_amount: dec("5"),
            }],
            payments: vec![Payment { method: PaymentMethod::Cash, amount: dec("5"), reference: None }],
            subtotal: dec("5"),
            discount_amount: dec("0"),
            total_amount: dec("5"),
            notes: None,
            created_at: "2025-11-23T10:05:00.123Z".into(),
            movements: vec![movement("mov-0001", MovementType::Sale, "-2", "tkt-0001")],
        };
        let mut customer_ctx = vv(&[("till-1", 4)]);
        customer_ctx.observe(&pos("till-2"), Seq(7));
        let status = |status: &str, notes: &str| {
            crate::entity::parse_fields(Ticket, &json!({"status": status, "notes": notes})).unwrap()
        };
        let changes = [
            base(
                1,
                Product,
                "prod-tea",
                ChangeBody::Upsert {
                    create: true,
                    fields: fields(
                        json!({"sku": "TEA-01", "name": "Green tea", "price": 2.5, "categoryId": "cat-drinks", "isActive": true}),
                    ),
                },
                0,
            ),
            base(
                2,
                Product,
                "prod-tea",
                ChangeBody::Upsert { create: false, fields: fields(json!({"price": 2.75})) },
                1_000,
            ),
            base(3, Product, "prod-old", ChangeBody::Delete, 2_000),
            Change {
                ctx: customer_ctx,
                ..base(
                    4,
                    Customer,
                    "cust-ana",
                    ChangeBody::Upsert {
                        create: false,
                        fields: crate::entity::parse_fields(Customer, &json!({"phone": "+34 600 000 000"}))
                            .unwrap(),
                    },
                    3_000,
                )
            },
            base(5, Ticket, "tkt-0001", ChangeBody::Sale(Box::new(sale)), 4_000),
            base(
                6,
                Ticket,
                "tkt-0001",
                ChangeBody::TicketStatus {
                    action: TicketAction::Refund,
                    fields: status("partially_refunded", "1 tea returned"),
                    returns: vec![movement("mov-0002", MovementType::Return, "1", "tkt-0001")],
                },
                5_000,
            ),
            base(
                7,
                Ticket,
                "tkt-0002",
                ChangeBody::TicketStatus {
                    action: TicketAction::Cancel,
                    fields: status("cancelled", "wrong customer"),
                    returns: vec![],
                },
                6_000,
            ),
            base(
                8,
                Stock,
                "mov-0003",
                ChangeBody::Movement {
                    count: false,
                    movement: movement("mov-0003", MovementType::In, "24", "delivery 118"),
                },
                7_000,
            ),
            base(
                9,
                Stock,
                "mov-0004",
                ChangeBody::Movement {
                    count: true,
                    movement: movement("mov-0004", MovementType::Adjustment, "-3", "count 2025-11-23"),
                },
                8_000,
            ),
        ];
        for change in &changes {
            let wire = change.to_wire();
            assert_eq!(Change::from_wire(&wire).as_ref(), Ok(change), "examples must decode");
            println!("### {} {}\n", wire.entity, wire.action);
            print_envelope(&wire.entity, &wire.action, &data_json(&wire));
        }
    }

    fn print_envelope(kind: &str, action: &str, data: &Value) {
        let data = serde_json::to_string_pretty(data).unwrap().replace('\n', "\n  ");
        println!(
            "```json\n{{\n  \"id\": \"till-1-42\",\n  \"type\": \"{kind}\",\n  \"action\": \"{action}\",\n  \"data\": {data},\n  \"timestamp\": \"2025-11-23T10:05:09.200Z\",\n  \"sourcePos\": \"till-1\"\n}}\n```\n"
        );
    }
}
