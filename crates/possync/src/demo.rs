//! `possync demo`: three terminals in one process on 127.0.0.1 (discovery off), full mesh,
//! each selling and editing the catalog; midway one terminal's P2P is switched off while two
//! terminals edit the same product, then switched on again, so a conflict happens and is
//! resolved; at the end every terminal must hold identical data.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use possync_core::entity::{MovementType, PaymentMethod};
use possync_core::{EntityId, EntityKind};
use possync_node::config::NodeConfig;
use possync_node::writer::Priority;
use possync_node::{Node, NodeShared};
use possync_store::{PaymentRequest, SaleLineRequest, SaleRequest, Store, SystemEnvironment};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rust_decimal::Decimal;
use serde_json::{Value, json};

/// Options of `possync demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// How long the terminals sell and edit, in seconds.
    #[arg(long, default_value_t = 30)]
    pub duration: u64,
    /// Seed of the random activity.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Keep the terminals' data here (default: a temporary directory, removed at the end).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// First API port (terminals use it and the next two); 0 picks free ports.
    #[arg(long, default_value_t = 3031)]
    pub api_port: u16,
    /// Run a chain of stores instead: a nats-server, a head office and 3 stores of 2 tills,
    /// a store's WAN cut and healed, a price change at the head office (docs/CHAIN.md).
    #[arg(long)]
    pub chain: bool,
}

const NAMES: [&str; 3] = ["Till 1", "Till 2", "Till 3"];
const PRODUCTS: usize = 8;

struct Terminal {
    name: &'static str,
    node: Node,
    sales: u64,
}

impl Terminal {
    fn shared(&self) -> &Arc<NodeShared> {
        &self.node.shared
    }
}

