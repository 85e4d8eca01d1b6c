//! The process driver: runs `command` sandboxes as local process groups.
//!
//! Each sandbox gets its own working directory (`<data_dir>/sandboxes/<id>/`), its own process
//! group, host ports allocated from `[orchestrator] port_range`, resource limits applied with
//! `prlimit` (so no `unsafe` `pre_exec` is needed), and a size-capped log of its output. A
//! supervisor task per sandbox moves it `starting` → `running` once every published port
//! accepts connections, to `failed` if it exits before that, and to `stopped` when it ends,
//! is terminated or reaches its deadline. Ending always kills the whole group: no orphan
//! survives.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use dashmap::DashMap;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use rand::Rng;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::{IsolationMode, OrchestratorConfig};
use crate::sandbox::cgroup::Limits;
use crate::sandbox::isolate::{IsolationError, Isolator, Jail, EGRESS_PORT};
use crate::sandbox::spec::{Rlimits, VolumeBind};
use crate::sandbox::volume::{ConfineError, Volumes};
use crate::sandbox::Routes;
use crate::store::{ProcessInfo, SandboxRecord, SandboxStatus, Store, StoreError};
use crate::tracker::Tracker;
use crate::unix_now;

/// Why the driver could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// Every port in the configured range is taken.
    #[error("no free host port left in the orchestrator's port range")]
    NoFreePort,
    /// The sandbox directory could not be made.
    #[error("cannot prepare the sandbox directory: {0}")]
    Dir(#[source] std::io::Error),
    /// The command could not be started (not found, not executable...).
    #[error("cannot start the command: {0}")]
    Spawn(#[source] std::io::Error),
    /// The store refused the record.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The sandbox is not running here.
    #[error("the sandbox is not running")]
    NotRunning,
    /// This node cannot isolate `command` sandboxes (`[orchestrator] isolation = "auto"`).
    #[error("{0}")]
    IsolationUnavailable(String),
    /// Namespaces, cgroup or launcher failed for this sandbox.
    #[error(transparent)]
    Isolation(#[from] IsolationError),
    /// The `volumes` asked for cannot be mounted as given (unknown volume, a `sub_path` that
    /// names a link or a file, a sandbox that cannot mount volumes).
    #[error("{0}")]
    VolumeInvalid(String),
    /// The volume is not this node's to mount (it lives on another node).
    #[error("{0}")]
    VolumeConflict(String),
    /// The sandbox runs as a plain host process (`isolation = "none"`): there is no view of
    /// its own to confine file operations to.
    #[error("the files API works on isolated sandboxes only; this one runs as a plain host process ([orchestrator] isolation = \"none\"): use exec to read or write its files")]
    NotIsolated,
}

/// How this node keeps `command` sandboxes in (`[orchestrator] isolation`).
#[derive(Debug, Clone)]
pub enum Isolation {
    /// Namespaces, a cgroup and a uid of its own per sandbox.
    Namespaces(Arc<Isolator>),
    /// Plain host processes (a developer's laptop).
    None,
    /// `auto` on a node that cannot isolate: `command` sandboxes are refused with this reason.
    Unavailable(String),
}

impl Isolation {
    /// Resolves `[orchestrator] isolation` on this node. `namespaces` that cannot be had is an
    /// error (the gateway does not start); `auto` falls back to refusing `command` sandboxes.
    pub fn resolve(cfg: &OrchestratorConfig, data_dir: &Path) -> Result<Isolation, String> {
        match cfg.isolation {
            IsolationMode::None => Ok(Isolation::None),
            IsolationMode::Namespaces => Isolator::detect(cfg, data_dir)
                .map(|i| Isolation::Namespaces(Arc::new(i)))
                .map_err(|e| format!("[orchestrator] isolation = \"namespaces\": {e}")),
            IsolationMode::Auto => Ok(match Isolator::detect(cfg, data_dir) {
                Ok(i) => Isolation::Namespaces(Arc::new(i)),
                Err(e) => Isolation::Unavailable(format!(
                    "this node cannot isolate command sandboxes ({e}); [orchestrator] isolation = \"auto\" refuses them here"
                )),
            }),
        }
    }

    /// The name shown on sandbox objects.
    pub fn name(&self) -> &'static str {
        match self {
            Isolation::Namespaces(_) => "namespaces",
            Isolation::None | Isolation::Unavailable(_) => "none",
        }
    }
}

/// One `exec` request.
#[derive(Debug, Clone)]
pub struct ExecRequest {
    pub command: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub timeout: Duration,
}

/// What an `exec` produced.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ExecOutput {
    /// `None` when the process was killed by a signal (including the timeout).
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    pub timed_out: bool,
    pub duration_ms: u64,
}

/// Which output of a streamed exec a chunk is from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputStream {
    Stdout,
    Stderr,
}

/// One piece of a streamed exec's output.
pub type OutputChunk = (OutputStream, bytes::Bytes);

/// How a streamed exec ended.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct ExecExit {
    /// `None` when the process was killed by a signal (including the timeout).
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub timed_out: bool,
}

/// A running sandbox's handle.
struct Running {
    /// Cancel to terminate.
    stop: CancellationToken,
    /// Cancel to end it for idleness (its `detail` says so).
    idle: CancellationToken,
    /// An isolated sandbox's namespaces and cgroup (`None` under `isolation = "none"`).
    jail: Option<Arc<Jail>>,
    /// Becomes true when the supervisor has finished (process group gone, store updated).
    done: watch::Receiver<bool>,
}

/// Runs and supervises process sandboxes.
pub struct Driver {
    cfg: OrchestratorConfig,
    data_dir: PathBuf,
    store: Arc<dyn Store>,
    routes: Arc<Routes>,
    tracker: Arc<Tracker>,
    /// This node's name: the sandboxes it starts carry it, and only those are its to reconcile.
    node: String,
    running: DashMap<String, Running>,
    /// Process groups of `exec` commands in flight, per sandbox: they run in groups of their
    /// own (so a timeout kills exactly them), and end with the sandbox.
    execs: DashMap<String, BTreeSet<i32>>,
    /// File operations in progress, per sandbox: like a running exec, they keep it busy.
    file_ops: DashMap<String, usize>,
    ports: Mutex<BTreeSet<u16>>,
    /// The unprivileged user sandboxes run as; `None`: the gateway's own user.
    identity: Option<Identity>,
    isolation: Isolation,
    /// Egress decisions are counted here.
    metrics: Arc<crate::telemetry::Metrics>,
    /// This node's volume folders.
    volumes: Arc<Volumes>,
    /// This node's images.
    images: Arc<crate::sandbox::image::Images>,
}

/// An unprivileged account for sandbox processes. Running them as the gateway's user would let
/// any `sandboxes:write` credential read the admin key, the signing keys and the TLS keys.
#[derive(Debug, Clone)]
pub struct Identity {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

impl Identity {
    /// Resolves `[orchestrator] run_as`: `"auto"` is `nobody` when the gateway runs as root and
    /// the gateway's own user otherwise; `"gateway"` is always the gateway's own user.
    pub fn resolve(run_as: &str) -> Result<Option<Identity>, String> {
        let root = nix::unistd::geteuid().is_root();
        let name = match run_as {
            "gateway" => return Ok(None),
            "auto" if !root => return Ok(None),
            "auto" => "nobody",
            name => name,
        };
        if !root {
            return Err(format!(
                "[orchestrator] run_as = \"{name}\" needs the gateway to run as root (or set run_as = \"gateway\")"
            ));
        }
        let user = nix::unistd::User::from_name(name)
            .map_err(|e| format!("cannot look up user `{name}`: {e}"))?
            .ok_or_else(|| {
                format!("[orchestrator] run_as names user `{name}`, which does not exist")
            })?;
        if user.uid.is_root() {
            return Err("[orchestrator] run_as may not be root".into());
        }
        Ok(Some(Identity {
            name: name.to_string(),
            uid: user.uid.as_raw(),
            gid: user.gid.as_raw(),
        }))
    }
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver")
            .field("running", &self.running.len())
            .finish_non_exhaustive()
    }
}

