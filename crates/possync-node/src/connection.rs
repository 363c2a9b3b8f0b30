//! One task per peer connection: it owns the secure channel and pumps the sans-IO [`Link`]
//! (the protocol session and the node's decisions about this connection) with frames, timer
//! ticks, the node's changes and commands, and carries out the link's effects against the
//! node: the writer thread, the peer table, the metrics. What it can touch is its
//! [`ConnectionHandle`], one per listener or dialer, shared by their connections.
//!
//! The loop, each turn: send every queued frame; turn the session's events into effects and
//! carry them out; publish the counters; then wait for the first of: a frame from the peer,
//! the session's next deadline, the apply in flight, a change written by this node, a
//! command from the node, a progress tick, a settings change, shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures_util::FutureExt;
use possync_core::protocol::{self, Role, StampedChange};
use possync_core::{PosId, VersionVector, WireChange};
use possync_store::PeerRef;
use tokio::sync::broadcast;
use tracing::{Instrument, info, info_span, warn};

use crate::clock::now_ms;
use crate::link::{Effect, Ended, Link, LinkConfig, Metric, PeerName};
use crate::metrics::{ConflictLabels, PeerDirection, PeerLabel, StatusLabel};
use crate::peer_rate::LiveChangeBudget;
use crate::peers::{ConnectionCommand, Mailbox, SUPERSEDED_GRACE_MS};
use crate::shared::ConnectionHandle;
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

/// Runs a connection until it closes.
///
/// Plain functions returning `async move` blocks rather than `async fn`s: the future of
/// an `async fn` keeps its arguments next to the locals moved out of them, so the channel
/// was held four times over in every connection's task; a block holds each capture once.
pub fn run(
    node: Arc<ConnectionHandle>,
    channel: SecureChannel,
    role: Role,
) -> impl Future<Output = Ended> + Send {
    let address = channel.peer_addr();
    let span = info_span!("peer", %address, role = ?role, peer = tracing::field::Empty);
    drive(node, channel, role, address).instrument(span)
}

