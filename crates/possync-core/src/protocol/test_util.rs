//! Test support: sessions wired together in memory on a virtual clock, like quinn-proto's
//! `tests/util.rs`. Each node has a fake store (a change log and a version vector, applying
//! per origin in seq order and refusing gaps as the real store does); [`Net::step`] moves
//! frames between the two ends of every link and answers `NeedBatch` and `Apply` the way
//! the real driver does, relaying applied changes to the node's other links.
//!
//! The harness also checks an invariant on every frame it moves: at most one `sync_batch`
//! is unacknowledged per direction.

use std::collections::VecDeque;

use serde_json::json;

use crate::change::{Change, ChangeBody, WireChange};
use crate::entity::{EntityKind, FieldMap};
use crate::hlc::Hlc;
use crate::ids::{EntityId, PosId, Seq};
use crate::vv::VersionVector;

use super::message::{StampedChange, peek_type_action};
use super::session::{BatchApplied, Event, Role, Session, SessionConfig};

/// Start of virtual time (2025-11-23T10:05:00Z), so timestamps look real.
pub(crate) const T0: u64 = 1_763_892_300_000;

pub(crate) fn pos(id: &str) -> PosId {
    PosId::parse(id).expect("test posIds are valid")
}

pub(crate) fn vv(entries: &[(&str, u64)]) -> VersionVector {
    entries.iter().map(|(origin, seq)| (pos(origin), Seq(*seq))).collect()
}

/// Settings used by the tests: small batches so that catch-up takes several.
pub(crate) fn config(id: &str) -> SessionConfig {
    SessionConfig {
        pos_id: pos(id),
        pos_name: format!("Till {id}"),
        heartbeat_interval_ms: 30_000,
        batch_size: 3,
        max_violations: 3,
        auto_sync: true,
        instance: None,
        heads: Default::default(),
    }
}

/// A real change (a category create) from `origin` with sequence `seq`, in wire form.
pub(crate) fn change(origin: &str, seq: u64) -> WireChange {
    let mut fields = FieldMap::new();
    fields.insert("name", json!(format!("Category {origin}/{seq}")));
    let mut ctx = VersionVector::new();
    ctx.observe(&pos(origin), Seq(seq));
    Change {
        origin: pos(origin),
        seq: Seq(seq),
        hlc: Some(Hlc::new(T0 + seq, 0).expect("test clock values are in range")),
        ctx,
        entity: EntityKind::Category,
        id: EntityId::parse(format!("cat-{origin}-{seq}")).expect("test ids are valid"),
        body: ChangeBody::Upsert { create: true, fields },
        copy_of: None,
    }
    .to_wire()
}

/// `(origin, seq)` of a wire change made by these tests.
pub(crate) fn stamp(change: &WireChange) -> (PosId, Seq) {
    let stamped = StampedChange::new(change.clone(), "data").expect("test changes carry stamps");
    (stamped.origin, stamped.seq)
}

/// A node's store, reduced to what the protocol relies on.
#[derive(Debug, Default)]
pub(crate) struct FakeStore {
    /// Every change held, in the order applied (position = index + 1).
    pub(crate) log: Vec<WireChange>,
    /// Highest seq held per origin (exact: changes are applied in seq order).
    pub(crate) vv: VersionVector,
}

impl FakeStore {
    /// Commits the next local change of `origin`.
    pub(crate) fn commit_local(&mut self, origin: &str) -> WireChange {
        let seq = self.vv.get(&pos(origin)).next();
        let change = change(origin, seq.0);
        self.vv.observe(&pos(origin), seq);
        self.log.push(change.clone());
        change
    }

    /// Selects like the real store: after log position `after_cursor`, above `since`.
    pub(crate) fn select(
        &self,
        since: &VersionVector,
        after_cursor: u64,
        limit: usize,
    ) -> (Vec<WireChange>, u64, bool) {
        let wanted = |change: &WireChange| {
            let (origin, seq) = stamp(change);
            seq > since.get(&origin)
        };
        let mut selected = Vec::new();
        let start = usize::try_from(after_cursor).expect("cursor fits").min(self.log.len());
        for (index, change) in self.log.iter().enumerate().skip(start) {
            if !wanted(change) {
                continue;
            }
            selected.push(change.clone());
            if selected.len() == limit {
                let has_more = self.log[index + 1..].iter().any(wanted);
                return (selected, index as u64 + 1, has_more);
            }
        }
        (selected, self.log.len() as u64, false)
    }

