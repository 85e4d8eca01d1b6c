//! Column encoding shared by the backends: both keep lists, maps and JSON values as JSON text,
//! times as integer Unix seconds, and hashes as 32-byte blobs, so one decoder serves both and a
//! record reads back the same from either.
//!
//! Each backend reads its driver's row into the raw structs here (its own `impl` block) and
//! binds [`SandboxParams`]; decoding errors come out as [`StoreError::Corrupt`].

use std::collections::BTreeMap;

use super::{CredentialRecord, IssuedToken, SandboxRecord, SandboxStatus, StoreError};
use crate::credential::{Scope, SecretHash};

pub(super) fn to_json<T: serde::Serialize + ?Sized>(value: &T) -> Result<String, StoreError> {
    // Serializing our own record types cannot fail (string keys or integer keys, no
    // non-finite floats in `serde_json::Value`); report it as a bug if it ever does.
    serde_json::to_string(value).map_err(|e| StoreError::Backend(Box::new(e)))
}

pub(super) fn from_json<T: serde::de::DeserializeOwned>(
    table: &str,
    column: &str,
    text: &str,
) -> Result<T, StoreError> {
    serde_json::from_str(text)
        .map_err(|e| StoreError::Corrupt(format!("{table}.{column} is not valid JSON: {e}")))
}

pub(super) fn hash_from_blob(bytes: Vec<u8>) -> Result<SecretHash, StoreError> {
    let len = bytes.len();
    <[u8; 32]>::try_from(bytes).map(SecretHash).map_err(|_| {
        StoreError::Corrupt(format!("credentials.secret_hash has {len} bytes, not 32"))
    })
}

pub(super) const CREDENTIAL_COLUMNS: &str =
    "id, name, scopes, secret_hash, created_at, expires_at, max_token_ttl_secs, revoked_at";

/// The raw columns of a credential row, decoded in two steps so that driver errors and our own
/// decoding errors both keep their kinds.
pub(super) struct CredentialRow {
    pub(super) id: String,
    pub(super) name: String,
    pub(super) scopes: String,
    pub(super) secret_hash: Vec<u8>,
    pub(super) created_at: i64,
    pub(super) expires_at: Option<i64>,
    pub(super) max_token_ttl_secs: Option<i64>,
    pub(super) revoked_at: Option<i64>,
}

