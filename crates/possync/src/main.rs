//! The `possync` command line (SPEC 6.1): `init` and `run` a terminal's node, `demo` several
//! terminals in one process, and talk to a running node (`status`, `stats`, `conflicts`,
//! `logs`, `cleanup`), `import` another till app's database, print the API's `openapi`
//! document. Errors are reported with context and a non-zero exit code.

mod chain_demo;
mod client;
mod demo;
mod import;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use possync_core::PosId;
use possync_node::Node;
use possync_node::config::{CONFIG_FILE, ConfigFile, NodeConfig};
use possync_store::{DB_FILE, Store, SystemEnvironment};
use rand::RngCore;

#[derive(Debug, Parser)]
#[command(
    name = "possync",
    version,
    about = "Keeps the point-of-sale terminals of a shop in sync over the LAN, with no server."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create a new terminal: DIR/possync.toml and DIR/possync.db; prints the new posId.
    Init(InitArgs),
    /// Run the terminal's node until SIGINT/SIGTERM.
    Run(RunArgs),
    /// Run three terminals in one process on 127.0.0.1, selling and editing, with a link cut
    /// and healed, and check that they end identical.
    Demo(demo::DemoArgs),
    /// Show the running node's status.
    Status(client::ClientArgs),
    /// Show the running node's detailed connection stats.
    Stats(client::ClientArgs),
    /// List recent conflicts.
    Conflicts(client::ListArgs),
    /// Resolve an open (`manual`) conflict: keep the local or the remote version.
    Resolve(client::ResolveArgs),
    /// Revoke a lost or stolen till: every till refuses its changes after the last one held.
    Revoke(client::RevokeArgs),
    /// List recent sync log rows.
    Logs(client::ListArgs),
    /// Delete log rows older than the retention period (or --older-than DAYS).
    Cleanup(client::CleanupArgs),
    /// Import another till application's database into this terminal (the node must be
    /// stopped): `possync import posplus --from posplus.db`.
    Import(import::ImportArgs),
    /// Print the API's OpenAPI document (what `GET /api/openapi.json` answers), e.g. to
    /// generate a typed client: `possync openapi > openapi.json`.
    Openapi,
}

#[derive(Debug, Args)]
struct InitArgs {
    /// The data directory to create the terminal in.
    #[arg(long)]
    data_dir: PathBuf,
    /// The terminal's display name.
    #[arg(long, default_value = "Terminal")]
    name: String,
    /// Peer port.
    #[arg(long, default_value_t = possync_node::config::DEFAULT_PEER_PORT)]
    port: u16,
    /// API port.
    #[arg(long, default_value_t = possync_node::config::DEFAULT_API_PORT)]
    api_port: u16,
    /// The shop's shared secret: at least 20 characters, 10 different ones. Left out, a
    /// strong one is generated, stored and printed once (to give to the other tills).
    #[arg(long)]
    secret: Option<String>,
    /// Use this posId instead of a new UUIDv7.
    #[arg(long)]
    pos_id: Option<String>,
}

#[derive(Debug, Args)]
struct RunArgs {
    /// The terminal's data directory.
    #[arg(long)]
    data_dir: PathBuf,
    /// A peer to dial, HOST:PORT (repeatable; added to those in the config file).
    #[arg(long = "peer")]
    peers: Vec<String>,
    /// Do not use mDNS discovery.
    #[arg(long)]
    no_discovery: bool,
    /// Peer port (overrides the config file).
    #[arg(long)]
    port: Option<u16>,
    /// API port (overrides the config file).
    #[arg(long)]
    api_port: Option<u16>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo prints its own summary; node logs would drown it unless asked for.
    let default_filter = match cli.command {
        Command::Demo(_) => "possync=info,possync_node=warn",
        _ => "possync=info,possync_node=info",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("POSSYNC_LOG")
                .unwrap_or_else(|_| default_filter.into()),
        )
        .with_writer(std::io::stderr)
        // Colour codes only for a terminal: not in a log file or a journal.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = match cli.command {
        Command::Init(args) => init(&args),
        Command::Run(args) => runtime().and_then(|runtime| runtime.block_on(run(args))),
        Command::Demo(args) if args.chain => {
            runtime().and_then(|runtime| runtime.block_on(chain_demo::run(args)))
        }
        Command::Demo(args) => runtime().and_then(|runtime| runtime.block_on(demo::run(args))),
        Command::Status(args) => client::status(&args),
        Command::Stats(args) => client::stats(&args),
        Command::Conflicts(args) => client::conflicts(&args),
        Command::Resolve(args) => client::resolve(&args),
        Command::Revoke(args) => client::revoke(&args),
        Command::Logs(args) => client::logs(&args),
        Command::Cleanup(args) => client::cleanup(&args),
        Command::Import(args) => import::run(&args),
        Command::Openapi => print_openapi(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().context("cannot start the async runtime")
}

/// `bytes` random bytes in hex (a token or a secret).
pub(crate) fn random_hex(bytes: usize) -> String {
    let mut random = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut random);
    random.iter().map(|byte| format!("{byte:02x}")).collect()
}

