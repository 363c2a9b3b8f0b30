//! Access to the API (SPEC 6): open on loopback, a bearer token everywhere else.
//!
//! The decision is a function of the address the API is configured to bind
//! ([`AuthPolicy::for_bind`]), not of where a request comes from: a node bound to `0.0.0.0`
//! asks every caller for the token, even one on 127.0.0.1. The token comes in an
//! `Authorization: Bearer` header or, for the dashboard's `EventSource` which cannot send
//! headers, a `token` query parameter. Tokens are compared in constant time.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use super::ApiState;
use super::error::ApiError;

/// Who may call the API.
#[derive(Clone, PartialEq, Eq)]
pub enum AuthPolicy {
    /// Anyone who can reach it (it is bound to loopback).
    Open,
    /// Only callers presenting this token.
    Token(String),
}

impl std::fmt::Debug for AuthPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AuthPolicy::Open => f.write_str("Open"),
            AuthPolicy::Token(_) => f.write_str("Token(..)"),
        }
    }
}

impl AuthPolicy {
    /// The policy for an API bound to `bind` (`None`: not served, nothing to protect).
    pub fn for_bind(bind: Option<SocketAddr>, token: &str) -> AuthPolicy {
        match bind {
            Some(address) if !address.ip().is_loopback() => AuthPolicy::Token(token.to_string()),
            _ => AuthPolicy::Open,
        }
    }

    /// Does this request carry what the policy asks for?
    pub fn allows(&self, authorization: Option<&str>, query: Option<&str>) -> bool {
        let AuthPolicy::Token(expected) = self else { return true };
        // An empty configured token would let an empty bearer in: refuse everything instead.
        if expected.is_empty() {
            return false;
        }
        let from_header = authorization
            .and_then(|value| value.strip_prefix("Bearer ").or_else(|| value.strip_prefix("bearer ")))
            .map(str::trim);
        let from_query = query.and_then(|query| {
            form_urlencoded::parse(query.as_bytes())
                .find(|(key, _)| key == "token")
                .map(|(_, value)| value.into_owned())
        });
        [from_header.map(str::to_string), from_query]
            .into_iter()
            .flatten()
            .any(|presented| bool::from(presented.as_bytes().ct_eq(expected.as_bytes())))
    }
}

/// The middleware: refuses a call without the token when the policy asks for one. The
/// dashboard's static files are public (a `<script src>` cannot carry the token, and they
/// hold no data).
pub async fn require_token(State(api): State<Arc<ApiState>>, request: Request, next: Next) -> Response {
    let public = matches!(request.uri().path(), "/" | "/dashboard/app.js" | "/dashboard/style.css");
    let authorization = request.headers().get(header::AUTHORIZATION).and_then(|value| value.to_str().ok());
    if public || api.auth.allows(authorization, request.uri().query()) {
        return next.run(request).await;
    }
    ApiError::unauthorized().into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_binds_are_open_others_need_the_token() {
        let token = "s3cret";
        for open in ["127.0.0.1:3031", "127.0.0.2:0", "[::1]:3031"] {
            assert_eq!(AuthPolicy::for_bind(Some(open.parse().unwrap()), token), AuthPolicy::Open, "{open}");
        }
        for guarded in ["0.0.0.0:3031", "192.168.1.20:3031", "[::]:3031", "10.0.0.1:0"] {
            assert_eq!(
                AuthPolicy::for_bind(Some(guarded.parse().unwrap()), token),
                AuthPolicy::Token(token.into()),
                "{guarded}"
            );
        }
        assert_eq!(AuthPolicy::for_bind(None, token), AuthPolicy::Open);
    }

    #[test]
    fn token_from_header_or_query() {
        let policy = AuthPolicy::Token("s3cret".into());
        assert!(policy.allows(Some("Bearer s3cret"), None));
        assert!(policy.allows(None, Some("limit=5&token=s3cret")));
        assert!(policy.allows(None, Some("token=s3%63ret")));
        assert!(!policy.allows(Some("Bearer s3cre"), None));
        assert!(!policy.allows(Some("s3cret"), None));
        assert!(!policy.allows(None, Some("token=")));
        assert!(!policy.allows(None, None));
        assert!(!AuthPolicy::Token(String::new()).allows(Some("Bearer "), Some("token=")));
        assert!(AuthPolicy::Open.allows(None, None));
    }
}
