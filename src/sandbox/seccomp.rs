//! What an isolated sandbox's commands may still ask of the kernel: a system call filter and
//! an empty capability bounding set, applied by the launcher's init and exec roles
//! ([`crate::sandbox::launch`]) right before they start a command, and inherited by everything
//! it starts (a seccomp filter survives fork and exec and cannot be removed).
//!
//! **The filter** is a deny list over a default of allow, in the spirit of Docker's default
//! profile but the other way round: ordinary programs (shells, compilers, servers, debuggers)
//! run unchanged, and the calls that are refused are those that reach kernel code which has
//! little to do with running a program and a long record of privilege escalations. Each entry
//! of the `REFUSED` table says why it is there. In short:
//! - new namespaces: `unshare` with any `CLONE_NEW*` flag, `clone` with any of them in its
//!   flags (a user namespace would hand the command a full set of capabilities inside it,
//!   and with them the mount and network code), and `setns`;
//! - `clone3` answers `ENOSYS`: its flags are in a struct that a filter cannot read, and
//!   glibc falls back to `clone`, whose flags it can;
//! - mounting in all its forms (`mount`, the new mount API, `pivot_root`), the kernel keyring,
//!   `bpf`, `userfaultfd`, `perf_event_open`, `io_uring`, loading kernels and modules,
//!   handle-based opens, swap, `reboot`, `syslog`, `acct`, `quotactl`.
//!
//! A refused call fails with `EPERM` (what an unprivileged caller gets anyway for most of
//! them), so programs that probe for a feature fall back instead of dying. `ptrace` stays
//! allowed: gdb and strace inside the sandbox are legitimate, and the sandbox's PID namespace
//! and uid already keep them to the sandbox's own processes.
//!
//! The filter is compiled for the architecture sandgate was built for (x86_64 or aarch64):
//! a call made through another ABI (32-bit calls on x86_64) kills the process, and on x86_64
//! calls through the x32 ABI's numbers (a second number for every call, where the kernel
//! enables x32) answer `ENOSYS`. On another architecture there is no filter, and isolated
//! sandboxes refuse to start, saying so.
//!
//! **Capabilities**: the command runs as the sandbox's own uid, which leaves it no capability.
//! On top of that the bounding set, the ambient and the inheritable sets are emptied before it
//! starts, so that not even an exec of a set-uid or file-capability program (already refused
//! by no-new-privileges) could bring one back. The launcher keeps its own permitted set: it
//! still needs `CAP_SETUID` and `CAP_SETGID` to start the command as the sandbox's user.

#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
use std::collections::BTreeMap;

use caps::CapSet;
use nix::libc;
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule,
};

/// When a listed call is refused.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
#[derive(Debug, Clone, Copy)]
enum When {
    /// Always.
    Always,
    /// When its first argument (the flags) has any of these bits set.
    AnyFlag(u64),
}

/// One refused system call.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
#[derive(Debug)]
struct Refused {
    nr: libc::c_long,
    name: &'static str,
    when: When,
    /// The error it fails with.
    errno: i32,
    /// Why it is refused (for the reader and the tests: nothing prints it).
    #[cfg_attr(not(test), allow(dead_code))]
    why: &'static str,
}

/// The namespace flags that `clone` can carry. `CLONE_NEWTIME` is not among them: its bit is
/// part of `clone`'s exit-signal byte (only `unshare` and `clone3` take it).
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
const CLONE_NAMESPACES: u64 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWCGROUP
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET) as u64;

/// Every namespace flag `unshare` takes.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
const UNSHARE_NAMESPACES: u64 = CLONE_NAMESPACES | libc::CLONE_NEWTIME as u64;

/// A call refused with `EPERM` whatever its arguments.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
const fn refuse(nr: libc::c_long, name: &'static str, why: &'static str) -> Refused {
    Refused {
        nr,
        name,
        when: When::Always,
        errno: libc::EPERM,
        why,
    }
}

