//! What the node knows about its peers, shared between the connection tasks (which update
//! it), the API (which reads it: status and the seed's detailed stats) and the dialers.
//!
//! One connection per pair of terminals: when a second connection to the same peer completes
//! its handshake (both dialled at once), both sides keep the one initiated by the smaller
//! posId, so they agree without talking. That tie-break is invisible in the audit trail: the
//! link goes on, so the connection that loses it logs no `disconnected` and the one that
//! wins no `connected`/`reconnected` (the losing side tells its peer with a
//! `duplicate_connection` error frame, and a winner that registers within
//! [`SUPERSEDED_GRACE_MS`] of such a close continues the link).

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use possync_core::PosId;
use possync_core::protocol::ConnectionStats;
use serde::Serialize;
use tokio::sync::{Notify, watch};

/// Commands the node sends to one connection task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectionCommand {
    /// Run a full catch-up with this peer now.
    SyncNow,
    /// Another connection to the same peer won the tie-break: close this one quietly (the
    /// link goes on through the other one).
    Superseded,
    /// Close the connection with this reason.
    Close(String),
}

/// Where the node leaves [`ConnectionCommand`]s for one connection task.
///
/// A bounded `tokio::sync::mpsc` channel would do, but it allocates a block of 32 slots
/// (about 1.3 KB with its state) for every connection, and a connection gets a command
/// once in a while at most. This is a lock, a queue that is empty (and unallocated) between
/// commands, and a [`Notify`]: about 100 bytes.
#[derive(Debug, Default)]
pub struct Mailbox {
    queue: Mutex<VecDeque<ConnectionCommand>>,
    posted: Notify,
}

impl Mailbox {
    /// Most commands waiting at once; more are dropped (as `try_send` on a full channel).
    pub const CAPACITY: usize = 16;

    fn queue(&self) -> std::sync::MutexGuard<'_, VecDeque<ConnectionCommand>> {
        // A panic while holding this lock leaves plain data behind: keep using it.
        self.queue.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Leaves a command for the connection. False (and dropped) when
    /// [`CAPACITY`](Self::CAPACITY) are already waiting.
    pub fn post(&self, command: ConnectionCommand) -> bool {
        {
            let mut queue = self.queue();
            if queue.len() >= Self::CAPACITY {
                return false;
            }
            queue.push_back(command);
        }
        // Stores a permit when the task is not waiting: the command is not missed.
        self.posted.notify_one();
        true
    }

    /// The next command, in the order posted; waits for one. Cancel-safe: a command is
    /// only taken out when this returns it.
    pub async fn next(&self) -> ConnectionCommand {
        loop {
            if let Some(command) = self.take() {
                return command;
            }
            self.posted.notified().await;
        }
    }

    /// The next command if one is waiting (for a caller that polls instead of waiting: a
    /// simulation).
    pub fn try_next(&self) -> Option<ConnectionCommand> {
        self.take()
    }

    fn take(&self) -> Option<ConnectionCommand> {
        let mut queue = self.queue();
        let command = queue.pop_front();
        if queue.is_empty() && queue.capacity() > 0 {
            // Keep nothing allocated while idle.
            *queue = VecDeque::new();
        }
        command
    }
}

/// One known peer.
#[derive(Debug, Clone)]
pub struct PeerEntry {
    /// Display name from its handshake.
    pub name: String,
    /// Its address (of the current or last connection).
    pub address: Option<SocketAddr>,
    /// That connection was dialled by the peer: its port is an ephemeral one, not the
    /// peer's listening port, so only the IP is shown.
    pub inbound: bool,
    /// Connected now.
    pub online: bool,
    /// Last time anything was heard from it (Unix ms).
    pub last_seen_ms: u64,
    /// Counters of the current (or last) connection.
    pub stats: ConnectionStats,
    /// Redials since the last successful handshake.
    pub reconnect_attempts: u32,
    /// Changes the peer holds that this node lacks (incoming catch-up still to do), as last
    /// measured on the live connection.
    pub behind: u64,
    /// Live changes of the current connection applied late because the peer pushed them
    /// faster than `p2p_peer_max_changes_per_second` (see `peer_rate`).
    pub throttled: u64,
    /// The live connection: its id, its mailbox and whether we dialled it.
    connection: Option<(u64, Arc<Mailbox>, bool)>,
    /// When the last connection was closed by the tie-break with no successor registered yet.
    superseded_at: Option<u64>,
}

