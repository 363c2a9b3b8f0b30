//! Sync metadata kept beside each mutable record, and the origin table.
//!
//! A record's [`RecordState`] (field versions, existence, causal context) is stored in one
//! compact JSON column, `sync_meta`, on the record's own row, so that reading or writing a
//! record is one row access. Terminals are numbered locally (`sync_origins`) so a version is
//! `[hlc, origin_idx, seq]` rather than a 36-byte UUID, and the versions are grouped: a record
//! created in one write carries a single version with a bitmask of the fields it set.
//!
//! Format: `{"v": [[hlc|null, origin, seq, fieldmask], ...], "x": [hlc|null, origin, seq, deleted], "c": [[origin, seq], ...]}`.

use std::collections::HashMap;

use possync_core::{EntityKind, Hlc, PosId, RecordState, Seq, Version, VersionVector};
use rusqlite::{Connection, OptionalExtension, params};
use serde_json::{Value, json};

use crate::error::{Result, StoreError};

/// The local numbering of origin terminals, cached in memory.
#[derive(Debug, Default)]
pub(crate) struct Origins {
    by_pos: HashMap<PosId, i64>,
    by_idx: HashMap<i64, PosId>,
}

impl Origins {
    /// Loads the table.
    pub(crate) fn load(conn: &Connection) -> Result<Origins> {
        let mut origins = Origins::default();
        let mut statement = conn.prepare("SELECT idx, pos_id FROM sync_origins")?;
        let rows = statement.query_map([], |row| Ok((row.get::<_, i64>(0)?, row.get::<_, String>(1)?)))?;
        for row in rows {
            let (idx, pos) = row?;
            let pos = PosId::parse(pos).map_err(|err| StoreError::Corrupt(format!("sync_origins: {err}")))?;
            origins.by_pos.insert(pos.clone(), idx);
            origins.by_idx.insert(idx, pos);
        }
        Ok(origins)
    }

    /// The local number of `pos`, registering it if new (inside the caller's transaction: the
    /// caller reloads the cache if that transaction rolls back).
    pub(crate) fn idx(&mut self, conn: &Connection, pos: &PosId) -> Result<i64> {
        if let Some(idx) = self.by_pos.get(pos) {
            return Ok(*idx);
        }
        conn.execute("INSERT INTO sync_origins (pos_id) VALUES (?1)", params![pos.as_str()])?;
        let idx = conn.last_insert_rowid();
        self.by_pos.insert(pos.clone(), idx);
        self.by_idx.insert(idx, pos.clone());
        Ok(idx)
    }

    /// The terminal numbered `idx`.
    pub(crate) fn pos(&self, idx: i64) -> Result<&PosId> {
        self.by_idx.get(&idx).ok_or_else(|| StoreError::Corrupt(format!("unknown origin number {idx}")))
    }
}

fn hlc_json(hlc: Option<Hlc>) -> Value {
    hlc.map_or(Value::Null, |hlc| json!(hlc.to_i64()))
}

/// Encodes a record's sync metadata.
pub(crate) fn encode(
    kind: EntityKind,
    state: &RecordState,
    origins: &mut Origins,
    conn: &Connection,
) -> Result<String> {
    let mut groups: Vec<(Version, u64)> = Vec::new();
    for (bit, spec) in kind.fields().iter().enumerate() {
        let Some(version) = state.versions.get(spec.name) else { continue };
        match groups.iter_mut().find(|(grouped, _)| grouped == version) {
            Some((_, mask)) => *mask |= 1 << bit,
            None => groups.push((version.clone(), 1 << bit)),
        }
    }
    let mut versions = Vec::with_capacity(groups.len());
    for (version, mask) in groups {
        versions.push(json!([
            hlc_json(version.hlc),
            origins.idx(conn, &version.origin)?,
            version.seq.0,
            mask
        ]));
    }
    let existence = match &state.existence {
        Some(version) => json!([
            hlc_json(version.hlc),
            origins.idx(conn, &version.origin)?,
            version.seq.0,
            u8::from(state.deleted)
        ]),
        None => Value::Null,
    };
    let mut ctx = Vec::new();
    for (pos, seq) in state.ctx.iter() {
        ctx.push(json!([origins.idx(conn, pos)?, seq.0]));
    }
    Ok(json!({"v": versions, "x": existence, "c": ctx}).to_string())
}

/// Decodes a record's sync metadata; the values are filled in by the caller.
pub(crate) fn decode(kind: EntityKind, raw: &str, origins: &Origins) -> Result<RecordState> {
    let corrupt = |what: &str| {
        StoreError::Corrupt(format!("sync_meta {what}: {}", raw.chars().take(200).collect::<String>()))
    };
    let value: Value = serde_json::from_str(raw).map_err(|_| corrupt("is not JSON"))?;
    let mut state = RecordState::default();
    let version_of = |entry: &Value| -> Result<(Version, u64)> {
        let hlc = match entry.get(0) {
            Some(Value::Null) => None,
            Some(raw) => {
                Some(raw.as_i64().and_then(|raw| Hlc::from_i64(raw).ok()).ok_or_else(|| corrupt("hlc"))?)
            }
            None => return Err(corrupt("version")),
        };
        let origin = entry.get(1).and_then(Value::as_i64).ok_or_else(|| corrupt("origin"))?;
        let seq = entry.get(2).and_then(Value::as_u64).ok_or_else(|| corrupt("seq"))?;
        let extra = entry.get(3).and_then(Value::as_u64).ok_or_else(|| corrupt("mask"))?;
        Ok((Version { hlc, origin: origins.pos(origin)?.clone(), seq: Seq(seq) }, extra))
    };
    for entry in value.get("v").and_then(Value::as_array).ok_or_else(|| corrupt("v"))? {
        let (version, mask) = version_of(entry)?;
        for (bit, spec) in kind.fields().iter().enumerate() {
            if mask & (1 << bit) != 0 {
                state.versions.insert(spec.name, version.clone());
            }
        }
    }
    if let Some(entry) = value.get("x").filter(|entry| !entry.is_null()) {
        let (version, deleted) = version_of(entry)?;
        state.deleted = deleted != 0;
        state.existence = Some(version);
    }
    let mut ctx = VersionVector::new();
    for entry in value.get("c").and_then(Value::as_array).ok_or_else(|| corrupt("c"))? {
        let origin = entry.get(0).and_then(Value::as_i64).ok_or_else(|| corrupt("ctx origin"))?;
        let seq = entry.get(1).and_then(Value::as_u64).ok_or_else(|| corrupt("ctx seq"))?;
        ctx.observe(origins.pos(origin)?, Seq(seq));
    }
    state.ctx = ctx;
    Ok(state)
}

/// Reads a `node_meta` value.
pub(crate) fn node_value(conn: &Connection, key: &str) -> Result<Option<String>> {
    Ok(conn.query_row("SELECT value FROM node_meta WHERE key = ?1", [key], |row| row.get(0)).optional()?)
}

/// Writes a `node_meta` value.
pub(crate) fn set_node_value(conn: &Connection, key: &str, value: &str) -> Result<()> {
    conn.execute(
        "INSERT INTO node_meta (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        params![key, value],
    )?;
    Ok(())
}
