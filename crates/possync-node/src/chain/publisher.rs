//! The publish loop, shared by a store's till (its store's origins, UP stream) and the head
//! office (its own origin, DOWN stream): drives a [`Planner`] against JetStream.
//!
//! Each round: take the node's version vector, ask the planner for the next step, and carry
//! it out: read the last message of an origin's subject (direct get, last by subject), or
//! select the origin's next changes from the change log and publish them as one message
//! with `Nats-Expected-Last-Subject-Sequence`, waiting for the ack. When nothing is left it
//! waits for the writer to publish a new change (or a 1 s tick). A refused publish ("wrong
//! last sequence": another till appended first) re-reads the subject; any other failure
//! forgets what it knew of that origin and backs off. Nothing here is fire-and-forget: the
//! change log stays the buffer until the server has acknowledged a message.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::stream::DirectGetErrorKind;
use async_nats::jetstream::{self, message::PublishMessage};
use possync_chain::message::held_from_header;
use possync_chain::{Batch, HEADER_LAST_SEQ, MessageError, Planner, Step, StoreId, Subjects};
use possync_core::{PosId, Seq, WireChange};
use tokio::sync::broadcast::error::RecvError;
use tracing::{debug, warn};

use super::{ChainError, ChainStatus, backoff, pause};
use crate::shared::ChainHandle;

/// Most changes in one message (a message is also kept under `MAX_MESSAGE_BYTES`).
pub(crate) const MAX_CHANGES_PER_MESSAGE: usize = 200;

/// Which way, and so which origins and subjects.
#[derive(Debug, Clone)]
pub(crate) enum Lane {
    /// A store's till: every origin of its store, on `possync.<c>.up.<s>.<o>`.
    Up {
        /// The store.
        store: StoreId,
    },
    /// The head office: its own origin, on `possync.<c>.down.<o>`.
    Down,
}

/// Publishes until the node shuts down.
pub(crate) async fn run(
    node: ChainHandle,
    js: jetstream::Context,
    subjects: Subjects,
    lane: Lane,
    status: Arc<ChainStatus>,
) {
    let stream_name = match lane {
        Lane::Up { .. } => subjects.up_stream(),
        Lane::Down => subjects.down_stream(),
    };
    let mut planner = Planner::new(MAX_CHANGES_PER_MESSAGE);
    let mut changes = node.writer.subscribe();
    let mut failures = 0u32;
    // Origins this till must not upload (the head office's), refreshed from the database
    // when an origin it has not classified yet shows up.
    let mut excluded: BTreeSet<PosId> = BTreeSet::new();
    let mut classified: BTreeSet<PosId> = BTreeSet::new();
    let mut shutdown = node.shutdown.subscribe();
    loop {
        if *shutdown.borrow() {
            return;
        }
        let Some(local) = node.summary().await else { return };
        if let Lane::Up { .. } = lane
            && local.iter().any(|(origin, _)| !classified.contains(origin))
        {
            match classify(&node, &js, &subjects, &local, &mut classified).await {
                Ok(origins) => excluded = origins,
                Err(err) => {
                    warn!(%err, "cannot tell the head office's origins from the store's; retrying");
                    failures += 1;
                    if !pause(&node, backoff(failures)).await {
                        return;
                    }
                    continue;
                }
            }
        }
        // The head office publishes every origin it has written as (its posId, and the
        // `<posId>-r<k>` of a recovered history).
        let own = match lane {
            Lane::Up { .. } => Vec::new(),
            Lane::Down => match node.readers.with(|reader| reader.own_origins()).await {
                Ok((_, own)) => own,
                Err(err) => {
                    warn!(%err, "cannot read this node's own origins; publishing its posId's");
                    vec![node.pos_id.clone()]
                }
            },
        };
        let uploads = |origin: &PosId| match lane {
            Lane::Up { .. } => !excluded.contains(origin),
            Lane::Down => own.contains(origin),
        };
        let backlog = planner.backlog(&local, uploads);
        // How old the backlog is: the clock time of its oldest change (one indexed read per
        // origin behind; nothing when the backbone holds everything).
        let pending = if backlog == 0 { Vec::new() } else { planner.first_pending(&local, uploads) };
        let oldest_pending_ms = if pending.is_empty() {
            None
        } else {
            node.readers.with(move |reader| reader.oldest_change_ms(&pending)).await.ok().flatten()
        };
        status.update(|status| {
            status.backlog = backlog;
            status.oldest_pending_ms = oldest_pending_ms;
        });
        let step = planner.next(&local, uploads);
        let result = match step {
            None => {
                // Everything is on the backbone: wait for a new change.
                tokio::select! {
                    received = changes.recv() => {
                        if let Err(RecvError::Closed) = received {
                            return;
                        }
                    }
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = shutdown.changed() => return,
                }
                continue;
            }
            Some(Step::Read { origin }) => {
                let Some(subject) = subject(&subjects, &lane, &origin) else { return };
                read_last(&js, &stream_name, &subject, &origin, &mut planner).await
            }
            Some(Step::Publish { origin, first, last, expected_subject_seq }) => {
                let Some(subject) = subject(&subjects, &lane, &origin) else { return };
                publish(
                    &node,
                    &js,
                    &subject,
                    &origin,
                    (first, last),
                    expected_subject_seq,
                    &mut planner,
                    &status,
                )
                .await
            }
        };
        match result {
            Ok(()) => failures = 0,
            Err(err) => {
                warn!(%err, "backbone publish round failed; retrying");
                status.update(|status| status.last_error = Some(err.to_string()));
                planner.forget_all();
                failures += 1;
                if !pause(&node, backoff(failures)).await {
                    return;
                }
            }
        }
    }
}

