//! A store's till on the backbone (`[uplink]`): uploads its store's origins on the UP
//! stream ([`super::publisher`], lane `Up`), and applies the head office's changes from the
//! DOWN stream from a cursor kept in its database ([`downlink`]).
//!
//! Every till of a store runs both. Uploads race safely (expected last subject sequence);
//! the DOWN stream is read by every till from its own cursor, and a change the LAN brought
//! first is skipped as a duplicate. A till whose WAN is down keeps selling: its change log is
//! the buffer, read again from what the backbone holds once the link is back.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::DeliverPolicy, consumer::pull::OrderedConfig};
use futures_util::StreamExt;
use possync_chain::{Batch, Direction, HEADER_LAST_SEQ, Subjects};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use super::publisher::{self, Lane};
use super::{ChainError, ChainStatus, backoff, connect, log_rejected, pause, retry_until_shutdown};
use crate::config::UplinkConfig;
use crate::shared::ChainHandle;
use crate::writer::Priority;

/// Runs the till's uplink until the node shuts down.
pub(crate) async fn run(node: ChainHandle, config: UplinkConfig) {
    let status = Arc::clone(&node.status);
    let name = format!("possync till {} of store {}", node.pos_id, config.store);
    let mut attempt = 0;
    let client = loop {
        match connect(&config.backbone, name.clone()).await {
            Ok(client) => break client,
            Err(err) => {
                warn!(%err, "uplink: cannot set up the backbone client");
                status.update(|status| status.last_error = Some(err.to_string()));
                attempt += 1;
                if !pause(&node, backoff(attempt)).await {
                    return;
                }
            }
        }
    };
    info!(store = %config.store, chain = config.backbone.chain.as_str(), "uplink started");
    let js = jetstream::new(client.clone());
    let subjects = Subjects::new(config.backbone.chain.clone());
    let mut tasks = JoinSet::new();
    tasks.spawn(publisher::run(
        node.clone(),
        js.clone(),
        subjects.clone(),
        Lane::Up { store: config.store.clone() },
        Arc::clone(&status),
    ));
    match subjects.status(&config.store, &node.pos_id) {
        Ok(subject) => {
            let every = Duration::from_secs(config.report_every_secs.max(1));
            tasks.spawn(report(node.clone(), client.clone(), subject, every));
        }
        Err(err) => {
            warn!(%err, "uplink: this till's posId cannot name a status subject; it sends no reports")
        }
    }
    tasks.spawn(downlink(node.clone(), js, subjects, Arc::clone(&status)));
    watch_connection(&node, &client, &status).await;
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
}

/// Reports the till's uplink to the head office every `every` (docs/CHAIN.md, "Which stores
/// are online"): plain NATS, nothing kept; a report lost while the WAN is down is what tells
/// the head office that the store is offline.
async fn report(node: ChainHandle, client: async_nats::Client, subject: String, every: Duration) {
    loop {
        let mut report = node.status.uplink_report();
        // The store's conflicts summary: two counts over the audit trail.
        report.conflicts = node
            .readers
            .with(|reader| reader.conflict_summary())
            .await
            .ok()
            .map(|(open, last_day)| possync_chain::ConflictSummary { open, last_day });
        if let Err(err) = client.publish(subject.clone(), report.encode().into()).await {
            debug!(%err, "could not send the uplink report");
        }
        if !pause(&node, every).await {
            return;
        }
    }
}

/// Mirrors the client's connection state into the status until shutdown.
pub(super) async fn watch_connection(node: &ChainHandle, client: &async_nats::Client, status: &ChainStatus) {
    loop {
        let connected = client.connection_state() == async_nats::connection::State::Connected;
        status.update(|status| status.connected = connected);
        if !pause(node, Duration::from_millis(250)).await {
            return;
        }
    }
}

/// Applies the DOWN stream from the till's cursor, for ever.
async fn downlink(node: ChainHandle, js: jetstream::Context, subjects: Subjects, status: Arc<ChainStatus>) {
    retry_until_shutdown(&node, &status, "downlink (reading again from the cursor)", || {
        consume(&node, &js, &subjects, &status)
    })
    .await;
}

