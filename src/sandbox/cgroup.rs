//! One cgroup per command sandbox: the limits hold for all of its tasks together, and its end
//! is total (a task that called `setsid`, double-forked or cleared its environment is still in
//! its cgroup, and dies with it).
//!
//! # Layout
//!
//! [`CgroupRoot::detect`] runs once at start and picks one of two layouts:
//!
//! - **cgroup v2** where `memory`, `pids` and `cpu` are available to the gateway's own cgroup
//!   `<own>` (a production host under systemd with `Delegate=yes`). The "no internal
//!   processes" rule forbids a cgroup that holds processes from handing controllers to its
//!   children, so the gateway first moves itself into the leaf `<own>/supervisor`, then enables
//!   the controllers in `<own>/cgroup.subtree_control` and `<own>/sandgate/cgroup.subtree_control`.
//!   A sandbox is `<own>/sandgate/<id>`; its end is `cgroup.kill`.
//! - **cgroup v1** for the controllers otherwise (a hybrid host): `<ctrl>/<own>/sandgate/<id>`
//!   in each of the `memory`, `pids`, `cpu` (and, where mounted, `cpuacct` and `freezer`)
//!   hierarchies, plus `<unified>/<own>/sandgate/<id>` in the controller-less v2 hierarchy
//!   when there is one, for its `cgroup.kill`. Without `cgroup.kill` the end is the freezer:
//!   freeze, SIGKILL every task, thaw, until the cgroup is empty.
//!
//! Paths are built only from the detected folders and a validated sandbox id, never from
//! anything else. Everything here is blocking file I/O on cgroupfs (each call a few syscalls);
//! [`SandboxCgroup::kill`] and [`SandboxCgroup::remove`] may wait up to a few seconds, so call
//! them from `spawn_blocking`.

use std::collections::BTreeSet;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;

use super::is_valid_id;

/// The folder, beneath the gateway's own cgroup in each hierarchy, that holds one cgroup per
/// sandbox. Everything in it is a sandbox's (what [`CgroupRoot::leftovers`] lists).
const FOLDER: &str = "sandgate";
/// The v2 leaf the gateway moves itself into, so that its own cgroup holds no processes and may
/// hand controllers down (the v2 "no internal processes" rule).
const SUPERVISOR: &str = "supervisor";
/// The v2 controllers a sandbox's limits need.
const V2_CONTROLLERS: [&str; 3] = ["memory", "pids", "cpu"];
/// The CFS period both versions use: a quota is `millis * 100` µs of CPU time per 100 ms.
const CFS_PERIOD_US: u64 = 100_000;
/// The kernel refuses CFS quotas under 1 ms, i.e. below 10 millis per 100 ms period.
const MIN_CPU_MILLIS: u64 = 10;
/// A ceiling far above any machine, so `millis * 100` cannot overflow.
const MAX_CPU_MILLIS: u64 = 1 << 32;
/// How long [`SandboxCgroup::kill`] keeps trying before it reports the survivors.
const KILL_DEADLINE: Duration = Duration::from_secs(2);
/// How long one freezer round waits for `FROZEN` before it kills what it sees anyway (a task
/// in uninterruptible sleep can hold a freeze off).
const FREEZE_WAIT: Duration = Duration::from_millis(100);
/// How long [`SandboxCgroup::remove`] retries an `rmdir` that answers `EBUSY` (the kernel
/// takes a moment to let go of a cgroup whose last task just died).
const RMDIR_DEADLINE: Duration = Duration::from_secs(1);
/// The polling step while waiting on the kernel: short, because kill is on the terminate path.
const POLL: Duration = Duration::from_millis(1);

/// Why a cgroup operation failed. Every message names the file or what is missing, and what
/// to do about it.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// Start-up found no cgroup layout that can enforce memory, pids and cpu limits and end a
    /// sandbox totally. `found` says what there is; `hint` what to change.
    #[error("cgroups cannot isolate command sandboxes on this host: {found}. {hint}")]
    Unavailable { found: String, hint: String },
    /// A cgroup file or folder could not be read, written, created or removed.
    #[error("cannot {action} {}: {source} ({})", path.display(), io_hint(source))]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The id is not shaped like a sandbox id, so no path is built from it. (At most 64
    /// characters of it are kept, escaped by `Debug`.)
    #[error(
        "{0:?} is not a sandbox id (20-64 characters of [a-z0-9]); no cgroup path is built from it"
    )]
    InvalidId(String),
    /// A limit the kernel cannot express; the message says the valid range.
    #[error("invalid cgroup limit: {0}")]
    InvalidLimit(&'static str),
    /// A cgroup for this id exists already: ids are used once, so it is a crashed run's
    /// leftover (end it with [`CgroupRoot::open`] + [`SandboxCgroup::remove`]).
    #[error("the cgroup {} exists already; sandbox ids are used once, so it is a leftover: end it with open() + remove()", .0.display())]
    Exists(PathBuf),
    /// Tasks survived [`SandboxCgroup::kill`] until its deadline: stuck in the kernel
    /// (uninterruptible sleep, e.g. on a hung NFS mount) or attached from outside meanwhile.
    #[error("{} task(s) (pids {pids:?}) are still in sandbox cgroup {id} after {} ms of killing; they are likely stuck in the kernel (see /proc/<pid>/stack); try remove() again later", pids.len(), waited.as_millis())]
    KillTimeout {
        id: String,
        pids: Vec<i32>,
        waited: Duration,
    },
}

/// What an I/O error on cgroupfs usually means, and what to do.
fn io_hint(e: &io::Error) -> &'static str {
    match e.raw_os_error().map(Errno::from_raw) {
        Some(Errno::EACCES | Errno::EPERM) => {
            "run sandgate as root, or under systemd with Delegate=yes so that it owns its cgroup"
        }
        Some(Errno::EROFS) => {
            "the cgroup filesystem is read-only here: mount it read-write (in a container: a private cgroup namespace with a writable /sys/fs/cgroup)"
        }
        Some(Errno::ENOENT) => {
            "the file or cgroup is missing: is the controller mounted and enabled, or was the cgroup removed by someone else?"
        }
        Some(Errno::EBUSY) => "the cgroup still has tasks or child cgroups",
        Some(Errno::EINVAL) => {
            "the kernel refused the value: a limit above the parent cgroup's, or a controller that is not enabled"
        }
        Some(Errno::ENOSPC | Errno::EAGAIN) => {
            "the kernel has no room: too many cgroups (cgroup.max.descendants) or tasks"
        }
        _ => "see the kernel's cgroup documentation for this file",
    }
}

/// What one sandbox may use. `None` is no limit (the kernel's `max`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// The sandbox's memory in total, swap included (there is no swap beyond it): past it the
    /// kernel's OOM killer ends one of its processes.
    pub memory_bytes: Option<u64>,
    /// CPU time per wall time, in thousandths of a CPU: 500 is half a CPU, 2000 two CPUs.
    pub cpu_millis: Option<u64>,
    /// All its tasks (processes and threads) together: a fork bomb stops there.
    pub max_tasks: Option<u64>,
}

impl Limits {
    /// Refuses what the kernel cannot hold, before anything is created. Zero is refused rather
    /// than passed on: nothing could run, and it is more likely a "0 = none" not mapped to None.
    fn validate(&self) -> Result<(), CgroupError> {
        match self.memory_bytes {
            Some(0) => {
                return Err(CgroupError::InvalidLimit(
                    "memory_bytes = 0 leaves no memory; use None for no memory limit",
                ))
            }
            Some(n) if n > i64::MAX as u64 => {
                return Err(CgroupError::InvalidLimit(
                    "memory_bytes is above what the kernel accepts; use None for no memory limit",
                ))
            }
            _ => {}
        }
        match self.cpu_millis {
            Some(n) if n < MIN_CPU_MILLIS => return Err(CgroupError::InvalidLimit(
                "cpu_millis must be at least 10 (the kernel's smallest quota, 1 ms per 100 ms); use None for no CPU limit",
            )),
            Some(n) if n > MAX_CPU_MILLIS => {
                return Err(CgroupError::InvalidLimit(
                    "cpu_millis is above any machine's CPU count; use None for no CPU limit",
                ))
            }
            _ => {}
        }
        if self.max_tasks == Some(0) {
            return Err(CgroupError::InvalidLimit(
                "max_tasks = 0 would not even let the sandbox's first process start; use None for no task limit",
            ));
        }
        Ok(())
    }
}

