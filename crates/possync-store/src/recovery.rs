//! Recovering a till's own history after a restore from a backup (issue 13, item 2;
//! docs/DESIGN.md "Two tills with one identity", "The plan for recovering them").
//!
//! Why this exists: a till restored from a backup numbers its changes again from where the
//! backup stopped. When it sells before it meets a peer, two different changes get one number
//! of its origin: the peers hold the originals, the till its in-between changes, and neither
//! side ever takes the other's (a change whose number is held already is skipped, or refused
//! as a fork). The sales made in between would stay on that till, and the originals would
//! never reach it. Re-issuing the in-between changes under the same origin cannot be made
//! exact (a number after the peers' head may already be taken by a change some peer holds and
//! this till has not met), so they are re-issued under a new origin, `<posId>-r<k>`, that no
//! till has written as.
//!
//! [`Store::recover_own_history`] takes a peer's copies of this till's own changes (one
//! contiguous run of one of its own origins, as a catch-up sends them) and compares each with
//! the change this till holds at that number. None differs: the till is only behind (or
//! equal), and they apply as any catch-up would. One differs at number F and is signed by this
//! till's own key (a second history of its own, not a forgery): in one transaction,
//!
//! 1. the till's own changes F.. of that origin are set aside in `displaced_changes` (their
//!    exact wire text) and removed from the change log; the version vector's entry goes back
//!    to F-1; a key or a revocation they recorded is forgotten;
//! 2. the entity tables are rebuilt by replaying the change log, in log order, through the
//!    merge (`Store::merge_change`, the code every remote change goes through): the merge is
//!    order-independent over causal deliveries, so this is the state of a till that never
//!    held the set-aside changes. No audit row is written by the replay;
//! 3. the peer's copies from F on apply through the normal path, with their audit rows;
//! 4. the till writes as `<posId>-r<k>` from then on (persisted in `node_meta`), enrolls that
//!    origin with its key, and re-issues each set-aside change as a new local change of it,
//!    stamped now with the till's current context: a sale keeps its ticket id and number (a
//!    number another ticket took meanwhile is replaced by a fresh one, past every number
//!    seen), an edit becomes an edit made now, a stock movement stays the same movement (same
//!    id and quantity, so stock stays the sum of the movements).
//!
//! One `p2p_sync_logs` row says what happened. On any error nothing is changed.
//!
//! The till's identity (its posId: handshake, ticket prefix, `pos_id` of its tickets,
//! movements and cash sessions) does not change; only the origin its new changes are numbered
//! under does. Every origin it has written as counts as its own ([`Store::own_origins`]).

use std::collections::{BTreeMap, HashMap};

use possync_core::entity::TicketStatus;
use possync_core::protocol::StampedChange;
use possync_core::{
    Change, ChangeBody, EntityId, EntityKind, PosId, RecordState, Seq, TicketAction, WireChange,
};
use rusqlite::{Connection, OptionalExtension, params};
use rust_decimal::Decimal;
use serde_json::json;

use crate::apply::{Accept, ApplyReport, PeerRef};
use crate::audit::{SyncLog, SyncStatus};
use crate::error::{RecoveryError, Result, StoreError};
use crate::{Store, keys, meta, records};

/// `node_meta` key: the origin this till writes as (absent: its posId).
const WRITING_ORIGIN: &str = "writing_origin";
/// `node_meta` key: every origin this till has written as, a JSON array of posIds.
const OWN_ORIGINS: &str = "own_origins";
/// `node_meta` key: the k of the last `<posId>-r<k>` this till took.
const RECOVERIES: &str = "recoveries";

/// The tables the merge writes: what a replay of the change log rebuilds (children first).
const DERIVED_TABLES: [&str; 10] = [
    "ticket_lines",
    "ticket_payments",
    "tickets",
    "stock_movements",
    "products",
    "categories",
    "customers",
    "users",
    "cash_sessions",
    "z_reports",
];

/// What [`Store::recover_own_history`] did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OwnHistoryRecovery {
    /// The own origin whose history was compared (`None`: no copy was given).
    pub origin: Option<PosId>,
    /// The first number whose content differed: the first change set aside. `None`: nothing
    /// differed (the till was behind or equal) and the copies applied as a catch-up.
    pub first_displaced: Option<Seq>,
    /// How many of the till's own changes were set aside.
    pub displaced: u32,
    /// How many of them were re-issued under the new origin.
    pub reissued: u32,
    /// How many of them came back unchanged among the peer's copies (the peer had taken
    /// them before it met the originals): held again, not re-issued.
    pub taken_back: u32,
    /// The set-aside changes neither re-issued nor taken back, each as `<type>/<action> <id>
    /// (change <seq>): <why>` (an edit of a record deleted since, a refund of a ticket
    /// refunded since, a sale or movement recorded already, the old origin's enrollment).
    pub not_reissued: Vec<String>,
    /// Sales re-issued with a new ticket number (theirs was taken by another ticket).
    pub renumbered: Vec<Renumbered>,
    /// The origin the till writes as from now on (`<posId>-r<k>`), when it recovered.
    pub new_origin: Option<PosId>,
    /// The seqs of the new origin the re-issued changes took (its enrollment is 1).
    pub reissued_seqs: Option<(Seq, Seq)>,
    /// What applying the peer's copies did.
    pub applied: ApplyReport,
}

