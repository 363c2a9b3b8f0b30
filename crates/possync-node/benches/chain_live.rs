//! Live chain benchmark (issue 9): the figures that need live stores. A head office node runs
//! in a child process (this same binary with `POSSYNC_BENCH_ROLE=hq`, so that its memory can
//! be read alone); `POSSYNC_BENCH_STORES` (default 100) live store nodes, one till each, run
//! in this process; all on a real `nats-server -js` on 127.0.0.1. Figures in
//! `docs/BENCHMARKS.md`, section "Chain (NATS JetStream)", "Live stores":
//!
//! ```text
//! cargo bench -p possync-node --bench chain_live
//! ```
//!
//! 1. **Lag**: sales at `POSSYNC_BENCH_RATE` (default 1,000) per second across the chain for
//!    `POSSYNC_BENCH_SECONDS` (default 10), spread over the stores; for each sale, the time
//!    from its commit at the store (the write returned) to its ticket being readable in the
//!    head office's database (polled every 2 ms by a reader in this process): p50, p99, max.
//! 2. **Price fan-out**: the head office changes a price (`POSSYNC_BENCH_PRICES`, default 5
//!    times); for each store, the time from the head office's commit to the new price being
//!    readable in the store's database: p50, p99, max over every store and change.
//! 3. **A day offline**: one store's WAN (a TCP proxy in front of NATS) is cut; the store sells
//!    5,000 times and the head office makes 200 catalog changes; the link heals: time until
//!    the head office holds every one of the store's sales, and the store the last catalog
//!    change.
//! 4. **Memory**: the head office process's resident memory with no store, then with every
//!    store live and after their sales, per store.
//!
//! Baseline in the same run, for the lag: raw JetStream, no possync in the loop: messages of
//! a sale's size published (acked) at the same rate on the same server and read by a pull
//! consumer (explicit acks), from the publish call to the consumer holding the message.

#[path = "common/chain_node.rs"]
mod chain_node;
#[path = "../tests/common/nats.rs"]
mod nats;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures_util::StreamExt;
use possync_chain::StoreId;
use possync_core::{EntityId, EntityKind};
use possync_node::Node;
use possync_node::config::{BackboneConfig, ChainRole, HqConfig, UplinkConfig};
use possync_node::writer::Priority;
use possync_store::{DB_FILE, SaleRequest, Store, StoreReader, SystemEnvironment};
use serde_json::{Value, json};

const PRODUCTS: usize = 20;
const CHAIN: &str = "bench";

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|value| value.parse().ok()).unwrap_or(default)
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    if std::env::var("POSSYNC_BENCH_ROLE").as_deref() == Ok("hq") {
        runtime.block_on(head_office());
    } else if std::env::args().any(|arg| arg == "--bench") || std::env::args().count() == 1 {
        runtime.block_on(run());
    }
}

fn backbone(url: String) -> BackboneConfig {
    chain_node::backbone(url, CHAIN)
}

/// The child: a head office node with the catalog, taking commands on stdin
/// (`price <product> <price>`, `quit`) and answering `ok` once each is committed.
async fn head_office() {
    let dir = PathBuf::from(std::env::var("POSSYNC_BENCH_HQ_DIR").unwrap());
    let url = std::env::var("POSSYNC_BENCH_NATS").unwrap();
    let mut store =
        Store::init(&dir.join(DB_FILE), None, "head office", Box::new(SystemEnvironment::default())).unwrap();
    for p in 0..PRODUCTS {
        store
            .create_record(
                EntityKind::Product,
                &json!({"id": format!("p{p}"), "sku": format!("P{p}"), "name": "Tea", "price": 2}),
            )
            .unwrap();
    }
    let config = chain_node::node_config(
        &dir,
        ChainRole::Hq(HqConfig {
            backbone: backbone(url),
            silent_store_alert_secs: 900,
            store_offline_after_secs: possync_node::config::DEFAULT_STORE_OFFLINE_AFTER_SECS,
        }),
    );
    let node = Node::start_with_store(config, store).await.unwrap();
    println!("ready");
    let mut lines = BufReader::new(std::io::stdin()).lines();
    while let Some(Ok(line)) = tokio::task::block_in_place(|| lines.next()) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["price", product, price] => {
                let (id, body) = (EntityId::parse(*product).unwrap(), json!({"price": price}));
                node.shared
                    .writer
                    .call(Priority::Local, move |store| store.update_record(EntityKind::Product, &id, &body))
                    .await
                    .unwrap()
                    .unwrap();
                println!("ok");
            }
            _ => break,
        }
    }
    node.shutdown().await;
}

