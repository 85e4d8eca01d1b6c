//! File operations on a running isolated sandbox, always as its own user sees its files.
//!
//! The gateway never opens a sandbox's files itself: a path, or a symlink the sandbox planted
//! (`/workspace/x` → `/`), would then be resolved in the host's view with the gateway's rights.
//! Each operation is instead one run of the launcher's `files` role
//! ([`crate::sandbox::launch`]), which joins the sandbox's cgroup and namespaces, takes on the
//! confinement of its commands (no-new-privileges, the system call filter, no capabilities)
//! and its uid and gid, and only then touches a path, in the sandbox's mount namespace. What
//! it can reach is what the sandbox's own user can reach: the host is not in that view at all.
//!
//! The protocol, after the [`FilesSpec`] line on the helper's standard input:
//! - **write**: the content follows on standard input in frames, each a 4-byte big-endian
//!   length and that many bytes, ended by an empty frame. The end is explicit so that an
//!   upload cut short (the client went away, the body broke a limit) is never mistaken for a
//!   complete one: the helper writes into a fresh file beside the target and renames it over
//!   the target only after the end frame, so a reader sees the old content or the new, and a
//!   failed upload leaves nothing. Then one [`Reply`] line.
//! - **read** and **delete**: one [`Reply`] line on standard output; a file's bytes follow a
//!   [`Reply::File`] line, exactly `size` of them.
//!
//! Memory stays bounded at any size: the gateway moves one body chunk at a time through a pipe
//! (whose writes wait while the helper is behind), and the helper copies through a fixed
//! buffer.

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

use crate::sandbox::spec::{FileOp, FilesSpec};

/// The places writes and deletes may touch, as the sandbox sees them.
pub const WRITABLE: &[&str] = &["/workspace", "/tmp"];

/// At most this many entries of a folder are listed (the rest is flagged as truncated).
const MAX_LISTING: usize = 10_000;

/// Largest reply line the gateway reads (a full listing is well under it).
const MAX_REPLY: u64 = 16 * 1024 * 1024;

/// The copy buffer, on both sides.
const CHUNK: usize = 64 * 1024;

/// Why a file operation failed inside the sandbox; each maps to one HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// No such file or folder (in the sandbox's view).
    NotFound,
    /// A folder where a file is needed.
    IsDir,
    /// A folder that is not empty, deleted without `recursive`.
    ExistsNotEmpty,
    /// The sandbox's user may not do that.
    Permission,
    /// The path or the request is not acceptable (read-only place, not a regular file...).
    Invalid,
    /// The sandbox's filesystem is full.
    NoSpace,
    /// Anything else (the helper could not start, join or copy).
    Io,
}

/// One entry of a folder listing, as the helper reports it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Entry {
    pub name: String,
    /// `file`, `dir`, `symlink` (or `other`: devices, sockets, pipes).
    #[serde(rename = "type")]
    pub kind: String,
    pub size: u64,
    /// Permission bits, e.g. `0o644`.
    pub mode: u32,
    /// Unix seconds.
    pub mtime: i64,
}

/// The helper's answer: one JSON line on its standard output.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    /// A regular file: `size` bytes follow.
    File {
        size: u64,
    },
    /// A folder's entries, by name.
    Dir {
        items: Vec<Entry>,
        truncated: bool,
    },
    /// The content is in place.
    Written {
        created: bool,
        size: u64,
    },
    /// The path is gone; `size` when it was a file.
    Deleted {
        size: Option<u64>,
    },
    Error {
        kind: ErrorKind,
        message: String,
    },
}

impl Reply {
    /// An internal failure of the helper.
    pub fn failed(message: impl Into<String>) -> Reply {
        Reply::Error {
            kind: ErrorKind::Io,
            message: message.into(),
        }
    }

    fn error(kind: ErrorKind, message: impl Into<String>) -> Reply {
        Reply::Error {
            kind,
            message: message.into(),
        }
    }
}

/// Writes `reply` as one line on `out`.
pub fn reply(out: &mut impl Write, reply: &Reply) {
    let mut line = serde_json::to_vec(reply).expect("replies serialize");
    line.push(b'\n');
    let _ = out.write_all(&line);
    let _ = out.flush();
}

// ---------------------------------------------------------------------------------------------
// Paths (both sides)

