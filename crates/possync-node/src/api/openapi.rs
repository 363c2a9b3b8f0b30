//! `GET /api/openapi.json`: the OpenAPI 3.0 description of the API, built from the same
//! route table as the router ([`Route`]), so the two cannot drift apart: a route is served
//! exactly when it is documented.
//!
//! The schemas of products, categories and customers are generated from the field table of
//! `possync-core` (the one the store validates with); the others are written here.

use std::sync::Arc;

use axum::handler::Handler;
use axum::routing::{MethodFilter, MethodRouter};
use possync_core::EntityKind;
use possync_core::entity::FieldType;
use serde_json::{Map, Value, json};

use super::ApiState;

/// An HTTP method of the route table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Method {
    /// GET.
    Get,
    /// POST.
    Post,
    /// PUT.
    Put,
    /// PATCH.
    Patch,
    /// DELETE.
    Delete,
}

impl Method {
    /// Lower case, as OpenAPI keys operations.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "get",
            Method::Post => "post",
            Method::Put => "put",
            Method::Patch => "patch",
            Method::Delete => "delete",
        }
    }

    fn filter(self) -> MethodFilter {
        match self {
            Method::Get => MethodFilter::GET,
            Method::Post => MethodFilter::POST,
            Method::Put => MethodFilter::PUT,
            Method::Patch => MethodFilter::PATCH,
            Method::Delete => MethodFilter::DELETE,
        }
    }
}

/// One documented response.
#[derive(Debug, Clone)]
struct Reply {
    status: u16,
    description: &'static str,
    /// Content type and schema; `None`: no body.
    content: Option<(&'static str, Value)>,
}

/// One query parameter.
#[derive(Debug, Clone)]
struct QueryParam {
    name: &'static str,
    description: &'static str,
    schema: Value,
}

/// One route: its method and path, its handler, and its documentation.
pub struct Route {
    /// The method.
    pub method: Method,
    /// The path, in axum's (and OpenAPI's) `{param}` syntax.
    pub path: &'static str,
    /// What serves it.
    pub(super) handler: MethodRouter<Arc<ApiState>>,
    operation_id: &'static str,
    summary: &'static str,
    tag: &'static str,
    query: Vec<QueryParam>,
    /// Schema of the JSON body, and whether it is required.
    body: Option<(Value, bool)>,
    replies: Vec<Reply>,
}

impl Route {
    /// A route served by `handler`.
    pub fn new<H, T>(method: Method, path: &'static str, operation_id: &'static str, handler: H) -> Route
    where
        H: Handler<T, Arc<ApiState>>,
        T: 'static,
    {
        Route {
            method,
            path,
            handler: axum::routing::on(method.filter(), handler),
            operation_id,
            summary: "",
            tag: "node",
            query: Vec::new(),
            body: None,
            replies: Vec::new(),
        }
    }

    /// A one-line description.
    pub fn summary(mut self, summary: &'static str) -> Route {
        self.summary = summary;
        self
    }

    /// The group it is listed under.
    pub fn tag(mut self, tag: &'static str) -> Route {
        self.tag = tag;
        self
    }

    /// A query parameter.
    pub fn query(mut self, name: &'static str, schema: Value, description: &'static str) -> Route {
        self.query.push(QueryParam { name, description, schema });
        self
    }

    /// `limit` and `offset` (the audit lists allow at most `max` rows a page).
    pub fn paging(self, default: u32, max: u32) -> Route {
        self.query(
            "limit",
            json!({"type": "integer", "minimum": 1, "maximum": max, "default": default}),
            "At most this many rows.",
        )
        .query(
            "offset",
            json!({"type": "integer", "minimum": 0, "default": 0}),
            "Skip this many rows.",
        )
    }

    /// A required JSON body.
    pub fn body(mut self, schema: Value) -> Route {
        self.body = Some((schema, true));
        self
    }

    /// An optional JSON body (an empty body means `{}`).
    pub fn optional_body(mut self, schema: Value) -> Route {
        self.body = Some((schema, false));
        self
    }

