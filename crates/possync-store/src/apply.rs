//! Applying a batch of remote changes: SPEC section 2 (merge), section 5 (one
//! `p2p_sync_logs` row per change, one `p2p_conflicts` row per conflict) and section 8 (bad
//! input changes nothing), in one transaction per batch.
//!
//! Per change, in order:
//! 1. Read its origin and seq. Already held: `skipped` (duplicate). Not the next one from that
//!    origin: `skipped` (gap), and the report asks the session to catch up again. This keeps
//!    the node's version vector exact (see docs/DESIGN.md).
//! 2. Decode and validate it. Invalid: `error`, the entity tables are untouched; the change
//!    still enters the log (marked rejected) so that later changes of its origin are not
//!    blocked behind it, and every terminal rejects it the same way.
//!    Its causal context names a write this node does not hold yet (an update that overtook
//!    the create it was made on, via another peer): `skipped` (gap) as well, so that a
//!    record's context never claims a write whose fields it lacks.
//! 3. Merge: mutable records through `possync_core::merge_record`; facts (sales, movements)
//!    inserted once by id.

use possync_core::merge::{RemoteWrite, Verdict, Winner};
use possync_core::{
    Change, ChangeBody, ChangeError, ConflictType, EntityKind, PosId, Seq, Strategy, VersionVector,
    WireChange, merge_record,
};
use serde_json::{Value, json};

use crate::Outgoing;
use crate::Store;
pub use crate::audit::PeerRef;
use crate::audit::{ConflictRow, SyncLog, SyncStatus};
use crate::error::{Result, StoreError};
use crate::keys::{StampEntry, Verified};
use crate::records;
use crate::sales::sale_state;
use possync_core::protocol::StampedChange;
use possync_core::signature::PublicKey;
use rusqlite::OptionalExtension;

/// Which changes a batch may carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Accept {
    /// Anything (the LAN: every terminal of a shop is equal).
    Everything,
    /// The head office applying a store's changes. No product or category writes: such a
    /// change is refused like an invalid one (logged, kept in the log as rejected so its
    /// origin's later changes still apply). Accepted, it would put the store's origin into
    /// the causal context of the head office's next edit of that record, which every other
    /// store, never holding that origin, would refuse as a gap. Customer writes are merged
    /// and re-published to every store as copies (`Store::copy_to_stores`, docs/CHAIN.md
    /// "Chain-wide customers").
    FromStore,
}

/// Who may re-publish other tills' writes to this node (a copy, `data.sync.copyOf`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CopySource {
    /// The head office (an origin this till applied from the DOWN stream): accepted.
    HeadOffice,
    /// Not known as the head office yet, on a store's till: the copy waits for the DOWN
    /// stream, which brings it again and says the origin is the head office's.
    NotKnownYet,
    /// Anyone, on a node that is not a store's till: refused, like an invalid change.
    Refused,
}

