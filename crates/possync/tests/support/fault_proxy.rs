//! A fault-injecting TCP proxy between the tills of the broken-network test.
//!
//! This kernel has no `sch_netem`, so latency, jitter, stalls and a mangled byte stream
//! cannot be made with `tc`; no well-kept proxy (toxiproxy and the like) installs here from
//! the registries this machine reaches. So the test puts this one between the tills: it runs
//! on a thread of the test process that has entered the hub's network namespace, and every
//! connection between two tills goes through it.
//!
//! Addressing: till `p` is reached at `alias(p)`, an address of the hub's bridge. A
//! connection that till `q` opens to `alias(p)` is carried on to `till(p)` from the source
//! address `alias(q)`; so each till sees its peer `q` as `alias(q)`, and an iptables rule
//! on `alias(q)` still cuts exactly that peer.
//!
//! Faults are set per direction of the byte stream (sender till, receiver till) and apply
//! to every connection between the two, open or opened later:
//! - latency and jitter: each chunk is held `latency + random(0..=jitter)` ms, in order
//!   (a chunk never overtakes the one before it);
//! - stall: nothing is read or forwarded (the TCP connection stays up, its buffers fill);
//! - mangling: a chunk, now and then, is sent twice or swapped with the next one, what a
//!   broken middlebox does to a stream. Duplication and reordering of *packets* never reach
//!   the nodes (the kernel's TCP puts the stream back together), so this is where they can
//!   hurt: the secure channel must refuse the stream and drop the connection, never apply it.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// The faults on one direction of the stream between two tills.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DirectionFaults {
    /// Every chunk is held this long (ms)...
    pub latency_ms: u64,
    /// ...plus a random 0 to this (ms).
    pub jitter_ms: u64,
    /// Nothing flows.
    pub stalled: bool,
    /// Chunks in a thousand sent twice or swapped with the next one.
    pub mangle_per_mille: u32,
}

/// What the proxy did, for the test's figures and checks.
#[derive(Debug, Default)]
pub struct ProxyStats {
    /// Connections carried.
    pub connections: AtomicU64,
    /// Chunks forwarded.
    pub chunks: AtomicU64,
    /// Chunks held by a latency (with or without jitter).
    pub delayed: AtomicU64,
    /// Chunks sent twice.
    pub duplicated: AtomicU64,
    /// Chunks swapped with the next one.
    pub reordered: AtomicU64,
    /// Connections mangled at least once.
    pub mangled_connections: AtomicU64,
    /// Of those, the ones that ended (a mangled stream must not go on).
    pub mangled_closed: AtomicU64,
}

impl ProxyStats {
    /// Mangled connections still carried.
    pub fn mangled_open(&self) -> u64 {
        self.mangled_connections.load(Ordering::Acquire) - self.mangled_closed.load(Ordering::Acquire)
    }
}

/// Where the tills and their aliases live.
#[derive(Debug, Clone, Copy)]
pub struct Addressing {
    /// How many tills.
    pub tills: usize,
    /// The port every till listens on.
    pub port: u16,
    /// Till `n`'s own address.
    pub till: fn(usize) -> Ipv4Addr,
    /// The hub's address standing for till `n`.
    pub alias: fn(usize) -> Ipv4Addr,
}

type FaultTable = Arc<Mutex<HashMap<(usize, usize), DirectionFaults>>>;

