//! The HTTP API over real HTTP on 127.0.0.1: a real [`Node`] (its own database in a temp
//! directory, discovery off, every port chosen by the OS) and a blocking client. Every route
//! is called; every refusal is checked for its status, its `{"error": {"code", "message"}}`
//! shape, and for having written nothing.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use possync_core::{EntityId, EntityKind, PosId};
use possync_node::api::{AuthPolicy, BrowserGuard, route_list, router_with};
use possync_node::config::NodeConfig;
use possync_node::{Node, NodeShared};
use possync_store::{PeerRef, Store, SystemEnvironment};
use serde_json::{Value, json};

const SECRET: &str = "api-test-shop-secret-3b9e1d";
const TOKEN: &str = "api-test-token-7c2f";

/// What the API answered.
#[derive(Debug)]
struct Reply {
    status: u16,
    body: Value,
    headers: ureq::http::HeaderMap,
}

impl Reply {
    /// Asserts an error answer: status, code, and the documented shape.
    #[track_caller]
    fn error(&self, status: u16, code: &str) {
        assert_eq!(self.status, status, "{:?}", self.body);
        assert_eq!(self.body["error"]["code"], code, "{:?}", self.body);
        assert!(self.body["error"]["message"].as_str().is_some_and(|message| !message.is_empty()));
        assert_eq!(self.body.as_object().map(|object| object.len()), Some(1), "{:?}", self.body);
    }

    fn header(&self, name: &str) -> &str {
        self.headers.get(name).and_then(|value| value.to_str().ok()).unwrap_or("")
    }
}

/// A blocking client of one base URL.
struct Client {
    base: String,
    agent: ureq::Agent,
    token: Option<String>,
}

impl Client {
    fn new(address: SocketAddr) -> Client {
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(30)))
            .http_status_as_error(false)
            .build()
            .into();
        Client { base: format!("http://{address}"), agent, token: None }
    }

    /// Sends `body` as raw text with a content type. A state-changing call without a body
    /// still says `Content-Type: application/json`, as the API asks (api/guard.rs).
    fn raw(&self, method: &str, path: &str, body: Option<(&str, &str)>) -> Reply {
        let mut request = ureq::http::Request::builder().method(method).uri(format!("{}{path}", self.base));
        if let Some(token) = &self.token {
            request = request.header("Authorization", format!("Bearer {token}"));
        }
        let response = match body {
            Some((content_type, text)) => {
                self.agent.run(request.header("Content-Type", content_type).body(text.to_string()).unwrap())
            }
            None if method == "GET" => self.agent.run(request.body(()).unwrap()),
            None => self.agent.run(request.header("Content-Type", "application/json").body(()).unwrap()),
        };
        let mut response = response.unwrap_or_else(|err| panic!("{method} {path}: {err}"));
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let text = response.body_mut().read_to_string().unwrap_or_default();
        let body = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        Reply { status, body, headers }
    }

    fn get(&self, path: &str) -> Reply {
        self.raw("GET", path, None)
    }

    fn send(&self, method: &str, path: &str, body: &Value) -> Reply {
        self.raw(method, path, Some(("application/json", &body.to_string())))
    }

    fn post(&self, path: &str, body: &Value) -> Reply {
        self.send("POST", path, body)
    }

    /// A GET that must succeed.
    #[track_caller]
    fn ok(&self, path: &str) -> Value {
        let reply = self.get(path);
        assert_eq!(reply.status, 200, "GET {path}: {:?}", reply.body);
        reply.body
    }

    /// How many rows a list answers (at most 1000).
    #[track_caller]
    fn count(&self, path: &str) -> usize {
        let separator = if path.contains('?') { '&' } else { '?' };
        self.ok(&format!("{path}{separator}limit=500")).as_array().map_or(0, Vec::len)
    }
}

/// A node with its runtime, data directory and client.
struct TestNode {
    runtime: tokio::runtime::Runtime,
    node: Option<Node>,
    client: Client,
    _dir: tempfile::TempDir,
}

fn config(dir: &std::path::Path, peers: Vec<String>) -> NodeConfig {
    NodeConfig {
        data_dir: dir.to_path_buf(),
        peer_listen: "127.0.0.1:0".parse().unwrap(),
        api_listen: Some("127.0.0.1:0".parse().unwrap()),
        static_peers: peers,
        discovery: false,
        secret: SECRET.into(),
        api_token: TOKEN.into(),
        max_connections: 16,
        max_frame_bytes: 1024 * 1024,
        backoff_base_ms: 50,
        chain: None,
        api: Default::default(),
    }
}

fn new_store(dir: &std::path::Path, pos: &str) -> Store {
    let pos = PosId::parse(pos).unwrap();
    Store::init(&dir.join(possync_store::DB_FILE), Some(pos), "Till", Box::new(SystemEnvironment::default()))
        .unwrap()
}

impl TestNode {
    fn start() -> TestNode {
        let dir = tempfile::tempdir().unwrap();
        let store = new_store(dir.path(), "pos-api-test");
        TestNode::with_store(dir, store, Vec::new())
    }

    fn with_store(dir: tempfile::TempDir, store: Store, peers: Vec<String>) -> TestNode {
        let config = config(dir.path(), peers);
        TestNode::with_config(dir, store, config)
    }

    fn with_config(dir: tempfile::TempDir, store: Store, config: NodeConfig) -> TestNode {
        let runtime =
            tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let node = runtime.block_on(Node::start_with_store(config, store)).unwrap();
        let client = Client::new(node.api_addr.unwrap());
        TestNode { runtime, node: Some(node), client, _dir: dir }
    }

    fn named(pos: &str, peers: Vec<String>) -> TestNode {
        let dir = tempfile::tempdir().unwrap();
        let store = new_store(dir.path(), pos);
        TestNode::with_store(dir, store, peers)
    }

    fn shared(&self) -> &Arc<NodeShared> {
        &self.node.as_ref().unwrap().shared
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        if let Some(node) = self.node.take() {
            self.runtime.block_on(node.shutdown());
        }
    }
}

/// Waits for a condition (never a fixed sleep where a condition can be waited for).
#[track_caller]
fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

fn category_and_product(api: &Client) -> (String, String) {
    let category = api.post("/api/categories", &json!({"name": "Drinks"}));
    assert_eq!(category.status, 201, "{:?}", category.body);
    let category_id = category.body["id"].as_str().unwrap().to_string();
    let product = api.post(
        "/api/products",
        &json!({"sku": "OJ-33", "name": "Orange juice 33 cl", "price": "2.50", "categoryId": category_id}),
    );
    assert_eq!(product.status, 201, "{:?}", product.body);
    (category_id, product.body["id"].as_str().unwrap().to_string())
}

#[test]
fn records_are_created_read_updated_and_deleted() {
    let test = TestNode::start();
    let api = &test.client;
    let (category_id, product_id) = category_and_product(api);

    let product = api.ok(&format!("/api/products/{product_id}"));
    assert_eq!(product["name"], "Orange juice 33 cl");
    assert_eq!(product["price"].as_f64(), Some(2.5));
    assert_eq!(product["stock"].as_f64(), Some(0.0));
    assert_eq!(product["categoryId"], category_id.as_str());

    let patched = api.send("PATCH", &format!("/api/products/{product_id}"), &json!({"price": 2.8}));
    assert_eq!(patched.status, 200, "{:?}", patched.body);
    assert_eq!(patched.body["price"].as_f64(), Some(2.8));
    assert_eq!(patched.body["name"], "Orange juice 33 cl");

    let other =
        api.post("/api/products", &json!({"id": "apple-1", "sku": "AP-1", "name": "Apple", "price": 0.4}));
    assert_eq!(other.status, 201);
    assert_eq!(other.body["id"], "apple-1");
    assert_eq!(api.count("/api/products"), 2);
    let found = api.ok("/api/products?search=orange");
    assert_eq!(found.as_array().unwrap().len(), 1);
    assert_eq!(found[0]["id"], product_id.as_str());
    assert_eq!(api.ok(&format!("/api/products?categoryId={category_id}")).as_array().unwrap().len(), 1);
    assert_eq!(api.ok("/api/products?limit=1&offset=1").as_array().unwrap().len(), 1);

    let customer = api.post("/api/customers", &json!({"name": "Ada", "email": "ada@example.invalid"}));
    assert_eq!(customer.status, 201, "{:?}", customer.body);
    let customer_id = customer.body["id"].as_str().unwrap();
    assert_eq!(api.ok(&format!("/api/customers/{customer_id}"))["email"], "ada@example.invalid");
    assert_eq!(api.count("/api/customers"), 1);
    assert_eq!(api.count("/api/categories"), 1);

    let deleted = api.raw("DELETE", "/api/products/apple-1", None);
    assert_eq!(deleted.status, 204);
    assert_eq!(deleted.body, Value::Null);
    api.get("/api/products/apple-1").error(404, "not_found");
    assert_eq!(api.count("/api/products"), 1);
    let deleted = api.raw("DELETE", &format!("/api/customers/{customer_id}"), None);
    assert_eq!(deleted.status, 204);
    // The local writes are counted in the metrics.
    let metrics = api.get("/metrics");
    assert!(metrics.body.as_str().unwrap().contains("possync_local_changes_total 7"), "{:?}", metrics.body);
}

