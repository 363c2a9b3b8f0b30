//! The local HTTP API (axum): status, stats, logs, control, entities, sales, Prometheus
//! metrics, the dashboard and its event stream. Only this module knows HTTP.
//!
//! - [`routes`] is the one route table: the router and the OpenAPI document
//!   (`GET /api/openapi.json`) are both built from it, so they list the same routes.
//! - Every write goes through the single writer's local queue (`write_change`), which also
//!   publishes the change to the peers; reads use the reader pool.
//! - Every error, axum's own rejections included, is `{"error": {"code", "message"}}`
//!   ([`error`]). Access: open on loopback, a bearer token elsewhere ([`auth`]); web pages
//!   are kept out by the Host, Origin and content-type rules of [`guard`], checked first.
//! - [`server`] accepts the connections itself: a cap and an idle timeout.
//!
//! Modules: [`error`], [`guard`], [`auth`], [`server`], `entities` (products, categories,
//! customers), `sales` (tickets, stock), `cash` (cash sessions, Z reports), `terminals` (till keys, revocation), `users` (cashier accounts), `sync` (status, stats, audit lists, control,
//! settings, cleanup, metrics), `events` (SSE), `dashboard` (assets and indicators), `chain`
//! (the chain of stores' views), `changes` (the change feed), [`openapi`].

pub mod auth;
mod cash;
mod chain;
mod changes;
mod dashboard;
mod entities;
pub mod error;
mod events;
pub mod guard;
pub mod openapi;
mod sales;
pub mod server;
mod sync;
mod terminals;
mod users;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::http::{Method as HttpMethod, Uri};
use possync_store::{Store, StoreError, StoreReader};
use rust_decimal::Decimal;
use serde_json::Value;
use tokio::net::TcpListener;

pub use self::auth::AuthPolicy;
pub use self::error::ApiError;
pub use self::guard::BrowserGuard;
use self::openapi::{Method, Route};
use crate::shared::NodeShared;
use crate::writer::Priority;

/// What every handler shares.
pub struct ApiState {
    /// The node, whole: unlike the other tasks, which get a narrow handle
    /// ([`crate::shared`]), the API between its handlers uses nearly every part of it (the
    /// writer, the readers, the peer table, the metrics, the settings and their writes, the
    /// reconnect notice, the chain status, the configuration, shutdown), so a handle of its
    /// own would repeat [`NodeShared`].
    pub node: Arc<NodeShared>,
    /// Who may call.
    pub auth: AuthPolicy,
    /// Which Host and Origin headers are the node's own.
    pub guard: BrowserGuard,
    /// The OpenAPI document (built once, from the route table).
    openapi: Value,
    /// The SSE fan-out.
    hub: events::Hub,
    /// Failed cashier logins, for the rate limit of `POST /api/users/verify`.
    logins: users::LoginGuard,
}

/// Serves the API on `listener` until the node shuts down.
pub async fn serve(node: Arc<NodeShared>, listener: TcpListener) {
    let bound = match listener.local_addr() {
        Ok(bound) => bound,
        Err(err) => {
            tracing::warn!(%err, "API listener has no address; not serving");
            return;
        }
    };
    let shutdown = node.shutdown.subscribe();
    let options = node.config.api.clone();
    let open_connections = node.metrics.api_connections.clone();
    let app = router(node, bound);
    server::serve(listener, app, options, open_connections, shutdown).await;
}

/// Every route, with the access policy of the configured bind address, for an API
/// listening on `bound`.
pub fn router(node: Arc<NodeShared>, bound: SocketAddr) -> Router {
    let auth = AuthPolicy::for_bind(node.config.api_listen, &node.config.api_token);
    let guard = BrowserGuard::new(bound, &node.config.api.allowed_hosts);
    router_with(node, auth, guard)
}

/// Every route, with the given access policy and browser guard.
pub fn router_with(node: Arc<NodeShared>, auth: AuthPolicy, guard: BrowserGuard) -> Router {
    let table = routes();
    let state = Arc::new(ApiState {
        node,
        auth,
        guard,
        openapi: openapi::document(&table, schemas()),
        hub: events::Hub::default(),
        logins: users::LoginGuard::default(),
    });
    let mut router = Router::new();
    for route in table {
        router = router.route(route.path, route.handler);
    }
    router
        .method_not_allowed_fallback(wrong_method)
        .fallback(no_route)
        .layer(axum::middleware::from_fn_with_state(Arc::clone(&state), auth::require_token))
        .layer(axum::middleware::from_fn_with_state(Arc::clone(&state), guard::guard))
        .with_state(state)
}

