//! Timestamp formats: RFC 3339 with milliseconds for JSON, and SQLite's `YYYY-MM-DD HH:MM:SS`
//! for the audit tables' `created_at` (so that `datetime('now', '-1 hour')` compares right).
//! One format per column; conversions live here and nowhere else.

use chrono::{DateTime, SecondsFormat, Utc};

/// `2025-11-23T10:05:00.123Z` for the given Unix milliseconds.
pub fn rfc3339_ms(unix_ms: u64) -> String {
    to_datetime(unix_ms).to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// `2025-11-23 10:05:00` (UTC) for the given Unix milliseconds, as SQLite's `datetime()` writes.
pub fn sqlite_datetime(unix_ms: u64) -> String {
    to_datetime(unix_ms).format("%Y-%m-%d %H:%M:%S").to_string()
}

/// Parses an RFC 3339 timestamp (any offset) into Unix milliseconds; `None` if malformed or
/// before 1970.
pub fn parse_rfc3339_ms(raw: &str) -> Option<u64> {
    let parsed = DateTime::parse_from_rfc3339(raw).ok()?;
    u64::try_from(parsed.timestamp_millis()).ok()
}

/// Whether `text` is `YYYY-MM-DD` naming a real calendar day (`2025-13-45` has the shape
/// and names no day).
pub fn is_date(text: &str) -> bool {
    let bytes = text.as_bytes();
    let shaped = bytes.len() == 10
        && bytes
            .iter()
            .enumerate()
            .all(|(i, byte)| if i == 4 || i == 7 { *byte == b'-' } else { byte.is_ascii_digit() });
    shaped && parse_rfc3339_ms(&format!("{text}T00:00:00Z")).is_some()
}

fn to_datetime(unix_ms: u64) -> DateTime<Utc> {
    let ms = i64::try_from(unix_ms).unwrap_or(i64::MAX);
    DateTime::<Utc>::from_timestamp_millis(ms).unwrap_or(DateTime::<Utc>::MAX_UTC)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        let ms = parse_rfc3339_ms("2025-11-23T10:05:00.123Z").unwrap();
        assert_eq!(rfc3339_ms(ms), "2025-11-23T10:05:00.123Z");
        assert_eq!(sqlite_datetime(ms), "2025-11-23 10:05:00");
        assert_eq!(parse_rfc3339_ms("2025-11-23T11:05:00.123+01:00"), Some(ms));
        assert_eq!(parse_rfc3339_ms("yesterday"), None);
    }

    #[test]
    fn dates() {
        assert!(is_date("2026-11-25"));
        for bad in ["2026-1-25", "2026/11/25", "", "2026-11-25T", "abcd-ef-gh", "2025-13-45", "2026-02-30"] {
            assert!(!is_date(bad), "{bad}");
        }
    }
}
