//! Network benchmarks of possync-node (issue "Terminals talk"); figures in
//! `docs/BENCHMARKS.md`, section "Network (possync-node)".
//!
//! ```text
//! CARGO_TARGET_DIR=/tmp/target-netbench cargo bench -p possync-node --bench network [-- FIGURE...]
//! ```
//!
//! FIGURE is any of `propagation throughput catchup memory wire` (default: all).
//! `POSSYNC_BENCH_RUNS` (default 5) runs per figure; medians with min and max over runs.
//! `POSSYNC_BENCH_SCALE` (default 1.0) multiplies every size, for a quick CI smoke run.
//!
//! Every node runs in this process on 127.0.0.1 (discovery and API off), except for the
//! memory figure, which runs the node and the clients in two child processes (this binary
//! started again with `POSSYNC_BENCH_CHILD`) so that each side's resident memory is its
//! own. Each figure is measured against a baseline taken in the same run, interleaved.

use std::io::{BufRead, BufReader, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use possync_core::protocol::{
    BatchApplied, Body, Event, Message, Role, Session, SessionConfig, StampedChange, SyncBatch,
};
use possync_core::{EntityId, EntityKind, PosId, VersionVector, WireChange};
use possync_node::config::NodeConfig;
use possync_node::transport::{self, ChannelConfig};
use possync_node::writer::Priority;
use possync_node::{Node, NodeShared};
use possync_store::{DB_FILE, Outgoing, PeerRef, Store, StoreReader, SystemEnvironment};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;

const SECRET: &str = "bench secret: 0123456789abcdef0123456789abcdef";
const WAIT: Duration = Duration::from_secs(120);

// ---------------------------------------------------------------------------------------
// Settings and statistics
// ---------------------------------------------------------------------------------------

struct Settings {
    runs: usize,
    scale: f64,
    figures: Vec<String>,
}

impl Settings {
    fn from_env() -> Settings {
        let runs = std::env::var("POSSYNC_BENCH_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(5usize);
        let scale = std::env::var("POSSYNC_BENCH_SCALE").ok().and_then(|v| v.parse().ok()).unwrap_or(1.0f64);
        let figures: Vec<String> = std::env::args()
            .skip(1)
            .filter(|arg| !arg.starts_with('-'))
            .map(|arg| arg.to_lowercase())
            .collect();
        Settings { runs: runs.max(1), scale, figures }
    }

    fn n(&self, full: usize, min: usize) -> usize {
        ((full as f64 * self.scale) as usize).max(min)
    }

    fn wants(&self, figure: &str) -> bool {
        self.figures.is_empty() || self.figures.iter().any(|f| f == figure)
    }
}

/// Percentile of an unsorted sample (nearest rank).
fn percentile(sample: &[f64], q: f64) -> f64 {
    let mut sorted = sample.to_vec();
    sorted.sort_by(f64::total_cmp);
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// Median, min and max over runs.
#[derive(Clone, Copy)]
struct Spread {
    median: f64,
    min: f64,
    max: f64,
}

fn spread(values: &[f64]) -> Spread {
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    Spread { median: percentile(values, 0.5), min, max }
}

impl Spread {
    fn show(&self, digits: usize) -> String {
        format!("{:.d$} ({:.d$}–{:.d$})", self.median, self.min, self.max, d = digits)
    }
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

fn met(ok: bool) -> &'static str {
    if ok { "yes" } else { "**no**" }
}

// ---------------------------------------------------------------------------------------
// Nodes
// ---------------------------------------------------------------------------------------

fn new_store(dir: &Path, name: &str) -> Store {
    std::fs::create_dir_all(dir).expect("create the node directory");
    let mut store = Store::init(&dir.join(DB_FILE), None, name, Box::new(SystemEnvironment::default()))
        .expect("init store");
    // These benches measure what the engine can carry, not the shop's policy: lift the
    // per-peer live rate limit (1,000 changes/s by default).
    store.set_setting("p2p_peer_max_changes_per_second", "1000000").expect("setting");
    store
}

fn node_config(dir: &Path, peers: &[SocketAddr]) -> NodeConfig {
    NodeConfig {
        data_dir: dir.to_path_buf(),
        peer_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        api_listen: None,
        static_peers: peers.iter().map(ToString::to_string).collect(),
        discovery: false,
        secret: SECRET.into(),
        api_token: "bench".into(),
        max_connections: 1024,
        max_frame_bytes: 16 * 1024 * 1024,
        backoff_base_ms: 50,
        chain: None,
        api: Default::default(),
    }
}

async fn start(dir: &Path, store: Store, peers: &[SocketAddr]) -> Node {
    Node::start_with_store(node_config(dir, peers), store).await.expect("start node")
}

fn product_id(index: usize) -> EntityId {
    EntityId::parse(format!("bench-p{index:06}")).expect("valid id")
}

fn product_body(index: usize) -> serde_json::Value {
    json!({"id": product_id(index).as_str(), "sku": format!("SKU-{index:06}"),
           "name": format!("Product {index}"), "price": "1.50"})
}

async fn local<T, F>(node: &Arc<NodeShared>, job: F) -> T
where
    T: Send + 'static,
    F: FnOnce(&mut Store) -> T + Send + 'static,
{
    node.writer.call(Priority::Local, job).await.expect("writer running")
}

async fn create_products(node: &Arc<NodeShared>, range: std::ops::Range<usize>) {
    for index in range {
        local(node, move |store| store.create_record(EntityKind::Product, &product_body(index)))
            .await
            .expect("create product");
    }
}

/// `updates` price updates through `node`'s writer from `callers` tasks at once (update
/// `i` by task `i % callers`, of product `i % products`), each awaiting its answer.
async fn update_prices_concurrently(node: &Arc<NodeShared>, callers: usize, updates: usize, products: usize) {
    let mut tasks = tokio::task::JoinSet::new();
    for caller in 0..callers {
        let node = Arc::clone(node);
        tasks.spawn(async move {
            let mut index = caller;
            while index < updates {
                update_price(&node, index % products, index).await;
                index += callers;
            }
        });
    }
    while tasks.join_next().await.is_some() {}
}

async fn update_price(node: &Arc<NodeShared>, index: usize, cents: usize) {
    let body = json!({"price": format!("{}.{:02}", 1 + cents / 100 % 1000, cents % 100)});
    local(node, move |store| store.update_record(EntityKind::Product, &product_id(index), &body))
        .await
        .expect("update product");
}

/// The origin and seq of a change.
fn stamp(change: &WireChange) -> Option<(String, u64)> {
    let stamp = change.peek_stamp()?;
    Some((stamp.origin.as_str().to_owned(), stamp.seq.0))
}

async fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Waits on `feed` (B's applied changes) until B holds `origin`'s change `target`.
async fn wait_holds(
    node: &Arc<NodeShared>,
    feed: &mut broadcast::Receiver<Arc<Outgoing>>,
    origin: &PosId,
    target: u64,
) {
    let deadline = Instant::now() + WAIT;
    loop {
        assert!(Instant::now() < deadline, "timed out waiting for seq {target}");
        match tokio::time::timeout(Duration::from_millis(50), feed.recv()).await {
            Ok(Ok(change)) => {
                if let Some((from, seq)) = stamp(&change.change)
                    && from == origin.as_str()
                    && seq >= target
                {
                    return;
                }
                continue;
            }
            Ok(Err(broadcast::error::RecvError::Closed)) => panic!("writer stopped"),
            Ok(Err(broadcast::error::RecvError::Lagged(_))) | Err(_) => {}
        }
        if node.summary().await.is_some_and(|vv| vv.get(origin).0 >= target) {
            return;
        }
    }
}

/// Two fresh nodes, B dialling A, connected and live.
struct Pair {
    _dir: tempfile::TempDir,
    a: Node,
    b: Node,
}

impl Pair {
    async fn start(products: usize) -> Pair {
        let dir = tempfile::tempdir().expect("tempdir");
        let a_dir = dir.path().join("a");
        let a = start(&a_dir, new_store(&a_dir, "A"), &[]).await;
        let a_addr = a.peer_addr.expect("A listens");
        let b_dir = dir.path().join("b");
        let b = start(&b_dir, new_store(&b_dir, "B"), &[a_addr]).await;
        let (sa, sb) = (Arc::clone(&a.shared), Arc::clone(&b.shared));
        wait_until("the pair to connect", || sa.peers.connected() == 1 && sb.peers.connected() == 1).await;
        let mut feed = b.shared.writer.subscribe();
        create_products(&a.shared, 0..products.max(1)).await;
        let target = a.shared.summary().await.expect("summary").get(a.pos_id()).0;
        wait_holds(&b.shared, &mut feed, a.pos_id(), target).await;
        Pair { _dir: dir, a, b }
    }

    async fn stop(self) {
        self.b.shutdown().await;
        self.a.shutdown().await;
    }
}

/// Every change in a database's log, in log order.
fn read_log(path: &Path) -> Vec<WireChange> {
    let reader = StoreReader::open(path).expect("reader");
    let mut changes = Vec::new();
    let mut cursor = 0;
    loop {
        let selection = reader.select_changes(&VersionVector::new(), cursor, 1000).expect("select");
        changes.extend(selection.changes);
        cursor = selection.next_cursor;
        if !selection.has_more {
            return changes;
        }
    }
}

/// A third terminal C's changes, made without C: templates from one real create and one
/// real update on a scratch store whose posId is C's, then restamped (id, seq, hlc, ctx).
/// Lets the benches feed A with changes as fast as A's writer applies them (no fsync per
/// local write) and build a large catalog quickly.
struct Synthetic {
    origin: PosId,
    /// C's store: it signs every synthetic change, as C would (issue 13, item 3).
    store: Store,
    _dir: tempfile::TempDir,
    /// C's key enrollment (its change 1), sent before its first create.
    enroll: Option<WireChange>,
    create: WireChange,
    update: WireChange,
    next_seq: u64,
    base_ms: u64,
}

impl Synthetic {
    fn new() -> Synthetic {
        let origin = PosId::parse("bench-terminal-c").expect("posId");
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = Store::init(
            &dir.path().join(DB_FILE),
            Some(origin.clone()),
            "C",
            Box::new(SystemEnvironment::default()),
        )
        .expect("init C");
        store.create_record(EntityKind::Product, &product_body(0)).expect("create");
        store.update_record(EntityKind::Product, &product_id(0), &json!({"price": "2.25"})).expect("update");
        let mut log = store.drain_outbox().into_iter().map(|outgoing| outgoing.change);
        let enroll = log.next().expect("enroll");
        assert_eq!(enroll.entity, "terminal", "C's first change enrolls its key");
        let (create, update) = (log.next().expect("create"), log.next().expect("update"));
        Synthetic {
            origin,
            store,
            _dir: dir,
            enroll: Some(enroll),
            create,
            update,
            next_seq: 2,
            base_ms: now_ms() - 86_400_000,
        }
    }

    fn restamp(&mut self, mut change: WireChange, index: usize) -> WireChange {
        let seq = self.next_seq;
        self.next_seq += 1;
        let ms = self.base_ms + seq / 1000;
        change.edit_data(|data| {
            data["id"] = json!(product_id(index).as_str());
            data["updatedAt"] = json!(possync_core::time::rfc3339_ms(ms));
            let sync = &mut data["sync"];
            sync["seq"] = json!(seq);
            sync["hlc"] = json!(format!("{ms}-{}", seq % 1000));
            sync["ctx"] = json!({ self.origin.as_str(): seq });
        });
        change
    }

    /// Product creates (preceded, the first time, by C's key enrollment), signed by C.
    fn creates(&mut self, range: std::ops::Range<usize>) -> Vec<WireChange> {
        let enroll = self.enroll.take();
        let creates: Vec<WireChange> = range
            .map(|index| {
                let mut change = self.restamp(self.create.clone(), index);
                change.edit_data(|data| {
                    data["sku"] = json!(format!("SKU-{index:06}"));
                    data["name"] = json!(format!("Product {index}"));
                });
                self.store.sign(&mut change);
                change
            })
            .collect();
        enroll.into_iter().chain(creates).collect()
    }

    /// `count` price updates of products `first..first + products`, round robin.
    fn updates(&mut self, count: usize, first: usize, products: usize) -> Vec<WireChange> {
        (0..count)
            .map(|index| {
                let mut change = self.restamp(self.update.clone(), first + index % products);
                change.edit_data(|data| {
                    data["price"] = json!(format!("{}.{:02}", 1 + index / 100 % 1000, index % 100));
                });
                self.store.sign(&mut change);
                change
            })
            .collect()
    }
}

// ---------------------------------------------------------------------------------------
// Baselines: the secure channel alone, the engine alone
// ---------------------------------------------------------------------------------------

/// Round trips of one `size`-byte frame over the secure channel (connect/accept, echo).
async fn channel_round_trips(count: usize, size: usize) -> Vec<f64> {
    let config = ChannelConfig::from_secret(SECRET);
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server_config = config.clone();
    let echo = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.expect("accept");
        let mut channel = transport::accept(stream, &server_config).await.expect("secure accept");
        while let Ok(Some(frame)) = channel.recv().await {
            if channel.send(&frame).await.is_err() {
                break;
            }
        }
    });
    let mut channel = transport::connect(addr, &config).await.expect("secure connect");
    let frame = "x".repeat(size);
    let mut times = Vec::with_capacity(count);
    for index in 0..count + 100 {
        let started = Instant::now();
        channel.send(&frame).await.expect("send");
        channel.recv().await.expect("recv").expect("echo");
        if index >= 100 {
            times.push(ms(started.elapsed()));
        }
    }
    channel.close("done").await;
    let _ = echo.await;
    times
}

/// Applies `changes` on a fresh store, `batch` per transaction; returns the time per call.
fn apply_in_process(from: &PosId, changes: &[WireChange], batch: usize) -> (Duration, Vec<f64>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = new_store(dir.path(), "baseline");
    let peer = PeerRef { id: from.as_str(), name: "A" };
    let mut per_call = Vec::with_capacity(changes.len() / batch + 1);
    // Owned batches, as a connection decodes them; cut before the clock starts.
    let chunks: Vec<Vec<WireChange>> = changes.chunks(batch).map(<[WireChange]>::to_vec).collect();
    let started = Instant::now();
    for chunk in chunks {
        let call = Instant::now();
        let len = chunk.len();
        let report = store.apply_batch(peer, chunk).expect("apply");
        assert_eq!(report.applied as usize, len, "baseline applies everything");
        per_call.push(ms(call.elapsed()));
    }
    (started.elapsed(), per_call)
}

/// Local product updates on a store in this thread: time per update.
fn local_updates_in_process(count: usize) -> Vec<f64> {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = new_store(dir.path(), "baseline");
    store.create_record(EntityKind::Product, &product_body(0)).expect("create");
    (0..count)
        .map(|index| {
            let started = Instant::now();
            let body = json!({"price": format!("2.{:02}", index % 100)});
            store.update_record(EntityKind::Product, &product_id(0), &body).expect("update");
            ms(started.elapsed())
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// Figures
// ---------------------------------------------------------------------------------------

async fn propagation(settings: &Settings) {
    let updates = settings.n(2_000, 200);
    println!(
        "\n### Propagation: one product update on A until applied on B ({updates} sequential updates per run)\n"
    );
    let (mut p50, mut p99, mut write50) = (Vec::new(), Vec::new(), Vec::new());
    let (mut net50, mut net99, mut netbase50, mut netbase99) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut rtt50, mut rtt99, mut apply50, mut apply99, mut lw50, mut lw99) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut ratio50, mut ratio99) = (Vec::new(), Vec::new());
    for run in 0..settings.runs {
        // Baseline first on even runs, engine first on odd runs.
        let mut engine = None;
        let mut baseline = None;
        for step in 0..2 {
            if (step + run) % 2 == 0 {
                let pair = Pair::start(1).await;
                let mut feed = pair.b.shared.writer.subscribe();
                let origin = pair.a.pos_id().as_str().to_owned();
                let (mut total, mut write) = (Vec::new(), Vec::new());
                for index in 0..updates + 100 {
                    let started = Instant::now();
                    update_price(&pair.a.shared, 0, index).await;
                    let written = started.elapsed();
                    loop {
                        let change = tokio::time::timeout(WAIT, feed.recv())
                            .await
                            .expect("propagation timed out")
                            .expect("feed");
                        if stamp(&change.change).is_some_and(|(from, _)| from == origin) {
                            break;
                        }
                    }
                    if index >= 100 {
                        total.push(ms(started.elapsed()));
                        write.push(ms(written));
                    }
                }
                let changes = read_log(&pair.a.shared.config.db_path());
                let from = pair.a.pos_id().clone();
                pair.stop().await;
                engine = Some((total, write, from, changes));
            } else {
                let rtt = channel_round_trips(updates, 450).await;
                let local = tokio::task::spawn_blocking(move || local_updates_in_process(updates))
                    .await
                    .expect("join");
                baseline = Some((rtt, local));
            }
        }
        let (total, write, from, changes) = engine.expect("engine ran");
        let (rtt, local) = baseline.expect("baseline ran");
        // The in-process apply of one change: the same live changes, one per transaction.
        let (_, apply) =
            tokio::task::spawn_blocking(move || apply_in_process(&from, &changes, 1)).await.expect("join");
        let apply = &apply[1..]; // the product create
        let base50 = percentile(&local, 0.5) + percentile(&rtt, 0.5) / 2.0 + percentile(apply, 0.5);
        let base99 = percentile(&local, 0.99) + percentile(&rtt, 0.99) / 2.0 + percentile(apply, 0.99);
        let net: Vec<f64> = total.iter().zip(&write).map(|(t, w)| t - w).collect();
        net50.push(percentile(&net, 0.5));
        net99.push(percentile(&net, 0.99));
        netbase50.push(percentile(&rtt, 0.5) / 2.0 + percentile(apply, 0.5));
        netbase99.push(percentile(&rtt, 0.99) / 2.0 + percentile(apply, 0.99));
        p50.push(percentile(&total, 0.5));
        p99.push(percentile(&total, 0.99));
        write50.push(percentile(&write, 0.5));
        rtt50.push(percentile(&rtt, 0.5));
        rtt99.push(percentile(&rtt, 0.99));
        apply50.push(percentile(apply, 0.5));
        apply99.push(percentile(apply, 0.99));
        lw50.push(percentile(&local, 0.5));
        lw99.push(percentile(&local, 0.99));
        ratio50.push(percentile(&total, 0.5) / base50);
        ratio99.push(percentile(&total, 0.99) / base99);
        eprintln!(
            "  run {run}: p50 {:.3} ms p99 {:.3} ms (write on A {:.3}); rtt p50 {:.3}; apply p50 {:.3}; local write p50 {:.3}",
            percentile(&total, 0.5),
            percentile(&total, 0.99),
            percentile(&write, 0.5),
            percentile(&rtt, 0.5),
            percentile(apply, 0.5),
            percentile(&local, 0.5)
        );
    }
    let p99s = spread(&p99);
    println!("| quantity | engine (ms) | baseline (ms) | ratio | target | met? |");
    println!("|---|---|---|---|---|---|");
    println!(
        "| p50 A write → B applied | {} | {} | {} | — | — |",
        spread(&p50).show(3),
        spread(&lw50.iter().zip(&rtt50).zip(&apply50).map(|((l, r), a)| l + r / 2.0 + a).collect::<Vec<_>>())
            .show(3),
        spread(&ratio50).show(2)
    );
    println!(
        "| p99 A write → B applied | {} | {} | {} | ≤ 2 ms | {} |",
        p99s.show(3),
        spread(&lw99.iter().zip(&rtt99).zip(&apply99).map(|((l, r), a)| l + r / 2.0 + a).collect::<Vec<_>>())
            .show(3),
        spread(&ratio99).show(2),
        met(p99s.median <= 2.0)
    );
    let (n50, n99) = (spread(&net50), spread(&net99));
    let ratio = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x / y).collect::<Vec<_>>();
    println!(
        "| p50 A committed → B applied | {} | {} | {} | — | — |",
        n50.show(3),
        spread(&netbase50).show(3),
        spread(&ratio(&net50, &netbase50)).show(2)
    );
    println!(
        "| p99 A committed → B applied | {} | {} | {} | ≤ 2 ms | {} |",
        n99.show(3),
        spread(&netbase99).show(3),
        spread(&ratio(&net99, &netbase99)).show(2),
        met(n99.median <= 2.0)
    );
    println!(
        "\nBaseline parts (medians of runs, p50 / p99 ms): local update on a store in one thread {:.3} / {:.3}; \
              secure-channel round trip of a 450-byte frame {:.3} / {:.3} (one way = half); in-process apply of \
              one change (one transaction) {:.3} / {:.3}. Engine: A's local write alone (writer call) p50 {:.3}.",
        spread(&lw50).median,
        spread(&lw99).median,
        spread(&rtt50).median,
        spread(&rtt99).median,
        spread(&apply50).median,
        spread(&apply99).median,
        spread(&write50).median
    );
}

async fn throughput(settings: &Settings) {
    let updates = settings.n(5_000, 1_000);
    const PRODUCTS: usize = 100;
    const PRODUCERS: usize = 8;
    println!(
        "\n### Throughput: product updates reaching A as fast as its writer takes them, until B applied all\n"
    );
    let (mut rates, mut write_rates, mut base_rates, mut single_rates, mut ratios, mut frames) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for run in 0..settings.runs {
        let pair = Pair::start(PRODUCTS).await;
        let a = Arc::clone(&pair.a.shared);
        let origin = pair.a.pos_id().clone();
        let mut feed = pair.b.shared.writer.subscribe();
        let frames_before = a.peers.detailed_stats().total_messages_sent;
        let started = Instant::now();
        update_prices_concurrently(&a, PRODUCERS, updates, PRODUCTS).await;
        let written = started.elapsed();
        let target = a.summary().await.expect("summary").get(&origin).0;
        wait_holds(&pair.b.shared, &mut feed, &origin, target).await;
        let elapsed = started.elapsed();
        let sent = a.peers.detailed_stats().total_messages_sent - frames_before;
        let changes = read_log(&a.config.db_path());
        pair.stop().await;
        let rate = updates as f64 / elapsed.as_secs_f64();
        // Baseline: the same changes applied in process, batches of 100 (and of 1).
        let (batched, single) = tokio::task::spawn_blocking(move || {
            let (batched, _) = apply_in_process(&origin, &changes, 100);
            let (single, _) = apply_in_process(&origin, &changes, 1);
            (changes.len() as f64 / batched.as_secs_f64(), changes.len() as f64 / single.as_secs_f64())
        })
        .await
        .expect("join");
        eprintln!(
            "  run {run}: {rate:.0}/s end to end ({:.0}/s written on A), {sent} frames A→B; in process {batched:.0}/s \
             (batches of 100), {single:.0}/s (one per transaction)",
            updates as f64 / written.as_secs_f64()
        );
        rates.push(rate);
        write_rates.push(updates as f64 / written.as_secs_f64());
        base_rates.push(batched);
        single_rates.push(single);
        ratios.push(rate / batched);
        frames.push(sent as f64);
    }
    let relay = relay_throughput(settings).await;
    let (rate, ratio) = (spread(&rates), spread(&ratios));
    println!("| quantity | engine | baseline | ratio | target | met? |");
    println!("|---|---|---|---|---|---|");
    let (relay_rate, relay_base, relay_ratio) = relay;
    println!(
        "| changes/s A → B, A relaying a third terminal's changes ({} updates) | {} | {} (in-process `apply_batch`, batches of 100) | {} | ≥ 20,000/s and ratio ≥ 0.5 | {} |",
        settings.n(50_000, 2_000),
        relay_rate.show(0),
        relay_base.show(0),
        relay_ratio.show(2),
        met(relay_rate.median >= 20_000.0 && relay_ratio.median >= 0.5)
    );
    println!(
        "| changes/s A → B, local (durable) product updates on A | {} | {} (in-process `apply_batch`, batches of 100) | {} | ≥ 20,000/s and ratio ≥ 0.5 | {} |",
        rate.show(0),
        spread(&base_rates).show(0),
        ratio.show(2),
        met(rate.median >= 20_000.0 && ratio.median >= 0.5)
    );
    println!(
        "\nAlso measured: A's writer alone took the updates at {}/s; the in-process apply with one change per \
         transaction (what the live path does) runs at {}/s; frames A→B per run {} (≈ one per update means \
         every change went live, far fewer means the connection lagged and caught up in batches).",
        spread(&write_rates).show(0),
        spread(&single_rates).show(0),
        spread(&frames).show(0)
    );
}

/// The till's own durable writes on a node with no peer: `callers` tasks each sending product
/// updates through the writer, as the API's handlers do, each awaiting its answer (given once
/// the write is on disk). Baseline in the same run: raw SQLite making the same updates, one
/// durable transaction each (WAL, `synchronous = FULL`), what an app writing straight to its
/// database gets.
async fn durable_writes(settings: &Settings) {
    let updates = settings.n(20_000, 2_000);
    const PRODUCTS: usize = 100;
    const CALLERS: [usize; 4] = [1, 8, 32, 64];
    println!("\n### Durable till writes: {updates} product updates on a node alone, answered once on disk\n");
    const HTTP_CALLERS: [usize; 2] = [8, 32];
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); CALLERS.len()];
    let mut http_rates: Vec<Vec<f64>> = vec![Vec::new(); HTTP_CALLERS.len()];
    // CPU time of the whole process per write, µs (node threads, and the HTTP clients).
    let mut cpus: Vec<Vec<f64>> = vec![Vec::new(); CALLERS.len()];
    let mut http_cpus: Vec<Vec<f64>> = vec![Vec::new(); HTTP_CALLERS.len()];
    let mut raw_rates = Vec::new();
    for run in 0..settings.runs {
        for (slot, callers) in CALLERS.iter().copied().enumerate() {
            let dir = tempfile::tempdir().expect("tempdir");
            let node = start(dir.path(), new_store(dir.path(), "A"), &[]).await;
            create_products(&node.shared, 0..PRODUCTS).await;
            let cpu_before = process_cpu_ms();
            let started = Instant::now();
            update_prices_concurrently(&node.shared, callers, updates, PRODUCTS).await;
            let rate = updates as f64 / started.elapsed().as_secs_f64();
            let cpu = (process_cpu_ms() - cpu_before) * 1000.0 / updates as f64;
            node.shutdown().await;
            eprintln!("  run {run}: {callers} callers {rate:.0}/s, {cpu:.0} µs of CPU a write");
            rates[slot].push(rate);
            cpus[slot].push(cpu);
        }
        for (slot, callers) in HTTP_CALLERS.iter().copied().enumerate() {
            let dir = tempfile::tempdir().expect("tempdir");
            let mut config = node_config(dir.path(), &[]);
            config.api_listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
            let node = Node::start_with_store(config, new_store(dir.path(), "A")).await.expect("start node");
            create_products(&node.shared, 0..PRODUCTS).await;
            let api = node.api_addr.expect("the API is served");
            let cpu_before = process_cpu_ms();
            let started = Instant::now();
            let clients: Vec<_> = (0..callers)
                .map(|caller| {
                    tokio::task::spawn_blocking(move || http_updates(api, caller, callers, updates, PRODUCTS))
                })
                .collect();
            for client in clients {
                client.await.expect("join");
            }
            let rate = updates as f64 / started.elapsed().as_secs_f64();
            let cpu = (process_cpu_ms() - cpu_before) * 1000.0 / updates as f64;
            node.shutdown().await;
            eprintln!(
                "  run {run}: {callers} HTTP clients {rate:.0}/s, {cpu:.0} µs of CPU a write (clients included)"
            );
            http_rates[slot].push(rate);
            http_cpus[slot].push(cpu);
        }
        let raw =
            tokio::task::spawn_blocking(move || raw_durable_updates(updates, PRODUCTS)).await.expect("join");
        eprintln!("  run {run}: raw SQLite {raw:.0}/s");
        raw_rates.push(raw);
    }
    let raw = spread(&raw_rates);
    println!(
        "| callers | possync, writes/s | raw SQLite, one durable transaction per update | ratio | CPU a write (µs, process) | target | met? |"
    );
    println!("|---|---|---|---|---|---|---|");
    let row = |label: String, rates: &[f64], cpus: &[f64]| {
        let rate = spread(rates);
        let ratios: Vec<f64> = rates.iter().zip(&raw_rates).map(|(rate, raw)| rate / raw).collect();
        println!(
            "| {label} | {} | {} | {} | {} | ≥ 20,000/s | {} |",
            rate.show(0),
            raw.show(0),
            spread(&ratios).show(2),
            spread(cpus).show(0),
            met(rate.median >= 20_000.0)
        );
    };
    for (slot, callers) in CALLERS.iter().enumerate() {
        row(callers.to_string(), &rates[slot], &cpus[slot]);
    }
    for (slot, callers) in HTTP_CALLERS.iter().enumerate() {
        row(
            format!("{callers} HTTP clients (`PATCH /api/products/{{id}}`, keep-alive)"),
            &http_rates[slot],
            &http_cpus[slot],
        );
    }
}

