//! The node itself: status, the seed's detailed stats, the audit trail (sync logs,
//! conflicts, connection metrics), control (sync now, reconnect, P2P on/off), settings,
//! manual conflict resolution, log cleanup, Prometheus metrics and the OpenAPI document.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use possync_store::{Resolution, Settings};
use serde::Deserialize;
use serde_json::{Value, json};

use super::entities::Paging;
use super::error::{ApiError, ApiJson, ApiQuery, OptionalJson, PathParam};
use super::openapi::{Method, Route, array_of, schema_ref};
use super::{ApiState, check_paging, read, write, write_change};
use crate::peers::{DetailedStats, NodeStatus};
use crate::shared::NodeShared;

/// Most rows a page of an audit list (docs/DASHBOARD.md: 1..500, default 50).
const AUDIT_MAX: u32 = 500;
/// Default page of an audit list.
const AUDIT_DEFAULT: u32 = 50;

pub(super) fn routes() -> Vec<Route> {
    let audit = |route: Route, summary, schema: &str| {
        route
            .summary(summary)
            .tag("audit")
            .paging(AUDIT_DEFAULT, AUDIT_MAX)
            .reply(200, "Rows as the table holds them, newest first", array_of(schema))
            .errors(&[400])
    };
    vec![
        Route::new(Method::Get, "/api/status", "getStatus", status)
            .summary("This terminal and its peers")
            .tag("sync")
            .reply(200, "The status", schema_ref("Status")),
        Route::new(Method::Get, "/api/stats", "getStats", stats)
            .summary("Live counters per connection (the seed's getDetailedStats)")
            .tag("sync")
            .reply(200, "The stats", schema_ref("DetailedStats")),
        audit(
            Route::new(Method::Get, "/api/sync-logs", "listSyncLogs", sync_logs),
            "p2p_sync_logs rows",
            "AuditRow",
        ),
        audit(
            Route::new(Method::Get, "/api/conflicts", "listConflicts", conflicts),
            "p2p_conflicts rows",
            "Conflict",
        ),
        audit(
            Route::new(Method::Get, "/api/connection-metrics", "listConnectionMetrics", connection_metrics),
            "p2p_connection_metrics rows",
            "AuditRow",
        ),
        Route::new(Method::Post, "/api/sync-now", "syncNow", sync_now)
            .summary("Ask every connected peer for a full catch-up now")
            .tag("sync")
            .reply(202, "Requested", schema_ref("Accepted")),
        Route::new(Method::Post, "/api/reconnect", "reconnect", reconnect)
            .summary("Redial every known peer now (attempts start over)")
            .tag("sync")
            .reply(202, "Requested", schema_ref("Accepted")),
        Route::new(Method::Post, "/api/p2p/toggle", "toggleP2p", toggle)
            .summary("Turn P2P off (close every connection, stop listening) or on")
            .tag("sync")
            .body(schema_ref("Toggle"))
            .reply(200, "The status once applied", schema_ref("Status"))
            .errors(&[400, 415, 503]),
        Route::new(Method::Get, "/api/settings", "listSettings", settings)
            .summary("The settings table")
            .tag("settings")
            .reply(200, "Every setting", array_of("Setting")),
        Route::new(Method::Put, "/api/settings/{key}", "putSetting", put_setting)
            .summary("Change a setting; it applies at once")
            .tag("settings")
            .body(schema_ref("SettingValue"))
            .reply(200, "Every setting", array_of("Setting"))
            .errors(&[400, 404, 415, 422, 503]),
        Route::new(Method::Post, "/api/conflicts/{id}/resolve", "resolveConflict", resolve)
            .summary("Resolve an open conflict: keep local, take remote, or a merged record")
            .tag("audit")
            .body(schema_ref("Resolve"))
            .reply(200, "The updated conflict row", schema_ref("Conflict"))
            .errors(&[400, 404, 409, 415, 422, 503]),
        Route::new(Method::Post, "/api/cleanup", "cleanup", cleanup)
            .summary("Delete log rows older than olderThanDays (default p2p_log_retention_days)")
            .tag("audit")
            .optional_body(schema_ref("Cleanup"))
            .reply(200, "How many rows went", schema_ref("CleanupResult"))
            .errors(&[400, 415, 503]),
        Route::new(Method::Get, "/metrics", "metrics", metrics)
            .summary("Prometheus metrics (text exposition format); see docs/metrics.md")
            .tag("node")
            .reply_as(200, "The metrics", "text/plain", json!({"type": "string"})),
        Route::new(Method::Get, "/api/openapi.json", "openapi", openapi)
            .summary("This document")
            .tag("node")
            .reply(200, "The OpenAPI document", json!({"type": "object"})),
    ]
}