fn init(args: &InitArgs) -> Result<()> {
    if let Some(secret) = &args.secret {
        possync_node::config::check_secret(secret)?;
    }
    let dir = &args.data_dir;
    if dir.join(CONFIG_FILE).exists() || dir.join(DB_FILE).exists() {
        bail!("{} already holds a possync node; refusing to overwrite it", dir.display());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let pos_id = args.pos_id.as_deref().map(PosId::parse).transpose().context("invalid --pos-id")?;
    let store = Store::init(&dir.join(DB_FILE), pos_id, &args.name, Box::new(SystemEnvironment::default()))
        .with_context(|| format!("cannot create the database in {}", dir.display()))?;
    let pos_id = store.identity().pos_id.to_string();
    let mut config = ConfigFile::new(&pos_id, &args.name, random_hex(16));
    config.port = args.port;
    config.api_port = args.api_port;
    let generated = args.secret.is_none();
    let secret = args.secret.clone().unwrap_or_else(|| random_hex(24));
    config.secret = Some(secret.clone());
    config.save(dir).context("cannot write the config file")?;
    println!("{pos_id}");
    if generated {
        // Shown once, on stderr (stdout is the posId, for scripts).
        eprintln!(
            "A new shop secret was generated and stored in {}:\n\n    {secret}\n\n\
             Every till of this shop needs the same one: give it to the others with\n\
             `possync init --secret {secret} ...` (or POSSYNC_SECRET when they run).",
            dir.join(CONFIG_FILE).display()
        );
    }
    Ok(())
}

/// Loads the config of a data directory, with a clear error when it is not a node.
pub(crate) fn load_config(dir: &Path) -> Result<ConfigFile> {
    if !dir.join(CONFIG_FILE).exists() {
        bail!(
            "{} is not a possync data directory (no {CONFIG_FILE}): run `possync init --data-dir {}` first",
            dir.display(),
            dir.display()
        );
    }
    ConfigFile::load(dir).with_context(|| format!("cannot read the configuration in {}", dir.display()))
}

async fn run(args: RunArgs) -> Result<()> {
    let mut file = load_config(&args.data_dir)?;
    if let Some(port) = args.port {
        file.port = port;
    }
    if let Some(port) = args.api_port {
        file.api_port = port;
    }
    file.peers.extend(args.peers.iter().cloned());
    if args.no_discovery {
        file.discovery = false;
    }
    let secret = std::env::var("POSSYNC_SECRET").ok().or_else(|| file.secret.clone()).context(
        "no shop secret: set POSSYNC_SECRET or `secret` in possync.toml (every terminal of the shop needs the same one)",
    )?;
    if let Err(weak) = possync_node::config::check_secret(&secret) {
        // Refused by `init`; a shop set up before the rule keeps running, loudly.
        tracing::warn!("{weak}: choose a stronger one for every till of the shop");
    }
    let config = NodeConfig::from_file(&args.data_dir, &file, secret)?;
    let node = Node::start(config).await.context("cannot start the node")?;
    if let Some(api) = node.api_addr {
        eprintln!("possync {} running; API and dashboard on http://{api}/", node.pos_id());
    }
    wait_for_signal().await?;
    eprintln!("stopping: closing connections and flushing logs");
    node.shutdown().await;
    Ok(())
}

async fn wait_for_signal() -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    tokio::select! {
        result = tokio::signal::ctrl_c() => result.context("cannot listen for SIGINT"),
        _ = terminate.recv() => Ok(()),
    }
}

/// `possync openapi`: the route table's OpenAPI document, pretty-printed.
fn print_openapi() -> Result<()> {
    let document = possync_node::api::routes_document();
    let text = serde_json::to_string_pretty(&document).context("serialising the OpenAPI document")?;
    let mut out = std::io::stdout().lock();
    match writeln!(out, "{text}").and_then(|()| out.flush()) {
        // A reader that stopped early (`| head`) is not an error.
        Err(err) if err.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other.context("writing the OpenAPI document"),
    }
}