/// One HTTP client: `PATCH /api/products/{id}` price updates `caller`, `caller + callers`,
/// ... below `updates`, each awaiting its answer (given once the write is on disk).
fn http_updates(api: SocketAddr, caller: usize, callers: usize, updates: usize, products: usize) {
    let agent: ureq::Agent = ureq::Agent::config_builder().build().into();
    let mut index = caller;
    while index < updates {
        let url = format!("http://{api}/api/products/{}", product_id(index % products).as_str());
        let body = json!({"price": format!("{}.{:02}", 1 + index / 100 % 1000, index % 100)}).to_string();
        let mut answer =
            agent.patch(&url).content_type("application/json").send(&body).expect("the update is answered");
        assert_eq!(answer.status(), 200, "the update is accepted");
        // Read the answer to its end: ureq puts a connection back in its pool only then, so
        // a client that drops it unread opens a new TCP connection for every request.
        answer.body_mut().read_to_string().expect("the answer is read");
        index += callers;
    }
}

/// Raw SQLite: `updates` single-row price updates, one durable transaction each.
fn raw_durable_updates(updates: usize, products: usize) -> f64 {
    let dir = tempfile::tempdir().expect("tempdir");
    let conn = rusqlite::Connection::open(dir.path().join("raw.db")).expect("open");
    conn.pragma_update(None, "journal_mode", "WAL").expect("wal");
    conn.pragma_update(None, "synchronous", "FULL").expect("full");
    conn.execute_batch("CREATE TABLE products (id TEXT PRIMARY KEY, sku TEXT, name TEXT, price TEXT)")
        .expect("table");
    for index in 0..products {
        conn.execute(
            "INSERT INTO products VALUES (?1, ?2, ?3, '1.50')",
            rusqlite::params![
                product_id(index).as_str(),
                format!("SKU-{index:06}"),
                format!("Product {index}")
            ],
        )
        .expect("insert");
    }
    let mut update = conn.prepare("UPDATE products SET price = ?2 WHERE id = ?1").expect("prepare");
    let started = Instant::now();
    for index in 0..updates {
        let price = format!("{}.{:02}", 1 + index / 100 % 1000, index % 100);
        update.execute(rusqlite::params![product_id(index % products).as_str(), price]).expect("update");
    }
    updates as f64 / started.elapsed().as_secs_f64()
}

