//! The maintenance commands: `status`, `stats`, `conflicts`, `resolve`,
//! `logs`, `cleanup`. Tables for people, `--json` for scripts.
//!
//! They talk to the terminal's running node through its HTTP API, after checking that the
//! node answering on the configured port is this data directory's (another till's node on
//! that port would otherwise be shown as this one). When no node answers (stopped or
//! crashed: when someone needs these most), they read the database directly, and `cleanup`
//! writes it through a store of its own; SQLite's locking keeps that safe against a node
//! starting meanwhile (each waits for the other's transaction). They say which they did.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::Value;

use possync_store::{DB_FILE, Store, StoreReader, SystemEnvironment};

use crate::load_config;

/// Where the node is.
#[derive(Debug, Args)]
pub struct ClientArgs {
    /// The terminal's data directory (its config says where the API listens).
    #[arg(long)]
    pub data_dir: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Paging for lists.
#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub node: ClientArgs,
    /// At most this many rows.
    #[arg(long, default_value_t = 20)]
    pub limit: u32,
    /// Skip this many rows.
    #[arg(long, default_value_t = 0)]
    pub offset: u32,
}

/// Retention.
#[derive(Debug, Args)]
pub struct CleanupArgs {
    #[command(flatten)]
    pub node: ClientArgs,
    /// Delete rows older than this many days (default: `p2p_log_retention_days`).
    #[arg(long)]
    pub older_than: Option<u32>,
}

/// `possync resolve`.
#[derive(Debug, Args)]
pub struct ResolveArgs {
    #[command(flatten)]
    pub node: ClientArgs,
    /// The conflict's id (see `possync conflicts`).
    pub id: i64,
    /// Which version wins: `local` (this terminal's) or `remote`.
    #[arg(long, value_parser = ["local", "remote"])]
    pub keep: String,
    /// Who decides (recorded as `resolved_by`).
    #[arg(long, default_value = "cli")]
    pub by: String,
}

/// `possync revoke`.
#[derive(Debug, Args)]
pub struct RevokeArgs {
    #[command(flatten)]
    pub node: ClientArgs,
    /// The revoked till's posId (see `possync status`).
    pub pos_id: String,
    /// Why (lost, stolen...).
    #[arg(long)]
    pub reason: Option<String>,
}

/// What a command talks to: the running node, or its database when none answers.
enum Target {
    Node(Api),
    Database(PathBuf),
}

impl Target {
    fn connect(args: &ClientArgs) -> Result<Target> {
        let config = load_config(&args.data_dir)?;
        let api = Api::new(&config);
        match api.call("GET", "/api/status", None) {
            Ok(status) => {
                let answering = status["posId"].as_str().unwrap_or_default();
                if answering != config.pos_id {
                    bail!(
                        "the node answering at {} is {answering} ({}), not this data directory's {}: \
                         another till's node is on this API port",
                        api.base,
                        text(&status, "posName"),
                        config.pos_id
                    );
                }
                Ok(Target::Node(api))
            }
            Err(err) if err.downcast_ref::<Unreachable>().is_some() => {
                let db = args.data_dir.join(DB_FILE);
                eprintln!(
                    "no possync node answers at {}: reading {} directly (the node is stopped)",
                    api.base,
                    db.display()
                );
                Ok(Target::Database(db))
            }
            Err(err) => Err(err),
        }
    }
}

fn open_reader(db: &Path) -> Result<StoreReader> {
    StoreReader::open(db).with_context(|| format!("cannot read {}", db.display()))
}

/// No node answered at all (nothing listens, or it does not speak HTTP).
#[derive(Debug, thiserror::Error)]
#[error("no possync node answers at {0} (is `possync run` running?)")]
struct Unreachable(String);

struct Api {
    base: String,
    token: String,
    agent: ureq::Agent,
}