#[test]
fn refused_record_writes_change_nothing() {
    let test = TestNode::start();
    let api = &test.client;
    let (_, product_id) = category_and_product(api);
    let snapshot = |api: &Client| {
        (
            api.ok("/api/products"),
            api.ok("/api/categories"),
            api.ok("/api/customers"),
            api.count("/api/sync-logs"),
        )
    };
    let before = snapshot(api);
    let product_path = format!("/api/products/{product_id}");

    api.post("/api/products", &json!({"sku": "OJ-33", "name": "Copy", "price": 1})).error(409, "duplicate");
    api.post("/api/products", &json!({"id": product_id, "sku": "NEW", "name": "Copy", "price": 1}))
        .error(409, "already_exists");
    api.post("/api/products", &json!({"sku": "N1", "name": "Negative", "price": -1}))
        .error(422, "invalid_entity");
    api.post("/api/products", &json!({"sku": "N2", "name": "No price"})).error(422, "invalid_entity");
    api.post("/api/products", &json!({"sku": "N3", "name": "X", "price": 1, "colour": "red"}))
        .error(422, "invalid_entity");
    api.post("/api/products", &json!({"sku": "N4", "name": "X", "price": 1, "categoryId": "nope"}))
        .error(422, "invalid_entity");
    api.post("/api/products", &json!({"sku": "N5", "name": "X", "price": "1e40"}))
        .error(422, "invalid_entity");
    api.post("/api/products", &json!({"sku": 12, "name": "X", "price": 1})).error(422, "invalid_entity");
    api.post("/api/products", &json!(["not", "an", "object"])).error(400, "invalid_request");
    api.raw("POST", "/api/products", Some(("application/json", "{\"sku\": \"N6\", ")))
        .error(400, "invalid_json");
    api.raw("POST", "/api/products", Some(("text/plain", "{\"sku\":\"N7\",\"name\":\"X\",\"price\":1}")))
        .error(415, "unsupported_media_type");
    api.raw("POST", "/api/products", None).error(400, "invalid_request");
    api.send("PATCH", &product_path, &json!({})).error(422, "invalid_entity");
    api.send("PATCH", &product_path, &json!({"price": "abc"})).error(422, "invalid_entity");
    api.send("PATCH", "/api/products/unknown", &json!({"price": 1})).error(404, "not_found");
    api.raw("DELETE", "/api/products/unknown", None).error(404, "not_found");
    api.get("/api/customers/unknown").error(404, "not_found");
    api.get("/api/products?limit=0").error(400, "invalid_request");
    api.get("/api/products?limit=abc").error(400, "invalid_request");
    api.get("/api/products?offset=-1").error(400, "invalid_request");
    api.post("/api/categories", &json!({"name": ""})).error(422, "invalid_entity");
    api.post("/api/customers", &json!({"name": "X", "email": 7})).error(422, "invalid_entity");

    assert_eq!(snapshot(api), before);
    assert_eq!(api.ok(&product_path)["price"].as_f64(), Some(2.5));
}

#[test]
fn sales_refunds_cancels_and_stock() {
    let test = TestNode::start();
    let api = &test.client;
    let (_, product_id) = category_and_product(api);
    let stock = |api: &Client| api.ok(&format!("/api/products/{product_id}"))["stock"].as_f64().unwrap();

    let received = api.post(
        "/api/stock/adjust",
        &json!({"productId": product_id, "quantity": 10, "type": "in", "reference": "DN-1"}),
    );
    assert_eq!(received.status, 201, "{:?}", received.body);
    assert_eq!(received.body["type"], "in");
    assert_eq!(stock(api), 10.0);

    let sale = api.post(
        "/api/tickets",
        &json!({"lines": [{"productId": product_id, "quantity": 2}], "payments": [{"method": "cash", "amount": 5}],
                "notes": "table 4"}),
    );
    assert_eq!(sale.status, 201, "{:?}", sale.body);
    let ticket_id = sale.body["id"].as_str().unwrap().to_string();
    assert_eq!(sale.body["status"], "completed");
    assert_eq!(sale.body["totalAmount"].as_f64(), Some(5.0));
    assert_eq!(sale.body["lines"][0]["productId"], product_id.as_str());
    assert_eq!(sale.body["payments"][0]["method"], "cash");
    assert_eq!(stock(api), 8.0);
    assert_eq!(api.ok(&format!("/api/tickets/{ticket_id}"))["ticketNumber"], sale.body["ticketNumber"]);

    let day = &sale.body["createdAt"].as_str().unwrap()[..10];
    let pos = sale.body["posId"].as_str().unwrap();
    assert_eq!(api.count(&format!("/api/tickets?day={day}&posId={pos}")), 1);
    assert_eq!(api.count("/api/tickets?day=1999-01-01"), 0);
    api.get("/api/tickets?day=yesterday").error(400, "invalid_request");
    api.get("/api/tickets/unknown").error(404, "not_found");

    let refund = api.post(
        &format!("/api/tickets/{ticket_id}/refund"),
        &json!({"lines": [{"productId": product_id, "quantity": 1}], "reason": "spilt"}),
    );
    assert_eq!(refund.status, 200, "{:?}", refund.body);
    assert_eq!(refund.body["status"], "partially_refunded");
    assert_eq!(stock(api), 9.0);
    api.post(&format!("/api/tickets/{ticket_id}/cancel"), &json!({})).error(422, "invalid_state");
    api.post(
        &format!("/api/tickets/{ticket_id}/refund"),
        &json!({"lines": [{"productId": product_id, "quantity": 5}]}),
    )
    .error(422, "invalid_entity");
    let rest = api.raw("POST", &format!("/api/tickets/{ticket_id}/refund"), None);
    assert_eq!(rest.status, 200, "{:?}", rest.body);
    assert_eq!(rest.body["status"], "refunded");
    assert_eq!(stock(api), 10.0);
    api.post(&format!("/api/tickets/{ticket_id}/refund"), &json!({})).error(422, "invalid_state");
    api.post("/api/tickets/unknown/refund", &json!({})).error(404, "not_found");

    let second = api.post(
        "/api/tickets",
        &json!({"lines": [{"productId": product_id, "quantity": "3", "unitPrice": "1.00"}],
                "payments": [{"method": "card", "amount": "3", "reference": "slip 9"}]}),
    );
    assert_eq!(second.status, 201, "{:?}", second.body);
    assert_eq!(stock(api), 7.0);
    let cancelled = api.post(
        &format!("/api/tickets/{}/cancel", second.body["id"].as_str().unwrap()),
        &json!({"reason": "void"}),
    );
    assert_eq!(cancelled.status, 200, "{:?}", cancelled.body);
    assert_eq!(cancelled.body["status"], "cancelled");
    assert_eq!(stock(api), 10.0);

    let counted = api.post("/api/stock/count", &json!({"productId": product_id, "counted": 12}));
    assert_eq!(counted.status, 201, "{:?}", counted.body);
    assert_eq!(counted.body["quantity"].as_f64(), Some(2.0));
    assert_eq!(counted.body["type"], "adjustment");
    assert_eq!(stock(api), 12.0);
    let movements = api.ok(&format!("/api/products/{product_id}/movements"));
    assert_eq!(movements.as_array().unwrap().len(), 7, "{movements:?}");
    api.get("/api/products/unknown/movements").error(404, "not_found");
    assert_eq!(api.count("/api/tickets"), 2);
}

