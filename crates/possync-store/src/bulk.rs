//! Runs of local writes (an import, a group commit of the till's writes): the same
//! changes, signed on a second thread.
//!
//! Every local change is signed with the till's Ed25519 key before it is logged
//! ([`possync_core::signature`]). Signing is the single largest cost of a local write
//! (20-30 µs a change, most of it the base point multiplication that no batching can
//! share: a third of an import's CPU time, half of the writer thread's per durable write),
//! and it does not depend on anything the next write does: only the change's own bytes.
//! So, when the owner of the store asks for it ([`Store::sign_in_background`]), the writes
//! of a group ([`Store::group_commit`]) hand their changes to a signing thread and go on;
//! each change's log row (whose payload carries the signature) is inserted once its
//! signature is back, and at the latest before the group commits. What is written is
//! exactly what a write signed in place writes: the same change, the same signature
//! (Ed25519 signing is deterministic), the same per-origin log order, in the same
//! transaction.
//!
//! Where a row may be inserted is what keeps rollbacks exact:
//! - inside a batch ([`Store::begin_batch`], one savepoint for many writes), as soon as its
//!   signature is back: the batch's rows are the only ones pending (a batch starts with
//!   none), and a batch that fails drops what it had queued with the rest of it;
//! - in a group of separate writes (one savepoint each), only between two writes and at the
//!   end of the group, never inside a write's savepoint (rolling that write back would take
//!   an earlier write's rows with it); a write that fails drops only the rows it queued.
//!
//! Outside a group, or when not asked for, changes are signed in place as always.

use std::collections::VecDeque;
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::thread::JoinHandle;

use possync_core::signature::TillKey;
use possync_core::{Hlc, Seq, WireChange};

use crate::Store;
use crate::error::{Result, StoreError};

/// The signing thread and the log rows waiting for its signatures.
pub(crate) struct BackgroundSigner {
    /// Changes to sign with their ticket, in log order (closed on drop: the thread then
    /// ends).
    jobs: Option<Sender<(u64, WireChange)>>,
    /// Signed changes with their ticket, in the order they were sent.
    signed: Receiver<(u64, WireChange)>,
    /// The thread.
    thread: Option<JoinHandle<()>>,
    /// The log rows whose change is being signed, in log order, with their ticket.
    pending: VecDeque<(u64, PendingRow)>,
    /// The ticket of the next change sent. Tickets grow: a signature whose ticket is below
    /// the first pending row's belongs to a row that was dropped (its write rolled back),
    /// and is skipped.
    next_ticket: u64,
}

/// A change-log row waiting for its signed change.
pub(crate) struct PendingRow {
    /// The origin's local number.
    pub(crate) origin_idx: i64,
    /// The change's seq.
    pub(crate) seq: Seq,
    /// Its clock stamp.
    pub(crate) hlc: Option<Hlc>,
    /// `type`.
    pub(crate) entity_type: &'static str,
    /// The record's id.
    pub(crate) entity_id: String,
}

impl BackgroundSigner {
    /// Starts a signing thread with `key`.
    fn start(key: TillKey) -> Result<BackgroundSigner> {
        let (jobs, to_sign) = mpsc::channel::<(u64, WireChange)>();
        let (done, signed) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("possync-signer".into())
            .spawn(move || {
                for (ticket, mut wire) in to_sign {
                    key.sign(&mut wire);
                    if done.send((ticket, wire)).is_err() {
                        return;
                    }
                }
            })
            .map_err(|err| StoreError::InvalidState(format!("cannot start the signing thread: {err}")))?;
        Ok(BackgroundSigner {
            jobs: Some(jobs),
            signed,
            thread: Some(thread),
            pending: VecDeque::new(),
            next_ticket: 0,
        })
    }

    /// Queues `wire` (unsigned) for signing; its log row is `row`.
    pub(crate) fn submit(&mut self, wire: WireChange, row: PendingRow) -> Result<()> {
        let ticket = self.next_ticket;
        self.jobs.as_ref().and_then(|jobs| jobs.send((ticket, wire)).ok()).ok_or_else(stopped)?;
        self.next_ticket += 1;
        self.pending.push_back((ticket, row));
        Ok(())
    }

    /// How many rows wait for their signature.
    pub(crate) fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Drops the rows queued after the first `keep` (their write was rolled back); their
    /// signatures are skipped when they come back.
    pub(crate) fn truncate(&mut self, keep: usize) {
        self.pending.truncate(keep);
    }

    /// The next signed change with its row: waiting for it when `wait`, else only if it is
    /// ready. `None` when nothing is pending (or, not waiting, nothing is ready yet).
    fn next(&mut self, wait: bool) -> Result<Option<(PendingRow, WireChange)>> {
        loop {
            let Some(&(wanted, _)) = self.pending.front() else { return Ok(None) };
            let (ticket, wire) = if wait {
                self.signed.recv().map_err(|_| stopped())?
            } else {
                match self.signed.try_recv() {
                    Ok(signed) => signed,
                    Err(TryRecvError::Empty) => return Ok(None),
                    Err(TryRecvError::Disconnected) => return Err(stopped()),
                }
            };
            if ticket < wanted {
                // The signature of a dropped row.
                continue;
            }
            if ticket > wanted {
                // Signatures come back in the order they were asked for: a pending row's
                // can never be skipped over.
                return Err(StoreError::InvalidState("the signing thread lost a change".into()));
            }
            let (_, row) = self.pending.pop_front().ok_or_else(stopped)?;
            return Ok(Some((row, wire)));
        }
    }

