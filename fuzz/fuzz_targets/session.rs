//! The protocol state machine fed with any sequence of frames. Two real `Session`s talk
//! through a fuzzer-driven wire (frames delivered, injected, mutated; time advanced; changes
//! written; sync asked; links closed), each over a small change log that applies per origin
//! in seq order as the real store does.
//!
//! Checked: nothing panics; `Closed` comes at most once and nothing is applied after it; and
//! when the fuzzer only delivered honest frames and neither side closed, both logs end
//! identical once the wire is drained (the protocol converges).
#![no_main]
use std::collections::VecDeque;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use possync_core::entity::{EntityKind, FieldMap};
use possync_core::protocol::{BatchApplied, Event, Role, Session, SessionConfig, StampedChange};
use possync_core::{Change, ChangeBody, EntityId, Hlc, PosId, Seq, VersionVector, WireChange};

const T0: u64 = 1_763_892_300_000;

#[derive(Debug, Arbitrary)]
enum Op {
    /// Deliver the next frame on the wire towards A (false) or B (true).
    Deliver(bool),
    /// Deliver the next frame with one byte replaced.
    Mutate { to_b: bool, at: u16, byte: u8 },
    /// Drop the next frame.
    Drop(bool),
    /// A frame the fuzzer wrote.
    Inject { to_b: bool, frame: String },
    /// Time passes (ms).
    Advance(u16),
    /// The till writes a change.
    Write(bool),
    /// "Sync now".
    RequestSync(bool),
    /// The node closes the link.
    Close(bool),
}

struct Node {
    session: Session,
    id: PosId,
    log: Vec<WireChange>,
    vv: VersionVector,
    closed: bool,
}

fn pos(id: &str) -> PosId {
    PosId::parse(id).expect("a valid posId")
}

fn stamp(change: &WireChange) -> (PosId, Seq) {
    let stamped = StampedChange::new(change.clone(), "data").expect("logged changes carry stamps");
    (stamped.origin, stamped.seq)
}

impl Node {
    fn new(id: &str, role: Role, now: u64) -> Node {
        let config = SessionConfig {
            pos_id: pos(id),
            pos_name: format!("Till {id}"),
            heartbeat_interval_ms: 5_000,
            batch_size: 3,
            max_violations: 3,
            auto_sync: true,
            instance: Some(format!("instance-{id}")),
            heads: Default::default(),
        };
        Node {
            session: Session::new(config, role, VersionVector::new(), now),
            id: pos(id),
            log: Vec::new(),
            vv: VersionVector::new(),
            closed: false,
        }
    }

    fn write(&mut self, now: u64) {
        let seq = self.vv.get(&self.id).next();
        let mut fields = FieldMap::new();
        fields.insert("name", serde_json::json!(format!("Category {}/{}", self.id, seq.0)));
        let mut ctx = VersionVector::new();
        ctx.observe(&self.id, seq);
        let change = Change {
            origin: self.id.clone(),
            seq,
            hlc: Hlc::new(now, 0).ok(),
            ctx,
            entity: EntityKind::Category,
            id: EntityId::parse(format!("cat-{}-{}", self.id, seq.0)).expect("a valid id"),
            body: ChangeBody::Upsert { create: true, fields },
            copy_of: None,
        }
        .to_wire();
        self.vv.observe(&self.id, seq);
        self.log.push(change.clone());
        self.session.send_change(&change);
    }

    fn select(&self, since: &VersionVector, after: u64, limit: usize) -> (Vec<WireChange>, u64, bool) {
        let wanted = |change: &WireChange| {
            let (origin, seq) = stamp(change);
            seq > since.get(&origin)
        };
        let start = usize::try_from(after).unwrap_or(usize::MAX).min(self.log.len());
        let mut selected = Vec::new();
        for (index, change) in self.log.iter().enumerate().skip(start) {
            if wanted(change) {
                selected.push(change.clone());
                if selected.len() == limit.max(1) {
                    let more = self.log[index + 1..].iter().any(wanted);
                    return (selected, index as u64 + 1, more);
                }
            }
        }
        (selected, self.log.len() as u64, false)
    }