/// The running proxy; stopped (its connections dropped) when dropped.
pub struct FaultProxy {
    faults: FaultTable,
    stats: Arc<ProxyStats>,
    stop: watch::Sender<bool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FaultProxy {
    /// Starts the proxy inside the network namespace `netns` (a name `ip netns` made),
    /// listening on every alias. `seed` drives the jitter and the mangling.
    pub fn start(netns: &str, addressing: Addressing, seed: u64) -> Result<FaultProxy, String> {
        let faults: FaultTable = Arc::default();
        let stats = Arc::new(ProxyStats::default());
        let (stop, stopped) = watch::channel(false);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
        let namespace = std::fs::File::open(format!("/var/run/netns/{netns}"))
            .map_err(|err| format!("opening the namespace {netns}: {err}"))?;
        let thread = {
            let faults = Arc::clone(&faults);
            let stats = Arc::clone(&stats);
            std::thread::Builder::new()
                .name("fault-proxy".into())
                .spawn(move || {
                    // SAFETY: `setns` moves only this thread into the namespace, through a
                    // descriptor that stays open for the call; every socket the proxy opens
                    // is opened on this thread (a current-thread runtime, no other workers).
                    let entered = unsafe { libc::setns(namespace.as_raw_fd(), libc::CLONE_NEWNET) };
                    if entered != 0 {
                        let _ = ready_tx.send(Err(format!("setns: {}", std::io::Error::last_os_error())));
                        return;
                    }
                    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                        Ok(runtime) => runtime,
                        Err(err) => {
                            let _ = ready_tx.send(Err(format!("runtime: {err}")));
                            return;
                        }
                    };
                    runtime.block_on(serve(addressing, faults, stats, seed, stopped, ready_tx));
                })
                .map_err(|err| format!("proxy thread: {err}"))?
        };
        match ready_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => Ok(FaultProxy { faults, stats, stop, thread: Some(thread) }),
            Ok(Err(err)) => Err(err),
            Err(_) => Err("the proxy did not start".into()),
        }
    }

    /// Sets the faults from `sender` to `receiver`.
    pub fn set(&self, sender: usize, receiver: usize, faults: DirectionFaults) {
        self.faults.lock().expect("fault table").insert((sender, receiver), faults);
    }

    /// Sets the same faults on every direction between every two tills.
    pub fn set_all(&self, tills: usize, faults: DirectionFaults) {
        for sender in 0..tills {
            for receiver in (0..tills).filter(|receiver| *receiver != sender) {
                self.set(sender, receiver, faults);
            }
        }
    }

    /// No fault anywhere.
    pub fn heal(&self) {
        self.faults.lock().expect("fault table").clear();
    }

    /// What it did so far.
    pub fn stats(&self) -> &ProxyStats {
        &self.stats
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn serve(
    addressing: Addressing,
    faults: FaultTable,
    stats: Arc<ProxyStats>,
    seed: u64,
    mut stopped: watch::Receiver<bool>,
    ready: std::sync::mpsc::Sender<Result<(), String>>,
) {
    let mut listeners = Vec::new();
    for receiver in 0..addressing.tills {
        let address = SocketAddr::V4(SocketAddrV4::new((addressing.alias)(receiver), addressing.port));
        match TcpListener::bind(address).await {
            Ok(listener) => listeners.push((receiver, listener)),
            Err(err) => {
                let _ = ready.send(Err(format!("listening on {address}: {err}")));
                return;
            }
        }
    }
    let _ = ready.send(Ok(()));
    let mut tasks = tokio::task::JoinSet::new();
    for (receiver, listener) in listeners {
        let faults = Arc::clone(&faults);
        let stats = Arc::clone(&stats);
        tasks.spawn(async move {
            let mut connection = 0u64;
            while let Ok((client, from)) = listener.accept().await {
                let Some(sender) = (0..addressing.tills).find(|till| from.ip() == (addressing.till)(*till))
                else {
                    continue;
                };
                connection += 1;
                let rng = SmallRng::seed_from_u64(
                    seed ^ (receiver as u64) << 40 ^ (sender as u64) << 32 ^ connection,
                );
                tokio::spawn(carry(
                    addressing,
                    sender,
                    receiver,
                    client,
                    Arc::clone(&faults),
                    Arc::clone(&stats),
                    rng,
                ));
            }
        });
    }
    let _ = stopped.wait_for(|stop| *stop).await;
}

/// One connection from `sender` to `receiver`, carried both ways until either end closes.
async fn carry(
    addressing: Addressing,
    sender: usize,
    receiver: usize,
    client: TcpStream,
    faults: FaultTable,
    stats: Arc<ProxyStats>,
    mut rng: SmallRng,
) {
    let Ok(socket) = TcpSocket::new_v4() else { return };
    if socket.bind(SocketAddr::V4(SocketAddrV4::new((addressing.alias)(sender), 0))).is_err() {
        return;
    }
    let target = SocketAddr::V4(SocketAddrV4::new((addressing.till)(receiver), addressing.port));
    let Ok(Ok(server)) = tokio::time::timeout(Duration::from_secs(5), socket.connect(target)).await else {
        return;
    };
    stats.connections.fetch_add(1, Ordering::Relaxed);
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let other_seed = rng.random();
    let connection = Connection { faults: &faults, stats: &stats, mangled: AtomicBool::new(false) };
    let forth = connection.pump((sender, receiver), client_read, server_write, rng);
    let back =
        connection.pump((receiver, sender), server_read, client_write, SmallRng::seed_from_u64(other_seed));
    // Either direction ending (a close, a reset) ends the connection.
    tokio::select! {
        () = forth => {}
        () = back => {}
    }
    if connection.mangled.load(Ordering::Acquire) {
        stats.mangled_closed.fetch_add(1, Ordering::AcqRel);
    }
}

/// What both directions of one carried connection share.
struct Connection<'a> {
    faults: &'a FaultTable,
    stats: &'a ProxyStats,
    /// Either direction was mangled.
    mangled: AtomicBool,
}