/// How long after a connection lost the tie-break its successor may register and continue
/// the link (no `disconnected`, no `reconnected`). Past it, the link is over and logged so.
pub const SUPERSEDED_GRACE_MS: u64 = 10_000;

/// `GET /api/status` (SPEC 6).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatus {
    /// The peer listener is running.
    pub server_running: bool,
    /// Peers connected now.
    pub connected_peers: usize,
    /// Peers known (seen in this run).
    pub total_peers: usize,
    /// `p2p_enabled`.
    pub enabled: bool,
    /// This terminal.
    pub pos_id: String,
    /// This terminal's name.
    pub pos_name: String,
    /// Every known peer.
    pub peers: Vec<PeerStatus>,
}

/// One peer in [`NodeStatus`].
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerStatus {
    /// posId.
    pub id: String,
    /// Name.
    pub name: String,
    /// `host:port`.
    pub address: Option<String>,
    /// Connected now.
    pub online: bool,
    /// RFC 3339.
    pub last_seen: Option<String>,
    /// Changes this peer holds that this node has not taken yet: non-zero while catching
    /// up ("catching up, N behind"), 0 once in step (measured every 5 s on a live link).
    pub behind: u64,
    /// Live changes of the current connection that this peer pushed faster than
    /// `p2p_peer_max_changes_per_second`, applied late (0 when it never exceeded it).
    pub throttled: u64,
}

/// The seed's `getDetailedStats()` object, exactly.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DetailedStats {
    /// One entry per connected peer.
    pub connections: Vec<ConnectionDetail>,
    /// Sums over the connections.
    pub total_messages_sent: u64,
    /// Sums over the connections.
    pub total_messages_received: u64,
    /// Sums over the connections.
    pub total_bytes_sent: u64,
    /// Sums over the connections.
    pub total_bytes_received: u64,
}

/// One connection in [`DetailedStats`].
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionDetail {
    /// posId.
    pub peer_id: String,
    /// Name.
    pub peer_name: String,
    /// Frames sent.
    pub messages_sent: u64,
    /// Frames received.
    pub messages_received: u64,
    /// Payload bytes sent.
    pub bytes_sent: u64,
    /// Payload bytes received.
    pub bytes_received: u64,
    /// RFC 3339 time of the last ping sent, or null.
    pub last_ping: Option<String>,
    /// RFC 3339 time of the last pong received, or null.
    pub last_pong: Option<String>,
    /// Redials since the last successful handshake.
    pub reconnect_attempts: u32,
}

/// The outcome of registering an established connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Registration {
    /// First connection to this peer in this run.
    New,
    /// A known peer came back.
    Returning,
    /// This connection continues the link of one that lost the tie-break: nothing to log.
    Continued,
    /// There is already a connection to keep: close this one.
    Duplicate,
}

/// What a dialer is doing about one target (`host:port`), for status and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DialState {
    /// Failed attempts in a row (the backoff position); 0 after a successful handshake or a
    /// manual reconnect.
    pub attempts: u32,
    /// Dials started since the node started (every attempt, successful or not).
    pub dials: u64,
    /// Out of attempts: waiting for a manual reconnect or rediscovery.
    pub gave_up: bool,
}

/// The table of known peers.
#[derive(Debug, Default)]
pub struct PeerTable {
    peers: Mutex<HashMap<PosId, PeerEntry>>,
    /// Dial targets and their attempts.
    dialers: Mutex<HashMap<String, DialState>>,
    /// Woken whenever a connection is registered or unregistered.
    changed: Notify,
    /// The posIds with a live connection, for the sessions' `peers` messages.
    connected_ids: watch::Sender<Arc<BTreeSet<PosId>>>,
}

fn rfc3339(ms: Option<u64>) -> Option<String> {
    ms.map(possync_core::time::rfc3339_ms)
}