impl Driver {
    // Each argument is a different collaborator the gateway already holds; a struct of them
    // would only be built here.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cfg: OrchestratorConfig,
        data_dir: &Path,
        store: Arc<dyn Store>,
        routes: Arc<Routes>,
        tracker: Arc<Tracker>,
        identity: Option<Identity>,
        node: String,
        isolation: Isolation,
        metrics: Arc<crate::telemetry::Metrics>,
    ) -> Driver {
        Driver {
            volumes: Arc::new(Volumes::new(cfg.volumes_dir.clone())),
            images: Arc::new(crate::sandbox::image::Images::new(data_dir)),
            metrics,
            node,
            identity,
            isolation,
            cfg,
            data_dir: data_dir.to_path_buf(),
            store,
            routes,
            tracker,
            running: DashMap::new(),
            execs: DashMap::new(),
            file_ops: DashMap::new(),
            ports: Mutex::new(BTreeSet::new()),
        }
    }

    /// Default resource limits from the config, for fields the request left out.
    pub fn default_limits(&self) -> ProcessInfo {
        ProcessInfo {
            pgid: None,
            memory_mb: self.cfg.memory_mb,
            cpu_secs: self.cfg.cpu_secs,
            max_processes: self.cfg.max_processes,
            max_open_files: self.cfg.max_open_files,
            cpu_millis: self.cfg.cpu_millis,
            ..ProcessInfo::default()
        }
    }

    /// The sandbox's working directory.
    pub fn sandbox_dir(&self, id: &str) -> PathBuf {
        self.data_dir.join("sandboxes").join(id)
    }

    /// Its captured output: outside the sandbox's own directory, so the sandbox cannot swap
    /// the file for a link to something the gateway (reading it for `logs`) may read.
    pub fn log_path(&self, id: &str) -> PathBuf {
        self.data_dir.join("logs").join(format!("{id}.log"))
    }

    /// The folder of the sandboxes' captured output: the gateway's alone.
    fn logs_dir(&self) -> std::io::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let logs = self.data_dir.join("logs");
        std::fs::create_dir_all(&logs)?;
        std::fs::set_permissions(&logs, std::fs::Permissions::from_mode(0o700))
    }

    /// Creates the sandbox's working directory, owned by the sandbox user, and the log folder.
    fn prepare(&self, id: &str) -> std::io::Result<PathBuf> {
        use std::os::unix::fs::PermissionsExt;
        self.logs_dir()?;
        // Others may pass through `sandboxes/` to their own directory, not list it.
        let parent = self.data_dir.join("sandboxes");
        std::fs::create_dir_all(&parent)?;
        std::fs::set_permissions(&parent, std::fs::Permissions::from_mode(0o711))?;
        let dir = self.sandbox_dir(id);
        std::fs::create_dir_all(&dir)?;
        if let Some(who) = &self.identity {
            std::os::unix::fs::chown(&dir, Some(who.uid), Some(who.gid))?;
        }
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
        Ok(dir)
    }

    /// This node's volume folders.
    pub fn volumes(&self) -> &Volumes {
        &self.volumes
    }

    /// The same, to move into a blocking task.
    pub fn volumes_handle(&self) -> Arc<Volumes> {
        Arc::clone(&self.volumes)
    }

    /// This node's images.
    pub fn images(&self) -> &Arc<crate::sandbox::image::Images> {
        &self.images
    }

    /// This node's name (what its sandboxes and volumes record as their node).
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The uid that `owner`'s volumes on `node` belong to: the one its volumes there have, or
    /// a new one, reserved from then on (see [`crate::sandbox::volume`]). The caller holds
    /// [`Volumes::lock`] exclusively, so two first volumes of an owner cannot get two uids.
    pub async fn volume_uid(&self, owner: &str, node: Option<&str>) -> Result<u32, DriverError> {
        let all = self.store.volumes().await?;
        if let Some(v) = all
            .iter()
            .find(|v| v.owner == owner && v.node.as_deref() == node)
        {
            return Ok(v.uid);
        }
        let taken: BTreeSet<u32> = all.iter().map(|v| v.uid).collect();
        match &self.isolation {
            Isolation::Namespaces(iso) => Ok(iso.allocate_uid_besides(&taken)?),
            _ => crate::sandbox::volume::pick_uid(self.cfg.uid_range, &taken)
                .ok_or(DriverError::Isolation(IsolationError::NoFreeUid)),
        }
    }

    /// Hands a volume uid back once its owner has no volume left on this node.
    pub fn release_volume_uid(&self, uid: u32) {
        if let Isolation::Namespaces(iso) = &self.isolation {
            iso.free_uid(uid);
        }
    }

    /// The host folders and the uid for a sandbox's `volumes`, checked: each volume exists
    /// among its owner's and lives on this node, and each `sub_path` is made and opened without
    /// following a link (init opens it again, race-free, before binding it).
    async fn resolve_volumes(
        &self,
        record: &SandboxRecord,
    ) -> Result<(Option<u32>, Vec<VolumeBind>), DriverError> {
        let mut uid = None;
        let mut binds = Vec::new();
        for m in &record.process.volumes {
            let v = self
                .store
                .volume(&record.owner, &m.volume)
                .await?
                .ok_or_else(|| {
                    DriverError::VolumeInvalid(format!(
                        "no volume `{}`: make it first with POST /v1/volumes",
                        m.volume
                    ))
                })?;
            if let Some(node) = v.node.as_deref().filter(|n| *n != self.node) {
                return Err(DriverError::VolumeConflict(format!(
                    "volume `{}` lives on node {node}, and this request reached node {}: create the sandbox through node {node}, \
                     or share volumes between nodes by mounting one shared file system at [orchestrator] volumes_dir on every node \
                     with volumes_shared = true (see deploy/README.md)",
                    v.name, self.node
                )));
            }
            if uid.is_some_and(|u| u != v.uid) {
                return Err(DriverError::VolumeConflict(format!(
                    "volume `{}` belongs to another uid than this sandbox's other volumes (made on another node?)",
                    v.name
                )));
            }
            uid = Some(v.uid);
            let sub_path = match &m.sub_path {
                Some(s) => crate::sandbox::volume::sub_path_components(s)
                    .map_err(DriverError::VolumeInvalid)?,
                None => Vec::new(),
            };
            let dir = self.volumes.dir_of(&v.owner, &v.name);
            let opened = {
                let (dir, sub_path, uid) = (dir.clone(), sub_path.clone(), v.uid);
                tokio::task::spawn_blocking(move || {
                    crate::sandbox::volume::open_confined(&dir, &sub_path, uid).map(drop)
                })
                .await
                .map_err(|_| DriverError::VolumeInvalid("resolving sub_path panicked".into()))?
            };
            match opened {
                Ok(()) => {}
                Err(e @ (ConfineError::Symlink(_) | ConfineError::NotDir(_))) => {
                    return Err(DriverError::VolumeInvalid(format!(
                        "volume `{}`: {e}",
                        v.name
                    )))
                }
                Err(e) => {
                    tracing::error!(volume = %v.name, owner = %v.owner, error = %e, "cannot open a volume's folder");
                    return Err(DriverError::VolumeConflict(format!(
                        "volume `{}` has no folder on this node ({e}); with several nodes, [orchestrator] volumes_dir must be one shared file system",
                        v.name
                    )));
                }
            }
            binds.push(VolumeBind {
                dir,
                sub_path,
                target: PathBuf::from(&m.path),
                read_only: m.read_only,
            });
        }
        Ok((uid, binds))
    }

    pub fn is_running(&self, id: &str) -> bool {
        self.running.contains_key(id)
    }

    /// On start: process sandboxes left `starting`/`running` by a previous run are ended. Their
    /// leftover processes (if any survived a crash) are killed, not adopted silently: an
    /// isolated sandbox's whole cgroup, a plain one's process group. Only this node's sandboxes
    /// are touched: a cgroup whose id this store does not know as this node's (another
    /// gateway's on the same host) is left alone.
    pub async fn reconcile(&self) -> Result<usize, StoreError> {
        let mut ended = 0;
        // Interrupted image imports and deletes leave their folders in `.incoming`.
        let images = Arc::clone(&self.images);
        match tokio::task::spawn_blocking(move || images.init()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "cannot prepare the images folder"),
            Err(_) => tracing::error!("preparing the images folder panicked"),
        }
        if let Isolation::Namespaces(iso) = &self.isolation {
            for v in self.store.volumes().await? {
                iso.reserve_uid(v.uid);
            }
        }
        let leftovers: BTreeSet<String> = match &self.isolation {
            Isolation::Namespaces(iso) => iso.leftovers().into_iter().collect(),
            _ => BTreeSet::new(),
        };
        for mut record in self.store.sandboxes().await? {
            if record.command.is_none() {
                continue;
            }
            // Another node's sandbox (cluster mode): not ours to end.
            if record.node.as_deref().is_some_and(|n| n != self.node) {
                continue;
            }
            if leftovers.contains(&record.id) {
                if let Isolation::Namespaces(iso) = &self.isolation {
                    let iso = Arc::clone(iso);
                    let id = record.id.clone();
                    let _ = tokio::task::spawn_blocking(move || iso.end_leftover(&id)).await;
                    tracing::warn!(sandbox = %record.id, "ended a leftover sandbox cgroup from a previous run");
                }
            }
            if !record.status.is_live() {
                continue;
            }
            if let Some(pgid) = record.process.pgid {
                let plain = record.process.isolation.as_deref() != Some("namespaces");
                if plain && group_belongs_to(pgid, &record.id) {
                    let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
                    tracing::warn!(sandbox = %record.id, pgid, "killed a leftover sandbox process group from a previous run");
                }
            }
            record.status = SandboxStatus::Stopped;
            record.ended_at = Some(unix_now());
            record.detail =
                Some("sandgate restarted while the sandbox ran; its processes were ended".into());
            self.store.update_sandbox(&record).await?;
            self.routes.upsert(&record);
            ended += 1;
        }
        Ok(ended)
    }

    /// What `isolation` means on this node, for sandbox objects.
    pub fn isolation(&self) -> &Isolation {
        &self.isolation
    }

    /// Starts the command and its supervisor, and stores the record as `starting` (or
    /// `failed`, when the sandbox could not be built). Returns the stored record.
    pub async fn start(
        self: &Arc<Self>,
        mut record: SandboxRecord,
    ) -> Result<SandboxRecord, DriverError> {
        record.node = Some(self.node.clone());
        record.process.isolation = Some(self.isolation.name().to_string());
        match &self.isolation {
            Isolation::Unavailable(why) => Err(DriverError::IsolationUnavailable(why.clone())),
            Isolation::None if !record.process.volumes.is_empty() => Err(DriverError::VolumeInvalid(
                "volumes are mounted by isolated sandboxes only, and this node runs command sandboxes without isolation ([orchestrator] isolation = \"none\")".into(),
            )),
            Isolation::None if record.process.image.is_some() => Err(DriverError::VolumeInvalid(
                "images are for isolated sandboxes only, and this node runs command sandboxes without isolation ([orchestrator] isolation = \"none\")".into(),
            )),
            Isolation::None => self.start_plain(record).await,
            Isolation::Namespaces(iso) => {
                let iso = Arc::clone(iso);
                self.start_isolated(&iso, record).await
            }
        }
    }

    /// An isolated sandbox: its published ports are its own, inside its network namespace.
    async fn start_isolated(
        self: &Arc<Self>,
        iso: &Arc<Isolator>,
        mut record: SandboxRecord,
    ) -> Result<SandboxRecord, DriverError> {
        let command = record.command.clone().unwrap_or_default();
        let limits = Limits {
            memory_bytes: record
                .process
                .memory_mb
                .map(|mb| mb.saturating_mul(1024 * 1024)),
            cpu_millis: record.process.cpu_millis,
            max_tasks: record.process.max_processes,
        };
        let egress = !record.process.egress.is_empty();
        // Held until the record (naming its volumes) is stored: a volume is not deleted under
        // a sandbox that is mounting it.
        let _volumes_held = if record.process.volumes.is_empty() {
            None
        } else {
            Some(self.volumes.lock.read().await)
        };
        let (volume_uid, volumes) = self.resolve_volumes(&record).await?;
        // Held until the record (naming its image) is stored: an image is not deleted under a
        // sandbox that is starting from it.
        let _image_held = match &record.process.image {
            Some(_) => Some(self.images.lock.read().await),
            None => None,
        };
        let (image, seed) = self.image_root(&record)?;
        let jail = {
            let iso = Arc::clone(iso);
            let id = record.id.clone();
            tokio::task::spawn_blocking(move || iso.prepare(&id, &limits, egress, volume_uid))
                .await
                .map_err(|_| {
                    DriverError::Isolation(IsolationError::Launch("preparation panicked".into()))
                })??
        };
        let jail = Arc::new(jail);
        record.process.uid = Some(jail.uid);
        if let Some(seed) = seed {
            // A snapshot's files, copied in before anything of the sandbox runs.
            let (dir, uid, root) = (jail.dir().to_path_buf(), jail.uid, image.is_some());
            let workspace = !record
                .process
                .volumes
                .iter()
                .any(|v| v.path == "/workspace");
            let planted =
                tokio::task::spawn_blocking(move || seed.plant(&dir, uid, root, workspace)).await;
            let failed = match planted {
                Ok(Ok(_)) => None,
                Ok(Err(e)) => Some(std::io::Error::new(
                    if e.is_no_space() {
                        std::io::ErrorKind::StorageFull
                    } else {
                        std::io::ErrorKind::Other
                    },
                    format!("cannot copy the snapshot's files into the sandbox: {e}"),
                )),
                Err(_) => Some(std::io::Error::other(
                    "copying the snapshot's files panicked",
                )),
            };
            if let Some(e) = failed {
                tracing::error!(sandbox = %record.id, error = %e, "cannot start from a snapshot");
                jail.release().await;
                return Err(DriverError::Dir(e));
            }
        }
        let ports: BTreeMap<u16, u16> = record.ports.iter().map(|&p| (p, p)).collect();
        let env = isolated_env(&record, &command_env(&record), &self.cfg.pass_env);
        if egress {
            let hosts: BTreeMap<String, String> = self
                .cfg
                .egress_hosts
                .iter()
                .map(|(name, addr)| (name.clone(), addr.to_string()))
                .collect();
            let served = crate::sandbox::egress::EgressPolicy::new(&record.process.egress, &hosts)
                .map_err(|e| e.to_string())
                .and_then(|policy| {
                    jail.serve_egress(policy, Arc::clone(&self.metrics))
                        .map_err(|e| e.to_string())
                });
            if let Err(e) = served {
                jail.release().await;
                return Err(DriverError::Isolation(IsolationError::Launch(format!(
                    "cannot start the egress proxy: {e}"
                ))));
            }
        }
        self.logs_dir().map_err(DriverError::Dir)?;
        let log = LogSink::open(&self.log_path(&record.id), self.cfg.log_max_bytes).await;
        self.routes
            .attach_netns(&record.id, Arc::clone(&jail.netns));
        let mut child = match jail
            .spawn(&command, env, self.rlimits(&record), volumes, image)
            .await
        {
            Ok(child) => child,
            Err(e) => {
                // Could not be built: a failed sandbox with the reason, and nothing left over.
                tracing::warn!(sandbox = %record.id, error = %e, "sandbox could not be built");
                jail.release().await;
                self.routes.detach_netns(&record.id);
                record.status = SandboxStatus::Failed;
                record.ended_at = Some(unix_now());
                record.detail = Some(format!("the sandbox could not be built: {e}"));
                self.store.insert_sandbox(&record).await?;
                self.routes.upsert(&record);
                return Ok(record);
            }
        };
        record.process.pgid = child.id().and_then(|p| i32::try_from(p).ok());
        record.status = SandboxStatus::Starting;
        record.detail = Some(self.waiting_detail(&record, &ports));
        if let Err(e) = self.store.insert_sandbox(&record).await {
            jail.release().await;
            self.routes.detach_netns(&record.id);
            let _ = child.wait().await;
            return Err(e.into());
        }
        self.routes.upsert(&record);
        tracing::info!(sandbox = %record.id, uid = jail.uid, awaiting = %awaited_ports(&record, &ports), "isolated sandbox starting");
        let pumps = pump_output(&mut child, &log);
        self.run_supervisor(&record, child, Some(jail), Vec::new(), ports, pumps);
        Ok(record)
    }

    /// The root a sandbox starts from: its image's tree and its working folder (`None`: the
    /// `host` image), and for a snapshot, the files to copy in first.
    #[allow(clippy::type_complexity)]
    fn image_root(
        &self,
        record: &SandboxRecord,
    ) -> Result<
        (
            Option<(PathBuf, PathBuf)>,
            Option<crate::sandbox::snapshot::Seed>,
        ),
        DriverError,
    > {
        use crate::sandbox::image::HOST;
        let Some(name) = record.process.image.as_deref() else {
            return Ok((None, None));
        };
        let missing = |name: &str| {
            DriverError::VolumeInvalid(format!(
                "no image `{name}`: import it first with POST /v1/images?name={name}"
            ))
        };
        let meta = self.images.get(name).ok_or_else(|| missing(name))?;
        let Some(base) = meta.base.as_deref() else {
            return Ok((Some((self.images.rootfs(name), working_dir(record))), None));
        };
        let seed = crate::sandbox::snapshot::Seed {
            layer: self.images.layer(name),
            workspace: self.images.workspace(name),
            uid: meta.uid.unwrap_or(u32::MAX),
        };
        if base == HOST {
            return Ok((None, Some(seed)));
        }
        if self.images.get(base).is_none() {
            return Err(missing(base));
        }
        Ok((
            Some((self.images.rootfs(base), working_dir(record))),
            Some(seed),
        ))
    }

    /// A plain host process group (`isolation = "none"`): published ports map to host ports.
    async fn start_plain(
        self: &Arc<Self>,
        mut record: SandboxRecord,
    ) -> Result<SandboxRecord, DriverError> {
        let command = record.command.clone().unwrap_or_default();
        let host_ports = self.allocate(record.ports.len())?;
        record.host_ports = record
            .ports
            .iter()
            .copied()
            .zip(host_ports.iter().copied())
            .collect();
        let dir = self.sandbox_dir(&record.id);
        let prepared = self.prepare(&record.id);
        if let Err(e) = prepared {
            self.release(&host_ports);
            return Err(DriverError::Dir(e));
        }
        let mut cmd = self.command(&record, &command, &dir, &command_env(&record));
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                self.release(&host_ports);
                return Err(DriverError::Spawn(e));
            }
        };
        let pgid = child.id().and_then(|p| i32::try_from(p).ok());
        record.process.pgid = pgid;
        record.status = SandboxStatus::Starting;
        let ports = record.host_ports.clone();
        record.detail = Some(self.waiting_detail(&record, &ports));
        tracing::info!(sandbox = %record.id, awaiting = %awaited_ports(&record, &ports), "sandbox starting");
        if let Err(e) = self.store.insert_sandbox(&record).await {
            if let Some(pgid) = pgid {
                let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
            }
            let _ = child.wait().await;
            self.release(&host_ports);
            return Err(e.into());
        }
        self.routes.upsert(&record);
        let log = LogSink::open(&self.log_path(&record.id), self.cfg.log_max_bytes).await;
        let pumps = pump_output(&mut child, &log);
        self.run_supervisor(&record, child, None, host_ports, ports, pumps);
        Ok(record)
    }

    /// What a `starting` sandbox's `detail` says it waits for.
    fn waiting_detail(&self, record: &SandboxRecord, ports: &BTreeMap<u16, u16>) -> String {
        format!(
            "waiting for {} to accept connections (up to {} s, [orchestrator] start_timeout_secs)",
            awaited_ports(record, ports),
            self.cfg.start_timeout.as_secs()
        )
    }

    /// Registers the running sandbox and spawns its supervisor.
    fn run_supervisor(
        self: &Arc<Self>,
        record: &SandboxRecord,
        child: Child,
        jail: Option<Arc<Jail>>,
        host_ports: Vec<u16>,
        ports: BTreeMap<u16, u16>,
        pumps: [Option<tokio::task::JoinHandle<()>>; 2],
    ) {
        let stop = CancellationToken::new();
        let idle = CancellationToken::new();
        let (done_tx, done_rx) = watch::channel(false);
        self.running.insert(
            record.id.clone(),
            Running {
                stop: stop.clone(),
                idle: idle.clone(),
                jail: jail.clone(),
                done: done_rx,
            },
        );
        let this = Arc::clone(self);
        let id = record.id.clone();
        let deadline = record.expires_at;
        let awaited = awaited_ports(record, &ports);
        let pgid = record.process.pgid;
        let memory_mb = record.process.memory_mb;
        let idle_timeout = record.process.idle_timeout_secs.unwrap_or(0);
        let probe_ports: Vec<u16> = ports.values().copied().collect();
        tokio::spawn(async move {
            this.supervise(Supervised {
                id,
                child,
                pgid,
                jail,
                stop,
                idle,
                idle_timeout,
                deadline,
                host_ports,
                probe_ports,
                awaited,
                memory_mb,
                pumps,
            })
            .await;
            let _ = done_tx.send(true);
        });
    }

    /// The per-process limits that stay `setrlimit`s.
    fn rlimits(&self, record: &SandboxRecord) -> Rlimits {
        Rlimits {
            cpu_secs: record.process.cpu_secs,
            open_files: record.process.max_open_files,
        }
    }

    /// Memory, CPU and task figures of a running isolated sandbox.
    pub fn stats(&self, id: &str) -> Option<crate::sandbox::cgroup::Stats> {
        self.running.get(id)?.jail.as_ref()?.stats()
    }

    /// Terminates a running sandbox (SIGTERM to its group, SIGKILL after the grace period) and
    /// waits until it is gone. Returns false if it was not running here.
    pub async fn terminate(&self, id: &str) -> bool {
        let Some((stop, mut done)) = self
            .running
            .get(id)
            .map(|r| (r.stop.clone(), r.done.clone()))
        else {
            return false;
        };
        stop.cancel();
        let wait = self.cfg.grace + Duration::from_secs(5);
        let _ = tokio::time::timeout(wait, done.wait_for(|d| *d)).await;
        true
    }

    /// Ends sandbox `id` for idleness unless something keeps it busy: an open client or relay
    /// connection, or an exec. Does not wait for it to end. Returns true when this call
    /// started its end (false: not running here, busy, or already ending), so the caller
    /// reports each end once.
    pub fn end_idle(&self, id: &str) -> bool {
        let Some(running) = self.running.get(id) else {
            return false;
        };
        if running.stop.is_cancelled() || running.idle.is_cancelled() || self.busy(id) {
            return false;
        }
        running.idle.cancel();
        true
    }

    /// True while sandbox `id` has an open client or relay connection, or a running exec:
    /// activity that lasts, rather than happens at one moment.
    pub fn busy(&self, id: &str) -> bool {
        self.tracker.open_in(id) > 0
            || self.execs.contains_key(id)
            || self.file_ops.contains_key(id)
    }

    /// Marks a file operation on sandbox `id` as in progress until the guard is dropped (for a
    /// download: when its body is done), which counts as activity for its idle timeout.
    pub fn file_op(self: &Arc<Self>, id: &str) -> FileOpGuard {
        self.touch(id);
        *self.file_ops.entry(id.to_string()).or_insert(0) += 1;
        FileOpGuard {
            driver: Arc::clone(self),
            id: id.to_string(),
        }
    }

    /// The places in sandbox `record` that file writes and deletes may touch: `/workspace`,
    /// `/tmp` and its writable volumes.
    pub fn writable_places(record: &SandboxRecord) -> Vec<PathBuf> {
        crate::sandbox::files::WRITABLE
            .iter()
            .map(PathBuf::from)
            .chain(
                record
                    .process
                    .volumes
                    .iter()
                    .filter(|v| !v.read_only)
                    .map(|v| PathBuf::from(&v.path)),
            )
            .collect()
    }

    /// Notes activity in sandbox `id` for its idle timeout: for operations that are not
    /// proxied requests (execs, file operations).
    pub fn touch(&self, id: &str) {
        self.routes.touch(id);
    }

    /// Kills every running isolated sandbox at once, without waiting or updating the store:
    /// for an embedding process that goes away without a shutdown (a test that failed).
    pub fn kill_all_now(&self) {
        for entry in self.running.iter() {
            if let Some(jail) = &entry.jail {
                jail.kill_now();
            }
        }
    }

    /// Ends every running sandbox (gateway shutdown).
    pub async fn shutdown(&self) {
        let ids: Vec<String> = self.running.iter().map(|r| r.key().clone()).collect();
        for id in ids {
            self.terminate(&id).await;
        }
    }

    async fn supervise(self: Arc<Self>, job: Supervised) {
        let Supervised {
            id,
            mut child,
            pgid,
            jail,
            stop,
            idle,
            idle_timeout,
            deadline,
            host_ports,
            probe_ports,
            awaited,
            memory_mb,
            pumps,
        } = job;
        let mut ready = false;
        // A command that never listens (the wrong port, a typo) must not wait forever.
        let start_deadline = tokio::time::sleep(self.cfg.start_timeout);
        tokio::pin!(start_deadline);
        // Loopback connects are cheap: probe often so a fast server is running within ~20 ms.
        let mut probe = tokio::time::interval(Duration::from_millis(10));
        let until_deadline =
            deadline.map(|d| Duration::from_secs(u64::try_from(d - unix_now()).unwrap_or(0)));
        let timeout = async {
            match until_deadline {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(timeout);
        let jail = jail.as_deref();
        let outcome = loop {
            tokio::select! {
                status = child.wait() => {
                    break match status {
                        Ok(s) => Outcome::Exited(s),
                        Err(e) => Outcome::Lost(e.to_string()),
                    };
                }
                _ = stop.cancelled() => {
                    self.end(jail, pgid, &mut child).await;
                    break Outcome::Terminated;
                }
                _ = idle.cancelled() => {
                    self.end(jail, pgid, &mut child).await;
                    break Outcome::Idle(idle_timeout);
                }
                _ = &mut timeout => {
                    self.end(jail, pgid, &mut child).await;
                    break Outcome::TimedOut;
                }
                _ = &mut start_deadline, if !ready => {
                    self.end(jail, pgid, &mut child).await;
                    break Outcome::NeverListened;
                }
                _ = probe.tick(), if !ready => {
                    let accepted = match jail {
                        Some(jail) => jail.all_accept(&probe_ports).await,
                        None => all_accept(&probe_ports).await,
                    };
                    if accepted {
                        ready = true;
                        self.set_status(&id, SandboxStatus::Running, None).await;
                    }
                }
            }
        };
        // Whatever ended, nothing of it may outlive it: the whole cgroup, or the group.
        let oom_kills = jail.map(Jail::oom_kills).unwrap_or(0);
        match jail {
            Some(jail) => jail.release().await,
            None => {
                if let Some(pgid) = pgid {
                    let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
                }
            }
        }
        self.routes.detach_netns(&id);
        for pump in pumps.into_iter().flatten() {
            let _ = tokio::time::timeout(Duration::from_secs(2), pump).await;
        }
        let (status, detail) = match outcome {
            // The kernel's OOM killer ended the main process: say so, and which limit.
            Outcome::Exited(s) if oom_kills > 0 && killed_by_sigkill(&s) => (
                SandboxStatus::Failed,
                format!(
                    "killed by the kernel's OOM killer: the sandbox reached its memory limit of {} MiB (memory_mb); output:\n{}",
                    memory_mb.map_or_else(|| "?".to_string(), |m| m.to_string()),
                    log_tail(&self.log_path(&id), 2048)
                ),
            ),
            Outcome::Exited(s) if !ready => (
                SandboxStatus::Failed,
                format!(
                    "exited ({}) before its ports accepted connections; output:\n{}",
                    describe(&s),
                    log_tail(&self.log_path(&id), 2048)
                ),
            ),
            Outcome::Exited(s) => (SandboxStatus::Stopped, format!("exited ({})", describe(&s))),
            Outcome::NeverListened => {
                let secs = self.cfg.start_timeout.as_secs();
                tracing::warn!(sandbox = %id, awaiting = %awaited, timeout_secs = secs, "sandbox never accepted connections on its ports; ended");
                (
                    SandboxStatus::Failed,
                    format!(
                        "no connection accepted on {awaited} within {secs} s ([orchestrator] start_timeout_secs): \
                         the command must listen on the port in $PORT (or $PORT_<n> for each \
                         published port n), e.g. sh -c 'exec python3 -m http.server $PORT'; output:\n{}",
                        log_tail(&self.log_path(&id), 2048)
                    ),
                )
            }
            Outcome::Terminated => (SandboxStatus::Stopped, "terminated".to_string()),
            Outcome::TimedOut => (SandboxStatus::Stopped, "reached its timeout".to_string()),
            Outcome::Idle(secs) => (
                SandboxStatus::Stopped,
                format!(
                    "idle timeout: no requests, connections or execs for {secs} s (idle_timeout_secs)"
                ),
            ),
            Outcome::Lost(e) => (
                SandboxStatus::Failed,
                format!("lost track of the process: {e}"),
            ),
        };
        tracing::info!(sandbox = %id, status = %status, detail = %detail.lines().next().unwrap_or(""), "sandbox ended");
        self.set_status(&id, status, Some(detail)).await;
        self.tracker.close_sandbox(&id);
        self.release(&host_ports);
        self.running.remove(&id);
        // `exec` commands still running die with the sandbox (their calls then return).
        if let Some((_, groups)) = self.execs.remove(&id) {
            for g in groups {
                let _ = killpg(Pid::from_raw(g), Signal::SIGKILL);
            }
        }
    }

    /// Ends a sandbox's processes: SIGTERM, then SIGKILL after the grace period — to every
    /// task of an isolated sandbox's cgroup, or to a plain one's process group.
    async fn end(&self, jail: Option<&Jail>, pgid: Option<i32>, child: &mut Child) {
        match jail {
            Some(jail) => {
                // The launcher and init outlive SIGTERM; the launcher ends when the command
                // (and so init) has.
                jail.signal_all(Signal::SIGTERM);
                let _ = tokio::time::timeout(self.cfg.grace, child.wait()).await;
                jail.release().await;
                let _ = child.wait().await;
            }
            None => self.end_group(pgid, child).await,
        }
    }

    /// SIGTERM to the group, then SIGKILL after the grace period.
    async fn end_group(&self, pgid: Option<i32>, child: &mut Child) {
        let Some(pgid) = pgid else {
            let _ = child.kill().await;
            return;
        };
        let _ = killpg(Pid::from_raw(pgid), Signal::SIGTERM);
        if tokio::time::timeout(self.cfg.grace, child.wait())
            .await
            .is_err()
        {
            let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
            let _ = child.wait().await;
        }
    }

    async fn set_status(&self, id: &str, status: SandboxStatus, detail: Option<String>) {
        let record = match self.store.sandbox(id).await {
            Ok(Some(r)) => r,
            Ok(None) => return,
            Err(err) => {
                tracing::error!(sandbox = %id, error = %err, "cannot read sandbox to update its status");
                return;
            }
        };
        let mut record = record;
        // A terminal status is final: a late "running" must not revive a stopped sandbox.
        if !record.status.is_live() {
            return;
        }
        record.status = status;
        if status == SandboxStatus::Running {
            // The "waiting for ports" note of `starting` no longer applies.
            record.detail = None;
        }
        if !status.is_live() {
            record.ended_at = Some(unix_now());
        }
        if detail.is_some() {
            record.detail = detail;
        }
        if let Err(err) = self.store.update_sandbox(&record).await {
            tracing::error!(sandbox = %id, error = %err, "cannot store sandbox status");
        }
        self.routes.upsert(&record);
    }

    /// Starts an exec command in the sandbox's directory and environment, under its limits,
    /// in a process group of its own, with standard input, output and error piped (an
    /// isolated sandbox's launcher has already been sent its spec line: what is written to
    /// `stdin` from now on is the command's). Counts as activity.
    async fn spawn_exec(
        &self,
        record: &SandboxRecord,
        req: &ExecRequest,
    ) -> Result<Child, DriverError> {
        // Activity from now on: the running exec then keeps it busy, and ends with a touch.
        self.touch(&record.id);
        // The exec's own `env` wins over the sandbox's, its secrets included, as over `env`:
        // the caller who may exec could read the secret from inside anyway, so letting it
        // replace one for a command hides nothing.
        let mut env = command_env(record);
        env.extend(req.env.clone());
        let jail = self.running.get(&record.id).and_then(|r| r.jail.clone());
        match (&self.isolation, jail) {
            (Isolation::Namespaces(_), Some(jail)) => {
                // Inside the sandbox: its namespaces, cgroup, user, /workspace, environment.
                let env = isolated_env(record, &env, &self.cfg.pass_env);
                let (mut cmd, spec) = jail.exec_command(
                    &req.command,
                    env,
                    self.rlimits(record),
                    working_dir(record),
                )?;
                cmd.stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .process_group(0)
                    .kill_on_drop(false);
                let mut child = cmd.spawn().map_err(DriverError::Spawn)?;
                if let Some(stdin) = child.stdin.as_mut() {
                    if let Err(e) = stdin.write_all(&spec).await {
                        // The launcher died at once: the wait that follows reports how.
                        tracing::debug!(sandbox = %record.id, error = %e, "cannot send the exec spec");
                    }
                }
                Ok(child)
            }
            (Isolation::Namespaces(_), None) => Err(DriverError::NotRunning),
            _ => {
                let dir = self.sandbox_dir(&record.id);
                self.prepare(&record.id).map_err(DriverError::Dir)?;
                let mut cmd = self.command(record, &req.command, &dir, &env);
                cmd.stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped());
                cmd.spawn().map_err(DriverError::Spawn)
            }
        }
    }

    /// Runs a command in the sandbox's directory and environment, under its limits.
    pub async fn exec(
        &self,
        record: &SandboxRecord,
        req: ExecRequest,
    ) -> Result<ExecOutput, DriverError> {
        let started = std::time::Instant::now();
        let mut child = self.spawn_exec(record, &req).await?;
        // A one-shot exec has no stdin: end of input after the spec line.
        drop(child.stdin.take());
        let pgid = child.id().and_then(|p| i32::try_from(p).ok());
        // Kills the group however this call ends, including when the caller goes away and
        // this future is dropped mid-wait.
        let _group = pgid.map(|pgid| ExecGroup::register(self, &record.id, pgid));
        // Declared after the group, so dropped before it: the exec's end is activity before
        // the exec stops counting as running, leaving the idle check no gap between the two.
        let _touch = TouchOnDrop(self, &record.id);
        let cap = self.cfg.exec_output_max_bytes;
        let stop_capture = CancellationToken::new();
        let out = child
            .stdout
            .take()
            .map(|s| tokio::spawn(capture(s, cap, stop_capture.clone())));
        let err = child
            .stderr
            .take()
            .map(|s| tokio::spawn(capture(s, cap, stop_capture.clone())));
        let (status, timed_out) = match tokio::time::timeout(req.timeout, child.wait()).await {
            Ok(status) => (status.ok(), false),
            Err(_) => {
                if let Some(pgid) = pgid {
                    let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
                }
                (child.wait().await.ok(), true)
            }
        };
        // Background children holding the pipes open would keep us reading forever.
        if let Some(pgid) = pgid {
            let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
        }
        // A process that left the group (setsid) may hold the pipes open for ever: wait a
        // little for the end of output, then keep what came.
        let stopper = {
            let stop = stop_capture.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(2)).await;
                stop.cancel();
            })
        };
        let collect = |h: Option<tokio::task::JoinHandle<(Vec<u8>, bool)>>| async move {
            match h {
                Some(h) => h.await.unwrap_or_default(),
                None => (Vec::new(), false),
            }
        };
        let (stdout, stdout_truncated) = collect(out).await;
        let (stderr, stderr_truncated) = collect(err).await;
        stopper.abort();
        use std::os::unix::process::ExitStatusExt;
        Ok(ExecOutput {
            exit_code: status.and_then(|s| s.code()),
            signal: status.and_then(|s| s.signal()),
            stdout: String::from_utf8_lossy(&stdout).into_owned(),
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
            stdout_truncated,
            stderr_truncated,
            timed_out,
            duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        })
    }

    /// Runs a command like [`Driver::exec`], streaming: what arrives on `stdin` is written to
    /// the command's standard input (an empty chunk closes it), and its output goes to
    /// `output` as it is read, in chunks of at most [`STREAM_CHUNK`] bytes. Each chunk's send
    /// is awaited before more is read, so a receiver that stops receiving stops the command
    /// once its pipe is full, and what is held in between stays bounded. When the receiver
    /// goes away, or the returned future is dropped, the command's process group is killed.
    /// The future ends once the command has exited and its output is delivered.
    pub async fn exec_stream(
        &self,
        record: &SandboxRecord,
        req: ExecRequest,
        mut stdin: tokio::sync::mpsc::Receiver<bytes::Bytes>,
        output: tokio::sync::mpsc::Sender<OutputChunk>,
    ) -> Result<ExecExit, DriverError> {
        let mut child = self.spawn_exec(record, &req).await?;
        let pgid = child.id().and_then(|p| i32::try_from(p).ok());
        // As for a one-shot exec: killed however this ends, counted as running until then.
        let _group = pgid.map(|pgid| ExecGroup::register(self, &record.id, pgid));
        let _touch = TouchOnDrop(self, &record.id);
        let kill = move || {
            if let Some(pgid) = pgid {
                let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
            }
        };
        let pipe = child.stdin.take();
        let feed = async move {
            let mut pipe = pipe;
            while let Some(chunk) = stdin.recv().await {
                if chunk.is_empty() {
                    pipe = None;
                    continue;
                }
                if let Some(p) = pipe.as_mut() {
                    // The command closed its input: what follows is dropped, still received
                    // (so the sender never waits on a pipe nobody reads).
                    if p.write_all(&chunk).await.is_err() {
                        pipe = None;
                    }
                }
            }
            drop(pipe);
            std::future::pending::<std::convert::Infallible>().await
        };
        let exited = CancellationToken::new();
        let (out_pipe, err_pipe) = (child.stdout.take(), child.stderr.take());
        let waiter = async {
            let status = match tokio::time::timeout(req.timeout, child.wait()).await {
                Ok(status) => (status.ok(), false),
                Err(_) => {
                    kill();
                    (child.wait().await.ok(), true)
                }
            };
            // Background children holding the pipes open would keep the stream open.
            kill();
            exited.cancel();
            status
        };
        // A receiver gone: nobody will read what the command prints, so it ends now.
        let pump = |pipe, which| {
            let (output, exited) = (&output, &exited);
            async move {
                if !stream_out(pipe, which, output, exited).await {
                    kill();
                }
            }
        };
        let run = async {
            tokio::join!(
                waiter,
                pump(out_pipe.map(Pipe::Out), OutputStream::Stdout),
                pump(err_pipe.map(Pipe::Err), OutputStream::Stderr)
            )
        };
        let ((status, timed_out), (), ()) = tokio::select! {
            done = run => done,
            never = feed => match never {},
        };
        use std::os::unix::process::ExitStatusExt;
        Ok(ExecExit {
            exit_code: status.and_then(|s| s.code()),
            signal: status.and_then(|s| s.signal()),
            timed_out,
        })
    }

    /// The launcher command for one file operation inside an isolated sandbox, as its user
    /// sees its files ([`crate::sandbox::files`]), and the spec line to send it first.
    pub fn files_command(
        &self,
        record: &SandboxRecord,
        op: crate::sandbox::spec::FileOp,
    ) -> Result<(Command, Vec<u8>), DriverError> {
        let jail = self.running.get(&record.id).and_then(|r| r.jail.clone());
        match (&self.isolation, jail) {
            (Isolation::Namespaces(_), Some(jail)) => {
                Ok(jail.files_command(op, Driver::writable_places(record))?)
            }
            (Isolation::Namespaces(_), None) => Err(DriverError::NotRunning),
            _ => Err(DriverError::NotIsolated),
        }
    }

    /// Takes a snapshot of running sandbox `record` as image `name`, owned by credential
    /// `owner`: its overlay layer and `/workspace` copied while it is paused (see
    /// [`crate::sandbox::snapshot`]), at most `max_bytes` of files. The sandbox runs on.
    pub async fn snapshot(
        self: &Arc<Self>,
        record: &SandboxRecord,
        name: &str,
        owner: &str,
        max_bytes: u64,
    ) -> Result<crate::sandbox::image::ImageMeta, crate::sandbox::snapshot::SnapshotError> {
        use crate::sandbox::image::{ImageError, ImageMeta, HOST};
        use crate::sandbox::snapshot::{
            copy_tree, Budget, CopySpec, Owners, SnapshotError, Tally, NOT_IN_LAYER,
        };
        let jail = match (
            &self.isolation,
            self.running.get(&record.id).and_then(|r| r.jail.clone()),
        ) {
            (Isolation::Namespaces(_), Some(jail)) => jail,
            (Isolation::Namespaces(_), None) => return Err(SnapshotError::NotRunning),
            _ => return Err(SnapshotError::NotIsolated),
        };
        let _busy = self.file_op(&record.id);
        // The image under the sandbox's layer: a snapshot's own base when it started from one
        // (its files are all in the sandbox's layer now).
        let running_image = match record.process.image.as_deref() {
            None | Some(HOST) => None,
            Some(image) => Some(self.images.get(image).ok_or_else(|| {
                ImageError::Invalid(format!("the sandbox's image {image} is gone"))
            })?),
        };
        let base = running_image.as_ref().map_or_else(
            || HOST.to_string(),
            |m| m.base.clone().unwrap_or_else(|| m.name.clone()),
        );
        let own_workspace = !record
            .process
            .volumes
            .iter()
            .any(|v| v.path == "/workspace");
        let budget = Budget {
            max_bytes,
            max_entries: crate::sandbox::image::MAX_ENTRIES,
        };
        let started = std::time::Instant::now();
        let (images, copying) = (Arc::clone(&self.images), Arc::clone(&jail));
        let has_root = base != HOST;
        let copied = tokio::task::spawn_blocking(move || {
            let staging = images.staging().map_err(ImageError::Io)?;
            let made = (|| -> Result<Tally, SnapshotError> {
                let owners = Owners {
                    from: copying.uid,
                    to: copying.uid,
                };
                let mut tally = Tally::default();
                let paused = copying.pause();
                if !paused.paused {
                    tracing::warn!(sandbox = %copying.id, "the sandbox could not be paused; its snapshot is taken while it runs");
                }
                let layer = copying.dir().join("upper").join("data");
                if has_root && layer.is_dir() {
                    let spec = CopySpec {
                        owners,
                        skip: NOT_IN_LAYER,
                        overlay: true,
                        budget,
                    };
                    copy_tree(&layer, &staging.join("layer"), &spec, &mut tally)?;
                }
                if own_workspace {
                    let spec = CopySpec {
                        owners,
                        skip: &[],
                        overlay: false,
                        budget,
                    };
                    let workspace = copying.dir().join("workspace");
                    copy_tree(&workspace, &staging.join("workspace"), &spec, &mut tally)?;
                }
                Ok(tally)
            })();
            match made {
                Ok(tally) => Ok((staging, tally)),
                Err(e) => {
                    images.discard(&staging);
                    Err(e)
                }
            }
        })
        .await
        .map_err(|_| ImageError::Io(std::io::Error::other("the snapshot copy panicked")))??;
        let (staging, tally) = copied;
        let from = running_image.unwrap_or_default();
        let meta = ImageMeta {
            name: name.to_string(),
            created_at: unix_now(),
            size_bytes: tally.bytes,
            source: "snapshot".into(),
            env: from.env,
            working_dir: from.working_dir,
            cmd: from.cmd,
            entrypoint: from.entrypoint,
            skipped_devices: tally.skipped,
            base: Some(base),
            owner: Some(owner.to_string()),
            uid: Some(jail.uid),
        };
        let committed = {
            let _held = self.images.lock.write().await;
            let images = Arc::clone(&self.images);
            let (meta, staging) = (meta.clone(), staging.clone());
            tokio::task::spawn_blocking(move || images.commit(&staging, &meta))
                .await
                .map_err(|_| ImageError::Io(std::io::Error::other("the snapshot commit panicked")))
        };
        if let Err(e) = committed.and_then(|r| r) {
            self.images.discard(&staging);
            return Err(e.into());
        }
        tracing::info!(sandbox = %record.id, snapshot = %name, bytes = tally.bytes, entries = tally.entries, ms = started.elapsed().as_millis() as u64, "snapshot taken");
        Ok(meta)
    }

    /// `prlimit <limits> -- <command>` in its own process group, with the sandbox's
    /// environment and nothing else: see [`sandbox_env`].
    fn command(
        &self,
        record: &SandboxRecord,
        command: &[String],
        dir: &Path,
        env: &BTreeMap<String, String>,
    ) -> Command {
        let mut cmd = Command::new(PRLIMIT);
        let limits = &record.process;
        if let Some(mb) = limits.memory_mb {
            cmd.arg(format!("--as={}", mb.saturating_mul(1024 * 1024)));
        }
        if let Some(secs) = limits.cpu_secs {
            cmd.arg(format!("--cpu={secs}"));
        }
        if let Some(n) = limits.max_processes {
            cmd.arg(format!("--nproc={n}"));
        }
        if let Some(n) = limits.max_open_files {
            cmd.arg(format!("--nofile={n}"));
        }
        cmd.arg("--").args(command);
        cmd.current_dir(dir)
            .stdin(Stdio::null())
            .process_group(0)
            .kill_on_drop(false);
        if let Some(who) = &self.identity {
            cmd.uid(who.uid).gid(who.gid);
        }
        cmd.env_clear().envs(sandbox_env(
            record,
            dir,
            env,
            &self.cfg.pass_env,
            &record.host_ports,
        ));
        cmd
    }

    /// Picks `n` free host ports from the range, never handing one out twice.
    fn allocate(&self, n: usize) -> Result<Vec<u16>, DriverError> {
        let (lo, hi) = self.cfg.port_range;
        let span = u32::from(hi - lo) + 1;
        let mut taken = self.ports.lock().unwrap_or_else(PoisonError::into_inner);
        let mut chosen = Vec::with_capacity(n);
        let start = rand::rng().random_range(0..span);
        for i in 0..span {
            if chosen.len() == n {
                break;
            }
            let port = lo + u16::try_from((start + i) % span).unwrap_or(0);
            if taken.contains(&port) || chosen.contains(&port) {
                continue;
            }
            if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                chosen.push(port);
            }
        }
        if chosen.len() < n {
            return Err(DriverError::NoFreePort);
        }
        taken.extend(&chosen);
        Ok(chosen)
    }

    fn release(&self, ports: &[u16]) {
        let mut taken = self.ports.lock().unwrap_or_else(PoisonError::into_inner);
        for p in ports {
            taken.remove(p);
        }
    }
}

