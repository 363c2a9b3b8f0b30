//! Change selection for catch-up: given what a peer holds (its version vector), the changes
//! it lacks, in this node's log order (causal, so the peer can apply them as they come), in
//! batches, resumable from a cursor. Nothing here compares wall clocks.

use std::collections::HashMap;

use possync_core::protocol::MAX_BATCH_BYTES;
use possync_core::{PosId, Seq, VersionVector, WireChange};
use rusqlite::Connection;

use crate::error::{Result, StoreError};

/// One batch of changes for a peer.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Selection {
    /// The changes, in log order.
    pub changes: Vec<WireChange>,
    /// Pass this back as `after_cursor` for the next batch.
    pub next_cursor: u64,
    /// True when more changes may follow.
    pub has_more: bool,
}

/// Selects up to `limit` changes the holder of `since` lacks, after log position
/// `after_cursor` (0 to start) and up to position `up_to` (the whole log when `None`). A
/// batch also stops before its changes pass [`MAX_BATCH_BYTES`] (it always holds at least
/// one), so that its frame fits what every peer accepts however large the changes are.
pub(crate) fn select_changes(
    conn: &Connection,
    since: &VersionVector,
    after_cursor: u64,
    limit: usize,
    up_to: Option<u64>,
) -> Result<Selection> {
    let limit = limit.max(1);
    let up_to = up_to.map_or(i64::MAX, |up_to| i64::try_from(up_to).unwrap_or(i64::MAX));
    // Local origin numbers and how far the peer already is for each.
    let mut known: HashMap<i64, Seq> = HashMap::new();
    let mut starts: Vec<i64> = Vec::new();
    {
        let mut origins = conn.prepare_cached("SELECT idx, pos_id FROM sync_origins")?;
        let mut first_missing =
            conn.prepare_cached("SELECT MIN(log_id) FROM sync_changes WHERE origin = ?1 AND seq > ?2")?;
        for row in origins.query_map([], |row| Ok((row.get::<_, i64>(0)?, row.get::<_, String>(1)?)))? {
            let (idx, pos) = row?;
            let pos = PosId::parse(pos).map_err(|err| StoreError::Corrupt(format!("sync_origins: {err}")))?;
            let seq = since.get(&pos);
            known.insert(idx, seq);
            if after_cursor == 0 {
                let first: Option<i64> =
                    first_missing.query_row(rusqlite::params![idx, seq.0 as i64], |row| row.get(0))?;
                starts.extend(first);
            }
        }
    }
    let mut cursor = if after_cursor == 0 {
        match starts.iter().min() {
            Some(first) => first - 1,
            None => return Ok(Selection { changes: Vec::new(), next_cursor: 0, has_more: false }),
        }
    } else {
        i64::try_from(after_cursor).unwrap_or(i64::MAX)
    };
    let mut changes = Vec::with_capacity(limit);
    let mut bytes = 0usize;
    let chunk = (limit * 2).max(256) as i64;
    let mut scan = conn.prepare_cached(
        "SELECT log_id, origin, seq, payload FROM sync_changes WHERE log_id > ?1 AND log_id <= ?3 ORDER BY log_id LIMIT ?2",
    )?;
    loop {
        let mut rows = scan.query(rusqlite::params![cursor, chunk, up_to])?;
        let mut seen = 0i64;
        while let Some(row) = rows.next()? {
            seen += 1;
            let log_id: i64 = row.get(0)?;
            let origin: i64 = row.get(1)?;
            let seq: i64 = row.get(2)?;
            if Seq(seq as u64) > known.get(&origin).copied().unwrap_or_default() {
                let corrupt = |err: &dyn std::fmt::Display| {
                    StoreError::Corrupt(format!("sync_changes {log_id}: {err}"))
                };
                let payload = row.get_ref(3)?.as_str().map_err(|err| corrupt(&err))?;
                if !changes.is_empty() && bytes + payload.len() > MAX_BATCH_BYTES {
                    // Full by size: this change opens the next batch.
                    return Ok(Selection { changes, next_cursor: cursor as u64, has_more: true });
                }
                bytes += payload.len();
                let change: WireChange = serde_json::from_str(payload).map_err(|err| corrupt(&err))?;
                changes.push(change);
            }
            cursor = log_id;
            if changes.len() == limit {
                let has_more = rows.next()?.is_some() || more_after(conn, cursor, up_to)?;
                return Ok(Selection { changes, next_cursor: cursor as u64, has_more });
            }
        }
        if seen < chunk {
            return Ok(Selection { changes, next_cursor: cursor as u64, has_more: false });
        }
    }
}

fn more_after(conn: &Connection, cursor: i64, up_to: i64) -> Result<bool> {
    Ok(conn
        .prepare_cached("SELECT EXISTS (SELECT 1 FROM sync_changes WHERE log_id > ?1 AND log_id <= ?2)")?
        .query_row([cursor, up_to], |row| row.get(0))?)
}
