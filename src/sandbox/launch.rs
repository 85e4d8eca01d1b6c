//! The launcher: sandgate re-executed (`/proc/self/exe`) with a hidden first argument, to
//! build a sandbox or to enter one. Keeping it in the same binary keeps sandgate one file to
//! install, and running it as a fresh process (single-threaded, before any runtime starts) is
//! what lets it change namespaces with safe calls only: no `unsafe` `pre_exec`.
//!
//! Building a sandbox takes three processes:
//! 1. **launch** (child of the gateway): reads its [`LaunchSpec`] from standard input (a
//!    socket), joins the sandbox's cgroup *first* (so nothing it starts is ever outside it),
//!    joins the sandbox's network namespace, makes new mount, PID, UTS, IPC and cgroup
//!    namespaces, and starts
//! 2. **init**, PID 1 of the new PID namespace, which builds the root filesystem
//!    ([`crate::sandbox::mount`]), sets the hostname, sets no-new-privileges and the
//!    per-process limits, empties its capability bounding set, installs the system call
//!    filter ([`crate::sandbox::seccomp`]: both inherited by all it starts), and starts
//! 3. **the command**, as the sandbox's own uid (all capabilities gone with the change of
//!    user), in `/workspace`, with exactly the environment of the spec.
//!
//! init then reaps every orphan until the command ends, and exits with its status; the
//! kernel ends whatever is left in the namespace. launch passes init's "ready"/"error" line
//! back to the gateway and waits. Both block SIGTERM, SIGINT, SIGHUP and SIGQUIT (the gateway
//! signals a whole cgroup; these two must outlive the command's grace period); the command is
//! started with them unblocked (a blocked mask would be inherited across exec).
//!
//! **exec** joins a running sandbox the same way (cgroup, then its namespaces by the
//! descriptors the gateway holds), confines itself as init did, and runs one command as its
//! user; whatever follows the spec line on standard input is the command's.
//!
//! **files** joins a running sandbox as exec does, confines itself the same way, then becomes
//! the sandbox's user itself and performs one file operation ([`crate::sandbox::files`]) in
//! the sandbox's own view of its files: whatever a path or a link planted by the sandbox
//! names, it is resolved in that view, with that user's rights, so no host file is reachable.

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitCode, Stdio};

use nix::sched::{setns, unshare, CloneFlags};
use nix::sys::signal::{SigSet, SigmaskHow, Signal};

use crate::sandbox::spec::{read_line, to_line, ExecSpec, FilesSpec, LaunchSpec, Rlimits};

/// The hidden first arguments.
pub const LAUNCH: &str = "__sandbox-launch";
pub const INIT: &str = "__sandbox-init";
pub const EXEC: &str = "__sandbox-exec";
pub const FILES: &str = "__sandbox-files";

/// The binary that plays the launcher: this one (`/proc/self/exe`, which still names the
/// running file after an upgrade replaced it on disk), unless [`set_launcher`] named another.
static LAUNCHER: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();

/// Names the sandgate binary to launch sandboxes with, for processes that embed the gateway
/// but are not that binary (the integration tests). Has no effect once a sandbox started.
pub fn set_launcher(path: impl Into<std::path::PathBuf>) {
    let _ = LAUNCHER.set(path.into());
}

/// The launcher binary (see [`set_launcher`]).
pub fn launcher() -> &'static std::path::Path {
    LAUNCHER.get_or_init(|| std::path::PathBuf::from("/proc/self/exe"))
}

/// Runs the launcher role named by `role`; `None` when `role` is none of them (the normal CLI).
pub fn dispatch(role: &str) -> Option<ExitCode> {
    match role {
        LAUNCH => Some(run_launch()),
        INIT => Some(run_init()),
        EXEC => Some(run_exec()),
        FILES => Some(run_files()),
        _ => None,
    }
}

