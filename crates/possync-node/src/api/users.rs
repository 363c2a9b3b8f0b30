//! Cashier accounts (issue 11): a cashier created on one till logs in on every till.
//!
//! A user is a mutable record like a customer (merged field by field, synced to every till),
//! with one rule of its own: **only a hash ever leaves this module**. A password or PIN sent to
//! `POST/PATCH /api/users` is hashed here (argon2id, a fresh salt each time) and stored as
//! `passwordHash`; no answer of the API carries the hash (`hasPassword` says whether there is
//! one), and the API refuses a `passwordHash` or `lastLogin` sent by a client.
//!
//! `POST /api/users/verify` checks a login: 200 with the user, or 401 `invalid_credentials`,
//! the same answer (and about the same time: an unknown name is checked against a dummy hash)
//! for an unknown user, an inactive one and a wrong secret. After 5 failures for one username
//! within a minute, that username answers 429 `too_many_attempts` with `Retry-After` until the
//! oldest failure is a minute old, whatever the secret (guessing a 4-digit PIN then takes days).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use argon2::Argon2;
use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use axum::Json;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use possync_core::EntityKind;
use possync_store::reader::ListQuery;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::entities::{ListParams, path_id};
use super::error::{ApiError, ApiJson, ApiQuery, PathParam};
use super::openapi::{Method, Route, array_of, record_schemas, schema_ref};
use super::{ApiState, check_paging, read, write_change};

/// Failed logins of one username allowed within [`FAILURE_WINDOW`].
const MAX_FAILURES: usize = 5;
/// How long a failed login counts.
const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// Passwords: at least this many characters.
const MIN_PASSWORD_CHARS: usize = 8;
/// Passwords and PINs: at most this many characters (hashing is deliberately slow).
const MAX_SECRET_CHARS: usize = 128;

pub(super) fn routes() -> Vec<Route> {
    vec![
        Route::new(Method::Get, "/api/users", "listUsers", list)
            .summary("Cashier accounts, by username (never with their password hash)")
            .tag("users")
            .paging(100, 1000)
            .query("search", json!({"type": "string"}), "Username containing this text.")
            .reply(200, "The users", array_of("User"))
            .errors(&[400]),
        Route::new(Method::Get, "/api/users/{id}", "getUser", get_one)
            .summary("One cashier account")
            .tag("users")
            .reply(200, "The user", schema_ref("User"))
            .errors(&[404]),
        Route::new(Method::Post, "/api/users", "createUser", create)
            .summary("Create a cashier account (its password or PIN is stored as an argon2id hash)")
            .tag("users")
            .body(schema_ref("UserCreate"))
            .reply(201, "The new user", schema_ref("User"))
            .errors(&[400, 409, 415, 422, 503]),
        Route::new(Method::Patch, "/api/users/{id}", "updateUser", update)
            .summary("Change a cashier account (name, role, isActive: false to deactivate, a new password or PIN)")
            .tag("users")
            .body(schema_ref("UserPatch"))
            .reply(200, "The user", schema_ref("User"))
            .errors(&[400, 404, 409, 415, 422, 503]),
        Route::new(Method::Delete, "/api/users/{id}", "deleteUser", delete)
            .summary("Delete a cashier account (on every till)")
            .tag("users")
            .empty_reply(204, "Deleted")
            .errors(&[404, 503]),
        Route::new(Method::Post, "/api/users/verify", "verifyUser", verify)
            .summary("Check a cashier's login: the user, or 401 invalid_credentials (429 after 5 failures in a minute)")
            .tag("users")
            .body(schema_ref("UserVerify"))
            .reply(200, "The user (lastLogin updated)", schema_ref("User"))
            .reply(401, "Unknown user, inactive account or wrong password/PIN", schema_ref("Error"))
            .reply(429, "Too many failed logins for this username in the last minute (see Retry-After)", schema_ref("Error"))
            .errors(&[400, 415, 503]),
    ]
}