/// What a sandbox uses now, cheap to read (one small file each).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Memory charged to the sandbox now (v1 `memory.usage_in_bytes`, v2 `memory.current`).
    pub memory_bytes: u64,
    /// CPU time used so far, in µs (v1 `cpuacct.usage`, else the unified hierarchy's
    /// `cpu.stat`; v2 `cpu.stat` `usage_usec`). 0 where neither exists.
    pub cpu_usec: u64,
    /// Its tasks now, threads included (`pids.current`).
    pub tasks: u64,
    /// Time its tasks were held back by its `cpus` limit so far, in µs (v1 `cpu.stat`
    /// `throttled_time`, v2 `cpu.stat` `throttled_usec`); 0 without a limit.
    pub cpu_throttled_usec: u64,
}

/// Which cgroup version enforces the limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Version {
    V1,
    V2,
}

/// The folders of one layout: the `sandgate` folders in a [`CgroupRoot`], one sandbox's own in
/// a [`SandboxCgroup`]. Co-mounted v1 controllers (`cpu,cpuacct`) share one folder.
#[derive(Debug, Clone)]
struct Dirs {
    /// v2: every controller here. v1: the controller-less unified hierarchy, for `cgroup.kill`,
    /// `cgroup.freeze` and `cgroup.events` only (None when it is not there or not writable).
    unified: Option<PathBuf>,
    /// The v1 controllers' folders (all None under v2).
    memory: Option<PathBuf>,
    pids: Option<PathBuf>,
    cpu: Option<PathBuf>,
    cpuacct: Option<PathBuf>,
    freezer: Option<PathBuf>,
}

impl Dirs {
    /// Every distinct folder, the unified one first (it is the one `cgroup.kill` acts on, so a
    /// launcher that attaches in this order is killable from its first write on).
    fn all(&self) -> Vec<&Path> {
        let mut out: Vec<&Path> = Vec::with_capacity(6);
        for dir in [
            &self.unified,
            &self.memory,
            &self.pids,
            &self.cpu,
            &self.cpuacct,
            &self.freezer,
        ]
        .into_iter()
        .flatten()
        {
            if !out.contains(&dir.as_path()) {
                out.push(dir);
            }
        }
        out
    }

    /// The same folders one level down, for sandbox `id` (already validated).
    fn join(&self, id: &str) -> Dirs {
        let j = |d: &Option<PathBuf>| d.as_ref().map(|d| d.join(id));
        Dirs {
            unified: j(&self.unified),
            memory: j(&self.memory),
            pids: j(&self.pids),
            cpu: j(&self.cpu),
            cpuacct: j(&self.cpuacct),
            freezer: j(&self.freezer),
        }
    }
}

/// The cgroup layout detected at start: where sandbox cgroups go, and how they are limited and
/// killed. Cheap to clone.
#[derive(Debug, Clone)]
pub struct CgroupRoot {
    version: Version,
    /// The `sandgate` folders.
    dirs: Dirs,
    /// `cgroup.kill` exists (kernel 5.14+): the kernel kills a whole cgroup in one write.
    kill: bool,
    /// v1 `memory.memsw.*` exists (swap accounting on), so the limit covers swap too.
    memsw: bool,
}

impl CgroupRoot {
    /// Finds the gateway's own cgroups, picks v2 or v1 (see the module docs), and makes the
    /// `sandgate` folders (under v2 after moving the gateway into `<own>/supervisor`). Safe to
    /// call again (a second call finds the folders made). Never call it in a sandbox's
    /// launcher: it would move the launcher; the launcher uses [`attach_pid`].
    pub fn detect() -> Result<CgroupRoot, CgroupError> {
        Self::detect_in(FOLDER)
    }

    /// [`CgroupRoot::detect`] with another folder name: tests use one folder each, so that
    /// they can run in parallel and see only their own cgroups.
    fn detect_in(folder: &str) -> Result<CgroupRoot, CgroupError> {
        let mountinfo = read("/proc/self/mountinfo")?;
        let membership = read("/proc/self/cgroup")?;
        let own = OwnCgroups::find(
            &parse_mountinfo(&mountinfo),
            &parse_proc_cgroup(&membership),
        );

        let mut found = Vec::new();
        if let Some(v2) = &own.v2 {
            let base = v2_base(v2);
            let offered = controllers(&base.join("cgroup.controllers"));
            if V2_CONTROLLERS.iter().all(|c| offered.contains(*c)) {
                return Self::setup_v2(&base, folder);
            }
            found.push(format!(
                "cgroup2 at {} offers [{}] (memory, pids and cpu are needed)",
                base.display(),
                offered.into_iter().collect::<Vec<_>>().join(", ")
            ));
        } else {
            found.push("no cgroup2 hierarchy is mounted".into());
        }
        let v1: Vec<&str> = own.v1.iter().map(|(c, _)| c.as_str()).collect();
        found.push(if v1.is_empty() {
            "no cgroup v1 controller is mounted".into()
        } else {
            format!("cgroup v1 has [{}]", v1.join(", "))
        });
        if ["memory", "pids", "cpu"]
            .iter()
            .all(|c| own.v1_dir(c).is_some())
        {
            return Self::setup_v1(&own, folder, found);
        }
        Err(CgroupError::Unavailable {
            found: found.join("; "),
            hint: "Mount cgroup2 at /sys/fs/cgroup with the memory, pids and cpu controllers \
                   available to sandgate's cgroup (under systemd: Delegate=yes in its unit), or \
                   mount the cgroup v1 memory, pids and cpu controllers; and run sandgate as root"
                .into(),
        })
    }

    /// v2: leave our own cgroup to `supervisor` if the kernel asks for it, hand the controllers
    /// down to `<base>/<folder>` and from there to the sandboxes.
    fn setup_v2(base: &Path, folder: &str) -> Result<CgroupRoot, CgroupError> {
        let enable = "+memory +pids +cpu";
        let subtree = base.join("cgroup.subtree_control");
        if !V2_CONTROLLERS
            .iter()
            .all(|c| controllers(&subtree).contains(*c))
        {
            match write_file(&subtree, enable) {
                Ok(()) => {}
                // Processes in our own cgroup: move them all (the gateway and whatever it
                // runs) into the leaf, then enable. The true root cgroup is exempt from the
                // rule, which is why this is tried second.
                Err(CgroupError::Io { source, .. })
                    if source.raw_os_error() == Some(Errno::EBUSY as i32) =>
                {
                    let leaf = base.join(SUPERVISOR);
                    make_dir(&leaf)?;
                    let leaf_procs = leaf.join("cgroup.procs");
                    for pid in read_procs(&base.join("cgroup.procs")) {
                        match write_file(&leaf_procs, &pid.to_string()) {
                            Ok(()) => {}
                            // Gone meanwhile.
                            Err(CgroupError::Io { source, .. })
                                if source.raw_os_error() == Some(Errno::ESRCH as i32) => {}
                            Err(e) => return Err(e),
                        }
                    }
                    write_file(&subtree, enable)?;
                }
                Err(e) => return Err(e),
            }
        }
        let dir = base.join(folder);
        make_dir(&dir)?;
        let sub = dir.join("cgroup.subtree_control");
        if !V2_CONTROLLERS
            .iter()
            .all(|c| controllers(&sub).contains(*c))
        {
            write_file(&sub, enable)?;
        }
        Ok(CgroupRoot {
            version: Version::V2,
            kill: dir.join("cgroup.kill").exists(),
            memsw: false,
            dirs: Dirs {
                unified: Some(dir),
                memory: None,
                pids: None,
                cpu: None,
                cpuacct: None,
                freezer: None,
            },
        })
    }