/// The shop demo (`possync demo`; `--chain` runs `chain_demo::run` instead).
pub async fn run(args: DemoArgs) -> Result<()> {
    let temp = tempfile_dir(args.data_dir.as_ref())?;
    let root = temp.path.clone();
    let secret = crate::random_hex(16);
    let mut terminals: Vec<Terminal> = Vec::new();
    let mut peer_addrs: Vec<SocketAddr> = Vec::new();
    for (i, name) in NAMES.iter().enumerate() {
        let dir = root.join(format!("till{}", i + 1));
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let store = Store::init(
            &dir.join(possync_store::DB_FILE),
            None,
            name,
            Box::new(SystemEnvironment::default()),
        )
        .with_context(|| format!("cannot create terminal {name}"))?;
        let api_port = if args.api_port == 0 { 0 } else { args.api_port + i as u16 };
        let config = NodeConfig {
            data_dir: dir,
            peer_listen: "127.0.0.1:0".parse()?,
            api_listen: Some(SocketAddr::from(([127, 0, 0, 1], api_port))),
            static_peers: peer_addrs.iter().map(ToString::to_string).collect(),
            discovery: false,
            secret: secret.clone(),
            api_token: crate::random_hex(16),
            max_connections: 16,
            max_frame_bytes: 16 * 1024 * 1024,
            backoff_base_ms: 1_000,
            chain: None,
            api: Default::default(),
        };
        let node =
            Node::start_with_store(config, store).await.with_context(|| format!("cannot start {name}"))?;
        peer_addrs.extend(node.peer_addr);
        terminals.push(Terminal { name, node, sales: 0 });
    }
    println!("possync demo: 3 terminals on 127.0.0.1, seed {}, {} s of activity", args.seed, args.duration);
    for terminal in &terminals {
        if let Some(api) = terminal.node.api_addr {
            println!("  {:<7} dashboard http://{api}/   (posId {})", terminal.name, terminal.node.pos_id());
        }
    }

    // The catalog, created on Till 1 and synced to the others.
    let first = Arc::clone(terminals[0].shared());
    local(&first, |store| {
        store.create_record(EntityKind::Category, &json!({"id": "demo-drinks", "name": "Drinks"}))
    })
    .await?;
    for p in 0..PRODUCTS {
        let body = json!({"id": format!("demo-p{p}"), "sku": format!("SKU-{p:03}"), "name": format!("Product {p}"),
                          "price": 1.5 + p as f64, "categoryId": "demo-drinks"});
        local(&first, move |store| store.create_record(EntityKind::Product, &body)).await?;
        local(&first, move |store| {
            store.adjust_stock(&product(p), Decimal::from(500), MovementType::In, Some("opening stock"))
        })
        .await?;
    }

    let mut rng = StdRng::seed_from_u64(args.seed);
    let start = Instant::now();
    let total = Duration::from_secs(args.duration.max(6));
    let cut_at = total / 3;
    let heal_at = total * 2 / 3;
    let mut cut = false;
    let mut healed = false;
    let mut last_report = Instant::now();
    while start.elapsed() < total {
        let elapsed = start.elapsed();
        if !cut && elapsed >= cut_at {
            cut = true;
            println!("-- cutting Till 3 off the network (P2P disabled) --");
            set_enabled(terminals[2].shared(), false).await?;
            // Both sides of the cut edit the same product: a conflict to resolve at heal time.
            let price_a = json!({"price": 9.99, "name": "Product 0 (promo Till 1)"});
            local(terminals[0].shared(), move |store| {
                store.update_record(EntityKind::Product, &product(0), &price_a)
            })
            .await?;
            tokio::time::sleep(Duration::from_millis(20)).await;
            let price_c = json!({"price": 7.49});
            local(terminals[2].shared(), move |store| {
                store.update_record(EntityKind::Product, &product(0), &price_c)
            })
            .await?;
        }
        if cut && !healed && elapsed >= heal_at {
            healed = true;
            println!("-- healing: Till 3 back on the network --");
            set_enabled(terminals[2].shared(), true).await?;
        }
        for terminal in &mut terminals {
            act(terminal, &mut rng).await?;
        }
        if last_report.elapsed() >= Duration::from_secs(2) {
            last_report = Instant::now();
            report(&terminals).await;
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }

    println!("-- activity over; waiting for the terminals to agree --");
    let converged = wait_converged(&terminals, Duration::from_secs(30)).await;
    report(&terminals).await;
    let mut dumps = Vec::new();
    for terminal in &terminals {
        let dump = terminal.shared().readers.with(|reader| reader.canonical_dump()).await?;
        dumps.push(dump);
    }
    let conflicts = conflict_summary(terminals[2].shared()).await?;
    if let Some(conflict) = conflicts {
        println!("conflict on Till 3: {conflict}");
    }
    let identical = dumps.windows(2).all(|pair| pair[0] == pair[1]);
    for terminal in terminals {
        terminal.node.shutdown().await;
    }
    if !converged || !identical {
        bail!(
            "the terminals do NOT hold identical data (converged: {converged}, identical dumps: {identical})"
        );
    }
    println!(
        "OK: all 3 terminals hold identical data ({} lines of canonical dump, {} bytes)",
        dumps[0].lines().count(),
        dumps[0].len()
    );
    Ok(())
}

fn product(p: usize) -> EntityId {
    // Invariant: "demo-p<digits>" is a valid id.
    EntityId::parse(format!("demo-p{p}")).expect("valid demo id")
}

async fn local<T, F>(node: &Arc<NodeShared>, write: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce(&mut Store) -> Result<T, possync_store::StoreError> + Send + 'static,
{
    Ok(node.writer.call(Priority::Local, write).await??)
}

async fn set_enabled(node: &Arc<NodeShared>, enabled: bool) -> Result<()> {
    node.set_setting("p2p_enabled".into(), enabled.to_string()).await?;
    Ok(())
}

/// One random till action: mostly sales, some price edits and stock receipts.
async fn act(terminal: &mut Terminal, rng: &mut StdRng) -> Result<()> {
    let roll: f64 = rng.random();
    let p = rng.random_range(0..PRODUCTS);
    let node = Arc::clone(terminal.shared());
    if roll < 0.7 {
        let quantity = Decimal::from(rng.random_range(1..4));
        let method = if rng.random_bool(0.5) { PaymentMethod::Cash } else { PaymentMethod::Card };
        let sale = SaleRequest {
            id: None,
            customer_id: None,
            lines: vec![SaleLineRequest {
                product_id: product(p),
                quantity,
                unit_price: None,
                discount_rate: None,
            }],
            payments: vec![PaymentRequest { method, amount: Decimal::from(100), reference: None }],
            notes: None,
        };
        // A sale can be refused (the product edited away meanwhile): that is the till's business.
        if node.writer.call(Priority::Local, move |store| store.record_sale(&sale)).await?.is_ok() {
            terminal.sales += 1;
        }
    } else if roll < 0.85 {
        let cents = rng.random_range(100..2000);
        let body = json!({"price": format!("{}.{:02}", cents / 100, cents % 100)});
        let _ = node
            .writer
            .call(Priority::Local, move |store| store.update_record(EntityKind::Product, &product(p), &body))
            .await?;
    } else {
        let quantity = Decimal::from(rng.random_range(5..20));
        let _ = node
            .writer
            .call(Priority::Local, move |store| {
                store.adjust_stock(&product(p), quantity, MovementType::In, Some("delivery"))
            })
            .await?;
    }
    Ok(())
}

async fn report(terminals: &[Terminal]) {
    for terminal in terminals {
        let node = terminal.shared();
        let stats = node.peers.detailed_stats();
        let conflicts = node.readers.with(|reader| reader.conflict_count()).await.unwrap_or(0);
        println!(
            "  {:<7} p2p {:<3} peers {}  sales {:>4}  messages out {:>6} in {:>6}  conflicts {}",
            terminal.name,
            if node.settings().enabled { "on" } else { "off" },
            stats.connections.len(),
            terminal.sales,
            stats.total_messages_sent,
            stats.total_messages_received,
            conflicts
        );
    }
}

/// Waits until every terminal holds the same changes (equal version vectors).
async fn wait_converged(terminals: &[Terminal], limit: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        let mut summaries = Vec::new();
        for terminal in terminals {
            summaries.extend(terminal.shared().summary().await);
        }
        if summaries.len() == terminals.len() && summaries.windows(2).all(|pair| pair[0] == pair[1]) {
            // Let the last applies and their logs settle.
            tokio::time::sleep(Duration::from_millis(300)).await;
            return true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    false
}

async fn conflict_summary(node: &Arc<NodeShared>) -> Result<Option<String>> {
    // The newest one (the API's order).
    let rows = node.readers.with(|reader| reader.conflicts(Some(1), None)).await?;
    Ok(rows.first().map(|row: &Value| {
        format!(
            "{} resolved by {}: {}",
            row["conflictType"].as_str().unwrap_or("-"),
            row["resolutionStrategy"].as_str().unwrap_or("-"),
            row["notes"].as_str().unwrap_or("-")
        )
    }))
}

/// The demo's data directory: the one given (kept), or a temporary one (removed).
pub(crate) struct DemoDir {
    pub(crate) path: PathBuf,
    _temp: Option<tempfile::TempDir>,
}

pub(crate) fn tempfile_dir(given: Option<&PathBuf>) -> Result<DemoDir> {
    match given {
        Some(path) => {
            if path.exists()
                && std::fs::read_dir(path).map(|mut entries| entries.next().is_some()).unwrap_or(false)
            {
                bail!("{} is not empty; the demo needs an empty directory", path.display());
            }
            std::fs::create_dir_all(path)?;
            Ok(DemoDir { path: path.clone(), _temp: None })
        }
        None => {
            let temp = tempfile::tempdir().context("cannot create a temporary directory")?;
            Ok(DemoDir { path: temp.path().to_path_buf(), _temp: Some(temp) })
        }
    }
}
