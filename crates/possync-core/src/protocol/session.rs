//! The per-connection protocol state machine: one [`Session`] per connected peer.
//!
//! A session holds everything the protocol must remember about one connection (handshake
//! state, what the peer is known to hold, where outgoing catch-up stands, which batches are
//! being applied, heartbeat deadlines, error budget, counters) and nothing else: it owns no
//! socket, no store and no clock. Inputs arrive through `handle_*` methods and commands;
//! outputs leave through `poll_*` methods. The same inputs in the same order always give the
//! same outputs, which is what lets the tests run two sessions against each other on a
//! virtual clock. See the [module docs](super) for the run loop a driver follows.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use serde::Serialize;

use crate::change::WireChange;
use crate::ids::PosId;
use crate::time::rfc3339_ms;
use crate::vv::VersionVector;

use super::message::{
    Body, DUPLICATE_CONNECTION, ErrorData, Hello, IDENTITY_CLASH, Message, PROTOCOL_VERSION, Peers, Pong,
    ProtocolError, StampedChange, SyncAck, SyncBatch, SyncRequest, peek_type_action,
};

/// How long past a heartbeat interval a silent peer is still considered alive (SPEC 4:
/// "a peer silent for interval + 10 s is dead").
pub const DEAD_AFTER_EXTRA_MS: u64 = 10_000;

/// Most live changes held back while outgoing catch-up runs. Past it the buffer is dropped
/// and catch-up runs once more from what the peer is known to hold, which reads the same
/// changes back from the store instead of from memory.
pub const MAX_BUFFERED_CHANGES: usize = 10_000;

/// Per-connection settings, read from the node's settings when the connection opens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionConfig {
    /// This terminal's id, sent in the handshake and as every frame's `sourcePos`.
    pub pos_id: PosId,
    /// This terminal's display name, sent in the handshake.
    pub pos_name: String,
    /// Ping period (`p2p_heartbeat_interval`); the peer is dead after this plus
    /// [`DEAD_AFTER_EXTRA_MS`] of silence. Zero is treated as 1 ms.
    pub heartbeat_interval_ms: u64,
    /// Most changes per catch-up batch (`p2p_sync_batch_size`); zero is treated as 1.
    pub batch_size: usize,
    /// Protocol violations tolerated before the connection is closed with
    /// `too_many_errors`; zero is treated as 1.
    pub max_violations: u32,
    /// This running node's random id (sent in the handshake): tells a clone of this
    /// terminal (same posId, another node) from a connection to itself.
    pub instance: Option<String>,
    /// `p2p_auto_sync`: send the peer what it lacks on connect, then push every change
    /// live. When false, this node sends only when asked: a `sync_request` from the peer
    /// (its "sync now" or a gap), or [`Session::request_sync`] here ("sync now", both ways).
    pub auto_sync: bool,
    /// The fingerprint of the change this node holds at each origin's number of the summary
    /// given to [`Session::new`] (sent as the `hello`'s `heads`).
    pub heads: BTreeMap<PosId, String>,
}

/// Which side of the connection this session is; decides who speaks first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Dialled the peer: sends `hello` at once and waits for `hello-ack`.
    Initiator,
    /// Accepted the connection: waits for `hello` and answers `hello-ack`.
    Responder,
}

/// Who the peer is, as it introduced itself in the handshake.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerInfo {
    /// The peer's terminal id.
    pub pos_id: PosId,
    /// The peer's display name.
    pub pos_name: String,
    /// The peer's node version vector at handshake time.
    pub summary: VersionVector,
    /// The fingerprints of the changes the peer holds at its summary's numbers (empty from a
    /// peer that does not send them).
    pub heads: BTreeMap<PosId, String>,
}

/// What the driver answers to an [`Event::Apply`] once the store has applied it
/// ([`Session::batch_applied`]): only what the session acts on. The store's own, fuller
/// account is `possync_store::ApplyReport`, which makes this with `into_batch_applied`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BatchApplied {
    /// True when the store refused a change because an earlier change from the same origin
    /// is missing; the session then asks the peer for what is missing.
    pub gap: bool,
    /// The node version vector after applying, sent in that request.
    pub local_summary: VersionVector,
    /// Changes the store refused as invalid (negative price, unknown product...), in words:
    /// each is reported to the peer with an `invalid_entity` error frame (SPEC 8). The peer
    /// is not disconnected for them: the change is valid protocol, only its content is bad.
    pub rejections: Vec<String>,
    /// Set when the store held changes back because they are stamped too far ahead of this
    /// terminal's clock: the time (ms) at which the first of them comes within the limit. The
    /// session asks the peer again then (with `local_summary`), not at once: asking now would
    /// only bring them back to be refused again.
    pub retry_at_ms: Option<u64>,
}

/// Most `invalid_entity` error frames sent for one applied batch.
pub const MAX_REJECTIONS_REPORTED: usize = 10;

/// Per-connection counters (SPEC 5). Every frame counts, pings and malformed ones included;
/// bytes are the frame's text bytes (the plaintext, before the secure channel).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionStats {
    /// Frames handed out by [`Session::poll_transmit`].
    pub messages_sent: u64,
    /// Frames passed to [`Session::handle_frame`].
    pub messages_received: u64,
    /// Text bytes of the frames sent.
    pub bytes_sent: u64,
    /// Text bytes of the frames received.
    pub bytes_received: u64,
    /// When the last ping was queued (ms), if ever.
    pub last_ping: Option<u64>,
    /// When the last pong arrived (ms), if ever.
    pub last_pong: Option<u64>,
}

/// What the session tells its driver. Drain with [`Session::poll_event`] after every input.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The handshake completed (log a `connected` metric row).
    Established {
        /// Who the peer is.
        peer: PeerInfo,
    },
    /// Outgoing catch-up needs the next batch: select from the change log every change
    /// after log position `after_cursor` whose seq is above `since` for its origin, at most
    /// `limit` of them in log order, then call [`Session::provide_batch`].
    NeedBatch {
        /// What the peer holds: select changes above it.
        since: VersionVector,
        /// Log position after which to select (0: from the start).
        after_cursor: u64,
        /// Most changes to select.
        limit: usize,
    },
    /// Changes from the peer to apply, in this order, through the single writer; then call
    /// [`Session::batch_applied`] (once per `Apply`, in the order they were emitted).
    Apply {
        /// The changes, each with the stamp the frame parser read (its origin and seq) and
        /// verbatim (decode with [`crate::Change::from_wire`]): the stamp travels with the
        /// change to the store, which does not read it again.
        changes: Vec<StampedChange>,
        /// True for a catch-up batch, false for one live change.
        from_batch: bool,
    },
    /// A catch-up from the peer finished applying (log a `sync_completed` metric row).
    CatchUpCompleted {
        /// From the start of this catch-up (handshake, or our `sync_request`) to its last
        /// batch applied.
        duration_ms: u64,
        /// Changes received in its batches (duplicates included).
        changes_received: u64,
    },
    /// Another running terminal uses this terminal's posId (it introduced itself with it, or
    /// refused us for it): a cloned disk or a copied data directory. Alert; a `Closed` follows.
    IdentityClash {
        /// The other node's instance id, when it said it.
        instance: String,
    },
    /// The peer was silent too long (log `heartbeat_timeout`); a `Closed` follows.
    HeartbeatTimeout,
    /// The peer broke the protocol (log a `p2p_sync_logs` error row). The `error` frame is
    /// already queued; a `Closed` follows when the violation is fatal.
    ProtocolViolation {
        /// What was wrong (its [`ProtocolError::code`] and text were sent to the peer).
        error: ProtocolError,
        /// The offending frame's `type`, empty when unreadable.
        message_type: String,
        /// The offending frame's `action`, empty when unreadable.
        message_action: String,
    },
    /// The peer closes this connection because it keeps another one between the same two
    /// terminals (the tie-break, [`DUPLICATE_CONNECTION`]): the link goes on through the other
    /// connection, so this is not a disconnection to log.
    Superseded,
    /// The peer sent an `error` frame: it refused something we sent (log it; the session
    /// stays open unless this happens during the handshake).
    PeerError {
        /// The peer's error code.
        code: String,
        /// The peer's explanation.
        message: String,
    },
    /// The session is over (emitted exactly once). Drain `poll_transmit`, then close the
    /// socket and log `disconnected` with the final [`ConnectionStats`].
    Closed {
        /// Why, in words.
        reason: String,
    },
}

