//! The single writer: one thread owns the [`Store`] and runs every write, in priority order.
//!
//! SQLite allows one writer at a time; rather than have tasks contend for a lock, every write
//! is a job sent to this thread. Three bounded queues, drained in priority order (STYLE 9):
//! the till's own writes first (a sale must never wait behind a catch-up), then changes
//! from peers, then housekeeping (connection events, retention). After each job the changes
//! it produced are published to the peer connections (broadcast and relay).
//!
//! The till's writes are durable. When several are waiting at once (an API with concurrent
//! clients), they run together in one transaction, each in its own savepoint (group commit,
//! [`Store::group_commit`]); one write alone is committed on its own: grouping never makes a
//! write wait for another that has not arrived yet.
//!
//! The fsync that makes them durable is pipelined: the writer commits to the WAL and moves
//! on to the next jobs, and a second thread, the syncer, fsyncs the WAL for every commit
//! that arrived since its last fsync, then tells: it answers the callers and publishes the
//! changes, in commit order. Nothing is told before it is on disk, so an acknowledged sale
//! survives a power cut exactly as with `synchronous = FULL`, and no peer receives a change
//! its origin could lose (catch-ups read the log only up to [`WriterHandle::durable_position`]).
//! Without the pipeline, the writer sat idle for every fsync (about 0.25 ms here) and the
//! till's writes were bound to one group per fsync (docs/BENCHMARKS.md, "Durable till writes").
//!
//! The changes of a group are signed on a third thread ([`Store::sign_in_background`]) while
//! the writer runs the group's next writes: the signature was half of the writer's work per
//! write.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

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

/// A job runs on the store and returns how to answer its caller, called once the job's
/// group is committed (or not).
type Job = Box<dyn FnOnce(&mut Store) -> Answer + Send>;

/// Sends a job's result to its caller; `Err` when the group it ran in failed to commit.
type Answer = Box<dyn FnOnce(Result<(), WriterError>) + Send>;

/// Most of the till's waiting writes committed together.
const GROUP_MAX: usize = 64;

/// From this many writes, a group's changes are signed on the signing thread while the
/// writer runs the next ones; a smaller group signs in place (the hand-over's thread
/// wake-ups cost more than they save: docs/BENCHMARKS.md, "Durable till writes").
const SIGN_ASIDE_FROM: usize = 8;

/// Why a writer call has no result.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WriterError {
    /// The writer thread is gone (the node is shutting down), or the job panicked.
    #[error("the database writer has stopped")]
    Stopped,
    /// The job ran, but the transaction it was grouped in failed to commit: nothing it
    /// wrote was kept.
    #[error("the write could not be committed: {0}")]
    CommitFailed(String),
    /// The group's commit found the disk full: nothing it wrote was kept; it can succeed
    /// once room is made.
    #[error("the write could not be committed: the disk is full")]
    StorageFull,
}

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
    /// The position in the change log up to which everything committed is on disk.
    durable: Arc<AtomicU64>,
}

/// Capacity of each job queue.
const QUEUE_CAPACITY: usize = 1024;
/// Changes buffered per subscriber before a slow connection lags (and catches up instead).
const CHANGE_FANOUT_CAPACITY: usize = 16_384;

