//! The API's accept loop: a cap on connections and an idle timeout (issue 13, item 7).
//!
//! `axum::serve` keeps every accepted connection until its client closes it: 1,000 idle
//! sockets grew a node from 17 MB to 63 MB and never gave it back. This loop serves the
//! same router with hyper's HTTP/1 connection directly, and bounds what a connection may
//! hold:
//!
//! - at most [`ApiOptions::max_connections`] connections at once: a semaphore permit is taken
//!   *before* `accept`, so at the cap new connections wait in the kernel's backlog (they
//!   are served as soon as a slot frees) instead of costing the node memory;
//! - [`ApiOptions::header_timeout`]: hyper closes a connection that does not send a whole
//!   request head in time once it has started one (slow clients, slowloris);
//! - [`ApiOptions::idle_timeout`]: a connection that moves no byte either way for that long
//!   is shut down gracefully (a request in progress is finished first). This covers a socket
//!   that never sends anything and a keep-alive connection left open between requests; the
//!   event stream, which writes every second, is never idle.
//!
//! So idle sockets can fill the cap for at most one idle timeout, after which the real
//! till's request, waiting in the backlog, is served. HTTP/2 is not offered: browsers speak
//! it only over TLS, and the CLI and tills use HTTP/1.1.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;

use crate::config::ApiOptions;

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
    loop {
        if *shutdown.borrow() {
            return;
        }
        let permit = tokio::select! {
            permit = Arc::clone(&slots).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return, // never closed
            },
            _ = shutdown.changed() => return,
        };
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Out of file descriptors and the like: wait, never spin.
                    tracing::warn!(%err, "API accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let router = router.clone();
        let options = options.clone();
        let open_connections = open_connections.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            open_connections.inc();
            serve_connection(stream, router, &options, shutdown).await;
            open_connections.dec();
            drop(permit);
        });
    }
}

/// One connection, until the client closes it, it idles too long or the node stops.
async fn serve_connection(
    stream: TcpStream,
    router: Router,
    options: &ApiOptions,
    mut shutdown: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let started = Instant::now();
    let activity = Arc::new(AtomicU64::new(0));
    let io = Tracked { inner: stream, started, last_activity_ms: Arc::clone(&activity) };
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(options.header_timeout);
    let connection = http.serve_connection(TokioIo::new(io), TowerToHyperService::new(router));
    tokio::pin!(connection);
    let mut closing = false;
    let mut check_at = started + options.idle_timeout;
    loop {
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(err) = result {
                    tracing::debug!(%err, "API connection ended");
                }
                return;
            }
            () = tokio::time::sleep_until(check_at), if !closing => {
                let last = started + Duration::from_millis(activity.load(Ordering::Relaxed));
                if Instant::now() >= last + options.idle_timeout {
                    connection.as_mut().graceful_shutdown();
                    closing = true;
                } else {
                    check_at = last + options.idle_timeout;
                }
            }
            _ = shutdown.changed(), if !closing => {
                connection.as_mut().graceful_shutdown();
                closing = true;
            }
        }
    }
}

/// A socket that notes when it last moved a byte (milliseconds since `started`).
struct Tracked {
    /// The connection.
    inner: TcpStream,
    /// When it was accepted.
    started: Instant,
    /// Read by the idle check of [`serve_connection`].
    last_activity_ms: Arc<AtomicU64>,
}

impl Tracked {
    fn touch(&self) {
        let elapsed = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_activity_ms.store(elapsed, Ordering::Relaxed);
    }
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
            self.touch();
        }
        polled
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(polled, Poll::Ready(Ok(written)) if written > 0) {
            self.touch();
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
            self.touch();
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
