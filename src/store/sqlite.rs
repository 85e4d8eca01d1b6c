//! The embedded [`Store`]: one SQLite file in the data directory.
//!
//! One connection behind a mutex, used from `spawn_blocking` so SQLite's blocking I/O never
//! stalls a runtime worker. A single connection is enough: the gateway reads its hot state
//! (routes, revocations, keys) from memory and writes here only on control-plane events.
//! Lists and maps live in JSON text columns; times are integer Unix seconds.
//!
//! Its change feed ([`Store::changes`]) is in-process: it announces the writes made through this
//! store value and its clones, which on a single node are all of them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{params, Connection, ErrorCode, OptionalExtension, Row, TransactionBehavior};
use tokio::sync::broadcast;

use super::columns::{
    scopes_json, to_json, CredentialRow, IssuedTokenRow, SandboxParams, SandboxRow,
    CREDENTIAL_COLUMNS, ISSUED_TOKEN_COLUMNS, LIVE_STATUSES_SQL, SANDBOX_BINDS, SANDBOX_COLUMNS,
    SANDBOX_UPDATE_BINDS,
};
use super::{
    AuditEvent, BoxError, Change, CredentialRecord, IssuedToken, NodeRecord, SandboxFilter,
    SandboxRecord, SandboxStatus, Store, StoreError, StoredSigningKey, VolumeRecord,
    CHANGE_FEED_CAPACITY, EXPIRED_TOKEN_GRACE_SECS,
};
use crate::credential::SecretHash;

/// Schema migrations, applied in order; version N is `MIGRATIONS[N - 1]`. Append only: a shipped
/// migration is never edited, because databases in the field have already run it.
///
/// `STRICT` tables make SQLite reject values of the wrong type instead of silently storing them.
const MIGRATIONS: &[&str] = &[
    // 1: initial schema.
    "CREATE TABLE signing_keys (
        kid         TEXT PRIMARY KEY,
        created_at  INTEGER NOT NULL,
        private_der BLOB NOT NULL
     ) STRICT;
     CREATE TABLE credentials (
        id                 TEXT PRIMARY KEY,
        name               TEXT NOT NULL,
        scopes             TEXT NOT NULL,       -- JSON array of scope names
        secret_hash        BLOB NOT NULL UNIQUE, -- SHA-256, 32 bytes; authentication looks up by it
        created_at         INTEGER NOT NULL,
        expires_at         INTEGER,
        max_token_ttl_secs INTEGER,
        revoked_at         INTEGER
     ) STRICT;
     CREATE TABLE sandboxes (
        id           TEXT PRIMARY KEY,
        owner        TEXT NOT NULL,
        status       TEXT NOT NULL,
        ports        TEXT NOT NULL,  -- JSON array
        upstream     TEXT,
        command      TEXT,           -- JSON array, NULL for external sandboxes
        env          TEXT NOT NULL,  -- JSON object
        cors_origins TEXT NOT NULL,  -- JSON array
        rewrite_host INTEGER NOT NULL,
        metadata     TEXT NOT NULL,  -- JSON
        created_at   INTEGER NOT NULL,
        expires_at   INTEGER,
        ended_at     INTEGER,
        host_ports   TEXT NOT NULL,  -- JSON object, published port -> host port
        node         TEXT,
        detail       TEXT
     ) STRICT;
     CREATE INDEX sandboxes_by_age ON sandboxes (created_at);
     CREATE TABLE revoked_tokens (
        jti TEXT PRIMARY KEY,
        exp INTEGER NOT NULL
     ) STRICT;
     CREATE INDEX revoked_tokens_by_exp ON revoked_tokens (exp);
     CREATE TABLE used_tokens (
        jti TEXT PRIMARY KEY,
        exp INTEGER NOT NULL
     ) STRICT;
     CREATE INDEX used_tokens_by_exp ON used_tokens (exp);
     CREATE TABLE audit_events (
        id          INTEGER PRIMARY KEY AUTOINCREMENT, -- never reused, so ids order events
        time        INTEGER NOT NULL,
        actor       TEXT NOT NULL,
        action      TEXT NOT NULL,
        target      TEXT NOT NULL,
        client_addr TEXT
     ) STRICT;",
    // 2: process sandboxes remember their process group and limits.
    "ALTER TABLE sandboxes ADD COLUMN process TEXT NOT NULL DEFAULT '{}';",
    // 3: cluster nodes and their heartbeats; finding a node's sandboxes when it is lost.
    "CREATE TABLE nodes (
        name           TEXT PRIMARY KEY,
        advertise_addr TEXT NOT NULL,
        runs_sandboxes INTEGER NOT NULL,
        version        TEXT NOT NULL,
        started_at     INTEGER NOT NULL,
        last_heartbeat INTEGER NOT NULL
     ) STRICT;
     CREATE INDEX sandboxes_by_node ON sandboxes (node) WHERE node IS NOT NULL;",
    // 4: issued connect tokens (ids and claims, never the token), to list and revoke them.
    "CREATE TABLE issued_tokens (
        jti        TEXT PRIMARY KEY,
        sandbox    TEXT NOT NULL,
        port       INTEGER NOT NULL,
        sub        TEXT NOT NULL,     -- the credential that minted it
        issued_at  INTEGER NOT NULL,
        exp        INTEGER NOT NULL,
        single_use INTEGER NOT NULL
     ) STRICT;
     CREATE INDEX issued_tokens_by_sandbox ON issued_tokens (sandbox);
     CREATE INDEX issued_tokens_by_exp ON issued_tokens (exp);",
    // 5: where other nodes reach a node's cluster relay.
    "ALTER TABLE nodes ADD COLUMN relay_addr TEXT;",
    // 6: sandbox names and tags. A name is unique among one owner's live sandboxes: the partial
    // index holds only live rows, so a sandbox leaving `starting`/`running` frees its name (and
    // keeps it, for listing). The status list is `SandboxStatus::is_live`.
    "ALTER TABLE sandboxes ADD COLUMN name TEXT;
     ALTER TABLE sandboxes ADD COLUMN tags TEXT NOT NULL DEFAULT '{}'; -- JSON object
     CREATE UNIQUE INDEX sandboxes_live_name ON sandboxes (owner, name)
        WHERE name IS NOT NULL AND status IN ('starting', 'running');
     CREATE INDEX sandboxes_by_owner ON sandboxes (owner, created_at);",
    // 7: named volumes, unique per owner. Which sandboxes mount one is in their `process`.
    "CREATE TABLE volumes (
        owner      TEXT NOT NULL,
        name       TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        node       TEXT,             -- the node whose disk holds it; NULL: every node's
        uid        INTEGER NOT NULL, -- the host uid owning its files
        PRIMARY KEY (owner, name)
     ) STRICT;",
    // 8: secret environment variables (`SandboxRecord::secret_env`), as a JSON object; NULL:
    // none. Kept in plain text like `signing_keys.private_der` in migration 1: this file is
    // created 0600 in a 0700 folder (see `prepare_file`) and tightened to 0600 if found wider,
    // so a secret here is exactly as readable as the signing keys, by the gateway's own user
    // (root) and no one else.
    "ALTER TABLE sandboxes ADD COLUMN secret_env TEXT;",
];

