//! The commands that talk to a running node through its HTTP API: `status`, `stats`,
//! `conflicts`, `logs`, `cleanup`. Tables for people, `--json` for scripts.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::Value;

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

struct Api {
    base: String,
    token: String,
    agent: ureq::Agent,
}

impl Api {
    fn new(args: &ClientArgs) -> Result<Api> {
        let config = load_config(&args.data_dir)?;
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
        Ok(Api { base: format!("http://{host}:{}", config.api_port), token: config.api_token, agent })
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
        let mut response = response.with_context(|| {
            format!("no possync node answers at {} (is `possync run` running?)", self.base)
        })?;
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
    let status = Api::new(args)?.call("GET", "/api/status", None)?;
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
    Ok(())
}

/// `possync stats`.
pub fn stats(args: &ClientArgs) -> Result<()> {
    let stats = Api::new(args)?.call("GET", "/api/stats", None)?;
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
    let rows = Api::new(&args.node)?.call(
        "GET",
        &format!("{path}?limit={}&offset={}", args.limit, args.offset),
        None,
    )?;
    if args.node.json {
        return print_json(&rows);
    }
    table(rows.as_array().map_or(&[][..], Vec::as_slice), columns);
    Ok(())
}

/// `possync cleanup`.
pub fn cleanup(args: &CleanupArgs) -> Result<()> {
    let body = serde_json::json!({ "olderThanDays": args.older_than });
    let answer = Api::new(&args.node)?.call("POST", "/api/cleanup", Some(body))?;
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