impl PeerTable {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PosId, PeerEntry>> {
        // A panic while holding this lock leaves plain data behind: keep using it.
        self.peers.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Registers an established connection. `we_initiated`: this node dialled it.
    #[allow(clippy::too_many_arguments)]
    pub fn register(
        &self,
        own_id: &PosId,
        peer: &PosId,
        name: &str,
        address: SocketAddr,
        connection_id: u64,
        we_initiated: bool,
        commands: Arc<Mailbox>,
        now_ms: u64,
    ) -> Registration {
        let mut peers = self.lock();
        let known = peers.contains_key(peer);
        let entry = peers.entry(peer.clone()).or_insert_with(|| PeerEntry {
            name: name.to_string(),
            address: Some(address),
            inbound: !we_initiated,
            online: false,
            last_seen_ms: now_ms,
            stats: ConnectionStats::default(),
            reconnect_attempts: 0,
            behind: 0,
            throttled: 0,
            connection: None,
            superseded_at: None,
        });
        // A link closed by the tie-break within the grace goes on through this connection
        // (its mark is taken: no row is owed). Past the grace the link did end: the mark stays
        // for the check that logs its `disconnected` row, whichever of the two runs first.
        let within_grace =
            entry.superseded_at.is_some_and(|at| now_ms.saturating_sub(at) <= SUPERSEDED_GRACE_MS);
        if within_grace {
            entry.superseded_at = None;
        }
        let mut continued = within_grace;
        if let Some((_, existing, existing_we_initiated)) = &entry.connection {
            // Keep the connection initiated by the smaller posId; both sides compute the same.
            let keep_initiated_by_us = own_id < peer;
            let new_wins = we_initiated == keep_initiated_by_us || we_initiated == *existing_we_initiated;
            if !new_wins {
                return Registration::Duplicate;
            }
            existing.post(ConnectionCommand::Superseded);
            continued = true;
        }
        entry.name = name.to_string();
        entry.address = Some(address);
        entry.inbound = !we_initiated;
        entry.online = true;
        entry.last_seen_ms = now_ms;
        // `reconnect_attempts` keeps the redials this connection took (the dialer counts them
        // while the peer is away): a flaky peer shows it while connected.
        entry.stats = ConnectionStats::default();
        entry.behind = 0;
        entry.throttled = 0;
        entry.connection = Some((connection_id, commands, we_initiated));
        self.publish_connected(&peers);
        drop(peers);
        self.changed.notify_waiters();
        match (continued, known) {
            (true, _) => Registration::Continued,
            (false, true) => Registration::Returning,
            (false, false) => Registration::New,
        }
    }

    /// Updates a connection's counters (only while it is the registered one).
    pub fn update(
        &self,
        peer: &PosId,
        connection_id: u64,
        stats: &ConnectionStats,
        now_ms: u64,
        heard: bool,
    ) {
        let mut peers = self.lock();
        if let Some(entry) = peers.get_mut(peer)
            && entry.connection.as_ref().is_some_and(|(id, ..)| *id == connection_id)
        {
            entry.stats = stats.clone();
            if heard {
                entry.last_seen_ms = now_ms;
            }
        }
    }

    /// Records how far behind the peer this node is (only from the registered connection).
    pub fn set_behind(&self, peer: &PosId, connection_id: u64, behind: u64) {
        let mut peers = self.lock();
        if let Some(entry) = peers.get_mut(peer)
            && entry.connection.as_ref().is_some_and(|(id, ..)| *id == connection_id)
        {
            entry.behind = behind;
        }
    }

    /// Counts live changes the peer pushed faster than its budget (only from the registered
    /// connection).
    pub fn add_throttled(&self, peer: &PosId, connection_id: u64, changes: u64) {
        let mut peers = self.lock();
        if let Some(entry) = peers.get_mut(peer)
            && entry.connection.as_ref().is_some_and(|(id, ..)| *id == connection_id)
        {
            entry.throttled = entry.throttled.saturating_add(changes);
        }
    }

    /// Watches the set of peers with a live connection.
    pub fn watch_connected(&self) -> watch::Receiver<Arc<BTreeSet<PosId>>> {
        self.connected_ids.subscribe()
    }

    fn publish_connected(&self, peers: &HashMap<PosId, PeerEntry>) {
        let ids: BTreeSet<PosId> =
            peers.iter().filter(|(_, entry)| entry.connection.is_some()).map(|(id, _)| id.clone()).collect();
        self.connected_ids.send_if_modified(|current| {
            let modified = **current != ids;
            if modified {
                *current = Arc::new(ids);
            }
            modified
        });
    }