#[test]
fn refused_sales_and_stock_moves_change_nothing() {
    let test = TestNode::start();
    let api = &test.client;
    let (_, product_id) = category_and_product(api);
    api.post("/api/stock/adjust", &json!({"productId": product_id, "quantity": 5, "type": "in"}));
    let movements_path = format!("/api/products/{product_id}/movements");
    let snapshot = |api: &Client| {
        (
            api.ok("/api/tickets"),
            api.ok(&movements_path),
            api.ok(&format!("/api/products/{product_id}")),
            api.count("/api/sync-logs"),
        )
    };
    let before = snapshot(api);
    let cash = json!([{"method": "cash", "amount": 100}]);
    let line = json!([{"productId": product_id, "quantity": 1}]);

    // A sale of an unknown product.
    api.post("/api/tickets", &json!({"lines": [{"productId": "ghost", "quantity": 1}], "payments": cash}))
        .error(422, "invalid_entity");
    // A bad payment method.
    api.post("/api/tickets", &json!({"lines": line, "payments": [{"method": "bitcoin", "amount": 5}]}))
        .error(400, "invalid_request");
    // An empty sale.
    api.post("/api/tickets", &json!({"lines": [], "payments": cash})).error(422, "invalid_entity");
    api.post("/api/tickets", &json!({"lines": line, "payments": []})).error(422, "invalid_entity");
    // Payments short of the total.
    api.post("/api/tickets", &json!({"lines": line, "payments": [{"method": "cash", "amount": 1}]}))
        .error(422, "invalid_entity");
    // Malformed JSON and wrong field types.
    api.raw("POST", "/api/tickets", Some(("application/json", "{\"lines\": [}"))).error(400, "invalid_json");
    api.post(
        "/api/tickets",
        &json!({"lines": [{"productId": product_id, "quantity": true}], "payments": cash}),
    )
    .error(400, "invalid_request");
    api.post("/api/tickets", &json!({"lines": "all of it", "payments": cash})).error(400, "invalid_request");
    api.post("/api/tickets", &json!({"lines": line})).error(400, "invalid_request");
    api.post("/api/tickets", &json!({"lines": line, "payments": cash, "tip": 3}))
        .error(400, "invalid_request");
    api.post(
        "/api/tickets",
        &json!({"lines": [{"productId": product_id, "quantity": -1}], "payments": cash}),
    )
    .error(422, "invalid_entity");
    api.post(
        "/api/tickets",
        &json!({"lines": [{"productId": product_id, "quantity": "999999999999999"}], "payments": cash}),
    )
    .error(422, "invalid_entity");
    api.post("/api/tickets", &json!({"lines": line, "payments": cash, "customerId": "nobody"}))
        .error(422, "invalid_entity");
    // Stock moves.
    api.post("/api/stock/adjust", &json!({"productId": product_id, "quantity": 3, "type": "out"}))
        .error(422, "invalid_entity");
    api.post("/api/stock/adjust", &json!({"productId": product_id, "quantity": 3, "type": "sale"}))
        .error(400, "invalid_request");
    api.post("/api/stock/adjust", &json!({"productId": "ghost", "quantity": 3, "type": "in"}))
        .error(422, "invalid_entity");
    api.post("/api/stock/adjust", &json!({"productId": product_id, "quantity": "three", "type": "in"}))
        .error(400, "invalid_request");
    api.post("/api/stock/count", &json!({"productId": product_id, "counted": -2}))
        .error(422, "invalid_entity");
    api.post("/api/stock/count", &json!({"productId": product_id})).error(400, "invalid_request");
    // Quantities are whole thousandths up to a billion, so that stock sums stay exact.
    api.post("/api/stock/adjust", &json!({"productId": product_id, "quantity": "0.0001", "type": "in"}))
        .error(422, "invalid_entity");
    api.post("/api/stock/adjust", &json!({"productId": product_id, "quantity": 2_000_000_000, "type": "in"}))
        .error(422, "invalid_entity");
    api.post("/api/stock/count", &json!({"productId": product_id, "counted": "1.2345"}))
        .error(422, "invalid_entity");
    api.post(
        "/api/tickets",
        &json!({"lines": [{"productId": product_id, "quantity": 0.5555}], "payments": cash}),
    )
    .error(422, "invalid_entity");

    assert_eq!(snapshot(api), before);
}

#[test]
fn audit_lists_control_settings_and_cleanup() {
    let test = TestNode::start();
    let api = &test.client;
    for path in ["/api/sync-logs", "/api/conflicts", "/api/connection-metrics"] {
        assert!(api.ok(path).is_array(), "{path}");
        assert!(api.ok(&format!("{path}?limit=500&offset=3")).is_array(), "{path}");
        api.get(&format!("{path}?limit=0")).error(400, "invalid_request");
        api.get(&format!("{path}?limit=501")).error(400, "invalid_request");
        api.get(&format!("{path}?offset=x")).error(400, "invalid_request");
    }
    let accepted = api.raw("POST", "/api/sync-now", None);
    assert_eq!((accepted.status, &accepted.body["accepted"]), (202, &json!(true)));
    assert_eq!(api.raw("POST", "/api/reconnect", None).status, 202);

    let settings = api.ok("/api/settings");
    let keys: BTreeSet<&str> =
        settings.as_array().unwrap().iter().filter_map(|row| row["key"].as_str()).collect();
    assert!(keys.contains("p2p_sync_batch_size") && keys.contains("p2p_log_retention_days"), "{keys:?}");
    let changed = api.send("PUT", "/api/settings/p2p_sync_batch_size", &json!({"value": 50}));
    assert_eq!(changed.status, 200, "{:?}", changed.body);
    let row =
        changed.body.as_array().unwrap().iter().find(|row| row["key"] == "p2p_sync_batch_size").unwrap();
    assert_eq!(row["value"], "50");
    assert_eq!(test.shared().settings().batch_size, 50);
    let changed = api.send("PUT", "/api/settings/p2p_auto_sync", &json!({"value": false}));
    assert_eq!(changed.status, 200, "{:?}", changed.body);
    assert!(!test.shared().settings().auto_sync);
    api.send("PUT", "/api/settings/p2p_colour", &json!({"value": "red"})).error(404, "not_found");
    api.send("PUT", "/api/settings/p2p_sync_batch_size", &json!({"value": 0})).error(422, "invalid_setting");
    api.send("PUT", "/api/settings/p2p_sync_batch_size", &json!({"value": {"n": 1}}))
        .error(400, "invalid_request");
    api.send("PUT", "/api/settings/p2p_sync_batch_size", &json!({})).error(400, "invalid_request");
    assert_eq!(test.shared().settings().batch_size, 50);

    assert_eq!(api.ok("/api/status")["serverRunning"], true);
    let off = api.post("/api/p2p/toggle", &json!({"enabled": false}));
    assert_eq!(off.status, 200, "{:?}", off.body);
    assert_eq!((&off.body["enabled"], &off.body["serverRunning"]), (&json!(false), &json!(false)));
    let status = api.ok("/api/status");
    assert_eq!((&status["enabled"], &status["serverRunning"]), (&json!(false), &json!(false)));
    assert!(!test.shared().settings().enabled);
    let on = api.post("/api/p2p/toggle", &json!({"enabled": true}));
    assert_eq!(on.body["serverRunning"], true);
    assert_eq!(api.ok("/api/status")["serverRunning"], true);
    api.post("/api/p2p/toggle", &json!({"enabled": "yes"})).error(400, "invalid_request");
    api.post("/api/p2p/toggle", &json!({})).error(400, "invalid_request");

    let cleaned = api.post("/api/cleanup", &json!({}));
    assert_eq!(cleaned.status, 200, "{:?}", cleaned.body);
    assert_eq!(cleaned.body, json!({"deleted": 0, "olderThanDays": 30}));
    assert_eq!(api.post("/api/cleanup", &json!({"olderThanDays": 7})).body["olderThanDays"], 7);
    assert_eq!(api.raw("POST", "/api/cleanup", None).body["olderThanDays"], 30);
    assert_eq!(api.post("/api/cleanup", &json!({"olderThanDays": null})).body["olderThanDays"], 30);
    api.post("/api/cleanup", &json!({"olderThanDays": -1})).error(400, "invalid_request");
    api.post("/api/cleanup", &json!({"olderThanDays": 99999})).error(400, "invalid_request");
}

#[test]
fn unknown_routes_and_methods_answer_json_errors() {
    let test = TestNode::start();
    let api = &test.client;
    api.get("/api/nothing-here").error(404, "route_not_found");
    api.get("/favicon.ico").error(404, "route_not_found");
    api.raw("DELETE", "/api/status", None).error(405, "method_not_allowed");
    api.raw("PUT", "/api/products", None).error(405, "method_not_allowed");
    api.get("/api/conflicts/1/resolve").error(405, "method_not_allowed");
}

/// Two nodes linked on 127.0.0.1: a record written through one API shows in the other's,
/// and the stats object has exactly the seed's keys, per connection too.
#[test]
fn writes_reach_a_peer_and_stats_have_the_seed_keys() {
    let b = TestNode::named("pos-b", Vec::new());
    let b_peer = b.node.as_ref().unwrap().peer_addr.unwrap();
    let a = TestNode::named("pos-a", vec![b_peer.to_string()]);
    eventually("a connection", || {
        a.client.ok("/api/stats")["connections"].as_array().is_some_and(|c| c.len() == 1)
    });

    let stats = a.client.ok("/api/stats");
    let keys: BTreeSet<&str> = stats.as_object().unwrap().keys().map(String::as_str).collect();
    let seed: BTreeSet<&str> =
        ["connections", "totalMessagesSent", "totalMessagesReceived", "totalBytesSent", "totalBytesReceived"]
            .into();
    assert_eq!(keys, seed);
    let connection: BTreeSet<&str> =
        stats["connections"][0].as_object().unwrap().keys().map(String::as_str).collect();
    let seed_connection: BTreeSet<&str> = [
        "peerId",
        "peerName",
        "messagesSent",
        "messagesReceived",
        "bytesSent",
        "bytesReceived",
        "lastPing",
        "lastPong",
        "reconnectAttempts",
    ]
    .into();
    assert_eq!(connection, seed_connection);
    assert_eq!(stats["connections"][0]["peerId"], "pos-b");

    let created = a.client.post("/api/categories", &json!({"name": "Bakery"}));
    assert_eq!(created.status, 201);
    let path = format!("/api/categories/{}", created.body["id"].as_str().unwrap());
    eventually("the category on the peer", || b.client.get(&path).status == 200);
    assert_eq!(b.client.ok(&path)["name"], "Bakery");
    let status = b.client.ok("/api/status");
    assert_eq!(status["connectedPeers"], 1);
    assert_eq!(status["peers"][0]["id"], "pos-a");
    assert_eq!(status["peers"][0]["online"], true);
    assert!(b.client.count("/api/sync-logs") >= 1);

    // P2P off closes the connection and stops the listener.
    let off = b.client.post("/api/p2p/toggle", &json!({"enabled": false}));
    assert_eq!(off.body["serverRunning"], false);
    eventually("the connection closed", || b.client.ok("/api/status")["connectedPeers"] == 0);
    eventually("a sees it", || {
        a.client.ok("/api/stats")["connections"].as_array().is_some_and(Vec::is_empty)
    });
}