    /// A JSON answer.
    pub fn reply(mut self, status: u16, description: &'static str, schema: Value) -> Route {
        self.replies.push(Reply { status, description, content: Some(("application/json", schema)) });
        self
    }

    /// An answer of another content type.
    pub fn reply_as(
        mut self,
        status: u16,
        description: &'static str,
        content_type: &'static str,
        schema: Value,
    ) -> Route {
        self.replies.push(Reply { status, description, content: Some((content_type, schema)) });
        self
    }

    /// An answer without a body.
    pub fn empty_reply(mut self, status: u16, description: &'static str) -> Route {
        self.replies.push(Reply { status, description, content: None });
        self
    }

    /// Documented error answers (each with the `Error` shape).
    pub fn errors(mut self, statuses: &[u16]) -> Route {
        for status in statuses {
            let description = match status {
                400 => "Malformed JSON, a missing field or a wrong type",
                401 => "Missing or wrong token (API bound beyond loopback)",
                404 => "No such record",
                409 => "Already exists, duplicate SKU or barcode, or already resolved",
                413 => "Body too large",
                415 => "The body is not application/json",
                422 => "Well-formed but invalid (a rule is broken)",
                503 => "The node is stopping",
                _ => "Error",
            };
            self.replies.push(Reply {
                status: *status,
                description,
                content: Some(("application/json", schema_ref("Error"))),
            });
        }
        self
    }

    fn operation(&self) -> Value {
        let mut parameters: Vec<Value> = path_params(self.path)
            .map(|name| {
                json!({"name": name, "in": "path", "required": true,
                       "schema": {"type": "string", "minLength": 1, "maxLength": 64}})
            })
            .collect();
        parameters.extend(self.query.iter().map(|param| {
            json!({"name": param.name, "in": "query", "required": false,
                   "description": param.description, "schema": param.schema})
        }));
        let mut responses = Map::new();
        let mut replies = self.replies.clone();
        let error = |status, description| Reply {
            status,
            description,
            content: Some(("application/json", schema_ref("Error"))),
        };
        replies.push(error(401, "Missing or wrong token (API bound beyond loopback)"));
        replies.push(error(
            403,
            "forbidden_host: the Host is not one of the node's names; forbidden_origin: sent by another web page",
        ));
        let state_changing = self.method != Method::Get;
        if state_changing {
            replies.push(error(
                415,
                "Not sent as Content-Type: application/json (required even without a body)",
            ));
            replies.push(error(507, "storage_full: the disk is full; nothing was written"));
        }
        for reply in replies {
            let mut response = json!({"description": reply.description});
            if let Some((content_type, schema)) = reply.content {
                response["content"] = json!({content_type: {"schema": schema}});
            }
            responses.entry(reply.status.to_string()).or_insert(response);
        }
        let mut operation = json!({
            "operationId": self.operation_id,
            "summary": self.summary,
            "tags": [self.tag],
            "parameters": parameters,
            "responses": responses,
        });
        match &self.body {
            Some((schema, required)) => {
                operation["requestBody"] =
                    json!({"required": required, "content": {"application/json": {"schema": schema}}});
            }
            // No body is read, but the JSON content type is required (api/guard.rs).
            None if state_changing => {
                operation["requestBody"] = json!({
                    "required": false,
                    "description": "No body is needed; send `Content-Type: application/json` anyway",
                    "content": {"application/json": {"schema": {"type": "object", "maxProperties": 0}}},
                });
            }
            None => {}
        }
        operation
    }
}

/// The `{name}` parameters of a path.
pub fn path_params(path: &str) -> impl Iterator<Item = &str> {
    path.split('/').filter_map(|segment| segment.strip_prefix('{').and_then(|rest| rest.strip_suffix('}')))
}

/// The OpenAPI document of these routes, with the component `schemas` they refer to.
pub fn document(routes: &[Route], schemas: Map<String, Value>) -> Value {
    let mut paths = Map::new();
    for route in routes {
        let item = paths.entry(route.path.to_string()).or_insert_with(|| json!({}));
        item[route.method.as_str()] = route.operation();
    }
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "possync node API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "The local HTTP API of a possync terminal (SPEC 6). JSON in camelCase; \
                errors are {\"error\": {\"code\", \"message\"}}. Open on loopback; bound anywhere \
                else, every call needs `Authorization: Bearer <api_token>` (or `?token=`). Web pages \
                are kept out: the Host must be one of the node's names (403 forbidden_host), an \
                Origin must be the node's own (403 forbidden_origin), and every POST, PUT, PATCH \
                and DELETE must be sent with `Content-Type: application/json`, also without a \
                body (415 unsupported_media_type).",
        },
        "servers": [{"url": "/"}],
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    })
}

