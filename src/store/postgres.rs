//! The cluster [`Store`]: one PostgreSQL database shared by every gateway node.
//!
//! - **Same behaviour as SQLite.** Records use the same column encoding (`super::columns`:
//!   JSON text for lists and maps, integer Unix seconds), and the shared conformance suite runs
//!   against both backends. One difference: PostgreSQL text cannot hold NUL, so a NUL character
//!   in a stored string (say a log tail in `detail`) reads back as U+FFFD.
//! - **Signing keys sealed at rest.** Private keys are stored encrypted with AES-256-GCM under
//!   the cluster key-encryption key ([`Kek`]), with the `kid` as associated data, so a database
//!   dump or backup does not leak them and a sealed key cannot be moved to another `kid`. A
//!   sealed check value in `store_meta` makes a wrong KEK fail at open, before any key exists.
//! - **Change feed.** Every write other nodes must apply calls `pg_notify` inside its own
//!   transaction, so the notification goes out only on commit. A background task `LISTEN`s on a
//!   dedicated connection, turns payloads (ids only, never secrets) into [`Change`]s and
//!   broadcasts them; if the connection is lost it reconnects with backoff (100 ms doubling to
//!   5 s) and sends [`Change::Resync`], because notifications sent meanwhile are gone.
//! - **A down database fails fast.** A connection waits at most 3 s by default to be acquired,
//!   and every call at most [`QUERY_TIMEOUT`], so a request gets [`StoreError::Unavailable`]
//!   (503) instead of hanging.
//!
//! Schema changes are versioned migrations in `schema_version`, applied at open under an
//! advisory lock so nodes starting together apply each once.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_lc_rs::aead::{Aad, Nonce, RandomizedNonceKey, AES_256_GCM, NONCE_LEN};
use base64::Engine as _;
use rand::RngCore as _;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions, PgRow};
use sqlx::{Connection as _, PgConnection, Row as _};
use tokio::sync::broadcast;

use super::columns::{
    scopes_json, to_json, CredentialRow, IssuedTokenRow, SandboxParams, SandboxRow,
    CREDENTIAL_COLUMNS, ISSUED_TOKEN_COLUMNS, LIVE_STATUSES_SQL, SANDBOX_BINDS, SANDBOX_COLUMNS,
    SANDBOX_UPDATE_BINDS,
};
use super::{
    AuditEvent, Change, CredentialRecord, IssuedToken, NodeRecord, SandboxFilter, SandboxRecord,
    SandboxStatus, Store, StoreError, StoredSigningKey, VolumeRecord, CHANGE_FEED_CAPACITY,
    EXPIRED_TOKEN_GRACE_SECS,
};
use crate::credential::SecretHash;

/// Schema migrations, applied in order; version N is `MIGRATIONS[N - 1]`. Append only: a shipped
/// migration is never edited, because databases in the field have already run it.
///
/// `seq` columns keep insertion order as the tie-breaker of "oldest first", as SQLite's rowid
/// does.
const MIGRATIONS: &[&str] = &[
    // 1: initial schema, matching SQLite's migrations 1 to 3.
    "CREATE TABLE store_meta (
        key   TEXT PRIMARY KEY,
        value BYTEA NOT NULL
     );
     CREATE TABLE signing_keys (
        kid        TEXT PRIMARY KEY,
        seq        BIGINT GENERATED ALWAYS AS IDENTITY,
        created_at BIGINT NOT NULL,
        sealed_der BYTEA NOT NULL  -- version 1 || nonce || AES-256-GCM(PKCS#8) || tag; AAD = kid
     );
     CREATE TABLE credentials (
        id                 TEXT PRIMARY KEY,
        seq                BIGINT GENERATED ALWAYS AS IDENTITY,
        name               TEXT NOT NULL,
        scopes             TEXT NOT NULL,         -- JSON array of scope names
        secret_hash        BYTEA NOT NULL UNIQUE, -- SHA-256, 32 bytes; authentication looks up by it
        created_at         BIGINT NOT NULL,
        expires_at         BIGINT,
        max_token_ttl_secs BIGINT,
        revoked_at         BIGINT
     );
     CREATE TABLE sandboxes (
        id           TEXT PRIMARY KEY,
        seq          BIGINT GENERATED ALWAYS AS IDENTITY,
        owner        TEXT NOT NULL,
        status       TEXT NOT NULL,
        ports        TEXT NOT NULL,  -- JSON array
        upstream     TEXT,
        command      TEXT,           -- JSON array, NULL for external sandboxes
        env          TEXT NOT NULL,  -- JSON object
        cors_origins TEXT NOT NULL,  -- JSON array
        rewrite_host BOOLEAN NOT NULL,
        metadata     TEXT NOT NULL,  -- JSON
        created_at   BIGINT NOT NULL,
        expires_at   BIGINT,
        ended_at     BIGINT,
        host_ports   TEXT NOT NULL,  -- JSON object, published port -> host port
        node         TEXT,
        detail       TEXT,
        process      TEXT NOT NULL   -- JSON object
     );
     CREATE INDEX sandboxes_by_age ON sandboxes (created_at, seq);
     CREATE INDEX sandboxes_by_node ON sandboxes (node) WHERE node IS NOT NULL;
     CREATE TABLE revoked_tokens (
        jti TEXT PRIMARY KEY,
        exp BIGINT NOT NULL
     );
     CREATE INDEX revoked_tokens_by_exp ON revoked_tokens (exp);
     CREATE TABLE used_tokens (
        jti TEXT PRIMARY KEY,
        exp BIGINT NOT NULL
     );
     CREATE INDEX used_tokens_by_exp ON used_tokens (exp);
     CREATE TABLE audit_events (
        id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, -- increasing, never reused
        time        BIGINT NOT NULL,
        actor       TEXT NOT NULL,
        action      TEXT NOT NULL,
        target      TEXT NOT NULL,
        client_addr TEXT
     );
     CREATE TABLE nodes (
        name           TEXT PRIMARY KEY,
        advertise_addr TEXT NOT NULL,
        runs_sandboxes BOOLEAN NOT NULL,
        version        TEXT NOT NULL,
        started_at     BIGINT NOT NULL,
        last_heartbeat BIGINT NOT NULL
     );",
    // 2: issued connect tokens (ids and claims, never the token), to list and revoke them;
    // SQLite's migration 4.
    "CREATE TABLE issued_tokens (
        jti        TEXT PRIMARY KEY,
        seq        BIGINT GENERATED ALWAYS AS IDENTITY,
        sandbox    TEXT NOT NULL,
        port       INTEGER NOT NULL,
        sub        TEXT NOT NULL,  -- the credential that minted it
        issued_at  BIGINT NOT NULL,
        exp        BIGINT NOT NULL,
        single_use BOOLEAN NOT NULL
     );
     CREATE INDEX issued_tokens_by_sandbox ON issued_tokens (sandbox);
     CREATE INDEX issued_tokens_by_exp ON issued_tokens (exp);",
    // 3: where other nodes reach a node's cluster relay; SQLite's migration 5.
    "ALTER TABLE nodes ADD COLUMN relay_addr TEXT;",
    // 4: sandbox names and tags; SQLite's migration 6. The partial unique index holds only live
    // rows, so two nodes racing to create one name get one winner, and a sandbox leaving
    // `starting`/`running` frees its name (and keeps it, for listing).
    "ALTER TABLE sandboxes ADD COLUMN name TEXT;
     ALTER TABLE sandboxes ADD COLUMN tags TEXT NOT NULL DEFAULT '{}'; -- JSON object
     CREATE UNIQUE INDEX sandboxes_live_name ON sandboxes (owner, name)
        WHERE name IS NOT NULL AND status IN ('starting', 'running');
     CREATE INDEX sandboxes_by_owner ON sandboxes (owner, created_at, seq);",
    // 5: named volumes, unique per owner; SQLite's migration 7.
    "CREATE TABLE volumes (
        owner      TEXT NOT NULL,
        name       TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        node       TEXT,            -- the node whose disk holds it; NULL: every node's
        uid        BIGINT NOT NULL, -- the host uid owning its files
        PRIMARY KEY (owner, name)
     );",
    // 6: secret environment variables (`SandboxRecord::secret_env`); SQLite's migration 8.
    // Sealed like `signing_keys.sealed_der` (version 1 || nonce || AES-256-GCM(JSON object) ||
    // tag) under the KEK, with AAD `secret_env:` || the sandbox id, so a sealed value opens only
    // in its own row and never passes for a signing key; NULL: none.
    "ALTER TABLE sandboxes ADD COLUMN secret_env BYTEA;",
];

/// How long one store call may take, queueing for a connection included, before it fails as
/// [`StoreError::Unavailable`]: a database that stopped answering (a dead host, a partition)
/// must not hold a request, or a lock in the caller, forever.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(10);

/// Default wait for a pooled connection; past it the call is [`StoreError::Unavailable`].
const DEFAULT_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);

/// Default pool size per node: control-plane writes and cache reloads are short, so a few
/// connections serve many requests; N nodes hold N times this on the server.
const DEFAULT_MAX_CONNECTIONS: u32 = 10;

/// The notification channel for the default schema; other schemas get a suffix (see
/// [`channel_name`]) so that clusters, or tests, in separate schemas of one database never see
/// each other's changes.
const CHANNEL: &str = "sandgate_changes";

/// PostgreSQL identifiers (channel names included) are at most 63 bytes.
const MAX_IDENTIFIER_LEN: usize = 63;

/// NOTIFY payloads must be shorter than 8000 bytes; a longer one (a huge jti) is sent as a
/// resync instead.
const MAX_PAYLOAD_LEN: usize = 7_900;

/// First wait before reconnecting the listener; doubles up to [`RECONNECT_MAX`].
const RECONNECT_MIN: Duration = Duration::from_millis(100);
/// Longest wait between listener reconnection attempts.
const RECONNECT_MAX: Duration = Duration::from_secs(5);

/// After this long without a notification, the listener checks its connection with a query:
/// a connection dropped silently (a NAT or load balancer idle timeout) would otherwise wait
/// forever and miss every change. The check's traffic also keeps such middleboxes from dropping
/// it.
const LISTENER_KEEPALIVE: Duration = Duration::from_secs(30);

/// The `store_meta` key of the KEK check value.
const KEK_CHECK_KEY: &str = "kek_check";
/// What the KEK check value seals (and its AAD): a wrong KEK fails to open it.
const KEK_CHECK_PLAINTEXT: &[u8] = b"sandgate key-encryption key check v1";

/// The first byte of a sealed signing key: the format, so it can change later.
const SEALED_V1: u8 = 1;
const TAG_LEN: usize = 16;

/// Why the key-encryption key is missing, malformed or not the cluster's. Messages never
/// contain the key.
#[derive(Debug, thiserror::Error)]
pub enum KekError {
    /// Neither `$SANDGATE_KEK` nor `[cluster] kek_file` is set.
    #[error(
        "no key-encryption key: cluster mode stores signing keys encrypted; set SANDGATE_KEK or \
         [cluster] kek_file = \"path\" to 32 random bytes as 64 hex characters or base64 (make one \
         with `sandgate kek generate`), the same on every node"
    )]
    Missing,
    /// The key file could not be read.
    #[error("cannot read the key-encryption key file {path} ([cluster] kek_file)")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The value is not 32 bytes in one of the accepted encodings. `origin` names where it came
    /// from (`SANDGATE_KEK` or the file).
    #[error(
        "the key-encryption key in {origin} is not 32 bytes as 64 hex characters or base64: {reason}"
    )]
    Malformed { origin: String, reason: String },
    /// The key does not open the database's check value: another key sealed its signing keys.
    #[error(
        "the key-encryption key (SANDGATE_KEK or [cluster] kek_file) is not the one this database's \
         signing keys are sealed with; every node of a cluster needs the same key"
    )]
    Wrong,
    /// A stored signing key does not open: a wrong key, or the row was altered (its `kid`
    /// changed, its bytes damaged).
    #[error(
        "signing key {kid} cannot be decrypted with this key-encryption key (wrong key, or the \
         stored key was altered)"
    )]
    Undecryptable { kid: String },
    /// A sandbox's stored `secret_env` does not open: a wrong key, or the row was altered (its
    /// sealed bytes damaged, or copied from another sandbox's row).
    #[error(
        "the secret environment of sandbox {id} cannot be decrypted with this key-encryption key \
         (wrong key, or the stored row was altered)"
    )]
    SecretUndecryptable { id: String },
}

