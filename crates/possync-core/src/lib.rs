//! # possync-core
//!
//! The sans-IO heart of possync: everything that decides, nothing that waits. No tokio, no
//! SQLite, no wall clock: callers pass time and randomness in, so every function here is
//! deterministic and testable on its own.
//!
//! - [`ids`] — terminal, record and sequence identifiers.
//! - [`hlc`] — the hybrid logical clock that orders writes.
//! - [`vv`] — version vectors (what a node or a record has seen).
//! - [`entity`] — the shop's data and its validation rules.
//! - [`decimal`] — exact amounts.
//! - [`change`] — a write as it travels, and its wire form.
//! - [`merge`] — the merge rules as a pure function.
//! - [`protocol`] — the peer protocol (messages and the per-connection session state machine).
//! - [`time`] — timestamp formats.

pub mod change;
pub mod decimal;
pub mod entity;
pub mod hlc;
pub mod ids;
pub mod merge;
pub mod protocol;
pub mod signature;
pub mod time;
pub mod vv;

pub use change::{Change, ChangeBody, ChangeError, CopyOf, StampPeek, TicketAction, WireChange};
pub use entity::{EntityError, EntityKind, FieldMap};
pub use hlc::{Hlc, HybridClock};
pub use ids::{EntityId, PosId, Seq};
pub use merge::{
    ConflictReport, ConflictType, MergeOutcome, RecordState, Strategy, Verdict, Version, Winner, merge_record,
};
pub use vv::{Causality, VersionVector};