/// An `exec` command's process group, registered with its sandbox while it runs; killed when
/// dropped.
struct ExecGroup<'a> {
    driver: &'a Driver,
    id: String,
    pgid: i32,
}

impl<'a> ExecGroup<'a> {
    fn register(driver: &'a Driver, id: &str, pgid: i32) -> ExecGroup<'a> {
        driver.execs.entry(id.to_string()).or_default().insert(pgid);
        // The sandbox ended between the caller's status check and now: nothing will end this
        // group with it, so end it here.
        if !driver.is_running(id) {
            let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
        }
        ExecGroup {
            driver,
            id: id.to_string(),
            pgid,
        }
    }
}

impl Drop for ExecGroup<'_> {
    fn drop(&mut self) {
        let _ = killpg(Pid::from_raw(self.pgid), Signal::SIGKILL);
        if let Some(mut groups) = self.driver.execs.get_mut(&self.id) {
            groups.remove(&self.pgid);
        }
        self.driver
            .execs
            .remove_if(&self.id, |_, groups| groups.is_empty());
    }
}

/// A file operation in progress (see [`Driver::file_op`]).
pub struct FileOpGuard {
    driver: Arc<Driver>,
    id: String,
}

impl Drop for FileOpGuard {
    fn drop(&mut self) {
        if let Some(mut n) = self.driver.file_ops.get_mut(&self.id) {
            *n = n.saturating_sub(1);
        }
        self.driver.file_ops.remove_if(&self.id, |_, n| *n == 0);
        self.driver.touch(&self.id);
    }
}