/// The 32-byte key-encryption key that seals signing keys in PostgreSQL. `Debug` never shows
/// it.
#[derive(Clone, PartialEq, Eq)]
pub struct Kek([u8; 32]);

impl fmt::Debug for Kek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Kek(<redacted>)")
    }
}

impl Kek {
    /// A key for another purpose (`label` says which), derived with HKDF-SHA256, so that the
    /// key-encryption key itself only ever seals signing keys. The cluster relay's key is one
    /// ([`crate::relay::KEY_LABEL`]).
    pub fn derive(&self, label: &[u8]) -> [u8; 32] {
        use aws_lc_rs::hkdf::{Salt, HKDF_SHA256};
        let mut out = [0u8; 32];
        let info = [label];
        Salt::new(HKDF_SHA256, b"sandgate")
            .extract(&self.0)
            .expand(&info, HKDF_SHA256)
            .and_then(|okm| okm.fill(&mut out))
            .expect("32 bytes is HKDF-SHA256's own output length");
        out
    }

    /// Wraps raw key bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Kek {
        Kek(bytes)
    }

    /// Parses 64 hex characters or the base64 (standard or URL-safe, padded or not) of 32
    /// bytes, ignoring surrounding whitespace. The error says what is wrong, never the value.
    pub fn parse(text: &str) -> Result<Kek, String> {
        let text = text.trim();
        if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
            let mut bytes = [0u8; 32];
            for (byte, pair) in bytes.iter_mut().zip(text.as_bytes().chunks_exact(2)) {
                let digits = std::str::from_utf8(pair).map_err(|_| "not hex".to_owned())?;
                *byte = u8::from_str_radix(digits, 16).map_err(|_| "not hex".to_owned())?;
            }
            return Ok(Kek(bytes));
        }
        use base64::engine::general_purpose::{
            STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD,
        };
        let decoded = [STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD]
            .iter()
            .find_map(|engine| engine.decode(text).ok());
        match decoded {
            Some(bytes) => <[u8; 32]>::try_from(bytes.as_slice())
                .map(Kek)
                .map_err(|_| format!("it decodes to {} bytes, not 32", bytes.len())),
            None => Err(format!(
                "{} characters that are neither hex nor base64",
                text.chars().count()
            )),
        }
    }

    /// The cluster's key from `$SANDGATE_KEK` if set and not empty, else from `file`
    /// (`[cluster] kek_file`); `None` when neither is set. The environment wins so that a
    /// deployment can override a file baked into an image.
    pub fn from_env_or_file(file: Option<&Path>) -> Result<Option<Kek>, KekError> {
        if let Some(value) = std::env::var_os("SANDGATE_KEK").filter(|v| !v.is_empty()) {
            let value = value.to_str().ok_or_else(|| KekError::Malformed {
                origin: "SANDGATE_KEK".to_owned(),
                reason: "not UTF-8".to_owned(),
            })?;
            return Kek::parse(value)
                .map(Some)
                .map_err(|reason| KekError::Malformed {
                    origin: "SANDGATE_KEK".to_owned(),
                    reason,
                });
        }
        let Some(path) = file else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(path).map_err(|source| KekError::Read {
            path: path.to_owned(),
            source,
        })?;
        Kek::parse(&text)
            .map(Some)
            .map_err(|reason| KekError::Malformed {
                origin: path.display().to_string(),
                reason,
            })
    }
}

/// A new random key-encryption key as 64 hex characters, for `sandgate kek generate`.
pub fn generate_kek() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// AES-256-GCM under the KEK with a random nonce per message. Sealed form:
/// `SEALED_V1 || nonce (12) || ciphertext || tag (16)`.
struct Sealer(RandomizedNonceKey);

impl Sealer {
    fn new(kek: &Kek) -> Result<Sealer, StoreError> {
        RandomizedNonceKey::new(&AES_256_GCM, &kek.0)
            .map(Sealer)
            .map_err(|_| backend("AES-256-GCM key setup failed"))
    }

    fn seal(&self, aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, StoreError> {
        let mut in_out = plaintext.to_vec();
        let nonce = self
            .0
            .seal_in_place_append_tag(Aad::from(aad), &mut in_out)
            .map_err(|_| backend("AES-256-GCM sealing failed"))?;
        let mut sealed = Vec::with_capacity(1 + NONCE_LEN + in_out.len());
        sealed.push(SEALED_V1);
        sealed.extend_from_slice(nonce.as_ref());
        sealed.extend_from_slice(&in_out);
        Ok(sealed)
    }

    /// The plaintext, or `None` when the key, the AAD or the bytes are wrong.
    fn open(&self, aad: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
        let (&version, rest) = sealed.split_first()?;
        if version != SEALED_V1 || rest.len() < NONCE_LEN + TAG_LEN {
            return None;
        }
        let (nonce, ciphertext) = rest.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut in_out = ciphertext.to_vec();
        let plaintext = self
            .0
            .open_in_place(nonce, Aad::from(aad), &mut in_out)
            .ok()?;
        Some(plaintext.to_vec())
    }
}

/// How to reach and set up the database. [`PostgresOptions::new`] fills in the defaults.
#[derive(Clone)]
pub struct PostgresOptions {
    /// `postgres://user[:password]@host[:port]/database[?sslmode=...]`.
    pub url: String,
    /// Seals the signing keys; opening fails without it.
    pub kek: Option<Kek>,
    /// Keep every table in this schema (created if missing) instead of the connection's
    /// default: lowercase letters, digits and `_`, at most 63 characters. Lets several clusters,
    /// or tests, share one database.
    pub schema: Option<String>,
    /// Shown in `pg_stat_activity`; the listener's connection adds ` listener`.
    pub application_name: String,
    /// Pool size on this node.
    pub max_connections: u32,
    /// How long a call waits for a pooled connection before failing as unavailable.
    pub acquire_timeout: Duration,
}

impl PostgresOptions {
    /// Defaults: no schema (the connection's own), application name `sandgate`, 10
    /// connections, 3 s acquire timeout.
    pub fn new(url: &str, kek: Option<Kek>) -> PostgresOptions {
        PostgresOptions {
            url: url.to_owned(),
            kek,
            schema: None,
            application_name: "sandgate".to_owned(),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            acquire_timeout: DEFAULT_ACQUIRE_TIMEOUT,
        }
    }
}

impl fmt::Debug for PostgresOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresOptions")
            .field("url", &redact_url(&self.url))
            .field("kek", &self.kek)
            .field("schema", &self.schema)
            .field("application_name", &self.application_name)
            .field("max_connections", &self.max_connections)
            .field("acquire_timeout", &self.acquire_timeout)
            .finish()
    }
}

/// `url` with any password replaced by `REDACTED`, for logs and messages.
pub fn redact_url(url: &str) -> String {
    let Ok(mut parsed) = url::Url::parse(url) else {
        return "<unparseable URL>".to_owned();
    };
    if parsed.password().is_some() {
        // Only fails for URLs that cannot have a password, which this one has.
        let _ = parsed.set_password(Some("REDACTED"));
    }
    if parsed
        .query_pairs()
        .any(|(k, _)| k.eq_ignore_ascii_case("password"))
    {
        let pairs: Vec<(String, String)> = parsed
            .query_pairs()
            .map(|(k, v)| {
                let v = if k.eq_ignore_ascii_case("password") {
                    "REDACTED".to_owned()
                } else {
                    v.into_owned()
                };
                (k.into_owned(), v)
            })
            .collect();
        parsed.query_pairs_mut().clear().extend_pairs(pairs);
    }
    parsed.to_string()
}

/// Connecting failed; names the server (password redacted).
#[derive(Debug, thiserror::Error)]
#[error("cannot connect to PostgreSQL at {target}")]
struct ConnectError {
    target: String,
    #[source]
    source: sqlx::Error,
}

/// PostgreSQL-backed [`Store`]. Cheap to clone: clones share the pool and the change feed. The
/// listener task stops when the last clone is dropped.
#[derive(Clone)]
pub struct PostgresStore {
    inner: Arc<Inner>,
}

struct Inner {
    pool: PgPool,
    sealer: Sealer,
    /// The schema the tables live in (`current_schema()` of the pool's connections).
    schema: String,
    /// Where notifications go; derived from the schema.
    channel: String,
    /// The server, password redacted, for messages.
    target: String,
    changes: broadcast::Sender<Change>,
    listener: tokio::task::JoinHandle<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.listener.abort();
    }
}

impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresStore")
            .field("target", &self.inner.target)
            .field("schema", &self.inner.schema)
            .field("channel", &self.inner.channel)
            .finish_non_exhaustive()
    }
}

impl PostgresStore {
    /// Connects, creates the schema if asked, applies pending migrations, checks the KEK (a
    /// new database records a check value for it) and starts listening for changes.
    ///
    /// Fails with [`KekError::Missing`] before connecting when `options.kek` is `None`, with
    /// [`KekError::Wrong`] when the database was set up with another key, and with
    /// [`StoreError::Unavailable`] when the server cannot be reached.
    pub async fn open(options: PostgresOptions) -> Result<PostgresStore, StoreError> {
        let kek = options.kek.as_ref().ok_or(KekError::Missing)?;
        let sealer = Sealer::new(kek)?;
        let target = redact_url(&options.url);
        let mut connect: PgConnectOptions = options.url.parse().map_err(|e| {
            StoreError::Backend(Box::new(ConnectError {
                target: target.clone(),
                source: e,
            }))
        })?;
        connect = connect.application_name(&options.application_name);

        // One direct connection first: it reports the real cause (refused, bad password, no
        // such database) where a pool would only time out, and it creates the schema.
        let connect_err = |e: sqlx::Error| {
            let unavailable = is_unavailable(&e);
            let e = Box::new(ConnectError {
                target: target.clone(),
                source: e,
            });
            if unavailable {
                StoreError::Unavailable(e)
            } else {
                StoreError::Backend(e)
            }
        };
        let probe = async {
            let mut conn = PgConnection::connect_with(&connect)
                .await
                .map_err(connect_err)?;
            if let Some(schema) = &options.schema {
                check_schema_name(schema)?;
                create_schema(&mut conn, schema).await?;
            }
            conn.close().await.map_err(classify)?;
            Ok(())
        };
        bounded(probe).await?;
        if let Some(schema) = &options.schema {
            connect = connect.options([("search_path", schema)]);
        }

        let pool = PgPoolOptions::new()
            .max_connections(options.max_connections.max(1))
            .acquire_timeout(options.acquire_timeout)
            .connect_lazy_with(connect.clone());
        let schema: Option<String> = bounded(async {
            sqlx::query_scalar("SELECT current_schema()")
                .fetch_one(&pool)
                .await
                .map_err(connect_err)
        })
        .await?;
        let schema = schema.ok_or_else(|| {
            backend("the connection's search_path names no existing schema; create it or set one")
        })?;
        bounded(migrate(&pool, &schema)).await?;
        bounded(check_kek(&pool, &sealer)).await?;

        let channel = channel_name(&schema);
        let listener_connect =
            connect.application_name(&format!("{} listener", options.application_name));
        let listener = bounded(async {
            listen(&listener_connect, &channel)
                .await
                .map_err(connect_err)
        })
        .await?;
        let (changes, _) = broadcast::channel(CHANGE_FEED_CAPACITY);
        let task = tokio::spawn(run_listener(
            listener,
            listener_connect,
            channel.clone(),
            changes.clone(),
        ));
        tracing::info!(%target, %schema, "opened PostgreSQL store");
        Ok(PostgresStore {
            inner: Arc::new(Inner {
                pool,
                sealer,
                schema,
                channel,
                target,
                changes,
                listener: task,
            }),
        })
    }

