//! The sync engine of one peer connection, without I/O.
//!
//! Why a layer between the protocol [`Session`] and the connection task: the session knows
//! the protocol (frames, handshake, heartbeats, catch-up batches) but not the node, and the
//! node's decisions about one connection used to live inside the tokio task that pumps its
//! socket, where no test could reach them without sockets and clocks. A [`Link`] holds
//! those decisions: what a registration means (a first connection, a returning peer, a
//! duplicate to close, the continuation of a link whose duplicate lost the tie-break), which
//! audit rows an event writes and with which counters, in what order changes go to the
//! single writer (one apply at a time; live changes that arrive meanwhile go next as one
//! run; a catch-up batch after the live changes received before it), when a catch-up has
//! stalled, how settings changed on a live connection apply, and how the connection ended.
//!
//! It is fed with inputs (a frame, a timer, a change written by this node, a command, the
//! writer's answers) and returns [`Effect`]s. The connection task (`connection.rs`) carries
//! them out against the real node: the writer thread, the peer table, the metrics. A test
//! carries them out against whatever it likes, with virtual time: every input takes `now`.

use std::collections::{BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;

use possync_core::protocol::{
    BatchApplied, CatchUpWatch, ConnectionStats, Event, PeerInfo, Role, Session, SessionConfig, StampedChange,
};
use possync_core::{PosId, Seq, VersionVector, WireChange};
use possync_store::{ConnectionEvent, ConnectionEventKind, Settings};

use crate::peers::Registration;
use crate::transport::TransportError;

/// No progress for this long while behind the peer is a stall: two heartbeat periods, and
/// never less than 10 s (a large batch on a slow till takes a few seconds to apply).
fn stalled_after_ms(heartbeat_interval_ms: u64) -> u64 {
    heartbeat_interval_ms.saturating_mul(2).max(10_000)
}

/// How a connection ended, for the dialer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// It never completed the protocol handshake (or was a duplicate).
    BeforeHandshake(String),
    /// It was established, then closed.
    AfterHandshake {
        /// The peer.
        peer: PosId,
        /// Why it closed.
        reason: String,
    },
    /// The peer already has a connection to keep.
    Duplicate(PosId),
}

/// A peer's identity as a link knows it once the handshake is done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerName {
    /// Its posId.
    pub id: PosId,
    /// Its display name.
    pub name: String,
}

/// What a link needs to start.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    /// This terminal's posId.
    pub pos_id: PosId,
    /// This terminal's display name.
    pub pos_name: String,
    /// This run's instance id (tells a clone from a reconnection of itself).
    pub instance: String,
    /// Who opened the connection.
    pub role: Role,
    /// The peer's address (for rows about a peer that has not said who it is).
    pub address: SocketAddr,
    /// This node's version vector when the connection started.
    pub summary: VersionVector,
    /// The fingerprint of the change held at each of the summary's numbers.
    pub heads: std::collections::BTreeMap<PosId, String>,
    /// Every origin this till has written as: its posId, and the `<posId>-r<k>` of a
    /// recovered history (empty: the posId alone).
    pub own_origins: Vec<PosId>,
}

/// A node metric an event moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    /// The peer broke the protocol, or sent a frame the channel refused.
    ProtocolViolation,
    /// Another terminal with this posId, or this till's own history found behind or diverged.
    IdentityClash,
    /// A fork of another origin found at the handshake.
    Fork,
    /// A catch-up stopped progressing.
    SyncStall,
    /// A catch-up from the peer finished, after this long.
    CatchUp {
        /// From its start to its last batch applied.
        duration_ms: u64,
    },
}

