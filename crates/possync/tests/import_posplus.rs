//! `possync import posplus` as a user runs it, on POSPlus-shaped databases that the tests
//! build themselves from the schema of POSPlus migrations 001-011 (the CREATE TABLE
//! statements below are written from what those migrations define; no POSPlus code here).

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command as StdCommand, Stdio};
use std::time::{Duration, Instant};

use assert_cmd::Command;
use rusqlite::Connection;
use serde_json::Value;

#[path = "support/posplus.rs"]
mod posplus;

use posplus::{MIGRATIONS, schema};

const BIN: &str = env!("CARGO_BIN_EXE_possync");

/// A small shop: 3 categories (one nested), 3 products (one price 1.3000000000000003, one
/// 1.005), 2 customers, 3 tickets (completed, refunded, pending), a cashier, a closed cash
/// session with its Z report and an open one.
/// `first_product_id` shifts the products' integer ids (another till's copy of the catalog).
fn small_shop(path: &Path, first_product_id: i64) -> Connection {
    let conn = Connection::open(path).unwrap();
    conn.execute_batch(&schema(false)).unwrap();
    for name in MIGRATIONS {
        conn.execute("INSERT INTO migrations (name) VALUES (?1)", [name]).unwrap();
    }
    let p = first_product_id;
    conn.execute_batch(&format!(
        "
INSERT INTO roles (id, name) VALUES (1, 'Administrator');
INSERT INTO users (id, username, email, password_hash, first_name, last_name, role_id)
  VALUES (1, 'admin', 'admin@posplus.local', '$2b$10$abcdefghijklmnopqrstuv', 'System', 'Administrator', 1);
INSERT INTO cash_sessions (id, user_id, opening_cash, closing_cash, expected_cash, difference, started_at,
                           closed_at, status) VALUES
  (1, 1, 50, 56.2, 56.3, -0.1, '2025-11-20 08:00:00', '2025-11-20 18:00:00', 'closed'),
  (2, 1, 20, NULL, NULL, NULL, '2025-11-21 08:00:00', NULL, 'open');
INSERT INTO z_reports (id, session_id, user_id, total_sales, total_discount, total_cash, total_card, ticket_count,
                       report_date, created_at)
  VALUES (1, 1, 1, 6.3, 0, 5.0, 1.3, 2, '2025-11-20', '2025-11-20 18:00:00');
INSERT INTO categories (id, name, parent_id, display_order, created_at) VALUES
  (1, 'Drinks', NULL, 1, '2025-11-01 09:00:00'), (2, 'Hot', 1, 2, '2025-11-01 09:00:00'),
  (3, 'Bakery', NULL, 3, '2025-11-01 09:00:00');
INSERT INTO products (id, sku, barcode, name, category_id, price, cost, stock, created_at) VALUES
  ({p}, 'COF-1', NULL, 'Coffee', 2, 2.5, 0.8, 10, '2025-11-02 08:00:00'),
  ({p} + 1, 'TEA-1', NULL, 'Tea', 2, 1.3000000000000003, 0.2, 5, '2025-11-02 08:00:00'),
  ({p} + 2, 'CRO-1', '3760000000001', 'Croissant', 3, 1.005, 0.3, 0, '2025-11-02 08:00:00');
INSERT INTO customers (id, customer_number, first_name, last_name, company_name, email, city) VALUES
  (1, NULL, 'Ana', 'Diaz', NULL, 'ana@example.invalid', 'Tunis'),
  (2, 'C-2', NULL, NULL, 'ACME', NULL, NULL);
INSERT INTO tickets (id, ticket_number, user_id, customer_id, session_id, subtotal, discount_amount, total_amount,
                     status, created_at) VALUES
  (1, 'T-0001', 1, 1, 1, 5.0, 0, 5.0, 'completed', '2025-11-20 10:00:00'),
  (2, 'T-0002', 1, NULL, 1, 1.3, 0, 1.3, 'refunded', '2025-11-20 11:00:00'),
  (3, 'T-0003', 1, NULL, 1, 2.5, 0, 2.5, 'pending', '2025-11-20 12:00:00');
INSERT INTO ticket_lines (ticket_id, product_id, product_name, product_sku, quantity, unit_price, total_amount) VALUES
  (1, {p}, 'Coffee', 'COF-1', 2, 2.5, 5.0), (2, {p} + 1, 'Tea', 'TEA-1', 1, 1.3, 1.3),
  (3, {p}, 'Coffee', 'COF-1', 1, 2.5, 2.5);
INSERT INTO payments (ticket_id, method, amount) VALUES (1, 'cash', 5.0), (2, 'card', 1.3), (3, 'cash', 2.5);
INSERT INTO stock_logs (product_id, type, quantity, previous_stock, new_stock, user_id)
  VALUES ({p}, 'sale', 2, 12, 10, 1);
INSERT INTO settings (key, value, type) VALUES ('company_name', 'POSPlus Store', 'string'),
  ('currency', 'TND', 'string'), ('p2p_sync_batch_size', '250', 'number');
"
    ))
    .unwrap();
    conn
}

