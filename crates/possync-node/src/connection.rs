//! One task per peer connection: it owns the secure channel and drives the sans-IO
//! [`Session`] with frames, timer ticks and the node's changes, and carries out what the
//! session asks (select a batch, apply a batch, log an event).
//!
//! The loop, each turn: send every queued frame; handle every session event; publish the
//! counters; then wait for the first of: a frame from the peer, the session's next deadline,
//! a change written by this node, a command from the node, shutdown.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures_util::FutureExt;
use possync_core::protocol::{self, CatchUpWatch, Event, Role, Session, SessionConfig, StampedChange};
use possync_core::{PosId, VersionVector, WireChange};
use possync_store::{ConnectionEvent, ConnectionEventKind, PeerRef};
use tokio::sync::broadcast;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::metrics::{ConflictLabels, PeerDirection, PeerLabel, StatusLabel};
use crate::peer_rate::LiveChangeBudget;
use crate::peers::{ConnectionCommand, Mailbox, Registration, SUPERSEDED_GRACE_MS};
use crate::shared::{NodeShared, now_ms};
use crate::transport::{SecureChannel, SecureReceiver, SecureSender, TransportError};
use crate::writer::Priority;

static NEXT_CONNECTION_ID: AtomicU64 = AtomicU64::new(1);

/// Most frames read in one turn of the loop (a burst of live changes).
const MAX_FRAMES_PER_TURN: usize = 256;

/// How often a connection compares what the peer holds with what this node holds
/// (catch-up progress, stall detection).
const PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// A wait for the live-change budget this long or longer counts as throttling (shorter ones
/// are the scheduler's noise).
const THROTTLE_NOTICED: std::time::Duration = std::time::Duration::from_millis(5);

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

/// Runs a connection until it closes.
///
/// Plain functions returning `async move` blocks rather than `async fn`s: the future of
/// an `async fn` keeps its arguments next to the locals moved out of them, so the channel
/// was held four times over in every connection's task; a block holds each capture once.
pub fn run(node: Arc<NodeShared>, channel: SecureChannel, role: Role) -> impl Future<Output = Ended> + Send {
    let address = channel.peer_addr();
    let span = info_span!("peer", %address, role = ?role, peer = tracing::field::Empty);
    drive(node, channel, role, address).instrument(span)
}