/// What applying a batch did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApplyReport {
    /// Changes applied without conflict.
    pub applied: u32,
    /// Changes applied as concurrent edits (conflict rows written).
    pub conflicts: u32,
    /// Duplicates and out-of-order changes.
    pub skipped: u32,
    /// Invalid changes.
    pub errors: u32,
    /// True when a change was refused because an earlier one from its origin is missing:
    /// the session should ask the peer to catch up again.
    pub gap: bool,
    /// The type and strategy of each conflict, for the metrics.
    pub conflict_kinds: Vec<(ConflictType, Strategy)>,
    /// Why each invalid change was refused (`<type>/<action> <id>: <reason>`), so that the
    /// sender can be told with an `error` frame.
    pub rejections: Vec<String>,
    /// Changes whose (origin, seq) is held already with different content (a fork: forged,
    /// or a cloned or restored till numbering again); refused, logged as errors.
    pub forks: u32,
    /// Changes stamped more than [`possync_core::hlc::MAX_OBSERVED_AHEAD_MS`] ahead of this
    /// terminal's clock but within `p2p_max_clock_ahead` (when set above it): merged by their
    /// stamp, but not followed by the clock (their log rows carry `clockAheadMs`).
    pub clock_ahead: u32,
    /// Changes held back because they are stamped more than `p2p_max_clock_ahead` ahead of
    /// this terminal's clock: not applied, not held, logged as errors with `clockAheadMs`
    /// and `heldBack`. Their origin's later changes wait behind them.
    pub held_back: u32,
    /// Changes not applied because they come after (or depend on) a held-back change: they
    /// are not gaps to ask for at once, they come again with it.
    pub waiting: u32,
    /// The earliest time (this terminal's clock, ms) at which a held-back change comes within
    /// the limit: the session asks the peer for it again then.
    pub retry_at_ms: Option<u64>,
    /// Changes refused because their origin did not sign them (forged: written by another
    /// till in its name), or because their origin is revoked. Not held: the real change can
    /// still come.
    pub forged: u32,
    /// This till's own changes set aside because the batch carried a peer's copies of its
    /// own history that differ from it (it was restored from a backup, or copied, and
    /// wrote in between): recovered from them, re-issued under a new origin
    /// (docs/DESIGN.md, "Two tills with one identity").
    pub recovered: u32,
}

impl ApplyReport {
    /// Adds what `other` counted (a batch applied in two parts).
    pub fn absorb(&mut self, other: ApplyReport) {
        self.applied += other.applied;
        self.conflicts += other.conflicts;
        self.skipped += other.skipped;
        self.errors += other.errors;
        self.gap |= other.gap;
        self.conflict_kinds.extend(other.conflict_kinds);
        self.rejections.extend(other.rejections);
        self.forks += other.forks;
        self.clock_ahead += other.clock_ahead;
        self.held_back += other.held_back;
        self.waiting += other.waiting;
        self.retry_at_ms = match (self.retry_at_ms, other.retry_at_ms) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.forged += other.forged;
        self.recovered += other.recovered;
    }

    /// True when changes were held back or wait behind one: a transport that acknowledges
    /// what was applied (the chain's streams) must deliver them again later.
    pub fn must_retry(&self) -> bool {
        self.held_back > 0 || self.waiting > 0
    }

    /// What the connection's [`possync_core::protocol::Session`] is told about the batch
    /// (`Session::batch_applied`): whether to ask the peer again (a gap, now; held-back
    /// changes, at `retry_at_ms`) with `local_summary`, and the refusals to report to it.
    /// The summary is only read on a gap or a retry, so callers may pass an empty one
    /// otherwise.
    pub fn into_batch_applied(self, local_summary: VersionVector) -> possync_core::protocol::BatchApplied {
        possync_core::protocol::BatchApplied {
            gap: self.gap,
            local_summary,
            rejections: self.rejections,
            retry_at_ms: self.retry_at_ms,
        }
    }
}

/// The outcome of one change, for its log row.
pub(crate) struct Logged {
    status: SyncStatus,
    reason: Option<String>,
    conflict: Option<ConflictRow>,
    /// The change needs a record that has not arrived (a ticket's status before the sale):
    /// not held, treated like a gap so that it comes again.
    dependency_missing: bool,
}

impl Logged {
    fn success() -> Logged {
        Logged { status: SyncStatus::Success, reason: None, conflict: None, dependency_missing: false }
    }

    fn skipped(reason: impl Into<String>) -> Logged {
        Logged {
            status: SyncStatus::Skipped,
            reason: Some(reason.into()),
            conflict: None,
            dependency_missing: false,
        }
    }

    fn dependency_missing(reason: impl Into<String>) -> Logged {
        Logged { dependency_missing: true, ..Logged::skipped(reason) }
    }
}

impl Store {
    /// Applies a batch of remote changes in one transaction, with its audit rows.
    ///
    /// Takes the changes by value: each one applied moves on to the outbox for relay, so the
    /// batch a connection decoded is never copied.
    pub fn apply_batch(&mut self, peer: PeerRef<'_>, changes: Vec<WireChange>) -> Result<ApplyReport> {
        self.apply_batch_verified(peer, changes, None)
    }