    /// Marks a connection gone; returns false when it had been replaced already.
    /// `superseded_at`: it lost the tie-break (the peer said so) at this time, and a successor
    /// registering within [`SUPERSEDED_GRACE_MS`] continues the link.
    pub fn unregister(&self, peer: &PosId, connection_id: u64, superseded_at: Option<u64>) -> bool {
        let mut peers = self.lock();
        match peers.get_mut(peer) {
            Some(entry) if entry.connection.as_ref().is_some_and(|(id, ..)| *id == connection_id) => {
                entry.connection = None;
                entry.online = false;
                entry.superseded_at = superseded_at;
                self.publish_connected(&peers);
                drop(peers);
                self.changed.notify_waiters();
                true
            }
            _ => false,
        }
    }

    /// True when the link closed by the tie-break at `at` had no successor within the grace
    /// (a connection registered later starts a new link). Clears the mark, so only one
    /// caller ever learns it.
    pub fn take_unsucceeded(&self, peer: &PosId, at: u64) -> bool {
        let mut peers = self.lock();
        match peers.get_mut(peer) {
            Some(entry) if entry.superseded_at == Some(at) => {
                entry.superseded_at = None;
                true
            }
            _ => false,
        }
    }

    /// Waits until `peer` has no live connection (returns at once when it has none).
    pub async fn wait_disconnected(&self, peer: &PosId) {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            // Registered before checking, so a change in between is not missed.
            notified.as_mut().enable();
            if !self.is_connected(peer) {
                return;
            }
            notified.await;
        }
    }

    /// Records the start of a dial to `target`; `attempts` failed before it.
    pub fn note_dial(&self, target: &str, attempts: u32) {
        let mut dialers = self.dialers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let state = dialers.entry(target.to_string()).or_default();
        state.dials += 1;
        state.attempts = attempts;
        state.gave_up = false;
    }

    /// Records a dialer's backoff position after an attempt.
    pub fn note_dial_outcome(&self, target: &str, attempts: u32, gave_up: bool) {
        let mut dialers = self.dialers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let state = dialers.entry(target.to_string()).or_default();
        state.attempts = attempts;
        state.gave_up = gave_up;
    }

    /// What the dialer of `target` is doing, if there is one.
    pub fn dial_state(&self, target: &str) -> Option<DialState> {
        self.dialers.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(target).cloned()
    }

    /// Is this peer connected now?
    pub fn is_connected(&self, peer: &PosId) -> bool {
        self.lock().get(peer).is_some_and(|entry| entry.connection.is_some())
    }

    /// Records a redial attempt against the peer last seen at `address`.
    pub fn note_attempt(&self, address: SocketAddr, attempts: u32) {
        for entry in self.lock().values_mut() {
            if entry.address == Some(address) && entry.connection.is_none() {
                entry.reconnect_attempts = attempts;
            }
        }
    }

    /// Sends a command to every live connection.
    pub fn broadcast(&self, command: &ConnectionCommand) {
        for entry in self.lock().values() {
            if let Some((_, mailbox, _)) = &entry.connection {
                mailbox.post(command.clone());
            }
        }
    }

    /// Number of live connections.
    pub fn connected(&self) -> usize {
        self.lock().values().filter(|entry| entry.connection.is_some()).count()
    }

    /// `GET /api/status`.
    pub fn status(&self, server_running: bool, enabled: bool, pos_id: &PosId, pos_name: &str) -> NodeStatus {
        let peers = self.lock();
        let mut list: Vec<PeerStatus> = peers
            .iter()
            .map(|(id, entry)| PeerStatus {
                id: id.to_string(),
                name: entry.name.clone(),
                address: entry.address.map(|address| {
                    if entry.inbound { format!("{} (dialled in)", address.ip()) } else { address.to_string() }
                }),
                online: entry.online,
                last_seen: rfc3339(Some(entry.last_seen_ms)),
                behind: if entry.online { entry.behind } else { 0 },
                throttled: entry.throttled,
            })
            .collect();
        list.sort_by(|a, b| a.name.cmp(&b.name).then_with(|| a.id.cmp(&b.id)));
        NodeStatus {
            server_running,
            connected_peers: list.iter().filter(|peer| peer.online).count(),
            total_peers: list.len(),
            enabled,
            pos_id: pos_id.to_string(),
            pos_name: pos_name.to_string(),
            peers: list,
        }
    }

