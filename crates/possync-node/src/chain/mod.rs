//! The chain of stores over NATS JetStream: the tokio driver of `possync-chain`'s rules.
//!
//! A node with `[uplink]` (a store's till) runs `uplink`: it publishes its store's origins'
//! changes on the UP stream and applies the head office's changes from the DOWN stream. A
//! node with `[hq]` runs `hq`: it creates the streams, ingests every store's changes from
//! the UP stream with a durable consumer, and publishes its own origin's changes on the DOWN
//! stream. Both publish with the same loop (`publisher`), which follows the sans-IO
//! [`possync_chain::Planner`].
//!
//! Nothing here decides a merge or keeps a second log: changes go through the node's single
//! writer (`apply_batch`'s rules, by (origin, seq)), uploads are read from the change log
//! (the buffer while the WAN is down), and the LAN spreads whatever arrives as usual. What the
//! drivers touch of the node is their [`ChainHandle`]: never the peer table nor the settings.
//! See docs/CHAIN.md for the layout and what happens at each failure.

mod hq;
mod publisher;
pub mod status;
mod uplink;

pub use status::ChainStatus;

use std::time::Duration;

use tokio::task::JoinSet;

use crate::config::{BackboneAuth, BackboneConfig, ChainRole};
use crate::shared::{ChainHandle, NodeShared};

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

/// Starts the chain tasks this node's configuration asks for, each with the node's
/// [`ChainHandle`].
pub(crate) fn spawn(node: &NodeShared, tasks: &mut JoinSet<()>) {
    match node.config.chain.clone() {
        Some(ChainRole::Uplink(config)) => {
            tasks.spawn(uplink::run(node.chain_handle(), config));
        }
        Some(ChainRole::Hq(config)) => {
            tasks.spawn(hq::run(node.chain_handle(), config));
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
async fn pause(node: &ChainHandle, delay: Duration) -> bool {
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
    node: &ChainHandle,
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
async fn log_rejected(node: &ChainHandle, peer_id: &str, peer_name: &str, reason: &str) {
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