/// Reads the DOWN stream from the cursor with an ordered consumer (the server delivers in
/// stream order, and the client recreates the consumer after a gap or a reconnect); returns
/// `Ok` on shutdown.
async fn consume(
    node: &ChainHandle,
    js: &jetstream::Context,
    subjects: &Subjects,
    status: &ChainStatus,
) -> Result<(), ChainError> {
    let stream_name = subjects.down_stream();
    let cursor_stream = stream_name.clone();
    let cursor = node.readers.with(move |reader| reader.chain_cursor(&cursor_stream)).await?;
    let stream =
        js.get_stream_no_info(&stream_name).await.map_err(|err| ChainError::JetStream(err.to_string()))?;
    let deliver_policy = if cursor == 0 {
        DeliverPolicy::All
    } else {
        DeliverPolicy::ByStartSequence { start_sequence: cursor + 1 }
    };
    let consumer = stream
        .create_consumer(OrderedConfig {
            filter_subject: subjects.down_wildcard(),
            deliver_policy,
            ..Default::default()
        })
        .await
        .map_err(|err| ChainError::JetStream(format!("DOWN consumer: {err}")))?;
    let mut messages = consumer.messages().await.map_err(|err| ChainError::JetStream(err.to_string()))?;
    let mut shutdown = node.shutdown.subscribe();
    loop {
        let next = tokio::select! {
            next = messages.next() => next,
            _ = shutdown.changed() => return Ok(()),
        };
        let message = match next {
            Some(Ok(message)) => message,
            Some(Err(err)) => return Err(ChainError::JetStream(format!("DOWN stream: {err}"))),
            None => return Err(ChainError::JetStream("the DOWN stream ended".into())),
        };
        let stream_seq =
            message.info().map_err(|err| ChainError::JetStream(err.to_string()))?.stream_sequence;
        let header = message
            .headers
            .as_ref()
            .and_then(|headers| headers.get(HEADER_LAST_SEQ))
            .map(|value| value.as_str());
        let checked =
            subjects.parse(message.subject.as_str()).map_err(|err| err.to_string()).and_then(|parsed| {
                if parsed.direction != Direction::Down {
                    return Err(format!("{} is not a DOWN subject", message.subject));
                }
                Batch::decode(&parsed, header, &message.payload).map_err(|err| err.to_string())
            });
        let batch = match checked {
            Ok(batch) => batch,
            Err(reason) => {
                warn!(%reason, stream_seq, "refused a message from the head office");
                log_rejected(node, "hq", "head office", &reason).await;
                status.update(|status| status.rejected_messages += 1);
                let name = stream_name.clone();
                node.writer
                    .call(Priority::Sync, move |store| store.set_chain_cursor(&name, stream_seq))
                    .await??;
                continue;
            }
        };
        let name = stream_name.clone();
        let origin = batch.origin().clone();
        let report = node
            .writer
            .call(Priority::Sync, move |store| {
                store.apply_chain_down(&name, stream_seq, &origin, batch.into_changes())
            })
            .await??;
        status.update(|status| {
            status.received_messages += 1;
            status.applied_changes += u64::from(report.applied + report.conflicts);
        });
        if report.must_retry() {
            // Stamped further ahead of this till's clock than it accepts: the cursor stays,
            // and the stream is read again from it after the usual back-off.
            return Err(ChainError::JetStream(format!(
                "a head office change at stream seq {stream_seq} is stamped ahead of this till's clock: held back"
            )));
        }
        if report.gap {
            // This till misses earlier changes of the head office that the stream should
            // have delivered first: read the whole stream again (the catalog is small).
            let name = stream_name.clone();
            node.writer.call(Priority::Sync, move |store| store.set_chain_cursor(&name, 0)).await??;
            return Err(ChainError::JetStream(format!(
                "gap in the head office's changes at stream seq {stream_seq}"
            )));
        }
    }
}