/// `{"$ref": "#/components/schemas/NAME"}`.
pub fn schema_ref(name: &str) -> Value {
    json!({"$ref": format!("#/components/schemas/{name}")})
}

/// An array of the named schema.
pub fn array_of(name: &str) -> Value {
    json!({"type": "array", "items": schema_ref(name)})
}

fn nullable(mut schema: Value) -> Value {
    schema["nullable"] = json!(true);
    schema
}

/// A decimal amount as a request may carry it: a JSON number or a numeric string.
pub(super) fn amount_input() -> Value {
    json!({"oneOf": [{"type": "number"}, {"type": "string", "pattern": "^-?[0-9]+(\\.[0-9]+)?$"}]})
}

/// A quantity of goods: at most 3 decimals, at most a billion either way.
fn quantity_input() -> Value {
    json!({"description": "At most 3 decimals and 1000000000 in magnitude", "oneOf": [
        {"type": "number", "minimum": -1_000_000_000, "maximum": 1_000_000_000},
        {"type": "string", "pattern": "^-?[0-9]{1,10}(\\.[0-9]{1,3})?$"}]})
}

/// The rule of `entity::check_text` as a pattern: no control characters, except line
/// breaks and tabs in free text.
fn text_pattern(max: usize) -> &'static str {
    if possync_core::entity::text_allows_line_breaks(max) {
        "^[^\\u0000-\\u0008\\u000B\\u000C\\u000E-\\u001F\\u007F-\\u009F]*$"
    } else {
        "^[^\\u0000-\\u001F\\u007F-\\u009F]*$"
    }
}

/// The schema of one field, for answers (`input`: false) or requests.
fn field_schema(ty: FieldType, input: bool) -> Value {
    let amount = |minimum_one: bool| {
        if input {
            amount_input()
        } else if minimum_one {
            json!({"type": "number", "minimum": 0, "maximum": 1})
        } else {
            json!({"type": "number", "minimum": 0})
        }
    };
    match ty {
        FieldType::Text(max) => {
            json!({"type": "string", "minLength": 1, "maxLength": max, "pattern": text_pattern(max)})
        }
        FieldType::OptText(max) => {
            nullable(json!({"type": "string", "maxLength": max, "pattern": text_pattern(max)}))
        }
        FieldType::OptRef => nullable(json!({"type": "string", "minLength": 1, "maxLength": 64})),
        FieldType::Amount { max_one } => amount(max_one),
        FieldType::OptAmount => nullable(amount(false)),
        FieldType::Bool => json!({"type": "boolean"}),
        FieldType::Int => json!({"type": "integer"}),
        FieldType::Timestamp => json!({"type": "string", "format": "date-time"}),
        FieldType::TicketStatus => {
            json!({"type": "string", "enum": ["completed", "cancelled", "refunded", "partially_refunded"]})
        }
        FieldType::Role => json!({"type": "string", "enum": possync_core::entity::USER_ROLES}),
        FieldType::OptSignedAmount => {
            nullable(if input { amount_input() } else { json!({"type": "number"}) })
        }
        FieldType::SessionStatus => json!({"type": "string", "enum": possync_core::entity::SESSION_STATUSES}),
        FieldType::Date => json!({"type": "string", "format": "date"}),
        FieldType::StorePrices => nullable(json!({
            "type": "object",
            "description": "Price per store of a chain (store id to amount); a till of a listed store charges it instead of price",
            "maxProperties": possync_core::entity::MAX_STORE_PRICES,
            "propertyNames": {"pattern": "^[A-Za-z0-9_-]{1,32}$"},
            "additionalProperties": amount(false),
        })),
    }
}