impl WriterHandle {
    /// Starts the writer thread, which owns `store` until every handle is dropped.
    pub fn start(mut store: Store) -> WriterHandle {
        let (local, local_rx) = mpsc::channel(QUEUE_CAPACITY);
        let (sync, sync_rx) = mpsc::channel(QUEUE_CAPACITY);
        let (housekeeping, housekeeping_rx) = mpsc::channel(QUEUE_CAPACITY);
        let (changes, _) = broadcast::channel(CHANGE_FANOUT_CAPACITY);
        let durable = Arc::new(AtomicU64::new(0));
        let handle = WriterHandle {
            local,
            sync,
            housekeeping,
            changes: changes.clone(),
            durable: Arc::clone(&durable),
        };
        // What a process that stopped before its fsync left in the WAL may still be only in
        // the page cache: made durable before anything of it is served.
        let wal = store.wal_path();
        let position = match fsync_wal(&wal)
            .and_then(|()| store.log_position().map_err(std::io::Error::other))
        {
            Ok(position) => position,
            Err(err) => {
                // Without a writer thread every call fails with `WriterError::Stopped`.
                tracing::error!(%err, wal = %wal.display(), "could not make the database durable; the writer does not start");
                return handle;
            }
        };
        durable.store(position, Ordering::Release);
        store.defer_fsync();
        // With a core to spare, a group's changes are signed on a thread of their own while
        // the writer runs the group's next writes (`possync_store`'s `bulk` module).
        if std::thread::available_parallelism().is_ok_and(|cores| cores.get() > 1)
            && let Err(err) = store.sign_in_background(true)
        {
            tracing::warn!(%err, "changes are signed on the writer thread");
        }
        let (done, done_rx) = std::sync::mpsc::sync_channel(QUEUE_CAPACITY);
        let failed = Arc::new(AtomicBool::new(false));
        let syncer = Syncer { wal, publish: changes, durable, failed: Arc::clone(&failed) };
        let spawned =
            std::thread::Builder::new().name("possync-syncer".into()).spawn(move || syncer.run(done_rx));
        if let Err(err) = spawned {
            tracing::error!(%err, "could not start the database syncer thread");
            return handle;
        }
        let spawned = std::thread::Builder::new()
            .name("possync-writer".into())
            .spawn(move || run(store, local_rx, sync_rx, housekeeping_rx, done, failed));
        if let Err(err) = spawned {
            tracing::error!(%err, "could not start the database writer thread");
        }
        handle
    }

    /// The position in the change log ([`Store::log_position`]) up to which every commit is
    /// on disk: what a catch-up may serve ([`possync_store::StoreReader::select_changes_up_to`]).
    pub fn durable_position(&self) -> u64 {
        self.durable.load(Ordering::Acquire)
    }

    /// Runs `job` on the writer thread and returns its result.
    pub async fn call<T, F>(&self, priority: Priority, job: F) -> Result<T, WriterError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Store) -> T + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let job: Job = Box::new(move |store| {
            let value = job(store);
            Box::new(move |committed: Result<(), WriterError>| {
                let _ = reply.send(committed.map(|()| value));
            })
        });
        self.queue(priority).send(job).await.map_err(|_| WriterError::Stopped)?;
        answer.await.map_err(|_| WriterError::Stopped)?
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

/// Runs one job as it is, or several in one group commit; returns their answers and whether
/// the group committed.
fn run_jobs(store: &mut Store, jobs: Vec<Job>) -> (Vec<Answer>, Result<(), WriterError>) {
    if jobs.len() == 1 {
        let answers = jobs.into_iter().map(|job| job(store)).collect();
        return (answers, Ok(()));
    }
    let mut answers = Vec::with_capacity(jobs.len());
    if let Err(err) = store.set_sign_aside(jobs.len() >= SIGN_ASIDE_FROM) {
        tracing::error!(%err, "could not choose where the group's changes are signed");
    }
    let committed = store.group_commit(|store| {
        for job in jobs {
            answers.push(job(store));
        }
    });
    if let Err(err) = &committed {
        tracing::error!(%err, writes = answers.len(), "a group of local writes failed to commit");
    }
    let committed = committed.map_err(|err| {
        if err.is_storage_full() {
            WriterError::StorageFull
        } else {
            WriterError::CommitFailed(err.to_string())
        }
    });
    (answers, committed)
}

