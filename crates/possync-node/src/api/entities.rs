//! Products, categories and customers: list, get, create, partial update, delete (SPEC 6.2),
//! and a product's stock movements. Writes go through the writer's local queue, which
//! publishes each change to the peers.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use possync_core::entity::FieldType;
use possync_core::{EntityId, EntityKind, decimal};
use possync_store::reader::ListQuery;
use serde::Deserialize;
use serde_json::{Value, json};

use super::error::{ApiError, ApiJson, ApiQuery, PathParam};
use super::openapi::{Method, Route, array_of, schema_ref};
use super::{ApiState, check_amount, check_paging, read, write_change};

/// Query of a record list.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ListParams {
    /// At most this many (1..=1000, default 100).
    pub(super) limit: Option<u32>,
    /// Skip this many.
    pub(super) offset: Option<u32>,
    /// Name (or SKU, or exact barcode, for products; username for users) containing this text.
    pub(super) search: Option<String>,
    /// Products of this category only.
    category_id: Option<String>,
}

/// Names of one kind's routes.
struct Names {
    kind: EntityKind,
    collection: &'static str,
    item: &'static str,
    schema: &'static str,
    ids: [&'static str; 5],
    tag: &'static str,
}

const KINDS: [Names; 3] = [
    Names {
        kind: EntityKind::Product,
        collection: "/api/products",
        item: "/api/products/{id}",
        schema: "Product",
        ids: ["listProducts", "getProduct", "createProduct", "updateProduct", "deleteProduct"],
        tag: "products",
    },
    Names {
        kind: EntityKind::Category,
        collection: "/api/categories",
        item: "/api/categories/{id}",
        schema: "Category",
        ids: ["listCategories", "getCategory", "createCategory", "updateCategory", "deleteCategory"],
        tag: "categories",
    },
    Names {
        kind: EntityKind::Customer,
        collection: "/api/customers",
        item: "/api/customers/{id}",
        schema: "Customer",
        ids: ["listCustomers", "getCustomer", "createCustomer", "updateCustomer", "deleteCustomer"],
        tag: "customers",
    },
];

/// The five routes of each record kind, and the movements of a product.
pub(super) fn routes() -> Vec<Route> {
    let mut routes = Vec::new();
    for names in KINDS {
        let kind = names.kind;
        let [list_id, get_id, create_id, update_id, delete_id] = names.ids;
        let mut list_route = Route::new(
            Method::Get,
            names.collection,
            list_id,
            move |State(api): State<Arc<ApiState>>, ApiQuery(params): ApiQuery<ListParams>| async move {
                list(kind, api, params).await
            },
        )
        .summary("Live records, by name")
        .tag(names.tag)
        .paging(100, 1000)
        .query("search", json!({"type": "string"}), "Name (or SKU or barcode) containing this text.");
        if kind == EntityKind::Product {
            list_route =
                list_route.query("categoryId", json!({"type": "string"}), "Products of this category.");
        }
        routes.push(list_route.reply(200, "The records", array_of(names.schema)).errors(&[400]));
        routes.push(
            Route::new(
                Method::Get,
                names.item,
                get_id,
                move |State(api): State<Arc<ApiState>>, PathParam(id): PathParam| async move {
                    get_one(kind, api, id).await
                },
            )
            .summary("One live record")
            .tag(names.tag)
            .reply(200, "The record", schema_ref(names.schema))
            .errors(&[404]),
        );
        routes.push(
            Route::new(
                Method::Post,
                names.collection,
                create_id,
                move |State(api): State<Arc<ApiState>>, ApiJson(body): ApiJson<Value>| async move {
                    create(kind, api, body).await
                },
            )
            .summary("Create a record (id optional: a UUIDv7 is made)")
            .tag(names.tag)
            .body(schema_ref(&format!("{}Create", names.schema)))
            .reply(201, "The new record", schema_ref(names.schema))
            .errors(&[400, 409, 415, 422, 503]),
        );
        routes.push(
            Route::new(
                Method::Patch,
                names.item,
                update_id,
                move |State(api): State<Arc<ApiState>>,
                      PathParam(id): PathParam,
                      ApiJson(body): ApiJson<Value>| async move {
                    update(kind, api, id, body).await
                },
            )
            .summary("Change some fields")
            .tag(names.tag)
            .body(schema_ref(&format!("{}Patch", names.schema)))
            .reply(200, "The record", schema_ref(names.schema))
            .errors(&[400, 404, 409, 415, 422, 503]),
        );
        routes.push(
            Route::new(
                Method::Delete,
                names.item,
                delete_id,
                move |State(api): State<Arc<ApiState>>, PathParam(id): PathParam| async move {
                    delete(kind, api, id).await
                },
            )
            .summary("Delete a record (the deletion reaches every terminal)")
            .tag(names.tag)
            .empty_reply(204, "Deleted")
            .errors(&[404, 503]),
        );
    }
    routes.push(
        Route::new(Method::Get, "/api/products/{id}/movements", "listMovements", movements)
            .summary("Stock movements of a product, newest first")
            .tag("stock")
            .paging(100, 1000)
            .reply(200, "The movements", array_of("Movement"))
            .errors(&[400, 404]),
    );
    routes
}

/// An id from a path; one that cannot exist is simply not found.
pub(super) fn path_id(kind: EntityKind, raw: &str) -> Result<EntityId, ApiError> {
    EntityId::parse(raw).map_err(|_| ApiError::not_found(format!("{kind} {raw:?} not found")))
}

/// The body is an object; its amounts stay in the range the store computes with safely.
fn check_object(kind: EntityKind, body: &Value) -> Result<(), ApiError> {
    let Some(object) = body.as_object() else {
        return Err(ApiError::bad_request("the body must be a JSON object of fields"));
    };
    for spec in kind.fields() {
        if matches!(spec.ty, FieldType::Amount { .. } | FieldType::OptAmount)
            && let Some(amount) = object.get(spec.name).and_then(|value| decimal::from_json(value).ok())
        {
            check_amount(spec.name, amount)?;
        }
    }
    Ok(())
}

async fn list(
    kind: EntityKind,
    api: Arc<ApiState>,
    params: ListParams,
) -> Result<Json<Vec<Value>>, ApiError> {
    check_paging(params.limit, 1000)?;
    let query = ListQuery {
        limit: params.limit,
        offset: params.offset,
        category_id: if kind == EntityKind::Product { params.category_id } else { None },
        search: params.search.filter(|text| !text.is_empty()),
    };
    Ok(Json(read(&api.node, move |reader| reader.list_records(kind, &query)).await?))
}

async fn get_one(kind: EntityKind, api: Arc<ApiState>, id: String) -> Result<Json<Value>, ApiError> {
    let id = path_id(kind, &id)?;
    let wanted = id.clone();
    read(&api.node, move |reader| reader.record(kind, &wanted))
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("{kind} {id} not found")))
}