/// Notes activity when an exec ends, however it ends (the caller may go away mid-wait).
struct TouchOnDrop<'a>(&'a Driver, &'a str);

impl Drop for TouchOnDrop<'_> {
    fn drop(&mut self) {
        self.0.touch(self.1);
    }
}

/// What a supervisor watches over.
struct Supervised {
    id: String,
    child: Child,
    pgid: Option<i32>,
    jail: Option<Arc<Jail>>,
    stop: CancellationToken,
    /// Cancelled by [`Driver::end_idle`].
    idle: CancellationToken,
    /// Its `idle_timeout_secs`, for the `detail`.
    idle_timeout: u64,
    deadline: Option<i64>,
    /// Host ports to give back at the end (`isolation = "none"`).
    host_ports: Vec<u16>,
    /// Where readiness is probed: host ports, or the published ports inside the namespace.
    probe_ports: Vec<u16>,
    /// The awaited ports, as the messages name them.
    awaited: String,
    memory_mb: Option<u64>,
    pumps: [Option<tokio::task::JoinHandle<()>>; 2],
}

/// True when the main process died of SIGKILL (directly, or as the launcher reports it:
/// exit code 128 + 9).
fn killed_by_sigkill(s: &std::process::ExitStatus) -> bool {
    use std::os::unix::process::ExitStatusExt;
    s.signal() == Some(9) || s.code() == Some(128 + 9)
}

