//! Redialling a peer: connect, run the connection, and after it ends or fails wait 5, 10, 20,
//! 40, then 60 s between attempts, up to `p2p_reconnect_max_attempts`; then wait for a manual
//! reconnect (API) or for discovery to see the peer again, which start the count over.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use possync_core::protocol::Role;
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

use crate::connection;
use crate::link::Ended;
use crate::shared::DialerHandle;
use crate::transport::{self, TransportError};

/// Largest pause between redials (SPEC section 4).
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// The pause before redial number `attempt` (1-based): base, 2·base, 4·base, 8·base, then
/// [`MAX_BACKOFF`] (with the SPEC's 5 s base: 5, 10, 20, 40, 60, 60...).
pub fn backoff_delay(base: Duration, attempt: u32) -> Duration {
    let exponent = attempt.saturating_sub(1).min(16);
    base.saturating_mul(1 << exponent).min(MAX_BACKOFF.max(base))
}

/// Why the dialer is waiting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wait {
    /// The peer is connected through another connection: wait until that one ends.
    Connected(possync_core::PosId),
    /// Back off before the next attempt.
    Backoff(Duration),
    /// Out of attempts: only a manual reconnect or rediscovery wakes us.
    GaveUp,
}

/// What a dialer decides after each attempt, without I/O: how long to wait, and when to
/// give up. The tokio dialer below and the simulation both run it.
#[derive(Debug, Clone)]
pub struct Redial {
    base: Duration,
    /// Failed attempts in a row (the backoff position).
    attempts: u32,
}

impl Redial {
    /// A dialer that backs off from `base`.
    pub fn new(base: Duration) -> Redial {
        Redial { base, attempts: 0 }
    }

    /// Failed attempts in a row.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// A manual reconnect, or discovery saw the peer again: the count starts over.
    pub fn reset(&mut self) {
        self.attempts = 0;
    }

    /// The attempt ended (`Err`: it failed before the secure channel was up); what to do
    /// until the next one. A connection that was established and then ended is redialled
    /// after the first pause; one that never completed its handshake counts against
    /// `max_attempts`; a duplicate waits for the connection it lost to.
    pub fn after(&mut self, outcome: Result<&Ended, &str>, max_attempts: u32) -> Wait {
        match outcome {
            Ok(Ended::AfterHandshake { .. }) => {
                self.attempts = 1;
                Wait::Backoff(backoff_delay(self.base, self.attempts))
            }
            Ok(Ended::Duplicate(peer)) => {
                self.attempts = 0;
                Wait::Connected(peer.clone())
            }
            Ok(Ended::BeforeHandshake(_)) | Err(_) => {
                self.attempts = self.attempts.saturating_add(1);
                if self.attempts > max_attempts {
                    Wait::GaveUp
                } else {
                    Wait::Backoff(backoff_delay(self.base, self.attempts))
                }
            }
        }
    }
}

/// Dials `target` (`host:port`) for as long as the node runs.
pub async fn dial_forever(node: DialerHandle, target: String, completion: Arc<Semaphore>) {
    let mut settings = node.settings.subscribe();
    let mut shutdown = node.shutdown.subscribe();
    let mut redial = Redial::new(node.backoff_base);
    loop {
        if *shutdown.borrow() {
            return;
        }
        if !settings.borrow_and_update().enabled {
            tokio::select! {
                _ = settings.changed() => continue,
                _ = shutdown.changed() => return,
            }
        }
        node.peers.note_dial(&target, redial.attempts());
        let outcome = dial_once(&node, &target, &completion).await;
        let max = node.settings.current().reconnect_max_attempts;
        let wait = redial.after(outcome.as_ref().map_err(String::as_str), max);
        let attempts = redial.attempts();
        match (&outcome, &wait) {
            (Ok(Ended::AfterHandshake { peer, reason }), _) => {
                debug!(%peer, %reason, "connection ended; redialling");
            }
            (_, Wait::GaveUp) => {
                info!(%target, attempts, "giving up on peer until it is seen again or a reconnect is asked");
            }
            (Ok(Ended::BeforeHandshake(reason)) | Err(reason), _) => {
                debug!(%target, attempts, max, %reason, "dial failed");
            }
            _ => {}
        }
        node.peers.note_dial_outcome(&target, attempts, matches!(wait, Wait::GaveUp));
        if let Ok(address) = resolve(&target).await {
            node.peers.note_attempt(address, attempts);
        }
        // Registered before waiting so that a reconnect asked meanwhile is not lost.
        let reconnect = node.reconnect.notified();
        tokio::pin!(reconnect);
        reconnect.as_mut().enable();
        let enabled_before = settings.borrow_and_update().enabled;
        let pause = pause(&node, &wait);
        tokio::pin!(pause);
        loop {
            tokio::select! {
                () = &mut pause => break,
                () = &mut reconnect => {
                    redial.reset();
                    node.peers.note_dial_outcome(&target, redial.attempts(), false);
                    break;
                }
                _ = shutdown.changed() => return,
                changed = settings.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    // Only switching P2P on or off matters here; other settings do not cut
                    // a backoff short.
                    if settings.borrow_and_update().enabled != enabled_before {
                        break;
                    }
                }
            }
        }
    }
}

