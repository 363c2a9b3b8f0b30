//! # possync-node
//!
//! The tokio side of a terminal: everything that waits. It drives the sans-IO protocol of
//! `possync-core` with real sockets and timers, and the `possync-store` database through a
//! single writer thread.
//!
//! - [`node`] — start and stop a node (wiring only).
//! - [`shared`] — the state the node's tasks share, and each task's narrow handle of it.
//! - [`writer`] — the single database writer, with priority queues.
//! - [`transport`] — the secure channel (Noise over WebSocket).
//! - [`link`] — the sync engine of one connection, without I/O (decisions, effects).
//! - [`connection`] — one task per peer connection, pumping its link.
//! - [`listener`] — the peer port (admission, responders).
//! - [`upkeep`] — the event logger, checkpoints, metrics and retention.
//! - [`peers`] — what is known about each peer (status, detailed stats).
//! - [`dialer`] — redialling with backoff.
//! - [`discovery`] — mDNS.
//! - [`metrics`] — Prometheus.
//! - [`api`] — the HTTP API and dashboard.
//! - [`chain`] — the chain of stores over NATS JetStream (`[uplink]`, `[hq]`).
//! - [`config`] — `possync.toml`.

pub mod admission;
pub mod api;
pub mod chain;
pub mod clock;
pub mod config;
pub mod connection;
pub mod dialer;
pub mod discovery;
pub mod link;
pub mod listener;
pub mod metrics;
pub mod node;
pub mod peer_rate;
pub mod peers;
pub mod shared;
pub mod transport;
pub mod upkeep;
pub mod writer;

pub use config::{ConfigFile, NodeConfig};
pub use node::Node;
pub use shared::NodeShared;