/// The route table: everything the API serves.
pub fn routes() -> Vec<Route> {
    let mut table = sync::routes();
    table.extend(entities::routes());
    table.extend(sales::routes());
    table.extend(events::routes());
    table.extend(dashboard::routes());
    table.extend(chain::routes());
    table.extend(changes::routes());
    table.extend(users::routes());
    table.extend(cash::routes());
    table.extend(terminals::routes());
    table
}

/// Every (method, path) of the route table.
pub fn route_list() -> Vec<(Method, &'static str)> {
    routes().iter().map(|route| (route.method, route.path)).collect()
}

/// The OpenAPI document of the route table (what `GET /api/openapi.json` answers).
pub fn routes_document() -> Value {
    openapi::document(&routes(), schemas())
}

/// Every schema the route table refers to: the shared ones and each module's own.
fn schemas() -> serde_json::Map<String, Value> {
    let mut schemas = openapi::shared_schemas();
    schemas.extend(users::schemas());
    schemas.extend(cash::schemas());
    schemas.extend(terminals::schemas());
    schemas
}

async fn no_route(uri: Uri) -> ApiError {
    ApiError::new(axum::http::StatusCode::NOT_FOUND, "route_not_found", format!("no route {}", uri.path()))
}

async fn wrong_method(method: HttpMethod, uri: Uri) -> ApiError {
    ApiError::new(
        axum::http::StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{method} is not allowed on {}", uri.path()),
    )
}

/// Runs a till write on the writer's local queue (it goes before sync and housekeeping).
async fn write<T, F>(node: &NodeShared, job: F) -> Result<T, ApiError>
where
    T: Send + 'static,
    F: FnOnce(&mut Store) -> Result<T, StoreError> + Send + 'static,
{
    Ok(node.writer.call(Priority::Local, job).await??)
}

/// A write that makes one change (published to the peers by the writer); counted in
/// `possync_local_changes_total`.
async fn write_change<T, F>(node: &NodeShared, job: F) -> Result<T, ApiError>
where
    T: Send + 'static,
    F: FnOnce(&mut Store) -> Result<T, StoreError> + Send + 'static,
{
    let written = write(node, job).await?;
    node.metrics.local_changes.inc();
    Ok(written)
}

/// Runs a query on a reader, off the async threads.
async fn read<T, F>(node: &NodeShared, query: F) -> Result<T, ApiError>
where
    T: Send + 'static,
    F: FnOnce(&StoreReader) -> Result<T, StoreError> + Send + 'static,
{
    Ok(node.readers.with(query).await?)
}

/// `limit` is 1..=max when given.
fn check_paging(limit: Option<u32>, max: u32) -> Result<(), ApiError> {
    match limit {
        Some(limit) if limit == 0 || limit > max => {
            Err(ApiError::bad_request(format!("limit must be from 1 to {max}, not {limit}")))
        }
        _ => Ok(()),
    }
}

/// Largest amount or quantity the API takes (a trillion): sums and products of such values
/// stay far inside what the store's decimal arithmetic holds.
const MAX_AMOUNT: i64 = 1_000_000_000_000;

fn check_amount(field: &str, amount: Decimal) -> Result<(), ApiError> {
    if amount.abs() > Decimal::from(MAX_AMOUNT) {
        return Err(ApiError::unprocessable(format!("invalid {field}: larger than {MAX_AMOUNT}")));
    }
    Ok(())
}

/// Largest quantity of goods in one line or movement.
const MAX_QUANTITY: i64 = 1_000_000_000;
/// Most decimals of a quantity (grams of a kilo, millilitres of a litre).
const QUANTITY_DECIMALS: u32 = 3;

/// Quantities move stock, a running sum the store keeps as exact text of at most 15
/// significant digits: whole thousandths up to a billion keep every sum within it.
fn check_quantity(field: &str, quantity: Decimal) -> Result<(), ApiError> {
    if quantity.abs() > Decimal::from(MAX_QUANTITY) {
        return Err(ApiError::unprocessable(format!("invalid {field}: larger than {MAX_QUANTITY}")));
    }
    if quantity.normalize().scale() > QUANTITY_DECIMALS {
        return Err(ApiError::unprocessable(format!(
            "invalid {field}: at most {QUANTITY_DECIMALS} decimals"
        )));
    }
    Ok(())
}
