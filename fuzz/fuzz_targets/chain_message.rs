//! What head office and the stores read from the backbone: a subject, the
//! `Possync-Last-Seq` header and a body. A message that is accepted encodes back to one that
//! is accepted as the same run. Bodies are any bytes, or a real run of changes (as an
//! uplink publishes it) with one byte changed, so that most reach the checks past JSON.
#![no_main]
use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use possync_chain::{Batch, ChainId, Subjects};
use possync_core::entity::{EntityKind, FieldMap};
use possync_core::{Change, ChangeBody, EntityId, Hlc, PosId, Seq, VersionVector};

#[derive(Debug, Arbitrary)]
enum Subject<'a> {
    Up { store: &'a str, origin: &'a str },
    Down { origin: &'a str },
    Raw(&'a str),
}

#[derive(Debug, Arbitrary)]
enum Payload<'a> {
    Raw(&'a [u8]),
    /// `count` changes of `origin` from `first`, encoded, then byte `at` set to `byte`.
    Run {
        origin: &'a str,
        first: u8,
        count: u8,
        tamper: Option<(u16, u8)>,
    },
}

#[derive(Debug, Arbitrary)]
struct Input<'a> {
    subject: Subject<'a>,
    last_seq_header: Option<&'a str>,
    payload: Payload<'a>,
}

fn run(origin: &str, first: u8, count: u8) -> Option<Vec<u8>> {
    let origin = PosId::parse(origin).ok()?;
    let changes = (0..u64::from(count % 8) + 1)
        .map(|offset| {
            let seq = Seq(u64::from(first) + offset);
            let mut fields = FieldMap::new();
            fields.insert("name", serde_json::json!(format!("Category {}", seq.0)));
            let mut ctx = VersionVector::new();
            ctx.observe(&origin, seq);
            Change {
                origin: origin.clone(),
                seq,
                hlc: Hlc::new(1_763_892_300_000 + seq.0, 0).ok(),
                ctx,
                entity: EntityKind::Category,
                id: EntityId::parse(format!("cat-{}", seq.0)).expect("a valid id"),
                body: ChangeBody::Upsert { create: true, fields },
                copy_of: None,
            }
            .to_wire()
        })
        .collect();
    Batch::new(origin, changes).ok()?.encode().ok()
}

fuzz_target!(|input: Input<'_>| {
    let subjects = Subjects::new(ChainId::parse("fuzz").expect("a valid chain id"));
    let subject = match input.subject {
        Subject::Up { store, origin } => format!("possync.fuzz.up.{store}.{origin}"),
        Subject::Down { origin } => format!("possync.fuzz.down.{origin}"),
        Subject::Raw(raw) => raw.to_string(),
    };
    let _ = possync_chain::message::held_from_header(input.last_seq_header);
    let Ok(parsed) = subjects.parse(&subject) else { return };
    let payload = match input.payload {
        Payload::Raw(bytes) => bytes.to_vec(),
        Payload::Run { origin, first, count, tamper } => {
            let Some(mut bytes) = run(origin, first, count) else { return };
            if let Some((at, byte)) = tamper {
                let at = usize::from(at) % bytes.len();
                bytes[at] = byte;
            }
            bytes
        }
    };
    let Ok(batch) = Batch::decode(&parsed, input.last_seq_header, &payload) else { return };
    assert_eq!(batch.origin(), &parsed.origin);
    assert!(batch.first_seq() <= batch.last_seq());
    assert_eq!(batch.changes().len() as u64, batch.last_seq().0 - batch.first_seq().0 + 1);
    let encoded = batch.encode().expect("an accepted batch encodes within the limit");
    let last = batch.last_seq().0.to_string();
    let again = Batch::decode(&parsed, Some(&last), &encoded).expect("an encoded batch is accepted");
    assert_eq!((again.first_seq(), again.last_seq()), (batch.first_seq(), batch.last_seq()));
    assert_eq!(again.changes().len(), batch.changes().len());
});
