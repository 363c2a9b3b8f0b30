//! Who gets a seat on the peer port. A connection that has not proved the shop secret yet
//! costs the node a task, buffers and a handshake deadline, and anyone on the LAN can open
//! one: if those counted against the peer cap, a few dozen idle sockets (renewed before
//! their deadline) would keep every real till out. So unauthenticated connections get a
//! budget of their own, small overall and smaller per address, and a short deadline; a
//! connection takes one of the `max_connections` peer seats only once its secure channel
//! is up (the shop secret proven), and gives its handshake seat back at that moment.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Most connections in their secure-channel handshake at once.
pub const MAX_PENDING_HANDSHAKES: usize = 16;
/// Most connections from one address in their handshake at once.
pub const MAX_PENDING_PER_ADDRESS: u32 = 4;
/// How long an inbound connection has to complete the secure channel (two messages each
/// way on a LAN: milliseconds; the dial side keeps the transport's longer default).
pub const ACCEPT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);

/// Why a connection was turned away at the door.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// [`MAX_PENDING_HANDSHAKES`] handshakes are running.
    HandshakesFull,
    /// [`MAX_PENDING_PER_ADDRESS`] handshakes from this address are running.
    AddressFull,
    /// Every peer seat is taken by authenticated peers.
    PeersFull,
}

impl Refusal {
    /// A short fixed label (metric label, log).
    pub fn label(self) -> &'static str {
        match self {
            Refusal::HandshakesFull => "handshake budget full",
            Refusal::AddressFull => "too many handshakes from one address",
            Refusal::PeersFull => "peer connection cap reached",
        }
    }
}

/// The budgets of one peer listener.
#[derive(Debug)]
pub struct Admission {
    handshakes: Arc<Semaphore>,
    per_address: Arc<Mutex<HashMap<IpAddr, u32>>>,
    peers: Arc<Semaphore>,
}

/// A handshake seat: given back when dropped.
#[derive(Debug)]
pub struct HandshakeSeat {
    _permit: OwnedSemaphorePermit,
    address: IpAddr,
    per_address: Arc<Mutex<HashMap<IpAddr, u32>>>,
}

impl Drop for HandshakeSeat {
    fn drop(&mut self) {
        let mut counts = self.per_address.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(count) = counts.get_mut(&self.address) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.address);
            }
        }
    }
}

impl Admission {
    /// Budgets for a listener with `max_peers` peer seats.
    pub fn new(max_peers: usize) -> Admission {
        Admission {
            handshakes: Arc::new(Semaphore::new(MAX_PENDING_HANDSHAKES)),
            per_address: Arc::default(),
            peers: Arc::new(Semaphore::new(max_peers.max(1))),
        }
    }

    /// A seat for a new connection from `address` to run its handshake in.
    pub fn begin_handshake(&self, address: IpAddr) -> Result<HandshakeSeat, Refusal> {
        let mut counts = self.per_address.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if counts.get(&address).is_some_and(|count| *count >= MAX_PENDING_PER_ADDRESS) {
            return Err(Refusal::AddressFull);
        }
        let permit = Arc::clone(&self.handshakes).try_acquire_owned().map_err(|_| Refusal::HandshakesFull)?;
        *counts.entry(address).or_insert(0) += 1;
        Ok(HandshakeSeat { _permit: permit, address, per_address: Arc::clone(&self.per_address) })
    }

    /// A peer seat for a connection whose secure channel is up; its handshake seat is given
    /// back either way.
    pub fn admit_peer(&self, seat: HandshakeSeat) -> Result<OwnedSemaphorePermit, Refusal> {
        drop(seat);
        Arc::clone(&self.peers).try_acquire_owned().map_err(|_| Refusal::PeersFull)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_handshakes_never_take_the_seats_of_authenticated_peers() {
        let admission = Admission::new(2);
        let lan: IpAddr = "10.0.0.66".parse().unwrap();
        let till: IpAddr = "10.0.0.2".parse().unwrap();
        let held: Vec<HandshakeSeat> =
            (0..MAX_PENDING_PER_ADDRESS).map(|_| admission.begin_handshake(lan).unwrap()).collect();
        assert_eq!(admission.begin_handshake(lan).unwrap_err(), Refusal::AddressFull);
        // Another address still gets in, and once authenticated holds a peer seat.
        let seat = admission.begin_handshake(till).unwrap();
        let peer = admission.admit_peer(seat).unwrap();
        // Its handshake seat came back: the address budget is free again for it.
        let again = admission.begin_handshake(till).unwrap();
        let second = admission.admit_peer(again).unwrap();
        let third = admission.begin_handshake(till).unwrap();
        assert_eq!(admission.admit_peer(third).unwrap_err(), Refusal::PeersFull);
        drop((peer, second));
        drop(held);
        assert!(admission.per_address.lock().unwrap().is_empty(), "seats are given back");
    }

    #[test]
    fn the_overall_handshake_budget_holds_across_addresses() {
        let admission = Admission::new(64);
        let seats: Vec<HandshakeSeat> = (0..MAX_PENDING_HANDSHAKES)
            .map(|i| admission.begin_handshake(IpAddr::from([10, 0, 1, i as u8])).unwrap())
            .collect();
        let refused = admission.begin_handshake("10.0.2.1".parse().unwrap()).unwrap_err();
        assert_eq!(refused, Refusal::HandshakesFull);
        drop(seats);
        assert!(admission.begin_handshake("10.0.2.1".parse().unwrap()).is_ok());
    }
}
