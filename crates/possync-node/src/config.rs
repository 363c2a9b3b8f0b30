//! The node's configuration: the `possync.toml` file written by `possync init`, and the
//! runtime [`NodeConfig`] built from it plus command-line overrides.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The config file name inside a data directory.
pub const CONFIG_FILE: &str = "possync.toml";
/// Default peer port (SPEC section 4).
pub const DEFAULT_PEER_PORT: u16 = 3030;
/// Default API port (SPEC section 6).
pub const DEFAULT_API_PORT: u16 = 3031;

/// What `possync.toml` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// This terminal's posId (informational: the database is the source of truth).
    pub pos_id: String,
    /// Display name.
    pub name: String,
    /// Peer port.
    #[serde(default = "default_peer_port")]
    pub port: u16,
    /// API port.
    #[serde(default = "default_api_port")]
    pub api_port: u16,
    /// Address the API binds to; anything but loopback requires the API token.
    #[serde(default = "default_api_bind")]
    pub api_bind: String,
    /// Address the peer listener binds to.
    #[serde(default = "default_peer_bind")]
    pub peer_bind: String,
    /// The shop's shared secret (`POSSYNC_SECRET` overrides it).
    #[serde(default)]
    pub secret: Option<String>,
    /// Bearer token for API calls when bound off loopback.
    pub api_token: String,
    /// Find peers by mDNS.
    #[serde(default = "default_true")]
    pub discovery: bool,
    /// Static peers, `host:port`.
    #[serde(default)]
    pub peers: Vec<String>,
    /// Most simultaneous peer connections.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Largest frame accepted from a peer, in bytes.
    #[serde(default = "default_max_frame_bytes")]
    pub max_frame_bytes: usize,
    /// Other host names the API answers to (besides localhost and its addresses), e.g. a
    /// name of the till on the shop's network; any other `Host` header is refused.
    #[serde(default)]
    pub api_allowed_hosts: Vec<String>,
    /// Most simultaneous API connections.
    #[serde(default = "default_api_max_connections")]
    pub api_max_connections: usize,
    /// An API connection that moves no byte for this long is closed (seconds).
    #[serde(default = "default_api_idle_timeout_secs")]
    pub api_idle_timeout_secs: u64,
    /// `[uplink]`: this till belongs to a store of a chain (docs/CHAIN.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uplink: Option<UplinkSection>,
    /// `[hq]`: this node is the chain's head office (docs/CHAIN.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hq: Option<HqSection>,
}

/// How to reach and log in to the NATS backbone (shared by `[uplink]` and `[hq]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackboneSection {
    /// `nats://host:port` (or `tls://host:port`).
    pub nats_url: String,
    /// The chain id (`[A-Za-z0-9_-]`, at most 32 bytes).
    pub chain: String,
    /// User name (with `password`).
    #[serde(default)]
    pub user: Option<String>,
    /// Password (with `user`).
    #[serde(default)]
    pub password: Option<String>,
    /// A NATS credentials file (JWT + nkey seed), instead of user/password.
    #[serde(default)]
    pub credentials: Option<PathBuf>,
    /// A PEM file of CA certificates to verify the server's TLS certificate.
    #[serde(default)]
    pub tls_ca: Option<PathBuf>,
}

/// `[uplink]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UplinkSection {
    /// The backbone.
    #[serde(flatten)]
    pub backbone: BackboneSection,
    /// This till's store id (`[A-Za-z0-9_-]`, at most 32 bytes).
    pub store: String,
    /// How often the till reports its uplink to the head office (seconds; docs/CHAIN.md,
    /// "Which stores are online").
    #[serde(default = "default_report_every_secs")]
    pub report_every_secs: u64,
}

/// `[hq]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HqSection {
    /// The backbone.
    #[serde(flatten)]
    pub backbone: BackboneSection,
    /// A store silent for longer than this is flagged in `GET /api/chain/stores`.
    #[serde(default = "default_silent_store_alert_secs")]
    pub silent_store_alert_secs: u64,
    /// A store none of whose tills has reported for this long is offline (seconds).
    #[serde(default = "default_store_offline_after_secs")]
    pub store_offline_after_secs: u64,
}

