//! Durable state: signing keys, credentials, sandboxes, issued connect tokens (their ids, never
//! the tokens), token revocations and single-use marks, cluster nodes, and the audit log.
//!
//! Callers hold an `Arc<dyn Store>` and never see the backend: records are plain owned structs,
//! times are `i64` Unix seconds, lists and maps are Rust collections (each backend picks its own
//! column encoding), and errors are the backend-neutral [`StoreError`]. [`open`] picks the
//! backend from the config: [`sqlite::SqliteStore`] is the embedded default,
//! [`postgres::PostgresStore`] the shared store of cluster mode.
//!
//! The store is the source of truth, not a hot-path cache: the data plane keeps its own
//! in-memory views (route table, revocation set) and reloads them from here. [`Store::changes`]
//! tells those views when to reload, including for writes made by other gateways.

mod columns;
pub mod postgres;
pub mod sqlite;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::config::StoreConfig;
use crate::credential::{Scope, SecretHash};

/// How long past its `exp` an issued, revoked or used token's entry stays listed and stored.
///
/// Verifiers accept a token up to their leeway (at most 30 s) after `exp`, so an entry must
/// outlive `exp` by more than that; after this grace, the token fails on `exp` alone and the
/// entry is dead weight that [`Store::prune`] removes.
pub const EXPIRED_TOKEN_GRACE_SECS: i64 = 60;

/// A connect-token signing key as stored.
///
/// `private_der` is opaque to the store and is handed back exactly as given (PKCS#8 DER from the
/// gateway). At rest, the embedded store keeps it in its private file as is, while PostgreSQL,
/// shared and reached over the network, holds it sealed under the cluster key-encryption key
/// ([`postgres::Kek`]). Either way it is secret, so `Debug` shows only its length.
#[derive(Clone, PartialEq, Eq)]
pub struct StoredSigningKey {
    /// Key id, published in the JWKS and in each token's `kid` header.
    pub kid: String,
    /// When the key was made; the newest key signs, older ones only verify.
    pub created_at: i64,
    /// The private key bytes (see the type's doc).
    pub private_der: Vec<u8>,
}

impl fmt::Debug for StoredSigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoredSigningKey")
            .field("kid", &self.kid)
            .field("created_at", &self.created_at)
            .field(
                "private_der",
                &format_args!("<redacted {} bytes>", self.private_der.len()),
            )
            .finish()
    }
}

/// An API key as stored: never the secret itself, only its hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialRecord {
    /// `cred_...`, shown in the API, used as a token's `sub` and as a sandbox's `owner`.
    pub id: String,
    /// Human label given at creation.
    pub name: String,
    /// What the key may do; `admin` implies the rest.
    pub scopes: Vec<Scope>,
    /// SHA-256 of the secret; unique, and the key authentication looks up by.
    pub secret_hash: SecretHash,
    pub created_at: i64,
    /// After this the key no longer authenticates; `None` never expires.
    pub expires_at: Option<i64>,
    /// Caps the TTL of connect tokens this key mints, below the gateway-wide maximum.
    pub max_token_ttl_secs: Option<i64>,
    /// Set once by [`Store::revoke_credential`]; a revoked key never authenticates again.
    pub revoked_at: Option<i64>,
}

impl CredentialRecord {
    /// Whether the key may authenticate at `now`: not revoked and not expired.
    pub fn is_active(&self, now: i64) -> bool {
        self.revoked_at.is_none() && self.expires_at.is_none_or(|exp| now < exp)
    }
}

/// A connect token as issued, so that it can be listed and revoked by its `jti`. Never the token
/// itself: a record cannot be turned back into a token, so the list is safe to show to whoever
/// may revoke.
///
/// Only the control plane reads these; the proxy verifies tokens by signature and never looks
/// here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedToken {
    /// The token's id (its `jti` claim): the handle for revocation.
    pub jti: String,
    /// The sandbox it opens (its `sbx` claim).
    pub sandbox: String,
    /// The sandbox port it opens.
    pub port: u16,
    /// The credential that minted it (its `sub` claim).
    pub sub: String,
    pub issued_at: i64,
    /// Its `exp` claim; the record is pruned [`EXPIRED_TOKEN_GRACE_SECS`] after it.
    pub exp: i64,
    /// A single-use token (its `once` claim).
    pub single_use: bool,
}

/// Life-cycle of a sandbox. Wire names are lowercase (`"running"`), as in the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SandboxStatus {
    /// Created; its process is starting or its upstream not yet confirmed.
    Starting,
    /// Serving: tokens for it are honoured.
    Running,
    /// Terminated by the API or its timeout.
    Stopped,
    /// Its process exited or could not start.
    Failed,
    /// Cluster mode: the node running it stopped answering.
    Lost,
}

impl SandboxStatus {
    /// Every status, for parsing and exhaustive tests.
    pub const ALL: [SandboxStatus; 5] = [
        SandboxStatus::Starting,
        SandboxStatus::Running,
        SandboxStatus::Stopped,
        SandboxStatus::Failed,
        SandboxStatus::Lost,
    ];

    /// The wire and storage name.
    pub fn as_str(&self) -> &'static str {
        match self {
            SandboxStatus::Starting => "starting",
            SandboxStatus::Running => "running",
            SandboxStatus::Stopped => "stopped",
            SandboxStatus::Failed => "failed",
            SandboxStatus::Lost => "lost",
        }
    }

    /// Parses a name produced by [`SandboxStatus::as_str`].
    pub fn parse(s: &str) -> Option<SandboxStatus> {
        SandboxStatus::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// Whether the sandbox can still serve traffic (and so its tokens are still worth checking
    /// further); every other status is final and answers 410.
    pub fn is_live(&self) -> bool {
        matches!(self, SandboxStatus::Starting | SandboxStatus::Running)
    }
}

impl fmt::Display for SandboxStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A sandbox as stored. `Debug` prints `env` and `secret_env` keys but never their values, since
/// environments routinely carry API keys for the code inside.
#[derive(Clone, PartialEq)]
pub struct SandboxRecord {
    /// DNS-label-safe, unguessable id (lowercase alphanumerics, ≥ 20 chars).
    pub id: String,
    /// Id of the credential that created it; non-admins see only their own.
    pub owner: String,
    pub status: SandboxStatus,
    /// Published ports, as they appear in URLs; nothing else is reachable.
    pub ports: Vec<u16>,
    /// Host of an externally run sandbox (`upstream:port`); `None` for process sandboxes.
    pub upstream: Option<String>,
    /// The command of a process sandbox; `None` for external ones.
    pub command: Option<Vec<String>>,
    /// Extra environment for the command.
    pub env: BTreeMap<String, String>,
    /// Origins allowed cross-origin (CORS and cookie-authenticated requests).
    pub cors_origins: Vec<String>,
    /// Send the upstream's own `host:port` as `Host` instead of the one received.
    pub rewrite_host: bool,
    /// Caller-supplied JSON, returned as is.
    pub metadata: serde_json::Value,
    pub created_at: i64,
    /// When the sandbox times out; `None` runs until deleted.
    pub expires_at: Option<i64>,
    /// When it reached a final status.
    pub ended_at: Option<i64>,
    /// Published port → host port, for process sandboxes: kept so a restart (or another node)
    /// can still route to a process that outlived it, and so ports are not handed out twice.
    pub host_ports: BTreeMap<u16, u16>,
    /// Cluster mode: the node that runs it (where `host_ports` are bound).
    pub node: Option<String>,
    /// Why it failed or was lost, e.g. an exit status and log tail; for humans only.
    pub detail: Option<String>,
    /// Process sandboxes: the process group and the resource limits it runs under.
    pub process: ProcessInfo,
    /// The caller's handle for it (1–63 of `[a-z0-9-]`, checked by the API): unique among the
    /// owner's live sandboxes, so that a redelivered job finds the sandbox it made. The store
    /// enforces that on insert ([`StoreError::NameInUse`]); an ended sandbox keeps its name,
    /// which is then free for a new one. Fixed at creation: [`Store::update_sandbox`] keeps it.
    pub name: Option<String>,
    /// The caller's labels to find sandboxes by. Only [`Store::set_sandbox_tags`] changes them,
    /// so that a status update racing a PATCH cannot write old tags back.
    pub tags: BTreeMap<String, String>,
    /// Environment the caller declared secret: it reaches the command and every exec like
    /// `env` (keys never in both), but the API shows only its keys, nothing logs it, and the
    /// store keeps it as private as the signing keys (sealed under the KEK in PostgreSQL).
    /// Fixed at creation: [`Store::update_sandbox`] keeps it.
    pub secret_env: BTreeMap<String, String>,
}

/// Which sandboxes [`Store::find_sandboxes`] lists; every condition given must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SandboxFilter {
    /// Only this credential's sandboxes (a non-admin caller's own).
    pub owner: Option<String>,
    /// Only sandboxes with this name, live or ended.
    pub name: Option<String>,
    /// Only sandboxes carrying every one of these `(key, value)` tags.
    pub tags: Vec<(String, String)>,
}

impl SandboxFilter {
    /// Whether `s` passes every condition: the reference every backend must agree with.
    pub fn matches(&self, s: &SandboxRecord) -> bool {
        self.owner.as_ref().is_none_or(|o| *o == s.owner)
            && self
                .name
                .as_ref()
                .is_none_or(|n| s.name.as_ref() == Some(n))
            && self.has_tags(s)
    }

    /// Whether `s` carries every tag asked for. The backends narrow by owner and name in SQL
    /// (plain, indexed columns) and check tags, kept as JSON text, with this.
    pub fn has_tags(&self, s: &SandboxRecord) -> bool {
        self.tags
            .iter()
            .all(|(k, v)| s.tags.get(k).is_some_and(|have| have == v))
    }
}

