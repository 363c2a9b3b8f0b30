//! The state every task of a node shares ([`NodeShared`]), and the narrow handle each
//! long-running task is given instead of all of it.
//!
//! Its own module so that the tasks (connections, dialers, discovery, the chain drivers, the
//! API) depend on it and not on `node.rs`, which starts them: the dependencies point one way.
//!
//! The node holds the whole [`NodeShared`]; a task gets a handle built from it
//! ([`NodeShared::connection_handle`], [`NodeShared::listener_handle`],
//! [`NodeShared::dialer_handle`], [`NodeShared::discovery_handle`],
//! [`NodeShared::upkeep_handle`], [`NodeShared::chain_handle`]) that holds only what the task
//! touches, so that its signature tells what it can reach: a connection cannot write settings
//! or shut the node down, a dialer reaches the writer only through the connections it runs,
//! the upkeep and the chain drivers never see the peer table. Every field of a handle is a
//! cheap clone (an `Arc`, a channel end, a small copy of configuration made once per task).
//!
//! The API is the exception: between them its handlers use nearly every part of the node
//! (writer, readers, peers, metrics, settings, reconnect, chain status, configuration), so
//! [`crate::api::ApiState`] keeps the whole `Arc<NodeShared>`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use possync_core::{PosId, VersionVector};
use possync_store::{
    ConnectionEvent, ConnectionEventKind, KeyDirectory, NodeIdentity, Selection, Settings, StoreError,
    StoreReader,
};
use tokio::sync::{Notify, mpsc, watch};

use crate::clock::now_ms;
use crate::config::NodeConfig;
use crate::metrics::Metrics;
use crate::peers::{ConnectionCommand, PeerTable};
use crate::transport::ChannelConfig;
use crate::writer::{Priority, WriterHandle};

/// Read-only connections shared by the API and the catch-up selection.
pub struct ReaderPool {
    /// The database file.
    path: std::path::PathBuf,
    /// Idle readers.
    idle: Mutex<Vec<StoreReader>>,
    /// Queries running at once. Without a bound, 200 peers connecting together would start
    /// 200 blocking threads for their catch-up selections (each leaving memory behind).
    running: tokio::sync::Semaphore,
}

/// Reader queries running at once.
const MAX_CONCURRENT_QUERIES: usize = 4;

impl ReaderPool {
    /// A pool over the database at `path`.
    pub fn new(path: std::path::PathBuf) -> ReaderPool {
        ReaderPool {
            path,
            idle: Mutex::new(Vec::new()),
            running: tokio::sync::Semaphore::new(MAX_CONCURRENT_QUERIES),
        }
    }

    /// Runs `query` on a reader, off the async threads.
    pub async fn with<T, F>(self: &Arc<Self>, query: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&StoreReader) -> Result<T, StoreError> + Send + 'static,
    {
        let _running = self
            .running
            .acquire()
            .await
            .map_err(|_| StoreError::InvalidState("the reader pool is closed".into()))?;
        let pool = Arc::clone(self);
        let joined = tokio::task::spawn_blocking(move || {
            let reader = pool.take()?;
            let result = query(&reader);
            pool.give_back(reader);
            result
        })
        .await;
        joined.unwrap_or_else(|err| Err(StoreError::InvalidState(format!("reader task failed: {err}"))))
    }

    fn take(&self) -> Result<StoreReader, StoreError> {
        let idle = self.idle.lock().unwrap_or_else(std::sync::PoisonError::into_inner).pop();
        match idle {
            Some(reader) => Ok(reader),
            None => StoreReader::open(&self.path),
        }
    }

    fn give_back(&self, reader: StoreReader) {
        let mut idle = self.idle.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if idle.len() < 8 {
            idle.push(reader);
        }
    }
}