    /// `GET /api/stats`: the seed's detailed stats over the live connections.
    pub fn detailed_stats(&self) -> DetailedStats {
        let peers = self.lock();
        let mut connections: Vec<ConnectionDetail> = peers
            .iter()
            .filter(|(_, entry)| entry.connection.is_some())
            .map(|(id, entry)| ConnectionDetail {
                peer_id: id.to_string(),
                peer_name: entry.name.clone(),
                messages_sent: entry.stats.messages_sent,
                messages_received: entry.stats.messages_received,
                bytes_sent: entry.stats.bytes_sent,
                bytes_received: entry.stats.bytes_received,
                last_ping: rfc3339(entry.stats.last_ping),
                last_pong: rfc3339(entry.stats.last_pong),
                reconnect_attempts: entry.reconnect_attempts,
            })
            .collect();
        connections.sort_by(|a, b| a.peer_id.cmp(&b.peer_id));
        DetailedStats {
            total_messages_sent: connections.iter().map(|c| c.messages_sent).sum(),
            total_messages_received: connections.iter().map(|c| c.messages_received).sum(),
            total_bytes_sent: connections.iter().map(|c| c.bytes_sent).sum(),
            total_bytes_received: connections.iter().map(|c| c.bytes_received).sum(),
            connections,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::{ConnectionCommand, Mailbox, PeerTable, Registration, SUPERSEDED_GRACE_MS};

    fn register(table: &PeerTable, connection_id: u64, now_ms: u64) -> Registration {
        let (me, peer) =
            (possync_core::PosId::parse("AAAA").unwrap(), possync_core::PosId::parse("BBBB").unwrap());
        let address = "127.0.0.1:7001".parse().unwrap();
        table.register(
            &me,
            &peer,
            "Till B",
            address,
            connection_id,
            true,
            Arc::new(Mailbox::default()),
            now_ms,
        )
    }

    #[test]
    fn a_link_closed_by_the_tie_break_continues_within_the_grace_and_ends_after_it() {
        let peer = possync_core::PosId::parse("BBBB").unwrap();
        let table = PeerTable::default();
        assert_eq!(register(&table, 1, 0), Registration::New);
        // The peer kept its other connection; ours closes at 1 000.
        assert!(table.unregister(&peer, 1, Some(1_000)));
        // Its successor comes within the grace: the link goes on, no row is owed.
        assert_eq!(register(&table, 2, 1_000 + SUPERSEDED_GRACE_MS), Registration::Continued);
        assert!(!table.take_unsucceeded(&peer, 1_000));

        // Closed again by the tie-break, and the next connection comes only after the grace
        // (just before the check that logs the end runs): the link did end, so the check
        // still owes its `disconnected` row, before the `reconnected` one. (It was lost: the
        // registration took the mark, and the audit trail showed a reconnection of a link
        // that never went down.)
        assert!(table.unregister(&peer, 2, Some(20_000)));
        assert_eq!(register(&table, 3, 20_001 + SUPERSEDED_GRACE_MS), Registration::Returning);
        assert!(table.take_unsucceeded(&peer, 20_000), "the end of the first link is logged");
        assert!(!table.take_unsucceeded(&peer, 20_000), "once");
    }

    #[tokio::test]
    async fn mailbox_keeps_order_bounds_and_wakes_a_waiting_task() {
        let mailbox = Arc::new(Mailbox::default());
        for index in 0..Mailbox::CAPACITY {
            assert!(mailbox.post(ConnectionCommand::Close(index.to_string())));
        }
        assert!(!mailbox.post(ConnectionCommand::SyncNow), "a full mailbox drops the command");
        for index in 0..Mailbox::CAPACITY {
            assert_eq!(mailbox.next().await, ConnectionCommand::Close(index.to_string()));
        }
        // Drained: nothing stays allocated, and a waiting task is woken by the next post.
        assert_eq!(mailbox.queue().capacity(), 0);
        let waiting = tokio::spawn({
            let mailbox = Arc::clone(&mailbox);
            async move { mailbox.next().await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(mailbox.post(ConnectionCommand::SyncNow));
        let received = tokio::time::timeout(Duration::from_secs(5), waiting).await;
        assert_eq!(received.expect("woken").expect("joined"), ConnectionCommand::SyncNow);
        // A `next` dropped before it returned takes nothing out.
        assert!(mailbox.post(ConnectionCommand::SyncNow));
        drop(mailbox.next());
        assert_eq!(mailbox.next().await, ConnectionCommand::SyncNow);
    }
}