    /// [`Store::apply_batch`] for a batch whose signatures the receiving task already checked
    /// ([`crate::KeyDirectory::verify`]): the writer then only compares each key with the
    /// origin's enrolled one, and checks alone what was not covered. `None`: checked here.
    pub fn apply_batch_verified(
        &mut self,
        peer: PeerRef<'_>,
        changes: Vec<WireChange>,
        verified: Option<Verified>,
    ) -> Result<ApplyReport> {
        self.apply_entries(peer, with_stamps(changes), verified)
    }

    /// [`Store::apply_batch_verified`] for changes whose stamps the frame parser read
    /// already ([`possync_core::protocol::Event::Apply`]): they are not read again.
    ///
    /// A batch that carries a peer's copies of this till's own changes that differ from the
    /// ones it holds (a till restored from a backup asked the peer for its history) recovers
    /// that history first ([`Store::recover_own_history`]); the rest applies as usual.
    pub fn apply_stamped(
        &mut self,
        peer: PeerRef<'_>,
        changes: Vec<StampedChange>,
        verified: Option<Verified>,
    ) -> Result<ApplyReport> {
        if let Some(origin) = self.forked_own_origin(&changes)? {
            return self.recover_then_apply(peer, &origin, changes);
        }
        let entries =
            changes.into_iter().map(|change| (Some((change.origin, change.seq)), change.wire)).collect();
        self.apply_entries(peer, entries, verified)
    }

    pub(crate) fn apply_entries(
        &mut self,
        peer: PeerRef<'_>,
        changes: Vec<(Option<(PosId, Seq)>, WireChange)>,
        verified: Option<Verified>,
    ) -> Result<ApplyReport> {
        self.write(false, |store| {
            let mut report = ApplyReport::default();
            if !changes.is_empty() {
                store.note_terminal(peer.id, peer.name)?;
            }
            let verified = verified.unwrap_or_else(|| store.preverify(&entries_of(&changes)));
            for (index, (stamp, wire)) in changes.into_iter().enumerate() {
                store.apply_one(peer, stamp, wire, Accept::Everything, verified.key(index), &mut report)?;
            }
            Ok(report)
        })
    }

    /// Logs a frame from a peer that was refused before reaching the merge (malformed
    /// JSON, unknown type, a protocol violation): one `p2p_sync_logs` row with status error.
    /// `peer_name` is `None` when the connection never authenticated (`peer_id` is then its
    /// address).
    pub fn log_rejected_message(
        &mut self,
        peer_id: &str,
        peer_name: Option<&str>,
        message_type: &str,
        message_action: &str,
        error: &str,
    ) -> Result<()> {
        let log = SyncLog {
            peer_id,
            peer_name,
            message_type,
            message_action,
            entity_type: message_type.parse::<EntityKind>().ok(),
            entity_id: None,
        };
        let details = json!({"error": error.chars().take(2000).collect::<String>()}).to_string();
        self.write(false, |store| store.log_sync(&log, SyncStatus::Error, Some(error), None, Some(&details)))
    }

    /// Logs a fork found at a handshake: the peer holds another change numbered `seq` of
    /// `origin` than this node does (their fingerprints differ). An `error` row `fork: ...`,
    /// like a fork refused when the change itself arrives, so the dashboard's alert shows it.
    pub fn log_fork_at_handshake(&mut self, peer: PeerRef<'_>, origin: &PosId, seq: Seq) -> Result<()> {
        let log = SyncLog {
            peer_id: peer.id,
            peer_name: Some(peer.name),
            message_type: "hello",
            message_action: "heads",
            entity_type: None,
            entity_id: None,
        };
        let reason = format!(
            "fork: {} holds another change numbered {seq} of {origin} than this till does (found at the handshake)",
            peer.name
        );
        let details = json!({"origin": origin, "seq": seq, "fork": true, "foundAt": "handshake"}).to_string();
        self.write(false, |store| {
            store.log_sync(&log, SyncStatus::Error, Some(&reason), None, Some(&details))
        })
    }

