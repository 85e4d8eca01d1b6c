//! Isolated sandboxes on this node: what the process driver asks of namespaces, cgroups and
//! the launcher, in the order a sandbox lives.
//!
//! - [`Isolator::detect`] at start: can this node isolate at all (root or `CAP_SYS_ADMIN`:
//!   making a network namespace is the probe), and which cgroup hierarchy holds the limits.
//! - [`Isolator::prepare`]: a host uid of the sandbox's own, its cgroup with its limits, its
//!   network namespace (with the egress proxy's socket inside when it has egress), and its
//!   folders. Nothing runs yet.
//! - [`Jail::spawn`]: the launcher ([`crate::sandbox::launch`]) builds the sandbox and starts
//!   its command; the jail then holds descriptors of its namespaces for `exec`.
//! - [`Jail::exec_command`]: one more command inside, by those descriptors;
//!   [`Jail::files_command`]: one file operation inside, the same way.
//! - [`Jail::signal_all`], [`Jail::release`]: SIGTERM to every task of the cgroup, then (after
//!   the grace period) SIGKILL to all, and the cgroup, the namespace, the uid and the folders
//!   are released.

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::config::OrchestratorConfig;
use crate::sandbox::cgroup::{CgroupRoot, Limits, SandboxCgroup};
use crate::sandbox::launch;
use crate::sandbox::netns::NetNs;
use crate::sandbox::spec::{to_line, ExecSpec, FileOp, FilesSpec, LaunchSpec, Rlimits, VolumeBind};

/// The port of the egress proxy inside every sandbox that has egress; never publishable.
pub const EGRESS_PORT: u16 = 3128;

/// Why a sandbox could not be isolated.
#[derive(Debug, thiserror::Error)]
pub enum IsolationError {
    /// Every uid of `[orchestrator] uid_range` is in use.
    #[error("no free uid left in [orchestrator] uid_range")]
    NoFreeUid,
    /// The cgroup could not be made or limited.
    #[error("cannot make the sandbox's cgroup: {0}")]
    Cgroup(String),
    /// The network namespace could not be made.
    #[error("cannot make the sandbox's network namespace: {0}")]
    Netns(#[source] std::io::Error),
    /// Its folders could not be made.
    #[error("cannot prepare the sandbox's folders: {0}")]
    Dir(#[source] std::io::Error),
    /// The launcher could not start or build the sandbox.
    #[error("{0}")]
    Launch(String),
}

/// This node's means of isolating sandboxes.
pub struct Isolator {
    cgroups: CgroupRoot,
    uid_range: (u32, u32),
    uids: Mutex<BTreeSet<u32>>,
    /// `<data_dir>/sandboxes`: each sandbox's root mount point and workspace.
    dir: PathBuf,
    tmp_bytes: u64,
}

impl std::fmt::Debug for Isolator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Isolator")
            .field("cgroups", &self.cgroups.describe())
            .finish_non_exhaustive()
    }
}

impl Isolator {
    /// Whether this node can isolate; the error says what is missing and what to do.
    pub fn detect(cfg: &OrchestratorConfig, data_dir: &Path) -> Result<Isolator, String> {
        if !nix::unistd::geteuid().is_root() {
            return Err("isolating sandboxes needs sandgate to run as root (or with CAP_SYS_ADMIN); run it as root, or set [orchestrator] isolation = \"none\" on a developer's machine".into());
        }
        crate::sandbox::netns::init_home().map_err(|e| e.to_string())?;
        NetNs::create(&[]).map_err(|e| {
            format!("cannot make a network namespace ({e}); in a container, give it CAP_SYS_ADMIN (see deploy/README.md), or set [orchestrator] isolation = \"none\"")
        })?;
        if !Path::new("/usr/bin/env").exists() {
            return Err("the host image needs /usr on this host".into());
        }
        let cgroups = CgroupRoot::detect().map_err(|e| e.to_string())?;
        Ok(Isolator {
            cgroups,
            uid_range: cfg.uid_range,
            uids: Mutex::new(BTreeSet::new()),
            dir: data_dir.join("sandboxes"),
            tmp_bytes: cfg.tmp_bytes,
        })
    }