    /// The schema holding the tables.
    pub fn schema(&self) -> &str {
        &self.inner.schema
    }

    /// The notification channel changes are announced on.
    pub fn channel(&self) -> &str {
        &self.inner.channel
    }

    fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    /// Queues `change` for the listeners of every node; delivered when `tx` commits.
    async fn notify(&self, tx: &mut PgConnection, change: &Change) -> Result<(), StoreError> {
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(&self.inner.channel)
            .bind(payload(change))
            .execute(tx)
            .await
            .map_err(classify)?;
        Ok(())
    }
}

/// Runs one store call under [`QUERY_TIMEOUT`].
async fn bounded<T>(call: impl Future<Output = Result<T, StoreError>>) -> Result<T, StoreError> {
    tokio::time::timeout(QUERY_TIMEOUT, call)
        .await
        .unwrap_or_else(|_| {
            Err(StoreError::Unavailable(
                format!(
                    "PostgreSQL did not answer within {} s",
                    QUERY_TIMEOUT.as_secs()
                )
                .into(),
            ))
        })
}

fn backend(message: &str) -> StoreError {
    StoreError::Backend(message.into())
}

/// Schema names are spliced into SQL and connection options, so only plain lowercase
/// identifiers are accepted.
fn check_schema_name(schema: &str) -> Result<(), StoreError> {
    let mut bytes = schema.bytes();
    let first_ok = bytes
        .next()
        .is_some_and(|b| b.is_ascii_lowercase() || b == b'_');
    if first_ok
        && schema.len() <= MAX_IDENTIFIER_LEN
        && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        Ok(())
    } else {
        Err(backend(
            "a PostgreSQL schema name must be lowercase letters, digits and _ (at most 63), \
             not starting with a digit",
        ))
    }
}

async fn create_schema(conn: &mut PgConnection, schema: &str) -> Result<(), StoreError> {
    match sqlx::raw_sql(&format!("CREATE SCHEMA IF NOT EXISTS {schema}"))
        .execute(conn)
        .await
    {
        Ok(_) => Ok(()),
        // Two nodes creating it at once: the loser sees a duplicate; either way it exists.
        Err(sqlx::Error::Database(e))
            if matches!(e.code().as_deref(), Some("42P06") | Some("23505")) =>
        {
            Ok(())
        }
        Err(e) => Err(classify(e)),
    }
}

/// The notification channel for `schema`: [`CHANNEL`] for `public`, else suffixed with the
/// schema, or with a stable hash of it when that would exceed 63 bytes.
fn channel_name(schema: &str) -> String {
    if schema == "public" {
        return CHANNEL.to_owned();
    }
    let named = format!("{CHANNEL}_{schema}");
    if named.len() <= MAX_IDENTIFIER_LEN {
        return named;
    }
    // FNV-1a: stable across builds and platforms, so every node derives the same name.
    let hash = schema.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("{CHANNEL}_{hash:016x}")
}

/// Applies pending migrations in one transaction, holding an advisory lock so that nodes
/// opening a new database together cannot both run them; a failure leaves the old schema.
async fn migrate(pool: &PgPool, schema: &str) -> Result<(), StoreError> {
    let supported = i64::try_from(MIGRATIONS.len()).unwrap_or(i64::MAX);
    let mut tx = pool.begin().await.map_err(classify)?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
        .bind(format!("sandgate migrate {schema}"))
        .execute(&mut *tx)
        .await
        .map_err(classify)?;
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS schema_version (
            version    BIGINT PRIMARY KEY,
            applied_at BIGINT NOT NULL
         )",
    )
    .execute(&mut *tx)
    .await
    .map_err(classify)?;
    let current: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(version), 0) FROM schema_version")
        .fetch_one(&mut *tx)
        .await
        .map_err(classify)?;
    if current > supported {
        return Err(StoreError::SchemaTooNew {
            found: current,
            supported,
        });
    }
    for (version, sql) in (1i64..)
        .zip(MIGRATIONS)
        .skip(usize::try_from(current).unwrap_or(0))
    {
        sqlx::raw_sql(sql)
            .execute(&mut *tx)
            .await
            .map_err(classify)?;
        sqlx::query("INSERT INTO schema_version (version, applied_at) VALUES ($1, $2)")
            .bind(version)
            .bind(crate::unix_now())
            .execute(&mut *tx)
            .await
            .map_err(classify)?;
        tracing::info!(version, %schema, "applied store migration");
    }
    tx.commit().await.map_err(classify)?;
    Ok(())
}

/// Records the KEK check value if the database has none (first node wins a race), then
/// verifies that `sealer` opens the recorded one.
async fn check_kek(pool: &PgPool, sealer: &Sealer) -> Result<(), StoreError> {
    let candidate = sealer.seal(KEK_CHECK_PLAINTEXT, KEK_CHECK_PLAINTEXT)?;
    sqlx::query("INSERT INTO store_meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING")
        .bind(KEK_CHECK_KEY)
        .bind(candidate)
        .execute(pool)
        .await
        .map_err(classify)?;
    let recorded: Vec<u8> = sqlx::query_scalar("SELECT value FROM store_meta WHERE key = $1")
        .bind(KEK_CHECK_KEY)
        .fetch_one(pool)
        .await
        .map_err(classify)?;
    match sealer.open(KEK_CHECK_PLAINTEXT, &recorded) {
        Some(plain) if plain == KEK_CHECK_PLAINTEXT => Ok(()),
        _ => Err(KekError::Wrong.into()),
    }
}

/// Connection-level failures: the database is down, restarting, overloaded or unreachable.
fn is_unavailable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            // 08: connection exception; 53: insufficient resources; 57P01-57P03: admin
            // shutdown, crash shutdown, cannot connect now; 57014: statement cancelled;
            // 40001/40P01: serialization failure, deadlock; 55P03: lock not available.
            code.starts_with("08")
                || code.starts_with("53")
                || code.starts_with("57P")
                || matches!(&*code, "57014" | "40001" | "40P01" | "55P03")
        }),
        _ => false,
    }
}

/// Maps an sqlx error to the backend-neutral kinds callers act on.
fn classify(e: sqlx::Error) -> StoreError {
    if is_unavailable(&e) {
        return StoreError::Unavailable(Box::new(e));
    }
    match &e {
        sqlx::Error::Database(db) => match db.code().as_deref() {
            // Class 23: integrity constraint violation. Name the constraint, never the values
            // (the detail would echo a secret hash).
            Some(code) if code.starts_with("23") => StoreError::Conflict(format!(
                "constraint {} violated",
                db.constraint().unwrap_or("unknown")
            )),
            // XX001/XX002: data or index corrupted.
            Some("XX001" | "XX002") => StoreError::Corrupt(db.message().to_owned()),
            _ => StoreError::Backend(Box::new(e)),
        },
        sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_) => {
            StoreError::Corrupt(e.to_string())
        }
        _ => StoreError::Backend(Box::new(e)),
    }
}

/// Like [`classify`], but a constraint violation on insert says which record collided.
fn classify_insert(e: sqlx::Error, what: impl FnOnce() -> String) -> StoreError {
    match classify(e) {
        StoreError::Conflict(_) => StoreError::Conflict(what()),
        other => other,
    }
}

/// PostgreSQL text cannot hold NUL; store U+FFFD instead, so a NUL in a log tail or an odd id
/// cannot fail a write. Lookups apply the same mapping, so they still find the record.
fn text(s: &str) -> Cow<'_, str> {
    if s.contains('\0') {
        Cow::Owned(s.replace('\0', "\u{FFFD}"))
    } else {
        Cow::Borrowed(s)
    }
}

fn opt_text(s: &Option<String>) -> Option<String> {
    s.as_deref().map(|s| text(s).into_owned())
}

/// The compact NOTIFY payload of a change: a one-letter kind, then the id. Ids only: receivers
/// read anything else from the store.
fn payload(change: &Change) -> String {
    let payload = match change {
        Change::TokenRevoked { jti, exp } => format!("t:{exp}:{jti}"),
        Change::SandboxChanged { id } => format!("s:{id}"),
        Change::CredentialRevoked { id } => format!("c:{id}"),
        Change::SigningKeyAdded { kid } => format!("k:{kid}"),
        Change::NodeChanged { name } => format!("n:{name}"),
        Change::Resync => "*".to_owned(),
    };
    if payload.len() > MAX_PAYLOAD_LEN {
        "*".to_owned()
    } else {
        payload
    }
}

/// Reads a [`payload`]. Anything unknown (a newer node's kind of change, a stray NOTIFY)
/// becomes [`Change::Resync`]: reloading everything is always correct.
fn parse_payload(payload: &str) -> Change {
    let parsed = match payload.split_once(':') {
        Some(("t", rest)) => rest.split_once(':').and_then(|(exp, jti)| {
            Some(Change::TokenRevoked {
                jti: jti.to_owned(),
                exp: exp.parse().ok()?,
            })
        }),
        Some(("s", id)) => Some(Change::SandboxChanged { id: id.to_owned() }),
        Some(("c", id)) => Some(Change::CredentialRevoked { id: id.to_owned() }),
        Some(("k", kid)) => Some(Change::SigningKeyAdded {
            kid: kid.to_owned(),
        }),
        Some(("n", name)) => Some(Change::NodeChanged {
            name: name.to_owned(),
        }),
        _ if payload == "*" => Some(Change::Resync),
        _ => None,
    };
    parsed.unwrap_or_else(|| {
        tracing::warn!(
            len = payload.len(),
            "unrecognised change notification; resynchronising"
        );
        Change::Resync
    })
}

/// A listener on its own one-connection pool, subscribed to `channel`.
///
/// A fresh pool per connection: a dead connection that the old listener still holds (its drop
/// runs `UNLISTEN` in the background, which may hang on a half-open socket) can then never
/// block the new one.
async fn listen(connect: &PgConnectOptions, channel: &str) -> Result<PgListener, sqlx::Error> {
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(DEFAULT_ACQUIRE_TIMEOUT)
        .max_lifetime(None)
        .idle_timeout(None)
        .connect_lazy_with(connect.clone());
    let mut listener = PgListener::connect_with(&pool).await?;
    // We reconnect ourselves, so that we know when to send `Resync`.
    listener.eager_reconnect(false);
    listener.ignore_pool_close_event(true);
    listener.listen(channel).await?;
    Ok(listener)
}

/// The listener task: forwards notifications as [`Change`]s; on a lost connection reconnects
/// with backoff and sends [`Change::Resync`]. Runs until aborted (the store is dropped).
async fn run_listener(
    mut listener: PgListener,
    connect: PgConnectOptions,
    channel: String,
    changes: broadcast::Sender<Change>,
) {
    loop {
        let lost = match tokio::time::timeout(LISTENER_KEEPALIVE, listener.try_recv()).await {
            Ok(Ok(Some(notification))) => {
                // No receiver is not an error: nobody is interested yet.
                let _ = changes.send(parse_payload(notification.payload()));
                continue;
            }
            Ok(Ok(None)) => "connection closed".to_owned(),
            Ok(Err(e)) => e.to_string(),
            // Quiet for a while: prove the connection still works. `try_recv` is cancel safe.
            Err(_) => {
                let ping = sqlx::query("SELECT 1").execute(&mut listener);
                match tokio::time::timeout(DEFAULT_ACQUIRE_TIMEOUT, ping).await {
                    Ok(Ok(_)) => continue,
                    Ok(Err(e)) => e.to_string(),
                    Err(_) => "keepalive query timed out".to_owned(),
                }
            }
        };
        tracing::warn!(error = %lost, %channel, "change listener lost its database connection; reconnecting");
        drop(listener);
        listener = reconnect(&connect, &channel).await;
        tracing::info!(%channel, "change listener reconnected; receivers resynchronise");
        let _ = changes.send(Change::Resync);
    }
}