    /// Applies in order: duplicates skipped, gaps refused. Returns what was applied.
    pub(crate) fn apply(&mut self, changes: Vec<StampedChange>) -> (Vec<WireChange>, bool) {
        let mut applied = Vec::new();
        let mut gap = false;
        for StampedChange { origin, seq, wire: change } in changes {
            let held = self.vv.get(&origin);
            if seq <= held {
                continue;
            }
            if seq != held.next() {
                gap = true;
                continue;
            }
            self.vv.observe(&origin, seq);
            self.log.push(change.clone());
            applied.push(change);
        }
        (applied, gap)
    }
}

/// One terminal.
#[derive(Debug)]
pub(crate) struct Node {
    /// Its posId.
    pub(crate) id: String,
    /// Its store.
    pub(crate) store: FakeStore,
}

/// One connection: a session at each end.
#[derive(Debug)]
pub(crate) struct Link {
    /// Node indexes of the initiator (0) and responder (1).
    pub(crate) nodes: [usize; 2],
    /// The sessions, initiator first.
    pub(crate) sessions: [Session; 2],
    /// Frames on their way to each end.
    pub(crate) inbox: [VecDeque<String>; 2],
    /// Every event each end emitted, in order.
    pub(crate) events: [Vec<Event>; 2],
    /// Every frame each end sent, in order.
    pub(crate) sent: [Vec<String>; 2],
    /// `sync_batch` frames sent by each end and not yet acknowledged.
    unacked_batches: [u32; 2],
}

/// Several nodes and the links between them, on a virtual clock.
#[derive(Debug)]
pub(crate) struct Net {
    /// Virtual time (ms).
    pub(crate) now: u64,
    /// The terminals.
    pub(crate) nodes: Vec<Node>,
    /// The connections, open or closed.
    pub(crate) links: Vec<Link>,
}

impl Net {
    /// Nodes with these ids, no links.
    pub(crate) fn new(ids: &[&str]) -> Net {
        let nodes = ids.iter().map(|id| Node { id: id.to_string(), store: FakeStore::default() }).collect();
        Net { now: T0, nodes, links: Vec::new() }
    }

    /// The classic pair: nodes "a" and "b" holding `a_local` and `b_local` local changes,
    /// connected (a dials b) but not yet driven.
    pub(crate) fn pair(a_local: u64, b_local: u64) -> Net {
        let mut net = Net::new(&["a", "b"]);
        for _ in 0..a_local {
            net.nodes[0].store.commit_local("a");
        }
        for _ in 0..b_local {
            net.nodes[1].store.commit_local("b");
        }
        net.connect(0, 1);
        net
    }

    /// Opens a link: node `initiator` dials node `responder`. Returns the link index.
    pub(crate) fn connect(&mut self, initiator: usize, responder: usize) -> usize {
        self.connect_with(initiator, responder, config)
    }

    /// Opens a link with custom settings.
    pub(crate) fn connect_with(
        &mut self,
        initiator: usize,
        responder: usize,
        make_config: impl Fn(&str) -> SessionConfig,
    ) -> usize {
        let session = |node: usize, role| {
            let node = &self.nodes[node];
            Session::new(make_config(&node.id), role, node.store.vv.clone(), self.now)
        };
        let sessions = [session(initiator, Role::Initiator), session(responder, Role::Responder)];
        self.links.push(Link {
            nodes: [initiator, responder],
            sessions,
            inbox: [VecDeque::new(), VecDeque::new()],
            events: [Vec::new(), Vec::new()],
            sent: [Vec::new(), Vec::new()],
            unacked_batches: [0, 0],
        });
        self.links.len() - 1
    }

    /// Closes both ends of a link (the connection dropped); frames in flight are lost.
    pub(crate) fn disconnect(&mut self, link: usize) {
        let link = &mut self.links[link];
        for end in 0..2 {
            link.sessions[end].close("connection lost");
            link.inbox[end].clear();
        }
        self.drive();
    }

    /// A local write on `node`, passed to every session of that node.
    pub(crate) fn write(&mut self, node: usize) -> WireChange {
        let id = self.nodes[node].id.clone();
        let change = self.nodes[node].store.commit_local(&id);
        self.relay(node, std::slice::from_ref(&change));
        change
    }

    /// One round: drain every session's outputs, then deliver every frame in flight.
    /// Returns whether anything happened.
    pub(crate) fn step(&mut self) -> bool {
        let mut progressed = false;
        for link in 0..self.links.len() {
            for end in 0..2 {
                progressed |= self.drain(link, end);
            }
        }
        let now = self.now;
        for link in &mut self.links {
            for end in 0..2 {
                while let Some(frame) = link.inbox[end].pop_front() {
                    link.sessions[end].handle_frame(now, &frame);
                    progressed = true;
                }
            }
        }
        progressed
    }