impl CredentialRow {
    pub(super) fn decode(self) -> Result<CredentialRecord, StoreError> {
        let names: Vec<String> = from_json("credentials", "scopes", &self.scopes)?;
        let scopes = names
            .iter()
            .map(|name| {
                Scope::parse(name).ok_or_else(|| {
                    StoreError::Corrupt(format!(
                        "credential {} has unknown scope {name:?}",
                        self.id
                    ))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(CredentialRecord {
            id: self.id,
            name: self.name,
            scopes,
            secret_hash: hash_from_blob(self.secret_hash)?,
            created_at: self.created_at,
            expires_at: self.expires_at,
            max_token_ttl_secs: self.max_token_ttl_secs,
            revoked_at: self.revoked_at,
        })
    }
}

pub(super) fn scopes_json(scopes: &[Scope]) -> Result<String, StoreError> {
    to_json(&scopes.iter().map(Scope::as_str).collect::<Vec<_>>())
}

pub(super) const SANDBOX_COLUMNS: &str =
    "id, owner, status, ports, upstream, command, env, cors_origins, \
     rewrite_host, metadata, created_at, expires_at, ended_at, host_ports, node, detail, process, \
     name, tags, secret_env";

/// How many [`SANDBOX_COLUMNS`] there are: what an insert binds.
pub(super) const SANDBOX_BINDS: usize = 20;

/// The live statuses ([`SandboxStatus::is_live`]) as an SQL list, for queries that must agree
/// with the partial index on live names (whose migrations spell the same list out).
pub(super) const LIVE_STATUSES_SQL: &str = "('starting', 'running')";

/// How many leading [`SANDBOX_COLUMNS`] an update binds: all but `name`, `tags` and
/// `secret_env`, which only the insert (all three) and [`super::Store::set_sandbox_tags`]
/// (`tags`) write.
pub(super) const SANDBOX_UPDATE_BINDS: usize = 17;

/// Raw sandbox columns; see [`CredentialRow`] for why decoding is two-step.
pub(super) struct SandboxRow {
    pub(super) id: String,
    pub(super) owner: String,
    pub(super) status: String,
    pub(super) ports: String,
    pub(super) upstream: Option<String>,
    pub(super) command: Option<String>,
    pub(super) env: String,
    pub(super) cors_origins: String,
    pub(super) rewrite_host: bool,
    pub(super) metadata: String,
    pub(super) created_at: i64,
    pub(super) expires_at: Option<i64>,
    pub(super) ended_at: Option<i64>,
    pub(super) host_ports: String,
    pub(super) node: Option<String>,
    pub(super) detail: Option<String>,
    pub(super) process: String,
    pub(super) name: Option<String>,
    pub(super) tags: String,
    /// The secret environment as JSON text, already opened by the backend (PostgreSQL keeps it
    /// sealed); `None` for none.
    pub(super) secret_env: Option<String>,
}

impl SandboxRow {
    pub(super) fn decode(self) -> Result<SandboxRecord, StoreError> {
        const T: &str = "sandboxes";
        let status = SandboxStatus::parse(&self.status).ok_or_else(|| {
            StoreError::Corrupt(format!(
                "sandbox {} has unknown status {:?}",
                self.id, self.status
            ))
        })?;
        Ok(SandboxRecord {
            status,
            ports: from_json(T, "ports", &self.ports)?,
            upstream: self.upstream,
            command: self
                .command
                .as_deref()
                .map(|c| from_json(T, "command", c))
                .transpose()?,
            env: from_json(T, "env", &self.env)?,
            cors_origins: from_json(T, "cors_origins", &self.cors_origins)?,
            rewrite_host: self.rewrite_host,
            metadata: from_json(T, "metadata", &self.metadata)?,
            created_at: self.created_at,
            expires_at: self.expires_at,
            ended_at: self.ended_at,
            host_ports: from_json::<BTreeMap<u16, u16>>(T, "host_ports", &self.host_ports)?,
            node: self.node,
            detail: self.detail,
            process: from_json(T, "process", &self.process)?,
            name: self.name,
            tags: from_json(T, "tags", &self.tags)?,
            secret_env: match &self.secret_env {
                // Not the JSON error: its message could quote a value.
                Some(text) => serde_json::from_str(text).map_err(|_| {
                    StoreError::Corrupt(format!(
                        "sandbox {}: secret_env is not a JSON object of strings",
                        self.id
                    ))
                })?,
                None => BTreeMap::new(),
            },
            id: self.id,
            owner: self.owner,
        })
    }
}

/// A sandbox's columns encoded for binding, in [`SANDBOX_COLUMNS`] order. Owned plain values, so
/// the SQLite backend can move them into its blocking closure.
pub(super) struct SandboxParams {
    pub(super) id: String,
    pub(super) owner: String,
    pub(super) status: &'static str,
    pub(super) ports: String,
    pub(super) upstream: Option<String>,
    pub(super) command: Option<String>,
    pub(super) env: String,
    pub(super) cors_origins: String,
    pub(super) rewrite_host: bool,
    pub(super) metadata: String,
    pub(super) created_at: i64,
    pub(super) expires_at: Option<i64>,
    pub(super) ended_at: Option<i64>,
    pub(super) host_ports: String,
    pub(super) node: Option<String>,
    pub(super) detail: Option<String>,
    pub(super) process: String,
    pub(super) name: Option<String>,
    pub(super) tags: String,
    /// JSON text, `None` when there is none; PostgreSQL seals it before binding.
    pub(super) secret_env: Option<String>,
}

impl SandboxParams {
    pub(super) fn encode(s: &SandboxRecord) -> Result<Self, StoreError> {
        Ok(SandboxParams {
            id: s.id.clone(),
            owner: s.owner.clone(),
            status: s.status.as_str(),
            ports: to_json(&s.ports)?,
            upstream: s.upstream.clone(),
            command: s.command.as_ref().map(to_json).transpose()?,
            env: to_json(&s.env)?,
            cors_origins: to_json(&s.cors_origins)?,
            rewrite_host: s.rewrite_host,
            metadata: to_json(&s.metadata)?,
            created_at: s.created_at,
            expires_at: s.expires_at,
            ended_at: s.ended_at,
            host_ports: to_json(&s.host_ports)?,
            node: s.node.clone(),
            detail: s.detail.clone(),
            process: to_json(&s.process)?,
            name: s.name.clone(),
            tags: to_json(&s.tags)?,
            secret_env: if s.secret_env.is_empty() {
                None
            } else {
                Some(to_json(&s.secret_env)?)
            },
        })
    }
}

pub(super) const ISSUED_TOKEN_COLUMNS: &str = "jti, sandbox, port, sub, issued_at, exp, single_use";

/// Raw issued-token columns: the port is a plain integer column in both backends (neither has
/// an unsigned 16-bit type), checked on the way out.
pub(super) struct IssuedTokenRow {
    pub(super) jti: String,
    pub(super) sandbox: String,
    pub(super) port: i64,
    pub(super) sub: String,
    pub(super) issued_at: i64,
    pub(super) exp: i64,
    pub(super) single_use: bool,
}

impl IssuedTokenRow {
    pub(super) fn decode(self) -> Result<IssuedToken, StoreError> {
        let port = u16::try_from(self.port).map_err(|_| {
            StoreError::Corrupt(format!(
                "issued token {} has port {}, not 0-65535",
                self.jti, self.port
            ))
        })?;
        Ok(IssuedToken {
            jti: self.jti,
            sandbox: self.sandbox,
            port,
            sub: self.sub,
            issued_at: self.issued_at,
            exp: self.exp,
            single_use: self.single_use,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sql_lists_agree_with_the_record_types() {
        let live: Vec<String> = SandboxStatus::ALL
            .iter()
            .filter(|s| s.is_live())
            .map(|s| format!("'{s}'"))
            .collect();
        assert_eq!(LIVE_STATUSES_SQL, format!("({})", live.join(", ")));
        assert_eq!(SANDBOX_COLUMNS.split(',').count(), SANDBOX_BINDS);
        assert!(SANDBOX_COLUMNS.ends_with("process, name, tags, secret_env"));
    }
}