/// Exit status for failures of the launcher itself (distinct from a command's own codes).
const LAUNCH_FAILED: u8 = 125;
/// A command that could not be started, as shells report it.
const NOT_RUNNABLE: u8 = 127;

fn termination_signals() -> SigSet {
    let mut set = SigSet::empty();
    for s in [
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGQUIT,
    ] {
        set.add(s);
    }
    set
}

fn block_termination_signals() {
    let _ =
        nix::sys::signal::sigprocmask(SigmaskHow::SIG_BLOCK, Some(&termination_signals()), None);
}

/// Starts `cmd` with those signals unblocked, so the command gets the usual dispositions (a
/// blocked mask is inherited across exec). Should one arrive in that short window, this
/// process ends and the sandbox with it: it was being ended anyway.
fn spawn_unblocked(cmd: &mut Command) -> std::io::Result<std::process::Child> {
    let set = termination_signals();
    let _ = nix::sys::signal::sigprocmask(SigmaskHow::SIG_UNBLOCK, Some(&set), None);
    let child = cmd.spawn();
    let _ = nix::sys::signal::sigprocmask(SigmaskHow::SIG_BLOCK, Some(&set), None);
    child
}

fn join_cgroup(procs: &[std::path::PathBuf]) -> Result<(), String> {
    let me = std::process::id().to_string();
    for file in procs {
        std::fs::write(file, &me)
            .map_err(|e| format!("cannot join the sandbox's cgroup {}: {e}", file.display()))?;
    }
    Ok(())
}

fn join_ns(path: &str, kind: CloneFlags, what: &str) -> Result<(), String> {
    let file = std::fs::File::open(path)
        .map_err(|e| format!("cannot open the sandbox's {what} namespace: {e}"))?;
    setns(file.as_fd(), kind)
        .map_err(|e| format!("cannot join the sandbox's {what} namespace: {e}"))
}

fn apply_rlimits(limits: &Rlimits) -> Result<(), String> {
    use nix::sys::resource::{setrlimit, Resource};
    if let Some(secs) = limits.cpu_secs {
        setrlimit(Resource::RLIMIT_CPU, secs, secs)
            .map_err(|e| format!("cannot limit CPU time: {e}"))?;
    }
    if let Some(n) = limits.open_files {
        setrlimit(Resource::RLIMIT_NOFILE, n, n)
            .map_err(|e| format!("cannot limit open files: {e}"))?;
    }
    Ok(())
}

/// The command as the sandbox's user: supplementary groups dropped, uid and gid changed (which
/// clears every capability), a clean signal mask, exactly the spec's environment.
fn user_command(
    argv: &[String],
    uid: u32,
    gid: u32,
    env: &std::collections::BTreeMap<String, String>,
    cwd: &std::path::Path,
) -> Result<Command, String> {
    let (program, args) = argv.split_first().ok_or("no command")?;
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env_clear()
        .envs(env)
        .current_dir(cwd)
        // As root, the standard library also drops every supplementary group here.
        .gid(gid)
        .uid(uid);
    Ok(cmd)
}

