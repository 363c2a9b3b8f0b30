//! The `possync` command line as a user runs it: `init`, a real `run` process on 127.0.0.1
//! (discovery off, ports picked free), and the client commands against it; clear errors and
//! non-zero exits when something is wrong.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command as StdCommand, Stdio};
use std::time::{Duration, Instant};

use assert_cmd::Command;
use predicates::prelude::*;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_possync");
const SECRET: &str = "cli-test-shop-secret-9d1e";

fn possync() -> Command {
    let mut command = Command::new(BIN);
    command.env_remove("POSSYNC_SECRET").env("POSSYNC_LOG", "warn").timeout(Duration::from_secs(60));
    command
}

/// A port nothing listens on now (the OS picks it; the listener is closed at once).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `possync init` of a new node whose API will be on `api_port`; returns its posId.
fn init(dir: &Path, api_port: u16) -> String {
    let output = possync()
        .args(["init", "--name", "Till 1", "--port", "0", "--api-port", &api_port.to_string(), "--data-dir"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let stdout = String::from_utf8(output.stdout).unwrap();
    let pos_id = stdout.trim().to_string();
    assert_eq!(stdout.lines().count(), 1, "{stdout:?}");
    assert!(!pos_id.is_empty() && !pos_id.contains(char::is_whitespace), "{pos_id:?}");
    pos_id
}

/// A `possync run` process, stopped (SIGTERM) when dropped.
struct Running {
    child: Child,
}

impl Running {
    fn start(dir: &Path, api_port: u16) -> Running {
        let log = std::fs::File::create(dir.join("node.log")).unwrap();
        let child = StdCommand::new(BIN)
            .args(["run", "--no-discovery", "--port", "0", "--api-port", &api_port.to_string(), "--data-dir"])
            .arg(dir)
            .env("POSSYNC_SECRET", SECRET)
            .env("POSSYNC_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut running = Running { child };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            // `status` also answers for a stopped node (from its database): wait until it
            // is the running node that answers.
            let status = possync().args(["status", "--json", "--data-dir"]).arg(dir).output().unwrap();
            if status.status.success()
                && serde_json::from_slice::<Value>(&status.stdout)
                    .is_ok_and(|status| status["serverRunning"] == Value::Bool(true))
            {
                return running;
            }
            if let Some(status) = running.child.try_wait().unwrap() {
                panic!(
                    "the node exited ({status}): {}",
                    std::fs::read_to_string(dir.join("node.log")).unwrap()
                );
            }
            assert!(Instant::now() < deadline, "the node did not answer in 30 s");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGTERM, then the exit status (a clean stop exits 0).
    fn stop(&mut self) -> std::process::ExitStatus {
        let _ = StdCommand::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                return self.child.wait().unwrap();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.stop();
        }
    }
}

fn json_of(output: &std::process::Output) -> Value {
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout).unwrap()
}

#[test]
fn every_command_has_help() {
    possync().arg("--help").assert().success().stdout(predicate::str::contains("init"));
    for command in ["init", "run", "demo", "status", "stats", "conflicts", "logs", "cleanup", "resolve"] {
        possync().args([command, "--help"]).assert().success().stdout(predicate::str::contains("--"));
    }
    possync().arg("frobnicate").assert().failure();
}

#[test]
fn openapi_prints_the_document_a_node_serves() {
    let output = possync().arg("openapi").output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let document: Value = serde_json::from_slice(&output.stdout).expect("the document is JSON");
    assert_eq!(document, possync_node::api::routes_document());
    assert!(document["paths"]["/api/tickets"]["post"].is_object(), "selling is described");
}

#[test]
fn init_prints_the_pos_id_and_refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let node = dir.path().join("till");
    let pos_id = init(&node, free_port());
    assert!(node.join("possync.toml").exists() && node.join("possync.db").exists());
    let config = std::fs::read_to_string(node.join("possync.toml")).unwrap();
    assert!(config.contains(&pos_id));

    possync()
        .args(["init", "--data-dir"])
        .arg(&node)
        .assert()
        .failure()
        .stderr(predicate::str::contains("refusing to overwrite"));
    // The node is untouched.
    assert_eq!(std::fs::read_to_string(node.join("possync.toml")).unwrap(), config);
}

#[test]
fn client_commands_explain_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    // Not a data directory.
    for command in ["status", "stats", "logs", "conflicts", "cleanup"] {
        possync().args([command, "--data-dir"]).arg(dir.path().join("nowhere")).assert().failure().stderr(
            predicate::str::contains("is not a possync data directory")
                .and(predicate::str::contains("possync init")),
        );
    }
    // A node that is not running: maintenance reads (and cleans) its database directly.
    let node = dir.path().join("till");
    init(&node, free_port());
    for command in ["status", "stats", "logs", "conflicts", "cleanup"] {
        possync().args([command, "--data-dir"]).arg(&node).assert().success().stderr(
            predicate::str::contains("no possync node answers").and(predicate::str::contains("directly")),
        );
    }
    possync()
        .args(["status", "--data-dir"])
        .arg(&node)
        .assert()
        .success()
        .stdout(predicate::str::contains("node not running"));
    possync()
        .args(["cleanup", "--data-dir"])
        .arg(&node)
        .assert()
        .success()
        .stdout(predicate::str::contains("deleted 0 log rows"));
    possync()
        .args(["resolve", "1", "--keep", "local", "--data-dir"])
        .arg(&node)
        .assert()
        .failure()
        .stderr(predicate::str::contains("needs the running node"));
    // `run` without the shop secret (`init` stores a generated one: take it out).
    let config = node.join("possync.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    let without: String =
        text.lines().filter(|line| !line.starts_with("secret")).map(|line| format!("{line}\n")).collect();
    assert_ne!(text, without, "init stored a secret");
    std::fs::write(&config, without).unwrap();
    possync()
        .args(["run", "--no-discovery", "--data-dir"])
        .arg(&node)
        .assert()
        .failure()
        .stderr(predicate::str::contains("no shop secret"));
}

#[test]
fn a_running_node_answers_the_client_commands() {
    let dir = tempfile::tempdir().unwrap();
    let node = dir.path().join("till");
    let api_port = free_port();
    let pos_id = init(&node, api_port);
    let mut running = Running::start(&node, api_port);
    let run = |args: &[&str]| possync().args(args).arg("--data-dir").arg(&node).output().unwrap();

    let status = run(&["status"]);
    assert!(status.status.success());
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(text.contains("Till 1") && text.contains(&pos_id) && text.contains("p2p enabled"), "{text}");
    let status = json_of(&run(&["status", "--json"]));
    assert_eq!(status["posId"], pos_id.as_str());
    assert_eq!(status["serverRunning"], true);

    let stats = json_of(&run(&["stats", "--json"]));
    let keys: Vec<&str> = stats.as_object().unwrap().keys().map(String::as_str).collect();
    let mut expected = vec![
        "connections",
        "totalMessagesSent",
        "totalMessagesReceived",
        "totalBytesSent",
        "totalBytesReceived",
    ];
    expected.sort_unstable();
    let mut keys = keys;
    keys.sort_unstable();
    assert_eq!(keys, expected);
    assert_eq!(stats["connections"], Value::Array(Vec::new()));
    let stats = run(&["stats"]);
    assert!(String::from_utf8_lossy(&stats.stdout).contains("total: 0 messages sent"));

    assert_eq!(json_of(&run(&["logs", "--json"])), Value::Array(Vec::new()));
    let logs = run(&["logs", "--limit", "5"]);
    assert!(logs.status.success());
    assert!(String::from_utf8_lossy(&logs.stdout).contains("(none)"));
    assert_eq!(json_of(&run(&["conflicts", "--json", "--limit", "500"])), Value::Array(Vec::new()));
    let conflicts = run(&["conflicts"]);
    assert!(String::from_utf8_lossy(&conflicts.stdout).contains("STRATEGY"));
    // A page the API refuses: the node's message, non-zero exit.
    let refused = run(&["logs", "--limit", "100000"]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("limit must be from 1 to 500"));

    let cleanup = run(&["cleanup"]);
    assert!(cleanup.status.success(), "{}", String::from_utf8_lossy(&cleanup.stderr));
    assert_eq!(String::from_utf8_lossy(&cleanup.stdout).trim(), "deleted 0 log rows older than 30 days");
    let cleanup = json_of(&run(&["cleanup", "--older-than", "5", "--json"]));
    assert_eq!(cleanup, serde_json::json!({"deleted": 0, "olderThanDays": 5}));
    let resolve = run(&["resolve", "999", "--keep", "remote", "--by", "manager"]);
    assert!(!resolve.status.success());
    assert!(String::from_utf8_lossy(&resolve.stderr).contains("conflict 999 not found"), "{resolve:?}");

    // Another data directory configured on the same API port is not shown this node.
    let other = dir.path().join("other");
    init(&other, api_port);
    let wrong = possync().args(["stats", "--data-dir"]).arg(&other).output().unwrap();
    assert!(!wrong.status.success());
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("not this data directory's"), "{wrong:?}");

    let stopped = running.stop();
    assert!(stopped.success(), "{stopped}");
    let log = std::fs::read_to_string(node.join("node.log")).unwrap();
    assert!(log.contains("stopping"), "{log}");
    assert!(!log.contains('\u{1b}'), "no colour codes in a log file");
    // Stopped: status reads the database.
    let status = run(&["status"]);
    assert!(status.status.success());
    assert!(String::from_utf8_lossy(&status.stdout).contains("node not running"));
}

