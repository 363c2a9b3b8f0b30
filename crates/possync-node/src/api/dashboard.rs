//! The dashboard: its three static files, embedded in the binary, and `GET /api/dashboard`,
//! the health, history and alerts of docs/DASHBOARD.md. The store runs the document's SQL
//! ([`possync_store::StoreReader::dashboard_rows`]); this module composes the answer.

use std::cmp::Ordering;
use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use possync_store::reader::DashboardRows;
use serde_json::{Value, json};

use super::error::ApiError;
use super::openapi::{Method, Route, schema_ref};
use super::{ApiState, read};
use crate::clock::now_ms;

const INDEX_HTML: &str = include_str!("../../assets/dashboard/index.html");
const APP_JS: &str = include_str!("../../assets/dashboard/app.js");
const STYLE_CSS: &str = include_str!("../../assets/dashboard/style.css");

/// The page needs nothing but the node itself.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

pub(super) fn routes() -> Vec<Route> {
    let text = json!({"type": "string"});
    vec![
        Route::new(Method::Get, "/", "dashboardPage", index)
            .summary("The dashboard page (open as /?token=TOKEN when the API needs a token)")
            .tag("dashboard")
            .reply_as(200, "index.html", "text/html", text.clone()),
        Route::new(Method::Get, "/dashboard/app.js", "dashboardScript", app_js)
            .summary("The dashboard's script")
            .tag("dashboard")
            .reply_as(200, "app.js", "text/javascript", text.clone()),
        Route::new(Method::Get, "/dashboard/style.css", "dashboardStyle", style_css)
            .summary("The dashboard's style sheet")
            .tag("dashboard")
            .reply_as(200, "style.css", "text/css", text),
        Route::new(Method::Get, "/api/dashboard", "dashboardIndicators", dashboard)
            .summary("Health (24 h), history (14 days, peer reliability over 7 days) and alerts")
            .tag("dashboard")
            .reply(200, "The indicators", schema_ref("Dashboard")),
    ]
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    response
}

async fn index() -> Response {
    asset("text/html; charset=utf-8", INDEX_HTML)
}

async fn app_js() -> Response {
    asset("text/javascript; charset=utf-8", APP_JS)
}

async fn style_css() -> Response {
    asset("text/css; charset=utf-8", STYLE_CSS)
}

async fn dashboard(State(api): State<Arc<ApiState>>) -> Result<Json<Value>, ApiError> {
    let now = now_ms();
    let rows = read(&api.node, move |reader| reader.dashboard_rows(now)).await?;
    Ok(Json(compose(&rows)))
}

fn round2(value: f64) -> f64 {
    (value * 100.0).round() / 100.0
}

fn number(row: &Value, key: &str) -> f64 {
    row.get(key).and_then(Value::as_f64).unwrap_or(0.0)
}

fn field(row: &Value, key: &str) -> Value {
    row.get(key).cloned().unwrap_or(Value::Null)
}

/// The `/api/dashboard` answer from the query rows.
pub fn compose(rows: &DashboardRows) -> Value {
    let connected: f64 = rows.uptime_by_peer.iter().map(|row| number(row, "connectedSeconds")).sum();
    let observed: f64 = rows.uptime_by_peer.iter().map(|row| number(row, "observedSeconds")).sum();
    let uptime = if observed > 0.0 { json!(round2(100.0 * connected / observed)) } else { Value::Null };
    let daily: Vec<Value> = rows
        .daily_volume
        .iter()
        .map(|row| {
            json!({"day": field(row, "day"), "changes": field(row, "changes"), "duplicates": field(row, "duplicates"),
                   "conflicts": field(row, "conflicts"), "errors": field(row, "errors")})
        })
        .collect();
    let peers: Vec<Value> = rows
        .peer_reliability
        .iter()
        .map(|row| {
            json!({"peerId": field(row, "peerId"), "peerName": field(row, "peerName"),
                   "reliability": field(row, "reliability"), "uptimePercent": field(row, "uptimePercent"),
                   "failures": field(row, "failures")})
        })
        .collect();
    json!({
        "health": {
            "uptimePercent": uptime,
            "avgReconnectMs": field(&rows.avg_reconnect, "avgReconnectMs"),
            "syncSuccessRate": field(&rows.sync_success_rate, "syncSuccessRate"),
            "conflictsPerHour": field(&rows.conflicts_per_hour, "conflictsPerHour"),
        },
        "history": {"daily": daily, "peers": peers},
        "rejected": rows.rejected_connections.iter().map(|row| {
            json!({"address": field(row, "address"), "reason": field(row, "reason"),
                   "attempts": field(row, "attempts"), "lastHour": field(row, "lastHour"),
                   "firstSeen": field(row, "firstSeen"), "lastSeen": field(row, "lastSeen")})
        }).collect::<Vec<Value>>(),
        "alerts": alerts(rows),
    })
}

