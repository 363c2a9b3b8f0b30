//! Benchmark of `possync import posplus` (issue 11): builds a POSPlus database of 100,000
//! products and 200,000 tickets (2 lines and 1 payment each) from the schema of POSPlus
//! migrations 001-011, then, three times each in the same run, times
//!
//! - the baseline: a raw SQLite copy of the same rows (categories, products, customers,
//!   tickets, ticket lines, payments) into a fresh POSPlus-shaped database, read and
//!   inserted row by row with prepared statements in one transaction (WAL,
//!   synchronous=NORMAL, as the node's database);
//! - the import: the real `possync` binary, `possync import posplus` into a fresh node
//!   (`possync init` is not timed).
//!
//! It prints the medians, the rows per second of each and the ratio import/raw (the goal
//! is at least 0.3). Run it with `cargo bench -p possync --bench import_posplus`; smaller
//! sizes with `POSSYNC_BENCH_PRODUCTS` and `POSSYNC_BENCH_TICKETS`; `POSSYNC_BENCH_DIR`
//! keeps the databases in that directory.

#[path = "../tests/support/posplus.rs"]
mod posplus;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use rusqlite::Connection;

const BIN: &str = env!("CARGO_BIN_EXE_possync");
const RUNS: usize = 3;
const TABLES: [&str; 6] = ["categories", "products", "customers", "tickets", "ticket_lines", "payments"];

fn size(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|raw| raw.parse().ok()).unwrap_or(default)
}

/// A deterministic pseudo-random sequence (SplitMix64): the same database every run.
struct Rng(u64);

impl Rng {
    fn below(&mut self, bound: u64) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (z ^ (z >> 31)) % bound
    }
}

fn build(path: &Path, products: u64, tickets: u64) -> rusqlite::Result<()> {
    let mut conn = Connection::open(path)?;
    conn.execute_batch(&posplus::schema(false))?;
    let tx = conn.transaction()?;
    for name in posplus::MIGRATIONS {
        tx.execute("INSERT INTO migrations (name) VALUES (?1)", [name])?;
    }
    tx.execute_batch(
        "INSERT INTO roles (id, name) VALUES (1, 'Administrator');
         INSERT INTO users (id, username, email, password_hash, first_name, last_name, role_id)
           VALUES (1, 'admin', 'admin@posplus.local', '$2b$10$abcdefghijklmnopqrstuv', 'System', 'Administrator', 1);
         INSERT INTO cash_sessions (id, user_id, opening_cash) VALUES (1, 1, 50);
         INSERT INTO settings (key, value, type) VALUES ('company_name', 'Bench', 'string');",
    )?;
    let mut rng = Rng(42);
    for id in 1..=100_i64 {
        let parent = if id > 10 { Some((id - 1) % 10 + 1) } else { None };
        tx.execute(
            "INSERT INTO categories (id, name, parent_id, display_order, created_at)
             VALUES (?1, ?2, ?3, ?1, '2025-11-01 09:00:00')",
            rusqlite::params![id, format!("Category {id}"), parent],
        )?;
    }
    let mut prices = Vec::with_capacity(products as usize);
    {
        let mut insert = tx.prepare(
            "INSERT INTO products (id, sku, barcode, name, description, category_id, price, cost, stock, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, '2025-11-02 08:00:00')",
        )?;
        for id in 1..=products as i64 {
            let cents = 50 + rng.below(5_000) as i64;
            prices.push(cents);
            insert.execute(rusqlite::params![
                id,
                format!("SKU-{id:07}"),
                format!("376{id:010}"),
                format!("Product {id}"),
                format!("Description of product {id}"),
                11 + rng.below(90) as i64,
                cents as f64 / 100.0,
                (cents / 3) as f64 / 100.0,
                rng.below(200) as i64,
            ])?;
        }
        let mut customer =
            tx.prepare("INSERT INTO customers (id, first_name, last_name, email) VALUES (?1, ?2, ?3, ?4)")?;
        for id in 1..=1_000_i64 {
            customer.execute(rusqlite::params![
                id,
                format!("First{id}"),
                format!("Last{id}"),
                format!("c{id}@example.invalid")
            ])?;
        }
        let mut ticket = tx.prepare(
            "INSERT INTO tickets (id, ticket_number, user_id, customer_id, session_id, subtotal, discount_amount,
                                  total_amount, status, created_at)
             VALUES (?1, ?2, 1, ?3, 1, ?4, 0, ?4, ?5, ?6)",
        )?;
        let mut line = tx.prepare(
            "INSERT INTO ticket_lines (ticket_id, product_id, product_name, product_sku, quantity, unit_price,
                                       total_amount)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )?;
        let mut payment =
            tx.prepare("INSERT INTO payments (ticket_id, method, amount) VALUES (?1, ?2, ?3)")?;
        for id in 1..=tickets as i64 {
            let mut subtotal = 0;
            for _ in 0..2 {
                let product = 1 + rng.below(products) as i64;
                let quantity = 1 + rng.below(3) as i64;
                let cents = prices[(product - 1) as usize];
                subtotal += quantity * cents;
                line.execute(rusqlite::params![
                    id,
                    product,
                    format!("Product {product}"),
                    format!("SKU-{product:07}"),
                    quantity as f64,
                    cents as f64 / 100.0,
                    (quantity * cents) as f64 / 100.0,
                ])?;
            }
            let status = match rng.below(100) {
                0..=1 => "cancelled",
                2..=4 => "refunded",
                _ => "completed",
            };
            let customer = (rng.below(4) == 0).then(|| 1 + rng.below(1_000) as i64);
            let second = id % 86_400;
            ticket.execute(rusqlite::params![
                id,
                format!("T-{id:08}"),
                customer,
                subtotal as f64 / 100.0,
                status,
                format!(
                    "2025-11-{:02} {:02}:{:02}:{:02}",
                    1 + id % 28,
                    second / 3600,
                    second / 60 % 60,
                    second % 60
                ),
            ])?;
            let method = if rng.below(2) == 0 { "cash" } else { "card" };
            payment.execute(rusqlite::params![id, method, subtotal as f64 / 100.0])?;
        }
    }
    tx.commit()
}