/// What the node holds: everything its tasks share. The long-running tasks get a narrow
/// handle built from it (see the [module doc](self)); the API takes it whole.
pub struct NodeShared {
    /// This terminal.
    pub identity: NodeIdentity,
    /// The runtime configuration.
    pub config: NodeConfig,
    /// The single writer.
    pub writer: WriterHandle,
    /// Readers for queries.
    pub readers: Arc<ReaderPool>,
    /// Known peers and their live counters.
    pub peers: Arc<PeerTable>,
    /// Prometheus metrics.
    pub metrics: Arc<Metrics>,
    /// The secure channel's settings.
    pub channel: ChannelConfig,
    /// Settings, as last read from the database.
    settings: watch::Sender<Settings>,
    /// Shutdown signal (true once shutting down).
    pub shutdown: watch::Sender<bool>,
    /// Wakes the dialers for a manual reconnect (attempts start over).
    pub reconnect: Arc<Notify>,
    /// Connection events on their way to the database.
    events: EventLog,
    /// True while the peer listener runs.
    listening: watch::Sender<bool>,
    /// A random id of this run of the node, sent in handshakes: another node with this
    /// terminal's posId (a clone) has another one.
    pub instance: String,
    /// The chain driver's state (idle when the node is in no chain).
    pub chain: Arc<crate::chain::status::ChainStatus>,
    /// The enrolled keys: connection tasks check a batch's signatures with them before the
    /// batch reaches the writer (which has more to do and only one thread to do it on).
    pub keys: KeyDirectory,
}

impl NodeShared {
    /// The shared state of a node starting with `store`'s `identity`, `settings` and `keys`,
    /// and the receiving end of its connection-event queue (for the task that logs them).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        identity: NodeIdentity,
        config: NodeConfig,
        writer: WriterHandle,
        readers: Arc<ReaderPool>,
        settings: Settings,
        channel: ChannelConfig,
        keys: KeyDirectory,
        event_queue: usize,
    ) -> (NodeShared, mpsc::Receiver<ConnectionEvent>) {
        let (events, events_rx) = mpsc::channel(event_queue);
        let metrics = Arc::new(Metrics::new());
        let chain = Arc::new(crate::chain::status::ChainStatus::new(metrics.chain.clone()));
        let shared = NodeShared {
            identity,
            config,
            writer,
            readers,
            peers: Arc::default(),
            events: EventLog { queue: events, metrics: Arc::clone(&metrics) },
            metrics,
            channel,
            settings: watch::Sender::new(settings),
            shutdown: watch::Sender::new(false),
            reconnect: Arc::default(),
            listening: watch::Sender::new(false),
            instance: format!("{:016x}", rand::random::<u64>()),
            chain,
            keys,
        };
        (shared, events_rx)
    }

    /// The current settings.
    pub fn settings(&self) -> Settings {
        self.settings.borrow().clone()
    }

    /// Watches the settings.
    pub fn watch_settings(&self) -> watch::Receiver<Settings> {
        self.settings.subscribe()
    }

    /// True while the peer listener runs.
    pub fn is_listening(&self) -> bool {
        *self.listening.borrow()
    }

    /// The node's version vector (what it holds).
    pub async fn summary(&self) -> Option<VersionVector> {
        summary(&self.writer).await
    }

    /// Selects a catch-up batch for a peer, from what is durable only (the writer tells a
    /// commit once its fsync is done, see [`crate::writer`]).
    pub async fn select_changes(
        &self,
        since: VersionVector,
        after: u64,
        limit: usize,
    ) -> Result<Selection, StoreError> {
        select_durable_changes(&self.writer, &self.readers, since, after, limit).await
    }

    /// Queues a connection event for the database (never blocks the caller).
    pub fn record_event(&self, event: ConnectionEvent) {
        self.events.record(event);
    }

    /// Records a connection that never authenticated (see [`EventLog::record_rejected`]).
    pub fn record_rejected(&self, source: String, label: &'static str, detail: &str) {
        self.events.record_rejected(source, label, detail);
    }

    /// Changes a setting (validated, stored) and applies it at once.
    pub async fn set_setting(&self, key: String, value: String) -> Result<Settings, StoreError> {
        let updated = self
            .writer
            .call(Priority::Local, move |store| store.set_setting(&key, &value))
            .await
            .map_err(|_| StoreError::InvalidState("node stopping".into()))??;
        self.settings.send_replace(updated.clone());
        Ok(updated)
    }

    /// Asks every connected peer for a full catch-up.
    pub fn sync_now(&self) {
        self.peers.broadcast(&ConnectionCommand::SyncNow);
    }

    /// What a peer connection touches ([`crate::connection::run`]).
    pub fn connection_handle(&self) -> ConnectionHandle {
        ConnectionHandle {
            pos_id: self.identity.pos_id.clone(),
            pos_name: self.identity.pos_name.clone(),
            instance: self.instance.clone(),
            writer: self.writer.clone(),
            readers: Arc::clone(&self.readers),
            keys: self.keys.clone(),
            peers: Arc::clone(&self.peers),
            metrics: Arc::clone(&self.metrics),
            events: self.events.clone(),
            settings: self.settings_watch(),
            shutdown: self.shutdown_signal(),
        }
    }

    /// What the peer listener touches ([`crate::listener::listen`]).
    pub fn listener_handle(&self) -> ListenerHandle {
        ListenerHandle {
            connections: Arc::new(self.connection_handle()),
            channel: self.channel.clone(),
            max_connections: self.config.max_connections,
            peers: Arc::clone(&self.peers),
            metrics: Arc::clone(&self.metrics),
            events: self.events.clone(),
            settings: self.settings_watch(),
            shutdown: self.shutdown_signal(),
            listening: self.listening.clone(),
        }
    }

    /// What a dialer touches ([`crate::dialer::dial_forever`]); clone it for each target.
    pub fn dialer_handle(&self) -> DialerHandle {
        DialerHandle {
            connections: Arc::new(self.connection_handle()),
            channel: self.channel.clone(),
            backoff_base: Duration::from_millis(self.config.backoff_base_ms),
            peers: Arc::clone(&self.peers),
            events: self.events.clone(),
            settings: self.settings_watch(),
            reconnect: Arc::clone(&self.reconnect),
            shutdown: self.shutdown_signal(),
        }
    }

    /// What mDNS discovery touches ([`crate::discovery::run`]).
    pub fn discovery_handle(&self) -> DiscoveryHandle {
        DiscoveryHandle {
            pos_id: self.identity.pos_id.clone(),
            dialers: self.dialer_handle(),
            reconnect: Arc::clone(&self.reconnect),
            shutdown: self.shutdown_signal(),
        }
    }

    /// What the background upkeep touches ([`crate::upkeep`]); clone it for each of its tasks.
    pub fn upkeep_handle(&self) -> UpkeepHandle {
        UpkeepHandle {
            writer: self.writer.clone(),
            db_path: self.config.db_path(),
            metrics: Arc::clone(&self.metrics),
            settings: self.settings_watch(),
            shutdown: self.shutdown_signal(),
        }
    }

    /// What the chain drivers touch ([`crate::chain`]); clone it for each of their tasks.
    pub fn chain_handle(&self) -> ChainHandle {
        ChainHandle {
            pos_id: self.identity.pos_id.clone(),
            writer: self.writer.clone(),
            readers: Arc::clone(&self.readers),
            keys: self.keys.clone(),
            status: Arc::clone(&self.chain),
            shutdown: self.shutdown_signal(),
        }
    }

    fn settings_watch(&self) -> SettingsWatch {
        SettingsWatch(self.settings.clone())
    }

    fn shutdown_signal(&self) -> ShutdownSignal {
        ShutdownSignal(self.shutdown.clone())
    }
}