/// `path` as an absolute path with no `.`, empty or `..` components; the error says why not.
pub fn normalize(path: &str) -> Result<PathBuf, String> {
    if !path.starts_with('/') {
        return Err("path must be absolute, as the sandbox sees it (e.g. /workspace/a.txt)".into());
    }
    if path.len() > 4096 || path.contains('\0') {
        return Err("path is too long or holds a NUL byte".into());
    }
    let mut out = PathBuf::from("/");
    for c in Path::new(path).components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(name) => out.push(name),
            Component::ParentDir | Component::Prefix(_) => {
                return Err("path may not contain `..`".into())
            }
        }
    }
    Ok(out)
}

/// Whether `path` (normalized) is strictly inside one of `roots`.
pub fn inside(path: &Path, roots: &[PathBuf]) -> bool {
    roots
        .iter()
        .any(|root| path != root.as_path() && path.starts_with(root))
}

/// The writable places' message, for paths outside them.
pub fn outside_message(roots: &[PathBuf]) -> String {
    let names: Vec<String> = roots.iter().map(|r| r.display().to_string()).collect();
    format!(
        "files can be written and deleted only inside {} (as the sandbox sees them)",
        names.join(" or ")
    )
}

// ---------------------------------------------------------------------------------------------
// Inside the sandbox (the launcher's `files` role, already its user in its mount namespace)

/// Performs `spec.op`, answering on `output`; the exit code is 0 when it succeeded.
pub fn perform(
    spec: &FilesSpec,
    input: &mut std::fs::File,
    output: &mut std::fs::File,
) -> ExitCode {
    let result = match &spec.op {
        FileOp::Write { path, mode } => write_file(path, *mode, &spec.writable, input),
        FileOp::Read { path } => return read_path(path, output),
        FileOp::Delete { path, recursive } => delete_path(path, *recursive, &spec.writable),
    };
    let failed = matches!(result, Reply::Error { .. });
    reply(output, &result);
    ExitCode::from(u8::from(failed))
}

/// An I/O error of an operation on `path`, classified.
fn io_reply(path: &Path, what: &str, e: &std::io::Error) -> Reply {
    use nix::errno::Errno;
    let p = path.display();
    let errno = e.raw_os_error().map(Errno::from_raw);
    match errno {
        Some(Errno::ENOENT) => Reply::error(ErrorKind::NotFound, format!("{p} does not exist")),
        Some(Errno::ENOTDIR) => Reply::error(
            ErrorKind::NotFound,
            format!("{p} does not exist (a folder on the way is a file)"),
        ),
        Some(Errno::EACCES | Errno::EPERM) => Reply::error(
            ErrorKind::Permission,
            format!("the sandbox's user may not {what} {p}"),
        ),
        Some(Errno::EISDIR) => Reply::error(ErrorKind::IsDir, format!("{p} is a folder")),
        Some(Errno::ENOTEMPTY) => Reply::error(
            ErrorKind::ExistsNotEmpty,
            format!("{p} is a folder that is not empty; pass recursive=true to delete it and all it holds"),
        ),
        Some(Errno::EROFS) => Reply::error(
            ErrorKind::Invalid,
            format!("{p} is on a read-only filesystem of the sandbox"),
        ),
        Some(Errno::ENOSPC) => Reply::error(
            ErrorKind::NoSpace,
            format!("no space left on device: cannot {what} {p} (the file system that holds it is full; nothing was written)"),
        ),
        Some(Errno::EDQUOT) => Reply::error(
            ErrorKind::NoSpace,
            format!("disk quota exceeded: cannot {what} {p} (nothing was written)"),
        ),
        Some(Errno::ELOOP | Errno::ENAMETOOLONG | Errno::EEXIST) => {
            Reply::error(ErrorKind::Invalid, format!("cannot {what} {p}: {e}"))
        }
        _ => Reply::failed(format!("cannot {what} {p}: {e}")),
    }
}

