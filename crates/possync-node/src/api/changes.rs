//! The change feed for till applications (issue 11): every record change this node holds,
//! made here or received from a peer, in commit order, with a cursor that survives
//! restarts (the change log's position). An app that was off for a day resumes from its
//! cursor and misses nothing; a screen refreshes when another till changes a price.
//!
//! - `GET /api/changes?after=CURSOR&limit=N`: one page, JSON;
//! - `GET /api/changes/stream`: Server-Sent Events, `event: change`, `id:` the cursor, so a
//!   browser's `EventSource` (or any client sending `Last-Event-ID`) resumes where it
//!   stopped; `?after=` works too. Each stream reads the log a page at a time and then
//!   every half second while idle: the node never waits for a slow client.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::error::ApiQuery;
use super::openapi::{Method, Route};
use super::{ApiError, ApiState, read};

/// Most changes in one page (and per read of a stream).
const MAX_PAGE: u32 = 1000;
/// How often an idle stream looks for new changes.
const STREAM_POLL: Duration = Duration::from_millis(500);

pub(super) fn routes() -> Vec<Route> {
    let change = json!({"type": "object", "required": ["cursor", "entityType", "entityId", "action", "origin", "seq"],
        "properties": {
            "cursor": {"type": "integer", "description": "pass it back as `after` (stable across restarts)"},
            "entityType": {"type": "string"}, "entityId": {"type": "string"},
            "action": {"type": "string"}, "origin": {"type": "string", "description": "the posId of the till where the change was made"},
            "seq": {"type": "integer"}}});
    vec![
        Route::new(Method::Get, "/api/changes", "listChanges", list)
            .summary("Record changes after a cursor, local and remote, in commit order (resumable across restarts)")
            .tag("changes")
            .query("after", json!({"type": "integer", "minimum": 0}), "The last cursor seen (0 or absent: from the start).")
            .query("limit", json!({"type": "integer", "minimum": 1, "maximum": MAX_PAGE}), "At most this many (default 100).")
            .reply(200, "The changes", json!({"type": "array", "items": change}))
            .errors(&[400]),
        Route::new(Method::Get, "/api/changes/stream", "streamChanges", stream)
            .summary("The change feed as Server-Sent Events (`event: change`, `id` the cursor; resumes from Last-Event-ID)")
            .tag("changes")
            .query("after", json!({"type": "integer", "minimum": 0}), "Start after this cursor (Last-Event-ID wins when both are given).")
            .reply_as(200, "The event stream", "text/event-stream", json!({"type": "string"})),
    ]
}

/// `?after=&limit=`.
#[derive(Debug, Default, Deserialize)]
pub struct FeedQuery {
    /// The last cursor seen.
    after: Option<u64>,
    /// At most this many.
    limit: Option<u32>,
}

async fn list(
    State(api): State<Arc<ApiState>>,
    ApiQuery(query): ApiQuery<FeedQuery>,
) -> Result<Json<Vec<Value>>, ApiError> {
    let limit = query.limit.unwrap_or(100);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::bad_request(format!("limit must be from 1 to {MAX_PAGE}")));
    }
    let after = query.after.unwrap_or(0);
    let durable = api.node.writer.durable_position();
    Ok(Json(read(&api.node, move |reader| reader.changes_after(after, limit, durable)).await?))
}

async fn stream(
    State(api): State<Arc<ApiState>>,
    headers: HeaderMap,
    ApiQuery(query): ApiQuery<FeedQuery>,
) -> Result<Response, ApiError> {
    let resume = headers.get("last-event-id").and_then(|value| value.to_str().ok());
    let after = match resume {
        Some(text) => {
            text.trim().parse::<u64>().map_err(|_| ApiError::bad_request("Last-Event-ID must be a cursor"))?
        }
        None => query.after.unwrap_or(0),
    };
    let node = Arc::clone(&api.node);
    let shutdown = node.shutdown.subscribe();
    let events =
        futures_util::stream::unfold((after, VecDeque::<Value>::new()), move |(mut cursor, mut pending)| {
            let node = Arc::clone(&node);
            let mut shutdown = shutdown.clone();
            async move {
                loop {
                    if let Some(change) = pending.pop_front() {
                        let id = change["cursor"].as_u64().unwrap_or(cursor);
                        cursor = cursor.max(id);
                        let event =
                            Event::default().event("change").id(id.to_string()).data(change.to_string());
                        return Some((Ok::<Event, Infallible>(event), (cursor, pending)));
                    }
                    if *shutdown.borrow() {
                        return None;
                    }
                    let durable = node.writer.durable_position();
                    let page = read(&node, move |reader| reader.changes_after(cursor, MAX_PAGE, durable))
                        .await
                        .ok()?;
                    if page.is_empty() {
                        tokio::select! {
                            () = tokio::time::sleep(STREAM_POLL) => {}
                            _ = shutdown.changed() => return None,
                        }
                    }
                    pending = page.into();
                }
            }
        });
    Ok(Sse::new(events).keep_alive(KeepAlive::default()).into_response())
}