/// What a link asks its carrier to do.
#[derive(Debug)]
pub enum Effect {
    /// The handshake completed: compare histories ([`Link::own_changes_held`],
    /// [`Link::diverged_heads`]), register the peer in the node's table and answer with
    /// [`Link::registered`].
    Register(PeerInfo),
    /// Select catch-up changes for the peer from the change log (see
    /// [`Event::NeedBatch`]); answer with [`Link::batch_selected`] or
    /// [`Link::selection_failed`].
    SelectBatch {
        /// What the peer holds.
        since: VersionVector,
        /// Log position after which to select.
        after_cursor: u64,
        /// Most changes to select.
        limit: usize,
    },
    /// Apply changes from the peer through the single writer; answer with
    /// [`Link::applied`]. A link has one apply in flight at most. Live changes (`live`)
    /// are the ones a peer's budget limits; catch-up batches were asked for.
    Apply {
        /// The changes, in order.
        changes: Vec<StampedChange>,
        /// Pushed by the peer as written rather than asked for in a catch-up.
        live: bool,
    },
    /// Live changes from the peer arrived: take them from the peer's budget
    /// (`p2p_peer_max_changes_per_second`), reading nothing more from it until they fit, so
    /// that TCP pushes back on a flooding peer. Comes before the [`Effect::Apply`] that
    /// carries them.
    Admit {
        /// How many.
        changes: usize,
    },
    /// Write a `p2p_connection_metrics` row.
    Record(ConnectionEvent),
    /// Write a `p2p_sync_logs` error row for a message refused from this connection;
    /// `before_handshake`: the connection was refused before the peer proved who it is
    /// (counted and logged with the refused connections too).
    LogRefused {
        /// The peer's posId, or its address before the handshake.
        peer_id: String,
        /// The peer's name, when known.
        peer_name: Option<String>,
        /// The refused message's `type` (empty when unreadable).
        message_type: String,
        /// The refused message's `action` (empty when unreadable).
        message_action: String,
        /// `code: message`.
        detail: String,
        /// Refused before the handshake completed.
        before_handshake: bool,
    },
    /// Write a `p2p_sync_logs` error row for a fork of `origin` at `seq` the peer's heads
    /// showed.
    LogFork {
        /// The forked origin.
        origin: PosId,
        /// The number with two contents.
        seq: Seq,
    },
    /// Ask the peer for its copies of this till's own `origin`, all of them: this till's
    /// history of it diverged from the peer's or fell behind it (restored from a backup,
    /// copied). The carrier sends a `sync_request` with this node's summary lowered to
    /// nothing for `origin` ([`Link::request_sync`]); the copies that differ from what the
    /// till holds recover its history when they are applied (`Store::apply_stamped`).
    FetchOwnHistory {
        /// The own origin.
        origin: PosId,
    },
    /// Move a node metric.
    Count(Metric),
    /// How many changes the peer holds that this node lacks (status and gauge).
    Behind(u64),
}

/// A run of `Apply` events waiting for the writer, answered together.
#[derive(Debug)]
struct PendingApply {
    changes: Vec<StampedChange>,
    /// How many `Apply` events it answers.
    answers: usize,
    live: bool,
}

/// The sync engine of one connection (see the module docs).
#[derive(Debug)]
pub struct Link {
    session: Session,
    pos_id: PosId,
    own_origins: Vec<PosId>,
    address: SocketAddr,
    auto_sync: bool,
    catch_up: CatchUpWatch,
    peer: Option<PeerName>,
    registered: bool,
    /// This till's own origins whose history differs from the peer's (restored from a
    /// backup, or copied): their changes are never served to this peer (see
    /// [`Link::poll_effect`]).
    withheld: BTreeSet<PosId>,
    /// Set when the way the connection ends is known before it closes.
    outcome: Option<Ended>,
    close_reason: String,
    /// When this connection lost the tie-break on the peer's side (it told us): the link
    /// goes on through the other connection, so its end is not a disconnection.
    superseded_at: Option<u64>,
    /// The `Apply` events answered by the apply in flight, when there is one.
    in_flight: Option<usize>,
    /// Runs waiting behind it, in the order received.
    waiting: VecDeque<PendingApply>,
    effects: VecDeque<Effect>,
    /// The time of the latest input.
    now: u64,
}

impl Link {
    /// A link for a connection just opened, following `settings`.
    pub fn new(config: LinkConfig, settings: &Settings, now_ms: u64) -> Link {
        let mut session_config = SessionConfig::new(config.pos_id.clone(), config.pos_name);
        session_config.heartbeat_interval_ms = settings.heartbeat_interval_ms;
        session_config.batch_size = settings.batch_size;
        session_config.auto_sync = settings.auto_sync;
        session_config.instance = Some(config.instance);
        session_config.heads = config.heads;
        Link {
            session: Session::new(session_config, config.role, config.summary, now_ms),
            own_origins: if config.own_origins.is_empty() {
                vec![config.pos_id.clone()]
            } else {
                config.own_origins
            },
            pos_id: config.pos_id,
            address: config.address,
            auto_sync: settings.auto_sync,
            catch_up: CatchUpWatch::new(now_ms, stalled_after_ms(settings.heartbeat_interval_ms)),
            peer: None,
            registered: false,
            withheld: BTreeSet::new(),
            outcome: None,
            close_reason: String::from("closed"),
            superseded_at: None,
            in_flight: None,
            waiting: VecDeque::new(),
            effects: VecDeque::new(),
            now: now_ms,
        }
    }