impl Api {
    fn new(config: &possync_node::config::ConfigFile) -> Api {
        let host = if config.api_bind == "0.0.0.0" || config.api_bind == "::" {
            "127.0.0.1".to_string()
        } else {
            config.api_bind.clone()
        };
        let host = if host.contains(':') { format!("[{host}]") } else { host };
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(10)))
            .http_status_as_error(false)
            .build()
            .into();
        Api { base: format!("http://{host}:{}", config.api_port), token: config.api_token.clone(), agent }
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
        let url = format!("{}{path}", self.base);
        let auth = format!("Bearer {}", self.token);
        let response = match (method, body) {
            ("GET", _) => self.agent.get(&url).header("Authorization", &auth).call(),
            (_, Some(body)) => self.agent.post(&url).header("Authorization", &auth).send_json(body),
            // The API refuses a state-changing call without the JSON content type, also
            // without a body (it keeps web pages from posting to the till).
            (_, None) => self
                .agent
                .post(&url)
                .header("Authorization", &auth)
                .header("Content-Type", "application/json")
                .send_empty(),
        };
        let mut response = response.map_err(|_| Unreachable(self.base.clone()))?;
        let status = response.status();
        let text = response.body_mut().read_to_string().context("cannot read the node's answer")?;
        let value: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        if !status.is_success() {
            let message = value
                .pointer("/error/message")
                .and_then(Value::as_str)
                .map_or_else(|| value.to_string(), str::to_string);
            bail!("the node refused {method} {path} ({status}): {message}");
        }
        Ok(value)
    }
}

fn print_json(value: &Value) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

fn text(value: &Value, key: &str) -> String {
    match value.get(key) {
        None | Some(Value::Null) => "-".into(),
        Some(Value::String(text)) => text.clone(),
        Some(other) => other.to_string(),
    }
}

/// Prints rows as an aligned table of the given columns.
fn table(rows: &[Value], columns: &[(&str, &str)]) {
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|row| columns.iter().map(|(key, _)| text(row, key).chars().take(60).collect()).collect())
        .collect();
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(i, (_, title))| {
            cells.iter().map(|row| row[i].chars().count()).max().unwrap_or(0).max(title.len())
        })
        .collect();
    let line = |values: Vec<String>| {
        values
            .iter()
            .zip(&widths)
            .map(|(value, width)| format!("{value:<width$}"))
            .collect::<Vec<_>>()
            .join("  ")
    };
    println!("{}", line(columns.iter().map(|(_, title)| (*title).to_string()).collect()));
    for row in cells {
        println!("{}", line(row));
    }
    if rows.is_empty() {
        println!("(none)");
    }
}

/// `possync status`.
pub fn status(args: &ClientArgs) -> Result<()> {
    let api = match Target::connect(args)? {
        Target::Node(api) => api,
        Target::Database(db) => return status_offline(args, &db),
    };
    let status = api.call("GET", "/api/status", None)?;
    if args.json {
        return print_json(&status);
    }
    println!(
        "{} ({})  p2p {}  listening {}  peers {}/{}",
        text(&status, "posName"),
        text(&status, "posId"),
        if status["enabled"] == Value::Bool(true) { "enabled" } else { "disabled" },
        text(&status, "serverRunning"),
        text(&status, "connectedPeers"),
        text(&status, "totalPeers"),
    );
    let peers = status["peers"].as_array().cloned().unwrap_or_default();
    table(
        &peers,
        &[
            ("name", "PEER"),
            ("id", "POS ID"),
            ("address", "ADDRESS"),
            ("online", "ONLINE"),
            ("behind", "BEHIND"),
            ("lastSeen", "LAST SEEN"),
        ],
    );
    if std::io::IsTerminal::is_terminal(&std::io::stdout()) && behind(&status) > 0 {
        follow_catch_up(&api, behind(&status))?;
    }
    Ok(())
}

/// Changes the connected peers hold that this node has not taken yet.
fn behind(status: &Value) -> u64 {
    status["peers"]
        .as_array()
        .map(|peers| {
            peers
                .iter()
                .filter(|peer| peer["online"] == Value::Bool(true))
                .filter_map(|peer| peer["behind"].as_u64())
                .sum()
        })
        .unwrap_or(0)
}