fn run(
    mut store: Store,
    mut local: mpsc::Receiver<Job>,
    mut sync: mpsc::Receiver<Job>,
    mut housekeeping: mpsc::Receiver<Job>,
    done: std::sync::mpsc::SyncSender<Done>,
    failed: Arc<AtomicBool>,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            tracing::error!(%err, "could not start the database writer's event loop");
            return;
        }
    };
    let mut log_position = store.log_position().unwrap_or(0);
    runtime.block_on(async move {
        loop {
            // `biased`: strict priority, the most urgent non-empty queue first.
            let jobs = tokio::select! {
                biased;
                Some(job) = local.recv() => {
                    // The till's writes already waiting share the first one's commit.
                    let mut jobs = vec![job];
                    while jobs.len() < GROUP_MAX {
                        match local.try_recv() {
                            Ok(job) => jobs.push(job),
                            Err(_) => break,
                        }
                    }
                    jobs
                }
                Some(job) = sync.recv() => vec![job],
                Some(job) = housekeeping.recv() => vec![job],
                else => return,
            };
            if failed.load(Ordering::Acquire) {
                // The WAL could not be made durable: stop (callers see `Stopped`); a restart
                // recovers the database to what reached the disk.
                return;
            }
            // Jobs block this thread on SQLite, which is what the thread is for. A job that
            // panics (a bug) must not take every later write down with it: the callers of
            // its group see their reply channels closed, and the store goes back to its last
            // commit.
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_jobs(&mut store, jobs)));
            let Ok((answers, committed)) = outcome else {
                tracing::error!("a database job panicked; rolling back and carrying on");
                if let Err(err) = store.recover() {
                    tracing::error!(%err, "could not recover the database after a panic; stopping the writer");
                    return;
                }
                continue;
            };
            let changes = store.drain_outbox();
            // Every job, not only those with changes to publish: a refused change enters the
            // log too, and a catch-up serves it.
            match store.log_position() {
                Ok(position) => log_position = position,
                Err(err) => tracing::error!(%err, "could not read the change log's position"),
            }
            let unsynced = store.take_unsynced();
            let finished = Done { answers, committed, changes, unsynced, log_position };
            if done.send(finished).is_err() {
                tracing::error!("the database syncer has stopped; stopping the writer");
                return;
            }
        }
    });
}

/// What one job or group left to tell, once it is durable.
struct Done {
    /// Its callers' answers.
    answers: Vec<Answer>,
    /// Whether it committed.
    committed: Result<(), WriterError>,
    /// The changes it wrote, for the peer connections.
    changes: Vec<Outgoing>,
    /// It committed a durable write whose fsync is owed.
    unsynced: bool,
    /// The change log's position after it.
    log_position: u64,
}

/// The second half of the pipelined group commit: fsyncs the WAL for what the writer
/// committed, then tells it, in commit order.
struct Syncer {
    /// The database's WAL file.
    wal: PathBuf,
    /// Where the changes are published.
    publish: broadcast::Sender<Arc<Outgoing>>,
    /// [`WriterHandle::durable_position`].
    durable: Arc<AtomicU64>,
    /// Set when an fsync failed: the writer stops.
    failed: Arc<AtomicBool>,
}

impl Syncer {
    fn run(self, done: std::sync::mpsc::Receiver<Done>) {
        while let Ok(first) = done.recv() {
            // Everything waiting was committed before this fsync starts: one fsync covers it.
            let mut ready = vec![first];
            ready.extend(done.try_iter());
            if ready.iter().any(|done| done.unsynced)
                && let Err(err) = fsync_wal(&self.wal)
            {
                // After a failed fsync the kernel may have dropped the pages it could not
                // write; a later fsync proves nothing about them. Tell nobody, stop.
                tracing::error!(%err, wal = %self.wal.display(), "could not fsync the database; stopping the writer, restart the node");
                self.failed.store(true, Ordering::Release);
                let lost = WriterError::CommitFailed(format!("the write could not be made durable: {err}"));
                for done in ready.into_iter().chain(done.try_iter()) {
                    for answer in done.answers {
                        answer(Err(lost.clone()));
                    }
                }
                return;
            }
            for done in ready {
                self.durable.fetch_max(done.log_position, Ordering::AcqRel);
                for change in done.changes {
                    // No subscriber is fine: nobody is connected.
                    let _ = self.publish.send(Arc::new(change));
                }
                for answer in done.answers {
                    answer(done.committed.clone());
                }
            }
        }
    }
}

/// Flushes the WAL file to disk (its data: `fdatasync`). A WAL that does not exist holds
/// nothing to flush (SQLite removes it only once it is checkpointed into the database file
/// and that file synced).
fn fsync_wal(wal: &Path) -> std::io::Result<()> {
    match std::fs::File::open(wal) {
        Ok(file) => file.sync_data(),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(err),
    }
}

