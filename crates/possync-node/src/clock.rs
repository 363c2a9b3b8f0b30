//! The wall clock, read in one place: Unix time in milliseconds. The sans-IO parts (the
//! protocol session, the link, the store's merge) are handed times; the tokio side reads
//! them here.

/// Unix time in ms, from the system clock (the only place the node reads it).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX))
}
