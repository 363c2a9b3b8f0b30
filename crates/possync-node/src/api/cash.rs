//! Cash sessions and Z reports (issue 11): a till opens its drawer with a float, sells, and
//! closes with the cash counted; the close answers the session (expected cash, difference)
//! and its Z report, which every till then holds. The rules live in the store
//! (`possync_store::cash`); this module only speaks HTTP.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use possync_core::EntityKind;
use possync_store::{CloseCashSession, OpenCashSession, SessionQuery};
use serde::Deserialize;
use serde_json::{Value, json};

use super::entities::path_id;
use super::error::{ApiError, ApiJson, ApiQuery, PathParam};
use super::openapi::{Method, Route, amount_input, array_of, record_schemas, schema_ref};
use super::sales::DayParams;
use super::{ApiState, check_amount, check_paging, read, write};

/// Filters of `GET /api/cash-sessions`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SessionParams {
    /// Sessions of one till.
    pos_id: Option<String>,
    /// `open` or `closed`.
    status: Option<String>,
    /// At most this many (1..=1000, default 100).
    limit: Option<u32>,
    /// Skip this many.
    offset: Option<u32>,
}

pub(super) fn routes() -> Vec<Route> {
    vec![
        Route::new(Method::Post, "/api/cash-sessions", "openCashSession", open)
            .summary("Open this till's cash session with its float (409 cash_session_open when one is open)")
            .tag("cash")
            .body(schema_ref("CashSessionOpen"))
            .reply(201, "The open session", schema_ref("CashSession"))
            .errors(&[400, 409, 415, 422, 503]),
        Route::new(Method::Get, "/api/cash-sessions", "listCashSessions", list)
            .summary("Cash sessions of every till, newest first")
            .tag("cash")
            .query("posId", json!({"type": "string"}), "Sessions of this till.")
            .query(
                "status",
                json!({"type": "string", "enum": ["open", "closed"]}),
                "Open or closed ones only.",
            )
            .paging(100, 1000)
            .reply(200, "The sessions", array_of("CashSession"))
            .errors(&[400]),
        Route::new(Method::Get, "/api/cash-sessions/current", "getCurrentCashSession", current)
            .summary("This till's open session with its figures so far (what its Z report would say now)")
            .tag("cash")
            .reply(200, "The open session, with `totals`", schema_ref("CashSession"))
            .errors(&[404]),
        Route::new(Method::Get, "/api/cash-sessions/{id}", "getCashSession", get_session)
            .summary("One cash session")
            .tag("cash")
            .reply(200, "The session", schema_ref("CashSession"))
            .errors(&[404]),
        Route::new(Method::Post, "/api/cash-sessions/{id}/close", "closeCashSession", close)
            .summary(
                "Close this till's session with the cash counted: expected cash, difference and the Z report",
            )
            .tag("cash")
            .body(schema_ref("CashSessionClose"))
            .reply(200, "The closed session and its Z report", schema_ref("CashSessionClosed"))
            .errors(&[400, 404, 409, 415, 422, 503]),
        Route::new(Method::Get, "/api/z-reports", "listZReports", list_reports)
            .summary("Z reports of every till, newest first")
            .tag("cash")
            .query(
                "day",
                json!({"type": "string", "format": "date"}),
                "Reports closed on this UTC day (YYYY-MM-DD).",
            )
            .query("posId", json!({"type": "string"}), "Reports of this till.")
            .paging(100, 1000)
            .reply(200, "The reports", array_of("ZReport"))
            .errors(&[400]),
        Route::new(Method::Get, "/api/z-reports/{id}", "getZReport", get_report)
            .summary("One Z report")
            .tag("cash")
            .reply(200, "The report", schema_ref("ZReport"))
            .errors(&[404]),
    ]
}