fn drive(
    node: Arc<NodeShared>,
    channel: SecureChannel,
    role: Role,
    address: SocketAddr,
) -> impl Future<Output = Ended> + Send {
    let (mut sender, mut receiver) = channel.into_split();
    async move {
        let connection_id = NEXT_CONNECTION_ID.fetch_add(1, Ordering::Relaxed);
        // Subscribe before reading the summary: a change written in between is then both in the
        // summary and delivered live, and the session drops the copy the peer already has.
        let mut changes = node.writer.subscribe();
        // The summary, and the fingerprint of the change held at each of its numbers (the
        // `hello`'s `heads`, which let the peer tell a second history of an origin at once).
        let heads = node
            .writer
            .call(Priority::Sync, |store| match store.summary_with_heads() {
                Ok(pair) => pair,
                Err(err) => {
                    warn!(%err, "could not read the heads of the change log; the hello goes without them");
                    (store.summary().clone(), Default::default())
                }
            })
            .await;
        let Ok((summary, heads)) = heads else {
            return Ended::BeforeHandshake("node stopping".into());
        };
        let mut settings_watch = node.watch_settings();
        // This node's other connections, told to the peer so it does not relay their changes.
        let mut neighbors = node.peers.watch_connected();
        let settings = settings_watch.borrow_and_update().clone();
        if !settings.enabled {
            return Ended::BeforeHandshake("P2P disabled".into());
        }
        let mut config = SessionConfig::new(node.identity.pos_id.clone(), node.identity.pos_name.clone());
        config.heartbeat_interval_ms = settings.heartbeat_interval_ms;
        config.batch_size = settings.batch_size;
        config.auto_sync = settings.auto_sync;
        config.instance = Some(node.instance.clone());
        config.heads = heads;
        let mut session = Session::new(config, role, summary, now_ms());
        let mut catch_up = CatchUpWatch::new(now_ms(), stalled_after_ms(settings.heartbeat_interval_ms));
        let mut live_budget = LiveChangeBudget::new(settings.peer_max_changes_per_second);
        let mut throttled: u64 = 0;
        let mut progress_tick = tokio::time::interval(PROGRESS_EVERY);
        progress_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mailbox = Arc::new(Mailbox::default());
        let mut shutdown = node.shutdown.subscribe();
        let mut peer: Option<(PosId, String)> = None;
        let mut registered = false;
        let mut outcome: Option<Ended> = None;
        let mut close_reason = String::from("closed");
        let mut counted = protocol::ConnectionStats::default();
        let mut heard = false;
        // When this connection lost the tie-break on the peer's side (it told us): the link
        // goes on through the other connection, so its end is not a disconnection.
        let mut superseded_at: Option<u64> = None;
        // A read result taken while draining a burst, handled at the next turn.
        let mut carried: Option<Result<Option<String>, TransportError>> = None;
        // Live changes go to the writer while more arrive: the apply in flight, and the live
        // changes (with their `Apply` count) received since, which go next as one batch.
        let mut applying: Option<ApplyInFlight> = None;
        let mut live_waiting: (Vec<StampedChange>, usize) = (Vec::new(), 0);

        loop {
            while let Some(frame) = session.poll_transmit() {
                match send_frame(&mut sender, &mut receiver, &mut session, &mut carried, &frame).await {
                    Ok(()) => {}
                    Err(SendStopped::Transport(err)) => session.close(&format!("send failed: {err}")),
                    Err(SendStopped::Abandoned) => break,
                }
            }
            let mut progressed = false;
            let mut events: VecDeque<Event> = std::iter::from_fn(|| session.poll_event()).collect();
            while let Some(event) = events.pop_front() {
                progressed = true;
                match event {
                    Event::Established { peer: info } => {
                        tracing::Span::current().record("peer", tracing::field::display(&info.pos_id));
                        let me = &node.identity.pos_id;
                        if let Some(ours) = node.summary().await
                            && info.summary.get(me) > ours.get(me)
                        {
                            // Adopted by the catch-up that follows; but any change this till
                            // wrote since it fell behind reuses numbers the peers already hold.
                            warn!(
                                theirs = info.summary.get(me).0,
                                ours = ours.get(me).0,
                                "a peer holds more of this till's own changes than it does"
                            );
                            node.metrics.identity_clashes.inc();
                            let mut row = event_row(
                                &info.pos_id,
                                &info.pos_name,
                                ConnectionEventKind::SyncFailed,
                                session.stats(),
                            );
                            row.error_message = Some(format!(
                                "own changes behind: {} holds this till's changes up to {}, this till only up to {}: it was restored from a backup or its data directory was copied. Its missing changes are taken back from the peers; see docs/DESIGN.md",
                                info.pos_name,
                                info.summary.get(me).0,
                                ours.get(me).0
                            ));
                            node.record_event(row);
                        }
                        report_diverged_heads(&node, &info, session.stats()).await;
                        let registration = node.peers.register(
                            &node.identity.pos_id,
                            &info.pos_id,
                            &info.pos_name,
                            address,
                            connection_id,
                            role == Role::Initiator,
                            Arc::clone(&mailbox),
                            now_ms(),
                        );
                        if info.pos_id == node.identity.pos_id {
                            session.close("connected to itself");
                            outcome = Some(Ended::BeforeHandshake("connected to itself".into()));
                            continue;
                        }
                        match registration {
                            Registration::Duplicate => {
                                debug!("duplicate connection, closing it");
                                session.close_as_duplicate();
                                outcome = Some(Ended::Duplicate(info.pos_id.clone()));
                            }
                            Registration::Continued => {
                                // It replaces a connection that lost the tie-break: the link
                                // goes on, nothing to log.
                                debug!("connection continues the link of a duplicate");
                                registered = true;
                                session.set_neighbors(neighbors.borrow_and_update().clone());
                                node.metrics.peers_connected.set(node.peers.connected() as i64);
                            }
                            Registration::New | Registration::Returning => {
                                registered = true;
                                session.set_neighbors(neighbors.borrow_and_update().clone());
                                node.metrics.peers_connected.set(node.peers.connected() as i64);
                                let kind = if registration == Registration::New {
                                    ConnectionEventKind::Connected
                                } else {
                                    ConnectionEventKind::Reconnected
                                };
                                info!(peer_name = %info.pos_name, "peer connected");
                                node.record_event(event_row(
                                    &info.pos_id,
                                    &info.pos_name,
                                    kind,
                                    session.stats(),
                                ));
                            }
                        }
                        peer = Some((info.pos_id, info.pos_name));
                    }
                    Event::NeedBatch { since, after_cursor, limit } => {
                        let selection = node.select_changes(since, after_cursor, limit).await;
                        match selection {
                            Ok(selection) => session.provide_batch(
                                selection.changes,
                                selection.next_cursor,
                                selection.has_more,
                            ),
                            Err(err) => {
                                warn!(%err, "could not select changes for catch-up");
                                if let Some((id, name)) = &peer {
                                    let mut row =
                                        event_row(id, name, ConnectionEventKind::SyncFailed, session.stats());
                                    row.error_message = Some(format!("selecting changes failed: {err}"));
                                    node.record_event(row);
                                }
                                session.close("catch-up failed");
                            }
                        }
                    }
                    Event::Apply { mut changes, from_batch } => {
                        // Live changes already received go to the writer together: one
                        // transaction for the run instead of one per change.
                        let mut answers = 1;
                        while !from_batch
                            && matches!(events.front(), Some(Event::Apply { from_batch: false, .. }))
                        {
                            if let Some(Event::Apply { changes: more, .. }) = events.pop_front() {
                                changes.extend(more);
                                answers += 1;
                            }
                        }
                        let (id, name) =
                            peer.clone().unwrap_or_else(|| (node.identity.pos_id.clone(), String::new()));
                        if !from_batch {
                            // Nothing more is read from this peer while it waits: TCP pushes back.
                            let waited = live_budget.admit(changes.len()).await;
                            if waited >= THROTTLE_NOTICED && peer.is_some() {
                                let count = changes.len() as u64;
                                if throttled == 0 {
                                    warn!(
                                        per_second = live_budget.per_second(),
                                        "peer pushes changes faster than p2p_peer_max_changes_per_second: throttled"
                                    );
                                }
                                throttled += count;
                                node.peers.add_throttled(&id, connection_id, count);
                                let label = PeerLabel { peer: id.to_string() };
                                node.metrics.changes_throttled.get_or_create(&label).inc_by(count);
                            }
                        }
                        if !from_batch {
                            // Not awaited: the connection reads on while the writer applies,
                            // and what arrives meanwhile goes next, in one transaction.
                            if applying.is_none() {
                                applying = Some(start_apply(&node, (id, name), changes, answers));
                            } else {
                                live_waiting.0.extend(changes);
                                live_waiting.1 += answers;
                            }
                            continue;
                        }
                        // A catch-up batch is answered in order after the live changes before it.
                        if let Some(in_flight) = applying.take() {
                            let (report, answered) = in_flight.await;
                            answer_applied(&mut session, report, answered);
                        }
                        if live_waiting.1 > 0 {
                            let (waiting, answered) = std::mem::take(&mut live_waiting);
                            let report =
                                start_apply(&node, (id.clone(), name.clone()), waiting, answered).await;
                            answer_applied(&mut session, report.0, report.1);
                        }
                        let report = apply(&node, &id, &name, changes, true).await;
                        answer_applied(&mut session, report, answers);
                    }
                    Event::CatchUpCompleted { duration_ms, changes_received } => {
                        node.metrics.catch_up_seconds.observe(duration_ms as f64 / 1000.0);
                        if let Some((id, name)) = &peer {
                            debug!(duration_ms, changes_received, "catch-up completed");
                            let mut row =
                                event_row(id, name, ConnectionEventKind::SyncCompleted, session.stats());
                            row.sync_duration_ms = Some(duration_ms);
                            node.record_event(row);
                        }
                    }
                    Event::HeartbeatTimeout => {
                        if let Some((id, name)) = &peer {
                            warn!("heartbeat timeout");
                            node.record_event(event_row(
                                id,
                                name,
                                ConnectionEventKind::HeartbeatTimeout,
                                session.stats(),
                            ));
                        }
                    }
                    Event::ProtocolViolation { error, message_type, message_action } => {
                        node.metrics.protocol_violations.inc();
                        let code = error.code();
                        warn!(%code, message = %error, "protocol violation");
                        let (id, name) = match &peer {
                            Some((id, name)) => (id.to_string(), Some(name.clone())),
                            None => (address.ip().to_string(), None),
                        };
                        let detail = format!("{code}: {error}");
                        let logged = detail.clone();
                        let _ = node
                            .writer
                            .call(Priority::Sync, move |store| {
                                store.log_rejected_message(
                                    &id,
                                    name.as_deref(),
                                    &message_type,
                                    &message_action,
                                    &logged,
                                )
                            })
                            .await;
                        if !session.is_established() {
                            node.record_rejected(
                                address.ip().to_string(),
                                "protocol handshake refused",
                                &detail,
                            );
                        }
                    }
                    Event::IdentityClash { instance } => {
                        warn!(%address, %instance, "another running terminal uses this terminal's posId");
                        node.metrics.identity_clashes.inc();
                        let mut row = event_row(
                            &node.identity.pos_id,
                            "another terminal with this posId",
                            ConnectionEventKind::SyncFailed,
                            session.stats(),
                        );
                        row.error_message = Some(format!(
                            "identity clash: another running terminal at {} uses this terminal's posId (a cloned disk or a copied data directory). Give it its own identity: `possync init` on a fresh data directory, then `possync import` or a catch-up",
                            address.ip()
                        ));
                        node.record_event(row);
                    }
                    Event::Superseded => {
                        debug!("the peer keeps another connection to us; closing this one");
                        superseded_at = Some(now_ms());
                        if let Some((id, _)) = &peer {
                            outcome = Some(Ended::Duplicate(id.clone()));
                        }
                    }
                    Event::PeerError { code, message } => {
                        warn!(%code, %message, "peer reported an error");
                    }
                    Event::Closed { reason } => {
                        close_reason = reason;
                    }
                }
            }
            if let Some((id, _)) = &peer {
                let stats = session.stats();
                count_frames(&node, id, &counted, stats);
                if registered {
                    node.peers.update(id, connection_id, stats, now_ms(), heard);
                }
            }
            counted = session.stats().clone();
            heard = false;
            if progressed {
                continue;
            }
            if session.is_closed() {
                break;
            }
            let deadline = session.poll_timeout();
            let sleep = async {
                match deadline {
                    Some(at) => {
                        tokio::time::sleep(std::time::Duration::from_millis(at.saturating_sub(now_ms())))
                            .await
                    }
                    None => std::future::pending().await,
                }
            };
            let next_frame = async {
                match carried.take() {
                    Some(frame) => frame,
                    None => receiver.recv().await,
                }
            };
            tokio::select! {
                frame = next_frame => match frame {
                    Ok(Some(text)) => {
                        heard = true;
                        session.handle_frame(now_ms(), &text);
                        // Take the frames already waiting too (`recv` is cancel-safe), so that a
                        // burst of live changes is applied in one transaction. Anything else
                        // than a frame is carried to the next turn and handled there.
                        for _ in 0..MAX_FRAMES_PER_TURN {
                            match receiver.recv().now_or_never() {
                                Some(Ok(Some(text))) => session.handle_frame(now_ms(), &text),
                                Some(other) => {
                                    carried = Some(other);
                                    break;
                                }
                                None => break,
                            }
                        }
                    }
                    Ok(None) => session.close("peer closed the connection"),
                    Err(err @ TransportError::NotUtf8(_)) => {
                        // The channel goes on; the frame is refused like malformed JSON.
                        node.metrics.protocol_violations.inc();
                        log_rejected(&node, peer.as_ref(), address, format!("bad_json: {err}")).await;
                    }
                    Err(err @ TransportError::FrameTooLarge { .. }) => {
                        // The secure channel refused it and is closed: record why (SPEC 8).
                        node.metrics.protocol_violations.inc();
                        log_rejected(&node, peer.as_ref(), address, format!("frame_too_large: {err}")).await;
                        session.close(&format!("transport: {err}"));
                    }
                    Err(err) => session.close(&format!("transport: {err}")),
                },
                (report, answered) = async { applying.as_mut().expect("guarded").await }, if applying.is_some() => {
                    applying = None;
                    answer_applied(&mut session, report, answered);
                    if live_waiting.1 > 0 {
                        let from = peer.clone().unwrap_or_else(|| (node.identity.pos_id.clone(), String::new()));
                        let (waiting, answers) = std::mem::take(&mut live_waiting);
                        applying = Some(start_apply(&node, from, waiting, answers));
                    }
                }
                () = sleep => session.handle_timeout(now_ms()),
                change = changes.recv() => match change {
                    Ok(change) => session.send_change(&change.change),
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        // Too far behind the node's writes: the peer catches up from the store.
                        warn!(missed, "connection lagged behind local changes; resynchronising");
                        session.resync();
                    }
                    Err(broadcast::error::RecvError::Closed) => session.close("node stopping"),
                },
                command = mailbox.next() => match command {
                    ConnectionCommand::SyncNow => {
                        if let Some(summary) = node.summary().await {
                            session.request_sync(summary);
                        }
                    }
                    ConnectionCommand::Superseded => {
                        session.close_as_duplicate();
                        if let Some((id, _)) = &peer {
                            outcome = Some(Ended::Duplicate(id.clone()));
                        }
                    }
                    ConnectionCommand::Close(reason) => session.close(&reason),
                },
                _ = shutdown.changed() => session.close("node shutting down"),
                _ = progress_tick.tick(), if registered => {
                    if let (Some((id, name)), Some(ours)) = (&peer, node.summary().await) {
                        // With auto-sync off, being behind until the next "sync now" is the point.
                        let stall = catch_up.observe(now_ms(), session.peer_known(), &ours)
                            .filter(|_| node.settings().auto_sync);
                        node.peers.set_behind(id, connection_id, catch_up.behind());
                        let label = PeerLabel { peer: id.to_string() };
                        node.metrics.changes_behind.get_or_create(&label).set(catch_up.behind() as i64);
                        if let Some(stall) = stall {
                            warn!(behind = stall.behind, for_ms = stall.for_ms, "catch-up stalled");
                            node.metrics.sync_stalls.inc();
                            let mut row = event_row(id, name, ConnectionEventKind::SyncFailed, session.stats());
                            row.error_message = Some(format!(
                                "catch-up stalled: {} changes the peer holds have not arrived for {} s",
                                stall.behind,
                                stall.for_ms / 1000
                            ));
                            node.record_event(row);
                            // Ask once more: a transient refusal may have cleared.
                            session.request_sync(ours);
                        }
                    }
                }
                changed = neighbors.changed(), if registered => {
                    if changed.is_ok() {
                        session.set_neighbors(neighbors.borrow_and_update().clone());
                    }
                }
                changed = settings_watch.changed() => {
                    if changed.is_err() {
                        session.close("node stopping");
                    } else {
                        // Settings take effect on live connections (SPEC): P2P off closes them;
                        // the heartbeat period and batch size apply from the next ping or batch.
                        let settings = settings_watch.borrow_and_update().clone();
                        if settings.peer_max_changes_per_second != live_budget.per_second() {
                            live_budget = LiveChangeBudget::new(settings.peer_max_changes_per_second);
                        }
                        if settings.enabled {
                            session.update_settings(
                                settings.heartbeat_interval_ms,
                                settings.batch_size,
                                settings.auto_sync,
                            );
                        } else {
                            session.close("P2P disabled");
                        }
                    }
                }
            }
        }
        // A frame the channel refused while a frame was being sent: the channel failed the send
        // too and the session closed before the main loop saw the refusal. Record it the same
        // way (SPEC 8: an oversized frame leaves an error row, whatever the timing).
        if let Some(Err(err @ TransportError::FrameTooLarge { .. })) = carried.take() {
            node.metrics.protocol_violations.inc();
            log_rejected(&node, peer.as_ref(), address, format!("frame_too_large: {err}")).await;
        }
        while let Some(frame) = session.poll_transmit() {
            if sender.send(&frame).await.is_err() {
                break;
            }
        }
        sender.close(&close_reason).await;
        if let Some((id, _)) = &peer
            && registered
        {
            node.metrics.changes_behind.remove(&PeerLabel { peer: id.to_string() });
        }
        if let Some((id, name)) = &peer
            && registered
            && node.peers.unregister(id, connection_id, superseded_at)
        {
            node.metrics.peers_connected.set(node.peers.connected() as i64);
            let row = event_row(id, name, ConnectionEventKind::Disconnected, session.stats());
            match superseded_at {
                None => {
                    info!(reason = %close_reason, "peer disconnected");
                    node.record_event(row);
                }
                Some(at) => {
                    // The connection that won the tie-break continues the link when it
                    // registers; if none does in time, the link did end here.
                    let node = Arc::clone(&node);
                    let id = id.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(std::time::Duration::from_millis(SUPERSEDED_GRACE_MS)).await;
                        if node.peers.take_unsucceeded(&id, at) {
                            info!(peer = %id, "peer disconnected (its other connection never came)");
                            node.record_event(row);
                        }
                    });
                }
            }
        }
        match (outcome, peer) {
            (Some(outcome), _) => outcome,
            (None, Some((peer, _))) => Ended::AfterHandshake { peer, reason: close_reason },
            (None, None) => Ended::BeforeHandshake(close_reason),
        }
    }
}

