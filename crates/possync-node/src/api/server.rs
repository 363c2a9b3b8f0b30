//! The API's accept loop: a cap on connections and an idle timeout (issue 13, item 7).
//!
//! `axum::serve` keeps every accepted connection until its client closes it: 1,000 idle
//! sockets grew a node from 17 MB to 63 MB and never gave it back. This loop serves the
//! same router with hyper's HTTP/1 connection directly, and bounds what connections may
//! hold:
//!
//! - [`ApiOptions::idle_timeout`]: a connection that moves no byte either way for that long
//!   is shut down gracefully (a request in progress is finished first). This covers a socket
//!   that never sends anything and a keep-alive connection left open between requests; the
//!   event stream, which writes every second, is never idle.
//! - [`ApiOptions::header_timeout`]: hyper closes a connection that does not send a whole
//!   request head in time once it has started one (slow clients, slowloris).
//! - at most [`ApiOptions::max_connections`] connections at once. A connection accepted at
//!   the cap makes room by closing the connection that has been idle the longest (gracefully:
//!   a request in progress on it still gets its answer), so idle sockets, however many, never
//!   keep a till's request waiting. When no room comes within [`EVICTION_WAIT`] (every slot
//!   busy with a request or an event stream), the new connection gets `503
//!   too_many_connections` and is closed.
//!
//! HTTP/2 is not offered: browsers speak it only over TLS, and the CLI and tills use
//! HTTP/1.1. `possync_api_connections` counts the connections being served.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};
use tokio::time::Instant;

use crate::config::ApiOptions;

/// How long a connection accepted at the cap waits for the one it evicted to close.
pub const EVICTION_WAIT: Duration = Duration::from_secs(2);

/// The answer to a connection that finds every slot busy.
const TOO_MANY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n\
Content-Length: 93\r\nConnection: close\r\nRetry-After: 1\r\n\r\n\
{\"error\":{\"code\":\"too_many_connections\",\"message\":\"every API connection is busy; try again\"}}";

/// Serves `router` on `listener` until `shutdown` turns true, within `options`' limits;
/// `open_connections` counts the connections being served.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    options: ApiOptions,
    open_connections: Gauge,
    mut shutdown: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(options.max_connections.max(1)));
    let connections = Arc::new(Connections::new());
    loop {
        if *shutdown.borrow() {
            return;
        }
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(err) => {
                    // Out of file descriptors and the like: wait, never spin.
                    tracing::warn!(%err, "API accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let Some(permit) = make_room(&slots, &connections).await else {
            tokio::spawn(refuse(stream));
            continue;
        };
        let router = router.clone();
        let options = options.clone();
        let open_connections = open_connections.clone();
        let shutdown = shutdown.clone();
        let connections = Arc::clone(&connections);
        tokio::spawn(async move {
            open_connections.inc();
            let (key, state) = connections.insert();
            serve_connection(stream, router, &options, &state, shutdown).await;
            connections.remove(key);
            open_connections.dec();
            drop(permit);
        });
    }
}

/// A slot for a new connection: a free one, or the one freed by closing the connection idle
/// the longest; `None` when none frees up within [`EVICTION_WAIT`].
async fn make_room(slots: &Arc<Semaphore>, connections: &Connections) -> Option<OwnedSemaphorePermit> {
    if let Ok(permit) = Arc::clone(slots).try_acquire_owned() {
        return Some(permit);
    }
    connections.evict_most_idle();
    tokio::time::timeout(EVICTION_WAIT, Arc::clone(slots).acquire_owned()).await.ok()?.ok()
}