impl OwnHistoryRecovery {
    /// True when the till's history diverged and was recovered.
    pub fn recovered(&self) -> bool {
        self.first_displaced.is_some()
    }
}

/// A re-issued sale whose ticket number another ticket holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Renumbered {
    /// The ticket (its id is kept).
    pub ticket: EntityId,
    /// The number it had (the receipt printed at the sale).
    pub printed: String,
    /// The number it has now.
    pub now: String,
}

/// One of the till's own changes, set aside.
struct Displaced {
    /// Its `displaced_changes` row.
    row: i64,
    seq: Seq,
    payload: String,
    wire: WireChange,
}

/// What became of one set-aside change.
enum Fate {
    /// Re-issued as this seq of the new origin.
    Reissued(Seq),
    /// Held again: the peer's copy at its number is the same change.
    TakenBack,
    /// Not re-issued, and why.
    Dropped(String),
}

/// The origin this till writes as and every origin it has written as, from `node_meta`.
pub(crate) fn load_own_origins(conn: &Connection, pos_id: &PosId) -> Result<(PosId, Vec<PosId>)> {
    let corrupt = |key: &str, err: String| StoreError::Corrupt(format!("node_meta.{key}: {err}"));
    let writing = match meta::node_value(conn, WRITING_ORIGIN)? {
        Some(raw) => PosId::parse(raw).map_err(|err| corrupt(WRITING_ORIGIN, err.to_string()))?,
        None => pos_id.clone(),
    };
    let mut own = vec![pos_id.clone()];
    if let Some(raw) = meta::node_value(conn, OWN_ORIGINS)? {
        let listed: Vec<String> =
            serde_json::from_str(&raw).map_err(|err| corrupt(OWN_ORIGINS, err.to_string()))?;
        for origin in listed {
            let origin = PosId::parse(origin).map_err(|err| corrupt(OWN_ORIGINS, err.to_string()))?;
            if !own.contains(&origin) {
                own.push(origin);
            }
        }
    }
    if !own.contains(&writing) {
        own.push(writing.clone());
    }
    Ok((writing, own))
}

impl crate::StoreReader {
    /// The origin this till writes as now and every origin it has written as (its posId
    /// first), as [`Store::writing_origin`] and [`Store::own_origins`] say, for readers
    /// (a connection comparing a peer's summary with this till's own changes).
    pub fn own_origins(&self) -> Result<(PosId, Vec<PosId>)> {
        let pos_id = meta::node_value(&self.conn, "pos_id")?
            .ok_or_else(|| StoreError::Corrupt("node_meta.pos_id is missing".into()))?;
        let pos_id =
            PosId::parse(pos_id).map_err(|err| StoreError::Corrupt(format!("node_meta.pos_id: {err}")))?;
        load_own_origins(&self.conn, &pos_id)
    }
}

/// A wire change as the change log stores it (`sync_changes.payload`).
fn payload_of(wire: &WireChange) -> Result<String> {
    serde_json::to_string(wire).map_err(|err| StoreError::Corrupt(err.to_string()))
}

