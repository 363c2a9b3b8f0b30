//! A plain HTTP request on the peer port gets `404 Not Found` (PROTOCOL.md, "Connection").
//!
//! tungstenite answers a WebSocket upgrade to a wrong path with 404, but a request that is
//! not an upgrade at all (a browser, `curl`, a port scanner speaking HTTP) fails its
//! handshake before any answer is written: the client saw the connection close with
//! nothing. [`answer_plain_http`] looks at the request head with `peek`, without consuming
//! it, so a real upgrade reaches tungstenite byte for byte, and answers anything else that
//! parses as an HTTP request itself.

use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// The most of a request head looked at; a longer head is left to tungstenite (which
/// refuses it).
const MAX_HEAD: usize = 4096;

/// Wait between two looks when the head is incomplete and nothing new came in (`peek`
/// does not wait for *more* data than it already saw).
const PEEK_PAUSE: Duration = Duration::from_millis(5);

/// The whole answer: the connection is closed after it.
const NOT_FOUND: &[u8] = b"HTTP/1.1 404 Not Found\r\nContent-Type: text/plain; charset=utf-8\r\n\
Content-Length: 57\r\nConnection: close\r\n\r\nnot found: possync peer port (WebSocket upgrade at /p2p)\n";

/// Answers 404 and closes when `stream` carries a complete HTTP request that is not a
/// WebSocket upgrade; returns whether it did. Anything else (an upgrade, a closed or
/// non-HTTP stream) is left untouched for the WebSocket handshake. Call it under the
/// accept's deadline: it waits for the head to arrive.
pub(super) async fn answer_plain_http(stream: &mut TcpStream) -> std::io::Result<bool> {
    let mut head = vec![0u8; MAX_HEAD];
    let mut seen = 0;
    loop {
        let peeked = stream.peek(&mut head).await?;
        if peeked == 0 {
            return Ok(false);
        }
        match is_plain_request(&head[..peeked]) {
            Some(true) => break,
            Some(false) => return Ok(false),
            None if peeked < head.len() => {
                if peeked == seen {
                    tokio::time::sleep(PEEK_PAUSE).await;
                }
                seen = peeked;
            }
            None => return Ok(false),
        }
    }
    stream.write_all(NOT_FOUND).await?;
    let _ = stream.shutdown().await;
    Ok(true)
}

/// `Some(true)`: a complete HTTP request without `Upgrade: websocket`; `Some(false)`: an
/// upgrade or not HTTP; `None`: the head is incomplete.
pub(super) fn is_plain_request(bytes: &[u8]) -> Option<bool> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(bytes) {
        Ok(httparse::Status::Complete(_)) => {
            let upgrade = request.headers.iter().any(|header| {
                header.name.eq_ignore_ascii_case("upgrade")
                    && std::str::from_utf8(header.value).is_ok_and(|value| {
                        value.split(',').any(|token| token.trim().eq_ignore_ascii_case("websocket"))
                    })
            });
            Some(!upgrade)
        }
        Ok(httparse::Status::Partial) => None,
        Err(_) => Some(false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_sorted() {
        assert_eq!(is_plain_request(b"GET / HTTP/1.1\r\nHost: till\r\n\r\n"), Some(true));
        assert_eq!(is_plain_request(b"POST /p2p HTTP/1.0\r\n\r\n"), Some(true));
        let upgrade = b"GET /p2p HTTP/1.1\r\nHost: till\r\nConnection: Upgrade\r\nUpgrade: WebSocket\r\n\
Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
        assert_eq!(is_plain_request(upgrade), Some(false));
        assert_eq!(is_plain_request(b"GET / HTTP/1.1\r\nHost: ti"), None);
        assert_eq!(is_plain_request(b"\x16\x03\x01\x02\x00"), Some(false), "TLS is not HTTP");
        let text = std::str::from_utf8(NOT_FOUND).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let length = head.lines().find_map(|line| line.strip_prefix("Content-Length: ")).unwrap();
        assert_eq!(length.parse::<usize>().unwrap(), body.len(), "Content-Length matches the body");
    }
}
