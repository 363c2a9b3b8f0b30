//! Keeps web pages away from the API (issue 13, item 7), the way Syncthing guards its GUI.
//!
//! The API listens on loopback without a token, and a till's own browser is exactly where
//! the shop's staff surf. Two browser behaviours would let any page drive it:
//!
//! - **DNS rebinding.** A page from `rebind.evil.example` re-points its own name at
//!   127.0.0.1; its scripts then talk to the node as "same origin". The browser still sends
//!   `Host: rebind.evil.example:3031`, so the node refuses every request whose `Host` is not
//!   one of its own names ([`BrowserGuard::host_allowed`]): `localhost`, a loopback address,
//!   the address it is bound to (any address literal when bound to `0.0.0.0`/`::`: an
//!   address typed in a browser cannot be rebound) and the `api_allowed_hosts` of
//!   `possync.toml`, each with the API's port. Answer: 403 `forbidden_host`.
//! - **Cross-site requests.** A page anywhere can make the browser send a request to
//!   `http://127.0.0.1:3031` (a form, an `<img>`, `fetch(..., {mode: "no-cors"})`). Browsers
//!   mark requests of scripts and forms with an `Origin` header: anything but the node's own
//!   origin (`http://` + the request's own `Host`), `null` included, is refused on every
//!   route with 403 `forbidden_origin`. Older browsers and some requests send no `Origin`;
//!   so, in addition, a state-changing call (POST, PUT, PATCH, DELETE) must carry
//!   `Content-Type: application/json` even when it has no body: an HTML form can only send
//!   `application/x-www-form-urlencoded`, `multipart/form-data` or `text/plain`, and a
//!   script that sets `application/json` on a cross-origin request must first pass a CORS
//!   preflight, which the node never grants. Answer: 415 `unsupported_media_type`.
//!
//! The dashboard (same origin, `fetch` with a JSON content type), the CLI and `curl -H
//! 'content-type: application/json'` pass all three. The checks run before the token check
//! and before routing, so they hold for every route, unknown ones included.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::uri::Authority;
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::ApiState;
use super::error::{ApiError, is_json};

/// Which `Host` and `Origin` headers the API answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrowserGuard {
    /// The port the API listens on (the real one, also when configured as 0).
    port: u16,
    /// The address it is bound to.
    bound_ip: IpAddr,
    /// Extra names from `possync.toml` (`api_allowed_hosts`), lower case, no trailing dot.
    names: Vec<String>,
}

impl BrowserGuard {
    /// The guard of an API listening on `bound`, also known by `extra_names` (host names
    /// such as `till-3.shop.lan`, without a port).
    pub fn new(bound: SocketAddr, extra_names: &[String]) -> BrowserGuard {
        let names =
            extra_names.iter().map(|name| normalize_name(name)).filter(|name| !name.is_empty()).collect();
        BrowserGuard { port: bound.port(), bound_ip: bound.ip(), names }
    }

    /// Is `host` (a `Host` header: `name[:port]`) one of this node's own names?
    pub fn host_allowed(&self, host: &str) -> bool {
        let Some((name, port)) = split_authority(host) else { return false };
        if port != self.port {
            return false;
        }
        if name == "localhost" || self.names.contains(&name) {
            return true;
        }
        let literal = name.strip_prefix('[').and_then(|rest| rest.strip_suffix(']')).unwrap_or(&name);
        match literal.parse::<IpAddr>() {
            Ok(ip) => ip.is_loopback() || ip == self.bound_ip || self.bound_ip.is_unspecified(),
            Err(_) => false,
        }
    }

    /// Is `origin` (an `Origin` header) the node's own origin, as reached through `host`?
    pub fn origin_allowed(&self, origin: &str, host: &str) -> bool {
        let Some(authority) = origin.strip_prefix("http://") else { return false };
        if authority.contains('/') {
            return false;
        }
        match (split_authority(authority), split_authority(host)) {
            (Some(origin), Some(host)) => origin == host,
            _ => false,
        }
    }
}

/// `name[:port]` as (lower-case name without a trailing dot, port; 80 when absent).
fn split_authority(text: &str) -> Option<(String, u16)> {
    let authority: Authority = text.parse().ok()?;
    // `user@host` is valid in an authority but never in a Host header or an origin.
    if authority.as_str().contains('@') {
        return None;
    }
    Some((normalize_name(authority.host()), authority.port_u16().unwrap_or(80)))
}