impl Store {
    /// Recovers this till's own history from a peer's copies of its own changes (see the
    /// module documentation): `theirs` is one contiguous run of one of this till's own
    /// origins, from any seq on, as the peer holds them.
    ///
    /// When none differs from the change this till holds at its number, they are applied as
    /// a catch-up and nothing is set aside. Otherwise, from the first number that differs,
    /// the till's own changes are set aside, its state is rebuilt without them, the peer's
    /// copies are applied, and the set-aside changes are re-issued under a new origin
    /// `<posId>-r<k>` that the till writes as from then on: one transaction, with one
    /// `p2p_sync_logs` row saying what happened. A copy from that number on that this
    /// till's key did not sign refuses the whole call ([`RecoveryError::NotSigned`]);
    /// nothing is changed then, nor on any other error.
    pub fn recover_own_history(
        &mut self,
        peer: PeerRef<'_>,
        theirs: Vec<StampedChange>,
    ) -> Result<OwnHistoryRecovery> {
        if self.in_group || self.signs_in_background() {
            return Err(RecoveryError::Busy.into());
        }
        let Some(first) = theirs.first() else { return Ok(OwnHistoryRecovery::default()) };
        let (origin, start) = (first.origin.clone(), first.seq);
        if !self.is_own_origin(&origin) {
            return Err(RecoveryError::NotOwnOrigin { origin, seq: start }.into());
        }
        for (offset, copy) in (0u64..).zip(&theirs) {
            let expected = Seq(start.0 + offset);
            let read = copy.wire.peek_stamp();
            let read = read.as_ref().map(|stamp| (&stamp.origin, stamp.seq));
            if copy.origin != origin || copy.seq != expected || read != Some((&origin, expected)) {
                let found = match read {
                    Some((read_origin, read_seq)) => {
                        format!("{} {} (its data says {read_origin} {read_seq})", copy.origin, copy.seq)
                    }
                    None => format!("{} {} (its data carries no stamp)", copy.origin, copy.seq),
                };
                return Err(RecoveryError::NotContiguous { origin, expected, found }.into());
            }
        }
        let held = self.vv.get(&origin);
        let mut split = None;
        for (index, copy) in theirs.iter().enumerate() {
            if copy.seq > held {
                break;
            }
            if self.held_own_payload(&origin, copy.seq)? != Some(payload_of(&copy.wire)?) {
                split = Some(index);
                break;
            }
        }
        let Some(split) = split else {
            // Behind or equal: a catch-up like any other.
            let applied = self.apply_stamped(peer, theirs, None)?;
            return Ok(OwnHistoryRecovery { origin: Some(origin), applied, ..OwnHistoryRecovery::default() });
        };
        // A second history of this till's own origin is taken only signed by its own key.
        let key = self.till_key.public();
        for copy in &theirs[split..] {
            if let Err(err) = key.verify(&copy.wire) {
                return Err(
                    RecoveryError::NotSigned { origin, seq: copy.seq, reason: err.to_string() }.into()
                );
            }
        }
        let copies: Vec<StampedChange> = theirs.into_iter().skip(split).collect();
        let first_displaced = copies[0].seq;
        let outbox_before = self.outbox.len();
        let result = self.write(true, |store| store.recover_from(peer, &origin, copies));
        match &result {
            Ok(_) => {
                // Set-aside changes not broadcast yet are not sent any more.
                let mut index = 0;
                self.outbox.retain(|out| {
                    let set_aside = index < outbox_before
                        && out
                            .change
                            .peek_stamp()
                            .is_some_and(|stamp| stamp.origin == origin && stamp.seq >= first_displaced);
                    index += 1;
                    !set_aside
                });
            }
            Err(_) => self.reload_own_state()?,
        }
        result
    }

    /// The own origin of which `changes` carry a copy that differs from the change this till
    /// holds at its number, if any (peers send changes below a till's head only when it
    /// asked for them: its own history after a restore, `docs/DESIGN.md`).
    pub(crate) fn forked_own_origin(&self, changes: &[StampedChange]) -> Result<Option<PosId>> {
        for change in changes {
            if !self.is_own_origin(&change.origin) || change.seq > self.vv.get(&change.origin) {
                continue;
            }
            if self.held_own_payload(&change.origin, change.seq)? != Some(payload_of(&change.wire)?) {
                return Ok(Some(change.origin.clone()));
            }
        }
        Ok(None)
    }

    /// Recovers `origin`'s history from the copies of it in `changes`, then applies the
    /// other changes. When the recovery is refused (copies not signed by this till's key,
    /// not one run), nothing is recovered and the whole batch applies as usual: the
    /// differing copies are then refused as forks, logged and alerted.
    pub(crate) fn recover_then_apply(
        &mut self,
        peer: PeerRef<'_>,
        origin: &PosId,
        changes: Vec<StampedChange>,
    ) -> Result<ApplyReport> {
        let (run, rest): (Vec<StampedChange>, Vec<StampedChange>) =
            changes.iter().cloned().partition(|change| &change.origin == origin);
        match self.recover_own_history(peer, run) {
            Ok(recovery) => {
                let mut report = recovery.applied;
                report.recovered = recovery.displaced;
                if !rest.is_empty() {
                    report.absorb(self.apply_stamped(peer, rest, None)?);
                }
                Ok(report)
            }
            Err(StoreError::Recovery(refused)) => {
                let entries = changes
                    .into_iter()
                    .map(|change| (Some((change.origin, change.seq)), change.wire))
                    .collect();
                let mut report = self.apply_entries(peer, entries, None)?;
                report.rejections.push(format!("recovery of {origin} refused: {refused}"));
                Ok(report)
            }
            Err(err) => Err(err),
        }
    }