    // ---- what the carrier reads ----

    /// The next frame to send.
    pub fn poll_transmit(&mut self) -> Option<String> {
        self.session.poll_transmit()
    }

    /// Turns the session's pending events into effects. True when there were any (the
    /// carrier then takes another turn before it waits: handling them may queue frames).
    pub fn process_events(&mut self, now_ms: u64) -> bool {
        self.now = now_ms;
        let mut any = false;
        while let Some(event) = self.session.poll_event() {
            any = true;
            self.on_event(event);
        }
        // After the whole turn: the live changes received in it go to the writer together.
        self.start_next_apply();
        any
    }

    /// The next effect to carry out.
    ///
    /// A catch-up selection leaves out this till's own origins whose history differs from
    /// the peer's: what it wrote under those numbers since it was restored is on a branch the
    /// peer does not hold (a peer that took those changes before the originals would keep a
    /// fork). They are re-issued under a new origin once the till has taken its history back
    /// from the peer (`Effect::FetchOwnHistory`), and served then. Applied when the effect is
    /// taken, not when it was queued: the comparison that finds the difference runs while the
    /// registration is carried out, which can come after the peer's catch-up request.
    pub fn poll_effect(&mut self) -> Option<Effect> {
        let mut effect = self.effects.pop_front()?;
        if let Effect::SelectBatch { since, .. } = &mut effect {
            for origin in &self.withheld {
                since.observe(origin, Seq(i64::MAX as u64));
            }
        }
        Some(effect)
    }

    /// When [`Link::handle_timeout`] is next due.
    pub fn poll_timeout(&self) -> Option<u64> {
        self.session.poll_timeout()
    }

    /// The connection is over (its last frames may still be queued).
    pub fn is_closed(&self) -> bool {
        self.session.is_closed()
    }

    /// The peer is registered in the node's table through this connection.
    pub fn is_registered(&self) -> bool {
        self.registered
    }

    /// Who the peer is, once the handshake is done.
    pub fn peer(&self) -> Option<&PeerName> {
        self.peer.as_ref()
    }

    /// The protocol session inside (read-only: what it knows of the peer, for status and
    /// diagnostics).
    pub fn session(&self) -> &Session {
        &self.session
    }

    /// The connection's counters.
    pub fn stats(&self) -> &ConnectionStats {
        self.session.stats()
    }

    /// Why the connection closed (sent in the close frame).
    pub fn close_reason(&self) -> &str {
        &self.close_reason
    }

    /// When the peer said it keeps another connection to us, if it did.
    pub fn superseded_at(&self) -> Option<u64> {
        self.superseded_at
    }

    /// How the connection ended, for the dialer.
    pub fn ended(&self) -> Ended {
        match (&self.outcome, &self.peer) {
            (Some(outcome), _) => outcome.clone(),
            (None, Some(peer)) => {
                Ended::AfterHandshake { peer: peer.id.clone(), reason: self.close_reason.clone() }
            }
            (None, None) => Ended::BeforeHandshake(self.close_reason.clone()),
        }
    }

    /// The `disconnected` row of a registered connection that ended, with its final
    /// counters.
    pub fn disconnected_row(&self, now_ms: u64) -> Option<ConnectionEvent> {
        let peer = self.peer.as_ref().filter(|_| self.registered)?;
        Some(self.row(peer, ConnectionEventKind::Disconnected, now_ms))
    }

    // ---- inputs ----

    /// A frame from the peer.
    pub fn handle_frame(&mut self, now_ms: u64, text: &str) {
        self.now = now_ms;
        self.session.handle_frame(now_ms, text);
    }

