//! Idle connections on the HTTP API (issue 13, item 7): what 1,000 idle sockets cost a node,
//! with the API's limits and without them. Figures in `docs/BENCHMARKS.md`, section "API
//! idle connections".
//!
//! ```text
//! cargo bench -p possync-node --bench api_idle
//! ```
//!
//! `POSSYNC_BENCH_RUNS` (default 3) runs per configuration, interleaved;
//! `POSSYNC_BENCH_SOCKETS` (default 1000) idle sockets.
//!
//! The node runs in a child process (this binary started again with
//! `POSSYNC_API_BENCH_CHILD`), so that its resident memory and open descriptors are its own.
//! The parent opens the idle sockets (TCP connect, then nothing) and reads the child's
//! `/proc/<pid>/status` (VmRSS) and `/proc/<pid>/fd` (open descriptors): before, with the
//! sockets open, and after the idle timeout. "Limits" is the default cap (256) with a 3 s
//! idle timeout (30 s by default, shortened to keep the run short); "no limits" is a cap
//! above the socket count and a one-hour idle timeout, which is what `axum::serve` did.

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

use possync_node::Node;
use possync_node::config::{ApiOptions, NodeConfig};
use possync_store::{DB_FILE, Store, SystemEnvironment};

const IDLE_TIMEOUT: Duration = Duration::from_secs(3);

fn main() {
    if std::env::var("POSSYNC_API_BENCH_CHILD").is_ok() {
        child_node();
        return;
    }
    let runs: usize = std::env::var("POSSYNC_BENCH_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    let sockets: usize =
        std::env::var("POSSYNC_BENCH_SOCKETS").ok().and_then(|v| v.parse().ok()).unwrap_or(1000);
    println!("\n### API idle connections: {sockets} idle sockets on the API port\n");
    let mut rows: Vec<(&str, Vec<Sample>)> =
        vec![("limits (cap 256, idle 3 s)", Vec::new()), ("no limits", Vec::new())];
    for run in 0..runs {
        for (index, limited) in [true, false].into_iter().enumerate() {
            let sample = measure(limited, sockets);
            eprintln!("  run {run} {}: {sample:?}", rows[index].0);
            rows[index].1.push(sample);
        }
    }
    println!(
        "| API | RSS before | RSS with the idle sockets | open descriptors | RSS after the idle timeout | open descriptors after |"
    );
    println!("|---|---|---|---|---|---|");
    for (name, samples) in &rows {
        let median = |pick: fn(&Sample) -> u64| {
            let mut values: Vec<u64> = samples.iter().map(pick).collect();
            values.sort_unstable();
            values[values.len() / 2]
        };
        println!(
            "| {name} | {:.1} MiB | {:.1} MiB | {} | {:.1} MiB | {} |",
            mib(median(|s| s.rss_before)),
            mib(median(|s| s.rss_loaded)),
            median(|s| s.fds_loaded),
            mib(median(|s| s.rss_after)),
            median(|s| s.fds_after),
        );
    }
    println!(
        "\nMedians of {runs} runs. VmRSS and the count of /proc/<pid>/fd of the node's process; \
         the sockets stay open on the client side the whole time."
    );
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// One configuration, once.
#[derive(Debug, Clone, Copy)]
struct Sample {
    rss_before: u64,
    rss_loaded: u64,
    fds_loaded: u64,
    rss_after: u64,
    fds_after: u64,
}

fn measure(limited: bool, sockets: usize) -> Sample {
    let exe = std::env::current_exe().expect("current exe");
    let mut node = Command::new(exe)
        .env("POSSYNC_API_BENCH_CHILD", if limited { "limited" } else { "unlimited" })
        .env("POSSYNC_BENCH_SOCKETS", sockets.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn the node");
    let pid = node.id().to_string();
    let mut out = BufReader::new(node.stdout.take().expect("stdout"));
    let mut line = String::new();
    out.read_line(&mut line).expect("the node's address");
    let address = line.trim().strip_prefix("ADDR ").expect("ADDR line").to_string();
    std::thread::sleep(Duration::from_millis(500));
    let rss_before = rss(&pid);
    let idle: Vec<TcpStream> = (0..sockets).map(|_| TcpStream::connect(&address).expect("connect")).collect();
    std::thread::sleep(Duration::from_secs(1));
    let (rss_loaded, fds_loaded) = (rss(&pid), fds(&pid));
    std::thread::sleep(IDLE_TIMEOUT + Duration::from_secs(2));
    let (rss_after, fds_after) = (rss(&pid), fds(&pid));
    drop(idle);
    drop(node.stdin.take());
    let _ = node.wait();
    Sample { rss_before, rss_loaded, fds_loaded, rss_after, fds_after }
}

fn rss(pid: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|value| value.parse().ok())
        .expect("VmRSS");
    kib * 1024
}

fn fds(pid: &str) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|dir| dir.count() as u64).unwrap_or(0)
}

/// Child: a node with its API on 127.0.0.1, until stdin closes.
fn child_node() {
    let limited = std::env::var("POSSYNC_API_BENCH_CHILD").is_ok_and(|mode| mode == "limited");
    let sockets: usize =
        std::env::var("POSSYNC_BENCH_SOCKETS").ok().and_then(|v| v.parse().ok()).unwrap_or(1000);
    let api = if limited {
        ApiOptions { idle_timeout: IDLE_TIMEOUT, ..ApiOptions::default() }
    } else {
        ApiOptions {
            max_connections: sockets * 2,
            idle_timeout: Duration::from_secs(3600),
            header_timeout: Duration::from_secs(3600),
            ..ApiOptions::default()
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    runtime.block_on(async move {
        let dir = tempfile::tempdir().expect("tempdir");
        let store =
            Store::init(&dir.path().join(DB_FILE), None, "api bench", Box::new(SystemEnvironment::default()))
                .expect("init store");
        let config = NodeConfig {
            data_dir: dir.path().to_path_buf(),
            peer_listen: "127.0.0.1:0".parse().expect("address"),
            api_listen: Some("127.0.0.1:0".parse().expect("address")),
            static_peers: Vec::new(),
            discovery: false,
            secret: "api bench secret".into(),
            api_token: "bench".into(),
            max_connections: 16,
            max_frame_bytes: 1024 * 1024,
            backoff_base_ms: 5_000,
            chain: None,
            api,
        };
        let node = Node::start_with_store(config, store).await.expect("start node");
        println!("ADDR {}", node.api_addr.expect("the API listens"));
        // Until the parent closes stdin.
        tokio::task::spawn_blocking(|| {
            let mut sink = String::new();
            let _ = std::io::stdin().read_line(&mut sink);
        })
        .await
        .expect("stdin");
        node.shutdown().await;
    });
}