/// The system calls an isolated sandbox's commands cannot make; everything else is allowed.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
const REFUSED: &[Refused] = &[
    Refused {
        nr: libc::SYS_clone,
        name: "clone",
        when: When::AnyFlag(CLONE_NAMESPACES),
        errno: libc::EPERM,
        why: "new namespaces: a user namespace hands out a full set of capabilities inside it",
    },
    Refused {
        nr: libc::SYS_clone3,
        name: "clone3",
        when: When::Always,
        errno: libc::ENOSYS,
        why: "its flags are in memory the filter cannot read; ENOSYS makes glibc use clone",
    },
    Refused {
        nr: libc::SYS_unshare,
        name: "unshare",
        when: When::AnyFlag(UNSHARE_NAMESPACES),
        errno: libc::EPERM,
        why: "new namespaces, as for clone (unsharing files or fs stays allowed)",
    },
    refuse(libc::SYS_setns, "setns", "joining other namespaces"),
    refuse(libc::SYS_mount, "mount", "changing the filesystem view"),
    refuse(
        libc::SYS_umount2,
        "umount2",
        "uncovering what a mount hides",
    ),
    refuse(libc::SYS_pivot_root, "pivot_root", "changing the root"),
    refuse(libc::SYS_move_mount, "move_mount", "the new mount API"),
    refuse(libc::SYS_open_tree, "open_tree", "the new mount API"),
    refuse(libc::SYS_fsopen, "fsopen", "the new mount API"),
    refuse(libc::SYS_fsconfig, "fsconfig", "the new mount API"),
    refuse(libc::SYS_fsmount, "fsmount", "the new mount API"),
    refuse(libc::SYS_fspick, "fspick", "the new mount API"),
    refuse(
        libc::SYS_mount_setattr,
        "mount_setattr",
        "the new mount API",
    ),
    refuse(
        libc::SYS_keyctl,
        "keyctl",
        "the kernel keyring is not namespaced",
    ),
    refuse(
        libc::SYS_add_key,
        "add_key",
        "the kernel keyring is not namespaced",
    ),
    refuse(
        libc::SYS_request_key,
        "request_key",
        "the kernel keyring is not namespaced",
    ),
    refuse(
        libc::SYS_bpf,
        "bpf",
        "BPF programs run in the kernel: a frequent escalation path",
    ),
    refuse(
        libc::SYS_userfaultfd,
        "userfaultfd",
        "stalls kernel code at will: a common exploit helper",
    ),
    refuse(
        libc::SYS_perf_event_open,
        "perf_event_open",
        "host-wide profiling data and a large attack surface",
    ),
    refuse(libc::SYS_kexec_load, "kexec_load", "loading a new kernel"),
    refuse(
        libc::SYS_kexec_file_load,
        "kexec_file_load",
        "loading a new kernel",
    ),
    refuse(
        libc::SYS_init_module,
        "init_module",
        "loading kernel modules",
    ),
    refuse(
        libc::SYS_finit_module,
        "finit_module",
        "loading kernel modules",
    ),
    refuse(
        libc::SYS_delete_module,
        "delete_module",
        "unloading kernel modules",
    ),
    refuse(
        libc::SYS_open_by_handle_at,
        "open_by_handle_at",
        "opens files by handle, past the mount namespace (the 'shocker' escape)",
    ),
    refuse(
        libc::SYS_name_to_handle_at,
        "name_to_handle_at",
        "the other half of handle-based opens",
    ),
    refuse(libc::SYS_swapon, "swapon", "host memory management"),
    refuse(libc::SYS_swapoff, "swapoff", "host memory management"),
    refuse(libc::SYS_reboot, "reboot", "the host's power"),
    refuse(libc::SYS_syslog, "syslog", "the host's kernel log"),
    refuse(libc::SYS_acct, "acct", "host-wide process accounting"),
    refuse(libc::SYS_quotactl, "quotactl", "host filesystems' quotas"),
    refuse(
        libc::SYS_lookup_dcookie,
        "lookup_dcookie",
        "host paths from profiling cookies",
    ),
    refuse(
        libc::SYS_io_uring_setup,
        "io_uring_setup",
        "io_uring: a large attack surface that bypasses this filter's view of calls",
    ),
    refuse(libc::SYS_io_uring_enter, "io_uring_enter", "io_uring"),
    refuse(libc::SYS_io_uring_register, "io_uring_register", "io_uring"),
];