    /// The recovery's transaction: `copies` are the peer's, from the first that differs.
    fn recover_from(
        &mut self,
        peer: PeerRef<'_>,
        origin: &PosId,
        copies: Vec<StampedChange>,
    ) -> Result<OwnHistoryRecovery> {
        let Some(first) = copies.first().map(|copy| copy.seq) else {
            return Err(StoreError::InvalidState("a recovery needs the peer's copies".into()));
        };
        let k = self.next_recovery_number()?;
        let new_origin = PosId::parse(format!("{}-r{k}", self.identity.pos_id))
            .map_err(|err| RecoveryError::NoNewOrigin(err.to_string()))?;
        let mut report = OwnHistoryRecovery {
            origin: Some(origin.clone()),
            first_displaced: Some(first),
            new_origin: Some(new_origin.clone()),
            ..OwnHistoryRecovery::default()
        };

        let displaced = self.set_aside(origin, first, peer, k, &new_origin)?;
        report.displaced = displaced.len() as u32;
        self.rebuild_by_replay()?;

        // The numbers of the peer's sales count as taken even where a copy cannot apply yet
        // (it waits for a change of another origin): they arrive with their numbers.
        let copied_numbers: Vec<(String, String)> = copies
            .iter()
            .filter_map(|copy| match Change::from_wire(&copy.wire) {
                Ok(Change { id, body: ChangeBody::Sale(sale), .. }) => {
                    Some((sale.ticket_number, id.to_string()))
                }
                _ => None,
            })
            .collect();
        self.note_terminal(peer.id, peer.name)?;
        let key = self.till_key.public();
        for copy in copies {
            let stamp = Some((copy.origin, copy.seq));
            self.apply_one(peer, stamp, copy.wire, Accept::Everything, Some(key), &mut report.applied)?;
        }

        self.switch_writing_origin(k, new_origin.clone())?;
        self.enroll()?;
        let mut numbers = self.own_ticket_numbers()?;
        for (number, ticket) in copied_numbers {
            numbers.entry(number).or_insert(ticket);
        }
        let displaced_numbers: Vec<String> = displaced
            .iter()
            .filter_map(|set_aside| match Change::from_wire(&set_aside.wire) {
                Ok(Change { body: ChangeBody::Sale(sale), .. }) => Some(sale.ticket_number),
                _ => None,
            })
            .collect();
        self.move_ticket_counter_past(numbers.keys().chain(&displaced_numbers))?;

        for set_aside in &displaced {
            let fate = self.reissue(origin, set_aside, &mut numbers, &mut report)?;
            let (seq, outcome) = match fate {
                Fate::Reissued(seq) => {
                    report.reissued += 1;
                    report.reissued_seqs = Some(match report.reissued_seqs {
                        Some((from, _)) => (from, seq),
                        None => (seq, seq),
                    });
                    (Some(seq.0 as i64), "reissued".to_string())
                }
                Fate::TakenBack => {
                    report.taken_back += 1;
                    (
                        None,
                        format!(
                            "taken back: {}'s copy of change {} is the same change",
                            peer.name, set_aside.seq
                        ),
                    )
                }
                Fate::Dropped(why) => {
                    report.not_reissued.push(format!(
                        "{}/{} {} (change {}): {why}",
                        set_aside.wire.entity,
                        set_aside.wire.action,
                        entity_id_of(&set_aside.wire),
                        set_aside.seq
                    ));
                    (None, format!("not reissued: {why}"))
                }
            };
            self.conn
                .prepare_cached("UPDATE displaced_changes SET reissued_seq = ?2, outcome = ?3 WHERE id = ?1")?
                .execute(params![set_aside.row, seq, outcome])?;
        }
        self.move_ticket_counter_past(numbers.keys())?;
        self.held_back.remove(origin);
        self.refused.remove(origin);
        self.log_recovery(peer, origin, &report)?;
        Ok(report)
    }

    /// The payload this till holds for its own `origin`'s change `seq`.
    fn held_own_payload(&self, origin: &PosId, seq: Seq) -> Result<Option<String>> {
        Ok(self
            .conn
            .prepare_cached(
                "SELECT c.payload FROM sync_changes c JOIN sync_origins o ON o.idx = c.origin
                 WHERE o.pos_id = ?1 AND c.seq = ?2",
            )?
            .query_row(params![origin.as_str(), seq.0 as i64], |row| row.get(0))
            .optional()?)
    }

    /// The k of the next `<posId>-r<k>`: past every recovery this till made and every such
    /// origin it has heard of (a copy restored from an older backup may have made one).
    fn next_recovery_number(&self) -> Result<u64> {
        let made =
            meta::node_value(&self.conn, RECOVERIES)?.and_then(|raw| raw.parse::<u64>().ok()).unwrap_or(0);
        let prefix = format!("{}-r", self.identity.pos_id);
        let mut seen = 0;
        let mut statement = self.conn.prepare_cached("SELECT pos_id FROM sync_origins")?;
        for pos_id in statement.query_map([], |row| row.get::<_, String>(0))? {
            if let Some(k) = pos_id?.strip_prefix(&prefix).and_then(|k| k.parse::<u64>().ok()) {
                seen = seen.max(k);
            }
        }
        made.max(seen)
            .checked_add(1)
            .ok_or_else(|| RecoveryError::NoNewOrigin("too many recoveries".into()).into())
    }