/// How long a statement waits for a lock held by another connection (another `sandgate`
/// process on the same file, e.g. `sandgate keys rotate`) before giving up as `Unavailable`.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// SQLite-backed [`Store`]. Cheap to clone: clones share the connection and the change feed.
#[derive(Clone)]
pub struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
    /// Where the file is, for log lines; `None` in memory.
    path: Option<PathBuf>,
    /// The in-process change feed; sent to after each commit.
    changes: broadcast::Sender<Change>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` and brings its schema up to date.
    ///
    /// A missing parent directory is created with mode 0700 and a new file with mode 0600 (an
    /// existing file is tightened to 0600): the database holds signing keys. Blocking; call it
    /// at start-up, not from a hot async path.
    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        let open_err = |source: BoxError| StoreError::Open {
            path: path.to_owned(),
            source,
        };
        prepare_file(path).map_err(|e| open_err(Box::new(e)))?;
        let conn = Connection::open(path).map_err(|e| open_err(Box::new(e)))?;
        configure(&conn, true).map_err(|e| open_err(Box::new(e)))?;
        let store = SqliteStore {
            conn: Arc::new(Mutex::new(conn)),
            path: Some(path.to_owned()),
            changes: broadcast::channel(CHANGE_FEED_CAPACITY).0,
        };
        store.migrate()?;
        Ok(store)
    }

    /// A private in-memory database with the full schema, for tests.
    pub fn open_in_memory() -> Result<SqliteStore, StoreError> {
        let conn = Connection::open_in_memory().map_err(classify)?;
        configure(&conn, false).map_err(classify)?;
        let store = SqliteStore {
            conn: Arc::new(Mutex::new(conn)),
            path: None,
            changes: broadcast::channel(CHANGE_FEED_CAPACITY).0,
        };
        store.migrate()?;
        Ok(store)
    }

    /// Applies pending migrations in one `IMMEDIATE` transaction, so two processes opening a new
    /// file at once cannot both run them, and a crash leaves the old schema intact.
    fn migrate(&self) -> Result<(), StoreError> {
        let supported = i64::try_from(MIGRATIONS.len()).expect("migration count fits in i64");
        let mut conn = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(classify)?;
        tx.execute(
            "CREATE TABLE IF NOT EXISTS schema_version (
                version    INTEGER PRIMARY KEY,
                applied_at INTEGER NOT NULL
             ) STRICT",
            [],
        )
        .map_err(classify)?;
        let current: i64 = tx
            .query_row(
                "SELECT COALESCE(MAX(version), 0) FROM schema_version",
                [],
                |r| r.get(0),
            )
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
            tx.execute_batch(sql).map_err(classify)?;
            tx.execute(
                "INSERT INTO schema_version (version, applied_at) VALUES (?1, ?2)",
                params![version, crate::unix_now()],
            )
            .map_err(classify)?;
            tracing::info!(version, path = ?self.path, "applied store migration");
        }
        tx.commit().map_err(classify)?;
        Ok(())
    }

    /// Tells the feed's receivers, if any, about a committed change.
    fn announce(&self, change: Change) {
        // No receiver is not an error: nobody needs to know.
        let _ = self.changes.send(change);
    }

    /// Runs `f` on the connection in the blocking pool.
    async fn call<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let conn = Arc::clone(&self.conn);
        let task = tokio::task::spawn_blocking(move || {
            // A panic while holding the lock cannot leave a half-applied write: each call is a
            // single statement or a transaction that rolls back on drop. So a poisoned lock is
            // still a usable connection.
            let mut conn = conn.lock().unwrap_or_else(PoisonError::into_inner);
            f(&mut conn)
        });
        match task.await {
            Ok(result) => result,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            // Cancelled: the runtime is shutting down.
            Err(e) => Err(StoreError::Unavailable(Box::new(e))),
        }
    }
}

/// Creates the parent directory (0700) and the file (0600) before SQLite does, so the file is
/// never readable by others, not even for a moment.
fn prepare_file(path: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent)?;
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)?;
        let mode = file.metadata()?.permissions().mode() & 0o777;
        if mode != 0o600 {
            tracing::warn!(path = %path.display(), mode = format_args!("{mode:o}"), "store file was not private; setting mode 0600");
            file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        }
    }
    #[cfg(not(unix))]
    {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)?;
        }
    }
    Ok(())
}

/// Connection settings, applied on every open.
fn configure(conn: &Connection, on_disk: bool) -> rusqlite::Result<()> {
    conn.busy_timeout(BUSY_TIMEOUT)?;
    if on_disk {
        // WAL: readers never block the writer, and a commit is one append. The journal mode is
        // persistent; the pragma answers with the mode actually in force.
        let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            tracing::warn!(%mode, "SQLite did not switch to WAL journal mode");
        }
    }
    // FULL rather than NORMAL: revocations and single-use marks are security decisions, and
    // NORMAL in WAL mode may lose the last commits on power loss (not on a process crash),
    // which would re-admit a revoked token. Writes are control-plane events, so the extra
    // fsync per commit is cheap.
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", true)?;
    // The schema is ours alone; don't let anything stored in it run with extra privileges.
    conn.pragma_update(None, "trusted_schema", false)?;
    Ok(())
}

/// Maps a SQLite error to the backend-neutral kinds callers act on.
fn classify(e: rusqlite::Error) -> StoreError {
    match &e {
        rusqlite::Error::SqliteFailure(failure, message) => match failure.code {
            ErrorCode::ConstraintViolation => StoreError::Conflict(
                message
                    .clone()
                    .unwrap_or_else(|| "constraint violated".to_owned()),
            ),
            ErrorCode::DatabaseBusy
            | ErrorCode::DatabaseLocked
            | ErrorCode::SystemIoFailure
            | ErrorCode::DiskFull
            | ErrorCode::CannotOpen
            | ErrorCode::ReadOnly
            | ErrorCode::PermissionDenied
            | ErrorCode::OutOfMemory
            | ErrorCode::FileLockingProtocolFailed => StoreError::Unavailable(Box::new(e)),
            ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase => {
                StoreError::Corrupt(e.to_string())
            }
            _ => StoreError::Backend(Box::new(e)),
        },
        rusqlite::Error::FromSqlConversionFailure(..)
        | rusqlite::Error::InvalidColumnType(..)
        | rusqlite::Error::IntegralValueOutOfRange(..) => StoreError::Corrupt(e.to_string()),
        _ => StoreError::Backend(Box::new(e)),
    }
}

/// Like [`classify`], but a constraint violation on insert says which record collided.
fn classify_insert(e: rusqlite::Error, what: impl FnOnce() -> String) -> StoreError {
    match classify(e) {
        StoreError::Conflict(_) => StoreError::Conflict(what()),
        other => other,
    }
}

impl CredentialRow {
    fn read(r: &Row<'_>) -> rusqlite::Result<Self> {
        Ok(CredentialRow {
            id: r.get(0)?,
            name: r.get(1)?,
            scopes: r.get(2)?,
            secret_hash: r.get(3)?,
            created_at: r.get(4)?,
            expires_at: r.get(5)?,
            max_token_ttl_secs: r.get(6)?,
            revoked_at: r.get(7)?,
        })
    }
}

impl SandboxRow {
    fn read(r: &Row<'_>) -> rusqlite::Result<Self> {
        Ok(SandboxRow {
            id: r.get(0)?,
            owner: r.get(1)?,
            status: r.get(2)?,
            ports: r.get(3)?,
            upstream: r.get(4)?,
            command: r.get(5)?,
            env: r.get(6)?,
            cors_origins: r.get(7)?,
            rewrite_host: r.get(8)?,
            metadata: r.get(9)?,
            created_at: r.get(10)?,
            expires_at: r.get(11)?,
            ended_at: r.get(12)?,
            host_ports: r.get(13)?,
            node: r.get(14)?,
            detail: r.get(15)?,
            process: r.get(16)?,
            name: r.get(17)?,
            tags: r.get(18)?,
            secret_env: r.get(19)?,
        })
    }
}

impl SandboxParams {
    /// Executes `sql`, which must bind the first `binds` of [`SANDBOX_COLUMNS`] as ?1, ?2, ...
    /// in order.
    fn execute(&self, conn: &Connection, sql: &str, binds: usize) -> rusqlite::Result<usize> {
        let all = params![
            self.id,
            self.owner,
            self.status,
            self.ports,
            self.upstream,
            self.command,
            self.env,
            self.cors_origins,
            self.rewrite_host,
            self.metadata,
            self.created_at,
            self.expires_at,
            self.ended_at,
            self.host_ports,
            self.node,
            self.detail,
            self.process,
            self.name,
            self.tags,
            self.secret_env,
        ];
        conn.execute(sql, &all[..binds])
    }
}

impl IssuedTokenRow {
    fn read(r: &Row<'_>) -> rusqlite::Result<Self> {
        Ok(IssuedTokenRow {
            jti: r.get(0)?,
            sandbox: r.get(1)?,
            port: r.get(2)?,
            sub: r.get(3)?,
            issued_at: r.get(4)?,
            exp: r.get(5)?,
            single_use: r.get(6)?,
        })
    }
}

const INSERT_AUDIT: &str = "INSERT INTO audit_events (time, actor, action, target, client_addr)
     VALUES (?1, ?2, ?3, ?4, ?5)";

/// Appends `events` inside `tx`, in order.
fn insert_audit(tx: &rusqlite::Transaction<'_>, events: &[AuditEvent]) -> Result<(), StoreError> {
    let mut stmt = tx.prepare_cached(INSERT_AUDIT).map_err(classify)?;
    for e in events {
        stmt.execute(params![e.time, e.actor, e.action, e.target, e.client_addr])
            .map_err(classify)?;
    }
    Ok(())
}

fn token_list(conn: &Connection, sql: &str, now: i64) -> Result<Vec<(String, i64)>, StoreError> {
    let mut stmt = conn.prepare_cached(sql).map_err(classify)?;
    let rows = stmt
        .query_map([now - EXPIRED_TOKEN_GRACE_SECS], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .map_err(classify)?;
    rows.collect::<rusqlite::Result<Vec<_>>>().map_err(classify)
}

#[async_trait]
impl Store for SqliteStore {
    async fn signing_keys(&self) -> Result<Vec<StoredSigningKey>, StoreError> {
        self.call(|conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT kid, created_at, private_der FROM signing_keys
                     ORDER BY created_at, rowid",
                )
                .map_err(classify)?;
            let rows = stmt
                .query_map([], |r| {
                    Ok(StoredSigningKey {
                        kid: r.get(0)?,
                        created_at: r.get(1)?,
                        private_der: r.get(2)?,
                    })
                })
                .map_err(classify)?;
            rows.collect::<rusqlite::Result<Vec<_>>>().map_err(classify)
        })
        .await
    }

    async fn insert_signing_key(&self, key: &StoredSigningKey) -> Result<(), StoreError> {
        let kid = key.kid.clone();
        let key = key.clone();
        self.call(move |conn| {
            conn.execute(
                "INSERT INTO signing_keys (kid, created_at, private_der) VALUES (?1, ?2, ?3)",
                params![key.kid, key.created_at, key.private_der],
            )
            .map_err(|e| {
                classify_insert(e, || format!("signing key {} already exists", key.kid))
            })?;
            Ok(())
        })
        .await?;
        self.announce(Change::SigningKeyAdded { kid });
        Ok(())
    }

    async fn insert_credential(&self, c: &CredentialRecord) -> Result<(), StoreError> {
        let scopes = scopes_json(&c.scopes)?;
        let c = c.clone();
        self.call(move |conn| {
            conn.execute(
                &format!(
                    "INSERT INTO credentials ({CREDENTIAL_COLUMNS})
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"
                ),
                params![
                    c.id,
                    c.name,
                    scopes,
                    c.secret_hash.0.as_slice(),
                    c.created_at,
                    c.expires_at,
                    c.max_token_ttl_secs,
                    c.revoked_at,
                ],
            )
            // Either the id or the secret hash collided; the message must not echo the hash.
            .map_err(|e| classify_insert(e, || format!("credential {} already exists", c.id)))?;
            Ok(())
        })
        .await
    }

    async fn credentials(&self) -> Result<Vec<CredentialRecord>, StoreError> {
        self.call(|conn| {
            let mut stmt = conn
                .prepare_cached(&format!(
                    "SELECT {CREDENTIAL_COLUMNS} FROM credentials ORDER BY created_at, rowid"
                ))
                .map_err(classify)?;
            let rows = stmt.query_map([], CredentialRow::read).map_err(classify)?;
            rows.map(|row| row.map_err(classify)?.decode()).collect()
        })
        .await
    }

    async fn credential(&self, id: &str) -> Result<Option<CredentialRecord>, StoreError> {
        let id = id.to_owned();
        self.call(move |conn| {
            conn.prepare_cached(&format!(
                "SELECT {CREDENTIAL_COLUMNS} FROM credentials WHERE id = ?1"
            ))
            .and_then(|mut stmt| stmt.query_row([&id], CredentialRow::read).optional())
            .map_err(classify)?
            .map(CredentialRow::decode)
            .transpose()
        })
        .await
    }

    async fn credential_by_hash(
        &self,
        hash: &SecretHash,
    ) -> Result<Option<CredentialRecord>, StoreError> {
        let hash = *hash;
        self.call(move |conn| {
            conn.prepare_cached(&format!(
                "SELECT {CREDENTIAL_COLUMNS} FROM credentials WHERE secret_hash = ?1"
            ))
            .and_then(|mut stmt| {
                stmt.query_row([hash.0.as_slice()], CredentialRow::read)
                    .optional()
            })
            .map_err(classify)?
            .map(CredentialRow::decode)
            .transpose()
        })
        .await
    }

    async fn revoke_credential(&self, id: &str, at: i64) -> Result<bool, StoreError> {
        let owned = id.to_owned();
        let revoked = self
            .call(move |conn| {
                let changed = conn
                    .execute(
                        "UPDATE credentials SET revoked_at = ?2 WHERE id = ?1 AND revoked_at IS NULL",
                        params![owned, at],
                    )
                    .map_err(classify)?;
                Ok(changed == 1)
            })
            .await?;
        if revoked {
            self.announce(Change::CredentialRevoked { id: id.to_owned() });
        }
        Ok(revoked)
    }

    async fn insert_sandbox(&self, s: &SandboxRecord) -> Result<(), StoreError> {
        let row = SandboxParams::encode(s)?;
        self.call(move |conn| {
            row.execute(
                conn,
                &format!(
                    "INSERT INTO sandboxes ({SANDBOX_COLUMNS}) VALUES
                     (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17,
                      ?18, ?19, ?20)"
                ),
                SANDBOX_BINDS,
            )
            .map_err(|e| {
                // SQLite names the index's columns: `UNIQUE constraint failed:
                // sandboxes.owner, sandboxes.name`. It may check that index before the primary
                // key, and a duplicate id is the conflict to report (as PostgreSQL does).
                let on_name = matches!(&e, rusqlite::Error::SqliteFailure(_, Some(m))
                    if m.contains("sandboxes.name"))
                    && conn
                        .query_row("SELECT 1 FROM sandboxes WHERE id = ?1", [&row.id], |_| {
                            Ok(())
                        })
                        .optional()
                        .is_ok_and(|found| found.is_none());
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
            Ok(())
        })
        .await?;
        self.announce(Change::SandboxChanged { id: s.id.clone() });
        Ok(())
    }

    async fn update_sandbox(&self, s: &SandboxRecord) -> Result<(), StoreError> {
        let row = SandboxParams::encode(s)?;
        self.call(move |conn| {
            let changed = row
                .execute(
                    conn,
                    "UPDATE sandboxes SET owner = ?2, status = ?3, ports = ?4, upstream = ?5,
                        command = ?6, env = ?7, cors_origins = ?8, rewrite_host = ?9,
                        metadata = ?10, created_at = ?11, expires_at = ?12, ended_at = ?13,
                        host_ports = ?14, node = ?15, detail = ?16, process = ?17
                     WHERE id = ?1",
                    SANDBOX_UPDATE_BINDS,
                )
                .map_err(classify)?;
            if changed == 0 {
                return Err(StoreError::NotFound);
            }
            Ok(())
        })
        .await?;
        self.announce(Change::SandboxChanged { id: s.id.clone() });
        Ok(())
    }

    async fn sandbox(&self, id: &str) -> Result<Option<SandboxRecord>, StoreError> {
        let id = id.to_owned();
        self.call(move |conn| {
            conn.prepare_cached(&format!(
                "SELECT {SANDBOX_COLUMNS} FROM sandboxes WHERE id = ?1"
            ))
            .and_then(|mut stmt| stmt.query_row([&id], SandboxRow::read).optional())
            .map_err(classify)?
            .map(SandboxRow::decode)
            .transpose()
        })
        .await
    }

    async fn set_sandbox_tags(
        &self,
        id: &str,
        tags: &BTreeMap<String, String>,
    ) -> Result<(), StoreError> {
        let (owned, tags) = (id.to_owned(), to_json(tags)?);
        self.call(move |conn| {
            let changed = conn
                .execute(
                    "UPDATE sandboxes SET tags = ?2 WHERE id = ?1",
                    params![owned, tags],
                )
                .map_err(classify)?;
            if changed == 0 {
                return Err(StoreError::NotFound);
            }
            Ok(())
        })
        .await?;
        self.announce(Change::SandboxChanged { id: id.to_owned() });
        Ok(())
    }

    async fn live_sandbox_named(
        &self,
        owner: &str,
        name: &str,
    ) -> Result<Option<SandboxRecord>, StoreError> {
        let (owner, name) = (owner.to_owned(), name.to_owned());
        self.call(move |conn| {
            conn.prepare_cached(&format!(
                "SELECT {SANDBOX_COLUMNS} FROM sandboxes
                 WHERE owner = ?1 AND name = ?2 AND status IN {LIVE_STATUSES_SQL}"
            ))
            .and_then(|mut stmt| {
                stmt.query_row(params![owner, name], SandboxRow::read)
                    .optional()
            })
            .map_err(classify)?
            .map(SandboxRow::decode)
            .transpose()
        })
        .await
    }

    async fn find_sandboxes(
        &self,
        filter: &SandboxFilter,
    ) -> Result<Vec<SandboxRecord>, StoreError> {
        let filter = filter.clone();
        self.call(move |conn| {
            // Owner and name are plain columns, narrowed here; tags are JSON text, checked in
            // Rust by the same predicate every backend uses.
            let mut stmt = conn
                .prepare_cached(&format!(
                    "SELECT {SANDBOX_COLUMNS} FROM sandboxes
                     WHERE (?1 IS NULL OR owner = ?1) AND (?2 IS NULL OR name = ?2)
                     ORDER BY created_at, rowid"
                ))
                .map_err(classify)?;
            let rows = stmt
                .query_map(params![filter.owner, filter.name], SandboxRow::read)
                .map_err(classify)?;
            let mut found = Vec::new();
            for row in rows {
                let record = row.map_err(classify)?.decode()?;
                if filter.has_tags(&record) {
                    found.push(record);
                }
            }
            Ok(found)
        })
        .await
    }

    async fn sandboxes(&self) -> Result<Vec<SandboxRecord>, StoreError> {
        self.call(|conn| {
            let mut stmt = conn
                .prepare_cached(&format!(
                    "SELECT {SANDBOX_COLUMNS} FROM sandboxes ORDER BY created_at, rowid"
                ))
                .map_err(classify)?;
            let rows = stmt.query_map([], SandboxRow::read).map_err(classify)?;
            rows.map(|row| row.map_err(classify)?.decode()).collect()
        })
        .await
    }

    async fn revoke_token(&self, jti: &str, exp: i64) -> Result<(), StoreError> {
        let owned = jti.to_owned();
        let exp = self
            .call(move |conn| {
                // Keep the later expiry if the same jti is revoked twice with different values,
                // so a revocation never shortens.
                conn.query_row(
                    "INSERT INTO revoked_tokens (jti, exp) VALUES (?1, ?2)
                     ON CONFLICT (jti) DO UPDATE SET exp = MAX(exp, excluded.exp)
                     RETURNING exp",
                    params![owned, exp],
                    |r| r.get(0),
                )
                .map_err(classify)
            })
            .await?;
        self.announce(Change::TokenRevoked {
            jti: jti.to_owned(),
            exp,
        });
        Ok(())
    }

    async fn revoked_tokens(&self, now: i64) -> Result<Vec<(String, i64)>, StoreError> {
        self.call(move |conn| {
            token_list(
                conn,
                "SELECT jti, exp FROM revoked_tokens WHERE exp >= ?1",
                now,
            )
        })
        .await
    }

    async fn mark_token_used(&self, jti: &str, exp: i64) -> Result<bool, StoreError> {
        let jti = jti.to_owned();
        self.call(move |conn| {
            // One statement: atomic, and shared-file safe across processes.
            let inserted = conn
                .execute(
                    "INSERT INTO used_tokens (jti, exp) VALUES (?1, ?2) ON CONFLICT (jti) DO NOTHING",
                    params![jti, exp],
                )
                .map_err(classify)?;
            Ok(inserted == 1)
        })
        .await
    }

    async fn used_tokens(&self, now: i64) -> Result<Vec<(String, i64)>, StoreError> {
        self.call(move |conn| {
            token_list(
                conn,
                "SELECT jti, exp FROM used_tokens WHERE exp >= ?1",
                now,
            )
        })
        .await
    }

    async fn append_audit(&self, e: &AuditEvent) -> Result<i64, StoreError> {
        let e = e.clone();
        self.call(move |conn| {
            conn.query_row(
                "INSERT INTO audit_events (time, actor, action, target, client_addr)
                 VALUES (?1, ?2, ?3, ?4, ?5) RETURNING id",
                params![e.time, e.actor, e.action, e.target, e.client_addr],
                |r| r.get(0),
            )
            .map_err(classify)
        })
        .await
    }

    async fn append_audit_batch(&self, events: &[AuditEvent]) -> Result<(), StoreError> {
        let events = events.to_vec();
        self.call(move |conn| {
            let tx = conn.transaction().map_err(classify)?;
            insert_audit(&tx, &events)?;
            tx.commit().map_err(classify)
        })
        .await
    }

    async fn record_issued_tokens(
        &self,
        tokens: &[IssuedToken],
        events: &[AuditEvent],
    ) -> Result<(), StoreError> {
        let tokens = tokens.to_vec();
        let events = events.to_vec();
        self.call(move |conn| {
            // One transaction, one commit: the tokens and the events are durable together.
            let tx = conn.transaction().map_err(classify)?;
            {
                let mut stmt = tx
                    .prepare_cached(&format!(
                        "INSERT INTO issued_tokens ({ISSUED_TOKEN_COLUMNS})
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)"
                    ))
                    .map_err(classify)?;
                for t in &tokens {
                    stmt.execute(params![
                        t.jti,
                        t.sandbox,
                        t.port,
                        t.sub,
                        t.issued_at,
                        t.exp,
                        t.single_use
                    ])
                    .map_err(|e| {
                        classify_insert(e, || format!("token {} is already recorded", t.jti))
                    })?;
                }
            }
            insert_audit(&tx, &events)?;
            tx.commit().map_err(classify)
        })
        .await
    }

    async fn issued_token(&self, jti: &str) -> Result<Option<IssuedToken>, StoreError> {
        let jti = jti.to_owned();
        self.call(move |conn| {
            conn.prepare_cached(&format!(
                "SELECT {ISSUED_TOKEN_COLUMNS} FROM issued_tokens WHERE jti = ?1"
            ))
            .and_then(|mut stmt| stmt.query_row([&jti], IssuedTokenRow::read).optional())
            .map_err(classify)?
            .map(IssuedTokenRow::decode)
            .transpose()
        })
        .await
    }

    async fn live_tokens(
        &self,
        live_after: i64,
        sandbox: Option<&str>,
    ) -> Result<Vec<IssuedToken>, StoreError> {
        let sandbox = sandbox.map(str::to_owned);
        self.call(move |conn| {
            let mut stmt = conn
                .prepare_cached(&format!(
                    "SELECT {ISSUED_TOKEN_COLUMNS} FROM issued_tokens i
                     WHERE exp > ?1 AND (?2 IS NULL OR sandbox = ?2)
                       AND NOT EXISTS (SELECT 1 FROM revoked_tokens r WHERE r.jti = i.jti)
                     ORDER BY issued_at, rowid"
                ))
                .map_err(classify)?;
            let rows = stmt
                .query_map(params![live_after, sandbox], IssuedTokenRow::read)
                .map_err(classify)?;
            rows.map(|row| row.map_err(classify)?.decode()).collect()
        })
        .await
    }

    async fn audit(&self, limit: usize) -> Result<Vec<AuditEvent>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.call(move |conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT id, time, actor, action, target, client_addr FROM audit_events
                     ORDER BY id DESC LIMIT ?1",
                )
                .map_err(classify)?;
            let rows = stmt
                .query_map([limit], |r| {
                    Ok(AuditEvent {
                        id: r.get(0)?,
                        time: r.get(1)?,
                        actor: r.get(2)?,
                        action: r.get(3)?,
                        target: r.get(4)?,
                        client_addr: r.get(5)?,
                    })
                })
                .map_err(classify)?;
            rows.collect::<rusqlite::Result<Vec<_>>>().map_err(classify)
        })
        .await
    }

    async fn prune(&self, now: i64) -> Result<(), StoreError> {
        let cutoff = now - EXPIRED_TOKEN_GRACE_SECS;
        self.call(move |conn| {
            let tx = conn.transaction().map_err(classify)?;
            let revoked = tx
                .execute("DELETE FROM revoked_tokens WHERE exp < ?1", [cutoff])
                .map_err(classify)?;
            let used = tx
                .execute("DELETE FROM used_tokens WHERE exp < ?1", [cutoff])
                .map_err(classify)?;
            let issued = tx
                .execute("DELETE FROM issued_tokens WHERE exp < ?1", [cutoff])
                .map_err(classify)?;
            tx.commit().map_err(classify)?;
            if revoked + used + issued > 0 {
                tracing::debug!(revoked, used, issued, "pruned expired token entries");
            }
            Ok(())
        })
        .await
    }

    async fn heartbeat(&self, node: &NodeRecord) -> Result<(), StoreError> {
        let node = node.clone();
        let name = node.name.clone();
        let changed = self
            .call(move |conn| {
                let tx = conn
                    .transaction_with_behavior(TransactionBehavior::Immediate)
                    .map_err(classify)?;
                let before = tx
                    .query_row(
                        &format!("SELECT {NODE_COLUMNS} FROM nodes WHERE name = ?1"),
                        [&node.name],
                        read_node,
                    )
                    .optional()
                    .map_err(classify)?;
                tx.execute(
                    &format!(
                        "INSERT INTO nodes ({NODE_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                         ON CONFLICT (name) DO UPDATE SET advertise_addr = excluded.advertise_addr,
                            runs_sandboxes = excluded.runs_sandboxes, version = excluded.version,
                            started_at = excluded.started_at,
                            last_heartbeat = excluded.last_heartbeat,
                            relay_addr = excluded.relay_addr"
                    ),
                    params![
                        node.name,
                        node.advertise_addr,
                        node.runs_sandboxes,
                        node.version,
                        node.started_at,
                        node.last_heartbeat,
                        node.relay_addr,
                    ],
                )
                .map_err(classify)?;
                tx.commit().map_err(classify)?;
                Ok(before.is_none_or(|b| !b.same_announcement(&node)))
            })
            .await?;
        if changed {
            self.announce(Change::NodeChanged { name });
        }
        Ok(())
    }

    async fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        self.call(|conn| {
            let mut stmt = conn
                .prepare_cached(&format!("SELECT {NODE_COLUMNS} FROM nodes ORDER BY name"))
                .map_err(classify)?;
            let rows = stmt.query_map([], read_node).map_err(classify)?;
            rows.collect::<rusqlite::Result<Vec<_>>>().map_err(classify)
        })
        .await
    }

    async fn mark_node_lost(
        &self,
        name: &str,
        heartbeat_before: i64,
        now: i64,
    ) -> Result<Vec<String>, StoreError> {
        let name = name.to_owned();
        let lost = self
            .call(move |conn| {
                // IMMEDIATE takes the write lock first, so the heartbeat check and the updates
                // see one state even when another process races on the same file.
                let tx = conn
                    .transaction_with_behavior(TransactionBehavior::Immediate)
                    .map_err(classify)?;
                let last: Option<i64> = tx
                    .query_row(
                        "SELECT last_heartbeat FROM nodes WHERE name = ?1",
                        [&name],
                        |r| r.get(0),
                    )
                    .optional()
                    .map_err(classify)?;
                if last.is_none_or(|last| last >= heartbeat_before) {
                    return Ok(Vec::new());
                }
                let mut live = Vec::new();
                {
                    let mut stmt = tx
                        .prepare_cached("SELECT id, status FROM sandboxes WHERE node = ?1")
                        .map_err(classify)?;
                    let rows = stmt
                        .query_map([&name], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
                        .map_err(classify)?;
                    for row in rows {
                        let (id, status) = row.map_err(classify)?;
                        // An unreadable status is left for `sandboxes()` to report as corrupt.
                        if SandboxStatus::parse(&status).is_some_and(|s| s.is_live()) {
                            live.push(id);
                        }
                    }
                }
                let detail = super::lost_detail(&name);
                for id in &live {
                    tx.execute(
                        "UPDATE sandboxes SET status = ?2, ended_at = ?3, detail = ?4 WHERE id = ?1",
                        params![id, SandboxStatus::Lost.as_str(), now, detail],
                    )
                    .map_err(classify)?;
                }
                tx.commit().map_err(classify)?;
                live.sort();
                Ok(live)
            })
            .await?;
        for id in &lost {
            self.announce(Change::SandboxChanged { id: id.clone() });
        }
        Ok(lost)
    }

    async fn insert_volume(&self, v: &VolumeRecord) -> Result<(), StoreError> {
        let v = v.clone();
        self.call(move |conn| {
            conn.execute(
                &format!("INSERT INTO volumes ({VOLUME_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5)"),
                params![v.owner, v.name, v.created_at, v.node, v.uid],
            )
            .map_err(|e| classify_insert(e, || format!("volume {} already exists", v.name)))?;
            Ok(())
        })
        .await
    }

    async fn volume(&self, owner: &str, name: &str) -> Result<Option<VolumeRecord>, StoreError> {
        let (owner, name) = (owner.to_owned(), name.to_owned());
        self.call(move |conn| {
            conn.prepare_cached(&format!(
                "SELECT {VOLUME_COLUMNS} FROM volumes WHERE owner = ?1 AND name = ?2"
            ))
            .and_then(|mut stmt| stmt.query_row([&owner, &name], read_volume).optional())
            .map_err(classify)
        })
        .await
    }

    async fn volumes(&self) -> Result<Vec<VolumeRecord>, StoreError> {
        self.call(|conn| {
            let mut stmt = conn
                .prepare_cached(&format!(
                    "SELECT {VOLUME_COLUMNS} FROM volumes ORDER BY created_at, owner, name"
                ))
                .map_err(classify)?;
            let rows = stmt.query_map([], read_volume).map_err(classify)?;
            rows.collect::<rusqlite::Result<Vec<_>>>().map_err(classify)
        })
        .await
    }

    async fn delete_volume(&self, owner: &str, name: &str) -> Result<bool, StoreError> {
        let (owner, name) = (owner.to_owned(), name.to_owned());
        self.call(move |conn| {
            let n = conn
                .execute(
                    "DELETE FROM volumes WHERE owner = ?1 AND name = ?2",
                    [&owner, &name],
                )
                .map_err(classify)?;
            Ok(n > 0)
        })
        .await
    }

    fn changes(&self) -> Option<broadcast::Receiver<Change>> {
        Some(self.changes.subscribe())
    }
}