fn default_silent_store_alert_secs() -> u64 {
    900
}

/// `[uplink] report_every_secs` unless set.
pub const DEFAULT_REPORT_EVERY_SECS: u64 = 5;

fn default_report_every_secs() -> u64 {
    DEFAULT_REPORT_EVERY_SECS
}

/// `[hq] store_offline_after_secs` unless set: four missed reports.
pub const DEFAULT_STORE_OFFLINE_AFTER_SECS: u64 = 20;

fn default_store_offline_after_secs() -> u64 {
    DEFAULT_STORE_OFFLINE_AFTER_SECS
}

fn default_peer_port() -> u16 {
    DEFAULT_PEER_PORT
}
fn default_api_port() -> u16 {
    DEFAULT_API_PORT
}
fn default_api_bind() -> String {
    "127.0.0.1".into()
}
fn default_peer_bind() -> String {
    "0.0.0.0".into()
}
fn default_true() -> bool {
    true
}
fn default_max_connections() -> usize {
    64
}
fn default_max_frame_bytes() -> usize {
    16 * 1024 * 1024
}
fn default_api_max_connections() -> usize {
    ApiOptions::default().max_connections
}
fn default_api_idle_timeout_secs() -> u64 {
    ApiOptions::default().idle_timeout.as_secs()
}

/// Fewest characters a shop secret may have.
pub const MIN_SECRET_CHARS: usize = 20;
/// Fewest different characters a shop secret may have.
pub const MIN_SECRET_DISTINCT_CHARS: usize = 10;

/// A shop secret too weak to stand guessing over the LAN (anyone there can try secrets
/// against the peer port, as fast as handshakes go).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the shop secret is too weak: it needs at least {MIN_SECRET_CHARS} characters with at least \
     {MIN_SECRET_DISTINCT_CHARS} different ones (this one has {chars}, {distinct} different); \
     leave --secret out and `possync init` generates a strong one"
)]
pub struct WeakSecret {
    /// Characters in the secret.
    pub chars: usize,
    /// Different characters in it.
    pub distinct: usize,
}

/// Checks the shop secret against the rule: at least [`MIN_SECRET_CHARS`] characters and
/// [`MIN_SECRET_DISTINCT_CHARS`] different ones. A random secret of 16 bytes written in hex
/// (32 characters) passes; `secret123` or `aaaaaaaaaaaaaaaaaaaaaaaa` do not.
pub fn check_secret(secret: &str) -> Result<(), WeakSecret> {
    let chars = secret.chars().count();
    let distinct = secret.chars().collect::<std::collections::BTreeSet<char>>().len();
    if chars < MIN_SECRET_CHARS || distinct < MIN_SECRET_DISTINCT_CHARS {
        return Err(WeakSecret { chars, distinct });
    }
    Ok(())
}

/// Why the configuration could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML of the expected shape.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// An address is malformed.
    #[error("invalid address {0:?}")]
    Address(String),
    /// The `[uplink]` or `[hq]` section is invalid.
    #[error("chain configuration: {0}")]
    Chain(String),
}

impl ConfigFile {
    /// A fresh configuration with defaults.
    pub fn new(pos_id: &str, name: &str, api_token: String) -> ConfigFile {
        ConfigFile {
            pos_id: pos_id.to_string(),
            name: name.to_string(),
            port: DEFAULT_PEER_PORT,
            api_port: DEFAULT_API_PORT,
            api_bind: default_api_bind(),
            peer_bind: default_peer_bind(),
            secret: None,
            api_token,
            discovery: true,
            peers: Vec::new(),
            max_connections: default_max_connections(),
            max_frame_bytes: default_max_frame_bytes(),
            uplink: None,
            hq: None,
            api_allowed_hosts: Vec::new(),
            api_max_connections: default_api_max_connections(),
            api_idle_timeout_secs: default_api_idle_timeout_secs(),
        }
    }