/// Records a frame refused by the secure channel: one `p2p_sync_logs` error row.
/// Why [`send_frame`] gave up on a frame.
enum SendStopped {
    /// The channel failed.
    Transport(TransportError),
    /// The session closed while the frame waited (the peer's heartbeat deadline passed):
    /// the frame is dropped with the connection.
    Abandoned,
}

/// How long a frame may wait for a closed session (its final frames) before it is dropped.
const CLOSING_SEND_GRACE_MS: u64 = 1_000;

/// Sends one frame without freezing the connection. A peer behind a cut link stops reading,
/// its socket buffer fills and the send waits, for TCP's own retransmission timeout (many
/// minutes) if nothing else happens: the peer would stay "online" with no timeout logged.
/// So while the frame waits, the session's timers still run (a peer silent past its
/// heartbeat deadline is timed out, and the frame abandoned), and frames from the peer are
/// still read and handed to the session, so that two tills sending to each other at once
/// cannot block each other.
async fn send_frame(
    sender: &mut SecureSender,
    receiver: &mut SecureReceiver,
    session: &mut Session,
    carried: &mut Option<Result<Option<String>, TransportError>>,
    frame: &str,
) -> Result<(), SendStopped> {
    let send = sender.send(frame);
    tokio::pin!(send);
    loop {
        let now = now_ms();
        let wake_at = match session.poll_timeout() {
            Some(at) if !session.is_closed() => at,
            _ => now + CLOSING_SEND_GRACE_MS,
        };
        let wait = std::time::Duration::from_millis(wake_at.saturating_sub(now));
        tokio::select! {
            sent = &mut send => return sent.map_err(SendStopped::Transport),
            read = receiver.recv(), if carried.is_none() => match read {
                Ok(Some(text)) => session.handle_frame(now_ms(), &text),
                // The end of the channel (or an error) is handled by the main loop.
                other => *carried = Some(other),
            },
            () = tokio::time::sleep(wait) => {
                if session.is_closed() {
                    return Err(SendStopped::Abandoned);
                }
                session.handle_timeout(now_ms());
                if session.is_closed() {
                    return Err(SendStopped::Abandoned);
                }
            }
        }
    }
}

