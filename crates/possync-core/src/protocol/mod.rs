//! The peer protocol (being written).