fn run_launch() -> ExitCode {
    block_termination_signals();
    // Standard input is a socket to the gateway: the spec comes in, "ready" goes back.
    let Ok(fd) = std::io::stdin().as_fd().try_clone_to_owned() else {
        return ExitCode::from(LAUNCH_FAILED);
    };
    let mut control = std::os::unix::net::UnixStream::from(fd);
    let spec: LaunchSpec = match read_line(&mut control) {
        Ok(s) => s,
        Err(e) => {
            let _ = writeln!(control, "error cannot read the launch spec: {e}");
            return ExitCode::from(LAUNCH_FAILED);
        }
    };
    let fail = |mut control: &std::os::unix::net::UnixStream, msg: String| {
        let _ = writeln!(control, "error {}", msg.replace('\n', " "));
        ExitCode::from(LAUNCH_FAILED)
    };
    if let Err(e) = join_cgroup(&spec.cgroup_procs) {
        return fail(&control, e);
    }
    if let Err(e) = join_ns(&spec.netns, CloneFlags::CLONE_NEWNET, "network") {
        return fail(&control, e);
    }
    let flags = CloneFlags::CLONE_NEWNS
        | CloneFlags::CLONE_NEWPID
        | CloneFlags::CLONE_NEWUTS
        | CloneFlags::CLONE_NEWIPC
        | CloneFlags::CLONE_NEWCGROUP;
    if let Err(e) = unshare(flags) {
        return fail(
            &control,
            format!("cannot create the sandbox's namespaces: {e}"),
        );
    }
    let (mut ours, theirs) = match std::os::unix::net::UnixStream::pair() {
        Ok(p) => p,
        Err(e) => return fail(&control, format!("cannot make a socket pair: {e}")),
    };
    // The next child is PID 1 of the new PID namespace.
    let mut init = match Command::new("/proc/self/exe")
        .arg(INIT)
        .stdin(Stdio::from(std::os::fd::OwnedFd::from(theirs)))
        .env_clear()
        .spawn()
    {
        Ok(c) => c,
        Err(e) => return fail(&control, format!("cannot start the sandbox's init: {e}")),
    };
    if let Err(e) = ours.write_all(&to_line(&spec)) {
        return fail(&control, format!("cannot hand init its spec: {e}"));
    }
    drop(spec);
    // init's first line ("ready" or "error ...") goes back to the gateway as it is.
    let mut answer = Vec::new();
    let mut byte = [0u8; 1];
    while let Ok(1) = ours.read(&mut byte) {
        answer.push(byte[0]);
        if byte[0] == b'\n' || answer.len() > 64 * 1024 {
            break;
        }
    }
    if answer.is_empty() {
        answer.extend_from_slice(b"error the sandbox's init ended before it was ready\n");
    }
    let _ = control.write_all(&answer);
    drop(control);
    let status = init.wait();
    ExitCode::from(exit_byte(status))
}

/// A child's status as an exit code: its own code, or 128 + the signal that killed it.
fn exit_byte(status: std::io::Result<std::process::ExitStatus>) -> u8 {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(c), _) => u8::try_from(c & 0xff).unwrap_or(LAUNCH_FAILED),
            (None, Some(sig)) => u8::try_from(128 + (sig & 0x7f)).unwrap_or(LAUNCH_FAILED),
            _ => LAUNCH_FAILED,
        },
        Err(_) => LAUNCH_FAILED,
    }
}

fn run_init() -> ExitCode {
    block_termination_signals();
    let mut control = std::io::stdin();
    let spec: LaunchSpec = match read_line(&mut control) {
        Ok(s) => s,
        Err(_) => return ExitCode::from(LAUNCH_FAILED),
    };
    let mut out = std::io::stdin()
        .as_fd()
        .try_clone_to_owned()
        .map(std::os::unix::net::UnixStream::from)
        .ok();
    let mut say = move |line: &str| {
        if let Some(mut s) = out.take() {
            let _ = writeln!(s, "{}", line.replace('\n', " "));
        }
    };
    let setup = (|| -> Result<(), String> {
        crate::sandbox::mount::build_root(&spec)
            .map_err(|e| format!("cannot build the sandbox's filesystem: {e}"))?;
        nix::unistd::sethostname(&spec.id).map_err(|e| format!("cannot set the hostname: {e}"))?;
        apply_rlimits(&spec.rlimits)?;
        nix::sys::prctl::set_no_new_privs()
            .map_err(|e| format!("cannot set no-new-privileges: {e}"))?;
        Ok(())
    })();
    if let Err(e) = setup {
        say(&format!("error {e}"));
        return ExitCode::from(LAUNCH_FAILED);
    }
    let cwd = spec
        .image
        .as_ref()
        .map_or_else(|| std::path::PathBuf::from("/workspace"), |i| i.cwd.clone());
    let mut cmd = match user_command(&spec.command, spec.uid, spec.gid, &spec.env, &cwd) {
        Ok(c) => c,
        Err(e) => {
            say(&format!("error {e}"));
            return ExitCode::from(LAUNCH_FAILED);
        }
    };
    drop(spec);
    cmd.stdin(Stdio::null());
    // The last step: from here on init itself runs under the filter, and so does all that
    // the command starts (init needs nothing it refuses, only to wait and to say "ready").
    if let Err(e) = crate::sandbox::seccomp::confine() {
        say(&format!("error {e}"));
        return ExitCode::from(LAUNCH_FAILED);
    }
    let child = match spawn_unblocked(&mut cmd) {
        Ok(c) => c,
        Err(e) => {
            // Said on the sandbox's output (its log) and reported as a failed start.
            let program = cmd.get_program().to_string_lossy().into_owned();
            eprintln!("sandgate: cannot run `{program}`: {e}");
            say("ready");
            return ExitCode::from(NOT_RUNNABLE);
        }
    };
    say("ready");
    reap_until(child.id())
}