    /// Applies one remote change (`stamp`: its origin and seq as read before, `None` when it
    /// has no readable one; `verified_with`: the key its signature was found valid with, when
    /// it was checked with its batch).
    pub(crate) fn apply_one(
        &mut self,
        peer: PeerRef<'_>,
        stamp: Option<(PosId, Seq)>,
        wire: WireChange,
        accept: Accept,
        verified_with: Option<PublicKey>,
        report: &mut ApplyReport,
    ) -> Result<()> {
        let entity_type = wire.entity.parse::<EntityKind>().ok();
        // `data` is parsed once, here; the change log keeps the text as received.
        let data = wire.data_object();
        let entity_id = data
            .as_ref()
            .ok()
            .and_then(|data| data.get("id"))
            .and_then(Value::as_str)
            .map(|id| id.chars().take(64).collect::<String>());
        let decided_by = data.as_ref().ok().and_then(possync_core::change::decided_by).map(str::to_string);
        let log = SyncLog {
            peer_id: peer.id,
            peer_name: Some(peer.name),
            message_type: &wire.entity,
            message_action: &wire.action,
            entity_type,
            entity_id: entity_id.as_deref(),
        };
        let Some((origin, seq)) = stamp else {
            report.errors += 1;
            report.rejections.push(format!(
                "{}/{}: change without a valid data.sync.origin and data.sync.seq",
                log.message_type, log.message_action
            ));
            let details =
                json!({"error": "change without a valid data.sync.origin and data.sync.seq"}).to_string();
            return self.log_sync(&log, SyncStatus::Error, None, None, Some(&details));
        };
        let held = self.vv.get(&origin);
        if seq <= held {
            if let Some(held_payload) = self.held_payload_if_different(&origin, seq, &wire)? {
                // Two contents for one (origin, seq): a forged change, or a cloned or restored
                // till that numbered again. The first one taken stays; never silent.
                report.errors += 1;
                report.forks += 1;
                let reason = format!(
                    "fork: another change numbered {seq} of {origin} is held already (different content); kept the one held, refused this one"
                );
                let details = json!({"origin": origin, "seq": seq, "fork": true, "held": held_payload.len(), "received": wire.data.get().len()}).to_string();
                return self.log_sync(&log, SyncStatus::Error, Some(&reason), None, Some(&details));
            }
            report.skipped += 1;
            let details = stamp_details(&origin, seq, None);
            return self.log_sync(
                &log,
                SyncStatus::Skipped,
                Some("duplicate: already applied"),
                None,
                Some(&details),
            );
        }
        if seq != held.next() {
            report.skipped += 1;
            let reason = if let Some(refused) = self.refused_next(&origin) {
                // The change before it was forged or revoked: asking again would bring the
                // same one back; the real one comes with the next catch-up.
                format!("waiting: change {refused} of {origin} was refused (forged or revoked)")
            } else if self.is_held_back(&origin) {
                report.waiting += 1;
                // Asking again would only bring the held-back change back: it is retried when
                // the clock catches up (`retry_at_ms`).
                format!(
                    "waiting: change {} of {origin} is held back (stamped ahead of this clock)",
                    held.next()
                )
            } else {
                report.gap = true;
                format!("gap: change {seq} of {origin} before change {}", held.next())
            };
            return self.log_sync(&log, SyncStatus::Skipped, Some(&reason), None, None);
        }
        if let Some(refusal) = self.check_origin(&origin, seq, &wire, verified_with) {
            return self.refuse(&log, origin, seq, refusal, report);
        }
        let decoded =
            data.and_then(|data| Change::decode(&wire.entity, &wire.action, data)).and_then(|change| {
                if change.origin != origin || change.seq != seq {
                    Err(ChangeError::Malformed("data.sync read two ways".into()))
                } else if accept == Accept::FromStore
                    && matches!(change.entity, EntityKind::Product | EntityKind::Category)
                {
                    Err(ChangeError::Malformed(
                        "the catalog is authored by the head office, not by a store".into(),
                    ))
                } else {
                    Ok(change)
                }
            });
        let decoded = match decoded {
            Ok(change) if change.copy_of.is_some() => match self.copy_source(&origin)? {
                CopySource::HeadOffice => Ok(change),
                CopySource::NotKnownYet => {
                    // A store till that got the head office's copy over the LAN before its
                    // own downlink learnt which origin is the head office's: the DOWN stream
                    // brings this copy again, and the LAN's catch-up after that.
                    report.skipped += 1;
                    report.waiting += 1;
                    let reason = format!(
                        "waiting: change {seq} of {origin} is a head-office copy, and {origin} is not known here as the head office yet"
                    );
                    return self.log_sync(&log, SyncStatus::Skipped, Some(&reason), None, None);
                }
                CopySource::Refused => Err(ChangeError::Malformed(format!(
                    "data.sync.copyOf: {origin} is not the head office; only the head office re-publishes other tills' writes"
                ))),
            },
            other => other,
        };
        let change = match decoded {
            Ok(change) => change,
            Err(err) => {
                report.errors += 1;
                report.rejections.push(format!(
                    "{}/{} {}: {err}",
                    log.message_type,
                    log.message_action,
                    entity_id.as_deref().unwrap_or("?")
                ));
                self.append_change(
                    &origin,
                    seq,
                    None,
                    &wire.entity,
                    entity_id.as_deref().unwrap_or(""),
                    &wire,
                    true,
                )?;
                let details = json!({"origin": origin, "seq": seq, "error": err.to_string()}).to_string();
                return self.log_sync(&log, SyncStatus::Error, Some(&err.to_string()), None, Some(&details));
            }
        };
        if change.entity == EntityKind::Terminal
            && let Some(refusal) = self.apply_identity(&change, &wire)?
        {
            return self.refuse(&log, origin, seq, refusal, report);
        }
        // Causal delivery: the writes to this record that its writer had seen (its context)
        // must be held first. Changes of different origins travel on different paths, so an
        // update can overtake the create it was made on; merging it first would make the
        // record's context claim a write whose fields it lacks, and that write would then be
        // dropped as already seen. Refuse it like a gap: the sender holds the missing writes
        // and sends them first in catch-up (its log order is causal).
        if let Some((missing, missing_seq)) = self.missing_dependency(&change)? {
            report.skipped += 1;
            let reason = if let Some(refused) = self.refused_next(&missing) {
                format!(
                    "waiting: change {seq} of {origin} depends on change {refused} of {missing}, refused (forged or revoked)"
                )
            } else if self.is_held_back(&missing) {
                report.waiting += 1;
                format!(
                    "waiting: change {seq} of {origin} depends on change {missing_seq} of {missing}, held back (stamped ahead of this clock)"
                )
            } else {
                report.gap = true;
                format!(
                    "gap: change {seq} of {origin} depends on change {missing_seq} of {missing}, not held yet"
                )
            };
            return self.log_sync(&log, SyncStatus::Skipped, Some(&reason), None, None);
        }
        if let Some(hlc) = change.hlc {
            let now = self.env.now_ms();
            let ahead_ms = hlc.ms().saturating_sub(now);
            let limit_ms = self.settings.max_clock_ahead_ms;
            if ahead_ms > limit_ms {
                return self.hold_back(&log, origin, seq, ahead_ms, hlc.ms() - limit_ms, report);
            }
        }
        let clock_ahead_ms = change
            .hlc
            .map(|hlc| self.clock.observe(hlc, self.env.now_ms()))
            .filter(|ahead| *ahead > possync_core::hlc::MAX_OBSERVED_AHEAD_MS);
        if clock_ahead_ms.is_some() {
            report.clock_ahead += 1;
        }
        let outcome = self.merge_change(&change)?;
        if outcome.dependency_missing {
            // A dependency has not arrived (should not happen with causal delivery): treat
            // it like a gap, do not log the change as held.
            report.skipped += 1;
            report.gap = true;
            return self.log_sync(&log, SyncStatus::Skipped, outcome.reason.as_deref(), None, None);
        }
        self.append_change(
            &origin,
            seq,
            change.hlc,
            change.entity.as_str(),
            change.id.as_str(),
            &wire,
            false,
        )?;
        match outcome.status {
            SyncStatus::Success => report.applied += 1,
            SyncStatus::Conflict => report.conflicts += 1,
            SyncStatus::Skipped => report.skipped += 1,
            SyncStatus::Error => report.errors += 1,
        }
        let strategy = outcome.conflict.as_ref().map(|conflict| conflict.report.strategy.as_str());
        let details = stamp_details(&origin, seq, clock_ahead_ms);
        self.log_sync(&log, outcome.status, outcome.reason.as_deref(), strategy, Some(&details))?;
        if let Some(conflict) = outcome.conflict {
            report.conflict_kinds.push((conflict.report.conflict_type, conflict.report.strategy));
            // A copy's conflict names the till where the edit was made, not the head office.
            let edited_on = change.copy_of.as_ref().map_or(&origin, |copy_of| &copy_of.origin);
            self.log_conflict(edited_on, peer, &conflict)?;
        }
        if self.open_decidable
            && matches!(
                change.body,
                ChangeBody::Upsert { .. } | ChangeBody::Delete | ChangeBody::TicketStatus { .. }
            )
        {
            let origin_name =
                if origin.as_str() == peer.id { peer.name.to_string() } else { origin.to_string() };
            self.close_decided_conflicts(&change, decided_by.as_deref(), &origin_name)?;
        }
        if let Some(copy_of) = &change.copy_of {
            self.note_copied(copy_of)?;
        } else if accept == Accept::FromStore && change.entity == EntityKind::Customer {
            self.copy_to_stores(&change)?;
        }
        self.outbox.push(Outgoing { change: wire });
        Ok(())
    }

