//! The chain of stores on a real `nats-server` with JetStream (127.0.0.1, temporary store
//! directory, started by each test): in-process nodes (a head office and store tills, tills
//! of one store on the LAN), real sockets. See docs/CHAIN.md.

mod common;
#[path = "common/nats.rs"]
mod nats;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use possync_chain::{ChainId, StoreId};
use possync_core::EntityKind;
use possync_node::config::{BackboneAuth, BackboneConfig, ChainRole, HqConfig, UplinkConfig};
use serde_json::{Value, json};

use common::{
    Options, SOON, TestNode, count, create, id, product, read, rows, sale, start, stock_in, update,
    wait_until,
};
use nats::{NatsServer, Proxy};

const CHAIN: &str = "acme";

fn backbone(url: &str, auth: BackboneAuth) -> BackboneConfig {
    BackboneConfig { url: url.to_string(), chain: ChainId::parse(CHAIN).unwrap(), auth, tls_ca: None }
}

async fn start_hq(url: &str) -> TestNode {
    start_hq_as(url, BackboneAuth::Anonymous).await
}

async fn start_hq_as(url: &str, auth: BackboneAuth) -> TestNode {
    let mut options = Options::new("head office");
    options.chain = Some(ChainRole::Hq(HqConfig {
        backbone: backbone(url, auth),
        silent_store_alert_secs: 3600,
        store_offline_after_secs: 3,
    }));
    options.api = true;
    start(options).await
}

async fn start_till(url: &str, store: &str, name: &str, peers: &[SocketAddr]) -> TestNode {
    start_till_as(url, store, name, peers, BackboneAuth::Anonymous).await
}

async fn start_till_as(
    url: &str,
    store: &str,
    name: &str,
    peers: &[SocketAddr],
    auth: BackboneAuth,
) -> TestNode {
    let mut options = Options::new(name);
    for peer in peers {
        options = options.peer(*peer);
    }
    options.chain = Some(ChainRole::Uplink(UplinkConfig {
        backbone: backbone(url, auth),
        store: StoreId::parse(store).unwrap(),
        report_every_secs: 1,
    }));
    start(options).await
}