impl Connection<'_> {
    /// One direction, (sender, receiver): reads chunks, holds them by the direction's faults,
    /// writes them in order.
    async fn pump(
        &self,
        direction: (usize, usize),
        mut from: tokio::net::tcp::OwnedReadHalf,
        mut to: tokio::net::tcp::OwnedWriteHalf,
        mut rng: SmallRng,
    ) {
        let Connection { faults, stats, mangled } = self;
        let current = || {
            faults.lock().map(|table| table.get(&direction).copied().unwrap_or_default()).unwrap_or_default()
        };
        let (queue, mut queued) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
        let read = async move {
            let mut buffer = vec![0u8; 16 * 1024];
            let mut last_release = Instant::now();
            let mut held: Option<Vec<u8>> = None;
            loop {
                while current().stalled {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                let read = match from.read(&mut buffer).await {
                    Ok(0) | Err(_) => break,
                    Ok(read) => read,
                };
                let faults = current();
                let delay = faults.latency_ms
                    + if faults.jitter_ms > 0 { rng.random_range(0..=faults.jitter_ms) } else { 0 };
                if delay > 0 {
                    stats.delayed.fetch_add(1, Ordering::Relaxed);
                }
                // In order: a chunk is never released before the one read before it.
                last_release = last_release.max(Instant::now() + Duration::from_millis(delay));
                let chunk = buffer[..read].to_vec();
                let mut out = Vec::with_capacity(3);
                if faults.mangle_per_mille > 0 && rng.random_range(0..1000) < faults.mangle_per_mille {
                    if !mangled.swap(true, Ordering::AcqRel) {
                        stats.mangled_connections.fetch_add(1, Ordering::AcqRel);
                    }
                    if rng.random_bool(0.5) {
                        stats.duplicated.fetch_add(1, Ordering::Relaxed);
                        out.push(chunk.clone());
                        out.push(chunk);
                    } else if held.is_none() {
                        // Swapped with the next chunk: sent after it.
                        stats.reordered.fetch_add(1, Ordering::Relaxed);
                        held = Some(chunk);
                    } else {
                        out.push(chunk);
                    }
                } else {
                    out.push(chunk);
                    out.extend(held.take());
                }
                for chunk in out {
                    if queue.send((last_release, chunk)).is_err() {
                        return;
                    }
                }
            }
        };
        let write = async move {
            while let Some((release, chunk)) = queued.recv().await {
                tokio::time::sleep_until(release).await;
                while current().stalled {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                if to.write_all(&chunk).await.is_err() {
                    return;
                }
                stats.chunks.fetch_add(1, Ordering::Relaxed);
            }
            let _ = to.shutdown().await;
        };
        // The writer drains what was read before the reader's end, then closes its side.
        tokio::join!(read, write);
    }
}