/// The protocol state of one connection to one peer.
///
/// Methods come in four groups, as in quinn-proto's `Connection`:
///
/// - getters: [`stats`](Self::stats), [`peer`](Self::peer), [`is_closed`](Self::is_closed),
///   [`is_established`](Self::is_established), [`is_live`](Self::is_live),
///   [`peer_known`](Self::peer_known), [`poll_timeout`](Self::poll_timeout);
/// - inputs: [`handle_frame`](Self::handle_frame), [`handle_timeout`](Self::handle_timeout);
/// - commands from the node: [`send_change`](Self::send_change),
///   [`provide_batch`](Self::provide_batch), [`batch_applied`](Self::batch_applied),
///   [`request_sync`](Self::request_sync), [`close`](Self::close);
/// - outputs: [`poll_transmit`](Self::poll_transmit), [`poll_event`](Self::poll_event).
///
/// After any input or command, drain `poll_transmit` and `poll_event` until both return
/// `None`, then re-read `poll_timeout`.
#[derive(Debug)]
pub struct Session {
    /// Settings for this connection.
    config: SessionConfig,
    /// Who spoke first.
    role: Role,
    /// Our node version vector as given at creation, sent in the handshake.
    local_summary: VersionVector,
    /// The latest time passed in; stamps frames queued by commands that take no time.
    now_ms: u64,
    /// Number of the next frame id (`<posId>-<n>`).
    next_message_number: u64,
    /// Handshaking, established or closed.
    state: State,
    /// The peer, once it introduced itself.
    peer: Option<PeerInfo>,
    /// Lower bound of what the peer holds: its hello summary plus every change sent to or
    /// received from it. A change below it is never sent again (no echo to the origin).
    peer_known: VersionVector,
    /// Our catch-up towards the peer, then live sending.
    outgoing: Outgoing,
    /// The peer's catch-up towards us and the applies in progress.
    incoming: Incoming,
    /// When the last frame (of any kind) arrived.
    last_received_ms: u64,
    /// When the peer counts as dead: a heartbeat period (plus the grace) after the last frame,
    /// with the period in force when that frame arrived. A period changed later applies
    /// from the next frame: a peer is judged on the deadline it was given.
    dead_at_ms: u64,
    /// When to send the next ping (only once established).
    next_ping_ms: Option<u64>,
    /// Protocol violations so far.
    violations: u32,
    /// Frames waiting for `poll_transmit`.
    transmits: VecDeque<String>,
    /// Events waiting for `poll_event`.
    events: VecDeque<Event>,
    /// Counters.
    stats: ConnectionStats,
    /// Our own live connections, as last told by the driver (shared by every session).
    local_neighbors: Arc<BTreeSet<PosId>>,
    /// A digest of the neighbour list last sent to the peer (a node with many peers must not
    /// keep a copy of the list per connection).
    neighbors_sent: Option<u64>,
    /// The peer's live connections, as it last told us: changes from those terminals reach
    /// it first-hand, so they are not relayed to it.
    peer_neighbors: BTreeSet<PosId>,
}

/// The connection's lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Waiting for the peer's hello (responder) or hello-ack (initiator).
    Handshaking,
    /// Handshake done: everything flows.
    Established,
    /// Over: inputs are ignored, nothing new is queued.
    Closed,
}

/// Where outgoing catch-up stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Not started (before the handshake).
    Idle,
    /// `NeedBatch` emitted; waiting for `provide_batch`.
    Selecting,
    /// A batch sent; waiting for the peer's `sync_ack` before the next one.
    AwaitingAck {
        /// Whether more batches follow this one.
        has_more: bool,
    },
    /// Catch-up done: live changes go out at once.
    Live,
}

/// Outgoing catch-up and the live changes held back meanwhile.
#[derive(Debug)]
struct Outgoing {
    /// Where catch-up stands.
    phase: Phase,
    /// What the peer holds, as this catch-up round assumes: select changes above it.
    since: VersionVector,
    /// Log position of the last change selected (the driver's cursor).
    cursor: u64,
    /// A restart asked for (by a `sync_request`) while a selection or a batch was in flight;
    /// applied as soon as neither is.
    restart: Option<VersionVector>,
    /// Live changes passed to `send_change` while not live; flushed (minus what the peer
    /// got by then) when catch-up ends.
    buffered: Vec<StampedChange>,
    /// The buffer overflowed during this round: run catch-up again instead of flushing.
    overflowed: bool,
}

/// The peer's catch-up towards us and the applies in progress.
#[derive(Debug, Default)]
struct Incoming {
    /// One entry per `Apply` emitted and not yet answered by `batch_applied`, in order.
    pending_applies: VecDeque<PendingApply>,
    /// A `sync_batch` is being applied: its `sync_ack` has not been sent yet. The peer may
    /// not send another meanwhile.
    batch_in_progress: bool,
    /// When the current incoming catch-up started (handshake, our `sync_request`, or its
    /// first batch when the peer started it unasked).
    round_started_ms: Option<u64>,
    /// Changes received in the current incoming catch-up.
    round_changes: u64,
    /// A `sync_request` was sent and its catch-up has not finished.
    request_outstanding: bool,
    /// When to ask the peer again for changes held back for their clock stamp, and the
    /// summary to ask with ([`BatchApplied::retry_at_ms`]).
    retry: Option<(u64, VersionVector)>,
}

/// What an `Apply` event was for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PendingApply {
    /// A catch-up batch: acknowledge it once applied.
    Batch {
        /// Changes in the batch.
        count: u64,
        /// False for the last batch of a catch-up.
        has_more: bool,
    },
    /// One live change: nothing to acknowledge.
    Live,
}

impl SessionConfig {
    /// Settings with the SPEC's defaults: 30 s heartbeat, batches of 100, 10 violations.
    pub fn new(pos_id: PosId, pos_name: impl Into<String>) -> SessionConfig {
        SessionConfig {
            pos_id,
            pos_name: pos_name.into(),
            heartbeat_interval_ms: 30_000,
            batch_size: 100,
            max_violations: 10,
            auto_sync: true,
            instance: None,
            heads: BTreeMap::new(),
        }
    }
}

impl Session {
    /// A session for a freshly opened (and secured) connection. An initiator queues its
    /// `hello` at once. `local_summary` is this node's version vector now.
    pub fn new(config: SessionConfig, role: Role, local_summary: VersionVector, now_ms: u64) -> Session {
        let mut session = Session {
            config,
            role,
            local_summary,
            now_ms,
            next_message_number: 1,
            state: State::Handshaking,
            peer: None,
            peer_known: VersionVector::new(),
            outgoing: Outgoing {
                phase: Phase::Idle,
                since: VersionVector::new(),
                cursor: 0,
                restart: None,
                buffered: Vec::new(),
                overflowed: false,
            },
            incoming: Incoming::default(),
            last_received_ms: now_ms,
            dead_at_ms: 0,
            next_ping_ms: None,
            violations: 0,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            stats: ConnectionStats::default(),
            local_neighbors: Arc::default(),
            neighbors_sent: None,
            peer_neighbors: BTreeSet::new(),
        };
        session.dead_at_ms = now_ms + session.dead_after();
        if role == Role::Initiator {
            let hello = session.hello();
            session.queue(Body::Hello(hello));
        }
        session
    }

    // ----- getters -----

    /// The connection's counters.
    pub fn stats(&self) -> &ConnectionStats {
        &self.stats
    }

    /// The peer, once the handshake completed.
    pub fn peer(&self) -> Option<&PeerInfo> {
        self.peer.as_ref()
    }

    /// Which side of the connection this is.
    pub fn role(&self) -> Role {
        self.role
    }

    /// True once the session is over (after the single [`Event::Closed`]).
    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// True between the handshake and the close.
    pub fn is_established(&self) -> bool {
        self.state == State::Established
    }

    /// True when outgoing catch-up is done and live changes go out at once.
    pub fn is_live(&self) -> bool {
        self.is_established() && self.outgoing.phase == Phase::Live
    }

    /// What the peer is known to hold (a lower bound).
    pub fn peer_known(&self) -> &VersionVector {
        &self.peer_known
    }

    /// When [`handle_timeout`](Self::handle_timeout) must next be called (ms): the next ping
    /// or the moment the peer counts as dead, whichever is first. `None` once closed.
    pub fn poll_timeout(&self) -> Option<u64> {
        if self.is_closed() {
            return None;
        }
        let dead_at = self.dead_at();
        let next = self.next_ping_ms.map_or(dead_at, |ping_at| ping_at.min(dead_at));
        Some(self.incoming.retry.as_ref().map_or(next, |(retry_at, _)| next.min(*retry_at)))
    }