/// What the process driver needs to remember about a `command` sandbox.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ProcessInfo {
    /// Process group id (the leader's pid), so a restarted gateway can find and end leftovers.
    pub pgid: Option<i32>,
    /// Address space limit for each process, MiB.
    pub memory_mb: Option<u64>,
    /// CPU time limit for each process, seconds.
    pub cpu_secs: Option<u64>,
    /// Maximum processes for the sandbox's user.
    pub max_processes: Option<u64>,
    /// Maximum open files for each process.
    pub max_open_files: Option<u64>,
    /// CPU limit of an isolated sandbox, thousandths of a CPU.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_millis: Option<u64>,
    /// `"namespaces"` or `"none"`: how the sandbox was kept in.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub isolation: Option<String>,
    /// An isolated sandbox's own host uid.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    /// Host names (or `*.suffix` patterns) its egress proxy lets it reach; empty: no egress.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub egress: Vec<String>,
    /// Seconds without a request, connection or exec after which the sandbox is ended
    /// (`idle_timeout_secs` on creation); `None`: never for idleness.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_timeout_secs: Option<u64>,
    /// The owner's volumes it mounts: what makes `DELETE /v1/volumes/{name}` answer 409 while
    /// it lives.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<VolumeMount>,
    /// The image it started from (`None`: `host`): what makes `DELETE /v1/images/{name}`
    /// answer 409 while it lives.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// The image's `WorkingDir`: where its command and execs start (`None`: `/workspace`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
}

/// One volume mounted into an isolated sandbox, as asked for on creation (validated).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeMount {
    /// The volume's name, among the sandbox owner's volumes.
    pub volume: String,
    /// Where the sandbox sees it: absolute and normalized.
    pub path: String,
    /// The subtree of the volume mounted there; `None`: the whole volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub_path: Option<String>,
    #[serde(default)]
    pub read_only: bool,
}

/// A named volume: a folder of files that outlives the sandboxes that mount it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeRecord {
    /// The credential that made it; names are unique per owner.
    pub owner: String,
    /// 1 to 63 of `[a-z0-9-]`.
    pub name: String,
    pub created_at: i64,
    /// Cluster mode: the node whose disk holds its folder (`None`: every node sees it, on a
    /// shared file system, or there is only one node).
    pub node: Option<String>,
    /// The host uid owning its files, which every isolated sandbox mounting it runs as (one uid
    /// per owner and node: see [`crate::sandbox::volume`]).
    pub uid: u32,
}

impl fmt::Debug for SandboxRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        struct EnvKeys<'a>(&'a BTreeMap<String, String>);
        impl fmt::Debug for EnvKeys<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_map()
                    .entries(self.0.keys().map(|k| (k, format_args!("<redacted>"))))
                    .finish()
            }
        }
        f.debug_struct("SandboxRecord")
            .field("id", &self.id)
            .field("owner", &self.owner)
            .field("status", &self.status)
            .field("ports", &self.ports)
            .field("upstream", &self.upstream)
            .field("command", &self.command)
            .field("env", &EnvKeys(&self.env))
            .field("cors_origins", &self.cors_origins)
            .field("rewrite_host", &self.rewrite_host)
            .field("metadata", &self.metadata)
            .field("created_at", &self.created_at)
            .field("expires_at", &self.expires_at)
            .field("ended_at", &self.ended_at)
            .field("process", &self.process)
            .field("host_ports", &self.host_ports)
            .field("node", &self.node)
            .field("detail", &self.detail)
            .field("name", &self.name)
            .field("tags", &self.tags)
            .field("secret_env", &EnvKeys(&self.secret_env))
            .finish()
    }
}

/// A gateway node of a cluster, as it announced itself in its last heartbeat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRecord {
    /// `[cluster] node_name`: unique in the cluster, and the value of [`SandboxRecord::node`]
    /// for the sandboxes it runs.
    pub name: String,
    /// Where other nodes reach this node's process sandboxes (an IP address or a host name).
    pub advertise_addr: String,
    /// Whether its orchestrator runs `command` sandboxes (a gateway-only node does not).
    pub runs_sandboxes: bool,
    /// The sandgate version it runs, for operators during rolling upgrades.
    pub version: String,
    /// When the node process started.
    pub started_at: i64,
    /// When it last called [`Store::heartbeat`]; a node whose heartbeat is too old is lost.
    pub last_heartbeat: i64,
    /// `host:port` where other nodes reach its cluster relay (its TLS listener at
    /// `advertise_addr`), for the isolated sandboxes it runs; `None` from a node that predates
    /// the relay.
    pub relay_addr: Option<String>,
}

impl NodeRecord {
    /// Whether `other` announces the same node: every field but `last_heartbeat` equal. A
    /// heartbeat that changes only that is not worth a [`Change::NodeChanged`].
    fn same_announcement(&self, other: &NodeRecord) -> bool {
        NodeRecord {
            last_heartbeat: other.last_heartbeat,
            ..self.clone()
        } == *other
    }
}

/// A change another node may need to apply to its in-memory views, announced by
/// [`Store::changes`] once the write has committed. Carries ids only, never secrets: receivers
/// read the record itself from the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A connect token was revoked until `exp` (the later expiry, if it was revoked before).
    TokenRevoked { jti: String, exp: i64 },
    /// A sandbox was inserted or updated (status changes included: terminated, failed, lost).
    SandboxChanged { id: String },
    /// A credential was revoked.
    CredentialRevoked { id: String },
    /// A signing key was added (a key rotation): reload the key set.
    SigningKeyAdded { kid: String },
    /// A node appeared or changed what it announces (address, role, version, start time).
    /// Heartbeats that only refresh `last_heartbeat` are not announced.
    NodeChanged { name: String },
    /// The feed was interrupted (database connection lost and regained): the receiver must
    /// reload everything it caches, because changes may have been missed.
    Resync,
}

/// The `detail` of a sandbox that [`Store::mark_node_lost`] marks lost.
fn lost_detail(node: &str) -> String {
    format!("node {node} stopped answering")
}

/// How many changes a slow receiver of [`Store::changes`] may fall behind before it misses some
/// (and sees [`broadcast::error::RecvError::Lagged`], which it must treat as [`Change::Resync`]).
pub const CHANGE_FEED_CAPACITY: usize = 4096;

/// One audit-log entry. Its serialized form is the API's audit event object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEvent {
    /// Assigned by the store, increasing in insertion order; pass 0 when appending.
    pub id: i64,
    pub time: i64,
    /// Who did it: a credential id, or e.g. `"system"` for timeouts.
    pub actor: String,
    /// What happened, e.g. `"sandbox.create"`, `"token.revoke"`.
    pub action: String,
    /// What it happened to: a sandbox id, credential id or token `jti`.
    pub target: String,
    /// The client's address, when the event came from a request.
    pub client_addr: Option<String>,
}