/// Throughput of the live path without A's durable local writes: a third terminal C's
/// changes reach A (applied through A's writer, batches of 100, as a peer's batch would
/// be), and A relays each one live to B.
async fn relay_throughput(settings: &Settings) -> (Spread, Spread, Spread) {
    let updates = settings.n(50_000, 2_000);
    const PRODUCTS: usize = 100;
    let (mut rates, mut feed_rates, mut base_rates, mut ratios, mut frames) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for run in 0..settings.runs {
        let mut synthetic = Synthetic::new();
        // Products 1000.. so that they are not the pair's own product 0.
        let creates = synthetic.creates(1000..1000 + PRODUCTS);
        let changes = synthetic.updates(updates, 1000, PRODUCTS);
        let origin = synthetic.origin.clone();
        let pair = Pair::start(1).await;
        let a = Arc::clone(&pair.a.shared);
        let mut feed = pair.b.shared.writer.subscribe();
        let c_peer = origin.to_string();
        let apply_on_a = |batch: Vec<WireChange>| {
            let id = c_peer.clone();
            a.writer.call(Priority::Sync, move |store| {
                let len = batch.len();
                let report = store.apply_batch(PeerRef { id: &id, name: "C" }, batch).expect("apply on A");
                assert_eq!(report.applied as usize, len, "A applies C's changes");
            })
        };
        apply_on_a(creates.clone()).await.expect("writer");
        // C's key enrollment and the products.
        wait_holds(&pair.b.shared, &mut feed, &origin, PRODUCTS as u64 + 1).await;
        let frames_before = a.peers.detailed_stats().total_messages_sent;
        let started = Instant::now();
        for batch in changes.chunks(100) {
            apply_on_a(batch.to_vec()).await.expect("writer");
        }
        let fed = started.elapsed();
        wait_holds(&pair.b.shared, &mut feed, &origin, (PRODUCTS + updates) as u64 + 1).await;
        let elapsed = started.elapsed();
        let sent = a.peers.detailed_stats().total_messages_sent - frames_before;
        pair.stop().await;
        let rate = updates as f64 / elapsed.as_secs_f64();
        let base = tokio::task::spawn_blocking(move || {
            let all: Vec<WireChange> = creates.into_iter().chain(changes).collect();
            let (batched, per_call) = apply_in_process(&origin, &all, 100);
            let _ = batched;
            // The updates only (the first call holds the creates).
            updates as f64 / (per_call[1..].iter().sum::<f64>() / 1000.0)
        })
        .await
        .expect("join");
        eprintln!(
            "  relay run {run}: {rate:.0}/s end to end (fed into A at {:.0}/s), {sent} frames A→B; in process {base:.0}/s",
            updates as f64 / fed.as_secs_f64()
        );
        rates.push(rate);
        feed_rates.push(updates as f64 / fed.as_secs_f64());
        base_rates.push(base);
        ratios.push(rate / base);
        frames.push(sent as f64);
    }
    eprintln!(
        "  relay: fed into A at {}/s; frames A→B {}",
        spread(&feed_rates).show(0),
        spread(&frames).show(0)
    );
    (spread(&rates), spread(&base_rates), spread(&ratios))
}