    /// The first write named by `change`'s context that this node does not hold (origin,
    /// seq), if any. A write of another store's till counts as held when the head office's
    /// copy of it is (`chain_copied`): its content is here, under the copy's stamp. The
    /// entry of a copy's own original is the copy itself.
    fn missing_dependency(&self, change: &Change) -> Result<Option<(PosId, Seq)>> {
        let copied_from = change.copy_of.as_ref().map(|copy_of| &copy_of.origin);
        for (pos, needed) in change.ctx.iter() {
            if *pos == change.origin || Some(pos) == copied_from || self.vv.get(pos) >= needed {
                continue;
            }
            if self.copied_up_to(pos)? < needed {
                return Ok(Some((pos.clone(), needed)));
            }
        }
        Ok(None)
    }

    /// The seq of `origin`'s next change when that change was refused as forged or revoked.
    fn refused_next(&self, origin: &PosId) -> Option<Seq> {
        self.refused.get(origin).copied().filter(|seq| *seq == self.vv.get(origin).next())
    }

    /// Refuses a change its origin did not sign (or of a revoked till): logged as an error
    /// (`forged: ...`/`revoked: ...`, `details.forged`), counted, not held.
    fn refuse(
        &mut self,
        log: &SyncLog<'_>,
        origin: PosId,
        seq: Seq,
        refusal: crate::keys::Refusal,
        report: &mut ApplyReport,
    ) -> Result<()> {
        report.errors += 1;
        report.forged += 1;
        report.rejections.push(format!("{}/{}: {}", log.message_type, log.message_action, refusal.reason));
        let details = json!({"origin": origin, "seq": seq, "forged": true}).to_string();
        self.refused.insert(origin, seq);
        self.log_sync(log, SyncStatus::Error, Some(&refusal.reason), None, Some(&details))
    }

