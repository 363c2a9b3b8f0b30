//! The node: starts and stops everything a terminal runs (writer, peer listener, dialers,
//! discovery, upkeep, chain drivers, API); it only wires them. What they share is
//! [`crate::shared`], and each task is started with the narrow handle of it that it needs
//! (`shared.listener_handle()`...); each task lives in its own module (`listener`, `dialer`,
//! `upkeep`...).
//!
//! Lifecycle (as in mini-redis): one shutdown signal (`watch`) every task listens to, and a
//! completion count: [`Node::shutdown`] signals, then waits for every connection task to log
//! its `disconnected` row and for the event queue to be flushed to the database.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use possync_core::PosId;
use possync_store::{Store, StoreError, SystemEnvironment};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tracing::{info, warn};

use crate::config::NodeConfig;
use crate::dialer;
use crate::shared::NodeShared;
use crate::shared::ReaderPool;
use crate::transport::ChannelConfig;
use crate::writer::WriterHandle;

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
        tasks.spawn(crate::listener::listen(shared.listener_handle(), listener, Arc::clone(&completion)));

        let logger_permit = Arc::clone(&completion).acquire_owned().await.ok();
        let upkeep = shared.upkeep_handle();
        tasks.spawn(crate::upkeep::log_events(upkeep.clone(), events_rx, logger_permit));
        tasks.spawn(crate::upkeep::housekeeping(upkeep.clone()));
        tasks.spawn(crate::upkeep::checkpoints(upkeep));
        let dialers = shared.dialer_handle();
        for target in &config.static_peers {
            tasks.spawn(dialer::dial_forever(dialers.clone(), target.clone(), Arc::clone(&completion)));
        }
        crate::chain::spawn(&shared, &mut tasks);
        if config.discovery {
            tasks.spawn(crate::discovery::run(shared.discovery_handle(), peer_addr, Arc::clone(&completion)));
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