enum Outcome {
    Exited(std::process::ExitStatus),
    /// Its ports did not all accept connections within `start_timeout_secs`.
    NeverListened,
    Terminated,
    TimedOut,
    /// Ended by [`Driver::end_idle`] after this many seconds without activity.
    Idle(u64),
    Lost(String),
}

fn describe(s: &std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (s.code(), s.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        _ => "unknown status".into(),
    }
}

/// The ports a starting sandbox waits for, as a person would check them: each published port
/// with the variable that carries the port the command must listen on.
fn awaited_ports(record: &SandboxRecord, ports: &BTreeMap<u16, u16>) -> String {
    let first = record.ports.first().copied();
    let each: Vec<String> = record
        .ports
        .iter()
        .map(|p| {
            let listen = ports.get(p).copied().unwrap_or(*p);
            if Some(*p) == first {
                format!("port {p} ($PORT={listen})")
            } else {
                format!("port {p} ($PORT_{p}={listen})")
            }
        })
        .collect();
    each.join(", ")
}

/// True when every port accepts a TCP connection on loopback.
async fn all_accept(ports: &[u16]) -> bool {
    for &p in ports {
        let connect = tokio::net::TcpStream::connect(("127.0.0.1", p));
        match tokio::time::timeout(Duration::from_millis(200), connect).await {
            Ok(Ok(_)) => {}
            _ => return false,
        }
    }
    true
}

