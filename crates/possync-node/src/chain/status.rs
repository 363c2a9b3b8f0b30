//! What the chain driver reports (`GET /api/chain/status`, the metrics, the tests), kept
//! apart from the drivers so that the node's shared state can hold it without depending on
//! them.

use std::sync::Mutex;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use serde_json::{Value, json};

use crate::metrics::{ChainMetrics, StatusLabel};

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
pub(super) struct StatusInner {
    pub(super) connected: bool,
    pub(super) published_messages: u64,
    pub(super) published_changes: u64,
    pub(super) wrong_sequence: u64,
    pub(super) received_messages: u64,
    pub(super) applied_changes: u64,
    pub(super) rejected_messages: u64,
    pub(super) backlog: u64,
    /// The clock time of the oldest change of the backlog (Unix ms), when known.
    pub(super) oldest_pending_ms: Option<u64>,
    pub(super) last_error: Option<String>,
    /// When changes were last published and acknowledged (Unix ms).
    pub(super) last_published_ms: Option<u64>,
    /// When a change from the backbone was last applied (Unix ms).
    pub(super) last_applied_ms: Option<u64>,
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

    pub(super) fn update(&self, change: impl FnOnce(&mut StatusInner)) {
        let mut inner = self.lock();
        let before = inner.clone();
        change(&mut inner);
        let now = crate::clock::now_ms();
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

    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, StatusInner> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
