//! The head office on the backbone (`[hq]`): creates the streams, ingests every store's
//! changes from the UP stream, and publishes its own origin's changes (the catalog) on the
//! DOWN stream ([`super::publisher`], lane `Down`).
//!
//! Ingest is a durable pull consumer (`possync-hq`, explicit acks): each message is checked
//! ([`Batch::decode`] against its subject; its origin must not be the head office's own, nor
//! belong to another store), applied through the single writer in one durable transaction
//! (`apply_chain_batch`, peer `store <s>`), and acked only after the commit. A message that
//! fails the checks is logged (a `p2p_sync_logs` error row), terminated, and the consumer
//! goes on. A message that meets a gap (an earlier message of its origin not applied yet,
//! e.g. one being redelivered) is negatively acked with a delay, so order is restored by the
//! redelivery. A gap that persists means the stream lost messages (a per-subject limit):
//! the subject is purged, which makes the store's tills upload the origin again from seq 1
//! (every change already held is skipped), and the message is terminated.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer, stream};
use futures_util::StreamExt;
use possync_chain::{Batch, Direction, HEADER_LAST_SEQ, Subjects};
use tokio::task::JoinSet;
use tracing::{info, warn};

use super::publisher::{self, Lane};
use super::{ChainError, ChainStatus, backoff, connect, log_rejected, pause};
use crate::config::HqConfig;
use crate::node::NodeShared;
use crate::writer::Priority;

/// The head office's durable consumer on the UP stream.
pub(crate) const CONSUMER: &str = "possync-hq";
/// Messages of one subject kept by the UP stream: far more than a store sends while the
/// head office is down for a day, and what bounds the stream's size.
const MAX_MESSAGES_PER_SUBJECT: i64 = 10_000;
/// Deliveries of a message that keeps meeting a gap before its subject is purged.
const GAP_DELIVERIES: i64 = 20;

/// Runs the head office's side of the backbone until the node shuts down.
pub(crate) async fn run(node: Arc<NodeShared>, config: HqConfig) {
    let status = Arc::clone(&node.chain);
    let name = format!("possync head office {}", node.identity.pos_id);
    let mut attempt = 0;
    let client = loop {
        match connect(&config.backbone, name.clone()).await {
            Ok(client) => break client,
            Err(err) => {
                warn!(%err, "hq: cannot set up the backbone client");
                attempt += 1;
                if !pause(&node, backoff(attempt)).await {
                    return;
                }
            }
        }
    };
    let js = jetstream::new(client.clone());
    let subjects = Subjects::new(config.backbone.chain.clone());
    // The streams first: the DOWN publisher has nothing to publish to before.
    let mut failures = 0;
    while let Err(err) = ensure_streams(&js, &subjects).await {
        warn!(%err, "hq: cannot create the streams yet");
        failures += 1;
        if !pause(&node, backoff(failures)).await {
            return;
        }
    }
    let mut tasks = JoinSet::new();
    tasks.spawn(ingest_forever(Arc::clone(&node), js.clone(), subjects.clone(), Arc::clone(&status)));
    tasks.spawn(publisher::run(Arc::clone(&node), js, subjects, Lane::Down, Arc::clone(&status)));
    info!(chain = config.backbone.chain.as_str(), "head office backbone started");
    super::uplink::watch_connection(&node, &client, &status).await;
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
}

/// The two streams, created or updated to this configuration.
pub(crate) async fn ensure_streams(js: &jetstream::Context, subjects: &Subjects) -> Result<(), ChainError> {
    let up = stream::Config {
        name: subjects.up_stream(),
        description: Some("possync: every store's changes, one subject per origin".into()),
        subjects: vec![subjects.up_wildcard()],
        retention: stream::RetentionPolicy::Limits,
        max_messages_per_subject: MAX_MESSAGES_PER_SUBJECT,
        discard: stream::DiscardPolicy::Old,
        storage: stream::StorageType::File,
        allow_direct: true,
        ..Default::default()
    };
    let down = stream::Config {
        name: subjects.down_stream(),
        description: Some("possync: the head office's changes (catalog), kept in full".into()),
        subjects: vec![subjects.down_wildcard()],
        retention: stream::RetentionPolicy::Limits,
        storage: stream::StorageType::File,
        allow_direct: true,
        ..Default::default()
    };
    for config in [up, down] {
        let name = config.name.clone();
        js.create_or_update_stream(config)
            .await
            .map_err(|err| ChainError::JetStream(format!("creating stream {name}: {err}")))?;
    }
    Ok(())
}

async fn ingest_forever(
    node: Arc<NodeShared>,
    js: jetstream::Context,
    subjects: Subjects,
    status: Arc<ChainStatus>,
) {
    let mut failures = 0;
    loop {
        match ingest(&node, &js, &subjects, &status).await {
            Ok(()) => return,
            Err(err) => {
                warn!(%err, "head office ingest interrupted; starting again");
                status.update(|status| status.last_error = Some(err.to_string()));
                failures += 1;
                if !pause(&node, backoff(failures)).await {
                    return;
                }
            }
        }
    }
}