/// The record, its create body and its patch body, from the field table.
pub(super) fn record_schemas(kind: EntityKind) -> (Value, Value, Value) {
    let mut answer = Map::new();
    let mut input = Map::new();
    answer.insert("id".into(), json!({"type": "string"}));
    input
        .insert("id".into(), json!({"type": "string", "minLength": 1, "maxLength": 64, "pattern": "^\\S+$"}));
    let mut required = Vec::new();
    for spec in kind.fields() {
        answer.insert(spec.name.into(), field_schema(spec.ty, false));
        input.insert(spec.name.into(), field_schema(spec.ty, true));
        if spec.required {
            required.push(spec.name);
        }
    }
    if kind == EntityKind::Product {
        answer.insert("stock".into(), json!({"type": "number", "description": "Sum of the movements"}));
    }
    answer.insert("updatedAt".into(), nullable(json!({"type": "string", "format": "date-time"})));
    let mut patch = input.clone();
    patch.remove("id");
    (
        json!({"type": "object", "properties": answer}),
        json!({"type": "object", "properties": input, "required": required, "additionalProperties": false}),
        json!({"type": "object", "properties": patch, "minProperties": 1, "additionalProperties": false}),
    )
}

/// The schemas shared by several route modules (records, answers of the sync routes); each
/// module that has schemas of its own gives them (`super::schemas` gathers them all).
pub(super) fn shared_schemas() -> Map<String, Value> {
    let mut schemas = Map::new();
    for (kind, name) in [
        (EntityKind::Product, "Product"),
        (EntityKind::Category, "Category"),
        (EntityKind::Customer, "Customer"),
    ] {
        let (answer, create, patch) = record_schemas(kind);
        schemas.insert(name.into(), answer);
        schemas.insert(format!("{name}Create"), create);
        schemas.insert(format!("{name}Patch"), patch);
    }
    // Text the store checks with `entity::check_text`.
    let checked_text = |max: usize| json!({"type": "string", "maxLength": max, "pattern": text_pattern(max)});
    let id = json!({"type": "string", "minLength": 1, "maxLength": 64, "pattern": "^\\S+$"});
    let int = json!({"type": "integer"});
    let string = json!({"type": "string"});
    let more: Value = json!({
        "Error": {
            "type": "object", "required": ["error"],
            "properties": {"error": {"type": "object", "required": ["code", "message"],
                "properties": {"code": string, "message": string}}},
        },
        "Status": {
            "type": "object",
            "required": ["serverRunning", "connectedPeers", "totalPeers", "enabled", "posId", "posName", "peers"],
            "properties": {
                "serverRunning": {"type": "boolean"}, "connectedPeers": int, "totalPeers": int,
                "enabled": {"type": "boolean"}, "posId": string, "posName": string,
                "peers": {"type": "array", "items": {"type": "object", "properties": {
                    "id": string, "name": string, "address": nullable(string.clone()),
                    "online": {"type": "boolean"}, "lastSeen": nullable(string.clone()),
                    "behind": {"type": "integer", "minimum": 0,
                               "description": "changes this peer holds that this node has not taken yet (catching up while > 0)"},
                    "throttled": {"type": "integer", "minimum": 0,
                                  "description": "live changes of the current connection that the peer pushed faster than p2p_peer_max_changes_per_second, applied late"}}}},
            },
        },
        "DetailedStats": {
            "type": "object", "additionalProperties": false,
            "required": ["connections", "totalMessagesSent", "totalMessagesReceived", "totalBytesSent", "totalBytesReceived"],
            "properties": {
                "connections": {"type": "array", "items": {"type": "object", "properties": {
                    "peerId": string, "peerName": string, "messagesSent": int, "messagesReceived": int,
                    "bytesSent": int, "bytesReceived": int, "lastPing": nullable(string.clone()),
                    "lastPong": nullable(string.clone()), "reconnectAttempts": int}}},
                "totalMessagesSent": int, "totalMessagesReceived": int, "totalBytesSent": int, "totalBytesReceived": int,
            },
        },
        "AuditRow": {"type": "object", "description": "A row of p2p_sync_logs, p2p_conflicts or p2p_connection_metrics, columns in camelCase", "properties": {"id": int}},
        "Conflict": {"type": "object", "properties": {
            "id": int, "peerId": nullable(string.clone()), "peerName": nullable(string.clone()),
            "entityType": string, "entityId": string, "conflictType": string,
            "localData": nullable(string.clone()), "remoteData": nullable(string.clone()),
            "localUpdatedAt": nullable(string.clone()), "remoteUpdatedAt": nullable(string.clone()),
            "resolutionStrategy": string, "finalData": nullable(string.clone()),
            "resolvedBy": nullable(string.clone()), "resolvedAt": nullable(string.clone()),
            "notes": nullable(string.clone()), "createdAt": string,
            "entityName": nullable(json!({"type": "string",
                "description": "the record's readable name (name, username, ticket number or SKU), as POSPlus's p2p_conflicts has it"}))}},
        "Resolve": {
            "type": "object", "required": ["choice", "resolvedBy"], "additionalProperties": false,
            "properties": {
                "choice": {"type": "string", "enum": ["local", "remote", "merged"]},
                "data": {"type": "object", "description": "The merged record (choice `merged` only)"},
                "resolvedBy": {"type": "string", "minLength": 1, "maxLength": 128},
            },
        },
        "Toggle": {"type": "object", "required": ["enabled"], "additionalProperties": false,
            "properties": {"enabled": {"type": "boolean"}}},
        "Accepted": {"type": "object", "properties": {"accepted": {"type": "boolean"}, "connectedPeers": int}},
        "Setting": {"type": "object", "properties": {"key": string, "value": string, "type": string, "description": string}},
        "SettingValue": {"type": "object", "required": ["value"], "additionalProperties": false,
            "properties": {"value": {"description": "The new value: text, a number or a boolean"}}},
        "Cleanup": {"type": "object", "additionalProperties": false,
            "properties": {"olderThanDays": nullable(json!({"type": "integer", "minimum": 0, "maximum": 36500}))}},
        "CleanupResult": {"type": "object", "required": ["deleted", "olderThanDays"],
            "properties": {"deleted": int, "olderThanDays": int}},
        "SaleLine": {
            "type": "object", "required": ["productId", "quantity"], "additionalProperties": false,
            "properties": {"productId": id, "quantity": quantity_input(), "unitPrice": amount_input(),
                "discountRate": amount_input()},
        },
        "Payment": {
            "type": "object", "required": ["method", "amount"], "additionalProperties": false,
            "properties": {"method": {"type": "string", "enum": ["cash", "card", "transfer", "check", "other"]},
                "amount": amount_input(), "reference": nullable(checked_text(500))},
        },
        "Sale": {
            "type": "object", "required": ["lines", "payments"], "additionalProperties": false,
            "properties": {"id": id, "customerId": nullable(id.clone()), "lines": array_of("SaleLine"),
                "payments": array_of("Payment"), "notes": nullable(checked_text(4000))},
        },
        "Ticket": {"type": "object", "properties": {
            "id": string, "ticketNumber": string, "posId": string, "customerId": nullable(string.clone()),
            "cashSessionId": nullable(json!({"type": "string", "description": "the cash session open on the selling till, if any"})),
            "subtotal": {"type": "number"}, "discountAmount": {"type": "number"}, "totalAmount": {"type": "number"},
            "status": field_schema(FieldType::TicketStatus, false), "notes": nullable(string.clone()),
            "createdAt": string, "updatedAt": nullable(string.clone()),
            "lines": {"type": "array", "items": {"type": "object"}},
            "payments": {"type": "array", "items": {"type": "object"}}}},
        "Refund": {
            "type": "object", "additionalProperties": false,
            "properties": {
                "lines": nullable(json!({"type": "array", "items": {"type": "object", "required": ["productId", "quantity"],
                    "additionalProperties": false, "properties": {"productId": id, "quantity": quantity_input()}}})),
                "reason": nullable(checked_text(4000)),
            },
        },
        "Cancel": {"type": "object", "additionalProperties": false, "properties": {"reason": nullable(checked_text(4000))}},
        "StockAdjust": {
            "type": "object", "required": ["productId", "quantity", "type"], "additionalProperties": false,
            "properties": {"productId": id, "quantity": quantity_input(),
                "type": {"type": "string", "enum": ["in", "out", "adjustment"]}, "reference": nullable(checked_text(500))},
        },
        "StockCount": {
            "type": "object", "required": ["productId", "counted"], "additionalProperties": false,
            "properties": {"productId": id, "counted": quantity_input(), "reference": nullable(checked_text(500))},
        },
        "Movement": {"type": "object", "properties": {
            "id": string, "productId": string, "type": string, "quantity": {"type": "number"},
            "reference": nullable(string.clone()), "posId": string, "createdAt": string}},
        "Dashboard": {"type": "object", "required": ["health", "history", "rejected", "alerts"], "properties": {
            "health": {"type": "object", "properties": {
                "uptimePercent": nullable(json!({"type": "number"})), "avgReconnectMs": nullable(int.clone()),
                "syncSuccessRate": nullable(json!({"type": "number"})), "conflictsPerHour": nullable(json!({"type": "number"}))}},
            "history": {"type": "object", "properties": {
                "daily": {"type": "array", "items": {"type": "object", "properties": {
                    "day": string, "changes": int, "duplicates": int, "conflicts": int, "errors": int}}},
                "peers": {"type": "array", "items": {"type": "object"}}}},
            "rejected": {"type": "array", "items": {"type": "object", "properties": {
                "address": string, "reason": string, "attempts": int, "lastHour": int,
                "firstSeen": string, "lastSeen": string}}},
            "alerts": {"type": "array", "items": {"type": "object", "properties": {
                "level": {"type": "string", "enum": ["warning", "critical"]}, "message": string}}}}},
    });
    if let Value::Object(more) = more {
        schemas.extend(more);
    }
    schemas
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// Every `$ref` in the document names a schema it defines.
    #[test]
    fn every_reference_resolves() {
        let document = super::super::routes_document();
        let schemas = &document["components"]["schemas"];
        assert!(schemas.as_object().is_some_and(|schemas| schemas.len() > 10), "{schemas}");
        let mut refs = BTreeSet::new();
        collect_refs(&document, &mut refs);
        for reference in refs {
            let name = reference.trim_start_matches("#/components/schemas/");
            assert!(schemas.get(name).is_some(), "{reference} is not defined");
        }
    }

    fn collect_refs(value: &Value, out: &mut BTreeSet<String>) {
        match value {
            Value::Object(object) => {
                for (key, value) in object {
                    if key == "$ref" {
                        out.extend(value.as_str().map(str::to_string));
                    }
                    collect_refs(value, out);
                }
            }
            Value::Array(items) => items.iter().for_each(|item| collect_refs(item, out)),
            _ => {}
        }
    }

    #[test]
    fn path_params_are_found() {
        assert_eq!(path_params("/api/tickets/{id}/refund").collect::<Vec<_>>(), ["id"]);
        assert_eq!(path_params("/api/status").count(), 0);
    }
}