/// Connects a new listener, retrying with exponential backoff until it succeeds.
async fn reconnect(connect: &PgConnectOptions, channel: &str) -> PgListener {
    let mut delay = RECONNECT_MIN;
    let mut attempts = 0u32;
    loop {
        tokio::time::sleep(delay).await;
        attempts += 1;
        let attempt = tokio::time::timeout(QUERY_TIMEOUT, listen(connect, channel)).await;
        match attempt {
            Ok(Ok(listener)) => return listener,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, attempts, "change listener reconnect failed");
            }
            Err(_) => tracing::debug!(attempts, "change listener reconnect timed out"),
        }
        delay = (delay * 2).min(RECONNECT_MAX);
    }
}

fn credential_row(r: &PgRow) -> Result<CredentialRow, sqlx::Error> {
    Ok(CredentialRow {
        id: r.try_get(0)?,
        name: r.try_get(1)?,
        scopes: r.try_get(2)?,
        secret_hash: r.try_get(3)?,
        created_at: r.try_get(4)?,
        expires_at: r.try_get(5)?,
        max_token_ttl_secs: r.try_get(6)?,
        revoked_at: r.try_get(7)?,
    })
}

fn decode_credential(r: &PgRow) -> Result<CredentialRecord, StoreError> {
    credential_row(r).map_err(classify)?.decode()
}

fn sandbox_row(r: &PgRow) -> Result<SandboxRow, sqlx::Error> {
    Ok(SandboxRow {
        id: r.try_get(0)?,
        owner: r.try_get(1)?,
        status: r.try_get(2)?,
        ports: r.try_get(3)?,
        upstream: r.try_get(4)?,
        command: r.try_get(5)?,
        env: r.try_get(6)?,
        cors_origins: r.try_get(7)?,
        rewrite_host: r.try_get(8)?,
        metadata: r.try_get(9)?,
        created_at: r.try_get(10)?,
        expires_at: r.try_get(11)?,
        ended_at: r.try_get(12)?,
        host_ports: r.try_get(13)?,
        node: r.try_get(14)?,
        detail: r.try_get(15)?,
        process: r.try_get(16)?,
        name: r.try_get(17)?,
        tags: r.try_get(18)?,
        // Opened by `decode_sandbox`, which has the key.
        secret_env: None,
    })
}

/// The AAD that binds a sealed `secret_env` to its sandbox's row (the id as stored).
fn secret_env_aad(id: &str) -> Vec<u8> {
    [b"secret_env:".as_slice(), text(id).as_bytes()].concat()
}

fn decode_sandbox(sealer: &Sealer, r: &PgRow) -> Result<SandboxRecord, StoreError> {
    let mut row = sandbox_row(r).map_err(classify)?;
    let sealed: Option<Vec<u8>> = r.try_get(19).map_err(classify)?;
    if let Some(sealed) = sealed {
        // Never an empty environment in its place: a sandbox whose secrets are lost must not
        // start without them as if none were set.
        let opened = sealer
            .open(&secret_env_aad(&row.id), &sealed)
            .and_then(|plain| String::from_utf8(plain).ok())
            .ok_or_else(|| KekError::SecretUndecryptable { id: row.id.clone() })?;
        row.secret_env = Some(opened);
    }
    row.decode()
}

fn decode_issued_token(r: &PgRow) -> Result<IssuedToken, StoreError> {
    let row = || -> Result<IssuedTokenRow, sqlx::Error> {
        Ok(IssuedTokenRow {
            jti: r.try_get(0)?,
            sandbox: r.try_get(1)?,
            port: i64::from(r.try_get::<i32, _>(2)?),
            sub: r.try_get(3)?,
            issued_at: r.try_get(4)?,
            exp: r.try_get(5)?,
            single_use: r.try_get(6)?,
        })
    };
    row().map_err(classify)?.decode()
}

/// Audit events as column arrays, so a whole batch is one `INSERT ... SELECT FROM UNNEST`.
struct AuditArrays {
    times: Vec<i64>,
    actors: Vec<String>,
    actions: Vec<String>,
    targets: Vec<String>,
    addrs: Vec<Option<String>>,
}

/// Appends the events bound as `$1..$5` ([`AuditArrays::bind`]); identities are assigned in
/// `ORDER BY` order, so ids follow the batch's order.
const INSERT_AUDIT_ARRAYS: &str =
    "INSERT INTO audit_events (time, actor, action, target, client_addr)
     SELECT time, actor, action, target, client_addr
     FROM UNNEST($1::BIGINT[], $2::TEXT[], $3::TEXT[], $4::TEXT[], $5::TEXT[])
          WITH ORDINALITY AS e(time, actor, action, target, client_addr, ord)
     ORDER BY ord";

impl AuditArrays {
    fn of(events: &[AuditEvent]) -> AuditArrays {
        let column = |f: fn(&AuditEvent) -> &str| -> Vec<String> {
            events.iter().map(|e| text(f(e)).into_owned()).collect()
        };
        AuditArrays {
            times: events.iter().map(|e| e.time).collect(),
            actors: column(|e| &e.actor),
            actions: column(|e| &e.action),
            targets: column(|e| &e.target),
            addrs: events.iter().map(|e| opt_text(&e.client_addr)).collect(),
        }
    }

    /// Binds the arrays as `$1..$5`.
    fn bind<'q>(
        &'q self,
        query: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
        query
            .bind(&self.times)
            .bind(&self.actors)
            .bind(&self.actions)
            .bind(&self.targets)
            .bind(&self.addrs)
    }
}

const NODE_COLUMNS: &str =
    "name, advertise_addr, runs_sandboxes, version, started_at, last_heartbeat, relay_addr";

fn node_row(r: &PgRow) -> Result<NodeRecord, StoreError> {
    let get = || -> Result<NodeRecord, sqlx::Error> {
        Ok(NodeRecord {
            name: r.try_get(0)?,
            advertise_addr: r.try_get(1)?,
            runs_sandboxes: r.try_get(2)?,
            version: r.try_get(3)?,
            started_at: r.try_get(4)?,
            last_heartbeat: r.try_get(5)?,
            relay_addr: r.try_get(6)?,
        })
    };
    get().map_err(classify)
}

/// Runs `sql` (binding the first `binds` of [`SANDBOX_COLUMNS`] as `$1, $2, ...` in order) for
/// `p`; rows affected.
async fn execute_sandbox(
    conn: &mut PgConnection,
    sql: &str,
    p: &SandboxParams,
    binds: usize,
    sealed_secret_env: Option<Vec<u8>>,
) -> Result<u64, sqlx::Error> {
    let query = sqlx::query(sql)
        .bind(text(&p.id))
        .bind(text(&p.owner))
        .bind(p.status)
        .bind(&p.ports)
        .bind(opt_text(&p.upstream))
        .bind(&p.command)
        .bind(&p.env)
        .bind(&p.cors_origins)
        .bind(p.rewrite_host)
        .bind(&p.metadata)
        .bind(p.created_at)
        .bind(p.expires_at)
        .bind(p.ended_at)
        .bind(&p.host_ports)
        .bind(opt_text(&p.node))
        .bind(opt_text(&p.detail))
        .bind(&p.process);
    let query = if binds == SANDBOX_BINDS {
        query
            .bind(opt_text(&p.name))
            .bind(&p.tags)
            .bind(sealed_secret_env)
    } else {
        debug_assert_eq!(binds, SANDBOX_UPDATE_BINDS);
        query
    };
    let done = query.execute(conn).await?;
    Ok(done.rows_affected())
}

async fn token_list(pool: &PgPool, sql: &str, now: i64) -> Result<Vec<(String, i64)>, StoreError> {
    let rows = sqlx::query(sql)
        .bind(now - EXPIRED_TOKEN_GRACE_SECS)
        .fetch_all(pool)
        .await
        .map_err(classify)?;
    rows.iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
        .collect::<Result<Vec<_>, sqlx::Error>>()
        .map_err(classify)
}

#[async_trait]
impl Store for PostgresStore {
    async fn signing_keys(&self) -> Result<Vec<StoredSigningKey>, StoreError> {
        bounded(async {
            let rows = sqlx::query(
                "SELECT kid, created_at, sealed_der FROM signing_keys ORDER BY created_at, seq",
            )
            .fetch_all(self.pool())
            .await
            .map_err(classify)?;
            rows.iter()
                .map(|r| {
                    let kid: String = r.try_get(0).map_err(classify)?;
                    let created_at: i64 = r.try_get(1).map_err(classify)?;
                    let sealed: Vec<u8> = r.try_get(2).map_err(classify)?;
                    let private_der = self
                        .inner
                        .sealer
                        .open(kid.as_bytes(), &sealed)
                        .ok_or_else(|| KekError::Undecryptable { kid: kid.clone() })?;
                    Ok(StoredSigningKey {
                        kid,
                        created_at,
                        private_der,
                    })
                })
                .collect()
        })
        .await
    }

    async fn insert_signing_key(&self, key: &StoredSigningKey) -> Result<(), StoreError> {
        bounded(async {
            let kid = text(&key.kid);
            // The stored kid is the AAD, so a sealed key only opens under its own kid.
            let sealed = self.inner.sealer.seal(kid.as_bytes(), &key.private_der)?;
            let mut tx = self.pool().begin().await.map_err(classify)?;
            sqlx::query(
                "INSERT INTO signing_keys (kid, created_at, sealed_der) VALUES ($1, $2, $3)",
            )
            .bind(&*kid)
            .bind(key.created_at)
            .bind(sealed)
            .execute(&mut *tx)
            .await
            .map_err(|e| {
                classify_insert(e, || format!("signing key {} already exists", key.kid))
            })?;
            self.notify(
                &mut tx,
                &Change::SigningKeyAdded {
                    kid: kid.into_owned(),
                },
            )
            .await?;
            tx.commit().await.map_err(classify)
        })
        .await
    }

    async fn insert_credential(&self, c: &CredentialRecord) -> Result<(), StoreError> {
        let scopes = scopes_json(&c.scopes)?;
        bounded(async {
            sqlx::query(&format!(
                "INSERT INTO credentials ({CREDENTIAL_COLUMNS})
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
            ))
            .bind(text(&c.id))
            .bind(text(&c.name))
            .bind(&scopes)
            .bind(c.secret_hash.0.as_slice())
            .bind(c.created_at)
            .bind(c.expires_at)
            .bind(c.max_token_ttl_secs)
            .bind(c.revoked_at)
            .execute(self.pool())
            .await
            // Either the id or the secret hash collided; the message must not echo the hash.
            .map_err(|e| classify_insert(e, || format!("credential {} already exists", c.id)))?;
            Ok(())
        })
        .await
    }

    async fn credentials(&self) -> Result<Vec<CredentialRecord>, StoreError> {
        bounded(async {
            let rows = sqlx::query(&format!(
                "SELECT {CREDENTIAL_COLUMNS} FROM credentials ORDER BY created_at, seq"
            ))
            .fetch_all(self.pool())
            .await
            .map_err(classify)?;
            rows.iter().map(decode_credential).collect()
        })
        .await
    }

    async fn credential(&self, id: &str) -> Result<Option<CredentialRecord>, StoreError> {
        bounded(async {
            sqlx::query(&format!(
                "SELECT {CREDENTIAL_COLUMNS} FROM credentials WHERE id = $1"
            ))
            .bind(text(id))
            .fetch_optional(self.pool())
            .await
            .map_err(classify)?
            .as_ref()
            .map(decode_credential)
            .transpose()
        })
        .await
    }

    async fn credential_by_hash(
        &self,
        hash: &SecretHash,
    ) -> Result<Option<CredentialRecord>, StoreError> {
        bounded(async {
            sqlx::query(&format!(
                "SELECT {CREDENTIAL_COLUMNS} FROM credentials WHERE secret_hash = $1"
            ))
            .bind(hash.0.as_slice())
            .fetch_optional(self.pool())
            .await
            .map_err(classify)?
            .as_ref()
            .map(decode_credential)
            .transpose()
        })
        .await
    }

