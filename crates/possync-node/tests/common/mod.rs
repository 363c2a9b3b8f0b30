//! Helpers for the real-socket tests: in-process nodes on 127.0.0.1, writes through the
//! single writer, reads through the reader pool, and waits on conditions (never fixed sleeps
//! where a condition can be waited for).

#![allow(dead_code, reason = "each test binary uses its own subset of the helpers")]

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use possync_core::{EntityId, EntityKind, PosId};
use possync_node::config::NodeConfig;
use possync_node::writer::Priority;
use possync_node::{Node, NodeShared};
use possync_store::{Store, StoreError, StoreReader, SystemEnvironment};
use serde_json::Value;

/// The shop secret of the tests.
pub const SECRET: &str = "test-shop-secret-5a1f0c9e2b7d4e3a";

/// Generous limit for anything that should happen "soon" on a loaded 2-core machine.
pub const SOON: Duration = Duration::from_secs(30);

/// A node and its data directory (removed when dropped).
pub struct TestNode {
    pub node: Node,
    pub dir: tempfile::TempDir,
}

impl TestNode {
    pub fn shared(&self) -> &Arc<NodeShared> {
        &self.node.shared
    }

    pub fn pos_id(&self) -> PosId {
        self.node.pos_id().clone()
    }

    /// `host:port` of the peer listener.
    pub fn peer_addr(&self) -> SocketAddr {
        self.node.peer_addr.expect("the node listens")
    }

    pub async fn shutdown(self) {
        self.node.shutdown().await;
    }
}

/// Options of [`start`].
#[derive(Clone)]
pub struct Options {
    pub name: String,
    pub secret: String,
    pub peers: Vec<SocketAddr>,
    pub backoff_base_ms: u64,
    pub max_frame_bytes: usize,
    /// The peer listener's address (default 127.0.0.1:0).
    pub listen: Option<SocketAddr>,
    /// Settings written before the node starts.
    pub settings: Vec<(&'static str, String)>,
    /// The node's part in a chain of stores.
    pub chain: Option<possync_node::config::ChainRole>,
    /// Serve the API on 127.0.0.1 (a free port).
    pub api: bool,
}

impl Options {
    pub fn new(name: &str) -> Options {
        Options {
            name: name.to_string(),
            secret: SECRET.to_string(),
            peers: Vec::new(),
            backoff_base_ms: 100,
            max_frame_bytes: 16 * 1024 * 1024,
            listen: None,
            settings: Vec::new(),
            chain: None,
            api: false,
        }
    }

    pub fn peer(mut self, address: SocketAddr) -> Options {
        self.peers.push(address);
        self
    }