    /// True while `origin`'s next change is one held back for its clock stamp.
    fn is_held_back(&self, origin: &PosId) -> bool {
        self.held_back.get(origin).is_some_and(|seq| *seq == self.vv.get(origin).next())
    }

    /// Holds back a change stamped `ahead_ms` ahead of this terminal's clock, more than
    /// `p2p_max_clock_ahead` allows: merged, its stamp would win every concurrent edit of the
    /// record on every till and drag their clocks along. Refused for now, logged with
    /// `clockAheadMs` (the dashboard's clock alert) and retried from `retry_at_ms`, when the
    /// clock has caught up: every till applies it then, so they still end identical.
    fn hold_back(
        &mut self,
        log: &SyncLog<'_>,
        origin: PosId,
        seq: Seq,
        ahead_ms: u64,
        retry_at_ms: u64,
        report: &mut ApplyReport,
    ) -> Result<()> {
        report.errors += 1;
        report.held_back += 1;
        report.retry_at_ms = Some(report.retry_at_ms.map_or(retry_at_ms, |at| at.min(retry_at_ms)));
        let reason = format!(
            "clock ahead: change {seq} of {origin} is stamped {} s ahead of this terminal's clock (p2p_max_clock_ahead allows {} s); held back until the clock catches up",
            ahead_ms / 1000,
            self.settings.max_clock_ahead_ms / 1000
        );
        let details =
            json!({"origin": origin, "seq": seq, "clockAheadMs": ahead_ms, "heldBack": true}).to_string();
        self.held_back.insert(origin, seq);
        self.log_sync(log, SyncStatus::Error, Some(&reason), None, Some(&details))
    }