    /// Reads `DIR/possync.toml`.
    pub fn load(data_dir: &Path) -> Result<ConfigFile, ConfigError> {
        let path = data_dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&path)
            .map_err(|source| ConfigError::Io { path: path.clone(), source })?;
        toml::from_str(&text).map_err(|err| ConfigError::Parse { path, message: err.to_string() })
    }

    /// Writes `DIR/possync.toml` (readable by its owner only: it holds the secret and token).
    pub fn save(&self, data_dir: &Path) -> Result<(), ConfigError> {
        let path = data_dir.join(CONFIG_FILE);
        let text = toml::to_string_pretty(self)
            .map_err(|err| ConfigError::Parse { path: path.clone(), message: err.to_string() })?;
        std::fs::write(&path, text).map_err(|source| ConfigError::Io { path: path.clone(), source })?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
        }
        Ok(())
    }
}

/// Everything a running node needs.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// The data directory (database and config file).
    pub data_dir: PathBuf,
    /// Where to listen for peers.
    pub peer_listen: SocketAddr,
    /// Where to serve the API and dashboard (`None`: no API, as in some tests).
    pub api_listen: Option<SocketAddr>,
    /// Peers to dial, `host:port`.
    pub static_peers: Vec<String>,
    /// Find peers by mDNS.
    pub discovery: bool,
    /// The shop's shared secret.
    pub secret: String,
    /// Bearer token required by the API when not bound to loopback.
    pub api_token: String,
    /// Most simultaneous peer connections.
    pub max_connections: usize,
    /// Largest frame accepted from a peer.
    pub max_frame_bytes: usize,
    /// Base of the redial backoff, in ms (5000 per SPEC; tests shorten it).
    pub backoff_base_ms: u64,
    /// The API's names and connection limits.
    pub api: ApiOptions,
    /// This node's part in a chain of stores, if any.
    pub chain: Option<ChainRole>,
}

/// A node's part in a chain of stores (docs/CHAIN.md).
#[derive(Debug, Clone)]
pub enum ChainRole {
    /// A store's till: uploads the store's changes, applies the head office's.
    Uplink(UplinkConfig),
    /// The head office: ingests every store's changes, publishes its own.
    Hq(HqConfig),
}

/// How to log in to the backbone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackboneAuth {
    /// No credentials.
    Anonymous,
    /// User and password.
    UserPassword {
        /// The user.
        user: String,
        /// The password.
        password: String,
    },
    /// A NATS credentials file.
    CredentialsFile(PathBuf),
}

/// The backbone, checked.
#[derive(Debug, Clone)]
pub struct BackboneConfig {
    /// The server URL.
    pub url: String,
    /// The chain.
    pub chain: possync_chain::ChainId,
    /// How to log in.
    pub auth: BackboneAuth,
    /// CA certificates for TLS.
    pub tls_ca: Option<PathBuf>,
}

/// A store till's `[uplink]`, checked.
#[derive(Debug, Clone)]
pub struct UplinkConfig {
    /// The backbone.
    pub backbone: BackboneConfig,
    /// The store.
    pub store: possync_chain::StoreId,
    /// How often the till reports its uplink (seconds, at least 1).
    pub report_every_secs: u64,
}

/// The head office's `[hq]`, checked.
#[derive(Debug, Clone)]
pub struct HqConfig {
    /// The backbone.
    pub backbone: BackboneConfig,
    /// Seconds of silence after which a store is flagged.
    pub silent_store_alert_secs: u64,
    /// Seconds without a report after which a store is offline.
    pub store_offline_after_secs: u64,
}

impl BackboneSection {
    /// Checks the section.
    pub fn to_config(&self) -> Result<BackboneConfig, ConfigError> {
        let chain = possync_chain::ChainId::parse(self.chain.clone())
            .map_err(|err| ConfigError::Chain(err.to_string()))?;
        let auth = match (&self.user, &self.password, &self.credentials) {
            (None, None, None) => BackboneAuth::Anonymous,
            (Some(user), Some(password), None) => {
                BackboneAuth::UserPassword { user: user.clone(), password: password.clone() }
            }
            (None, None, Some(path)) => BackboneAuth::CredentialsFile(path.clone()),
            _ => {
                return Err(ConfigError::Chain(
                    "give either user and password, or a credentials file".into(),
                ));
            }
        };
        if self.nats_url.trim().is_empty() {
            return Err(ConfigError::Chain("nats_url is empty".into()));
        }
        Ok(BackboneConfig { url: self.nats_url.clone(), chain, auth, tls_ca: self.tls_ca.clone() })
    }
}

