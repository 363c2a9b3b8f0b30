//! Chain benchmark (issue 9, first slice): how fast the head office ingests stores' sales from
//! a real NATS JetStream server, against baselines measured in the same run. Figures in
//! `docs/BENCHMARKS.md`, section "Chain (NATS JetStream)".
//!
//! ```text
//! cargo bench -p possync-node --bench chain
//! ```
//!
//! `POSSYNC_BENCH_STORES` (default 100) simulated stores, `POSSYNC_BENCH_SALES` (default 100)
//! sales each, `POSSYNC_BENCH_RUN` (default 1 and 100) changes per message. The server is a
//! real `nats-server -js` on 127.0.0.1 (the tests' helper finds it); the stores are
//! in-process stores whose change logs are published as the uplink publishes them (one
//! subject per origin, expected last subject sequence, acked). Figures:
//!
//! - raw JetStream: publish (acked, pipelined) and consume (pull, acked) of the same payloads
//!   on the same server, no possync in the loop;
//! - in-process apply: the head office's store applying the same runs without NATS;
//! - chain ingest: a head office node (durable consumer, checks, one durable transaction per
//!   message, ack after commit) taking the UP stream filled by the stores, in sales per second.

#[path = "common/chain_node.rs"]
mod chain_node;
#[path = "../tests/common/nats.rs"]
mod nats;

use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures_util::StreamExt;
use possync_chain::{Batch, ChainId, HEADER_LAST_SEQ, Subjects};
use possync_core::{EntityKind, PosId, Seq, WireChange};
use possync_node::Node;
use possync_node::config::{ChainRole, HqConfig};
use possync_store::{ChainRun, DB_FILE, SaleRequest, Store, SystemEnvironment};
use serde_json::json;

const PRODUCTS: usize = 20;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|value| value.parse().ok()).unwrap_or(default)
}

/// One store's uploads: its origin and the messages (runs) it publishes, in order.
struct StoreRuns {
    store: String,
    origin: PosId,
    messages: Vec<(Vec<u8>, u64)>,
    changes: Vec<WireChange>,
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(run());
}

async fn run() {
    let stores = env_or("POSSYNC_BENCH_STORES", 100);
    let sales = env_or("POSSYNC_BENCH_SALES", 100);
    let runs: Vec<usize> = match std::env::var("POSSYNC_BENCH_RUN").ok().and_then(|value| value.parse().ok())
    {
        Some(run) => vec![run],
        None => vec![1, 100],
    };
    let dir = tempfile::tempdir().unwrap();
    println!("chain bench: {stores} stores x {sales} sales, nats-server {}", nats::server_binary().display());

    // The head office's catalog, and every store's sales made on a store of its own.
    let hq_path = dir.path().join("hq-template.db");
    let mut hq = Store::init(&hq_path, None, "head office", Box::new(SystemEnvironment::default())).unwrap();
    for p in 0..PRODUCTS {
        hq.create_record(
            EntityKind::Product,
            &json!({"id": format!("p{p}"), "sku": format!("P{p}"), "name": "Tea", "price": 2}),
        )
        .unwrap();
    }
    let hq_origin = hq.identity().pos_id.clone();
    let catalog = hq.reader().unwrap().origin_changes(&hq_origin, Seq(0), 10_000).unwrap();
    drop(hq);
    let made = Instant::now();
    let mut logs = Vec::new();
    for s in 0..stores {
        let path = dir.path().join(format!("store{s}.db"));
        let mut till = Store::init(&path, None, "till", Box::new(SystemEnvironment::default())).unwrap();
        till.apply_chain_down("DOWN", 1, &hq_origin, catalog.clone()).unwrap();
        till.set_chain_store(Some(format!("s{s}")));
        till.group_commit(|till| {
            for i in 0..sales {
                let request: SaleRequest = serde_json::from_value(json!({
                    "lines": [{"productId": format!("p{}", i % PRODUCTS), "quantity": 1}, {"productId": format!("p{}", (i + 7) % PRODUCTS), "quantity": 2}],
                    "payments": [{"method": "card", "amount": 10}],
                }))
                .unwrap();
                till.record_sale(&request).unwrap();
            }
        })
        .unwrap();
        let origin = till.identity().pos_id.clone();
        let changes = till.reader().unwrap().origin_changes(&origin, Seq(0), sales).unwrap();
        logs.push((format!("s{s}"), origin, changes));
        std::fs::remove_file(&path).ok();
    }
    println!("  {} sales made in {:.1} s (not measured)", stores * sales, made.elapsed().as_secs_f64());

    for run in runs {
        let stores_runs: Vec<StoreRuns> = logs
            .iter()
            .map(|(store, origin, changes)| StoreRuns {
                store: store.clone(),
                origin: origin.clone(),
                messages: changes
                    .chunks(run)
                    .map(|chunk| {
                        let batch = Batch::new(origin.clone(), chunk.to_vec()).unwrap();
                        (batch.encode().unwrap(), batch.last_seq().0)
                    })
                    .collect(),
                changes: changes.clone(),
            })
            .collect();
        let messages: usize = stores_runs.iter().map(|store| store.messages.len()).sum();
        let bytes: usize =
            stores_runs.iter().flat_map(|store| &store.messages).map(|(body, _)| body.len()).sum();
        println!(
            "\n{run} change(s) per message: {messages} messages, {} bytes each on average",
            bytes / messages
        );
        raw_baseline(&stores_runs).await;
        apply_baseline(dir.path(), &hq_path, &stores_runs);
        chain_ingest(dir.path(), &hq_path, &stores_runs).await;
    }
}