    // ----- inputs -----

    /// A plaintext text frame from the peer. Never panics, whatever the text.
    pub fn handle_frame(&mut self, now_ms: u64, text: &str) {
        if self.is_closed() {
            return;
        }
        self.now_ms = now_ms;
        self.last_received_ms = now_ms;
        self.dead_at_ms = now_ms + self.dead_after();
        self.stats.messages_received += 1;
        self.stats.bytes_received += text.len() as u64;
        let message = match Message::parse(text) {
            Ok(message) => message,
            Err(error) => {
                let (message_type, message_action) = peek_type_action(text);
                self.violation(error, message_type, message_action);
                return;
            }
        };
        match self.state {
            State::Handshaking => self.handle_handshake(message),
            State::Established => self.handle_established(message),
            State::Closed => {}
        }
    }

    /// The time returned by [`poll_timeout`](Self::poll_timeout) was reached: sends a ping when
    /// due, or declares the peer dead.
    pub fn handle_timeout(&mut self, now_ms: u64) {
        if self.is_closed() {
            return;
        }
        self.now_ms = now_ms;
        if now_ms >= self.dead_at() {
            self.events.push_back(Event::HeartbeatTimeout);
            let silent = now_ms.saturating_sub(self.last_received_ms);
            self.close_with(format!("heartbeat timeout: nothing received for {silent} ms"));
            return;
        }
        if let Some(ping_at) = self.next_ping_ms
            && now_ms >= ping_at
        {
            self.queue(Body::Ping);
            self.stats.last_ping = Some(now_ms);
            self.next_ping_ms = Some(now_ms + self.heartbeat_interval());
        }
        // A catch-up already under way brings the held-back changes again by itself.
        if self.incoming.retry.as_ref().is_some_and(|(retry_at, _)| now_ms >= *retry_at)
            && let Some((_, summary)) = self.incoming.retry.take()
            && self.state == State::Established
            && !self.incoming.request_outstanding
        {
            self.send_sync_request(summary);
        }
    }

    // ----- commands -----

    /// Passes on a change (local, or applied from another peer) to this peer. Skipped when
    /// the peer already has it; held back while outgoing catch-up runs. A change without
    /// sync stamps is not sent (no peer could apply it; the store never holds one).
    pub fn send_change(&mut self, change: &WireChange) {
        if self.is_closed() {
            return;
        }
        let Ok(change) = StampedChange::new(change.clone(), "data") else {
            return;
        };
        if self.is_live() {
            self.transmit_change(change);
            return;
        }
        if self.peer_known.get(&change.origin) >= change.seq {
            return;
        }
        if !self.config.auto_sync && self.outgoing.phase == Phase::Idle {
            // Not pushed: the next "sync now" selects it from the store.
            return;
        }
        if self.outgoing.buffered.len() >= MAX_BUFFERED_CHANGES {
            self.outgoing.buffered = Vec::new();
            self.outgoing.overflowed = true;
        }
        self.outgoing.buffered.push(change);
    }

    /// The answer to [`Event::NeedBatch`]: the selected changes, the log position of the
    /// last one examined, and whether more remain. Sends them as one `sync_batch` (an empty
    /// one too, so that the peer can complete). Ignored when no batch was asked for.
    pub fn provide_batch(&mut self, changes: Vec<WireChange>, next_cursor: u64, has_more: bool) {
        if self.state != State::Established || self.outgoing.phase != Phase::Selecting {
            return;
        }
        if let Some(since) = self.outgoing.restart.take() {
            // Selected for a round the peer has since replaced: select again.
            self.begin_catch_up(since);
            return;
        }
        let changes: Vec<StampedChange> =
            changes.into_iter().filter_map(|change| StampedChange::new(change, "data").ok()).collect();
        for change in &changes {
            self.peer_known.observe(&change.origin, change.seq);
        }
        self.queue(Body::SyncBatch(SyncBatch { changes, has_more }));
        self.outgoing.cursor = next_cursor;
        self.outgoing.phase = Phase::AwaitingAck { has_more };
    }

    /// The answer to [`Event::Apply`], once per `Apply`, in order. Acknowledges a batch,
    /// reports a finished catch-up, and asks the peer for what is missing after a gap.
    pub fn batch_applied(&mut self, now_ms: u64, report: BatchApplied) {
        if self.state != State::Established {
            return;
        }
        self.now_ms = now_ms;
        let Some(applied) = self.incoming.pending_applies.pop_front() else {
            return;
        };
        if let PendingApply::Batch { count, has_more } = applied {
            self.queue(Body::SyncAck(SyncAck { count }));
            self.incoming.batch_in_progress = false;
            self.incoming.round_changes += count;
            if !has_more {
                let started = self.incoming.round_started_ms.take().unwrap_or(now_ms);
                self.events.push_back(Event::CatchUpCompleted {
                    duration_ms: now_ms.saturating_sub(started),
                    changes_received: self.incoming.round_changes,
                });
                self.incoming.round_changes = 0;
                self.incoming.request_outstanding = false;
            }
        }
        for rejection in report.rejections.iter().take(MAX_REJECTIONS_REPORTED) {
            let message: String = rejection.chars().take(500).collect();
            self.queue(Body::Error(ErrorData { code: "invalid_entity".into(), message }));
        }
        if let Some(retry_at) = report.retry_at_ms {
            let at = self.incoming.retry.as_ref().map_or(retry_at, |(at, _)| retry_at.min(*at));
            self.incoming.retry = Some((at, report.local_summary.clone()));
        }
        if report.gap && !self.incoming.request_outstanding {
            self.send_sync_request(report.local_summary);
        }
    }

    /// "Sync now": asks the peer for everything above `local_summary`. The catch-up it
    /// triggers is timed from its first batch (this command takes no time).
    pub fn request_sync(&mut self, local_summary: VersionVector) {
        if self.state != State::Established {
            return;
        }
        self.send_sync_request(local_summary);
        if !self.config.auto_sync {
            // Both ways: with no live push, the peer lacks what was written since.
            let since = self.peer_known.clone();
            self.restart_catch_up(since);
        }
    }

    /// Tells the session which terminals this node is directly connected to (other than
    /// this peer); the peer is told when the set changes, so that it does not relay their
    /// changes to us.
    pub fn set_neighbors(&mut self, neighbors: Arc<BTreeSet<PosId>>) {
        self.local_neighbors = neighbors;
        self.send_neighbors();
    }

    /// Runs outgoing catch-up again from what the peer is known to hold. The driver calls
    /// this when it fell behind the node's stream of changes and some never reached
    /// [`send_change`](Self::send_change): the store still has them.
    pub fn resync(&mut self) {
        if self.is_established() && self.config.auto_sync {
            let since = self.peer_known.clone();
            self.restart_catch_up(since);
        }
    }

    /// Applies changed settings to a live session (SPEC: settings take effect without a
    /// restart): the heartbeat period from the next ping on (the peer keeps the deadline it
    /// was given until it next answers), the batch size from the next batch.
    pub fn update_settings(&mut self, heartbeat_interval_ms: u64, batch_size: usize, auto_sync: bool) {
        self.config.heartbeat_interval_ms = heartbeat_interval_ms;
        self.config.batch_size = batch_size;
        if auto_sync != self.config.auto_sync {
            self.config.auto_sync = auto_sync;
            if self.is_established() {
                if auto_sync {
                    // Switched on: send what the peer lacks, then live.
                    let since = self.peer_known.clone();
                    self.restart_catch_up(since);
                } else if self.outgoing.phase == Phase::Live {
                    self.outgoing.phase = Phase::Idle;
                }
            }
        }
        if let Some(ping_at) = self.next_ping_ms {
            self.next_ping_ms = Some(ping_at.min(self.now_ms + self.heartbeat_interval()));
        }
    }

    /// Ends the session: emits [`Event::Closed`] once. Frames already queued can still be
    /// polled; nothing new is queued.
    pub fn close(&mut self, reason: &str) {
        self.close_with(reason.to_string());
    }

    /// Ends the session because this node keeps another connection to the same peer (the
    /// tie-break): tells the peer so ([`DUPLICATE_CONNECTION`], which it sees as
    /// [`Event::Superseded`]), then closes.
    pub fn close_as_duplicate(&mut self) {
        let message = "another connection between these two terminals is kept".to_string();
        self.queue(Body::Error(ErrorData { code: DUPLICATE_CONNECTION.to_string(), message }));
        self.close_with("duplicate connection".to_string());
    }

    // ----- outputs -----