    /// The time returned by [`Link::poll_timeout`] came.
    pub fn handle_timeout(&mut self, now_ms: u64) {
        self.now = now_ms;
        self.session.handle_timeout(now_ms);
    }

    /// The channel refused what the peer sent, or failed.
    pub fn receive_failed(&mut self, now_ms: u64, err: &TransportError) {
        self.now = now_ms;
        match err {
            TransportError::NotUtf8(_) => {
                // The channel goes on; the frame is refused like malformed JSON.
                self.refused_frame(format!("bad_json: {err}"));
                return;
            }
            // The secure channel refused it and is closed: record why (SPEC 8).
            TransportError::FrameTooLarge { .. } => self.refused_frame(format!("frame_too_large: {err}")),
            TransportError::Decrypt | TransportError::WebSocket(_) => {
                // The stream was changed on its way (tampered, bytes duplicated, reordered or
                // lost by something between the tills) or the peer is broken: nothing more is
                // read from it, and the audit trail says why the link ended (SPEC 4).
                if let Some(peer) = self.peer.clone() {
                    let mut row = self.row(&peer, ConnectionEventKind::SyncFailed, now_ms);
                    row.error_message = Some(format!(
                        "the secure channel refused the peer's stream ({}): the connection is closed, nothing after the last good frame is applied",
                        error_chain(err)
                    ));
                    self.effects.push_back(Effect::Record(row));
                }
            }
            _ => {}
        }
        self.session.close(&format!("transport: {err}"));
    }

    /// The peer closed the channel.
    pub fn peer_closed(&mut self) {
        self.session.close("peer closed the connection");
    }

    /// Sending a frame failed.
    pub fn send_failed(&mut self, err: &TransportError) {
        self.session.close(&format!("send failed: {err}"));
    }

    /// Closes the connection (shutdown, a command, the node stopping).
    pub fn close(&mut self, reason: &str) {
        self.session.close(reason);
    }

    /// A change this node wrote or applied, for the peer.
    pub fn local_change(&mut self, change: &WireChange) {
        self.session.send_change(change);
    }

    /// The node's changes went by faster than this connection took them: the peer catches
    /// up from the change log instead.
    pub fn lagged(&mut self) {
        self.session.resync();
    }

    /// Asks the peer for what this node lacks ("sync now").
    pub fn request_sync(&mut self, summary: VersionVector) {
        self.session.request_sync(summary);
    }

    /// The node's table closed this connection in favour of another one to the same peer.
    pub fn superseded_here(&mut self) {
        self.session.close_as_duplicate();
        if let Some(peer) = &self.peer {
            self.outcome = Some(Ended::Duplicate(peer.id.clone()));
        }
    }

    /// The node's other connected peers changed (the peer relays nothing of theirs).
    pub fn set_neighbors(&mut self, neighbors: Arc<BTreeSet<PosId>>) {
        if self.registered {
            self.session.set_neighbors(neighbors);
        }
    }

    /// The settings changed: they take effect on live connections (SPEC). P2P off closes
    /// the connection; the heartbeat period and batch size apply from the next ping or batch.
    pub fn settings_changed(&mut self, settings: &Settings) {
        self.auto_sync = settings.auto_sync;
        if settings.enabled {
            self.session.update_settings(
                settings.heartbeat_interval_ms,
                settings.batch_size,
                settings.auto_sync,
            );
        } else {
            self.session.close("P2P disabled");
        }
    }

    /// Compares what the peer holds with what this node holds now (every few seconds): how
    /// far behind, and a stall, logged once, when that stops shrinking. With auto-sync off,
    /// being behind until the next "sync now" is the point: no stall.
    pub fn observe_progress(&mut self, now_ms: u64, ours: &VersionVector) {
        self.now = now_ms;
        let Some(peer) = self.peer.clone().filter(|_| self.registered) else {
            return;
        };
        let stall = self.catch_up.observe(now_ms, self.session.peer_known(), ours).filter(|_| self.auto_sync);
        self.effects.push_back(Effect::Behind(self.catch_up.behind()));
        if let Some(stall) = stall {
            tracing::warn!(behind = stall.behind, for_ms = stall.for_ms, "catch-up stalled");
            self.effects.push_back(Effect::Count(Metric::SyncStall));
            let mut row = self.row(&peer, ConnectionEventKind::SyncFailed, now_ms);
            row.error_message = Some(format!(
                "catch-up stalled: {} changes the peer holds have not arrived for {} s",
                stall.behind,
                stall.for_ms / 1000
            ));
            self.effects.push_back(Effect::Record(row));
            // Ask once more: a transient refusal may have cleared.
            self.session.request_sync(ours.clone());
        }
    }

