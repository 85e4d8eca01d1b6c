//! Opens everything a running gateway needs from a [`Config`]: the data dir, certificates, the
//! store, the signing keys, the bootstrap admin credential and the route table.

use std::path::Path;
use std::sync::Arc;

use crate::config::Config;
use crate::credential::{self, Scope, Secret};
use crate::proxy::upstream::UpstreamPolicy;
use crate::sandbox::process::Driver;
use crate::sandbox::Routes;
use crate::store::{
    AuditEvent, CredentialRecord, IssuedToken, Store, StoreError, StoredSigningKey,
};
use crate::telemetry::Metrics;
use crate::tls::{CertResolver, TlsError};
use crate::token::{self, Authority, SigningKey, TokenError, TokenSettings};
use crate::tracker::Tracker;
use crate::unix_now;

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The data dir could not be created or secured.
    #[error("data directory {path}: {source}")]
    DataDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// Certificates could not be made or loaded.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The store could not be opened or read.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// A stored signing key is unusable.
    #[error("signing keys: {0}")]
    Keys(#[from] TokenError),
    /// The orchestrator's settings cannot be used on this host.
    #[error("orchestrator: {0}")]
    Orchestrator(String),
    /// The bootstrap admin key could not be written.
    #[error("cannot write the bootstrap admin key to {path}: {source}")]
    AdminKey {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// The shared state of one running gateway.
pub struct Gateway {
    pub config: Config,
    pub store: Arc<dyn Store>,
    pub tokens: Arc<Authority>,
    pub routes: Arc<Routes>,
    pub tracker: Arc<Tracker>,
    pub metrics: Arc<Metrics>,
    pub certs: Arc<CertResolver>,
    /// The process driver for `command` sandboxes; `None` on a gateway-only node.
    pub driver: Option<Arc<Driver>>,
    /// Control API rate limits.
    pub api_limits: crate::api::RateLimits,
    /// Where `upstream` sandboxes may point the proxy: checked by the control API when one is
    /// registered, and by the proxy's connector at every connect.
    pub upstream_policy: Arc<UpstreamPolicy>,
    /// The cluster relay: reaching isolated sandboxes on other nodes, and admitting other
    /// nodes to this one's.
    pub relay: Arc<crate::relay::Relay>,
    /// Audit events on their way to the store, committed in groups.
    audit_log: AuditLog,
    /// When this process opened the gateway (its node's `started_at`).
    pub started_at: i64,
}

/// Group commit for audit events: concurrent callers' events are written in one transaction,
/// and each caller returns only once its event is committed, so an event the API reported is
/// never lost, while a burst costs one fsync instead of one per event.
///
/// An issued token's record rides along with its `token.issue` event
/// ([`Store::record_issued_tokens`]), so issuing a token still costs one shared commit.
struct AuditLog {
    tx: tokio::sync::mpsc::Sender<PendingAudit>,
}

/// An event on its way to the store, the token record that goes with it, and where to say
/// whether the commit succeeded.
type PendingAudit = (
    AuditEvent,
    Option<IssuedToken>,
    tokio::sync::oneshot::Sender<bool>,
);

impl AuditLog {
    /// The most events one transaction carries.
    const MAX_BATCH: usize = 512;

    fn start(store: Arc<dyn Store>) -> AuditLog {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<PendingAudit>(4096);
        tokio::spawn(async move {
            let mut batch = Vec::with_capacity(Self::MAX_BATCH);
            let mut tokens = Vec::new();
            let mut waiters = Vec::with_capacity(Self::MAX_BATCH);
            while let Some(first) = rx.recv().await {
                let mut next = Some(first);
                while let Some((event, token, done)) = next.take() {
                    batch.push(event);
                    tokens.extend(token);
                    waiters.push(done);
                    if batch.len() < Self::MAX_BATCH {
                        next = rx.try_recv().ok();
                    }
                }
                let committed = match store.record_issued_tokens(&tokens, &batch).await {
                    Ok(()) => true,
                    Err(err) => {
                        tracing::error!(error = %err, events = batch.len(), tokens = tokens.len(), "could not record audit events and issued tokens");
                        false
                    }
                };
                batch.clear();
                tokens.clear();
                for done in waiters.drain(..) {
                    let _ = done.send(committed);
                }
            }
        });
        AuditLog { tx }
    }

    /// Queues `event` (and `token`) and waits for the commit; `true` once both are durable.
    async fn record(&self, event: AuditEvent, token: Option<IssuedToken>) -> bool {
        let (done, committed) = tokio::sync::oneshot::channel();
        if self.tx.send((event, token, done)).await.is_err() {
            return false;
        }
        committed.await.unwrap_or(false)
    }
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("base_domain", &self.config.gateway.base_domain)
            .field("routes", &self.routes.len())
            .finish_non_exhaustive()
    }
}

impl Gateway {
    /// Opens (and on first start, initialises) the gateway's state.
    pub async fn open(config: Config) -> Result<Arc<Gateway>, OpenError> {
        let data_dir = config.store.data_dir.clone();
        create_private_dir(&data_dir)?;

        if config.tls.dev_cert && config.tls.cert_file.starts_with(config.store.certs_dir()) {
            // tls logs what it created or re-issued, and where the CA is.
            crate::tls::ensure_dev_certs(&config.store.certs_dir(), &config.gateway.base_domain)?;
        }
        let certs = CertResolver::load(&config.tls.cert_file, &config.tls.key_file)?;

        let store = crate::store::open(
            &config.store,
            &format!("sandgate {}", config.cluster.node_name),
        )
        .await?;

        let keys = load_or_create_keys(store.as_ref()).await?;
        let tokens = Arc::new(Authority::new(token_settings(&config), keys)?);

        ensure_admin(store.as_ref(), &config.store.admin_key_path()).await?;

        let now = unix_now();
        for (jti, exp) in store.revoked_tokens(now).await? {
            tokens.revoke(&jti, exp);
        }
        for (jti, exp) in store.used_tokens(now).await? {
            tokens.mark_used(&jti, exp);
        }
        // Cluster mode: the relay key comes from the key-encryption key the store just opened
        // with, so it cannot fail here.
        let relay_key = match &config.store.url {
            Some(_) => {
                crate::store::postgres::Kek::from_env_or_file(config.store.kek_file.as_deref())
                    .ok()
                    .flatten()
                    .map(|kek| kek.derive(crate::relay::KEY_LABEL))
            }
            None => None,
        };
        let relay = Arc::new(crate::relay::Relay::new(
            &config.cluster.node_name,
            &config.cluster.advertise_addr,
            relay_key,
        ));
        if relay.enabled() {
            relay.learn(&store.nodes().await?);
        }
        let routes = Arc::new(Routes::new());
        for record in store.sandboxes().await? {
            routes.upsert(&record);
        }
        let tracker = Arc::new(Tracker::new());
        let metrics = Arc::new(Metrics::new());
        let driver = if config.orchestrator.enabled {
            let identity = crate::sandbox::process::Identity::resolve(&config.orchestrator.run_as)
                .map_err(OpenError::Orchestrator)?;
            match &identity {
                // Isolated sandboxes run as uids of their own instead.
                _ if config.orchestrator.isolation != crate::config::IsolationMode::None => {}
                Some(who) => tracing::info!(user = %who.name, "sandbox processes run as an unprivileged user"),
                None => tracing::warn!("sandbox processes run as the gateway's own user and can read its data dir (keys, database); run sandgate as root with [orchestrator] run_as = \"auto\" to isolate them"),
            }
            let isolation = crate::sandbox::process::Isolation::resolve(
                &config.orchestrator,
                &config.store.data_dir,
            )
            .map_err(OpenError::Orchestrator)?;
            match &isolation {
                crate::sandbox::process::Isolation::Namespaces(iso) => {
                    tracing::info!(isolation = %iso.describe(), "command sandboxes are isolated")
                }
                crate::sandbox::process::Isolation::None => tracing::warn!(
                    "[orchestrator] isolation = \"none\": command sandboxes are plain host processes that can reach the host's network and files; use it on a developer's machine only"
                ),
                crate::sandbox::process::Isolation::Unavailable(why) => {
                    tracing::warn!("{why}")
                }
            }
            let driver = Arc::new(Driver::new(
                config.orchestrator.clone(),
                &config.store.data_dir,
                Arc::clone(&store),
                Arc::clone(&routes),
                Arc::clone(&tracker),
                identity,
                config.cluster.node_name.clone(),
                isolation,
                Arc::clone(&metrics),
            ));
            let ended = driver.reconcile().await?;
            if ended > 0 {
                tracing::warn!(
                    sandboxes = ended,
                    "ended process sandboxes left running by a previous run"
                );
            }
            Some(driver)
        } else {
            None
        };
        tracing::info!(
            sandboxes = routes.len(),
            data_dir = %data_dir.display(),
            "state loaded"
        );

        let audit_log = AuditLog::start(Arc::clone(&store));
        Ok(Arc::new(Gateway {
            started_at: unix_now(),
            audit_log,
            store,
            tokens,
            routes,
            tracker,
            metrics,
            certs,
            driver,
            api_limits: crate::api::RateLimits::new(&config.api),
            upstream_policy: Arc::new(UpstreamPolicy::from_config(&config)),
            relay,

            config,
        }))
    }

    /// Re-reads the signing keys from the store (after `sandgate keys rotate`). Returns true
    /// when the set changed.
    pub async fn reload_keys(&self) -> Result<bool, OpenError> {
        let keys = stored_keys(self.store.as_ref()).await?;
        // The same order the key set signs by (newest `created_at`, ties by kid), so a tie does
        // not make every tick look like a change (which would also clear the token cache).
        let newest = keys
            .iter()
            .max_by(|a, b| (a.created_at(), a.kid()).cmp(&(b.created_at(), b.kid())))
            .map(|k| k.kid().to_string());
        if newest.as_deref() == Some(self.tokens.signing_kid().as_str())
            && keys.len() == self.tokens.key_count()
        {
            return Ok(false);
        }
        self.tokens.set_keys(keys)?;
        tracing::info!(kid = %self.tokens.signing_kid(), "signing keys reloaded");
        Ok(true)
    }

    /// Ends sandboxes registered with an `upstream` whose `timeout_secs` has passed (the
    /// process driver ends its own at their deadline). Returns how many ended.
    pub async fn expire_sandboxes(&self, now: i64) -> Result<usize, StoreError> {
        let mut ended = 0;
        for id in self.routes.overdue(now) {
            let Some(mut record) = self.store.sandbox(&id).await? else {
                continue;
            };
            if !record.status.is_live() {
                self.routes.upsert(&record);
                continue;
            }
            record.status = crate::store::SandboxStatus::Stopped;
            record.ended_at = Some(now);
            record.detail = Some("reached its timeout".into());
            self.store.update_sandbox(&record).await?;
            self.routes.upsert(&record);
            self.tracker.close_sandbox(&record.id);
            self.audit("sandgate", "sandbox.expire", &record.id, None)
                .await;
            ended += 1;
        }
        Ok(ended)
    }

    /// Ends this node's running `command` sandboxes that have had no activity for their
    /// `idle_timeout_secs`: no proxied request, no open client or relay connection, no exec.
    /// A sandbox seen busy (a connection or an exec open) is active now, so its idle time
    /// counts from when the last one closed, to this check's second. Each ends as `stopped`
    /// with a `detail` saying so (its supervisor records it); this does not wait for them.
    /// Returns how many it started ending.
    pub async fn end_idle_sandboxes(&self, now: i64) -> usize {
        let Some(driver) = &self.driver else {
            return 0;
        };
        let mut ended = 0;
        for (id, secs, activity) in self.routes.idle_timed() {
            if driver.busy(&id) {
                activity.touch(now);
                continue;
            }
            if !activity.quiet_for(secs, now) || !driver.end_idle(&id) {
                continue;
            }
            tracing::info!(sandbox = %id, idle_timeout_secs = secs, "sandbox idle for its idle timeout; ending it");
            self.audit("sandgate", "sandbox.idle", &id, None).await;
            ended += 1;
        }
        ended
    }

    /// Records an audit event in the store and as one structured log line.
    pub async fn audit(
        &self,
        actor: &str,
        action: &str,
        target: &str,
        client_addr: Option<String>,
    ) {
        let event = audit_event(actor, action, target, client_addr);
        // A failed commit is logged by the audit log; the action itself has happened.
        self.audit_log.record(event, None).await;
    }

    /// Records a newly issued token together with its `token.issue` audit event, in the same
    /// group commit. Unlike [`Gateway::audit`] this fails when the commit does: a token the
    /// store does not know could not be listed or revoked by its id, so it must not be handed
    /// out.
    pub async fn record_issued(
        &self,
        token: IssuedToken,
        target: &str,
        client_addr: Option<String>,
    ) -> Result<(), StoreError> {
        let event = audit_event(&token.sub, "token.issue", target, client_addr);
        if self.audit_log.record(event, Some(token)).await {
            Ok(())
        } else {
            Err(StoreError::Unavailable(
                "the issued token could not be recorded".into(),
            ))
        }
    }
}

/// An audit event stamped now, also written as one structured log line.
fn audit_event(actor: &str, action: &str, target: &str, client_addr: Option<String>) -> AuditEvent {
    tracing::info!(target: "sandgate::audit", actor, action, target, client_addr = client_addr.as_deref().unwrap_or("-"), "audit");
    AuditEvent {
        id: 0,
        time: unix_now(),
        actor: actor.to_string(),
        action: action.to_string(),
        target: target.to_string(),
        client_addr,
    }
}

/// Token settings derived from the config: the issuer names this gateway's base domain.
pub fn token_settings(config: &Config) -> TokenSettings {
    TokenSettings {
        issuer: format!("https://{}", config.gateway.base_domain),
        audience: "sandgate".to_string(),
        default_ttl_secs: config.tokens.default_ttl_secs,
        max_ttl_secs: config.tokens.max_ttl_secs,
        leeway_secs: config.tokens.leeway_secs,
        cache_capacity: config.tokens.cache_capacity,
    }
}

async fn stored_keys(store: &dyn Store) -> Result<Vec<SigningKey>, OpenError> {
    let mut keys = Vec::new();
    for k in store.signing_keys().await? {
        keys.push(SigningKey::from_parts(k.kid, k.created_at, k.private_der)?);
    }
    Ok(keys)
}

async fn load_or_create_keys(store: &dyn Store) -> Result<Vec<SigningKey>, OpenError> {
    let keys = stored_keys(store).await?;
    if !keys.is_empty() {
        return Ok(keys);
    }
    let key = add_signing_key(store).await?;
    tracing::info!(kid = %key.kid(), "created the first signing key");
    Ok(vec![key])
}

/// Creates a signing key and stores it; running gateways pick it up within seconds.
pub async fn add_signing_key(store: &dyn Store) -> Result<SigningKey, OpenError> {
    let key = SigningKey::generate()?;
    // The newest `created_at` signs, in whole seconds. A key made in the same second as the
    // current one (a rotation right after first start, or two in a row) would tie and sign only
    // if its random kid sorted higher; dating it one second after the newest makes a rotation
    // always take effect.
    let newest = store
        .signing_keys()
        .await?
        .iter()
        .map(|k| k.created_at)
        .max();
    let key = match newest {
        Some(newest) if newest >= key.created_at() => {
            SigningKey::from_parts(key.kid().to_string(), newest + 1, key.pkcs8_der().to_vec())?
        }
        _ => key,
    };
    store
        .insert_signing_key(&StoredSigningKey {
            kid: key.kid().to_string(),
            created_at: key.created_at(),
            private_der: key.pkcs8_der().to_vec(),
        })
        .await?;
    Ok(key)
}

/// On an empty store, creates the bootstrap admin credential and writes its secret to
/// `path` (mode 0600). The log names the file, never the key.
async fn ensure_admin(store: &dyn Store, path: &Path) -> Result<(), OpenError> {
    if !store.credentials().await?.is_empty() {
        return Ok(());
    }
    let secret = Secret::generate();
    let record = CredentialRecord {
        id: credential::new_credential_id(),
        name: "bootstrap-admin".to_string(),
        scopes: vec![Scope::Admin],
        secret_hash: secret.hash(),
        created_at: unix_now(),
        expires_at: None,
        max_token_ttl_secs: None,
        revoked_at: None,
    };
    write_private_file(path, format!("{}\n", secret.expose()).as_bytes()).map_err(|source| {
        OpenError::AdminKey {
            path: path.display().to_string(),
            source,
        }
    })?;
    store.insert_credential(&record).await?;
    store
        .append_audit(&AuditEvent {
            id: 0,
            time: unix_now(),
            actor: "sandgate".into(),
            action: "credential.create".into(),
            target: record.id.clone(),
            client_addr: None,
        })
        .await?;
    tracing::info!(path = %path.display(), credential = %record.id, "created the bootstrap admin credential; its API key is in this file");
    Ok(())
}

fn create_private_dir(path: &Path) -> Result<(), OpenError> {
    let err = |source| OpenError::DataDir {
        path: path.display().to_string(),
        source,
    };
    #[cfg(unix)]
    let before = std::fs::metadata(path).ok().map(|m| {
        use std::os::unix::fs::PermissionsExt;
        m.permissions().mode() & 0o777
    });
    std::fs::create_dir_all(path).map_err(err)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        // Others may traverse (sandbox users reach their own directories below it) but not
        // list; every secret inside is a 0600 file or sits in a 0700 folder.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o711)).map_err(err)?;
        // An existing data dir that others could list or write was widened by something
        // other than sandgate (which leaves it 0711): say so, since whatever did it may do it
        // again, and what it exposed meanwhile is worth a look. Not `chmod 700`: the others'
        // execute bit is what lets sandboxes running as `nobody` reach their folders.
        if let Some(mode) = before.filter(|mode| mode & 0o066 != 0) {
            tracing::warn!(
                data_dir = %path.display(),
                mode = %format!("{mode:04o}"),
                "the data dir was open to other users (they could list or write it); sandgate \
                 set it back to 0711. Find what widened it (a deploy step, a copy, an umask) \
                 and check what else in it others could read"
            );
        }
    }
    Ok(())
}

