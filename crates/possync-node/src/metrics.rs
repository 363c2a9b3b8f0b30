//! Prometheus metrics, one registry per node (several nodes share a process in the demo and
//! the tests, so nothing here is global). Every metric is listed in `docs/metrics.md`, under
//! the `possync_` prefix.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels: one peer, one direction.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerDirection {
    /// The peer's posId.
    pub peer: String,
    /// `sent` or `received`.
    pub direction: &'static str,
}

/// Label: a status or a kind.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    /// The value.
    pub status: String,
}

/// Labels of a conflict.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConflictLabels {
    /// update_conflict, field_merge, delete_conflict.
    pub conflict_type: String,
    /// The strategy that decided it.
    pub strategy: String,
}

/// Label: a writer queue.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Queue {
    /// local, sync, housekeeping, connection_events.
    pub queue: &'static str,
}

/// The chain backbone's metrics (docs/CHAIN.md), fed by [`crate::chain::ChainStatus`].
#[derive(Debug, Clone, Default)]
pub struct ChainMetrics {
    /// 1 while connected to the backbone.
    pub connected: Gauge,
    /// Changes held here and not yet on the backbone.
    pub backlog: Gauge,
    /// Backbone messages by outcome: published, received, rejected, wrong_sequence.
    pub messages: Family<StatusLabel, Counter>,
    /// Unix time (s) of the last acknowledged publish of changes (0: none yet in this run).
    pub last_published: Gauge,
    /// Unix time (s) of the last change applied from the backbone (0: none yet in this run).
    pub last_applied: Gauge,
    /// Changes by outcome: published, applied.
    pub changes: Family<StatusLabel, Counter>,
}

/// Every metric of one node.
pub struct Metrics {
    /// The registry they are in.
    pub registry: Registry,
    /// Peers with an established connection.
    pub peers_connected: Gauge,
    /// Frames per peer and direction (pings included).
    pub frames: Family<PeerDirection, Counter>,
    /// Frame payload bytes per peer and direction.
    pub bytes: Family<PeerDirection, Counter>,
    /// Incoming changes by outcome (success, conflict, skipped, error).
    pub changes_applied: Family<StatusLabel, Counter>,
    /// Local writes (changes originated here).
    pub local_changes: Counter,
    /// Conflicts by type and strategy.
    pub conflicts: Family<ConflictLabels, Counter>,
    /// Catch-up durations (seconds).
    pub catch_up_seconds: Histogram,
    /// Age of a live change when applied here (seconds; clock skew between terminals shows up here).
    pub propagation_lag_seconds: Histogram,
    /// Size of the database file with its WAL (bytes).
    pub database_bytes: Gauge,
    /// Jobs or events waiting per queue.
    pub queue_depth: Family<Queue, Gauge>,
    /// Connection events dropped because their queue was full (sync data is never dropped).
    pub connection_events_dropped: Counter,
    /// Connection events by type.
    pub connection_events: Family<StatusLabel, Counter>,
    /// Protocol violations by peers.
    pub protocol_violations: Counter,
    /// The chain backbone.
    pub chain: ChainMetrics,
    /// HTTP API connections being served.
    pub api_connections: Gauge,
    /// Incoming catch-ups that stopped progressing while connected.
    pub sync_stalls: Counter,
    /// Changes each connected peer holds that this node has not taken yet.
    pub changes_behind: Family<PeerLabel, Gauge>,
    /// Remote changes stamped further ahead of this terminal's clock than it follows.
    pub remote_clock_ahead: Counter,
    /// Remote changes held back: stamped further ahead of this clock than `p2p_max_clock_ahead`.
    pub changes_held_back: Counter,
    /// Live changes each peer pushed faster than `p2p_peer_max_changes_per_second`.
    pub changes_throttled: Family<PeerLabel, Counter>,
    /// Signs that another terminal uses this one's identity (a clone, a restored backup).
    pub identity_clashes: Counter,
    /// Changes refused because another change with the same (origin, seq) is held.
    pub forks: Counter,
    /// Changes refused because their origin did not sign them, or is revoked.
    pub changes_forged: Counter,
    /// Connections that never authenticated, by reason (wrong shop secret, not a possync
    /// peer, handshake timeout, over the handshake budget...).
    pub connections_rejected: Family<Reason, Counter>,
}

/// Label: a peer.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabel {
    /// Its posId.
    pub peer: String,
}

/// Label: why a connection was rejected.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    /// A short fixed label.
    pub reason: &'static str,
}