fn drive(
    node: Arc<ConnectionHandle>,
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
            .call(Priority::Sync, |store| {
                let own_origins = store.own_origins().to_vec();
                match store.summary_with_heads() {
                    Ok((summary, heads)) => (summary, heads, own_origins),
                    Err(err) => {
                        warn!(%err, "could not read the heads of the change log; the hello goes without them");
                        (store.summary().clone(), Default::default(), own_origins)
                    }
                }
            })
            .await;
        let Ok((summary, heads, own_origins)) = heads else {
            return Ended::BeforeHandshake("node stopping".into());
        };
        let mut settings_watch = node.settings.subscribe();
        // This node's other connections, told to the peer so it does not relay their changes.
        let mut neighbors = node.peers.watch_connected();
        let settings = settings_watch.borrow_and_update().clone();
        if !settings.enabled {
            return Ended::BeforeHandshake("P2P disabled".into());
        }
        let config = LinkConfig {
            pos_id: node.pos_id.clone(),
            pos_name: node.pos_name.clone(),
            instance: node.instance.clone(),
            role,
            address,
            summary,
            heads,
            own_origins,
        };
        let mut link = Link::new(config, &settings, now_ms());
        let mut live_budget = LiveChangeBudget::new(settings.peer_max_changes_per_second);
        let mut throttled: u64 = 0;
        let mut progress_tick = tokio::time::interval(PROGRESS_EVERY);
        progress_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mailbox = Arc::new(Mailbox::default());
        let mut shutdown = node.shutdown.subscribe();
        let mut counted = protocol::ConnectionStats::default();
        let mut heard = false;
        // A read result taken while draining a burst, handled at the next turn.
        let mut carried: Option<Result<Option<String>, TransportError>> = None;
        // The link's apply in flight: the connection reads on while the writer applies it.
        let mut applying: Option<ApplyInFlight> = None;

        loop {
            while let Some(frame) = link.poll_transmit() {
                match send_frame(&mut sender, &mut receiver, &mut link, &mut carried, &frame).await {
                    Ok(()) => {}
                    Err(SendStopped::Transport(err)) => link.send_failed(&err),
                    Err(SendStopped::Abandoned) => break,
                }
            }
            let mut progressed = link.process_events(now_ms());
            while let Some(effect) = link.poll_effect() {
                progressed = true;
                match effect {
                    Effect::Register(info) => {
                        tracing::Span::current().record("peer", tracing::field::display(&info.pos_id));
                        if let Some(ours) = node.summary().await {
                            link.own_changes_held(&info, &ours);
                        }
                        if !info.heads.is_empty() {
                            let (summary, heads) = (info.summary.clone(), info.heads.clone());
                            match node
                                .readers
                                .with(move |reader| reader.diverged_heads(&summary, &heads))
                                .await
                            {
                                Ok(diverged) => link.diverged_heads(&info, diverged),
                                Err(err) => warn!(%err, "could not compare the peer's heads"),
                            }
                        }
                        let registration = node.peers.register(
                            &node.pos_id,
                            &info.pos_id,
                            &info.pos_name,
                            address,
                            connection_id,
                            role == Role::Initiator,
                            Arc::clone(&mailbox),
                            now_ms(),
                        );
                        link.registered(now_ms(), &info, registration, neighbors.borrow_and_update().clone());
                        if link.is_registered() {
                            node.metrics.peers_connected.set(node.peers.connected() as i64);
                        }
                    }
                    Effect::SelectBatch { since, after_cursor, limit } => {
                        match node.select_changes(since, after_cursor, limit).await {
                            Ok(selection) => link.batch_selected(
                                selection.changes,
                                selection.next_cursor,
                                selection.has_more,
                            ),
                            Err(err) => link.selection_failed(now_ms(), &err.to_string()),
                        }
                    }
                    Effect::Admit { changes } => {
                        // Nothing more is read from this peer while it waits: TCP pushes back.
                        let waited = live_budget.admit(changes).await;
                        if waited >= THROTTLE_NOTICED
                            && let Some(peer) = link.peer()
                        {
                            let count = changes as u64;
                            if throttled == 0 {
                                warn!(
                                    per_second = live_budget.per_second(),
                                    "peer pushes changes faster than p2p_peer_max_changes_per_second: throttled"
                                );
                            }
                            throttled += count;
                            node.peers.add_throttled(&peer.id, connection_id, count);
                            let label = PeerLabel { peer: peer.id.to_string() };
                            node.metrics.changes_throttled.get_or_create(&label).inc_by(count);
                        }
                    }
                    Effect::Apply { changes, live } => {
                        let from = link
                            .peer()
                            .cloned()
                            .unwrap_or_else(|| PeerName { id: node.pos_id.clone(), name: String::new() });
                        applying = Some(start_apply(&node, from, changes, !live));
                    }
                    effect @ (Effect::Record(_)
                    | Effect::LogRefused { .. }
                    | Effect::LogFork { .. }
                    | Effect::Count(_)) => {
                        record(&node, address, link.peer(), effect).await;
                    }
                    Effect::FetchOwnHistory { origin } => {
                        if let Some(ours) = node.summary().await {
                            let lowered = ours
                                .iter()
                                .filter(|(held, _)| **held != origin)
                                .map(|(o, seq)| (o.clone(), seq))
                                .collect();
                            info!(%origin, "asking the peer for its copies of this till's own history");
                            link.request_sync(lowered);
                        }
                    }
                    Effect::Behind(behind) => {
                        if let Some(peer) = link.peer() {
                            node.peers.set_behind(&peer.id, connection_id, behind);
                            let label = PeerLabel { peer: peer.id.to_string() };
                            node.metrics.changes_behind.get_or_create(&label).set(behind as i64);
                        }
                    }
                }
            }
            if let Some(peer) = link.peer() {
                let stats = link.stats();
                count_frames(&node, &peer.id, &counted, stats);
                if link.is_registered() {
                    node.peers.update(&peer.id, connection_id, stats, now_ms(), heard);
                }
            }
            counted = link.stats().clone();
            heard = false;
            if progressed {
                continue;
            }
            if link.is_closed() {
                break;
            }
            let deadline = link.poll_timeout();
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
                        link.handle_frame(now_ms(), &text);
                        // Take the frames already waiting too (`recv` is cancel-safe), so that a
                        // burst of live changes is applied in one transaction. Anything else
                        // than a frame is carried to the next turn and handled there.
                        for _ in 0..MAX_FRAMES_PER_TURN {
                            match receiver.recv().now_or_never() {
                                Some(Ok(Some(text))) => link.handle_frame(now_ms(), &text),
                                Some(other) => {
                                    carried = Some(other);
                                    break;
                                }
                                None => break,
                            }
                        }
                    }
                    Ok(None) => link.peer_closed(),
                    Err(err) => link.receive_failed(now_ms(), &err),
                },
                report = async { applying.as_mut().expect("guarded").await }, if applying.is_some() => {
                    applying = None;
                    link.applied(now_ms(), report);
                }
                () = sleep => link.handle_timeout(now_ms()),
                change = changes.recv() => match change {
                    Ok(change) => link.local_change(&change.change),
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        // Too far behind the node's writes: the peer catches up from the store.
                        warn!(missed, "connection lagged behind local changes; resynchronising");
                        link.lagged();
                    }
                    Err(broadcast::error::RecvError::Closed) => link.close("node stopping"),
                },
                command = mailbox.next() => match command {
                    ConnectionCommand::SyncNow => {
                        if let Some(summary) = node.summary().await {
                            link.request_sync(summary);
                        }
                    }
                    ConnectionCommand::Superseded => link.superseded_here(),
                    ConnectionCommand::Close(reason) => link.close(&reason),
                },
                _ = shutdown.changed() => link.close("node shutting down"),
                _ = progress_tick.tick(), if link.is_registered() => {
                    if let Some(ours) = node.summary().await {
                        link.observe_progress(now_ms(), &ours);
                    }
                }
                changed = neighbors.changed(), if link.is_registered() => {
                    if changed.is_ok() {
                        link.set_neighbors(neighbors.borrow_and_update().clone());
                    }
                }
                changed = settings_watch.changed() => {
                    if changed.is_err() {
                        link.close("node stopping");
                    } else {
                        let settings = settings_watch.borrow_and_update().clone();
                        if settings.peer_max_changes_per_second != live_budget.per_second() {
                            live_budget = LiveChangeBudget::new(settings.peer_max_changes_per_second);
                        }
                        link.settings_changed(&settings);
                    }
                }
            }
        }
        // A frame the channel refused while a frame was being sent: the channel failed the send
        // too and the session closed before the main loop saw the refusal. Record it the same
        // way (SPEC 8: an oversized frame leaves an error row, whatever the timing).
        if let Some(Err(err @ TransportError::FrameTooLarge { .. })) = carried.take() {
            link.receive_failed(now_ms(), &err);
            while let Some(effect) = link.poll_effect() {
                record(&node, address, link.peer(), effect).await;
            }
        }
        while let Some(frame) = link.poll_transmit() {
            if sender.send(&frame).await.is_err() {
                break;
            }
        }
        sender.close(link.close_reason()).await;
        if let Some(peer) = link.peer()
            && link.is_registered()
        {
            node.metrics.changes_behind.remove(&PeerLabel { peer: peer.id.to_string() });
            let superseded_at = link.superseded_at();
            if node.peers.unregister(&peer.id, connection_id, superseded_at) {
                node.metrics.peers_connected.set(node.peers.connected() as i64);
                if let Some(row) = link.disconnected_row(now_ms()) {
                    match superseded_at {
                        None => {
                            info!(reason = %link.close_reason(), "peer disconnected");
                            node.events.record(row);
                        }
                        Some(at) => {
                            // The connection that won the tie-break continues the link when it
                            // registers; if none does in time, the link did end here.
                            let node = Arc::clone(&node);
                            let id = peer.id.clone();
                            tokio::spawn(async move {
                                tokio::time::sleep(std::time::Duration::from_millis(SUPERSEDED_GRACE_MS))
                                    .await;
                                if node.peers.take_unsucceeded(&id, at) {
                                    info!(peer = %id, "peer disconnected (its other connection never came)");
                                    node.events.record(row);
                                }
                            });
                        }
                    }
                }
            }
        }
        link.ended()
    }
}