/// The real folder that holds `path` (its links resolved in the sandbox's view), checked to be
/// inside a writable place, and the entry's name in it.
fn real_parent<'p>(
    path: &'p Path,
    writable: &[PathBuf],
    create: bool,
) -> Result<(PathBuf, &'p std::ffi::OsStr), Reply> {
    if !inside(path, writable) {
        return Err(Reply::error(ErrorKind::Invalid, outside_message(writable)));
    }
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(Reply::error(ErrorKind::Invalid, outside_message(writable)));
    };
    if create {
        // The deepest folder on the way that exists is checked first, so that a refused
        // write makes no folder either (through a link that leads out).
        let mut existing = parent;
        while std::fs::metadata(existing).is_err() {
            match existing.parent() {
                Some(up) => existing = up,
                None => break,
            }
        }
        confined(existing, path, writable)?;
        std::fs::create_dir_all(parent).map_err(|e| io_reply(parent, "create", &e))?;
    }
    Ok((confined(parent, path, writable)?, name))
}

/// `dir` with its links resolved, when that is inside a writable place.
fn confined(dir: &Path, path: &Path, writable: &[PathBuf]) -> Result<PathBuf, Reply> {
    let real = std::fs::canonicalize(dir).map_err(|e| io_reply(dir, "open", &e))?;
    let roots: Vec<PathBuf> = writable
        .iter()
        .filter_map(|r| std::fs::canonicalize(r).ok())
        .collect();
    if !roots.iter().any(|r| real.starts_with(r)) {
        return Err(Reply::error(
            ErrorKind::Invalid,
            format!(
                "{} leads outside the writable places (through a symlink); {}",
                path.display(),
                outside_message(writable)
            ),
        ));
    }
    Ok(real)
}

fn write_file(
    path: &Path,
    mode: Option<u32>,
    writable: &[PathBuf],
    input: &mut std::fs::File,
) -> Reply {
    let (dir, name) = match real_parent(path, writable, true) {
        Ok(p) => p,
        Err(r) => return r,
    };
    let target = dir.join(name);
    // A symlink at the target is replaced itself (never followed): the rename below.
    let (created, old_mode) = match std::fs::symlink_metadata(&target) {
        Ok(m) if m.is_dir() => {
            return Reply::error(ErrorKind::IsDir, format!("{} is a folder", path.display()))
        }
        Ok(m) if m.is_file() => (false, Some(m.mode() & 0o7777)),
        Ok(_) => (false, None),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => (true, None),
        Err(e) => return io_reply(path, "write", &e),
    };
    let temp = dir.join(format!(
        ".{}.sandgate-{:016x}",
        name.to_string_lossy(),
        rand::random::<u64>()
    ));
    let mut file = match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(&temp)
    {
        Ok(f) => f,
        Err(e) => return io_reply(path, "write", &e),
    };
    let copied = copy_frames(input, &mut file).and_then(|size| {
        let mode = mode.or(old_mode).unwrap_or(0o644);
        file.set_permissions(std::fs::Permissions::from_mode(mode))?;
        std::fs::rename(&temp, &target)?;
        Ok(size)
    });
    match copied {
        Ok(size) => Reply::Written { created, size },
        Err(e) => {
            let _ = std::fs::remove_file(&temp);
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                Reply::error(
                    ErrorKind::Invalid,
                    "the upload was cut short; nothing was written",
                )
            } else {
                io_reply(path, "write", &e)
            }
        }
    }
}

/// Copies framed content (see the module's doc) from `input` to `file` until the end frame.
fn copy_frames(input: &mut std::fs::File, file: &mut std::fs::File) -> std::io::Result<u64> {
    // The frames are small (a TLS record's worth): read them from the pipe in big gulps.
    let mut input = std::io::BufReader::with_capacity(4 * CHUNK, input);
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    loop {
        let mut len = [0u8; 4];
        input.read_exact(&mut len)?;
        let mut left = u32::from_be_bytes(len) as usize;
        if left == 0 {
            return Ok(total);
        }
        while left > 0 {
            let want = left.min(buf.len());
            input.read_exact(&mut buf[..want])?;
            file.write_all(&buf[..want])?;
            left -= want;
            total += want as u64;
        }
    }
}