    /// Drops every pending row; the signatures still to come for them are skipped.
    fn discard(&mut self) {
        self.pending.clear();
    }
}

impl Drop for BackgroundSigner {
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn stopped() -> StoreError {
    StoreError::InvalidState("the signing thread stopped".into())
}

impl Store {
    /// Signs the changes of groups of writes ([`Store::group_commit`], batches included) on
    /// a second thread (see the module doc); `false` goes back to signing each change in
    /// place. For runs of writes (an import, the node's writer thread) on a machine with a
    /// core to spare.
    pub fn sign_in_background(&mut self, on: bool) -> Result<()> {
        if on == self.signer.is_some() {
            return Ok(());
        }
        if self.batch.is_some() {
            return Err(StoreError::InvalidState(
                "cannot change how changes are signed inside a batch".into(),
            ));
        }
        self.signer = if on { Some(BackgroundSigner::start(self.till_key.clone())?) } else { None };
        Ok(())
    }

    /// Whether the next groups hand their changes to the signing thread, when one runs
    /// ([`Store::sign_in_background`]); on by default. The hand-over costs two thread
    /// wake-ups per group (about 70 µs on the benchmark machine), more than signing aside
    /// saves in a group of a few writes: the node's writer turns it off for small groups.
    /// Not inside a group.
    pub fn set_sign_aside(&mut self, on: bool) -> Result<()> {
        if self.in_group {
            return Err(StoreError::InvalidState(
                "cannot change how changes are signed inside a group".into(),
            ));
        }
        self.sign_aside = on;
        Ok(())
    }

    /// Whether ticket `id` exists (an importer's check for a ticket it may have written
    /// under another id scheme).
    pub fn has_ticket(&self, id: &possync_core::EntityId) -> Result<bool> {
        self.ticket_exists(id)
    }

    /// True when the change being written goes to the signing thread.
    pub(crate) fn signs_in_background(&self) -> bool {
        self.signer.is_some() && self.sign_aside && self.in_group
    }

    /// How many log rows wait for their signature.
    pub(crate) fn signing_pending(&self) -> usize {
        self.signer.as_ref().map_or(0, BackgroundSigner::pending)
    }

    /// Drops the log rows queued after the first `keep` (the write that queued them was
    /// rolled back).
    pub(crate) fn drop_signing_after(&mut self, keep: usize) {
        if let Some(signer) = &mut self.signer {
            signer.truncate(keep);
        }
    }

    /// Logs the changes whose signature is back (all of them, waiting, when `wait`): their
    /// `sync_changes` rows, in log order, and the outbox.
    pub(crate) fn log_signed(&mut self, wait: bool) -> Result<()> {
        loop {
            let Some((row, wire)) = (match &mut self.signer {
                Some(signer) => signer.next(wait)?,
                None => None,
            }) else {
                return Ok(());
            };
            self.insert_change_row(
                row.origin_idx,
                row.seq,
                row.hlc,
                row.entity_type,
                &row.entity_id,
                &wire,
                false,
            )?;
            self.outbox.push(crate::Outgoing { change: wire });
        }
    }

    /// Hands `wire` (unsigned) to the signing thread; its log row is `row`.
    pub(crate) fn submit_for_signing(&mut self, wire: WireChange, row: PendingRow) -> Result<()> {
        self.signer.as_mut().ok_or_else(stopped)?.submit(wire, row)
    }

    /// Forgets the changes still being signed (their batch is rolled back).
    pub(crate) fn discard_signing(&mut self) {
        if let Some(signer) = &mut self.signer {
            signer.discard();
        }
    }
}

#[cfg(test)]
mod tests {
    use possync_core::signature::PublicKey;
    use possync_core::{EntityKind, PosId, Seq};
    use serde_json::json;

    use crate::{Store, SystemEnvironment};

    fn store(dir: &tempfile::TempDir) -> Store {
        let env = Box::new(SystemEnvironment::default());
        Store::init(&dir.path().join("a.db"), Some(PosId::parse("a").unwrap()), "a", env).unwrap()
    }

    fn category(id: &str) -> serde_json::Value {
        json!({"id": id, "name": format!("Category {id}")})
    }