/// Carries out an effect that only records what happened (an audit row, a metric); any
/// other effect is dropped (the connection is over when this is called with one).
async fn record(node: &ConnectionHandle, address: SocketAddr, peer: Option<&PeerName>, effect: Effect) {
    match effect {
        Effect::Record(row) => node.events.record(row),
        Effect::LogRefused { peer_id, peer_name, message_type, message_action, detail, before_handshake } => {
            if before_handshake {
                node.events.record_rejected(address.ip().to_string(), "protocol handshake refused", &detail);
            }
            let logged = node
                .writer
                .call(Priority::Sync, move |store| {
                    store.log_rejected_message(
                        &peer_id,
                        peer_name.as_deref(),
                        &message_type,
                        &message_action,
                        &detail,
                    )
                })
                .await;
            if let Ok(Err(err)) = logged {
                warn!(%err, "could not log a refused message");
            }
        }
        Effect::LogFork { origin, seq } => {
            let Some(peer) = peer.cloned() else { return };
            let logged = node
                .writer
                .call(Priority::Sync, move |store| {
                    store.log_fork_at_handshake(
                        PeerRef { id: peer.id.as_str(), name: &peer.name },
                        &origin,
                        seq,
                    )
                })
                .await;
            if let Ok(Err(err)) = logged {
                warn!(%err, "could not log a fork");
            }
        }
        Effect::Count(metric) => count(node, metric),
        _ => {}
    }
}

