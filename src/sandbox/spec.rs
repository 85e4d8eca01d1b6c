//! What the gateway hands its launcher: everything needed to build one sandbox, or to run one
//! command inside an existing one, decided by the gateway and validated before it is sent.
//!
//! Specs travel as one JSON line on the launcher's standard input, never in its arguments or
//! environment (which other host users can read from `/proc`), and never on disk.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Per-process limits that stay `setrlimit` limits (the cgroup holds the sandbox-wide ones).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Rlimits {
    pub cpu_secs: Option<u64>,
    pub open_files: Option<u64>,
}

/// Builds a sandbox: namespaces, root filesystem, user, then its command as the child of a
/// PID 1 that reaps.
#[derive(Clone, Serialize, Deserialize)]
pub struct LaunchSpec {
    /// The sandbox id: its hostname too.
    pub id: String,
    /// An empty folder of the gateway's where the new root is assembled (on a tmpfs mounted
    /// inside the sandbox's own mount namespace: the host never sees what is mounted there).
    pub root: PathBuf,
    /// The host folder bound at `/workspace`, owned by the sandbox's uid.
    pub workspace: PathBuf,
    /// The sandbox's own host uid and gid: never 0, never the gateway's.
    pub uid: u32,
    pub gid: u32,
    /// `cgroup.procs` files the launcher writes its own pid to before anything else.
    pub cgroup_procs: Vec<PathBuf>,
    /// Where to open the sandbox's network namespace (`/proc/<gateway>/fd/<n>`).
    pub netns: String,
    pub command: Vec<String>,
    /// The command's whole environment.
    pub env: BTreeMap<String, String>,
    pub rlimits: Rlimits,
    /// Size of the private `/tmp` (tmpfs, counted against the memory limit).
    pub tmp_bytes: u64,
    /// Volumes to bind into the root; one at `/workspace` replaces the sandbox's own.
    #[serde(default)]
    pub volumes: Vec<VolumeBind>,
    /// An unpacked image to start from instead of the host's trees; `None`: the `host` image.
    #[serde(default)]
    pub image: Option<ImageRoot>,
}

/// An image's root: its `rootfs` read-only under an overlay whose writable layer is the
/// sandbox's own (see [`crate::sandbox::mount`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageRoot {
    /// `<data_dir>/images/<name>/rootfs`.
    pub rootfs: PathBuf,
    /// `<data_dir>/sandboxes/<id>/upper`: the overlay's upper and work folders, and the
    /// generated `/etc` files.
    pub upper: PathBuf,
    /// Where the command starts (the image's `WorkingDir`, else `/workspace`).
    pub cwd: PathBuf,
}

/// One volume's subtree, bound by init at `target` (see [`crate::sandbox::volume`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VolumeBind {
    /// The volume's folder on the host.
    pub dir: PathBuf,
    /// `sub_path`, split and checked: resolved without following links, folders made as the
    /// sandbox's uid.
    pub sub_path: Vec<String>,
    /// Where the sandbox sees it (absolute, validated).
    pub target: PathBuf,
    pub read_only: bool,
}

/// Runs one command inside a running sandbox: its namespaces, cgroup, user, working
/// directory and environment.
#[derive(Clone, Serialize, Deserialize)]
pub struct ExecSpec {
    /// Paths of the sandbox's namespaces to join: `mnt`, `uts`, `ipc`, `net`, `pid`.
    pub namespaces: BTreeMap<String, String>,
    pub cgroup_procs: Vec<PathBuf>,
    pub uid: u32,
    pub gid: u32,
    pub command: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub cwd: PathBuf,
    pub rlimits: Rlimits,
}

// Environments may hold secrets: never print them.
impl std::fmt::Debug for LaunchSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LaunchSpec")
            .field("id", &self.id)
            .field("uid", &self.uid)
            .field("command", &self.command)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for ExecSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecSpec")
            .field("uid", &self.uid)
            .field("command", &self.command)
            .finish_non_exhaustive()
    }
}

/// Largest spec accepted (a spec is a few KiB; the cap only stops a runaway writer).
const MAX_SPEC: usize = 4 * 1024 * 1024;

/// Reads one `\n`-terminated JSON line from `src` one byte at a time, so that nothing after
/// the line is consumed: what follows on the same stream (exec's stdin) belongs to the
/// command.
pub fn read_line<T: serde::de::DeserializeOwned>(mut src: impl Read) -> std::io::Result<T> {
    let mut line = Vec::with_capacity(4096);
    let mut byte = [0u8; 1];
    loop {
        match src.read(&mut byte) {
            Ok(0) => break,
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) => {
                line.push(byte[0]);
                if line.len() > MAX_SPEC {
                    return Err(std::io::Error::other("launch spec too large"));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    serde_json::from_slice(&line)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// One spec as the line [`read_line`] takes.
pub fn to_line<T: Serialize>(spec: &T) -> Vec<u8> {
    let mut line = serde_json::to_vec(spec).expect("specs serialize");
    line.push(b'\n');
    line
}

/// One file operation inside a running sandbox, as its own user sees its files
/// ([`crate::sandbox::files`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FilesSpec {
    /// As [`ExecSpec::namespaces`].
    pub namespaces: BTreeMap<String, String>,
    pub cgroup_procs: Vec<PathBuf>,
    pub uid: u32,
    pub gid: u32,
    /// Where writes and deletes may happen, as the sandbox sees them (`/workspace`, `/tmp`).
    pub writable: Vec<PathBuf>,
    pub op: FileOp,
}

/// What [`FilesSpec`] asks for. Paths are absolute and normalized (no `.`, `..` or `//`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum FileOp {
    /// Standard input carries the content, framed (see [`crate::sandbox::files`]).
    Write {
        path: PathBuf,
        mode: Option<u32>,
    },
    /// A file's bytes, or a folder's listing, on standard output.
    Read {
        path: PathBuf,
    },
    Delete {
        path: PathBuf,
        recursive: bool,
    },
}