/// The `CashSession`, `ZReport`, `CashSessionOpen`, `CashSessionClose` and
/// `CashSessionClosed` schemas.
pub(super) fn schemas() -> Vec<(String, Value)> {
    let (mut session, ..) = record_schemas(EntityKind::CashSession);
    let (report, ..) = record_schemas(EntityKind::ZReport);
    if let Some(properties) = session["properties"].as_object_mut() {
        properties.insert(
            "totals".into(),
            json!({"type": "object", "description": "current session only: ticketCount, totalSales, totalDiscount, totalRefunds, totalCash, totalCard, totalTransfer, totalCheck, totalOther, openingCash and expectedCash so far"}),
        );
    }
    let id = json!({"type": "string", "minLength": 1, "maxLength": 64, "pattern": "^\\S+$"});
    let notes = json!({"type": "string", "maxLength": 4000, "nullable": true});
    let user = json!({"type": "string", "minLength": 1, "maxLength": 64, "nullable": true,
                      "description": "a cashier account's id"});
    vec![
        ("CashSession".into(), session),
        ("ZReport".into(), report),
        (
            "CashSessionOpen".into(),
            json!({"type": "object", "required": ["openingCash"], "additionalProperties": false,
                   "properties": {"id": id, "openingCash": amount_input(), "openedBy": user, "notes": notes}}),
        ),
        (
            "CashSessionClose".into(),
            json!({"type": "object", "required": ["countedCash"], "additionalProperties": false,
                   "properties": {"countedCash": amount_input(), "closedBy": user, "notes": notes}}),
        ),
        (
            "CashSessionClosed".into(),
            json!({"type": "object", "required": ["session", "zReport"],
                   "properties": {"session": schema_ref("CashSession"), "zReport": schema_ref("ZReport")}}),
        ),
    ]
}

async fn open(
    State(api): State<Arc<ApiState>>,
    ApiJson(body): ApiJson<OpenCashSession>,
) -> Result<Response, ApiError> {
    check_amount("openingCash", body.opening_cash)?;
    let session = write(&api.node, move |store| store.open_cash_session(&body)).await?;
    api.node.metrics.local_changes.inc();
    Ok((StatusCode::CREATED, Json(session)).into_response())
}

async fn close(
    State(api): State<Arc<ApiState>>,
    PathParam(id): PathParam,
    ApiJson(body): ApiJson<CloseCashSession>,
) -> Result<Json<Value>, ApiError> {
    let id = path_id(EntityKind::CashSession, &id)?;
    check_amount("countedCash", body.counted_cash)?;
    let closed = write(&api.node, move |store| store.close_cash_session(&id, &body)).await?;
    // Two changes: the Z report and the session's close.
    api.node.metrics.local_changes.inc_by(2);
    Ok(Json(closed))
}

async fn list(
    State(api): State<Arc<ApiState>>,
    ApiQuery(params): ApiQuery<SessionParams>,
) -> Result<Json<Vec<Value>>, ApiError> {
    check_paging(params.limit, 1000)?;
    if let Some(status) = &params.status
        && !possync_core::entity::SESSION_STATUSES.contains(&status.as_str())
    {
        return Err(ApiError::bad_request(format!("status must be open or closed, not {status:?}")));
    }
    let query = SessionQuery {
        pos_id: params.pos_id,
        status: params.status,
        limit: params.limit,
        offset: params.offset,
    };
    Ok(Json(read(&api.node, move |reader| reader.list_cash_sessions(&query)).await?))
}

async fn current(State(api): State<Arc<ApiState>>) -> Result<Json<Value>, ApiError> {
    let pos_id = api.node.identity.pos_id.to_string();
    let now = possync_core::time::rfc3339_ms(crate::clock::now_ms());
    read(&api.node, move |reader| reader.current_cash_session(&pos_id, &now))
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found("no cash session is open on this till"))
}

async fn get_session(
    State(api): State<Arc<ApiState>>,
    PathParam(id): PathParam,
) -> Result<Json<Value>, ApiError> {
    get_record(&api, EntityKind::CashSession, &id).await
}

async fn list_reports(
    State(api): State<Arc<ApiState>>,
    ApiQuery(params): ApiQuery<DayParams>,
) -> Result<Json<Vec<Value>>, ApiError> {
    let query = params.into_query()?;
    Ok(Json(read(&api.node, move |reader| reader.list_z_reports(&query)).await?))
}

async fn get_report(
    State(api): State<Arc<ApiState>>,
    PathParam(id): PathParam,
) -> Result<Json<Value>, ApiError> {
    get_record(&api, EntityKind::ZReport, &id).await
}

async fn get_record(api: &ApiState, kind: EntityKind, raw: &str) -> Result<Json<Value>, ApiError> {
    let id = path_id(kind, raw)?;
    let wanted = id.clone();
    read(&api.node, move |reader| reader.record(kind, &wanted))
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("{kind} {id} not found")))
}
