//! What the chain of stores keeps in a node's database (docs/CHAIN.md).
//!
//! The backbone moves the same changes as the LAN, so applying them is `apply_batch`'s work;
//! this module only adds what a chain needs around it:
//!
//! - on a store's till, the cursor of the head office's DOWN stream (`chain_cursor`),
//!   advanced in the same transaction as the changes it delivered, so a crash between the
//!   two can only make the till read a message again (a no-op: apply is idempotent by
//!   (origin, seq)); and the head office's origins (`chain_hq_origins`), which a till never
//!   uploads;
//! - at the head office, which store every origin belongs to (`chain_origins`, learnt from
//!   the subject a message came on), so it can show stock and sales per store;
//! - per-origin change selection for the uploader ([`StoreReader::origin_changes`]).
//!
//! Stock per store is the sum of the movements whose origin terminal belongs to the store:
//! a movement is written by the till that sold, and `stock_movements.pos_id` is that till.

use std::collections::BTreeMap;

use possync_core::{Change, CopyOf, PosId, Seq, WireChange, decimal};

use crate::Outgoing;
use rusqlite::{OptionalExtension, params};
use rust_decimal::Decimal;
use serde_json::{Value, json};

use crate::apply::{Accept, ApplyReport, CopySource, PeerRef, entries_of, with_stamps};
use crate::error::{Result, StoreError};
use crate::keys::Verified;
use crate::{Store, StoreReader};

/// One store's run of one origin's changes, as the head office ingests it.
#[derive(Debug)]
pub struct ChainRun {
    /// The store it came from (the subject it was published on).
    pub store: String,
    /// The origin.
    pub origin: PosId,
    /// The changes, in seq order.
    pub changes: Vec<WireChange>,
    /// Their signatures, when the task that received them checked them
    /// ([`crate::KeyDirectory::verify`]); `None`: checked by the writer.
    pub verified: Option<Verified>,
}

impl Store {
    /// Sets (or clears) the chain store this till belongs to: its ticket numbers then start
    /// with the store id (`<store>-<till prefix>-<counter>`), unique across the chain.
    pub fn set_chain_store(&mut self, store: Option<String>) {
        self.identity.chain_store = store;
    }

    /// Head office: applies a run of changes received from store `store_id` (one durable
    /// transaction, with the usual audit rows, peer `store <id>`), and records that the
    /// run's origin belongs to that store. Product and category writes are refused (logged
    /// as errors, kept in the log as rejected): the catalog is the head office's.
    pub fn apply_chain_batch(
        &mut self,
        store_id: &str,
        origin: &PosId,
        changes: Vec<WireChange>,
    ) -> Result<ApplyReport> {
        self.write(true, |store| store.apply_chain_run(store_id, origin, changes, None))
    }

    /// Head office: several stores' runs, each as [`Store::apply_chain_batch`] would, in ONE
    /// durable transaction (one fsync for all: the ingest applies the messages the consumer
    /// has already delivered together). One report per run, in order. On error nothing is
    /// kept.
    pub fn apply_chain_batches(&mut self, runs: Vec<ChainRun>) -> Result<Vec<ApplyReport>> {
        self.write(true, |store| {
            runs.into_iter()
                .map(|run| store.apply_chain_run(&run.store, &run.origin, run.changes, run.verified))
                .collect()
        })
    }

    fn apply_chain_run(
        &mut self,
        store_id: &str,
        origin: &PosId,
        changes: Vec<WireChange>,
        verified: Option<Verified>,
    ) -> Result<ApplyReport> {
        let peer_id = format!("store:{store_id}");
        let peer_name = format!("store {store_id}");
        let received = changes.len() as i64;
        let mut report = ApplyReport::default();
        let peer = PeerRef { id: &peer_id, name: &peer_name };
        let changes = with_stamps(changes);
        let verified = verified.unwrap_or_else(|| self.preverify(&entries_of(&changes)));
        for (index, (stamp, wire)) in changes.into_iter().enumerate() {
            self.apply_one(peer, stamp, wire, Accept::FromStore, verified.key(index), &mut report)?;
        }
        let now = self.now_sqlite();
        self.conn
            .prepare_cached(
                "INSERT INTO chain_origins (pos_id, store_id, first_seen_at, last_received_at, changes_received, changes_applied)
                 VALUES (?1, ?2, ?3, ?3, ?4, ?5)
                 ON CONFLICT (pos_id) DO UPDATE SET last_received_at = excluded.last_received_at,
                     changes_received = changes_received + excluded.changes_received,
                     changes_applied = changes_applied + excluded.changes_applied",
            )?
            .execute(params![origin.as_str(), store_id, now, received, i64::from(report.applied + report.conflicts)])?;
        Ok(report)
    }

