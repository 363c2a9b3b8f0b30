//! Whole-workload benchmarks of the store, each against a raw-SQLite baseline measured in the
//! same run (see docs/BENCHMARKS.md).
//!
//! `cargo bench -p possync-store --bench engine`
//!
//! Environment:
//! - `POSSYNC_BENCH_RUNS` (default 5): runs per workload; engine and baseline are interleaved
//!   within a run (their order alternates from run to run) and medians are reported.
//! - `POSSYNC_BENCH_SCALE` (default 1.0): multiplies every size (1.0 = 100,000 changes,
//!   sales or products); CI runs a smoke version with e.g. 0.01.
//! - `POSSYNC_BENCH_WORKLOADS` (default `apply,sales,catchup,metadata`): which to run.
//! - `POSSYNC_BENCH_DIR` (default the system temp dir): where the timed databases live.
//! - `POSSYNC_BENCH_PREP_DIR` (default `/dev/shm` when present, else the system temp dir):
//!   where the untimed source stores are built (their local writes fsync every commit).
//!
//! Every figure is a ratio to its baseline from the same run: wall time, and CPU time of the
//! (single) benchmark thread, read from `/proc/thread-self/schedstat` when available.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use possync_core::entity::{FieldType, PaymentMethod, Sale};
use possync_core::{Change, ChangeBody, EntityId, EntityKind, PosId, VersionVector, WireChange, decimal};
use possync_store::{ApplyReport, Environment, PaymentRequest, PeerRef, SaleLineRequest, SaleRequest, Store};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use rusqlite::types::Value as SqlValue;
use rusqlite::{Connection, params, params_from_iter};
use rust_decimal::Decimal;
use serde_json::{Value, json};

// ---------------------------------------------------------------------------------------------
// Configuration, timing, statistics

struct Config {
    runs: usize,
    scale: f64,
    workloads: Vec<String>,
    dir: PathBuf,
    prep_dir: PathBuf,
}

impl Config {
    fn from_env() -> Config {
        let runs = std::env::var("POSSYNC_BENCH_RUNS").ok().and_then(|raw| raw.parse().ok()).unwrap_or(5);
        let scale = std::env::var("POSSYNC_BENCH_SCALE").ok().and_then(|raw| raw.parse().ok()).unwrap_or(1.0);
        let workloads = std::env::var("POSSYNC_BENCH_WORKLOADS")
            .unwrap_or_else(|_| "apply,sales,catchup,metadata".into())
            .split(',')
            .map(|name| name.trim().to_string())
            .filter(|name| !name.is_empty())
            .collect();
        let dir = std::env::var_os("POSSYNC_BENCH_DIR").map_or_else(std::env::temp_dir, PathBuf::from);
        let prep_dir = std::env::var_os("POSSYNC_BENCH_PREP_DIR").map_or_else(
            || {
                let shm = Path::new("/dev/shm");
                if shm.is_dir() { shm.to_path_buf() } else { std::env::temp_dir() }
            },
            PathBuf::from,
        );
        Config { runs: usize::max(runs, 1), scale, workloads, dir, prep_dir }
    }

    /// A size scaled by `POSSYNC_BENCH_SCALE`, at least `min`.
    fn size(&self, full: usize, min: usize) -> usize {
        ((full as f64 * self.scale).round() as usize).max(min)
    }

    fn wants(&self, workload: &str) -> bool {
        self.workloads.iter().any(|name| name == workload)
    }
}

/// CPU time of this thread, if the kernel tells.
fn thread_cpu() -> Option<Duration> {
    let raw = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    raw.split_whitespace().next()?.parse().ok().map(Duration::from_nanos)
}

/// One timed measurement: wall time and thread CPU time.
#[derive(Debug, Clone, Copy)]
struct Sample {
    wall: Duration,
    cpu: Option<Duration>,
}

fn timed(body: impl FnOnce()) -> Sample {
    let cpu_before = thread_cpu();
    let start = Instant::now();
    body();
    let wall = start.elapsed();
    let cpu = match (cpu_before, thread_cpu()) {
        (Some(before), Some(after)) => Some(after.saturating_sub(before)),
        _ => None,
    };
    Sample { wall, cpu }
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    if n % 2 == 1 { sorted[n / 2] } else { (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0 }
}

fn min_max(values: &[f64]) -> (f64, f64) {
    values.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(*v), hi.max(*v)))
}

/// Samples of one series (engine or a baseline) over the runs.
#[derive(Default)]
struct Series {
    samples: Vec<Sample>,
}

impl Series {
    fn walls(&self) -> Vec<f64> {
        self.samples.iter().map(|s| s.wall.as_secs_f64()).collect()
    }

    fn cpus(&self) -> Option<Vec<f64>> {
        self.samples.iter().map(|s| s.cpu.map(|cpu| cpu.as_secs_f64())).collect()
    }

    fn describe(&self, label: &str, items: usize) {
        let walls = self.walls();
        let (lo, hi) = min_max(&walls);
        let med = median(&walls);
        let cpu = self.cpus().map(|cpus| format!(", cpu median {:.3} s", median(&cpus))).unwrap_or_default();
        println!(
            "    {label:<28} wall median {med:.3} s [min {lo:.3}, max {hi:.3}] = {:.0} items/s{cpu}",
            items as f64 / med
        );
    }
}

