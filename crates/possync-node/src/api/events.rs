//! `GET /api/events`: the dashboard's Server-Sent Events (docs/DASHBOARD.md).
//!
//! One ticker per node, not per stream: while at least one stream is open it reads the
//! counters once a second and polls `p2p_conflicts` for new rows, and broadcasts both on a
//! small `broadcast` channel. A stream that falls behind loses events (the page copes with
//! missing seconds) rather than slowing anything: the node never waits for a browser. The
//! ticker stops when the last stream closes, and every stream ends when the node shuts down.

use std::convert::Infallible;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::sync::broadcast;
use tokio_stream::wrappers::BroadcastStream;

use super::openapi::{Method, Route};
use super::sync::status_of;
use super::{ApiState, read};
use crate::clock::now_ms;
use crate::shared::NodeShared;

/// Events buffered per stream before it lags.
const STREAM_BUFFER: usize = 16;
/// Conflict rows sent per tick at most (more follow on the next ticks).
const CONFLICTS_PER_TICK: u32 = 100;

/// One event for every open stream, already serialised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HubEvent {
    /// `event: stats`.
    Stats(String),
    /// `event: conflict`.
    Conflict(String),
}

/// The fan-out of events to the open streams.
pub struct Hub {
    /// Where events go.
    sender: broadcast::Sender<Arc<HubEvent>>,
    /// True while the ticker task runs.
    running: Mutex<bool>,
}

impl Default for Hub {
    fn default() -> Hub {
        Hub { sender: broadcast::channel(STREAM_BUFFER).0, running: Mutex::new(false) }
    }
}

impl Hub {
    /// Sends a conflict row (a resolve through the API) to the open streams, if any.
    pub fn publish_conflict(&self, row: &Value) {
        let _ = self.sender.send(Arc::new(HubEvent::Conflict(row.to_string())));
    }

    fn lock_running(&self) -> std::sync::MutexGuard<'_, bool> {
        self.running.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

pub(super) fn routes() -> Vec<Route> {
    vec![
        Route::new(Method::Get, "/api/events", "events", events)
            .summary("Server-Sent Events: `stats` every second, `conflict` for each new conflict row")
            .tag("dashboard")
            .reply_as(200, "The event stream", "text/event-stream", json!({"type": "string"})),
    ]
}

/// The `stats` event's data: the counters, the status, and the node's clock when read.
pub(super) fn stats_data(node: &NodeShared) -> String {
    let stats = node.peers.detailed_stats();
    let status = status_of(node);
    json!({"now": now_ms(), "status": status, "stats": stats}).to_string()
}

fn subscribe(api: &Arc<ApiState>) -> broadcast::Receiver<Arc<HubEvent>> {
    let mut running = api.hub.lock_running();
    let receiver = api.hub.sender.subscribe();
    if !*running {
        *running = true;
        tokio::spawn(tick(Arc::clone(api)));
    }
    receiver
}

/// The ticker: stats every second, new conflict rows as they appear.
async fn tick(api: Arc<ApiState>) {
    let node = &api.node;
    let mut shutdown = node.shutdown.subscribe();
    let mut last_conflict = read(node, |reader| reader.last_conflict_id()).await.unwrap_or(0);
    let mut interval = tokio::time::interval(Duration::from_secs(1));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    // The first tick is immediate; a new stream already got its opening `stats` event.
    interval.tick().await;
    loop {
        if *shutdown.borrow_and_update() {
            break;
        }
        tokio::select! {
            _ = interval.tick() => {}
            _ = shutdown.changed() => break,
        }
        {
            let mut running = api.hub.lock_running();
            if api.hub.sender.receiver_count() == 0 {
                *running = false;
                return;
            }
        }
        let _ = api.hub.sender.send(Arc::new(HubEvent::Stats(stats_data(node))));
        let after = last_conflict;
        let Ok(rows) = read(node, move |reader| reader.conflicts_after(after, CONFLICTS_PER_TICK)).await
        else {
            continue;
        };
        for row in rows {
            last_conflict = last_conflict.max(row.get("id").and_then(Value::as_i64).unwrap_or(last_conflict));
            let _ = api.hub.sender.send(Arc::new(HubEvent::Conflict(row.to_string())));
        }
    }
    *api.hub.lock_running() = false;
}

fn to_sse(event: &HubEvent) -> Event {
    match event {
        HubEvent::Stats(data) => Event::default().event("stats").data(data),
        HubEvent::Conflict(data) => Event::default().event("conflict").data(data),
    }
}

async fn events(State(api): State<Arc<ApiState>>) -> Response {
    let receiver = subscribe(&api);
    let opening = Event::default().retry(Duration::from_secs(2)).event("stats").data(stats_data(&api.node));
    let live = BroadcastStream::new(receiver)
        .filter_map(|item| std::future::ready(item.ok()))
        .map(|event| to_sse(&event));
    let mut shutdown = api.node.shutdown.subscribe();
    let stopping = async move {
        if !*shutdown.borrow_and_update() {
            let _ = shutdown.changed().await;
        }
    };
    let stream = futures_util::stream::once(std::future::ready(opening))
        .chain(live)
        .map(Ok::<_, Infallible>)
        .take_until(stopping);
    let mut response = Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)).text("keep-alive"))
        .into_response();
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}