/// Every kind of alert, critical first, then by peer name (or address).
fn alerts(rows: &DashboardRows) -> Vec<Value> {
    let text = |row: &Value, key: &str| {
        row.get(key).and_then(Value::as_str).unwrap_or("an unknown peer").to_string()
    };
    let mut alerts: Vec<(String, String, String)> = Vec::new();
    for row in &rows.alert_slow_sync {
        let peer = text(row, "peer");
        let message = format!(
            "Sync with {peer} is slower than usual: {:.0} ms average in the last hour, {:.1}x the 7-day median of {:.0} ms.",
            number(row, "recentMeanMs"),
            number(row, "ratio"),
            number(row, "baselineMedianMs"),
        );
        alerts.push((text(row, "level"), peer, message));
    }
    for row in &rows.alert_sync_errors {
        let peer = text(row, "peer");
        let message = format!(
            "Sync errors from {peer} are above normal: {:.1}% of {} changes in the last hour failed (7-day share {:.1}%).",
            number(row, "recentSharePercent"),
            number(row, "recentRows"),
            number(row, "baselineSharePercent"),
        );
        alerts.push((text(row, "level"), peer, message));
    }
    for row in &rows.alert_handshake_failures {
        let address = text(row, "address");
        let message = format!(
            "Connections from {address} keep failing their handshake ({} in the last hour): {}. A till with another shop secret, or something else knocking on the peer port.",
            number(row, "attempts"),
            text(row, "reason"),
        );
        alerts.push((text(row, "level"), address, message));
    }
    for row in &rows.alert_sync_stalled {
        let peer = text(row, "peer");
        let message = format!(
            "Sync with {peer} is stuck: {}. Changes it holds cannot reach this till; see the node's log and the sync logs.",
            text(row, "message"),
        );
        alerts.push((text(row, "level"), peer, message));
    }
    for row in &rows.alert_forks {
        let origin = text(row, "origin");
        let message = format!(
            "{} change(s) numbered as till {origin}'s carried other content than the ones held (last from {}): forged, or a cloned or restored till. The ones held first were kept.",
            number(row, "changes"),
            text(row, "peer"),
        );
        alerts.push((text(row, "level"), origin, message));
    }
    for row in &rows.alert_forged {
        let origin = text(row, "origin");
        let message = if number(row, "revoked") > 0.0 {
            format!(
                "{} change(s) of revoked till {origin} were refused (last from {}).",
                number(row, "changes"),
                text(row, "peer"),
            )
        } else {
            format!(
                "{} change(s) in till {origin}'s name were not signed by its key (last from {}): written by another device holding the shop secret. Refused; the real ones still arrive. Consider revoking a lost or stolen till and changing the shop secret.",
                number(row, "changes"),
                text(row, "peer"),
            )
        };
        alerts.push((text(row, "level"), origin, message));
    }
    for row in &rows.alert_identity {
        let message = format!("Two tills share one identity: {}", text(row, "message"));
        alerts.push((text(row, "level"), String::new(), message));
    }
    for row in &rows.alert_clock_ahead {
        let origin = text(row, "origin");
        let held_back = number(row, "heldBack");
        let outcome = if held_back > 0.0 {
            format!(
                "{held_back} held back (with that till's later changes) until this clock catches up; raise p2p_max_clock_ahead on every till to take them now"
            )
        } else {
            "the fields they set can only be edited after them".to_string()
        };
        let message = format!(
            "{} change(s) from till {origin} in the last hour are stamped up to {:.1} h ahead of this till's clock: check that till's clock. {outcome}.",
            number(row, "changes"),
            number(row, "maxAheadMs") / 3_600_000.0,
        );
        alerts.push((text(row, "level"), origin, message));
    }
    for row in &rows.alert_heartbeat_timeouts {
        let peer = text(row, "peer");
        let message = format!(
            "The link to {peer} keeps timing out: {} heartbeat timeouts in the last hour (Wi-Fi or power trouble?).",
            number(row, "timeouts"),
        );
        alerts.push((text(row, "level"), peer, message));
    }
    alerts.sort_by(|a, b| match (a.0 == "critical", b.0 == "critical") {
        (true, false) => Ordering::Less,
        (false, true) => Ordering::Greater,
        _ => a.1.cmp(&b.1),
    });
    alerts.into_iter().map(|(level, _, message)| json!({"level": level, "message": message})).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_node_has_null_health_and_no_alerts() {
        let rows = DashboardRows {
            avg_reconnect: json!({"avgReconnectMs": null, "endedOutages": 0, "ongoingOutages": 0}),
            sync_success_rate: json!({"syncSuccessRate": null, "changes": 0, "errors": 0}),
            conflicts_per_hour: json!({"conflictsPerHour": null}),
            ..DashboardRows::default()
        };
        let answer = compose(&rows);
        assert_eq!(
            answer["health"],
            json!({"uptimePercent": null, "avgReconnectMs": null, "syncSuccessRate": null, "conflictsPerHour": null})
        );
        assert_eq!(answer["alerts"], json!([]));
    }

    #[test]
    fn uptime_is_time_weighted_and_alerts_sorted() {
        let rows = DashboardRows {
            uptime_by_peer: vec![
                json!({"peerId": "a", "connectedSeconds": 3600.0, "observedSeconds": 3600.0}),
                json!({"peerId": "b", "connectedSeconds": 0.0, "observedSeconds": 1200.0}),
            ],
            alert_slow_sync: vec![json!({"peer": "Till 2", "level": "warning", "recentMeanMs": 612.0,
                                         "baselineMedianMs": 236.0, "ratio": 2.6})],
            alert_sync_errors: vec![json!({"peer": "Till 3", "level": "critical", "recentRows": 40,
                                           "recentSharePercent": 25.0, "baselineSharePercent": 1.0})],
            ..DashboardRows::default()
        };
        let answer = compose(&rows);
        assert_eq!(answer["health"]["uptimePercent"], json!(75.0));
        assert_eq!(answer["alerts"][0]["level"], "critical");
        assert_eq!(
            answer["alerts"][1]["message"],
            "Sync with Till 2 is slower than usual: 612 ms average in the last hour, 2.6x the 7-day median of 236 ms."
        );
        assert_eq!(
            answer["alerts"][0]["message"],
            "Sync errors from Till 3 are above normal: 25.0% of 40 changes in the last hour failed (7-day share 1.0%)."
        );
    }
}
