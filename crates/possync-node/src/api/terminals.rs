//! The tills known by key, and revoking one (issue 13, item 3): a lost or stolen till is
//! revoked with one call, and every till then refuses its changes after the last one this
//! till holds. The rules live in the store (`possync_store::keys`, docs/DESIGN.md).

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use possync_core::PosId;
use serde::Deserialize;
use serde_json::{Value, json};

use super::error::{ApiError, OptionalJson, PathParam};
use super::openapi::{Method, Route, schema_ref};
use super::{ApiState, read, write, write_change};

/// `POST /api/terminals/{posId}/revoke`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RevokeBody {
    /// Why (lost, stolen...).
    #[serde(default)]
    reason: Option<String>,
}

pub(super) fn routes() -> Vec<Route> {
    vec![
        Route::new(Method::Get, "/api/terminals", "listTerminals", list)
            .summary("This till's public key, and every till known by its key or revoked")
            .tag("sync")
            .reply(200, "The tills", schema_ref("Terminals")),
        Route::new(Method::Post, "/api/terminals/{posId}/revoke", "revokeTerminal", revoke)
            .summary(
                "Revoke a lost or stolen till: every till refuses its changes after the last one held here",
            )
            .tag("sync")
            .optional_body(schema_ref("Revoke"))
            .reply(200, "The revocation", schema_ref("Revocation"))
            .errors(&[400, 415, 422, 503]),
    ]
}

/// The `Terminals`, `Revoke` and `Revocation` schemas.
pub(super) fn schemas() -> Vec<(String, Value)> {
    let string = json!({"type": "string"});
    let nullable = |schema: Value| {
        let mut schema = schema;
        schema["nullable"] = json!(true);
        schema
    };
    let terminal = json!({"type": "object", "properties": {
        "posId": string, "publicKey": nullable(string.clone()), "sinceSeq": nullable(json!({"type": "integer"})),
        "enrolledAt": nullable(string.clone()), "revokedAfterSeq": nullable(json!({"type": "integer"})),
        "revokeReason": nullable(string.clone()), "revokedBy": nullable(string.clone()),
        "revokedAt": nullable(string.clone())}});
    vec![
        (
            "Terminals".into(),
            json!({"type": "object", "required": ["posId", "publicKey", "terminals"], "properties": {
                "posId": string, "publicKey": {"type": "string", "description": "this till's Ed25519 key (base64)"},
                "terminals": {"type": "array", "items": terminal}}}),
        ),
        (
            "Revoke".into(),
            json!({"type": "object", "additionalProperties": false,
                   "properties": {"reason": {"type": "string", "maxLength": 500, "nullable": true}}}),
        ),
        (
            "Revocation".into(),
            json!({"type": "object", "required": ["posId", "untilSeq"], "properties": {
                "posId": string, "untilSeq": {"type": "integer"}, "reason": nullable(string.clone())}}),
        ),
    ]
}

async fn list(State(api): State<Arc<ApiState>>) -> Result<Json<Value>, ApiError> {
    let terminals = read(&api.node, |reader| reader.terminals()).await?;
    // The key lives with the writer (the store); reading it is a short job on its queue.
    let public_key = write(&api.node, |store| Ok(store.public_key())).await?;
    Ok(Json(
        json!({"posId": api.node.identity.pos_id.as_str(), "publicKey": public_key, "terminals": terminals}),
    ))
}

async fn revoke(
    State(api): State<Arc<ApiState>>,
    PathParam(pos_id): PathParam,
    OptionalJson(body): OptionalJson<RevokeBody>,
) -> Result<Json<Value>, ApiError> {
    let pos_id =
        PosId::parse(pos_id.as_str()).map_err(|err| ApiError::bad_request(format!("posId: {err}")))?;
    let revocation =
        write_change(&api.node, move |store| store.revoke_terminal(&pos_id, body.reason.as_deref())).await?;
    Ok(Json(revocation))
}