    // ---- answers to effects ----

    /// What this node holds of its own origin, read at the handshake (answering
    /// [`Effect::Register`]): a peer that holds more of it means this till was restored from
    /// a backup or copied. Its missing changes come back in the catch-up that follows; any
    /// change it wrote since it fell behind reuses numbers the peers already hold.
    pub fn own_changes_held(&mut self, info: &PeerInfo, ours: &VersionVector) {
        let Some(origin) =
            self.own_origins.iter().find(|origin| info.summary.get(origin) > ours.get(origin)).cloned()
        else {
            return;
        };
        let (theirs, mine) = (info.summary.get(&origin), ours.get(&origin));
        tracing::warn!(
            theirs = theirs.0,
            ours = mine.0,
            "a peer holds more of this till's own changes than it does"
        );
        let message = format!(
            "own changes behind: {} holds this till's changes up to {}, this till only up to {}: it was restored from a backup or its data directory was copied. Its history is taken back from the peer; changes it made in between are re-issued under a new origin; see docs/DESIGN.md",
            info.pos_name, theirs.0, mine.0
        );
        self.own_history_differs(info, origin, message);
    }

    /// This till's history of its own `origin` differs from the peer's: alerted like an
    /// identity clash (a row, the metric), and the peer's copies asked for once.
    fn own_history_differs(&mut self, info: &PeerInfo, origin: PosId, message: String) {
        self.withheld.insert(origin.clone());
        self.effects.push_back(Effect::Count(Metric::IdentityClash));
        let peer = PeerName { id: info.pos_id.clone(), name: info.pos_name.clone() };
        let mut row = self.row(&peer, ConnectionEventKind::SyncFailed, self.now);
        row.error_message = Some(message);
        self.effects.push_back(Effect::Record(row));
        let asked = self
            .effects
            .iter()
            .any(|effect| matches!(effect, Effect::FetchOwnHistory { origin: asked } if *asked == origin));
        if !asked {
            self.effects.push_back(Effect::FetchOwnHistory { origin });
        }
    }

    /// The numbers at which the peer's `heads` differ from this node's log (answering
    /// [`Effect::Register`]): a second history of an origin. Of this till's own origin, it
    /// was restored or copied and then wrote changes the peers hold with other content
    /// (alerted like an identity clash); of another origin, a fork (logged and alerted like
    /// one refused on arrival). Both are found at the handshake, even when neither side will
    /// ever send the other the changes concerned.
    pub fn diverged_heads(&mut self, info: &PeerInfo, diverged: Vec<(PosId, Seq)>) {
        for (origin, seq) in diverged {
            if self.own_origins.contains(&origin) {
                tracing::warn!(
                    seq = seq.0,
                    "a peer holds another change with this till's own origin and number"
                );
                let message = format!(
                    "own history diverged: {} holds another change numbered {seq} of this till than this till does: it was restored from a backup or its data directory was copied, and wrote changes under numbers the peers hold with other content. Its history is taken back from the peer and those changes are re-issued under a new origin; see docs/DESIGN.md",
                    info.pos_name
                );
                self.own_history_differs(info, origin, message);
            } else {
                tracing::warn!(%origin, seq = seq.0, "a peer holds another change with this origin and number (a fork)");
                self.effects.push_back(Effect::Count(Metric::Fork));
                self.effects.push_back(Effect::LogFork { origin, seq });
            }
        }
    }

