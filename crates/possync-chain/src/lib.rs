//! # possync-chain
//!
//! The chain of stores, sans IO: what a store till and the head office (HQ) must agree on
//! to move changes over a NATS JetStream backbone, and every decision about it, with no
//! NATS client, no task and no clock. The tokio driver (`possync-node`'s `chain` module)
//! only moves bytes and calls the store.
//!
//! Why a crate of its own: the backbone is one more way for [`possync_core::WireChange`]s to
//! travel, not a second sync engine. What can go wrong on it (a message forged under another
//! store's subject, a run with a hole in it, two tills racing to upload the same origin, a
//! resend after a day offline) is decided here by pure functions that tests drive directly.
//!
//! - [`subject`]: chain and store ids, subject and stream names ([`Subjects`]).
//! - [`message`]: one message = a contiguous run of one origin's changes; encoding and
//!   validation of an incoming one ([`Batch::decode`]).
//! - [`planner`]: what to publish next, given what this node holds and what the backbone
//!   holds per origin ([`Planner`]).
//! - [`presence`]: which stores are online, from the reports their tills send every few
//!   seconds ([`Presence`]).
//!
//! What this crate deliberately does not do: apply changes (the store does, idempotently by
//! (origin, seq)), decide merges (possync-core), or retry (the driver).

pub mod message;
pub mod planner;
pub mod presence;
pub mod subject;

pub use message::{Batch, HEADER_FIRST_SEQ, HEADER_LAST_SEQ, HEADER_ORIGIN, MAX_MESSAGE_BYTES, MessageError};
pub use planner::{Held, Planner, Step};
pub use presence::{ConflictSummary, Presence, StoreState, UplinkReport};
pub use subject::{ChainId, Direction, ParsedSubject, StoreId, SubjectError, Subjects};