async fn log_rejected(
    node: &Arc<NodeShared>,
    peer: Option<&(PosId, String)>,
    address: SocketAddr,
    error: String,
) {
    let (id, name) = match peer {
        Some((id, name)) => (id.to_string(), Some(name.clone())),
        None => (address.ip().to_string(), None),
    };
    let logged = node
        .writer
        .call(Priority::Sync, move |store| store.log_rejected_message(&id, name.as_deref(), "", "", &error))
        .await;
    if let Ok(Err(err)) = logged {
        warn!(%err, "could not log a refused frame");
    }
}

/// Compares the peer's `heads` with this node's log at the same numbers: a difference is a
/// second history of an origin. Of this till's own origin, it was restored from a backup or
/// copied and then wrote changes the peers hold with other content ("own history diverged",
/// alerted like an identity clash); of another origin, a fork (logged and alerted like one
/// refused on arrival). Both are found here at the handshake, even when neither side will
/// ever send the other the changes concerned.
async fn report_diverged_heads(
    node: &Arc<NodeShared>,
    info: &protocol::PeerInfo,
    stats: &protocol::ConnectionStats,
) {
    if info.heads.is_empty() {
        return;
    }
    let (summary, heads) = (info.summary.clone(), info.heads.clone());
    let diverged = match node.readers.with(move |reader| reader.diverged_heads(&summary, &heads)).await {
        Ok(diverged) => diverged,
        Err(err) => {
            warn!(%err, "could not compare the peer's heads");
            return;
        }
    };
    for (origin, seq) in diverged {
        if origin == node.identity.pos_id {
            warn!(seq = seq.0, "a peer holds another change with this till's own origin and number");
            node.metrics.identity_clashes.inc();
            let mut row = event_row(&info.pos_id, &info.pos_name, ConnectionEventKind::SyncFailed, stats);
            row.error_message = Some(format!(
                "own history diverged: {} holds another change numbered {seq} of this till than this till does: it was restored from a backup or its data directory was copied, and wrote changes under numbers the peers hold with other content. Those changes stay on this till; see docs/DESIGN.md",
                info.pos_name
            ));
            node.record_event(row);
        } else {
            warn!(%origin, seq = seq.0, "a peer holds another change with this origin and number (a fork)");
            node.metrics.forks.inc();
            let (id, name) = (info.pos_id.to_string(), info.pos_name.clone());
            let logged = node
                .writer
                .call(Priority::Sync, move |store| {
                    store.log_fork_at_handshake(PeerRef { id: &id, name: &name }, &origin, seq)
                })
                .await;
            if let Ok(Err(err)) = logged {
                warn!(%err, "could not log a fork");
            }
        }
    }
}