    /// v1: a folder in each controller's hierarchy, and one in the unified hierarchy when it
    /// is there and writable (for `cgroup.kill`).
    fn setup_v1(
        own: &OwnCgroups,
        folder: &str,
        mut found: Vec<String>,
    ) -> Result<CgroupRoot, CgroupError> {
        let folder_of = |c: &str| own.v1_dir(c).map(|d| d.join(folder));
        let dirs = Dirs {
            unified: None,
            memory: folder_of("memory"),
            pids: folder_of("pids"),
            cpu: folder_of("cpu"),
            cpuacct: folder_of("cpuacct"),
            freezer: folder_of("freezer"),
        };
        for dir in dirs.all() {
            make_dir(dir)?;
        }
        // The unified hierarchy is a bonus: without it the freezer ends sandboxes.
        let unified = own
            .v2
            .as_ref()
            .map(|v2| v2.join(folder))
            .filter(|dir| make_dir(dir).is_ok() && dir.join("cgroup.kill").exists());
        if unified.is_none() && dirs.freezer.is_none() {
            found.push("neither the v1 freezer nor a v2 cgroup.kill is available".into());
            return Err(CgroupError::Unavailable {
                found: found.join("; "),
                hint: "Without one of them a sandbox that keeps forking cannot be ended for \
                       sure: mount the cgroup v1 freezer controller, or cgroup2 (kernel 5.14+) \
                       at /sys/fs/cgroup/unified"
                    .into(),
            });
        }
        let memsw = dirs
            .memory
            .as_ref()
            .is_some_and(|d| d.join("memory.memsw.limit_in_bytes").exists());
        Ok(CgroupRoot {
            version: Version::V1,
            kill: unified.is_some(),
            memsw,
            dirs: Dirs { unified, ..dirs },
        })
    }

    /// One line for the start-up log: which version and controllers enforce the limits, and
    /// how a sandbox is ended.
    pub fn describe(&self) -> String {
        match self.version {
            Version::V2 => format!(
                "cgroup v2 (memory, pids, cpu) at {}, ended by {}",
                self.dirs
                    .all()
                    .first()
                    .map_or("?".into(), |d| d.display().to_string()),
                if self.kill {
                    "cgroup.kill"
                } else {
                    "cgroup.freeze + SIGKILL"
                }
            ),
            Version::V1 => {
                let mut ctrls = vec![if self.memsw { "memory+swap" } else { "memory" }];
                ctrls.extend(["pids", "cpu"]);
                if self.dirs.cpuacct.is_some() {
                    ctrls.push("cpuacct");
                }
                if self.dirs.freezer.is_some() {
                    ctrls.push("freezer");
                }
                format!(
                    "cgroup v1 ({}){}",
                    ctrls.join(", "),
                    if self.kill { " + v2 cgroup.kill" } else { "" }
                )
            }
        }
    }

    /// Makes a fresh cgroup for sandbox `id` in every hierarchy and writes its limits. Nothing
    /// is attached yet: the sandbox's launcher attaches itself (see
    /// [`SandboxCgroup::procs_files`]). On failure nothing is left behind.
    pub fn create(&self, id: &str, limits: &Limits) -> Result<SandboxCgroup, CgroupError> {
        check_id(id)?;
        limits.validate()?;
        let cg = self.handle(id);
        let mut made: Vec<&Path> = Vec::new();
        let result = (|| {
            for dir in cg.dirs.all() {
                match fs::create_dir(dir) {
                    Ok(()) => made.push(dir),
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                        return Err(CgroupError::Exists(dir.to_path_buf()))
                    }
                    Err(source) => return Err(io_error("create", dir, source)),
                }
            }
            cg.write_limits(limits)
        })();
        if let Err(e) = result {
            for dir in made.iter().rev() {
                let _ = fs::remove_dir(dir);
            }
            return Err(e);
        }
        Ok(cg)
    }

    /// The cgroup of sandbox `id` if any of its folders exists (a restarted gateway
    /// reconciling its sandboxes; a crash half-way through [`CgroupRoot::create`] counts).
    pub fn open(&self, id: &str) -> Option<SandboxCgroup> {
        if !is_valid_id(id) {
            return None;
        }
        let cg = self.handle(id);
        cg.dirs.all().iter().any(|d| d.is_dir()).then_some(cg)
    }

    /// The ids of every sandbox cgroup under the `sandgate` folders, sorted: what a crashed run
    /// left behind, and the live ones. The driver decides which are its own to end.
    pub fn leftovers(&self) -> Vec<String> {
        let mut ids = BTreeSet::new();
        for dir in self.dirs.all() {
            let Ok(entries) = fs::read_dir(dir) else {
                continue;
            };
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    if let Some(name) = entry.file_name().to_str() {
                        if is_valid_id(name) {
                            ids.insert(name.to_string());
                        }
                    }
                }
            }
        }
        ids.into_iter().collect()
    }

    fn handle(&self, id: &str) -> SandboxCgroup {
        SandboxCgroup {
            id: id.to_string(),
            version: self.version,
            dirs: self.dirs.join(id),
            kill: self.kill,
            memsw: self.memsw,
        }
    }
}

/// One sandbox's cgroup (a folder in each hierarchy). Dropping the handle leaves the cgroup
/// and its tasks alone: a sandbox ends only by [`SandboxCgroup::kill`] or
/// [`SandboxCgroup::remove`].
#[derive(Debug, Clone)]
pub struct SandboxCgroup {
    id: String,
    version: Version,
    dirs: Dirs,
    kill: bool,
    memsw: bool,
}

