//! SIGKILL crash safety with real processes: terminal B is killed in the middle of its
//! catch-up of 10,000 products from A, restarted, and must end with exactly A's data, each
//! change applied once. Everything listens on 127.0.0.1 only.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use possync_core::EntityKind;
use possync_store::{Store, StoreReader, SystemEnvironment};
use serde_json::json;

const SECRET: &str = "crash-test-secret-0f4e9a7c31b2d8e6";
const PRODUCTS: i64 = 10_000;

/// Kills the child processes however the test ends.
struct Processes(Vec<Child>);

impl Drop for Processes {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn possync() -> Command {
    Command::new(env!("CARGO_BIN_EXE_possync"))
}

/// A port nobody listens on right now (bind :0, read it, drop it).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn init(dir: &Path, name: &str) {
    let output = possync().args(["init", "--data-dir"]).arg(dir).args(["--name", name]).output().unwrap();
    assert!(output.status.success(), "init failed: {}", String::from_utf8_lossy(&output.stderr));
    // Peers on loopback only.
    let config = dir.join("possync.toml");
    let text = std::fs::read_to_string(&config).unwrap().replace("\"0.0.0.0\"", "\"127.0.0.1\"");
    std::fs::write(&config, text).unwrap();
}

fn run(dir: &Path, port: u16, api_port: u16, peer: Option<u16>) -> Child {
    let mut command = possync();
    command
        .args(["run", "--data-dir"])
        .arg(dir)
        .args(["--no-discovery", "--port", &port.to_string(), "--api-port", &api_port.to_string()])
        .env("POSSYNC_SECRET", SECRET)
        .env("POSSYNC_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    if let Some(peer) = peer {
        command.args(["--peer", &format!("127.0.0.1:{peer}")]);
    }
    command.spawn().unwrap()
}

fn db(dir: &Path) -> PathBuf {
    dir.join(possync_store::DB_FILE)
}

/// A query on a fresh read-only connection (None while the file is not readable yet).
fn query_count(dir: &Path, sql: &str) -> Option<i64> {
    let reader = StoreReader::open(&db(dir)).ok()?;
    reader.query_json(sql).ok()?.first()?["n"].as_i64()
}

fn products(dir: &Path) -> i64 {
    query_count(dir, "SELECT COUNT(*) AS n FROM products").unwrap_or(0)
}

fn dump(dir: &Path) -> Option<String> {
    StoreReader::open(&db(dir)).ok()?.canonical_dump().ok()
}

#[test]
fn a_terminal_killed_during_catch_up_restarts_and_ends_identical_with_each_change_once() {
    let root = tempfile::tempdir().unwrap();
    let (a_dir, b_dir) = (root.path().join("a"), root.path().join("b"));
    init(&a_dir, "Till A");
    init(&b_dir, "Till B");

    // 10,000 products on A before it runs; small batches so that B's catch-up takes a while.
    {
        let mut store = Store::open(&db(&a_dir), Box::new(SystemEnvironment::default())).unwrap();
        store.set_setting("p2p_sync_batch_size", "10").unwrap();
        for i in 0..PRODUCTS {
            let body = json!({"id": format!("p-{i:05}"), "sku": format!("SKU-{i:05}"), "name": format!("Product {i}"), "price": "1.25"});
            store.create_record(EntityKind::Product, &body).unwrap();
        }
    }
    assert_eq!(products(&a_dir), PRODUCTS);

    let (a_port, a_api) = (free_port(), free_port());
    let (b_port, b_api) = (free_port(), free_port());
    let mut processes = Processes(vec![run(&a_dir, a_port, a_api, None)]);
    processes.0.push(run(&b_dir, b_port, b_api, Some(a_port)));

    // Kill B in the middle of its catch-up.
    let deadline = Instant::now() + Duration::from_secs(120);
    let at_kill = loop {
        let held = products(&b_dir);
        if (1..PRODUCTS).contains(&held) {
            break held;
        }
        assert!(held < PRODUCTS, "B finished its catch-up before it could be killed");
        assert!(Instant::now() < deadline, "B never started catching up");
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut b = processes.0.pop().unwrap();
    b.kill().unwrap(); // SIGKILL
    b.wait().unwrap();
    let after_kill = products(&b_dir);
    assert!(after_kill >= at_kill && after_kill < PRODUCTS, "killed at {at_kill}, holds {after_kill}");
    eprintln!("B killed holding {after_kill} of {PRODUCTS} products");

    // Restart B: it resumes and ends with everything.
    processes.0.push(run(&b_dir, b_port, b_api, Some(a_port)));
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        if products(&b_dir) == PRODUCTS && dump(&a_dir).is_some() && dump(&a_dir) == dump(&b_dir) {
            break;
        }
        assert!(Instant::now() < deadline, "B did not catch up after its restart: {}", products(&b_dir));
        std::thread::sleep(Duration::from_millis(200));
    }

    // Each change applied once: one success row per product, never two for the same one.
    let successes = query_count(
        &b_dir,
        "SELECT COUNT(*) AS n FROM p2p_sync_logs WHERE status = 'success' AND entity_type <> 'terminal'",
    )
    .unwrap();
    assert!(successes <= PRODUCTS, "{successes} success rows for {PRODUCTS} changes");
    let twice = query_count(
        &b_dir,
        "SELECT COUNT(*) AS n FROM (SELECT entity_id FROM p2p_sync_logs WHERE status = 'success'
         GROUP BY entity_id HAVING COUNT(*) > 1)",
    )
    .unwrap();
    assert_eq!(twice, 0, "some change was applied twice");
    let origins = query_count(
        &b_dir,
        "SELECT COUNT(*) AS n FROM (SELECT origin, seq FROM sync_changes GROUP BY origin, seq HAVING COUNT(*) > 1)",
    )
    .unwrap();
    assert_eq!(origins, 0);
    assert_eq!(query_count(&b_dir, "SELECT COUNT(*) AS n FROM products").unwrap(), PRODUCTS);
}