    /// The next frame to send, counted in the stats.
    pub fn poll_transmit(&mut self) -> Option<String> {
        let frame = self.transmits.pop_front()?;
        self.stats.messages_sent += 1;
        self.stats.bytes_sent += frame.len() as u64;
        Some(frame)
    }

    /// The next event for the driver.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    // ----- handshake -----

    fn handle_handshake(&mut self, message: Message) {
        let kind = message.body.kind().to_string();
        let action = message.body.action().to_string();
        match (self.role, message.body) {
            (Role::Responder, Body::Hello(hello)) | (Role::Initiator, Body::HelloAck(hello)) => {
                if hello.pos_id != message.source_pos {
                    let error = ProtocolError::InvalidField {
                        field: "data.posId".into(),
                        reason: "differs from sourcePos".into(),
                    };
                    self.violation(error, kind, action);
                    return;
                }
                if hello.pos_id == self.config.pos_id {
                    let clone = matches!((&hello.instance, &self.config.instance), (Some(theirs), Some(ours)) if theirs != ours);
                    if clone {
                        self.events
                            .push_back(Event::IdentityClash { instance: hello.instance.unwrap_or_default() });
                        self.violation(ProtocolError::IdentityClash, kind, action);
                    } else {
                        self.violation(ProtocolError::SelfConnection, kind, action);
                    }
                    return;
                }
                if self.role == Role::Responder {
                    let ours = self.hello();
                    self.queue(Body::HelloAck(ours));
                }
                self.establish(hello);
            }
            (_, Body::Error(error)) => {
                if error.code == IDENTITY_CLASH {
                    self.events.push_back(Event::IdentityClash { instance: String::new() });
                }
                let reason = format!("peer refused the handshake: {}", error.code);
                self.events.push_back(Event::PeerError { code: error.code, message: error.message });
                self.close_with(reason);
            }
            (_, Body::Hello(_) | Body::HelloAck(_)) => {
                let error = ProtocolError::UnexpectedMessage(format!("{kind} sent to the wrong side"));
                self.violation(error, kind, action);
            }
            _ => {
                let error = ProtocolError::HandshakeRequired(kind.clone());
                self.violation(error, kind, action);
            }
        }
    }

    fn hello(&self) -> Hello {
        Hello {
            pos_id: self.config.pos_id.clone(),
            pos_name: self.config.pos_name.clone(),
            protocol_version: PROTOCOL_VERSION,
            summary: self.local_summary.clone(),
            instance: self.config.instance.clone(),
            heads: self.config.heads.clone(),
        }
    }

    fn establish(&mut self, hello: Hello) {
        let peer = PeerInfo {
            pos_id: hello.pos_id,
            pos_name: hello.pos_name,
            summary: hello.summary,
            heads: hello.heads,
        };
        self.state = State::Established;
        self.peer_known.merge(&peer.summary);
        self.next_ping_ms = Some(self.now_ms + self.heartbeat_interval());
        self.incoming.round_started_ms = Some(self.now_ms);
        self.peer = Some(peer.clone());
        let since = peer.summary.clone();
        self.events.push_back(Event::Established { peer });
        self.send_neighbors();
        if self.config.auto_sync {
            self.begin_catch_up(since);
        } else {
            // Nothing is sent until asked; what the peer holds is remembered for then.
            self.outgoing.since = since;
            self.incoming.round_started_ms = None;
        }
    }

    // ----- established -----

    fn handle_established(&mut self, message: Message) {
        let kind = message.body.kind().to_string();
        let action = message.body.action().to_string();
        if self.peer.as_ref().is_some_and(|peer| peer.pos_id != message.source_pos) {
            let error = ProtocolError::InvalidField {
                field: "sourcePos".into(),
                reason: "is not the peer's posId".into(),
            };
            self.violation(error, kind, action);
            return;
        }
        match message.body {
            Body::Hello(_) | Body::HelloAck(_) => {
                let error = ProtocolError::UnexpectedMessage(format!("{kind} after the handshake"));
                self.violation(error, kind, action);
            }
            Body::Ping => self.queue(Body::Pong(Pong { ping: message.id })),
            Body::Pong(_) => self.stats.last_pong = Some(self.now_ms),
            Body::Change(change) => {
                self.peer_known.observe(&change.origin, change.seq);
                self.incoming.pending_applies.push_back(PendingApply::Live);
                self.events.push_back(Event::Apply { changes: vec![change], from_batch: false });
            }
            Body::SyncBatch(batch) => {
                if self.incoming.batch_in_progress {
                    let error = ProtocolError::UnexpectedMessage(
                        "sync_batch before the previous one was acknowledged".into(),
                    );
                    self.violation(error, kind, action);
                    return;
                }
                for change in &batch.changes {
                    self.peer_known.observe(&change.origin, change.seq);
                }
                self.incoming.batch_in_progress = true;
                self.incoming.round_started_ms.get_or_insert(self.now_ms);
                let count = batch.changes.len() as u64;
                self.incoming
                    .pending_applies
                    .push_back(PendingApply::Batch { count, has_more: batch.has_more });
                self.events.push_back(Event::Apply { changes: batch.changes, from_batch: true });
            }
            Body::SyncAck(_) => self.handle_sync_ack(kind, action),
            Body::SyncRequest(request) => self.restart_catch_up(request.summary),
            Body::Peers(peers) => {
                let connected: BTreeSet<PosId> = peers.connected.into_iter().collect();
                let lost_one = self.peer_neighbors.difference(&connected).next().is_some();
                self.peer_neighbors = connected;
                if lost_one {
                    // Changes not relayed while the peer was connected to their origin may
                    // never have reached it: send whatever it lacks.
                    self.resync();
                }
            }
            Body::Error(error) if error.code == DUPLICATE_CONNECTION => {
                self.events.push_back(Event::Superseded)
            }
            Body::Error(error) => {
                self.events.push_back(Event::PeerError { code: error.code, message: error.message });
            }
        }
    }

    fn handle_sync_ack(&mut self, kind: String, action: String) {
        let Phase::AwaitingAck { has_more } = self.outgoing.phase else {
            let error = ProtocolError::UnexpectedMessage("sync_ack with no batch in flight".into());
            self.violation(error, kind, action);
            return;
        };
        if let Some(since) = self.outgoing.restart.take() {
            self.begin_catch_up(since);
        } else if has_more {
            self.need_batch();
        } else {
            self.go_live();
        }
    }

    // ----- outgoing catch-up -----

    /// Starts a catch-up round from `since`, at the start of the log.
    fn begin_catch_up(&mut self, since: VersionVector) {
        self.outgoing.since = since;
        self.outgoing.cursor = 0;
        // Whatever overflowed the buffer so far is in the store already, and this round
        // selects after it.
        self.outgoing.overflowed = false;
        self.need_batch();
    }

    fn need_batch(&mut self) {
        self.outgoing.phase = Phase::Selecting;
        self.events.push_back(Event::NeedBatch {
            since: self.outgoing.since.clone(),
            after_cursor: self.outgoing.cursor,
            limit: self.config.batch_size.max(1),
        });
    }

    /// The peer asked for everything above `since`: start over, once nothing is in flight.
    fn restart_catch_up(&mut self, since: VersionVector) {
        match self.outgoing.phase {
            Phase::Idle | Phase::Live => self.begin_catch_up(since),
            Phase::Selecting | Phase::AwaitingAck { .. } => self.outgoing.restart = Some(since),
        }
    }

    /// The last batch was acknowledged: flush what was held back, or run again if the
    /// buffer overflowed.
    fn go_live(&mut self) {
        if self.outgoing.overflowed {
            let since = self.peer_known.clone();
            self.begin_catch_up(since);
            return;
        }
        if !self.config.auto_sync {
            // A catch-up asked for is done; nothing is pushed live.
            self.outgoing.phase = Phase::Idle;
            self.outgoing.buffered.clear();
            return;
        }
        self.outgoing.phase = Phase::Live;
        for change in std::mem::take(&mut self.outgoing.buffered) {
            self.transmit_change(change);
        }
    }

    /// Sends one live change unless the peer has it.
    fn transmit_change(&mut self, change: StampedChange) {
        if self.peer_known.get(&change.origin) >= change.seq {
            return;
        }
        if change.origin != self.config.pos_id && self.peer_neighbors.contains(&change.origin) {
            // The peer is connected to the change's origin and gets it from there.
            return;
        }
        self.peer_known.observe(&change.origin, change.seq);
        self.queue(Body::Change(change));
    }

    // ----- incoming catch-up -----