/// A boxed backend error, kept as the `source` of [`StoreError`] variants.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why a store operation failed. Backend-neutral so callers (and `error.rs`) never match on
/// SQLite or PostgreSQL error types.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The record to change does not exist (e.g. [`Store::update_sandbox`] on an unknown id).
    /// Lookups that may legitimately miss return `Ok(None)` instead.
    #[error("record not found")]
    NotFound,
    /// The write collides with an existing record (duplicate id, kid or secret hash). The
    /// message names what collided, not any secret.
    #[error("conflict: {0}")]
    Conflict(String),
    /// [`Store::insert_sandbox`]: a live sandbox of the same owner already has this name (the
    /// caller looks it up with [`Store::live_sandbox_named`]).
    #[error("a live sandbox already has the name {0}")]
    NameInUse(String),
    /// The backend cannot serve the request right now (locked or busy past the timeout, I/O
    /// error, disk full, connection lost). Retrying later may succeed; maps to 503.
    #[error("store unavailable")]
    Unavailable(#[source] BoxError),
    /// Stored data cannot be decoded (bad JSON column, unknown scope, wrong-length hash) or the
    /// database file is damaged. Needs an operator; retrying will not help.
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// The database was written by a newer sandgate whose schema this build does not know;
    /// refusing to run beats misreading it.
    #[error("database schema version {found} is newer than this build supports ({supported}); upgrade sandgate")]
    SchemaTooNew { found: i64, supported: i64 },
    /// The store could not be opened or created at `path` (permissions, missing parent, not a
    /// database). Only [`sqlite::SqliteStore::open`] returns it; PostgreSQL that cannot be
    /// reached is [`StoreError::Unavailable`].
    #[error("cannot open store at {path}")]
    Open {
        path: std::path::PathBuf,
        #[source]
        source: BoxError,
    },
    /// The key-encryption key that seals signing keys in the shared store is missing,
    /// malformed or not the cluster's. Needs an operator; the message says what to set.
    #[error(transparent)]
    Kek(#[from] postgres::KekError),
    /// Any other backend failure: a bug (bad query, API misuse) rather than a state of the world.
    #[error("store backend error")]
    Backend(#[source] BoxError),
}

/// Opens the store that `config` names: PostgreSQL when `[store] url` is set (with the
/// key-encryption key from `$SANDGATE_KEK` or `[cluster] kek_file`, see
/// [`postgres::Kek::from_env_or_file`]), else SQLite in `data_dir` (a brief blocking open).
///
/// `application_name` names this process's PostgreSQL sessions (`pg_stat_activity`), e.g.
/// `sandgate <node>`.
pub async fn open(
    config: &StoreConfig,
    application_name: &str,
) -> Result<Arc<dyn Store>, StoreError> {
    match &config.url {
        Some(url) => {
            let kek = postgres::Kek::from_env_or_file(config.kek_file.as_deref())?;
            let mut options = postgres::PostgresOptions::new(url, kek);
            options.application_name = application_name.to_owned();
            let store = postgres::PostgresStore::open(options).await?;
            Ok(Arc::new(store))
        }
        None => Ok(Arc::new(sqlite::SqliteStore::open(&config.sqlite_path())?)),
    }
}

/// Durable state behind every gateway. Object safe: used as `Arc<dyn Store>`.
///
/// Implementations must make each method atomic on its own; none of them spans several calls
/// in a transaction. Ordering guarantees are stated per method and checked by the shared
/// conformance tests (`store::conformance`), which every backend runs.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// All signing keys, oldest first (the last one is the newest, which signs).
    async fn signing_keys(&self) -> Result<Vec<StoredSigningKey>, StoreError>;
    /// Adds a key; [`StoreError::Conflict`] if the `kid` exists.
    async fn insert_signing_key(&self, key: &StoredSigningKey) -> Result<(), StoreError>;

    /// Adds a credential; [`StoreError::Conflict`] if the id or the secret hash exists.
    async fn insert_credential(&self, c: &CredentialRecord) -> Result<(), StoreError>;
    /// All credentials, revoked and expired ones included, oldest first.
    async fn credentials(&self) -> Result<Vec<CredentialRecord>, StoreError>;
    /// One credential by id.
    async fn credential(&self, id: &str) -> Result<Option<CredentialRecord>, StoreError>;
    /// The credential whose secret hashes to `hash`, revoked or not (the caller checks
    /// [`CredentialRecord::is_active`]).
    async fn credential_by_hash(
        &self,
        hash: &SecretHash,
    ) -> Result<Option<CredentialRecord>, StoreError>;
    /// Marks a credential revoked at `at`. `false` if it is unknown or already revoked (the
    /// first revocation time is kept).
    async fn revoke_credential(&self, id: &str, at: i64) -> Result<bool, StoreError>;

    /// Adds a sandbox; [`StoreError::Conflict`] if the id exists, [`StoreError::NameInUse`] if
    /// it is live ([`SandboxStatus::is_live`]) and has the name of another live sandbox of the
    /// same owner. Atomic across every gateway sharing the store: of racing inserts with one
    /// name, one wins.
    async fn insert_sandbox(&self, s: &SandboxRecord) -> Result<(), StoreError>;
    /// Replaces every field of the sandbox with `s.id` but `name` and `tags`, which it keeps;
    /// [`StoreError::NotFound`] if absent. A status that leaves the live ones frees the name.
    async fn update_sandbox(&self, s: &SandboxRecord) -> Result<(), StoreError>;
    /// Replaces the tags of the sandbox `id` (and nothing else); [`StoreError::NotFound`] if
    /// absent. Announced as [`Change::SandboxChanged`], like any other update.
    async fn set_sandbox_tags(
        &self,
        id: &str,
        tags: &BTreeMap<String, String>,
    ) -> Result<(), StoreError>;
    /// One sandbox by id.
    async fn sandbox(&self, id: &str) -> Result<Option<SandboxRecord>, StoreError>;
    /// The live sandbox of `owner` named `name`, if any (there is at most one).
    async fn live_sandbox_named(
        &self,
        owner: &str,
        name: &str,
    ) -> Result<Option<SandboxRecord>, StoreError>;
    /// All sandboxes, ended ones included, oldest first (by `created_at`).
    async fn sandboxes(&self) -> Result<Vec<SandboxRecord>, StoreError>;
    /// The sandboxes that `filter` matches ([`SandboxFilter::matches`]), ended ones included,
    /// oldest first as [`Store::sandboxes`].
    async fn find_sandboxes(
        &self,
        filter: &SandboxFilter,
    ) -> Result<Vec<SandboxRecord>, StoreError>;

    /// Records that the token `jti` (expiring at `exp`) is revoked. Idempotent.
    async fn revoke_token(&self, jti: &str, exp: i64) -> Result<(), StoreError>;
    /// Revoked tokens that may still verify at `now`: those with
    /// `exp >= now - EXPIRED_TOKEN_GRACE_SECS`, as `(jti, exp)`.
    async fn revoked_tokens(&self, now: i64) -> Result<Vec<(String, i64)>, StoreError>;
    /// Marks a single-use token used: insert-if-absent, atomically across every gateway sharing
    /// the store. `true` only for the one caller that marked it first.
    async fn mark_token_used(&self, jti: &str, exp: i64) -> Result<bool, StoreError>;
    /// Used single-use tokens that may still verify at `now`, with the same cut-off as
    /// [`Store::revoked_tokens`].
    async fn used_tokens(&self, now: i64) -> Result<Vec<(String, i64)>, StoreError>;

    /// Records issued tokens and, in the same transaction, appends audit events (their `id`s
    /// are ignored): the group commit of token issuance, so that a token and its `token.issue`
    /// event cost one commit (one fsync), shared by every issuance in the batch. Either all of
    /// it is written or none; [`StoreError::Conflict`] if a `jti` is already recorded.
    async fn record_issued_tokens(
        &self,
        tokens: &[IssuedToken],
        events: &[AuditEvent],
    ) -> Result<(), StoreError>;
    /// One issued token by `jti`, expired or revoked ones included until [`Store::prune`]
    /// drops them.
    async fn issued_token(&self, jti: &str) -> Result<Option<IssuedToken>, StoreError>;
    /// Issued tokens that are still live: `exp > live_after` and not revoked (through
    /// [`Store::revoke_token`]), only those of `sandbox` if given, oldest first (by
    /// `issued_at`, then insertion order). The caller picks `live_after`, e.g. `now - leeway`
    /// for the tokens a verifier would still accept.
    async fn live_tokens(
        &self,
        live_after: i64,
        sandbox: Option<&str>,
    ) -> Result<Vec<IssuedToken>, StoreError>;

    /// Appends an event (its `id` is ignored) and returns the id assigned.
    async fn append_audit(&self, e: &AuditEvent) -> Result<i64, StoreError>;
    /// Appends several events in one transaction, in order: one commit (one fsync) for many
    /// concurrent callers. The default appends one at a time.
    async fn append_audit_batch(&self, events: &[AuditEvent]) -> Result<(), StoreError> {
        for e in events {
            self.append_audit(e).await?;
        }
        Ok(())
    }
    /// The newest `limit` events, newest first.
    async fn audit(&self, limit: usize) -> Result<Vec<AuditEvent>, StoreError>;

    /// Drops issued, revoked and used token entries whose `exp` is more than
    /// [`EXPIRED_TOKEN_GRACE_SECS`] before `now`: such tokens fail verification on `exp` alone.
    /// Credentials, sandboxes and the audit log are kept.
    async fn prune(&self, now: i64) -> Result<(), StoreError>;

    /// Records that `node` is alive: inserts it, or replaces every field of the node with that
    /// name (`last_heartbeat` included). Announces [`Change::NodeChanged`] only when the node is
    /// new or a field other than `last_heartbeat` changed.
    async fn heartbeat(&self, node: &NodeRecord) -> Result<(), StoreError>;
    /// Every node that ever sent a heartbeat, lost ones included, by name.
    async fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError>;
    /// Declares node `name` lost, atomically: only if its `last_heartbeat` is before
    /// `heartbeat_before`, every sandbox it runs whose status is live
    /// ([`SandboxStatus::is_live`]) becomes [`SandboxStatus::Lost`] with `ended_at = now` and a
    /// `detail` saying why. Returns their ids, sorted, and announces
    /// [`Change::SandboxChanged`] for each.
    ///
    /// Does nothing (returns no ids) when the node heartbeated meanwhile or is unknown. Safe
    /// when several nodes race to declare the same node lost: each sandbox makes the transition
    /// once, so only one caller gets its id.
    async fn mark_node_lost(
        &self,
        name: &str,
        heartbeat_before: i64,
        now: i64,
    ) -> Result<Vec<String>, StoreError>;

    /// Adds a volume; [`StoreError::Conflict`] if its owner already has one of that name.
    async fn insert_volume(&self, v: &VolumeRecord) -> Result<(), StoreError>;
    /// One volume by owner and name.
    async fn volume(&self, owner: &str, name: &str) -> Result<Option<VolumeRecord>, StoreError>;
    /// Every volume, oldest first (by `created_at`, then owner and name).
    async fn volumes(&self) -> Result<Vec<VolumeRecord>, StoreError>;
    /// Removes a volume's record; `false` if there was none.
    async fn delete_volume(&self, owner: &str, name: &str) -> Result<bool, StoreError>;

    /// Subscribes to the changes written through this store, by this process and (for a shared
    /// store) every other gateway, each announced after its commit, in commit order.
    ///
    /// A receiver that sees [`Change::Resync`], or falls more than [`CHANGE_FEED_CAPACITY`]
    /// behind ([`broadcast::error::RecvError::Lagged`]), must reload everything it caches.
    /// Every backend in this crate has a feed; `None` (the default) means the backend cannot
    /// announce changes and callers must poll.
    fn changes(&self) -> Option<broadcast::Receiver<Change>> {
        None
    }
}

/// Behaviour every [`Store`] backend must show. Each function takes a fresh, empty store and
/// panics on a violation; a backend's tests call them all through [`conformance_tests!`].
#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "in tests a panic is the failure report")]
pub(crate) mod conformance {
    use super::*;
    use crate::credential::{hash_secret, Secret};

    /// Something that owns a store for the length of a test (e.g. a store plus the temporary
    /// directory its file lives in).
    pub(crate) trait Fixture: Send + Sync {
        fn store(&self) -> &dyn Store;
    }

    /// Generates one `#[tokio::test]` per conformance function. `$make` is an async fn returning
    /// a fresh [`Fixture`].
    macro_rules! conformance_tests {
        ($make:path) => {
            $crate::store::conformance::conformance_tests!(@each $make;
                signing_keys_round_trip_oldest_first,
                duplicate_signing_key_conflicts,
                credentials_round_trip,
                credential_by_hash_finds_only_the_right_one,
                duplicate_credential_conflicts,
                revoke_credential_is_idempotent,
                sandboxes_round_trip_oldest_first,
                update_sandbox_replaces_every_field,
                secret_env_round_trips_and_is_never_shown,
                update_unknown_sandbox_is_not_found,
                duplicate_sandbox_conflicts,
                revoke_token_is_idempotent_and_listed_until_expired,
                mark_token_used_is_first_wins,
                mark_token_used_is_atomic_under_concurrency,
                audit_is_newest_first_with_limit,
                audit_batches_keep_their_order,
                issued_tokens_are_found_by_jti_and_listed_while_live,
                issued_tokens_commit_with_their_audit_events_or_not_at_all,
                prune_drops_only_long_expired_token_entries,
                nodes_round_trip_and_heartbeats_replace,
                mark_node_lost_ends_only_that_nodes_live_sandboxes,
                mark_node_lost_spares_a_node_that_heartbeated,
                mark_node_lost_is_one_transition_under_races,
                changes_are_announced_after_commit,
                live_names_are_unique_per_owner,
                a_name_is_free_once_its_sandbox_ends,
                racing_inserts_of_one_name_have_one_winner,
                tags_round_trip_and_are_replaced_alone,
                find_sandboxes_filters_by_owner_name_and_every_tag,
                volumes_round_trip_per_owner,
                volume_names_conflict_per_owner_only,
                sandbox_volume_mounts_round_trip,
            );
        };
        (@each $make:path; $($name:ident),* $(,)?) => {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    let fixture = $make().await;
                    $crate::store::conformance::$name(
                        $crate::store::conformance::Fixture::store(&fixture),
                    )
                    .await;
                }
            )*
        };
    }
    pub(crate) use conformance_tests;

    pub(crate) fn credential(id: &str, created_at: i64) -> (Secret, CredentialRecord) {
        let secret = Secret::generate();
        let record = CredentialRecord {
            id: id.to_owned(),
            name: format!("name of {id}"),
            scopes: vec![Scope::SandboxesRead, Scope::TokensIssue],
            secret_hash: secret.hash(),
            created_at,
            expires_at: None,
            max_token_ttl_secs: None,
            revoked_at: None,
        };
        (secret, record)
    }

    pub(crate) fn sandbox(id: &str, created_at: i64) -> SandboxRecord {
        SandboxRecord {
            id: id.to_owned(),
            owner: "cred_owner".to_owned(),
            status: SandboxStatus::Starting,
            ports: vec![8080, 3000],
            upstream: None,
            command: Some(vec![
                "python3".to_owned(),
                "-m".to_owned(),
                "http.server".to_owned(),
            ]),
            env: BTreeMap::from([
                ("API_KEY".to_owned(), "s3cr3t".to_owned()),
                ("EMPTY".to_owned(), String::new()),
            ]),
            cors_origins: vec!["https://app.example.com".to_owned()],
            rewrite_host: true,
            metadata: serde_json::json!({"team": "ml", "n": 3, "nested": {"list": [1, "two", null]}}),
            created_at,
            expires_at: Some(created_at + 3600),
            ended_at: None,
            host_ports: BTreeMap::from([(8080, 40001), (3000, 40002)]),
            node: Some("node-a".to_owned()),
            detail: None,
            process: ProcessInfo::default(),
            name: None,
            tags: BTreeMap::from([
                ("team".to_owned(), "ml".to_owned()),
                (
                    "k8s.io/app-name_x".to_owned(),
                    "ünïcode \"quoted\" =".to_owned(),
                ),
            ]),
            secret_env: BTreeMap::from([
                ("OPENAI_API_KEY".to_owned(), SECRET_VALUE.to_owned()),
                ("QUOTED".to_owned(), "a \"b\" \\ ü\n".to_owned()),
            ]),
        }
    }

    /// The value of a secret in [`sandbox`]: tests look for it in what must never hold it.
    pub(crate) const SECRET_VALUE: &str = "sk-conformance-7f3a91c2e4";

    /// A live sandbox of `owner` named `name`.
    pub(crate) fn named(id: &str, owner: &str, name: &str, created_at: i64) -> SandboxRecord {
        SandboxRecord {
            owner: owner.to_owned(),
            name: Some(name.to_owned()),
            status: SandboxStatus::Running,
            ..sandbox(id, created_at)
        }
    }

    pub(crate) fn issued(jti: &str, sandbox: &str, issued_at: i64, exp: i64) -> IssuedToken {
        IssuedToken {
            jti: jti.to_owned(),
            sandbox: sandbox.to_owned(),
            port: 8080,
            sub: "cred_owner".to_owned(),
            issued_at,
            exp,
            single_use: false,
        }
    }

    pub(crate) fn node(name: &str, last_heartbeat: i64) -> NodeRecord {
        NodeRecord {
            name: name.to_owned(),
            advertise_addr: "10.0.0.5".to_owned(),
            runs_sandboxes: true,
            version: "0.1.0".to_owned(),
            started_at: 1_000,
            last_heartbeat,
            relay_addr: Some("10.0.0.5:443".to_owned()),
        }
    }

    /// Receives the next change, failing the test if none arrives within 5 s.
    pub(crate) async fn next_change(rx: &mut broadcast::Receiver<Change>) -> Change {
        tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv())
            .await
            .expect("a change within 5 s")
            .expect("the change feed is open and not lagging")
    }

    pub(crate) fn signing_key(kid: &str, created_at: i64) -> StoredSigningKey {
        StoredSigningKey {
            kid: kid.to_owned(),
            created_at,
            private_der: (0..=255u8).chain([0, 0, 7]).collect(),
        }
    }

    pub(crate) async fn signing_keys_round_trip_oldest_first(store: &dyn Store) {
        assert!(store.signing_keys().await.unwrap().is_empty());
        let newer = signing_key("k-newer", 2_000);
        let older = signing_key("k-older", 1_000);
        store.insert_signing_key(&newer).await.unwrap();
        store.insert_signing_key(&older).await.unwrap();
        assert_eq!(store.signing_keys().await.unwrap(), vec![older, newer]);
    }

    pub(crate) async fn duplicate_signing_key_conflicts(store: &dyn Store) {
        let key = signing_key("k1", 1_000);
        store.insert_signing_key(&key).await.unwrap();
        let again = StoredSigningKey {
            created_at: 5,
            private_der: vec![1],
            ..key.clone()
        };
        let err = store.insert_signing_key(&again).await.unwrap_err();
        assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
        assert_eq!(store.signing_keys().await.unwrap(), vec![key]);
    }

    pub(crate) async fn credentials_round_trip(store: &dyn Store) {
        assert!(store.credentials().await.unwrap().is_empty());
        assert_eq!(store.credential("cred_nope").await.unwrap(), None);

        let (_, plain) = credential("cred_b", 200);
        let (_, mut full) = credential("cred_a", 100);
        full.scopes = Scope::ALL.to_vec();
        full.expires_at = Some(9_999);
        full.max_token_ttl_secs = Some(300);
        full.revoked_at = Some(150);
        let (_, mut none) = credential("cred_c", 300);
        none.scopes = vec![];

        for c in [&plain, &full, &none] {
            store.insert_credential(c).await.unwrap();
        }
        assert_eq!(
            store.credential("cred_a").await.unwrap(),
            Some(full.clone())
        );
        assert_eq!(
            store.credential("cred_b").await.unwrap(),
            Some(plain.clone())
        );
        assert_eq!(
            store.credential("cred_c").await.unwrap(),
            Some(none.clone())
        );
        assert_eq!(store.credentials().await.unwrap(), vec![full, plain, none]);
    }

    pub(crate) async fn credential_by_hash_finds_only_the_right_one(store: &dyn Store) {
        let (secret_a, a) = credential("cred_a", 1);
        let (secret_b, b) = credential("cred_b", 2);
        store.insert_credential(&a).await.unwrap();
        store.insert_credential(&b).await.unwrap();

        let found = store
            .credential_by_hash(&hash_secret(secret_a.expose()))
            .await
            .unwrap();
        assert_eq!(found, Some(a));
        let found = store.credential_by_hash(&secret_b.hash()).await.unwrap();
        assert_eq!(found, Some(b.clone()));
        let unknown = store
            .credential_by_hash(&Secret::generate().hash())
            .await
            .unwrap();
        assert_eq!(unknown, None);

        // Revoked credentials are still found: the caller decides what revoked means.
        assert!(store.revoke_credential("cred_b", 50).await.unwrap());
        let found = store.credential_by_hash(&secret_b.hash()).await.unwrap();
        assert_eq!(found.map(|c| c.revoked_at), Some(Some(50)));
    }

    pub(crate) async fn duplicate_credential_conflicts(store: &dyn Store) {
        let (secret, original) = credential("cred_a", 1);
        store.insert_credential(&original).await.unwrap();

        let (_, same_id) = credential("cred_a", 2);
        let err = store.insert_credential(&same_id).await.unwrap_err();
        assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");

        let (_, mut same_hash) = credential("cred_other", 3);
        same_hash.secret_hash = secret.hash();
        let err = store.insert_credential(&same_hash).await.unwrap_err();
        assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");

        assert_eq!(store.credentials().await.unwrap(), vec![original]);
    }

    pub(crate) async fn revoke_credential_is_idempotent(store: &dyn Store) {
        let (_, c) = credential("cred_a", 1);
        let (_, untouched) = credential("cred_b", 2);
        store.insert_credential(&c).await.unwrap();
        store.insert_credential(&untouched).await.unwrap();

        assert!(store.revoke_credential("cred_a", 100).await.unwrap());
        assert!(!store.revoke_credential("cred_a", 200).await.unwrap());
        assert!(!store.revoke_credential("cred_unknown", 100).await.unwrap());

        let revoked = store.credential("cred_a").await.unwrap().unwrap();
        assert_eq!(revoked.revoked_at, Some(100), "first revocation time kept");
        assert!(!revoked.is_active(101));
        assert_eq!(store.credential("cred_b").await.unwrap(), Some(untouched));
    }

    pub(crate) async fn sandboxes_round_trip_oldest_first(store: &dyn Store) {
        assert!(store.sandboxes().await.unwrap().is_empty());
        assert_eq!(store.sandbox("nope").await.unwrap(), None);

        let process = sandbox("sbxprocess0000000000001", 200);
        let external = SandboxRecord {
            id: "sbxexternal000000000001".to_owned(),
            status: SandboxStatus::Running,
            ports: vec![443],
            upstream: Some("10.0.3.7".to_owned()),
            command: None,
            env: BTreeMap::new(),
            cors_origins: vec![],
            rewrite_host: false,
            metadata: serde_json::json!({}),
            created_at: 100,
            expires_at: None,
            host_ports: BTreeMap::new(),
            node: None,
            secret_env: BTreeMap::new(),
            ..sandbox("unused", 0)
        };
        let ended = SandboxRecord {
            id: "sbxended000000000000001".to_owned(),
            status: SandboxStatus::Failed,
            metadata: serde_json::Value::Null,
            ended_at: Some(350),
            detail: Some("exit status 1\nTraceback: ünïcode…".to_owned()),
            process: ProcessInfo::default(),
            ..sandbox("unused", 300)
        };
        for s in [&process, &external, &ended] {
            store.insert_sandbox(s).await.unwrap();
        }

        assert_eq!(
            store.sandbox(&process.id).await.unwrap(),
            Some(process.clone())
        );
        assert_eq!(
            store.sandbox(&external.id).await.unwrap(),
            Some(external.clone())
        );
        assert_eq!(store.sandbox(&ended.id).await.unwrap(), Some(ended.clone()));
        assert_eq!(
            store.sandboxes().await.unwrap(),
            vec![external, process, ended]
        );
    }

    pub(crate) async fn update_sandbox_replaces_every_field(store: &dyn Store) {
        let original = SandboxRecord {
            name: Some("keep-me".to_owned()),
            ..sandbox("sbxupdate00000000000001", 100)
        };
        let bystander = sandbox("sbxbystander00000000001", 50);
        store.insert_sandbox(&original).await.unwrap();
        store.insert_sandbox(&bystander).await.unwrap();

        let updated = SandboxRecord {
            id: original.id.clone(),
            owner: "cred_new_owner".to_owned(),
            status: SandboxStatus::Lost,
            ports: vec![1],
            upstream: Some("127.0.0.1".to_owned()),
            command: None,
            env: BTreeMap::from([("X".to_owned(), "y".to_owned())]),
            cors_origins: vec!["https://a".to_owned(), "https://b".to_owned()],
            rewrite_host: false,
            metadata: serde_json::json!([1, 2, 3]),
            created_at: 101,
            expires_at: None,
            ended_at: Some(500),
            host_ports: BTreeMap::new(),
            node: None,
            detail: Some("node node-a stopped answering".to_owned()),
            process: ProcessInfo::default(),
            name: Some("other".to_owned()),
            tags: BTreeMap::from([("stale".to_owned(), "copy".to_owned())]),
            secret_env: BTreeMap::new(),
        };
        store.update_sandbox(&updated).await.unwrap();
        // Every field but the name and the secrets (fixed at creation) and the tags
        // (`set_sandbox_tags`).
        let expected = SandboxRecord {
            name: original.name.clone(),
            tags: original.tags.clone(),
            secret_env: original.secret_env.clone(),
            ..updated
        };
        assert_eq!(store.sandbox(&original.id).await.unwrap(), Some(expected));
        assert_eq!(store.sandbox(&bystander.id).await.unwrap(), Some(bystander));
        assert_eq!(store.sandboxes().await.unwrap().len(), 2);
    }

    pub(crate) async fn secret_env_round_trips_and_is_never_shown(store: &dyn Store) {
        let with = sandbox("sbxsecret00000000000001", 10);
        let without = SandboxRecord {
            secret_env: BTreeMap::new(),
            ..sandbox("sbxsecret00000000000002", 11)
        };
        store.insert_sandbox(&with).await.unwrap();
        store.insert_sandbox(&without).await.unwrap();
        let read = store.sandbox(&with.id).await.unwrap().unwrap();
        assert_eq!(read.secret_env, with.secret_env);
        assert_eq!(
            store
                .sandbox(&without.id)
                .await
                .unwrap()
                .unwrap()
                .secret_env,
            BTreeMap::new()
        );
        let listed = store
            .find_sandboxes(&SandboxFilter::default())
            .await
            .unwrap();
        assert_eq!(listed, vec![with.clone(), without]);
        // Status updates keep the secrets, whatever the record passed in carries.
        store
            .update_sandbox(&SandboxRecord {
                status: SandboxStatus::Stopped,
                secret_env: BTreeMap::new(),
                ..with.clone()
            })
            .await
            .unwrap();
        let read = store.sandbox(&with.id).await.unwrap().unwrap();
        assert_eq!(read.status, SandboxStatus::Stopped);
        assert_eq!(read.secret_env, with.secret_env);
        // `{:?}` names the keys, never a value.
        let shown = format!("{read:?} {read:#?}");
        assert!(shown.contains("OPENAI_API_KEY"), "{shown}");
        assert!(!shown.contains(SECRET_VALUE), "{shown}");
        assert!(!shown.contains("s3cr3t"), "env values hidden too: {shown}");
    }

    pub(crate) async fn update_unknown_sandbox_is_not_found(store: &dyn Store) {
        let err = store
            .update_sandbox(&sandbox("sbxmissing0000000000001", 1))
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::NotFound), "{err:?}");
        assert!(store.sandboxes().await.unwrap().is_empty());
    }

    pub(crate) async fn duplicate_sandbox_conflicts(store: &dyn Store) {
        let original = sandbox("sbxdup000000000000000001", 1);
        store.insert_sandbox(&original).await.unwrap();
        let err = store
            .insert_sandbox(&SandboxRecord {
                owner: "cred_someone_else".to_owned(),
                ..original.clone()
            })
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
        assert_eq!(store.sandboxes().await.unwrap(), vec![original]);
    }

    pub(crate) async fn revoke_token_is_idempotent_and_listed_until_expired(store: &dyn Store) {
        let now = 10_000;
        assert!(store.revoked_tokens(now).await.unwrap().is_empty());
        store.revoke_token("jti-live", now + 600).await.unwrap();
        store.revoke_token("jti-live", now + 600).await.unwrap();
        store
            .revoke_token("jti-grace", now - EXPIRED_TOKEN_GRACE_SECS)
            .await
            .unwrap();
        store
            .revoke_token("jti-gone", now - EXPIRED_TOKEN_GRACE_SECS - 1)
            .await
            .unwrap();

        let mut listed = store.revoked_tokens(now).await.unwrap();
        listed.sort();
        assert_eq!(
            listed,
            vec![
                ("jti-grace".to_owned(), now - EXPIRED_TOKEN_GRACE_SECS),
                ("jti-live".to_owned(), now + 600),
            ]
        );
        // Revocations and single-use marks are separate sets.
        assert!(store.used_tokens(now).await.unwrap().is_empty());
        assert_eq!(store.revoked_tokens(0).await.unwrap().len(), 3);
    }

    pub(crate) async fn mark_token_used_is_first_wins(store: &dyn Store) {
        let now = 10_000;
        assert!(store.used_tokens(now).await.unwrap().is_empty());
        assert!(store.mark_token_used("jti-1", now + 60).await.unwrap());
        assert!(!store.mark_token_used("jti-1", now + 60).await.unwrap());
        assert!(store.mark_token_used("jti-2", now + 60).await.unwrap());
        store
            .mark_token_used("jti-old", now - EXPIRED_TOKEN_GRACE_SECS - 1)
            .await
            .unwrap();

        let mut listed = store.used_tokens(now).await.unwrap();
        listed.sort();
        assert_eq!(
            listed,
            vec![
                ("jti-1".to_owned(), now + 60),
                ("jti-2".to_owned(), now + 60),
            ]
        );
        assert!(store.revoked_tokens(now).await.unwrap().is_empty());
    }

    pub(crate) async fn mark_token_used_is_atomic_under_concurrency(store: &dyn Store) {
        for round in 0..8 {
            let jti = format!("jti-race-{round}");
            let attempts = (0..16).map(|_| store.mark_token_used(&jti, 99_999));
            let results = futures_util::future::join_all(attempts).await;
            let winners = results
                .into_iter()
                .map(|r| r.unwrap())
                .filter(|&first| first)
                .count();
            assert_eq!(winners, 1, "round {round}");
        }
        assert_eq!(store.used_tokens(0).await.unwrap().len(), 8);
    }

    pub(crate) async fn audit_batches_keep_their_order(store: &dyn Store) {
        let events: Vec<AuditEvent> = (0..5)
            .map(|i| AuditEvent {
                id: 0,
                time: 1_000 + i,
                actor: "cred_batch".into(),
                action: format!("batch.{i}"),
                target: "t".into(),
                client_addr: None,
            })
            .collect();
        store.append_audit_batch(&events).await.unwrap();
        let newest: Vec<String> = store
            .audit(5)
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.action)
            .collect();
        assert_eq!(
            newest,
            ["batch.4", "batch.3", "batch.2", "batch.1", "batch.0"]
        );
    }

    pub(crate) async fn issued_tokens_are_found_by_jti_and_listed_while_live(store: &dyn Store) {
        let now = 10_000;
        assert!(store.live_tokens(0, None).await.unwrap().is_empty());
        assert_eq!(store.issued_token("jti-none").await.unwrap(), None);

        let b_late = IssuedToken {
            port: 3000,
            sub: "cred_other".to_owned(),
            single_use: true,
            ..issued("jti-b-late", "sbxb", now - 5, now + 600)
        };
        let a_first = IssuedToken {
            port: u16::MAX,
            ..issued("jti-a-first", "sbxa", now - 50, now + 60)
        };
        // Same `issued_at` as `a_first`: insertion order breaks the tie.
        let a_second = issued("jti-a-second", "sbxa", now - 50, now + 1);
        let edge = issued("jti-edge", "sbxa", now - 40, now);
        let expired = issued("jti-expired", "sbxa", now - 900, now - 300);
        let revoked = issued("jti-revoked", "sbxb", now - 30, now + 600);
        let all = [&b_late, &a_first, &a_second, &edge, &expired, &revoked];
        for t in all {
            store
                .record_issued_tokens(std::slice::from_ref(t), &[])
                .await
                .unwrap();
        }
        store.revoke_token(&revoked.jti, revoked.exp).await.unwrap();
        // A revocation of a jti that was never recorded hides nothing else.
        store
            .revoke_token("jti-unrecorded", now + 600)
            .await
            .unwrap();

        // Every record reads back as written, expired and revoked ones included.
        for t in all {
            assert_eq!(store.issued_token(&t.jti).await.unwrap().as_ref(), Some(t));
        }
        assert_eq!(
            store.issued_token("jti-a").await.unwrap(),
            None,
            "no prefix match"
        );

        // Live: `exp > live_after`, not revoked; oldest first.
        assert_eq!(
            store.live_tokens(now, None).await.unwrap(),
            vec![a_first.clone(), a_second.clone(), b_late.clone()]
        );
        assert_eq!(
            store.live_tokens(now - 1, None).await.unwrap(),
            vec![
                a_first.clone(),
                a_second.clone(),
                edge.clone(),
                b_late.clone()
            ]
        );
        assert_eq!(
            store.live_tokens(now, Some("sbxa")).await.unwrap(),
            vec![a_first.clone(), a_second]
        );
        assert_eq!(
            store.live_tokens(now, Some("sbxb")).await.unwrap(),
            vec![b_late.clone()]
        );
        assert!(store
            .live_tokens(now, Some("sbxnone"))
            .await
            .unwrap()
            .is_empty());
        assert!(store.live_tokens(now + 600, None).await.unwrap().is_empty());
        assert_eq!(
            store.live_tokens(now + 59, None).await.unwrap(),
            vec![a_first, b_late]
        );
    }

    pub(crate) async fn issued_tokens_commit_with_their_audit_events_or_not_at_all(
        store: &dyn Store,
    ) {
        let event = |i: i64| AuditEvent {
            id: 0,
            time: 1_000 + i,
            actor: "cred_owner".into(),
            action: "token.issue".into(),
            target: format!("sbxa:8080 jti=jti-{i}"),
            client_addr: Some("127.0.0.1".into()),
        };
        store.record_issued_tokens(&[], &[]).await.unwrap();
        let tokens = [
            issued("jti-0", "sbxa", 1, 500),
            issued("jti-1", "sbxa", 2, 500),
        ];
        store
            .record_issued_tokens(&tokens, &[event(0), event(1)])
            .await
            .unwrap();
        assert_eq!(store.live_tokens(0, None).await.unwrap(), tokens);
        let targets: Vec<String> = store
            .audit(10)
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.target)
            .collect();
        assert_eq!(targets, ["sbxa:8080 jti=jti-1", "sbxa:8080 jti=jti-0"]);

        // Audit events alone, as the audit log writes most batches.
        store.record_issued_tokens(&[], &[event(2)]).await.unwrap();
        assert_eq!(store.audit(10).await.unwrap().len(), 3);

        // A jti recorded twice conflicts, and nothing of that batch is written.
        let again = IssuedToken {
            sandbox: "sbxother".into(),
            ..tokens[1].clone()
        };
        let err = store
            .record_issued_tokens(&[issued("jti-3", "sbxa", 3, 500), again], &[event(3)])
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
        assert_eq!(store.issued_token("jti-3").await.unwrap(), None);
        assert_eq!(
            store.issued_token("jti-1").await.unwrap().as_ref(),
            Some(&tokens[1])
        );
        assert_eq!(store.audit(10).await.unwrap().len(), 3);
    }

    pub(crate) async fn audit_is_newest_first_with_limit(store: &dyn Store) {
        assert!(store.audit(10).await.unwrap().is_empty());
        let mut appended = Vec::new();
        for i in 0..5 {
            let event = AuditEvent {
                id: 0,
                time: 1_000 + i,
                actor: format!("cred_{i}"),
                action: "sandbox.create".to_owned(),
                target: format!("sbx{i}"),
                client_addr: (i % 2 == 0).then(|| "192.0.2.1:5555".to_owned()),
            };
            let id = store.append_audit(&event).await.unwrap();
            appended.push(AuditEvent { id, ..event });
        }
        let ids: Vec<i64> = appended.iter().map(|e| e.id).collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids increase: {ids:?}");

        let newest_first: Vec<AuditEvent> = appended.iter().rev().cloned().collect();
        assert_eq!(store.audit(100).await.unwrap(), newest_first);
        assert_eq!(store.audit(5).await.unwrap(), newest_first);
        assert_eq!(store.audit(2).await.unwrap(), newest_first[..2]);
        assert!(store.audit(0).await.unwrap().is_empty());
        assert_eq!(store.audit(usize::MAX).await.unwrap().len(), 5);

        // Newest means last appended, even when clocks disagree.
        let late = AuditEvent {
            id: 0,
            time: 1,
            actor: "system".to_owned(),
            action: "sandbox.expire".to_owned(),
            target: "sbx0".to_owned(),
            client_addr: None,
        };
        let id = store.append_audit(&late).await.unwrap();
        assert_eq!(
            store.audit(1).await.unwrap(),
            vec![AuditEvent { id, ..late }]
        );
    }

    pub(crate) async fn prune_drops_only_long_expired_token_entries(store: &dyn Store) {
        let now = 50_000;
        let cutoff = now - EXPIRED_TOKEN_GRACE_SECS;
        for (jti, exp) in [("old", cutoff - 1), ("edge", cutoff), ("live", now + 10)] {
            store.revoke_token(&format!("r-{jti}"), exp).await.unwrap();
            assert!(store
                .mark_token_used(&format!("u-{jti}"), exp)
                .await
                .unwrap());
            store
                .record_issued_tokens(&[issued(&format!("i-{jti}"), "sbxa", 1, exp)], &[])
                .await
                .unwrap();
        }
        let (_, c) = credential("cred_kept", 1);
        store.insert_credential(&c).await.unwrap();
        store.revoke_credential(&c.id, 2).await.unwrap();
        store.insert_sandbox(&sandbox("sbxkept", 1)).await.unwrap();
        let event = AuditEvent {
            id: 0,
            time: 1,
            actor: "a".to_owned(),
            action: "b".to_owned(),
            target: "c".to_owned(),
            client_addr: None,
        };
        store.append_audit(&event).await.unwrap();

        store.prune(now).await.unwrap();
        store.prune(now).await.unwrap();

        // Listing with `now = 0` shows everything still stored.
        let mut revoked = store.revoked_tokens(0).await.unwrap();
        revoked.sort();
        assert_eq!(
            revoked,
            vec![
                ("r-edge".to_owned(), cutoff),
                ("r-live".to_owned(), now + 10)
            ]
        );
        let mut used = store.used_tokens(0).await.unwrap();
        used.sort();
        assert_eq!(
            used,
            vec![
                ("u-edge".to_owned(), cutoff),
                ("u-live".to_owned(), now + 10)
            ]
        );
        // A pruned single-use entry could be marked again, but its token fails on `exp` by then.
        assert!(!store.mark_token_used("u-live", now + 10).await.unwrap());
        assert_eq!(store.issued_token("i-old").await.unwrap(), None);
        let issued: Vec<(String, i64)> = store
            .live_tokens(i64::MIN, None)
            .await
            .unwrap()
            .into_iter()
            .map(|t| (t.jti, t.exp))
            .collect();
        assert_eq!(
            issued,
            vec![
                ("i-edge".to_owned(), cutoff),
                ("i-live".to_owned(), now + 10)
            ]
        );

        assert_eq!(store.credentials().await.unwrap().len(), 1);
        assert_eq!(store.sandboxes().await.unwrap().len(), 1);
        assert_eq!(store.audit(10).await.unwrap().len(), 1);
    }

    pub(crate) async fn nodes_round_trip_and_heartbeats_replace(store: &dyn Store) {
        assert!(store.nodes().await.unwrap().is_empty());
        let b = node("node-b", 100);
        let a = NodeRecord {
            runs_sandboxes: false,
            advertise_addr: "gw-a.internal".to_owned(),
            relay_addr: None,
            ..node("node-a", 90)
        };
        store.heartbeat(&b).await.unwrap();
        store.heartbeat(&a).await.unwrap();
        assert_eq!(store.nodes().await.unwrap(), vec![a.clone(), b.clone()]);

        // A later heartbeat replaces every field of that node only.
        let a2 = NodeRecord {
            advertise_addr: "10.0.0.9".to_owned(),
            version: "0.2.0".to_owned(),
            started_at: 2_000,
            last_heartbeat: 2_005,
            relay_addr: Some("10.0.0.9:8443".to_owned()),
            ..a
        };
        store.heartbeat(&a2).await.unwrap();
        assert_eq!(store.nodes().await.unwrap(), vec![a2, b]);
    }

    pub(crate) async fn mark_node_lost_ends_only_that_nodes_live_sandboxes(store: &dyn Store) {
        store.heartbeat(&node("node-a", 100)).await.unwrap();
        store.heartbeat(&node("node-b", 100)).await.unwrap();
        let on_a = |id: &str, status| SandboxRecord {
            status,
            node: Some("node-a".to_owned()),
            ..sandbox(id, 10)
        };
        let starting = on_a("sbxastarting", SandboxStatus::Starting);
        let running = on_a("sbxarunning", SandboxStatus::Running);
        let stopped = SandboxRecord {
            ended_at: Some(50),
            ..on_a("sbxastopped", SandboxStatus::Stopped)
        };
        let failed = on_a("sbxafailed", SandboxStatus::Failed);
        let elsewhere = SandboxRecord {
            node: Some("node-b".to_owned()),
            ..on_a("sbxbrunning", SandboxStatus::Running)
        };
        let external = SandboxRecord {
            node: None,
            upstream: Some("10.0.3.7".to_owned()),
            ..on_a("sbxexternal", SandboxStatus::Running)
        };
        for s in [
            &starting, &running, &stopped, &failed, &elsewhere, &external,
        ] {
            store.insert_sandbox(s).await.unwrap();
        }

        let lost = store.mark_node_lost("node-a", 150, 1_000).await.unwrap();
        assert_eq!(
            lost,
            vec!["sbxarunning".to_owned(), "sbxastarting".to_owned()]
        );
        for was in [&starting, &running] {
            let now = store.sandbox(&was.id).await.unwrap().unwrap();
            assert_eq!(now.status, SandboxStatus::Lost);
            assert!(!now.status.is_live());
            assert_eq!(now.ended_at, Some(1_000));
            assert!(now.detail.as_deref().is_some_and(|d| d.contains("node-a")));
            assert_eq!(
                SandboxRecord {
                    status: was.status,
                    ended_at: was.ended_at,
                    detail: was.detail.clone(),
                    ..now
                },
                *was,
                "nothing else changes"
            );
        }
        for untouched in [&stopped, &failed, &elsewhere, &external] {
            assert_eq!(
                store.sandbox(&untouched.id).await.unwrap().as_ref(),
                Some(untouched)
            );
        }

        // Already lost: a second call finds nothing live.
        assert!(store
            .mark_node_lost("node-a", 150, 2_000)
            .await
            .unwrap()
            .is_empty());
        let again = store.sandbox(&running.id).await.unwrap().unwrap();
        assert_eq!(again.ended_at, Some(1_000), "the first transition stands");
    }

    pub(crate) async fn mark_node_lost_spares_a_node_that_heartbeated(store: &dyn Store) {
        let live = SandboxRecord {
            node: Some("node-a".to_owned()),
            status: SandboxStatus::Running,
            ..sandbox("sbxalive", 1)
        };
        store.insert_sandbox(&live).await.unwrap();

        // Unknown node: nothing to judge by.
        assert!(store
            .mark_node_lost("node-a", 150, 1)
            .await
            .unwrap()
            .is_empty());
        // A heartbeat at (not before) the cut-off counts as alive.
        store.heartbeat(&node("node-a", 150)).await.unwrap();
        assert!(store
            .mark_node_lost("node-a", 150, 1)
            .await
            .unwrap()
            .is_empty());
        // It heartbeated after the caller decided it was late.
        store.heartbeat(&node("node-a", 200)).await.unwrap();
        assert!(store
            .mark_node_lost("node-a", 150, 1)
            .await
            .unwrap()
            .is_empty());
        assert_eq!(store.sandbox(&live.id).await.unwrap(), Some(live.clone()));

        assert_eq!(
            store.mark_node_lost("node-a", 201, 1).await.unwrap(),
            vec![live.id]
        );
    }

    pub(crate) async fn mark_node_lost_is_one_transition_under_races(store: &dyn Store) {
        store.heartbeat(&node("node-a", 100)).await.unwrap();
        let mut ids = Vec::new();
        for i in 0..5 {
            let s = SandboxRecord {
                node: Some("node-a".to_owned()),
                status: SandboxStatus::Running,
                ..sandbox(&format!("sbxrace{i}"), i)
            };
            store.insert_sandbox(&s).await.unwrap();
            ids.push(s.id);
        }
        let attempts = (0..8).map(|i| store.mark_node_lost("node-a", 150, 1_000 + i));
        let results: Vec<Vec<String>> = futures_util::future::join_all(attempts)
            .await
            .into_iter()
            .map(|r| r.unwrap())
            .collect();
        let winners: Vec<&Vec<String>> = results.iter().filter(|r| !r.is_empty()).collect();
        assert_eq!(winners.len(), 1, "{results:?}");
        assert_eq!(*winners[0], ids);
        let ended: Vec<Option<i64>> = store
            .sandboxes()
            .await
            .unwrap()
            .into_iter()
            .map(|s| s.ended_at)
            .collect();
        assert!(ended.windows(2).all(|w| w[0] == w[1]), "{ended:?}");
    }

    pub(crate) async fn live_names_are_unique_per_owner(store: &dyn Store) {
        let web = named("sbxweb00000000000000001", "cred_a", "web", 10);
        store.insert_sandbox(&web).await.unwrap();

        // The same live name again, for the same owner: refused, whatever the rest says.
        for status in [SandboxStatus::Starting, SandboxStatus::Running] {
            let again = SandboxRecord {
                status,
                ..named("sbxweb00000000000000002", "cred_a", "web", 11)
            };
            let err = store.insert_sandbox(&again).await.unwrap_err();
            assert!(
                matches!(&err, StoreError::NameInUse(n) if n == "web"),
                "{err:?}"
            );
        }
        assert_eq!(
            store.sandbox("sbxweb00000000000000002").await.unwrap(),
            None
        );
        // A duplicate id is still a plain conflict, even with a taken name.
        let err = store.insert_sandbox(&web).await.unwrap_err();
        assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");

        // Another owner, another name, an ended sandbox, or no name at all: all fine.
        let other_owner = named("sbxweb00000000000000003", "cred_b", "web", 12);
        let other_name = named("sbxweb00000000000000004", "cred_a", "web-2", 13);
        let ended = SandboxRecord {
            status: SandboxStatus::Failed,
            ended_at: Some(14),
            ..named("sbxweb00000000000000005", "cred_a", "web", 14)
        };
        let unnamed = [
            sandbox("sbxunnamed0000000000001", 15),
            sandbox("sbxunnamed0000000000002", 16),
        ];
        for s in [&other_owner, &other_name, &ended, &unnamed[0], &unnamed[1]] {
            store.insert_sandbox(s).await.unwrap();
        }

        assert_eq!(
            store.live_sandbox_named("cred_a", "web").await.unwrap(),
            Some(web.clone())
        );
        assert_eq!(
            store.live_sandbox_named("cred_b", "web").await.unwrap(),
            Some(other_owner)
        );
        assert_eq!(
            store.live_sandbox_named("cred_c", "web").await.unwrap(),
            None
        );
        assert_eq!(
            store.live_sandbox_named("cred_a", "we").await.unwrap(),
            None
        );
        assert_eq!(store.sandboxes().await.unwrap().len(), 6);
    }

    pub(crate) async fn a_name_is_free_once_its_sandbox_ends(store: &dyn Store) {
        let first = named("sbxjob00000000000000001", "cred_a", "job-1", 10);
        store.insert_sandbox(&first).await.unwrap();

        // Ended through `update_sandbox` (a delete, an exit, a timeout): the name is free.
        let stopped = SandboxRecord {
            status: SandboxStatus::Stopped,
            ended_at: Some(20),
            name: None,
            ..first.clone()
        };
        store.update_sandbox(&stopped).await.unwrap();
        let kept = store.sandbox(&first.id).await.unwrap().unwrap();
        assert_eq!(
            kept.name.as_deref(),
            Some("job-1"),
            "an ended sandbox keeps its name"
        );
        assert_eq!(
            store.live_sandbox_named("cred_a", "job-1").await.unwrap(),
            None
        );

        let second = SandboxRecord {
            node: Some("node-a".to_owned()),
            ..named("sbxjob00000000000000002", "cred_a", "job-1", 30)
        };
        store.insert_sandbox(&second).await.unwrap();
        assert_eq!(
            store.live_sandbox_named("cred_a", "job-1").await.unwrap(),
            Some(second.clone())
        );

        // Ended by its node being lost: free again.
        store.heartbeat(&node("node-a", 100)).await.unwrap();
        let lost = store.mark_node_lost("node-a", 150, 200).await.unwrap();
        assert!(lost.contains(&second.id), "{lost:?}");
        assert_eq!(
            store.live_sandbox_named("cred_a", "job-1").await.unwrap(),
            None
        );
        let third = named("sbxjob00000000000000003", "cred_a", "job-1", 300);
        store.insert_sandbox(&third).await.unwrap();

        let all = store
            .find_sandboxes(&SandboxFilter {
                name: Some("job-1".to_owned()),
                ..SandboxFilter::default()
            })
            .await
            .unwrap();
        let ids: Vec<&str> = all.iter().map(|s| s.id.as_str()).collect();
        assert_eq!(ids, [&first.id, &second.id, &third.id]);
    }

    pub(crate) async fn racing_inserts_of_one_name_have_one_winner(store: &dyn Store) {
        for round in 0..4 {
            let records: Vec<SandboxRecord> = (0..12)
                .map(|i| named(&format!("sbxrace{round}x{i:02}"), "cred_a", "one", i))
                .collect();
            let attempts = records.iter().map(|r| store.insert_sandbox(r));
            let results = futures_util::future::join_all(attempts).await;
            let mut won = Vec::new();
            for (record, result) in records.iter().zip(results) {
                match result {
                    Ok(()) => won.push(record.clone()),
                    Err(StoreError::NameInUse(name)) => assert_eq!(name, "one"),
                    Err(e) => panic!("round {round}: unexpected {e:?}"),
                }
            }
            assert_eq!(won.len(), 1, "round {round}");
            assert_eq!(
                store.live_sandbox_named("cred_a", "one").await.unwrap(),
                Some(won[0].clone())
            );
            // End the winner, so that the next round races for a free name again.
            store
                .update_sandbox(&SandboxRecord {
                    status: SandboxStatus::Stopped,
                    ended_at: Some(99),
                    ..won[0].clone()
                })
                .await
                .unwrap();
        }
        assert_eq!(store.sandboxes().await.unwrap().len(), 4);
    }

    pub(crate) async fn tags_round_trip_and_are_replaced_alone(store: &dyn Store) {
        let s = sandbox("sbxtags0000000000000001", 10);
        let bystander = sandbox("sbxtags0000000000000002", 11);
        store.insert_sandbox(&s).await.unwrap();
        store.insert_sandbox(&bystander).await.unwrap();
        assert_eq!(store.sandbox(&s.id).await.unwrap().unwrap().tags, s.tags);

        let tags: BTreeMap<String, String> = (0..32)
            .map(|i| (format!("key.{i:02}/x-y_z"), "v".repeat(256)))
            .chain([("empty".to_owned(), String::new())])
            .collect();
        store.set_sandbox_tags(&s.id, &tags).await.unwrap();
        let read = store.sandbox(&s.id).await.unwrap().unwrap();
        assert_eq!(
            read,
            SandboxRecord {
                tags: tags.clone(),
                ..s.clone()
            }
        );
        assert_eq!(store.sandbox(&bystander.id).await.unwrap(), Some(bystander));

        // A status update written from a copy read before the new tags keeps the new tags.
        store
            .update_sandbox(&SandboxRecord {
                status: SandboxStatus::Stopped,
                ..s.clone()
            })
            .await
            .unwrap();
        let read = store.sandbox(&s.id).await.unwrap().unwrap();
        assert_eq!(read.status, SandboxStatus::Stopped);
        assert_eq!(read.tags, tags);

        store
            .set_sandbox_tags(&s.id, &BTreeMap::new())
            .await
            .unwrap();
        assert!(store.sandbox(&s.id).await.unwrap().unwrap().tags.is_empty());
        let err = store
            .set_sandbox_tags("sbxmissing", &tags)
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::NotFound), "{err:?}");
    }

    pub(crate) async fn find_sandboxes_filters_by_owner_name_and_every_tag(store: &dyn Store) {
        let tagged =
            |id: &str, owner: &str, created_at: i64, tags: &[(&str, &str)]| SandboxRecord {
                owner: owner.to_owned(),
                tags: tags
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
                ..sandbox(id, created_at)
            };
        let a1 = SandboxRecord {
            name: Some("alpha".to_owned()),
            ..tagged("sbxfind01", "cred_a", 1, &[("env", "prod"), ("team", "ml")])
        };
        let a2 = tagged(
            "sbxfind02",
            "cred_a",
            2,
            &[("env", "prod"), ("team", "web")],
        );
        let a3 = tagged("sbxfind03", "cred_a", 3, &[("env", "dev")]);
        let b1 = SandboxRecord {
            name: Some("alpha".to_owned()),
            ..tagged("sbxfind04", "cred_b", 4, &[("env", "prod"), ("team", "ml")])
        };
        // Inserted out of age order: results are oldest first all the same.
        for s in [&b1, &a3, &a1, &a2] {
            store.insert_sandbox(s).await.unwrap();
        }
        let find = |owner: Option<&str>, name: Option<&str>, tags: &[(&str, &str)]| {
            let filter = SandboxFilter {
                owner: owner.map(str::to_owned),
                name: name.map(str::to_owned),
                tags: tags
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
            };
            async move {
                let found = store.find_sandboxes(&filter).await.unwrap();
                let all = store.sandboxes().await.unwrap();
                let reference: Vec<&SandboxRecord> =
                    all.iter().filter(|s| filter.matches(s)).collect();
                assert_eq!(found.iter().collect::<Vec<_>>(), reference, "{filter:?}");
                found.into_iter().map(|s| s.id).collect::<Vec<String>>()
            }
        };
        assert_eq!(
            find(None, None, &[]).await,
            ["sbxfind01", "sbxfind02", "sbxfind03", "sbxfind04"]
        );
        assert_eq!(
            find(Some("cred_a"), None, &[]).await,
            ["sbxfind01", "sbxfind02", "sbxfind03"]
        );
        assert!(find(Some("cred_none"), None, &[]).await.is_empty());
        assert_eq!(
            find(None, Some("alpha"), &[]).await,
            ["sbxfind01", "sbxfind04"]
        );
        assert_eq!(
            find(Some("cred_b"), Some("alpha"), &[]).await,
            ["sbxfind04"]
        );
        assert!(find(None, Some("alph"), &[]).await.is_empty());
        assert_eq!(
            find(Some("cred_a"), None, &[("env", "prod")]).await,
            ["sbxfind01", "sbxfind02"]
        );
        // Every tag must match (AND), by exact value.
        assert_eq!(
            find(Some("cred_a"), None, &[("env", "prod"), ("team", "ml")]).await,
            ["sbxfind01"]
        );
        assert!(find(None, None, &[("env", "prod"), ("team", "none")])
            .await
            .is_empty());
        assert!(find(None, None, &[("env", "pro")]).await.is_empty());
        assert!(find(None, None, &[("missing", "")]).await.is_empty());
        assert_eq!(
            find(None, Some("alpha"), &[("team", "ml")]).await,
            ["sbxfind01", "sbxfind04"]
        );
    }

    pub(crate) fn volume(owner: &str, name: &str, created_at: i64) -> VolumeRecord {
        VolumeRecord {
            owner: owner.to_owned(),
            name: name.to_owned(),
            created_at,
            node: Some("node-a".to_owned()),
            uid: 2_000_000_042,
        }
    }

    pub(crate) async fn volumes_round_trip_per_owner(store: &dyn Store) {
        assert!(store.volumes().await.unwrap().is_empty());
        assert_eq!(store.volume("cred_a", "agents").await.unwrap(), None);
        let newer = volume("cred_a", "agents", 200);
        let older = VolumeRecord {
            node: None,
            uid: 2_000_000_001,
            ..volume("cred_b", "agents", 100)
        };
        let same_time = volume("cred_a", "cache", 200);
        for v in [&newer, &older, &same_time] {
            store.insert_volume(v).await.unwrap();
        }
        assert_eq!(
            store.volumes().await.unwrap(),
            vec![older.clone(), newer.clone(), same_time.clone()]
        );
        assert_eq!(
            store.volume("cred_a", "agents").await.unwrap(),
            Some(newer.clone())
        );
        assert_eq!(
            store.volume("cred_b", "agents").await.unwrap(),
            Some(older.clone())
        );
        assert_eq!(store.volume("cred_c", "agents").await.unwrap(), None);

        assert!(store.delete_volume("cred_a", "agents").await.unwrap());
        assert!(!store.delete_volume("cred_a", "agents").await.unwrap());
        assert!(!store.delete_volume("cred_c", "cache").await.unwrap());
        assert_eq!(store.volume("cred_a", "agents").await.unwrap(), None);
        assert_eq!(store.volumes().await.unwrap(), vec![older, same_time]);
    }

    pub(crate) async fn volume_names_conflict_per_owner_only(store: &dyn Store) {
        let v = volume("cred_a", "agents", 1);
        store.insert_volume(&v).await.unwrap();
        let again = VolumeRecord {
            created_at: 5,
            uid: 7,
            ..v.clone()
        };
        let err = store.insert_volume(&again).await.unwrap_err();
        assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
        assert_eq!(store.volumes().await.unwrap(), vec![v.clone()]);
        // Another owner's volume of that name is another volume.
        store
            .insert_volume(&volume("cred_b", "agents", 2))
            .await
            .unwrap();
        // Deleted, the name is free again.
        assert!(store.delete_volume("cred_a", "agents").await.unwrap());
        store.insert_volume(&again).await.unwrap();
        assert_eq!(store.volume("cred_a", "agents").await.unwrap(), Some(again));
    }

    pub(crate) async fn sandbox_volume_mounts_round_trip(store: &dyn Store) {
        let mut s = sandbox("sbxvolumes", 1);
        s.process.volumes = vec![
            VolumeMount {
                volume: "agents".to_owned(),
                path: "/workspace".to_owned(),
                sub_path: Some("sessions/s-42".to_owned()),
                read_only: false,
            },
            VolumeMount {
                volume: "models".to_owned(),
                path: "/opt/models".to_owned(),
                sub_path: None,
                read_only: true,
            },
        ];
        store.insert_sandbox(&s).await.unwrap();
        assert_eq!(store.sandbox(&s.id).await.unwrap(), Some(s.clone()));
        s.process.volumes.pop();
        store.update_sandbox(&s).await.unwrap();
        assert_eq!(store.sandbox(&s.id).await.unwrap(), Some(s));
    }

    pub(crate) async fn changes_are_announced_after_commit(store: &dyn Store) {
        let mut rx = store
            .changes()
            .expect("every backend in this crate announces changes");

        // Each step: a write, and what it announces (most writes announce nothing).
        store
            .insert_signing_key(&signing_key("k1", 1))
            .await
            .unwrap();
        let (_, c) = credential("cred_a", 1);
        store.insert_credential(&c).await.unwrap();
        assert!(store.revoke_credential("cred_a", 2).await.unwrap());
        assert!(!store.revoke_credential("cred_a", 3).await.unwrap());
        let s = SandboxRecord {
            node: Some("node-a".to_owned()),
            ..sandbox("sbxfeed", 1)
        };
        store.insert_sandbox(&s).await.unwrap();
        store.insert_sandbox(&s).await.unwrap_err();
        store
            .update_sandbox(&SandboxRecord {
                status: SandboxStatus::Running,
                ..s.clone()
            })
            .await
            .unwrap();
        store
            .update_sandbox(&sandbox("sbxmissing", 1))
            .await
            .unwrap_err();
        store
            .set_sandbox_tags("sbxfeed", &BTreeMap::new())
            .await
            .unwrap();
        store
            .set_sandbox_tags("sbxmissing", &BTreeMap::new())
            .await
            .unwrap_err();
        store.revoke_token("jti-1", 500).await.unwrap();
        store.revoke_token("jti-1", 100).await.unwrap();
        assert!(store.mark_token_used("jti-2", 500).await.unwrap());
        // Issuing announces nothing: no node caches issued tokens.
        store
            .record_issued_tokens(&[issued("jti-3", "sbxfeed", 1, 500)], &[])
            .await
            .unwrap();
        store
            .append_audit(&AuditEvent {
                id: 0,
                time: 1,
                actor: "a".into(),
                action: "b".into(),
                target: "c".into(),
                client_addr: None,
            })
            .await
            .unwrap();
        store.prune(10_000).await.unwrap();
        store.heartbeat(&node("node-a", 100)).await.unwrap();
        store.heartbeat(&node("node-a", 105)).await.unwrap();
        store
            .heartbeat(&NodeRecord {
                advertise_addr: "10.0.0.6".to_owned(),
                ..node("node-a", 110)
            })
            .await
            .unwrap();
        store.mark_node_lost("node-a", 200, 300).await.unwrap();
        store.revoke_token("sentinel", 1).await.unwrap();

        let expected = vec![
            Change::SigningKeyAdded { kid: "k1".into() },
            Change::CredentialRevoked {
                id: "cred_a".into(),
            },
            Change::SandboxChanged {
                id: "sbxfeed".into(),
            },
            Change::SandboxChanged {
                id: "sbxfeed".into(),
            },
            Change::SandboxChanged {
                id: "sbxfeed".into(),
            },
            Change::TokenRevoked {
                jti: "jti-1".into(),
                exp: 500,
            },
            Change::TokenRevoked {
                jti: "jti-1".into(),
                exp: 500,
            },
            Change::NodeChanged {
                name: "node-a".into(),
            },
            Change::NodeChanged {
                name: "node-a".into(),
            },
            Change::SandboxChanged {
                id: "sbxfeed".into(),
            },
            Change::TokenRevoked {
                jti: "sentinel".into(),
                exp: 1,
            },
        ];
        let mut seen = Vec::new();
        while seen.len() < expected.len() {
            seen.push(next_change(&mut rx).await);
        }
        assert_eq!(seen, expected);
        // Nothing after the sentinel.
        let extra = tokio::time::timeout(std::time::Duration::from_millis(200), rx.recv()).await;
        assert!(extra.is_err(), "unexpected change: {extra:?}");
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "in tests a panic is the failure report")]
mod tests {
    use super::*;