    /// Moves this till's own changes of `origin` from `first` on out of the change log into
    /// `displaced_changes`, and forgets what they recorded beyond the entity tables (the
    /// version vector's entry, a key, a revocation). Returns them in seq order.
    fn set_aside(
        &mut self,
        origin: &PosId,
        first: Seq,
        peer: PeerRef<'_>,
        k: u64,
        new_origin: &PosId,
    ) -> Result<Vec<Displaced>> {
        let origin_idx = self.origins.idx(&self.conn, origin)?;
        let rows: Vec<(i64, String, String, String)> = self
            .conn
            .prepare_cached(
                "SELECT seq, entity_type, entity_id, payload FROM sync_changes
                 WHERE origin = ?1 AND seq >= ?2 ORDER BY seq",
            )?
            .query_map(params![origin_idx, first.0 as i64], |row| {
                Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
            })?
            .collect::<rusqlite::Result<_>>()?;
        let now = self.now_rfc3339();
        let mut displaced = Vec::with_capacity(rows.len());
        for (seq, entity_type, entity_id, payload) in rows {
            let seq = Seq(seq as u64);
            let wire: WireChange = serde_json::from_str(&payload)
                .map_err(|err| StoreError::Corrupt(format!("sync_changes {origin}/{seq}: {err}")))?;
            if Change::from_wire(&wire).is_ok_and(|change| change.copy_of.is_some()) {
                return Err(RecoveryError::HeadOfficeCopy { origin: origin.clone(), seq }.into());
            }
            self.conn
                .prepare_cached(
                    "INSERT INTO displaced_changes (recovery, origin, seq, entity_type, entity_id, payload,
                                                    displaced_by, displaced_at, new_origin, outcome)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, 'pending')",
                )?
                .execute(params![
                    k as i64,
                    origin.as_str(),
                    seq.0 as i64,
                    entity_type,
                    entity_id,
                    payload,
                    peer.id,
                    now,
                    new_origin.as_str()
                ])?;
            displaced.push(Displaced { row: self.conn.last_insert_rowid(), seq, payload, wire });
        }
        self.conn
            .prepare_cached("DELETE FROM sync_changes WHERE origin = ?1 AND seq >= ?2")?
            .execute(params![origin_idx, first.0 as i64])?;
        let kept = Seq(first.0 - 1);
        self.conn
            .prepare_cached("UPDATE sync_vv SET seq = ?2 WHERE origin = ?1")?
            .execute(params![origin_idx, kept.0 as i64])?;
        self.vv =
            self.vv.iter().map(|(pos, seq)| (pos.clone(), if pos == origin { kept } else { seq })).collect();
        self.vv_dirty.retain(|(idx, _)| *idx != origin_idx);
        self.conn
            .prepare_cached("DELETE FROM terminal_keys WHERE pos_id = ?1 AND since_seq >= ?2")?
            .execute(params![origin.as_str(), first.0 as i64])?;
        self.conn
            .prepare_cached(
                "DELETE FROM terminal_revocations WHERE revoked_by = ?1 AND revoked_by_seq >= ?2",
            )?
            .execute(params![origin.as_str(), first.0 as i64])?;
        self.keyring = keys::Keyring::load(&self.conn)?;
        Ok(displaced)
    }

    /// Rebuilds the entity tables (records with their sync metadata, tickets, movements and
    /// cached stock) from the change log: empties them, then merges every change held (not
    /// the rejected ones), in log order, through the merge every remote change goes through.
    /// Writes no audit row. Returns how many changes were replayed.
    pub(crate) fn rebuild_by_replay(&mut self) -> Result<u64> {
        for table in DERIVED_TABLES {
            self.conn.execute(&format!("DELETE FROM {table}"), [])?;
        }
        let mut after = 0i64;
        let mut replayed = 0u64;
        loop {
            let rows: Vec<(i64, String)> = self
                .conn
                .prepare_cached(
                    "SELECT log_id, payload FROM sync_changes WHERE rejected = 0 AND log_id > ?1
                     ORDER BY log_id LIMIT 512",
                )?
                .query_map([after], |row| Ok((row.get(0)?, row.get(1)?)))?
                .collect::<rusqlite::Result<_>>()?;
            let Some((last, _)) = rows.last() else { break };
            after = *last;
            for (log_id, payload) in rows {
                let corrupt =
                    |err: String| StoreError::Corrupt(format!("sync_changes log_id {log_id}: {err}"));
                let wire: WireChange =
                    serde_json::from_str(&payload).map_err(|err| corrupt(err.to_string()))?;
                let change = Change::from_wire(&wire).map_err(|err| corrupt(err.to_string()))?;
                self.merge_change(&change)?;
                replayed += 1;
            }
        }
        Ok(replayed)
    }

    /// From now on this till writes as `new_origin`, its k-th recovery (persisted).
    fn switch_writing_origin(&mut self, k: u64, new_origin: PosId) -> Result<()> {
        if !self.own_origins.contains(&new_origin) {
            self.own_origins.push(new_origin.clone());
        }
        self.writing_origin = new_origin;
        let own: Vec<&str> = self.own_origins.iter().map(PosId::as_str).collect();
        let own = serde_json::to_string(&own).map_err(|err| StoreError::Corrupt(err.to_string()))?;
        meta::set_node_value(&self.conn, RECOVERIES, &k.to_string())?;
        meta::set_node_value(&self.conn, WRITING_ORIGIN, self.writing_origin.as_str())?;
        meta::set_node_value(&self.conn, OWN_ORIGINS, &own)
    }

    /// Reloads what a failed recovery may have changed in memory and not in the database.
    fn reload_own_state(&mut self) -> Result<()> {
        let (writing, own) = load_own_origins(&self.conn, &self.identity.pos_id)?;
        self.writing_origin = writing;
        self.own_origins = own;
        self.keyring = keys::Keyring::load(&self.conn)?;
        Ok(())
    }

    /// The ticket numbers of this till's tickets, with the ticket holding each (numbers
    /// carry the till's prefix, so another till's tickets cannot hold one).
    fn own_ticket_numbers(&self) -> Result<HashMap<String, String>> {
        let mut statement =
            self.conn.prepare_cached("SELECT ticket_number, id FROM tickets WHERE pos_id = ?1")?;
        let rows =
            statement.query_map([self.identity.pos_id.as_str()], |row| Ok((row.get(0)?, row.get(1)?)))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Moves the ticket counter past every one of this till's numbers among `numbers`
    /// (`…<prefix>-<counter>`), so that no later sale takes one of them again.
    fn move_ticket_counter_past<'a>(&mut self, numbers: impl Iterator<Item = &'a String>) -> Result<()> {
        let prefix = self.identity.ticket_prefix.as_str();
        let highest = numbers
            .filter_map(|number| {
                let (head, counter) = number.rsplit_once('-')?;
                let ours =
                    head == prefix || head.strip_suffix(prefix).is_some_and(|rest| rest.ends_with('-'));
                ours.then(|| counter.parse::<u64>().ok()).flatten()
            })
            .max()
            .unwrap_or(0);
        let counter = meta::node_value(&self.conn, "ticket_counter")?
            .and_then(|raw| raw.parse::<u64>().ok())
            .unwrap_or(0);
        if highest > counter {
            meta::set_node_value(&self.conn, "ticket_counter", &highest.to_string())?;
        }
        Ok(())
    }

    /// Re-issues one set-aside change as a local change of the origin the till now writes
    /// as, stamped now; its effect goes through the merge, as on every peer.
    fn reissue(
        &mut self,
        origin: &PosId,
        set_aside: &Displaced,
        numbers: &mut HashMap<String, String>,
        report: &mut OwnHistoryRecovery,
    ) -> Result<Fate> {
        if self.held_own_payload(origin, set_aside.seq)?.as_deref() == Some(set_aside.payload.as_str()) {
            return Ok(Fate::TakenBack);
        }
        let change = match Change::from_wire(&set_aside.wire) {
            Ok(change) => change,
            Err(err) => return Ok(Fate::Dropped(format!("it cannot be read: {err}"))),
        };
        let kind = change.entity;
        let id = change.id.clone();
        let (body, ctx, newest) = match change.body {
            ChangeBody::Sale(mut sale) => {
                if self.ticket_exists(&id)? {
                    return Ok(Fate::Dropped(format!("ticket {id} is recorded already")));
                }
                if numbers.get(&sale.ticket_number).is_some_and(|holder| holder != id.as_str()) {
                    let fresh = self.next_ticket_number()?;
                    report.renumbered.push(Renumbered {
                        ticket: id.clone(),
                        printed: std::mem::replace(&mut sale.ticket_number, fresh.clone()),
                        now: fresh,
                    });
                }
                numbers.insert(sale.ticket_number.clone(), id.to_string());
                (ChangeBody::Sale(sale), Default::default(), None)
            }
            ChangeBody::Movement { count, movement } => {
                if self.is_live(EntityKind::Stock, &id)? {
                    return Ok(Fate::Dropped(format!("movement {id} is recorded already")));
                }
                (ChangeBody::Movement { count, movement }, Default::default(), None)
            }
            ChangeBody::Upsert { create, fields } => {
                let state = records::load(&self.conn, &self.origins, kind, &id)?;
                let (state, create) = match state {
                    Some(state) if state.deleted => {
                        return Ok(Fate::Dropped(format!("{kind} {id} is deleted since")));
                    }
                    Some(state) => (state, false),
                    None if create => (RecordState::default(), true),
                    None => return Ok(Fate::Dropped(format!("{kind} {id} is not held"))),
                };
                if !kind.allows_record_action(if create { "create" } else { "update" }) {
                    return Ok(Fate::Dropped(format!("{kind} {id} exists already and cannot be edited")));
                }
                let newest = state.newest().cloned();
                (ChangeBody::Upsert { create, fields }, state.ctx, newest)
            }
            ChangeBody::Delete => match records::load(&self.conn, &self.origins, kind, &id)? {
                Some(state) if !state.deleted => {
                    let newest = state.newest().cloned();
                    (ChangeBody::Delete, state.ctx, newest)
                }
                _ => return Ok(Fate::Dropped(format!("{kind} {id} is deleted already"))),
            },
            ChangeBody::TicketStatus { action, fields, returns } => {
                let Some(state) = records::load(&self.conn, &self.origins, EntityKind::Ticket, &id)? else {
                    return Ok(Fate::Dropped(format!("ticket {id} is not held")));
                };
                match self.ticket_status_now(&id, &state, action, &returns)? {
                    Err(why) => return Ok(Fate::Dropped(why)),
                    Ok(status) => {
                        let mut fields = fields;
                        fields.insert("status", json!(status.as_str()));
                        let newest = state.newest().cloned();
                        (ChangeBody::TicketStatus { action, fields, returns }, state.ctx, newest)
                    }
                }
            }
            ChangeBody::Enroll { .. } => {
                return Ok(Fate::Dropped(
                    "an enrollment of the old origin (the new origin enrolled itself)".into(),
                ));
            }
            ChangeBody::Revoke { until_seq, reason } => {
                let Ok(revoked) = PosId::parse(id.as_str()) else {
                    return Ok(Fate::Dropped(format!("{id} is not a posId")));
                };
                if self.is_own_origin(&revoked) {
                    return Ok(Fate::Dropped("a till does not revoke itself".into()));
                }
                let body = ChangeBody::Revoke { until_seq, reason: reason.clone() };
                let new = self.emit_local(EntityKind::Terminal, &id, body, &Default::default(), None)?;
                let by = self.writing_origin.clone();
                self.record_revocation(&revoked, until_seq, &by, new.seq, reason.as_deref())?;
                return Ok(Fate::Reissued(new.seq));
            }
        };
        let new = self.emit_local(kind, &id, body, &ctx, newest.as_ref())?;
        self.merge_change(&new)?;
        Ok(Fate::Reissued(new.seq))
    }

    /// The status a refund or cancellation gives ticket `id` now, or why it cannot be made
    /// now (the same rules as a refund or cancellation asked for at the till).
    fn ticket_status_now(
        &self,
        id: &EntityId,
        state: &RecordState,
        action: TicketAction,
        returns: &[possync_core::entity::StockMovement],
    ) -> Result<std::result::Result<TicketStatus, String>> {
        let status = state.values.get("status").and_then(serde_json::Value::as_str).unwrap_or_default();
        let allowed =
            matches!((action, status), (_, "completed") | (TicketAction::Refund, "partially_refunded"));
        if !allowed {
            return Ok(Err(format!("ticket {id} is {status} since")));
        }
        for movement in returns {
            if self.is_live(EntityKind::Stock, &movement.id)? {
                return Ok(Err(format!("movement {} is recorded already", movement.id)));
            }
        }
        let remaining = self.refundable(id)?;
        let mut wanted: BTreeMap<&EntityId, Decimal> = BTreeMap::new();
        for movement in returns {
            *wanted.entry(&movement.product_id).or_insert(Decimal::ZERO) += movement.quantity;
        }
        for (product, quantity) in &wanted {
            let left = remaining.get(*product).copied().unwrap_or_default();
            if *quantity > left {
                return Ok(Err(format!("only {left} of product {product} is left to refund on ticket {id}")));
            }
        }
        let left_after = remaining
            .iter()
            .filter(|(product, left)| {
                **left - wanted.get(product).copied().unwrap_or_default() > Decimal::ZERO
            })
            .count();
        Ok(Ok(match action {
            TicketAction::Cancel => TicketStatus::Cancelled,
            TicketAction::Refund if left_after == 0 => TicketStatus::Refunded,
            TicketAction::Refund => TicketStatus::PartiallyRefunded,
        }))
    }

    /// The recovery's audit row.
    fn log_recovery(&mut self, peer: PeerRef<'_>, origin: &PosId, report: &OwnHistoryRecovery) -> Result<()> {
        let log = SyncLog {
            peer_id: peer.id,
            peer_name: Some(peer.name),
            message_type: "recovery",
            message_action: "own_history",
            entity_type: None,
            entity_id: None,
        };
        let first = report.first_displaced.map_or(0, |seq| seq.0);
        let new_origin = report.new_origin.as_ref().map_or("", PosId::as_str);
        let reissued = match report.reissued_seqs {
            Some((from, to)) => format!("re-issued {} as {new_origin} {from}..{to}", report.reissued),
            None => format!("none re-issued; now writing as {new_origin}"),
        };
        let reason = format!(
            "recovered: {} own changes from seq {first} of {origin} displaced by {}'s copies; {reissued}",
            report.displaced, peer.name
        );
        let details = json!({
            "origin": origin,
            "firstDisplaced": first,
            "displaced": report.displaced,
            "reissued": report.reissued,
            "takenBack": report.taken_back,
            "notReissued": report.not_reissued,
            "renumbered": report.renumbered.iter().map(|renumbered| json!({
                "ticket": renumbered.ticket, "printed": renumbered.printed, "now": renumbered.now
            })).collect::<Vec<_>>(),
            "newOrigin": new_origin,
            "reissuedSeqs": report.reissued_seqs.map(|(from, to)| json!([from, to])),
        })
        .to_string();
        self.log_sync(&log, SyncStatus::Success, Some(&reason), None, Some(&details))
    }
}

