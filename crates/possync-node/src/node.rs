//! The node: starts and stops everything a terminal runs (writer, peer listener, dialers,
//! discovery, event logger, retention job, API). What they share is [`crate::shared`].
//!
//! Lifecycle (as in mini-redis): one shutdown signal (`watch`) every task listens to, and a
//! completion count: [`Node::shutdown`] signals, then waits for every connection task to log
//! its `disconnected` row and for the event queue to be flushed to the database.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use possync_core::PosId;
use possync_core::protocol::Role;
use possync_store::{ConnectionEvent, Store, StoreError, SystemEnvironment};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tracing::{info, warn};

use crate::admission::{ACCEPT_HANDSHAKE_TIMEOUT, Admission};
use crate::config::NodeConfig;
use crate::connection;
use crate::dialer;
use crate::link::Ended;
use crate::metrics::{Queue, Reason};
use crate::peers::ConnectionCommand;
use crate::shared::ReaderPool;
use crate::shared::{NodeShared, now_ms};
use crate::transport::{self, ChannelConfig};
use crate::writer::{Priority, WriterHandle};

/// Capacity of the connection-event queue (events beyond it are counted and dropped; they
/// never share a queue with sync data).
const EVENT_QUEUE: usize = 4096;

/// A running node.
pub struct Node {
    /// The shared state (for the API and for tests).
    pub shared: Arc<NodeShared>,
    /// Address the peer listener is bound to.
    pub peer_addr: Option<SocketAddr>,
    /// Address the API is bound to.
    pub api_addr: Option<SocketAddr>,
    /// Background tasks.
    tasks: JoinSet<()>,
    /// Tasks that must finish before the database closes (connections, event logger).
    completion: Arc<Semaphore>,
}

/// Most connection tasks alive at once per node (also the accept cap).
const COMPLETION_PERMITS: u32 = 4096;

/// Why the node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The database could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A port could not be bound.
    #[error("cannot listen on {address}")]
    Bind {
        /// The address.
        address: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
}

impl Node {
    /// Opens the database and starts every task.
    pub async fn start(config: NodeConfig) -> Result<Node, StartError> {
        let store = Store::open(&config.db_path(), Box::new(SystemEnvironment::default()))?;
        Node::start_with_store(config, store).await
    }

    /// Starts a node on an already opened store.
    pub async fn start_with_store(config: NodeConfig, mut store: Store) -> Result<Node, StartError> {
        if let Some(crate::config::ChainRole::Uplink(uplink)) = &config.chain {
            store.set_chain_store(Some(uplink.store.to_string()));
        }
        let identity = store.identity().clone();
        let settings = store.settings().clone();
        let readers = Arc::new(ReaderPool::new(store.path().to_path_buf()));
        let keys = store.key_directory();
        let writer = WriterHandle::start(store);
        let mut channel = ChannelConfig::from_secret(&config.secret);
        channel.max_frame_bytes = config.max_frame_bytes;
        let (shared, events_rx) =
            NodeShared::new(identity, config.clone(), writer, readers, settings, channel, keys, EVENT_QUEUE);
        let shared = Arc::new(shared);
        let completion = Arc::new(Semaphore::new(COMPLETION_PERMITS as usize));
        let mut tasks = JoinSet::new();

        // The peer listener: bound now so the caller learns the port; it serves while
        // `p2p_enabled` is true.
        let listener = TcpListener::bind(config.peer_listen)
            .await
            .map_err(|source| StartError::Bind { address: config.peer_listen, source })?;
        let peer_addr = listener.local_addr().ok();
        tasks.spawn(listen(Arc::clone(&shared), listener, Arc::clone(&completion)));

        let logger_permit = Arc::clone(&completion).acquire_owned().await.ok();
        tasks.spawn(log_events(Arc::clone(&shared), events_rx, logger_permit));
        tasks.spawn(housekeeping(Arc::clone(&shared)));
        tasks.spawn(checkpoints(Arc::clone(&shared)));
        for target in &config.static_peers {
            tasks.spawn(dialer::dial_forever(Arc::clone(&shared), target.clone(), Arc::clone(&completion)));
        }
        crate::chain::spawn(&shared, &mut tasks);
        if config.discovery {
            tasks.spawn(crate::discovery::run(Arc::clone(&shared), peer_addr, Arc::clone(&completion)));
        }
        let api_addr = match config.api_listen {
            Some(address) => {
                let listener = TcpListener::bind(address)
                    .await
                    .map_err(|source| StartError::Bind { address, source })?;
                let bound = listener.local_addr().ok();
                tasks.spawn(crate::api::serve(Arc::clone(&shared), listener));
                bound
            }
            None => None,
        };
        info!(pos_id = %shared.identity.pos_id, ?peer_addr, ?api_addr, "node started");
        Ok(Node { shared, peer_addr, api_addr, tasks, completion })
    }