    /// Sends our neighbour list when established and changed since last sent (an empty
    /// list is only sent to replace a non-empty one).
    fn send_neighbors(&mut self) {
        if !self.is_established() {
            return;
        }
        let peer = self.peer.as_ref().map(|peer| &peer.pos_id);
        let neighbors = || self.local_neighbors.iter().filter(|id| Some(*id) != peer);
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        neighbors().for_each(|id| id.hash(&mut hasher));
        let digest = hasher.finish();
        let unchanged = match self.neighbors_sent {
            Some(sent) => sent == digest,
            None => neighbors().next().is_none(),
        };
        if unchanged {
            return;
        }
        let connected = neighbors().cloned().collect();
        self.queue(Body::Peers(Peers { connected }));
        self.neighbors_sent = Some(digest);
    }

    fn send_sync_request(&mut self, summary: VersionVector) {
        self.incoming.request_outstanding = true;
        self.incoming.round_started_ms.get_or_insert(self.now_ms);
        self.queue(Body::SyncRequest(SyncRequest { summary }));
    }

    // ----- errors, closing, plumbing -----

    /// Reports a violation to the peer and the driver; closes when fatal, during the
    /// handshake, or when the error budget is spent.
    fn violation(&mut self, error: ProtocolError, message_type: String, message_action: String) {
        self.violations += 1;
        let code = error.code();
        let message = error.to_string();
        self.queue(Body::Error(ErrorData { code: code.to_string(), message: message.clone() }));
        let fatal = error.is_fatal();
        self.events.push_back(Event::ProtocolViolation { error, message_type, message_action });
        if fatal || self.state == State::Handshaking {
            self.close_with(format!("protocol violation ({code}): {message}"));
            return;
        }
        if self.violations >= self.config.max_violations.max(1) {
            let too_many = ProtocolError::TooManyErrors(self.violations);
            let reason = too_many.to_string();
            self.queue(Body::Error(ErrorData { code: too_many.code().to_string(), message: reason.clone() }));
            self.close_with(reason);
        }
    }

    fn close_with(&mut self, reason: String) {
        if self.is_closed() {
            return;
        }
        self.state = State::Closed;
        self.next_ping_ms = None;
        self.events.push_back(Event::Closed { reason });
    }

    /// Wraps `body` in an envelope and queues it, unless closed.
    fn queue(&mut self, body: Body) {
        if self.is_closed() {
            return;
        }
        let message = Message {
            id: format!("{}-{}", self.config.pos_id, self.next_message_number),
            timestamp: rfc3339_ms(self.now_ms),
            source_pos: self.config.pos_id.clone(),
            body,
        };
        self.next_message_number += 1;
        self.transmits.push_back(message.encode());
    }

    fn heartbeat_interval(&self) -> u64 {
        self.config.heartbeat_interval_ms.max(1)
    }

    fn dead_after(&self) -> u64 {
        self.heartbeat_interval() + DEAD_AFTER_EXTRA_MS
    }