    /// The node's table registered the peer (answering [`Effect::Register`]); `neighbors`:
    /// the node's connected peers.
    pub fn registered(
        &mut self,
        now_ms: u64,
        info: &PeerInfo,
        registration: Registration,
        neighbors: Arc<BTreeSet<PosId>>,
    ) {
        self.now = now_ms;
        let peer = PeerName { id: info.pos_id.clone(), name: info.pos_name.clone() };
        match registration {
            Registration::Duplicate => {
                tracing::debug!("duplicate connection, closing it");
                self.session.close_as_duplicate();
                self.outcome = Some(Ended::Duplicate(peer.id.clone()));
            }
            Registration::Continued => {
                // It replaces a connection that lost the tie-break: the link goes on,
                // nothing to log.
                tracing::debug!("connection continues the link of a duplicate");
                self.registered = true;
                self.session.set_neighbors(neighbors);
            }
            Registration::New | Registration::Returning => {
                self.registered = true;
                self.session.set_neighbors(neighbors);
                let kind = if registration == Registration::New {
                    ConnectionEventKind::Connected
                } else {
                    ConnectionEventKind::Reconnected
                };
                tracing::info!(peer_name = %peer.name, "peer connected");
                self.effects.push_back(Effect::Record(self.row(&peer, kind, now_ms)));
            }
        }
        self.peer = Some(peer);
    }

    /// The catch-up changes selected (answering [`Effect::SelectBatch`]).
    pub fn batch_selected(&mut self, changes: Vec<WireChange>, next_cursor: u64, has_more: bool) {
        self.session.provide_batch(changes, next_cursor, has_more);
    }

    /// Selecting catch-up changes failed (answering [`Effect::SelectBatch`]): the catch-up
    /// cannot go on.
    pub fn selection_failed(&mut self, now_ms: u64, error: &str) {
        self.now = now_ms;
        tracing::warn!(%error, "could not select changes for catch-up");
        if let Some(peer) = self.peer.clone() {
            let mut row = self.row(&peer, ConnectionEventKind::SyncFailed, now_ms);
            row.error_message = Some(format!("selecting changes failed: {error}"));
            self.effects.push_back(Effect::Record(row));
        }
        self.session.close("catch-up failed");
    }

    /// The writer applied the changes of the last [`Effect::Apply`] (`None`: the node is
    /// stopping). The next run waiting, if any, goes next.
    pub fn applied(&mut self, now_ms: u64, report: Option<BatchApplied>) {
        self.now = now_ms;
        let answers = self.in_flight.take().unwrap_or(0);
        let Some(report) = report else {
            self.session.close("node stopping");
            return;
        };
        // The session expects one answer per `Apply`, in order; the refusals are reported once.
        for _ in 1..answers {
            let quiet = BatchApplied { rejections: Vec::new(), ..report.clone() };
            self.session.batch_applied(now_ms, quiet);
        }
        if answers > 0 {
            self.session.batch_applied(now_ms, report);
        }
        self.start_next_apply();
    }

    // ---- inside ----

    fn on_event(&mut self, event: Event) {
        let now = self.now;
        match event {
            Event::Established { peer: info } => {
                if info.pos_id == self.pos_id {
                    self.session.close("connected to itself");
                    self.outcome = Some(Ended::BeforeHandshake("connected to itself".into()));
                } else {
                    self.effects.push_back(Effect::Register(info));
                }
            }
            Event::NeedBatch { since, after_cursor, limit } => {
                self.effects.push_back(Effect::SelectBatch { since, after_cursor, limit });
            }
            Event::Apply { changes, from_batch } => self.queue_apply(changes, !from_batch),
            Event::CatchUpCompleted { duration_ms, changes_received } => {
                self.effects.push_back(Effect::Count(Metric::CatchUp { duration_ms }));
                if let Some(peer) = self.peer.clone() {
                    tracing::debug!(duration_ms, changes_received, "catch-up completed");
                    let mut row = self.row(&peer, ConnectionEventKind::SyncCompleted, now);
                    row.sync_duration_ms = Some(duration_ms);
                    self.effects.push_back(Effect::Record(row));
                }
            }
            Event::HeartbeatTimeout => {
                if let Some(peer) = self.peer.clone() {
                    tracing::warn!("heartbeat timeout");
                    self.effects.push_back(Effect::Record(self.row(
                        &peer,
                        ConnectionEventKind::HeartbeatTimeout,
                        now,
                    )));
                }
            }
            Event::ProtocolViolation { error, message_type, message_action } => {
                let code = error.code();
                tracing::warn!(%code, message = %error, "protocol violation");
                self.effects.push_back(Effect::Count(Metric::ProtocolViolation));
                let (peer_id, peer_name) = self.refused_source();
                self.effects.push_back(Effect::LogRefused {
                    peer_id,
                    peer_name,
                    message_type,
                    message_action,
                    detail: format!("{code}: {error}"),
                    before_handshake: !self.session.is_established(),
                });
            }
            Event::IdentityClash { instance } => {
                tracing::warn!(address = %self.address, %instance, "another running terminal uses this terminal's posId");
                self.effects.push_back(Effect::Count(Metric::IdentityClash));
                let me =
                    PeerName { id: self.pos_id.clone(), name: "another terminal with this posId".into() };
                let mut row = self.row(&me, ConnectionEventKind::SyncFailed, now);
                row.error_message = Some(format!(
                    "identity clash: another running terminal at {} uses this terminal's posId (a cloned disk or a copied data directory). Give it its own identity: `possync init` on a fresh data directory, then `possync import` or a catch-up",
                    self.address.ip()
                ));
                self.effects.push_back(Effect::Record(row));
            }
            Event::Superseded => {
                tracing::debug!("the peer keeps another connection to us; closing this one");
                self.superseded_at = Some(now);
                if let Some(peer) = &self.peer {
                    self.outcome = Some(Ended::Duplicate(peer.id.clone()));
                }
            }
            Event::PeerError { code, message } => {
                tracing::warn!(%code, %message, "peer reported an error");
            }
            Event::Closed { reason } => self.close_reason = reason,
        }
    }