/// Empties this process's capability bounding set and its ambient and inheritable sets, so
/// that nothing it starts can hold a capability. Its own permitted and effective sets stay.
pub fn drop_capabilities() -> Result<(), String> {
    let fail = |e: caps::errors::CapsError| format!("cannot drop the sandbox's capabilities: {e}");
    // Capabilities newer than the `caps` crate knows of would stay in the bounding set; as
    // of Linux 6.18 the last one is CAP_CHECKPOINT_RESTORE, which it knows.
    caps::clear(None, CapSet::Bounding).map_err(fail)?;
    caps::clear(None, CapSet::Ambient).map_err(fail)?;
    caps::clear(None, CapSet::Inheritable).map_err(fail)?;
    Ok(())
}

/// Installs the filter on every thread of this process. Needs no-new-privileges or
/// `CAP_SYS_ADMIN`; the launcher has both.
pub fn apply_filter() -> Result<(), String> {
    for program in programs()? {
        seccompiler::apply_filter_all_threads(&program)
            .map_err(|e| format!("cannot apply the sandbox's system call filter: {e}"))?;
    }
    Ok(())
}

/// Drops the capabilities and installs the filter: the last step before a command starts.
pub fn confine() -> Result<(), String> {
    drop_capabilities()?;
    apply_filter()
}