/// `SELECT COUNT(*) AS n ...` until it is `expected`.
async fn wait_count(node: &TestNode, what: &str, sql: &str, expected: i64) {
    let mut last = -1;
    let deadline = tokio::time::Instant::now() + SOON * 2;
    while tokio::time::Instant::now() < deadline {
        last = count(node, sql).await;
        if last == expected {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{what}: {sql} is {last}, expected {expected}");
}

/// A product's price on a node (`None` until it has the product).
async fn price(node: &TestNode, product: &str) -> Option<String> {
    rows(node, &format!("SELECT price FROM products WHERE id = '{product}'"))
        .await
        .first()
        .and_then(|row| row["price"].as_str().map(str::to_string))
}

async fn wait_price(node: &TestNode, product: &str, expected: &str) {
    let mut last = None;
    let deadline = tokio::time::Instant::now() + SOON * 2;
    while tokio::time::Instant::now() < deadline {
        last = price(node, product).await;
        if last.as_deref() == Some(expected) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{} has price {last:?} for {product}, expected {expected}", node.pos_id());
}

/// The tickets, payments and sale movements of `pos` on `node`, in a comparable form.
async fn sales_of(node: &TestNode, pos: &str) -> Vec<Value> {
    let mut all = rows(
        node,
        &format!("SELECT id, ticket_number, total_amount FROM tickets WHERE pos_id = '{pos}' ORDER BY id"),
    )
    .await;
    all.extend(
        rows(
            node,
            &format!(
                "SELECT p.ticket_id, p.method, p.amount FROM ticket_payments p JOIN tickets t ON t.id = p.ticket_id
                 WHERE t.pos_id = '{pos}' ORDER BY p.ticket_id, p.line_no"
            ),
        )
        .await,
    );
    all.extend(
        rows(
            node,
            &format!(
                "SELECT id, product_id, quantity FROM stock_movements WHERE pos_id = '{pos}' ORDER BY id"
            ),
        )
        .await,
    );
    all
}

/// HTTP GET on a node's API.
fn get(node: &TestNode, path: &str) -> Value {
    let address = node.node.api_addr.expect("the API is served");
    ureq::get(&format!("http://{address}{path}"))
        .call()
        .expect("the call succeeds")
        .body_mut()
        .read_json()
        .expect("a JSON answer")
}

/// Every message of the UP stream: subject -> (first seq, last seq) in stream order.
async fn up_runs(url: &str) -> BTreeMap<String, Vec<(u64, u64)>> {
    let client = async_nats::connect(url).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let mut stream = js.get_stream("POSSYNC_ACME_UP").await.unwrap();
    let last = stream.info().await.unwrap().state.last_sequence;
    let mut runs: BTreeMap<String, Vec<(u64, u64)>> = BTreeMap::new();
    for sequence in 1..=last {
        let Ok(message) = stream.get_raw_message(sequence).await else { continue };
        let header = |name: &str| -> u64 {
            message.headers.get(name).and_then(|value| value.as_str().parse().ok()).unwrap_or(0)
        };
        runs.entry(message.subject.to_string())
            .or_default()
            .push((header("Possync-First-Seq"), header("Possync-Last-Seq")));
    }
    runs
}

/// Each subject holds its origin's seqs 1..=n once, in order.
fn assert_contiguous(runs: &BTreeMap<String, Vec<(u64, u64)>>) {
    for (subject, runs) in runs {
        let mut next = 1;
        for (first, last) in runs {
            assert_eq!(*first, next, "{subject}: runs {runs:?} leave a gap or overlap");
            assert!(last >= first, "{subject}: {runs:?}");
            next = last + 1;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sale_in_a_store_reaches_head_office_exactly_once() {
    let server = NatsServer::start();
    let hq = start_hq(&server.url()).await;
    product(&hq, "p1", "2.50").await;
    let till = start_till(&server.url(), "s1", "s1 till 1", &[]).await;
    wait_price(&till, "p1", "2.5").await;

    let ticket = sale(&till, "p1", 3).await;
    let number = ticket["ticketNumber"].as_str().unwrap().to_string();
    assert!(number.starts_with("s1-"), "a chain ticket number starts with its store: {number}");
    let pos = till.pos_id().to_string();
    wait_count(
        &hq,
        "the ticket at HQ",
        &format!("SELECT COUNT(*) AS n FROM tickets WHERE pos_id = '{pos}'"),
        1,
    )
    .await;
    wait_count(
        &hq,
        "the sale movement at HQ",
        &format!("SELECT COUNT(*) AS n FROM stock_movements WHERE pos_id = '{pos}' AND type = 'sale'"),
        1,
    )
    .await;
    assert_eq!(
        sales_of(&hq, &pos).await,
        sales_of(&till, &pos).await,
        "ticket, payments and movements alike"
    );
    let at_hq = rows(&hq, &format!("SELECT ticket_number FROM tickets WHERE pos_id = '{pos}'")).await;
    assert_eq!(at_hq, vec![json!({"ticketNumber": number})]);

    // Once: the backbone holds the till's changes once, HQ applied each once.
    let held = till.shared().summary().await.unwrap().get(&till.pos_id());
    wait_until("the uplink's backlog is empty", SOON, || {
        let backlog = till.shared().chain.backlog();
        async move { backlog == 0 }
    })
    .await;
    let runs = up_runs(&server.url()).await;
    assert_contiguous(&runs);
    let subject = format!("possync.acme.up.s1.{pos}");
    assert_eq!(runs[&subject].last().map(|run| run.1), Some(held.0));
    let applied = count(
        &hq,
        "SELECT COUNT(*) AS n FROM p2p_sync_logs WHERE peer_id = 'store:s1' AND status IN ('success', 'conflict')",
    )
    .await;
    assert_eq!(applied, held.0 as i64, "every change of the till applied once at HQ");
    let metrics = till.shared().metrics.encode();
    assert!(metrics.contains("possync_chain_connected 1"), "{metrics}");
    assert!(
        metrics.contains(&format!("possync_chain_changes_total{{status=\"published\"}} {}", held.0)),
        "{metrics}"
    );
    let stores = get(&hq, "/api/chain/stores");
    assert_eq!(stores[0]["storeId"], "s1");
    assert_eq!(stores[0]["tickets"], 1);
    assert_eq!(stores[0]["terminals"][0]["posId"], pos.as_str());
    assert_eq!(stores[0]["alert"], false);
    hq.shutdown().await;
    till.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_price_change_at_head_office_reaches_every_till_of_two_stores() {
    let server = NatsServer::start();
    let hq = start_hq(&server.url()).await;
    product(&hq, "p1", "2.50").await;
    // Store 1: two tills on the LAN, both uplinked. Store 2: one till with the uplink and
    // one that only has the LAN (the catalog reaches it through its neighbour).
    let a1 = start_till(&server.url(), "s1", "s1 till 1", &[]).await;
    let a2 = start_till(&server.url(), "s1", "s1 till 2", &[a1.peer_addr()]).await;
    let b1 = start_till(&server.url(), "s2", "s2 till 1", &[]).await;
    let b2 = start(Options::new("s2 till 2 (LAN only)").peer(b1.peer_addr())).await;
    for till in [&a1, &a2, &b1, &b2] {
        wait_price(till, "p1", "2.5").await;
    }
    update(&hq, EntityKind::Product, "p1", json!({"price": "3.10"})).await;
    for till in [&a1, &a2, &b1, &b2] {
        wait_price(till, "p1", "3.1").await;
    }
    // A till that got the head office's changes through the LAN first still never uploads
    // them (they have a subject on the DOWN stream): HQ refused nothing.
    let refused = "SELECT COUNT(*) AS n FROM p2p_sync_logs WHERE status = 'error' AND message_type = 'chain'";
    assert_eq!(count(&hq, refused).await, 0);
    assert_eq!(hq.shared().chain.rejected_messages(), 0);
    for node in [hq, a1, a2, b1, b2] {
        node.shutdown().await;
    }
}

/// A product's `storePrices` on a node (`None` until it has them).
async fn store_prices(node: &TestNode, product: &str) -> Option<String> {
    rows(node, &format!("SELECT store_prices FROM products WHERE id = '{product}'"))
        .await
        .first()
        .and_then(|row| row["storePrices"].as_str().map(str::to_string))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_price_set_at_head_office_is_charged_by_that_stores_tills_only() {
    let server = NatsServer::start();
    let hq = start_hq(&server.url()).await;
    product(&hq, "p1", "2.50").await;
    update(&hq, EntityKind::Product, "p1", json!({"storePrices": {"s1": "1.99"}})).await;
    let a1 = start_till(&server.url(), "s1", "s1 till 1", &[]).await;
    let a2 = start_till(&server.url(), "s1", "s1 till 2", &[a1.peer_addr()]).await;
    let b1 = start_till(&server.url(), "s2", "s2 till 1", &[]).await;
    for till in [&a1, &a2, &b1] {
        wait_price(till, "p1", "2.5").await;
        assert_eq!(store_prices(till, "p1").await.as_deref(), Some(r#"{"s1":"1.99"}"#));
    }
    let total = |ticket: &Value| ticket["totalAmount"].as_f64();
    assert_eq!(total(&sale(&a1, "p1", 2).await), Some(3.98), "store s1's price");
    assert_eq!(total(&sale(&b1, "p1", 2).await), Some(5.0), "store s2 has no price of its own: the chain's");

    // A new price for s1 and one for s2, in one edit at head office.
    update(&hq, EntityKind::Product, "p1", json!({"storePrices": {"s1": "1.79", "s2": 2.2}})).await;
    for till in [&a1, &a2, &b1] {
        wait_until("the store prices reach every till", SOON * 2, || async {
            store_prices(till, "p1").await.as_deref() == Some(r#"{"s1":"1.79","s2":"2.2"}"#)
        })
        .await;
    }
    assert_eq!(total(&sale(&a2, "p1", 1).await), Some(1.79));
    assert_eq!(total(&sale(&b1, "p1", 1).await), Some(2.2));
    let shown = read(&a1, |reader| reader.record(EntityKind::Product, &id("p1"))).await.expect("p1 is held");
    assert_eq!(shown["price"], json!(2.5));
    assert_eq!(shown["storePrices"], json!({"s1": 1.79, "s2": 2.2}), "amounts as numbers, like price");

    // Head office books each sale at the price its store charged.
    wait_count(&hq, "the four sales at HQ", "SELECT COUNT(*) AS n FROM tickets", 4).await;
    let totals = rows(&hq, "SELECT total_amount FROM tickets ORDER BY CAST(total_amount AS REAL)").await;
    let totals: Vec<&str> = totals.iter().filter_map(|row| row["totalAmount"].as_str()).collect();
    assert_eq!(totals, ["1.79", "2.2", "3.98", "5"]);
    for node in [hq, a1, a2, b1] {
        node.shutdown().await;
    }
}

async fn customers(node: &TestNode) -> Vec<Value> {
    rows(node, "SELECT id, name, phone, notes, updated_at FROM customers ORDER BY id").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_customer_created_in_one_store_is_known_and_edited_in_every_store() {
    let server = NatsServer::start();
    let hq = start_hq(&server.url()).await;
    product(&hq, "p1", "2.50").await;
    let a1 = start_till(&server.url(), "s1", "s1 till 1", &[]).await;
    let a2 = start_till(&server.url(), "s1", "s1 till 2", &[a1.peer_addr()]).await;
    let b1 = start_till(&server.url(), "s2", "s2 till 1", &[]).await;
    for till in [&a1, &a2, &b1] {
        wait_price(till, "p1", "2.5").await;
    }
    create(&a1, EntityKind::Customer, json!({"id": "cust-1", "name": "Ana", "phone": "1"})).await;
    wait_until("the customer reaches store s2", SOON * 2, || async { customers(&b1).await.len() == 1 }).await;

    // Edited in s2: it reaches both tills of s1 (one of them only over its LAN neighbour or
    // its own downlink, whichever comes first).
    update(&b1, EntityKind::Customer, "cust-1", json!({"phone": "2"})).await;
    for till in [&a1, &a2] {
        wait_until("the edit made in s2 reaches s1", SOON * 2, || async {
            customers(till).await.first().is_some_and(|row| row["phone"] == "2")
        })
        .await;
    }
    // Head office edits it too; then every node holds the same customer, with no conflict.
    update(&hq, EntityKind::Customer, "cust-1", json!({"notes": "VIP"})).await;
    for till in [&a1, &a2, &b1] {
        wait_until("head office's edit reaches every till", SOON * 2, || async {
            customers(till).await.first().is_some_and(|row| row["notes"] == "VIP")
        })
        .await;
    }
    let at_hq = customers(&hq).await;
    assert_eq!(at_hq[0]["name"], "Ana");
    for till in [&a1, &a2, &b1] {
        assert_eq!(customers(till).await, at_hq);
        assert_eq!(count(till, "SELECT COUNT(*) AS n FROM p2p_conflicts").await, 0);
        assert_eq!(count(till, "SELECT COUNT(*) AS n FROM p2p_sync_logs WHERE status = 'error'").await, 0);
    }
    for node in [hq, a1, a2, b1] {
        node.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stock_is_per_store_and_head_office_shows_each_and_the_total() {
    let server = NatsServer::start();
    let hq = start_hq(&server.url()).await;
    product(&hq, "p1", "2.50").await;
    let a = start_till(&server.url(), "s1", "s1 till", &[]).await;
    let b = start_till(&server.url(), "s2", "s2 till", &[]).await;
    wait_price(&a, "p1", "2.5").await;
    wait_price(&b, "p1", "2.5").await;
    stock_in(&a, "p1", 10).await;
    stock_in(&b, "p1", 20).await;
    // Sales in both stores at once.
    let selling_a = async {
        for _ in 0..3 {
            sale(&a, "p1", 1).await;
        }
    };
    let selling_b = async {
        for _ in 0..5 {
            sale(&b, "p1", 1).await;
        }
    };
    tokio::join!(selling_a, selling_b);
    wait_count(&hq, "every movement at HQ", "SELECT COUNT(*) AS n FROM stock_movements", 10).await;
    let stock = get(&hq, "/api/chain/stock?productId=p1");
    assert_eq!(
        stock,
        json!({"productId": "p1", "stores": [{"storeId": "s1", "stock": "7"}, {"storeId": "s2", "stock": "15"}], "total": "22"})
    );
    // A sale in one store never moves the other's stock: each till sees its store only.
    let local = |node: &TestNode| {
        let node = node.shared().clone();
        async move {
            node.readers
                .with(|reader| {
                    reader.record(
                        EntityKind::Product,
                        &possync_core::EntityId::parse("p1".to_string()).unwrap(),
                    )
                })
                .await
                .unwrap()
                .unwrap()["stock"]
                .clone()
        }
    };
    assert_eq!(local(&a).await.as_f64(), Some(7.0));
    assert_eq!(local(&b).await.as_f64(), Some(15.0));
    let stores = get(&hq, "/api/chain/stores");
    let tickets: Vec<_> = stores.as_array().unwrap().iter().map(|store| store["tickets"].clone()).collect();
    assert_eq!(tickets, vec![json!(3), json!(5)]);
    for node in [hq, a, b] {
        node.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_cut_off_catches_up_both_ways_exactly() {
    let server = NatsServer::start();
    let hq = start_hq(&server.url()).await;
    product(&hq, "p1", "2.50").await;
    let wan = Proxy::start(format!("127.0.0.1:{}", server.port).parse().unwrap()).await;
    let till = start_till(&wan.url(), "s1", "s1 till", &[]).await;
    wait_price(&till, "p1", "2.5").await;
    sale(&till, "p1", 1).await;
    let pos = till.pos_id().to_string();
    let at_hq = format!("SELECT COUNT(*) AS n FROM tickets WHERE pos_id = '{pos}'");
    wait_count(&hq, "the first sale at HQ", &at_hq, 1).await;

    wan.cut();
    let unix_ms =
        || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    let cut_at = possync_core::time::rfc3339_ms(unix_ms());
    for _ in 0..30 {
        sale(&till, "p1", 1).await;
    }
    update(&hq, EntityKind::Product, "p1", json!({"price": "4.00"})).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(count(&hq, &at_hq).await, 1, "nothing crosses a cut link");
    assert_eq!(price(&till, "p1").await.as_deref(), Some("2.5"));
    // The till knows how much it holds for the backbone, and since when (the first sale
    // made after the cut): what its reports tell head office.
    wait_until("the till counts the sales it holds for the backbone", SOON * 2, || {
        let backlog = till.shared().chain.snapshot()["backlog"].as_u64().unwrap_or(0);
        async move { backlog >= 30 }
    })
    .await;
    let status = till.shared().chain.snapshot();
    let oldest = status["oldestPendingAt"].as_str().unwrap_or_default().to_string();
    assert!(oldest >= cut_at && oldest <= possync_core::time::rfc3339_ms(unix_ms()), "{status}");

    wan.heal();
    wait_count(&hq, "the sales made while cut off", &at_hq, 31).await;
    wait_price(&till, "p1", "4").await;
    assert_eq!(sales_of(&hq, &pos).await, sales_of(&till, &pos).await);
    assert_contiguous(&up_runs(&server.url()).await);
    for node in [hq, till] {
        node.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_tills_uploading_the_same_origins_leave_no_gap_and_no_duplicate() {
    let server = NatsServer::start();
    let hq = start_hq(&server.url()).await;
    product(&hq, "p1", "2.50").await;
    let a1 = start_till(&server.url(), "s1", "s1 till 1", &[]).await;
    let a2 = start_till(&server.url(), "s1", "s1 till 2", &[a1.peer_addr()]).await;
    wait_price(&a1, "p1", "2.5").await;
    wait_price(&a2, "p1", "2.5").await;
    common::wait_connected(&a2, &a1).await;
    // Both tills hold both origins (the LAN) and both upload both.
    let selling = |till: &TestNode| {
        let till = till.shared().clone();
        async move {
            for _ in 0..40 {
                let request: possync_store::SaleRequest = serde_json::from_value(json!({
                    "lines": [{"productId": "p1", "quantity": 1}],
                    "payments": [{"method": "cash", "amount": 10}],
                }))
                .unwrap();
                till.writer
                    .call(possync_node::writer::Priority::Local, move |store| store.record_sale(&request))
                    .await
                    .unwrap()
                    .unwrap();
            }
        }
    };
    tokio::join!(selling(&a1), selling(&a2));
    wait_count(&hq, "every sale of both tills at HQ", "SELECT COUNT(*) AS n FROM tickets", 80).await;
    common::wait_converged(&[&a1, &a2]).await;
    let runs = up_runs(&server.url()).await;
    assert_contiguous(&runs);
    assert_eq!(runs.len(), 2, "one subject per origin: {runs:?}");
    // The server accepted each change once, whichever till sent it: the losers of a race
    // were refused ("wrong last sequence") and went on from the winner's run.
    let published: u64 = [&a1, &a2]
        .iter()
        .map(|till| till.shared().chain.snapshot()["publishedChanges"].as_u64().unwrap())
        .sum();
    // The 80 sales and each till's key enrollment.
    assert_eq!(published, 82);
    // The last publish and the last apply are dated, in the status and as metrics.
    let hq_status = hq.shared().chain.snapshot();
    assert!(hq_status["lastAppliedAt"].is_string(), "{hq_status}");
    let hq_metrics = hq.shared().metrics.encode();
    let applied_at = hq_metrics
        .lines()
        .find_map(|line| line.strip_prefix("possync_chain_last_applied_timestamp_seconds "))
        .and_then(|value| value.trim().parse::<u64>().ok());
    let now_s = possync_node::clock::now_ms() / 1000;
    assert!(applied_at.is_some_and(|at| at <= now_s && at + 60 > now_s), "{applied_at:?} vs {now_s}");
    assert!(
        [&a1, &a2].iter().any(|till| till.shared().chain.snapshot()["lastPublishedAt"].is_string()),
        "a till published"
    );
    for till in [&a1, &a2] {
        assert_eq!(sales_of(&hq, till.pos_id().as_str()).await, sales_of(till, till.pos_id().as_str()).await);
    }
    for node in [hq, a1, a2] {
        node.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_garbage_messages_are_refused_and_logged_and_ingest_goes_on() {
    let server = NatsServer::start();
    let hq = start_hq(&server.url()).await;
    product(&hq, "p1", "2.50").await;
    let till = start_till(&server.url(), "s1", "s1 till", &[]).await;
    wait_price(&till, "p1", "2.5").await;
    let pos = till.pos_id().to_string();

    let client = async_nats::connect(server.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let forged_change = json!({"type": "category", "action": "create",
        "data": {"id": "forged", "name": "Forged", "sync": {"origin": "someone-else", "seq": 1, "ctx": {"someone-else": 1}}}});
    let hq_origin = hq.pos_id().to_string();
    let own_change = json!({"type": "category", "action": "create",
        "data": {"id": "forged-2", "name": "Forged", "sync": {"origin": hq_origin, "seq": 99, "ctx": {}}}});
    let forged = [
        // Garbage on the till's own subject.
        (format!("possync.acme.up.s1.{pos}"), b"\x00\x01 not json".to_vec()),
        // Another origin's change under this origin's subject.
        (
            format!("possync.acme.up.s1.{pos}-x"),
            serde_json::to_vec(&json!({"v": 1, "origin": format!("{pos}-x"), "firstSeq": 1, "lastSeq": 1, "changes": [forged_change]}))
                .unwrap(),
        ),
        // A store uploading the head office's own origin.
        (
            format!("possync.acme.up.s1.{hq_origin}"),
            serde_json::to_vec(&json!({"v": 1, "origin": hq_origin, "firstSeq": 99, "lastSeq": 99, "changes": [own_change]}))
                .unwrap(),
        ),
    ];
    for (subject, payload) in forged {
        js.publish(subject, payload.into()).await.unwrap().await.unwrap();
    }
    wait_until("three messages refused at HQ", SOON, || {
        let refused = hq.shared().chain.rejected_messages();
        async move { refused >= 3 }
    })
    .await;
    sale(&till, "p1", 2).await;
    wait_count(
        &hq,
        "the sale after the forged messages",
        &format!("SELECT COUNT(*) AS n FROM tickets WHERE pos_id = '{pos}'"),
        1,
    )
    .await;
    let logged = count(
        &hq,
        "SELECT COUNT(*) AS n FROM p2p_sync_logs WHERE status = 'error' AND message_type = 'chain'",
    )
    .await;
    assert!(logged >= 3, "each refused message leaves an error row, {logged} found");
    assert_eq!(
        count(&hq, "SELECT COUNT(*) AS n FROM categories WHERE id LIKE 'forged%'").await,
        0,
        "nothing forged applied"
    );
    for node in [hq, till] {
        node.shutdown().await;
    }
}

/// The nats-server configuration of docs/CHAIN.md, for chain `acme` and stores s1, s2.
fn permissions_config() -> String {
    let store = |store: &str| {
        format!(
            r#"{{ user: {store}, password: {store}-secret, permissions: {{
                publish: {{ allow: [
                    "possync.acme.up.{store}.>",
                    "possync.acme.status.{store}.>",
                    "$JS.API.DIRECT.GET.POSSYNC_ACME_UP.possync.acme.up.{store}.>",
                    "$JS.API.CONSUMER.CREATE.POSSYNC_ACME_DOWN",
                    "$JS.API.CONSUMER.CREATE.POSSYNC_ACME_DOWN.>",
                    "$JS.API.CONSUMER.DELETE.POSSYNC_ACME_DOWN.>",
                    "$JS.API.CONSUMER.INFO.POSSYNC_ACME_DOWN.>",
                    "$JS.API.CONSUMER.MSG.NEXT.POSSYNC_ACME_DOWN.>",
                    "$JS.API.DIRECT.GET.POSSYNC_ACME_DOWN.>",
                ] }}
                subscribe: {{ allow: ["_INBOX.>"] }}
            }} }}"#
        )
    };
    format!(
        "accounts {{ CHAIN {{ jetstream: enabled, users: [ {{ user: hq, password: hq-secret }}, {}, {} ] }} }}\n",
        store("s1"),
        store("s2")
    )
}

fn user(name: &str) -> BackboneAuth {
    BackboneAuth::UserPassword { user: name.into(), password: format!("{name}-secret") }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_cannot_publish_under_another_stores_subject() {
    let server = NatsServer::start_with_config(&permissions_config());
    let hq = start_hq_as(&server.url(), user("hq")).await;
    product(&hq, "p1", "2.50").await;
    // The store's own credentials are enough for its work both ways.
    let till = start_till_as(&server.url(), "s1", "s1 till", &[], user("s1")).await;
    wait_price(&till, "p1", "2.5").await;
    sale(&till, "p1", 1).await;
    let pos = till.pos_id().to_string();
    wait_count(
        &hq,
        "the sale through a restricted user",
        &format!("SELECT COUNT(*) AS n FROM tickets WHERE pos_id = '{pos}'"),
        1,
    )
    .await;

    // s1's user publishing under s2's subject: refused by the server, never stored.
    let client = async_nats::ConnectOptions::with_user_and_password("s1".into(), "s1-secret".into())
        .connect(server.url())
        .await
        .unwrap();
    let js =
        async_nats::jetstream::context::ContextBuilder::new().timeout(Duration::from_secs(2)).build(client);
    let published = match js.publish("possync.acme.up.s2.intruder", "forged".into()).await {
        Ok(ack) => ack.await.map(|_| ()),
        Err(err) => Err(err),
    };
    assert!(published.is_err(), "a store must not publish under another store's subject");
    let runs = up_runs_as(&server.url(), user("hq")).await;
    assert!(runs.keys().all(|subject| subject.starts_with("possync.acme.up.s1.")), "{runs:?}");
    // Nor report as one of s2's tills; its own reports get through.
    let raw = async_nats::ConnectOptions::with_user_and_password("s1".into(), "s1-secret".into())
        .connect(server.url())
        .await
        .unwrap();
    raw.publish("possync.acme.status.s2.intruder", b"{\"backlog\":0}".to_vec().into()).await.unwrap();
    raw.flush().await.unwrap();
    wait_until("store s1's reports at HQ", SOON, || async {
        get(&hq, "/api/chain/stores")[0]["uplink"]["online"] == true
    })
    .await;
    let stores = get(&hq, "/api/chain/stores");
    assert!(stores.as_array().unwrap().iter().all(|store| store["storeId"] == "s1"), "{stores}");
    for node in [hq, till] {
        node.shutdown().await;
    }
}

async fn up_runs_as(url: &str, auth: BackboneAuth) -> BTreeMap<String, Vec<(u64, u64)>> {
    let BackboneAuth::UserPassword { user, password } = auth else { unreachable!() };
    let client =
        async_nats::ConnectOptions::with_user_and_password(user, password).connect(url).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let mut stream = js.get_stream("POSSYNC_ACME_UP").await.unwrap();
    let last = stream.info().await.unwrap().state.last_sequence;
    let mut subjects: BTreeMap<String, Vec<(u64, u64)>> = BTreeMap::new();
    for sequence in 1..=last {
        if let Ok(message) = stream.get_raw_message(sequence).await {
            subjects.entry(message.subject.to_string()).or_default().push((sequence, sequence));
        }
    }
    subjects
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_killed_mid_traffic_loses_and_doubles_nothing() {
    let mut server = NatsServer::start();
    let hq = start_hq(&server.url()).await;
    product(&hq, "p1", "2.50").await;
    let a = start_till(&server.url(), "s1", "s1 till", &[]).await;
    let b = start_till(&server.url(), "s2", "s2 till", &[]).await;
    wait_price(&a, "p1", "2.5").await;
    wait_price(&b, "p1", "2.5").await;
    let selling = |till: &TestNode| {
        let till = till.shared().clone();
        async move {
            for _ in 0..60 {
                let request: possync_store::SaleRequest = serde_json::from_value(json!({
                    "lines": [{"productId": "p1", "quantity": 1}],
                    "payments": [{"method": "cash", "amount": 10}],
                }))
                .unwrap();
                till.writer
                    .call(possync_node::writer::Priority::Local, move |store| store.record_sale(&request))
                    .await
                    .unwrap()
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    let killing = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        server.kill();
        tokio::time::sleep(Duration::from_millis(500)).await;
        server.restart();
    };
    tokio::join!(selling(&a), selling(&b), killing);
    update(&hq, EntityKind::Product, "p1", json!({"price": "5.00"})).await;
    wait_count(&hq, "every sale after the crash", "SELECT COUNT(*) AS n FROM tickets", 120).await;
    wait_price(&a, "p1", "5").await;
    wait_price(&b, "p1", "5").await;
    for till in [&a, &b] {
        assert_eq!(sales_of(&hq, till.pos_id().as_str()).await, sales_of(till, till.pos_id().as_str()).await);
    }
    assert_contiguous(&up_runs(&server.url()).await);
    for node in [hq, a, b] {
        node.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_catalog_edit_made_in_a_store_is_refused_at_head_office_and_stalls_no_one() {
    let server = NatsServer::start();
    let hq = start_hq(&server.url()).await;
    product(&hq, "p1", "2.50").await;
    let a = start_till(&server.url(), "s1", "s1 till", &[]).await;
    let b = start_till(&server.url(), "s2", "s2 till", &[]).await;
    wait_price(&a, "p1", "2.5").await;
    wait_price(&b, "p1", "2.5").await;

    update(&a, EntityKind::Product, "p1", json!({"price": "9.99"})).await;
    sale(&a, "p1", 1).await;
    let pos = a.pos_id().to_string();
    wait_count(
        &hq,
        "the sale after the catalog edit",
        &format!("SELECT COUNT(*) AS n FROM tickets WHERE pos_id = '{pos}'"),
        1,
    )
    .await;
    assert_eq!(price(&hq, "p1").await.as_deref(), Some("2.5"), "the store's edit is not applied at HQ");
    let refused = count(
        &hq,
        "SELECT COUNT(*) AS n FROM p2p_sync_logs WHERE peer_id = 'store:s1' AND status = 'error' AND entity_type = 'product'",
    )
    .await;
    assert_eq!(refused, 1);
    // The head office's next edit names no store origin: every store applies it.
    update(&hq, EntityKind::Product, "p1", json!({"price": "3.00"})).await;
    wait_price(&b, "p1", "3").await;
    wait_price(&a, "p1", "3").await;
    for node in [hq, a, b] {
        node.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_uploading_till_is_gone_another_till_of_the_store_uploads_its_sales() {
    let server = NatsServer::start();
    let hq = start_hq(&server.url()).await;
    product(&hq, "p1", "2.50").await;
    let wan = Proxy::start(format!("127.0.0.1:{}", server.port).parse().unwrap()).await;
    // Till 1 reaches the backbone through a link about to fail; till 2 directly.
    let a1 = start_till(&wan.url(), "s1", "s1 till 1", &[]).await;
    let a2 = start_till(&server.url(), "s1", "s1 till 2", &[a1.peer_addr()]).await;
    wait_price(&a1, "p1", "2.5").await;
    common::wait_connected(&a2, &a1).await;
    sale(&a1, "p1", 1).await;
    let pos = a1.pos_id().to_string();
    let at_hq = format!("SELECT COUNT(*) AS n FROM tickets WHERE pos_id = '{pos}'");
    wait_count(&hq, "the first sale", &at_hq, 1).await;

    wan.cut();
    for _ in 0..25 {
        sale(&a1, "p1", 1).await;
    }
    // Till 2 holds them through the LAN; then till 1 is gone for good.
    common::wait_converged(&[&a1, &a2]).await;
    let sold = sales_of(&a1, &pos).await;
    a1.shutdown().await;
    wait_count(&hq, "till 1's sales, uploaded by till 2", &at_hq, 26).await;
    assert_eq!(sales_of(&hq, &pos).await, sold);
    assert_contiguous(&up_runs(&server.url()).await);
    for node in [hq, a2] {
        node.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_office_restarted_resumes_from_its_durable_consumer() {
    let server = NatsServer::start();
    let hq = start_hq(&server.url()).await;
    product(&hq, "p1", "2.50").await;
    let till = start_till(&server.url(), "s1", "s1 till", &[]).await;
    wait_price(&till, "p1", "2.5").await;
    sale(&till, "p1", 1).await;
    let pos = till.pos_id().to_string();
    let at_hq = format!("SELECT COUNT(*) AS n FROM tickets WHERE pos_id = '{pos}'");
    wait_count(&hq, "the first sale", &at_hq, 1).await;

    let config = hq.shared().config.clone();
    let TestNode { node, dir } = hq;
    node.shutdown().await;
    // The store keeps selling into the stream while the head office is down.
    for _ in 0..20 {
        sale(&till, "p1", 1).await;
    }
    wait_until("the till's backlog is on the backbone", SOON, || {
        let backlog = till.shared().chain.backlog();
        async move { backlog == 0 }
    })
    .await;
    let hq = common::reopen(dir, config).await;
    wait_count(&hq, "every sale after the head office's restart", &at_hq, 21).await;
    assert_eq!(sales_of(&hq, &pos).await, sales_of(&till, &pos).await);
    for node in [hq, till] {
        node.shutdown().await;
    }
}

/// A CA and a certificate for 127.0.0.1 signed by it, made with the `openssl` command:
/// (CA file, certificate file, key file).
fn test_certificates(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let run = |args: &[&str]| {
        let status = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap_or_else(|err| {
                panic!("the TLS test needs the openssl command (apt-get install openssl): {err}")
            });
        assert!(status.success(), "openssl {args:?} failed");
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=possync test CA",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "san.ext",
    ]);
    (dir.join("ca.pem"), dir.join("server.pem"), dir.join("server.key"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backbone_over_tls_verifies_the_server_with_the_configured_ca() {
    let certificates = tempfile::tempdir().unwrap();
    let (ca, cert, key) = test_certificates(certificates.path());
    let server = NatsServer::start_with_config(&format!(
        "tls {{ cert_file: {:?}, key_file: {:?} }}\n",
        cert.display().to_string(),
        key.display().to_string()
    ));
    let with_ca = |auth| {
        let mut backbone = backbone(&server.url(), auth);
        backbone.tls_ca = Some(ca.clone());
        backbone
    };
    let mut options = Options::new("head office");
    options.chain = Some(ChainRole::Hq(HqConfig {
        backbone: with_ca(BackboneAuth::Anonymous),
        silent_store_alert_secs: 60,
        store_offline_after_secs: 3,
    }));
    let hq = start(options).await;
    product(&hq, "p1", "2.50").await;
    let mut options = Options::new("s1 till");
    options.chain = Some(ChainRole::Uplink(UplinkConfig {
        backbone: with_ca(BackboneAuth::Anonymous),
        store: StoreId::parse("s1").unwrap(),
        report_every_secs: 1,
    }));
    let till = start(options).await;
    // A till that does not know the CA cannot be talked into trusting the server.
    let stranger = start_till(&server.url(), "s2", "s2 till without the CA", &[]).await;
    wait_price(&till, "p1", "2.5").await;
    sale(&till, "p1", 1).await;
    let pos = till.pos_id().to_string();
    wait_count(
        &hq,
        "the sale over TLS",
        &format!("SELECT COUNT(*) AS n FROM tickets WHERE pos_id = '{pos}'"),
        1,
    )
    .await;
    wait_until("the till with the CA reports itself connected", SOON, || {
        let connected = till.shared().chain.snapshot()["connected"] == true;
        async move { connected }
    })
    .await;
    assert_eq!(stranger.shared().chain.snapshot()["connected"], false);
    assert_eq!(price(&stranger, "p1").await, None, "nothing reached the till that does not trust the server");
    for node in [hq, till, stranger] {
        node.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_store_is_flagged_at_head_office() {
    let server = NatsServer::start();
    let mut options = Options::new("head office");
    options.chain = Some(ChainRole::Hq(HqConfig {
        backbone: backbone(&server.url(), BackboneAuth::Anonymous),
        silent_store_alert_secs: 1,
        store_offline_after_secs: 3,
    }));
    options.api = true;
    let hq = start(options).await;
    product(&hq, "p1", "2.50").await;
    let till = start_till(&server.url(), "s1", "s1 till", &[]).await;
    wait_price(&till, "p1", "2.5").await;
    sale(&till, "p1", 1).await;
    wait_count(&hq, "the sale", "SELECT COUNT(*) AS n FROM tickets", 1).await;
    // (A store heard from recently is not flagged: the first test, with an hour's threshold.)
    // Silent for longer than the threshold (second resolution: up to 2 s plus a margin).
    tokio::time::sleep(Duration::from_millis(3_200)).await;
    let silent = get(&hq, "/api/chain/stores");
    assert_eq!(silent[0]["alert"], true, "{silent}");
    assert!(silent[0]["silentSeconds"].as_u64().unwrap() >= 2);
    // Silent but online: the till reports every second with nothing left to upload.
    let uplink = &silent[0]["uplink"];
    assert_eq!(uplink["online"], true, "{silent}");
    assert_eq!(uplink["lagChanges"], 0);
    assert_eq!(uplink["lagSeconds"], 0);
    assert_eq!(uplink["offlineSince"], Value::Null);

    // Reports that name no store, or say nothing readable, change nothing.
    let client = async_nats::connect(server.url()).await.unwrap();
    for (subject, body) in [
        ("possync.acme.status.s1.intruder", &b"{\"backlog\":-3}"[..]),
        ("possync.acme.status.s1", b"{\"backlog\":1}"),
        ("possync.acme.status.s!.t1", b"{\"backlog\":1}"),
    ] {
        client.publish(subject, body.to_vec().into()).await.unwrap();
    }
    client.flush().await.unwrap();
    // A store whose tills report but that has sent nothing yet is listed too.
    client.publish("possync.acme.status.s2.t9", b"{\"backlog\":4}".to_vec().into()).await.unwrap();
    client.flush().await.unwrap();
    wait_until("store s2 to be listed", SOON, || async {
        get(&hq, "/api/chain/stores").as_array().is_some_and(|stores| stores.len() == 2)
    })
    .await;
    let stores = get(&hq, "/api/chain/stores");
    assert_eq!(stores[0]["uplink"]["lagChanges"], 0, "{stores}");
    assert_eq!(stores[1]["storeId"], "s2");
    assert_eq!(stores[1]["uplink"]["lagChanges"], 4);
    assert_eq!(stores[1]["uplink"]["lagSeconds"], Value::Null, "nothing ever received from s2");
    // A report that says when its oldest pending change was made gives the lag in time.
    let ten_s_ago =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() - 10_000;
    let report =
        format!("{{\"backlog\":4,\"oldestMs\":{ten_s_ago},\"conflicts\":{{\"open\":2,\"lastDay\":7}}}}");
    client.publish("possync.acme.status.s2.t9", report.into_bytes().into()).await.unwrap();
    client.flush().await.unwrap();
    wait_until("store s2's lag in seconds", SOON, || async {
        get(&hq, "/api/chain/stores")[1]["uplink"]["lagSeconds"]
            .as_u64()
            .is_some_and(|lag| (10..20).contains(&lag))
    })
    .await;
    let stores = get(&hq, "/api/chain/stores");
    assert_eq!(
        stores[1]["uplink"]["conflicts"],
        json!({"open": 2, "lastDay": 7}),
        "the store's conflicts summary"
    );
    assert_eq!(
        stores[0]["uplink"]["conflicts"],
        json!({"open": 0, "lastDay": 0}),
        "a real till reports its own"
    );
    // Sales per day over the days asked for (today only: the sale made today).
    let today = get(&hq, "/api/chain/stores?days=1");
    assert_eq!(today[0]["salesPerDay"].as_array().map(Vec::len), Some(1), "{today}");
    assert_eq!(today[0]["tickets"], 1);
    let address = hq.node.api_addr.expect("the API is served");
    for bad in ["0", "367", "x"] {
        let answer = ureq::get(&format!("http://{address}/api/chain/stores?days={bad}")).call();
        assert!(matches!(answer, Err(ureq::Error::StatusCode(400))), "days={bad}: {answer:?}");
    }

    // The till stops: after `store_offline_after_secs` (3 s) without a report, offline,
    // since its last report.
    till.shutdown().await;
    wait_until("store s1 to be offline", SOON * 2, || async {
        get(&hq, "/api/chain/stores")[0]["uplink"]["online"] == false
    })
    .await;
    let offline = get(&hq, "/api/chain/stores");
    assert_eq!(offline[0]["uplink"]["offlineSince"], offline[0]["uplink"]["lastReportAt"], "{offline}");
    hq.shutdown().await;
}