/// On a terminal, while the node is catching up: a progress bar until it is in step (or
/// makes no progress for 30 s; Ctrl-C stops watching, not the node).
fn follow_catch_up(api: &Api, start: u64) -> Result<()> {
    let bar = indicatif::ProgressBar::new(start);
    bar.set_style(
        indicatif::ProgressStyle::with_template("catching up [{bar:40}] {pos}/{len} changes, {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut last_progress = std::time::Instant::now();
    let mut left = start;
    loop {
        bar.set_message(format!("{left} behind"));
        if left == 0 {
            bar.finish_with_message("in step with every peer");
            return Ok(());
        }
        if last_progress.elapsed() > Duration::from_secs(30) {
            bar.abandon_with_message(format!(
                "{left} behind, no progress for 30 s (see the dashboard's alerts)"
            ));
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(500));
        let now = behind(&api.call("GET", "/api/status", None)?);
        if now < left {
            last_progress = std::time::Instant::now();
        }
        left = now;
        bar.set_length(bar.length().unwrap_or(start).max(left));
        bar.set_position(start.saturating_sub(left));
    }
}

/// `possync status` of a stopped node: who it is, and every peer it knew with its last event.
fn status_offline(args: &ClientArgs, db: &Path) -> Result<()> {
    let config = load_config(&args.data_dir)?;
    let peers = open_reader(db)?.known_peers()?;
    if args.json {
        return print_json(&serde_json::json!({
            "serverRunning": false, "posId": config.pos_id, "posName": config.name, "knownPeers": peers,
        }));
    }
    println!("{} ({})  node not running", config.name, config.pos_id);
    table(
        &peers,
        &[("name", "PEER"), ("id", "POS ID"), ("lastEvent", "LAST EVENT"), ("lastSeen", "AT (UTC)")],
    );
    Ok(())
}

/// `possync stats`.
pub fn stats(args: &ClientArgs) -> Result<()> {
    let stats = match Target::connect(args)? {
        Target::Node(api) => api.call("GET", "/api/stats", None)?,
        Target::Database(_) => {
            // The seed's object, with no live connection.
            serde_json::json!({"connections": [], "totalMessagesSent": 0, "totalMessagesReceived": 0,
                               "totalBytesSent": 0, "totalBytesReceived": 0})
        }
    };
    if args.json {
        return print_json(&stats);
    }
    let connections = stats["connections"].as_array().cloned().unwrap_or_default();
    table(
        &connections,
        &[
            ("peerName", "PEER"),
            ("messagesSent", "MSG OUT"),
            ("messagesReceived", "MSG IN"),
            ("bytesSent", "BYTES OUT"),
            ("bytesReceived", "BYTES IN"),
            ("lastPong", "LAST PONG"),
            ("reconnectAttempts", "REDIALS"),
        ],
    );
    println!(
        "total: {} messages sent, {} received, {} bytes sent, {} received",
        text(&stats, "totalMessagesSent"),
        text(&stats, "totalMessagesReceived"),
        text(&stats, "totalBytesSent"),
        text(&stats, "totalBytesReceived")
    );
    Ok(())
}

/// `possync conflicts`.
pub fn conflicts(args: &ListArgs) -> Result<()> {
    list(
        args,
        "/api/conflicts",
        &[
            ("id", "ID"),
            ("createdAt", "AT"),
            ("peerName", "PEER"),
            ("entityType", "ENTITY"),
            ("entityId", "ENTITY ID"),
            ("conflictType", "TYPE"),
            ("resolutionStrategy", "STRATEGY"),
            ("resolvedBy", "RESOLVED BY"),
        ],
    )
}

/// `possync logs`.
pub fn logs(args: &ListArgs) -> Result<()> {
    list(
        args,
        "/api/sync-logs",
        &[
            ("id", "ID"),
            ("createdAt", "AT"),
            ("peerName", "PEER"),
            ("messageType", "TYPE"),
            ("messageAction", "ACTION"),
            ("entityId", "ENTITY ID"),
            ("status", "STATUS"),
            ("conflictReason", "REASON"),
        ],
    )
}

/// Fetches a page of an audit list and prints it as JSON or as a table of `columns`.
fn list(args: &ListArgs, path: &str, columns: &[(&str, &str)]) -> Result<()> {
    let rows = match Target::connect(&args.node)? {
        Target::Node(api) => {
            api.call("GET", &format!("{path}?limit={}&offset={}", args.limit, args.offset), None)?
        }
        Target::Database(db) => {
            let reader = open_reader(&db)?;
            let (limit, offset) = (Some(args.limit), Some(args.offset));
            let rows = if path == "/api/conflicts" {
                reader.conflicts(limit, offset)?
            } else {
                reader.sync_logs(limit, offset)?
            };
            Value::Array(rows)
        }
    };
    if args.node.json {
        return print_json(&rows);
    }
    table(rows.as_array().map_or(&[][..], Vec::as_slice), columns);
    Ok(())
}

/// `possync cleanup`.
pub fn cleanup(args: &CleanupArgs) -> Result<()> {
    let answer = match Target::connect(&args.node)? {
        Target::Node(api) => {
            let body = serde_json::json!({ "olderThanDays": args.older_than });
            api.call("POST", "/api/cleanup", Some(body))?
        }
        Target::Database(db) => {
            let mut store = Store::open(&db, Box::new(SystemEnvironment::default()))
                .with_context(|| format!("cannot open {}", db.display()))?;
            let days = args.older_than.unwrap_or(store.settings().log_retention_days);
            let deleted = store.cleanup_logs(days)?;
            serde_json::json!({"deleted": deleted, "olderThanDays": days})
        }
    };
    if args.node.json {
        return print_json(&answer);
    }
    println!(
        "deleted {} log rows older than {} days",
        text(&answer, "deleted"),
        text(&answer, "olderThanDays")
    );
    Ok(())
}

/// `possync resolve ID --keep local|remote`: a person's decision on an open
/// (`manual`) conflict, through the running node (it becomes a change every till takes).
pub fn resolve(args: &ResolveArgs) -> Result<()> {
    let Target::Node(api) = Target::connect(&args.node)? else {
        bail!(
            "resolving a conflict needs the running node (its decision travels to every till): start `possync run`"
        );
    };
    let body = serde_json::json!({"choice": args.keep, "resolvedBy": args.by});
    let answer = api.call("POST", &format!("/api/conflicts/{}/resolve", args.id), Some(body))?;
    if args.node.json {
        return print_json(&answer);
    }
    println!("conflict {} resolved: {} version kept, by {}", args.id, args.keep, text(&answer, "resolvedBy"));
    Ok(())
}

/// `possync revoke`: through the running node, so that the revocation travels at once.
pub fn revoke(args: &RevokeArgs) -> Result<()> {
    let Target::Node(api) = Target::connect(&args.node)? else {
        bail!(
            "revoking a till needs the running node (the revocation travels to every till): start `possync run`"
        );
    };
    let body = serde_json::json!({"reason": args.reason});
    let answer = api.call("POST", &format!("/api/terminals/{}/revoke", args.pos_id), Some(body))?;
    if args.node.json {
        return print_json(&answer);
    }
    println!(
        "till {} revoked: its changes after number {} are refused on every till",
        args.pos_id,
        answer.get("untilSeq").and_then(Value::as_u64).unwrap_or_default()
    );
    Ok(())
}

/// The posId of the node answering at the API address of this data directory's config, if
/// one answers (commands that write the database directly refuse to run beside it).
pub fn running_pos_id(data_dir: &std::path::Path) -> Option<String> {
    let config = load_config(data_dir).ok()?;
    let status = Api::new(&config).call("GET", "/api/status", None).ok()?;
    status.get("posId").and_then(Value::as_str).map(str::to_string)
}
