//! The sync engine of one connection ([`Link`]) with no sockets, threads or clocks: two
//! real stores, one link at each end, frames moved by hand, effects carried out by the test
//! on virtual time. What the connection task does with each effect against the node, the
//! test does against the stores here, so every decision the link makes is checked exactly.

use std::collections::{BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use possync_core::protocol::Role;
use possync_core::{EntityKind, PosId, VersionVector};
use possync_node::link::{Effect, Ended, Link, LinkConfig, Metric};
use possync_node::peers::Registration;
use possync_node::transport::TransportError;
use possync_store::{ConnectionEvent, ConnectionEventKind, Environment, PeerRef, Store};
use serde_json::json;

/// Start of virtual time.
const T0: u64 = 1_763_892_300_000;

struct VirtualEnv {
    now: Arc<AtomicU64>,
    seed: u8,
}

impl Environment for VirtualEnv {
    fn now_ms(&self) -> u64 {
        self.now.load(Ordering::SeqCst)
    }

    fn random_bytes(&mut self) -> [u8; 10] {
        self.seed = self.seed.wrapping_add(1);
        [self.seed; 10]
    }
}

/// One end: a till's store, its link, and what the test saw of the link's effects.
struct End {
    store: Store,
    link: Link,
    /// Rows the link asked to record.
    rows: Vec<ConnectionEvent>,
    metrics: Vec<Metric>,
    /// Changes admitted against the live budget.
    admitted: usize,
    /// Applies asked for and not answered yet, when the test holds them.
    held: VecDeque<(Vec<possync_core::protocol::StampedChange>, bool)>,
    hold_applies: bool,
    /// Each apply asked for: (changes, live).
    applies: Vec<(usize, bool)>,
    registration: Registration,
    /// The link asked the peer for this till's own history.
    fetched_own_history: bool,
}

struct Pair {
    now: Arc<AtomicU64>,
    a: End,
    b: End,
    _dir: tempfile::TempDir,
}

fn pos(id: &str) -> PosId {
    PosId::parse(id).expect("valid posId")
}

fn end(dir: &tempfile::TempDir, now: &Arc<AtomicU64>, id: &str, role: Role, seed: u8) -> (Store, LinkConfig) {
    let env = Box::new(VirtualEnv { now: Arc::clone(now), seed });
    let store = Store::init(&dir.path().join(format!("{id}.db")), Some(pos(id)), id, env).expect("init");
    let (summary, heads) = store.summary_with_heads().expect("heads");
    let address: SocketAddr = "127.0.0.1:7777".parse().expect("address");
    let config = LinkConfig {
        pos_id: pos(id),
        pos_name: format!("Till {id}"),
        instance: format!("instance-{id}"),
        role,
        address,
        summary,
        heads,
        own_origins: Vec::new(),
    };
    (store, config)
}

impl End {
    fn new(store: Store, config: LinkConfig, now: u64) -> End {
        let settings = store.settings().clone();
        End {
            link: Link::new(config, &settings, now),
            store,
            rows: Vec::new(),
            metrics: Vec::new(),
            admitted: 0,
            held: VecDeque::new(),
            hold_applies: false,
            applies: Vec::new(),
            registration: Registration::New,
            fetched_own_history: false,
        }
    }

    fn kinds(&self) -> Vec<ConnectionEventKind> {
        self.rows.iter().map(|row| row.kind).collect()
    }

    /// Carries out the link's effects as the connection task does. True if there were any.
    fn carry_out(&mut self, now: u64) -> bool {
        let mut any = self.link.process_events(now);
        while let Some(effect) = self.link.poll_effect() {
            any = true;
            match effect {
                Effect::Register(info) => {
                    let ours = self.store.summary().clone();
                    self.link.own_changes_held(&info, &ours);
                    let diverged = self
                        .store
                        .reader()
                        .expect("reader")
                        .diverged_heads(&info.summary, &info.heads)
                        .expect("heads");
                    self.link.diverged_heads(&info, diverged);
                    let neighbors = Arc::new(BTreeSet::new());
                    self.link.registered(now, &info, self.registration.clone(), neighbors);
                }
                Effect::SelectBatch { since, after_cursor, limit } => {
                    let selection = self
                        .store
                        .reader()
                        .expect("reader")
                        .select_changes(&since, after_cursor, limit)
                        .expect("select");
                    self.link.batch_selected(selection.changes, selection.next_cursor, selection.has_more);
                }
                Effect::Admit { changes } => self.admitted += changes,
                Effect::Apply { changes, live } => {
                    self.applies.push((changes.len(), live));
                    self.held.push_back((changes, live));
                    if !self.hold_applies {
                        self.answer_apply(now);
                    }
                }
                Effect::FetchOwnHistory { origin } => {
                    let lowered = self
                        .store
                        .summary()
                        .iter()
                        .filter(|(held, _)| **held != origin)
                        .map(|(held, seq)| (held.clone(), seq))
                        .collect();
                    self.fetched_own_history = true;
                    self.link.request_sync(lowered);
                }
                Effect::Record(row) => self.rows.push(row),
                Effect::Count(metric) => self.metrics.push(metric),
                Effect::LogRefused { .. } | Effect::LogFork { .. } | Effect::Behind(_) => {}
            }
        }
        any
    }

    /// Applies the oldest apply asked for and answers the link.
    fn answer_apply(&mut self, now: u64) {
        let Some((changes, _)) = self.held.pop_front() else { return };
        let peer = self.link.peer().cloned().expect("applies come after the handshake");
        let report = self
            .store
            .apply_stamped(PeerRef { id: peer.id.as_str(), name: &peer.name }, changes, None)
            .expect("apply");
        let summary = self.store.summary().clone();
        self.link.applied(now, Some(report.into_batch_applied(summary)));
        // What the apply wrote goes to every connection, as the writer broadcasts it (the
        // session drops what the peer holds already).
        self.broadcast();
    }

    /// Sends what this till wrote since the last call on the link, as the writer's
    /// broadcast does.
    fn broadcast(&mut self) {
        for outgoing in self.store.drain_outbox() {
            self.link.local_change(&outgoing.change);
        }
    }
}

impl Pair {
    /// Till "AAAA" (dialling) and till "BBBB" (answering), `products` written on A first.
    fn new(products: usize) -> Pair {
        let dir = tempfile::tempdir().expect("tempdir");
        let now = Arc::new(AtomicU64::new(T0));
        let (mut store_a, _) = end(&dir, &now, "AAAA", Role::Initiator, 1);
        for i in 0..products {
            store_a
                .create_record(
                    EntityKind::Product,
                    &json!({"sku": format!("P{i}"), "name": format!("Product {i}"), "price": "1.50"}),
                )
                .expect("product");
        }
        store_a.drain_outbox();
        let (summary, heads) = store_a.summary_with_heads().expect("heads");
        let config_a = LinkConfig {
            pos_id: pos("AAAA"),
            pos_name: "Till AAAA".into(),
            instance: "instance-AAAA".into(),
            role: Role::Initiator,
            address: "127.0.0.1:7777".parse().expect("address"),
            summary,
            heads,
            own_origins: Vec::new(),
        };
        let (store_b, config_b) = end(&dir, &now, "BBBB", Role::Responder, 2);
        Pair { a: End::new(store_a, config_a, T0), b: End::new(store_b, config_b, T0), now, _dir: dir }
    }

    fn now(&self) -> u64 {
        self.now.load(Ordering::SeqCst)
    }

    fn advance(&self, ms: u64) {
        self.now.fetch_add(ms, Ordering::SeqCst);
    }

    /// Moves frames both ways and carries out effects until nothing moves (at most `turns`).
    fn settle(&mut self, turns: usize) {
        for _ in 0..turns {
            let now = self.now();
            let mut moved = self.a.carry_out(now) | self.b.carry_out(now);
            while let Some(frame) = self.a.link.poll_transmit() {
                moved = true;
                self.b.link.handle_frame(now, &frame);
            }
            while let Some(frame) = self.b.link.poll_transmit() {
                moved = true;
                self.a.link.handle_frame(now, &frame);
            }
            // A closed end's last frames are out: the socket closes under the other end.
            if self.a.link.is_closed() && !self.b.link.is_closed() {
                moved = true;
                self.b.link.peer_closed();
            }
            if self.b.link.is_closed() && !self.a.link.is_closed() {
                moved = true;
                self.a.link.peer_closed();
            }
            if !moved {
                return;
            }
        }
    }

    fn summaries(&self) -> (VersionVector, VersionVector) {
        (self.a.store.summary().clone(), self.b.store.summary().clone())
    }
}

#[test]
fn a_first_connection_is_logged_on_both_ends_and_the_catch_up_completes() {
    let mut pair = Pair::new(7);
    pair.settle(200);
    assert!(pair.a.link.is_registered() && pair.b.link.is_registered());
    let (a, b) = pair.summaries();
    assert_eq!(a, b, "B caught up with A's catalog");
    assert_eq!(
        pair.b.store.reader().expect("reader").canonical_dump().ok(),
        pair.a.store.reader().expect("reader").canonical_dump().ok()
    );
    assert_eq!(pair.a.kinds().first(), Some(&ConnectionEventKind::Connected));
    assert!(pair.b.kinds().contains(&ConnectionEventKind::Connected));
    assert!(
        pair.b.kinds().contains(&ConnectionEventKind::SyncCompleted),
        "B logged its catch-up: {:?}",
        pair.b.kinds()
    );
    assert!(pair.b.metrics.iter().any(|metric| matches!(metric, Metric::CatchUp { .. })));
    // Catch-up batches are asked for, not pushed: nothing was taken from a live budget.
    assert_eq!(pair.b.admitted, 0);
    assert!(pair.b.applies.iter().all(|(_, live)| !live));
    // Only `disconnected` rows carry counters.
    assert!(pair.b.rows.iter().all(|row| row.messages_received == 0));
}

#[test]
fn live_changes_that_arrive_during_an_apply_go_next_as_one_run() {
    let mut pair = Pair::new(1);
    pair.settle(200);
    assert!(pair.b.link.is_registered());
    pair.b.applies.clear();
    pair.b.hold_applies = true;
    let write = |pair: &mut Pair, sku: &str| {
        pair.a
            .store
            .create_record(EntityKind::Product, &json!({"sku": sku, "name": sku, "price": "2.00"}))
            .expect("product");
        pair.a.broadcast();
    };
    write(&mut pair, "L1");
    pair.settle(20);
    assert_eq!(pair.b.applies, vec![(1, true)], "the first live change goes to the writer at once");
    // Three more arrive while it is applied: they wait, then go as one run.
    for sku in ["L2", "L3", "L4"] {
        write(&mut pair, sku);
        pair.settle(20);
    }
    assert_eq!(pair.b.applies.len(), 1, "nothing else while one apply is in flight");
    assert_eq!(pair.b.admitted, 4, "every live change is taken from the peer's budget");
    let now = pair.now();
    pair.b.answer_apply(now);
    pair.settle(20);
    assert_eq!(pair.b.applies, vec![(1, true), (3, true)]);
    pair.b.hold_applies = false;
    let now = pair.now();
    pair.b.answer_apply(now);
    pair.settle(50);
    let (a, b) = pair.summaries();
    assert_eq!(a, b);
    assert!(
        pair.b.link.is_registered() && !pair.b.link.is_closed(),
        "three answers for three Apply events: no violation"
    );
}

#[test]
fn a_duplicate_registration_closes_the_connection_without_a_row() {
    let mut pair = Pair::new(1);
    pair.b.registration = Registration::Duplicate;
    pair.settle(200);
    assert!(pair.b.link.is_closed());
    assert!(!pair.b.link.is_registered());
    assert_eq!(pair.b.link.ended(), Ended::Duplicate(pos("AAAA")));
    assert!(pair.b.rows.is_empty(), "a duplicate is no connection: {:?}", pair.b.kinds());
    assert_eq!(pair.b.link.disconnected_row(pair.now()), None);
    // A, told it lost the tie-break, ends as a duplicate too and logs no disconnection.
    assert!(pair.a.link.is_closed());
    assert_eq!(pair.a.link.ended(), Ended::Duplicate(pos("BBBB")));
    assert!(pair.a.link.superseded_at().is_some());
}

#[test]
fn a_continued_link_logs_no_reconnection() {
    let mut pair = Pair::new(1);
    pair.b.registration = Registration::Continued;
    pair.settle(200);
    assert!(pair.b.link.is_registered());
    assert!(!pair.b.kinds().contains(&ConnectionEventKind::Connected));
    assert!(!pair.b.kinds().contains(&ConnectionEventKind::Reconnected));
}

#[test]
fn a_stalled_catch_up_is_logged_once_and_asked_again() {
    let mut pair = Pair::new(5);
    // B never gets A's changes: its applies are held and never answered.
    pair.b.hold_applies = true;
    pair.settle(200);
    assert!(pair.b.link.is_registered());
    let held = pair.b.store.summary().clone();
    pair.b.link.observe_progress(pair.now(), &held);
    // Two heartbeat periods (30 s by default) without progress make a stall.
    pair.advance(61_000);
    pair.b.link.observe_progress(pair.now(), &held);
    pair.advance(5_000);
    pair.b.link.observe_progress(pair.now(), &held);
    pair.b.carry_out(pair.now());
    let stalls: Vec<&ConnectionEvent> =
        pair.b.rows.iter().filter(|row| row.kind == ConnectionEventKind::SyncFailed).collect();
    assert_eq!(stalls.len(), 1, "{:?}", pair.b.kinds());
    let message = stalls[0].error_message.as_deref().unwrap_or_default();
    assert!(message.starts_with("catch-up stalled: 6 changes"), "{message}");
    assert_eq!(pair.b.metrics.iter().filter(|metric| **metric == Metric::SyncStall).count(), 1);
    assert!(pair.b.link.poll_transmit().is_some(), "the stall asks the peer again");
}

#[test]
fn a_stream_the_secure_channel_refuses_ends_the_link_with_a_sync_failed_row_saying_why() {
    let mut pair = Pair::new(2);
    pair.settle(200);
    assert!(pair.b.link.is_registered());
    let rows_before = pair.b.rows.len();
    // A chunk of A's stream duplicated on the way: the next transport message fails to
    // authenticate.
    pair.b.link.receive_failed(pair.now(), &TransportError::Decrypt);
    pair.b.carry_out(pair.now());
    assert!(pair.b.link.is_closed());
    let refused: Vec<&ConnectionEvent> =
        pair.b.rows[rows_before..].iter().filter(|row| row.kind == ConnectionEventKind::SyncFailed).collect();
    assert_eq!(refused.len(), 1, "{:?}", pair.b.kinds());
    assert_eq!(refused[0].peer_id, "AAAA");
    let message = refused[0].error_message.as_deref().unwrap_or_default();
    assert!(
        message.starts_with("the secure channel refused the peer's stream (transport message rejected"),
        "{message}"
    );
    // A connection that only ends (reset, closed) is a disconnection, not a failure.
    let mut other = Pair::new(2);
    other.settle(200);
    let rows_before = other.b.rows.len();
    other.b.link.receive_failed(other.now(), &TransportError::Io(std::io::ErrorKind::ConnectionReset.into()));
    other.b.carry_out(other.now());
    assert!(other.b.link.is_closed());
    assert!(
        other.b.rows[rows_before..].iter().all(|row| row.kind != ConnectionEventKind::SyncFailed),
        "{:?}",
        other.b.kinds()
    );
}

#[test]
fn turning_p2p_off_closes_the_link_and_its_end_is_a_disconnection_with_the_counters() {
    let mut pair = Pair::new(3);
    pair.settle(200);
    let mut settings = pair.b.store.settings().clone();
    settings.enabled = false;
    pair.b.link.settings_changed(&settings);
    assert!(pair.b.link.is_closed());
    pair.b.carry_out(pair.now());
    assert_eq!(
        pair.b.link.ended(),
        Ended::AfterHandshake { peer: pos("AAAA"), reason: "P2P disabled".into() }
    );
    let row = pair.b.link.disconnected_row(pair.now()).expect("a registered link logs its end");
    assert_eq!(row.kind, ConnectionEventKind::Disconnected);
    assert!(row.messages_received > 0 && row.bytes_received > 0, "{row:?}");
}

#[test]
fn a_restored_till_is_told_a_peer_holds_more_of_its_own_changes() {
    let mut pair = Pair::new(0);
    // B claims in its hello to hold 9 of A's changes; A holds none.
    let info = possync_core::protocol::PeerInfo {
        pos_id: pos("BBBB"),
        pos_name: "Till BBBB".into(),
        summary: [(pos("AAAA"), possync_core::Seq(9))].into_iter().collect(),
        heads: Default::default(),
    };
    let ours = pair.a.store.summary().clone();
    pair.a.link.own_changes_held(&info, &ours);
    pair.a.carry_out(pair.now());
    assert_eq!(pair.a.metrics, vec![Metric::IdentityClash]);
    let message = pair.a.rows[0].error_message.as_deref().unwrap_or_default();
    assert!(
        message.starts_with("own changes behind: Till BBBB holds this till's changes up to 9"),
        "{message}"
    );
    // Holding as much as the peer says is no alert.
    let info = possync_core::protocol::PeerInfo {
        pos_id: pos("AAAA"),
        pos_name: "Till AAAA".into(),
        summary: [(pos("BBBB"), possync_core::Seq(9))].into_iter().collect(),
        heads: Default::default(),
    };
    let mut level = pair.b.store.summary().clone();
    level.observe(&pos("BBBB"), possync_core::Seq(9));
    pair.b.link.own_changes_held(&info, &level);
    pair.b.carry_out(pair.now());
    assert!(pair.b.metrics.is_empty());
}

/// The link's configuration for `store`'s till, from its current summary and heads.
fn config_for(store: &Store, role: Role) -> LinkConfig {
    let (summary, heads) = store.summary_with_heads().expect("heads");
    let identity = store.identity().clone();
    LinkConfig {
        pos_name: format!("Till {}", identity.pos_id),
        instance: format!("instance-{}-{}", identity.pos_id, summary.get(&identity.pos_id).0),
        pos_id: identity.pos_id,
        role,
        address: "127.0.0.1:7777".parse().expect("address"),
        summary,
        heads,
        own_origins: store.own_origins().to_vec(),
    }
}

/// Connects `a` (dialling) and `b` with a pair of links, runs them until quiet, and gives
/// the stores back with what each end saw.
fn connect(now: &Arc<AtomicU64>, dir: tempfile::TempDir, a: Store, b: Store) -> Pair {
    let t = now.load(Ordering::SeqCst);
    let (config_a, config_b) = (config_for(&a, Role::Initiator), config_for(&b, Role::Responder));
    let mut pair =
        Pair { a: End::new(a, config_a, t), b: End::new(b, config_b, t), now: Arc::clone(now), _dir: dir };
    pair.settle(2_000);
    pair
}

fn product(store: &mut Store, sku: &str) {
    store
        .create_record(EntityKind::Product, &json!({"sku": sku, "name": sku, "price": "3.00"}))
        .expect("product");
}

fn skus(store: &Store) -> Vec<String> {
    let rows =
        store.reader().expect("reader").query_json("SELECT sku FROM products ORDER BY sku").expect("query");
    rows.iter().filter_map(|row| row["sku"].as_str().map(str::to_string)).collect()
}

#[test]
fn a_till_restored_from_a_backup_that_sold_in_between_takes_its_history_back_and_keeps_its_sales() {
    restored_till_recovers(&["X1", "X2"]);
}

#[test]
fn a_restored_till_that_wrote_past_the_peer_serves_none_of_its_branch_under_its_old_origin() {
    // Found by `network.rs`'s restored-till test on a loaded machine: the restored till had
    // written past what the peer held (its change 7 on the new branch, where the peer holds
    // 6 on the old one), and the peer's catch-up request was answered before the till took
    // its history back: the peer received the branch's 7 under the old origin and kept it (a
    // fork the tills never agreed on). Here the catch-up request is always answered first.
    restored_till_recovers(&["X1", "X2", "X3"]);
}

/// A till with 3 products, backed up, 2 more products seen by the peer, then restored from
/// the backup and selling `in_between` before it meets the peer again.
fn restored_till_recovers(in_between: &[&str]) {
    let dir = tempfile::tempdir().expect("tempdir");
    let now = Arc::new(AtomicU64::new(T0));
    let env = |seed| Box::new(VirtualEnv { now: Arc::clone(&now), seed });
    let path_a = dir.path().join("AAAA.db");
    let mut a = Store::init(&path_a, Some(pos("AAAA")), "AAAA", env(1)).expect("init A");
    let b = Store::init(&dir.path().join("BBBB.db"), Some(pos("BBBB")), "BBBB", env(2)).expect("init B");
    for sku in ["P1", "P2", "P3"] {
        product(&mut a, sku);
    }
    a.drain_outbox();
    let pair = connect(&now, dir, a, b);
    let (a, b, dir) = (pair.a.store, pair.b.store, pair._dir);
    assert_eq!(b.summary().get(&pos("AAAA")), possync_core::Seq(4), "B took A's enrollment and 3 products");

    // The backup, taken now.
    drop(a);
    let backup = dir.path().join("AAAA-backup.db");
    std::fs::copy(&path_a, &backup).expect("backup");
    let mut a = Store::open(&path_a, env(3)).expect("reopen A");
    now.fetch_add(60_000, Ordering::SeqCst);
    for sku in ["P4", "P5"] {
        product(&mut a, sku);
    }
    a.drain_outbox();
    let pair = connect(&now, dir, a, b);
    let (a, b, dir) = (pair.a.store, pair.b.store, pair._dir);
    assert_eq!(b.summary().get(&pos("AAAA")), possync_core::Seq(6));

    // The disk dies; the backup comes back; the till sells before it meets a peer: its
    // changes 5 and 6 again, with other content.
    drop(a);
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path_a.display()));
    }
    std::fs::copy(&backup, &path_a).expect("restore");
    let mut a = Store::open(&path_a, env(4)).expect("reopen restored A");
    assert_eq!(a.summary().get(&pos("AAAA")), possync_core::Seq(4));
    now.fetch_add(60_000, Ordering::SeqCst);
    for sku in in_between {
        product(&mut a, sku);
    }
    a.drain_outbox();

    let mut pair = connect(&now, dir, a, b);
    pair.a.broadcast();
    pair.settle(2_000);
    assert!(pair.a.fetched_own_history, "the link asked the peer for the till's own history");
    let diverged = pair.a.rows.iter().filter_map(|row| row.error_message.as_deref()).any(|message| {
        message.starts_with("own history diverged") || message.starts_with("own changes behind")
    });
    assert!(diverged, "{:?}", pair.a.rows);
    assert_eq!(pair.a.store.writing_origin().as_str(), "AAAA-r1", "the till writes as a new origin");
    let mut everything: Vec<String> = ["P1", "P2", "P3", "P4", "P5"].map(str::to_string).to_vec();
    everything.extend(in_between.iter().map(|sku| sku.to_string()));
    assert_eq!(skus(&pair.a.store), everything, "the till has the peer's originals and kept its sales");
    assert_eq!(skus(&pair.b.store), everything, "the peer has the sales made in between");
    assert_eq!(
        pair.a.store.reader().expect("reader").canonical_dump().expect("dump"),
        pair.b.store.reader().expect("reader").canonical_dump().expect("dump"),
        "every till ends identical"
    );
    let (on_a, on_b) = pair.summaries();
    assert_eq!(on_a, on_b, "one history of every origin");
    assert_eq!(
        on_b.get(&pos("AAAA")),
        possync_core::Seq(6),
        "the peer holds nothing of the branch under AAAA"
    );
    assert!(pair.a.link.is_registered() && !pair.a.link.is_closed());

    // Connected again later: one history of every origin on both sides, nothing to fetch.
    let (a, b, dir) = (pair.a.store, pair.b.store, pair._dir);
    now.fetch_add(60_000, Ordering::SeqCst);
    let pair = connect(&now, dir, a, b);
    assert!(!pair.a.fetched_own_history && !pair.b.fetched_own_history);
    for end in [&pair.a, &pair.b] {
        assert!(
            end.metrics.iter().all(|metric| matches!(metric, Metric::CatchUp { .. })),
            "{:?}",
            end.metrics
        );
    }
    assert_eq!(skus(&pair.b.store), everything);
}