/// A node whose database holds an open (manual) conflict on product `p1`.
fn node_with_open_conflict() -> TestNode {
    let dir_a = tempfile::tempdir().unwrap();
    let mut a = new_store(dir_a.path(), "pos-a");
    let dir = tempfile::tempdir().unwrap();
    let mut b = new_store(dir.path(), "pos-b");
    b.set_setting("p2p_conflict_resolution", "manual").unwrap();
    let from_a = PeerRef { id: "pos-a", name: "Till A" };
    let sync = |a: &Store, b: &mut Store| {
        let selection = a.reader().unwrap().select_changes(&b.summary().clone(), 0, 1000).unwrap();
        b.apply_batch(from_a, selection.changes).unwrap();
    };
    a.create_record(EntityKind::Product, &json!({"id": "p1", "sku": "P1", "name": "Tea", "price": 3}))
        .unwrap();
    sync(&a, &mut b);
    a.update_record(EntityKind::Product, &EntityId::parse("p1").unwrap(), &json!({"name": "Green tea"}))
        .unwrap();
    b.update_record(EntityKind::Product, &EntityId::parse("p1").unwrap(), &json!({"name": "Black tea"}))
        .unwrap();
    sync(&a, &mut b);
    drop(a);
    TestNode::with_store(dir, b, Vec::new())
}

#[test]
fn conflicts_are_listed_and_resolved_once() {
    let test = node_with_open_conflict();
    let api = &test.client;
    let rows = api.ok("/api/conflicts?limit=50&offset=0");
    let open =
        rows.as_array().unwrap().iter().find(|row| row["resolvedBy"].is_null()).expect("an open conflict");
    let id = open["id"].as_i64().unwrap();
    assert_eq!(open["entityId"], "p1");
    assert!(open["localData"].is_string() && open["remoteData"].is_string());

    // The event stream carries the resolution.
    let events = open_events(&api.base);

    let path = format!("/api/conflicts/{id}/resolve");
    api.post(&path, &json!({"choice": "theirs", "resolvedBy": "dashboard"})).error(400, "invalid_request");
    api.post(&path, &json!({"choice": "local"})).error(400, "invalid_request");
    api.post(&path, &json!({"choice": "local", "resolvedBy": "  "})).error(400, "invalid_request");
    api.post(&path, &json!({"choice": "merged", "resolvedBy": "ann"})).error(400, "invalid_request");
    api.post(&path, &json!({"choice": "merged", "data": {"price": -4}, "resolvedBy": "ann"}))
        .error(422, "invalid_entity");
    api.post("/api/conflicts/999999/resolve", &json!({"choice": "local", "resolvedBy": "x"}))
        .error(404, "not_found");
    api.post("/api/conflicts/abc/resolve", &json!({"choice": "local", "resolvedBy": "x"}))
        .error(404, "not_found");
    assert_eq!(api.ok("/api/products/p1")["name"], "Black tea");

    let resolved = api.post(&path, &json!({"choice": "remote", "resolvedBy": "dashboard"}));
    assert_eq!(resolved.status, 200, "{:?}", resolved.body);
    assert_eq!(resolved.body["id"], id);
    assert_eq!(resolved.body["resolvedBy"], "dashboard");
    assert_eq!(api.ok("/api/products/p1")["name"], "Green tea");
    api.post(&path, &json!({"choice": "local", "resolvedBy": "dashboard"})).error(409, "already_resolved");

    let conflict = events.wait_for("conflict");
    assert_eq!(conflict["id"], id);
    assert_eq!(conflict["resolvedBy"], "dashboard");
}

/// Lines of an open `/api/events` stream, read on a thread.
struct Events {
    lines: std::sync::mpsc::Receiver<String>,
}

fn open_events(base: &str) -> Events {
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let response = agent.get(format!("{base}/api/events")).call().unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let header =
        |name: &str| response.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    assert!(header("content-type").starts_with("text/event-stream"), "{}", header("content-type"));
    assert_eq!(header("cache-control"), "no-store");
    let (sender, lines) = std::sync::mpsc::channel();
    let reader = BufReader::new(response.into_body().into_reader());
    std::thread::spawn(move || {
        for line in reader.lines() {
            let Ok(line) = line else { return };
            if sender.send(line).is_err() {
                return;
            }
        }
    });
    Events { lines }
}

impl Events {
    /// The data of the next event of this kind.
    #[track_caller]
    fn wait_for(&self, kind: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut current = String::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self.lines.recv_timeout(left).unwrap_or_else(|_| panic!("no `{kind}` event"));
            if let Some(event) = line.strip_prefix("event: ") {
                current = event.to_string();
            } else if let Some(data) = line.strip_prefix("data: ")
                && current == kind
            {
                return serde_json::from_str(data).unwrap();
            }
        }
    }
}

#[test]
fn the_event_stream_sends_stats_every_second() {
    let test = TestNode::start();
    let events = open_events(&test.client.base);
    let first = events.wait_for("stats");
    let keys: BTreeSet<&str> = first.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(keys, ["now", "stats", "status"].into());
    assert_eq!(first["status"]["posId"], "pos-api-test");
    assert!(first["stats"]["connections"].is_array());
    let second = events.wait_for("stats");
    assert!(second["now"].as_u64() > first["now"].as_u64());
}

#[test]
fn the_dashboard_page_and_its_indicators() {
    let test = TestNode::start();
    let api = &test.client;
    for (path, content_type) in [
        ("/", "text/html; charset=utf-8"),
        ("/dashboard/app.js", "text/javascript; charset=utf-8"),
        ("/dashboard/style.css", "text/css; charset=utf-8"),
    ] {
        let reply = api.get(path);
        assert_eq!(reply.status, 200, "{path}");
        assert_eq!(reply.header("content-type"), content_type);
        assert!(reply.header("content-security-policy").starts_with("default-src 'none'; script-src 'self'"));
        assert_eq!(reply.header("x-content-type-options"), "nosniff");
        assert_eq!(reply.header("cache-control"), "no-cache");
    }
    assert!(api.get("/").body.as_str().unwrap().contains("/dashboard/app.js"));

    let dashboard = api.ok("/api/dashboard");
    assert_eq!(
        dashboard["health"],
        json!({"uptimePercent": null, "avgReconnectMs": null, "syncSuccessRate": null, "conflictsPerHour": null})
    );
    let daily = dashboard["history"]["daily"].as_array().unwrap();
    assert_eq!(daily.len(), 14);
    assert!(daily.iter().all(|day| day["changes"] == 0 && day["conflicts"] == 0 && day["errors"] == 0));
    assert_eq!(dashboard["history"]["peers"], json!([]));
    assert_eq!(dashboard["alerts"], json!([]));
}

#[test]
fn the_dashboard_counts_conflicts() {
    let test = node_with_open_conflict();
    let dashboard = test.client.ok("/api/dashboard");
    assert!(dashboard["health"]["conflictsPerHour"].as_f64().unwrap() > 0.0, "{dashboard:?}");
    assert!(dashboard["health"]["syncSuccessRate"].as_f64().is_some(), "{dashboard:?}");
    let today = dashboard["history"]["daily"].as_array().unwrap().last().unwrap().clone();
    assert!(
        today["changes"].as_u64().unwrap() >= 2 && today["conflicts"].as_u64().unwrap() >= 1,
        "{today:?}"
    );
    assert_eq!(dashboard["history"]["peers"][0]["peerId"], "pos-a");
}

/// The token is required exactly when the configured bind address is not loopback. The
/// router is built for `0.0.0.0:0` but served on 127.0.0.1 (no traffic leaves loopback).
#[test]
fn a_token_is_required_off_loopback() {
    let test = TestNode::start();
    let policy = AuthPolicy::for_bind(Some("0.0.0.0:0".parse().unwrap()), TOKEN);
    assert_eq!(policy, AuthPolicy::Token(TOKEN.into()));
    let listener = test.runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let address = listener.local_addr().unwrap();
    let app = router_with(Arc::clone(test.shared()), policy, BrowserGuard::new(address, &[]));
    test.runtime.spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let mut api = Client::new(address);

    api.get("/api/status").error(401, "unauthorized");
    assert_eq!(api.get("/api/status").header("www-authenticate"), "Bearer");
    api.get("/api/nothing").error(401, "unauthorized");
    api.get("/metrics").error(401, "unauthorized");
    api.post("/api/categories", &json!({"name": "Sneaky"})).error(401, "unauthorized");
    api.get(&format!("/api/status?token={TOKEN}x")).error(401, "unauthorized");
    assert_eq!(api.get(&format!("/api/status?token={TOKEN}")).status, 200);
    // The static files of the dashboard hold no data and cannot carry the token.
    assert_eq!(api.get("/").status, 200);
    assert_eq!(api.get("/dashboard/app.js").status, 200);

    api.token = Some(format!("{TOKEN}x"));
    api.get("/api/status").error(401, "unauthorized");
    api.token = Some(TOKEN.into());
    assert_eq!(api.get("/api/status").status, 200);
    assert_eq!(api.post("/api/categories", &json!({"name": "Allowed"})).status, 201);
    api.get("/api/nothing").error(404, "route_not_found");
    // Nothing was written by the refused calls.
    assert_eq!(test.client.count("/api/categories"), 1);

    // The node itself is bound to 127.0.0.1: no token there.
    assert_eq!(AuthPolicy::for_bind(test.shared().config.api_listen, TOKEN), AuthPolicy::Open);
    assert_eq!(test.client.get("/api/status").status, 200);
}