    /// The payload held for (origin, seq) when it differs from `wire` (compared as the text
    /// every till relays byte for byte), `None` when it is the same change.
    fn held_payload_if_different(
        &mut self,
        origin: &PosId,
        seq: Seq,
        wire: &WireChange,
    ) -> Result<Option<String>> {
        let origin_idx = self.origins.idx(&self.conn, origin)?;
        let held: Option<String> = self
            .conn
            .prepare_cached("SELECT payload FROM sync_changes WHERE origin = ?1 AND seq = ?2")?
            .query_row(rusqlite::params![origin_idx, seq.0 as i64], |row| row.get(0))
            .optional()?;
        let Some(held) = held else { return Ok(None) };
        let received = serde_json::to_string(wire).map_err(|err| StoreError::Corrupt(err.to_string()))?;
        Ok((held != received).then_some(held))
    }

    /// Merges one decoded change into the entity tables.
    pub(crate) fn merge_change(&mut self, change: &Change) -> Result<Logged> {
        let version = change.version();
        match &change.body {
            ChangeBody::Upsert { fields, .. } => self.merge_fields(change, Some(fields), &version),
            ChangeBody::Delete => self.merge_fields(change, None, &version),
            ChangeBody::Sale(sale) => {
                if self.ticket_exists(&change.id)? {
                    return Ok(Logged::skipped(format!("ticket {} already recorded", change.id)));
                }
                let state = sale_state(sale, version, change.ctx.clone());
                self.insert_sale(sale, &state)?;
                Ok(Logged::success())
            }
            ChangeBody::TicketStatus { fields, returns, .. } => {
                if !self.ticket_exists(&change.id)? {
                    return Ok(Logged::dependency_missing(format!(
                        "missing: ticket {} not received yet",
                        change.id
                    )));
                }
                let logged = self.merge_fields(change, Some(fields), &version)?;
                for movement in returns {
                    self.insert_movement(movement)?;
                }
                Ok(logged)
            }
            // Recorded by `apply_identity` before the merge.
            ChangeBody::Enroll { .. } | ChangeBody::Revoke { .. } => Ok(Logged::success()),
            ChangeBody::Movement { movement, .. } => {
                if self.insert_movement(movement)? {
                    Ok(Logged::success())
                } else {
                    Ok(Logged::skipped(format!("movement {} already recorded", movement.id)))
                }
            }
        }
    }