/// `GET /api/status` as a value (also sent in every `stats` event).
pub(super) fn status_of(node: &NodeShared) -> NodeStatus {
    let settings = node.settings();
    node.peers.status(node.is_listening(), settings.enabled, &node.identity.pos_id, &node.identity.pos_name)
}

async fn status(State(api): State<Arc<ApiState>>) -> Json<NodeStatus> {
    Json(status_of(&api.node))
}

async fn stats(State(api): State<Arc<ApiState>>) -> Json<DetailedStats> {
    Json(api.node.peers.detailed_stats())
}

async fn sync_logs(
    State(api): State<Arc<ApiState>>,
    ApiQuery(paging): ApiQuery<Paging>,
) -> Result<Json<Vec<Value>>, ApiError> {
    let (limit, offset) = audit_paging(&paging)?;
    Ok(Json(read(&api.node, move |reader| reader.sync_logs(limit, offset)).await?))
}

async fn conflicts(
    State(api): State<Arc<ApiState>>,
    ApiQuery(paging): ApiQuery<Paging>,
) -> Result<Json<Vec<Value>>, ApiError> {
    let (limit, offset) = audit_paging(&paging)?;
    Ok(Json(read(&api.node, move |reader| reader.conflicts(limit, offset)).await?))
}

async fn connection_metrics(
    State(api): State<Arc<ApiState>>,
    ApiQuery(paging): ApiQuery<Paging>,
) -> Result<Json<Vec<Value>>, ApiError> {
    let (limit, offset) = audit_paging(&paging)?;
    Ok(Json(read(&api.node, move |reader| reader.connection_metrics(limit, offset)).await?))
}

fn audit_paging(paging: &Paging) -> Result<(Option<u32>, Option<u32>), ApiError> {
    check_paging(paging.limit, AUDIT_MAX)?;
    Ok((Some(paging.limit.unwrap_or(AUDIT_DEFAULT)), paging.offset))
}

async fn sync_now(State(api): State<Arc<ApiState>>) -> Response {
    api.node.sync_now();
    accepted(&api.node)
}

async fn reconnect(State(api): State<Arc<ApiState>>) -> Response {
    api.node.reconnect.notify_waiters();
    accepted(&api.node)
}

fn accepted(node: &NodeShared) -> Response {
    (StatusCode::ACCEPTED, Json(json!({"accepted": true, "connectedPeers": node.peers.connected()})))
        .into_response()
}

/// `POST /api/p2p/toggle`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToggleBody {
    /// P2P on or off.
    enabled: bool,
}

