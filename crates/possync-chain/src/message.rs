//! The backbone's message: one message carries a contiguous run of ONE origin's changes.
//!
//! ```text
//! subject  possync.<c>.up.<s>.<o>   (or possync.<c>.down.<o>)
//! headers  Possync-Origin: <o>   Possync-First-Seq: <n>   Possync-Last-Seq: <m>
//!          Nats-Expected-Last-Subject-Sequence: <stream seq of the subject's last message, 0 if none>
//! body     {"v":1,"origin":"<o>","firstSeq":n,"lastSeq":m,"changes":[<WireChange>, ...]}
//! ```
//!
//! Why one origin per message: the origin's seq is the key that makes the backbone exact.
//! A run `n..=m` of one origin is checkable on its own (every change stamped by `<o>`, seqs
//! `n, n+1, ..., m`), and `Possync-Last-Seq` on the subject's last message tells any till how
//! far the backbone holds that origin without reading the body. The changes are the same
//! `WireChange` JSON as on the LAN (their `data` text carried byte for byte), so HQ's store
//! applies them exactly as a peer's batch.
//!
//! [`Batch::decode`] is what the receiving side runs before anything reaches the store: a
//! message that fails it is refused whole, with a typed [`MessageError`].

use possync_core::{PosId, Seq, WireChange};
use serde::{Deserialize, Serialize};

use crate::subject::ParsedSubject;

/// Header naming the origin of the run.
pub const HEADER_ORIGIN: &str = "Possync-Origin";
/// Header with the first origin seq of the run.
pub const HEADER_FIRST_SEQ: &str = "Possync-First-Seq";
/// Header with the last origin seq of the run: read from a subject's last message, it tells
/// how far the backbone holds that origin.
pub const HEADER_LAST_SEQ: &str = "Possync-Last-Seq";

/// Largest message body accepted or built, in bytes. NATS's default `max_payload` is 1 MiB;
/// half of it leaves room for headers and for a server configured lower.
pub const MAX_MESSAGE_BYTES: usize = 512 * 1024;

/// Version of the body format.
const FORMAT_VERSION: u32 = 1;

/// Why a message (or a run about to be sent) is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    /// The body is larger than [`MAX_MESSAGE_BYTES`].
    #[error("message of {bytes} bytes, at most {MAX_MESSAGE_BYTES} accepted")]
    TooLarge {
        /// The body's size.
        bytes: usize,
    },
    /// The body is not the expected JSON.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// The body's format version is not one this build reads.
    #[error("message format version {0} is not supported")]
    Version(u32),
    /// The run is empty.
    #[error("message without changes")]
    Empty,
    /// The body's origin is not the subject's.
    #[error("message for origin {body} on the subject of origin {subject}")]
    OriginMismatch {
        /// The origin the subject names.
        subject: String,
        /// The origin the body names.
        body: String,
    },
    /// A change without readable `data.sync.origin` and `data.sync.seq`.
    #[error("change {index} has no valid data.sync.origin and data.sync.seq")]
    Unstamped {
        /// Its position in the message.
        index: usize,
    },
    /// A change stamped by another origin than the message's.
    #[error("change {index} comes from origin {found}, not {expected}")]
    ForeignChange {
        /// Its position in the message.
        index: usize,
        /// The message's origin.
        expected: String,
        /// The change's origin.
        found: String,
    },
    /// The seqs are not `firstSeq, firstSeq + 1, ..., lastSeq`.
    #[error("change {index} has seq {found}, expected {expected}")]
    NotContiguous {
        /// Its position in the message.
        index: usize,
        /// The seq that should be there.
        expected: u64,
        /// The seq found.
        found: u64,
    },
    /// `firstSeq`/`lastSeq` (body or headers) disagree with the changes.
    #[error("the message says seqs {first}..={last} but carries {first_found}..={last_found}")]
    RangeMismatch {
        /// First seq announced.
        first: u64,
        /// Last seq announced.
        last: u64,
        /// First seq carried.
        first_found: u64,
        /// Last seq carried.
        last_found: u64,
    },
}

/// The body, as it travels.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Body {
    v: u32,
    origin: String,
    first_seq: u64,
    last_seq: u64,
    changes: Vec<WireChange>,
}

/// A checked run of one origin's changes.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// The origin.
    origin: PosId,
    /// The first seq of the run.
    first: Seq,
    /// The last seq of the run.
    last: Seq,
    /// The changes, in seq order.
    changes: Vec<WireChange>,
}

impl Batch {
    /// A run of `origin`'s changes, checked (stamps, contiguity, size once encoded is checked
    /// by [`Batch::encode`]).
    pub fn new(origin: PosId, changes: Vec<WireChange>) -> Result<Batch, MessageError> {
        let (first, last) = check_run(&origin, &changes)?;
        Ok(Batch { origin, first, last, changes })
    }

    /// The origin.
    pub fn origin(&self) -> &PosId {
        &self.origin
    }

    /// The first seq.
    pub fn first_seq(&self) -> Seq {
        self.first
    }