/// True when process group `pgid` still has a member that belongs to the given sandbox
/// (checked through its environment), so a recycled pid is never killed by mistake. Any member
/// counts, not only the leader: after a crash the leader may be gone (a shell dies of SIGPIPE
/// on its next write once nobody reads its output) while its children live on in the group.
fn group_belongs_to(pgid: i32, id: &str) -> bool {
    let marker = format!("SANDGATE_SANDBOX_ID={id}");
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return false;
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| process_group(*pid) == Some(pgid))
        .any(|pid| {
            std::fs::read(format!("/proc/{pid}/environ")).is_ok_and(|environ| {
                environ
                    .split(|b| *b == 0)
                    .any(|entry| entry == marker.as_bytes())
            })
        })
}

/// The process group of `pid`, from `/proc/<pid>/stat` (the fields after the parenthesised
/// command name, which may hold spaces: state, ppid, pgrp).
fn process_group(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(2)?.parse().ok()
}

/// `prlimit`, by absolute path: the sandbox's own `PATH` is no business of the gateway's.
const PRLIMIT: &str = "/usr/bin/prlimit";

/// The `PATH` every sandbox starts with (the usual Debian one for a login shell).
pub const SANDBOX_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The whole environment of a sandbox's processes (its command and every exec). Nothing of
/// the gateway's own environment reaches a sandbox unless the operator names it in
/// `[orchestrator] pass_env`: an operator's `AWS_SECRET_ACCESS_KEY` or `PGPASSWORD`, the
/// gateway's `SANDGATE_*` keys and its build tools' variables all stay out. In order, later
/// entries winning: `PATH`, `HOME`, `LANG` and `TERM` defaults; the `pass_env` names; the
/// create body's `env` and `secret_env` (and exec's `env`); then what sandgate itself sets, which no caller may
/// override: `PORT`, `PORT_<n>` and `SANDGATE_SANDBOX_ID`.
pub fn sandbox_env(
    record: &SandboxRecord,
    home: &Path,
    env: &BTreeMap<String, String>,
    pass_env: &[String],
    ports: &BTreeMap<u16, u16>,
) -> BTreeMap<String, String> {
    let mut out: BTreeMap<String, String> = BTreeMap::new();
    out.insert("PATH".into(), SANDBOX_PATH.into());
    out.insert("HOME".into(), home.to_string_lossy().into_owned());
    out.insert("LANG".into(), "C.UTF-8".into());
    out.insert("TERM".into(), "dumb".into());
    for name in pass_env {
        // Non-Unicode values are not passed: every value must survive the launch spec.
        if let Ok(value) = std::env::var(name) {
            out.insert(name.clone(), value);
        }
    }
    for (k, v) in env {
        out.insert(k.clone(), v.clone());
    }
    // The first port as listed, not the lowest (`ports` is ordered by port number).
    if let Some(first) = record.ports.first().and_then(|p| ports.get(p)) {
        out.insert("PORT".into(), first.to_string());
    }
    for (published, listen) in ports {
        out.insert(format!("PORT_{published}"), listen.to_string());
    }
    out.insert("SANDGATE_SANDBOX_ID".into(), record.id.clone());
    out
}