/// Builds A's catalog once: `products` product creates of a third terminal C, applied to
/// A's store in batches of 1000 (a local create costs an fsync each: 100,000 of them would
/// take minutes on this disk). B then catches up C's changes from A.
fn build_catalog(dir: &Path, products: usize) -> (PathBuf, PosId) {
    let started = Instant::now();
    let mut synthetic = Synthetic::new();
    let changes = synthetic.creates(0..products);
    let mut store = new_store(dir, "A");
    let peer = synthetic.origin.to_string();
    for chunk in changes.chunks(1000) {
        let report = store.apply_batch(PeerRef { id: &peer, name: "C" }, chunk.to_vec()).expect("apply");
        assert_eq!(report.applied as usize, chunk.len());
    }
    let path = store.path().to_path_buf();
    drop(store); // checkpoints the WAL into the file
    eprintln!("  catalog of {products} products built in {:.1} s", started.elapsed().as_secs_f64());
    (path, synthetic.origin)
}

fn copy_db(from: &Path, to_dir: &Path) -> PathBuf {
    std::fs::create_dir_all(to_dir).expect("mkdir");
    let to = to_dir.join(DB_FILE);
    std::fs::copy(from, &to).expect("copy catalog");
    let wal = PathBuf::from(format!("{}-wal", from.display()));
    if wal.exists() {
        std::fs::copy(&wal, format!("{}-wal", to.display())).expect("copy wal");
    }
    to
}