    /// Drains the session's events, answering them as the node's driver does.
    fn drive(&mut self, now: u64, wire: &mut VecDeque<String>) {
        loop {
            while let Some(frame) = self.session.poll_transmit() {
                wire.push_back(frame);
            }
            let Some(event) = self.session.poll_event() else { break };
            match event {
                Event::NeedBatch { since, after_cursor, limit } => {
                    let (changes, cursor, more) = self.select(&since, after_cursor, limit);
                    self.session.provide_batch(changes, cursor, more);
                }
                Event::Apply { changes, .. } => {
                    assert!(!self.closed, "changes to apply after Closed");
                    let mut gap = false;
                    for change in changes {
                        // The stamp the frame parser read must be the change's own.
                        let peek = change.wire.peek_stamp().expect("an applied change has a stamp");
                        assert_eq!(
                            (&peek.origin, peek.seq),
                            (&change.origin, change.seq),
                            "stamp read two ways"
                        );
                        let held = self.vv.get(&change.origin);
                        if change.seq == held.next() {
                            self.vv.observe(&change.origin, change.seq);
                            self.log.push(change.wire);
                        } else if change.seq > held {
                            gap = true;
                        }
                    }
                    let report =
                        BatchApplied { gap, local_summary: self.vv.clone(), ..BatchApplied::default() };
                    self.session.batch_applied(now, report);
                }
                Event::Closed { .. } => {
                    assert!(!self.closed, "Closed emitted twice");
                    self.closed = true;
                }
                _ => {}
            }
        }
    }
}

fuzz_target!(|ops: Vec<Op>| {
    let mut now = T0;
    let mut a = Node::new("till-a", Role::Initiator, now);
    let mut b = Node::new("till-b", Role::Responder, now);
    let mut to_a: VecDeque<String> = VecDeque::new();
    let mut to_b: VecDeque<String> = VecDeque::new();
    let mut honest = true;
    a.drive(now, &mut to_b);
    b.drive(now, &mut to_a);
    for op in ops.into_iter().take(400) {
        match op {
            Op::Deliver(towards_b) => {
                let (node, wire) = if towards_b { (&mut b, &mut to_b) } else { (&mut a, &mut to_a) };
                if let Some(frame) = wire.pop_front() {
                    node.session.handle_frame(now, &frame);
                }
            }
            Op::Mutate { to_b: towards_b, at, byte } => {
                let (node, wire) = if towards_b { (&mut b, &mut to_b) } else { (&mut a, &mut to_a) };
                if let Some(frame) = wire.pop_front() {
                    let mut bytes = frame.into_bytes();
                    if !bytes.is_empty() {
                        let at = usize::from(at) % bytes.len();
                        bytes[at] = byte;
                    }
                    honest = false;
                    node.session.handle_frame(now, &String::from_utf8_lossy(&bytes));
                }
            }
            Op::Drop(towards_b) => {
                let wire = if towards_b { &mut to_b } else { &mut to_a };
                honest &= wire.pop_front().is_none();
            }
            Op::Inject { to_b: towards_b, frame } => {
                honest = false;
                let node = if towards_b { &mut b } else { &mut a };
                node.session.handle_frame(now, &frame);
            }
            Op::Advance(ms) => {
                now += u64::from(ms);
                a.session.handle_timeout(now);
                b.session.handle_timeout(now);
            }
            Op::Write(on_b) => {
                if on_b {
                    b.write(now)
                } else {
                    a.write(now)
                }
            }
            Op::RequestSync(on_b) => {
                let node = if on_b { &mut b } else { &mut a };
                let summary = node.vv.clone();
                node.session.request_sync(summary);
            }
            Op::Close(on_b) => {
                honest = false;
                let node = if on_b { &mut b } else { &mut a };
                node.session.close("closed by the fuzzer");
            }
        }
        a.drive(now, &mut to_b);
        b.drive(now, &mut to_a);
    }
    // Drain the wire: an honest exchange converges.
    for _ in 0..10_000 {
        if to_a.is_empty() && to_b.is_empty() {
            break;
        }
        if let Some(frame) = to_b.pop_front() {
            b.session.handle_frame(now, &frame);
        }
        if let Some(frame) = to_a.pop_front() {
            a.session.handle_frame(now, &frame);
        }
        a.drive(now, &mut to_b);
        b.drive(now, &mut to_a);
    }
    if honest && !a.closed && !b.closed && a.session.is_established() {
        assert_eq!(a.vv, b.vv, "an honest exchange did not converge");
    }
});