    fn dead_at(&self) -> u64 {
        self.dead_at_ms
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;
    use crate::protocol::test_util::{Net, T0, change, config, data_json, pos, vv};

    /// A frame as a peer would write it.
    fn frame(kind: &str, action: &str, data: Value, source: &str) -> String {
        json!({
            "id": format!("{source}-99"),
            "type": kind,
            "action": action,
            "data": data,
            "timestamp": "2025-11-23T10:05:00.000Z",
            "sourcePos": source,
        })
        .to_string()
    }

    fn hello_frame(kind: &str, source: &str, version: u64) -> String {
        let action = if kind == "hello" { "request" } else { "accept" };
        let data = json!({"posId": source, "posName": "Till", "protocolVersion": version, "summary": {}});
        frame(kind, action, data, source)
    }

    /// Everything the session queued: frames, then events.
    fn drain(session: &mut Session) -> (Vec<Value>, Vec<Event>) {
        let frames = std::iter::from_fn(|| session.poll_transmit())
            .map(|text| serde_json::from_str(&text).expect("the session writes JSON"))
            .collect();
        (frames, std::iter::from_fn(|| session.poll_event()).collect())
    }

    /// Responder "b" after a's hello, outputs drained.
    fn established() -> Session {
        let mut session = Session::new(config("b"), Role::Responder, VersionVector::new(), T0);
        session.handle_frame(T0, &hello_frame("hello", "a", 1));
        drain(&mut session);
        assert!(session.is_established());
        session
    }

    fn violation_codes(events: &[Event]) -> Vec<&str> {
        events
            .iter()
            .filter_map(|event| match event {
                Event::ProtocolViolation { error, .. } => Some(error.code()),
                _ => None,
            })
            .collect()
    }

    fn closed_count(events: &[Event]) -> usize {
        events.iter().filter(|event| matches!(event, Event::Closed { .. })).count()
    }

    fn need_batch_cursors(events: &[Event]) -> Vec<u64> {
        events
            .iter()
            .filter_map(|event| match event {
                Event::NeedBatch { after_cursor, .. } => Some(*after_cursor),
                _ => None,
            })
            .collect()
    }

    fn catch_ups(events: &[Event]) -> Vec<u64> {
        events
            .iter()
            .filter_map(|event| match event {
                Event::CatchUpCompleted { changes_received, .. } => Some(*changes_received),
                _ => None,
            })
            .collect()
    }

    fn batch_sizes(net: &Net, link: usize, end: usize) -> Vec<(usize, bool)> {
        net.links[link].sent[end]
            .iter()
            .filter_map(|text| {
                let value: Value = serde_json::from_str(text).ok()?;
                (value["type"] == "sync_batch").then(|| {
                    let changes = value["data"]["changes"].as_array().map_or(0, Vec::len);
                    (changes, value["data"]["hasMore"] == true)
                })
            })
            .collect()
    }

    #[test]
    fn handshake_establishes_both_sides() {
        let mut net = Net::pair(0, 0);
        let hello: Value = serde_json::from_str(&net.links[0].sessions[0].poll_transmit().unwrap()).unwrap();
        assert_eq!(
            hello,
            json!({
                "id": "a-1", "type": "hello", "action": "request",
                "data": {"posId": "a", "posName": "Till a", "protocolVersion": 1, "summary": {}},
                "timestamp": "2025-11-23T10:05:00.000Z", "sourcePos": "a",
            })
        );
        net.links[0].inbox[1].push_back(hello.to_string());
        net.drive();
        assert_eq!(net.sent_types(0, 1)[0], "hello-ack");
        for (end, peer) in [(0, "b"), (1, "a")] {
            let session = &net.links[0].sessions[end];
            assert!(session.is_established() && session.is_live());
            assert_eq!(session.peer().unwrap().pos_id, pos(peer));
            assert!(
                matches!(&net.events(0, end)[0], Event::Established { peer: info } if info.pos_id == pos(peer))
            );
        }
    }

    #[test]
    fn catch_up_runs_both_ways_in_acknowledged_batches() {
        let mut net = Net::pair(7, 5);
        net.drive();
        net.assert_converged();
        assert_eq!(batch_sizes(&net, 0, 0), [(3, true), (3, true), (1, false)]);
        assert_eq!(batch_sizes(&net, 0, 1), [(3, true), (2, false)]);
        assert_eq!(need_batch_cursors(net.events(0, 0)), [0, 3, 6]);
        assert_eq!(catch_ups(net.events(0, 0)), [5]);
        assert_eq!(catch_ups(net.events(0, 1)), [7]);
        let stats = net.links[0].sessions[0].stats();
        assert_eq!(stats.messages_sent, net.links[0].sent[0].len() as u64);
        assert_eq!(stats.messages_received, net.links[0].sent[1].len() as u64);
        assert_eq!(stats.bytes_sent, net.links[0].sent[0].iter().map(|f| f.len() as u64).sum::<u64>());
    }

    #[test]
    fn an_empty_catch_up_still_sends_one_final_batch() {
        let mut net = Net::pair(0, 0);
        net.drive();
        for end in 0..2 {
            assert_eq!(batch_sizes(&net, 0, end), [(0, false)]);
            assert_eq!(catch_ups(net.events(0, end)), [0]);
        }
    }

    #[test]
    fn catch_up_resumes_after_an_interruption() {
        let mut net = Net::pair(10, 0);
        while net.nodes[1].store.log.len() < 3 {
            assert!(net.step());
        }
        net.disconnect(0);
        assert!(net.nodes[1].store.log.len() < 10);
        let held = net.nodes[1].store.log.len();
        net.connect(0, 1);
        net.drive();
        net.assert_converged();
        let resent: usize = batch_sizes(&net, 1, 0).iter().map(|(count, _)| count).sum();
        assert_eq!(resent, 10 - held);
    }

    #[test]
    fn live_changes_flow_once_and_never_echo() {
        let mut net = Net::pair(2, 2);
        net.drive();
        let b_sent_before = net.links[0].sent[1].len();
        net.write(0);
        net.drive();
        net.assert_converged();
        assert_eq!(net.sent_types(0, 0).last().unwrap(), "category");
        // b applied it and relayed it to all its sessions, a's included: skipped.
        assert_eq!(net.links[0].sent[1].len(), b_sent_before);
        assert!(net.events(0, 1).iter().any(|e| matches!(e, Event::Apply { from_batch: false, .. })));
    }

    #[test]
    fn changes_are_relayed_through_a_middle_node() {
        let mut net = Net::new(&["a", "b", "c"]);
        net.connect(0, 1);
        net.connect(2, 1);
        net.drive();
        net.write(0);
        net.write(2);
        net.drive();
        net.assert_converged();
        assert_eq!(net.nodes[2].store.log.len(), 2);
        // Each change crossed each link exactly once.
        for link in 0..2 {
            let changes =
                (0..2).flat_map(|end| net.sent_types(link, end)).filter(|t| t == "category").count();
            assert_eq!(changes, 2, "link {link}");
        }
    }

    #[test]
    fn changes_made_during_catch_up_wait_for_its_end() {
        let mut net = Net::pair(7, 0);
        while batch_sizes(&net, 0, 0).last() != Some(&(1, false)) {
            assert!(net.step());
        }
        // The last batch is selected and on its way, not yet acknowledged.
        let written = net.write(0);
        assert!(!net.sent_types(0, 0).contains(&"category".to_string()));
        net.drive();
        net.assert_converged();
        let sent: Vec<Value> =
            net.links[0].sent[0].iter().map(|text| serde_json::from_str(text).unwrap()).collect();
        let last = sent.last().unwrap();
        assert_eq!((last["type"].as_str(), &last["data"]), (Some("category"), &data_json(&written)));
    }

    #[test]
    fn an_overflowing_buffer_runs_catch_up_again() {
        let mut net = Net::new(&["a", "b"]);
        net.nodes[0].store.commit_local("a");
        net.connect_with(0, 1, |id| SessionConfig { batch_size: 5_000, ..config(id) });
        while batch_sizes(&net, 0, 0).is_empty() {
            assert!(net.step());
        }
        for _ in 0..MAX_BUFFERED_CHANGES + 5 {
            net.write(0);
        }
        net.drive();
        net.assert_converged();
        assert_eq!(need_batch_cursors(net.events(0, 0)), [0, 0, 5_001, 10_001]);
        let restart = net.events(0, 0).iter().filter(|e| matches!(e, Event::NeedBatch { .. })).nth(1);
        assert!(matches!(restart, Some(Event::NeedBatch { since, .. }) if *since == vv(&[("a", 1)])));
    }

    #[test]
    fn a_gap_asks_for_what_is_missing() {
        let mut net = Net::pair(3, 0);
        net.drive();
        net.nodes[0].store.commit_local("a"); // a:4, never sent live
        net.write(0); // a:5, sent live: b refuses it (gap)
        net.drive();
        net.assert_converged();
        let requests: Vec<_> = net.sent_types(0, 1).into_iter().filter(|t| t == "sync_request").collect();
        assert_eq!(requests.len(), 1);
        let request: Value = net.links[0].sent[1]
            .iter()
            .map(|text| serde_json::from_str::<Value>(text).unwrap())
            .find(|value| value["type"] == "sync_request")
            .unwrap();
        assert_eq!(request["data"], json!({"summary": {"a": 3}}));
        assert_eq!(catch_ups(net.events(0, 1)), [3, 2]);
    }

    #[test]
    fn a_sync_request_mid_catch_up_restarts_it_after_the_batch_in_flight() {
        let mut net = Net::pair(10, 0);
        while batch_sizes(&net, 0, 0).len() < 2 {
            assert!(net.step());
        }
        let summary = net.nodes[1].store.vv.clone();
        net.links[0].sessions[1].request_sync(summary);
        net.drive();
        net.assert_converged();
        let cursors = need_batch_cursors(net.events(0, 0));
        assert_eq!(cursors[..2], [0, 3]);
        assert!(cursors[2..].contains(&0), "restarted: {cursors:?}");
    }

    #[test]
    fn sync_now_when_live_runs_an_empty_catch_up() {
        let mut net = Net::pair(2, 0);
        net.drive();
        let summary = net.nodes[1].store.vv.clone();
        net.links[0].sessions[1].request_sync(summary);
        net.drive();
        assert_eq!(batch_sizes(&net, 0, 0).last(), Some(&(0, false)));
        assert_eq!(catch_ups(net.events(0, 1)), [2, 0]);
    }

    #[test]
    fn resync_runs_outgoing_catch_up_again_from_what_the_peer_holds() {
        let mut net = Net::pair(3, 0);
        net.drive();
        let batches_before = batch_sizes(&net, 0, 0).len();
        net.links[0].sessions[0].resync();
        net.drive();
        // One more (empty: the peer holds everything) catch-up round went out.
        assert_eq!(batch_sizes(&net, 0, 0).len(), batches_before + 1);
        assert_eq!(batch_sizes(&net, 0, 0).last(), Some(&(0, false)));
    }

    #[test]
    fn changes_are_not_relayed_to_a_peer_connected_to_their_origin() {
        let mut session = established();
        // b now lives: a drained hello-ack; pretend its outgoing catch-up is over.
        session.handle_frame(T0, &frame("peers", "update", json!({"connected": ["c"]}), "a"));
        let sent_types = |session: &mut Session| -> Vec<String> {
            drain(session)
                .0
                .iter()
                .map(|frame| frame["type"].as_str().unwrap_or_default().to_string())
                .collect()
        };
        sent_types(&mut session);
        session.send_change(&change("c", 1));
        session.send_change(&change("d", 1));
        session.send_change(&change("b", 1));
        // Still in catch-up: live changes wait; finish it so they flush.
        session.provide_batch(Vec::new(), 0, false);
        session.handle_frame(T0, &frame("sync_ack", "ack", json!({"count": 0}), "a"));
        let frames = drain(&mut session).0;
        let origins: Vec<&str> =
            frames.iter().filter_map(|frame| frame["data"]["sync"]["origin"].as_str()).collect();
        assert_eq!(origins, ["d", "b"], "c's change is left to the c-a link");

        // a loses its link to c: b runs a catch-up round so that a gets what it missed.
        session.handle_frame(T0, &frame("peers", "update", json!({"connected": []}), "a"));
        let (_, events) = drain(&mut session);
        assert!(events.iter().any(|event| matches!(event, Event::NeedBatch { .. })), "{events:?}");
    }

    #[test]
    fn neighbours_are_announced_when_they_change() {
        let mut session = established();
        session.set_neighbors(Arc::new([pos("a"), pos("c")].into_iter().collect()));
        let frames = drain(&mut session).0;
        let peers: Vec<&Value> = frames.iter().filter(|frame| frame["type"] == "peers").collect();
        assert_eq!(peers.len(), 1);
        // The peer itself is left out of the list it is sent.
        assert_eq!(peers[0]["data"]["connected"], json!(["c"]));
        session.set_neighbors(Arc::new([pos("c")].into_iter().collect()));
        assert!(
            drain(&mut session).0.iter().all(|frame| frame["type"] != "peers"),
            "unchanged: not sent again"
        );
    }

    #[test]
    fn refused_entities_are_reported_to_the_peer_without_closing() {
        let mut session = established();
        session.handle_frame(T0, &frame("product", "update", data_json(&change("a", 1)), "a"));
        drain(&mut session);
        let rejections = vec!["product/update p1: invalid price: must not be negative".to_string()];
        session.batch_applied(
            T0,
            BatchApplied { gap: false, local_summary: vv(&[("a", 1)]), rejections, retry_at_ms: None },
        );
        let (frames, events) = drain(&mut session);
        let errors: Vec<&Value> = frames.iter().filter(|frame| frame["type"] == "error").collect();
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0]["data"]["code"], "invalid_entity");
        assert!(errors[0]["data"]["message"].as_str().unwrap().contains("must not be negative"));
        assert!(!session.is_closed() && closed_count(&events) == 0);
    }

    #[test]
    fn settings_apply_to_a_live_session() {
        let mut session = established();
        let first_deadline = session.poll_timeout().unwrap();
        session.update_settings(200, 7, true);
        assert!(session.poll_timeout().unwrap() <= T0 + 200, "the next ping moves closer");
        assert!(session.poll_timeout().unwrap() < first_deadline);
        session.handle_timeout(T0 + 200);
        let (frames, _) = drain(&mut session);
        assert!(frames.iter().any(|frame| frame["type"] == "ping"));
    }

    #[test]
    fn a_shorter_heartbeat_does_not_judge_a_peer_on_a_deadline_it_was_never_given() {
        // Idle for 22 s under a 30 s period, then the period drops to 3 s (issue 10, item 9).
        let mut session = established();
        session.update_settings(3_000, 100, true);
        session.handle_timeout(T0 + 22_000);
        let (frames, events) = drain(&mut session);
        assert!(!session.is_closed(), "{events:?}");
        assert_eq!(frames.iter().filter(|frame| frame["type"] == "ping").count(), 1);
        // The peer answers: from then on the new period is its deadline.
        session.handle_frame(T0 + 22_050, &frame("pong", "heartbeat", json!({"ping": "b-9"}), "a"));
        drain(&mut session);
        assert_eq!(session.poll_timeout(), Some(T0 + 25_000), "next ping at the new period");
        for ping_at in [T0 + 25_000, T0 + 28_000, T0 + 31_000, T0 + 34_000] {
            session.handle_timeout(ping_at);
        }
        assert!(!session.is_closed());
        session.handle_timeout(T0 + 22_050 + 13_000);
        let (_, events) = drain(&mut session);
        assert!(matches!(events[..], [Event::HeartbeatTimeout, Event::Closed { .. }]), "{events:?}");
        if let Event::Closed { reason } = &events[1] {
            assert!(reason.contains("13000 ms"), "{reason}");
        }
    }

    #[test]
    fn the_loser_of_the_tie_break_is_told_so_and_sees_superseded_not_an_error() {
        let mut net = Net::pair(0, 0);
        net.drive();
        net.links[0].sessions[0].close_as_duplicate();
        net.drive();
        let events = net.events(0, 1);
        assert!(events.contains(&Event::Superseded), "{events:?}");
        assert!(!events.iter().any(|event| matches!(event, Event::PeerError { .. })), "{events:?}");
        assert!(net.links[0].sessions[0].is_closed());
    }

    #[test]
    fn with_auto_sync_off_nothing_moves_until_sync_now_which_goes_both_ways() {
        let mut net = Net::new(&["a", "b"]);
        for _ in 0..3 {
            net.nodes[0].store.commit_local("a");
        }
        net.nodes[1].store.commit_local("b");
        let manual = |id: &str| SessionConfig { auto_sync: false, ..config(id) };
        net.connect_with(0, 1, manual);
        net.drive();
        net.write(0);
        net.drive();
        for end in 0..2 {
            let types = net.sent_types(0, end);
            assert!(!types.iter().any(|t| t == "sync_batch" || t == "product"), "{types:?}");
        }
        assert_eq!(net.nodes[1].store.vv.get(&pos("a")).0, 0);
        // "Sync now" on b: b gets a's four changes, a gets b's one.
        let summary = net.nodes[1].store.vv.clone();
        net.links[0].sessions[1].request_sync(summary);
        net.drive();
        net.assert_converged();
        assert_eq!(net.nodes[1].store.vv.get(&pos("a")).0, 4);
        // Still no live push afterwards.
        net.write(0);
        net.drive();
        assert_eq!(net.nodes[1].store.vv.get(&pos("a")).0, 4);
        // Switched on live: what b lacks goes, and then changes flow live.
        for end in 0..2 {
            net.links[0].sessions[end].update_settings(30_000, 100, true);
        }
        net.drive();
        net.write(0);
        net.drive();
        net.assert_converged();
        assert_eq!(net.nodes[1].store.vv.get(&pos("a")).0, 6);
    }

    #[test]
    fn heartbeat_pings_and_records_pongs() {
        let mut net = Net::pair(0, 0);
        net.drive();
        assert_eq!(net.links[0].sessions[0].poll_timeout(), Some(T0 + 30_000));
        net.run_until(T0 + 95_000);
        for end in 0..2 {
            let session = &net.links[0].sessions[end];
            assert!(!session.is_closed());
            assert_eq!(session.stats().last_ping, Some(T0 + 90_000));
            assert_eq!(session.stats().last_pong, Some(T0 + 90_000));
            assert_eq!(net.sent_types(0, end).iter().filter(|t| *t == "ping").count(), 3);
        }
        let ping: Value =
            serde_json::from_str(net.links[0].sent[0].iter().find(|t| peek_type(t) == "ping").unwrap())
                .unwrap();
        let pong: Value =
            serde_json::from_str(net.links[0].sent[1].iter().find(|t| peek_type(t) == "pong").unwrap())
                .unwrap();
        assert_eq!(pong["data"]["ping"], ping["id"]);
        assert_eq!(pong["action"], "heartbeat");
    }

    fn peek_type(text: &str) -> String {
        crate::protocol::message::peek_type_action(text).0
    }

    #[test]
    fn a_silent_peer_times_out_once() {
        let mut session = established();
        assert_eq!(session.poll_timeout(), Some(T0 + 30_000));
        session.handle_timeout(T0 + 30_000);
        let (frames, _) = drain(&mut session);
        assert_eq!(frames[0]["type"], "ping");
        assert_eq!(session.poll_timeout(), Some(T0 + 40_000));
        session.handle_timeout(T0 + 40_000);
        let (frames, events) = drain(&mut session);
        assert!(frames.is_empty());
        assert!(matches!(events[..], [Event::HeartbeatTimeout, Event::Closed { .. }]));
        assert_eq!(session.poll_timeout(), None);
        session.handle_timeout(T0 + 90_000);
        assert_eq!(drain(&mut session), (vec![], vec![]));
    }

    #[test]
    fn a_peer_that_never_says_hello_times_out() {
        let mut session = Session::new(config("b"), Role::Responder, VersionVector::new(), T0);
        assert_eq!(session.poll_timeout(), Some(T0 + 40_000));
        session.handle_timeout(T0 + 40_000);
        let (frames, events) = drain(&mut session);
        assert!(frames.is_empty());
        assert_eq!(events.len(), 2);
        assert_eq!(events[0], Event::HeartbeatTimeout);
    }

    #[test]
    fn handshake_errors_close_the_session() {
        let cases = [
            (frame("ping", "heartbeat", json!({}), "a"), "handshake_required", "ping"),
            (
                frame("product", "create", json!({"sync": {"origin": "a", "seq": 1}}), "a"),
                "handshake_required",
                "product",
            ),
            (hello_frame("hello", "a", 2), "version_mismatch", "hello"),
            (hello_frame("hello", "b", 1), "self_connection", "hello"),
            (hello_frame("hello-ack", "a", 1), "unexpected_message", "hello-ack"),
            ("{".to_string(), "bad_json", ""),
            (
                frame(
                    "hello",
                    "request",
                    json!({"posId": "z", "posName": "", "protocolVersion": 1, "summary": {}}),
                    "a",
                ),
                "invalid_field",
                "hello",
            ),
        ];
        for (text, code, kind) in cases {
            let mut session = Session::new(config("b"), Role::Responder, VersionVector::new(), T0);
            session.handle_frame(T0, &text);
            let (frames, events) = drain(&mut session);
            assert!(session.is_closed(), "{code}");
            assert_eq!(frames.len(), 1, "{code}");
            assert_eq!(
                (frames[0]["type"].as_str(), frames[0]["data"]["code"].as_str()),
                (Some("error"), Some(code))
            );
            assert!(
                matches!(&events[0], Event::ProtocolViolation { error, message_type, .. } if error.code() == code && message_type == kind),
                "{events:?}"
            );
            assert_eq!(closed_count(&events), 1);
        }
    }

    #[test]
    fn an_error_frame_during_the_handshake_closes() {
        let mut session = Session::new(config("a"), Role::Initiator, VersionVector::new(), T0);
        drain(&mut session);
        session.handle_frame(
            T0,
            &frame("error", "reject", json!({"code": "version_mismatch", "message": "no"}), "b"),
        );
        let (frames, events) = drain(&mut session);
        assert!(frames.is_empty());
        assert!(
            matches!(&events[..], [Event::PeerError { code, .. }, Event::Closed { .. }] if code == "version_mismatch")
        );
    }

    #[test]
    fn bad_input_after_the_handshake_is_reported_until_the_budget_is_spent() {
        let mut session = established();
        let bad = [
            ("not json".to_string(), "bad_json", "", ""),
            (frame("bogus", "x", json!({}), "a"), "unknown_type", "bogus", "x"),
            (hello_frame("hello", "a", 1), "unexpected_message", "hello", "request"),
        ];
        for (index, (text, code, kind, action)) in bad.into_iter().enumerate() {
            session.handle_frame(T0 + 1, &text);
            let (frames, events) = drain(&mut session);
            assert_eq!(frames[0]["data"]["code"], code);
            let Event::ProtocolViolation { error, message_type, message_action } = &events[0] else {
                panic!("{events:?}");
            };
            assert_eq!(error.code(), code);
            assert_eq!(error.to_string(), frames[0]["data"]["message"].as_str().unwrap());
            assert_eq!((message_type.as_str(), message_action.as_str()), (kind, action));
            if index < 2 {
                assert!(!session.is_closed());
                assert_eq!(frames.len(), 1);
            } else {
                assert_eq!(frames[1]["data"]["code"], "too_many_errors");
                assert!(session.is_closed());
                assert_eq!(closed_count(&events), 1);
            }
        }
    }

    #[test]
    fn out_of_turn_messages_are_violations() {
        let cases = [
            (vec![frame("sync_ack", "ack", json!({"count": 0}), "a")], "unexpected_message"),
            (vec![frame("ping", "heartbeat", json!({}), "c")], "invalid_field"),
            (
                vec![
                    frame("sync_batch", "push", json!({"changes": [], "hasMore": true}), "a"),
                    frame("sync_batch", "push", json!({"changes": [], "hasMore": false}), "a"),
                ],
                "unexpected_message",
            ),
        ];
        for (frames, code) in cases {
            let mut session = established();
            for text in &frames {
                session.handle_frame(T0, text);
            }
            let (_, events) = drain(&mut session);
            assert_eq!(violation_codes(&events), [code]);
            assert!(!session.is_closed());
        }
    }

    #[test]
    fn received_changes_are_applied_and_known_to_be_held_by_the_peer() {
        let mut session = established();
        let live = change("a", 1);
        session.handle_frame(T0, &frame("category", "create", data_json(&live), "a"));
        let (_, events) = drain(&mut session);
        let stamped = StampedChange { origin: pos("a"), seq: crate::Seq(1), wire: live.clone() };
        assert_eq!(events, [Event::Apply { changes: vec![stamped], from_batch: false }]);
        assert_eq!(session.peer_known(), &vv(&[("a", 1)]));
        session.batch_applied(
            T0,
            BatchApplied { gap: false, local_summary: vv(&[("a", 1)]), ..BatchApplied::default() },
        );
        assert_eq!(drain(&mut session).0, Vec::<Value>::new());
    }

    #[test]
    fn changes_held_back_for_their_clock_are_asked_for_again_when_due_not_at_once() {
        let mut session = established();
        // The catch-up asked for on connect ends empty.
        session.handle_frame(T0, &frame("sync_batch", "push", json!({"changes": [], "hasMore": false}), "a"));
        session.batch_applied(T0, BatchApplied::default());
        assert_eq!(catch_ups(&drain(&mut session).1), [0]);
        let ahead = change("a", 1);
        session.handle_frame(T0, &frame("category", "create", data_json(&ahead), "a"));
        drain(&mut session);
        let retry_at = T0 + 20_000; // Within the heartbeat window: the peer is not dead yet.
        session.batch_applied(
            T0,
            BatchApplied {
                local_summary: vv(&[("b", 3)]),
                retry_at_ms: Some(retry_at),
                ..BatchApplied::default()
            },
        );
        assert_eq!(drain(&mut session).0, Vec::<Value>::new(), "no request before the clock catches up");
        assert!(session.poll_timeout().is_some_and(|at| at <= retry_at));
        session.handle_timeout(retry_at - 1);
        let early: Vec<Value> =
            drain(&mut session).0.into_iter().filter(|f| f["type"] == "sync_request").collect();
        assert!(early.is_empty(), "{early:?}");
        session.handle_timeout(retry_at);
        let requests: Vec<Value> =
            drain(&mut session).0.into_iter().filter(|f| f["type"] == "sync_request").collect();
        assert_eq!(requests.len(), 1, "{requests:?}");
        assert_eq!(requests[0]["data"]["summary"], json!({"b": 3}));
        // Asked once: the next timeout does not ask again.
        session.handle_timeout(retry_at + 1);
        assert!(drain(&mut session).0.iter().all(|f| f["type"] != "sync_request"));
    }

    #[test]
    fn closing_is_final() {
        let mut session = established();
        session.close("shutdown");
        session.close("again");
        let (_, events) = drain(&mut session);
        assert_eq!(events, [Event::Closed { reason: "shutdown".into() }]);
        let received = session.stats().messages_received;
        session.handle_frame(T0, &frame("ping", "heartbeat", json!({}), "a"));
        session.send_change(&change("b", 1));
        session.request_sync(VersionVector::new());
        session.handle_timeout(T0 + 1_000_000);
        session.provide_batch(vec![], 0, false);
        session.batch_applied(T0, BatchApplied { gap: true, ..BatchApplied::default() });
        assert_eq!(drain(&mut session), (vec![], vec![]));
        assert_eq!(session.stats().messages_received, received);
        assert_eq!(session.poll_timeout(), None);
    }

    /// xorshift64*: a tiny deterministic generator, so a failing seed replays.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    #[test]
    fn mangled_frames_never_panic() {
        let mut net = Net::pair(4, 3);
        net.drive();
        net.write(0);
        net.run_until(T0 + 31_000);
        let corpus: Vec<String> = net.links[0].sent.iter().flatten().cloned().collect();
        let junk = [
            json!(null),
            json!(-1),
            json!(1.5),
            json!("x"),
            json!([]),
            json!({}),
            json!(u64::MAX),
            json!(true),
        ];
        for seed in 1..=300u64 {
            let mut rng = Rng(seed);
            let mut session = if seed % 2 == 0 {
                established()
            } else {
                Session::new(config("b"), Role::Responder, VersionVector::new(), T0)
            };
            for _ in 0..20 {
                let original = &corpus[rng.below(corpus.len())];
                let mangled = match rng.below(3) {
                    0 => original.chars().take(rng.below(original.len() + 1)).collect(),
                    1 => {
                        let mut value: Value = serde_json::from_str(original).unwrap();
                        let replacement = junk[rng.below(junk.len())].clone();
                        let keys = ["id", "type", "action", "data", "timestamp", "sourcePos"];
                        let key = keys[rng.below(keys.len())];
                        match rng.below(3) {
                            0 => value[key] = replacement,
                            1 => {
                                if let Some(data) = value["data"].as_object_mut() {
                                    let keys: Vec<String> = data.keys().cloned().collect();
                                    if !keys.is_empty() {
                                        data.insert(keys[rng.below(keys.len())].clone(), replacement);
                                    }
                                }
                            }
                            _ => value["data"]["sync"]["seq"] = replacement,
                        }
                        value.to_string()
                    }
                    _ => original.replace('"', ""),
                };
                session.handle_frame(T0, &mangled);
                while session.poll_transmit().is_some() {}
                while session.poll_event().is_some() {}
            }
        }
    }

    #[test]
    fn random_writes_and_link_failures_converge() {
        for seed in 1..=30u64 {
            let mut rng = Rng(seed);
            let mut net = Net::new(&["a", "b", "c"]);
            let pairs = [(0, 1), (1, 2), (2, 0)];
            let mut links: Vec<usize> = pairs.iter().map(|&(i, r)| net.connect(i, r)).collect();
            for _ in 0..60 {
                match rng.below(10) {
                    0..=5 => {
                        net.write(rng.below(3));
                    }
                    6 => {
                        let which = rng.below(3);
                        net.disconnect(links[which]);
                        let (initiator, responder) = pairs[which];
                        links[which] = net.connect(initiator, responder);
                    }
                    7 => {
                        let which = rng.below(3);
                        let end = rng.below(2);
                        let node = net.links[links[which]].nodes[end];
                        let summary = net.nodes[node].store.vv.clone();
                        net.links[links[which]].sessions[end].request_sync(summary);
                    }
                    _ => {
                        for _ in 0..rng.below(4) {
                            net.step();
                        }
                    }
                }
            }
            net.drive();
            net.assert_converged();
            let total: u64 = net.nodes[0].store.vv.iter().map(|(_, seq)| seq.0).sum();
            assert_eq!(net.nodes[0].store.log.len() as u64, total, "seed {seed}");
        }
    }
}
