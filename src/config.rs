//! Configuration: raw TOML structs that reject unknown keys, validated into [`Config`].
//!
//! Every key has a default, so a file that sets only a few keys works, and so does no file at
//! all. Relative paths resolve against the folder of the config file, so a config means the
//! same thing from any working directory.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// The default location of the config file, relative to the working directory.
pub const DEFAULT_PATH: &str = "config/sandgate.toml";

/// Why a configuration could not be loaded. Every message names the file, and the key when
/// one key is at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML, has an unknown key, or a value of the wrong type.
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    /// A key has a value that parses but makes no sense.
    #[error("invalid config file {path}: key `{key}`: {message}")]
    Invalid {
        path: PathBuf,
        key: &'static str,
        message: String,
    },
    /// An environment variable that overrides a key has a value that makes no sense.
    #[error("invalid environment variable {var}: {message}")]
    Env { var: &'static str, message: String },
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawConfig {
    gateway: RawGateway,
    telemetry: RawTelemetry,
    tls: RawTls,
    store: RawStore,
    tokens: RawTokens,
    orchestrator: RawOrchestrator,
    api: RawApi,
    cluster: RawCluster,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawCluster {
    node_name: Option<String>,
    advertise_addr: String,
    heartbeat_secs: u64,
    kek_file: Option<PathBuf>,
}

impl Default for RawCluster {
    fn default() -> Self {
        RawCluster {
            node_name: None,
            advertise_addr: "127.0.0.1".into(),
            heartbeat_secs: 5,
            kek_file: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawApi {
    requests_per_second: u32,
    burst: u32,
    address_requests_per_second: u32,
    address_burst: u32,
}

impl Default for RawApi {
    fn default() -> Self {
        RawApi {
            requests_per_second: 100,
            burst: 200,
            address_requests_per_second: 200,
            address_burst: 400,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawGateway {
    listen: String,
    base_domain: String,
    public_port: Option<u16>,
    max_header_bytes: usize,
    max_body_bytes: u64,
    handshake_timeout_secs: u64,
    header_read_timeout_secs: u64,
    idle_timeout_secs: u64,
    body_read_timeout_secs: u64,
    upstream_connect_timeout_secs: u64,
    upstream_response_timeout_secs: u64,
    shutdown_grace_secs: u64,
    max_connections: usize,
    max_connections_per_ip: usize,
    max_connections_per_sandbox: usize,
    h2_max_concurrent_streams: u32,
    websocket_idle_timeout_secs: u64,
    workers: usize,
    upstream_allow: Vec<String>,
}

impl Default for RawGateway {
    fn default() -> Self {
        RawGateway {
            listen: "127.0.0.1:8443".into(),
            base_domain: "sandbox.localhost".into(),
            public_port: None,
            max_header_bytes: 64 * 1024,
            max_body_bytes: 10 * 1024 * 1024 * 1024,
            handshake_timeout_secs: 10,
            header_read_timeout_secs: 30,
            idle_timeout_secs: 120,
            body_read_timeout_secs: 60,
            upstream_connect_timeout_secs: 10,
            upstream_response_timeout_secs: 60,
            shutdown_grace_secs: 30,
            max_connections: 65_536,
            max_connections_per_ip: 4_096,
            max_connections_per_sandbox: 4_096,
            h2_max_concurrent_streams: 256,
            websocket_idle_timeout_secs: 600,
            workers: 0,
            upstream_allow: Vec::new(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawTelemetry {
    listen: String,
    log_format: String,
    log_level: String,
}

impl Default for RawTelemetry {
    fn default() -> Self {
        RawTelemetry {
            listen: "127.0.0.1:9464".into(),
            log_format: "text".into(),
            log_level: "info".into(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawTls {
    dev_cert: bool,
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
}

impl Default for RawTls {
    fn default() -> Self {
        RawTls {
            dev_cert: true,
            cert_file: None,
            key_file: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawStore {
    data_dir: PathBuf,
    url: Option<String>,
}

impl Default for RawStore {
    fn default() -> Self {
        RawStore {
            data_dir: PathBuf::from("data"),
            url: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawTokens {
    default_ttl_secs: i64,
    max_ttl_secs: i64,
    leeway_secs: i64,
    cache_capacity: usize,
}

impl Default for RawTokens {
    fn default() -> Self {
        RawTokens {
            default_ttl_secs: 600,
            max_ttl_secs: 86_400,
            leeway_secs: 30,
            cache_capacity: 10_000,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawOrchestrator {
    enabled: bool,
    run_as: String,
    port_range: String,
    grace_secs: u64,
    log_max_bytes: u64,
    exec_output_max_bytes: usize,
    exec_timeout_secs: u64,
    exec_max_timeout_secs: u64,
    memory_mb: u64,
    cpu_secs: u64,
    max_processes: u64,
    max_open_files: u64,
    start_timeout_secs: u64,
    pass_env: Vec<String>,
}

impl Default for RawOrchestrator {
    fn default() -> Self {
        RawOrchestrator {
            enabled: true,
            run_as: "auto".into(),
            port_range: "20000-29999".into(),
            grace_secs: 5,
            log_max_bytes: 8 * 1024 * 1024,
            exec_output_max_bytes: 1024 * 1024,
            exec_timeout_secs: 60,
            exec_max_timeout_secs: 3600,
            memory_mb: 4096,
            cpu_secs: 0,
            max_processes: 0,
            max_open_files: 4096,
            start_timeout_secs: 60,
            pass_env: Vec::new(),
        }
    }
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the config came from (`None`: embedded defaults), for messages.
    pub source: Option<PathBuf>,
    pub gateway: GatewayConfig,
    pub telemetry: TelemetryConfig,
    pub tls: TlsConfig,
    pub store: StoreConfig,
    pub tokens: TokensConfig,
    pub orchestrator: OrchestratorConfig,
    pub api: ApiConfig,
    pub cluster: ClusterConfig,
}

/// This node's identity among the nodes sharing one store.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// Unique among the nodes; defaults to the host name.
    pub node_name: String,
    /// Where other nodes reach this node's process sandboxes.
    pub advertise_addr: String,
    /// How often this node reports that it is alive; a node silent for three intervals is
    /// lost, and its sandboxes with it.
    pub heartbeat: Duration,
}

impl ClusterConfig {
    /// How long a node may go without a heartbeat before the others declare it lost.
    pub fn lost_after(&self) -> Duration {
        self.heartbeat * 3
    }
}

/// Control API rate limits: per credential, and per client address (which also bounds how
/// fast anyone can guess keys).
#[derive(Debug, Clone)]
pub struct ApiConfig {
    pub requests_per_second: std::num::NonZeroU32,
    pub burst: std::num::NonZeroU32,
    pub address_requests_per_second: std::num::NonZeroU32,
    pub address_burst: std::num::NonZeroU32,
}

/// The process driver for `command` sandboxes. Limits of 0 in the file mean unlimited
/// (`None` here); a create request may set its own.
#[derive(Debug, Clone)]
pub struct OrchestratorConfig {
    /// False makes a gateway-only node: `command` sandboxes are refused.
    pub enabled: bool,
    /// The account sandbox processes run as: `auto` (`nobody` when the gateway is root, else
    /// the gateway's own user), `gateway`, or a user name.
    pub run_as: String,
    /// Host ports handed to sandboxes, inclusive.
    pub port_range: (u16, u16),
    /// Between SIGTERM and SIGKILL when a sandbox is terminated.
    pub grace: Duration,
    /// Cap on a sandbox's captured output file.
    pub log_max_bytes: u64,
    /// Cap on each of stdout and stderr returned by exec.
    pub exec_output_max_bytes: usize,
    pub exec_timeout: Duration,
    pub exec_max_timeout: Duration,
    pub memory_mb: Option<u64>,
    pub cpu_secs: Option<u64>,
    pub max_processes: Option<u64>,
    pub max_open_files: Option<u64>,
    /// How long a new sandbox may take until every published port accepts connections;
    /// past it the sandbox is `failed` (a command that never listens must not wait forever).
    pub start_timeout: Duration,
    /// Names of the gateway's environment variables handed to sandboxes on purpose. Nothing
    /// else of the gateway's environment reaches them (an operator's cloud or database
    /// credentials would otherwise reach every sandbox).
    pub pass_env: Vec<String>,
}

/// The TLS listener and the data plane's limits.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    pub listen: SocketAddr,
    /// Lowercase, no trailing dot.
    pub base_domain: String,
    /// The port that URLs handed to clients carry (defaults to the listen port).
    pub public_port: u16,
    pub max_header_bytes: usize,
    pub max_body_bytes: u64,
    pub handshake_timeout: Duration,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub body_read_timeout: Duration,
    pub upstream_connect_timeout: Duration,
    pub upstream_response_timeout: Duration,
    pub shutdown_grace: Duration,
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    /// Client connections admitted into one sandbox at once (a WebSocket counts while open).
    pub max_connections_per_sandbox: usize,
    pub h2_max_concurrent_streams: u32,
    /// A WebSocket (or any upgraded tunnel) with no traffic either way for this long closes.
    pub websocket_idle_timeout: Duration,
    /// Data-plane workers: one single-threaded runtime and one listening socket each
    /// (`SO_REUSEPORT`), so a connection and its upstream stay on one core. `0` in the file
    /// means one per available core.
    pub workers: usize,
    /// The networks `upstream` sandboxes may be in (empty: any address the fixed rules of
    /// [`crate::proxy::upstream::UpstreamPolicy`] let through).
    pub upstream_allow: Vec<crate::proxy::upstream::Cidr>,
}

/// The plain-HTTP loopback listener for metrics and health, and logging.
#[derive(Debug, Clone)]
pub struct TelemetryConfig {
    pub listen: SocketAddr,
    pub log_json: bool,
    pub log_level: String,
}

/// Where the server certificate comes from.
#[derive(Debug, Clone)]
pub struct TlsConfig {
    /// Generate a local CA and certificate in `<data_dir>/certs` when none exists.
    pub dev_cert: bool,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// Where state lives.
#[derive(Clone)]
pub struct StoreConfig {
    pub data_dir: PathBuf,
    /// `postgres://...`: cluster mode, all state in one PostgreSQL shared by every node
    /// (`None`: SQLite in `data_dir`). May hold a password, so `Debug` redacts it.
    pub url: Option<String>,
    /// File with the key-encryption key that seals signing keys in PostgreSQL (64 hex
    /// characters or base64 of 32 bytes); `$SANDGATE_KEK` takes precedence.
    pub kek_file: Option<PathBuf>,
}

impl std::fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreConfig")
            .field("data_dir", &self.data_dir)
            .field(
                "url",
                &self.url.as_deref().map(crate::store::postgres::redact_url),
            )
            .field("kek_file", &self.kek_file)
            .finish()
    }
}

/// Checks a `[store] url`: a `postgres://` or `postgresql://` URL. The message never repeats a
/// password.
fn check_store_url(url: &str) -> Result<(), String> {
    match url::Url::parse(url) {
        Ok(u) if matches!(u.scheme(), "postgres" | "postgresql") => Ok(()),
        Ok(u) => Err(format!(
            "scheme `{}:` is not supported; use postgres://user@host:5432/sandgate",
            u.scheme()
        )),
        Err(e) => Err(format!(
            "not a URL such as postgres://user@host:5432/sandgate ({e})"
        )),
    }
}

impl StoreConfig {
    /// The SQLite database file.
    pub fn sqlite_path(&self) -> PathBuf {
        self.data_dir.join("sandgate.db")
    }

    /// The bootstrap admin key, written once on first start.
    pub fn admin_key_path(&self) -> PathBuf {
        self.data_dir.join("admin.key")
    }

    /// Dev certificates.
    pub fn certs_dir(&self) -> PathBuf {
        self.data_dir.join("certs")
    }
}

/// Connect-token lifetimes.
#[derive(Debug, Clone)]
pub struct TokensConfig {
    pub default_ttl_secs: i64,
    pub max_ttl_secs: i64,
    pub leeway_secs: i64,
    pub cache_capacity: usize,
}

impl Config {
    /// Loads the config named on the command line, else `$SANDGATE_CONFIG`, else
    /// [`DEFAULT_PATH`] if it exists, else the embedded defaults (paths relative to the working
    /// directory). Then applies the environment overrides (`$SANDGATE_STORE_URL`).
    pub fn load_default(explicit: Option<&Path>) -> Result<Config, ConfigError> {
        let config = if let Some(path) = explicit {
            Config::load(path)?
        } else if let Some(path) = std::env::var_os("SANDGATE_CONFIG").filter(|p| !p.is_empty()) {
            Config::load(Path::new(&path))?
        } else if Path::new(DEFAULT_PATH).exists() {
            Config::load(Path::new(DEFAULT_PATH))?
        } else {
            Config::from_toml("", None, Path::new("."))?
        };
        let store_url = std::env::var("SANDGATE_STORE_URL")
            .ok()
            .filter(|v| !v.is_empty());
        config.with_store_url(store_url)
    }

    /// `$SANDGATE_STORE_URL`, when set, replaces `[store] url`: keeps the database password
    /// out of the config file. Separate from [`Config::load_default`] so tests need not touch
    /// the process environment.
    fn with_store_url(mut self, url: Option<String>) -> Result<Config, ConfigError> {
        if let Some(url) = url {
            check_store_url(&url).map_err(|message| ConfigError::Env {
                var: "SANDGATE_STORE_URL",
                message,
            })?;
            self.store.url = Some(url);
        }
        Ok(self)
    }

    /// Loads and validates one file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let base = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let base = std::path::absolute(base).unwrap_or_else(|_| base.to_path_buf());
        Config::from_toml(&text, Some(path), &base)
    }

    /// Parses TOML text; relative paths resolve against `base`.
    pub fn from_toml(text: &str, path: Option<&Path>, base: &Path) -> Result<Config, ConfigError> {
        let shown = path
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("<embedded defaults>"));
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: shown.clone(),
            message: e.to_string().trim_end().replace('\n', " "),
        })?;
        let invalid = |key: &'static str, message: String| ConfigError::Invalid {
            path: shown.clone(),
            key,
            message,
        };
        let resolve = |p: &Path| {
            if p.is_absolute() {
                normalize(p)
            } else {
                normalize(&base.join(p))
            }
        };

        let g = raw.gateway;
        let listen: SocketAddr = g.listen.parse().map_err(|_| {
            invalid(
                "gateway.listen",
                format!("`{}` is not an address such as 127.0.0.1:8443", g.listen),
            )
        })?;
        let base_domain = g.base_domain.trim_end_matches('.').to_ascii_lowercase();
        if !is_valid_domain(&base_domain) {
            return Err(invalid(
                "gateway.base_domain",
                format!("`{}` is not a DNS name", g.base_domain),
            ));
        }
        if g.max_header_bytes < 1024 || g.max_header_bytes > 1024 * 1024 {
            return Err(invalid(
                "gateway.max_header_bytes",
                "must be between 1024 and 1048576".into(),
            ));
        }
        let positive = |key: &'static str, v: u64| {
            if v == 0 {
                Err(invalid(key, "must be greater than 0".into()))
            } else {
                Ok(Duration::from_secs(v))
            }
        };
        let upstream_allow = g
            .upstream_allow
            .iter()
            .map(|c| c.trim().parse())
            .collect::<Result<Vec<_>, String>>()
            .map_err(|message| invalid("gateway.upstream_allow", message))?;
        let gateway = GatewayConfig {
            listen,
            upstream_allow,
            public_port: g.public_port.unwrap_or(listen.port()),
            base_domain,
            max_header_bytes: g.max_header_bytes,
            max_body_bytes: g.max_body_bytes,
            handshake_timeout: positive(
                "gateway.handshake_timeout_secs",
                g.handshake_timeout_secs,
            )?,
            header_read_timeout: positive(
                "gateway.header_read_timeout_secs",
                g.header_read_timeout_secs,
            )?,
            idle_timeout: positive("gateway.idle_timeout_secs", g.idle_timeout_secs)?,
            body_read_timeout: positive(
                "gateway.body_read_timeout_secs",
                g.body_read_timeout_secs,
            )?,
            upstream_connect_timeout: positive(
                "gateway.upstream_connect_timeout_secs",
                g.upstream_connect_timeout_secs,
            )?,
            upstream_response_timeout: positive(
                "gateway.upstream_response_timeout_secs",
                g.upstream_response_timeout_secs,
            )?,
            shutdown_grace: Duration::from_secs(g.shutdown_grace_secs),
            max_connections: g.max_connections.max(1),
            max_connections_per_ip: g.max_connections_per_ip.max(1),
            max_connections_per_sandbox: g.max_connections_per_sandbox.max(1),
            h2_max_concurrent_streams: g.h2_max_concurrent_streams.max(1),
            websocket_idle_timeout: positive(
                "gateway.websocket_idle_timeout_secs",
                g.websocket_idle_timeout_secs,
            )?,
            workers: match g.workers {
                0 => std::thread::available_parallelism().map_or(1, usize::from),
                n => n.min(1024),
            },
        };

        let t = raw.telemetry;
        let telemetry = TelemetryConfig {
            listen: t.listen.parse().map_err(|_| {
                invalid(
                    "telemetry.listen",
                    format!("`{}` is not an address such as 127.0.0.1:9464", t.listen),
                )
            })?,
            log_json: match t.log_format.as_str() {
                "text" => false,
                "json" => true,
                other => {
                    return Err(invalid(
                        "telemetry.log_format",
                        format!("`{other}` is not one of \"text\", \"json\""),
                    ))
                }
            },
            log_level: t.log_level,
        };

        let data_dir = resolve(&raw.store.data_dir);
        if let Some(url) = &raw.store.url {
            check_store_url(url).map_err(|message| invalid("store.url", message))?;
        }
        let store = StoreConfig {
            data_dir,
            url: raw.store.url,
            kek_file: raw.cluster.kek_file.as_deref().map(resolve),
        };

        let c = raw.cluster;
        let node_name = match c.node_name {
            Some(name) => name,
            None => nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_else(|| "sandgate".into()),
        };
        if node_name.is_empty()
            || node_name.len() > 63
            || !node_name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        {
            return Err(invalid(
                "cluster.node_name",
                "must be 1-63 letters, digits, '-', '_' or '.'".into(),
            ));
        }
        let advertise_addr = c.advertise_addr.trim().to_string();
        if advertise_addr.is_empty()
            || format!("{advertise_addr}:1")
                .parse::<http::uri::Authority>()
                .is_err()
        {
            return Err(invalid(
                "cluster.advertise_addr",
                "must be an IP address or host name other nodes can reach".into(),
            ));
        }
        let cluster = ClusterConfig {
            node_name,
            advertise_addr,
            heartbeat: positive("cluster.heartbeat_secs", c.heartbeat_secs)?,
        };

        let tls = match (raw.tls.cert_file, raw.tls.key_file) {
            (Some(cert), Some(key)) => TlsConfig {
                dev_cert: raw.tls.dev_cert,
                cert_file: resolve(&cert),
                key_file: resolve(&key),
            },
            (None, None) if raw.tls.dev_cert => TlsConfig {
                dev_cert: true,
                cert_file: store.certs_dir().join("server.pem"),
                key_file: store.certs_dir().join("server-key.pem"),
            },
            (None, None) => {
                return Err(invalid(
                    "tls.cert_file",
                    "with dev_cert = false, set cert_file and key_file".into(),
                ))
            }
            (Some(_), None) => {
                return Err(invalid(
                    "tls.key_file",
                    "cert_file is set, key_file is not".into(),
                ))
            }
            (None, Some(_)) => {
                return Err(invalid(
                    "tls.cert_file",
                    "key_file is set, cert_file is not".into(),
                ))
            }
        };

        let k = raw.tokens;
        if k.max_ttl_secs < 1 || k.max_ttl_secs > 7 * 86_400 {
            return Err(invalid(
                "tokens.max_ttl_secs",
                "must be between 1 and 604800".into(),
            ));
        }
        if k.default_ttl_secs < 1 || k.default_ttl_secs > k.max_ttl_secs {
            return Err(invalid(
                "tokens.default_ttl_secs",
                "must be between 1 and tokens.max_ttl_secs".into(),
            ));
        }
        if !(0..=30).contains(&k.leeway_secs) {
            return Err(invalid(
                "tokens.leeway_secs",
                "must be between 0 and 30".into(),
            ));
        }
        let tokens = TokensConfig {
            default_ttl_secs: k.default_ttl_secs,
            max_ttl_secs: k.max_ttl_secs,
            leeway_secs: k.leeway_secs,
            cache_capacity: k.cache_capacity.max(16),
        };

        let o = raw.orchestrator;
        let port_range = o
            .port_range
            .split_once('-')
            .and_then(|(a, b)| Some((a.trim().parse::<u16>().ok()?, b.trim().parse::<u16>().ok()?)))
            .filter(|(a, b)| *a >= 1024 && a <= b)
            .ok_or_else(|| {
                invalid(
                    "orchestrator.port_range",
                    format!(
                        "`{}` is not a range such as \"20000-29999\" (from 1024 up)",
                        o.port_range
                    ),
                )
            })?;
        if o.exec_timeout_secs == 0 || o.exec_timeout_secs > o.exec_max_timeout_secs {
            return Err(invalid(
                "orchestrator.exec_timeout_secs",
                "must be between 1 and orchestrator.exec_max_timeout_secs".into(),
            ));
        }
        let nonzero = |v: u64| (v != 0).then_some(v);
        if o.run_as.is_empty() || o.run_as.contains(['/', '\0', ':']) {
            return Err(invalid(
                "orchestrator.run_as",
                "must be \"auto\", \"gateway\" or a user name".into(),
            ));
        }
        if o.start_timeout_secs == 0 || o.start_timeout_secs > 3600 {
            return Err(invalid(
                "orchestrator.start_timeout_secs",
                "must be between 1 and 3600".into(),
            ));
        }
        if let Some(bad) = o.pass_env.iter().find(|n| !is_env_name(n)) {
            return Err(invalid(
                "orchestrator.pass_env",
                format!("`{bad}` is not an environment variable name (letters, digits and `_`, not starting with a digit)"),
            ));
        }
        let orchestrator = OrchestratorConfig {
            enabled: o.enabled,
            run_as: o.run_as,
            port_range,
            grace: Duration::from_secs(o.grace_secs),
            log_max_bytes: o.log_max_bytes.max(1024),
            exec_output_max_bytes: o.exec_output_max_bytes.max(1024),
            exec_timeout: Duration::from_secs(o.exec_timeout_secs),
            exec_max_timeout: Duration::from_secs(o.exec_max_timeout_secs),
            memory_mb: nonzero(o.memory_mb),
            cpu_secs: nonzero(o.cpu_secs),
            max_processes: nonzero(o.max_processes),
            max_open_files: nonzero(o.max_open_files),
            start_timeout: Duration::from_secs(o.start_timeout_secs),
            pass_env: o.pass_env,
        };

        let a = raw.api;
        let nz = |key: &'static str, v: u32| {
            std::num::NonZeroU32::new(v)
                .ok_or_else(|| invalid(key, "must be greater than 0".into()))
        };
        let api = ApiConfig {
            requests_per_second: nz("api.requests_per_second", a.requests_per_second)?,
            burst: nz("api.burst", a.burst)?,
            address_requests_per_second: nz(
                "api.address_requests_per_second",
                a.address_requests_per_second,
            )?,
            address_burst: nz("api.address_burst", a.address_burst)?,
        };

        Ok(Config {
            source: path.map(Path::to_path_buf),
            gateway,
            telemetry,
            tls,
            store,
            tokens,
            orchestrator,
            api,
            cluster,
        })
    }
}

/// True for a portable environment variable name: `[A-Za-z_][A-Za-z0-9_]*`.
fn is_env_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Removes `.` and resolves `..` lexically, so logs show `/srv/data`, not
/// `/srv/config/../data` (no symlinks are followed).
fn normalize(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    out.push("..");
                }
            }
            other => out.push(other.as_os_str()),
        }
    }
    out
}

/// A DNS name: dot-separated labels of letters, digits and inner hyphens.
fn is_valid_domain(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(
            text,
            Some(Path::new("/etc/sg/sandgate.toml")),
            Path::new("/etc/sg"),
        )
    }

    #[test]
    fn empty_file_gives_defaults() {
        let c = parse("").unwrap();
        assert_eq!(c.gateway.listen.to_string(), "127.0.0.1:8443");
        assert_eq!(c.gateway.public_port, 8443);
        assert_eq!(c.gateway.base_domain, "sandbox.localhost");
        assert_eq!(c.telemetry.listen.to_string(), "127.0.0.1:9464");
        assert_eq!(c.store.data_dir, Path::new("/etc/sg/data"));
        assert!(c.tls.dev_cert);
        assert_eq!(c.tls.cert_file, Path::new("/etc/sg/data/certs/server.pem"));
        assert_eq!(c.tokens.default_ttl_secs, 600);
        assert_eq!(c.tokens.max_ttl_secs, 86_400);
        assert_eq!(c.tokens.leeway_secs, 30);
    }

    #[test]
    fn unknown_key_is_named() {
        let err = parse("[gateway]\nlisten_addr = \"1.2.3.4:1\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("listen_addr"), "{err}");
        assert!(err.contains("/etc/sg/sandgate.toml"), "{err}");
        let err = parse("[nope]\n").unwrap_err().to_string();
        assert!(err.contains("nope"), "{err}");
    }

    #[test]
    fn relative_paths_resolve_against_the_config_folder() {
        let c = parse("[store]\ndata_dir = \"../data\"\n").unwrap();
        assert_eq!(c.store.data_dir, Path::new("/etc/data"));
        let c = parse("[store]\ndata_dir = \"/var/lib/sandgate\"\n").unwrap();
        assert_eq!(c.store.data_dir, Path::new("/var/lib/sandgate"));
    }

    #[test]
    fn bad_values_name_their_key() {
        for (text, key) in [
            ("[gateway]\nlisten = \"nope\"", "gateway.listen"),
            ("[gateway]\nbase_domain = \"a b\"", "gateway.base_domain"),
            ("[tokens]\nleeway_secs = 60", "tokens.leeway_secs"),
            (
                "[tokens]\ndefault_ttl_secs = 100000",
                "tokens.default_ttl_secs",
            ),
            ("[tls]\ndev_cert = false", "tls.cert_file"),
            ("[telemetry]\nlog_format = \"xml\"", "telemetry.log_format"),
        ] {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.contains(key), "{text}: {err}");
        }
    }

    #[test]
    fn shipped_configs_load() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
        let dev = Config::load(&dir.join("sandgate.toml")).unwrap();
        assert_eq!(
            dev.store.data_dir,
            Path::new(env!("CARGO_MANIFEST_DIR")).join("data")
        );
        let prod = Config::load(&dir.join("production.example.toml")).unwrap();
        assert!(!prod.tls.dev_cert);
        assert_eq!(prod.gateway.public_port, 443);
        assert!(prod.telemetry.log_json);
    }

    #[test]
    fn upstream_allow_is_a_list_of_networks() {
        assert!(parse("").unwrap().gateway.upstream_allow.is_empty());
        let c = parse("[gateway]\nupstream_allow = [\"10.0.0.0/8\", \" fd00::/8 \"]\n").unwrap();
        let shown: Vec<String> = c
            .gateway
            .upstream_allow
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(shown, ["10.0.0.0/8", "fd00::/8"]);
        for (bad, says) in [
            ("10.0.0.1/8", "write 10.0.0.0/8"),
            ("10.0.0.0", "prefix is required"),
            ("intranet/8", "not an IP address"),
            ("10.0.0.0/40", "0 to 32"),
        ] {
            let text = format!("[gateway]\nupstream_allow = [\"10.0.0.0/8\", \"{bad}\"]\n");
            let err = parse(&text).unwrap_err().to_string();
            assert!(
                err.contains("gateway.upstream_allow") && err.contains(bad) && err.contains(says),
                "{bad}: {err}"
            );
        }
        let err = parse("[gateway]\nupstream_allow = \"10.0.0.0/8\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("upstream_allow"), "{err}");
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
        let prod = Config::load(&dir.join("production.example.toml")).unwrap();
        assert!(!prod.gateway.upstream_allow.is_empty());
    }

    #[test]
    fn store_url_and_kek_file_select_cluster_mode() {
        let c = parse("").unwrap();
        assert_eq!(c.store.url, None);
        assert_eq!(c.store.kek_file, None);
        let c = parse(
            "[store]\nurl = \"postgres://sg:hunter2@db:5432/sandgate\"\n[cluster]\nkek_file = \"secrets/kek\"\n",
        )
        .unwrap();
        assert_eq!(
            c.store.url.as_deref(),
            Some("postgres://sg:hunter2@db:5432/sandgate")
        );
        assert_eq!(
            c.store.kek_file.as_deref(),
            Some(Path::new("/etc/sg/secrets/kek"))
        );
        let shown = format!("{:?}", c.store);
        assert!(
            !shown.contains("hunter2") && shown.contains("db:5432"),
            "{shown}"
        );

        for bad in ["mysql://db/x", "not a url", "sqlite:data.db"] {
            let err = parse(&format!("[store]\nurl = \"{bad}\"\n"))
                .unwrap_err()
                .to_string();
            assert!(err.contains("store.url"), "{bad}: {err}");
        }
        let err = parse("[store]\nurl = \"mysql://u:hunter2@db/x\"\n")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("hunter2"), "{err}");
    }

    #[test]
    fn store_url_from_the_environment_overrides_the_file() {
        let c = parse("[store]\nurl = \"postgres://file/x\"\n").unwrap();
        let c = c.with_store_url(None).unwrap();
        assert_eq!(c.store.url.as_deref(), Some("postgres://file/x"));
        let c = c
            .with_store_url(Some("postgresql://env/y".to_owned()))
            .unwrap();
        assert_eq!(c.store.url.as_deref(), Some("postgresql://env/y"));
        let err = parse("")
            .unwrap()
            .with_store_url(Some("redis://x".to_owned()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("SANDGATE_STORE_URL"), "{err}");
    }

    #[test]
    fn base_domain_is_canonical() {
        let c =
            parse("[gateway]\nbase_domain = \"Sandbox.Example.COM.\"\npublic_port = 443").unwrap();
        assert_eq!(c.gateway.base_domain, "sandbox.example.com");
        assert_eq!(c.gateway.public_port, 443);
    }
}
