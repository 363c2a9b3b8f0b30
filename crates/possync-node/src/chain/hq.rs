//! The head office on the backbone (`[hq]`): creates the streams, ingests every store's
//! changes from the UP stream, and publishes its own origin's changes (the catalog) on the
//! DOWN stream ([`super::publisher`], lane `Down`).
//!
//! Ingest is a durable pull consumer (`possync-hq`, explicit acks): each message is checked
//! ([`Batch::decode`] against its subject; its origin must not be the head office's own, nor
//! belong to another store), applied through the single writer in one durable transaction
//! together with the messages the consumer has already delivered (up to 256:
//! `apply_chain_batches`, peer `store <s>`, one fsync for the group), and acked only after
//! the commit. A message that
//! fails the checks is logged (a `p2p_sync_logs` error row), terminated, and the consumer
//! goes on. A message that meets a gap (an earlier message of its origin not applied yet,
//! e.g. one being redelivered) is negatively acked with a delay, so order is restored by the
//! redelivery. A gap that persists means the stream lost messages (a per-subject limit):
//! the subject is purged, which makes the store's tills upload the origin again from seq 1
//! (every change already held is skipped), and the message is terminated.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer, stream};
use futures_util::{FutureExt, StreamExt};
use possync_chain::{Batch, Direction, HEADER_LAST_SEQ, Subjects, UplinkReport};
use possync_store::ChainRun;
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use super::publisher::{self, Lane};
use super::{ChainError, ChainStatus, backoff, connect, log_rejected, pause, retry_until_shutdown};
use crate::clock::now_ms;
use crate::config::HqConfig;
use crate::shared::ChainHandle;
use crate::writer::Priority;

/// The head office's durable consumer on the UP stream.
pub(crate) const CONSUMER: &str = "possync-hq";
/// Messages of one subject kept by the UP stream: far more than a store sends while the
/// head office is down for a day, and what bounds the stream's size.
const MAX_MESSAGES_PER_SUBJECT: i64 = 10_000;
/// The longest wait before a message held back for its clock stamp is delivered again.
const HELD_BACK_RETRY: Duration = Duration::from_secs(60);

/// Deliveries of a message that keeps meeting a gap before its subject is purged.
/// (120 deliveries 500 ms apart: about a minute, longer than any redelivery reordering.)
const GAP_DELIVERIES: i64 = 120;

/// Runs the head office's side of the backbone until the node shuts down.
pub(crate) async fn run(node: ChainHandle, config: HqConfig) {
    let status = Arc::clone(&node.status);
    let name = format!("possync head office {}", node.pos_id);
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
    tasks.spawn(ingest_forever(node.clone(), js.clone(), subjects.clone(), Arc::clone(&status)));
    tasks.spawn(listen_to_reports(node.clone(), client.clone(), subjects.clone()));
    tasks.spawn(publisher::run(node.clone(), js, subjects, Lane::Down, Arc::clone(&status)));
    info!(chain = config.backbone.chain.as_str(), "head office backbone started");
    super::uplink::watch_connection(&node, &client, &status).await;
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
}