/// PID 1's duty: reap every process that ends (orphans are re-parented to it), and leave with
/// the main command's status.
fn reap_until(main: u32) -> ExitCode {
    use nix::sys::wait::{waitpid, WaitStatus};
    let main = nix::unistd::Pid::from_raw(i32::try_from(main).unwrap_or(i32::MAX));
    loop {
        match waitpid(None, None) {
            Ok(WaitStatus::Exited(pid, code)) if pid == main => {
                return ExitCode::from(u8::try_from(code & 0xff).unwrap_or(LAUNCH_FAILED))
            }
            Ok(WaitStatus::Signaled(pid, sig, _)) if pid == main => {
                return ExitCode::from(u8::try_from(128 + (sig as i32)).unwrap_or(LAUNCH_FAILED))
            }
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => {}
            Err(_) => return ExitCode::from(LAUNCH_FAILED),
        }
    }
}

/// Joins a running sandbox: its cgroup first (so nothing of this process is ever outside it),
/// then its namespaces by the paths the gateway gave, the mount namespace last (the others
/// are opened by host paths). The PID namespace applies to children only.
fn join_sandbox(
    cgroup_procs: &[std::path::PathBuf],
    namespaces: &std::collections::BTreeMap<String, String>,
) -> Result<(), String> {
    join_cgroup(cgroup_procs)?;
    for (name, kind) in [
        ("ipc", CloneFlags::CLONE_NEWIPC),
        ("uts", CloneFlags::CLONE_NEWUTS),
        ("net", CloneFlags::CLONE_NEWNET),
        ("pid", CloneFlags::CLONE_NEWPID),
        ("cgroup", CloneFlags::CLONE_NEWCGROUP),
        ("mnt", CloneFlags::CLONE_NEWNS),
    ] {
        if let Some(path) = namespaces.get(name) {
            join_ns(path, kind, name)?;
        } else if name != "cgroup" {
            return Err(format!("no {name} namespace given"));
        }
    }
    Ok(())
}

