//! The chain views (docs/CHAIN.md): the backbone's status on any chain node, and on the head
//! office each store's terminals, last change received, silence alert, sales per day, and
//! stock per store with the chain total.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use serde::Deserialize;
use serde_json::{Value, json};

use super::error::ApiQuery;
use super::openapi::{Method, Route};
use super::{ApiError, ApiState, read};
use crate::config::ChainRole;

pub(super) fn routes() -> Vec<Route> {
    vec![
        Route::new(Method::Get, "/api/chain/status", "chainStatus", status)
            .summary("This node's link to the chain backbone (role, connection, counters, backlog)")
            .tag("chain")
            .reply(200, "The status", json!({"type": "object"})),
        Route::new(Method::Get, "/api/chain/stores", "chainStores", stores)
            .summary(
                "Head office: every store, its terminals, last change received, silence alert, sales per day, uplink (online, offline since, lag)",
            )
            .tag("chain")
            .query(
                "days",
                json!({"type": "integer", "minimum": 1, "maximum": MAX_SALES_DAYS}),
                "Sales per day over this many UTC days, today included (default 31).",
            )
            .reply(200, "The stores", json!({"type": "array", "items": {"type": "object"}}))
            .errors(&[400, 404]),
        Route::new(Method::Get, "/api/chain/stock", "chainStock", stock)
            .summary("Head office: stock of a product per store and for the whole chain")
            .tag("chain")
            .query("productId", json!({"type": "string"}), "The product.")
            .reply(200, "Stock per store and total", json!({"type": "object"}))
            .errors(&[400, 404]),
    ]
}

async fn status(State(api): State<Arc<ApiState>>) -> Json<Value> {
    let mut status = api.node.chain.snapshot();
    status["role"] = match &api.node.config.chain {
        Some(ChainRole::Uplink(uplink)) => {
            json!({"uplink": {"chain": uplink.backbone.chain.as_str(), "store": uplink.store.as_str()}})
        }
        Some(ChainRole::Hq(hq)) => json!({"hq": {"chain": hq.backbone.chain.as_str()}}),
        None => Value::Null,
    };
    Json(status)
}

/// The head office's `[hq]` section, or 404 on any other node.
fn head_office(api: &ApiState) -> Result<&crate::config::HqConfig, ApiError> {
    match &api.node.config.chain {
        Some(ChainRole::Hq(hq)) => Ok(hq),
        _ => Err(ApiError::new(
            axum::http::StatusCode::NOT_FOUND,
            "not_head_office",
            "this node is not a chain's head office (no [hq] section)",
        )),
    }
}

/// Most days of sales per store one `GET /api/chain/stores` lists.
const MAX_SALES_DAYS: u32 = 366;
/// Days of sales listed when the request does not say.
const DEFAULT_SALES_DAYS: u32 = 31;

#[derive(Deserialize)]
struct StoresParams {
    days: Option<u32>,
}

async fn stores(
    State(api): State<Arc<ApiState>>,
    ApiQuery(params): ApiQuery<StoresParams>,
) -> Result<Json<Vec<Value>>, ApiError> {
    let hq = head_office(&api)?;
    let days = params.days.unwrap_or(DEFAULT_SALES_DAYS);
    if !(1..=MAX_SALES_DAYS).contains(&days) {
        return Err(ApiError::bad_request(format!("days must be 1 to {MAX_SALES_DAYS}, not {days}")));
    }
    let now_ms = crate::clock::now_ms();
    let now_secs = now_ms / 1000;
    // The first day listed: today (UTC) and the `days - 1` before it.
    let first_ms = now_ms.saturating_sub(u64::from(days - 1) * 86_400_000);
    let first = possync_core::time::rfc3339_ms(first_ms);
    let since_day = first.get(..10).unwrap_or("1970-01-01").to_string();
    let mut stores = read(&api.node, move |reader| reader.chain_stores(&since_day)).await?;
    let mut reported = api.node.chain.store_states(now_ms, hq.store_offline_after_secs.saturating_mul(1000));
    // A store whose tills report but that has sent no change yet is listed too.
    for store in reported.keys() {
        if !stores.iter().any(|known| known["storeId"] == store.as_str()) {
            stores.push(json!({
                "storeId": store.as_str(), "terminals": [], "lastReceivedAt": null, "lastReceivedUnix": null,
                "changesReceived": 0, "changesApplied": 0, "tickets": 0, "salesPerDay": [],
            }));
        }
    }
    for store in &mut stores {
        let silent = store["lastReceivedUnix"].as_u64().map(|last| now_secs.saturating_sub(last));
        store["silentSeconds"] = json!(silent);
        store["alert"] = json!(silent.is_some_and(|silent| silent > hq.silent_store_alert_secs));
        let state = store["storeId"]
            .as_str()
            .and_then(|id| possync_chain::StoreId::parse(id).ok())
            .and_then(|id| reported.remove(&id));
        let uplink = state.map(|state| {
            // How old the oldest change the store still holds for the backbone is (by the
            // tills' clocks, never below 0); a till that has not read the backbone's state
            // yet cannot say, then: for how long head office has received nothing.
            let lag_seconds = if state.backlog == 0 {
                Some(0)
            } else if let Some(oldest) = state.oldest_pending_ms {
                Some(now_ms.saturating_sub(oldest) / 1000)
            } else {
                silent
            };
            json!({
                "online": state.online,
                "lastReportAt": possync_core::time::rfc3339_ms(state.last_report_ms),
                "offlineSince": state.offline_since_ms.map(possync_core::time::rfc3339_ms),
                "lagChanges": state.backlog,
                "lagSeconds": lag_seconds,
                "conflicts": state.conflicts.map(|conflicts| json!({"open": conflicts.open, "lastDay": conflicts.last_day})),
            })
        });
        store["uplink"] = uplink.unwrap_or(Value::Null);
    }
    Ok(Json(stores))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct StockParams {
    product_id: Option<String>,
}

async fn stock(
    State(api): State<Arc<ApiState>>,
    ApiQuery(params): ApiQuery<StockParams>,
) -> Result<Json<Value>, ApiError> {
    head_office(&api)?;
    let Some(product) = params.product_id.filter(|id| !id.is_empty()) else {
        return Err(ApiError::bad_request("productId is required"));
    };
    Ok(Json(read(&api.node, move |reader| reader.chain_stock(&product)).await?))
}