/// The head office child process and its pipes.
struct HeadOffice {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    db: PathBuf,
}

impl HeadOffice {
    fn start(dir: &Path, nats_url: &str) -> HeadOffice {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .env("POSSYNC_BENCH_ROLE", "hq")
            .env("POSSYNC_BENCH_HQ_DIR", dir)
            .env("POSSYNC_BENCH_NATS", nats_url)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "ready", "the head office did not start");
        HeadOffice { child, stdin, stdout, db: dir.join(DB_FILE) }
    }

    /// Sets a price at the head office; returns when it is committed there.
    fn set_price(&mut self, product: &str, price: &str) -> Instant {
        writeln!(self.stdin, "price {product} {price}").unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "ok");
        Instant::now()
    }

    /// Resident memory of the process, bytes.
    fn rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kib| kib * 1024)
    }

    fn stop(mut self) {
        let _ = writeln!(self.stdin, "quit");
        let _ = self.child.wait();
    }
}

struct Till {
    node: Node,
    _dir: tempfile::TempDir,
    db: PathBuf,
}

impl Till {
    async fn sell(&self, i: usize) -> (String, Instant) {
        let request: SaleRequest = serde_json::from_value(json!({
            "lines": [{"productId": format!("p{}", i % PRODUCTS), "quantity": 1}],
            "payments": [{"method": "card", "amount": 10}],
        }))
        .unwrap();
        let ticket = self
            .node
            .shared
            .writer
            .call(Priority::Local, move |store| store.record_sale(&request))
            .await
            .unwrap()
            .unwrap();
        (ticket["id"].as_str().unwrap().to_string(), Instant::now())
    }
}

async fn start_till(store: usize, url: String) -> Till {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(DB_FILE);
    let store_db = Store::init(&path, None, "till", Box::new(SystemEnvironment::default())).unwrap();
    let chain = ChainRole::Uplink(UplinkConfig {
        backbone: backbone(url),
        store: StoreId::parse(format!("s{store:03}")).unwrap(),
        report_every_secs: possync_node::config::DEFAULT_REPORT_EVERY_SECS,
    });
    let node = Node::start_with_store(chain_node::node_config(dir.path(), chain), store_db).await.unwrap();
    Till { node, _dir: dir, db: path }
}

fn one_value(reader: &StoreReader, sql: &str) -> Option<Value> {
    reader.query_json(sql).ok()?.into_iter().next()?.as_object()?.values().next().cloned()
}

fn percentiles(label: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize].as_secs_f64() * 1000.0;
    println!(
        "  {label}: n = {}, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        samples.len(),
        at(0.5),
        at(0.99),
        at(1.0)
    );
}

async fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < limit, "{what}: not done after {limit:?}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Publishes `rate` messages per second of a sale's change size for `seconds` on a stream of
/// its own, and times each from the publish call to a pull consumer holding it.
async fn raw_latency(url: &str, rate: usize, seconds: usize) {
    let client = async_nats::connect(url).await.unwrap();
    let js = jetstream::new(client);
    let raw = chain_node::raw_stream(&js).await;
    let consumer = chain_node::raw_consumer(&raw).await;
    let total = rate * seconds;
    let sent: Arc<Mutex<Vec<Option<Instant>>>> = Arc::new(Mutex::new(vec![None; total]));
    let reader = {
        let sent = Arc::clone(&sent);
        tokio::spawn(async move {
            let mut messages = consumer.messages().await.unwrap();
            let mut lags = Vec::with_capacity(total);
            while lags.len() < total {
                let message = messages.next().await.unwrap().unwrap();
                let at = Instant::now();
                let index: usize =
                    std::str::from_utf8(&message.payload[..8]).unwrap().trim().parse().unwrap();
                if let Some(sent) = sent.lock().unwrap()[index] {
                    lags.push(at.saturating_duration_since(sent));
                }
                message.ack().await.unwrap();
            }
            lags
        })
    };
    let body = "x".repeat(1_300);
    let mut interval = tokio::time::interval(Duration::from_millis(10));
    let per_tick = (rate / 100).max(1);
    let mut acks = tokio::task::JoinSet::new();
    let mut index = 0;
    while index < total {
        interval.tick().await;
        for _ in 0..per_tick.min(total - index) {
            let payload = format!("{index:>8}{body}");
            sent.lock().unwrap()[index] = Some(Instant::now());
            let ack = js.publish(format!("raw.{}", index % 100), payload.into()).await.unwrap();
            acks.spawn(async move { ack.await.unwrap() });
            index += 1;
        }
    }
    while acks.join_next().await.is_some() {}
    let lags = reader.await.unwrap();
    println!(
        "\n0. baseline: raw JetStream, publish -> pull consumer ({total} messages of 1.3 KB at {rate}/s):"
    );
    percentiles("latency", lags);
    js.delete_stream("RAW").await.unwrap();
}

