//! Tickets (sell, list, get, refund, cancel) and stock (adjust, count), SPEC 6.2. A sale is
//! written whole, with its stock movements, in one transaction by the store, and travels to
//! the peers as one change.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use possync_core::EntityKind;
use possync_core::entity::MovementType;
use possync_store::reader::DayQuery;
use possync_store::{RefundLine, SaleOutcome, SaleRequest};
use rust_decimal::Decimal;
use serde::Deserialize;
use serde_json::{Value, json};

use super::entities::path_id;
use super::error::{ApiError, ApiJson, ApiQuery, OptionalJson, PathParam};
use super::openapi::{Method, Route, array_of, schema_ref};
use super::{ApiState, check_amount, check_paging, check_quantity, read, write, write_change};

/// Filters of `GET /api/tickets` and `GET /api/z-reports`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DayParams {
    /// `YYYY-MM-DD` (UTC).
    day: Option<String>,
    /// One terminal's only.
    pos_id: Option<String>,
    /// At most this many (1..=1000, default 100).
    limit: Option<u32>,
    /// Skip this many.
    offset: Option<u32>,
}

impl DayParams {
    /// The store's query, once the paging and the day (a real calendar day) are checked.
    pub(super) fn into_query(self) -> Result<DayQuery, ApiError> {
        check_paging(self.limit, 1000)?;
        if let Some(day) = &self.day
            && !possync_core::time::is_date(day)
        {
            return Err(ApiError::bad_request(format!("day must be YYYY-MM-DD, not {day:?}")));
        }
        Ok(DayQuery { day: self.day, pos_id: self.pos_id, limit: self.limit, offset: self.offset })
    }
}

/// `POST /api/tickets/{id}/refund`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RefundBody {
    /// The lines to refund; everything left when absent.
    #[serde(default)]
    lines: Option<Vec<RefundLine>>,
    /// Why.
    #[serde(default)]
    reason: Option<String>,
}

/// `POST /api/tickets/{id}/cancel`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CancelBody {
    /// Why.
    #[serde(default)]
    reason: Option<String>,
}

/// The movement types a person may record (sale and return come from tickets).
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AdjustType {
    /// Goods received (quantity > 0).
    In,
    /// Goods out (quantity < 0).
    Out,
    /// A correction, either way.
    Adjustment,
}

/// `POST /api/stock/adjust`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AdjustBody {
    /// The product.
    product_id: String,
    /// Signed quantity.
    #[serde(with = "possync_core::decimal::json")]
    quantity: Decimal,
    /// in, out or adjustment.
    #[serde(rename = "type")]
    kind: AdjustType,
    /// Delivery note, reason...
    #[serde(default)]
    reference: Option<String>,
}

/// `POST /api/stock/count`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CountBody {
    /// The product.
    product_id: String,
    /// How many are on the shelf.
    #[serde(with = "possync_core::decimal::json")]
    counted: Decimal,
    /// Free text.
    #[serde(default)]
    reference: Option<String>,
}

pub(super) fn routes() -> Vec<Route> {
    vec![
        Route::new(Method::Post, "/api/tickets", "createTicket", create_ticket)
            .summary("Sell: the ticket with its lines, payments and stock movements")
            .tag("tickets")
            .body(schema_ref("Sale"))
            .reply(201, "The ticket", schema_ref("Ticket"))
            .reply(
                200,
                "Already recorded: a re-sent sale (same id and content); the stored ticket",
                schema_ref("Ticket"),
            )
            .errors(&[400, 409, 415, 422, 503]),
        Route::new(Method::Get, "/api/tickets", "listTickets", list_tickets)
            .summary("Tickets, newest first")
            .tag("tickets")
            .query(
                "day",
                json!({"type": "string", "format": "date"}),
                "Tickets of this UTC day (YYYY-MM-DD).",
            )
            .query("posId", json!({"type": "string"}), "Tickets of this terminal.")
            .paging(100, 1000)
            .reply(200, "The tickets", array_of("Ticket"))
            .errors(&[400]),
        Route::new(Method::Get, "/api/tickets/{id}", "getTicket", get_ticket)
            .summary("One ticket")
            .tag("tickets")
            .reply(200, "The ticket", schema_ref("Ticket"))
            .errors(&[404]),
        Route::new(Method::Post, "/api/tickets/{id}/refund", "refundTicket", refund)
            .summary("Refund some lines, or everything left (stock comes back)")
            .tag("tickets")
            .optional_body(schema_ref("Refund"))
            .reply(200, "The ticket", schema_ref("Ticket"))
            .errors(&[400, 404, 415, 422, 503]),
        Route::new(Method::Post, "/api/tickets/{id}/cancel", "cancelTicket", cancel)
            .summary("Cancel (void) a ticket (stock comes back)")
            .tag("tickets")
            .optional_body(schema_ref("Cancel"))
            .reply(200, "The ticket", schema_ref("Ticket"))
            .errors(&[400, 404, 415, 422, 503]),
        Route::new(Method::Post, "/api/stock/adjust", "adjustStock", adjust)
            .summary("Record a stock movement (in > 0, out < 0, adjustment either way)")
            .tag("stock")
            .body(schema_ref("StockAdjust"))
            .reply(201, "The movement", schema_ref("Movement"))
            .errors(&[400, 415, 422, 503]),
        Route::new(Method::Post, "/api/stock/count", "countStock", count)
            .summary("Record a stock count (an adjustment to the counted quantity)")
            .tag("stock")
            .body(schema_ref("StockCount"))
            .reply(201, "The movement", schema_ref("Movement"))
            .errors(&[400, 415, 422, 503]),
    ]
}