/// Publishes every message (acked, pipelined 256 at a time) and consumes them (pull, acked).
async fn raw_baseline(stores: &[StoreRuns]) {
    let server = nats::NatsServer::start();
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = jetstream::new(client);
    let raw = chain_node::raw_stream(&js).await;
    let total: usize = stores.iter().map(|store| store.messages.len()).sum();
    let start = Instant::now();
    let mut pending = Vec::new();
    for (index, store) in stores.iter().enumerate() {
        for (body, _) in &store.messages {
            pending.push(js.publish(format!("raw.{index}"), body.clone().into()).await.unwrap());
            if pending.len() == 256 {
                for ack in pending.drain(..) {
                    ack.await.unwrap();
                }
            }
        }
    }
    for ack in pending.drain(..) {
        ack.await.unwrap();
    }
    let published = start.elapsed();
    let consumer = chain_node::raw_consumer(&raw).await;
    let start = Instant::now();
    let mut messages = consumer.messages().await.unwrap();
    for _ in 0..total {
        let message = messages.next().await.unwrap().unwrap();
        message.double_ack().await.unwrap();
    }
    let consumed = start.elapsed();
    println!(
        "  raw JetStream:     publish {:>8.0} msg/s   consume+ack {:>8.0} msg/s",
        total as f64 / published.as_secs_f64(),
        total as f64 / consumed.as_secs_f64()
    );
}

/// The head office's store applying the runs in process, one durable transaction per message.
fn apply_baseline(dir: &std::path::Path, template: &std::path::Path, stores: &[StoreRuns]) {
    let path = dir.join("hq-apply.db");
    std::fs::copy(template, &path).unwrap();
    let mut hq = Store::open(&path, Box::new(SystemEnvironment::default())).unwrap();
    let sales: usize = stores.iter().map(|store| store.changes.len()).sum();
    let per_message = stores[0].changes.len() / stores[0].messages.len().max(1);
    // The messages in the order the stores send them, applied 256 at a time as the head
    // office groups them.
    let mut runs = Vec::new();
    let rounds =
        stores.iter().map(|store| store.changes.len().div_ceil(per_message.max(1))).max().unwrap_or(0);
    for round in 0..rounds {
        for store in stores {
            let chunk = store.changes.chunks(per_message.max(1)).nth(round);
            if let Some(chunk) = chunk {
                runs.push(ChainRun {
                    store: store.store.clone(),
                    origin: store.origin.clone(),
                    changes: chunk.to_vec(),
                    verified: None,
                });
            }
        }
    }
    let start = Instant::now();
    while !runs.is_empty() {
        let group: Vec<_> = runs.drain(..runs.len().min(256)).collect();
        hq.apply_chain_batches(group).unwrap();
    }
    let elapsed = start.elapsed();
    println!(
        "  in-process apply:  {:>8.0} sales/s (groups of 256 messages per transaction)",
        sales as f64 / elapsed.as_secs_f64()
    );
    drop(hq);
    for suffix in ["", "-wal", "-shm"] {
        std::fs::remove_file(format!("{}{suffix}", path.display())).ok();
    }
}