async fn toggle(
    State(api): State<Arc<ApiState>>,
    ApiJson(body): ApiJson<ToggleBody>,
) -> Result<Json<NodeStatus>, ApiError> {
    set_setting(&api.node, "p2p_enabled", body.enabled.to_string()).await?;
    // The listener follows the setting at once; wait (briefly) until it has, so the answer
    // and the next `GET /api/status` tell the new state.
    for _ in 0..100 {
        if api.node.is_listening() == body.enabled {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(Json(status_of(&api.node)))
}

/// Applies a setting through the node (stored, then pushed to every task that watches it).
async fn set_setting(node: &NodeShared, key: &str, value: String) -> Result<Settings, ApiError> {
    if *node.shutdown.borrow() {
        return Err(ApiError::unavailable());
    }
    Ok(node.set_setting(key.to_string(), value).await?)
}

async fn settings(State(api): State<Arc<ApiState>>) -> Result<Json<Value>, ApiError> {
    let rows = read(&api.node, |reader| reader.settings()).await?;
    Ok(Json(serde_json::to_value(rows).unwrap_or(Value::Null)))
}

/// `PUT /api/settings/{key}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SettingBody {
    /// The new value: text, a number or a boolean.
    value: Value,
}

async fn put_setting(
    State(api): State<Arc<ApiState>>,
    PathParam(key): PathParam,
    ApiJson(body): ApiJson<SettingBody>,
) -> Result<Json<Value>, ApiError> {
    let value = match body.value {
        Value::String(text) => text,
        Value::Bool(flag) => flag.to_string(),
        Value::Number(number) => number.to_string(),
        _ => return Err(ApiError::bad_request("value must be a string, a number or a boolean")),
    };
    let wanted = key.clone();
    if !read(&api.node, move |reader| reader.has_setting(&wanted)).await? {
        return Err(ApiError::not_found(format!("no setting {key:?}")));
    }
    set_setting(&api.node, &key, value).await?;
    settings(State(api)).await
}

/// `POST /api/conflicts/{id}/resolve`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ResolveBody {
    /// local, remote or merged.
    choice: Choice,
    /// The merged record (choice `merged`).
    #[serde(default)]
    data: Option<Value>,
    /// Who decided (the dashboard sends `dashboard`).
    #[serde(default)]
    resolved_by: Option<String>,
}

/// Which version wins.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Choice {
    /// The local version.
    Local,
    /// The remote version.
    Remote,
    /// `data`.
    Merged,
}

async fn resolve(
    State(api): State<Arc<ApiState>>,
    PathParam(id): PathParam,
    ApiJson(body): ApiJson<ResolveBody>,
) -> Result<Json<Value>, ApiError> {
    let Ok(conflict_id) = id.parse::<i64>() else {
        return Err(ApiError::not_found(format!("conflict {id:?} not found")));
    };
    let user = body.resolved_by.unwrap_or_default().trim().to_string();
    if user.is_empty() || user.chars().count() > 128 {
        return Err(ApiError::bad_request("resolvedBy is required: who resolves (1 to 128 characters)"));
    }
    let resolution = match (body.choice, body.data) {
        (Choice::Local, None) => Resolution::Local,
        (Choice::Remote, None) => Resolution::Remote,
        (Choice::Merged, Some(data @ Value::Object(_))) => Resolution::Merged(data),
        (Choice::Merged, _) => {
            return Err(ApiError::bad_request("choice `merged` needs `data`, the merged record (an object)"));
        }
        (_, Some(_)) => return Err(ApiError::bad_request("`data` goes with choice `merged` only")),
    };
    let row =
        write_change(&api.node, move |store| store.resolve_conflict(conflict_id, &resolution, &user)).await?;
    api.hub.publish_conflict(&row);
    Ok(Json(row))
}

/// `POST /api/cleanup`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CleanupBody {
    /// Delete rows older than this many days; the retention setting when absent.
    #[serde(default)]
    older_than_days: Option<u32>,
}

async fn cleanup(
    State(api): State<Arc<ApiState>>,
    OptionalJson(body): OptionalJson<CleanupBody>,
) -> Result<Json<Value>, ApiError> {
    let days = body.older_than_days.unwrap_or_else(|| api.node.settings().log_retention_days);
    if days > 36_500 {
        return Err(ApiError::bad_request("olderThanDays must be from 0 to 36500"));
    }
    let deleted = write(&api.node, move |store| store.cleanup_logs(days)).await?;
    Ok(Json(json!({"deleted": deleted, "olderThanDays": days})))
}

async fn metrics(State(api): State<Arc<ApiState>>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], api.node.metrics.encode())
        .into_response()
}

async fn openapi(State(api): State<Arc<ApiState>>) -> Json<Value> {
    Json(api.openapi.clone())
}