fn possync() -> Command {
    let mut command = Command::new(BIN);
    command.env_remove("POSSYNC_SECRET").env("POSSYNC_LOG", "warn").timeout(Duration::from_secs(120));
    command
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `possync init` of a terminal in `dir` (its API on a free port); returns its posId.
fn init(dir: &Path) -> String {
    let output = possync()
        .args(["init", "--port", "0", "--api-port", &free_port().to_string(), "--data-dir"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).unwrap().trim().to_string()
}

/// Runs the import with `--json` and returns its summary (asserting success).
fn import(dir: &Path, from: &Path, extra: &[&str]) -> Value {
    let output = possync()
        .args(["import", "posplus", "--json", "--from"])
        .arg(from)
        .arg("--data-dir")
        .arg(dir)
        .args(extra)
        .output()
        .unwrap();
    assert!(output.status.success(), "import failed: {}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout).unwrap()
}

/// Runs the import and expects it to fail; returns stderr.
fn import_fails(dir: &Path, from: &Path) -> String {
    let output = possync()
        .args(["import", "posplus", "--from"])
        .arg(from)
        .arg("--data-dir")
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        !output.status.success(),
        "the import should have failed: {}",
        String::from_utf8_lossy(&output.stdout)
    );
    String::from_utf8(output.stderr).unwrap()
}

fn node_db(dir: &Path) -> Connection {
    Connection::open(dir.join("possync.db")).unwrap()
}

fn scalar(conn: &Connection, sql: &str) -> String {
    conn.query_row(sql, [], |row| row.get::<_, rusqlite::types::Value>(0))
        .map(|value| match value {
            rusqlite::types::Value::Text(text) => text,
            rusqlite::types::Value::Integer(value) => value.to_string(),
            rusqlite::types::Value::Real(value) => value.to_string(),
            rusqlite::types::Value::Null => "NULL".into(),
            rusqlite::types::Value::Blob(_) => "BLOB".into(),
        })
        .unwrap()
}

fn counts(summary: &Value, table: &str) -> (u64, u64, u64, u64) {
    let counts = &summary["tables"][table];
    let get = |key: &str| counts[key].as_u64().unwrap_or_else(|| panic!("{table}.{key} in {summary}"));
    (get("created"), get("updated"), get("unchanged"), get("skipped"))
}

#[test]
fn a_posplus_database_is_imported_as_ordinary_changes() {
    let tmp = tempfile::tempdir().unwrap();
    let node = tmp.path().join("node");
    let pos_id = init(&node);
    let file = tmp.path().join("posplus.db");
    small_shop(&file, 1);

    let summary = import(&node, &file, &[]);
    assert_eq!(counts(&summary, "categories"), (3, 0, 0, 0));
    assert_eq!(counts(&summary, "products"), (3, 0, 0, 0));
    assert_eq!(counts(&summary, "stock"), (3, 0, 0, 0));
    assert_eq!(counts(&summary, "customers"), (2, 0, 0, 0));
    assert_eq!(counts(&summary, "users"), (1, 0, 0, 0));
    assert_eq!(counts(&summary, "tickets"), (2, 0, 0, 1));
    assert_eq!(counts(&summary, "ticket_lines"), (2, 0, 0, 1));
    assert_eq!(counts(&summary, "settings"), (0, 1, 0, 0));
    assert_eq!(counts(&summary, "cash_sessions"), (2, 0, 0, 0));
    assert_eq!(counts(&summary, "z_reports"), (1, 0, 0, 0));
    let skipped = summary["skipped"].as_array().unwrap();
    assert_eq!(skipped.len(), 1, "{skipped:?}");
    assert_eq!(skipped[0]["table"], "tickets");
    assert!(skipped[0]["reason"].as_str().unwrap().contains("pending"), "{skipped:?}");
    let not_imported: Vec<&str> =
        summary["notImported"].as_array().unwrap().iter().map(|row| row["table"].as_str().unwrap()).collect();
    for table in ["stock_logs", "settings"] {
        assert!(not_imported.contains(&table), "{table} missing from {not_imported:?}");
    }
    for table in ["cash_sessions", "z_reports"] {
        assert!(!not_imported.contains(&table), "{table} is imported: {not_imported:?}");
    }

    let db = node_db(&node);
    // The cashier, with POSPlus's bcrypt hash kept as it is and its role mapped.
    assert_eq!(
        scalar(&db, "SELECT username || ' ' || role || ' ' || password_hash || ' ' || is_active FROM users"),
        "admin admin $2b$10$abcdefghijklmnopqrstuv 1"
    );
    assert_eq!(scalar(&db, "SELECT stock FROM products WHERE sku = 'COF-1'"), "10");
    assert_eq!(scalar(&db, "SELECT stock FROM products WHERE sku = 'TEA-1'"), "5");
    assert_eq!(scalar(&db, "SELECT price FROM products WHERE sku = 'TEA-1'"), "1.3");
    assert_eq!(scalar(&db, "SELECT price FROM products WHERE sku = 'CRO-1'"), "1.01");
    assert_eq!(scalar(&db, "SELECT barcode FROM products WHERE sku = 'CRO-1'"), "3760000000001");
    assert_eq!(
        scalar(
            &db,
            "SELECT c.name FROM products p JOIN categories c ON c.id = p.category_id WHERE p.sku = 'COF-1'"
        ),
        "Hot"
    );
    assert_eq!(
        scalar(
            &db,
            "SELECT parent.name FROM categories c JOIN categories parent ON parent.id = c.parent_id WHERE c.name = 'Hot'"
        ),
        "Drinks"
    );
    assert_eq!(scalar(&db, "SELECT COUNT(*) FROM stock_movements"), "3");
    assert_eq!(scalar(&db, "SELECT COUNT(*) FROM stock_movements WHERE type <> 'adjustment'"), "0");
    // Customers: first/last/company names become one name.
    assert_eq!(
        scalar(&db, "SELECT group_concat(name, '|') FROM (SELECT name FROM customers ORDER BY name)"),
        "ACME|Ana Diaz"
    );
    // Tickets keep their date and totals, get the till's prefix, and their final status.
    let prefix = scalar(&db, "SELECT value FROM node_meta WHERE key = 'ticket_prefix'");
    assert_eq!(
        scalar(&db, "SELECT ticket_number FROM tickets WHERE total_amount = '5'"),
        format!("{prefix}-PP-T-0001")
    );
    assert_eq!(
        scalar(&db, "SELECT created_at FROM tickets WHERE total_amount = '5'"),
        "2025-11-20T10:00:00.000Z"
    );
    assert_eq!(scalar(&db, "SELECT status FROM tickets WHERE total_amount = '1.3'"), "refunded");
    assert_eq!(scalar(&db, "SELECT customer_id IS NOT NULL FROM tickets WHERE total_amount = '5'"), "1");
    assert_eq!(scalar(&db, "SELECT COUNT(*) FROM ticket_payments"), "2");
    assert_eq!(scalar(&db, "SELECT pos_id FROM tickets LIMIT 1"), pos_id);
    // Cash sessions: the closed one with POSPlus's figures and its Z report, the open one
    // still open (this till's sales go on recording it); tickets keep their session.
    assert_eq!(
        scalar(
            &db,
            "SELECT status || ' ' || opening_cash || ' ' || counted_cash || ' ' || expected_cash || ' ' || difference
             || ' ' || opened_at || ' ' || (z_report_id IS NOT NULL) FROM cash_sessions WHERE status = 'closed'"
        ),
        "closed 50 56.2 56.3 -0.1 2025-11-20T08:00:00.000Z 1"
    );
    assert_eq!(scalar(&db, "SELECT COUNT(*) FROM cash_sessions WHERE status = 'open'"), "1");
    assert_eq!(
        scalar(
            &db,
            "SELECT z.report_date || ' ' || z.total_sales || ' ' || z.total_cash || ' ' || z.total_card || ' '
             || z.ticket_count || ' ' || z.expected_cash || ' ' || (u.username) FROM z_reports z
             JOIN cash_sessions s ON s.id = z.session_id AND s.z_report_id = z.id JOIN users u ON u.id = z.user_id"
        ),
        "2025-11-20 6.3 5 1.3 2 56.3 admin"
    );
    assert_eq!(
        scalar(
            &db,
            "SELECT COUNT(*) FROM tickets t JOIN cash_sessions s ON s.id = t.cash_session_id WHERE s.status = 'closed'"
        ),
        "2"
    );
    // Everything is an ordinary local change of this till: its key enrollment, 3
    // categories, 3 products, 3 counts, 2 customers, 1 cashier, 2 cash sessions, 2 sales,
    // 1 refund status and 1 Z report.
    assert_eq!(scalar(&db, "SELECT COUNT(*) FROM sync_changes"), "19");
    // A POSPlus setting possync has under the same name is taken; the others are listed.
    assert_eq!(scalar(&db, "SELECT value FROM settings WHERE key = 'p2p_sync_batch_size'"), "250");

    // Rounding is reported, value by value.
    let rounded = summary["rounded"].as_array().unwrap();
    let has = |original: &str, imported: &str| {
        rounded
            .iter()
            .any(|row| row["original"] == original && row["imported"] == imported && row["column"] == "price")
    };
    assert!(has("1.3000000000000003", "1.3"), "{rounded:?}");
    assert!(has("1.005", "1.01"), "{rounded:?}");
    assert_eq!(rounded.len(), 2, "{rounded:?}");
}

#[test]
fn the_text_summary_reports_counts_skips_and_rounding() {
    let tmp = tempfile::tempdir().unwrap();
    let node = tmp.path().join("node");
    init(&node);
    let file = tmp.path().join("posplus.db");
    small_shop(&file, 1);
    let output = possync()
        .args(["import", "posplus", "--from"])
        .arg(&file)
        .arg("--data-dir")
        .arg(&node)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let text = String::from_utf8(output.stdout).unwrap();
    for expected in [
        "POSPlus import (schema 011_add_print_preview_setting.sql)",
        "tickets #3: pending: never completed",
        "rounded values: 2",
        "products #3 price: 1.005 -> 1.01",
        "not imported: stock_logs (1 rows): not replayed",
    ] {
        assert!(text.contains(expected), "{expected:?} not in:\n{text}");
    }
}

#[test]
fn tickets_sort_by_their_posplus_id_and_keep_their_id_on_every_run() {
    let tmp = tempfile::tempdir().unwrap();
    let node = tmp.path().join("node");
    init(&node);
    let file = tmp.path().join("posplus.db");
    small_shop(&file, 1);
    import(&node, &file, &[]);
    let ids = |db: &Connection| -> Vec<String> {
        db.prepare("SELECT id FROM tickets ORDER BY ticket_number")
            .unwrap()
            .query_map([], |row| row.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    };
    let first = ids(&node_db(&node));
    // Tickets T-0001 and T-0002 are POSPlus tickets 1 and 2: their ids start with it.
    assert_eq!(first.len(), 2);
    for (id, posplus_id) in first.iter().zip([1, 2]) {
        assert!(id.starts_with(&format!("00000000-{posplus_id:04x}-8")), "{id}");
    }

    // Imported again: the same ids, nothing new.
    import(&node, &file, &[]);
    assert_eq!(ids(&node_db(&node)), first);
}

#[test]
fn tickets_imported_under_the_earlier_uuidv5_ids_are_not_imported_again() {
    let tmp = tempfile::tempdir().unwrap();
    let node = tmp.path().join("node");
    let pos_id = init(&node);
    let file = tmp.path().join("posplus.db");
    small_shop(&file, 1);
    import(&node, &file, &[]);
    // What an earlier version of the importer wrote: the same tickets under UUIDv5 ids.
    let db = node_db(&node);
    // The lines and payments are renamed after their ticket.
    db.execute_batch("PRAGMA foreign_keys = OFF").unwrap();
    let namespace = uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, b"possync.import.posplus");
    let ids: Vec<String> = db
        .prepare("SELECT id FROM tickets")
        .unwrap()
        .query_map([], |row| row.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(ids.len(), 2);
    for id in ids {
        let posplus_id = i64::from_str_radix(&id.replace('-', "")[..12], 16).unwrap();
        let legacy = uuid::Uuid::new_v5(&namespace, format!("ticket:{pos_id}:{posplus_id}").as_bytes());
        for (table, column) in
            [("tickets", "id"), ("ticket_lines", "ticket_id"), ("ticket_payments", "ticket_id")]
        {
            db.execute(
                &format!("UPDATE {table} SET {column} = ?1 WHERE {column} = ?2"),
                [&legacy.to_string(), &id],
            )
            .unwrap();
        }
    }
    drop(db);

    let again = import(&node, &file, &[]);
    assert_eq!(counts(&again, "tickets").0, 0, "no ticket created again: {again}");
    assert_eq!(scalar(&node_db(&node), "SELECT COUNT(*) FROM tickets"), "2");
}

#[test]
fn importing_twice_creates_nothing_twice() {
    let tmp = tempfile::tempdir().unwrap();
    let node = tmp.path().join("node");
    init(&node);
    let file = tmp.path().join("posplus.db");
    small_shop(&file, 1);
    import(&node, &file, &[]);
    let before = scalar(&node_db(&node), "SELECT COUNT(*) FROM sync_changes");

    let again = import(&node, &file, &[]);
    for table in ["categories", "products", "stock", "customers", "tickets", "cash_sessions", "z_reports"] {
        let (created, updated, _, _) = counts(&again, table);
        assert_eq!((created, updated), (0, 0), "{table}: {again}");
    }
    let db = node_db(&node);
    assert_eq!(scalar(&db, "SELECT COUNT(*) FROM sync_changes"), before, "the second run wrote changes");
    assert_eq!(scalar(&db, "SELECT COUNT(*) FROM products"), "3");
    assert_eq!(scalar(&db, "SELECT COUNT(*) FROM tickets"), "2");
    assert_eq!(scalar(&db, "SELECT stock FROM products WHERE sku = 'COF-1'"), "10");
}

#[test]
fn a_second_till_with_the_same_catalog_derives_the_same_product_ids() {
    let tmp = tempfile::tempdir().unwrap();
    let (till_a, till_b) = (tmp.path().join("a"), tmp.path().join("b"));
    init(&till_a);
    init(&till_b);
    // Till B's copy of the catalog has other integer ids (POSPlus numbers rows per till).
    let (file_a, file_b) = (tmp.path().join("a.db"), tmp.path().join("b.db"));
    small_shop(&file_a, 1);
    small_shop(&file_b, 100);
    import(&till_a, &file_a, &[]);
    import(&till_b, &file_b, &["--no-stock"]);
    let ids = |dir: &Path, sql: &str| -> Vec<(String, String)> {
        let db = node_db(dir);
        let mut statement = db.prepare(sql).unwrap();
        statement.query_map([], |row| Ok((row.get(0)?, row.get(1)?))).unwrap().map(Result::unwrap).collect()
    };
    let products = "SELECT sku, id FROM products ORDER BY sku";
    assert_eq!(ids(&till_a, products), ids(&till_b, products), "one product per SKU across tills");
    let categories = "SELECT name, id FROM categories ORDER BY name";
    assert_eq!(ids(&till_a, categories), ids(&till_b, categories));
    // Tickets are per till: different ids and numbers, never colliding.
    let tickets = "SELECT id, ticket_number FROM tickets ORDER BY ticket_number";
    let (tickets_a, tickets_b) = (ids(&till_a, tickets), ids(&till_b, tickets));
    assert_eq!(tickets_a.len(), 2);
    for ticket in &tickets_a {
        assert!(
            tickets_b.iter().all(|other| other.0 != ticket.0 && other.1 != ticket.1),
            "{tickets_a:?} {tickets_b:?}"
        );
    }
    // `--no-stock`: till B counted nothing.
    assert_eq!(scalar(&node_db(&till_b), "SELECT COUNT(*) FROM stock_movements"), "0");
}

#[test]
fn a_dry_run_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let node = tmp.path().join("node");
    init(&node);
    let file = tmp.path().join("posplus.db");
    small_shop(&file, 1);
    let summary = import(&node, &file, &["--dry-run"]);
    assert_eq!(summary["dryRun"], true);
    assert_eq!(counts(&summary, "products"), (3, 0, 0, 0), "the dry run counts what would be created");
    assert_eq!(counts(&summary, "tickets"), (2, 0, 0, 1));
    let db = node_db(&node);
    for table in ["sync_changes", "products", "categories", "customers", "tickets", "stock_movements"] {
        assert_eq!(scalar(&db, &format!("SELECT COUNT(*) FROM {table}")), "0", "{table}");
    }
    assert_eq!(scalar(&db, "SELECT value FROM settings WHERE key = 'p2p_sync_batch_size'"), "100");
    // And the real import afterwards creates everything (the rehearsal left no trace).
    let summary = import(&node, &file, &[]);
    assert_eq!(counts(&summary, "products"), (3, 0, 0, 0));
}

#[test]
fn a_file_that_is_not_a_known_posplus_database_is_refused_and_nothing_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let node = tmp.path().join("node");
    init(&node);

    let text_file = tmp.path().join("notes.txt");
    std::fs::write(&text_file, "this is not a database, just some text that is long enough ".repeat(40))
        .unwrap();
    assert!(import_fails(&node, &text_file).contains("is not a POSPlus database"));

    let other = tmp.path().join("other.db");
    Connection::open(&other).unwrap().execute_batch("CREATE TABLE products (id INTEGER, sku TEXT);").unwrap();
    let error = import_fails(&node, &other);
    assert!(error.contains("is not a POSPlus database") && error.contains("migrations"), "{error}");

    let missing_table = tmp.path().join("missing.db");
    small_shop(&missing_table, 1).execute_batch("DROP TABLE payments;").unwrap();
    let error = import_fails(&node, &missing_table);
    assert!(error.contains("table `payments` is missing"), "{error}");

    let future = tmp.path().join("future.db");
    small_shop(&future, 1)
        .execute("INSERT INTO migrations (name) VALUES ('012_loyalty_points.sql')", [])
        .unwrap();
    let error = import_fails(&node, &future);
    assert!(error.contains("schema version") && error.contains("012_loyalty_points.sql"), "{error}");

    assert!(import_fails(&node, &tmp.path().join("absent.db")).contains("no such file"));

    let db = node_db(&node);
    assert_eq!(scalar(&db, "SELECT COUNT(*) FROM sync_changes"), "0");
    assert_eq!(scalar(&db, "SELECT COUNT(*) FROM products"), "0");
}

#[test]
fn broken_rows_are_skipped_with_their_reason_and_the_rest_imported() {
    let tmp = tempfile::tempdir().unwrap();
    let node = tmp.path().join("node");
    init(&node);
    let file = tmp.path().join("broken.db");
    let conn = Connection::open(&file).unwrap();
    conn.execute_batch(&schema(true)).unwrap();
    for name in MIGRATIONS {
        conn.execute("INSERT INTO migrations (name) VALUES (?1)", [name]).unwrap();
    }
    // A damaged file: CHECK constraints were not enforced when these rows were written.
    conn.execute_batch(
        "PRAGMA ignore_check_constraints = ON;
         INSERT INTO categories (id, name) VALUES (1, 'Food');
         INSERT INTO products (id, sku, name, category_id, price, stock) VALUES
           (1, 'OK-1', 'Bread', 1, 1.2, 3),
           (2, 'ORPHAN', 'Ghost', 99, 1.0, 0),
           (3, 'NEG-1', 'Bad price', 1, -4.0, 0),
           (4, 'OK-1', 'Bread again', 1, 1.5, 0),
           (5, 'OK-2', 'Cake', 1, 3.0, 2),
           (6, 'LONG-1', printf('%.600c', 'x'), 1, 1.0, 0);
         INSERT INTO tickets (id, ticket_number, user_id, session_id, subtotal, total_amount, status, created_at)
           VALUES (1, 'T-1', 1, 1, 9.99, 9.99, 'completed', '2025-11-20 10:00:00'),
                  (2, 'T-2', 1, 1, 3.0, 3.0, 'completed', '2025-11-20 10:05:00');
         INSERT INTO ticket_lines (ticket_id, product_id, product_name, product_sku, quantity, unit_price, total_amount)
           VALUES (1, 1, 'Bread', 'OK-1', 1, 1.2, 1.2), (2, 5, 'Cake', 'OK-2', 1, 3.0, 3.0);
         INSERT INTO payments (ticket_id, method, amount) VALUES (2, 'cash', 3.0), (7, 'cash', 1.0);",
    )
    .unwrap();
    drop(conn);

    let summary = import(&node, &file, &[]);
    assert_eq!(counts(&summary, "products"), (2, 0, 0, 4));
    let reasons: Vec<String> = summary["skipped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| {
            format!(
                "{} #{}: {}",
                row["table"].as_str().unwrap(),
                row["posplusId"].as_str().unwrap(),
                row["reason"].as_str().unwrap()
            )
        })
        .collect();
    for expected in [
        "products #2: missing category #99",
        "products #3: negative price",
        "products #4: duplicate sku \"OK-1\" (POSPlus product #1 has it)",
        "tickets #1: totals (subtotal 9.99, discount 0, total 9.99) do not match its lines (1.2, 0, 1.2)",
        "payments #2: its ticket #7 does not exist",
        // Refused by the store itself, inside a batch of writes: the batch is redone row by
        // row and only this row is skipped.
        "products #6: invalid name: longer than 500 characters",
    ] {
        assert!(reasons.iter().any(|reason| reason == expected), "{expected:?} not in {reasons:#?}");
    }
    let db = node_db(&node);
    assert_eq!(
        scalar(&db, "SELECT group_concat(sku, ',') FROM (SELECT sku FROM products ORDER BY sku)"),
        "OK-1,OK-2"
    );
    assert_eq!(scalar(&db, "SELECT COUNT(*) FROM tickets"), "1");
    assert_eq!(scalar(&db, "SELECT stock FROM products WHERE sku = 'OK-2'"), "2");
    assert_eq!(
        scalar(&db, "SELECT MAX(seq) = COUNT(*) FROM sync_changes"),
        "1",
        "the change log has no gap where the refused row was"
    );
}

