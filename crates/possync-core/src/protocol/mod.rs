//! The peer protocol: wire messages and the per-connection state machine, sans IO.
//!
//! Why sans IO: the protocol is where the subtle bugs live (a batch acknowledged twice, a
//! relayed change bouncing back to its origin, a catch-up that stalls after a gap), and a
//! state machine that owns no socket, no task and no clock can be driven by a test exactly
//! like by the node, deterministically, thousands of times per second. The tokio driver in
//! `possync-node` only moves bytes and calls the store; every decision is made here.
//!
//! What this module deliberately does not do: encryption (the secure channel hands it
//! plaintext text frames and takes them back), storage (it asks for batches and hands over
//! changes to apply, through [`Event`]s), decoding entities (changes travel as
//! [`crate::WireChange`]; the store decodes them with [`crate::Change::from_wire`]), and
//! deciding which peers to talk to.
//!
//! - [`message`]: the JSON envelope and its typed messages, [`Message::parse`].
//! - [`session`]: [`Session`], one per connection.
//!
//! The wire format is documented for third parties in `docs/PROTOCOL.md`.
//!
//! # Run loop
//!
//! A driver runs one loop per connection:
//!
//! 1. Once the secure channel is up, create the session with [`Session::new`], giving this
//!    node's current version vector and the current time. An [`Role::Initiator`] (the side
//!    that dialled) has its `hello` queued at once.
//! 2. Drain the outputs: send every frame from [`Session::poll_transmit`] over the channel,
//!    in order; handle every [`Event`] from [`Session::poll_event`]:
//!    - [`Event::NeedBatch`]: select from the change log, then call
//!      [`Session::provide_batch`];
//!    - [`Event::Apply`]: hand the changes to the single store writer; when it is done, call
//!      [`Session::batch_applied`] with whether it met a gap and the node's new version
//!      vector, and pass every change it actually applied to the *other* sessions'
//!      [`Session::send_change`] (relay; passing it to this one too is harmless, it is
//!      skipped);
//!    - [`Event::Established`], [`Event::CatchUpCompleted`], [`Event::HeartbeatTimeout`],
//!      [`Event::ProtocolViolation`], [`Event::PeerError`]: log and count;
//!    - [`Event::Closed`]: remember to stop after this round.
//!
//!    Handling an event may queue more frames and events: repeat step 2 until both
//!    `poll_transmit` and `poll_event` return `None`.
//! 3. If [`Session::is_closed`], close the channel (the frames drained in step 2, such as
//!    the `error` frame that explains a close, have been sent) and stop.
//! 4. Wait for whichever comes first:
//!    - a text frame from the peer: [`Session::handle_frame`];
//!    - the instant [`Session::poll_timeout`]: [`Session::handle_timeout`];
//!    - a change committed locally or applied from another peer: [`Session::send_change`];
//!    - an answer from the store: [`Session::provide_batch`] or [`Session::batch_applied`];
//!    - "sync now" from the API: [`Session::request_sync`];
//!    - shutdown, or the channel failing: [`Session::close`].
//! 5. Go back to step 2.
//!
//! Time is only ever what the driver passes in (`now_ms`, Unix milliseconds), so a test can
//! run a day of heartbeats in a microsecond.

pub mod message;
pub mod progress;
pub mod session;
#[cfg(test)]
mod test_util;

pub use message::{
    Body, DUPLICATE_CONNECTION, ErrorData, Hello, IDENTITY_CLASH, MAX_BATCH_BYTES, MAX_CHANGE_BYTES,
    MAX_FRAME_LEN, Message, PROTOCOL_VERSION, Peers, Pong, ProtocolError, StampedChange, SyncAck, SyncBatch,
    SyncRequest,
};
pub use progress::{CatchUpWatch, Stall, changes_behind};
pub use session::{
    BatchApplied, ConnectionStats, DEAD_AFTER_EXTRA_MS, Event, MAX_BUFFERED_CHANGES, PeerInfo, Role, Session,
    SessionConfig,
};