/// The OpenAPI document and the router list the same routes: every documented operation is
/// served (never `route_not_found` or `method_not_allowed`), and the document lists every
/// route of the table the router is built from.
#[test]
fn openapi_documents_every_route() {
    let test = TestNode::start();
    let api = &test.client;
    let document = api.ok("/api/openapi.json");
    assert_eq!(document["openapi"], "3.0.3");
    // The text rule (no control characters) and the browser guard are documented.
    let sku = &document["components"]["schemas"]["ProductCreate"]["properties"]["sku"];
    assert!(sku["pattern"].as_str().is_some_and(|pattern| pattern.contains("u001F")), "{sku}");
    let cancel = &document["paths"]["/api/tickets/{id}/cancel"]["post"]["responses"];
    for status in ["403", "415", "507"] {
        assert!(cancel.get(status).is_some(), "{status} is not documented: {cancel}");
    }
    let mut documented = BTreeSet::new();
    for (path, item) in document["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            documented.insert((method.to_uppercase(), path.clone()));
        }
    }
    let table: BTreeSet<(String, String)> = route_list()
        .into_iter()
        .map(|(method, path)| (method.as_str().to_uppercase(), path.to_string()))
        .collect();
    assert_eq!(documented, table);
    assert!(documented.len() >= 40, "{documented:?}");
    for (method, path) in &documented {
        let concrete = path.replace("{id}", "nonexistent").replace("{key}", "no_such_setting");
        if concrete == "/api/events" {
            drop(open_events(&api.base));
            continue;
        }
        // State-changing calls carry the JSON content type even without a body (guard.rs).
        let reply = api.raw(method, &concrete, None);
        let code = reply.body["error"]["code"].as_str().unwrap_or("");
        assert!(
            code != "route_not_found" && code != "method_not_allowed" && reply.status < 500,
            "{method} {path}: {} {:?}",
            reply.status,
            reply.body
        );
    }
}

/// Every metric family of the exposition is listed in docs/metrics.md, with the name a
/// scraper sees (`_total` for counters).
#[test]
fn every_metric_is_documented() {
    // Two linked nodes and one synced write, so that the labelled families have children
    // (a family without any is not exposed).
    let b = TestNode::named("pos-b", Vec::new());
    let a = TestNode::named("pos-a", vec![b.node.as_ref().unwrap().peer_addr.unwrap().to_string()]);
    eventually("a connection", || a.client.ok("/api/status")["connectedPeers"] == 1);
    let created = a.client.post("/api/categories", &json!({"name": "Bakery"}));
    let path = format!("/api/categories/{}", created.body["id"].as_str().unwrap());
    eventually("the category on the peer", || b.client.get(&path).status == 200);
    let exposition = b.client.get("/metrics");
    assert_eq!(exposition.status, 200);
    assert!(exposition.header("content-type").starts_with("text/plain"));
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/metrics.md")).unwrap();
    let mut families = 0;
    for line in exposition.body.as_str().unwrap().lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else { continue };
        let mut parts = rest.split_whitespace();
        let (name, kind) = (parts.next().unwrap(), parts.next().unwrap());
        let scraped = if kind == "counter" { format!("{name}_total") } else { name.to_string() };
        assert!(doc.contains(&format!("`{scraped}`")), "docs/metrics.md does not list `{scraped}` ({kind})");
        assert!(name.starts_with("possync_"), "{name}");
        families += 1;
    }
    assert!(families >= 10, "{families} families");
}

/// One HTTP/1.1 request written by hand on a fresh socket (`Connection: close`), so that
/// `Host`, `Origin` and `Content-Type` are exactly what a browser or an attacker would send.
/// Answers the status and the JSON body.
fn hand_request(
    address: SocketAddr,
    request_line: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, Value) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut text =
        format!("{request_line} HTTP/1.1\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    for (name, value) in headers {
        text.push_str(&format!("{name}: {value}\r\n"));
    }
    text.push_str("\r\n");
    text.push_str(body);
    stream.write_all(text.as_bytes()).unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let status = answer.split(' ').nth(1).and_then(|code| code.parse().ok()).unwrap_or(0);
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, body)| body);
    (status, serde_json::from_str(body).unwrap_or(Value::String(body.to_string())))
}

#[track_caller]
fn assert_refused(answer: &(u16, Value), status: u16, code: &str) {
    assert_eq!(answer.0, status, "{:?}", answer.1);
    assert_eq!(answer.1["error"]["code"], code, "{:?}", answer.1);
}

/// Issue 13, item 7: DNS rebinding (a foreign `Host`), a foreign `Origin`, and a form's
/// body-less POST are refused before anything is written; the node's own names, its own
/// origin and JSON calls still work.
#[test]
fn web_pages_cannot_drive_the_api() {
    let test = TestNode::start();
    let api = &test.client;
    let address = test.node.as_ref().unwrap().api_addr.unwrap();
    let port = address.port();
    let own_host = format!("127.0.0.1:{port}");
    let (_, product_id) = category_and_product(api);
    let sale = api.post(
        "/api/tickets",
        &json!({"lines": [{"productId": product_id, "quantity": 1}], "payments": [{"method": "cash", "amount": 10}]}),
    );
    assert_eq!(sale.status, 201, "{:?}", sale.body);
    let ticket_id = sale.body["id"].as_str().unwrap().to_string();
    let json_type = ("Content-Type", "application/json");
    let category = r#"{"name": "Rebound"}"#;

    // DNS rebinding: the page's own name, resolved to 127.0.0.1.
    let evil_host = format!("rebind.evil.example:{port}");
    assert_refused(
        &hand_request(address, "POST /api/categories", &[("Host", &evil_host), json_type], category),
        403,
        "forbidden_host",
    );
    assert_refused(
        &hand_request(address, "GET /api/status", &[("Host", &evil_host)], ""),
        403,
        "forbidden_host",
    );
    // The right name on another port (a proxy the node does not know) or no Host at all.
    let other_port = format!("localhost:{}", port.wrapping_add(1));
    assert_refused(
        &hand_request(address, "GET /api/status", &[("Host", &other_port)], ""),
        403,
        "forbidden_host",
    );

    // A foreign origin, on writes and reads alike, `null` included.
    for origin in ["http://shop-offers.example", "null", &format!("http://localhost:{port}")] {
        let headers = [("Host", own_host.as_str()), ("Origin", origin), json_type];
        assert_refused(
            &hand_request(address, "POST /api/categories", &headers, category),
            403,
            "forbidden_origin",
        );
        let headers = [("Host", own_host.as_str()), ("Origin", origin)];
        assert_refused(&hand_request(address, "GET /api/tickets", &headers, ""), 403, "forbidden_origin");
    }

    // What an HTML form can send: no body, or a form body, never a JSON content type.
    let cancel = format!("POST /api/tickets/{ticket_id}/cancel");
    for form_type in ["application/x-www-form-urlencoded", "text/plain", "multipart/form-data; boundary=x"] {
        let headers = [("Host", own_host.as_str()), ("Content-Type", form_type)];
        assert_refused(&hand_request(address, &cancel, &headers, ""), 415, "unsupported_media_type");
    }
    assert_refused(
        &hand_request(address, &cancel, &[("Host", &own_host)], ""),
        415,
        "unsupported_media_type",
    );
    let delete = format!("DELETE /api/products/{product_id}");
    assert_refused(
        &hand_request(address, &delete, &[("Host", &own_host)], ""),
        415,
        "unsupported_media_type",
    );

    // Nothing of it was written.
    assert_eq!(api.ok(&format!("/api/tickets/{ticket_id}"))["status"], "completed");
    assert_eq!(api.count("/api/categories"), 1);
    assert_eq!(api.get(&format!("/api/products/{product_id}")).status, 200);

    // The node's own page (same origin), by every name of the node, and the CLI's way.
    let page = [("Host", own_host.as_str()), ("Origin", &format!("http://{own_host}")), json_type];
    let created = hand_request(address, "POST /api/categories", &page, category);
    assert_eq!(created.0, 201, "{:?}", created.1);
    for host in [format!("localhost:{port}"), format!("[::1]:{port}"), format!("LOCALHOST.:{port}")] {
        let status = hand_request(address, "GET /api/status", &[("Host", &host)], "");
        assert_eq!(status.0, 200, "{host}: {:?}", status.1);
    }
    let cancelled = hand_request(address, &cancel, &[("Host", &own_host), json_type], "");
    assert_eq!(cancelled.0, 200, "{:?}", cancelled.1);
    assert_eq!(api.ok(&format!("/api/tickets/{ticket_id}"))["status"], "cancelled");
}

/// `api_allowed_hosts` adds names (the till's name on the shop's network); others stay out.
#[test]
fn configured_host_names_are_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let store = new_store(dir.path(), "pos-named");
    let mut config = config(dir.path(), Vec::new());
    config.api.allowed_hosts = vec!["till-3.shop.lan".into()];
    let test = TestNode::with_config(dir, store, config);
    let address = test.node.as_ref().unwrap().api_addr.unwrap();
    let named = format!("till-3.shop.lan:{}", address.port());
    assert_eq!(hand_request(address, "GET /api/status", &[("Host", &named)], "").0, 200);
    let other = format!("till-4.shop.lan:{}", address.port());
    assert_refused(&hand_request(address, "GET /api/status", &[("Host", &other)], ""), 403, "forbidden_host");
}

