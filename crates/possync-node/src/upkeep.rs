//! The node's background upkeep, off the sync path: the connection-event logger (rows
//! queued by the connections, written in small transactions at housekeeping priority), WAL
//! checkpoints from a connection of their own, and the periodic metrics and log retention.
//! Each task gets a clone of the node's [`UpkeepHandle`].

use std::sync::{Arc, Mutex};
use std::time::Duration;

use possync_store::ConnectionEvent;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::clock::now_ms;
use crate::metrics::Queue;
use crate::shared::UpkeepHandle;
use crate::writer::Priority;

/// Writes queued connection events in small transactions, off the sync path.
pub async fn log_events(
    node: UpkeepHandle,
    mut events: mpsc::Receiver<ConnectionEvent>,
    _permit: Option<tokio::sync::OwnedSemaphorePermit>,
) {
    let mut shutdown = node.shutdown.subscribe();
    let mut batch = Vec::new();
    loop {
        let stopping = tokio::select! {
            received = events.recv_many(&mut batch, 256) => received == 0,
            _ = shutdown.changed() => true,
        };
        if stopping {
            // Give connections a moment to queue their `disconnected` rows, then drain.
            tokio::time::sleep(Duration::from_millis(200)).await;
            while let Ok(event) = events.try_recv() {
                batch.push(event);
            }
        }
        node.metrics
            .queue_depth
            .get_or_create(&Queue { queue: "connection_events" })
            .set(events.len() as i64);
        if !batch.is_empty() {
            let rows = std::mem::take(&mut batch);
            let written = node
                .writer
                .call(Priority::Housekeeping, move |store| store.log_connection_events(&rows))
                .await;
            if let Ok(Err(err)) = written {
                warn!(%err, "could not write connection events");
            }
        }
        if stopping && node.shutdown.is_set() {
            return;
        }
    }
}

/// Checkpoints the WAL every second from a connection of its own (see
/// [`possync_store::Checkpointer`]), so that the writer's commits never pay for them.
pub async fn checkpoints(node: UpkeepHandle) {
    let path = node.db_path.clone();
    let checkpointer =
        match tokio::task::spawn_blocking(move || possync_store::Checkpointer::open(&path)).await {
            Ok(Ok(checkpointer)) => Arc::new(Mutex::new(checkpointer)),
            Ok(Err(err)) => {
                warn!(%err, "no checkpoint connection; the writer checkpoints by itself");
                return;
            }
            Err(_) => return,
        };
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut shutdown = node.shutdown.subscribe();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        let checkpointer = Arc::clone(&checkpointer);
        let done = tokio::task::spawn_blocking(move || {
            checkpointer.lock().unwrap_or_else(std::sync::PoisonError::into_inner).run()
        })
        .await;
        if let Ok(Err(err)) = done {
            tracing::debug!(%err, "checkpoint failed; trying again in a second");
        }
    }
}

/// Periodic work: queue depths and database size for the metrics, log retention.
pub async fn housekeeping(node: UpkeepHandle) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    let mut last_cleanup = 0u64;
    loop {
        tick.tick().await;
        let depths = node.writer.depths();
        for (queue, depth) in
            [("local", depths.local), ("sync", depths.sync), ("housekeeping", depths.housekeeping)]
        {
            node.metrics.queue_depth.get_or_create(&Queue { queue }).set(depth as i64);
        }
        let db = &node.db_path;
        let size = |suffix: &str| {
            std::fs::metadata(format!("{}{suffix}", db.display())).map_or(0, |meta| meta.len())
        };
        node.metrics.database_bytes.set((size("") + size("-wal")) as i64);
        if now_ms().saturating_sub(last_cleanup) > 3_600_000 {
            last_cleanup = now_ms();
            let days = node.settings.current().log_retention_days;
            let removed =
                node.writer.call(Priority::Housekeeping, move |store| store.cleanup_logs(days)).await;
            if let Ok(Ok(removed)) = removed
                && removed > 0
            {
                info!(removed, days, "old log rows deleted");
            }
        }
    }
}