/// Takes the stores' uplink reports (docs/CHAIN.md, "Which stores are online") for ever.
async fn listen_to_reports(node: ChainHandle, client: async_nats::Client, subjects: Subjects) {
    let status = Arc::clone(&node.status);
    retry_until_shutdown(&node, &status, "listening to the stores' reports", || async {
        let mut reports = client
            .subscribe(subjects.status_wildcard())
            .await
            .map_err(|err| ChainError::JetStream(format!("subscribing to the stores' reports: {err}")))?;
        let mut shutdown = node.shutdown.subscribe();
        loop {
            let message = tokio::select! {
                message = reports.next() => message,
                _ = shutdown.changed() => return Ok(()),
            };
            let Some(message) = message else {
                return Err(ChainError::JetStream("the stores' reports subscription ended".into()));
            };
            // Bad reports are only dropped: a report names nothing that is applied, and a
            // store that sends none is shown offline, which is what it looks like.
            match (subjects.parse_status(&message.subject), UplinkReport::decode(&message.payload)) {
                (Ok((store, till)), Ok(report)) => {
                    if !node.status.store_reported(&store, &till, report, now_ms()) {
                        debug!(%store, %till, "too many tills report: this one is not tracked");
                    }
                }
                (Err(err), _) => debug!(%err, "a report on a subject that names no store and till"),
                (_, Err(err)) => debug!(%err, subject = %message.subject, "an unreadable report"),
            }
        }
    })
    .await;
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
    node: ChainHandle,
    js: jetstream::Context,
    subjects: Subjects,
    status: Arc<ChainStatus>,
) {
    retry_until_shutdown(&node, &status, "head office ingest", || ingest(&node, &js, &subjects, &status))
        .await;
}

/// Creates the streams and the durable consumer, then applies messages until shutdown.
async fn ingest(
    node: &ChainHandle,
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
        // The messages the consumer has already delivered join this one: they are applied in
        // one durable transaction (one fsync), each acked after it.
        let mut group = vec![delivered(next)?];
        while group.len() < GROUP_MAX {
            match messages.next().now_or_never() {
                Some(next) => group.push(delivered(next)?),
                None => break,
            }
        }
        handle_group(node, &up, subjects, status, group).await?;
    }
}

/// Most messages applied in one transaction.
const GROUP_MAX: usize = 256;

fn delivered(
    next: Option<Result<jetstream::Message, impl std::fmt::Display>>,
) -> Result<jetstream::Message, ChainError> {
    match next {
        Some(Ok(message)) => Ok(message),
        Some(Err(err)) => Err(ChainError::JetStream(format!("UP stream: {err}"))),
        None => Err(ChainError::JetStream("the UP consumer ended".into())),
    }
}

/// A message that passed the checks, with its run.
struct Checked {
    message: jetstream::Message,
    subject: String,
    store: String,
    batch: Batch,
}

/// Checks each message (refusing the bad ones), applies the good ones together, and acks
/// each after the commit (or asks for it again when it met a gap).
async fn handle_group(
    node: &ChainHandle,
    up: &stream::Stream,
    subjects: &Subjects,
    status: &ChainStatus,
    group: Vec<jetstream::Message>,
) -> Result<(), ChainError> {
    let ack_failed = |err: async_nats::Error| ChainError::JetStream(format!("ack: {err}"));
    let mut checked = Vec::with_capacity(group.len());
    // Origins first seen in this group, with their store (not in the database yet).
    let mut new_owners: std::collections::HashMap<possync_core::PosId, String> =
        std::collections::HashMap::new();
    for message in group {
        match check(node, subjects, &message, &mut new_owners).await? {
            Ok(good) => checked.push(good),
            Err((peer, reason)) => reject(node, status, message, &peer, &reason).await?,
        }
    }
    if checked.is_empty() {
        return Ok(());
    }
    // Signatures are checked here, off the single writer, as on the LAN.
    let runs: Vec<ChainRun> = checked
        .iter()
        .map(|good| {
            let changes = good.batch.changes().to_vec();
            let verified = Some(node.keys.verify(&changes));
            ChainRun { store: good.store.clone(), origin: good.batch.origin().clone(), changes, verified }
        })
        .collect();
    let reports = node.writer.call(Priority::Sync, move |db| db.apply_chain_batches(runs)).await?;
    let reports = match reports {
        Ok(reports) => reports,
        Err(err) => {
            warn!(%err, messages = checked.len(), "could not apply stores' changes; redelivered later");
            for good in checked {
                good.message
                    .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                    .await
                    .map_err(ack_failed)?;
            }
            return Ok(());
        }
    };
    for (good, report) in checked.into_iter().zip(reports) {
        if report.must_retry() {
            // Stamped further ahead of head office's clock than it accepts: delivered again
            // later (not a lost message, so never purged).
            let wait = report
                .retry_at_ms
                .map_or(HELD_BACK_RETRY, |at| {
                    Duration::from_millis(at.saturating_sub(crate::clock::now_ms()))
                })
                .clamp(Duration::from_secs(1), HELD_BACK_RETRY);
            good.message.ack_with(AckKind::Nak(Some(wait))).await.map_err(ack_failed)?;
            continue;
        }
        if report.gap {
            let delivered = good.message.info().map(|info| info.delivered).unwrap_or(1);
            if delivered >= GAP_DELIVERIES {
                let subject = good.subject;
                warn!(%subject, "a gap persists: the stream lost messages; purging the subject so the store sends it again");
                up.purge()
                    .filter(subject.clone())
                    .await
                    .map_err(|err| ChainError::JetStream(format!("purging {subject}: {err}")))?;
                good.message.ack_with(AckKind::Term).await.map_err(ack_failed)?;
            } else {
                good.message
                    .ack_with(AckKind::Nak(Some(Duration::from_millis(500))))
                    .await
                    .map_err(ack_failed)?;
            }
            continue;
        }
        // Acked only now: the changes are committed.
        good.message.ack().await.map_err(ack_failed)?;
        status.update(|status| {
            status.received_messages += 1;
            status.applied_changes += u64::from(report.applied + report.conflicts);
        });
    }
    Ok(())
}