/// Answers 503 on a connection there is no room for, and closes it.
async fn refuse(mut stream: TcpStream) {
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = stream.write_all(TOO_MANY).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

/// The connections being served, for eviction.
struct Connections {
    /// Time base of every `last_activity_ms`, so that connections compare.
    started: Instant,
    /// Next key.
    next: AtomicU64,
    /// By key.
    live: Mutex<HashMap<u64, Arc<ConnectionState>>>,
}

/// What the accept loop knows of one connection.
struct ConnectionState {
    /// Time base of `last_activity_ms` (the server's start).
    started: Instant,
    /// When it last moved a byte, in ms since `started`.
    last_activity_ms: AtomicU64,
    /// Set once it was asked to close to make room (it is not asked twice).
    evicted: AtomicBool,
    /// Wakes the connection's task to close it.
    evict: Notify,
}

impl ConnectionState {
    fn touch(&self) {
        self.last_activity_ms.store(elapsed_ms(self.started), Ordering::Relaxed);
    }

    fn last_activity(&self) -> Instant {
        self.started + Duration::from_millis(self.last_activity_ms.load(Ordering::Relaxed))
    }
}

impl Connections {
    fn new() -> Connections {
        Connections { started: Instant::now(), next: AtomicU64::new(0), live: Mutex::new(HashMap::new()) }
    }

    /// Registers a new connection (active now).
    fn insert(&self) -> (u64, Arc<ConnectionState>) {
        let key = self.next.fetch_add(1, Ordering::Relaxed);
        let state = Arc::new(ConnectionState {
            started: self.started,
            last_activity_ms: AtomicU64::new(elapsed_ms(self.started)),
            evicted: AtomicBool::new(false),
            evict: Notify::new(),
        });
        self.lock().insert(key, Arc::clone(&state));
        (key, state)
    }

    fn remove(&self, key: u64) {
        self.lock().remove(&key);
    }

    /// Asks the connection idle the longest (not yet asked) to close.
    fn evict_most_idle(&self) {
        let live = self.lock();
        let candidate = live
            .values()
            .filter(|state| !state.evicted.load(Ordering::Relaxed))
            .min_by_key(|state| state.last_activity_ms.load(Ordering::Relaxed));
        if let Some(state) = candidate {
            state.evicted.store(true, Ordering::Relaxed);
            state.evict.notify_one();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<ConnectionState>>> {
        // A panic while holding this lock leaves the map consistent (single inserts and
        // removes): carry on with it.
        self.live.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn elapsed_ms(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// One connection, until the client closes it, it idles too long, it is evicted or the node
/// stops.
async fn serve_connection(
    stream: TcpStream,
    router: Router,
    options: &ApiOptions,
    state: &Arc<ConnectionState>,
    mut shutdown: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let io = Tracked { inner: stream, state: Arc::clone(state) };
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(options.header_timeout);
    let connection = http.serve_connection(TokioIo::new(io), TowerToHyperService::new(router));
    tokio::pin!(connection);
    let mut closing = false;
    let mut check_at = state.last_activity() + options.idle_timeout;
    loop {
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(err) = result {
                    tracing::debug!(%err, "API connection ended");
                }
                return;
            }
            () = tokio::time::sleep_until(check_at), if !closing => {
                let idle_until = state.last_activity() + options.idle_timeout;
                if Instant::now() >= idle_until {
                    connection.as_mut().graceful_shutdown();
                    closing = true;
                } else {
                    check_at = idle_until;
                }
            }
            () = state.evict.notified(), if !closing => {
                connection.as_mut().graceful_shutdown();
                closing = true;
            }
            _ = shutdown.changed(), if !closing => {
                connection.as_mut().graceful_shutdown();
                closing = true;
            }
        }
    }
}

/// A socket that notes when it last moved a byte.
struct Tracked {
    /// The connection.
    inner: TcpStream,
    /// Where the time of its last byte goes.
    state: Arc<ConnectionState>,
}

impl AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.state.touch();
        }
        polled
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(polled, Poll::Ready(Ok(written)) if written > 0) {
            self.state.touch();
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buffers: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, buffers);
        if matches!(polled, Poll::Ready(Ok(written)) if written > 0) {
            self.state.touch();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_refusal_is_well_formed() {
        let text = std::str::from_utf8(TOO_MANY).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let length = head.lines().find_map(|line| line.strip_prefix("Content-Length: ")).unwrap();
        assert_eq!(length.parse::<usize>().unwrap(), body.len());
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["error"]["code"], "too_many_connections");
    }

    #[test]
    fn the_connection_idle_the_longest_is_evicted_once() {
        let connections = Connections::new();
        let (_, old) = connections.insert();
        let (_, new) = connections.insert();
        old.last_activity_ms.store(10, Ordering::Relaxed);
        new.last_activity_ms.store(500, Ordering::Relaxed);
        connections.evict_most_idle();
        assert!(old.evicted.load(Ordering::Relaxed));
        assert!(!new.evicted.load(Ordering::Relaxed));
        connections.evict_most_idle();
        assert!(new.evicted.load(Ordering::Relaxed), "the next one, not the same twice");
    }
}