/// The files role: everything it has to say goes to standard output as the reply line of
/// [`crate::sandbox::files`], failures to join included.
fn run_files() -> ExitCode {
    use crate::sandbox::files::{self, Reply};
    // Unbuffered, as exec: what follows the spec line is the file's content.
    let (Ok(input), Ok(output)) = (
        std::io::stdin().as_fd().try_clone_to_owned(),
        std::io::stdout().as_fd().try_clone_to_owned(),
    ) else {
        return ExitCode::from(LAUNCH_FAILED);
    };
    let mut input = std::fs::File::from(input);
    let mut output = std::fs::File::from(output);
    let spec: FilesSpec = match read_line(&mut input) {
        Ok(s) => s,
        Err(e) => {
            files::reply(
                &mut output,
                &Reply::failed(format!("cannot read the files spec: {e}")),
            );
            return ExitCode::from(LAUNCH_FAILED);
        }
    };
    let entered = (|| -> Result<(), String> {
        join_sandbox(&spec.cgroup_procs, &spec.namespaces)?;
        nix::sys::prctl::set_no_new_privs()
            .map_err(|e| format!("cannot set no-new-privileges: {e}"))?;
        // Confined as exec is (setns is among the refused calls: after joining)...
        crate::sandbox::seccomp::confine()?;
        // ... then the sandbox's user, for good: no supplementary group, and with the change
        // of uid every capability goes (and the process becomes undumpable).
        nix::unistd::setgroups(&[]).map_err(|e| format!("cannot drop groups: {e}"))?;
        nix::unistd::setgid(nix::unistd::Gid::from_raw(spec.gid))
            .map_err(|e| format!("cannot become the sandbox's group: {e}"))?;
        nix::unistd::setuid(nix::unistd::Uid::from_raw(spec.uid))
            .map_err(|e| format!("cannot become the sandbox's user: {e}"))?;
        if nix::unistd::geteuid().is_root() || nix::unistd::getegid().as_raw() == 0 {
            return Err("the file operation would run as root; refusing".into());
        }
        nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
        Ok(())
    })();
    if let Err(e) = entered {
        files::reply(&mut output, &Reply::failed(e));
        return ExitCode::from(LAUNCH_FAILED);
    }
    files::perform(&spec, &mut input, &mut output)
}

fn run_exec() -> ExitCode {
    block_termination_signals();
    // Unbuffered (`Stdin` would read ahead): what follows the spec line is the command's.
    let Ok(fd) = std::io::stdin().as_fd().try_clone_to_owned() else {
        return ExitCode::from(LAUNCH_FAILED);
    };
    let spec: ExecSpec = match read_line(std::fs::File::from(fd)) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("sandgate: cannot read the exec spec: {e}");
            return ExitCode::from(LAUNCH_FAILED);
        }
    };
    let joined = (|| -> Result<(), String> {
        join_sandbox(&spec.cgroup_procs, &spec.namespaces)?;
        apply_rlimits(&spec.rlimits)?;
        nix::sys::prctl::set_no_new_privs()
            .map_err(|e| format!("cannot set no-new-privileges: {e}"))?;
        Ok(())
    })();
    if let Err(e) = joined {
        eprintln!("sandgate: {e}");
        return ExitCode::from(LAUNCH_FAILED);
    }
    let mut cmd = match user_command(&spec.command, spec.uid, spec.gid, &spec.env, &spec.cwd) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("sandgate: {e}");
            return ExitCode::from(LAUNCH_FAILED);
        }
    };
    drop(spec);
    // Last, once the namespaces are joined (setns is among the refused calls).
    if let Err(e) = crate::sandbox::seccomp::confine() {
        eprintln!("sandgate: {e}");
        return ExitCode::from(LAUNCH_FAILED);
    }
    // The rest of standard input is the command's; the child joins the sandbox's PID
    // namespace (setns applies to children).
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            eprintln!(
                "sandgate: cannot run `{}`: {e}",
                cmd.get_program().to_string_lossy()
            );
            return ExitCode::from(NOT_RUNNABLE);
        }
    };
    match child.wait() {
        Ok(s) => {
            use std::os::unix::process::ExitStatusExt;
            if let Some(sig) = s.signal() {
                // Die the same way, so the gateway sees the signal, not a made-up code.
                if let Ok(sig) = Signal::try_from(sig) {
                    let mut set = SigSet::empty();
                    set.add(sig);
                    let _ =
                        nix::sys::signal::sigprocmask(SigmaskHow::SIG_UNBLOCK, Some(&set), None);
                    let _ = nix::sys::signal::raise(sig);
                }
            }
            ExitCode::from(exit_byte(Ok(s)))
        }
        Err(_) => ExitCode::from(LAUNCH_FAILED),
    }
}
