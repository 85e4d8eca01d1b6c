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
    /// The file is not valid TOML. `message` is the parser's report as the toml crate formats
    /// it: several lines, with the line of the file and a caret under the spot. Parsing stops
    /// there, so it is the only problem reported.
    #[error("config file {path} is not valid TOML:\n{}", indent(message))]
    Syntax { path: PathBuf, message: String },
    /// Everything wrong with a file that is valid TOML, all at once: unknown keys, values of
    /// the wrong type, and values that parse but make no sense. One `key: problem` line each.
    #[error(
        "config file {path} has {} {}:\n{}",
        problems.len(),
        if problems.len() == 1 { "problem" } else { "problems" },
        list(problems)
    )]
    Invalid {
        path: PathBuf,
        problems: Vec<Problem>,
    },
    /// An environment variable that overrides a key has a value that makes no sense.
    #[error("invalid environment variable {var}: {message}")]
    Env { var: &'static str, message: String },
}

/// One thing wrong with one key of a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Where: `section.key`, or `section` for a whole table.
    pub key: String,
    /// What is wrong and, where it helps, what would be right.
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

/// Indents every line by two spaces, so a multi-line report reads as belonging to the line
/// above it.
fn indent(text: &str) -> String {
    text.trim_end()
        .lines()
        .map(|line| format!("  {line}"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn list(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| format!("  {p}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The problems found so far. Checking goes on past a bad value (with a stand-in for it), so
/// one run reports every mistake in the file rather than one per attempt.
#[derive(Debug, Default)]
struct Problems(Vec<Problem>);

impl Problems {
    fn add(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.0.push(Problem {
            key: key.into(),
            message: message.into(),
        });
    }

    /// The value, or `stand_in` once the problem is noted.
    fn check<T>(&mut self, key: &str, result: Result<T, String>, stand_in: T) -> T {
        result.unwrap_or_else(|message| {
            self.add(key, message);
            stand_in
        })
    }

    /// A duration of whole seconds that must not be zero.
    fn positive(&mut self, key: &str, secs: u64) -> Duration {
        if secs == 0 {
            self.add(key, "must be greater than 0");
        }
        Duration::from_secs(secs.max(1))
    }

    fn nonzero(&mut self, key: &str, v: u32) -> std::num::NonZeroU32 {
        std::num::NonZeroU32::new(v).unwrap_or_else(|| {
            self.add(key, "must be greater than 0");
            std::num::NonZeroU32::MIN
        })
    }
}

/// Reads the TOML into [`RawConfig`], noting every unknown key and value of the wrong type.
///
/// serde stops at the first such error, so each key is first tried alone: deserialized into a
/// `RawConfig` from a document holding only that key (the struct's defaults fill the rest).
/// What fails alone is noted and dropped; the rest then deserializes as a whole, so validation
/// can still check every other value in the same run. This needs nothing from the raw
/// structs beyond their serde attributes, so a key added to one is checked like the others.
/// `Err` is a syntax error, as the toml crate formats it.
fn parse_raw(text: &str, problems: &mut Problems) -> Result<RawConfig, String> {
    let mut doc: toml::Table = toml::from_str(text).map_err(|e| e.to_string())?;
    let alone = |section: &str, value: toml::Value| {
        let mut table = toml::Table::new();
        table.insert(section.to_owned(), value);
        table.try_into::<RawConfig>()
    };
    let sections: Vec<String> = doc.keys().cloned().collect();
    for section in sections {
        if let Err(e) = alone(&section, toml::Value::Table(toml::Table::new())) {
            let what = if doc.get(&section).is_some_and(toml::Value::is_table) {
                "unknown section"
            } else {
                "unknown key at the top level (keys belong in a section)"
            };
            problems.add(&section, describe(e.message(), what));
            doc.remove(&section);
            continue;
        }
        let Some(toml::Value::Table(table)) = doc.get_mut(&section) else {
            problems.add(
                &section,
                format!("must be a table: a `[{section}]` header and keys below it"),
            );
            doc.remove(&section);
            continue;
        };
        let keys: Vec<String> = table.keys().cloned().collect();
        for key in keys {
            let Some(value) = table.get(&key).cloned() else {
                continue;
            };
            let mut one = toml::Table::new();
            one.insert(key.clone(), value);
            if let Err(e) = alone(&section, toml::Value::Table(one)) {
                problems.add(
                    format!("{section}.{key}"),
                    describe(e.message(), "unknown key"),
                );
                table.remove(&key);
            }
        }
    }
    doc.try_into::<RawConfig>().or_else(|e| {
        // Keys that pass alone but not together: not expected, but reported, not hidden.
        problems.add("(file)", e.message().trim_end().to_owned());
        Ok(RawConfig::default())
    })
}

/// serde's message for one key, reworded where it repeats the key the line already names:
/// "unknown field `x`, expected one of `a`, `b`" becomes "unknown key, expected one of `a`,
/// `b`", or "unknown key; did you mean `a`?" when one of them is close to `x`.
/// A value of the wrong type gets the expected type in words, not as a Rust type name.
fn describe(message: &str, unknown: &str) -> String {
    let message = message.trim_end();
    let Some((name, tail)) = message
        .strip_prefix("unknown field `")
        .and_then(|rest| rest.split_once('`'))
    else {
        for (rust, words) in [
            ("i64", "an integer"),
            ("u64", "an integer from 0"),
            ("usize", "an integer from 0"),
            ("u32", "an integer from 0 to 4294967295"),
            ("u16", "an integer from 0 to 65535"),
            ("path string", "a string (a path)"),
        ] {
            if let Some(start) = message
                .strip_suffix(rust)
                .filter(|m| m.ends_with("expected "))
            {
                return format!("{start}{words}");
            }
        }
        return message.to_owned();
    };
    // The known names are the back-quoted words of the tail.
    let known = tail.split('`').skip(1).step_by(2);
    match known
        .filter_map(|k| Some((closeness(name, k)?, k)))
        .min_by_key(|(d, _)| *d)
    {
        Some((_, k)) => format!("{unknown}; did you mean `{k}`?"),
        None => format!("{unknown}{tail}"),
    }
}

/// How far apart a mistyped key and a known one are (edit distance), when close enough to
/// suggest: at most two edits, or one name starting with the other (`listen_addr`, `listen`).
fn closeness(typed: &str, known: &str) -> Option<usize> {
    let (a, b): (Vec<char>, Vec<char>) = (typed.chars().collect(), known.chars().collect());
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (above + 1)
                .min(row[j] + 1)
                .min(diagonal + usize::from(ca != cb));
            diagonal = above;
        }
    }
    let distance = row[b.len()];
    let prefix =
        a.len().min(b.len()) >= 4 && (typed.starts_with(known) || known.starts_with(typed));
    (distance <= 2 || prefix).then_some(distance)
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
    access_log: bool,
}

impl Default for RawTelemetry {
    fn default() -> Self {
        RawTelemetry {
            listen: "127.0.0.1:9464".into(),
            log_format: "text".into(),
            log_level: "info".into(),
            access_log: false,
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
    isolation: String,
    uid_range: String,
    cpus: f64,
    tmp_size_mb: u64,
    egress_hosts: std::collections::BTreeMap<String, String>,
    volumes_dir: Option<PathBuf>,
    volumes_shared: bool,
    max_image_bytes: u64,
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
            isolation: "auto".into(),
            uid_range: "2000000000-2000099999".into(),
            cpus: 0.0,
            tmp_size_mb: 1024,
            egress_hosts: std::collections::BTreeMap::new(),
            volumes_dir: None,
            volumes_shared: false,
            max_image_bytes: 4 * 1024 * 1024 * 1024,
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
    /// How `command` sandboxes are kept in: see [`IsolationMode`].
    pub isolation: IsolationMode,
    /// Host uids handed out one per isolated sandbox (and gid = uid): never 0, never the
    /// gateway's, never an account of the host's (the default range is far above them).
    pub uid_range: (u32, u32),
    /// Default CPU limit of an isolated sandbox, in thousandths of a CPU; `None`: no limit.
    pub cpu_millis: Option<u64>,
    /// Size of an isolated sandbox's private `/tmp` (a tmpfs, charged to its memory).
    pub tmp_bytes: u64,
    /// Names the egress proxy sends to a fixed address (an internal package mirror), exempt
    /// from its private-address refusal: name → `host:port`.
    pub egress_hosts: std::collections::BTreeMap<String, std::net::SocketAddr>,
    /// Where volumes keep their files (`<volumes_dir>/<owner>/<name>/`); default
    /// `<data_dir>/volumes`.
    pub volumes_dir: PathBuf,
    /// Cluster mode: `volumes_dir` is one shared file system mounted on every node, so a volume
    /// belongs to no node and any node's sandboxes may mount it. Off: a volume lives on the
    /// node that made it.
    pub volumes_shared: bool,
    /// Largest image archive `POST /v1/images` takes (413 past it); its layers may unpack to
    /// 4 × this at most.
    pub max_image_bytes: u64,
}

/// `[orchestrator] isolation`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IsolationMode {
    /// Namespaces where this node can make them, else `command` sandboxes are refused (503).
    Auto,
    /// Namespaces, or the gateway does not start.
    Namespaces,
    /// Plain host processes (a developer's laptop): warned about at start.
    None,
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
    /// One `info` line per request on the TLS listener, target `sandgate::access`. Off by
    /// default: a busy gateway would write more log than anything else, and the metrics
    /// already count requests by route and status.
    pub access_log: bool,
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

    /// Parses TOML text; relative paths resolve against `base`. Reports every problem in the
    /// text at once (see [`ConfigError::Invalid`]).
    pub fn from_toml(text: &str, path: Option<&Path>, base: &Path) -> Result<Config, ConfigError> {
        let shown = path
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("<embedded defaults>"));
        let mut problems = Problems::default();
        let raw = parse_raw(text, &mut problems).map_err(|message| ConfigError::Syntax {
            path: shown.clone(),
            message,
        })?;
        let config = Config::validate(raw, path, base, &mut problems);
        if problems.0.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid {
                path: shown,
                problems: problems.0,
            })
        }
    }

    /// Checks every value, noting each problem and going on with a stand-in value; the
    /// result is only used when no problem was noted.
    fn validate(
        raw: RawConfig,
        path: Option<&Path>,
        base: &Path,
        problems: &mut Problems,
    ) -> Config {
        let resolve = |p: &Path| {
            if p.is_absolute() {
                normalize(p)
            } else {
                normalize(&base.join(p))
            }
        };
        let stand_in_addr = SocketAddr::from(([127, 0, 0, 1], 0));

        let g = raw.gateway;
        let listen: SocketAddr = problems.check(
            "gateway.listen",
            g.listen
                .parse()
                .map_err(|_| format!("`{}` is not an address such as 127.0.0.1:8443", g.listen)),
            stand_in_addr,
        );
        let base_domain = g.base_domain.trim_end_matches('.').to_ascii_lowercase();
        if !is_valid_domain(&base_domain) {
            problems.add(
                "gateway.base_domain",
                format!("`{}` is not a DNS name", g.base_domain),
            );
        }
        if g.max_header_bytes < 1024 || g.max_header_bytes > 1024 * 1024 {
            problems.add(
                "gateway.max_header_bytes",
                "must be between 1024 and 1048576",
            );
        }
        let upstream_allow = problems.check(
            "gateway.upstream_allow",
            g.upstream_allow
                .iter()
                .map(|c| c.trim().parse())
                .collect::<Result<Vec<_>, String>>(),
            Vec::new(),
        );
        let gateway = GatewayConfig {
            listen,
            upstream_allow,
            public_port: g.public_port.unwrap_or(listen.port()),
            base_domain,
            max_header_bytes: g.max_header_bytes,
            max_body_bytes: g.max_body_bytes,
            handshake_timeout: problems
                .positive("gateway.handshake_timeout_secs", g.handshake_timeout_secs),
            header_read_timeout: problems.positive(
                "gateway.header_read_timeout_secs",
                g.header_read_timeout_secs,
            ),
            idle_timeout: problems.positive("gateway.idle_timeout_secs", g.idle_timeout_secs),
            body_read_timeout: problems
                .positive("gateway.body_read_timeout_secs", g.body_read_timeout_secs),
            upstream_connect_timeout: problems.positive(
                "gateway.upstream_connect_timeout_secs",
                g.upstream_connect_timeout_secs,
            ),
            upstream_response_timeout: problems.positive(
                "gateway.upstream_response_timeout_secs",
                g.upstream_response_timeout_secs,
            ),
            shutdown_grace: Duration::from_secs(g.shutdown_grace_secs),
            max_connections: g.max_connections.max(1),
            max_connections_per_ip: g.max_connections_per_ip.max(1),
            max_connections_per_sandbox: g.max_connections_per_sandbox.max(1),
            h2_max_concurrent_streams: g.h2_max_concurrent_streams.max(1),
            websocket_idle_timeout: problems.positive(
                "gateway.websocket_idle_timeout_secs",
                g.websocket_idle_timeout_secs,
            ),
            workers: match g.workers {
                0 => std::thread::available_parallelism().map_or(1, usize::from),
                n => n.min(1024),
            },
        };

        let t = raw.telemetry;
        let telemetry = TelemetryConfig {
            listen: problems.check(
                "telemetry.listen",
                t.listen.parse().map_err(|_| {
                    format!("`{}` is not an address such as 127.0.0.1:9464", t.listen)
                }),
                stand_in_addr,
            ),
            log_json: problems.check(
                "telemetry.log_format",
                match t.log_format.as_str() {
                    "text" => Ok(false),
                    "json" => Ok(true),
                    other => Err(format!("`{other}` is not one of \"text\", \"json\"")),
                },
                false,
            ),
            log_level: t.log_level,
            access_log: t.access_log,
        };

        let data_dir = resolve(&raw.store.data_dir);
        if let Some(url) = &raw.store.url {
            if let Err(message) = check_store_url(url) {
                problems.add("store.url", message);
            }
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
            problems.add(
                "cluster.node_name",
                "must be 1-63 letters, digits, '-', '_' or '.'",
            );
        }
        let advertise_addr = c.advertise_addr.trim().to_string();
        if advertise_addr.is_empty()
            || format!("{advertise_addr}:1")
                .parse::<http::uri::Authority>()
                .is_err()
        {
            problems.add(
                "cluster.advertise_addr",
                "must be an IP address or host name other nodes can reach",
            );
        }
        let cluster = ClusterConfig {
            node_name,
            advertise_addr,
            heartbeat: problems.positive("cluster.heartbeat_secs", c.heartbeat_secs),
        };

        let dev_tls = || TlsConfig {
            dev_cert: true,
            cert_file: store.certs_dir().join("server.pem"),
            key_file: store.certs_dir().join("server-key.pem"),
        };
        let tls = match (raw.tls.cert_file, raw.tls.key_file) {
            (Some(cert), Some(key)) => TlsConfig {
                dev_cert: raw.tls.dev_cert,
                cert_file: resolve(&cert),
                key_file: resolve(&key),
            },
            (None, None) if raw.tls.dev_cert => dev_tls(),
            (None, None) => {
                problems.add(
                    "tls.cert_file",
                    "with dev_cert = false, set cert_file and key_file",
                );
                dev_tls()
            }
            (Some(_), None) => {
                problems.add("tls.key_file", "cert_file is set, key_file is not");
                dev_tls()
            }
            (None, Some(_)) => {
                problems.add("tls.cert_file", "key_file is set, cert_file is not");
                dev_tls()
            }
        };

        let k = raw.tokens;
        if k.max_ttl_secs < 1 || k.max_ttl_secs > 7 * 86_400 {
            problems.add("tokens.max_ttl_secs", "must be between 1 and 604800");
        }
        if k.default_ttl_secs < 1 || k.default_ttl_secs > k.max_ttl_secs {
            problems.add(
                "tokens.default_ttl_secs",
                "must be between 1 and tokens.max_ttl_secs",
            );
        }
        if !(0..=30).contains(&k.leeway_secs) {
            problems.add("tokens.leeway_secs", "must be between 0 and 30");
        }
        let tokens = TokensConfig {
            default_ttl_secs: k.default_ttl_secs,
            max_ttl_secs: k.max_ttl_secs,
            leeway_secs: k.leeway_secs,
            cache_capacity: k.cache_capacity.max(16),
        };

        let o = raw.orchestrator;
        let port_range = problems.check(
            "orchestrator.port_range",
            o.port_range
                .split_once('-')
                .and_then(|(a, b)| {
                    Some((a.trim().parse::<u16>().ok()?, b.trim().parse::<u16>().ok()?))
                })
                .filter(|(a, b)| *a >= 1024 && a <= b)
                .ok_or_else(|| {
                    format!(
                        "`{}` is not a range such as \"20000-29999\" (from 1024 up)",
                        o.port_range
                    )
                }),
            (20_000, 29_999),
        );
        if o.exec_timeout_secs == 0 || o.exec_timeout_secs > o.exec_max_timeout_secs {
            problems.add(
                "orchestrator.exec_timeout_secs",
                "must be between 1 and orchestrator.exec_max_timeout_secs",
            );
        }
        let nonzero = |v: u64| (v != 0).then_some(v);
        if o.run_as.is_empty() || o.run_as.contains(['/', '\0', ':']) {
            problems.add(
                "orchestrator.run_as",
                "must be \"auto\", \"gateway\" or a user name",
            );
        }
        if o.start_timeout_secs == 0 || o.start_timeout_secs > 3600 {
            problems.add(
                "orchestrator.start_timeout_secs",
                "must be between 1 and 3600",
            );
        }
        if let Some(bad) = o.pass_env.iter().find(|n| !is_env_name(n)) {
            problems.add(
                "orchestrator.pass_env",
                format!("`{bad}` is not an environment variable name (letters, digits and `_`, not starting with a digit)"),
            );
        }
        let isolation = match o.isolation.as_str() {
            "auto" => IsolationMode::Auto,
            "namespaces" => IsolationMode::Namespaces,
            "none" => IsolationMode::None,
            other => {
                problems.add(
                    "orchestrator.isolation",
                    format!("`{other}` is not one of \"auto\", \"namespaces\", \"none\""),
                );
                IsolationMode::Auto
            }
        };
        let uid_range = problems.check(
            "orchestrator.uid_range",
            o.uid_range
                .split_once('-')
                .and_then(|(a, b)| {
                    Some((a.trim().parse::<u32>().ok()?, b.trim().parse::<u32>().ok()?))
                })
                .filter(|(a, b)| *a >= 1000 && a <= b && *b < u32::MAX)
                .ok_or_else(|| {
                    format!(
                        "`{}` is not a range of uids such as \"2000000000-2000099999\" (from 1000 up)",
                        o.uid_range
                    )
                }),
            (2_000_000_000, 2_000_099_999),
        );
        if !(o.cpus.is_finite() && (0.0..=1024.0).contains(&o.cpus)) {
            problems.add("orchestrator.cpus", "must be between 0 (no limit) and 1024");
        }
        let mut egress_hosts = std::collections::BTreeMap::new();
        for (name, target) in &o.egress_hosts {
            match target.parse::<std::net::SocketAddr>() {
                Ok(addr) => {
                    egress_hosts.insert(name.trim_end_matches('.').to_ascii_lowercase(), addr);
                }
                Err(_) => problems.add(
                    "orchestrator.egress_hosts",
                    format!("`{name}` = `{target}`: the target must be an address and port such as \"127.0.0.1:3141\""),
                ),
            }
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
            start_timeout: Duration::from_secs(o.start_timeout_secs.clamp(1, 3600)),
            pass_env: o.pass_env,
            isolation,
            uid_range,
            cpu_millis: (o.cpus > 0.0 && o.cpus.is_finite())
                .then(|| (o.cpus.min(1024.0) * 1000.0).round().max(10.0) as u64),
            tmp_bytes: o.tmp_size_mb.max(1).saturating_mul(1024 * 1024),
            egress_hosts,
            volumes_dir: o
                .volumes_dir
                .as_deref()
                .map(resolve)
                .unwrap_or_else(|| store.data_dir.join("volumes")),
            volumes_shared: o.volumes_shared,
            max_image_bytes: o.max_image_bytes.max(1024),
        };

        let a = raw.api;
        let api = ApiConfig {
            requests_per_second: problems.nonzero("api.requests_per_second", a.requests_per_second),
            burst: problems.nonzero("api.burst", a.burst),
            address_requests_per_second: problems.nonzero(
                "api.address_requests_per_second",
                a.address_requests_per_second,
            ),
            address_burst: problems.nonzero("api.address_burst", a.address_burst),
        };

        Config {
            source: path.map(Path::to_path_buf),
            gateway,
            telemetry,
            tls,
            store,
            tokens,
            orchestrator,
            api,
            cluster,
        }
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

    /// The problems of a file that is valid TOML, as `key: problem` lines.
    fn problems(text: &str) -> Vec<String> {
        match parse(text) {
            Err(ConfigError::Invalid { problems, .. }) => {
                problems.iter().map(Problem::to_string).collect()
            }
            other => panic!("{text}: expected problems, got {other:?}"),
        }
    }

    #[test]
    fn every_mistake_in_a_file_is_reported_at_once() {
        let text = "[gateway]\nlisten_addr = \"1.2.3.4:1\"\nbase_domain = \"sandbox.localhost\"\n\
                    [telemetry]\nlisten = \"127.0.0.1:99999\"\n\
                    [tokens]\nleeway_secs = \"thirty\"\n";
        let found = problems(text);
        assert_eq!(found.len(), 3, "{found:#?}");
        assert!(
            found[0] == "gateway.listen_addr: unknown key; did you mean `listen`?",
            "{found:#?}"
        );
        assert_eq!(
            found[1],
            "tokens.leeway_secs: invalid type: string \"thirty\", expected an integer"
        );
        assert_eq!(
            found[2],
            "telemetry.listen: `127.0.0.1:99999` is not an address such as 127.0.0.1:9464"
        );
        // The whole message: the file first, then one indented line per problem.
        let shown = parse(text).unwrap_err().to_string();
        let lines: Vec<&str> = shown.lines().collect();
        assert_eq!(
            lines[0], "config file /etc/sg/sandgate.toml has 3 problems:",
            "{shown}"
        );
        assert_eq!(lines.len(), 4, "{shown}");
        for (line, problem) in lines[1..].iter().zip(&found) {
            assert_eq!(*line, format!("  {problem}"));
        }
    }

    #[test]
    fn unknown_keys_get_a_suggestion_or_the_list_of_known_ones() {
        assert_eq!(
            problems("[tokens]\ndefault_tl_secs = 5\n"),
            ["tokens.default_tl_secs: unknown key; did you mean `default_ttl_secs`?"]
        );
        assert_eq!(
            problems("[tls]\nfrobnicate = true\n"),
            ["tls.frobnicate: unknown key, expected one of `dev_cert`, `cert_file`, `key_file`"]
        );
    }

    #[test]
    fn wrong_types_are_named_in_words() {
        assert_eq!(
            problems("[gateway]\npublic_port = 70000\n[store]\ndata_dir = 5\n[tls]\ndev_cert = \"yes\"\n"),
            [
                "gateway.public_port: invalid value: integer `70000`, expected an integer from 0 to 65535",
                "store.data_dir: invalid type: integer `5`, expected a string (a path)",
                "tls.dev_cert: invalid type: string \"yes\", expected a boolean",
            ]
        );
    }

    #[test]
    fn validation_goes_on_past_the_first_bad_value() {
        let found = problems(
            "[gateway]\nlisten = \"nope\"\nidle_timeout_secs = 0\n\
             [tls]\ncert_file = \"a.pem\"\n[api]\nburst = 0\n",
        );
        let keys: Vec<&str> = found.iter().map(|p| p.split(':').next().unwrap()).collect();
        assert_eq!(
            keys,
            [
                "gateway.listen",
                "gateway.idle_timeout_secs",
                "tls.key_file",
                "api.burst"
            ],
            "{found:#?}"
        );
    }

    #[test]
    fn unknown_sections_and_misplaced_keys_are_named() {
        let found = problems("listen = \"x\"\n[nope]\na = 1\n[gateway]\nworkers = -1\n");
        assert_eq!(found.len(), 3, "{found:#?}");
        assert!(
            found.iter().any(|p| p.starts_with(
                "listen: unknown key at the top level (keys belong in a section), expected one of `gateway`"
            )),
            "{found:#?}"
        );
        assert!(
            found
                .iter()
                .any(|p| p.starts_with("nope: unknown section, expected one of `gateway`")),
            "{found:#?}"
        );
        assert!(
            found
                .iter()
                .any(|p| p
                    == "gateway.workers: invalid value: integer `-1`, expected an integer from 0"),
            "{found:#?}"
        );
        let found = problems("gateway = 5\n");
        assert_eq!(
            found,
            ["gateway: must be a table: a `[gateway]` header and keys below it"]
        );
    }

    #[test]
    fn a_syntax_error_keeps_the_parsers_caret() {
        let err = parse("[gateway]\nlisten = 127.0.0.1:8443\n").unwrap_err();
        assert!(matches!(err, ConfigError::Syntax { .. }), "{err:?}");
        let shown = err.to_string();
        let lines: Vec<&str> = shown.lines().collect();
        assert_eq!(
            lines[0], "config file /etc/sg/sandgate.toml is not valid TOML:",
            "{shown}"
        );
        assert!(
            lines[1].starts_with("  TOML parse error at line 2"),
            "{shown}"
        );
        let code = lines
            .iter()
            .position(|l| l.contains("| listen = 127.0.0.1:8443"))
            .unwrap_or_else(|| panic!("the line is quoted: {shown}"));
        let caret = lines[code + 1];
        assert!(
            caret.trim_start().starts_with('|') && caret.trim_end().ends_with('^'),
            "the caret is on its own line under the quoted one: {shown}"
        );
        // The caret points into the value, not at the key.
        let column = caret.find('^').unwrap();
        assert!(column >= lines[code].find("127").unwrap(), "{shown}");
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