    fn merge_fields(
        &mut self,
        change: &Change,
        fields: Option<&possync_core::FieldMap>,
        version: &possync_core::Version,
    ) -> Result<Logged> {
        let kind = change.entity;
        let local = records::load(&self.conn, &self.origins, kind, &change.id)?;
        let remote = RemoteWrite { id: &change.id, version, ctx: &change.ctx, fields };
        let outcome = merge_record(local.as_ref(), remote, self.settings.strategy);
        if outcome.changed {
            records::save(&self.conn, &mut self.origins, kind, &change.id, &outcome.state)?;
            if kind == EntityKind::Product && local.is_none() {
                let stock = records::sum_movements(&self.conn, &change.id)?;
                if !stock.is_zero() {
                    self.conn.execute(
                        "UPDATE products SET stock = ?2 WHERE id = ?1",
                        rusqlite::params![change.id.as_str(), possync_core::decimal::to_text(stock)],
                    )?;
                }
            }
        }
        Ok(match outcome.verdict {
            Verdict::Applied => Logged::success(),
            Verdict::AlreadySeen => Logged::skipped("already incorporated"),
            // The seed's statuses: remote wins, the update is applied and logged `conflict`;
            // local wins, the update is skipped and logged `skipped` (when no value changed:
            // fields it alone edited still apply, and then it is a `conflict`). Either way the
            // `p2p_conflicts` row is written.
            Verdict::Conflict(report) => {
                let kept_local = report.winner == Winner::Local && report.final_data == report.local_data;
                Logged {
                    status: if kept_local { SyncStatus::Skipped } else { SyncStatus::Conflict },
                    reason: Some(if kept_local {
                        format!("{}: the local version is kept", report.conflict_type.as_str())
                    } else {
                        report.conflict_type.as_str().to_string()
                    }),
                    conflict: Some(ConflictRow {
                        entity: kind,
                        id: change.id.clone(),
                        report: *report,
                        ctx: outcome.state.ctx.clone(),
                    }),
                    dependency_missing: false,
                }
            }
        })
    }
}

/// The `details` of a change's log row: `{"origin": ..., "seq": ...}` (and `clockAheadMs`
/// for a change stamped far ahead of this terminal's clock), serialized without building a
/// `serde_json::Value` (one per change applied).
fn stamp_details(origin: &PosId, seq: Seq, clock_ahead_ms: Option<u64>) -> String {
    #[derive(serde::Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Stamp<'a> {
        origin: &'a PosId,
        seq: Seq,
        #[serde(skip_serializing_if = "Option::is_none")]
        clock_ahead_ms: Option<u64>,
    }
    // Invariant: a struct of a string and integers always serializes.
    serde_json::to_string(&Stamp { origin, seq, clock_ahead_ms }).expect("serializing a stamp")
}

/// The origin and seq of a change's data, read even when the rest is invalid.
/// Changes with their stamps as [`StampEntry`]s (for the batch signature check).
pub(crate) fn entries_of(changes: &[(Option<(PosId, Seq)>, WireChange)]) -> Vec<StampEntry<'_>> {
    changes.iter().map(|(stamp, wire)| (stamp.as_ref().map(|(origin, seq)| (origin, *seq)), wire)).collect()
}

/// The changes of a run with the stamps read from them (`peek_stamp`).
pub(crate) fn with_stamps(changes: Vec<WireChange>) -> Vec<(Option<(PosId, Seq)>, WireChange)> {
    changes.into_iter().map(|wire| (wire.peek_stamp().map(|stamp| (stamp.origin, stamp.seq)), wire)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamp_details_is_the_json_object() {
        let origin = PosId::parse("pos-a").unwrap();
        assert_eq!(stamp_details(&origin, Seq(42), None), json!({"origin": origin, "seq": 42}).to_string());
        let ahead: Value = serde_json::from_str(&stamp_details(&origin, Seq(42), Some(7))).unwrap();
        assert_eq!(ahead, json!({"origin": origin, "seq": 42, "clockAheadMs": 7}));
    }
}
