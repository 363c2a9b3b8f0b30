//! The peer port: accepts connections while P2P is enabled, gives each a seat
//! ([`crate::admission`]: unauthenticated connections have a small budget of their own, per
//! address too, and a short handshake deadline), secures it and runs it as a responder.

use std::sync::Arc;
use std::time::Duration;

use possync_core::protocol::Role;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::warn;

use crate::admission::{ACCEPT_HANDSHAKE_TIMEOUT, Admission};
use crate::connection;
use crate::link::Ended;
use crate::metrics::Reason;
use crate::peers::ConnectionCommand;
use crate::shared::ListenerHandle;
use crate::transport::{self, ChannelConfig};

/// Accepts peers while P2P is enabled: at most `max_connections` authenticated peers, and
/// connections still proving the secret within their own budget ([`crate::admission`]).
pub async fn listen(node: ListenerHandle, listener: TcpListener, completion: Arc<Semaphore>) {
    let admission = Arc::new(Admission::new(node.max_connections));
    let accept_channel =
        ChannelConfig { handshake_timeout: ACCEPT_HANDSHAKE_TIMEOUT, ..node.channel.clone() };
    let mut settings = node.settings.subscribe();
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
                let events = node.events.clone();
                let metrics = Arc::clone(&node.metrics);
                let connections = Arc::clone(&node.connections);
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
                            events.record_rejected(address.ip().to_string(), err.rejection_label(), &err.to_string());
                            return;
                        }
                    };
                    let _peer_seat = match admission.admit_peer(seat) {
                        Ok(peer_seat) => peer_seat,
                        Err(refusal) => {
                            warn!(%address, "peer connection cap reached, refusing a peer");
                            metrics.connections_rejected.get_or_create(&Reason { reason: refusal.label() }).inc();
                            return;
                        }
                    };
                    let ended = connection::run(connections, channel, Role::Responder).await;
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