    /// The log rows, in log order: (seq, entity id, payload).
    fn log(store: &Store) -> Vec<(u64, String, String)> {
        let reader = store.reader().unwrap();
        reader
            .query_json("SELECT seq, entity_id, payload FROM sync_changes ORDER BY log_id")
            .unwrap()
            .into_iter()
            .map(|row| {
                (
                    row["seq"].as_u64().unwrap(),
                    row["entityId"].as_str().unwrap().to_string(),
                    row["payload"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    }

    /// The log is gap-free from seq 1, every change carries the till's signature, and the
    /// outbox holds exactly the logged changes, in the same order.
    fn assert_log_signed_and_in_the_outbox(store: &mut Store, log: Vec<(u64, String, String)>) {
        let key = PublicKey::parse(&store.public_key()).unwrap();
        for (i, (seq, _, payload)) in log.iter().enumerate() {
            assert_eq!(*seq, i as u64 + 1, "gap-free, in log order");
            let wire: possync_core::WireChange = serde_json::from_str(payload).unwrap();
            assert_eq!(key.verify(&wire), Ok(()), "change {seq} carries the till's signature");
        }
        let outbox: Vec<String> = store
            .drain_outbox()
            .into_iter()
            .map(|outgoing| serde_json::to_string(&outgoing.change).unwrap())
            .collect();
        let logged: Vec<String> = log.into_iter().map(|(_, _, payload)| payload).collect();
        assert_eq!(outbox, logged, "the outbox holds the logged changes, in the same order");
    }

    #[test]
    fn changes_signed_in_the_background_are_logged_signed_and_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = store(&dir);
        store.sign_in_background(true).unwrap();
        let kept = store
            .group_commit(|store| {
                store.begin_batch().unwrap();
                for i in 0..50 {
                    store.create_record(EntityKind::Category, &category(&format!("c{i}"))).unwrap();
                }
                store.end_batch()
            })
            .unwrap();
        assert!(kept.unwrap(), "every write of the batch stands");
        let log = log(&store);
        assert_eq!(log.len(), 51, "the enrollment and the 50 writes");
        let ids: Vec<String> = log.iter().skip(1).map(|(_, id, _)| id.clone()).collect();
        let expected: Vec<String> = (0..50).map(|i| format!("c{i}")).collect();
        assert_eq!(ids, expected, "the writes, in order");
        assert_log_signed_and_in_the_outbox(&mut store, log);
    }

    #[test]
    fn a_group_of_writes_signed_in_the_background_keeps_the_writes_that_stand_and_only_them() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = store(&dir);
        store.sign_in_background(true).unwrap();
        let outcomes = store
            .group_commit(|store| {
                let mut outcomes = Vec::new();
                for i in 0..30 {
                    let created = store.create_record(EntityKind::Category, &category(&format!("c{i}")));
                    outcomes.push(created.is_ok());
                    if i % 10 == 5 {
                        // A write whose own change was queued for signing, then refused: it is
                        // rolled back alone. It starts once the earlier writes' signatures
                        // are back, so that any of their rows logged inside its savepoint
                        // would be rolled back with it.
                        let refused = store.write(true, |store| {
                            std::thread::sleep(std::time::Duration::from_millis(20));
                            store.create_record(EntityKind::Category, &category(&format!("x{i}")))?;
                            Err::<(), _>(crate::StoreError::InvalidState("refused after its change".into()))
                        });
                        outcomes.push(refused.is_ok());
                    }
                }
                // The same id again: refused before any change is made.
                outcomes.push(store.create_record(EntityKind::Category, &category("c7")).is_ok());
                outcomes
            })
            .unwrap();
        assert_eq!(
            outcomes.iter().filter(|ok| **ok).count(),
            30,
            "the 30 creates stand, the 4 others do not"
        );
        let log = log(&store);
        let ids: Vec<String> = log.iter().skip(1).map(|(_, id, _)| id.clone()).collect();
        let expected: Vec<String> = (0..30).map(|i| format!("c{i}")).collect();
        assert_eq!(ids, expected, "every write that stands is logged once, in order; no refused one is");
        assert_log_signed_and_in_the_outbox(&mut store, log);
        let reader = store.reader().unwrap();
        assert_eq!(reader.count_records(EntityKind::Category).unwrap(), 30);
        assert_eq!(store.summary().get(&PosId::parse("a").unwrap()), Seq(31));
    }

    #[test]
    fn a_failed_batch_drops_the_changes_it_was_signing() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = store(&dir);
        store.create_record(EntityKind::Category, &category("before")).unwrap();
        store.sign_in_background(true).unwrap();
        let outcome = store
            .group_commit(|store| {
                store.begin_batch().unwrap();
                for i in 0..20 {
                    store.create_record(EntityKind::Category, &category(&format!("c{i}"))).unwrap();
                }
                // The same id again: refused, so the whole batch is rolled back.
                assert!(store.create_record(EntityKind::Category, &category("c3")).is_err());
                let kept = store.end_batch().unwrap();
                let after = store.create_record(EntityKind::Category, &category("after")).unwrap();
                (kept, after)
            })
            .unwrap();
        assert!(!outcome.0, "the batch was rolled back");
        let log = log(&store);
        let ids: Vec<&str> = log.iter().map(|(_, id, _)| id.as_str()).collect();
        assert_eq!(ids, ["a", "before", "after"]);
        assert_eq!(log.iter().map(|(seq, _, _)| *seq).collect::<Vec<_>>(), [1, 2, 3], "no gap");
        assert_eq!(store.summary().get(&PosId::parse("a").unwrap()), Seq(3));
    }
}