/// `data.id` of a wire change, for messages.
fn entity_id_of(wire: &WireChange) -> String {
    wire.data_object()
        .ok()
        .and_then(|data| data.get("id").and_then(serde_json::Value::as_str).map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

#[cfg(test)]
mod tests {
    use possync_core::entity::{MovementType, PaymentMethod};
    use rust_decimal::Decimal;
    use serde_json::{Value, json};

    use super::*;
    use crate::sales::{PaymentRequest, RefundLine, SaleLineRequest, SaleRequest};
    use crate::{Store, SystemEnvironment};

    fn till(dir: &tempfile::TempDir, name: &str) -> Store {
        let env = Box::new(SystemEnvironment::default());
        Store::init(&dir.path().join(format!("{name}.db")), Some(PosId::parse(name).unwrap()), name, env)
            .unwrap()
    }

    /// Moves everything `to` lacks from `from`.
    fn sync(from: &Store, to: &mut Store) {
        let changes =
            from.reader().unwrap().select_changes(&to.summary().clone(), 0, 100_000).unwrap().changes;
        to.apply_batch(PeerRef { id: "peer", name: "peer" }, changes).unwrap();
    }

    /// Every row of every table the merge writes, sync metadata and cached stock included.
    fn derived_rows(store: &Store) -> Vec<Value> {
        let reader = store.reader().unwrap();
        DERIVED_TABLES
            .iter()
            .map(|table| json!({table.to_string(): reader.query_json(&format!("SELECT * FROM {table} ORDER BY 1, 2")).unwrap()}))
            .collect()
    }

    fn sale(product: &str, quantity: i64) -> SaleRequest {
        SaleRequest {
            id: None,
            customer_id: None,
            lines: vec![SaleLineRequest {
                product_id: EntityId::parse(product).unwrap(),
                quantity: Decimal::from(quantity),
                unit_price: None,
                discount_rate: None,
            }],
            payments: vec![PaymentRequest {
                method: PaymentMethod::Cash,
                amount: Decimal::from(1000),
                reference: None,
            }],
            notes: Some("counter".into()),
        }
    }

    #[test]
    fn replaying_an_untouched_log_rebuilds_the_same_state() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = till(&dir, "a");
        let mut b = till(&dir, "b");
        let tea = EntityId::parse("tea").unwrap();
        a.create_record(EntityKind::Category, &json!({"id": "drinks", "name": "Drinks"})).unwrap();
        a.create_record(
            EntityKind::Product,
            &json!({"id": "tea", "sku": "T1", "name": "Tea", "price": 2, "categoryId": "drinks"}),
        )
        .unwrap();
        a.create_record(EntityKind::Product, &json!({"id": "cake", "sku": "C1", "name": "Cake", "price": 4}))
            .unwrap();
        a.create_record(EntityKind::Customer, &json!({"id": "ann", "name": "Ann"})).unwrap();
        a.count_stock(&tea, Decimal::from(50), Some("count")).unwrap();
        let sold = a.record_sale(&sale("tea", 3)).unwrap();
        let sold_id = EntityId::parse(sold["id"].as_str().unwrap()).unwrap();
        let refund = [RefundLine { product_id: tea.clone(), quantity: Decimal::ONE }];
        a.refund_ticket(&sold_id, Some(&refund), Some("spilt")).unwrap();
        let cancelled = a.record_sale(&sale("cake", 1)).unwrap();
        a.cancel_ticket(&EntityId::parse(cancelled["id"].as_str().unwrap()).unwrap(), None).unwrap();
        sync(&a, &mut b);
        // Concurrent edits (a conflict on each side), a delete, movements on both tills.
        a.update_record(EntityKind::Product, &tea, &json!({"price": 3})).unwrap();
        b.update_record(EntityKind::Product, &tea, &json!({"price": 5, "name": "Green tea"})).unwrap();
        b.delete_record(EntityKind::Customer, &EntityId::parse("ann").unwrap()).unwrap();
        b.adjust_stock(&tea, Decimal::from(-2), MovementType::Out, None).unwrap();
        b.record_sale(&sale("cake", 2)).unwrap();
        sync(&b, &mut a);
        sync(&a, &mut b);
        assert_eq!(
            a.reader().unwrap().canonical_dump().unwrap(),
            b.reader().unwrap().canonical_dump().unwrap()
        );

        for store in [&mut a, &mut b] {
            let rows = derived_rows(store);
            let dump = store.reader().unwrap().canonical_dump().unwrap();
            let logs = store.reader().unwrap().query_json("SELECT COUNT(*) AS n FROM p2p_sync_logs").unwrap();
            let replayed = store.write(false, |store| store.rebuild_by_replay()).unwrap();
            assert!(replayed > 10, "{replayed}");
            assert_eq!(store.reader().unwrap().canonical_dump().unwrap(), dump);
            assert_eq!(derived_rows(store), rows, "sync metadata and stock too");
            let after =
                store.reader().unwrap().query_json("SELECT COUNT(*) AS n FROM p2p_sync_logs").unwrap();
            assert_eq!(after, logs, "the replay writes no audit row");
        }
    }
}