async fn catch_up(settings: &Settings) {
    let products = settings.n(100_000, 2_000);
    println!("\n### Catch-up: fresh B connects to A holding {products} products, until B holds everything\n");
    let catalog_dir = tempfile::tempdir().expect("tempdir");
    let root = catalog_dir.path().to_path_buf();
    let (catalog, origin) =
        tokio::task::spawn_blocking(move || build_catalog(&root.join("catalog"), products))
            .await
            .expect("join");
    println!("| batch size | engine (s) | baseline (s, in-process select + apply) | ratio | target | met? |");
    println!("|---|---|---|---|---|---|");
    for batch in [100usize, 1000] {
        let (mut engine, mut base, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
        for run in 0..settings.runs {
            let mut engine_time = None;
            let mut base_time = None;
            for step in 0..2 {
                if (step + run) % 2 == 0 {
                    let dir = tempfile::tempdir().expect("tempdir");
                    let a_path = copy_db(&catalog, &dir.path().join("a"));
                    let mut a_store =
                        Store::open(&a_path, Box::new(SystemEnvironment::default())).expect("open A");
                    a_store.set_setting("p2p_sync_batch_size", &batch.to_string()).expect("setting");
                    let a = start(&dir.path().join("a"), a_store, &[]).await;
                    let a_addr = a.peer_addr.expect("A listens");
                    let b_dir = dir.path().join("b");
                    let mut b_store = new_store(&b_dir, "B");
                    b_store.set_setting("p2p_sync_batch_size", &batch.to_string()).expect("setting");
                    let started = Instant::now();
                    let b = start(&b_dir, b_store, &[a_addr]).await;
                    let mut feed = b.shared.writer.subscribe();
                    // C's key enrollment and the products.
                    wait_holds(&b.shared, &mut feed, &origin, products as u64 + 1).await;
                    engine_time = Some(started.elapsed().as_secs_f64());
                    b.shutdown().await;
                    a.shutdown().await;
                } else {
                    let catalog = catalog.clone();
                    let origin = origin.clone();
                    base_time = Some(
                        tokio::task::spawn_blocking(move || {
                            let dir = tempfile::tempdir().expect("tempdir");
                            let mut store = new_store(dir.path(), "baseline");
                            let reader = StoreReader::open(&catalog).expect("reader");
                            let since = store.summary().clone();
                            let peer = PeerRef { id: origin.as_str(), name: "A" };
                            let started = Instant::now();
                            let mut cursor = 0;
                            loop {
                                let selection = reader.select_changes(&since, cursor, batch).expect("select");
                                store.apply_batch(peer, selection.changes).expect("apply");
                                cursor = selection.next_cursor;
                                if !selection.has_more {
                                    break;
                                }
                            }
                            let elapsed = started.elapsed().as_secs_f64();
                            assert_eq!(store.summary().get(&origin).0, products as u64 + 1);
                            elapsed
                        })
                        .await
                        .expect("join"),
                    );
                }
            }
            let (e, b) = (engine_time.expect("engine"), base_time.expect("baseline"));
            eprintln!("  batch {batch} run {run}: network {e:.3} s, in process {b:.3} s");
            engine.push(e);
            base.push(b);
            ratios.push(e / b);
        }
        let (e, r) = (spread(&engine), spread(&ratios));
        println!(
            "| {batch} | {} | {} | {} | ≤ 5 s and ratio ≤ 2 | {} |",
            e.show(3),
            spread(&base).show(3),
            r.show(2),
            met(e.median <= 5.0 && r.median <= 2.0)
        );
    }
    println!(
        "\nEngine time runs from starting B's node (fresh store, dialling A) to B's writer applying A's last change; \
         A and B in this process. {} products = {} changes (one create each, made by a third terminal C and \
         held by A).",
        products, products
    );
}

// --- memory -----------------------------------------------------------------------------

/// This process's CPU time so far (user + system, all threads), ms: `/proc/self/stat`'s
/// `utime` and `stime`, in clock ticks of 10 ms (Linux's `USER_HZ`, 100).
fn process_cpu_ms() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
    // The fields after the command name (which is in parentheses and may hold spaces):
    // state is the first, utime the 12th, stime the 13th.
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or_default().split_whitespace().collect();
    let ticks = |index: usize| fields.get(index).and_then(|field| field.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) * 10.0
}