fn normalize_name(name: &str) -> String {
    name.trim().trim_end_matches('.').to_ascii_lowercase()
}

/// The middleware: the three checks of the module doc, in order.
pub async fn guard(State(api): State<Arc<ApiState>>, request: Request, next: Next) -> Response {
    match check(&api.guard, &request) {
        Ok(()) => next.run(request).await,
        Err(refusal) => refusal.into_response(),
    }
}

fn check(guard: &BrowserGuard, request: &Request) -> Result<(), ApiError> {
    let headers = request.headers();
    // HTTP/1.1 requests carry `Host`; HTTP/2 ones may carry the authority in the URI only.
    let host = match headers.get(header::HOST) {
        Some(value) => value.to_str().ok().map(str::to_string),
        None => request.uri().authority().map(|authority| authority.as_str().to_string()),
    };
    let Some(host) = host.filter(|host| guard.host_allowed(host)) else {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden_host",
            "the Host header is not one of this node's names (localhost, its address, or \
             api_allowed_hosts in possync.toml, with the API port)",
        ));
    };
    if let Some(origin) = headers.get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or("");
        if !guard.origin_allowed(origin, &host) {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden_origin",
                "requests from other web pages are refused: the Origin must be this node's own",
            ));
        }
    }
    let state_changing =
        matches!(*request.method(), Method::POST | Method::PUT | Method::PATCH | Method::DELETE);
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|value| value.to_str().ok());
    if state_changing && !is_json(content_type) {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send `Content-Type: application/json` with every POST, PUT, PATCH and DELETE, \
             also without a body (it keeps web pages from posting to the till)",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(bound: &str) -> BrowserGuard {
        BrowserGuard::new(bound.parse().unwrap(), &["Till-3.Shop.lan.".to_string()])
    }

    #[test]
    fn own_names_with_the_port_are_allowed() {
        let loopback = guard("127.0.0.1:3031");
        for host in [
            "localhost:3031",
            "LOCALHOST:3031",
            "localhost.:3031",
            "127.0.0.1:3031",
            "127.0.0.2:3031",
            "[::1]:3031",
            "till-3.shop.lan:3031",
        ] {
            assert!(loopback.host_allowed(host), "{host}");
        }
        for host in [
            "rebind.evil.example:3031",
            "localhost:80",
            "localhost",
            "127.0.0.1:3032",
            "192.168.1.20:3031",
            "localhost.evil.example:3031",
            "user@localhost:3031",
            "",
            "localhost:3031/x",
        ] {
            assert!(!loopback.host_allowed(host), "{host}");
        }
        assert!(BrowserGuard::new("127.0.0.1:80".parse().unwrap(), &[]).host_allowed("localhost"));
    }

    #[test]
    fn bound_everywhere_any_address_literal_is_allowed_but_no_other_name() {
        let everywhere = guard("0.0.0.0:3031");
        assert!(everywhere.host_allowed("192.168.1.20:3031"));
        assert!(everywhere.host_allowed("[fe80::1]:3031"));
        assert!(!everywhere.host_allowed("rebind.evil.example:3031"));
        let one = guard("192.168.1.20:3031");
        assert!(one.host_allowed("192.168.1.20:3031"));
        assert!(!one.host_allowed("192.168.1.21:3031"));
    }

    #[test]
    fn only_the_nodes_own_origin_is_allowed() {
        let node = guard("127.0.0.1:3031");
        assert!(node.origin_allowed("http://127.0.0.1:3031", "127.0.0.1:3031"));
        assert!(node.origin_allowed("http://LOCALHOST:3031", "localhost:3031"));
        for origin in [
            "http://evil.example",
            "http://localhost:3031",
            "https://127.0.0.1:3031",
            "null",
            "",
            "http://127.0.0.1:3031/path",
            "http://127.0.0.1:3032",
        ] {
            assert!(!node.origin_allowed(origin, "127.0.0.1:3031"), "{origin}");
        }
    }

    #[test]
    fn json_content_types() {
        assert!(is_json(Some("application/json")));
        assert!(is_json(Some("Application/JSON; charset=utf-8")));
        assert!(is_json(Some("application/merge-patch+json")));
        for other in [None, Some(""), Some("text/plain"), Some("application/x-www-form-urlencoded")] {
            assert!(!is_json(other), "{other:?}");
        }
    }
}