/// The `User`, `UserCreate`, `UserPatch` and `UserVerify` schemas.
pub(super) fn schemas() -> Vec<(String, Value)> {
    let (mut answer, mut create, mut patch) = record_schemas(EntityKind::User);
    let secret = |what: &str| json!({"type": "string", "maxLength": MAX_SECRET_CHARS, "description": what});
    if let Some(properties) = answer["properties"].as_object_mut() {
        properties.remove("passwordHash");
        properties.insert(
            "hasPassword".into(),
            json!({"type": "boolean", "description": "a password or PIN is set"}),
        );
    }
    for input in [&mut create, &mut patch] {
        if let Some(properties) = input["properties"].as_object_mut() {
            properties.remove("passwordHash");
            properties.remove("lastLogin");
            properties.insert("password".into(), secret("at least 8 characters; stored as an argon2id hash"));
            properties.insert("pin".into(), secret("4 to 12 digits; stored as an argon2id hash"));
        }
    }
    let verify = json!({"type": "object", "required": ["username"], "additionalProperties": false,
        "properties": {"username": {"type": "string", "maxLength": 64},
                       "password": secret("the password"), "pin": secret("the PIN")}});
    vec![
        ("User".into(), answer),
        ("UserCreate".into(), create),
        ("UserPatch".into(), patch),
        ("UserVerify".into(), verify),
    ]
}

/// A user as the API shows it: everything but the hash.
fn public(mut user: Value) -> Value {
    if let Some(object) = user.as_object_mut() {
        let has_password = object.remove("passwordHash").is_some_and(|hash| hash.is_string());
        object.insert("hasPassword".into(), Value::Bool(has_password));
    }
    user
}

/// Turns a `password` or `pin` of a create or update body into `passwordHash`; refuses the
/// fields only the node writes.
async fn hash_secret_of(body: Value) -> Result<Value, ApiError> {
    let Value::Object(mut object) = body else {
        return Err(ApiError::bad_request("the body must be a JSON object of fields"));
    };
    for field in ["passwordHash", "lastLogin"] {
        if object.contains_key(field) {
            return Err(ApiError::bad_request(format!(
                "{field} is written by the node only: send `password` or `pin`"
            )));
        }
    }
    if let Some(secret) = take_secret(&mut object)? {
        let hash = tokio::task::spawn_blocking(move || hash(&secret))
            .await
            .map_err(|_| ApiError::unavailable())??;
        object.insert("passwordHash".into(), Value::String(hash));
    }
    Ok(Value::Object(object))
}

/// The `password` or the `pin` of a body (not both), checked.
fn take_secret(object: &mut Map<String, Value>) -> Result<Option<String>, ApiError> {
    let password = object.remove("password");
    let pin = object.remove("pin");
    let text = |field: &str, value: Value| match value {
        Value::String(text) if text.chars().count() <= MAX_SECRET_CHARS => Ok(text),
        Value::String(_) => {
            Err(ApiError::unprocessable(format!("{field} is longer than {MAX_SECRET_CHARS} characters")))
        }
        _ => Err(ApiError::bad_request(format!("{field} must be a string"))),
    };
    match (password, pin) {
        (Some(_), Some(_)) => Err(ApiError::bad_request("send a password or a pin, not both")),
        (Some(password), None) => {
            let password = text("password", password)?;
            if password.chars().count() < MIN_PASSWORD_CHARS {
                return Err(ApiError::unprocessable(format!(
                    "password must have at least {MIN_PASSWORD_CHARS} characters"
                )));
            }
            Ok(Some(password))
        }
        (None, Some(pin)) => {
            let pin = text("pin", pin)?;
            if !(4..=12).contains(&pin.len()) || !pin.bytes().all(|b| b.is_ascii_digit()) {
                return Err(ApiError::unprocessable("pin must be 4 to 12 digits"));
            }
            Ok(Some(pin))
        }
        (None, None) => Ok(None),
    }
}

/// An argon2id PHC string of `secret`, with a fresh salt.
fn hash(secret: &str) -> Result<String, ApiError> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default().hash_password(secret.as_bytes(), &salt).map(|hash| hash.to_string()).map_err(|err| {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", format!("hashing failed: {err}"))
    })
}