/// The node's version vector, read on the writer (the session compares it with the peer's).
async fn summary(writer: &WriterHandle) -> Option<VersionVector> {
    writer.call(Priority::Sync, |store| store.summary().clone()).await.ok()
}

/// A catch-up batch from what is durable only (the writer tells a commit once its fsync is
/// done, see [`crate::writer`]), read on the reader pool.
async fn select_durable_changes(
    writer: &WriterHandle,
    readers: &Arc<ReaderPool>,
    since: VersionVector,
    after: u64,
    limit: usize,
) -> Result<Selection, StoreError> {
    let durable = writer.durable_position();
    readers.with(move |reader| reader.select_changes_up_to(&since, after, limit, durable)).await
}

/// The shutdown signal as a task sees it: it can wait for it, not send it.
///
/// It holds a clone of the sender, not a receiver, for two reasons: a task that held the
/// whole node kept the channel open for as long as it ran (a receiver whose sender is gone
/// sees `changed()` fail at once, which every task would take for shutdown), and
/// [`ShutdownSignal::subscribe`] marks the current value as seen, as subscribing to the
/// node's sender did.
#[derive(Clone)]
pub struct ShutdownSignal(watch::Sender<bool>);

impl ShutdownSignal {
    /// A receiver that wakes when the node starts shutting down.
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.0.subscribe()
    }

    /// True once the node is shutting down.
    pub fn is_set(&self) -> bool {
        *self.0.borrow()
    }
}

/// The settings as a task sees them: it can read and watch them, not change them (only the
/// API does, through [`NodeShared::set_setting`]). A sender clone, for the reason given on
/// [`ShutdownSignal`].
#[derive(Clone)]
pub struct SettingsWatch(watch::Sender<Settings>);

impl SettingsWatch {
    /// The current settings.
    pub fn current(&self) -> Settings {
        self.0.borrow().clone()
    }