    /// Store till: applies a run of the head office's changes read at stream sequence
    /// `stream_seq` of `stream`, and advances the stream's cursor in the same durable
    /// transaction, unless the run met a gap or a change held back for its clock stamp (then
    /// the cursor stays, and the caller reads again from it).
    pub fn apply_chain_down(
        &mut self,
        stream: &str,
        stream_seq: u64,
        origin: &PosId,
        changes: Vec<WireChange>,
    ) -> Result<ApplyReport> {
        self.write(true, |store| {
            let mut report = ApplyReport::default();
            let peer = PeerRef { id: "hq", name: "head office" };
            // Known before the run applies: its copies are accepted only from the head office.
            store
                .conn
                .prepare_cached("INSERT INTO chain_hq_origins (pos_id) VALUES (?1) ON CONFLICT DO NOTHING")?
                .execute([origin.as_str()])?;
            let changes = with_stamps(changes);
            let verified = store.preverify(&entries_of(&changes));
            for (index, (stamp, wire)) in changes.into_iter().enumerate() {
                store.apply_one(peer, stamp, wire, Accept::Everything, verified.key(index), &mut report)?;
            }
            if !report.gap && !report.must_retry() {
                store.set_cursor(stream, stream_seq)?;
            }
            Ok(report)
        })
    }

    /// Head office: re-publishes a store's customer write, just merged, as a change of its
    /// own origin that every store can apply (docs/CHAIN.md "Chain-wide customers"): the
    /// same record, fields, clock time and context, with `copyOf` naming the original.
    /// Stores never hold each other's origins; they hold the head office's, so the copy
    /// reaches them on the DOWN stream, and merges there as the original would (same
    /// version, same context), so every node ranks it the same. Not merged here again: the
    /// original already was. Called in the transaction that merged the original, so a store
    /// write is held at the head office if and only if its copy is.
    pub(crate) fn copy_to_stores(&mut self, original: &Change) -> Result<()> {
        if !self.is_enrolled() {
            self.enroll()?;
        }
        let own = self.writing_origin.clone();
        let seq = self.vv.get(&own).next();
        let copy = Change {
            origin: own,
            seq,
            hlc: original.hlc,
            ctx: original.ctx.clone(),
            entity: original.entity,
            id: original.id.clone(),
            body: original.body.clone(),
            copy_of: Some(CopyOf { origin: original.origin.clone(), seq: original.seq }),
        };
        let mut wire = copy.to_wire();
        self.sign(&mut wire);
        self.append_change(
            &copy.origin,
            seq,
            copy.hlc,
            copy.entity.as_str(),
            copy.id.as_str(),
            &wire,
            false,
        )?;
        self.outbox.push(Outgoing { change: wire });
        Ok(())
    }

    /// Whether this node applies copies made by `origin` (see [`CopySource`]).
    pub(crate) fn copy_source(&self, origin: &PosId) -> Result<CopySource> {
        let head_office: bool = self
            .conn
            .prepare_cached("SELECT EXISTS (SELECT 1 FROM chain_hq_origins WHERE pos_id = ?1)")?
            .query_row([origin.as_str()], |row| row.get(0))?;
        Ok(if head_office {
            CopySource::HeadOffice
        } else if self.identity.chain_store.is_some() {
            CopySource::NotKnownYet
        } else {
            CopySource::Refused
        })
    }

    /// The highest seq of `origin` that a copy held here re-published (0: none).
    pub(crate) fn copied_up_to(&self, origin: &PosId) -> Result<Seq> {
        let seq: Option<i64> = self
            .conn
            .prepare_cached("SELECT seq FROM chain_copied WHERE pos_id = ?1")?
            .query_row([origin.as_str()], |row| row.get(0))
            .optional()?;
        Ok(Seq(seq.unwrap_or(0).max(0) as u64))
    }

    /// Records that a copy of `copy_of` is held here.
    pub(crate) fn note_copied(&mut self, copy_of: &CopyOf) -> Result<()> {
        self.conn
            .prepare_cached(
                "INSERT INTO chain_copied (pos_id, seq) VALUES (?1, ?2)
                 ON CONFLICT (pos_id) DO UPDATE SET seq = MAX(seq, excluded.seq)",
            )?
            .execute(params![copy_of.origin.as_str(), copy_of.seq.0 as i64])?;
        Ok(())
    }

    /// Sets a stream's cursor (0: read the stream from its start).
    pub fn set_chain_cursor(&mut self, stream: &str, stream_seq: u64) -> Result<()> {
        self.write(false, |store| store.set_cursor(stream, stream_seq))
    }