    /// For the start-up log.
    pub fn describe(&self) -> String {
        format!("namespaces, {}", self.cgroups.describe())
    }

    /// Ids of sandbox cgroups left on this host (by a crashed run, or another gateway's).
    pub fn leftovers(&self) -> Vec<String> {
        self.cgroups.leftovers()
    }

    /// Ends a leftover sandbox of a previous run of this gateway: every task in its cgroup,
    /// then the cgroup and its folders.
    pub fn end_leftover(&self, id: &str) -> bool {
        let Some(cgroup) = self.cgroups.open(id) else {
            return false;
        };
        let _ = cgroup.remove();
        let _ = std::fs::remove_dir_all(self.dir.join(id));
        true
    }

    /// Everything a sandbox needs before its launcher runs. `volume_uid`: the sandbox mounts
    /// volumes and runs as their uid (see [`crate::sandbox::volume`]), which stays reserved
    /// when it ends; otherwise it gets a fresh uid of its own.
    pub fn prepare(
        self: &Arc<Self>,
        id: &str,
        limits: &Limits,
        egress: bool,
        volume_uid: Option<u32>,
    ) -> Result<Jail, IsolationError> {
        let uid = match volume_uid {
            Some(uid) => uid,
            None => self.allocate_uid()?,
        };
        let release_uid = |e| {
            if volume_uid.is_none() {
                self.free_uid(uid);
            }
            e
        };
        let cgroup = self
            .cgroups
            .create(id, limits)
            .map_err(|e| release_uid(IsolationError::Cgroup(e.to_string())))?;
        let ports: &[u16] = if egress { &[EGRESS_PORT] } else { &[] };
        let (netns, listeners) = match NetNs::create(ports) {
            Ok(made) => made,
            Err(e) => {
                let _ = cgroup.remove();
                return Err(release_uid(IsolationError::Netns(e)));
            }
        };
        let dir = self.dir.join(id);
        let made = (|| -> std::io::Result<()> {
            use std::os::unix::fs::PermissionsExt;
            std::fs::create_dir_all(&self.dir)?;
            std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o700))?;
            std::fs::create_dir_all(dir.join("root"))?;
            std::fs::create_dir_all(dir.join("workspace"))?;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
            std::os::unix::fs::chown(dir.join("workspace"), Some(uid), Some(uid))?;
            std::fs::set_permissions(
                dir.join("workspace"),
                std::fs::Permissions::from_mode(0o755),
            )
        })();
        if let Err(e) = made {
            let _ = cgroup.remove();
            let _ = std::fs::remove_dir_all(&dir);
            return Err(release_uid(IsolationError::Dir(e)));
        }
        Ok(Jail {
            id: id.to_string(),
            uid,
            shared_uid: volume_uid.is_some(),
            isolator: Arc::clone(self),
            netns: Arc::new(netns),
            cgroup: Mutex::new(Some(cgroup)),
            dir,
            egress_listener: Mutex::new(listeners.into_iter().next()),
            egress_stop: tokio_util::sync::CancellationToken::new(),
            namespaces: Mutex::new(None),
        })
    }

    fn allocate_uid(&self) -> Result<u32, IsolationError> {
        self.allocate_uid_besides(&BTreeSet::new())
    }

    /// A free uid that is not in `also_taken` either, marked taken until [`Isolator::free_uid`].
    pub fn allocate_uid_besides(&self, also_taken: &BTreeSet<u32>) -> Result<u32, IsolationError> {
        let mut taken = self.uids.lock().unwrap_or_else(PoisonError::into_inner);
        let all: BTreeSet<u32> = taken.union(also_taken).copied().collect();
        let uid = crate::sandbox::volume::pick_uid(self.uid_range, &all)
            .ok_or(IsolationError::NoFreeUid)?;
        taken.insert(uid);
        Ok(uid)
    }

    /// Marks `uid` taken (a volume's uid, at start), so no sandbox of its own gets it.
    pub fn reserve_uid(&self, uid: u32) {
        self.uids
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(uid);
    }

    /// Hands `uid` back to the pool.
    pub fn free_uid(&self, uid: u32) {
        self.uids
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&uid);
    }
}