    /// Steps until nothing moves.
    pub(crate) fn drive(&mut self) {
        for _ in 0..100_000 {
            if !self.step() {
                return;
            }
        }
        panic!("the net did not settle");
    }

    /// Runs the clock forward to `until`, firing every timeout on the way.
    pub(crate) fn run_until(&mut self, until: u64) {
        self.drive();
        loop {
            let next = self
                .links
                .iter()
                .flat_map(|link| link.sessions.iter().filter_map(Session::poll_timeout))
                .min();
            match next {
                Some(next) if next <= until => {
                    self.now = self.now.max(next);
                    let now = self.now;
                    for link in &mut self.links {
                        for session in &mut link.sessions {
                            if session.poll_timeout().is_some_and(|at| at <= now) {
                                session.handle_timeout(now);
                            }
                        }
                    }
                    self.drive();
                }
                _ => break,
            }
        }
        self.now = until;
    }

    /// Every event one end emitted.
    pub(crate) fn events(&self, link: usize, end: usize) -> &[Event] {
        &self.links[link].events[end]
    }

    /// The `type` of every frame one end sent.
    pub(crate) fn sent_types(&self, link: usize, end: usize) -> Vec<String> {
        self.links[link].sent[end].iter().map(|frame| peek_type_action(frame).0).collect()
    }

    /// Asserts that every node holds the same changes.
    pub(crate) fn assert_converged(&self) {
        let first = &self.nodes[0].store;
        for node in &self.nodes[1..] {
            assert_eq!(node.store.vv, first.vv, "{} and {} differ", node.id, self.nodes[0].id);
            let mut left: Vec<_> = node.store.log.iter().map(stamp).collect();
            let mut right: Vec<_> = first.log.iter().map(stamp).collect();
            left.sort();
            right.sort();
            assert_eq!(left, right);
        }
    }

    /// Drains one session's frames and events, answering NeedBatch and Apply.
    fn drain(&mut self, link_index: usize, end: usize) -> bool {
        let mut any = false;
        loop {
            let mut moved = false;
            let link = &mut self.links[link_index];
            while let Some(frame) = link.sessions[end].poll_transmit() {
                let (kind, _) = peek_type_action(&frame);
                if kind == "sync_batch" {
                    link.unacked_batches[end] += 1;
                    assert!(link.unacked_batches[end] <= 1, "two sync_batch frames in flight");
                }
                if kind == "sync_ack" {
                    link.unacked_batches[1 - end] = link.unacked_batches[1 - end].saturating_sub(1);
                }
                link.sent[end].push(frame.clone());
                link.inbox[1 - end].push_back(frame);
                moved = true;
            }
            while let Some(event) = self.links[link_index].sessions[end].poll_event() {
                moved = true;
                self.links[link_index].events[end].push(event.clone());
                let node = self.links[link_index].nodes[end];
                match event {
                    Event::NeedBatch { since, after_cursor, limit } => {
                        let (changes, cursor, has_more) =
                            self.nodes[node].store.select(&since, after_cursor, limit);
                        self.links[link_index].sessions[end].provide_batch(changes, cursor, has_more);
                    }
                    Event::Apply { changes, .. } => {
                        let (applied, gap) = self.nodes[node].store.apply(changes);
                        let report = BatchApplied {
                            gap,
                            local_summary: self.nodes[node].store.vv.clone(),
                            rejections: Vec::new(),
                            retry_at_ms: None,
                        };
                        self.links[link_index].sessions[end].batch_applied(self.now, report);
                        self.relay(node, &applied);
                    }
                    _ => {}
                }
            }
            if !moved {
                return any;
            }
            any = true;
        }
    }

    /// Passes changes applied at `node` to every session of that node (the one they came
    /// from included: it must skip them).
    fn relay(&mut self, node: usize, changes: &[WireChange]) {
        for link in &mut self.links {
            for end in 0..2 {
                if link.nodes[end] == node {
                    for change in changes {
                        link.sessions[end].send_change(change);
                    }
                }
            }
        }
    }
}

/// A wire change's `data` as a JSON value.
pub(crate) fn data_json(wire: &WireChange) -> serde_json::Value {
    serde_json::from_str(wire.data.get()).expect("wire data is JSON")
}