    /// Records origins the head office publishes (a till never uploads them).
    pub fn note_chain_hq_origins(&mut self, origins: &[PosId]) -> Result<()> {
        self.write(false, |store| {
            for origin in origins {
                store
                    .conn
                    .prepare_cached(
                        "INSERT INTO chain_hq_origins (pos_id) VALUES (?1) ON CONFLICT DO NOTHING",
                    )?
                    .execute([origin.as_str()])?;
            }
            Ok(())
        })
    }

    fn set_cursor(&self, stream: &str, stream_seq: u64) -> Result<()> {
        self.conn
            .prepare_cached(
                "INSERT INTO chain_cursor (stream, seq) VALUES (?1, ?2)
                 ON CONFLICT (stream) DO UPDATE SET seq = excluded.seq",
            )?
            .execute(params![stream, stream_seq as i64])?;
        Ok(())
    }
}

impl StoreReader {
    /// The cursor of `stream` (the stream sequence of the last message applied; 0: none).
    pub fn chain_cursor(&self, stream: &str) -> Result<u64> {
        let seq: Option<i64> = self
            .conn
            .query_row("SELECT seq FROM chain_cursor WHERE stream = ?1", [stream], |row| row.get(0))
            .optional()?;
        Ok(seq.unwrap_or(0).max(0) as u64)
    }

    /// The clock time (Unix ms) of the oldest of the changes `(origin, seq)` held here with
    /// a clock stamp (the age of an uplink's backlog).
    pub fn oldest_change_ms(&self, changes: &[(PosId, Seq)]) -> Result<Option<u64>> {
        let mut statement = self.conn.prepare_cached(
            "SELECT c.hlc FROM sync_changes c JOIN sync_origins o ON o.idx = c.origin
             WHERE o.pos_id = ?1 AND c.seq = ?2",
        )?;
        let mut oldest: Option<u64> = None;
        for (origin, seq) in changes {
            let hlc: Option<Option<i64>> =
                statement.query_row(params![origin.as_str(), seq.0 as i64], |row| row.get(0)).optional()?;
            if let Some(hlc) = hlc.flatten() {
                let hlc = possync_core::Hlc::from_i64(hlc)
                    .map_err(|err| StoreError::Corrupt(format!("sync_changes {origin}/{seq}: {err}")))?;
                oldest = Some(oldest.map_or(hlc.ms(), |oldest| oldest.min(hlc.ms())));
            }
        }
        Ok(oldest)
    }

    /// The head office's origins this till has seen.
    pub fn chain_hq_origins(&self) -> Result<Vec<PosId>> {
        let mut statement =
            self.conn.prepare_cached("SELECT pos_id FROM chain_hq_origins ORDER BY pos_id")?;
        let rows = statement.query_map([], |row| row.get::<_, String>(0))?;
        let mut origins = Vec::new();
        for row in rows {
            origins.push(
                PosId::parse(row?).map_err(|err| StoreError::Corrupt(format!("chain_hq_origins: {err}")))?,
            );
        }
        Ok(origins)
    }

    /// `origin`'s changes after seq `after`, in seq order, at most `limit` (what the
    /// uploader publishes as one run). Rejected changes are included: they hold their seq,
    /// and every receiver rejects them the same way.
    pub fn origin_changes(&self, origin: &PosId, after: Seq, limit: usize) -> Result<Vec<WireChange>> {
        let mut statement = self.conn.prepare_cached(
            "SELECT c.seq, c.payload FROM sync_changes c JOIN sync_origins o ON o.idx = c.origin
             WHERE o.pos_id = ?1 AND c.seq > ?2 ORDER BY c.seq LIMIT ?3",
        )?;
        let mut rows = statement.query(params![origin.as_str(), after.0 as i64, limit as i64])?;
        let mut changes = Vec::new();
        while let Some(row) = rows.next()? {
            let seq: i64 = row.get(0)?;
            let payload = row.get_ref(1)?.as_str().map_err(|err| StoreError::Corrupt(err.to_string()))?;
            let change: WireChange = serde_json::from_str(payload)
                .map_err(|err| StoreError::Corrupt(format!("sync_changes {origin}/{seq}: {err}")))?;
            changes.push(change);
        }
        Ok(changes)
    }