impl SandboxCgroup {
    /// The sandbox id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The `cgroup.procs` files a launcher writes its own pid into, first thing, before it
    /// execs or forks anything: then every descendant starts inside, with no window in which
    /// one could escape. Pass them to the launcher (it calls [`attach_pid`]).
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs
            .all()
            .into_iter()
            .map(|d| d.join("cgroup.procs"))
            .collect()
    }

    /// Moves process `pid` (all its threads) into this cgroup in every hierarchy.
    pub fn attach(&self, pid: u32) -> Result<(), CgroupError> {
        attach_pid(&self.procs_files(), pid)
    }

    /// Moves the calling process into this cgroup: for a launcher that holds the handle.
    pub fn attach_self(&self) -> Result<(), CgroupError> {
        self.attach(std::process::id())
    }

    /// Every process in the cgroup (child cgroups included), sorted, in the gateway's pid
    /// namespace. The union over the hierarchies, so a half-attached task is listed too.
    pub fn pids(&self) -> Vec<i32> {
        let mut pids = BTreeSet::new();
        for dir in self.dirs.all() {
            pids.extend(procs_under(dir));
        }
        pids.into_iter().collect()
    }

    /// Sends `sig` to every process in the cgroup (e.g. SIGTERM at the start of a grace
    /// period) and answers how many were signalled. A process that forks meanwhile may have a
    /// child that misses it: only [`SandboxCgroup::kill`] is total.
    pub fn signal_all(&self, sig: Signal) -> usize {
        self.pids()
            .into_iter()
            .filter(|&pid| signal::kill(Pid::from_raw(pid), sig).is_ok())
            .count()
    }

    /// True when no process is left in the cgroup (a missing cgroup is empty).
    pub fn is_empty(&self) -> bool {
        self.pids().is_empty()
    }

    /// Kills every task and waits until the cgroup is empty, at most about 2 s. Tasks that
    /// fork meanwhile die too: `cgroup.kill` where it exists (the kernel kills the whole
    /// cgroup and every child forked during it), else rounds of freeze → SIGKILL every pid →
    /// thaw (a frozen task can neither fork nor exit, so no pid is missed or reused).
    pub fn kill(&self) -> Result<(), CgroupError> {
        let start = Instant::now();
        let deadline = start + KILL_DEADLINE;
        let kill_file = self
            .dirs
            .unified
            .as_ref()
            .filter(|_| self.kill)
            .map(|d| d.join("cgroup.kill"));
        while !self.is_empty() {
            if Instant::now() >= deadline {
                return Err(CgroupError::KillTimeout {
                    id: self.id.clone(),
                    pids: self.pids(),
                    waited: start.elapsed(),
                });
            }
            if let Some(file) = &kill_file {
                write_file_allow_gone(file, "1")?;
                // Usually done within a millisecond or two; if tasks remain (attached in
                // v1 only?) the freezer round below catches them.
                if wait_until(deadline.min(Instant::now() + FREEZE_WAIT), || {
                    self.is_empty()
                }) {
                    break;
                }
            }
            let frozen = self.freeze(deadline)?;
            for pid in self.pids() {
                let _ = signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            if frozen {
                self.thaw()?;
            }
            wait_until(deadline.min(Instant::now() + FREEZE_WAIT), || {
                self.is_empty()
            });
        }
        Ok(())
    }

    /// Kills every task, then removes the cgroup's folders in every hierarchy (child cgroups
    /// first), retrying briefly while the kernel still calls them busy.
    pub fn remove(self) -> Result<(), CgroupError> {
        self.kill()?;
        for dir in self.dirs.all() {
            // Deepest first, so every folder is empty when its turn comes.
            for sub in cgroup_tree(dir).iter().rev() {
                let deadline = Instant::now() + RMDIR_DEADLINE;
                loop {
                    match fs::remove_dir(sub) {
                        Ok(()) => break,
                        Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                        Err(e)
                            if e.raw_os_error() == Some(Errno::EBUSY as i32)
                                && Instant::now() < deadline =>
                        {
                            thread::sleep(POLL * 5);
                        }
                        Err(source) => return Err(io_error("remove", sub, source)),
                    }
                }
            }
        }
        Ok(())
    }

    /// How many processes the kernel's OOM killer has ended in this cgroup (v1
    /// `memory.oom_control`, v2 `memory.events`, field `oom_kill`): a main process that died
    /// of SIGKILL while this grew was killed for memory.
    pub fn oom_kills(&self) -> u64 {
        let file = match self.version {
            Version::V2 => self.file(&self.dirs.unified, "memory.events"),
            Version::V1 => self.file(&self.dirs.memory, "memory.oom_control"),
        };
        file.and_then(|f| keyed(&f, "oom_kill")).unwrap_or(0)
    }

    /// Memory, CPU time and tasks now; fields the host does not offer read 0.
    pub fn stats(&self) -> Stats {
        let number = |dir: &Option<PathBuf>, name: &str| {
            self.file(dir, name)
                .and_then(|f| fs::read_to_string(f).ok())
                .and_then(|s| s.trim().parse::<u64>().ok())
                .unwrap_or(0)
        };
        let usage_usec = || {
            self.file(&self.dirs.unified, "cpu.stat")
                .and_then(|f| keyed(&f, "usage_usec"))
                .unwrap_or(0)
        };
        match self.version {
            Version::V2 => Stats {
                memory_bytes: number(&self.dirs.unified, "memory.current"),
                cpu_usec: usage_usec(),
                tasks: number(&self.dirs.unified, "pids.current"),
                cpu_throttled_usec: self
                    .file(&self.dirs.unified, "cpu.stat")
                    .and_then(|f| keyed(&f, "throttled_usec"))
                    .unwrap_or(0),
            },
            Version::V1 => Stats {
                memory_bytes: number(&self.dirs.memory, "memory.usage_in_bytes"),
                cpu_usec: if self.dirs.cpuacct.is_some() {
                    number(&self.dirs.cpuacct, "cpuacct.usage") / 1000
                } else {
                    usage_usec()
                },
                tasks: number(&self.dirs.pids, "pids.current"),
                cpu_throttled_usec: self
                    .file(&self.dirs.cpu, "cpu.stat")
                    .and_then(|f| keyed(&f, "throttled_time"))
                    .unwrap_or(0)
                    / 1000,
            },
        }
    }

    fn file(&self, dir: &Option<PathBuf>, name: &str) -> Option<PathBuf> {
        dir.as_ref().map(|d| d.join(name))
    }

    /// Writes every limit, `max` included, so the cgroup's state is what `limits` says.
    fn write_limits(&self, limits: &Limits) -> Result<(), CgroupError> {
        let or_max = |v: Option<u64>| v.map_or("max".to_string(), |n| n.to_string());
        match self.version {
            Version::V2 => {
                let dir = self
                    .dirs
                    .unified
                    .as_ref()
                    .expect("a v2 layout has its folder");
                write_file(&dir.join("memory.max"), &or_max(limits.memory_bytes))?;
                // Absent when swap accounting is off: then there is no swap to limit.
                let swap = dir.join("memory.swap.max");
                if swap.exists() {
                    let value = if limits.memory_bytes.is_some() {
                        "0"
                    } else {
                        "max"
                    };
                    write_file(&swap, value)?;
                }
                // 0: the kernel kills the one process that outgrew the limit, not the whole
                // sandbox; the driver sees its main process die that way (oom_kills + SIGKILL).
                write_file(&dir.join("memory.oom.group"), "0")?;
                write_file(&dir.join("pids.max"), &or_max(limits.max_tasks))?;
                let quota = limits.cpu_millis.map(|m| m * (CFS_PERIOD_US / 1000));
                write_file(
                    &dir.join("cpu.max"),
                    &format!("{} {CFS_PERIOD_US}", or_max(quota)),
                )?;
            }
            Version::V1 => {
                let memory = self.dirs.memory.as_ref().expect("a v1 layout has memory");
                self.write_memory_v1(memory, limits.memory_bytes)?;
                let pids = self.dirs.pids.as_ref().expect("a v1 layout has pids");
                write_file(&pids.join("pids.max"), &or_max(limits.max_tasks))?;
                let cpu = self.dirs.cpu.as_ref().expect("a v1 layout has cpu");
                write_file(&cpu.join("cpu.cfs_period_us"), &CFS_PERIOD_US.to_string())?;
                let quota = limits.cpu_millis.map_or("-1".to_string(), |m| {
                    (m * (CFS_PERIOD_US / 1000)).to_string()
                });
                write_file(&cpu.join("cpu.cfs_quota_us"), &quota)?;
            }
        }
        Ok(())
    }

    /// v1 memory: `memory.limit_in_bytes`, and `memory.memsw.limit_in_bytes` (memory + swap)
    /// equal to it, so the sandbox cannot swap beyond its total. The kernel insists that
    /// memsw ≥ limit at every moment: lowering writes the limit first, raising memsw first.
    fn write_memory_v1(&self, dir: &Path, bytes: Option<u64>) -> Result<(), CgroupError> {
        let limit = dir.join("memory.limit_in_bytes");
        let value = bytes.map_or("-1".to_string(), |n| n.to_string());
        if !self.memsw {
            return write_file(&limit, &value);
        }
        let memsw = dir.join("memory.memsw.limit_in_bytes");
        let current = fs::read_to_string(&limit)
            .map_err(|e| io_error("read", &limit, e))?
            .trim()
            .parse::<u64>()
            .unwrap_or(u64::MAX);
        if bytes.unwrap_or(u64::MAX) < current {
            write_file(&limit, &value)?;
            write_file(&memsw, &value)
        } else {
            write_file(&memsw, &value)?;
            write_file(&limit, &value)
        }
    }

    /// Pauses every task (the freezer) for a consistent copy of the sandbox's files, waiting up
    /// to `wait` for it to settle. Answers whether it is paused; [`SandboxCgroup::resume`]
    /// undoes it either way.
    pub fn pause(&self, wait: Duration) -> bool {
        let deadline = Instant::now() + wait;
        if let Some(dir) = &self.dirs.freezer {
            let state = dir.join("freezer.state");
            if write_file_allow_gone(&state, "FROZEN").is_err() {
                return false;
            }
            return wait_until(deadline, || {
                fs::read_to_string(&state)
                    .map(|s| s.trim() == "FROZEN")
                    .unwrap_or(true)
            });
        }
        if let Some(dir) = &self.dirs.unified {
            let freeze = dir.join("cgroup.freeze");
            if freeze.exists() && write_file_allow_gone(&freeze, "1").is_ok() {
                let events = dir.join("cgroup.events");
                return wait_until(deadline, || keyed(&events, "frozen").is_none_or(|f| f == 1));
            }
        }
        false
    }

    /// Undoes [`SandboxCgroup::pause`].
    pub fn resume(&self) {
        if let Err(e) = self.thaw() {
            tracing::error!(cgroup = %self.id, error = %e, "cannot thaw a paused sandbox");
        }
    }

    /// Freezes the cgroup where a freezer exists and waits (briefly) for it to settle. Answers
    /// whether a freezer was asked, so the caller thaws it.
    fn freeze(&self, deadline: Instant) -> Result<bool, CgroupError> {
        let until = deadline.min(Instant::now() + FREEZE_WAIT);
        if let Some(dir) = &self.dirs.freezer {
            let state = dir.join("freezer.state");
            write_file_allow_gone(&state, "FROZEN")?;
            wait_until(until, || {
                fs::read_to_string(&state)
                    .map(|s| s.trim() == "FROZEN")
                    .unwrap_or(true)
            });
            return Ok(true);
        }
        if let Some(dir) = &self.dirs.unified {
            let freeze = dir.join("cgroup.freeze");
            if freeze.exists() {
                write_file_allow_gone(&freeze, "1")?;
                let events = dir.join("cgroup.events");
                wait_until(until, || keyed(&events, "frozen").is_none_or(|f| f == 1));
                return Ok(true);
            }
        }
        Ok(false)
    }

    fn thaw(&self) -> Result<(), CgroupError> {
        if let Some(dir) = &self.dirs.freezer {
            return write_file_allow_gone(&dir.join("freezer.state"), "THAWED");
        }
        if let Some(dir) = &self.dirs.unified {
            return write_file_allow_gone(&dir.join("cgroup.freeze"), "0");
        }
        Ok(())
    }
}