/// Sleeps as long as `wait` says.
async fn pause(node: &DialerHandle, wait: &Wait) {
    match wait {
        // The other connection may be replaced by this dialer's next one: redial once it ends
        // rather than every second (a handshake each time) while it lives.
        Wait::Connected(peer) => node.peers.wait_disconnected(peer).await,
        Wait::Backoff(delay) => tokio::time::sleep(*delay).await,
        Wait::GaveUp => std::future::pending().await,
    }
}

async fn resolve(target: &str) -> Result<SocketAddr, String> {
    let mut addresses =
        tokio::net::lookup_host(target).await.map_err(|err| format!("cannot resolve {target}: {err}"))?;
    addresses.next().ok_or_else(|| format!("{target} resolves to no address"))
}

/// One attempt: connect, secure, run until closed.
async fn dial_once(node: &DialerHandle, target: &str, completion: &Arc<Semaphore>) -> Result<Ended, String> {
    let address = resolve(target).await?;
    let channel = match transport::connect(address, &node.channel).await {
        Ok(channel) => channel,
        Err(err) => {
            if matches!(err, TransportError::HandshakeFailed { .. }) {
                warn!(%address, %err, "peer refused the secure channel (different shop secret?)");
                node.events.record_rejected(address.to_string(), err.rejection_label(), &err.to_string());
            }
            return Err(err.to_string());
        }
    };
    let _permit = Arc::clone(completion).try_acquire_owned().map_err(|_| "node stopping".to_string())?;
    Ok(connection::run(Arc::clone(&node.connections), channel, Role::Initiator).await)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dialer_backs_off_gives_up_after_the_limit_and_starts_over_on_reconnect() {
        let mut redial = Redial::new(Duration::from_secs(5));
        let refused = Ended::BeforeHandshake("connection refused".into());
        let waits: Vec<Wait> = (0..4).map(|_| redial.after(Ok(&refused), 3)).collect();
        assert_eq!(
            waits,
            [
                Wait::Backoff(Duration::from_secs(5)),
                Wait::Backoff(Duration::from_secs(10)),
                Wait::Backoff(Duration::from_secs(20)),
                Wait::GaveUp
            ]
        );
        redial.reset();
        assert_eq!(redial.after(Err("unreachable"), 3), Wait::Backoff(Duration::from_secs(5)));
        // A link that was up and ended is redialled after the first pause, whatever came before.
        let peer = possync_core::PosId::parse("AAAA").expect("posId");
        let ended = Ended::AfterHandshake { peer: peer.clone(), reason: "heartbeat timeout".into() };
        redial.after(Err("unreachable"), 3);
        assert_eq!(redial.after(Ok(&ended), 3), Wait::Backoff(Duration::from_secs(5)));
        // A duplicate waits for the connection it lost to, and counts nothing.
        assert_eq!(redial.after(Ok(&Ended::Duplicate(peer.clone())), 3), Wait::Connected(peer));
        assert_eq!(redial.attempts(), 0);
    }

    #[test]
    fn backoff_follows_the_spec_schedule() {
        let base = Duration::from_secs(5);
        let delays: Vec<u64> = (1..=7).map(|attempt| backoff_delay(base, attempt).as_secs()).collect();
        assert_eq!(delays, [5, 10, 20, 40, 60, 60, 60]);
        assert_eq!(backoff_delay(base, u32::MAX), MAX_BACKOFF);
    }
}