/// The baseline: the same rows copied into a fresh POSPlus-shaped database, row by row.
fn raw_copy(source: &Path, target: &Path) -> rusqlite::Result<u64> {
    let from = Connection::open_with_flags(source, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let mut to = Connection::open(target)?;
    to.pragma_update(None, "journal_mode", "WAL")?;
    to.pragma_update(None, "synchronous", "NORMAL")?;
    to.execute_batch(&posplus::schema(false))?;
    let tx = to.transaction()?;
    let mut rows = 0;
    for table in TABLES {
        let mut select = from.prepare(&format!("SELECT * FROM {table}"))?;
        let columns = select.column_count();
        let placeholders = (1..=columns).map(|i| format!("?{i}")).collect::<Vec<_>>().join(", ");
        let names = select.column_names().join(", ");
        let mut insert = tx.prepare(&format!("INSERT INTO {table} ({names}) VALUES ({placeholders})"))?;
        let mut source_rows = select.query([])?;
        while let Some(row) = source_rows.next()? {
            let values: Vec<rusqlite::types::Value> =
                (0..columns).map(|i| row.get(i)).collect::<Result<_, _>>()?;
            insert.execute(rusqlite::params_from_iter(values))?;
            rows += 1;
        }
    }
    tx.commit()?;
    Ok(rows)
}

/// CPU time of this thread (the raw copy runs on it): `/proc/thread-self/schedstat`.
fn thread_cpu() -> Duration {
    let raw = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap_or_default();
    Duration::from_nanos(raw.split_whitespace().next().and_then(|ns| ns.parse().ok()).unwrap_or(0))
}

/// CPU time (user + system) of this process's waited-for children (the import runs in
/// one): fields 16 and 17 of `/proc/self/stat`, in clock ticks of 10 ms.
fn children_cpu() -> Duration {
    let raw = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // The command name (field 2) is in parentheses and may hold spaces: count after it,
    // from field 3.
    let after: Vec<&str> = raw.rsplit_once(')').map_or("", |(_, rest)| rest).split_whitespace().collect();
    let field = |n: usize| after.get(n - 3).and_then(|value| value.parse::<u64>().ok()).unwrap_or(0);
    Duration::from_millis((field(16) + field(17)) * 10)
}

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

fn main() {
    let products = size("POSSYNC_BENCH_PRODUCTS", 100_000);
    let tickets = size("POSSYNC_BENCH_TICKETS", 200_000);
    // POSSYNC_BENCH_DIR keeps the databases (for profiling); else a temporary directory.
    let temporary = tempfile::tempdir().expect("a temporary directory");
    let kept = std::env::var_os("POSSYNC_BENCH_DIR").map(std::path::PathBuf::from);
    let dir = kept.as_deref().unwrap_or(temporary.path());
    let source = dir.join("posplus.db");
    let started = Instant::now();
    build(&source, products, tickets).expect("build the POSPlus database");
    println!(
        "built a POSPlus database of {products} products and {tickets} tickets in {:.1?}",
        started.elapsed()
    );

    let mut raw_times = Vec::new();
    let mut import_times = Vec::new();
    let mut raw_cpu = Vec::new();
    let mut import_cpu = Vec::new();
    let mut rows = 0;
    for run in 0..RUNS {
        let (started, cpu) = (Instant::now(), thread_cpu());
        rows = raw_copy(&source, &dir.join(format!("copy{run}.db"))).expect("raw copy");
        raw_times.push(started.elapsed());
        raw_cpu.push(thread_cpu() - cpu);

        let node = dir.join(format!("node{run}"));
        let init = Command::new(BIN)
            .args(["init", "--port", "0", "--api-port", "0", "--data-dir"])
            .arg(&node)
            .env("POSSYNC_LOG", "warn")
            .output()
            .expect("possync init");
        assert!(init.status.success(), "{}", String::from_utf8_lossy(&init.stderr));
        let (started, cpu) = (Instant::now(), children_cpu());
        let import = Command::new(BIN)
            .args(["import", "posplus", "--json", "--from"])
            .arg(&source)
            .arg("--data-dir")
            .arg(&node)
            .env("POSSYNC_LOG", "warn")
            .output()
            .expect("possync import");
        import_times.push(started.elapsed());
        import_cpu.push(children_cpu() - cpu);
        assert!(import.status.success(), "{}", String::from_utf8_lossy(&import.stderr));
        let summary: serde_json::Value = serde_json::from_slice(&import.stdout).expect("the summary");
        let created = summary["tables"]["tickets"]["created"].as_u64().unwrap_or(0);
        let skipped = summary["skipped"].as_array().map_or(0, Vec::len);
        assert_eq!(created, tickets, "every ticket imported (skipped: {skipped})");
        println!(
            "run {}: raw copy {:.2?} (CPU {:.2?}), import {:.2?} (CPU {:.2?})",
            run + 1,
            raw_times[run],
            raw_cpu[run],
            import_times[run],
            import_cpu[run]
        );
    }
    let (raw, import) = (median(raw_times), median(import_times));
    let rate = |time: Duration| rows as f64 / time.as_secs_f64();
    println!("rows: {rows} ({})", TABLES.join(", "));
    println!("raw SQLite copy: median {raw:.2?} = {:.0} rows/s", rate(raw));
    println!("possync import:  median {import:.2?} = {:.0} rows/s", rate(import));
    println!("ratio import/raw, wall: {:.3} (goal >= 0.3)", rate(import) / rate(raw));
    let (raw_cpu, import_cpu) = (median(raw_cpu), median(import_cpu));
    println!(
        "CPU: raw copy median {raw_cpu:.2?}, import median {import_cpu:.2?}, ratio import/raw {:.3}",
        raw_cpu.as_secs_f64() / import_cpu.as_secs_f64()
    );
}
