//! What the chain benches share: the node settings (no API, no discovery, no LAN peers, one
//! role of the chain, a backbone with no credentials on 127.0.0.1), and the raw JetStream
//! stream and consumer their baselines time.

use std::path::Path;

use async_nats::jetstream::{self, consumer, stream};
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

/// A stream `RAW` on `raw.>` for the baselines (no possync in the loop).
pub async fn raw_stream(js: &jetstream::Context) -> stream::Stream {
    js.create_stream(stream::Config {
        name: "RAW".into(),
        subjects: vec!["raw.>".into()],
        ..Default::default()
    })
    .await
    .expect("the RAW stream")
}

/// A durable pull consumer of `raw` with explicit acks, as the head office reads.
pub async fn raw_consumer(raw: &stream::Stream) -> consumer::PullConsumer {
    raw.create_consumer(consumer::pull::Config {
        durable_name: Some("raw".into()),
        ack_policy: consumer::AckPolicy::Explicit,
        max_ack_pending: 1_000,
        ..Default::default()
    })
    .await
    .expect("the raw consumer")
}