/// Issue 13, item 7: idle sockets cannot pile up. A connection that moves no byte for
/// `idle_timeout` is closed by the node (end of stream), one that never sent anything as well
/// as a keep-alive connection left open after a request.
#[test]
fn idle_api_connections_are_closed_after_the_idle_timeout() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let store = new_store(dir.path(), "pos-idle");
    let mut config = config(dir.path(), Vec::new());
    config.api.idle_timeout = Duration::from_millis(1500);
    let test = TestNode::with_config(dir, store, config);
    let address = test.node.as_ref().unwrap().api_addr.unwrap();
    let open = || test.shared().metrics.api_connections.get();

    let mut idle: Vec<std::net::TcpStream> =
        (0..10).map(|_| std::net::TcpStream::connect(address).unwrap()).collect();
    eventually("the idle sockets accepted", || open() == 10);
    let started = Instant::now();
    for socket in &mut idle {
        socket.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut buffer = [0u8; 64];
        match socket.read(&mut buffer) {
            Ok(0) => {}
            Err(err) if err.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => panic!("an idle socket was not closed: {other:?}"),
        }
    }
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
    eventually("every idle connection closed", || open() == 0);

    // A keep-alive connection left open after a request is closed too.
    let mut kept = std::net::TcpStream::connect(address).unwrap();
    kept.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let host = format!("127.0.0.1:{}", address.port());
    kept.write_all(format!("GET /api/status HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes()).unwrap();
    let mut answer = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        match kept.read(&mut buffer) {
            Ok(0) => break,
            Ok(read) => answer.extend_from_slice(&buffer[..read]),
            Err(err) => panic!("the keep-alive connection was not closed: {err}"),
        }
    }
    assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"));
    eventually("every connection closed", || open() == 0);
}

/// Issue 13, item 7: at most `max_connections` are served at once, and a cap full of idle
/// sockets does not keep a till waiting: a new connection closes the one idle the longest
/// (the idle timeout here is far longer than the test).
#[test]
fn a_cap_full_of_idle_connections_still_serves_a_real_request() {
    use std::io::Read;
    let dir = tempfile::tempdir().unwrap();
    let store = new_store(dir.path(), "pos-capped");
    let mut config = config(dir.path(), Vec::new());
    config.api.max_connections = 4;
    config.api.idle_timeout = Duration::from_secs(600);
    let test = TestNode::with_config(dir, store, config);
    let address = test.node.as_ref().unwrap().api_addr.unwrap();
    let open = || test.shared().metrics.api_connections.get();

    let mut idle: Vec<std::net::TcpStream> = Vec::new();
    for _ in 0..10 {
        idle.push(std::net::TcpStream::connect(address).unwrap());
        std::thread::sleep(Duration::from_millis(20));
    }
    // Each new socket evicts an older one: the count stays at the cap.
    eventually("the cap filled by idle sockets", || open() == 4);
    for _ in 0..5 {
        assert!(open() <= 4, "never more than the cap: {}", open());
        std::thread::sleep(Duration::from_millis(50));
    }
    let started = Instant::now();
    for _ in 0..3 {
        let reply = test.client.get("/api/status");
        assert_eq!(reply.status, 200, "{:?}", reply.body);
    }
    assert!(started.elapsed() < Duration::from_secs(15), "served at once, not after the idle timeout");
    // The oldest idle sockets were closed by the node to make room.
    let mut closed = 0;
    for socket in &mut idle {
        socket.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        let mut buffer = [0u8; 64];
        if matches!(socket.read(&mut buffer), Ok(0)) {
            closed += 1;
        }
    }
    assert!(closed >= 6, "{closed} idle sockets closed");
    assert!(open() <= 4);
}

/// When every slot is busy (event streams, which are never idle) and none frees up, a new
/// connection is refused cleanly: 503 `too_many_connections`.
#[test]
fn a_cap_full_of_busy_connections_refuses_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let store = new_store(dir.path(), "pos-busy");
    let mut config = config(dir.path(), Vec::new());
    config.api.max_connections = 2;
    let test = TestNode::with_config(dir, store, config);
    let address = test.node.as_ref().unwrap().api_addr.unwrap();
    let base = format!("http://{address}");
    let mut streams = vec![open_events(&base), open_events(&base)];
    // The first refused connections each evict a stream, which (never ending) cannot close.
    let mut refused = None;
    for _ in 0..4 {
        let (status, body) = hand_request(
            address,
            "GET /api/status",
            &[("Host", &format!("127.0.0.1:{}", address.port()))],
            "",
        );
        if status == 503 {
            refused = Some(body);
            break;
        }
    }
    let body = refused.expect("a connection refused at the cap");
    assert_eq!(body["error"]["code"], "too_many_connections", "{body:?}");
    assert!(test.shared().metrics.api_connections.get() <= 2);
    streams.clear();
}

/// Issue 13, item 8: text with control characters (a NUL in a SKU, an escape sequence in a
/// name) is refused as an invalid field, and nothing is written; line breaks stay allowed in
/// free text.
#[test]
fn text_with_control_characters_is_refused() {
    let test = TestNode::start();
    let api = &test.client;
    let (_, product_id) = category_and_product(api);
    let nul_sku = api.post("/api/products", &json!({"sku": "NUL\u{0}SKU", "name": "Ghost", "price": 1}));
    nul_sku.error(422, "invalid_entity");
    assert!(
        nul_sku.body["error"]["message"].as_str().unwrap().contains("control characters"),
        "{:?}",
        nul_sku.body
    );
    api.post("/api/products", &json!({"sku": "ESC-1", "name": "Tea\u{1b}[2J", "price": 1}))
        .error(422, "invalid_entity");
    api.send("PATCH", &format!("/api/products/{product_id}"), &json!({"barcode": "12\u{7}34"}))
        .error(422, "invalid_entity");
    api.post(
        "/api/tickets",
        &json!({"lines": [{"productId": product_id, "quantity": 1}], "payments": [{"method": "cash", "amount": 5}],
                "notes": "bad\u{0}note"}),
    )
    .error(422, "invalid_entity");
    api.post(
        "/api/stock/adjust",
        &json!({"productId": product_id, "quantity": 5, "type": "in", "reference": "DN\u{0}1"}),
    )
    .error(422, "invalid_entity");
    assert_eq!(api.count("/api/products"), 1);
    assert_eq!(api.count("/api/tickets"), 0);
    assert_eq!(api.ok(&format!("/api/products/{product_id}"))["barcode"], Value::Null);
    assert_eq!(api.count(&format!("/api/products/{product_id}/movements")), 0);
    let sold = api.post(
        "/api/tickets",
        &json!({"lines": [{"productId": product_id, "quantity": 1}], "payments": [{"method": "cash", "amount": 5}]}),
    );
    let ticket = sold.body["id"].as_str().unwrap().to_string();
    api.post(&format!("/api/tickets/{ticket}/cancel"), &json!({"reason": "oops\u{0}"}))
        .error(422, "invalid_entity");
    assert_eq!(api.ok(&format!("/api/tickets/{ticket}"))["status"], "completed");

    let described = api.send(
        "PATCH",
        &format!("/api/products/{product_id}"),
        &json!({"description": "Fresh.\nKeep cold.\tSeriously."}),
    );
    assert_eq!(described.status, 200, "{:?}", described.body);
}

/// Issue 13, item 8: `?day=` must name a real calendar day.
#[test]
fn an_impossible_day_is_refused() {
    let test = TestNode::start();
    let api = &test.client;
    for day in ["2025-13-45", "2025-02-30", "2025-00-10", "2025-04-31"] {
        api.get(&format!("/api/tickets?day={day}")).error(400, "invalid_request");
    }
    assert_eq!(api.get("/api/tickets?day=2024-02-29").status, 200);
    assert_eq!(api.get("/api/tickets?day=2025-12-31").status, 200);
}

