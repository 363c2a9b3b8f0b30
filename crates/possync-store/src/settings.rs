//! The `settings` table (SPEC section 3), typed and validated, cached by the store so the
//! sync path never queries it.

use possync_core::Strategy;
use rusqlite::{Connection, params};
use serde::Serialize;

use crate::error::{Result, StoreError};
use crate::schema::DEFAULT_SETTINGS;

/// The settings, parsed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Settings {
    /// `p2p_enabled`: peer-to-peer sync on or off.
    pub enabled: bool,
    /// `p2p_auto_sync`: catch up with every peer on connect.
    pub auto_sync: bool,
    /// `p2p_conflict_resolution`.
    pub strategy: Strategy,
    /// `p2p_heartbeat_interval`, in ms.
    pub heartbeat_interval_ms: u64,
    /// `p2p_reconnect_max_attempts`.
    pub reconnect_max_attempts: u32,
    /// `p2p_sync_batch_size`.
    pub batch_size: usize,
    /// `p2p_log_retention_days`.
    pub log_retention_days: u32,
    /// `p2p_max_clock_ahead`, in ms: a remote change stamped further ahead of this
    /// terminal's clock is held back (not applied, logged, alerted) until the clock catches
    /// up. See docs/DESIGN.md, "Clocks".
    pub max_clock_ahead_ms: u64,
    /// `p2p_peer_max_changes_per_second`: changes a peer may push live per second (bursts
    /// of ten seconds' worth pass at once); faster, the connection reads its frames no faster
    /// than that. Catch-up batches are paced by the protocol (asked for, acknowledged) and
    /// not counted. See docs/DESIGN.md, "A peer that floods".
    pub peer_max_changes_per_second: u32,
    /// `pos_require_cash_session`: a sale needs an open cash session on its till (off by
    /// default, so that tills that do not count cash keep selling).
    pub require_cash_session: bool,
}

/// The default of `p2p_peer_max_changes_per_second`: far above what people at a till write,
/// far below a script flooding the shop with records.
pub const DEFAULT_PEER_MAX_CHANGES_PER_SECOND: u32 = 1_000;

/// The default of `p2p_max_clock_ahead`: one hour, far above the drift of a till whose clock
/// is set by hand, far below a poisoned or mistyped date.
pub const DEFAULT_MAX_CLOCK_AHEAD_MS: u64 = 60 * 60 * 1000;

/// The largest `p2p_max_clock_ahead` accepted (366 days).
pub const MAX_CLOCK_AHEAD_LIMIT_MS: u64 = 366 * 24 * 60 * 60 * 1000;

/// One row of the settings table, as the API lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SettingRow {
    /// The key.
    pub key: String,
    /// The value, as text.
    pub value: String,
    /// boolean, number or string.
    #[serde(rename = "type")]
    pub kind: String,
    /// What it does.
    pub description: String,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            enabled: true,
            auto_sync: true,
            strategy: Strategy::LastWriteWins,
            heartbeat_interval_ms: 30_000,
            reconnect_max_attempts: 10,
            batch_size: 100,
            log_retention_days: 30,
            max_clock_ahead_ms: DEFAULT_MAX_CLOCK_AHEAD_MS,
            peer_max_changes_per_second: DEFAULT_PEER_MAX_CHANGES_PER_SECOND,
            require_cash_session: false,
        }
    }
}

fn parse_bool(key: &str, value: &str) -> Result<bool> {
    match value {
        "true" | "1" => Ok(true),
        "false" | "0" => Ok(false),
        _ => Err(StoreError::BadSetting(format!("{key} must be true or false, not {value:?}"))),
    }
}

fn parse_number<T: std::str::FromStr + PartialOrd + std::fmt::Display>(
    key: &str,
    value: &str,
    min: T,
    max: T,
) -> Result<T> {
    match value.trim().parse::<T>() {
        Ok(number) if number >= min && number <= max => Ok(number),
        _ => {
            Err(StoreError::BadSetting(format!("{key} must be a number from {min} to {max}, not {value:?}")))
        }
    }
}

impl Settings {
    /// Applies one key/value to the parsed settings (validating it).
    pub fn apply(&mut self, key: &str, value: &str) -> Result<()> {
        match key {
            "p2p_enabled" => self.enabled = parse_bool(key, value)?,
            "p2p_auto_sync" => self.auto_sync = parse_bool(key, value)?,
            "p2p_conflict_resolution" => self.strategy = value.parse().map_err(StoreError::BadSetting)?,
            "p2p_heartbeat_interval" => {
                self.heartbeat_interval_ms = parse_number(key, value, 100, 3_600_000)?
            }
            "p2p_reconnect_max_attempts" => {
                self.reconnect_max_attempts = parse_number(key, value, 0, 1_000_000)?
            }
            "p2p_sync_batch_size" => self.batch_size = parse_number(key, value, 1, 10_000)?,
            "p2p_log_retention_days" => self.log_retention_days = parse_number(key, value, 1, 36_500)?,
            "p2p_max_clock_ahead" => {
                self.max_clock_ahead_ms = parse_number(key, value, 1_000, MAX_CLOCK_AHEAD_LIMIT_MS)?
            }
            "p2p_peer_max_changes_per_second" => {
                self.peer_max_changes_per_second = parse_number(key, value, 1, 1_000_000)?
            }
            "pos_require_cash_session" => self.require_cash_session = parse_bool(key, value)?,
            _ => return Err(StoreError::BadSetting(format!("unknown setting {key:?}"))),
        }
        Ok(())
    }

    /// Reads the settings table.
    pub(crate) fn load(conn: &Connection) -> Result<Settings> {
        let mut settings = Settings::default();
        for row in rows(conn)? {
            if DEFAULT_SETTINGS.iter().any(|(key, ..)| *key == row.key) {
                settings.apply(&row.key, &row.value)?;
            }
        }
        Ok(settings)
    }
}

/// Writes the default settings (at init; existing keys are kept).
pub(crate) fn insert_defaults(conn: &Connection) -> Result<()> {
    for (key, value, kind, description) in DEFAULT_SETTINGS {
        conn.execute(
            "INSERT OR IGNORE INTO settings (key, value, type, description) VALUES (?1, ?2, ?3, ?4)",
            params![key, value, kind, description],
        )?;
    }
    Ok(())
}

/// Every row of the settings table.
pub(crate) fn rows(conn: &Connection) -> Result<Vec<SettingRow>> {
    let mut statement =
        conn.prepare("SELECT key, value, type, COALESCE(description, '') FROM settings ORDER BY key")?;
    let rows = statement.query_map([], |row| {
        Ok(SettingRow { key: row.get(0)?, value: row.get(1)?, kind: row.get(2)?, description: row.get(3)? })
    })?;
    Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
}