    /// A receiver that wakes when a setting changes.
    pub fn subscribe(&self) -> watch::Receiver<Settings> {
        self.0.subscribe()
    }
}

/// Where connection events go on their way to the database (the upkeep's event logger
/// writes them), counted in the metrics.
#[derive(Clone)]
pub struct EventLog {
    /// The bounded queue to the event logger.
    queue: mpsc::Sender<ConnectionEvent>,
    /// For the counts of events, dropped events and rejected connections.
    metrics: Arc<Metrics>,
}

impl EventLog {
    /// Queues a connection event for the database (never blocks the caller).
    pub fn record(&self, event: ConnectionEvent) {
        self.metrics
            .connection_events
            .get_or_create(&crate::metrics::StatusLabel { status: event.kind.as_str().into() })
            .inc();
        if self.queue.try_send(event).is_err() {
            self.metrics.connection_events_dropped.inc();
        }
    }

    /// Records a connection that never authenticated: never a peer, only a rejected
    /// connection (a `sync_failed` row with a NULL peer name, as the seed asks, and the
    /// `connections_rejected` metric). `source` is the remote IP of an inbound connection
    /// (its port is ephemeral) or the `host:port` this node dialled.
    pub fn record_rejected(&self, source: String, label: &'static str, detail: &str) {
        self.metrics.connections_rejected.get_or_create(&crate::metrics::Reason { reason: label }).inc();
        self.record(ConnectionEvent {
            peer_id: source,
            peer_name: None,
            kind: ConnectionEventKind::SyncFailed,
            messages_sent: 0,
            messages_received: 0,
            bytes_sent: 0,
            bytes_received: 0,
            sync_duration_ms: None,
            error_message: Some(format!("{label}: {detail}")),
            at_ms: now_ms(),
        });
    }
}

/// What one peer connection touches ([`crate::connection::run`]): the writer (applies, its
/// change feed, the summary), the readers (catch-up selection, diverged heads), the enrolled
/// keys (signatures are checked on the connection's task), the peer table (registration,
/// counters, commands), the metrics, the event log, and the settings and shutdown it
/// watches. Built once per listener or dialer and shared by its connections behind an `Arc`
/// (each connection's task holds one pointer, not a copy).
pub struct ConnectionHandle {
    /// This terminal's posId (the handshake, the peer table's tie-break).
    pub pos_id: PosId,
    /// This terminal's name (the handshake).
    pub pos_name: String,
    /// This run of the node (the handshake; see [`NodeShared::instance`]).
    pub instance: String,
    /// Applies the peer's changes; publishes this node's changes to the connection.
    pub writer: WriterHandle,
    /// Catch-up selections and the comparison of heads.
    pub readers: Arc<ReaderPool>,
    /// The enrolled keys, to check a batch's signatures before it reaches the writer.
    pub keys: KeyDirectory,
    /// Registration, live counters, the mailbox of commands, the tie-break.
    pub peers: Arc<PeerTable>,
    /// Frames, bytes, applies, conflicts, violations...
    pub metrics: Arc<Metrics>,
    /// The `connected` / `disconnected` / `sync_failed` rows.
    pub events: EventLog,
    /// The live settings (heartbeat, P2P on or off, throttling).
    pub settings: SettingsWatch,
    /// Closes the connection when the node stops.
    pub shutdown: ShutdownSignal,
}

impl ConnectionHandle {
    /// The node's version vector (what it holds).
    pub async fn summary(&self) -> Option<VersionVector> {
        summary(&self.writer).await
    }

    /// Selects a catch-up batch for the peer, from what is durable only.
    pub async fn select_changes(
        &self,
        since: VersionVector,
        after: u64,
        limit: usize,
    ) -> Result<Selection, StoreError> {
        select_durable_changes(&self.writer, &self.readers, since, after, limit).await
    }
}