async fn create(kind: EntityKind, api: Arc<ApiState>, body: Value) -> Result<Response, ApiError> {
    check_object(kind, &body)?;
    let record = write_change(&api.node, move |store| store.create_record(kind, &body)).await?;
    Ok((StatusCode::CREATED, Json(record)).into_response())
}

async fn update(
    kind: EntityKind,
    api: Arc<ApiState>,
    id: String,
    body: Value,
) -> Result<Json<Value>, ApiError> {
    let id = path_id(kind, &id)?;
    check_object(kind, &body)?;
    Ok(Json(write_change(&api.node, move |store| store.update_record(kind, &id, &body)).await?))
}

async fn delete(kind: EntityKind, api: Arc<ApiState>, id: String) -> Result<StatusCode, ApiError> {
    let id = path_id(kind, &id)?;
    write_change(&api.node, move |store| store.delete_record(kind, &id)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Paging of a plain list.
#[derive(Debug, Default, Deserialize)]
pub struct Paging {
    /// At most this many.
    pub limit: Option<u32>,
    /// Skip this many.
    pub offset: Option<u32>,
}

async fn movements(
    State(api): State<Arc<ApiState>>,
    PathParam(id): PathParam,
    ApiQuery(paging): ApiQuery<Paging>,
) -> Result<Json<Vec<Value>>, ApiError> {
    check_paging(paging.limit, 1000)?;
    let id = path_id(EntityKind::Product, &id)?;
    let wanted = id.clone();
    let rows = read(&api.node, move |reader| {
        if reader.record(EntityKind::Product, &wanted)?.is_none() {
            return Ok(None);
        }
        reader.movements(&wanted, paging.limit, paging.offset).map(Some)
    })
    .await?;
    rows.map(Json).ok_or_else(|| ApiError::not_found(format!("product {id} not found")))
}