impl UplinkSection {
    /// Checks the section.
    pub fn to_config(&self) -> Result<UplinkConfig, ConfigError> {
        let store = possync_chain::StoreId::parse(self.store.clone())
            .map_err(|err| ConfigError::Chain(err.to_string()))?;
        Ok(UplinkConfig {
            backbone: self.backbone.to_config()?,
            store,
            report_every_secs: self.report_every_secs.max(1),
        })
    }
}

impl HqSection {
    /// Checks the section.
    pub fn to_config(&self) -> Result<HqConfig, ConfigError> {
        Ok(HqConfig {
            backbone: self.backbone.to_config()?,
            silent_store_alert_secs: self.silent_store_alert_secs.max(1),
            store_offline_after_secs: self.store_offline_after_secs.max(1),
        })
    }
}

/// The API's names and connection limits (see `api/guard.rs` and `api/server.rs`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiOptions {
    /// Host names the API answers to besides `localhost` and its own addresses.
    pub allowed_hosts: Vec<String>,
    /// Most connections served at once; at the cap a new one closes the one idle the longest.
    pub max_connections: usize,
    /// Time allowed for a request head, once started.
    pub header_timeout: Duration,
    /// A connection that moves no byte for this long is closed.
    pub idle_timeout: Duration,
}

impl Default for ApiOptions {
    /// 256 connections (a till and its dashboard need a handful), 10 s for a request head,
    /// 30 s idle (the dashboard refreshes every 30 s and its event stream every second).
    fn default() -> ApiOptions {
        ApiOptions {
            allowed_hosts: Vec::new(),
            max_connections: 256,
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
        }
    }
}

impl NodeConfig {
    /// Builds the runtime configuration from the file.
    pub fn from_file(data_dir: &Path, file: &ConfigFile, secret: String) -> Result<NodeConfig, ConfigError> {
        let address = |host: &str, port: u16| -> Result<SocketAddr, ConfigError> {
            let text = if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") };
            text.parse().map_err(|_| ConfigError::Address(text))
        };
        Ok(NodeConfig {
            data_dir: data_dir.to_path_buf(),
            peer_listen: address(&file.peer_bind, file.port)?,
            api_listen: Some(address(&file.api_bind, file.api_port)?),
            static_peers: file.peers.clone(),
            discovery: file.discovery,
            secret,
            api_token: file.api_token.clone(),
            max_connections: file.max_connections.max(1),
            // Never below the largest frame a node sends (a batch or a change at their
            // limits): a smaller limit would refuse a valid change and stall its origin.
            max_frame_bytes: file.max_frame_bytes.max(possync_core::protocol::MAX_FRAME_LEN),
            backoff_base_ms: 5_000,
            chain: match (&file.uplink, &file.hq) {
                (None, None) => None,
                (Some(uplink), None) => Some(ChainRole::Uplink(uplink.to_config()?)),
                (None, Some(hq)) => Some(ChainRole::Hq(hq.to_config()?)),
                (Some(_), Some(_)) => {
                    return Err(ConfigError::Chain("a node has [uplink] or [hq], not both".into()));
                }
            },
            api: ApiOptions {
                allowed_hosts: file.api_allowed_hosts.clone(),
                max_connections: file.api_max_connections.max(1),
                idle_timeout: Duration::from_secs(file.api_idle_timeout_secs.max(1)),
                ..ApiOptions::default()
            },
        })
    }