/// Issue 13, item 8: tills choose their ticket ids and re-send a sale whose answer was lost:
/// the same sale again answers 200 with the stored ticket and writes nothing; another sale
/// under the same id is still 409.
#[test]
fn a_resent_sale_answers_the_stored_ticket() {
    let test = TestNode::start();
    let api = &test.client;
    let (_, product_id) = category_and_product(api);
    let sale = json!({
        "id": "till-sale-0001",
        "lines": [{"productId": product_id, "quantity": 2, "unitPrice": "2.5"}],
        "payments": [{"method": "card", "amount": 5, "reference": "slip 7"}],
        "notes": "table 4",
    });
    let first = api.post("/api/tickets", &sale);
    assert_eq!(first.status, 201, "{:?}", first.body);
    let local_changes = |api: &Client| {
        let metrics = api.get("/metrics");
        metrics
            .body
            .as_str()
            .unwrap()
            .lines()
            .find(|line| line.starts_with("possync_local_changes_total"))
            .map(str::to_string)
    };
    let changes_before = local_changes(api);
    let stock_before = api.ok(&format!("/api/products/{product_id}"))["stock"].clone();

    // The same body, and the same sale written differently (amounts as numbers or text).
    let mut respelled = sale.clone();
    respelled["lines"][0]["unitPrice"] = json!(2.50);
    respelled["payments"][0]["amount"] = json!("5.00");
    for again in [&sale, &respelled] {
        let replay = api.post("/api/tickets", again);
        assert_eq!(replay.status, 200, "{:?}", replay.body);
        assert_eq!(replay.body, first.body, "the stored ticket, as first answered");
    }
    assert_eq!(api.count("/api/tickets"), 1);
    assert_eq!(api.ok(&format!("/api/products/{product_id}"))["stock"], stock_before);
    assert_eq!(local_changes(api), changes_before, "no change written");

    // A different sale under the used id: refused, nothing written.
    for (path, value) in [
        ("/lines/0/quantity", json!(3)),
        ("/lines/0/unitPrice", json!("2.4")),
        ("/payments/0/method", json!("cash")),
        ("/payments/0/reference", json!("slip 8")),
        ("/notes", json!("table 5")),
    ] {
        let mut other = sale.clone();
        *other.pointer_mut(path).unwrap() = value;
        api.post("/api/tickets", &other).error(409, "already_exists");
    }
    let mut two_lines = sale.clone();
    two_lines["lines"].as_array_mut().unwrap().push(json!({"productId": product_id, "quantity": 1}));
    api.post("/api/tickets", &two_lines).error(409, "already_exists");
    assert_eq!(api.count("/api/tickets"), 1);
    assert_eq!(api.ok(&format!("/api/products/{product_id}"))["stock"], stock_before);

    // A ticket cancelled since: the re-sent sale answers its current state, and stays cancelled.
    let cancelled = api.raw("POST", "/api/tickets/till-sale-0001/cancel", None);
    assert_eq!(cancelled.status, 200, "{:?}", cancelled.body);
    let replay = api.post("/api/tickets", &sale);
    assert_eq!((replay.status, &replay.body["status"]), (200, &json!("cancelled")));
}

/// Issue 13, item 8: a full disk answers 507 `storage_full` (not a generic 500), writes
/// nothing, leaves reads working, and writes work again once there is room. The database
/// is capped with SQLite's `max_page_count`, which fails a write exactly as a full disk does
/// (SQLITE_FULL).
#[test]
fn a_full_disk_answers_storage_full() {
    let test = TestNode::start();
    let api = &test.client;
    let (category_id, _) = category_and_product(api);
    let writer =
        |pages: u32| {
            let shared = Arc::clone(test.shared());
            test.runtime
                .block_on(shared.writer.call(possync_node::writer::Priority::Local, move |store| {
                    store.set_max_page_count(pages)
                }))
                .unwrap()
                .unwrap()
        };
    writer(1); // never below the current size: the database is full as it is
    let description = "x".repeat(3900);
    let mut refused = None;
    for n in 0..200 {
        let reply = api.post(
            "/api/products",
            &json!({"sku": format!("FULL-{n}"), "name": "Filler", "price": 1, "categoryId": category_id,
                    "description": description}),
        );
        if reply.status != 201 {
            refused = Some(reply);
            break;
        }
    }
    let refused = refused.expect("the capped database filled up");
    refused.error(507, "storage_full");
    let products = api.count("/api/products");
    assert!(api.get("/api/status").status == 200, "reads still work");

    writer(1_000_000);
    let created = api.post("/api/products", &json!({"sku": "AFTER", "name": "After", "price": 1}));
    assert_eq!(created.status, 201, "{:?}", created.body);
    assert_eq!(api.count("/api/products"), products + 1);
}

#[test]
fn the_change_feed_pages_by_cursor_and_streams_from_last_event_id() {
    // Issue 11, part 3: a till app follows every change, resumable after a day off.
    let test = TestNode::start();
    let api = &test.client;
    for sku in ["F1", "F2", "F3"] {
        let created = api.post("/api/products", &json!({"sku": sku, "name": sku, "price": "1.00"}));
        assert_eq!(created.status, 201, "{:?}", created.body);
    }
    let page = api.get("/api/changes?after=0&limit=10");
    assert_eq!(page.status, 200, "{:?}", page.body);
    let changes = page.body.as_array().unwrap().clone();
    assert_eq!(changes.len(), 3);
    let cursors: Vec<u64> = changes.iter().map(|change| change["cursor"].as_u64().unwrap()).collect();
    assert!(cursors.windows(2).all(|pair| pair[0] < pair[1]), "commit order: {cursors:?}");
    assert_eq!(changes[0]["entityType"], "product");
    assert_eq!(changes[0]["action"], "create");
    assert_eq!(changes[0]["origin"], "pos-api-test");
    let rest = api.get(&format!("/api/changes?after={}", cursors[1]));
    assert_eq!(rest.body.as_array().map(Vec::len), Some(1));
    api.get("/api/changes?limit=0").error(400, "invalid_request");

    // The stream resumes after the cursor a client last saw, then goes on live.
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let response = agent
        .get(format!("{}/api/changes/stream", api.base))
        .header("Last-Event-ID", cursors[0].to_string())
        .call()
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let (sender, lines) = std::sync::mpsc::channel();
    let reader = BufReader::new(response.into_body().into_reader());
    std::thread::spawn(move || {
        for line in reader.lines() {
            let Ok(line) = line else { return };
            if sender.send(line).is_err() {
                return;
            }
        }
    });
    let next_id = || loop {
        let line = lines.recv_timeout(Duration::from_secs(30)).expect("a change event");
        if let Some(id) = line.strip_prefix("id: ") {
            return id.parse::<u64>().unwrap();
        }
    };
    assert_eq!((next_id(), next_id()), (cursors[1], cursors[2]));
    let created = api.post("/api/products", &json!({"sku": "F4", "name": "F4", "price": "1.00"}));
    assert_eq!(created.status, 201);
    assert!(next_id() > cursors[2], "the new change arrives live");
}

#[test]
fn a_sale_too_large_for_any_peer_is_refused_with_the_limit_and_nothing_is_stored() {
    // Issue 13, item 1: a 13,000-line sale would be a change over 4 MiB, which no peer takes.
    let test = TestNode::start();
    let api = &test.client;
    let product = api.post("/api/products", &json!({"sku": "BIG", "name": "Big", "price": "1.00"}));
    assert_eq!(product.status, 201);
    let id = product.body["id"].as_str().unwrap().to_string();
    let lines: Vec<Value> = (0..13_000).map(|_| json!({"productId": id, "quantity": 1})).collect();
    let sale = api.post(
        "/api/tickets",
        &json!({"lines": lines, "payments": [{"method": "cash", "amount": "13000.00"}]}),
    );
    sale.error(413, "change_too_large");
    assert!(sale.body["error"]["message"].as_str().unwrap().contains("4194304"), "{:?}", sale.body);
    assert_eq!(api.get("/api/tickets").body.as_array().map(Vec::len), Some(0));
    // The till goes on: the next write is accepted.
    let ok = api.post("/api/tickets", &json!({"lines": [{"productId": id, "quantity": 1}], "payments": [{"method": "cash", "amount": "1.00"}]}));
    assert_eq!(ok.status, 201, "{:?}", ok.body);
}