    #[test]
    fn sandbox_status_names_round_trip() {
        for status in SandboxStatus::ALL {
            assert_eq!(SandboxStatus::parse(status.as_str()), Some(status));
            let json = serde_json::to_string(&status).unwrap();
            assert_eq!(json, format!("\"{status}\""));
            assert_eq!(
                serde_json::from_str::<SandboxStatus>(&json).unwrap(),
                status
            );
        }
        assert_eq!(SandboxStatus::parse("Running"), None);
        let live: Vec<_> = SandboxStatus::ALL
            .into_iter()
            .filter(SandboxStatus::is_live)
            .collect();
        assert_eq!(live, [SandboxStatus::Starting, SandboxStatus::Running]);
    }

    #[test]
    fn debug_never_shows_private_keys_or_env_values() {
        let key = conformance::signing_key("k1", 1);
        let shown = format!("{key:?}");
        assert!(shown.contains("k1") && shown.contains("<redacted 259 bytes>"));
        assert!(!shown.contains("255"));

        let sandbox = conformance::sandbox("sbx1", 1);
        let shown = format!("{sandbox:?}");
        assert!(shown.contains("API_KEY"));
        assert!(!shown.contains("s3cr3t"));
    }

    #[test]
    fn credential_activity_honours_revocation_and_expiry() {
        let (_, mut c) = conformance::credential("cred_a", 0);
        assert!(c.is_active(i64::MAX));
        c.expires_at = Some(100);
        assert!(c.is_active(99));
        assert!(!c.is_active(100));
        c.expires_at = None;
        c.revoked_at = Some(5);
        assert!(!c.is_active(1));
    }

    #[test]
    fn store_is_object_safe() {
        fn assert_object_safe(_: Option<std::sync::Arc<dyn Store>>) {}
        assert_object_safe(None);
    }
}