/// How a workload's figure is read.
#[derive(Clone, Copy)]
enum Goal {
    /// Engine throughput / baseline throughput (baseline time / engine time) at least this.
    ThroughputAtLeast(f64),
    /// Engine time / baseline time at most this.
    TimeAtMost(f64),
    /// Engine time / baseline time, for information (no target).
    TimeRatio,
}

/// Per-run ratios of `engine` against `baseline`, and the verdict.
fn compare(name: &str, engine: &Series, baseline: &Series, goal: Option<Goal>) {
    let ratio = |e: f64, b: f64| match goal {
        Some(Goal::TimeAtMost(_) | Goal::TimeRatio) => e / b,
        _ => b / e,
    };
    let what = match goal {
        Some(Goal::TimeAtMost(_) | Goal::TimeRatio) => "time ratio engine/baseline",
        _ => "throughput ratio engine/baseline",
    };
    let walls: Vec<f64> = engine.walls().iter().zip(baseline.walls()).map(|(e, b)| ratio(*e, b)).collect();
    let (lo, hi) = min_max(&walls);
    let med = median(&walls);
    let verdict = match goal {
        Some(Goal::ThroughputAtLeast(target)) => {
            format!("target >= {target}: {}", if med >= target { "MET" } else { "MISSED" })
        }
        Some(Goal::TimeAtMost(target)) => {
            format!("target <= {target}: {}", if med <= target { "MET" } else { "MISSED" })
        }
        None | Some(Goal::TimeRatio) => "(informative)".into(),
    };
    let cpu = match (engine.cpus(), baseline.cpus()) {
        (Some(e), Some(b)) => {
            let cpus: Vec<f64> = e.iter().zip(b).map(|(e, b)| ratio(*e, b)).collect();
            let (lo, hi) = min_max(&cpus);
            format!("; cpu {:.3} [min {lo:.3}, max {hi:.3}]", median(&cpus))
        }
        _ => String::new(),
    };
    println!(
        "  RESULT {name}: {what} wall {med:.3} [min {lo:.3}, max {hi:.3}] over {} runs{cpu} -> {verdict}",
        walls.len()
    );
}

// ---------------------------------------------------------------------------------------------
// Stores and raw databases

/// Real clock, seeded randomness.
struct BenchEnv {
    rng: StdRng,
}

impl Environment for BenchEnv {
    fn now_ms(&self) -> u64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
    }

    fn random_bytes(&mut self) -> [u8; 10] {
        let mut bytes = [0u8; 10];
        self.rng.fill_bytes(&mut bytes);
        bytes
    }
}

/// A database file that is removed (with its WAL) when dropped.
struct DbFile(PathBuf);

impl DbFile {
    fn new(dir: &Path, name: &str) -> DbFile {
        let path = dir.join(format!("possync-bench-{}-{name}.db", std::process::id()));
        let file = DbFile(path);
        file.remove();
        file
    }

    fn remove(&self) {
        for suffix in ["", "-wal", "-shm"] {
            let mut name = self.0.clone().into_os_string();
            name.push(suffix);
            let _ = std::fs::remove_file(name);
        }
    }
}

impl Drop for DbFile {
    fn drop(&mut self) {
        self.remove();
    }
}

fn new_store(file: &DbFile, name: &str, seed: u64) -> Store {
    let env = Box::new(BenchEnv { rng: StdRng::seed_from_u64(seed) });
    Store::init(&file.0, Some(PosId::parse(name).expect("pos id")), name, env).expect("init store")
}

/// `changes` cut into owned batches of `batch` (as a connection decodes them), so that
/// copying them is not timed.
fn batches(changes: &[WireChange], batch: usize) -> Vec<Vec<WireChange>> {
    changes.chunks(batch).map(<[WireChange]>::to_vec).collect()
}

/// Applies the batches, checking that every change was applied.
fn apply_all(store: &mut Store, peer: &str, batches: Vec<Vec<WireChange>>) {
    let count: usize = batches.iter().map(Vec::len).sum();
    let mut total = ApplyReport::default();
    for chunk in batches {
        let report = store.apply_batch(PeerRef { id: peer, name: peer }, chunk).expect("apply batch");
        total.applied += report.applied;
        total.conflicts += report.conflicts;
        total.skipped += report.skipped;
        total.errors += report.errors;
        store.drain_outbox();
    }
    assert_eq!(total.applied as usize, count, "not all applied: {total:?}");
}

/// Every change `store` holds, in log order.
fn all_changes(store: &Store) -> Vec<WireChange> {
    let reader = store.reader().expect("reader");
    let since = VersionVector::new();
    let mut cursor = 0;
    let mut changes = Vec::new();
    loop {
        let selection = reader.select_changes(&since, cursor, 1000).expect("select");
        changes.extend(selection.changes);
        cursor = selection.next_cursor;
        if !selection.has_more {
            return changes;
        }
    }
}