/// Whether `secret` matches the stored hash: an argon2id PHC string, or a bcrypt hash
/// (`$2a$`, `$2b$`, `$2y$`) imported from POSPlus. False for a hash it cannot read.
fn matches(secret: &str, stored: &str) -> bool {
    if stored.starts_with("$2") {
        return bcrypt::verify(secret, stored).unwrap_or(false);
    }
    PasswordHash::new(stored)
        .is_ok_and(|parsed| Argon2::default().verify_password(secret.as_bytes(), &parsed).is_ok())
}

/// Checked when no account has the name, so that an unknown user costs the same time.
static DUMMY_HASH: LazyLock<String> = LazyLock::new(|| hash("possync-no-such-user").unwrap_or_default());

async fn list(
    State(api): State<Arc<ApiState>>,
    ApiQuery(params): ApiQuery<ListParams>,
) -> Result<Json<Vec<Value>>, ApiError> {
    check_paging(params.limit, 1000)?;
    let query = ListQuery {
        limit: params.limit,
        offset: params.offset,
        category_id: None,
        search: params.search.filter(|text| !text.is_empty()),
    };
    let users = read(&api.node, move |reader| reader.list_records(EntityKind::User, &query)).await?;
    Ok(Json(users.into_iter().map(public).collect()))
}

async fn get_one(
    State(api): State<Arc<ApiState>>,
    PathParam(id): PathParam,
) -> Result<Json<Value>, ApiError> {
    let id = path_id(EntityKind::User, &id)?;
    let wanted = id.clone();
    read(&api.node, move |reader| reader.record(EntityKind::User, &wanted))
        .await?
        .map(|user| Json(public(user)))
        .ok_or_else(|| ApiError::not_found(format!("user {id} not found")))
}

async fn create(
    State(api): State<Arc<ApiState>>,
    ApiJson(body): ApiJson<Value>,
) -> Result<Response, ApiError> {
    let body = hash_secret_of(body).await?;
    let user = write_change(&api.node, move |store| store.create_record(EntityKind::User, &body)).await?;
    Ok((StatusCode::CREATED, Json(public(user))).into_response())
}

async fn update(
    State(api): State<Arc<ApiState>>,
    PathParam(id): PathParam,
    ApiJson(body): ApiJson<Value>,
) -> Result<Json<Value>, ApiError> {
    let id = path_id(EntityKind::User, &id)?;
    let body = hash_secret_of(body).await?;
    let user =
        write_change(&api.node, move |store| store.update_record(EntityKind::User, &id, &body)).await?;
    Ok(Json(public(user)))
}