async fn create_ticket(
    State(api): State<Arc<ApiState>>,
    ApiJson(sale): ApiJson<SaleRequest>,
) -> Result<Response, ApiError> {
    for line in &sale.lines {
        check_quantity("quantity", line.quantity)?;
        if let Some(price) = line.unit_price {
            check_amount("unitPrice", price)?;
        }
    }
    for payment in &sale.payments {
        check_amount("amount", payment.amount)?;
    }
    // A re-sent sale (same id, same content) answers 200 with the stored ticket: tills
    // re-send after a lost answer. Another sale under a used id stays a 409.
    match write(&api.node, move |store| store.record_sale_once(&sale)).await? {
        SaleOutcome::Recorded(ticket) => {
            api.node.metrics.local_changes.inc();
            Ok((StatusCode::CREATED, Json(ticket)).into_response())
        }
        SaleOutcome::AlreadyRecorded(ticket) => Ok((StatusCode::OK, Json(ticket)).into_response()),
    }
}

async fn list_tickets(
    State(api): State<Arc<ApiState>>,
    ApiQuery(params): ApiQuery<DayParams>,
) -> Result<Json<Vec<Value>>, ApiError> {
    let query = params.into_query()?;
    Ok(Json(read(&api.node, move |reader| reader.list_tickets(&query)).await?))
}

async fn get_ticket(
    State(api): State<Arc<ApiState>>,
    PathParam(id): PathParam,
) -> Result<Json<Value>, ApiError> {
    let id = path_id(EntityKind::Ticket, &id)?;
    let wanted = id.clone();
    read(&api.node, move |reader| reader.ticket(&wanted))
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("ticket {id} not found")))
}

async fn refund(
    State(api): State<Arc<ApiState>>,
    PathParam(id): PathParam,
    OptionalJson(body): OptionalJson<RefundBody>,
) -> Result<Json<Value>, ApiError> {
    let id = path_id(EntityKind::Ticket, &id)?;
    for line in body.lines.iter().flatten() {
        check_quantity("quantity", line.quantity)?;
    }
    let ticket = write_change(&api.node, move |store| {
        store.refund_ticket(&id, body.lines.as_deref(), body.reason.as_deref())
    })
    .await?;
    Ok(Json(ticket))
}

async fn cancel(
    State(api): State<Arc<ApiState>>,
    PathParam(id): PathParam,
    OptionalJson(body): OptionalJson<CancelBody>,
) -> Result<Json<Value>, ApiError> {
    let id = path_id(EntityKind::Ticket, &id)?;
    let ticket =
        write_change(&api.node, move |store| store.cancel_ticket(&id, body.reason.as_deref())).await?;
    Ok(Json(ticket))
}

/// A product named in a body that does not exist is an invalid body (422), not a missing
/// resource: the URL itself exists.
fn product_in_body(err: ApiError) -> ApiError {
    if err.code == "not_found" {
        ApiError::unprocessable(format!("invalid productId: {}", err.message))
    } else {
        err
    }
}

fn body_product(raw: &str) -> Result<possync_core::EntityId, ApiError> {
    possync_core::EntityId::parse(raw)
        .map_err(|err| ApiError::unprocessable(format!("invalid productId: {err}")))
}

async fn adjust(
    State(api): State<Arc<ApiState>>,
    ApiJson(body): ApiJson<AdjustBody>,
) -> Result<Response, ApiError> {
    let product = body_product(&body.product_id)?;
    check_quantity("quantity", body.quantity)?;
    let kind = match body.kind {
        AdjustType::In => MovementType::In,
        AdjustType::Out => MovementType::Out,
        AdjustType::Adjustment => MovementType::Adjustment,
    };
    let movement = write_change(&api.node, move |store| {
        store.adjust_stock(&product, body.quantity, kind, body.reference.as_deref())
    })
    .await
    .map_err(product_in_body)?;
    Ok((StatusCode::CREATED, Json(movement)).into_response())
}

async fn count(
    State(api): State<Arc<ApiState>>,
    ApiJson(body): ApiJson<CountBody>,
) -> Result<Response, ApiError> {
    let product = body_product(&body.product_id)?;
    check_quantity("counted", body.counted)?;
    let movement = write_change(&api.node, move |store| {
        // The count is relative to the stock this terminal sees: a product it does not
        // know is refused before the store computes anything.
        store.count_stock(&product, body.counted, body.reference.as_deref())
    })
    .await
    .map_err(product_in_body)?;
    Ok((StatusCode::CREATED, Json(movement)).into_response())
}