/// The filter for the architecture sandgate was built for, as the programs to install.
///
/// A seccompiler filter has one action for the calls it matches, so there is one program per
/// error in [`REFUSED`] (each allows what it does not list). The kernel runs every installed
/// program on each call and keeps the strictest answer; no call is in two of them.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
fn programs() -> Result<Vec<BpfProgram>, String> {
    #[cfg(target_arch = "x86_64")]
    let arch = seccompiler::TargetArch::x86_64;
    #[cfg(target_arch = "aarch64")]
    let arch = seccompiler::TargetArch::aarch64;
    let fail = |e: seccompiler::BackendError| {
        format!("cannot apply the sandbox's system call filter: cannot compile it: {e}")
    };
    let mut by_errno: BTreeMap<i32, BTreeMap<i64, Vec<SeccompRule>>> = BTreeMap::new();
    for call in REFUSED {
        let rules = match call.when {
            // No rule: the call matches whatever its arguments.
            When::Always => Vec::new(),
            // One rule per bit (rules are or-ed): refused when any of them is set. The flags
            // are compared in their low 32 bits, all that either call reads of them.
            When::AnyFlag(mask) => (0..64)
                .map(|bit| 1u64 << bit)
                .filter(|bit| mask & bit != 0)
                .map(|bit| {
                    SeccompCondition::new(
                        0,
                        SeccompCmpArgLen::Dword,
                        SeccompCmpOp::MaskedEq(bit),
                        bit,
                    )
                    .and_then(|c| SeccompRule::new(vec![c]))
                })
                .collect::<Result<_, _>>()
                .map_err(|e| fail(e) + &format!(" (the rules of {})", call.name))?,
        };
        by_errno
            .entry(call.errno)
            .or_default()
            .insert(call.nr, rules);
    }
    let mut programs = Vec::new();
    for (errno, rules) in by_errno {
        let errno = u32::try_from(errno).expect("errno constants are positive");
        let filter = SeccompFilter::new(
            rules,
            SeccompAction::Allow,
            SeccompAction::Errno(errno),
            arch,
        )
        .map_err(fail)?;
        programs.push(BpfProgram::try_from(filter).map_err(fail)?);
    }
    #[cfg(target_arch = "x86_64")]
    programs.push(x32_guard());
    Ok(programs)
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
fn programs() -> Result<Vec<seccompiler::BpfProgram>, String> {
    Err(format!(
        "cannot apply the sandbox's system call filter: sandgate has none for {} (only for \
         x86_64 and aarch64); run isolated sandboxes on one of those",
        std::env::consts::ARCH
    ))
}

/// On x86_64, calls through the x32 ABI carry the 64-bit audit architecture (so seccompiler's
/// architecture check lets them through) and numbers with bit 30 set, which no list of 64-bit
/// numbers matches: a second name for every refused call on kernels that enable x32. This
/// program answers every one of them `ENOSYS`, as a kernel without x32 does. seccompiler has
/// no comparison on the call number itself, hence four instructions by hand:
/// `ld nr; jge X32_BIT, +0, +1; ret ERRNO(ENOSYS); ret ALLOW`.
#[cfg(target_arch = "x86_64")]
fn x32_guard() -> BpfProgram {
    use seccompiler::sock_filter;
    // libc's opcodes are u32; sock_filter's code is 16 bits, which each fits.
    const fn op(code: u32) -> u16 {
        code as u16
    }
    const LD_W_ABS: u16 = op(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS);
    const JMP_JGE_K: u16 = op(libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K);
    const RET_K: u16 = op(libc::BPF_RET | libc::BPF_K);
    /// Offset of `nr` in `struct seccomp_data`.
    const NR_OFFSET: u32 = 0;
    /// Bit 30 of a call number selects the x32 ABI.
    const X32_SYSCALL_BIT: u32 = 0x4000_0000;
    let insn = |code, jt, jf, k| sock_filter { code, jt, jf, k };
    vec![
        insn(LD_W_ABS, 0, 0, NR_OFFSET),
        insn(JMP_JGE_K, 0, 1, X32_SYSCALL_BIT),
        insn(
            RET_K,
            0,
            0,
            libc::SECCOMP_RET_ERRNO | (libc::ENOSYS as u32 & libc::SECCOMP_RET_DATA),
        ),
        insn(RET_K, 0, 0, libc::SECCOMP_RET_ALLOW),
    ]
}

#[cfg(test)]
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
#[allow(clippy::unwrap_used, reason = "in tests a panic is the failure report")]
mod tests {
    use super::*;
    use nix::errno::Errno;
    use nix::sched::CloneFlags;

    #[test]
    fn the_table_names_each_call_once_and_compiles() {
        let mut seen = std::collections::BTreeSet::new();
        for call in REFUSED {
            assert!(seen.insert(call.nr), "{} is listed twice", call.name);
            assert!(!call.why.is_empty(), "{} says not why", call.name);
        }
        assert!(REFUSED.iter().all(|c| c.name != "ptrace"));
        let programs = programs().unwrap();
        // One per error (EPERM, ENOSYS), and x86_64's x32 guard.
        assert_eq!(
            programs.len(),
            if cfg!(target_arch = "x86_64") { 3 } else { 2 }
        );
    }

    /// The filter installed on one thread of the test (a filter applies to the thread that
    /// installs it and to what that thread starts): refused calls fail with the filter's
    /// errors, where without it they would succeed or fail otherwise, and threads and
    /// processes still start (glibc meets clone3's ENOSYS by falling back to clone).
    #[test]
    fn refused_calls_fail_and_threads_and_processes_still_start() {
        let outcome = std::thread::spawn(|| {
            nix::sys::prctl::set_no_new_privs().unwrap();
            for program in programs().unwrap() {
                seccompiler::apply_filter(&program).unwrap();
            }
            let uts = std::fs::File::open("/proc/self/ns/uts").unwrap();
            let setns = nix::sched::setns(&uts, CloneFlags::CLONE_NEWUTS);
            // Without the filter: EINVAL (a threaded process), or EPERM unprivileged.
            let user_ns = nix::sched::unshare(CloneFlags::CLONE_NEWUSER);
            let mount_ns = nix::sched::unshare(CloneFlags::CLONE_NEWNS);
            // Without the filter: ENOENT.
            let mount = nix::mount::mount(
                None::<&str>,
                "/nonexistent-sandgate-mount-point",
                Some("tmpfs"),
                nix::mount::MsFlags::empty(),
                None::<&str>,
            );
            let thread = std::thread::spawn(|| 6 * 7).join().unwrap();
            let process = std::process::Command::new("sh")
                .args(["-c", "exit 3"])
                .status()
                .map(|s| s.code());
            (
                setns,
                user_ns,
                mount_ns,
                mount,
                thread,
                process.ok().flatten(),
            )
        })
        .join()
        .unwrap();
        assert_eq!(
            outcome,
            (
                Err(Errno::EPERM),
                Err(Errno::EPERM),
                Err(Errno::EPERM),
                Err(Errno::EPERM),
                42,
                Some(3)
            )
        );
    }
}