/// A `possync run` process, stopped when dropped.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_import_refuses_to_run_beside_the_running_node() {
    let tmp = tempfile::tempdir().unwrap();
    let node = tmp.path().join("node");
    init(&node);
    let file = tmp.path().join("posplus.db");
    small_shop(&file, 1);
    let child = StdCommand::new(BIN)
        .args(["run", "--no-discovery", "--data-dir"])
        .arg(&node)
        .env("POSSYNC_SECRET", "import-test-secret-2f7a")
        .env("POSSYNC_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _running = Running(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    // `status` also answers for a stopped node: wait until the running node answers.
    let answers = || {
        let status = possync().args(["status", "--json", "--data-dir"]).arg(&node).output().unwrap();
        serde_json::from_slice::<Value>(&status.stdout).is_ok_and(|status| status["serverRunning"] == true)
    };
    while !answers() {
        assert!(Instant::now() < deadline, "the node did not answer in 30 s");
        std::thread::sleep(Duration::from_millis(100));
    }
    let error = import_fails(&node, &file);
    assert!(error.contains("is running"), "{error}");
    assert_eq!(scalar(&node_db(&node), "SELECT COUNT(*) FROM products"), "0");
}

/// `possync run` of an initialised terminal, peer port `port`, dialling `peer` if given.
fn run_node(dir: &Path, port: u16, peer: Option<u16>) -> Running {
    let mut command = StdCommand::new(BIN);
    command.args(["run", "--no-discovery", "--port", &port.to_string(), "--data-dir"]).arg(dir);
    if let Some(peer) = peer {
        command.args(["--peer", &format!("127.0.0.1:{peer}")]);
    }
    let log = std::fs::File::create(dir.join("node.log")).unwrap();
    let child = command
        .env("POSSYNC_SECRET", "import-sync-secret-81c3")
        .env("POSSYNC_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    Running(child)
}

#[test]
fn two_tills_importing_copies_of_one_catalog_end_with_one_product_per_sku_after_sync() {
    let tmp = tempfile::tempdir().unwrap();
    let (till_a, till_b) = (tmp.path().join("a"), tmp.path().join("b"));
    init(&till_a);
    init(&till_b);
    let (file_a, file_b) = (tmp.path().join("a.db"), tmp.path().join("b.db"));
    small_shop(&file_a, 1);
    // Till B's copy: other integer ids, and a later price for the tea.
    small_shop(&file_b, 100).execute("UPDATE products SET price = 1.4 WHERE sku = 'TEA-1'", []).unwrap();
    import(&till_a, &file_a, &[]);
    import(&till_b, &file_b, &["--no-stock"]);

    let (port_a, port_b) = (free_port(), free_port());
    let _a = run_node(&till_a, port_a, None);
    let _b = run_node(&till_b, port_b, Some(port_a));
    let state = |dir: &Path| -> String {
        let db = node_db(dir);
        let rows = [
            "SELECT group_concat(sku || '=' || price || '/' || stock, ' ') FROM (SELECT * FROM products ORDER BY sku)",
            "SELECT COUNT(*) FROM products",
            "SELECT COUNT(*) FROM categories",
            "SELECT COUNT(*) FROM customers",
            "SELECT group_concat(ticket_number || ':' || status || ':' || total_amount, ' ')
               FROM (SELECT * FROM tickets ORDER BY ticket_number)",
            "SELECT COUNT(*) FROM stock_movements",
        ];
        rows.iter().map(|sql| scalar(&db, sql)).collect::<Vec<_>>().join(" | ")
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (a, b) = (state(&till_a), state(&till_b));
        if a == b && scalar(&node_db(&till_a), "SELECT COUNT(*) FROM tickets") == "4" {
            // One product per SKU; the stock counted once (on till A) is everyone's; B's
            // later import of the tea's price wins on both; each till's tickets on both, with
            // their own prefixes; customers without a number are per till (Ana twice), the
            // one with a number is one.
            assert!(a.starts_with("COF-1=2.5/10 CRO-1=1.01/0 TEA-1=1.4/5 | 3 | 3 | 3 |"), "{a}");
            assert!(a.ends_with("| 3"), "{a}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the tills did not converge in 60 s:\nA: {a}\nB: {b}\nA log: {}\nB log: {}",
            std::fs::read_to_string(till_a.join("node.log")).unwrap_or_default(),
            std::fs::read_to_string(till_b.join("node.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // The sales arrived whole, and moved no stock on the receiving till either.
    assert_eq!(scalar(&node_db(&till_b), "SELECT COUNT(*) FROM ticket_lines"), "4");
    assert_eq!(scalar(&node_db(&till_b), "SELECT COUNT(*) FROM stock_movements WHERE type = 'sale'"), "0");
}