    async fn revoke_credential(&self, id: &str, at: i64) -> Result<bool, StoreError> {
        bounded(async {
            let id = text(id);
            let mut tx = self.pool().begin().await.map_err(classify)?;
            let changed = sqlx::query(
                "UPDATE credentials SET revoked_at = $2 WHERE id = $1 AND revoked_at IS NULL",
            )
            .bind(&*id)
            .bind(at)
            .execute(&mut *tx)
            .await
            .map_err(classify)?
            .rows_affected();
            if changed == 0 {
                return Ok(false);
            }
            self.notify(
                &mut tx,
                &Change::CredentialRevoked {
                    id: id.into_owned(),
                },
            )
            .await?;
            tx.commit().await.map_err(classify)?;
            Ok(true)
        })
        .await
    }

    async fn insert_sandbox(&self, s: &SandboxRecord) -> Result<(), StoreError> {
        let row = SandboxParams::encode(s)?;
        let sealed = row
            .secret_env
            .as_ref()
            .map(|plain| {
                self.inner
                    .sealer
                    .seal(&secret_env_aad(&row.id), plain.as_bytes())
            })
            .transpose()?;
        bounded(async {
            let mut tx = self.pool().begin().await.map_err(classify)?;
            execute_sandbox(
                &mut tx,
                &format!(
                    "INSERT INTO sandboxes ({SANDBOX_COLUMNS}) VALUES
                     ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17,
                      $18, $19, $20)"
                ),
                &row,
                SANDBOX_BINDS,
                sealed,
            )
            .await
            .map_err(|e| {
                let on_name = matches!(&e, sqlx::Error::Database(db)
                    if db.constraint() == Some("sandboxes_live_name"));
                match (classify(e), &row.name) {
                    (StoreError::Conflict(_), Some(name)) if on_name => {
                        StoreError::NameInUse(name.clone())
                    }
                    (StoreError::Conflict(_), _) => {
                        StoreError::Conflict(format!("sandbox {} already exists", row.id))
                    }
                    (other, _) => other,
                }
            })?;
            let id = text(&row.id).into_owned();
            self.notify(&mut tx, &Change::SandboxChanged { id }).await?;
            tx.commit().await.map_err(classify)
        })
        .await
    }

    async fn update_sandbox(&self, s: &SandboxRecord) -> Result<(), StoreError> {
        let row = SandboxParams::encode(s)?;
        bounded(async {
            let mut tx = self.pool().begin().await.map_err(classify)?;
            let changed = execute_sandbox(
                &mut tx,
                "UPDATE sandboxes SET owner = $2, status = $3, ports = $4, upstream = $5,
                    command = $6, env = $7, cors_origins = $8, rewrite_host = $9,
                    metadata = $10, created_at = $11, expires_at = $12, ended_at = $13,
                    host_ports = $14, node = $15, detail = $16, process = $17
                 WHERE id = $1",
                &row,
                SANDBOX_UPDATE_BINDS,
                None,
            )
            .await
            .map_err(classify)?;
            if changed == 0 {
                return Err(StoreError::NotFound);
            }
            let id = text(&row.id).into_owned();
            self.notify(&mut tx, &Change::SandboxChanged { id }).await?;
            tx.commit().await.map_err(classify)
        })
        .await
    }

    async fn sandbox(&self, id: &str) -> Result<Option<SandboxRecord>, StoreError> {
        bounded(async {
            sqlx::query(&format!(
                "SELECT {SANDBOX_COLUMNS} FROM sandboxes WHERE id = $1"
            ))
            .bind(text(id))
            .fetch_optional(self.pool())
            .await
            .map_err(classify)?
            .as_ref()
            .map(|r| decode_sandbox(&self.inner.sealer, r))
            .transpose()
        })
        .await
    }

    async fn set_sandbox_tags(
        &self,
        id: &str,
        tags: &BTreeMap<String, String>,
    ) -> Result<(), StoreError> {
        let tags = to_json(tags)?;
        bounded(async {
            let id = text(id).into_owned();
            let mut tx = self.pool().begin().await.map_err(classify)?;
            let changed = sqlx::query("UPDATE sandboxes SET tags = $2 WHERE id = $1")
                .bind(&id)
                .bind(&tags)
                .execute(&mut *tx)
                .await
                .map_err(classify)?
                .rows_affected();
            if changed == 0 {
                return Err(StoreError::NotFound);
            }
            self.notify(&mut tx, &Change::SandboxChanged { id }).await?;
            tx.commit().await.map_err(classify)
        })
        .await
    }

    async fn live_sandbox_named(
        &self,
        owner: &str,
        name: &str,
    ) -> Result<Option<SandboxRecord>, StoreError> {
        bounded(async {
            sqlx::query(&format!(
                "SELECT {SANDBOX_COLUMNS} FROM sandboxes
                 WHERE owner = $1 AND name = $2 AND status IN {LIVE_STATUSES_SQL}"
            ))
            .bind(text(owner))
            .bind(text(name))
            .fetch_optional(self.pool())
            .await
            .map_err(classify)?
            .as_ref()
            .map(|r| decode_sandbox(&self.inner.sealer, r))
            .transpose()
        })
        .await
    }

    async fn find_sandboxes(
        &self,
        filter: &SandboxFilter,
    ) -> Result<Vec<SandboxRecord>, StoreError> {
        bounded(async {
            // Owner and name are plain columns, narrowed here; tags are JSON text, checked in
            // Rust by the same predicate every backend uses.
            let rows = sqlx::query(&format!(
                "SELECT {SANDBOX_COLUMNS} FROM sandboxes
                 WHERE ($1::text IS NULL OR owner = $1) AND ($2::text IS NULL OR name = $2)
                 ORDER BY created_at, seq"
            ))
            .bind(opt_text(&filter.owner))
            .bind(opt_text(&filter.name))
            .fetch_all(self.pool())
            .await
            .map_err(classify)?;
            let mut found = Vec::new();
            for row in &rows {
                let record = decode_sandbox(&self.inner.sealer, row)?;
                if filter.has_tags(&record) {
                    found.push(record);
                }
            }
            Ok(found)
        })
        .await
    }

    async fn sandboxes(&self) -> Result<Vec<SandboxRecord>, StoreError> {
        bounded(async {
            let rows = sqlx::query(&format!(
                "SELECT {SANDBOX_COLUMNS} FROM sandboxes ORDER BY created_at, seq"
            ))
            .fetch_all(self.pool())
            .await
            .map_err(classify)?;
            rows.iter()
                .map(|r| decode_sandbox(&self.inner.sealer, r))
                .collect()
        })
        .await
    }

    async fn revoke_token(&self, jti: &str, exp: i64) -> Result<(), StoreError> {
        bounded(async {
            let jti = text(jti);
            let mut tx = self.pool().begin().await.map_err(classify)?;
            // Keep the later expiry if the same jti is revoked twice with different values, so a
            // revocation never shortens; announce the expiry that is stored.
            let exp: i64 = sqlx::query_scalar(
                "INSERT INTO revoked_tokens (jti, exp) VALUES ($1, $2)
                 ON CONFLICT (jti) DO UPDATE SET exp = GREATEST(revoked_tokens.exp, excluded.exp)
                 RETURNING exp",
            )
            .bind(&*jti)
            .bind(exp)
            .fetch_one(&mut *tx)
            .await
            .map_err(classify)?;
            let change = Change::TokenRevoked {
                jti: jti.into_owned(),
                exp,
            };
            self.notify(&mut tx, &change).await?;
            tx.commit().await.map_err(classify)
        })
        .await
    }

    async fn revoked_tokens(&self, now: i64) -> Result<Vec<(String, i64)>, StoreError> {
        bounded(token_list(
            self.pool(),
            "SELECT jti, exp FROM revoked_tokens WHERE exp >= $1",
            now,
        ))
        .await
    }

    async fn mark_token_used(&self, jti: &str, exp: i64) -> Result<bool, StoreError> {
        bounded(async {
            // One statement: atomic across every node; a concurrent insert of the same jti waits
            // for the first and then does nothing.
            let inserted = sqlx::query(
                "INSERT INTO used_tokens (jti, exp) VALUES ($1, $2) ON CONFLICT (jti) DO NOTHING",
            )
            .bind(text(jti))
            .bind(exp)
            .execute(self.pool())
            .await
            .map_err(classify)?
            .rows_affected();
            Ok(inserted == 1)
        })
        .await
    }

    async fn used_tokens(&self, now: i64) -> Result<Vec<(String, i64)>, StoreError> {
        bounded(token_list(
            self.pool(),
            "SELECT jti, exp FROM used_tokens WHERE exp >= $1",
            now,
        ))
        .await
    }

    async fn append_audit(&self, e: &AuditEvent) -> Result<i64, StoreError> {
        bounded(async {
            sqlx::query_scalar(
                "INSERT INTO audit_events (time, actor, action, target, client_addr)
                 VALUES ($1, $2, $3, $4, $5) RETURNING id",
            )
            .bind(e.time)
            .bind(text(&e.actor))
            .bind(text(&e.action))
            .bind(text(&e.target))
            .bind(opt_text(&e.client_addr))
            .fetch_one(self.pool())
            .await
            .map_err(classify)
        })
        .await
    }

    async fn append_audit_batch(&self, events: &[AuditEvent]) -> Result<(), StoreError> {
        if events.is_empty() {
            return Ok(());
        }
        let audit = AuditArrays::of(events);
        bounded(async {
            // One statement for the whole batch: atomic on its own.
            audit
                .bind(sqlx::query(INSERT_AUDIT_ARRAYS))
                .execute(self.pool())
                .await
                .map_err(classify)?;
            Ok(())
        })
        .await
    }

    async fn record_issued_tokens(
        &self,
        tokens: &[IssuedToken],
        events: &[AuditEvent],
    ) -> Result<(), StoreError> {
        if tokens.is_empty() {
            return self.append_audit_batch(events).await;
        }
        let audit = AuditArrays::of(events);
        let jtis: Vec<String> = tokens.iter().map(|t| text(&t.jti).into_owned()).collect();
        let sandboxes: Vec<String> = tokens
            .iter()
            .map(|t| text(&t.sandbox).into_owned())
            .collect();
        let ports: Vec<i32> = tokens.iter().map(|t| i32::from(t.port)).collect();
        let subs: Vec<String> = tokens.iter().map(|t| text(&t.sub).into_owned()).collect();
        let issued_at: Vec<i64> = tokens.iter().map(|t| t.issued_at).collect();
        let exps: Vec<i64> = tokens.iter().map(|t| t.exp).collect();
        let once: Vec<bool> = tokens.iter().map(|t| t.single_use).collect();
        // One statement (a data-modifying CTE always runs to completion): atomic, one round
        // trip and one commit for the tokens and the events together.
        let sql = format!(
            "WITH issued AS (
                INSERT INTO issued_tokens ({ISSUED_TOKEN_COLUMNS})
                SELECT jti, sandbox, port, sub, issued_at, exp, single_use
                FROM UNNEST($6::TEXT[], $7::TEXT[], $8::INTEGER[], $9::TEXT[], $10::BIGINT[],
                            $11::BIGINT[], $12::BOOLEAN[])
                     WITH ORDINALITY
                     AS t(jti, sandbox, port, sub, issued_at, exp, single_use, ord)
                ORDER BY ord
             )
             {INSERT_AUDIT_ARRAYS}"
        );
        bounded(async {
            audit
                .bind(sqlx::query(&sql))
                .bind(&jtis)
                .bind(&sandboxes)
                .bind(&ports)
                .bind(&subs)
                .bind(&issued_at)
                .bind(&exps)
                .bind(&once)
                .execute(self.pool())
                .await
                .map_err(|e| classify_insert(e, || "a token id is already recorded".to_owned()))?;
            Ok(())
        })
        .await
    }

    async fn issued_token(&self, jti: &str) -> Result<Option<IssuedToken>, StoreError> {
        bounded(async {
            sqlx::query(&format!(
                "SELECT {ISSUED_TOKEN_COLUMNS} FROM issued_tokens WHERE jti = $1"
            ))
            .bind(text(jti))
            .fetch_optional(self.pool())
            .await
            .map_err(classify)?
            .as_ref()
            .map(decode_issued_token)
            .transpose()
        })
        .await
    }

    async fn live_tokens(
        &self,
        live_after: i64,
        sandbox: Option<&str>,
    ) -> Result<Vec<IssuedToken>, StoreError> {
        bounded(async {
            let rows = sqlx::query(&format!(
                "SELECT {ISSUED_TOKEN_COLUMNS} FROM issued_tokens i
                 WHERE exp > $1 AND ($2::TEXT IS NULL OR sandbox = $2)
                   AND NOT EXISTS (SELECT 1 FROM revoked_tokens r WHERE r.jti = i.jti)
                 ORDER BY issued_at, seq"
            ))
            .bind(live_after)
            .bind(sandbox.map(text))
            .fetch_all(self.pool())
            .await
            .map_err(classify)?;
            rows.iter().map(decode_issued_token).collect()
        })
        .await
    }

    async fn audit(&self, limit: usize) -> Result<Vec<AuditEvent>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        bounded(async {
            let rows = sqlx::query(
                "SELECT id, time, actor, action, target, client_addr FROM audit_events
                 ORDER BY id DESC LIMIT $1",
            )
            .bind(limit)
            .fetch_all(self.pool())
            .await
            .map_err(classify)?;
            rows.iter()
                .map(|r| {
                    Ok(AuditEvent {
                        id: r.try_get(0)?,
                        time: r.try_get(1)?,
                        actor: r.try_get(2)?,
                        action: r.try_get(3)?,
                        target: r.try_get(4)?,
                        client_addr: r.try_get(5)?,
                    })
                })
                .collect::<Result<Vec<_>, sqlx::Error>>()
                .map_err(classify)
        })
        .await
    }

    async fn prune(&self, now: i64) -> Result<(), StoreError> {
        let cutoff = now - EXPIRED_TOKEN_GRACE_SECS;
        bounded(async {
            let mut tx = self.pool().begin().await.map_err(classify)?;
            let revoked = sqlx::query("DELETE FROM revoked_tokens WHERE exp < $1")
                .bind(cutoff)
                .execute(&mut *tx)
                .await
                .map_err(classify)?
                .rows_affected();
            let used = sqlx::query("DELETE FROM used_tokens WHERE exp < $1")
                .bind(cutoff)
                .execute(&mut *tx)
                .await
                .map_err(classify)?
                .rows_affected();
            let issued = sqlx::query("DELETE FROM issued_tokens WHERE exp < $1")
                .bind(cutoff)
                .execute(&mut *tx)
                .await
                .map_err(classify)?
                .rows_affected();
            tx.commit().await.map_err(classify)?;
            if revoked + used + issued > 0 {
                tracing::debug!(revoked, used, issued, "pruned expired token entries");
            }
            Ok(())
        })
        .await
    }

    async fn heartbeat(&self, node: &NodeRecord) -> Result<(), StoreError> {
        let node = NodeRecord {
            name: text(&node.name).into_owned(),
            advertise_addr: text(&node.advertise_addr).into_owned(),
            version: text(&node.version).into_owned(),
            relay_addr: node.relay_addr.as_deref().map(|a| text(a).into_owned()),
            ..node.clone()
        };
        bounded(async {
            let mut tx = self.pool().begin().await.map_err(classify)?;
            // Lock the row, so the comparison below sees what this upsert replaces.
            let before = sqlx::query(&format!(
                "SELECT {NODE_COLUMNS} FROM nodes WHERE name = $1 FOR UPDATE"
            ))
            .bind(&node.name)
            .fetch_optional(&mut *tx)
            .await
            .map_err(classify)?
            .as_ref()
            .map(node_row)
            .transpose()?;
            sqlx::query(&format!(
                "INSERT INTO nodes ({NODE_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7)
                 ON CONFLICT (name) DO UPDATE SET advertise_addr = excluded.advertise_addr,
                    runs_sandboxes = excluded.runs_sandboxes, version = excluded.version,
                    started_at = excluded.started_at, last_heartbeat = excluded.last_heartbeat,
                            relay_addr = excluded.relay_addr"
            ))
            .bind(&node.name)
            .bind(&node.advertise_addr)
            .bind(node.runs_sandboxes)
            .bind(&node.version)
            .bind(node.started_at)
            .bind(node.last_heartbeat)
            .bind(&node.relay_addr)
            .execute(&mut *tx)
            .await
            .map_err(classify)?;
            if before.is_none_or(|b| !b.same_announcement(&node)) {
                let change = Change::NodeChanged {
                    name: node.name.clone(),
                };
                self.notify(&mut tx, &change).await?;
            }
            tx.commit().await.map_err(classify)
        })
        .await
    }

    async fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        bounded(async {
            let rows = sqlx::query(&format!("SELECT {NODE_COLUMNS} FROM nodes ORDER BY name"))
                .fetch_all(self.pool())
                .await
                .map_err(classify)?;
            rows.iter().map(node_row).collect()
        })
        .await
    }

    async fn mark_node_lost(
        &self,
        name: &str,
        heartbeat_before: i64,
        now: i64,
    ) -> Result<Vec<String>, StoreError> {
        let live: Vec<&'static str> = SandboxStatus::ALL
            .iter()
            .filter(|s| s.is_live())
            .map(SandboxStatus::as_str)
            .collect();
        bounded(async {
            let name = text(name);
            let mut tx = self.pool().begin().await.map_err(classify)?;
            // The row lock serialises racing markers and the node's own heartbeat: a marker
            // that waited re-reads the heartbeat, and finds the sandboxes already lost.
            let last: Option<i64> =
                sqlx::query_scalar("SELECT last_heartbeat FROM nodes WHERE name = $1 FOR UPDATE")
                    .bind(&*name)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(classify)?;
            if last.is_none_or(|last| last >= heartbeat_before) {
                return Ok(Vec::new());
            }
            let mut lost: Vec<String> = sqlx::query_scalar(
                "UPDATE sandboxes SET status = $2, ended_at = $3, detail = $4
                 WHERE node = $1 AND status = ANY($5) RETURNING id",
            )
            .bind(&*name)
            .bind(SandboxStatus::Lost.as_str())
            .bind(now)
            .bind(super::lost_detail(&name))
            .bind(&live)
            .fetch_all(&mut *tx)
            .await
            .map_err(classify)?;
            lost.sort();
            for id in &lost {
                self.notify(&mut tx, &Change::SandboxChanged { id: id.clone() })
                    .await?;
            }
            tx.commit().await.map_err(classify)?;
            Ok(lost)
        })
        .await
    }

    async fn insert_volume(&self, v: &VolumeRecord) -> Result<(), StoreError> {
        bounded(async {
            sqlx::query(&format!(
                "INSERT INTO volumes ({VOLUME_COLUMNS}) VALUES ($1, $2, $3, $4, $5)"
            ))
            .bind(&*text(&v.owner))
            .bind(&*text(&v.name))
            .bind(v.created_at)
            .bind(v.node.as_deref().map(|n| text(n).into_owned()))
            .bind(i64::from(v.uid))
            .execute(self.pool())
            .await
            .map_err(|e| classify_insert(e, || format!("volume {} already exists", v.name)))?;
            Ok(())
        })
        .await
    }

    async fn volume(&self, owner: &str, name: &str) -> Result<Option<VolumeRecord>, StoreError> {
        bounded(async {
            sqlx::query(&format!(
                "SELECT {VOLUME_COLUMNS} FROM volumes WHERE owner = $1 AND name = $2"
            ))
            .bind(&*text(owner))
            .bind(&*text(name))
            .fetch_optional(self.pool())
            .await
            .map_err(classify)?
            .as_ref()
            .map(volume_row)
            .transpose()
        })
        .await
    }

    async fn volumes(&self) -> Result<Vec<VolumeRecord>, StoreError> {
        bounded(async {
            let rows = sqlx::query(&format!(
                "SELECT {VOLUME_COLUMNS} FROM volumes ORDER BY created_at, owner, name"
            ))
            .fetch_all(self.pool())
            .await
            .map_err(classify)?;
            rows.iter().map(volume_row).collect()
        })
        .await
    }

    async fn delete_volume(&self, owner: &str, name: &str) -> Result<bool, StoreError> {
        bounded(async {
            let n = sqlx::query("DELETE FROM volumes WHERE owner = $1 AND name = $2")
                .bind(&*text(owner))
                .bind(&*text(name))
                .execute(self.pool())
                .await
                .map_err(classify)?
                .rows_affected();
            Ok(n > 0)
        })
        .await
    }

    fn changes(&self) -> Option<broadcast::Receiver<Change>> {
        Some(self.inner.changes.subscribe())
    }
}

