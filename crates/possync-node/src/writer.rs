//! The single writer: one thread owns the [`Store`] and runs every write, in priority order.
//!
//! SQLite allows one writer at a time; rather than have tasks contend for a lock, every write
//! is a job sent to this thread. Three bounded queues, drained in priority order (STYLE 9):
//! the till's own writes first (a sale must never wait behind a catch-up), then changes
//! from peers, then housekeeping (connection events, retention). After each job the changes
//! it produced are published to the peer connections (broadcast and relay).

use std::sync::Arc;

use possync_store::{Outgoing, Store};
use tokio::sync::{broadcast, mpsc, oneshot};

/// Which queue a job goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Priority {
    /// Writes from the till (API, library calls).
    Local,
    /// Changes from peers.
    Sync,
    /// Connection events, retention, settings.
    Housekeeping,
}

type Job = Box<dyn FnOnce(&mut Store) + Send>;

/// The writer thread is gone (the node is shutting down).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the database writer has stopped")]
pub struct WriterStopped;

/// Queue lengths, for the metrics.
#[derive(Debug, Clone, Copy, Default)]
pub struct QueueDepths {
    /// Jobs waiting in the local queue.
    pub local: usize,
    /// Jobs waiting in the sync queue.
    pub sync: usize,
    /// Jobs waiting in the housekeeping queue.
    pub housekeeping: usize,
}

/// A cheap, cloneable handle to the writer thread.
#[derive(Clone)]
pub struct WriterHandle {
    /// The till's writes.
    local: mpsc::Sender<Job>,
    /// Changes from peers.
    sync: mpsc::Sender<Job>,
    /// Background work.
    housekeeping: mpsc::Sender<Job>,
    /// Where changes written by any job are published.
    changes: broadcast::Sender<Arc<Outgoing>>,
}

/// Capacity of each job queue.
const QUEUE_CAPACITY: usize = 1024;
/// Changes buffered per subscriber before a slow connection lags (and catches up instead).
const CHANGE_FANOUT_CAPACITY: usize = 16_384;

impl WriterHandle {
    /// Starts the writer thread, which owns `store` until every handle is dropped.
    pub fn start(store: Store) -> WriterHandle {
        let (local, local_rx) = mpsc::channel(QUEUE_CAPACITY);
        let (sync, sync_rx) = mpsc::channel(QUEUE_CAPACITY);
        let (housekeeping, housekeeping_rx) = mpsc::channel(QUEUE_CAPACITY);
        let (changes, _) = broadcast::channel(CHANGE_FANOUT_CAPACITY);
        let publish = changes.clone();
        let spawned = std::thread::Builder::new()
            .name("possync-writer".into())
            .spawn(move || run(store, local_rx, sync_rx, housekeeping_rx, publish));
        if let Err(err) = spawned {
            // Without a writer thread every call fails with WriterStopped.
            tracing::error!(%err, "could not start the database writer thread");
        }
        WriterHandle { local, sync, housekeeping, changes }
    }

    /// Runs `job` on the writer thread and returns its result.
    pub async fn call<T, F>(&self, priority: Priority, job: F) -> Result<T, WriterStopped>
    where
        T: Send + 'static,
        F: FnOnce(&mut Store) -> T + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let job: Job = Box::new(move |store| {
            let _ = reply.send(job(store));
        });
        self.queue(priority).send(job).await.map_err(|_| WriterStopped)?;
        answer.await.map_err(|_| WriterStopped)
    }

    /// Subscribes to the changes written from now on (local writes and applied remote ones).
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Outgoing>> {
        self.changes.subscribe()
    }

    /// How many jobs wait in each queue.
    pub fn depths(&self) -> QueueDepths {
        let waiting = |sender: &mpsc::Sender<Job>| sender.max_capacity() - sender.capacity();
        QueueDepths {
            local: waiting(&self.local),
            sync: waiting(&self.sync),
            housekeeping: waiting(&self.housekeeping),
        }
    }

    fn queue(&self, priority: Priority) -> &mpsc::Sender<Job> {
        match priority {
            Priority::Local => &self.local,
            Priority::Sync => &self.sync,
            Priority::Housekeeping => &self.housekeeping,
        }
    }
}

fn run(
    mut store: Store,
    mut local: mpsc::Receiver<Job>,
    mut sync: mpsc::Receiver<Job>,
    mut housekeeping: mpsc::Receiver<Job>,
    publish: broadcast::Sender<Arc<Outgoing>>,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            tracing::error!(%err, "could not start the database writer's event loop");
            return;
        }
    };
    runtime.block_on(async move {
        loop {
            // `biased`: strict priority, the most urgent non-empty queue first.
            let job = tokio::select! {
                biased;
                Some(job) = local.recv() => job,
                Some(job) = sync.recv() => job,
                Some(job) = housekeeping.recv() => job,
                else => return,
            };
            // Jobs block this thread on SQLite, which is what the thread is for. A job that
            // panics (a bug) must not take every later write down with it: its caller sees
            // its reply channel closed, and the store goes back to its last commit.
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(&mut store)));
            if outcome.is_err() {
                tracing::error!("a database job panicked; rolling back and carrying on");
                if let Err(err) = store.recover() {
                    tracing::error!(%err, "could not recover the database after a panic; stopping the writer");
                    return;
                }
                continue;
            }
            for change in store.drain_outbox() {
                // No subscriber is fine: nobody is connected.
                let _ = publish.send(Arc::new(change));
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use possync_core::EntityKind;
    use possync_store::SystemEnvironment;
    use serde_json::json;

    use super::*;

    #[tokio::test]
    async fn a_panicking_job_does_not_stop_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        let store =
            Store::init(&dir.path().join("t.db"), None, "t", Box::new(SystemEnvironment::default())).unwrap();
        let writer = WriterHandle::start(store);
        let failed = writer.call(Priority::Local, |_store| -> u32 { panic!("a bug in a job") }).await;
        assert_eq!(failed, Err(WriterStopped));
        let created = writer
            .call(Priority::Local, |store| {
                store.create_record(EntityKind::Category, &json!({"id": "c1", "name": "After the panic"}))
            })
            .await
            .unwrap();
        assert_eq!(created.unwrap()["name"], "After the panic");
    }
}