    /// The last seq.
    pub fn last_seq(&self) -> Seq {
        self.last
    }

    /// The changes, in seq order.
    pub fn changes(&self) -> &[WireChange] {
        &self.changes
    }

    /// Takes the changes (to hand them to the store).
    pub fn into_changes(self) -> Vec<WireChange> {
        self.changes
    }

    /// The headers to send with the body (name, value), besides the expected-sequence one
    /// that the driver adds.
    pub fn headers(&self) -> [(&'static str, String); 3] {
        [
            (HEADER_ORIGIN, self.origin.to_string()),
            (HEADER_FIRST_SEQ, self.first.0.to_string()),
            (HEADER_LAST_SEQ, self.last.0.to_string()),
        ]
    }

    /// The body's bytes; `TooLarge` when over [`MAX_MESSAGE_BYTES`] (send a shorter run).
    pub fn encode(&self) -> Result<Vec<u8>, MessageError> {
        let body = Body {
            v: FORMAT_VERSION,
            origin: self.origin.to_string(),
            first_seq: self.first.0,
            last_seq: self.last.0,
            changes: self.changes.clone(),
        };
        let bytes = serde_json::to_vec(&body).map_err(|err| MessageError::Malformed(err.to_string()))?;
        if bytes.len() > MAX_MESSAGE_BYTES {
            return Err(MessageError::TooLarge { bytes: bytes.len() });
        }
        Ok(bytes)
    }

    /// Checks a received message against the subject it came on and its
    /// `Possync-Last-Seq` header (when present), and returns its run.
    pub fn decode(
        subject: &ParsedSubject,
        header_last_seq: Option<&str>,
        payload: &[u8],
    ) -> Result<Batch, MessageError> {
        if payload.len() > MAX_MESSAGE_BYTES {
            return Err(MessageError::TooLarge { bytes: payload.len() });
        }
        let body: Body =
            serde_json::from_slice(payload).map_err(|err| MessageError::Malformed(err.to_string()))?;
        if body.v != FORMAT_VERSION {
            return Err(MessageError::Version(body.v));
        }
        if body.origin != subject.origin.as_str() {
            return Err(MessageError::OriginMismatch {
                subject: subject.origin.to_string(),
                body: body.origin,
            });
        }
        let (first, last) = check_run(&subject.origin, &body.changes)?;
        let header_last = match header_last_seq {
            Some(raw) => Some(
                raw.trim()
                    .parse::<u64>()
                    .map_err(|_| MessageError::Malformed(format!("{HEADER_LAST_SEQ}: {raw:?}")))?,
            ),
            None => None,
        };
        if body.first_seq != first.0
            || body.last_seq != last.0
            || header_last.is_some_and(|seq| seq != last.0)
        {
            return Err(MessageError::RangeMismatch {
                first: body.first_seq,
                last: header_last.unwrap_or(body.last_seq),
                first_found: first.0,
                last_found: last.0,
            });
        }
        Ok(Batch { origin: subject.origin.clone(), first, last, changes: body.changes })
    }
}

/// Reads `Possync-Last-Seq` from a header value: how far the backbone holds the origin of the
/// subject whose last message it is. A missing or unreadable header counts as nothing held
/// (the uploader then re-sends from seq 1; the receiver skips what it has).
pub fn held_from_header(value: Option<&str>) -> Seq {
    Seq(value.and_then(|raw| raw.trim().parse().ok()).unwrap_or(0))
}

/// Checks that `changes` are `origin`'s seqs `n, n+1, ...`; returns (first, last).
fn check_run(origin: &PosId, changes: &[WireChange]) -> Result<(Seq, Seq), MessageError> {
    let mut first = None;
    let mut expected = 0;
    for (index, change) in changes.iter().enumerate() {
        let stamp = change.peek_stamp().ok_or(MessageError::Unstamped { index })?;
        if stamp.origin != *origin {
            return Err(MessageError::ForeignChange {
                index,
                expected: origin.to_string(),
                found: stamp.origin.to_string(),
            });
        }
        if first.is_none() {
            first = Some(stamp.seq);
        } else if stamp.seq.0 != expected {
            return Err(MessageError::NotContiguous { index, expected, found: stamp.seq.0 });
        }
        // A forged seq of u64::MAX cannot be followed by anything.
        expected = stamp
            .seq
            .0
            .checked_add(1)
            .ok_or(MessageError::Malformed(format!("change {index}: seq too large")))?;
    }
    let first = first.ok_or(MessageError::Empty)?;
    Ok((first, Seq(expected - 1)))
}

#[cfg(test)]
mod tests {
    use possync_core::StampPeek;
    use serde_json::json;

    use super::*;
    use crate::subject::{ChainId, StoreId, Subjects};

    fn pos(id: &str) -> PosId {
        PosId::parse(id).unwrap()
    }

    fn change(origin: &str, seq: u64) -> WireChange {
        WireChange::new(
            "category",
            "create",
            &json!({"id": format!("c{seq}"), "name": "Bread", "sync": {"origin": origin, "seq": seq, "ctx": {origin: seq}}}),
        )
    }