const VOLUME_COLUMNS: &str = "owner, name, created_at, node, uid";

fn volume_row(r: &PgRow) -> Result<VolumeRecord, StoreError> {
    let get = || -> Result<(String, String, i64, Option<String>, i64), sqlx::Error> {
        Ok((
            r.try_get(0)?,
            r.try_get(1)?,
            r.try_get(2)?,
            r.try_get(3)?,
            r.try_get(4)?,
        ))
    };
    let (owner, name, created_at, node, uid) = get().map_err(classify)?;
    let uid = u32::try_from(uid)
        .map_err(|_| StoreError::Corrupt(format!("volume {name} has uid {uid}")))?;
    Ok(VolumeRecord {
        owner,
        name,
        created_at,
        node,
        uid,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "in tests a panic is the failure report")]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Instant;

    use super::*;
    use crate::store::conformance::{self, conformance_tests, next_change, Fixture};

    /// The server the tests use: `$SANDGATE_TEST_PG`, else the local trust-auth default.
    fn test_url() -> String {
        std::env::var("SANDGATE_TEST_PG")
            .ok()
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/test".to_owned())
    }

    fn random_kek() -> Kek {
        Kek::parse(&generate_kek()).unwrap()
    }

    fn options(schema: &str, kek: Option<Kek>) -> PostgresOptions {
        PostgresOptions {
            schema: Some(schema.to_owned()),
            // Unique per test, so a test can find (and kill) exactly its own backends.
            application_name: schema.to_owned(),
            ..PostgresOptions::new(&test_url(), kek)
        }
    }

    /// A store in a fresh schema of its own (so tests run in parallel), dropped with the
    /// fixture. Panics, failing the test, when PostgreSQL is unreachable: these tests must
    /// never pass by skipping.
    struct PgFixture {
        store: PostgresStore,
        schema: String,
        kek: Kek,
    }

    impl Fixture for PgFixture {
        fn store(&self) -> &dyn Store {
            &self.store
        }
    }

    impl PgFixture {
        async fn new() -> PgFixture {
            drop_stale_schemas().await;
            let schema = format!(
                "sg_test_{}_{:08x}",
                crate::unix_now(),
                rand::rng().next_u32()
            );
            let kek = random_kek();
            let store = PostgresStore::open(options(&schema, Some(kek.clone())))
                .await
                .unwrap_or_else(|e| {
                    let mut cause = e.to_string();
                    let mut source = std::error::Error::source(&e);
                    while let Some(s) = source {
                        cause = format!("{cause}: {s}");
                        source = s.source();
                    }
                    panic!(
                        "PostgreSQL at {} is required for these tests (set SANDGATE_TEST_PG): \
                         {cause}",
                        redact_url(&test_url()),
                    )
                });
            PgFixture { store, schema, kek }
        }

        /// Another node on the same database and schema.
        async fn second_node(&self) -> PostgresStore {
            PostgresStore::open(options(&self.schema, Some(self.kek.clone())))
                .await
                .unwrap()
        }

        async fn admin(&self) -> PgConnection {
            PgConnection::connect(&test_url()).await.unwrap()
        }
    }

    impl Drop for PgFixture {
        fn drop(&mut self) {
            // Drop is synchronous and may run on a runtime thread: do the async clean-up on a
            // thread of its own. Best effort; stale schemas are also swept at the next start.
            let schema = self.schema.clone();
            let _ = std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                runtime.block_on(async {
                    if let Ok(mut conn) = PgConnection::connect(&test_url()).await {
                        let _ = sqlx::raw_sql(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
                            .execute(&mut conn)
                            .await;
                    }
                });
            })
            .join();
        }
    }

    /// Drops test schemas left by runs that crashed, once per test process. Only those more
    /// than an hour old, so a concurrent run is never disturbed.
    async fn drop_stale_schemas() {
        static SWEPT: AtomicBool = AtomicBool::new(false);
        if SWEPT.swap(true, Ordering::SeqCst) {
            return;
        }
        let Ok(mut conn) = PgConnection::connect(&test_url()).await else {
            return; // The fixture reports the failure.
        };
        let names: Vec<String> = sqlx::query_scalar(
            "SELECT nspname::TEXT FROM pg_namespace WHERE nspname LIKE 'sg\\_test\\_%'",
        )
        .fetch_all(&mut conn)
        .await
        .unwrap_or_default();
        let cutoff = crate::unix_now() - 3_600;
        for name in names {
            let made: Option<i64> = name
                .strip_prefix("sg_test_")
                .and_then(|rest| rest.split('_').next())
                .and_then(|ts| ts.parse().ok());
            if made.is_some_and(|t| t < cutoff) {
                let _ = sqlx::raw_sql(&format!("DROP SCHEMA IF EXISTS {name} CASCADE"))
                    .execute(&mut conn)
                    .await;
            }
        }
    }

    mod conformance_suite {
        use super::*;

        async fn make() -> PgFixture {
            PgFixture::new().await
        }

        conformance_tests!(make);
    }

    #[tokio::test]
    async fn opening_without_a_kek_says_what_to_set() {
        let err = PostgresStore::open(PostgresOptions::new(&test_url(), None))
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Kek(KekError::Missing)), "{err:?}");
        let shown = err.to_string();
        for needle in ["SANDGATE_KEK", "[cluster] kek_file", "encrypted", "64 hex"] {
            assert!(shown.contains(needle), "{needle} in {shown}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_wrong_kek_is_refused_at_open_even_before_any_key_exists() {
        let f = PgFixture::new().await;
        let err = PostgresStore::open(options(&f.schema, Some(random_kek())))
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Kek(KekError::Wrong)), "{err:?}");
        assert!(err.to_string().contains("same key"), "{err}");
        // The right key still opens it.
        f.second_node().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn signing_keys_are_sealed_at_rest_and_bound_to_their_kid() {
        let f = PgFixture::new().await;
        let key = conformance::signing_key("k-sealed", 1);
        let other = conformance::signing_key("k-other", 2);
        f.store.insert_signing_key(&key).await.unwrap();
        f.store.insert_signing_key(&other).await.unwrap();

        let mut admin = f.admin().await;
        let sealed: Vec<u8> = sqlx::query_scalar(&format!(
            "SELECT sealed_der FROM {}.signing_keys WHERE kid = 'k-sealed'",
            f.schema
        ))
        .fetch_one(&mut admin)
        .await
        .unwrap();
        assert_eq!(
            sealed.len(),
            1 + NONCE_LEN + key.private_der.len() + TAG_LEN
        );
        assert!(
            !sealed
                .windows(16)
                .any(|w| key.private_der.windows(16).any(|k| k == w)),
            "no run of the plaintext is stored"
        );
        // Another node with the same KEK reads the plaintext back.
        let node_b = f.second_node().await;
        assert_eq!(
            node_b.signing_keys().await.unwrap(),
            vec![key.clone(), other.clone()]
        );

        // A sealed key moved to another kid no longer opens: the kid is authenticated.
        sqlx::raw_sql(&format!(
            "UPDATE {s}.signing_keys SET sealed_der = (SELECT sealed_der FROM {s}.signing_keys
             WHERE kid = 'k-other') WHERE kid = 'k-sealed'",
            s = f.schema
        ))
        .execute(&mut admin)
        .await
        .unwrap();
        let err = f.store.signing_keys().await.unwrap_err();
        assert!(
            matches!(&err, StoreError::Kek(KekError::Undecryptable { kid }) if kid == "k-sealed"),
            "{err:?}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_revocation_on_one_node_reaches_the_other_within_a_second() {
        let f = PgFixture::new().await;
        let node_b = f.second_node().await;
        let mut feed_b = node_b.changes().unwrap();
        let started = Instant::now();
        f.store.revoke_token("jti-cluster", 12_345).await.unwrap();
        let change = tokio::time::timeout(Duration::from_secs(1), feed_b.recv())
            .await
            .expect("delivered within 1 s")
            .unwrap();
        assert_eq!(
            change,
            Change::TokenRevoked {
                jti: "jti-cluster".to_owned(),
                exp: 12_345
            }
        );
        assert!(started.elapsed() < Duration::from_secs(1));
        assert_eq!(
            node_b.revoked_tokens(0).await.unwrap(),
            vec![("jti-cluster".to_owned(), 12_345)]
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn schemas_do_not_hear_each_others_changes() {
        let a = PgFixture::new().await;
        let b = PgFixture::new().await;
        assert_ne!(a.store.channel(), b.store.channel());
        let mut feed_b = b.store.changes().unwrap();
        a.store.revoke_token("only-a", 1).await.unwrap();
        b.store.revoke_token("only-b", 1).await.unwrap();
        assert_eq!(
            next_change(&mut feed_b).await,
            Change::TokenRevoked {
                jti: "only-b".to_owned(),
                exp: 1
            }
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_killed_listener_reconnects_and_asks_for_a_resync() {
        let f = PgFixture::new().await;
        let mut feed = f.store.changes().unwrap();
        let mut admin = f.admin().await;
        let killed: Vec<bool> = sqlx::query_scalar(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE application_name = $1 AND query LIKE 'LISTEN%'",
        )
        .bind(format!("{} listener", f.schema))
        .fetch_all(&mut admin)
        .await
        .unwrap();
        assert_eq!(killed, vec![true], "exactly this store's listener");

        assert_eq!(next_change(&mut feed).await, Change::Resync);
        f.store.revoke_token("after-resync", 7).await.unwrap();
        assert_eq!(
            next_change(&mut feed).await,
            Change::TokenRevoked {
                jti: "after-resync".to_owned(),
                exp: 7
            }
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn killed_pool_connections_are_replaced_transparently() {
        let f = PgFixture::new().await;
        f.store
            .insert_sandbox(&conformance::sandbox("sbxbefore", 1))
            .await
            .unwrap();
        let mut admin = f.admin().await;
        let killed: Vec<bool> = sqlx::query_scalar(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
        )
        .bind(&f.schema)
        .fetch_all(&mut admin)
        .await
        .unwrap();
        assert!(!killed.is_empty());
        assert_eq!(f.store.sandboxes().await.unwrap().len(), 1);
        f.store
            .insert_sandbox(&conformance::sandbox("sbxafter", 2))
            .await
            .unwrap();
    }

    /// A TCP forwarder to PostgreSQL that can be cut and restored, standing in for a database
    /// outage.
    struct Outage {
        addr: std::net::SocketAddr,
        stop: tokio_util::sync::CancellationToken,
    }

    impl Outage {
        async fn forward(addr: std::net::SocketAddr) -> Outage {
            let upstream = {
                let u = url::Url::parse(&test_url()).unwrap();
                format!(
                    "{}:{}",
                    u.host_str().unwrap_or("127.0.0.1"),
                    u.port().unwrap_or(5432)
                )
            };
            let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
            let addr = listener.local_addr().unwrap();
            let stop = tokio_util::sync::CancellationToken::new();
            let token = stop.clone();
            tokio::spawn(async move {
                loop {
                    let accepted = tokio::select! {
                        _ = token.cancelled() => return,
                        accepted = listener.accept() => accepted,
                    };
                    let Ok((mut client, _)) = accepted else {
                        continue;
                    };
                    let upstream = upstream.clone();
                    let token = token.clone();
                    tokio::spawn(async move {
                        let Ok(mut server) = tokio::net::TcpStream::connect(&upstream).await else {
                            return;
                        };
                        tokio::select! {
                            _ = token.cancelled() => {}
                            _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        }
                    });
                }
            });
            Outage { addr, stop }
        }

        fn url(&self) -> String {
            let mut u = url::Url::parse(&test_url()).unwrap();
            u.set_port(Some(self.addr.port())).unwrap();
            u.to_string()
        }

        /// Closes the listening socket and every forwarded connection.
        fn cut(&self) {
            self.stop.cancel();
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn while_the_database_is_down_writes_fail_fast_and_the_feed_resyncs_after() {
        let f = PgFixture::new().await;
        let proxy = Outage::forward("127.0.0.1:0".parse().unwrap()).await;
        let store = PostgresStore::open(PostgresOptions {
            url: proxy.url(),
            acquire_timeout: Duration::from_secs(1),
            ..options(&f.schema, Some(f.kek.clone()))
        })
        .await
        .unwrap();
        let mut feed = store.changes().unwrap();
        store.revoke_token("before", 1).await.unwrap();
        assert_eq!(
            next_change(&mut feed).await,
            Change::TokenRevoked {
                jti: "before".to_owned(),
                exp: 1
            }
        );

        proxy.cut();
        let started = Instant::now();
        let err = store.revoke_token("during", 1).await.unwrap_err();
        assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
        // Within the acquire timeout (1 s here), give or take a connection attempt.
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "failed in {:?}",
            started.elapsed()
        );
        let err = store.sandboxes().await.unwrap_err();
        assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");

        // The database comes back at the same address.
        let _restored = Outage::forward(proxy.addr).await;
        assert_eq!(next_change(&mut feed).await, Change::Resync);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match store.revoke_token("after", 2).await {
                Ok(()) => break,
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!(error = ?e, "not back yet");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("still failing after the outage: {e:?}"),
            }
        }
        assert_eq!(
            next_change(&mut feed).await,
            Change::TokenRevoked {
                jti: "after".to_owned(),
                exp: 2
            }
        );
    }

    #[tokio::test]
    async fn an_unreachable_server_is_unavailable_quickly() {
        // Nothing listens on port 1.
        let started = Instant::now();
        let err = PostgresStore::open(PostgresOptions::new(
            "postgres://postgres@127.0.0.1:1/test",
            Some(random_kek()),
        ))
        .await
        .unwrap_err();
        assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
        let chain = format!("{err}: {}", std::error::Error::source(&err).unwrap());
        assert!(chain.contains("127.0.0.1:1"), "{chain}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn migrations_run_once_and_a_newer_schema_is_refused() {
        let f = PgFixture::new().await;
        f.second_node().await;
        let mut admin = f.admin().await;
        let versions: Vec<i64> = sqlx::query_scalar(&format!(
            "SELECT version FROM {}.schema_version ORDER BY version",
            f.schema
        ))
        .fetch_all(&mut admin)
        .await
        .unwrap();
        assert_eq!(versions, (1..=MIGRATIONS.len() as i64).collect::<Vec<_>>());

        let future = MIGRATIONS.len() as i64 + 1;
        sqlx::query(&format!(
            "INSERT INTO {}.schema_version (version, applied_at) VALUES ($1, 0)",
            f.schema
        ))
        .bind(future)
        .execute(&mut admin)
        .await
        .unwrap();
        let err = PostgresStore::open(options(&f.schema, Some(f.kek.clone())))
            .await
            .unwrap_err();
        assert!(
            matches!(err, StoreError::SchemaTooNew { found, .. } if found == future),
            "{err:?}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nodes_open_together_on_a_new_schema() {
        let f = PgFixture::new().await;
        let schema = format!("{}_new", f.schema);
        let opens = (0..4).map(|_| PostgresStore::open(options(&schema, Some(f.kek.clone()))));
        let stores: Vec<PostgresStore> = futures_util::future::join_all(opens)
            .await
            .into_iter()
            .map(|r| r.unwrap())
            .collect();
        assert_eq!(stores.len(), 4);
        let mut admin = f.admin().await;
        sqlx::raw_sql(&format!("DROP SCHEMA {schema} CASCADE"))
            .execute(&mut admin)
            .await
            .unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nul_characters_are_stored_as_replacement_characters() {
        let f = PgFixture::new().await;
        let s = SandboxRecord {
            detail: Some("exit 1\0\0tail".to_owned()),
            ..conformance::sandbox("sbxnul", 1)
        };
        f.store.insert_sandbox(&s).await.unwrap();
        let read = f.store.sandbox("sbxnul").await.unwrap().unwrap();
        assert_eq!(read.detail.as_deref(), Some("exit 1\u{FFFD}\u{FFFD}tail"));
        assert_eq!(read.env, s.env, "JSON columns escape NUL and keep it");

        f.store.revoke_token("j\0ti", 5).await.unwrap();
        assert_eq!(
            f.store.revoked_tokens(0).await.unwrap(),
            vec![("j\u{FFFD}ti".to_owned(), 5)]
        );
        assert!(f.store.mark_token_used("u\0", 5).await.unwrap());
        assert!(!f.store.mark_token_used("u\0", 5).await.unwrap());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn corrupt_rows_are_reported_not_panicked_on() {
        let f = PgFixture::new().await;
        let (_, cred) = conformance::credential("cred_bad", 1);
        f.store.insert_credential(&cred).await.unwrap();
        f.store
            .insert_sandbox(&conformance::sandbox("sbxbad", 1))
            .await
            .unwrap();
        let mut admin = f.admin().await;
        sqlx::raw_sql(&format!(
            "UPDATE {s}.credentials SET scopes = '[\"root\"]';
             UPDATE {s}.sandboxes SET env = 'not json';",
            s = f.schema
        ))
        .execute(&mut admin)
        .await
        .unwrap();
        let err = f.store.credential("cred_bad").await.unwrap_err();
        assert!(
            matches!(&err, StoreError::Corrupt(m) if m.contains("root")),
            "{err:?}"
        );
        let err = f.store.sandboxes().await.unwrap_err();
        assert!(matches!(err, StoreError::Corrupt(_)), "{err:?}");
        sqlx::raw_sql(&format!(
            "UPDATE {s}.credentials SET scopes = '[]', secret_hash = '\\x00'",
            s = f.schema
        ))
        .execute(&mut admin)
        .await
        .unwrap();
        let err = f.store.credentials().await.unwrap_err();
        assert!(matches!(err, StoreError::Corrupt(_)), "{err:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn secret_env_is_sealed_bound_to_its_row_and_never_read_as_empty() {
        let f = PgFixture::new().await;
        let a = conformance::sandbox("sbxsealeda", 1);
        let b = conformance::sandbox("sbxsealedb", 2);
        f.store.insert_sandbox(&a).await.unwrap();
        f.store.insert_sandbox(&b).await.unwrap();
        let mut admin = f.admin().await;
        // The raw rows, every column as the database holds it: the value is nowhere.
        let rows: Vec<String> =
            sqlx::query_scalar(&format!("SELECT t::text FROM {}.sandboxes t", f.schema))
                .fetch_all(&mut admin)
                .await
                .unwrap();
        assert_eq!(rows.len(), 2);
        let sealed: Vec<u8> = sqlx::query_scalar(&format!(
            "SELECT secret_env FROM {}.sandboxes WHERE id = 'sbxsealeda'",
            f.schema
        ))
        .fetch_one(&mut admin)
        .await
        .unwrap();
        let needle = conformance::SECRET_VALUE.as_bytes();
        assert!(!sealed.windows(needle.len()).any(|w| w == needle));
        assert!(!sealed.windows(14).any(|w| w == b"OPENAI_API_KEY"));
        for row in &rows {
            assert!(!row.contains(conformance::SECRET_VALUE), "{row}");
            assert!(!row.contains(&hex_of(needle)), "{row}");
        }
        // Another node (a reopened store) with the same key opens it.
        let other = f.second_node().await;
        assert_eq!(
            other
                .sandbox("sbxsealeda")
                .await
                .unwrap()
                .unwrap()
                .secret_env,
            a.secret_env
        );
        // A's sealed secrets copied into B's row do not open there: the id is the AAD.
        sqlx::raw_sql(&format!(
            "UPDATE {s}.sandboxes SET secret_env = (SELECT secret_env FROM {s}.sandboxes
                WHERE id = 'sbxsealeda') WHERE id = 'sbxsealedb'",
            s = f.schema
        ))
        .execute(&mut admin)
        .await
        .unwrap();
        let err = f.store.sandbox("sbxsealedb").await.unwrap_err();
        assert!(
            matches!(&err, StoreError::Kek(KekError::SecretUndecryptable { id }) if id == "sbxsealedb"),
            "{err:?}"
        );
        let shown = err.to_string();
        assert!(
            shown.contains("sbxsealedb") && shown.contains("key-encryption key"),
            "{shown}"
        );
        assert!(
            f.store.sandboxes().await.is_err(),
            "no list with B silently empty"
        );
        // Nor does a damaged seal.
        let mut damaged = sealed.clone();
        let last = damaged.len() - 1;
        damaged[last] ^= 1;
        sqlx::query(&format!(
            "UPDATE {}.sandboxes SET secret_env = $1 WHERE id = 'sbxsealeda'",
            f.schema
        ))
        .bind(damaged)
        .execute(&mut admin)
        .await
        .unwrap();
        let err = f.store.sandbox("sbxsealeda").await.unwrap_err();
        assert!(
            matches!(&err, StoreError::Kek(KekError::SecretUndecryptable { .. })),
            "{err:?}"
        );
        assert!(!format!("{err:?}").contains(conformance::SECRET_VALUE));
    }

    fn hex_of(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn conflicts_do_not_echo_the_secret_hash() {
        let f = PgFixture::new().await;
        let (secret, cred) = conformance::credential("cred_a", 1);
        f.store.insert_credential(&cred).await.unwrap();
        let (_, mut twin) = conformance::credential("cred_b", 2);
        twin.secret_hash = secret.hash();
        let err = f.store.insert_credential(&twin).await.unwrap_err();
        assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
        let shown = format!("{err} {err:?}");
        assert!(!shown.contains(&secret.hash().to_hex()[..16]));
        assert!(!shown.contains(secret.expose()));
    }

    #[test]
    fn kek_accepts_hex_and_base64_of_32_bytes_only() {
        let bytes: [u8; 32] = std::array::from_fn(|i| i as u8 * 7);
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
        for text in [
            hex.clone(),
            hex.to_uppercase(),
            format!("  {hex}\n"),
            STANDARD.encode(bytes),
            format!("{}\n", STANDARD.encode(bytes)),
            URL_SAFE_NO_PAD.encode(bytes),
        ] {
            assert_eq!(Kek::parse(&text), Ok(Kek::from_bytes(bytes)), "{text:?}");
        }
        let secretish = "zz".repeat(32);
        for bad in [
            "",
            &hex[..62],
            &format!("{hex}00"),
            &STANDARD.encode([1u8; 31]),
            &secretish,
        ] {
            let reason = Kek::parse(bad).unwrap_err();
            assert!(bad.is_empty() || !reason.contains(bad), "{reason}");
        }
        assert_eq!(Kek::parse(&generate_kek()).map(|_| ()), Ok(()));
        assert_ne!(generate_kek(), generate_kek());
        assert_eq!(generate_kek().len(), 64);
        assert_eq!(format!("{:?}", Kek::from_bytes(bytes)), "Kek(<redacted>)");
    }

    #[test]
    fn kek_file_errors_name_the_file_not_the_value() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kek");
        std::fs::write(&path, "not-a-key-at-all").unwrap();
        // `$SANDGATE_KEK` would take precedence; the test process does not set it.
        if std::env::var_os("SANDGATE_KEK").is_some() {
            return;
        }
        let err = Kek::from_env_or_file(Some(&path)).unwrap_err();
        let shown = err.to_string();
        assert!(shown.contains(&path.display().to_string()), "{shown}");
        assert!(!shown.contains("not-a-key-at-all"), "{shown}");

        std::fs::write(&path, format!("{}\n", generate_kek())).unwrap();
        assert!(Kek::from_env_or_file(Some(&path)).unwrap().is_some());
        assert!(Kek::from_env_or_file(None).unwrap().is_none());
        let err = Kek::from_env_or_file(Some(&dir.path().join("missing"))).unwrap_err();
        assert!(matches!(err, KekError::Read { .. }), "{err:?}");
    }

    #[test]
    fn sealed_keys_open_only_with_the_same_key_and_aad() {
        let sealer = Sealer::new(&random_kek()).unwrap();
        let sealed = sealer.seal(b"kid-1", b"secret pkcs8").unwrap();
        assert_eq!(
            sealer.open(b"kid-1", &sealed).as_deref(),
            Some(&b"secret pkcs8"[..])
        );
        assert_eq!(sealer.open(b"kid-2", &sealed), None);
        assert_eq!(
            Sealer::new(&random_kek()).unwrap().open(b"kid-1", &sealed),
            None
        );
        let mut flipped = sealed.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert_eq!(sealer.open(b"kid-1", &flipped), None);
        assert_eq!(sealer.open(b"kid-1", &sealed[..10]), None);
        assert_eq!(sealer.open(b"kid-1", &[]), None);
        assert_ne!(
            sealer.seal(b"kid-1", b"x").unwrap(),
            sealer.seal(b"kid-1", b"x").unwrap()
        );
    }

    #[test]
    fn payloads_round_trip_and_never_grow_past_the_notify_limit() {
        for change in [
            Change::TokenRevoked {
                jti: "a:b:c".to_owned(),
                exp: -5,
            },
            Change::TokenRevoked {
                jti: String::new(),
                exp: i64::MAX,
            },
            Change::SandboxChanged {
                id: "sbx1".to_owned(),
            },
            Change::CredentialRevoked {
                id: "cred_x".to_owned(),
            },
            Change::SigningKeyAdded {
                kid: "k:1".to_owned(),
            },
            Change::NodeChanged {
                name: "node-a".to_owned(),
            },
            Change::Resync,
        ] {
            assert_eq!(parse_payload(&payload(&change)), change);
        }
        let huge = Change::TokenRevoked {
            jti: "j".repeat(10_000),
            exp: 1,
        };
        assert_eq!(payload(&huge), "*");
        for junk in ["", "x", "t:", "t:notanumber:jti", "z:1", "t1"] {
            assert_eq!(parse_payload(junk), Change::Resync, "{junk:?}");
        }
    }

    #[test]
    fn urls_are_shown_without_passwords() {
        let shown = redact_url("postgres://sg:hunter2@db.internal:5432/sandgate?sslmode=require");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(
            shown.contains("db.internal") && shown.contains("REDACTED"),
            "{shown}"
        );
        let shown = redact_url("postgres://db/sandgate?password=hunter2&sslmode=require");
        assert!(
            !shown.contains("hunter2") && shown.contains("sslmode"),
            "{shown}"
        );
        assert_eq!(redact_url("postgres://db/x"), "postgres://db/x");
        assert_eq!(redact_url("::"), "<unparseable URL>");
        let options = PostgresOptions::new("postgres://u:hunter2@h/d", Some(random_kek()));
        assert!(!format!("{options:?}").contains("hunter2"));
    }

    #[test]
    fn channel_names_fit_postgres_identifiers() {
        assert_eq!(channel_name("public"), "sandgate_changes");
        assert_eq!(channel_name("tenant_a"), "sandgate_changes_tenant_a");
        let long = "s".repeat(63);
        let named = channel_name(&long);
        assert!(named.len() <= MAX_IDENTIFIER_LEN, "{named}");
        assert_eq!(named, channel_name(&long), "stable");
        assert_ne!(named, channel_name(&"t".repeat(63)));
        for bad in ["", "Upper", "1abc", "a-b", "a;drop", &"a".repeat(64)] {
            assert!(check_schema_name(bad).is_err(), "{bad:?}");
        }
        check_schema_name("sg_test_1_ab").unwrap();
    }
}