/// What a sandbox's command (and, under its own `env`, every exec) gets from its record: `env`,
/// then `secret_env` (keys are never in both, but an image's `Env` merged into `env` may name
/// a secret's key, and the secret wins). Only ever passed to the process: never logged.
fn command_env(record: &SandboxRecord) -> BTreeMap<String, String> {
    let mut env = record.env.clone();
    env.extend(
        record
            .secret_env
            .iter()
            .map(|(k, v)| (k.clone(), v.clone())),
    );
    env
}

/// An isolated sandbox's environment (its command's and every exec's): [`sandbox_env`] with
/// its published ports as they are, `HOME` in `/workspace`, and the egress proxy's variables
/// when it has egress.
fn isolated_env(
    record: &SandboxRecord,
    env: &BTreeMap<String, String>,
    pass_env: &[String],
) -> BTreeMap<String, String> {
    let ports: BTreeMap<u16, u16> = record.ports.iter().map(|&p| (p, p)).collect();
    let mut out = sandbox_env(record, Path::new("/workspace"), env, pass_env, &ports);
    if !record.process.egress.is_empty() {
        let proxy = format!("http://127.0.0.1:{EGRESS_PORT}");
        for name in ["HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"] {
            out.insert(name.into(), proxy.clone());
        }
    }
    out
}