/// Sorts the origins of `local` not classified yet into the head office's (returned, with
/// those known before) and the store's (every other). The head office's are those the
/// database lists (seen on the DOWN stream) or that have a subject on the DOWN stream: a till
/// may hold them through the LAN before its own downlink has read them.
async fn classify(
    node: &ChainHandle,
    js: &jetstream::Context,
    subjects: &Subjects,
    local: &possync_core::VersionVector,
    classified: &mut BTreeSet<PosId>,
) -> Result<BTreeSet<PosId>, ChainError> {
    let mut head_office: BTreeSet<PosId> =
        node.readers.with(|reader| reader.chain_hq_origins()).await?.into_iter().collect();
    let down = js
        .get_stream_no_info(subjects.down_stream())
        .await
        .map_err(|err| ChainError::JetStream(err.to_string()))?;
    let mut found = Vec::new();
    for (origin, _) in local.iter() {
        if classified.contains(origin) || head_office.contains(origin) {
            continue;
        }
        match down.direct_get_last_for_subject(subjects.down(origin)?).await {
            Ok(_) => found.push(origin.clone()),
            Err(err) if err.kind() == DirectGetErrorKind::NotFound => {}
            Err(err) => return Err(ChainError::JetStream(format!("DOWN stream: {err}"))),
        }
    }
    if !found.is_empty() {
        let noted = found.clone();
        node.writer
            .call(crate::writer::Priority::Sync, move |store| store.note_chain_hq_origins(&noted))
            .await??;
        head_office.extend(found);
    }
    classified.extend(local.iter().map(|(origin, _)| origin.clone()));
    Ok(head_office)
}

fn subject(subjects: &Subjects, lane: &Lane, origin: &PosId) -> Option<String> {
    let subject = match lane {
        Lane::Up { store } => subjects.up(store, origin),
        Lane::Down => subjects.down(origin),
    };
    match subject {
        Ok(subject) => Some(subject),
        Err(err) => {
            // A posId that cannot be a subject token: never uploadable. Logged, and the
            // loop ends (the configuration must change).
            tracing::error!(%err, "cannot publish this origin on the backbone");
            None
        }
    }
}

/// Reads the last message of `origin`'s subject into the planner.
async fn read_last(
    js: &jetstream::Context,
    stream_name: &str,
    subject: &str,
    origin: &PosId,
    planner: &mut Planner,
) -> Result<(), ChainError> {
    let stream =
        js.get_stream_no_info(stream_name).await.map_err(|err| ChainError::JetStream(err.to_string()))?;
    match stream.direct_get_last_for_subject(subject).await {
        Ok(message) => {
            let held = held_from_header(message.headers.get(HEADER_LAST_SEQ).map(|value| value.as_str()));
            debug!(%origin, subject_seq = message.sequence, held = held.0, "backbone holds");
            planner.on_read(origin, Some((message.sequence, held)));
            Ok(())
        }
        Err(err) if err.kind() == DirectGetErrorKind::NotFound => {
            planner.on_read(origin, None);
            Ok(())
        }
        Err(err) => Err(ChainError::JetStream(format!("reading the last message of {subject}: {err}"))),
    }
}

/// Publishes `origin`'s changes `range` (or a prefix small enough for one message).
#[allow(clippy::too_many_arguments)]
async fn publish(
    node: &ChainHandle,
    js: &jetstream::Context,
    subject: &str,
    origin: &PosId,
    range: (Seq, Seq),
    expected_subject_seq: u64,
    planner: &mut Planner,
    status: &ChainStatus,
) -> Result<(), ChainError> {
    let (first, last) = range;
    let count = (last.0 - first.0 + 1) as usize;
    let selected_origin = origin.clone();
    let mut changes: Vec<WireChange> = node
        .readers
        .with(move |reader| reader.origin_changes(&selected_origin, Seq(first.0 - 1), count))
        .await?;
    let batch = loop {
        if changes.is_empty() {
            return Err(ChainError::JetStream(format!("{origin}'s change {first} is not in the log")));
        }
        let batch = Batch::new(origin.clone(), changes.clone())
            .map_err(|err| ChainError::JetStream(format!("own change log: {err}")))?;
        match batch.encode() {
            Ok(bytes) => break (batch, bytes),
            Err(MessageError::TooLarge { .. }) if changes.len() > 1 => {
                changes.truncate(changes.len() / 2);
            }
            Err(err) => return Err(ChainError::JetStream(format!("{origin}'s change {first}: {err}"))),
        }
    };
    let (batch, bytes) = batch;
    let mut message =
        PublishMessage::build().payload(bytes.into()).expected_last_subject_sequence(expected_subject_seq);
    for (name, value) in batch.headers() {
        message = message.header(name, value.as_str());
    }
    let acked = match js.send_publish(subject.to_string(), message).await {
        Ok(ack) => ack.await,
        Err(err) => Err(err),
    };
    match acked {
        Ok(ack) => {
            planner.on_published(origin, ack.sequence, batch.last_seq());
            let sent = batch.changes().len() as u64;
            status.update(|status| {
                status.published_messages += 1;
                status.published_changes += sent;
            });
            Ok(())
        }
        Err(err) if err.kind() == PublishErrorKind::WrongLastSequence => {
            debug!(%origin, "another uploader appended first; reading again");
            planner.on_wrong_sequence(origin);
            status.update(|status| status.wrong_sequence += 1);
            Ok(())
        }
        Err(err) => {
            // The outcome is unknown (a timed-out ack may still have been stored): read the
            // subject again before the next publish.
            planner.forget(origin);
            Err(ChainError::JetStream(format!("publishing on {subject}: {err}")))
        }
    }
}