/// Fills the UP stream as the stores' uplinks would, then measures a head office node taking it.
async fn chain_ingest(dir: &std::path::Path, template: &std::path::Path, stores: &[StoreRuns]) {
    let server = nats::NatsServer::start();
    let subjects = Subjects::new(ChainId::parse("bench").unwrap());
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = jetstream::new(client);
    // The head office creates the streams; started first, stopped, started again to measure.
    let hq_dir = dir.join("hq-node");
    std::fs::create_dir_all(&hq_dir).unwrap();
    std::fs::copy(template, hq_dir.join(DB_FILE)).unwrap();
    let config = chain_node::node_config(
        &hq_dir,
        ChainRole::Hq(HqConfig {
            backbone: chain_node::backbone(server.url(), "bench"),
            silent_store_alert_secs: 900,
            store_offline_after_secs: possync_node::config::DEFAULT_STORE_OFFLINE_AFTER_SECS,
        }),
    );
    let store = Store::open(&hq_dir.join(DB_FILE), Box::new(SystemEnvironment::default())).unwrap();
    let hq = Node::start_with_store(config.clone(), store).await.unwrap();
    while js.get_stream(subjects.up_stream()).await.is_err() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    hq.shutdown().await;

    // The stores' uploads, as the uplink sends them (expected last subject sequence, acked).
    let start = Instant::now();
    let mut last_subject_seq = vec![0u64; stores.len()];
    let rounds = stores.iter().map(|store| store.messages.len()).max().unwrap_or(0);
    for round in 0..rounds {
        let mut acks = Vec::new();
        for (index, store) in stores.iter().enumerate() {
            let Some((body, last)) = store.messages.get(round) else { continue };
            let subject = subjects
                .up(&possync_chain::StoreId::parse(store.store.clone()).unwrap(), &store.origin)
                .unwrap();
            let message = jetstream::message::PublishMessage::build()
                .payload(body.clone().into())
                .expected_last_subject_sequence(last_subject_seq[index])
                .header(HEADER_LAST_SEQ, last.to_string().as_str());
            acks.push((index, js.send_publish(subject, message).await.unwrap()));
        }
        for (index, ack) in acks {
            last_subject_seq[index] = ack.await.unwrap().sequence;
        }
    }
    let uploaded = start.elapsed();
    let sales: usize = stores.iter().map(|store| store.changes.len()).sum();

    let store = Store::open(&hq_dir.join(DB_FILE), Box::new(SystemEnvironment::default())).unwrap();
    let start = Instant::now();
    let hq = Node::start_with_store(config, store).await.unwrap();
    loop {
        let applied = hq.shared.chain.snapshot()["appliedChanges"].as_u64().unwrap_or(0);
        if applied as usize >= sales {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(600),
            "the head office stalled at {applied} of {sales}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ingested = start.elapsed();
    hq.shutdown().await;
    println!(
        "  stores' uplinks:   {:>8.0} sales/s published (expected-sequence, acked, one in flight per origin)",
        sales as f64 / uploaded.as_secs_f64()
    );
    println!(
        "  head office ingest {:>8.0} sales/s ({} sales in {:.2} s, durable commit + ack per message)",
        sales as f64 / ingested.as_secs_f64(),
        sales,
        ingested.as_secs_f64()
    );
    std::fs::remove_dir_all(&hq_dir).ok();
}
