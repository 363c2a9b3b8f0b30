//! The node settings the chain benches share: a node with no API, no discovery and no LAN
//! peers, in one role of the chain, on a backbone with no credentials (127.0.0.1 only).

use std::path::Path;

use possync_chain::ChainId;
use possync_node::config::{BackboneAuth, BackboneConfig, ChainRole, NodeConfig};

/// The backbone at `url`, chain `chain`.
pub fn backbone(url: String, chain: &str) -> BackboneConfig {
    BackboneConfig {
        url,
        chain: ChainId::parse(chain).expect("a valid chain id"),
        auth: BackboneAuth::Anonymous,
        tls_ca: None,
    }
}

/// A node on the database in `dir`, in `role`.
pub fn node_config(dir: &Path, role: ChainRole) -> NodeConfig {
    NodeConfig {
        data_dir: dir.to_path_buf(),
        peer_listen: "127.0.0.1:0".parse().expect("an address"),
        api_listen: None,
        static_peers: Vec::new(),
        discovery: false,
        secret: "bench secret: 0123456789abcdef0123456789abcdef".into(),
        api_token: "bench".into(),
        max_connections: 16,
        max_frame_bytes: 16 * 1024 * 1024,
        backoff_base_ms: 100,
        chain: Some(role),
        api: Default::default(),
    }
}
