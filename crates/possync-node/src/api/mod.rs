//! The local HTTP API (axum): status, stats, logs, control, entities, Prometheus metrics and
//! the dashboard. Only this module knows HTTP.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;

use crate::node::NodeShared;

/// Serves the API on `listener` until the node shuts down.
pub async fn serve(node: Arc<NodeShared>, listener: TcpListener) {
    let mut shutdown = node.shutdown.subscribe();
    let app = router(node);
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = shutdown.changed().await;
        })
        .await;
    if let Err(err) = served {
        tracing::warn!(%err, "API server stopped");
    }
}

/// Every route.
pub fn router(node: Arc<NodeShared>) -> Router {
    Router::new()
        .route("/api/status", get(status))
        .route("/api/stats", get(stats))
        .route("/metrics", get(metrics))
        .with_state(node)
}

async fn status(State(node): State<Arc<NodeShared>>) -> impl IntoResponse {
    let settings = node.settings();
    axum::Json(node.peers.status(
        node.is_listening(),
        settings.enabled,
        &node.identity.pos_id,
        &node.identity.pos_name,
    ))
}

async fn stats(State(node): State<Arc<NodeShared>>) -> impl IntoResponse {
    axum::Json(node.peers.detailed_stats())
}

async fn metrics(State(node): State<Arc<NodeShared>>) -> impl IntoResponse {
    ([("content-type", "text/plain; version=0.0.4; charset=utf-8")], node.metrics.encode())
}
