//! The possync node (tokio driver).