/// Where an isolated sandbox's command and execs start: its image's `WorkingDir`, else
/// `/workspace`.
fn working_dir(record: &SandboxRecord) -> PathBuf {
    PathBuf::from(
        record
            .process
            .working_dir
            .as_deref()
            .unwrap_or("/workspace"),
    )
}

/// The last `max` bytes of a file, as text.
pub fn log_tail(path: &Path, max: usize) -> String {
    let Ok(bytes) = std::fs::read(path) else {
        return String::new();
    };
    let start = bytes.len().saturating_sub(max);
    String::from_utf8_lossy(&bytes[start..]).into_owned()
}

/// A sandbox's output file, capped: past the cap one marker line is written and the rest is
/// dropped (still read, so the process never blocks on a full pipe).
struct LogSink {
    file: Option<tokio::fs::File>,
    written: u64,
    cap: u64,
}

impl LogSink {
    async fn open(path: &Path, cap: u64) -> Arc<tokio::sync::Mutex<LogSink>> {
        let file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .await
            .map_err(
                |e| tracing::error!(path = %path.display(), error = %e, "cannot open sandbox log"),
            )
            .ok();
        Arc::new(tokio::sync::Mutex::new(LogSink {
            file,
            written: 0,
            cap,
        }))
    }

    async fn write(&mut self, data: &[u8]) {
        let Some(file) = self.file.as_mut() else {
            return;
        };
        let room = self.cap.saturating_sub(self.written);
        let take = usize::try_from(room).unwrap_or(usize::MAX).min(data.len());
        if take > 0 {
            let _ = file.write_all(&data[..take]).await;
            self.written += take as u64;
        }
        if take < data.len() {
            let _ = file
                .write_all(
                    format!("\n[sandgate: output truncated at {} bytes]\n", self.cap).as_bytes(),
                )
                .await;
            let _ = file.flush().await;
            self.file = None;
        }
    }
}

/// Copies the child's stdout and stderr into the sandbox's log, each on a task of its own.
fn pump_output(
    child: &mut Child,
    log: &Arc<tokio::sync::Mutex<LogSink>>,
) -> [Option<tokio::task::JoinHandle<()>>; 2] {
    [
        child
            .stdout
            .take()
            .map(|s| tokio::spawn(pump(s, Arc::clone(log)))),
        child
            .stderr
            .take()
            .map(|s| tokio::spawn(pump(s, Arc::clone(log)))),
    ]
}

async fn pump(mut src: impl AsyncRead + Unpin, sink: Arc<tokio::sync::Mutex<LogSink>>) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match src.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => sink.lock().await.write(&buf[..n]).await,
        }
    }
    if let Some(f) = sink.lock().await.file.as_mut() {
        let _ = f.flush().await;
    }
}

/// Reads a stream to its end (or until `stop`), keeping at most `cap` bytes; returns them and
/// whether more came.
/// Largest chunk of output a streamed exec reads (and sends) at once.
pub const STREAM_CHUNK: usize = 16 * 1024;

/// After a streamed command exits, a pipe still open (held by a process that left its group)
/// ends after this long without output, and in any case after [`DRAIN_MAX`].
const DRAIN_QUIET: Duration = Duration::from_secs(2);
const DRAIN_MAX: Duration = Duration::from_secs(10);

/// A streamed exec's stdout or stderr.
enum Pipe {
    Out(tokio::process::ChildStdout),
    Err(tokio::process::ChildStderr),
}

impl Pipe {
    async fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Pipe::Out(p) => p.read(buf).await,
            Pipe::Err(p) => p.read(buf).await,
        }
    }
}

/// Sends what `src` yields to `out` until its end; false when the receiver is gone.
async fn stream_out(
    src: Option<Pipe>,
    which: OutputStream,
    out: &tokio::sync::mpsc::Sender<OutputChunk>,
    exited: &CancellationToken,
) -> bool {
    let Some(mut src) = src else {
        return true;
    };
    let mut buf = vec![0u8; STREAM_CHUNK];
    let mut drain_end: Option<tokio::time::Instant> = None;
    loop {
        let read = match drain_end {
            Some(end) => {
                let quiet = (tokio::time::Instant::now() + DRAIN_QUIET).min(end);
                match tokio::time::timeout_at(quiet, src.read(&mut buf)).await {
                    Ok(r) => r,
                    Err(_) => return true,
                }
            }
            // Reads from a pipe are cancel-safe: nothing is lost when the exit wins.
            None => tokio::select! {
                r = src.read(&mut buf) => r,
                _ = exited.cancelled() => {
                    drain_end = Some(tokio::time::Instant::now() + DRAIN_MAX);
                    continue;
                }
            },
        };
        match read {
            Ok(0) | Err(_) => return true,
            Ok(n) => {
                let chunk = bytes::Bytes::copy_from_slice(&buf[..n]);
                if out.send((which, chunk)).await.is_err() {
                    return false;
                }
            }
        }
    }
}

async fn capture(
    mut src: impl AsyncRead + Unpin,
    cap: usize,
    stop: CancellationToken,
) -> (Vec<u8>, bool) {
    let mut kept = Vec::new();
    let mut truncated = false;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let read = tokio::select! {
            r = src.read(&mut buf) => r,
            _ = stop.cancelled() => break,
        };
        match read {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let room = cap.saturating_sub(kept.len());
                if n > room {
                    truncated = true;
                }
                kept.extend_from_slice(&buf[..n.min(room)]);
            }
        }
    }
    (kept, truncated)
}