/// An apply of live changes on its way through the writer, with the number of `Apply`
/// events it answers.
type ApplyInFlight =
    std::pin::Pin<Box<dyn std::future::Future<Output = (Option<protocol::ApplyReport>, usize)> + Send>>;

/// Starts applying live changes from `peer` (see [`apply`]).
fn start_apply(
    node: &Arc<NodeShared>,
    peer: (PosId, String),
    changes: Vec<StampedChange>,
    answers: usize,
) -> ApplyInFlight {
    let node = Arc::clone(node);
    Box::pin(async move { (apply(&node, &peer.0, &peer.1, changes, false).await, answers) })
}

/// Gives the session its answers to `answers` `Apply` events applied together (the
/// session expects one per `Apply`, in order; the refusals are reported once), or closes it
/// when the node is stopping.
fn answer_applied(session: &mut Session, report: Option<protocol::ApplyReport>, answers: usize) {
    let Some(report) = report else {
        session.close("node stopping");
        return;
    };
    for _ in 1..answers {
        let quiet = protocol::ApplyReport { rejections: Vec::new(), ..report.clone() };
        session.batch_applied(now_ms(), quiet);
    }
    session.batch_applied(now_ms(), report);
}

/// Applies changes from a peer through the writer, with metrics.
async fn apply(
    node: &Arc<NodeShared>,
    peer_id: &PosId,
    peer_name: &str,
    changes: Vec<StampedChange>,
    from_batch: bool,
) -> Option<protocol::ApplyReport> {
    let id = peer_id.to_string();
    let name = peer_name.to_string();
    let live_ages: Vec<u64> = if from_batch {
        Vec::new()
    } else {
        changes.iter().filter_map(|change| change_ms(&change.wire)).collect()
    };
    // Signatures are checked here, on this connection's task, so that the single writer
    // only compares keys (docs/DESIGN.md, "Each till writes only as itself").
    let verified = node.keys.verify_stamped(&changes);
    let result = node
        .writer
        .call(Priority::Sync, move |store| {
            let report = store.apply_stamped(PeerRef { id: &id, name: &name }, changes, Some(verified));
            // The session only reads the summary to ask for what a gap is missing: copy it
            // only then (or when the batch failed, which is answered like a gap).
            let summary = match &report {
                Ok(report) if !report.gap && !report.must_retry() => VersionVector::new(),
                _ => store.summary().clone(),
            };
            (report, summary)
        })
        .await
        .ok()?;
    let (report, summary) = result;
    let report = match report {
        Ok(report) => report,
        Err(err) => {
            // A database failure, not bad input: nothing was applied; ask again later.
            warn!(%err, "applying a batch failed");
            return Some(protocol::ApplyReport { gap: true, local_summary: summary, ..Default::default() });
        }
    };
    if report.forks > 0 {
        warn!(
            changes = report.forks,
            "two different changes with one origin and number: refused (see p2p_sync_logs)"
        );
        node.metrics.forks.inc_by(u64::from(report.forks));
    }
    if report.forged > 0 {
        warn!(
            changes = report.forged,
            "changes not signed by their origin (forged) or of a revoked till: refused (see p2p_sync_logs)"
        );
        node.metrics.changes_forged.inc_by(u64::from(report.forged));
    }
    if report.held_back > 0 {
        warn!(
            changes = report.held_back,
            retry_at_ms = report.retry_at_ms,
            "changes stamped further ahead of this till's clock than p2p_max_clock_ahead: held back (see p2p_sync_logs)"
        );
        node.metrics.changes_held_back.inc_by(u64::from(report.held_back));
    }
    if report.clock_ahead > 0 {
        warn!(
            changes = report.clock_ahead,
            "changes stamped far ahead of this till's clock (see p2p_sync_logs details)"
        );
        node.metrics.remote_clock_ahead.inc_by(u64::from(report.clock_ahead));
    }
    let now = now_ms();
    for age in live_ages {
        node.metrics.propagation_lag_seconds.observe(now.saturating_sub(age) as f64 / 1000.0);
    }
    for (status, count) in [
        ("success", report.applied),
        ("conflict", report.conflicts),
        ("skipped", report.skipped),
        ("error", report.errors),
    ] {
        if count > 0 {
            node.metrics
                .changes_applied
                .get_or_create(&StatusLabel { status: status.into() })
                .inc_by(u64::from(count));
        }
    }
    for (conflict_type, strategy) in &report.conflict_kinds {
        node.metrics
            .conflicts
            .get_or_create(&ConflictLabels {
                conflict_type: conflict_type.as_str().to_string(),
                strategy: strategy.as_str().to_string(),
            })
            .inc();
    }
    Some(report.into_session_report(summary))
}