/// Writes `pid` into each `cgroup.procs` file in order: what a sandbox's launcher calls on
/// itself (`std::process::id()`) before anything else, with the files from
/// [`SandboxCgroup::procs_files`]. Plain blocking `std::fs`, fit for a fresh child. If it
/// fails the launcher must exit without running anything: it may be half-attached.
pub fn attach_pid(procs_files: &[PathBuf], pid: u32) -> Result<(), CgroupError> {
    for file in procs_files {
        // Only ever a cgroup's procs file, whatever a caller passes.
        if file.file_name().and_then(|n| n.to_str()) != Some("cgroup.procs") {
            return Err(io_error(
                "attach to",
                file,
                io::Error::new(io::ErrorKind::InvalidInput, "not a cgroup.procs file"),
            ));
        }
        write_file(file, &pid.to_string())?;
    }
    Ok(())
}

/// A sandbox id, or the error that says why not.
fn check_id(id: &str) -> Result<(), CgroupError> {
    if is_valid_id(id) {
        Ok(())
    } else {
        Err(CgroupError::InvalidId(id.chars().take(64).collect()))
    }
}

fn io_error(action: &'static str, path: &Path, source: io::Error) -> CgroupError {
    CgroupError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

fn read(path: &str) -> Result<String, CgroupError> {
    fs::read_to_string(path).map_err(|e| io_error("read", Path::new(path), e))
}

/// One write of `value` to an existing cgroup file (never created: cgroupfs makes its own, and
/// `O_CREAT` would turn a missing file into a misleading permission error).
fn write_file(path: &Path, value: &str) -> Result<(), CgroupError> {
    fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|mut f| f.write_all(value.as_bytes()))
        .map_err(|e| io_error("write", path, e))
}

/// [`write_file`] for a cgroup that may be gone meanwhile (the kill path): gone is fine.
fn write_file_allow_gone(path: &Path, value: &str) -> Result<(), CgroupError> {
    match write_file(path, value) {
        Err(CgroupError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// `mkdir`, where an existing folder is fine.
fn make_dir(dir: &Path) -> Result<(), CgroupError> {
    match fs::create_dir(dir) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => Err(io_error("create", dir, e)),
        _ => Ok(()),
    }
}

/// The controllers a `cgroup.controllers` or `cgroup.subtree_control` file names.
fn controllers(file: &Path) -> BTreeSet<String> {
    fs::read_to_string(file)
        .map(|s| s.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default()
}

/// The pids in one `cgroup.procs` file. Never 0 or negative: `kill(0)` would signal the
/// gateway's own process group.
fn read_procs(file: &Path) -> Vec<i32> {
    fs::read_to_string(file)
        .map(|s| {
            s.lines()
                .filter_map(|l| l.trim().parse::<i32>().ok())
                .filter(|&p| p > 0)
                .collect()
        })
        .unwrap_or_default()
}

/// `dir` and every cgroup below it, parents before children.
fn cgroup_tree(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        if let Ok(entries) = fs::read_dir(&d) {
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    todo.push(entry.path());
                }
            }
            out.push(d);
        }
    }
    // Pre-order from a stack is parents-before-children within each branch; sort by depth to
    // make it hold across branches too.
    out.sort_by_key(|p| p.components().count());
    out
}

/// The processes in `dir` and its child cgroups (a sandbox may make its own).
fn procs_under(dir: &Path) -> Vec<i32> {
    cgroup_tree(dir)
        .iter()
        .flat_map(|d| read_procs(&d.join("cgroup.procs")))
        .collect()
}

/// The number after `key` in a flat-keyed file such as `memory.events` or `cpu.stat`.
fn keyed(file: &Path, key: &str) -> Option<u64> {
    let text = fs::read_to_string(file).ok()?;
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

/// Polls `done` until it holds or `until` passes; answers whether it held.
fn wait_until(until: Instant, mut done: impl FnMut() -> bool) -> bool {
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= until {
            return false;
        }
        thread::sleep(POLL);
    }
}

/// Under v2, the cgroup the gateway's folders go in: its own, or the parent when the gateway
/// already moved itself into `supervisor` (a second [`CgroupRoot::detect`] in one run).
fn v2_base(own: &Path) -> PathBuf {
    if own.file_name().is_some_and(|n| n == SUPERVISOR) {
        if let Some(parent) = own.parent() {
            let sub = controllers(&parent.join("cgroup.subtree_control"));
            if V2_CONTROLLERS.iter().all(|c| sub.contains(*c)) {
                return parent.to_path_buf();
            }
        }
    }
    own.to_path_buf()
}

/// One cgroup filesystem mount, from `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Mount {
    /// The folder of the hierarchy this mount shows (not `/` for a container's bind mount).
    root: String,
    mount_point: PathBuf,
    /// `cgroup2`, or for v1 the controllers bound to it (`["cpu", "cpuacct"]`).
    kind: MountKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum MountKind {
    V2,
    V1(Vec<String>),
}

/// The cgroup mounts in a mountinfo text.
fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            // id parent major:minor root mount-point options [optional...] - fstype source super
            let (left, right) = line.split_once(" - ")?;
            let fields: Vec<&str> = left.split(' ').collect();
            let (root, mount_point) = (*fields.get(3)?, *fields.get(4)?);
            let mut right = right.split(' ');
            let fstype = right.next()?;
            let super_options = right.nth(1).unwrap_or("");
            let kind = match fstype {
                "cgroup2" => MountKind::V2,
                "cgroup" => MountKind::V1(
                    super_options
                        .split(',')
                        .filter(|o| is_v1_controller(o))
                        .map(str::to_string)
                        .collect(),
                ),
                _ => return None,
            };
            Some(Mount {
                root: unescape(root),
                mount_point: PathBuf::from(unescape(mount_point)),
                kind,
            })
        })
        .collect()
}

/// Mount options of a v1 cgroup mount that are not controllers.
fn is_v1_controller(option: &str) -> bool {
    !matches!(
        option,
        "rw" | "ro" | "noprefix" | "clone_children" | "xattr" | "cpuset_v2_mode" | "favordynmods"
    ) && !option.contains('=')
}

/// mountinfo writes space, tab, newline and backslash in paths as `\ooo` octal escapes.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() {
            // Bytes, not a str slice: a multi-byte character may follow the backslash.
            let code = std::str::from_utf8(&bytes[i + 1..i + 4]).unwrap_or("");
            if let Ok(b) = u8::from_str_radix(code, 8) {
                out.push(b);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One line of `/proc/self/cgroup`: `hierarchy-id:controllers:path`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Membership {
    /// Empty for the v2 line (`0::/path`); named hierarchies (`name=systemd`) are dropped.
    controllers: Vec<String>,
    path: String,
}

fn parse_proc_cgroup(text: &str) -> Vec<Membership> {
    text.lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, ':');
            let (_id, ctrls, path) = (parts.next()?, parts.next()?, parts.next()?);
            if ctrls.starts_with("name=") {
                return None;
            }
            let controllers = if ctrls.is_empty() {
                Vec::new()
            } else {
                ctrls.split(',').map(str::to_string).collect()
            };
            Some(Membership {
                controllers,
                path: path.to_string(),
            })
        })
        .collect()
}