impl Metrics {
    /// A fresh registry with every metric registered.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("possync");
        let metrics = Metrics {
            registry: Registry::default(),
            peers_connected: Gauge::default(),
            frames: Family::default(),
            bytes: Family::default(),
            changes_applied: Family::default(),
            local_changes: Counter::default(),
            conflicts: Family::default(),
            catch_up_seconds: Histogram::new(exponential_buckets(0.001, 4.0, 10)),
            propagation_lag_seconds: Histogram::new(exponential_buckets(0.0005, 4.0, 10)),
            database_bytes: Gauge::default(),
            queue_depth: Family::default(),
            connection_events_dropped: Counter::default(),
            connection_events: Family::default(),
            protocol_violations: Counter::default(),
            chain: ChainMetrics::default(),
            api_connections: Gauge::default(),
            sync_stalls: Counter::default(),
            changes_behind: Family::default(),
            remote_clock_ahead: Counter::default(),
            changes_held_back: Counter::default(),
            changes_throttled: Family::default(),
            identity_clashes: Counter::default(),
            forks: Counter::default(),
            changes_forged: Counter::default(),
            connections_rejected: Family::default(),
        };
        registry.register(
            "peers_connected",
            "Peers with an established connection",
            metrics.peers_connected.clone(),
        );
        registry.register(
            "frames",
            "Frames exchanged, per peer and direction (pings included)",
            metrics.frames.clone(),
        );
        registry.register("bytes", "Frame payload bytes, per peer and direction", metrics.bytes.clone());
        registry.register("changes_applied", "Incoming changes by outcome", metrics.changes_applied.clone());
        registry.register("local_changes", "Changes written on this terminal", metrics.local_changes.clone());
        registry.register("conflicts", "Conflicts by type and strategy", metrics.conflicts.clone());
        registry.register(
            "catch_up_duration_seconds",
            "Duration of completed catch-ups",
            metrics.catch_up_seconds.clone(),
        );
        registry.register(
            "propagation_lag_seconds",
            "Age of a live change when applied (origin clock to local clock)",
            metrics.propagation_lag_seconds.clone(),
        );
        registry.register(
            "database_bytes",
            "Database file size including its WAL",
            metrics.database_bytes.clone(),
        );
        registry.register("queue_depth", "Items waiting per internal queue", metrics.queue_depth.clone());
        registry.register(
            "connection_events_dropped",
            "Connection events dropped because their queue was full",
            metrics.connection_events_dropped.clone(),
        );
        registry.register(
            "connection_events",
            "Connection events by type",
            metrics.connection_events.clone(),
        );
        registry.register(
            "protocol_violations",
            "Frames refused as protocol violations",
            metrics.protocol_violations.clone(),
        );
        registry.register(
            "peer_changes_behind",
            "Changes a connected peer holds that this node has not taken yet (catch-up still to do), measured every 5 s",
            metrics.changes_behind.clone(),
        );
        registry.register(
            "chain_connected",
            "1 while connected to the chain backbone",
            metrics.chain.connected.clone(),
        );
        registry.register(
            "chain_backlog_changes",
            "Changes held here and not yet on the chain backbone",
            metrics.chain.backlog.clone(),
        );
        registry.register(
            "chain_messages",
            "Chain backbone messages by outcome",
            metrics.chain.messages.clone(),
        );
        registry.register(
            "chain_changes",
            "Chain backbone changes by outcome",
            metrics.chain.changes.clone(),
        );
        registry.register(
            "chain_last_published_timestamp_seconds",
            "Unix time of the last changes published to the backbone and acknowledged (0: none yet in this run)",
            metrics.chain.last_published.clone(),
        );
        registry.register(
            "chain_last_applied_timestamp_seconds",
            "Unix time of the last change applied from the backbone (0: none yet in this run)",
            metrics.chain.last_applied.clone(),
        );
        registry.register(
            "api_connections",
            "HTTP API connections being served",
            metrics.api_connections.clone(),
        );
        registry.register(
            "sync_stalls",
            "Incoming catch-ups that stopped progressing while the link stayed up (a change the node cannot take blocks its origin's later ones)",
            metrics.sync_stalls.clone(),
        );
        registry.register(
            "remote_clock_ahead",
            "Remote changes stamped more than an hour ahead of this terminal's clock (a till with a wrong clock, or a forged stamp)",
            metrics.remote_clock_ahead.clone(),
        );
        registry.register(
            "changes_held_back",
            "Remote changes held back because they are stamped further ahead of this terminal's clock than p2p_max_clock_ahead (retried when the clock catches up)",
            metrics.changes_held_back.clone(),
        );
        registry.register(
            "changes_throttled",
            "Live changes a peer pushed faster than p2p_peer_max_changes_per_second: applied late, its frames read no faster than the limit",
            metrics.changes_throttled.clone(),
        );
        registry.register(
            "identity_clashes",
            "Signs that another terminal uses this one's posId: a clone met, or a peer holding more of this terminal's own changes than it does",
            metrics.identity_clashes.clone(),
        );
        registry.register(
            "forks",
            "Changes refused because a different change with the same origin and sequence number is held (forged, or a cloned or restored till)",
            metrics.forks.clone(),
        );
        registry.register(
            "changes_forged",
            "Changes refused because their origin's key did not sign them (written in another till's name, or this till's), or because their origin is revoked",
            metrics.changes_forged.clone(),
        );
        registry.register(
            "connections_rejected",
            "Connections that never authenticated (never a peer), by reason",
            metrics.connections_rejected.clone(),
        );
        Metrics { registry, ..metrics }
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}