#[test]
fn init_refuses_a_weak_secret_and_generates_a_strong_one() {
    let dir = tempfile::tempdir().unwrap();
    let weak = dir.path().join("weak");
    possync()
        .args(["init", "--secret", "short", "--data-dir"])
        .arg(&weak)
        .assert()
        .failure()
        .stderr(predicate::str::contains("too weak").and(predicate::str::contains("at least 20 characters")));
    assert!(!weak.join("possync.toml").exists() && !weak.join("possync.db").exists(), "nothing written");

    let strong = dir.path().join("strong");
    let output = possync().args(["init", "--data-dir"]).arg(&strong).output().unwrap();
    assert!(output.status.success());
    let stderr = String::from_utf8(output.stderr).unwrap();
    let config = std::fs::read_to_string(strong.join("possync.toml")).unwrap();
    let secret = config
        .lines()
        .find_map(|line| line.strip_prefix("secret = "))
        .map(|value| value.trim_matches('"').to_string())
        .expect("a generated secret in possync.toml");
    assert!(possync_node::config::check_secret(&secret).is_ok(), "{secret}");
    assert!(
        stderr.contains(&secret) && stderr.contains("--secret"),
        "printed once with how to share it: {stderr}"
    );
    assert_eq!(String::from_utf8(output.stdout).unwrap().lines().count(), 1, "stdout stays the posId");
}