/// The gateway's own cgroup folders: the v2 one and each v1 controller's.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct OwnCgroups {
    v2: Option<PathBuf>,
    /// (controller, folder), in `/proc/self/cgroup` order; co-mounted controllers share one.
    v1: Vec<(String, PathBuf)>,
}

impl OwnCgroups {
    fn find(mounts: &[Mount], membership: &[Membership]) -> OwnCgroups {
        let mut own = OwnCgroups::default();
        for m in membership {
            if m.controllers.is_empty() {
                own.v2 = mounts
                    .iter()
                    .filter(|mount| mount.kind == MountKind::V2)
                    .find_map(|mount| resolve(mount, &m.path));
                continue;
            }
            let dir = mounts
                .iter()
                .filter(|mount| match &mount.kind {
                    MountKind::V1(ctrls) => ctrls.contains(&m.controllers[0]),
                    MountKind::V2 => false,
                })
                .find_map(|mount| resolve(mount, &m.path));
            if let Some(dir) = dir {
                for c in &m.controllers {
                    own.v1.push((c.clone(), dir.clone()));
                }
            }
        }
        own
    }

    fn v1_dir(&self, controller: &str) -> Option<&Path> {
        self.v1
            .iter()
            .find(|(c, _)| c == controller)
            .map(|(_, d)| d.as_path())
    }
}

/// Where cgroup `path` (as `/proc/self/cgroup` names it) lies under `mount`: None when the
/// mount does not show it (another part of the hierarchy, or a path outside our cgroup
/// namespace such as `/../..`).
fn resolve(mount: &Mount, path: &str) -> Option<PathBuf> {
    if path.split('/').any(|c| c == ".." || c == ".") || !path.starts_with('/') {
        return None;
    }
    let rest = if mount.root == "/" {
        path
    } else {
        let rest = path.strip_prefix(mount.root.as_str())?;
        if !rest.is_empty() && !rest.starts_with('/') {
            return None;
        }
        rest
    };
    let rest = rest.trim_start_matches('/');
    Some(if rest.is_empty() {
        mount.mount_point.clone()
    } else {
        mount.mount_point.join(rest)
    })
}

#[cfg(test)]
mod tests {
    //! Against the host's real cgroups, as root. Each test detects its own folder
    //! (`sandgate-test-<id>`), so tests run in parallel without seeing each other's cgroups, and
    //! a [`Scratch`] guard kills and removes everything it made even when the test fails.

    use std::io::Write as _;
    use std::os::unix::process::ExitStatusExt;
    use std::process::{Child, Command, ExitStatus, Stdio};

    use super::*;
    use crate::sandbox::new_id;

    /// A test's private cgroup folder, its sandbox cgroups and the processes it spawned.
    struct Scratch {
        root: CgroupRoot,
        /// The folders detect made, removed last.
        bases: Vec<PathBuf>,
        ids: Vec<String>,
        children: Vec<Child>,
    }

    impl Scratch {
        fn new() -> Scratch {
            let root = CgroupRoot::detect_in(&format!("sandgate-test-{}", new_id()))
                .expect("these tests need real cgroups and root");
            Scratch {
                bases: root.dirs.all().iter().map(|d| d.to_path_buf()).collect(),
                root,
                ids: Vec::new(),
                children: Vec::new(),
            }
        }

        fn create(&mut self, limits: Limits) -> SandboxCgroup {
            let id = new_id();
            self.ids.push(id.clone());
            self.root.create(&id, &limits).expect("create the cgroup")
        }

        /// Runs `sh -c script` inside `cg`: the shell waits on stdin until it is attached, so
        /// nothing of the script ever runs outside.
        fn start(&mut self, cg: &SandboxCgroup, script: &str) -> usize {
            let mut child = Command::new("sh")
                .arg("-c")
                .arg(format!("read _; {script}"))
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn sh");
            let pid = child.id();
            let mut stdin = child.stdin.take().expect("piped stdin");
            self.children.push(child);
            cg.attach(pid).expect("attach");
            stdin.write_all(b"go\n").expect("release the script");
            self.children.len() - 1
        }

        /// Waits for a started shell to end, at most `limit`.
        fn wait(&mut self, child: usize, limit: Duration) -> ExitStatus {
            let deadline = Instant::now() + limit;
            loop {
                if let Some(status) = self.children[child].try_wait().expect("try_wait") {
                    return status;
                }
                assert!(
                    Instant::now() < deadline,
                    "the process did not end in {limit:?}"
                );
                thread::sleep(Duration::from_millis(10));
            }
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            for id in &self.ids {
                if let Some(cg) = self.root.open(id) {
                    let _ = cg.remove();
                }
            }
            for child in &mut self.children {
                let _ = child.kill();
                let _ = child.wait();
            }
            for dir in &self.bases {
                let _ = fs::remove_dir(dir);
            }
        }
    }