fn read_path(path: &Path, output: &mut std::fs::File) -> ExitCode {
    let fail = |output: &mut std::fs::File, r: Reply| {
        reply(output, &r);
        ExitCode::from(1)
    };
    // Non-blocking: opening a named pipe must not hang (it is then refused below).
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK)
        .open(path)
    {
        Ok(f) => f,
        Err(e) => return fail(output, io_reply(path, "read", &e)),
    };
    let meta = match file.metadata() {
        Ok(m) => m,
        Err(e) => return fail(output, io_reply(path, "read", &e)),
    };
    if meta.is_dir() {
        return match list(path) {
            Ok(r) => {
                reply(output, &r);
                ExitCode::SUCCESS
            }
            Err(e) => fail(output, io_reply(path, "list", &e)),
        };
    }
    if !meta.is_file() {
        return fail(
            output,
            Reply::error(
                ErrorKind::Invalid,
                format!("{} is not a regular file or a folder", path.display()),
            ),
        );
    }
    let size = meta.len();
    reply(output, &Reply::File { size });
    // Exactly `size` bytes: fewer (the file shrank meanwhile) and the gateway cuts the
    // response off, so a client never takes a short file for a whole one.
    match std::io::copy(&mut file.take(size), output) {
        Ok(n) if n == size => ExitCode::SUCCESS,
        _ => ExitCode::from(1),
    }
}

fn list(path: &Path) -> std::io::Result<Reply> {
    let mut items = Vec::new();
    let mut truncated = false;
    for entry in std::fs::read_dir(path)? {
        let entry = entry?;
        if items.len() == MAX_LISTING {
            truncated = true;
            break;
        }
        // Of the entry itself: a symlink is listed as one, not followed.
        let Ok(m) = entry.metadata() else { continue };
        let ft = m.file_type();
        let kind = if ft.is_symlink() {
            "symlink"
        } else if ft.is_dir() {
            "dir"
        } else if ft.is_file() {
            "file"
        } else {
            "other"
        };
        items.push(Entry {
            name: entry.file_name().to_string_lossy().into_owned(),
            kind: kind.into(),
            size: m.len(),
            mode: m.mode() & 0o7777,
            mtime: m.mtime(),
        });
    }
    items.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Reply::Dir { items, truncated })
}

fn delete_path(path: &Path, recursive: bool, writable: &[PathBuf]) -> Reply {
    let (dir, name) = match real_parent(path, writable, false) {
        Ok(p) => p,
        Err(r) => return r,
    };
    let target = dir.join(name);
    // Of the entry itself: deleting a symlink deletes the link, never what it names.
    let meta = match std::fs::symlink_metadata(&target) {
        Ok(m) => m,
        Err(e) => return io_reply(path, "delete", &e),
    };
    let done = if meta.is_dir() {
        if recursive {
            // Never follows symlinks inside (it opens each folder relative to its parent).
            std::fs::remove_dir_all(&target)
        } else {
            std::fs::remove_dir(&target)
        }
    } else {
        std::fs::remove_file(&target)
    };
    match done {
        Ok(()) => Reply::Deleted {
            size: meta.is_file().then_some(meta.len()),
        },
        Err(e) => io_reply(path, "delete", &e),
    }
}

// ---------------------------------------------------------------------------------------------
// The gateway's side

/// Why a file operation could not be done.
#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    /// The sandbox refused it (or the path is not there): the helper's own answer.
    #[error("{message}")]
    Refused { kind: ErrorKind, message: String },
    /// The upload is larger than `[gateway] max_body_bytes`.
    #[error("the upload is larger than the gateway accepts")]
    TooLarge,
    /// The client's body stalled past the read timeout, or broke.
    #[error("the upload broke off: {0}")]
    Body(String),
    /// The helper could not be started or gave no usable answer.
    #[error("the file helper failed: {0}")]
    Helper(String),
}

/// A successful read.
pub enum ReadOutcome {
    /// A file of `size` bytes, as a stream of exactly that many (an error ends it early).
    File {
        size: u64,
        body: std::pin::Pin<Box<dyn Stream<Item = std::io::Result<Bytes>> + Send>>,
    },
    Dir {
        items: Vec<Entry>,
        truncated: bool,
    },
}

/// Limits on an upload's body.
#[derive(Debug, Clone, Copy)]
pub struct UploadLimits {
    pub max_bytes: u64,
    /// The longest wait for the next chunk of the client's body.
    pub chunk_timeout: Duration,
}

struct Helper {
    child: tokio::process::Child,
    stdin: Option<tokio::process::ChildStdin>,
    stdout: tokio::io::BufReader<tokio::process::ChildStdout>,
}