const VOLUME_COLUMNS: &str = "owner, name, created_at, node, uid";

fn read_volume(r: &Row<'_>) -> rusqlite::Result<VolumeRecord> {
    Ok(VolumeRecord {
        owner: r.get(0)?,
        name: r.get(1)?,
        created_at: r.get(2)?,
        node: r.get(3)?,
        uid: r.get(4)?,
    })
}

const NODE_COLUMNS: &str =
    "name, advertise_addr, runs_sandboxes, version, started_at, last_heartbeat, relay_addr";

fn read_node(r: &Row<'_>) -> rusqlite::Result<NodeRecord> {
    Ok(NodeRecord {
        name: r.get(0)?,
        advertise_addr: r.get(1)?,
        runs_sandboxes: r.get(2)?,
        version: r.get(3)?,
        started_at: r.get(4)?,
        last_heartbeat: r.get(5)?,
        relay_addr: r.get(6)?,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "in tests a panic is the failure report")]
mod tests {
    use super::*;
    use crate::store::conformance::{self, conformance_tests, Fixture};
    use crate::store::ProcessInfo;

    impl Fixture for SqliteStore {
        fn store(&self) -> &dyn Store {
            self
        }
    }

    /// A store in a file of its own, deleted with the fixture.
    struct OnDisk {
        store: SqliteStore,
        _dir: tempfile::TempDir,
    }

    impl Fixture for OnDisk {
        fn store(&self) -> &dyn Store {
            &self.store
        }
    }

    mod in_memory {
        use super::*;

        async fn make() -> SqliteStore {
            SqliteStore::open_in_memory().unwrap()
        }

        conformance_tests!(make);
    }

    mod on_disk {
        use super::*;

        async fn make() -> OnDisk {
            let dir = tempfile::tempdir().unwrap();
            let store = SqliteStore::open(&dir.path().join("sandgate.db")).unwrap();
            OnDisk { store, _dir: dir }
        }

        conformance_tests!(make);
    }

    #[tokio::test]
    async fn data_survives_reopen_and_migrations_run_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/data/sandgate.db");
        let (_, cred) = conformance::credential("cred_persist", 10);
        let sandbox = conformance::sandbox("sbxpersist000000000001", 20);
        let key = conformance::signing_key("k1", 5);
        let event = AuditEvent {
            id: 0,
            time: 30,
            actor: "cred_persist".to_owned(),
            action: "credential.create".to_owned(),
            target: "cred_persist".to_owned(),
            client_addr: Some("[::1]:4000".to_owned()),
        };
        let first_audit_id;
        {
            let store = SqliteStore::open(&path).unwrap();
            store.insert_signing_key(&key).await.unwrap();
            store.insert_credential(&cred).await.unwrap();
            store.revoke_credential(&cred.id, 40).await.unwrap();
            store.insert_sandbox(&sandbox).await.unwrap();
            store.revoke_token("jti-r", 1_000).await.unwrap();
            assert!(store.mark_token_used("jti-u", 1_000).await.unwrap());
            first_audit_id = store.append_audit(&event).await.unwrap();
        }

        let store = SqliteStore::open(&path).unwrap();
        assert_eq!(store.signing_keys().await.unwrap(), vec![key]);
        let reread = store.credential(&cred.id).await.unwrap().unwrap();
        assert_eq!(reread.revoked_at, Some(40));
        assert_eq!(
            reread,
            CredentialRecord {
                revoked_at: Some(40),
                ..cred.clone()
            }
        );
        assert_eq!(
            store.credential_by_hash(&cred.secret_hash).await.unwrap(),
            Some(reread)
        );
        assert_eq!(store.sandboxes().await.unwrap(), vec![sandbox]);
        assert_eq!(
            store.revoked_tokens(0).await.unwrap(),
            vec![("jti-r".to_owned(), 1_000)]
        );
        assert!(!store.mark_token_used("jti-u", 1_000).await.unwrap());
        let second_audit_id = store.append_audit(&event).await.unwrap();
        assert!(second_audit_id > first_audit_id);
        assert_eq!(store.audit(10).await.unwrap().len(), 2);

        let conn = store.conn.lock().unwrap();
        let versions: Vec<i64> = conn
            .prepare("SELECT version FROM schema_version ORDER BY version")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert_eq!(versions, (1..=MIGRATIONS.len() as i64).collect::<Vec<_>>());
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        let sync: i64 = conn
            .query_row("PRAGMA synchronous", [], |r| r.get(0))
            .unwrap();
        assert_eq!(sync, 2, "FULL");
        let fks: i64 = conn
            .query_row("PRAGMA foreign_keys", [], |r| r.get(0))
            .unwrap();
        assert_eq!(fks, 1);
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn file_is_private_and_new_parent_dirs_are_0700() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let parent = dir.path().join("data");
        let path = parent.join("sandgate.db");
        let store = SqliteStore::open(&path).unwrap();
        store
            .insert_signing_key(&conformance::signing_key("k", 1))
            .await
            .unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(&parent), 0o700);
        let wal = parent.join("sandgate.db-wal");
        if wal.exists() {
            assert_eq!(mode(&wal) & 0o077, 0, "WAL inherits the private mode");
        }
        drop(store);

        // An existing file with loose permissions is tightened.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let _store = SqliteStore::open(&path).unwrap();
        assert_eq!(mode(&path), 0o600);
    }

    #[tokio::test]
    async fn a_database_from_before_cluster_mode_migrates() {
        // A file as the previous release left it: migrations 1 and 2 only.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sandgate.db");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(
                "CREATE TABLE schema_version (
                    version    INTEGER PRIMARY KEY,
                    applied_at INTEGER NOT NULL
                 ) STRICT",
            )
            .unwrap();
            for (version, sql) in (1i64..).zip(&MIGRATIONS[..2]) {
                conn.execute_batch(sql).unwrap();
                conn.execute(
                    "INSERT INTO schema_version (version, applied_at) VALUES (?1, 0)",
                    [version],
                )
                .unwrap();
            }
            conn.execute(
                "INSERT INTO sandboxes (id, owner, status, ports, env, cors_origins, rewrite_host,
                    metadata, created_at, host_ports, node)
                 VALUES ('sbxold', 'cred_a', 'running', '[80]', '{}', '[]', 0, 'null', 5, '{}',
                    'node-a')",
                [],
            )
            .unwrap();
        }

        let store = SqliteStore::open(&path).unwrap();
        let old = store.sandbox("sbxold").await.unwrap().unwrap();
        assert_eq!(old.node.as_deref(), Some("node-a"));
        assert_eq!(old.process, ProcessInfo::default());
        // Migration 6: no name, no tags.
        assert_eq!((old.name.as_deref(), old.tags.len()), (None, 0));
        store
            .heartbeat(&conformance::node("node-a", 10))
            .await
            .unwrap();
        assert_eq!(store.nodes().await.unwrap().len(), 1);
        assert_eq!(
            store.mark_node_lost("node-a", 11, 20).await.unwrap(),
            vec!["sbxold".to_owned()]
        );
        // The issued-token table of migration 4 is there too.
        let issued = conformance::issued("jti-after-upgrade", "sbxold", 30, 900);
        store
            .record_issued_tokens(std::slice::from_ref(&issued), &[])
            .await
            .unwrap();
        assert_eq!(store.live_tokens(0, None).await.unwrap(), vec![issued]);
        let version: i64 = store
            .conn
            .lock()
            .unwrap()
            .query_row("SELECT MAX(version) FROM schema_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, MIGRATIONS.len() as i64);
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sandgate.db");
        drop(SqliteStore::open(&path).unwrap());
        let future = MIGRATIONS.len() as i64 + 1;
        Connection::open(&path)
            .unwrap()
            .execute(
                "INSERT INTO schema_version (version, applied_at) VALUES (?1, 0)",
                [future],
            )
            .unwrap();
        let err = SqliteStore::open(&path).unwrap_err();
        assert!(
            matches!(err, StoreError::SchemaTooNew { found, .. } if found == future),
            "{err:?}"
        );
    }

    #[test]
    fn a_file_that_is_not_a_database_fails_to_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sandgate.db");
        std::fs::write(&path, vec![b'x'; 4096]).unwrap();
        let err = SqliteStore::open(&path).unwrap_err();
        assert!(
            matches!(err, StoreError::Open { .. } | StoreError::Corrupt(_)),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn corrupt_rows_are_reported_not_panicked_on() {
        let store = SqliteStore::open_in_memory().unwrap();
        let (_, cred) = conformance::credential("cred_bad", 1);
        store.insert_credential(&cred).await.unwrap();
        store
            .insert_sandbox(&conformance::sandbox("sbxbad", 1))
            .await
            .unwrap();
        {
            let conn = store.conn.lock().unwrap();
            conn.execute(
                "UPDATE credentials SET scopes = '[\"root\"]' WHERE id = 'cred_bad'",
                [],
            )
            .unwrap();
            conn.execute("UPDATE sandboxes SET env = 'not json'", [])
                .unwrap();
        }
        let err = store.credential("cred_bad").await.unwrap_err();
        assert!(
            matches!(&err, StoreError::Corrupt(m) if m.contains("root")),
            "{err:?}"
        );
        let err = store.sandboxes().await.unwrap_err();
        assert!(matches!(err, StoreError::Corrupt(_)), "{err:?}");
        {
            let conn = store.conn.lock().unwrap();
            conn.execute(
                "UPDATE credentials SET scopes = '[]', secret_hash = x'00'",
                [],
            )
            .unwrap();
        }
        let err = store.credentials().await.unwrap_err();
        assert!(matches!(err, StoreError::Corrupt(_)), "{err:?}");
    }

    #[tokio::test]
    async fn conflicts_do_not_echo_the_secret_hash() {
        let store = SqliteStore::open_in_memory().unwrap();
        let (secret, cred) = conformance::credential("cred_a", 1);
        store.insert_credential(&cred).await.unwrap();
        let (_, mut twin) = conformance::credential("cred_b", 2);
        twin.secret_hash = secret.hash();
        let err = store.insert_credential(&twin).await.unwrap_err();
        let shown = format!("{err} {err:?}");
        assert!(!shown.contains(&secret.hash().to_hex()[..16]));
        assert!(!shown.contains(secret.expose()));
    }

    #[tokio::test]
    async fn revoking_a_token_twice_keeps_the_later_expiry() {
        let store = SqliteStore::open_in_memory().unwrap();
        store.revoke_token("j", 500).await.unwrap();
        store.revoke_token("j", 100).await.unwrap();
        store.revoke_token("j", 900).await.unwrap();
        assert_eq!(
            store.revoked_tokens(0).await.unwrap(),
            vec![("j".to_owned(), 900)]
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn mark_token_used_is_atomic_across_spawned_tasks() {
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open_in_memory().unwrap());
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let store = Arc::clone(&store);
                tokio::spawn(async move { store.mark_token_used("jti-spawned", 10).await })
            })
            .collect();
        let mut winners = 0;
        for task in tasks {
            if task.await.unwrap().unwrap() {
                winners += 1;
            }
        }
        assert_eq!(winners, 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn two_processes_sharing_a_file_see_one_first_use() {
        // Two independent stores on one file stand in for two `sandgate` processes.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sandgate.db");
        let a = SqliteStore::open(&path).unwrap();
        let b = SqliteStore::open(&path).unwrap();
        let results = futures_util::future::join_all((0..16).map(|i| {
            let store = if i % 2 == 0 { a.clone() } else { b.clone() };
            async move { store.mark_token_used("shared", 10).await.unwrap() }
        }))
        .await;
        assert_eq!(results.into_iter().filter(|&first| first).count(), 1);
    }
}