fn rss_of(pid: &str) -> u64 {
    status_field(pid, "VmRSS:") * 1024
}

/// A number from `/proc/<pid>/status` (kB for the memory fields).
fn status_field(pid: &str, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|value| value.parse().ok())
        .expect("status field")
}

/// Child: a node that accepts peers until stdin closes.
fn child_node() {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    runtime.block_on(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let node = start(dir.path(), new_store(dir.path(), "memory node"), &[]).await;
        println!("ADDR {}", node.peer_addr.expect("listening"));
        std::io::stdout().flush().expect("flush");
        tokio::task::spawn_blocking(|| {
            let mut sink = String::new();
            while std::io::stdin().read_line(&mut sink).map(|read| read > 0).unwrap_or(false) {}
        })
        .await
        .expect("join");
        node.shutdown().await;
    });
}

/// A raw peer: secure channel, protocol hello, both (empty) catch-ups done; then idle.
async fn raw_peer(
    addr: SocketAddr,
    config: &ChannelConfig,
    index: usize,
) -> (transport::SecureChannel, Session) {
    let pos_id = PosId::parse(format!("bench-client-{index}")).expect("posId");
    let mut session = Session::new(
        SessionConfig::new(pos_id, "bench client"),
        Role::Initiator,
        VersionVector::new(),
        now_ms(),
    );
    let mut channel = transport::connect(addr, config).await.expect("connect");
    let mut caught_up = false;
    loop {
        while let Some(frame) = session.poll_transmit() {
            channel.send(&frame).await.expect("send");
        }
        let mut progressed = false;
        while let Some(event) = session.poll_event() {
            progressed = true;
            match event {
                Event::NeedBatch { .. } => session.provide_batch(Vec::new(), 0, false),
                Event::Apply { .. } => session.batch_applied(now_ms(), BatchApplied::default()),
                Event::CatchUpCompleted { .. } => caught_up = true,
                Event::Closed { reason } => panic!("raw peer closed: {reason}"),
                _ => {}
            }
        }
        if progressed {
            continue;
        }
        if caught_up && session.is_live() {
            return (channel, session);
        }
        let frame = tokio::time::timeout(Duration::from_secs(10), channel.recv())
            .await
            .expect("raw peer timed out")
            .expect("recv")
            .expect("peer closed");
        session.handle_frame(now_ms(), &frame);
    }
}

fn now_ms() -> u64 {
    possync_node::clock::now_ms()
}