/// The store's tables as an application without sync would have them: same columns (minus
/// `sync_meta`), same indexes.
const RAW_SCHEMA: &str = "
CREATE TABLE products (
    id            TEXT PRIMARY KEY,
    sku           TEXT,
    barcode       TEXT,
    name          TEXT,
    description   TEXT,
    category_id   TEXT,
    price         TEXT,
    cost          TEXT,
    discount_rate TEXT,
    stock         TEXT NOT NULL DEFAULT '0',
    min_stock     TEXT,
    max_stock     TEXT,
    unit          TEXT,
    is_active     INTEGER,
    image_url     TEXT,
    created_at    TEXT,
    updated_at    TEXT,
    deleted       INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX products_sku ON products(sku) WHERE deleted = 0;
CREATE INDEX products_barcode ON products(barcode) WHERE deleted = 0 AND barcode IS NOT NULL;
CREATE INDEX products_category ON products(category_id);
CREATE TABLE tickets (
    id              TEXT PRIMARY KEY,
    ticket_number   TEXT NOT NULL,
    pos_id          TEXT NOT NULL,
    customer_id     TEXT,
    subtotal        TEXT NOT NULL,
    discount_amount TEXT NOT NULL,
    total_amount    TEXT NOT NULL,
    status          TEXT NOT NULL,
    notes           TEXT,
    created_at      TEXT NOT NULL,
    updated_at      TEXT
);
CREATE INDEX tickets_created ON tickets(created_at);
CREATE INDEX tickets_pos ON tickets(pos_id, created_at);
CREATE TABLE ticket_lines (
    ticket_id       TEXT NOT NULL REFERENCES tickets(id),
    line_no         INTEGER NOT NULL,
    product_id      TEXT NOT NULL,
    product_name    TEXT NOT NULL,
    product_sku     TEXT NOT NULL,
    quantity        TEXT NOT NULL,
    unit_price      TEXT NOT NULL,
    discount_rate   TEXT NOT NULL,
    discount_amount TEXT NOT NULL,
    total_amount    TEXT NOT NULL,
    PRIMARY KEY (ticket_id, line_no)
) WITHOUT ROWID;
CREATE TABLE ticket_payments (
    ticket_id TEXT NOT NULL REFERENCES tickets(id),
    line_no   INTEGER NOT NULL,
    method    TEXT NOT NULL,
    amount    TEXT NOT NULL,
    reference TEXT,
    PRIMARY KEY (ticket_id, line_no)
) WITHOUT ROWID;
CREATE TABLE stock_movements (
    id         TEXT PRIMARY KEY,
    product_id TEXT NOT NULL,
    type       TEXT NOT NULL,
    quantity   TEXT NOT NULL,
    reference  TEXT,
    pos_id     TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE INDEX stock_movements_product ON stock_movements(product_id, created_at);
CREATE INDEX stock_movements_reference ON stock_movements(reference);
";

fn raw_db(file: &DbFile, synchronous: &str) -> Connection {
    let conn = Connection::open(&file.0).expect("open raw");
    conn.pragma_update(None, "journal_mode", "WAL").expect("wal");
    conn.pragma_update(None, "synchronous", synchronous).expect("synchronous");
    conn.execute_batch(RAW_SCHEMA).expect("raw schema");
    conn
}

/// The product columns the store's upsert writes, in order.
fn product_columns() -> Vec<&'static str> {
    std::iter::once("id")
        .chain(EntityKind::Product.fields().iter().map(|spec| spec.column))
        .chain(["updated_at", "deleted"])
        .collect()
}

fn raw_product_upsert() -> String {
    let columns = product_columns();
    let placeholders: Vec<String> = (1..=columns.len()).map(|i| format!("?{i}")).collect();
    let updates: Vec<String> = columns[1..].iter().map(|c| format!("{c} = excluded.{c}")).collect();
    format!(
        "INSERT INTO products ({}) VALUES ({}) ON CONFLICT(id) DO UPDATE SET {}",
        columns.join(", "),
        placeholders.join(", "),
        updates.join(", ")
    )
}

fn raw_product_insert() -> String {
    let columns = product_columns();
    let placeholders: Vec<String> = (1..=columns.len()).map(|i| format!("?{i}")).collect();
    format!("INSERT INTO products ({}) VALUES ({})", columns.join(", "), placeholders.join(", "))
}

/// The full product rows (as the store's upsert writes them) after each product change, in
/// order: what a raw application would write for the same changes.
fn product_rows(changes: &[WireChange]) -> Vec<Vec<SqlValue>> {
    let specs = EntityKind::Product.fields();
    let mut current: HashMap<String, Vec<SqlValue>> = HashMap::new();
    let mut rows = Vec::with_capacity(changes.len());
    for wire in changes {
        // The source's key enrollment (its first change) writes no product.
        if wire.entity == "terminal" {
            continue;
        }
        assert_eq!(wire.entity, "product");
        let data = wire.data_object().expect("data is an object");
        let id = data["id"].as_str().expect("id").to_string();
        let row = current.entry(id.clone()).or_insert_with(|| {
            let mut row = vec![SqlValue::Null; specs.len() + 3];
            row[0] = SqlValue::Text(id.clone());
            row
        });
        for (i, spec) in specs.iter().enumerate() {
            if let Some(value) = data.get(spec.name) {
                row[i + 1] = match (spec.ty, value) {
                    (_, Value::Null) => SqlValue::Null,
                    (FieldType::Bool, Value::Bool(flag)) => SqlValue::Integer(i64::from(*flag)),
                    (FieldType::Int, Value::Number(n)) => {
                        n.as_i64().map_or(SqlValue::Null, SqlValue::Integer)
                    }
                    (_, Value::String(text)) => SqlValue::Text(text.clone()),
                    (_, other) => SqlValue::Text(other.to_string()),
                };
            }
        }
        row[specs.len() + 1] = data
            .get("updatedAt")
            .and_then(Value::as_str)
            .map_or(SqlValue::Null, |t| SqlValue::Text(t.into()));
        row[specs.len() + 2] = SqlValue::Integer(i64::from(wire.action == "delete"));
        rows.push(row.clone());
    }
    rows
}

fn raw_insert_products(conn: &Connection, rows: &[Vec<SqlValue>]) {
    conn.execute_batch("BEGIN").expect("begin");
    {
        let mut insert = conn.prepare_cached(&raw_product_insert()).expect("prepare");
        for row in rows {
            insert.execute(params_from_iter(row.iter())).expect("insert product");
        }
    }
    conn.execute_batch("COMMIT").expect("commit");
}

/// Creates `count` products on `store` (local writes); returns their ids and prices.
fn create_catalog(store: &mut Store, count: usize, rng: &mut StdRng) -> Vec<(EntityId, Decimal)> {
    (0..count)
        .map(|i| {
            let price = Decimal::new(rng.random_range(50..20_000), 2);
            let body = json!({
                "sku": format!("SKU-{i:06}"),
                "barcode": format!("84{:011}", i),
                "name": format!("Product {i} of the benchmark catalog"),
                "description": "A product of the benchmark catalog",
                "price": decimal::to_text(price),
                "cost": decimal::to_text((price * Decimal::new(6, 1)).round_dp(2)),
                "unit": "unit",
            });
            let record = store.create_record(EntityKind::Product, &body).expect("create product");
            let id = EntityId::parse(record["id"].as_str().expect("id")).expect("id");
            (id, price)
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// 1. apply

fn bench_apply(config: &Config) {
    let products = config.size(10_000, 10);
    let updates = config.size(100_000, 100);
    let batch = 100;
    println!("\n== apply: {updates} remote product updates over {products} products, batches of {batch}");
    let prep_started = Instant::now();
    let source_file = DbFile::new(&config.prep_dir, "apply-source");
    let mut source = new_store(&source_file, "bench-source", 1);
    let mut rng = StdRng::seed_from_u64(11);
    let catalog = create_catalog(&mut source, products, &mut rng);
    for i in 0..updates {
        let (id, _) = &catalog[rng.random_range(0..catalog.len())];
        let price = Decimal::new(rng.random_range(50..20_000), 2);
        let body = json!({
            "price": decimal::to_text(price),
            "cost": decimal::to_text((price * Decimal::new(6, 1)).round_dp(2)),
            "minStock": format!("{}", i % 10),
        });
        source.update_record(EntityKind::Product, id, &body).expect("update product");
    }
    source.drain_outbox();
    let changes = all_changes(&source);
    drop(source);
    // The source's key enrollment, then its creates and updates: the replica checks the
    // signature of every change, as a node does.
    assert_eq!(changes.len(), 1 + products + updates);
    let (creates, updates_wire) = changes.split_at(1 + products);
    let rows = product_rows(&changes);
    let (create_rows, update_rows) = rows.split_at(products);
    let upsert_sql = raw_product_upsert();
    println!("  (prepared in {:.1} s)", prep_started.elapsed().as_secs_f64());

    let mut engine = Series::default();
    let mut raw = Series::default();
    for run in 0..config.runs {
        let run_engine = |engine: &mut Series| {
            let file = DbFile::new(&config.dir, "apply-engine");
            let mut store = new_store(&file, "bench-replica", 100 + run as u64);
            apply_all(&mut store, "bench-source", batches(creates, 1000));
            let update_batches = batches(updates_wire, batch);
            engine.samples.push(timed(|| apply_all(&mut store, "bench-source", update_batches)));
            let logs: i64 = store
                .reader()
                .expect("reader")
                .query_json("SELECT COUNT(*) AS n FROM p2p_sync_logs")
                .expect("count")[0]["n"]
                .as_i64()
                .expect("n");
            assert_eq!(logs as usize, 1 + products + updates, "one log row per change");
        };
        let run_raw = |raw: &mut Series| {
            let file = DbFile::new(&config.dir, "apply-raw");
            let conn = raw_db(&file, "NORMAL");
            raw_insert_products(&conn, create_rows);
            raw.samples.push(timed(|| {
                let mut upsert = conn.prepare_cached(&upsert_sql).expect("prepare");
                for chunk in update_rows.chunks(batch) {
                    conn.execute_batch("BEGIN").expect("begin");
                    for row in chunk {
                        upsert.execute(params_from_iter(row.iter())).expect("upsert");
                    }
                    conn.execute_batch("COMMIT").expect("commit");
                }
            }));
        };
        if run % 2 == 0 {
            run_engine(&mut engine);
            run_raw(&mut raw);
        } else {
            run_raw(&mut raw);
            run_engine(&mut engine);
        }
        println!(
            "  run {}: engine {:.3} s, raw {:.3} s",
            run + 1,
            engine.samples[run].wall.as_secs_f64(),
            raw.samples[run].wall.as_secs_f64()
        );
    }
    engine.describe("engine Store::apply_batch", updates);
    raw.describe("raw upserts (NORMAL)", updates);
    compare("apply", &engine, &raw, Some(Goal::ThroughputAtLeast(0.5)));
}

// ---------------------------------------------------------------------------------------------
// 2. sales

/// The rows of one sale as a raw application writes them.
struct RawSale {
    sale: Sale,
    /// The product's stock after each movement, as text.
    stocks: Vec<String>,
}

fn raw_sales(wires: &[WireChange]) -> Vec<RawSale> {
    let mut stock: HashMap<EntityId, Decimal> = HashMap::new();
    wires
        .iter()
        .map(|wire| {
            let change = Change::from_wire(wire).expect("decode sale");
            let ChangeBody::Sale(sale) = change.body else { panic!("not a sale: {wire:?}") };
            let stocks = sale
                .movements
                .iter()
                .map(|movement| {
                    let level = stock.entry(movement.product_id.clone()).or_default();
                    *level += movement.quantity;
                    decimal::to_text(*level)
                })
                .collect();
            RawSale { sale: *sale, stocks }
        })
        .collect()
}

fn raw_record_sales(conn: &Connection, sales: &[RawSale]) {
    let mut ticket = conn
        .prepare_cached(
            "INSERT INTO tickets (id, ticket_number, pos_id, customer_id, subtotal, discount_amount, total_amount,
                                  status, notes, created_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
        )
        .expect("prepare");
    let mut line = conn
        .prepare_cached(
            "INSERT INTO ticket_lines (ticket_id, line_no, product_id, product_name, product_sku, quantity,
                                       unit_price, discount_rate, discount_amount, total_amount)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        )
        .expect("prepare");
    let mut payment = conn
        .prepare_cached(
            "INSERT INTO ticket_payments (ticket_id, line_no, method, amount, reference) VALUES (?1, ?2, ?3, ?4, ?5)",
        )
        .expect("prepare");
    let mut movement = conn
        .prepare_cached(
            "INSERT INTO stock_movements (id, product_id, type, quantity, reference, pos_id, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )
        .expect("prepare");
    let mut stock = conn.prepare_cached("UPDATE products SET stock = ?2 WHERE id = ?1").expect("prepare");
    for RawSale { sale, stocks } in sales {
        conn.execute_batch("BEGIN").expect("begin");
        ticket
            .execute(params![
                sale.id.as_str(),
                sale.ticket_number,
                sale.pos_id.as_str(),
                sale.customer_id.as_ref().map(EntityId::as_str),
                decimal::to_text(sale.subtotal),
                decimal::to_text(sale.discount_amount),
                decimal::to_text(sale.total_amount),
                "completed",
                sale.notes,
                sale.created_at,
                sale.created_at,
            ])
            .expect("ticket");
        for (line_no, l) in sale.lines.iter().enumerate() {
            line.execute(params![
                sale.id.as_str(),
                line_no as i64,
                l.product_id.as_str(),
                l.product_name,
                l.product_sku,
                decimal::to_text(l.quantity),
                decimal::to_text(l.unit_price),
                decimal::to_text(l.discount_rate),
                decimal::to_text(l.discount_amount),
                decimal::to_text(l.total_amount),
            ])
            .expect("line");
        }
        for (line_no, p) in sale.payments.iter().enumerate() {
            payment
                .execute(params![
                    sale.id.as_str(),
                    line_no as i64,
                    p.method.as_str(),
                    decimal::to_text(p.amount),
                    p.reference
                ])
                .expect("payment");
        }
        for (m, level) in sale.movements.iter().zip(stocks) {
            movement
                .execute(params![
                    m.id.as_str(),
                    m.product_id.as_str(),
                    m.kind.as_str(),
                    decimal::to_text(m.quantity),
                    m.reference,
                    m.pos_id.as_str(),
                    m.created_at,
                ])
                .expect("movement");
            stock.execute(params![m.product_id.as_str(), level]).expect("stock");
        }
        conn.execute_batch("COMMIT").expect("commit");
    }
}

fn bench_sales(config: &Config) {
    let sales = config.size(100_000, 50);
    let products = config.size(1_000, 20).min(1_000);
    println!("\n== sales: {sales} sales of 1-5 lines over {products} products, one transaction per sale");
    let prep_started = Instant::now();
    let catalog_file = DbFile::new(&config.prep_dir, "sales-catalog");
    let mut catalog_store = new_store(&catalog_file, "bench-catalog", 2);
    let mut rng = StdRng::seed_from_u64(22);
    let catalog = create_catalog(&mut catalog_store, products, &mut rng);
    let catalog_changes = all_changes(&catalog_store);
    drop(catalog_store);
    let catalog_rows = product_rows(&catalog_changes);
    let prices: HashMap<&EntityId, Decimal> = catalog.iter().map(|(id, price)| (id, *price)).collect();
    let requests: Vec<SaleRequest> = (0..sales)
        .map(|i| {
            let lines: Vec<SaleLineRequest> = (0..rng.random_range(1..=5))
                .map(|_| {
                    let (id, _) = &catalog[rng.random_range(0..catalog.len())];
                    SaleLineRequest {
                        product_id: id.clone(),
                        quantity: Decimal::from(rng.random_range(1..=3)),
                        unit_price: None,
                        discount_rate: None,
                    }
                })
                .collect();
            let total: Decimal = lines.iter().map(|line| line.quantity * prices[&line.product_id]).sum();
            let payments = if i % 3 == 2 && total > Decimal::from(10) {
                vec![
                    PaymentRequest {
                        method: PaymentMethod::Card,
                        amount: total - Decimal::from(10),
                        reference: Some(format!("slip-{i}")),
                    },
                    PaymentRequest {
                        method: PaymentMethod::Cash,
                        amount: Decimal::from(10),
                        reference: None,
                    },
                ]
            } else {
                vec![PaymentRequest { method: PaymentMethod::Cash, amount: total, reference: None }]
            };
            SaleRequest { id: None, customer_id: None, lines, payments, notes: None }
        })
        .collect();
    println!("  (prepared in {:.1} s)", prep_started.elapsed().as_secs_f64());

    let mut engine = Series::default();
    let mut raw_full = Series::default();
    let mut raw_normal = Series::default();
    let mut rows: Option<Vec<RawSale>> = None;
    for run in 0..config.runs {
        let run_engine = |engine: &mut Series, rows: &mut Option<Vec<RawSale>>| {
            let file = DbFile::new(&config.dir, "sales-engine");
            let mut store = new_store(&file, "bench-till", 200 + run as u64);
            apply_all(&mut store, "bench-catalog", batches(&catalog_changes, 1000));
            let mut sold = Vec::with_capacity(if rows.is_none() { requests.len() } else { 0 });
            engine.samples.push(timed(|| {
                for request in &requests {
                    store.record_sale(request).expect("sale");
                    let outgoing = store.drain_outbox();
                    if rows.is_none() {
                        sold.extend(outgoing.into_iter().map(|out| out.change));
                    }
                }
            }));
            if rows.is_none() {
                *rows = Some(raw_sales(&sold));
            }
        };
        let run_raw = |series: &mut Series, synchronous: &str, rows: &[RawSale]| {
            let file = DbFile::new(&config.dir, "sales-raw");
            let conn = raw_db(&file, synchronous);
            raw_insert_products(&conn, &catalog_rows);
            series.samples.push(timed(|| raw_record_sales(&conn, rows)));
        };
        // The first run sells through the engine first: the baselines write its rows.
        if run % 2 == 0 {
            run_engine(&mut engine, &mut rows);
            let rows = rows.as_deref().expect("rows");
            run_raw(&mut raw_full, "FULL", rows);
            run_raw(&mut raw_normal, "NORMAL", rows);
        } else {
            let sale_rows = rows.as_deref().expect("rows");
            run_raw(&mut raw_normal, "NORMAL", sale_rows);
            run_raw(&mut raw_full, "FULL", sale_rows);
            run_engine(&mut engine, &mut rows);
        }
        println!(
            "  run {}: engine {:.3} s, raw FULL {:.3} s, raw NORMAL {:.3} s",
            run + 1,
            engine.samples[run].wall.as_secs_f64(),
            raw_full.samples[run].wall.as_secs_f64(),
            raw_normal.samples[run].wall.as_secs_f64()
        );
    }
    engine.describe("engine Store::record_sale", sales);
    raw_full.describe("raw inserts (FULL)", sales);
    raw_normal.describe("raw inserts (NORMAL)", sales);
    compare("sales vs raw FULL", &engine, &raw_full, Some(Goal::ThroughputAtLeast(0.3)));
    compare("sales vs raw NORMAL", &engine, &raw_normal, None);
}

// ---------------------------------------------------------------------------------------------
// 3. catch-up and 4. metadata

/// A source store holding a catalog of `count` products, and the raw rows of that catalog.
fn catalog_source(config: &Config, count: usize) -> (DbFile, Vec<Vec<SqlValue>>) {
    let file = DbFile::new(&config.prep_dir, "catalog-source");
    let mut source = new_store(&file, "bench-source", 3);
    let mut rng = StdRng::seed_from_u64(33);
    create_catalog(&mut source, count, &mut rng);
    source.drain_outbox();
    let rows = product_rows(&all_changes(&source));
    (file, rows)
}

/// What a replica's catch-up writes per product, read from the source (for the floor
/// baseline): every `products` column with its `sync_meta`, and the change-log row.
struct RequiredRows {
    product_columns: Vec<String>,
    products: Vec<Vec<SqlValue>>,
    /// seq, hlc, entity_id, action, payload (origin: the source).
    changes: Vec<(i64, Option<i64>, String, String, String)>,
}

fn required_rows(source: &Path) -> RequiredRows {
    let conn = Connection::open(source).expect("open source");
    let product_columns: Vec<String> = conn
        .prepare("SELECT name FROM pragma_table_info('products') ORDER BY cid")
        .expect("columns")
        .query_map([], |row| row.get(0))
        .expect("columns")
        .collect::<Result<_, _>>()
        .expect("columns");
    let mut select = conn.prepare("SELECT * FROM products ORDER BY rowid").expect("products");
    let products = select
        .query_map([], |row| (0..product_columns.len()).map(|i| row.get::<_, SqlValue>(i)).collect())
        .expect("products")
        .collect::<Result<_, _>>()
        .expect("products");
    let mut select = conn
        .prepare(
            "SELECT seq, hlc, entity_id, action, payload FROM sync_changes WHERE entity_type = 'product'
             ORDER BY log_id",
        )
        .expect("changes");
    let changes = select
        .query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?, row.get(4)?)))
        .expect("changes")
        .collect::<Result<_, _>>()
        .expect("changes");
    RequiredRows { product_columns, products, changes }
}

/// The floor of catch-up by design: the rows a replica must write per product (the product
/// with its `sync_meta`, the change-log row, the `p2p_sync_logs` row), as raw prepared
/// inserts in one transaction into a fresh store database, with no decoding or merging.
fn raw_insert_required(conn: &Connection, rows: &RequiredRows) {
    conn.execute_batch("BEGIN").expect("begin");
    {
        conn.execute("INSERT INTO sync_origins (pos_id) VALUES ('bench-source')", []).expect("origin");
        let origin = conn.last_insert_rowid();
        let placeholders: Vec<String> = (1..=rows.product_columns.len()).map(|i| format!("?{i}")).collect();
        let mut product = conn
            .prepare_cached(&format!(
                "INSERT INTO products ({}) VALUES ({})",
                rows.product_columns.join(", "),
                placeholders.join(", ")
            ))
            .expect("prepare product");
        let mut change = conn
            .prepare_cached(
                "INSERT INTO sync_changes (origin, seq, hlc, entity_type, entity_id, action, rejected, payload)
                 VALUES (?1, ?2, ?3, 'product', ?4, ?5, 0, ?6)",
            )
            .expect("prepare change");
        let mut log = conn
            .prepare_cached(
                "INSERT INTO p2p_sync_logs (peer_id, peer_name, message_type, message_action, entity_type,
                                            entity_id, status, details, created_at)
                 VALUES ('bench-source', 'bench-source', 'product', ?1, 'product', ?2, 'success', ?3,
                         '2026-12-02 10:00:00')",
            )
            .expect("prepare log");
        for (values, (seq, hlc, id, action, payload)) in rows.products.iter().zip(&rows.changes) {
            product.execute(params_from_iter(values.iter())).expect("insert product");
            change.execute(rusqlite::params![origin, seq, hlc, id, action, payload]).expect("insert change");
            let details = format!(r#"{{"origin":"bench-source","seq":{seq}}}"#);
            log.execute(rusqlite::params![action, id, details]).expect("insert log");
        }
    }
    conn.execute_batch("COMMIT").expect("commit");
}

/// A fresh replica's catch-up from `source`, in batches of `batch`.
fn catch_up(source: &Path, replica: &mut Store, batch: usize) -> usize {
    let reader = possync_store::StoreReader::open(source).expect("reader");
    let since = replica.summary().clone();
    let mut cursor = 0;
    let mut applied = 0;
    loop {
        let selection = reader.select_changes(&since, cursor, batch).expect("select");
        let report = replica
            .apply_batch(PeerRef { id: "bench-source", name: "bench-source" }, selection.changes)
            .expect("apply");
        applied += report.applied as usize;
        replica.drain_outbox();
        cursor = selection.next_cursor;
        if !selection.has_more {
            return applied;
        }
    }
}

fn bench_catchup(config: &Config) {
    let count = config.size(100_000, 100);
    println!("\n== catch-up: a fresh replica takes a {count}-product catalog");
    let prep_started = Instant::now();
    let (source, rows) = catalog_source(config, count);
    let required = required_rows(&source.0);
    assert_eq!((required.products.len(), required.changes.len()), (count, count));
    println!("  (prepared in {:.1} s)", prep_started.elapsed().as_secs_f64());
    let batches = [100usize, 1000];
    let mut engine: Vec<Series> = batches.iter().map(|_| Series::default()).collect();
    let (mut raw, mut floor) = (Series::default(), Series::default());
    for run in 0..config.runs {
        // Some(batch): the engine; Some(0): the floor by design; None: the raw bulk insert.
        let mut steps: Vec<Option<usize>> =
            batches.iter().copied().map(Some).chain([Some(0), None]).collect();
        let shift = run % steps.len();
        steps.rotate_left(shift);
        for step in steps {
            match step {
                Some(0) => {
                    let file = DbFile::new(&config.dir, "catchup-floor");
                    drop(new_store(&file, "bench-replica", 300 + run as u64));
                    let conn = Connection::open(&file.0).expect("open floor");
                    conn.pragma_update(None, "synchronous", "NORMAL").expect("synchronous");
                    floor.samples.push(timed(|| raw_insert_required(&conn, &required)));
                }
                Some(batch) => {
                    let file = DbFile::new(&config.dir, "catchup-engine");
                    let mut replica = new_store(&file, "bench-replica", 300 + run as u64);
                    let mut applied = 0;
                    let sample = timed(|| applied = catch_up(&source.0, &mut replica, batch));
                    assert_eq!(applied, count);
                    let slot = batches.iter().position(|b| *b == batch).expect("batch");
                    engine[slot].samples.push(sample);
                }
                None => {
                    let file = DbFile::new(&config.dir, "catchup-raw");
                    let conn = raw_db(&file, "NORMAL");
                    raw.samples.push(timed(|| raw_insert_products(&conn, &rows)));
                }
            }
        }
        println!(
            "  run {}: engine batch 100 {:.3} s, engine batch 1000 {:.3} s, raw {:.3} s, floor {:.3} s",
            run + 1,
            engine[0].samples[run].wall.as_secs_f64(),
            engine[1].samples[run].wall.as_secs_f64(),
            raw.samples[run].wall.as_secs_f64(),
            floor.samples[run].wall.as_secs_f64()
        );
    }
    for (batch, series) in batches.iter().zip(&engine) {
        series.describe(&format!("engine catch-up, batch {batch}"), count);
    }
    raw.describe("raw bulk insert (1 tx)", count);
    floor.describe("raw rows the design requires", count);
    for (batch, series) in batches.iter().zip(&engine) {
        compare(&format!("catch-up batch {batch}"), series, &raw, Some(Goal::TimeAtMost(2.0)));
    }
    // For information: how far the design's own rows are from the baseline, and how far the
    // engine is from them.
    compare("floor (required rows) vs raw bulk insert", &floor, &raw, Some(Goal::TimeRatio));
    for (batch, series) in batches.iter().zip(&engine) {
        compare(&format!("catch-up batch {batch} vs floor"), series, &floor, Some(Goal::TimeRatio));
    }
}

/// Bytes of each table (with its indexes) after VACUUM, and the file size.
fn vacuumed_sizes(path: &Path) -> (u64, Vec<(String, u64)>) {
    let conn = Connection::open(path).expect("open");
    conn.execute_batch("VACUUM").expect("vacuum");
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(())).expect("checkpoint");
    let mut statement = conn
        .prepare(
            "SELECT COALESCE(m.tbl_name, d.name) AS tbl, SUM(d.pgsize)
             FROM dbstat d LEFT JOIN sqlite_master m ON m.name = d.name
             GROUP BY tbl ORDER BY 2 DESC",
        )
        .expect("dbstat");
    let tables = statement
        .query_map([], |row| Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)? as u64)))
        .expect("dbstat rows")
        .collect::<Result<Vec<_>, _>>()
        .expect("dbstat rows");
    drop(statement);
    drop(conn);
    (std::fs::metadata(path).expect("size").len(), tables)
}