/// The origin clock time of a wire change, in ms.
fn change_ms(change: &WireChange) -> Option<u64> {
    Some(change.peek_stamp()?.hlc?.ms())
}

fn count_frames(
    node: &NodeShared,
    peer: &PosId,
    before: &protocol::ConnectionStats,
    after: &protocol::ConnectionStats,
) {
    let label = |direction| PeerDirection { peer: peer.to_string(), direction };
    let sent = after.messages_sent.saturating_sub(before.messages_sent);
    let received = after.messages_received.saturating_sub(before.messages_received);
    if sent > 0 {
        node.metrics.frames.get_or_create(&label("sent")).inc_by(sent);
        node.metrics
            .bytes
            .get_or_create(&label("sent"))
            .inc_by(after.bytes_sent.saturating_sub(before.bytes_sent));
    }
    if received > 0 {
        node.metrics.frames.get_or_create(&label("received")).inc_by(received);
        node.metrics
            .bytes
            .get_or_create(&label("received"))
            .inc_by(after.bytes_received.saturating_sub(before.bytes_received));
    }
}

/// A connection event about a known peer. Only `disconnected` carries the counters (the
/// connection's final totals), so that summing a column over the table (as the seed's
/// "peer performance" query does) counts every connection's traffic exactly once.
fn event_row(
    peer: &PosId,
    name: &str,
    kind: ConnectionEventKind,
    stats: &protocol::ConnectionStats,
) -> ConnectionEvent {
    let final_counters = kind == ConnectionEventKind::Disconnected;
    let counter = |value: u64| if final_counters { value } else { 0 };
    ConnectionEvent {
        peer_id: peer.to_string(),
        peer_name: Some(name.to_string()),
        kind,
        messages_sent: counter(stats.messages_sent),
        messages_received: counter(stats.messages_received),
        bytes_sent: counter(stats.bytes_sent),
        bytes_received: counter(stats.bytes_received),
        sync_duration_ms: None,
        error_message: None,
        at_ms: now_ms(),
    }
}