    /// Alive: in the process table and not a zombie.
    fn alive(pid: i32) -> bool {
        fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| !rest.starts_with('Z')))
            .unwrap_or(false)
    }

    fn cmdline(pid: i32) -> String {
        fs::read(format!("/proc/{pid}/cmdline"))
            .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
            .unwrap_or_default()
    }

    /// Polls `f` for up to `limit`, answering its first `Some`.
    fn within<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(v) = f() {
                return Some(v);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn a_started_shell_is_in_the_cgroup_with_its_limits_written() {
        let mut t = Scratch::new();
        eprintln!("layout: {}", t.root.describe());
        let cg = t.create(Limits {
            memory_bytes: Some(128 << 20),
            cpu_millis: Some(1500),
            max_tasks: Some(50),
        });
        // `; true` keeps sh waiting on sleep rather than exec'ing it.
        let sh = t.start(&cg, "sleep 30; true");
        let pid = t.children[sh].id() as i32;
        assert!(cg.pids().contains(&pid), "{:?} lacks {pid}", cg.pids());
        let sleep = within(Duration::from_secs(2), || {
            cg.pids()
                .into_iter()
                .find(|&p| cmdline(p).starts_with("sleep 30"))
        });
        assert!(sleep.is_some(), "the shell's child is in the cgroup too");
        assert!(!cg.is_empty());
        assert!(cg.stats().tasks >= 2, "{:?}", cg.stats());
        assert!(cg.stats().memory_bytes > 0, "{:?}", cg.stats());
        // Every hierarchy has it (the launcher's attach is to all of them).
        for file in cg.procs_files() {
            assert!(
                read_procs(&file).contains(&pid),
                "{} lacks {pid}",
                file.display()
            );
        }

        let value = |dir: &Option<PathBuf>, name: &str| {
            fs::read_to_string(dir.as_ref().expect("folder").join(name))
                .expect("read a limit")
                .trim()
                .to_string()
        };
        match cg.version {
            Version::V1 => {
                assert_eq!(value(&cg.dirs.memory, "memory.limit_in_bytes"), "134217728");
                if cg.memsw {
                    assert_eq!(
                        value(&cg.dirs.memory, "memory.memsw.limit_in_bytes"),
                        "134217728"
                    );
                }
                assert_eq!(value(&cg.dirs.pids, "pids.max"), "50");
                assert_eq!(value(&cg.dirs.cpu, "cpu.cfs_quota_us"), "150000");
                assert_eq!(value(&cg.dirs.cpu, "cpu.cfs_period_us"), "100000");
            }
            Version::V2 => {
                assert_eq!(value(&cg.dirs.unified, "memory.max"), "134217728");
                assert_eq!(value(&cg.dirs.unified, "memory.oom.group"), "0");
                assert_eq!(value(&cg.dirs.unified, "pids.max"), "50");
                assert_eq!(value(&cg.dirs.unified, "cpu.max"), "150000 100000");
            }
        }

        // The grace period's SIGTERM reaches both.
        assert_eq!(cg.signal_all(Signal::SIGTERM), 2);
        let status = t.wait(sh, Duration::from_secs(5));
        assert_eq!(status.signal(), Some(Signal::SIGTERM as i32));
        assert!(within(Duration::from_secs(2), || cg.is_empty().then_some(())).is_some());
    }

    #[test]
    fn a_memory_hog_is_oom_killed_at_the_limit() {
        let mut t = Scratch::new();
        let cg = t.create(Limits {
            memory_bytes: Some(64 << 20),
            ..Limits::default()
        });
        assert_eq!(cg.oom_kills(), 0);
        // 256 chunks of 1 MiB, each written (not just reserved), kept alive.
        let hog = t.start(
            &cg,
            "exec python3 -c 'b = []\nfor i in range(256): b.append(bytes([1]) * (1 << 20))\nprint(len(b))'",
        );
        let status = t.wait(hog, Duration::from_secs(30));
        assert_eq!(
            status.signal(),
            Some(9),
            "the hog was not killed: {status:?}"
        );
        assert!(cg.oom_kills() >= 1, "oom_kills = {}", cg.oom_kills());
    }

    #[test]
    fn tasks_stop_at_max_tasks_and_kill_ends_them_all() {
        let mut t = Scratch::new();
        let cg = t.create(Limits {
            max_tasks: Some(32),
            ..Limits::default()
        });
        t.start(&cg, "for i in $(seq 200); do sleep 30 & done; wait");
        // Watch it fill up, and never past the limit.
        let mut most = 0;
        let start = Instant::now();
        while start.elapsed() < Duration::from_millis(1500) {
            let n = cg.stats().tasks;
            assert!(n <= 32, "{n} tasks under max_tasks 32");
            most = most.max(n);
            thread::sleep(Duration::from_millis(5));
        }
        assert!(
            most >= 30,
            "the loop reached only {most} tasks: was it running?"
        );
        let before = cg.pids();
        assert!(before.len() >= 30, "{} processes", before.len());

        let start = Instant::now();
        cg.kill().expect("kill");
        let took = start.elapsed();
        assert!(took < Duration::from_secs(1), "kill took {took:?}");
        assert!(cg.is_empty(), "{:?} survived", cg.pids());
        let survivors: Vec<i32> = before.into_iter().filter(|&p| alive(p)).collect();
        assert!(survivors.is_empty(), "{survivors:?} survived");
        eprintln!("killed a full cgroup of 32 tasks in {took:?}");
    }

    #[test]
    fn kill_ends_a_fork_bomb_that_forks_while_we_kill() {
        let mut t = Scratch::new();
        let cg = t.create(Limits {
            max_tasks: Some(64),
            ..Limits::default()
        });
        t.start(&cg, "f() { f & f; }; f");
        let full = within(Duration::from_secs(5), || {
            (cg.stats().tasks >= 40).then_some(())
        });
        assert!(full.is_some(), "the bomb never got going: {:?}", cg.stats());
        let start = Instant::now();
        cg.kill().expect("kill");
        let took = start.elapsed();
        assert!(cg.is_empty(), "{:?} survived", cg.pids());
        assert!(took < Duration::from_secs(1), "kill took {took:?}");
        // And nothing comes back.
        thread::sleep(Duration::from_millis(100));
        assert!(cg.is_empty(), "{:?} came back", cg.pids());
        eprintln!("killed a fork bomb in {took:?}");
    }

    /// Ends a fork bomb (and a `setsid` escapee) with the freezer rounds alone.
    fn freezer_ends_a_fork_bomb(mut t: Scratch) {
        let cg = t.create(Limits {
            max_tasks: Some(64),
            ..Limits::default()
        });
        assert!(!cg.kill);
        t.start(
            &cg,
            "setsid -f env -i sh -c 'sleep 300 &'; f() { f & f; }; f",
        );
        let full = within(Duration::from_secs(5), || {
            (cg.stats().tasks >= 40).then_some(())
        });
        assert!(full.is_some(), "the bomb never got going: {:?}", cg.stats());
        let before = cg.pids();
        let start = Instant::now();
        cg.kill().expect("kill");
        let took = start.elapsed();
        assert!(cg.is_empty(), "{:?} survived", cg.pids());
        assert!(took < Duration::from_secs(1), "kill took {took:?}");
        let survivors: Vec<i32> = before.into_iter().filter(|&p| alive(p)).collect();
        assert!(survivors.is_empty(), "{survivors:?} survived");
        thread::sleep(Duration::from_millis(100));
        assert!(cg.is_empty(), "{:?} came back", cg.pids());
        // Thawed again, whichever freezer it was.
        if let Some(freezer) = &cg.dirs.freezer {
            let state = fs::read_to_string(freezer.join("freezer.state")).expect("state");
            assert_eq!(state.trim(), "THAWED");
        } else {
            let unified = cg.dirs.unified.as_ref().expect("a v2 freezer");
            let state = fs::read_to_string(unified.join("cgroup.freeze")).expect("state");
            assert_eq!(state.trim(), "0");
        }
        eprintln!("the freezer ended a fork bomb in {took:?}");
    }

    /// A hybrid host without the unified hierarchy (or a kernel before 5.14): the v1 freezer.
    #[test]
    fn without_cgroup_kill_the_v1_freezer_ends_a_fork_bomb() {
        let mut t = Scratch::new();
        t.root.kill = false;
        if t.root.version == Version::V1 {
            assert!(t.root.dirs.freezer.is_some(), "this host has a v1 freezer");
            t.root.dirs.unified = None;
        }
        freezer_ends_a_fork_bomb(t);
    }

    /// A v2 kernel with `cgroup.freeze` but no `cgroup.kill` (5.2 to 5.13): v2's freezer.
    #[test]
    fn without_cgroup_kill_the_v2_freezer_ends_a_fork_bomb() {
        let mut t = Scratch::new();
        t.root.kill = false;
        t.root.dirs.freezer = None;
        assert!(
            t.root.dirs.unified.is_some(),
            "this host has a v2 hierarchy"
        );
        freezer_ends_a_fork_bomb(t);
    }

    #[test]
    fn a_busy_loop_gets_no_more_than_its_cpu_share() {
        let mut t = Scratch::new();
        let cg = t.create(Limits {
            cpu_millis: Some(500),
            ..Limits::default()
        });
        // Two busy loops: unlimited they would take up to two CPUs.
        t.start(&cg, "(while :; do :; done) & while :; do :; done");
        thread::sleep(Duration::from_millis(300));
        let (s0, t0) = (cg.stats().cpu_usec, Instant::now());
        thread::sleep(Duration::from_secs(2));
        let (s1, t1) = (cg.stats().cpu_usec, Instant::now());
        let share = (s1 - s0) as f64 / (t1 - t0).as_micros() as f64;
        eprintln!("two busy loops under cpu_millis 500 got {share:.3} CPU-s/s");
        assert!(share <= 0.6, "{share:.3} CPU-s/s under a 0.5 CPU limit");
        assert!(share >= 0.1, "{share:.3} CPU-s/s: did the loops run?");
        cg.kill().expect("kill");
    }

    #[test]
    fn a_setsid_double_forked_process_with_a_cleared_environment_dies_with_the_cgroup() {
        let mut t = Scratch::new();
        let cg = t.create(Limits::default());
        let sh = t.start(&cg, "setsid -f env -i sh -c 'sleep 300 &'");
        // The shell is gone at once; what it started lives on, in a session of its own.
        assert!(t.wait(sh, Duration::from_secs(5)).success());
        let escaped = within(Duration::from_secs(5), || {
            cg.pids()
                .into_iter()
                .find(|&p| cmdline(p).starts_with("sleep 300"))
        })
        .expect("the double-forked sleep is in the cgroup");
        let session = |pid: i32| {
            let stat = fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
            let rest = stat.rsplit_once(") ").expect("stat shape").1.to_string();
            rest.split(' ').nth(3).expect("session field").to_string()
        };
        assert_ne!(session(escaped), session(std::process::id() as i32));
        // `env -i` cleared it: only what sh sets itself (PWD) is left.
        let environ = fs::read(format!("/proc/{escaped}/environ")).expect("environ");
        let environ = String::from_utf8_lossy(&environ);
        assert!(std::env::var_os("PATH").is_some());
        assert!(!environ.contains("PATH="), "{environ}");

        cg.kill().expect("kill");
        assert!(!alive(escaped), "{escaped} survived the kill");
        assert!(cg.is_empty());
    }

    #[test]
    fn a_dropped_handle_is_a_leftover_that_open_and_remove_end() {
        let mut t = Scratch::new();
        assert!(t.root.leftovers().is_empty());
        let cg = t.create(Limits {
            memory_bytes: Some(256 << 20),
            ..Limits::default()
        });
        let id = cg.id().to_string();
        t.start(&cg, "exec sleep 300");
        let pid = within(Duration::from_secs(2), || cg.pids().first().copied()).expect("a pid");
        let dirs: Vec<PathBuf> = cg.dirs.all().iter().map(|d| d.to_path_buf()).collect();
        drop(cg); // the gateway crashed

        assert_eq!(t.root.leftovers(), vec![id.clone()]);
        let again = t.root.open(&id).expect("open the leftover");
        assert_eq!(again.pids(), vec![pid]);
        again.remove().expect("remove");
        assert!(!alive(pid));
        assert!(t.root.leftovers().is_empty());
        assert!(t.root.open(&id).is_none());
        for dir in dirs {
            assert!(!dir.exists(), "{} is still there", dir.display());
        }
    }

    #[test]
    fn remove_leaves_no_folder_even_with_a_child_cgroup() {
        let mut t = Scratch::new();
        let cg = t.create(Limits::default());
        t.start(&cg, "sleep 300 & sleep 300");
        // A cgroup of the sandbox's own, with a process in it.
        let first = cg.dirs.all()[0].to_path_buf();
        let nested = first.join("inner");
        fs::create_dir(&nested).expect("a nested cgroup");
        let inner_sh = t.start(&cg, "sleep 300");
        let inner = t.children[inner_sh].id();
        write_file(&nested.join("cgroup.procs"), &inner.to_string()).expect("move into inner");
        assert!(cg.pids().contains(&(inner as i32)));

        let dirs: Vec<PathBuf> = cg.dirs.all().iter().map(|d| d.to_path_buf()).collect();
        cg.remove().expect("remove");
        for dir in &dirs {
            assert!(!dir.exists(), "{} is still there", dir.display());
        }
        assert!(!nested.exists());
        // The base folders are all that is left, and they are empty.
        for dir in t.root.dirs.all() {
            let left: Vec<_> = fs::read_dir(dir)
                .expect("the base folder")
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.file_name())
                .collect();
            assert!(left.is_empty(), "{} holds {left:?}", dir.display());
        }
    }

    #[test]
    fn invalid_ids_and_limits_are_refused_before_any_folder_is_made() {
        let t = Scratch::new();
        let bad = [
            "short",
            "../../../../etc/passwd0000",
            "ABCDEFGHIJKLMNOPQRSTUVWX",
            "abcdefghij/klmnopqrstuvwx",
            "abcdefghijklmnopqrstuvwx.",
            &"a".repeat(65),
            "",
        ];
        for id in bad {
            assert!(
                matches!(
                    t.root.create(id, &Limits::default()),
                    Err(CgroupError::InvalidId(_))
                ),
                "{id:?} was not refused"
            );
            assert!(t.root.open(id).is_none());
        }
        let id = new_id();
        for limits in [
            Limits {
                cpu_millis: Some(5),
                ..Limits::default()
            },
            Limits {
                memory_bytes: Some(0),
                ..Limits::default()
            },
            Limits {
                max_tasks: Some(0),
                ..Limits::default()
            },
        ] {
            let err = t.root.create(&id, &limits).expect_err("refused");
            assert!(matches!(err, CgroupError::InvalidLimit(_)), "{err}");
        }
        assert!(t.root.leftovers().is_empty());
        assert!(t.root.open(&id).is_none());
        // The message says what to do.
        let err = t
            .root
            .create("short", &Limits::default())
            .expect_err("refused");
        assert!(err.to_string().contains("20-64"), "{err}");
    }

    #[test]
    fn create_twice_is_refused_and_the_first_is_untouched() {
        let mut t = Scratch::new();
        let cg = t.create(Limits::default());
        let err = t
            .root
            .create(cg.id(), &Limits::default())
            .expect_err("a second create");
        assert!(matches!(err, CgroupError::Exists(_)), "{err}");
        assert!(t.root.open(cg.id()).is_some());
    }

    #[test]
    fn attach_pid_writes_only_to_procs_files() {
        let err = attach_pid(&[PathBuf::from("/tmp/not-a-cgroup/tasks")], 1).expect_err("refused");
        assert!(err.to_string().contains("not a cgroup.procs file"), "{err}");
    }

    // The parsers, on the texts of the host kinds this cannot run on.

    const PURE_V2_MOUNTINFO: &str = "\
22 1 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw
25 23 0:23 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
";

    #[test]
    fn a_pure_v2_host_under_systemd() {
        let own = OwnCgroups::find(
            &parse_mountinfo(PURE_V2_MOUNTINFO),
            &parse_proc_cgroup("0::/system.slice/sandgate.service\n"),
        );
        assert_eq!(
            own.v2.as_deref(),
            Some(Path::new("/sys/fs/cgroup/system.slice/sandgate.service"))
        );
        assert!(own.v1.is_empty());
    }

    #[test]
    fn a_hybrid_host_with_co_mounted_controllers() {
        let mountinfo = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime shared:9 - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
        let cgroup = "\
9:name=systemd:/
8:pids:/
6:freezer:/
4:memory:/process_api/63f8
2:cpu,cpuacct:/
0::/
";
        let own = OwnCgroups::find(&parse_mountinfo(mountinfo), &parse_proc_cgroup(cgroup));
        assert_eq!(own.v2.as_deref(), Some(Path::new("/sys/fs/cgroup/unified")));
        assert_eq!(
            own.v1_dir("memory"),
            Some(Path::new("/sys/fs/cgroup/memory/process_api/63f8"))
        );
        assert_eq!(
            own.v1_dir("cpu"),
            Some(Path::new("/sys/fs/cgroup/cpu,cpuacct"))
        );
        assert_eq!(own.v1_dir("cpuacct"), own.v1_dir("cpu"));
        assert_eq!(own.v1_dir("pids"), Some(Path::new("/sys/fs/cgroup/pids")));
        assert_eq!(own.v1_dir("systemd"), None);
        // Co-mounted controllers share one folder, so a sandbox makes it once.
        let dirs = Dirs {
            unified: own.v2.clone(),
            memory: own.v1_dir("memory").map(Path::to_path_buf),
            pids: own.v1_dir("pids").map(Path::to_path_buf),
            cpu: own.v1_dir("cpu").map(Path::to_path_buf),
            cpuacct: own.v1_dir("cpuacct").map(Path::to_path_buf),
            freezer: own.v1_dir("freezer").map(Path::to_path_buf),
        };
        assert_eq!(dirs.all().len(), 5);
        assert_eq!(dirs.all()[0], Path::new("/sys/fs/cgroup/unified"));
    }

    #[test]
    fn a_container_sees_its_cgroup_through_a_bind_mount() {
        let mount = Mount {
            root: "/docker/abc".into(),
            mount_point: PathBuf::from("/sys/fs/cgroup"),
            kind: MountKind::V2,
        };
        assert_eq!(
            resolve(&mount, "/docker/abc"),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        assert_eq!(
            resolve(&mount, "/docker/abc/app"),
            Some(PathBuf::from("/sys/fs/cgroup/app"))
        );
        // Not under the mount, or outside our namespace: not ours to touch.
        assert_eq!(resolve(&mount, "/docker/abcd"), None);
        assert_eq!(resolve(&mount, "/other"), None);
        assert_eq!(resolve(&mount, "/../.."), None);
        let parsed =
            parse_mountinfo("41 31 0:38 /a\\040b /sys/fs/cgroup/x\\134y rw - cgroup2 cgroup2 rw\n");
        assert_eq!(parsed[0].root, "/a b");
        assert_eq!(parsed[0].mount_point, PathBuf::from("/sys/fs/cgroup/x\\y"));
        assert_eq!(unescape("\\04é"), "\\04é");
    }
}