/// Writes a file readable by its owner only (created with mode 0600, never wider).
pub fn write_private_file(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    file.write_all(contents)?;
    file.sync_all()
}

/// Re-export for callers that only hold the token module.
pub use token::IssueRequest;

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::sync::{Arc, Mutex};

    /// What `f` logs at `warn` and above, as text.
    fn warnings(f: impl FnOnce()) -> String {
        let out = Arc::new(Mutex::new(Vec::<u8>::new()));
        let writer = {
            let out = Arc::clone(&out);
            move || Captured(Arc::clone(&out))
        };
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::WARN)
            .with_ansi(false)
            .with_writer(writer)
            .finish();
        tracing::subscriber::with_default(subscriber, f);
        let bytes = out.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn a_data_dir_open_to_others_is_tightened_with_a_warning() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data");

        // Made by sandgate: 0711, nothing to warn about.
        let logged = warnings(|| create_private_dir(&dir).unwrap());
        assert_eq!(mode(&dir), 0o711);
        assert!(logged.is_empty(), "{logged}");

        // Widened by something else: set back, and said so with the path and the old mode.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let logged = warnings(|| create_private_dir(&dir).unwrap());
        assert_eq!(mode(&dir), 0o711);
        assert!(logged.contains("WARN"), "{logged}");
        assert!(logged.contains("open to other users"), "{logged}");
        assert!(
            logged.contains(&format!("data_dir={}", dir.display())),
            "{logged}"
        );
        assert!(logged.contains("mode=0755"), "{logged}");

        // Still 0711 on the next start: quiet again.
        let logged = warnings(|| create_private_dir(&dir).unwrap());
        assert!(logged.is_empty(), "{logged}");
    }
}