    /// Stops the node: closes every connection (each logs `disconnected` with its final
    /// counters), flushes the connection events, stops the writer.
    pub async fn shutdown(mut self) {
        self.shared.shutdown.send_replace(true);
        // Every connection task and the event logger hold a permit until they finish.
        let waited =
            tokio::time::timeout(Duration::from_secs(10), self.completion.acquire_many(COMPLETION_PERMITS))
                .await;
        if waited.is_err() {
            warn!("some connections did not close within 10 s");
        }
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
        info!(pos_id = %self.shared.identity.pos_id, "node stopped");
    }

    /// This terminal's posId.
    pub fn pos_id(&self) -> &PosId {
        &self.shared.identity.pos_id
    }
}

/// Accepts peers while P2P is enabled: at most `max_connections` authenticated peers, and
/// connections still proving the secret within their own budget ([`crate::admission`]).
async fn listen(node: Arc<NodeShared>, listener: TcpListener, completion: Arc<Semaphore>) {
    let admission = Arc::new(Admission::new(node.config.max_connections));
    let accept_channel =
        ChannelConfig { handshake_timeout: ACCEPT_HANDSHAKE_TIMEOUT, ..node.channel.clone() };
    let mut settings = node.watch_settings();
    let mut shutdown = node.shutdown.subscribe();
    loop {
        let enabled = settings.borrow_and_update().enabled;
        node.set_listening(enabled);
        if !enabled {
            node.peers.broadcast(&ConnectionCommand::Close("P2P disabled".into()));
            // Keep the port (rebinding later could fail) but turn peers away at once: left
            // in the backlog, a dialer would wait for its handshake timeout on every attempt.
            tokio::select! {
                _ = settings.changed() => continue,
                _ = shutdown.changed() => return,
                accepted = listener.accept() => {
                    if let Ok((stream, address)) = accepted {
                        tracing::debug!(%address, "P2P disabled: refusing a peer");
                        drop(stream);
                    }
                    continue;
                }
            }
        }
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, address) = match accepted {
                    Ok(accepted) => accepted,
                    Err(err) => {
                        warn!(%err, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let seat = match admission.begin_handshake(address.ip()) {
                    Ok(seat) => seat,
                    Err(refusal) => {
                        // Counted, not logged row by row: a flood would flood the database.
                        tracing::debug!(%address, reason = refusal.label(), "refusing a connection");
                        node.metrics.connections_rejected.get_or_create(&Reason { reason: refusal.label() }).inc();
                        continue;
                    }
                };
                let Ok(permit) = Arc::clone(&completion).try_acquire_owned() else { continue };
                let node = Arc::clone(&node);
                let accept_channel = accept_channel.clone();
                let admission = Arc::clone(&admission);
                tokio::spawn(async move {
                    let _permit = permit;
                    let _ = stream.set_nodelay(true);
                    // Bound by value so that the `Result` is not kept in this task's
                    // future for the connection's whole life.
                    let channel = match transport::accept(stream, &accept_channel).await {
                        Ok(channel) => channel,
                        Err(err) => {
                            warn!(%address, %err, "inbound secure channel failed");
                            node.record_rejected(address.ip().to_string(), err.rejection_label(), &err.to_string());
                            return;
                        }
                    };
                    let _peer_seat = match admission.admit_peer(seat) {
                        Ok(peer_seat) => peer_seat,
                        Err(refusal) => {
                            warn!(%address, "peer connection cap reached, refusing a peer");
                            node.metrics.connections_rejected.get_or_create(&Reason { reason: refusal.label() }).inc();
                            return;
                        }
                    };
                    let ended = connection::run(Arc::clone(&node), channel, Role::Responder).await;
                    if let Ended::BeforeHandshake(reason) = ended {
                        tracing::debug!(%address, %reason, "inbound connection ended before handshake");
                    }
                });
            }
            _ = settings.changed() => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// Writes queued connection events in small transactions, off the sync path.
async fn log_events(
    node: Arc<NodeShared>,
    mut events: mpsc::Receiver<ConnectionEvent>,
    _permit: Option<tokio::sync::OwnedSemaphorePermit>,
) {
    let mut shutdown = node.shutdown.subscribe();
    let mut batch = Vec::new();
    loop {
        let stopping = tokio::select! {
            received = events.recv_many(&mut batch, 256) => received == 0,
            _ = shutdown.changed() => true,
        };
        if stopping {
            // Give connections a moment to queue their `disconnected` rows, then drain.
            tokio::time::sleep(Duration::from_millis(200)).await;
            while let Ok(event) = events.try_recv() {
                batch.push(event);
            }
        }
        node.metrics
            .queue_depth
            .get_or_create(&Queue { queue: "connection_events" })
            .set(events.len() as i64);
        if !batch.is_empty() {
            let rows = std::mem::take(&mut batch);
            let written = node
                .writer
                .call(Priority::Housekeeping, move |store| store.log_connection_events(&rows))
                .await;
            if let Ok(Err(err)) = written {
                warn!(%err, "could not write connection events");
            }
        }
        if stopping && *node.shutdown.borrow() {
            return;
        }
    }
}

/// Checkpoints the WAL every second from a connection of its own (see
/// [`possync_store::Checkpointer`]), so that the writer's commits never pay for them.
async fn checkpoints(node: Arc<NodeShared>) {
    let path = node.config.db_path();
    let checkpointer =
        match tokio::task::spawn_blocking(move || possync_store::Checkpointer::open(&path)).await {
            Ok(Ok(checkpointer)) => Arc::new(Mutex::new(checkpointer)),
            Ok(Err(err)) => {
                warn!(%err, "no checkpoint connection; the writer checkpoints by itself");
                return;
            }
            Err(_) => return,
        };
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut shutdown = node.shutdown.subscribe();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        let checkpointer = Arc::clone(&checkpointer);
        let done = tokio::task::spawn_blocking(move || {
            checkpointer.lock().unwrap_or_else(std::sync::PoisonError::into_inner).run()
        })
        .await;
        if let Ok(Err(err)) = done {
            tracing::debug!(%err, "checkpoint failed; trying again in a second");
        }
    }
}

/// Periodic work: queue depths and database size for the metrics, log retention.
async fn housekeeping(node: Arc<NodeShared>) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    let mut last_cleanup = 0u64;
    loop {
        tick.tick().await;
        let depths = node.writer.depths();
        for (queue, depth) in
            [("local", depths.local), ("sync", depths.sync), ("housekeeping", depths.housekeeping)]
        {
            node.metrics.queue_depth.get_or_create(&Queue { queue }).set(depth as i64);
        }
        let db = node.config.db_path();
        let size = |suffix: &str| {
            std::fs::metadata(format!("{}{suffix}", db.display())).map_or(0, |meta| meta.len())
        };
        node.metrics.database_bytes.set((size("") + size("-wal")) as i64);
        if now_ms().saturating_sub(last_cleanup) > 3_600_000 {
            last_cleanup = now_ms();
            let days = node.settings().log_retention_days;
            let removed =
                node.writer.call(Priority::Housekeeping, move |store| store.cleanup_logs(days)).await;
            if let Ok(Ok(removed)) = removed
                && removed > 0
            {
                info!(removed, days, "old log rows deleted");
            }
        }
    }
}