impl Helper {
    /// Starts the helper and hands it its spec line.
    async fn start(mut cmd: tokio::process::Command, spec: &[u8]) -> Result<Helper, FilesError> {
        cmd.stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            // A request that goes away (the client hung up) ends its helper.
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .map_err(|e| FilesError::Helper(format!("cannot start it: {e}")))?;
        let (Some(mut stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err(FilesError::Helper("no pipes to it".into()));
        };
        // A helper that already failed answers on stdout; its reply says why.
        let _ = stdin.write_all(spec).await;
        Ok(Helper {
            child,
            stdin: Some(stdin),
            stdout: tokio::io::BufReader::with_capacity(CHUNK, stdout),
        })
    }

    /// The helper's reply line.
    async fn reply(&mut self) -> Result<Reply, FilesError> {
        let mut line = Vec::new();
        (&mut self.stdout)
            .take(MAX_REPLY)
            .read_until(b'\n', &mut line)
            .await
            .map_err(|e| FilesError::Helper(format!("cannot read its answer: {e}")))?;
        if line.is_empty() {
            let status = self.child.wait().await.ok();
            return Err(FilesError::Helper(format!(
                "it ended without an answer ({})",
                status.map_or_else(|| "status unknown".into(), |s| s.to_string())
            )));
        }
        let reply: Reply = serde_json::from_slice(&line)
            .map_err(|e| FilesError::Helper(format!("its answer is not understood: {e}")))?;
        match reply {
            Reply::Error { kind, message } => Err(FilesError::Refused { kind, message }),
            r => Ok(r),
        }
    }

    /// Waits for the helper to end (it has answered; it ends at once).
    async fn finish(mut self) {
        drop(self.stdin.take());
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
    }
}

/// Writes `body` to the file the spec names; `Ok(Written { created, size })`.
pub async fn write<S, E>(
    cmd: tokio::process::Command,
    spec: &[u8],
    body: S,
    limits: UploadLimits,
) -> Result<(bool, u64), FilesError>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    let mut helper = Helper::start(cmd, spec).await?;
    let mut stdin = helper
        .stdin
        .take()
        .expect("the helper's stdin is taken once");
    let fed = feed(&mut stdin, body, limits).await;
    // Without the end frame, the helper removes what it wrote and says so.
    drop(stdin);
    let answer = helper.reply().await;
    helper.finish().await;
    match fed {
        // The helper stopped reading (it failed early): its reply says why.
        Ok(()) | Err(Feed::Pipe) => match answer? {
            Reply::Written { created, size } => Ok((created, size)),
            other => Err(FilesError::Helper(format!("unexpected answer {other:?}"))),
        },
        Err(Feed::Client(e)) => Err(e),
    }
}

enum Feed {
    /// The helper's stdin closed.
    Pipe,
    /// The client's body failed.
    Client(FilesError),
}

async fn feed<S, E>(
    stdin: &mut tokio::process::ChildStdin,
    mut body: S,
    limits: UploadLimits,
) -> Result<(), Feed>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    // Frames are as small as the client's TLS records: batch them into the pipe.
    let mut stdin = tokio::io::BufWriter::with_capacity(4 * CHUNK, stdin);
    let mut total = 0u64;
    loop {
        let chunk = match tokio::time::timeout(limits.chunk_timeout, body.next()).await {
            Err(_) => {
                return Err(Feed::Client(FilesError::Body(
                    "no data within the body read timeout".into(),
                )))
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => return Err(Feed::Client(FilesError::Body(e.to_string()))),
            Ok(Some(Ok(c))) => c,
        };
        total += chunk.len() as u64;
        if total > limits.max_bytes {
            return Err(Feed::Client(FilesError::TooLarge));
        }
        // Frames of at most 4 GiB - 1: split larger chunks (hyper's are far smaller).
        for part in chunk.chunks(u32::MAX as usize) {
            let len = u32::try_from(part.len()).expect("parts fit in u32");
            if len == 0 {
                continue;
            }
            stdin
                .write_all(&len.to_be_bytes())
                .await
                .map_err(|_| Feed::Pipe)?;
            stdin.write_all(part).await.map_err(|_| Feed::Pipe)?;
        }
    }
    stdin.write_all(&[0; 4]).await.map_err(|_| Feed::Pipe)?;
    stdin.flush().await.map_err(|_| Feed::Pipe)
}