    /// The database file.
    pub fn db_path(&self) -> PathBuf {
        self.data_dir.join(possync_store::DB_FILE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &str) -> Result<NodeConfig, ConfigError> {
        let text = format!("pos_id = \"t1\"\nname = \"Till\"\napi_token = \"x\"\n{extra}");
        let file: ConfigFile = toml::from_str(&text).map_err(|err| ConfigError::Parse {
            path: PathBuf::from("possync.toml"),
            message: err.to_string(),
        })?;
        NodeConfig::from_file(Path::new("/tmp"), &file, "secret".into())
    }

    #[test]
    fn uplink_and_hq_sections_are_read_and_checked() {
        let uplink = parse("[uplink]\nnats_url = \"nats://127.0.0.1:4222\"\nchain = \"acme\"\nstore = \"s042\"\nuser = \"s042\"\npassword = \"pw\"\n").unwrap();
        let Some(ChainRole::Uplink(uplink)) = uplink.chain else { panic!("an uplink") };
        assert_eq!(uplink.store.as_str(), "s042");
        assert_eq!(
            uplink.backbone.auth,
            BackboneAuth::UserPassword { user: "s042".into(), password: "pw".into() }
        );

        let hq = parse(
            "[hq]\nnats_url = \"nats://127.0.0.1:4222\"\nchain = \"acme\"\ncredentials = \"/etc/hq.creds\"\n",
        )
        .unwrap();
        let Some(ChainRole::Hq(hq)) = hq.chain else { panic!("a head office") };
        assert_eq!(hq.backbone.auth, BackboneAuth::CredentialsFile("/etc/hq.creds".into()));
        assert_eq!(hq.silent_store_alert_secs, 900);
        assert!(parse("").unwrap().chain.is_none());
    }

    #[test]
    fn bad_chain_sections_are_refused() {
        let both = "[uplink]\nnats_url = \"n\"\nchain = \"a\"\nstore = \"s\"\n[hq]\nnats_url = \"n\"\nchain = \"a\"\n";
        for (what, extra) in [
            ("both roles", both),
            ("a store id with a dot", "[uplink]\nnats_url = \"n\"\nchain = \"a\"\nstore = \"s.1\"\n"),
            ("a user without a password", "[hq]\nnats_url = \"n\"\nchain = \"a\"\nuser = \"hq\"\n"),
            ("no url", "[hq]\nnats_url = \"\"\nchain = \"a\"\n"),
            ("an unknown key", "[hq]\nnats_url = \"n\"\nchain = \"a\"\nstore = \"s\"\n"),
        ] {
            assert!(parse(extra).is_err(), "{what} must be refused");
        }
    }

    #[test]
    fn the_api_limits_and_names_come_from_the_file_with_defaults() {
        let base = "pos_id = \"till-1\"\nname = \"Till 1\"\napi_token = \"t\"\n";
        let file: ConfigFile = toml::from_str(base).unwrap();
        let config = NodeConfig::from_file(Path::new("/tmp/x"), &file, "s".into()).unwrap();
        assert_eq!(config.api, ApiOptions::default());
        assert_eq!((config.api.max_connections, config.api.idle_timeout.as_secs()), (256, 30));

        let text = format!(
            "{base}api_allowed_hosts = [\"till-1.shop.lan\"]\napi_max_connections = 0\napi_idle_timeout_secs = 5\n"
        );
        let file: ConfigFile = toml::from_str(&text).unwrap();
        let config = NodeConfig::from_file(Path::new("/tmp/x"), &file, "s".into()).unwrap();
        assert_eq!(config.api.allowed_hosts, vec!["till-1.shop.lan".to_string()]);
        assert_eq!(config.api.max_connections, 1, "at least one connection");
        assert_eq!(config.api.idle_timeout, Duration::from_secs(5));
        // `init` writes every key, so the file documents them.
        let written = toml::to_string_pretty(&ConfigFile::new("till-1", "Till 1", "t".into())).unwrap();
        assert!(written.contains("api_max_connections = 256"), "{written}");
    }
}

#[cfg(test)]
mod secret_tests {
    use super::*;

    #[test]
    fn weak_secrets_are_refused_and_random_ones_pass() {
        for weak in ["short", "secret123", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "abababababababababababab"] {
            assert!(check_secret(weak).is_err(), "{weak}");
        }
        let refused = check_secret("short").unwrap_err();
        assert_eq!((refused.chars, refused.distinct), (5, 5));
        assert!(refused.to_string().contains("at least 20 characters"));
        for strong in
            ["test-shop-secret-5a1f0c9e2b7d4e3a", "correct horse battery staple", "0123456789abcdef0123"]
        {
            assert!(check_secret(strong).is_ok(), "{strong}");
        }
    }
}