/// Creates the streams and the durable consumer, then applies messages until shutdown.
async fn ingest(
    node: &Arc<NodeShared>,
    js: &jetstream::Context,
    subjects: &Subjects,
    status: &ChainStatus,
) -> Result<(), ChainError> {
    ensure_streams(js, subjects).await?;
    let up =
        js.get_stream(subjects.up_stream()).await.map_err(|err| ChainError::JetStream(err.to_string()))?;
    let consumer: consumer::PullConsumer = up
        .get_or_create_consumer(
            CONSUMER,
            consumer::pull::Config {
                durable_name: Some(CONSUMER.into()),
                filter_subject: subjects.up_wildcard(),
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait: Duration::from_secs(30),
                max_ack_pending: 1_000,
                ..Default::default()
            },
        )
        .await
        .map_err(|err| ChainError::JetStream(format!("consumer {CONSUMER}: {err}")))?;
    let mut messages = consumer.messages().await.map_err(|err| ChainError::JetStream(err.to_string()))?;
    let mut shutdown = node.shutdown.subscribe();
    loop {
        let next = tokio::select! {
            next = messages.next() => next,
            _ = shutdown.changed() => return Ok(()),
        };
        let message = match next {
            Some(Ok(message)) => message,
            Some(Err(err)) => return Err(ChainError::JetStream(format!("UP stream: {err}"))),
            None => return Err(ChainError::JetStream("the UP consumer ended".into())),
        };
        handle(node, &up, subjects, status, message).await?;
    }
}

/// What to do with one message of the UP stream.
async fn handle(
    node: &Arc<NodeShared>,
    up: &stream::Stream,
    subjects: &Subjects,
    status: &ChainStatus,
    message: jetstream::Message,
) -> Result<(), ChainError> {
    let ack_failed = |err: async_nats::Error| ChainError::JetStream(format!("ack: {err}"));
    let delivered = message.info().map(|info| info.delivered).unwrap_or(1);
    let subject = message.subject.to_string();
    let parsed = match subjects.parse(&subject) {
        Ok(parsed) => parsed,
        Err(err) => return reject(node, status, message, "backbone", &err.to_string()).await,
    };
    let Direction::Up { store } = parsed.direction.clone() else {
        return reject(node, status, message, "backbone", &format!("{subject} is not an UP subject")).await;
    };
    let peer = format!("store:{store}");
    if parsed.origin == node.identity.pos_id {
        let reason = format!("store {store} uploaded the head office's own origin");
        return reject(node, status, message, &peer, &reason).await;
    }
    let header =
        message.headers.as_ref().and_then(|headers| headers.get(HEADER_LAST_SEQ)).map(|value| value.as_str());
    let batch = match Batch::decode(&parsed, header, &message.payload) {
        Ok(batch) => batch,
        Err(err) => return reject(node, status, message, &peer, &format!("{subject}: {err}")).await,
    };
    let origin = batch.origin().clone();
    let owner_origin = origin.clone();
    let owner = node.readers.with(move |reader| reader.chain_origin_store(&owner_origin)).await?;
    if let Some(owner) = owner
        && owner != store.as_str()
    {
        let reason = format!("origin {origin} belongs to store {owner}, not {store}");
        return reject(node, status, message, &peer, &reason).await;
    }
    let store_id = store.to_string();
    let applying = origin.clone();
    let report = node
        .writer
        .call(Priority::Sync, move |db| db.apply_chain_batch(&store_id, &applying, batch.into_changes()))
        .await;
    match report {
        Ok(Ok(report)) if report.gap => {
            if delivered >= GAP_DELIVERIES {
                warn!(%subject, "a gap persists: the stream lost messages; purging the subject so the store sends it again");
                up.purge()
                    .filter(subject.clone())
                    .await
                    .map_err(|err| ChainError::JetStream(format!("purging {subject}: {err}")))?;
                message.ack_with(AckKind::Term).await.map_err(ack_failed)?;
            } else {
                message.ack_with(AckKind::Nak(Some(Duration::from_millis(500)))).await.map_err(ack_failed)?;
            }
            Ok(())
        }
        Ok(Ok(report)) => {
            // Acked only now: the changes are committed.
            message.double_ack().await.map_err(ack_failed)?;
            status.update(|status| {
                status.received_messages += 1;
                status.applied_changes += u64::from(report.applied + report.conflicts);
            });
            Ok(())
        }
        Ok(Err(err)) => {
            warn!(%err, %subject, "could not apply a store's changes; redelivered later");
            message.ack_with(AckKind::Nak(Some(Duration::from_secs(1)))).await.map_err(ack_failed)?;
            Ok(())
        }
        Err(err) => Err(err.into()),
    }
}

/// Logs a refused message, terminates it (never redelivered) and counts it.
async fn reject(
    node: &Arc<NodeShared>,
    status: &ChainStatus,
    message: jetstream::Message,
    peer: &str,
    reason: &str,
) -> Result<(), ChainError> {
    warn!(%reason, subject = %message.subject, "refused a message from the backbone");
    let name = peer.replace(':', " ");
    log_rejected(node, peer, &name, reason).await;
    status.update(|status| status.rejected_messages += 1);
    message.ack_with(AckKind::Term).await.map_err(|err| ChainError::JetStream(format!("term: {err}")))
}