/// One isolated sandbox's hold on its resources. Dropping it without [`Jail::end`] leaves the
/// cgroup for restart reconciliation to find.
pub struct Jail {
    pub id: String,
    /// The sandbox's own host uid (and gid).
    pub uid: u32,
    /// `uid` is its volumes' (kept reserved when the sandbox ends).
    shared_uid: bool,
    isolator: Arc<Isolator>,
    /// The proxy and the readiness probe connect inside this.
    pub netns: Arc<NetNs>,
    /// `None` once released.
    cgroup: Mutex<Option<SandboxCgroup>>,
    dir: PathBuf,
    /// The egress proxy's socket inside the namespace, until the driver takes it.
    egress_listener: Mutex<Option<std::net::TcpListener>>,
    /// Ends the egress proxy (and its tunnels) with the sandbox.
    egress_stop: tokio_util::sync::CancellationToken,
    /// Descriptors of the sandbox's other namespaces, once it is built (for exec).
    namespaces: Mutex<Option<Vec<(String, OwnedFd)>>>,
}

impl std::fmt::Debug for Jail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jail")
            .field("id", &self.id)
            .field("uid", &self.uid)
            .finish_non_exhaustive()
    }
}

/// A paused sandbox: thawed when dropped.
pub struct Paused<'a> {
    jail: &'a Jail,
    /// Whether the freeze settled (false: no freezer here, or a task held it off).
    pub paused: bool,
}

impl Drop for Paused<'_> {
    fn drop(&mut self) {
        self.jail.cgroup(SandboxCgroup::resume);
    }
}

/// How long the launcher may take to build a sandbox before it counts as failed.
const BUILD_TIMEOUT: Duration = Duration::from_secs(20);

impl Jail {
    /// Serves the sandbox's egress proxy (when it has egress) until the sandbox ends.
    pub fn serve_egress(
        &self,
        policy: crate::sandbox::egress::EgressPolicy,
        metrics: Arc<crate::telemetry::Metrics>,
    ) -> std::io::Result<()> {
        let Some(listener) = self.take_egress_listener() else {
            return Ok(());
        };
        let listener = tokio::net::TcpListener::from_std(listener)?;
        tokio::spawn(crate::sandbox::egress::serve(
            listener,
            Arc::new(policy),
            self.id.clone(),
            metrics,
            self.egress_stop.clone(),
        ));
        Ok(())
    }

