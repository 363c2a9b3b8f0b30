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
use serde_json::Value;

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

/// Encodes a record's sync metadata.
///
/// Written straight into the text (only integers, no strings to escape) rather than through a
/// `serde_json::Value` tree: this runs for every record written, remote applies included, and
/// building and printing the tree took over 40% of this function's instructions (callgrind,
/// docs/BENCHMARKS.md). The text is exactly what `serde_json` prints for the same object (keys
/// in its sorted order `c`, `v`, `x`), which `decode` reads.
pub(crate) fn encode(
    kind: EntityKind,
    state: &RecordState,
    origins: &mut Origins,
    conn: &Connection,
) -> Result<String> {
    let mut groups: Vec<(&Version, u64)> = Vec::new();
    for (bit, spec) in kind.fields().iter().enumerate() {
        let Some(version) = state.versions.get(spec.name) else { continue };
        match groups.iter_mut().find(|(grouped, _)| *grouped == version) {
            Some((_, mask)) => *mask |= 1 << bit,
            None => groups.push((version, 1 << bit)),
        }
    }
    // Origins are numbered in the order v, x, c (a new one is registered on first use).
    let mut numbered = Vec::with_capacity(groups.len());
    for (version, mask) in groups {
        numbered.push((version, origins.idx(conn, &version.origin)?, mask));
    }
    let existence = match &state.existence {
        Some(version) => Some((version, origins.idx(conn, &version.origin)?)),
        None => None,
    };
    let mut ctx = Vec::new();
    for (pos, seq) in state.ctx.iter() {
        ctx.push((origins.idx(conn, pos)?, seq.0));
    }
    let mut out = String::with_capacity(32 + 40 * numbered.len() + 12 * ctx.len());
    out.push_str("{\"c\":[");
    for (i, (origin, seq)) in ctx.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        write_text(&mut out, format_args!("[{origin},{seq}]"));
    }
    out.push_str("],\"v\":[");
    for (i, (version, origin, mask)) in numbered.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        write_version(&mut out, version, origin, mask);
    }
    out.push_str("],\"x\":");
    match existence {
        Some((version, origin)) => write_version(&mut out, version, origin, u64::from(state.deleted)),
        None => out.push_str("null"),
    }
    out.push('}');
    Ok(out)
}

/// `[hlc|null, origin, seq, extra]`.
fn write_version(out: &mut String, version: &Version, origin: i64, extra: u64) {
    match version.hlc {
        Some(hlc) => write_text(out, format_args!("[{},", hlc.to_i64())),
        None => out.push_str("[null,"),
    }
    write_text(out, format_args!("{origin},{},{extra}]", version.seq.0));
}

fn write_text(out: &mut String, args: std::fmt::Arguments<'_>) {
    use std::fmt::Write as _;
    // Invariant: writing to a String cannot fail (its `fmt::Write` impl always returns Ok).
    out.write_fmt(args).expect("writing to a String");
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

#[cfg(test)]
mod tests {
    use possync_core::Hlc;
    use serde_json::json;

    use super::*;

    fn origins_db() -> Connection {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(
            "CREATE TABLE sync_origins (idx INTEGER PRIMARY KEY, pos_id TEXT NOT NULL UNIQUE)",
        )
        .unwrap();
        conn
    }

    fn version(hlc: Option<u64>, origin: &PosId, seq: u64) -> Version {
        Version { hlc: hlc.map(|ms| Hlc::new(ms, 3).unwrap()), origin: origin.clone(), seq: Seq(seq) }
    }

    /// The hand-written text is what serde_json prints for the same object, and reads back.
    #[test]
    fn encode_matches_serde_json_and_round_trips() {
        let conn = origins_db();
        let mut origins = Origins::default();
        let a = PosId::parse("pos-a").unwrap();
        let b = PosId::parse("pos-b").unwrap();
        let mut state = RecordState::default();
        let fields = EntityKind::Product.fields();
        state.versions.insert(fields[0].name, version(Some(1_700_000_000_000), &a, 1));
        state.versions.insert(fields[2].name, version(Some(1_700_000_000_000), &a, 1));
        state.versions.insert(fields[3].name, version(None, &b, 7));
        state.existence = Some(version(Some(1_700_000_000_500), &b, 8));
        state.deleted = true;
        state.ctx.observe(&a, Seq(1));
        state.ctx.observe(&b, Seq(8));

        let text = encode(EntityKind::Product, &state, &mut origins, &conn).unwrap();

        let hlc = |ms: u64| Hlc::new(ms, 3).unwrap().to_i64();
        let expected = json!({
            "v": [[hlc(1_700_000_000_000), 1, 1, 0b101], [null, 2, 7, 0b1000]],
            "x": [hlc(1_700_000_000_500), 2, 8, 1],
            "c": [[1, 1], [2, 8]],
        })
        .to_string();
        assert_eq!(text, expected);
        assert_eq!(decode(EntityKind::Product, &text, &origins).unwrap(), state);

        let empty = encode(EntityKind::Category, &RecordState::default(), &mut origins, &conn).unwrap();
        assert_eq!(empty, json!({"v": [], "x": null, "c": []}).to_string());
    }
}