/// Child: `warm` raw peers to ADDR, then (after a line on stdin: the parent has read the
/// node's memory) `count` more, reporting its own RSS each time; idle until stdin closes.
fn child_clients(addr: SocketAddr, warm: usize, count: usize) {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    runtime.block_on(async {
        let config = ChannelConfig::from_secret(SECRET);
        let mut peers = Vec::new();
        for index in 0..warm {
            peers.push(raw_peer(addr, &config, index).await);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        println!("WARM {}", rss_of("self"));
        std::io::stdout().flush().expect("flush");
        // Wait until the parent has measured the node with exactly the warm-up connections.
        tokio::task::spawn_blocking(|| std::io::stdin().read_line(&mut String::new()))
            .await
            .expect("join")
            .expect("read go");
        for index in warm..warm + count {
            peers.push(raw_peer(addr, &config, index).await);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        println!("READY {}", rss_of("self"));
        std::io::stdout().flush().expect("flush");
        tokio::task::spawn_blocking(|| {
            let mut sink = String::new();
            while std::io::stdin().read_line(&mut sink).map(|read| read > 0).unwrap_or(false) {}
        })
        .await
        .expect("join");
        drop(peers);
    });
}

fn read_tagged(lines: &mut impl BufRead, tag: &str) -> String {
    let mut line = String::new();
    loop {
        line.clear();
        assert!(lines.read_line(&mut line).expect("read child") > 0, "child ended before {tag}");
        if let Some(rest) = line.trim().strip_prefix(tag) {
            return rest.trim().to_owned();
        }
    }
}

/// Sizes of the futures a node keeps per connection (allocated inline in each task).
async fn future_sizes() -> (usize, usize) {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = start(dir.path(), new_store(dir.path(), "sizes"), &[]).await;
    let config = ChannelConfig::from_secret(SECRET);
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (dialled, accepted) = tokio::join!(transport::connect(addr, &config), async {
        let (stream, _) = listener.accept().await.expect("accept");
        transport::accept(stream, &config).await
    });
    let (_dialled, accepted) = (dialled.expect("connect"), accepted.expect("accept"));
    let (stream, _) = tokio::join!(TcpStream::connect(addr), listener.accept());
    let accept_size = std::mem::size_of_val(&transport::accept(stream.expect("tcp"), &config));
    let run =
        possync_node::connection::run(Arc::new(node.shared.connection_handle()), accepted, Role::Responder);
    let run_size = std::mem::size_of_val(&run);
    drop(run);
    node.shutdown().await;
    (run_size, accept_size)
}

fn memory(settings: &Settings) {
    const WARM: usize = 10;
    let count = settings.n(200, 20);
    println!("\n### Memory: resident bytes per idle authenticated peer connection ({count} connections)\n");
    let exe = std::env::current_exe().expect("current exe");
    let (mut node_side, mut client_side) = (Vec::new(), Vec::new());
    for run in 0..settings.runs {
        let mut node = Command::new(&exe)
            .env("POSSYNC_BENCH_CHILD", "node")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn node child");
        let node_pid = node.id().to_string();
        let mut node_out = BufReader::new(node.stdout.take().expect("stdout"));
        let addr = read_tagged(&mut node_out, "ADDR");
        std::thread::sleep(Duration::from_millis(300));
        let node_idle = rss_of(&node_pid);
        let mut clients = Command::new(&exe)
            .env("POSSYNC_BENCH_CHILD", "clients")
            .env("POSSYNC_BENCH_ADDR", &addr)
            .env("POSSYNC_BENCH_WARM", WARM.to_string())
            .env("POSSYNC_BENCH_COUNT", count.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn clients child");
        let mut client_out = BufReader::new(clients.stdout.take().expect("stdout"));
        let client_warm: u64 = read_tagged(&mut client_out, "WARM").parse().expect("rss");
        let node_warm = rss_of(&node_pid);
        let (anon_warm, threads_warm) =
            (status_field(&node_pid, "RssAnon:"), status_field(&node_pid, "Threads:"));
        let mut go = clients.stdin.take().expect("stdin");
        writeln!(go, "go").expect("tell the clients to go on");
        go.flush().expect("flush");
        let client_ready: u64 = read_tagged(&mut client_out, "READY").parse().expect("rss");
        std::thread::sleep(Duration::from_millis(500));
        let node_ready = rss_of(&node_pid);
        let (anon_ready, threads_ready) =
            (status_field(&node_pid, "RssAnon:"), status_field(&node_pid, "Threads:"));
        eprintln!("  node: RssAnon {anon_warm} → {anon_ready} kB, threads {threads_warm} → {threads_ready}");
        drop(go);
        let _ = clients.wait();
        drop(node.stdin.take());
        let _ = node.wait();
        let per_node = node_ready.saturating_sub(node_warm) as f64 / count as f64;
        let per_client = client_ready.saturating_sub(client_warm) as f64 / count as f64;
        eprintln!(
            "  run {run}: node RSS idle {} KiB, +{WARM} warm-up {} KiB, +{count} {} KiB → {:.0} B/connection; \
             client side {:.0} B/connection",
            node_idle / 1024,
            node_warm / 1024,
            node_ready / 1024,
            per_node,
            per_client
        );
        node_side.push(per_node);
        client_side.push(per_client);
    }
    let node = spread(&node_side);
    println!("| side | engine (bytes/connection) | baseline (seed) | ratio | target | met? |");
    println!("|---|---|---|---|---|---|");
    println!(
        "| node (accepting process, full connection task + session + secure channel) | {} | ~40 KB | {:.2} | ≤ 16 KiB | {} |",
        node.show(0),
        node.median / 40_000.0,
        met(node.median <= 16_384.0)
    );
    println!(
        "| client (raw `transport::connect` + `Session`, no task) | {} | — | — | — | — |",
        spread(&client_side).show(0)
    );
    let (run_size, accept_size) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(future_sizes());
    println!(
        "\nFor scale: the future of one connection task (`connection::run`) is {run_size} bytes and \
         `transport::accept`'s is {accept_size} bytes, both held inline in each connection's task."
    );
    println!(
        "\nVmRSS of each process read from /proc after {WARM} warm-up connections and again after {count} more \
         (settled), difference divided by {count}. Node and clients are two child processes of the bench."
    );
}

// --- wire -------------------------------------------------------------------------------

/// A TCP relay on 127.0.0.1 that counts bytes each way.
async fn counting_relay(target: SocketAddr) -> (SocketAddr, Arc<AtomicU64>, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
    let addr = listener.local_addr().expect("addr");
    let (up, down) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let (up2, down2) = (Arc::clone(&up), Arc::clone(&down));
    tokio::spawn(async move {
        while let Ok((inbound, _)) = listener.accept().await {
            let Ok(outbound) = TcpStream::connect(target).await else { continue };
            let _ = inbound.set_nodelay(true);
            let _ = outbound.set_nodelay(true);
            let (in_read, in_write) = inbound.into_split();
            let (out_read, out_write) = outbound.into_split();
            tokio::spawn(pump(in_read, out_write, Arc::clone(&up2)));
            tokio::spawn(pump(out_read, in_write, Arc::clone(&down2)));
        }
    });
    (addr, up, down)
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    counter: Arc<AtomicU64>,
) {
    let mut buffer = vec![0u8; 64 * 1024];
    while let Ok(read) = from.read(&mut buffer).await {
        if read == 0 || to.write_all(&buffer[..read]).await.is_err() {
            break;
        }
        counter.fetch_add(read as u64, Ordering::Relaxed);
    }
    let _ = to.shutdown().await;
}

fn gzip_len(bytes: &[u8]) -> usize {
    let mut child = Command::new("gzip")
        .arg("-c")
        .arg("-6")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("gzip available");
    let mut stdin = child.stdin.take().expect("stdin");
    let input = bytes.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let output = child.wait_with_output().expect("gzip");
    writer.join().expect("join").expect("write to gzip");
    output.stdout.len()
}

fn frame_of(origin: &PosId, n: usize, body: Body) -> String {
    Message {
        id: format!("{origin}-{n}"),
        timestamp: "2026-11-25T13:46:21.123Z".into(),
        source_pos: origin.clone(),
        body,
    }
    .encode()
}

async fn wire(settings: &Settings) {
    let products = settings.n(1_000, 200) / 100 * 100;
    let updates = settings.n(1_000, 200);
    println!(
        "\n### Wire: bytes per product update ({products} creates in catch-up, {updates} live updates)\n"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let a = start(&dir.path().join("a"), new_store(&dir.path().join("a"), "A"), &[]).await;
    create_products(&a.shared, 0..products).await;
    let origin = a.pos_id().clone();
    let (relay, up, down) = counting_relay(a.peer_addr.expect("A listens")).await;
    let b_dir = dir.path().join("b");
    let b = start(&b_dir, new_store(&b_dir, "B"), &[relay]).await;
    let mut feed = b.shared.writer.subscribe();
    // A's key enrollment and its products.
    wait_holds(&b.shared, &mut feed, &origin, products as u64 + 1).await;
    tokio::time::sleep(Duration::from_millis(200)).await; // the last sync_ack
    let stats = a.shared.peers.detailed_stats();
    let (catch_down, catch_up_bytes) = (down.load(Ordering::Relaxed), up.load(Ordering::Relaxed));
    let (catch_frames, catch_payload) = (stats.total_messages_sent, stats.total_bytes_sent);
    for index in 0..updates {
        update_price(&a.shared, index % products, index + 1).await;
        wait_holds(&b.shared, &mut feed, &origin, (products + index + 2) as u64).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let stats = a.shared.peers.detailed_stats();
    let live_down = down.load(Ordering::Relaxed) - catch_down;
    let live_up = up.load(Ordering::Relaxed) - catch_up_bytes;
    let live_frames = stats.total_messages_sent - catch_frames;
    let live_payload = stats.total_bytes_sent - catch_payload;
    let changes = read_log(&a.shared.config.db_path());
    b.shutdown().await;
    a.shutdown().await;

    // The same frames, re-encoded with the protocol's encoder, for compression estimates.
    let (creates, live) = changes.split_at(products);
    let stamped = |wire: &WireChange| StampedChange::new(wire.clone(), "data").expect("stamped");
    let batch_frames: Vec<String> = creates
        .chunks(100)
        .enumerate()
        .map(|(n, chunk)| {
            let changes = chunk.iter().map(stamped).collect();
            frame_of(&origin, n + 2, Body::SyncBatch(SyncBatch { changes, has_more: true }))
        })
        .collect();
    let live_frames_text: Vec<String> = live
        .iter()
        .enumerate()
        .map(|(n, wire)| frame_of(&origin, n + 20, Body::Change(stamped(wire))))
        .collect();
    let live_dump = live_frames_text.join("");
    let batch_dump = batch_frames.join("");
    let live_each: usize =
        live_frames_text.iter().take(200).map(|frame| gzip_len(frame.as_bytes()) - 18).sum();
    let live_each = live_each as f64 / live_frames_text.len().min(200) as f64;
    let per_live = |bytes: u64| bytes as f64 / updates as f64;
    let per_create = |bytes: u64| bytes as f64 / products as f64;
    println!(
        "| per product change | live update (1 change per frame) | in a catch-up batch of 100 (product create) |"
    );
    println!("|---|---|---|");
    println!(
        "| frame payload (JSON text, node's own count) | {:.0} B ({live_frames} frames) | {:.0} B ({catch_frames} frames incl. hello, acks) |",
        per_live(live_payload),
        per_create(catch_payload)
    );
    println!(
        "| encrypted WebSocket bytes A→B (TCP payload, relay count) | {:.0} B | {:.0} B |",
        per_live(live_down),
        per_create(catch_down)
    );
    println!(
        "| encrypted WebSocket bytes B→A (acks, pings) | {:.1} B | {:.1} B |",
        per_live(live_up),
        per_create(catch_up_bytes)
    );
    println!(
        "| re-encoded frame, uncompressed | {:.0} B | {:.0} B |",
        live_dump.len() as f64 / live.len() as f64,
        batch_dump.len() as f64 / creates.len() as f64
    );
    println!(
        "| compressed one frame at a time (deflate, `gzip -6` minus its 18-byte header) | {live_each:.0} B | {:.0} B |",
        batch_frames.iter().map(|frame| gzip_len(frame.as_bytes()) - 18).sum::<usize>() as f64
            / creates.len() as f64
    );
    println!(
        "| compressed as one stream (context kept across frames, `gzip -6` of the dump) | {:.0} B | {:.0} B |",
        gzip_len(live_dump.as_bytes()) as f64 / live.len() as f64,
        gzip_len(batch_dump.as_bytes()) as f64 / creates.len() as f64
    );
    println!(
        "\nSeed: 473 bytes per product-update message. Live update frame payload / seed = {:.2}. \
         flate2/zstd are not in Cargo.lock, so compression is estimated with the `gzip` command on the frames \
         re-encoded by the protocol's own encoder (`Message::encode`) from A's change log.",
        per_live(live_payload) / 473.0
    );
}

// ---------------------------------------------------------------------------------------

fn main() {
    match std::env::var("POSSYNC_BENCH_CHILD").as_deref() {
        Ok("node") => return child_node(),
        Ok("clients") => {
            let var = |name: &str| std::env::var(name).expect("child variable");
            return child_clients(
                var("POSSYNC_BENCH_ADDR").parse().expect("addr"),
                var("POSSYNC_BENCH_WARM").parse().expect("warm"),
                var("POSSYNC_BENCH_COUNT").parse().expect("count"),
            );
        }
        _ => {}
    }
    let settings = Settings::from_env();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines().find_map(|l| {
                l.strip_prefix("model name").map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
            })
        })
        .unwrap_or_default();
    println!(
        "## possync-node network benchmarks\n\nMachine: {} × {cpu}; runs {}; scale {}.",
        std::thread::available_parallelism().map_or(0, usize::from),
        settings.runs,
        settings.scale
    );
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    runtime.block_on(async {
        if settings.wants("propagation") {
            propagation(&settings).await;
        }
        if settings.wants("throughput") {
            throughput(&settings).await;
        }
        if settings.wants("durable") {
            durable_writes(&settings).await;
        }
        if settings.wants("catchup") {
            catch_up(&settings).await;
        }
        if settings.wants("wire") {
            wire(&settings).await;
        }
    });
    if settings.wants("memory") {
        memory(&settings);
    }
}