/// Reads the file or folder the spec names.
pub async fn read(cmd: tokio::process::Command, spec: &[u8]) -> Result<ReadOutcome, FilesError> {
    let mut helper = Helper::start(cmd, spec).await?;
    drop(helper.stdin.take());
    match helper.reply().await? {
        Reply::Dir { items, truncated } => {
            helper.finish().await;
            Ok(ReadOutcome::Dir { items, truncated })
        }
        Reply::File { size } => {
            let body =
                futures_util::stream::unfold((helper, size), |(mut helper, left)| async move {
                    if left == 0 {
                        helper.finish().await;
                        return None;
                    }
                    let want = usize::try_from(left).unwrap_or(CHUNK).min(CHUNK);
                    let mut buf = vec![0u8; want];
                    match helper.stdout.read(&mut buf).await {
                        Ok(0) => Some((
                            Err(std::io::Error::new(
                                std::io::ErrorKind::UnexpectedEof,
                                "the file shrank while it was read",
                            )),
                            (helper, 0),
                        )),
                        Ok(n) => {
                            buf.truncate(n);
                            Some((Ok(Bytes::from(buf)), (helper, left - n as u64)))
                        }
                        Err(e) => Some((Err(e), (helper, 0))),
                    }
                });
            Ok(ReadOutcome::File {
                size,
                body: Box::pin(body),
            })
        }
        other => Err(FilesError::Helper(format!("unexpected answer {other:?}"))),
    }
}

/// Deletes the path the spec names; the size of the file it was, if one.
pub async fn delete(cmd: tokio::process::Command, spec: &[u8]) -> Result<Option<u64>, FilesError> {
    let mut helper = Helper::start(cmd, spec).await?;
    drop(helper.stdin.take());
    let answer = helper.reply().await;
    helper.finish().await;
    match answer? {
        Reply::Deleted { size } => Ok(size),
        other => Err(FilesError::Helper(format!("unexpected answer {other:?}"))),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "in tests a panic is the failure report")]
mod tests {
    use super::*;

    #[test]
    fn paths_are_absolute_and_never_climb() {
        assert_eq!(
            normalize("/workspace//a/./b").unwrap(),
            Path::new("/workspace/a/b")
        );
        assert!(normalize("workspace/a").is_err());
        assert!(normalize("/workspace/../etc/passwd").is_err());
        assert!(normalize("/workspace/a\0b").is_err());
        let roots: Vec<PathBuf> = WRITABLE.iter().map(PathBuf::from).collect();
        assert!(inside(Path::new("/workspace/a"), &roots));
        assert!(inside(Path::new("/tmp/x/y"), &roots));
        assert!(!inside(Path::new("/workspace"), &roots));
        assert!(!inside(Path::new("/workspacex/a"), &roots));
        assert!(!inside(Path::new("/etc/passwd"), &roots));
    }

