//! Helpers shared by the store's integration tests: terminals on temporary files, a manual
//! clock, and a sync step that moves what one terminal lacks from another.

#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use possync_core::PosId;
use possync_store::{ApplyReport, Environment, PeerRef, Store};
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use serde_json::Value;

/// A clock the test moves by hand, shared by the terminals of one test.
#[derive(Clone, Debug)]
pub struct ManualClock(pub Arc<AtomicU64>);

impl ManualClock {
    pub fn new(start_ms: u64) -> ManualClock {
        ManualClock(Arc::new(AtomicU64::new(start_ms)))
    }

    pub fn advance(&self, ms: u64) {
        self.0.fetch_add(ms, Ordering::SeqCst);
    }
}

/// A deterministic environment: the shared clock plus a per-terminal skew, a seeded RNG.
pub struct TestEnv {
    pub clock: ManualClock,
    pub skew_ms: i64,
    pub rng: StdRng,
}

impl Environment for TestEnv {
    fn now_ms(&self) -> u64 {
        (self.clock.0.load(Ordering::SeqCst) as i64 + self.skew_ms).max(0) as u64
    }

    fn random_bytes(&mut self) -> [u8; 10] {
        let mut bytes = [0u8; 10];
        self.rng.fill_bytes(&mut bytes);
        bytes
    }
}

pub struct Terminal {
    pub name: String,
    pub path: PathBuf,
    pub store: Store,
}

impl Terminal {
    pub fn pos_id(&self) -> PosId {
        self.store.identity().pos_id.clone()
    }

    pub fn dump(&self) -> String {
        self.store.reader().unwrap().canonical_dump().unwrap()
    }

    pub fn query(&self, sql: &str) -> Vec<Value> {
        self.store.reader().unwrap().query_json(sql).unwrap()
    }

    pub fn count(&self, sql: &str) -> i64 {
        self.query(sql)[0].as_object().unwrap().values().next().unwrap().as_i64().unwrap()
    }
}

pub fn env(clock: &ManualClock, skew_ms: i64, seed: u64) -> Box<TestEnv> {
    Box::new(TestEnv { clock: clock.clone(), skew_ms, rng: StdRng::seed_from_u64(seed) })
}

pub fn terminal(dir: &tempfile::TempDir, name: &str, clock: &ManualClock, skew_ms: i64) -> Terminal {
    let path = dir.path().join(format!("{name}.db"));
    let seed = name.bytes().fold(7u64, |acc, b| acc.wrapping_mul(31).wrapping_add(u64::from(b)));
    let store =
        Store::init(&path, Some(PosId::parse(name).unwrap()), name, env(clock, skew_ms, seed)).unwrap();
    Terminal { name: name.to_string(), path, store }
}

/// Moves everything `to` lacks from `from`, in batches of `batch`, like a catch-up.
pub fn sync(from: &mut Terminal, to: &mut Terminal, batch: usize) -> ApplyReport {
    let mut total = ApplyReport::default();
    let since = to.store.summary().clone();
    let reader = from.store.reader().unwrap();
    let mut cursor = 0;
    loop {
        let selection = reader.select_changes(&since, cursor, batch).unwrap();
        let peer = PeerRef { id: from.name.as_str(), name: from.name.as_str() };
        let report = to.store.apply_batch(peer, selection.changes).unwrap();
        total.applied += report.applied;
        total.conflicts += report.conflicts;
        total.skipped += report.skipped;
        total.errors += report.errors;
        total.gap |= report.gap;
        total.held_back += report.held_back;
        total.waiting += report.waiting;
        total.forged += report.forged;
        total.forks += report.forks;
        total.retry_at_ms = total.retry_at_ms.or(report.retry_at_ms);
        cursor = selection.next_cursor;
        if !selection.has_more {
            break;
        }
    }
    from.store.drain_outbox();
    to.store.drain_outbox();
    total
}
