//! The API's one error shape, `{"error": {"code", "message"}}` with a fitting status, and
//! the extractors that make axum's own rejections (bad JSON, bad query, bad path) use it.
//!
//! Every store error maps to a status in one place ([`From<StoreError>`]); database
//! internals are logged, never sent.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use possync_store::{CashSessionError, StoreError};
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::writer::WriterError;

/// A refused or failed call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// A stable machine-readable code (`not_found`, `invalid_json`...).
    pub code: &'static str,
    /// What went wrong, for a person.
    pub message: String,
}

impl ApiError {
    /// Any error.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { status, code, message: message.into() }
    }

    /// 400 `invalid_request`: a parameter or field is missing or has the wrong type.
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }

    /// 404 `not_found`: no such record.
    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// 401 `unauthorized`: the token is missing or wrong.
    pub fn unauthorized() -> ApiError {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "this API is bound beyond loopback: send `Authorization: Bearer <api_token>` (see possync.toml)",
        )
    }

    /// 422 `invalid_entity`: the input is well-formed but breaks a rule.
    pub fn unprocessable(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_entity", message)
    }

    /// 507 `storage_full`: the disk is full; nothing was written, the same call can
    /// succeed once room is made.
    pub fn storage_full() -> ApiError {
        ApiError::new(
            StatusCode::INSUFFICIENT_STORAGE,
            "storage_full",
            "the till's disk is full: nothing was written; free some space (or run cleanup) and send it again",
        )
    }

    /// 503 `unavailable`: the node is stopping.
    pub fn unavailable() -> ApiError {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "the node is stopping; try again later")
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"code": self.code, "message": self.message}});
        let mut response = (self.status, axum::Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> ApiError {
        match &err {
            StoreError::NotFound { .. } | StoreError::ConflictNotFound(_) => {
                ApiError::not_found(err.to_string())
            }
            StoreError::AlreadyExists { .. } => {
                ApiError::new(StatusCode::CONFLICT, "already_exists", err.to_string())
            }
            StoreError::Duplicate { .. } => ApiError::new(StatusCode::CONFLICT, "duplicate", err.to_string()),
            StoreError::ConflictResolved(_) => {
                ApiError::new(StatusCode::CONFLICT, "already_resolved", err.to_string())
            }
            StoreError::Invalid(_) | StoreError::BadChange(_) => ApiError::unprocessable(err.to_string()),
            StoreError::InvalidState(_) => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_state", err.to_string())
            }
            StoreError::CashSession(cash) => {
                let code = match cash {
                    CashSessionError::NoneOpen => "no_open_cash_session",
                    CashSessionError::AlreadyOpen(_) => "cash_session_open",
                    CashSessionError::Closed(_) => "cash_session_closed",
                    CashSessionError::OtherTill { .. } => "cash_session_of_another_till",
                };
                ApiError::new(StatusCode::CONFLICT, code, err.to_string())
            }
            StoreError::BadSetting(_) => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_setting", err.to_string())
            }
            StoreError::Recovery(_) => {
                ApiError::new(StatusCode::CONFLICT, "recovery_refused", err.to_string())
            }
            StoreError::Sqlite(_) if err.is_storage_full() => {
                tracing::error!(%err, "API write refused: the disk is full");
                ApiError::storage_full()
            }
            StoreError::TooLarge { .. } => {
                ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "change_too_large", err.to_string())
            }
            StoreError::Sqlite(_)
            | StoreError::Migration(_)
            | StoreError::Corrupt(_)
            | StoreError::AlreadyInitialized(_)
            | StoreError::NotInitialized(_) => {
                tracing::error!(%err, "API call failed on the database");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "the database could not complete the request; see the node's log",
                )
            }
        }
    }
}

impl From<WriterError> for ApiError {
    fn from(err: WriterError) -> ApiError {
        match err {
            WriterError::Stopped => ApiError::unavailable(),
            WriterError::StorageFull => {
                tracing::error!(%err, "API write refused: the disk is full");
                ApiError::storage_full()
            }
            WriterError::CommitFailed(_) => {
                tracing::error!(%err, "API call failed on the database");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "the database could not complete the request; see the node's log",
                )
            }
        }
    }
}

/// A JSON body, parsed with serde; any failure is an [`ApiError`]: 400 `invalid_json` for
/// malformed JSON, 400 `invalid_request` for a wrong shape or type, 415 for a body that is
/// not `application/json` (which also keeps cross-site forms from posting to the till), 413
/// when too large.
#[derive(Debug, Clone)]
pub struct ApiJson<T>(pub T);

