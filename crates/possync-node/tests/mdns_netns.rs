//! mDNS discovery between two nodes, each in its own network namespace joined by a veth
//! pair that this test creates (10.231.0.1/24 and 10.231.0.2/24, inside the namespaces only),
//! so that multicast never touches the machine's real interfaces.
//!
//! The test re-runs its own binary inside each namespace (`ip netns exec NS <this test>`)
//! with `POSSYNC_NETNS_CHILD` set: the child starts an in-process node with discovery ON and
//! no static peer, writes a product and waits for the other node's.
//!
//! Needs root and `ip` (iproute2). Without them it prints a loud `SKIPPED` line and passes.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use possync_node::Node;
use possync_node::config::NodeConfig;
use possync_store::{Store, SystemEnvironment};

const CHILD_ENV: &str = "POSSYNC_NETNS_CHILD";
const TEST_NAME: &str = "two_nodes_in_separate_namespaces_find_each_other_by_mdns";

/// Deletes the namespaces (and with them the veth pair) however the test ends.
struct Namespaces(Vec<String>);

impl Drop for Namespaces {
    fn drop(&mut self) {
        for namespace in &self.0 {
            let _ = Command::new("ip").args(["netns", "del", namespace]).status();
        }
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    let output =
        Command::new("ip").args(args).output().map_err(|err| format!("ip {}: {err}", args.join(" ")))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&output.stderr).trim()))
    }
}

/// Creates both namespaces and the veth pair between them.
fn set_up(namespaces: &mut Namespaces, tag: &str) -> Result<[String; 2], String> {
    let names = [format!("possync-{tag}-a"), format!("possync-{tag}-b")];
    let veths = [format!("psa{tag}"), format!("psb{tag}")];
    for name in &names {
        ip(&["netns", "add", name])?;
        namespaces.0.push(name.clone());
    }
    // Created inside the first namespace, so it never exists in the root one.
    ip(&[
        "-n", &names[0], "link", "add", &veths[0], "type", "veth", "peer", "name", &veths[1], "netns",
        &names[1],
    ])?;
    for (i, (name, veth)) in names.iter().zip(&veths).enumerate() {
        let address = format!("10.231.0.{}/24", i + 1);
        ip(&["-n", name, "addr", "add", &address, "dev", veth])?;
        ip(&["-n", name, "link", "set", veth, "up", "multicast", "on"])?;
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        ip(&["-n", name, "route", "add", "224.0.0.0/4", "dev", veth])?;
    }
    Ok(names)
}

#[test]
fn two_nodes_in_separate_namespaces_find_each_other_by_mdns() {
    if std::env::var_os(CHILD_ENV).is_some() {
        child();
        return;
    }
    let tag = format!("{}", std::process::id() % 100_000);
    let mut namespaces = Namespaces(Vec::new());
    let names = match set_up(&mut namespaces, &tag) {
        Ok(names) => names,
        Err(reason) => {
            drop(namespaces);
            println!("\n*** SKIPPED: cannot create network namespaces: {reason} ***\n");
            eprintln!("\n*** SKIPPED: cannot create network namespaces: {reason} ***\n");
            return;
        }
    };
    let exe = std::env::current_exe().expect("the test binary");
    let root = tempfile::tempdir().unwrap();
    let mut children = Vec::new();
    for (i, namespace) in names.iter().enumerate() {
        let dir = root.path().join(format!("node{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", namespace])
            .arg(&exe)
            .args(["--exact", TEST_NAME, "--nocapture", "--test-threads", "1"])
            .env(CHILD_ENV, "1")
            .env("POSSYNC_NETNS_DIR", &dir)
            .env("POSSYNC_NETNS_ME", format!("p-node{i}"))
            .env("POSSYNC_NETNS_OTHER", format!("p-node{}", 1 - i))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("ip netns exec");
        children.push(child);
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut outputs = Vec::new();
    for mut child in children {
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        outputs.push(child.wait_with_output().unwrap());
    }
    drop(namespaces);
    for output in &outputs {
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success() && stdout.contains("FOUND THE OTHER NODE BY MDNS"),
            "child failed: {}\n{stdout}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

/// Inside a namespace: one node, discovery on, no static peer.
fn child() {
    let dir = std::path::PathBuf::from(std::env::var("POSSYNC_NETNS_DIR").unwrap());
    let me = std::env::var("POSSYNC_NETNS_ME").unwrap();
    let other = std::env::var("POSSYNC_NETNS_OTHER").unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(async {
        let store =
            Store::init(&dir.join(possync_store::DB_FILE), None, &me, Box::new(SystemEnvironment::default()))
                .unwrap();
        let config = NodeConfig {
            data_dir: dir.clone(),
            peer_listen: "0.0.0.0:0".parse().unwrap(),
            api_listen: None,
            static_peers: Vec::new(),
            discovery: true,
            secret: common::SECRET.into(),
            api_token: "token".into(),
            max_connections: 16,
            max_frame_bytes: 1 << 20,
            backoff_base_ms: 500,
            chain: None,
            api: Default::default(),
        };
        let node = Node::start_with_store(config, store).await.unwrap();
        let body = serde_json::json!({"id": me, "sku": me, "name": me, "price": "1.00"});
        node.shared
            .writer
            .call(possync_node::writer::Priority::Local, move |store| {
                store.create_record(possync_core::EntityKind::Product, &body)
            })
            .await
            .unwrap()
            .unwrap();
        let started = Instant::now();
        loop {
            let other = common::id(&other);
            let found = node
                .shared
                .readers
                .with(move |reader| reader.record(possync_core::EntityKind::Product, &other))
                .await
                .unwrap();
            if found.is_some() && node.shared.peers.connected() == 1 {
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(90), "{me} never found the other node");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        println!("{me}: FOUND THE OTHER NODE BY MDNS");
        // Let the other side finish too before going away.
        tokio::time::sleep(Duration::from_secs(3)).await;
        node.shutdown().await;
    });
}