    /// Queues changes for the writer (they go at the end of the turn, or when the apply in
    /// flight is answered). Live changes received while others wait join the last run if it
    /// is live too (one transaction for a burst); a catch-up batch waits for the live
    /// changes received before it.
    fn queue_apply(&mut self, changes: Vec<StampedChange>, live: bool) {
        if live {
            match self.effects.back_mut() {
                Some(Effect::Admit { changes: admitted }) => *admitted += changes.len(),
                _ => self.effects.push_back(Effect::Admit { changes: changes.len() }),
            }
        }
        match self.waiting.back_mut() {
            Some(last) if live && last.live => {
                last.changes.extend(changes);
                last.answers += 1;
            }
            _ => self.waiting.push_back(PendingApply { changes, answers: 1, live }),
        }
    }

    fn start_next_apply(&mut self) {
        if self.in_flight.is_some() {
            return;
        }
        if let Some(next) = self.waiting.pop_front() {
            self.in_flight = Some(next.answers);
            self.effects.push_back(Effect::Apply { changes: next.changes, live: next.live });
        }
    }

    /// A frame the channel refused: counted and logged like a protocol violation.
    fn refused_frame(&mut self, detail: String) {
        self.effects.push_back(Effect::Count(Metric::ProtocolViolation));
        let (peer_id, peer_name) = self.refused_source();
        self.effects.push_back(Effect::LogRefused {
            peer_id,
            peer_name,
            message_type: String::new(),
            message_action: String::new(),
            detail,
            before_handshake: false,
        });
    }

    /// Who sent a refused message: the peer once known, its address before.
    fn refused_source(&self) -> (String, Option<String>) {
        match &self.peer {
            Some(peer) => (peer.id.to_string(), Some(peer.name.clone())),
            None => (self.address.ip().to_string(), None),
        }
    }

    /// A connection event about a known peer. Only `disconnected` carries the counters (the
    /// connection's final totals), so that summing a column over the table (as the seed's
    /// "peer performance" query does) counts every connection's traffic exactly once.
    fn row(&self, peer: &PeerName, kind: ConnectionEventKind, now_ms: u64) -> ConnectionEvent {
        let stats = self.session.stats();
        let final_counters = kind == ConnectionEventKind::Disconnected;
        let counter = |value: u64| if final_counters { value } else { 0 };
        ConnectionEvent {
            peer_id: peer.id.to_string(),
            peer_name: Some(peer.name.clone()),
            kind,
            messages_sent: counter(stats.messages_sent),
            messages_received: counter(stats.messages_received),
            bytes_sent: counter(stats.bytes_sent),
            bytes_received: counter(stats.bytes_received),
            sync_duration_ms: None,
            error_message: None,
            at_ms: now_ms,
        }
    }
}

/// An error and its sources, as one line.
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut line = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        line.push_str(": ");
        line.push_str(&cause.to_string());
        source = cause.source();
    }
    line
}