    pub fn setting(mut self, key: &'static str, value: impl ToString) -> Options {
        self.settings.push((key, value.to_string()));
        self
    }
}

/// Starts an in-process node on 127.0.0.1:0, no API, no discovery.
pub async fn start(options: Options) -> TestNode {
    start_as(options, None).await
}

/// [`start`] with a given posId (two nodes given the same one are a clone of each other).
pub async fn start_as(options: Options, pos_id: Option<PosId>) -> TestNode {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join(possync_store::DB_FILE);
    let mut store = Store::init(&path, pos_id, &options.name, Box::new(SystemEnvironment::default()))
        .expect("a new store");
    for (key, value) in &options.settings {
        store.set_setting(key, value).expect("a valid setting");
    }
    let config = NodeConfig {
        data_dir: dir.path().to_path_buf(),
        peer_listen: options.listen.unwrap_or_else(|| "127.0.0.1:0".parse().expect("an address")),
        api_listen: options.api.then(|| "127.0.0.1:0".parse().expect("an address")),
        static_peers: options.peers.iter().map(ToString::to_string).collect(),
        discovery: false,
        secret: options.secret.clone(),
        api_token: "test-token".into(),
        max_connections: 16,
        max_frame_bytes: options.max_frame_bytes,
        backoff_base_ms: options.backoff_base_ms,
        chain: options.chain.clone(),
        api: Default::default(),
    };
    let node = Node::start_with_store(config, store).await.expect("the node starts");
    TestNode { node, dir }
}

/// Starts a node again on the database left in `dir` by a node that was shut down.
pub async fn reopen(dir: tempfile::TempDir, config: NodeConfig) -> TestNode {
    let store = Store::open(&dir.path().join(possync_store::DB_FILE), Box::new(SystemEnvironment::default()))
        .expect("the store opens again");
    let config = NodeConfig { data_dir: dir.path().to_path_buf(), ..config };
    let node = Node::start_with_store(config, store).await.expect("the node starts again");
    TestNode { node, dir }
}

/// Runs a write on the node's single writer, as the till would.
pub async fn write<T, F>(node: &TestNode, job: F) -> T
where
    T: Send + 'static,
    F: FnOnce(&mut Store) -> Result<T, StoreError> + Send + 'static,
{
    node.shared().writer.call(Priority::Local, job).await.expect("writer running").expect("write accepted")
}

/// Runs a query on one of the node's readers.
pub async fn read<T, F>(node: &TestNode, query: F) -> T
where
    T: Send + 'static,
    F: FnOnce(&StoreReader) -> Result<T, StoreError> + Send + 'static,
{
    node.shared().readers.with(query).await.expect("query succeeds")
}

/// Rows of a read-only SQL query (keys in camelCase).
pub async fn rows(node: &TestNode, sql: &str) -> Vec<Value> {
    let sql = sql.to_string();
    read(node, move |reader| reader.query_json(&sql)).await
}

/// `SELECT COUNT(*) AS n ...` shortcut: the first row's `n`.
pub async fn count(node: &TestNode, sql: &str) -> i64 {
    rows(node, sql).await.first().and_then(|row| row["n"].as_i64()).expect("a count")
}

pub async fn dump(node: &TestNode) -> String {
    read(node, |reader| reader.canonical_dump()).await
}

pub fn id(text: &str) -> EntityId {
    EntityId::parse(text.to_string()).expect("a valid id")
}

pub async fn create(node: &TestNode, kind: EntityKind, body: Value) -> Value {
    write(node, move |store| store.create_record(kind, &body)).await
}

pub async fn update(node: &TestNode, kind: EntityKind, entity: &str, body: Value) -> Value {
    let entity = id(entity);
    write(node, move |store| store.update_record(kind, &entity, &body)).await
}

/// A product `{id, sku, name, price}`.
pub async fn product(node: &TestNode, entity: &str, price: &str) -> Value {
    let body = serde_json::json!({"id": entity, "sku": format!("SKU-{entity}"), "name": format!("Product {entity}"), "price": price});
    create(node, EntityKind::Product, body).await
}

/// Records a cash sale of `quantity` × `product`.
pub async fn sale(node: &TestNode, product: &str, quantity: u32) -> Value {
    let request: possync_store::SaleRequest = serde_json::from_value(serde_json::json!({
        "lines": [{"productId": product, "quantity": quantity}],
        "payments": [{"method": "cash", "amount": 1000}],
    }))
    .expect("a sale request");
    write(node, move |store| store.record_sale(&request)).await
}

/// Receives `quantity` units of `product` into stock.
pub async fn stock_in(node: &TestNode, product: &str, quantity: i64) -> Value {
    let product = id(product);
    write(node, move |store| {
        store.adjust_stock(
            &product,
            rust_decimal::Decimal::from(quantity),
            possync_core::entity::MovementType::In,
            Some("delivery"),
        )
    })
    .await
}

/// Polls `condition` every 50 ms until it holds; panics with `what` after `limit`.
pub async fn wait_until<F, Fut>(what: &str, limit: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if condition().await {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {limit:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until every node holds the same data (canonical dumps and version vectors equal).
pub async fn wait_converged(nodes: &[&TestNode]) {
    let deadline = tokio::time::Instant::now() + SOON;
    loop {
        let mut dumps = Vec::new();
        let mut summaries = Vec::new();
        for node in nodes {
            dumps.push(dump(node).await);
            summaries.push(node.shared().summary().await);
        }
        if dumps.windows(2).all(|pair| pair[0] == pair[1])
            && summaries.windows(2).all(|pair| pair[0] == pair[1])
        {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            for (node, dump) in nodes.iter().zip(&dumps) {
                eprintln!("--- {} ---\n{dump}", node.pos_id());
            }
            panic!("nodes did not converge within {SOON:?}: summaries {summaries:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until `a` has a live connection to `b`.
pub async fn wait_connected(a: &TestNode, b: &TestNode) {
    let peer = b.pos_id();
    let shared = Arc::clone(a.shared());
    wait_until(&format!("{} connected to {peer}", a.pos_id()), SOON, || {
        let connected = shared.peers.is_connected(&peer);
        async move { connected }
    })
    .await;
}

/// Rows of `p2p_connection_metrics` of one event type.
pub async fn metric_rows(node: &TestNode, event: &str) -> Vec<Value> {
    rows(node, &format!("SELECT * FROM p2p_connection_metrics WHERE event_type = '{event}' ORDER BY id"))
        .await
}

/// A free port on 127.0.0.1 (bound then released: for nodes that must know each other's
/// address before either starts).
pub fn free_address() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    listener.local_addr().expect("its address")
}

/// The data directory path of a node.
pub fn data_dir(node: &TestNode) -> PathBuf {
    node.dir.path().to_path_buf()
}