    fn subject(origin: &str) -> ParsedSubject {
        let subjects = Subjects::new(ChainId::parse("acme").unwrap());
        subjects.parse(&subjects.up(&StoreId::parse("s1").unwrap(), &pos(origin)).unwrap()).unwrap()
    }

    #[test]
    fn a_run_round_trips_byte_for_byte() {
        let batch = Batch::new(pos("t1"), (3..=5).map(|seq| change("t1", seq)).collect()).unwrap();
        assert_eq!((batch.first_seq(), batch.last_seq()), (Seq(3), Seq(5)));
        let bytes = batch.encode().unwrap();
        let decoded = Batch::decode(&subject("t1"), Some("5"), &bytes).unwrap();
        assert_eq!(decoded, batch);
        assert_eq!(decoded.changes()[1].data.get(), change("t1", 4).data.get());
        assert_eq!(batch.headers()[2], (HEADER_LAST_SEQ, "5".to_string()));
    }

    /// Each row: what is wrong with the message, and the error it must give.
    #[test]
    fn bad_messages_are_refused_with_their_reason() {
        let body = |origin: &str, first: u64, last: u64, changes: Vec<WireChange>| {
            serde_json::to_vec(
                &json!({"v": 1, "origin": origin, "firstSeq": first, "lastSeq": last, "changes": changes}),
            )
            .unwrap()
        };
        let unstamped = WireChange::new("category", "create", &json!({"id": "x", "name": "No stamp"}));
        let cases: Vec<(&str, Vec<u8>, Option<&str>, MessageError)> = vec![
            ("garbage", b"\x00garbage".to_vec(), None, MessageError::Malformed(String::new())),
            (
                "another origin in the body",
                body("t2", 1, 1, vec![change("t2", 1)]),
                None,
                MessageError::OriginMismatch { subject: "t1".into(), body: "t2".into() },
            ),
            (
                "a change of another origin (forged)",
                body("t1", 1, 2, vec![change("t1", 1), change("t9", 2)]),
                None,
                MessageError::ForeignChange { index: 1, expected: "t1".into(), found: "t9".into() },
            ),
            (
                "a hole in the run",
                body("t1", 1, 3, vec![change("t1", 1), change("t1", 3)]),
                None,
                MessageError::NotContiguous { index: 1, expected: 2, found: 3 },
            ),
            ("no changes", body("t1", 1, 0, vec![]), None, MessageError::Empty),
            ("an unstamped change", body("t1", 1, 1, vec![unstamped]), None, MessageError::Unstamped { index: 0 }),
            (
                "the body's range lies",
                body("t1", 1, 9, vec![change("t1", 1)]),
                None,
                MessageError::RangeMismatch { first: 1, last: 9, first_found: 1, last_found: 1 },
            ),
            (
                "the header's last seq lies",
                body("t1", 1, 1, vec![change("t1", 1)]),
                Some("7"),
                MessageError::RangeMismatch { first: 1, last: 7, first_found: 1, last_found: 1 },
            ),
            (
                "a future format",
                serde_json::to_vec(&json!({"v": 2, "origin": "t1", "firstSeq": 1, "lastSeq": 1, "changes": [change("t1", 1)]}))
                    .unwrap(),
                None,
                MessageError::Version(2),
            ),
            ("too large", vec![b' '; MAX_MESSAGE_BYTES + 1], None, MessageError::TooLarge { bytes: MAX_MESSAGE_BYTES + 1 }),
            (
                "a seq at the very end of the range",
                body("t1", u64::MAX, u64::MAX, vec![change("t1", u64::MAX)]),
                None,
                MessageError::Malformed(String::new()),
            ),
        ];
        for (what, payload, header, expected) in cases {
            let got = Batch::decode(&subject("t1"), header, &payload).unwrap_err();
            match (&got, &expected) {
                (MessageError::Malformed(_), MessageError::Malformed(_)) => {}
                _ => assert_eq!(got, expected, "{what}"),
            }
        }
    }

    #[test]
    fn building_a_run_checks_it_and_its_size() {
        assert_eq!(
            Batch::new(pos("t1"), vec![change("t1", 2), change("t1", 2)]),
            Err(MessageError::NotContiguous { index: 1, expected: 3, found: 2 })
        );
        let mut big = change("t1", 1);
        big.edit_data(|data| data["name"] = json!("x".repeat(MAX_MESSAGE_BYTES)));
        assert!(matches!(
            Batch::new(pos("t1"), vec![big]).unwrap().encode(),
            Err(MessageError::TooLarge { .. })
        ));
        let stamp = change("t1", 4).peek_stamp().unwrap();
        assert_eq!(stamp, StampPeek { origin: pos("t1"), seq: Seq(4), hlc: None });
    }

    #[test]
    fn held_reads_the_last_seq_header() {
        assert_eq!(held_from_header(Some("42")), Seq(42));
        assert_eq!(held_from_header(Some("x")), Seq(0));
        assert_eq!(held_from_header(None), Seq(0));
    }
}