async fn run() {
    let stores = env_or("POSSYNC_BENCH_STORES", 100);
    let rate = env_or("POSSYNC_BENCH_RATE", 1000);
    let seconds = env_or("POSSYNC_BENCH_SECONDS", 10);
    let prices = env_or("POSSYNC_BENCH_PRICES", 5);
    let offline_sales = env_or("POSSYNC_BENCH_OFFLINE_SALES", 5000);
    let offline_catalog = env_or("POSSYNC_BENCH_OFFLINE_CATALOG", 200);
    let server = nats::NatsServer::start();
    let upstream: std::net::SocketAddr = server.url().trim_start_matches("nats://").parse().unwrap();
    let proxy = nats::Proxy::start(upstream).await;
    println!("live chain bench: {stores} stores, nats-server {}", nats::server_binary().display());

    let hq_dir = tempfile::tempdir().unwrap();
    let mut hq = HeadOffice::start(hq_dir.path(), &server.url());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_idle = hq.rss();

    // Store 0 reaches NATS through the proxy (its WAN), the others directly.
    let started = Instant::now();
    let mut tills = Vec::with_capacity(stores);
    for s in 0..stores {
        let url = if s == 0 { proxy.url() } else { server.url() };
        tills.push(Arc::new(start_till(s, url).await));
    }
    let readers: Vec<StoreReader> = tills.iter().map(|till| StoreReader::open(&till.db).unwrap()).collect();
    let hq_reader = StoreReader::open(&hq.db).unwrap();
    let has_catalog =
        |reader: &StoreReader| reader.count_records(EntityKind::Product).ok() == Some(PRODUCTS as u64);
    wait_for("every store has the catalog", Duration::from_secs(120), || readers.iter().all(has_catalog))
        .await;
    println!("  {stores} stores started and given the catalog in {:.1} s", started.elapsed().as_secs_f64());

    // The baseline: raw JetStream at the same rate and size, before the load.
    raw_latency(&server.url(), rate, seconds.min(5)).await;

    // 1. Lag under load.
    let committed: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let total = rate * seconds;
    let seen = Arc::new(Mutex::new(HashMap::<String, Instant>::new()));
    let watcher = {
        let (seen, db) = (Arc::clone(&seen), hq.db.clone());
        std::thread::spawn(move || {
            let reader = StoreReader::open(&db).unwrap();
            let mut after = 0i64;
            loop {
                let rows = reader
                    .query_json(&format!(
                        "SELECT rowid AS r, id FROM tickets WHERE rowid > {after} ORDER BY rowid"
                    ))
                    .unwrap();
                let now = Instant::now();
                let mut seen = seen.lock().unwrap();
                for row in rows {
                    after = after.max(row["r"].as_i64().unwrap());
                    seen.insert(row["id"].as_str().unwrap().to_string(), now);
                }
                if seen.len() >= total {
                    return;
                }
                drop(seen);
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    let tick = Duration::from_millis(10);
    let per_tick = (rate / 100).max(1);
    let mut interval = tokio::time::interval(tick);
    let load = Instant::now();
    let mut sold = 0;
    let mut writes = tokio::task::JoinSet::new();
    while sold < total {
        interval.tick().await;
        for _ in 0..per_tick.min(total - sold) {
            let till = Arc::clone(&tills[sold % stores]);
            let committed = Arc::clone(&committed);
            let i = sold;
            writes.spawn(async move {
                let (id, at) = till.sell(i).await;
                committed.lock().unwrap().insert(id, at);
            });
            sold += 1;
        }
    }
    while writes.join_next().await.is_some() {}
    let offered = load.elapsed();
    tokio::task::spawn_blocking(move || watcher.join().unwrap()).await.unwrap();
    let lags: Vec<Duration> = {
        let committed = committed.lock().unwrap();
        let seen = seen.lock().unwrap();
        committed.iter().map(|(id, at)| seen[id].saturating_duration_since(*at)).collect()
    };
    println!(
        "\n1. lag, store commit -> head office commit ({total} sales at {:.0}/s across {stores} stores):",
        total as f64 / offered.as_secs_f64()
    );
    percentiles("lag", lags);

    // 4. Memory (after the load: every store live, its sales ingested).
    let rss_live = hq.rss();

    // 2. Price fan-out.
    let mut fanout = Vec::new();
    for round in 0..prices {
        let price = format!("{}.{:02}", 3 + round, round + 1);
        let product = format!("p{}", round % PRODUCTS);
        let committed = hq.set_price(&product, &price);
        let sql = format!("SELECT price FROM products WHERE id = '{product}'");
        let mut pending: Vec<usize> = (0..stores).collect();
        while !pending.is_empty() {
            assert!(committed.elapsed() < Duration::from_secs(60), "{} stores lack the price", pending.len());
            pending.retain(|&s| {
                let arrived = one_value(&readers[s], &sql).and_then(|v| v.as_str().map(str::to_string))
                    == Some(price.clone());
                if arrived {
                    fanout.push(committed.elapsed());
                }
                !arrived
            });
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    println!(
        "\n2. a price from the head office applied in every store ({prices} changes x {stores} stores):"
    );
    percentiles("fan-out", fanout);

    // 3. A day offline.
    proxy.cut();
    let offline = Arc::clone(&tills[0]);
    let pos = offline.node.shared.identity.pos_id.clone();
    for i in 0..offline_sales {
        offline.sell(i).await;
    }
    let mut last_price = String::new();
    for change in 0..offline_catalog {
        last_price = format!("{}.{:02}", 10 + change / 100, change % 100);
        hq.set_price(&format!("p{}", change % PRODUCTS), &last_price);
    }
    let last_product = format!("p{}", (offline_catalog - 1) % PRODUCTS);
    let expected_tickets = (offline_sales + total.div_ceil(stores)) as u64;
    let healed = Instant::now();
    proxy.heal();
    let (mut up, mut down) = (None, None);
    while up.is_none() || down.is_none() {
        assert!(healed.elapsed() < Duration::from_secs(300), "the offline store did not catch up");
        if up.is_none() && hq_reader.ticket_count_of(&pos).ok() == Some(expected_tickets) {
            up = Some(healed.elapsed());
        }
        if down.is_none()
            && one_value(&readers[0], &format!("SELECT price FROM products WHERE id = '{last_product}'"))
                .and_then(|v| v.as_str().map(str::to_string))
                == Some(last_price.clone())
        {
            down = Some(healed.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    println!(
        "\n3. a store offline for a day ({offline_sales} sales, {offline_catalog} catalog changes), after the link heals:"
    );
    println!("  store -> head office: every sale held after {:.2} s", up.unwrap().as_secs_f64());
    println!(
        "  head office -> store: the last catalog change applied after {:.2} s",
        down.unwrap().as_secs_f64()
    );

    println!("\n4. head office memory:");
    println!(
        "  resident: {:.1} MB with no store, {:.1} MB with {stores} live stores after their {total} sales: {:.0} KB per store",
        rss_idle as f64 / 1e6,
        rss_live as f64 / 1e6,
        (rss_live.saturating_sub(rss_idle)) as f64 / stores as f64 / 1e3
    );

    for till in tills {
        if let Ok(till) = Arc::try_unwrap(till) {
            till.node.shutdown().await;
        }
    }
    hq.stop();
}