/// Moves the node metric a link event counts.
fn count(node: &ConnectionHandle, metric: Metric) {
    match metric {
        Metric::ProtocolViolation => {
            node.metrics.protocol_violations.inc();
        }
        Metric::IdentityClash => {
            node.metrics.identity_clashes.inc();
        }
        Metric::Fork => {
            node.metrics.forks.inc();
        }
        Metric::SyncStall => {
            node.metrics.sync_stalls.inc();
        }
        Metric::CatchUp { duration_ms } => node.metrics.catch_up_seconds.observe(duration_ms as f64 / 1000.0),
    }
}

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
    link: &mut Link,
    carried: &mut Option<Result<Option<String>, TransportError>>,
    frame: &str,
) -> Result<(), SendStopped> {
    let send = sender.send(frame);
    tokio::pin!(send);
    loop {
        let now = now_ms();
        let wake_at = match link.poll_timeout() {
            Some(at) if !link.is_closed() => at,
            _ => now + CLOSING_SEND_GRACE_MS,
        };
        let wait = std::time::Duration::from_millis(wake_at.saturating_sub(now));
        tokio::select! {
            sent = &mut send => return sent.map_err(SendStopped::Transport),
            read = receiver.recv(), if carried.is_none() => match read {
                Ok(Some(text)) => link.handle_frame(now_ms(), &text),
                // The end of the channel (or an error) is handled by the main loop.
                other => *carried = Some(other),
            },
            () = tokio::time::sleep(wait) => {
                if link.is_closed() {
                    return Err(SendStopped::Abandoned);
                }
                link.handle_timeout(now_ms());
                if link.is_closed() {
                    return Err(SendStopped::Abandoned);
                }
            }
        }
    }
}

/// An apply on its way through the writer.
type ApplyInFlight =
    std::pin::Pin<Box<dyn std::future::Future<Output = Option<protocol::BatchApplied>> + Send>>;

/// Starts applying changes from `peer` (see [`apply`]).
fn start_apply(
    node: &Arc<ConnectionHandle>,
    peer: PeerName,
    changes: Vec<StampedChange>,
    from_batch: bool,
) -> ApplyInFlight {
    let node = Arc::clone(node);
    Box::pin(async move { apply(&node, &peer.id, &peer.name, changes, from_batch).await })
}

/// Applies changes from a peer through the writer, with metrics.
async fn apply(
    node: &Arc<ConnectionHandle>,
    peer_id: &PosId,
    peer_name: &str,
    changes: Vec<StampedChange>,
    from_batch: bool,
) -> Option<protocol::BatchApplied> {
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
            return Some(protocol::BatchApplied { gap: true, local_summary: summary, ..Default::default() });
        }
    };
    if report.forks > 0 {
        warn!(
            changes = report.forks,
            "two different changes with one origin and number: refused (see p2p_sync_logs)"
        );
        node.metrics.forks.inc_by(u64::from(report.forks));
    }
    if report.recovered > 0 {
        warn!(
            changes = report.recovered,
            "this till's own history was taken back from the peer; its changes made in between are re-issued under a new origin (see p2p_sync_logs, displaced_changes)"
        );
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
    Some(report.into_batch_applied(summary))
}

/// The origin clock time of a wire change, in ms.
fn change_ms(change: &WireChange) -> Option<u64> {
    Some(change.peek_stamp()?.hlc?.ms())
}

fn count_frames(
    node: &ConnectionHandle,
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