/// What the peer listener touches ([`crate::listener::listen`]): the connections it runs get
/// [`ListenerHandle::connections`]; itself it only admits and refuses, so besides the
/// settings and shutdown it watches it needs the channel's settings, the connection cap, the
/// peer table (to close every peer when P2P is turned off) and the means to count and log a
/// refusal. It alone says whether the peer port serves.
pub struct ListenerHandle {
    /// Handed to each connection it accepts.
    pub connections: Arc<ConnectionHandle>,
    /// The secure channel's settings (the listener shortens the handshake deadline).
    pub channel: ChannelConfig,
    /// Most authenticated peers at once (`max_connections`).
    pub max_connections: usize,
    /// Closes every connection when P2P is turned off.
    pub peers: Arc<PeerTable>,
    /// Counts connections refused before they authenticate.
    pub metrics: Arc<Metrics>,
    /// Logs a connection that failed the secure channel.
    pub events: EventLog,
    /// P2P on or off.
    pub settings: SettingsWatch,
    /// Stops accepting when the node stops.
    pub shutdown: ShutdownSignal,
    /// Whether the peer port serves, read by the API ([`NodeShared::is_listening`]).
    listening: watch::Sender<bool>,
}

impl ListenerHandle {
    /// Tells whether the peer listener serves.
    pub fn set_listening(&self, listening: bool) {
        self.listening.send_replace(listening);
    }
}

/// What a dialer touches ([`crate::dialer::dial_forever`]): it connects, runs the connection
/// with [`DialerHandle::connections`], and between attempts keeps its dial state in the
/// peer table and waits for a backoff, a manual reconnect, P2P turned on, or shutdown.
#[derive(Clone)]
pub struct DialerHandle {
    /// Handed to each connection it establishes.
    pub connections: Arc<ConnectionHandle>,
    /// The secure channel's settings.
    pub channel: ChannelConfig,
    /// The first pause between redials (`backoff_base_ms`).
    pub backoff_base: Duration,
    /// The dial states and attempts shown by the API; waits for a duplicate's connection to
    /// end.
    pub peers: Arc<PeerTable>,
    /// Logs a secure channel the peer refused.
    pub events: EventLog,
    /// P2P on or off, and the most attempts before giving up.
    pub settings: SettingsWatch,
    /// A manual reconnect or a rediscovery: attempts start over.
    pub reconnect: Arc<Notify>,
    /// Stops dialling when the node stops.
    pub shutdown: ShutdownSignal,
}

/// What mDNS discovery touches ([`crate::discovery::run`]): it announces this terminal,
/// starts a dialer ([`DiscoveryHandle::dialers`]) for each terminal it finds, and wakes the
/// dialers when one is seen again.
pub struct DiscoveryHandle {
    /// This terminal's posId, announced, and skipped when it is seen.
    pub pos_id: PosId,
    /// Cloned for each dialer it starts.
    pub dialers: DialerHandle,
    /// A terminal seen again: a dialer that gave up starts over.
    pub reconnect: Arc<Notify>,
    /// Stops browsing when the node stops.
    pub shutdown: ShutdownSignal,
}

/// What the background upkeep touches ([`crate::upkeep`]: the event logger, the WAL
/// checkpoints, the periodic metrics and log retention): the writer's housekeeping queue, the
/// database file, the metrics it refreshes, and the settings (log retention) and shutdown it
/// watches.
#[derive(Clone)]
pub struct UpkeepHandle {
    /// Event rows and log retention, at housekeeping priority; its queue depths.
    pub writer: WriterHandle,
    /// The database file (the checkpoint connection, its size for the metrics).
    pub db_path: std::path::PathBuf,
    /// Queue depths and the database's size.
    pub metrics: Arc<Metrics>,
    /// `log_retention_days`.
    pub settings: SettingsWatch,
    /// Stops the upkeep (the event logger drains its queue first).
    pub shutdown: ShutdownSignal,
}

/// What the chain drivers touch ([`crate::chain`]: a store's uplink, the head office): the
/// writer (applies from the backbone, cursors, refused messages), the readers (what to
/// upload, own origins, reports), the enrolled keys (signatures are checked before the
/// writer), the chain status they report to, and shutdown.
#[derive(Clone)]
pub struct ChainHandle {
    /// This terminal's posId (the client's name, the status subject, own origins).
    pub pos_id: PosId,
    /// Applies what the backbone brings; its change feed wakes the publisher.
    pub writer: WriterHandle,
    /// Selections to upload, origins, conflict summaries.
    pub readers: Arc<ReaderPool>,
    /// The enrolled keys, to check a batch's signatures before it reaches the writer.
    pub keys: KeyDirectory,
    /// What the drivers report (`GET /api/chain/status`, the chain metrics).
    pub status: Arc<crate::chain::status::ChainStatus>,
    /// Stops the drivers when the node stops.
    pub shutdown: ShutdownSignal,
}

impl ChainHandle {
    /// The node's version vector (what it holds).
    pub async fn summary(&self) -> Option<VersionVector> {
        summary(&self.writer).await
    }
}