    /// Head office: every store, with its origins (terminals), when it last sent changes,
    /// how many it sent, how many tickets, and its tickets and sales per UTC day from day
    /// `since_day` (`YYYY-MM-DD`) on. Each terminal's tickets are read through the
    /// `(pos_id, created_at)` index from that day only, so the answer costs the days asked
    /// for, not the chain's whole history (the head office's dashboard asks every 5 s).
    pub fn chain_stores(&self, since_day: &str) -> Result<Vec<Value>> {
        let origins = self.origins_by_store()?;
        let mut stores = Vec::new();
        for (store_id, members) in &origins {
            let mut last_received: Option<String> = None;
            let mut last_unix: Option<i64> = None;
            let mut received = 0i64;
            let mut applied = 0i64;
            let mut terminals = Vec::new();
            for member in members {
                let (at, unix, count, kept): (String, Option<i64>, i64, i64) = self.conn.query_row(
                    "SELECT last_received_at, CAST(strftime('%s', last_received_at) AS INTEGER),
                            changes_received, changes_applied
                     FROM chain_origins WHERE pos_id = ?1",
                    [member],
                    |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?)),
                )?;
                last_unix = last_unix.max(unix);
                received += count;
                applied += kept;
                if last_received.as_ref().is_none_or(|last| *last < at) {
                    last_received = Some(at.clone());
                }
                terminals.push(json!({"posId": member, "lastReceivedAt": at, "changesReceived": count}));
            }
            let mut days: BTreeMap<String, (i64, Decimal)> = BTreeMap::new();
            let mut tickets = 0i64;
            let mut per_day = self.conn.prepare_cached(
                "SELECT substr(created_at, 1, 10), total_amount FROM tickets
                 WHERE pos_id = ?1 AND created_at >= ?2 AND status != 'cancelled'",
            )?;
            let mut count = self
                .conn
                .prepare_cached("SELECT COUNT(*) FROM tickets WHERE pos_id = ?1 AND status != 'cancelled'")?;
            for member in members {
                tickets += count.query_row([member], |row| row.get::<_, i64>(0))?;
                for row in per_day.query_map(params![member, since_day], |row| {
                    Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?))
                })? {
                    let (day, total) = row?;
                    let total = decimal::parse_stored(&total)
                        .map_err(|err| StoreError::Corrupt(format!("ticket total: {err}")))?;
                    let entry = days.entry(day).or_insert((0, Decimal::ZERO));
                    entry.0 += 1;
                    entry.1 += total;
                }
            }
            let sales: Vec<Value> = days
                .into_iter()
                .map(|(day, (count, total))| json!({"day": day, "tickets": count, "total": decimal::to_text(total)}))
                .collect();
            stores.push(json!({
                "storeId": store_id,
                "terminals": terminals,
                "lastReceivedAt": last_received,
                "lastReceivedUnix": last_unix,
                "changesReceived": received,
                "changesApplied": applied,
                "tickets": tickets,
                "salesPerDay": sales,
            }));
        }
        Ok(stores)
    }

    /// Head office: stock of `product_id` per store (sum of the movements made by the
    /// store's terminals) and for the whole chain (every movement, the head office's own
    /// included).
    pub fn chain_stock(&self, product_id: &str) -> Result<Value> {
        let mut per_origin: BTreeMap<String, Decimal> = BTreeMap::new();
        let mut statement =
            self.conn.prepare_cached("SELECT pos_id, quantity FROM stock_movements WHERE product_id = ?1")?;
        for row in statement
            .query_map([product_id], |row| Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?)))?
        {
            let (pos_id, quantity) = row?;
            let quantity = decimal::parse_stored(&quantity)
                .map_err(|err| StoreError::Corrupt(format!("movement quantity: {err}")))?;
            *per_origin.entry(pos_id).or_default() += quantity;
        }
        let mut total = Decimal::ZERO;
        let mut stores = Vec::new();
        for (store_id, members) in self.origins_by_store()? {
            let stock: Decimal = members.iter().filter_map(|member| per_origin.get(member)).sum();
            stores.push(json!({"storeId": store_id, "stock": decimal::to_text(stock)}));
        }
        for quantity in per_origin.values() {
            total += quantity;
        }
        Ok(json!({"productId": product_id, "stores": stores, "total": decimal::to_text(total)}))
    }

    /// Head office: the store an origin belongs to, if it was seen.
    pub fn chain_origin_store(&self, origin: &PosId) -> Result<Option<String>> {
        Ok(self
            .conn
            .query_row("SELECT store_id FROM chain_origins WHERE pos_id = ?1", [origin.as_str()], |row| {
                row.get(0)
            })
            .optional()?)
    }

    /// Store id -> its origins, from `chain_origins`.
    fn origins_by_store(&self) -> Result<BTreeMap<String, Vec<String>>> {
        let mut statement = self
            .conn
            .prepare_cached("SELECT store_id, pos_id FROM chain_origins ORDER BY store_id, pos_id")?;
        let mut stores: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for row in statement.query_map([], |row| Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?)))? {
            let (store, origin) = row?;
            stores.entry(store).or_default().push(origin);
        }
        Ok(stores)
    }
}