    /// The egress proxy's listening socket (once).
    pub fn take_egress_listener(&self) -> Option<std::net::TcpListener> {
        self.egress_listener
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    /// Starts the launcher for `command` with environment `env` and waits until the sandbox
    /// is built (its command started). Standard output and error of the command are the
    /// returned child's.
    pub async fn spawn(
        &self,
        command: &[String],
        env: BTreeMap<String, String>,
        rlimits: Rlimits,
        volumes: Vec<VolumeBind>,
        image: Option<(PathBuf, PathBuf)>,
    ) -> Result<tokio::process::Child, IsolationError> {
        // (rootfs, cwd) → the image's overlay, its upper layer in this sandbox's folder.
        let image = image.map(|(rootfs, cwd)| crate::sandbox::spec::ImageRoot {
            rootfs,
            upper: self.dir.join("upper"),
            cwd,
        });
        let spec = LaunchSpec {
            id: self.id.clone(),
            root: self.dir.join("root"),
            workspace: self.dir.join("workspace"),
            uid: self.uid,
            gid: self.uid,
            cgroup_procs: self.procs_files()?,
            netns: self.netns.proc_path(),
            command: command.to_vec(),
            env,
            rlimits,
            tmp_bytes: self.isolator.tmp_bytes,
            volumes,
            image,
        };
        let (ours, theirs) = std::os::unix::net::UnixStream::pair()
            .map_err(|e| IsolationError::Launch(format!("cannot make a socket pair: {e}")))?;
        let mut cmd = tokio::process::Command::new(launch::launcher());
        cmd.arg(launch::LAUNCH)
            .env_clear()
            .stdin(std::process::Stdio::from(OwnedFd::from(theirs)))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(false);
        let child = cmd
            .spawn()
            .map_err(|e| IsolationError::Launch(format!("cannot start the launcher: {e}")))?;
        let launcher = child.id();
        ours.set_nonblocking(true)
            .map_err(|e| IsolationError::Launch(e.to_string()))?;
        let mut control = tokio::net::UnixStream::from_std(ours)
            .map_err(|e| IsolationError::Launch(e.to_string()))?;
        let talk = async {
            control.write_all(&to_line(&spec)).await?;
            let mut answer = Vec::new();
            let mut byte = [0u8; 1];
            while control.read(&mut byte).await? == 1 && byte[0] != b'\n' {
                answer.push(byte[0]);
                if answer.len() > 64 * 1024 {
                    break;
                }
            }
            std::io::Result::Ok(String::from_utf8_lossy(&answer).into_owned())
        };
        let answer = match tokio::time::timeout(BUILD_TIMEOUT, talk).await {
            Ok(Ok(a)) => a,
            Ok(Err(e)) => format!("error cannot talk to the launcher: {e}"),
            Err(_) => "error the sandbox was not built within 20 s".into(),
        };
        if answer != "ready" {
            let reason = answer.strip_prefix("error ").unwrap_or(&answer).to_string();
            // The child is reaped by the caller's kill of the cgroup.
            return Err(IsolationError::Launch(if reason.is_empty() {
                "the launcher ended before the sandbox was built".into()
            } else {
                reason
            }));
        }
        if let Some(pid) = launcher {
            self.hold_namespaces(pid);
        }
        Ok(child)
    }

    /// Opens the namespaces the launcher made (its own, and its children's PID namespace),
    /// while it is our unreaped child (so its pid cannot have been reused).
    fn hold_namespaces(&self, launcher: u32) {
        let mut held = Vec::new();
        for (name, file) in [
            ("mnt", "mnt"),
            ("uts", "uts"),
            ("ipc", "ipc"),
            ("cgroup", "cgroup"),
            ("pid", "pid_for_children"),
        ] {
            match std::fs::File::open(format!("/proc/{launcher}/ns/{file}")) {
                Ok(f) => held.push((name.to_string(), OwnedFd::from(f))),
                Err(e) => {
                    tracing::warn!(sandbox = %self.id, namespace = name, error = %e, "cannot hold the sandbox's namespace; exec will fail")
                }
            }
        }
        *self
            .namespaces
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(held);
    }

    /// Where the launcher opens the sandbox's namespaces: the descriptors this gateway holds.
    fn namespace_paths(&self) -> Result<BTreeMap<String, String>, IsolationError> {
        let me = std::process::id();
        let mut namespaces: BTreeMap<String, String> = self
            .namespaces
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .ok_or_else(|| IsolationError::Launch("the sandbox is not built yet".into()))?
            .iter()
            .map(|(name, fd)| (name.clone(), format!("/proc/{me}/fd/{}", fd.as_raw_fd())))
            .collect();
        namespaces.insert("net".into(), self.netns.proc_path());
        Ok(namespaces)
    }

    /// The launcher command for one file operation as the sandbox's user, in its view
    /// ([`crate::sandbox::files`]), and the spec line to write first on its stdin.
    pub fn files_command(
        &self,
        op: FileOp,
        writable: Vec<PathBuf>,
    ) -> Result<(tokio::process::Command, Vec<u8>), IsolationError> {
        let spec = FilesSpec {
            namespaces: self.namespace_paths()?,
            cgroup_procs: self.procs_files()?,
            uid: self.uid,
            gid: self.uid,
            writable,
            op,
        };
        let mut cmd = tokio::process::Command::new(launch::launcher());
        cmd.arg(launch::FILES).env_clear();
        Ok((cmd, to_line(&spec)))
    }

    /// The launcher command for one exec, and the spec line to write first on its stdin.
    pub fn exec_command(
        &self,
        command: &[String],
        env: BTreeMap<String, String>,
        rlimits: Rlimits,
        cwd: PathBuf,
    ) -> Result<(tokio::process::Command, Vec<u8>), IsolationError> {
        let spec = ExecSpec {
            namespaces: self.namespace_paths()?,
            cgroup_procs: self.procs_files()?,
            uid: self.uid,
            gid: self.uid,
            command: command.to_vec(),
            env,
            cwd,
            rlimits,
        };
        let mut cmd = tokio::process::Command::new(launch::launcher());
        cmd.arg(launch::EXEC).env_clear();
        Ok((cmd, to_line(&spec)))
    }

    /// True when a TCP connection to each port inside the sandbox is accepted.
    pub async fn all_accept(&self, ports: &[u16]) -> bool {
        for &p in ports {
            match tokio::time::timeout(Duration::from_millis(200), self.netns.connect(p)).await {
                Ok(Ok(_)) => {}
                _ => return false,
            }
        }
        true
    }

    /// `<data_dir>/sandboxes/<id>`: its `workspace/` and, for an image, its overlay layer in
    /// `upper/data`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Pauses every task of the sandbox (see [`SandboxCgroup::pause`]) until the guard drops.
    pub fn pause(&self) -> Paused<'_> {
        let paused = self
            .cgroup(|c| c.pause(Duration::from_secs(2)))
            .unwrap_or(false);
        Paused { jail: self, paused }
    }