/// Like [`ApiJson`], but an empty body stands for `T::default()`.
#[derive(Debug, Clone)]
pub struct OptionalJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        match read_body(request, state).await? {
            Some(bytes) => parse_json(&bytes).map(ApiJson),
            None => Err(ApiError::bad_request("a JSON body is required")),
        }
    }
}

impl<S: Send + Sync, T: DeserializeOwned + Default> FromRequest<S> for OptionalJson<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        match read_body(request, state).await? {
            Some(bytes) => parse_json(&bytes).map(OptionalJson),
            None => Ok(OptionalJson(T::default())),
        }
    }
}

/// The body's bytes, `None` when empty; checks the content type of a non-empty body.
async fn read_body<S: Send + Sync>(request: Request, state: &S) -> Result<Option<Bytes>, ApiError> {
    let json_type =
        is_json(request.headers().get(header::CONTENT_TYPE).and_then(|value| value.to_str().ok()));
    let bytes = Bytes::from_request(request, state).await.map_err(|rejection| {
        let status = rejection.status();
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(status, "payload_too_large", "the body is too large")
        } else {
            ApiError::bad_request(format!("cannot read the body: {}", rejection.body_text()))
        }
    })?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    if !json_type {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the body as `Content-Type: application/json`",
        ));
    }
    Ok(Some(bytes))
}

fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|err| match err.classify() {
        serde_json::error::Category::Data => ApiError::bad_request(format!("invalid body: {err}")),
        _ => ApiError::new(StatusCode::BAD_REQUEST, "invalid_json", format!("malformed JSON: {err}")),
    })
}

/// Query parameters; a bad one is a 400 `invalid_request`.
#[derive(Debug, Clone)]
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        Query::<T>::try_from_uri(&parts.uri)
            .map(|Query(value)| ApiQuery(value))
            .map_err(|rejection| ApiError::bad_request(rejection.body_text()))
    }
}

/// The one path parameter of a route (an id or a key), as text.
#[derive(Debug, Clone)]
pub struct PathParam(pub String);

impl<S: Send + Sync> FromRequestParts<S> for PathParam {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Path::<String>::from_request_parts(parts, state)
            .await
            .map(|Path(value)| PathParam(value))
            .map_err(|rejection| ApiError::bad_request(rejection.body_text()))
    }
}

/// Is the `Content-Type` JSON (`application/json` or `application/*+json`)?
pub(super) fn is_json(content_type: Option<&str>) -> bool {
    let Some(mime) = content_type.and_then(|value| value.split(';').next()) else { return false };
    let mime = mime.trim().to_ascii_lowercase();
    mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json"))
}

#[cfg(test)]
mod tests {
    use possync_core::{EntityError, EntityId, EntityKind};

    use super::*;

    #[test]
    fn store_errors_map_to_statuses() {
        let id = EntityId::parse("p1").unwrap();
        let cases: Vec<(StoreError, u16, &str)> = vec![
            (StoreError::NotFound { kind: EntityKind::Product, id: id.clone() }, 404, "not_found"),
            (StoreError::ConflictNotFound(3), 404, "not_found"),
            (StoreError::AlreadyExists { kind: EntityKind::Product, id: id.clone() }, 409, "already_exists"),
            (
                StoreError::Duplicate {
                    kind: EntityKind::Product,
                    field: "sku",
                    value: "A".into(),
                    other: id,
                },
                409,
                "duplicate",
            ),
            (StoreError::ConflictResolved(3), 409, "already_resolved"),
            (StoreError::Invalid(EntityError::MissingField("sku")), 422, "invalid_entity"),
            (StoreError::InvalidState("cancelled".into()), 422, "invalid_state"),
            (StoreError::BadSetting("no".into()), 422, "invalid_setting"),
            (StoreError::TooLarge { kind: EntityKind::Ticket, bytes: 5, limit: 4 }, 413, "change_too_large"),
            (StoreError::Corrupt("secret internals".into()), 500, "internal"),
        ];
        for (err, status, code) in cases {
            let mapped = ApiError::from(err);
            assert_eq!((mapped.status.as_u16(), mapped.code), (status, code));
            assert!(!mapped.message.contains("secret internals"));
        }
        assert_eq!(ApiError::from(WriterError::Stopped).status, StatusCode::SERVICE_UNAVAILABLE);
        let full = ApiError::from(WriterError::StorageFull);
        assert_eq!((full.status.as_u16(), full.code), (507, "storage_full"));
        let failed = ApiError::from(WriterError::CommitFailed("disk I/O error".into()));
        assert_eq!((failed.status, failed.code), (StatusCode::INTERNAL_SERVER_ERROR, "internal"));
        assert!(!failed.message.contains("disk"), "internals stay in the log");
    }
}