fn bench_metadata(config: &Config) {
    let count = config.size(100_000, 100);
    println!("\n== metadata: bytes on disk per product, {count} products, after VACUUM");
    let (source, rows) = catalog_source(config, count);
    let replica_file = DbFile::new(&config.dir, "metadata-replica");
    {
        let mut replica = new_store(&replica_file, "bench-replica", 400);
        assert_eq!(catch_up(&source.0, &mut replica, 100), count);
    }
    let raw_file = DbFile::new(&config.dir, "metadata-raw");
    {
        let conn = raw_db(&raw_file, "NORMAL");
        raw_insert_products(&conn, &rows);
    }
    let columns: (f64, f64, f64) = {
        let conn = Connection::open(&replica_file.0).expect("open");
        conn.query_row(
            "SELECT (SELECT AVG(LENGTH(sync_meta)) FROM products),
                    (SELECT AVG(LENGTH(payload)) FROM sync_changes),
                    (SELECT AVG(LENGTH(details)) FROM p2p_sync_logs)",
            [],
            |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
        )
        .expect("lengths")
    };
    let per = |bytes: u64| bytes as f64 / count as f64;
    let (store_size, store_tables) = vacuumed_sizes(&replica_file.0);
    let (raw_size, raw_tables) = vacuumed_sizes(&raw_file.0);
    let table = |tables: &[(String, u64)], name: &str| {
        tables.iter().find(|(table, _)| table == name).map_or(0, |(_, bytes)| *bytes)
    };
    println!("  raw file:   {raw_size} bytes = {:.1} bytes/product", per(raw_size));
    println!("    raw products table + indexes: {:.1} bytes/product", per(table(&raw_tables, "products")));
    println!("  store file: {store_size} bytes = {:.1} bytes/product", per(store_size));
    for (name, bytes) in &store_tables {
        println!("    {name:<24} {bytes:>12} bytes = {:>7.1} bytes/product", per(*bytes));
    }
    println!(
        "  sync_meta column: avg {:.1} bytes of JSON per product; products table+indexes store - raw = {:.1} bytes/product",
        columns.0,
        per(table(&store_tables, "products")) - per(table(&raw_tables, "products"))
    );
    println!("  change log payload: avg {:.1} bytes per change", columns.1);
    println!("  audit log details: avg {:.1} bytes per row", columns.2);
    println!(
        "  RESULT metadata: {:.1} bytes/product with sync (store) vs {:.1} raw: x{:.2}",
        per(store_size),
        per(raw_size),
        store_size as f64 / raw_size as f64
    );
}

fn main() {
    let config = Config::from_env();
    println!(
        "possync-store engine benchmarks: runs={} scale={} workloads={} dir={} prep_dir={}",
        config.runs,
        config.scale,
        config.workloads.join(","),
        config.dir.display(),
        config.prep_dir.display()
    );
    if config.wants("apply") {
        bench_apply(&config);
    }
    if config.wants("sales") {
        bench_sales(&config);
    }
    if config.wants("catchup") {
        bench_catchup(&config);
    }
    if config.wants("metadata") {
        bench_metadata(&config);
    }
}