#[cfg(test)]
mod tests {
    use possync_core::EntityKind;
    use possync_store::SystemEnvironment;
    use serde_json::json;

    use super::*;

    /// A writer on a new store in `dir`.
    fn new_writer(dir: &tempfile::TempDir) -> WriterHandle {
        let store =
            Store::init(&dir.path().join("t.db"), None, "t", Box::new(SystemEnvironment::default())).unwrap();
        WriterHandle::start(store)
    }

    #[tokio::test]
    async fn a_panicking_job_does_not_stop_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        let writer = new_writer(&dir);
        let failed = writer.call(Priority::Local, |_store| -> u32 { panic!("a bug in a job") }).await;
        assert_eq!(failed, Err(WriterError::Stopped));
        let created = writer
            .call(Priority::Local, |store| {
                store.create_record(EntityKind::Category, &json!({"id": "c1", "name": "After the panic"}))
            })
            .await
            .unwrap();
        assert_eq!(created.unwrap()["name"], "After the panic");
    }

    #[tokio::test]
    async fn a_write_is_answered_once_durable_and_catch_ups_may_then_serve_it() {
        let dir = tempfile::tempdir().unwrap();
        let writer = new_writer(&dir);
        let mut changes = writer.subscribe();
        for index in 0..20 {
            let position = writer
                .call(Priority::Local, move |store| {
                    store
                        .create_record(EntityKind::Category, &json!({"id": format!("c{index}"), "name": "C"}))
                        .unwrap();
                    store.log_position().unwrap()
                })
                .await
                .unwrap();
            assert!(
                writer.durable_position() >= position,
                "answered before its fsync: durable {} < {position}",
                writer.durable_position()
            );
            // (The first write is preceded by the till's key enrollment.)
            let published = std::iter::from_fn(|| changes.try_recv().ok())
                .find(|published| published.change.entity == "category")
                .expect("published once durable, before the answer");
            assert!(published.change.data.get().contains(&format!("\"c{index}\"")));
        }
    }

    /// A writer whose thread is held by a job until the returned sender is dropped.
    async fn held_writer(dir: &tempfile::TempDir) -> (WriterHandle, std::sync::mpsc::Sender<()>) {
        let writer = new_writer(dir);
        let (started, is_running) = oneshot::channel();
        let (release, released) = std::sync::mpsc::channel::<()>();
        let busy = writer.clone();
        tokio::spawn(async move {
            busy.call(Priority::Local, move |_store| {
                let _ = started.send(());
                let _ = released.recv();
            })
            .await
        });
        is_running.await.unwrap();
        (writer, release)
    }

    type TestJob<T> = Box<dyn FnOnce(&mut Store) -> T + Send>;

    /// Queues `jobs` behind the held job, releases it, and returns each job's result.
    async fn run_queued<T: Send + 'static>(
        writer: &WriterHandle,
        release: std::sync::mpsc::Sender<()>,
        jobs: Vec<TestJob<T>>,
    ) -> Vec<Result<T, WriterError>> {
        let count = jobs.len();
        let calls: Vec<_> = jobs
            .into_iter()
            .map(|job| {
                let writer = writer.clone();
                tokio::spawn(async move { writer.call(Priority::Local, job).await })
            })
            .collect();
        while writer.depths().local < count {
            tokio::task::yield_now().await;
        }
        drop(release);
        let mut results = Vec::new();
        for call in calls {
            results.push(call.await.unwrap());
        }
        results
    }

    fn category(id: &str, name: &str) -> serde_json::Value {
        json!({"id": id, "name": name})
    }

    #[tokio::test]
    async fn waiting_local_writes_are_committed_together_each_rolled_back_alone_on_error() {
        let dir = tempfile::tempdir().unwrap();
        let (writer, release) = held_writer(&dir).await;
        let mut published = writer.subscribe();
        // More than `SIGN_ASIDE_FROM`: the group's changes are signed on the signing thread.
        let jobs = (0..12)
            .map(|i| {
                // Number 5 is refused (a name must not be empty), number 9 too (c3 exists).
                // (A write refused after its change went to the signing thread: the store's
                // `bulk` tests.)
                let name = if i == 5 { String::new() } else { format!("Category {i}") };
                let id = if i == 9 { "c3".to_string() } else { format!("c{i}") };
                let body = category(&id, &name);
                Box::new(move |store: &mut Store| {
                    store.create_record(EntityKind::Category, &body).map(|_| ())
                }) as TestJob<_>
            })
            .collect();
        let results = run_queued(&writer, release, jobs).await;
        for (i, result) in results.iter().enumerate() {
            assert_eq!(result.as_ref().map(Result::is_ok), Ok(i != 5 && i != 9), "write {i}: {result:?}");
        }
        let (key, rows) = writer
            .call(Priority::Local, |store| {
                let rows = store
                    .reader()
                    .unwrap()
                    .query_json("SELECT seq, entity_id, payload FROM sync_changes ORDER BY seq")
                    .unwrap();
                (store.public_key(), rows)
            })
            .await
            .unwrap();
        // The till's key enrollment, then the ten writes that stand, in order, each signed.
        let seqs: Vec<u64> = rows.iter().map(|row| row["seq"].as_u64().unwrap()).collect();
        assert_eq!(seqs, (1..=11).collect::<Vec<_>>(), "ten writes, no gap where the refused ones were");
        let ids: Vec<&str> = rows.iter().skip(1).map(|row| row["entityId"].as_str().unwrap()).collect();
        assert_eq!(ids, ["c0", "c1", "c2", "c3", "c4", "c6", "c7", "c8", "c10", "c11"]);
        let key = possync_core::signature::PublicKey::parse(&key).unwrap();
        let mut logged = Vec::new();
        for row in &rows {
            let wire: possync_core::WireChange =
                serde_json::from_str(row["payload"].as_str().unwrap()).unwrap();
            assert_eq!(key.verify(&wire), Ok(()), "change {} carries the till's signature", row["seq"]);
            logged.push(serde_json::to_string(&wire).unwrap());
        }
        let sent: Vec<String> = std::iter::from_fn(|| published.try_recv().ok())
            .map(|outgoing| serde_json::to_string(&outgoing.change).unwrap())
            .collect();
        assert_eq!(sent, logged, "the peers are sent exactly the logged changes, in log order");
    }

    #[tokio::test]
    async fn a_panic_in_a_group_keeps_nothing_of_the_group_and_answers_every_caller() {
        let dir = tempfile::tempdir().unwrap();
        let (writer, release) = held_writer(&dir).await;
        // Signed aside (more than `SIGN_ASIDE_FROM`): the panic comes while earlier writes'
        // changes are still with the signing thread.
        let jobs = (0..12)
            .map(|i| {
                let body = category(&format!("c{i}"), "Grouped");
                Box::new(move |store: &mut Store| {
                    assert_ne!(i, 9, "a bug in a job");
                    store.create_record(EntityKind::Category, &body).map(|_| ())
                }) as TestJob<_>
            })
            .collect();
        let results = run_queued(&writer, release, jobs).await;
        // None of the group was acknowledged, and none of it was kept: the writes shared one
        // transaction, rolled back with the panic.
        assert!(results.iter().all(|result| matches!(result, Err(WriterError::Stopped))), "{results:?}");
        let after = writer
            .call(Priority::Local, |store| store.create_record(EntityKind::Category, &category("d", "After")))
            .await
            .unwrap();
        assert!(after.is_ok());
        let rows = writer
            .call(Priority::Local, |store| {
                store
                    .reader()
                    .unwrap()
                    .query_json("SELECT entity_type, seq FROM sync_changes ORDER BY seq")
                    .unwrap()
            })
            .await
            .unwrap();
        // The key enrollment made inside the group went with it: made again before "d".
        assert_eq!(
            rows,
            vec![json!({"entityType": "terminal", "seq": 1}), json!({"entityType": "category", "seq": 2})]
        );
    }
}