/// The checks of one message: `Ok(Err((peer, reason)))` refuses it.
async fn check(
    node: &ChainHandle,
    subjects: &Subjects,
    message: &jetstream::Message,
    new_owners: &mut std::collections::HashMap<possync_core::PosId, String>,
) -> Result<Result<Checked, (String, String)>, ChainError> {
    let subject = message.subject.to_string();
    let parsed = match subjects.parse(&subject) {
        Ok(parsed) => parsed,
        Err(err) => return Ok(Err(("backbone".into(), err.to_string()))),
    };
    let Direction::Up { store } = parsed.direction.clone() else {
        return Ok(Err(("backbone".into(), format!("{subject} is not an UP subject"))));
    };
    let peer = format!("store:{store}");
    let origin = parsed.origin.clone();
    // One read for both checks: every origin the head office has written as (its posId, a
    // recovered `<posId>-r<k>`), and the store this origin belongs to when it is not one
    // this round has just met. A failed read ends the round with the message unacked (it
    // comes again), never checks it against less than the truth.
    let known_owner = new_owners.get(&origin).cloned();
    let lookup = known_owner.is_none().then(|| origin.clone());
    let (own, found_owner) = node
        .readers
        .with(move |reader| {
            let (_, own) = reader.own_origins()?;
            let owner = match lookup {
                Some(origin) => reader.chain_origin_store(&origin)?,
                None => None,
            };
            Ok((own, owner))
        })
        .await?;
    if own.contains(&origin) {
        return Ok(Err((peer, format!("store {store} uploaded the head office's own origin"))));
    }
    let header =
        message.headers.as_ref().and_then(|headers| headers.get(HEADER_LAST_SEQ)).map(|value| value.as_str());
    let batch = match Batch::decode(&parsed, header, &message.payload) {
        Ok(batch) => batch,
        Err(err) => return Ok(Err((peer, format!("{subject}: {err}")))),
    };
    let owner = known_owner.or(found_owner);
    match owner {
        Some(owner) if owner != store.as_str() => {
            return Ok(Err((peer, format!("origin {origin} belongs to store {owner}, not {store}"))));
        }
        Some(_) => {}
        None => {
            new_owners.insert(origin, store.to_string());
        }
    }
    Ok(Ok(Checked { message: message.clone(), subject, store: store.to_string(), batch }))
}

/// Logs a refused message, terminates it (never redelivered) and counts it.
async fn reject(
    node: &ChainHandle,
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