    /// Path-like text: the pieces that matter to a path parser (`..`, `.`, empty components,
    /// `/`, NUL, unicode, over-long components, the writable places' names) joined by `/`,
    /// or any text at all.
    fn path_like() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        let piece = prop_oneof![
            Just(String::new()),
            Just(".".to_string()),
            Just("..".to_string()),
            Just("/".to_string()),
            Just("\0".to_string()),
            Just("workspace".to_string()),
            Just("tmp".to_string()),
            Just("data".to_string()),
            Just("workspacex".to_string()),
            "[a-z0-9._-]{1,12}",
            "\\PC{1,6}",
            "[.a/]{1,6}",
            "x{250,300}",
        ];
        prop_oneof![
            4 => proptest::collection::vec(piece, 0..10).prop_map(|v| v.join("/")),
            1 => proptest::collection::vec("[a/.]{0,700}", 1..8).prop_map(|v| v.join("/")),
            1 => any::<String>(),
        ]
    }

    /// The writable places of a sandbox that mounts a volume at `/data`.
    fn roots() -> Vec<PathBuf> {
        WRITABLE
            .iter()
            .map(PathBuf::from)
            .chain([PathBuf::from("/data")])
            .collect()
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config::with_cases(1024))]

        /// Whatever a client sends as `?path=`: no panic; what is accepted is absolute, made
        /// of plain names only, means what was sent, and is inside a writable place exactly
        /// when its text is under one.
        #[test]
        fn any_path_is_refused_or_plain_and_placed(raw in path_like(), rooted in proptest::bool::ANY) {
            let raw = if rooted { format!("/{raw}") } else { raw };
            let Ok(p) = normalize(&raw) else {
                return Ok(());
            };
            proptest::prop_assert!(raw.starts_with('/') && raw.len() <= 4096);
            proptest::prop_assert!(!raw.split('/').any(|c| c == ".."), "accepted {raw:?}");
            let mut parts = p.components();
            proptest::prop_assert_eq!(parts.next(), Some(Component::RootDir));
            let mut names = Vec::new();
            for c in parts {
                let Component::Normal(name) = c else {
                    return Err(proptest::test_runner::TestCaseError::fail(format!("{c:?} in {p:?}")));
                };
                let name = name.to_str().unwrap();
                proptest::prop_assert!(!name.is_empty() && name != "." && name != "..");
                proptest::prop_assert!(!name.contains('/') && !name.contains('\0'));
                names.push(name);
            }
            // The same names as the text, only `.` and empty ones dropped.
            let meant: Vec<&str> = raw.split('/').filter(|c| !c.is_empty() && *c != ".").collect();
            proptest::prop_assert_eq!(&names, &meant);
            let text = p.to_str().unwrap();
            proptest::prop_assert!(!text.contains("//"));
            proptest::prop_assert_eq!(normalize(text), Ok(p.clone()));
            let under = roots().iter().any(|r| text.starts_with(&format!("{}/", r.display())));
            proptest::prop_assert_eq!(inside(&p, &roots()), under, "{}", text);
        }
    }

    /// Every accepted path under a writable place of a tree that holds links out (to folders
    /// outside, absolute and relative), a file and folders: the folder a write would land in
    /// is inside a writable place, or the write is refused, and nothing is made outside. (No
    /// link to the real `/`: a regression would then make folders all over the host.)
    #[test]
    fn writes_land_inside_the_writable_places_or_nowhere() {
        use proptest::strategy::{Strategy, ValueTree};
        let tmp = tempfile::tempdir().unwrap();
        let base = std::fs::canonicalize(tmp.path()).unwrap();
        let (ws, vol, outside) = (base.join("ws"), base.join("vol"), base.join("outside"));
        let fake_root = base.join("root");
        std::fs::create_dir_all(ws.join("a/b")).unwrap();
        std::fs::create_dir_all(&vol).unwrap();
        std::fs::create_dir(&outside).unwrap();
        std::fs::create_dir(&fake_root).unwrap();
        std::os::unix::fs::symlink(&outside, ws.join("out")).unwrap();
        std::os::unix::fs::symlink(&fake_root, ws.join("root")).unwrap();
        std::os::unix::fs::symlink("../..", ws.join("a/up")).unwrap();
        std::os::unix::fs::symlink(&vol, ws.join("tovol")).unwrap();
        std::fs::write(ws.join("a/file"), b"x").unwrap();
        let writable = vec![ws.clone(), vol.clone()];
        let piece = proptest::sample::select(vec![
            "a", "b", "out", "root", "up", "tovol", "file", "..", ".", "", "new", "n\u{e9}w",
        ]);
        let strategy = proptest::collection::vec(piece, 1..6).prop_map(|v| v.join("/"));
        let mut runner = proptest::test_runner::TestRunner::deterministic();
        let (mut landed, mut refused) = (0, 0);
        for _ in 0..600 {
            let rel = strategy.new_tree(&mut runner).unwrap().current();
            let Ok(path) = normalize(&format!("{}/{rel}", ws.display())) else {
                continue;
            };
            match real_parent(&path, &writable, true) {
                Ok((dir, name)) => {
                    landed += 1;
                    assert!(
                        dir.starts_with(&ws) || dir.starts_with(&vol),
                        "{rel} lands in {}",
                        dir.display()
                    );
                    assert!(Path::new(name).components().count() == 1, "{rel}");
                    assert!(dir.is_dir());
                }
                Err(Reply::Error { .. }) => refused += 1,
                Err(other) => panic!("{rel}: {other:?}"),
            }
        }
        assert!(
            landed > 50 && refused > 50,
            "landed {landed}, refused {refused}"
        );
        for out in [&outside, &fake_root] {
            assert_eq!(
                std::fs::read_dir(out).unwrap().count(),
                0,
                "a folder was made through a link that leads out"
            );
        }
        let mut top: Vec<String> = std::fs::read_dir(&base)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        top.sort();
        assert_eq!(
            top,
            ["outside", "root", "vol", "ws"],
            "a folder was made through `up`"
        );
    }
}
