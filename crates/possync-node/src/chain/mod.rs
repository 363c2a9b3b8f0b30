//! The chain of stores over NATS JetStream: the tokio driver of `possync-chain`'s rules.
//!
//! A node with `[uplink]` (a store's till) runs [`uplink`]: it publishes its store's origins'
//! changes on the UP stream and applies the head office's changes from the DOWN stream. A
//! node with `[hq]` runs [`hq`]: it creates the streams, ingests every store's changes from
//! the UP stream with a durable consumer, and publishes its own origin's changes on the DOWN
//! stream. Both publish with the same loop ([`publisher`]), which follows the sans-IO
//! [`possync_chain::Planner`].
//!
//! Nothing here decides a merge or keeps a second log: changes go through the node's single
//! writer (`apply_batch`'s rules, by (origin, seq)), uploads are read from the change log
//! (the buffer while the WAN is down), and the LAN spreads whatever arrives as usual.
//! See docs/CHAIN.md for the layout and what happens at each failure.

mod hq;
mod publisher;
mod uplink;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use serde_json::{Value, json};
use tokio::task::JoinSet;

use crate::config::{BackboneAuth, BackboneConfig, ChainRole};
use crate::metrics::{ChainMetrics, StatusLabel};
use crate::shared::NodeShared;

/// Why a backbone operation failed (the driver logs it and retries with backoff).
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    /// The client could not be set up (credentials file, CA file).
    #[error("cannot connect to the backbone: {0}")]
    Connect(String),
    /// A JetStream call failed (stream, consumer, read).
    #[error("JetStream: {0}")]
    JetStream(String),
    /// A name is not usable on the backbone.
    #[error(transparent)]
    Subject(#[from] possync_chain::SubjectError),
    /// The database refused.
    #[error(transparent)]
    Store(#[from] possync_store::StoreError),
    /// The writer stopped (the node is shutting down).
    #[error(transparent)]
    Writer(#[from] crate::writer::WriterError),
}

/// What the chain driver reports, for `GET /api/chain/status`, the metrics and the tests.
#[derive(Debug, Default)]
pub struct ChainStatus {
    /// The counters and state, behind a lock held only to copy or bump them.
    inner: Mutex<StatusInner>,
    /// The node's Prometheus handles, kept in step with `inner` by [`ChainStatus::update`].
    metrics: ChainMetrics,
    /// Head office: the latest uplink report of every store's tills.
    presence: Mutex<possync_chain::Presence>,
}

#[derive(Debug, Default, Clone)]
struct StatusInner {
    connected: bool,
    published_messages: u64,
    published_changes: u64,
    wrong_sequence: u64,
    received_messages: u64,
    applied_changes: u64,
    rejected_messages: u64,
    backlog: u64,
    /// The clock time of the oldest change of the backlog (Unix ms), when known.
    oldest_pending_ms: Option<u64>,
    last_error: Option<String>,
    /// When changes were last published and acknowledged (Unix ms).
    last_published_ms: Option<u64>,
    /// When a change from the backbone was last applied (Unix ms).
    last_applied_ms: Option<u64>,
}

impl ChainStatus {
    /// A status that also feeds `metrics`.
    pub fn new(metrics: ChainMetrics) -> ChainStatus {
        ChainStatus { inner: Mutex::default(), metrics, presence: Mutex::default() }
    }

    /// The status as JSON.
    pub fn snapshot(&self) -> Value {
        let inner = self.lock().clone();
        json!({
            "connected": inner.connected,
            "publishedMessages": inner.published_messages,
            "publishedChanges": inner.published_changes,
            "wrongSequence": inner.wrong_sequence,
            "receivedMessages": inner.received_messages,
            "appliedChanges": inner.applied_changes,
            "rejectedMessages": inner.rejected_messages,
            "backlog": inner.backlog,
            "oldestPendingAt": inner.oldest_pending_ms.map(possync_core::time::rfc3339_ms),
            "lastError": inner.last_error,
            "lastPublishedAt": inner.last_published_ms.map(possync_core::time::rfc3339_ms),
            "lastAppliedAt": inner.last_applied_ms.map(possync_core::time::rfc3339_ms),
        })
    }

    /// Messages refused so far (forged, malformed, another store's origin).
    pub fn rejected_messages(&self) -> u64 {
        self.lock().rejected_messages
    }

    /// Changes this node holds that the backbone does not yet (as far as it knows).
    pub fn backlog(&self) -> u64 {
        self.lock().backlog
    }

    /// What this till reports to the head office about its uplink.
    pub fn uplink_report(&self) -> possync_chain::UplinkReport {
        let inner = self.lock();
        possync_chain::UplinkReport {
            backlog: inner.backlog,
            oldest_ms: inner.oldest_pending_ms,
            conflicts: None,
        }
    }

    /// Head office: records a till's uplink report (false when it is not tracked: see
    /// [`possync_chain::presence::MAX_TRACKED_TILLS`]).
    pub fn store_reported(
        &self,
        store: &possync_chain::StoreId,
        till: &possync_core::PosId,
        report: possync_chain::UplinkReport,
        now_ms: u64,
    ) -> bool {
        self.presence
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .heard(store, till, report, now_ms)
    }

    /// Head office: every store that reported, with its state at `now_ms` (online when one
    /// of its tills reported within `window_ms`).
    pub fn store_states(
        &self,
        now_ms: u64,
        window_ms: u64,
    ) -> std::collections::BTreeMap<possync_chain::StoreId, possync_chain::StoreState> {
        self.presence.lock().unwrap_or_else(std::sync::PoisonError::into_inner).stores(now_ms, window_ms)
    }

    fn update(&self, change: impl FnOnce(&mut StatusInner)) {
        let mut inner = self.lock();
        let before = inner.clone();
        change(&mut inner);
        let now = crate::shared::now_ms();
        if inner.published_changes > before.published_changes {
            inner.last_published_ms = Some(now);
        }
        if inner.applied_changes > before.applied_changes {
            inner.last_applied_ms = Some(now);
        }
        let metrics = &self.metrics;
        let seconds = |ms: Option<u64>| ms.map_or(0, |ms| i64::try_from(ms / 1000).unwrap_or(i64::MAX));
        metrics.last_published.set(seconds(inner.last_published_ms));
        metrics.last_applied.set(seconds(inner.last_applied_ms));
        metrics.connected.set(i64::from(inner.connected));
        metrics.backlog.set(i64::try_from(inner.backlog).unwrap_or(i64::MAX));
        let count = |family: &Family<StatusLabel, Counter>, status: &str, before: u64, after: u64| {
            if after > before {
                family.get_or_create(&StatusLabel { status: status.into() }).inc_by(after - before);
            }
        };
        count(&metrics.messages, "published", before.published_messages, inner.published_messages);
        count(&metrics.messages, "received", before.received_messages, inner.received_messages);
        count(&metrics.messages, "rejected", before.rejected_messages, inner.rejected_messages);
        count(&metrics.messages, "wrong_sequence", before.wrong_sequence, inner.wrong_sequence);
        count(&metrics.changes, "published", before.published_changes, inner.published_changes);
        count(&metrics.changes, "applied", before.applied_changes, inner.applied_changes);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, StatusInner> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Starts the chain tasks this node's configuration asks for.
pub(crate) fn spawn(node: &Arc<NodeShared>, tasks: &mut JoinSet<()>) {
    match node.config.chain.clone() {
        Some(ChainRole::Uplink(config)) => {
            tasks.spawn(uplink::run(Arc::clone(node), config));
        }
        Some(ChainRole::Hq(config)) => {
            tasks.spawn(hq::run(Arc::clone(node), config));
        }
        None => {}
    }
}

/// Connects to the backbone. The client reconnects by itself for as long as it lives (the
/// first connection too): a till whose WAN is down starts anyway and catches up later.
async fn connect(backbone: &BackboneConfig, name: String) -> Result<async_nats::Client, ChainError> {
    let mut options = async_nats::ConnectOptions::new()
        .name(name)
        .retry_on_initial_connect()
        .connection_timeout(Duration::from_secs(5))
        .ping_interval(Duration::from_secs(10))
        .max_reconnects(None)
        // Reconnect quickly at first, then every 2 s at most: a store's WAN coming back is
        // noticed within seconds.
        .reconnect_delay_callback(|attempts| Duration::from_millis((100 * attempts as u64).min(2_000)));
    options = match &backbone.auth {
        BackboneAuth::Anonymous => options,
        BackboneAuth::UserPassword { user, password } => {
            options.user_and_password(user.clone(), password.clone())
        }
        BackboneAuth::CredentialsFile(path) => options
            .credentials_file(path)
            .await
            .map_err(|err| ChainError::Connect(format!("{}: {err}", path.display())))?,
    };
    if let Some(ca) = &backbone.tls_ca {
        options = options.add_root_certificates(ca.clone()).require_tls(true);
    }
    options.connect(backbone.url.as_str()).await.map_err(|err| ChainError::Connect(err.to_string()))
}

/// Waits `delay`, or less if the node shuts down; false when it does.
async fn pause(node: &NodeShared, delay: Duration) -> bool {
    let mut shutdown = node.shutdown.subscribe();
    if *shutdown.borrow() {
        return false;
    }
    tokio::select! {
        _ = tokio::time::sleep(delay) => true,
        _ = shutdown.changed() => false,
    }
}

/// Runs `attempt` again and again until it returns `Ok` (it does at shutdown) or the node
/// shuts down during a back-off; each failure is logged (`what` says which task), kept as
/// the status's last error, and followed by a growing pause.
async fn retry_until_shutdown<Attempt, Running>(
    node: &NodeShared,
    status: &ChainStatus,
    what: &str,
    mut attempt: Attempt,
) where
    Attempt: FnMut() -> Running,
    Running: std::future::Future<Output = Result<(), ChainError>>,
{
    let mut failures = 0;
    loop {
        match attempt().await {
            Ok(()) => return,
            Err(err) => {
                tracing::warn!(%err, "{what} interrupted; starting again");
                status.update(|status| status.last_error = Some(err.to_string()));
                failures += 1;
                if !pause(node, backoff(failures)).await {
                    return;
                }
            }
        }
    }
}

/// Backoff after the `attempt`th failure in a row: 200 ms doubling to 5 s.
fn backoff(attempt: u32) -> Duration {
    Duration::from_millis((200u64 << attempt.min(5)).min(5_000))
}

/// Logs a message refused from the backbone as an error row of `p2p_sync_logs`.
async fn log_rejected(node: &NodeShared, peer_id: &str, peer_name: &str, reason: &str) {
    let (peer_id, peer_name, reason) = (peer_id.to_string(), peer_name.to_string(), reason.to_string());
    let logged = node
        .writer
        .call(crate::writer::Priority::Housekeeping, move |store| {
            store.log_rejected_message(&peer_id, Some(&peer_name), "chain", "message", &reason)
        })
        .await;
    if let Ok(Err(err)) = logged {
        tracing::warn!(%err, "could not log a refused backbone message");
    }
}