async fn delete(State(api): State<Arc<ApiState>>, PathParam(id): PathParam) -> Result<StatusCode, ApiError> {
    let id = path_id(EntityKind::User, &id)?;
    write_change(&api.node, move |store| store.delete_record(EntityKind::User, &id)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /api/users/verify`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Login {
    username: String,
    password: Option<String>,
    pin: Option<String>,
}

async fn verify(
    State(api): State<Arc<ApiState>>,
    ApiJson(login): ApiJson<Login>,
) -> Result<Response, ApiError> {
    let secret = match (login.password, login.pin) {
        (Some(secret), None) | (None, Some(secret)) if secret.chars().count() <= MAX_SECRET_CHARS => secret,
        (Some(_), Some(_)) => return Err(ApiError::bad_request("send a password or a pin, not both")),
        (None, None) => return Err(ApiError::bad_request("send a password or a pin")),
        _ => return Err(ApiError::bad_request(format!("at most {MAX_SECRET_CHARS} characters"))),
    };
    if let Some(wait) = api.logins.blocked(&login.username) {
        return Ok(too_many_attempts(wait));
    }
    let username = login.username.clone();
    let candidates = read(&api.node, move |reader| reader.users_named(&username)).await?;
    let found = tokio::task::spawn_blocking(move || {
        let active = candidates.into_iter().filter(|user| user["isActive"] != Value::Bool(false));
        let mut checked = false;
        for user in active {
            if let Some(stored) = user["passwordHash"].as_str() {
                checked = true;
                if matches(&secret, stored) {
                    return Some(user);
                }
            }
        }
        if !checked {
            let _ = matches(&secret, &DUMMY_HASH);
        }
        None
    })
    .await
    .map_err(|_| ApiError::unavailable())?;
    let Some(user) = found else {
        api.logins.failed(&login.username);
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_credentials",
            "unknown user, inactive account or wrong password/PIN",
        ));
    };
    api.logins.succeeded(&login.username);
    let id = path_id(EntityKind::User, user["id"].as_str().unwrap_or_default())?;
    let now = possync_core::time::rfc3339_ms(crate::clock::now_ms());
    let body = json!({"lastLogin": now});
    let user =
        write_change(&api.node, move |store| store.update_record(EntityKind::User, &id, &body)).await?;
    Ok(Json(public(user)).into_response())
}

fn too_many_attempts(wait: Duration) -> Response {
    let seconds = wait.as_secs().max(1);
    let error = ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "too_many_attempts",
        format!("too many failed logins for this username: try again in {seconds} s"),
    );
    let mut response = error.into_response();
    if let Ok(value) = HeaderValue::from_str(&seconds.to_string()) {
        response.headers_mut().insert(header::RETRY_AFTER, value);
    }
    response
}

/// Failed logins per username in the last minute (in memory: a restart forgets them).
#[derive(Debug, Default)]
pub struct LoginGuard {
    failures: Mutex<HashMap<String, VecDeque<Instant>>>,
}

impl LoginGuard {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, VecDeque<Instant>>> {
        self.failures.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// How long `username` must wait, when it has spent its failures.
    fn blocked(&self, username: &str) -> Option<Duration> {
        let now = Instant::now();
        let mut failures = self.lock();
        let recent = failures.get_mut(username)?;
        while recent.front().is_some_and(|at| now.duration_since(*at) >= FAILURE_WINDOW) {
            recent.pop_front();
        }
        if recent.len() < MAX_FAILURES {
            return None;
        }
        recent.front().map(|oldest| FAILURE_WINDOW.saturating_sub(now.duration_since(*oldest)))
    }

    fn failed(&self, username: &str) {
        let mut failures = self.lock();
        // Bounded: a flood of made-up names cannot grow the map without end.
        if failures.len() >= 10_000 {
            let now = Instant::now();
            failures.retain(|_, at| at.back().is_some_and(|last| now.duration_since(*last) < FAILURE_WINDOW));
        }
        failures.entry(username.to_string()).or_default().push_back(Instant::now());
    }

    fn succeeded(&self, username: &str) {
        self.lock().remove(username);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argon2id_hashes_made_here_and_imported_bcrypt_hashes_both_verify() {
        let made = hash("4711").unwrap();
        assert!(made.starts_with("$argon2id$"), "{made}");
        assert!(matches("4711", &made) && !matches("4712", &made));
        assert_ne!(hash("4711").unwrap(), made, "a fresh salt each time");
        let imported = bcrypt::hash("posplus-pass", 4).unwrap();
        assert!(matches("posplus-pass", &imported) && !matches("other", &imported));
        for unreadable in ["", "plain-text", "$2b$10$short", "$argon2id$broken"] {
            assert!(!matches("plain-text", unreadable), "{unreadable:?}");
        }
    }

    #[test]
    fn the_login_guard_blocks_a_username_after_five_failures_only() {
        let guard = LoginGuard::default();
        for _ in 0..MAX_FAILURES {
            assert_eq!(guard.blocked("carol"), None);
            guard.failed("carol");
        }
        let wait = guard.blocked("carol").expect("blocked after 5 failures");
        assert!(wait <= FAILURE_WINDOW && wait > Duration::from_secs(50), "{wait:?}");
        assert_eq!(guard.blocked("dave"), None, "per username");
        guard.succeeded("carol");
        assert_eq!(guard.blocked("carol"), None);
    }
}