    fn cgroup<T>(&self, f: impl FnOnce(&SandboxCgroup) -> T) -> Option<T> {
        self.cgroup
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .map(f)
    }

    fn procs_files(&self) -> Result<Vec<PathBuf>, IsolationError> {
        self.cgroup(SandboxCgroup::procs_files)
            .ok_or_else(|| IsolationError::Launch("the sandbox has ended".into()))
    }

    /// Times the kernel's OOM killer ended a task of this sandbox.
    pub fn oom_kills(&self) -> u64 {
        self.cgroup(SandboxCgroup::oom_kills).unwrap_or(0)
    }

    /// Memory, CPU and task counts of the sandbox now.
    pub fn stats(&self) -> Option<crate::sandbox::cgroup::Stats> {
        self.cgroup(SandboxCgroup::stats)
    }

    /// SIGKILL to every task now (blocking, no clean-up): see [`super::process::Driver::kill_all_now`].
    pub fn kill_now(&self) {
        self.cgroup(|c| {
            let _ = c.kill();
        });
    }

    /// Sends `sig` to every task of the sandbox.
    pub fn signal_all(&self, sig: nix::sys::signal::Signal) {
        self.cgroup(|c| c.signal_all(sig));
    }

    /// SIGKILL to every task, then the cgroup, the namespaces, the folders and the uid are
    /// released. Idempotent.
    pub async fn release(&self) {
        let Some(cgroup) = self
            .cgroup
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        else {
            return;
        };
        drop(self.take_egress_listener());
        self.egress_stop.cancel();
        self.namespaces
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let dir = self.dir.clone();
        let removed = tokio::task::spawn_blocking(move || {
            let r = cgroup.remove();
            // Only mount points and the workspace are left on the host side (removal never
            // follows the symlinks a sandbox may have planted).
            let _ = std::fs::remove_dir_all(&dir);
            r
        })
        .await;
        if let Ok(Err(e)) = removed {
            tracing::error!(sandbox = %self.id, error = %e, "cannot remove the sandbox's cgroup");
        }
        if !self.shared_uid {
            self.isolator.free_uid(self.uid);
        }
    }
}