/// Issue 11: a cashier account created on one till logs in on the other; only hashes are
/// stored and synced, and no answer carries one.
#[test]
fn a_cashier_created_on_one_till_logs_in_on_the_other_and_no_answer_carries_a_hash() {
    let b = TestNode::named("pos-b", Vec::new());
    let a = TestNode::named("pos-a", vec![b.node.as_ref().unwrap().peer_addr.unwrap().to_string()]);
    let created = a.client.post(
        "/api/users",
        &json!({"id": "u-alice", "username": "alice", "firstName": "Alice", "role": "cashier", "password": "s3cret-pass"}),
    );
    assert_eq!(created.status, 201, "{:?}", created.body);
    assert_eq!(created.body["hasPassword"], true);
    assert!(
        created.body.get("passwordHash").is_none() && created.body.get("password").is_none(),
        "{:?}",
        created.body
    );
    let pin_user = a.client.post("/api/users", &json!({"username": "bob", "role": "manager", "pin": "4711"}));
    assert_eq!(pin_user.status, 201, "{:?}", pin_user.body);

    // Stored as an argon2id hash, never as the password.
    let stored: String = a
        .runtime
        .block_on(
            a.shared()
                .readers
                .with(|reader| reader.record(EntityKind::User, &EntityId::parse("u-alice").unwrap())),
        )
        .unwrap()
        .unwrap()["passwordHash"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(stored.starts_with("$argon2id$") && !stored.contains("s3cret-pass"), "{stored}");

    // On the other till: listed without hashes, and the login works there.
    eventually("alice reaches till B", || b.client.get("/api/users/u-alice").status == 200);
    for user in b.client.ok("/api/users").as_array().unwrap() {
        assert!(user.get("passwordHash").is_none(), "{user}");
    }
    let login = b.client.post("/api/users/verify", &json!({"username": "alice", "password": "s3cret-pass"}));
    assert_eq!(login.status, 200, "{:?}", login.body);
    assert_eq!(login.body["id"], "u-alice");
    assert!(login.body["lastLogin"].is_string(), "lastLogin set: {:?}", login.body);
    assert!(login.body.get("passwordHash").is_none());
    eventually("bob reaches till B", || {
        b.client.get("/api/users?search=bob").body.as_array().is_some_and(|u| u.len() == 1)
    });
    let pin = b.client.post("/api/users/verify", &json!({"username": "bob", "pin": "4711"}));
    assert_eq!(pin.status, 200, "{:?}", pin.body);

    // A new password set on B works on A, the old one no longer does.
    let changed = b.client.send("PATCH", "/api/users/u-alice", &json!({"password": "another-pass-9"}));
    assert_eq!(changed.status, 200, "{:?}", changed.body);
    eventually("the new password reaches till A", || {
        a.client.post("/api/users/verify", &json!({"username": "alice", "password": "another-pass-9"})).status
            == 200
    });
    a.client
        .post("/api/users/verify", &json!({"username": "alice", "password": "s3cret-pass"}))
        .error(401, "invalid_credentials");

    // Deactivated: refused like a wrong password.
    let off = a.client.send("PATCH", "/api/users/u-alice", &json!({"isActive": false}));
    assert_eq!(off.status, 200, "{:?}", off.body);
    a.client
        .post("/api/users/verify", &json!({"username": "alice", "password": "another-pass-9"}))
        .error(401, "invalid_credentials");
}

#[test]
fn bad_cashier_input_and_guessing_get_clear_errors_and_change_nothing() {
    let test = TestNode::start();
    let api = &test.client;
    let created = api.post("/api/users", &json!({"username": "carol", "role": "cashier", "pin": "1234"}));
    assert_eq!(created.status, 201, "{:?}", created.body);
    let users_before = api.count("/api/users");
    for (body, status, code) in [
        (json!({"username": "carol", "role": "cashier", "pin": "9999"}), 409, "duplicate"),
        (json!({"username": "dave", "role": "boss", "pin": "1234"}), 422, "invalid_entity"),
        (json!({"username": "dave", "role": "cashier", "pin": "12a4"}), 422, "invalid_entity"),
        (json!({"username": "dave", "role": "cashier", "password": "short"}), 422, "invalid_entity"),
        (
            json!({"username": "dave", "role": "cashier", "pin": "1234", "password": "long-enough-1"}),
            400,
            "invalid_request",
        ),
        (
            json!({"username": "dave", "role": "cashier", "passwordHash": "$argon2id$forged"}),
            400,
            "invalid_request",
        ),
        (
            json!({"username": "dave", "role": "cashier", "lastLogin": "2026-01-01T00:00:00Z"}),
            400,
            "invalid_request",
        ),
        (json!({"username": "da\u{0}ve", "role": "cashier", "pin": "1234"}), 422, "invalid_entity"),
    ] {
        api.post("/api/users", &body).error(status, code);
    }
    assert_eq!(api.count("/api/users"), users_before, "nothing stored");

    // Unknown user and wrong PIN answer the same; the 6th failure in a minute is 429.
    let unknown = api.post("/api/users/verify", &json!({"username": "nobody", "pin": "1234"}));
    unknown.error(401, "invalid_credentials");
    for _ in 0..5 {
        api.post("/api/users/verify", &json!({"username": "carol", "pin": "0000"}))
            .error(401, "invalid_credentials");
    }
    let blocked = api.post("/api/users/verify", &json!({"username": "carol", "pin": "1234"}));
    blocked.error(429, "too_many_attempts");
    let retry: u64 = blocked.header("retry-after").parse().unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    // Another username is not blocked by carol's failures.
    api.post("/api/users/verify", &json!({"username": "nobody", "pin": "1234"}))
        .error(401, "invalid_credentials");
    api.post("/api/users/verify", &json!({"username": "carol"})).error(400, "invalid_request");
}

#[test]
fn a_cash_session_opens_sells_closes_with_its_z_report_on_every_till() {
    let b = TestNode::named("pos-b", Vec::new());
    let a = TestNode::named("pos-a", vec![b.node.as_ref().unwrap().peer_addr.unwrap().to_string()]);
    let (_, product) = category_and_product(&a.client);
    a.client.get("/api/cash-sessions/current").error(404, "not_found");

    let opened = a.client.post("/api/cash-sessions", &json!({"id": "s-1", "openingCash": "100"}));
    assert_eq!(opened.status, 201, "{:?}", opened.body);
    assert_eq!(
        (opened.body["status"].clone(), opened.body["openingCash"].clone()),
        (json!("open"), json!(100.0))
    );
    a.client.post("/api/cash-sessions", &json!({"openingCash": 5})).error(409, "cash_session_open");

    let sale = a.client.post(
        "/api/tickets",
        &json!({"lines": [{"productId": product, "quantity": 2}], "payments": [{"method": "cash", "amount": 10}]}),
    );
    assert_eq!(sale.status, 201, "{:?}", sale.body);
    assert_eq!(sale.body["cashSessionId"], "s-1");
    let total = sale.body["totalAmount"].as_f64().unwrap();
    let current = a.client.ok("/api/cash-sessions/current");
    assert_eq!(current["totals"]["expectedCash"].as_f64().unwrap(), 100.0 + total, "{current}");

    // Bad input: nothing stored, a clear code.
    let changes = a.client.count("/api/changes");
    a.client.post("/api/cash-sessions/s-1/close", &json!({"countedCash": -1})).error(422, "invalid_entity");
    a.client.post("/api/cash-sessions/s-1/close", &json!({})).error(400, "invalid_request");
    a.client.post("/api/cash-sessions/nope/close", &json!({"countedCash": 1})).error(404, "not_found");
    a.client.get("/api/z-reports?day=2025-13-45").error(400, "invalid_request");
    a.client.get("/api/cash-sessions?status=ajar").error(400, "invalid_request");
    assert_eq!(a.client.count("/api/changes"), changes, "refused calls write no change");

    let closed = a.client.post("/api/cash-sessions/s-1/close", &json!({"countedCash": 100.0 + total - 1.0}));
    assert_eq!(a.client.count("/api/changes"), changes + 2, "a Z report and the close");
    assert_eq!(closed.status, 200, "{:?}", closed.body);
    assert_eq!(closed.body["session"]["difference"], json!(-1.0));
    let report = closed.body["zReport"].clone();
    assert_eq!((report["ticketCount"].clone(), report["totalCash"].as_f64()), (json!(1), Some(total)));
    a.client
        .post("/api/cash-sessions/s-1/close", &json!({"countedCash": 1}))
        .error(409, "cash_session_closed");

    // Till B holds the same session and report, and cannot close A's drawer.
    let report_path = format!("/api/z-reports/{}", report["id"].as_str().unwrap());
    eventually("the Z report reaches till B", || b.client.get(&report_path).status == 200);
    assert_eq!(b.client.ok(&report_path), report);
    assert_eq!(b.client.count("/api/cash-sessions?status=closed&posId=pos-a"), 1);
    let again = a.client.post("/api/cash-sessions", &json!({"id": "s-2", "openingCash": 0}));
    assert_eq!(again.status, 201, "{:?}", again.body);
    eventually("session 2 reaches till B", || b.client.get("/api/cash-sessions/s-2").status == 200);
    b.client
        .post("/api/cash-sessions/s-2/close", &json!({"countedCash": 0}))
        .error(409, "cash_session_of_another_till");

    // With the setting on, a till without an open session refuses to sell.
    let set = b.client.send("PUT", "/api/settings/pos_require_cash_session", &json!({"value": true}));
    assert_eq!(set.status, 200, "{:?}", set.body);
    let tickets = b.client.count("/api/tickets");
    b.client
        .post(
            "/api/tickets",
            &json!({"lines": [{"productId": product, "quantity": 1}], "payments": [{"method": "cash", "amount": 10}]}),
        )
        .error(409, "no_open_cash_session");
    assert_eq!(b.client.count("/api/tickets"), tickets);
}

#[test]
fn terminals_are_listed_by_key_and_a_lost_one_is_revoked_on_every_till() {
    let b = TestNode::named("pos-b", Vec::new());
    let a = TestNode::named("pos-a", vec![b.node.as_ref().unwrap().peer_addr.unwrap().to_string()]);
    category_and_product(&a.client);
    let listed = a.client.ok("/api/terminals");
    assert_eq!(listed["posId"], "pos-a");
    let own_key = listed["publicKey"].as_str().unwrap().to_string();
    assert_eq!(own_key.len(), 44, "base64 of 32 bytes: {own_key}");
    let enrolled = listed["terminals"].as_array().unwrap();
    assert!(
        enrolled.iter().any(|row| row["posId"] == "pos-a" && row["publicKey"] == own_key.as_str()),
        "{listed}"
    );
    // B learns A's key from A's enrollment, like any change.
    eventually("A's key reaches B", || {
        b.client.ok("/api/terminals")["terminals"]
            .as_array()
            .is_some_and(|rows| rows.iter().any(|row| row["publicKey"] == own_key.as_str()))
    });

    a.client.post("/api/terminals/pos-a/revoke", &json!({})).error(422, "invalid_state");
    a.client.post("/api/terminals/bad%20id/revoke", &json!({})).error(400, "invalid_request");
    let revoked = a.client.post("/api/terminals/pos-lost/revoke", &json!({"reason": "stolen"}));
    assert_eq!(revoked.status, 200, "{:?}", revoked.body);
    assert_eq!(
        (revoked.body["posId"].clone(), revoked.body["untilSeq"].clone()),
        (json!("pos-lost"), json!(0))
    );
    eventually("the revocation reaches B", || {
        b.client.ok("/api/terminals")["terminals"].as_array().is_some_and(|rows| {
            rows.iter().any(|row| row["posId"] == "pos-lost" && row["revokeReason"] == "stolen")
        })
    });
}
