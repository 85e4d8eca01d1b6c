//! Snapshots: a new image made of what a running sandbox changed over its image.
//!
//! A snapshot is an image folder (see [`crate::sandbox::image`]) holding, instead of a
//! `rootfs/`, the sandbox's own overlay layer as `layer/` (what it changed under `/`, with the
//! overlay's whiteouts and opaque markers, so deletions are kept) and its `/workspace` as
//! `workspace/`. Its `image.json` names the image it was built on (`base`: `host` or an
//! imported image, never another snapshot: a sandbox started from a snapshot holds all of the
//! snapshot's files in its own layer, so a snapshot of it is again whole over the same base),
//! the host uid its files belonged to, and its owner.
//!
//! **Taking one.** The sandbox is paused (its cgroup frozen) while its layer and workspace are
//! copied into `images/.incoming/`, then thawed; the copy is renamed into place when whole. The
//! layer and the workspace are the sandbox's: a hostile sandbox may have planted links there, or
//! swap a folder for a link while the copy runs. So the copy never resolves a path: every entry
//! is reached from its folder's descriptor with `openat(O_NOFOLLOW)`, links are copied as
//! links, and only regular files, folders, links and whiteouts are taken (FIFOs, sockets and
//! devices are skipped and counted). Setuid and setgid bits are dropped.
//!
//! **Starting from one.** A new sandbox's overlay is its base image; before its launcher runs,
//! the snapshot's layer is copied into the sandbox's own upper layer and its workspace into the
//! sandbox's workspace, the snapshot's uid mapped to the new sandbox's. So each sandbox owns
//! its copy (what it changes never reaches the snapshot or another sandbox), and the time to
//! start grows with the size of the snapshot's changes, not of the base image.
//!
//! Not taken: the volumes a sandbox mounts (they outlive it anyway), `/tmp` and `/dev/shm`
//! (memory), the generated `/etc/hosts`, `/etc/hostname` and `/etc/resolv.conf`, and the
//! sandbox's environment (`secret_env` lives in the store, never in its files).

use std::ffi::{CStr, CString, OsStr};
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

use nix::dir::Dir;
use nix::errno::Errno;
use nix::fcntl::{openat, readlinkat, AtFlags, OFlag, AT_FDCWD};
use nix::sys::stat::{fchmod, fstat, fstatat, mkdirat, mknodat, FileStat, Mode, SFlag};
use nix::unistd::{fchownat, symlinkat, Gid, Uid};

/// Deepest folder nesting copied; deeper is refused (it also bounds the descriptors held).
const MAX_DEPTH: usize = 256;

/// The overlay's marker of a folder that hides the lower layers' contents.
const OPAQUE_XATTR: &str = "trusted.overlay.opaque";

/// Paths in a sandbox's overlay layer that are not its changes: mount points the sandbox's
/// init makes (their contents are other mounts) and the generated `/etc` files.
pub const NOT_IN_LAYER: &[&str] = &[
    "dev",
    "proc",
    "sys",
    "tmp",
    "workspace",
    "etc/hosts",
    "etc/hostname",
    "etc/resolv.conf",
];

/// How much one copy may take.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    pub max_bytes: u64,
    pub max_entries: u64,
}

/// What one or more copies took.
#[derive(Debug, Clone, Copy, Default)]
pub struct Tally {
    /// Bytes of regular files.
    pub bytes: u64,
    /// Files, folders, links and whiteouts.
    pub entries: u64,
    /// FIFOs, sockets, devices, and entries that changed while they were copied.
    pub skipped: u64,
}

/// Why a copy stopped.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("the sandbox's changes pass {0} bytes, the most a snapshot may hold (4 x [orchestrator] max_image_bytes)")]
    TooLarge(u64),
    #[error("the sandbox's changes pass {0} files and folders, the most a snapshot may hold")]
    TooMany(u64),
    #[error("the sandbox's changes nest folders deeper than {MAX_DEPTH} levels")]
    TooDeep,
    #[error("cannot copy {path}: {source}")]
    Io { path: String, source: io::Error },
}

impl CopyError {
    /// Whether the disk (or a quota) was full.
    pub fn is_no_space(&self) -> bool {
        matches!(self, CopyError::Io { source, .. }
            if matches!(source.raw_os_error(), Some(28) | Some(122)))
    }
}

/// Files owned by `from` (uid and gid alike) become `to`'s; other owners are kept.
#[derive(Debug, Clone, Copy)]
pub struct Owners {
    pub from: u32,
    pub to: u32,
}

impl Owners {
    fn map(&self, id: u32) -> u32 {
        if id == self.from {
            self.to
        } else {
            id
        }
    }
}

/// One copy's settings.
#[derive(Debug, Clone, Copy)]
pub struct CopySpec<'a> {
    pub owners: Owners,
    /// Relative paths (from the source's top) left out, with all they hold.
    pub skip: &'a [&'a str],
    /// Copy overlay whiteouts (character devices 0:0) and opaque markers: for overlay layers.
    pub overlay: bool,
    pub budget: Budget,
}

/// Copies the folder tree at `src` into `dst` without following a link anywhere in `src`
/// (see the module's documentation). `dst` is made if missing; when it exists (a new
/// sandbox's empty workspace) it takes `src`'s mode and mapped owner. Blocking.
pub fn copy_tree(
    src: &Path,
    dst: &Path,
    spec: &CopySpec<'_>,
    tally: &mut Tally,
) -> Result<(), CopyError> {
    let io_at = |path: &Path| {
        let path = path.display().to_string();
        move |e: Errno| CopyError::Io {
            path: path.clone(),
            source: io::Error::from(e),
        }
    };
    let src_fd = openat(AT_FDCWD, src, dir_flags(), Mode::empty()).map_err(io_at(src))?;
    match mkdirat(AT_FDCWD, dst, Mode::from_bits_truncate(0o700)) {
        Ok(()) | Err(Errno::EEXIST) => {}
        Err(e) => return Err(io_at(dst)(e)),
    }
    let dst_fd = openat(AT_FDCWD, dst, dir_flags(), Mode::empty()).map_err(io_at(dst))?;
    let st = fstat(&src_fd).map_err(io_at(src))?;
    set_owner_mode(&dst_fd, &st, spec.owners).map_err(io_at(dst))?;
    if spec.overlay {
        copy_opaque(&src_fd, &dst_fd);
    }
    copy_dir(&src_fd, &dst_fd, "", 0, spec, tally)
}

fn dir_flags() -> OFlag {
    OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC
}

/// The names in the folder open at `dir`, but `.` and `..`.
fn names(dir: &OwnedFd) -> Result<Vec<CString>, Errno> {
    let mut listing = Dir::from_fd(dir.try_clone().map_err(|_| Errno::EMFILE)?)?;
    let mut out = Vec::new();
    for entry in listing.iter() {
        let name = entry?.file_name().to_owned();
        if name.as_bytes() != b"." && name.as_bytes() != b".." {
            out.push(name);
        }
    }
    Ok(out)
}

fn join(rel: &str, name: &CStr) -> String {
    let name = String::from_utf8_lossy(name.to_bytes());
    if rel.is_empty() {
        name.into_owned()
    } else {
        format!("{rel}/{name}")
    }
}

fn copy_dir(
    src: &OwnedFd,
    dst: &OwnedFd,
    rel: &str,
    depth: usize,
    spec: &CopySpec<'_>,
    tally: &mut Tally,
) -> Result<(), CopyError> {
    if depth >= MAX_DEPTH {
        return Err(CopyError::TooDeep);
    }
    let listed = names(src).map_err(|e| CopyError::Io {
        path: format!("/{rel}"),
        source: io::Error::from(e),
    })?;
    for name in listed {
        let path = join(rel, &name);
        if spec.skip.contains(&path.as_str()) {
            continue;
        }
        let io_err = |e: io::Error| CopyError::Io {
            path: format!("/{path}"),
            source: e,
        };
        let st = match fstatat(src, name.as_c_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            // Gone meanwhile: the sandbox removed it.
            Err(Errno::ENOENT) => continue,
            Err(e) => return Err(io_err(e.into())),
        };
        tally.entries += 1;
        if tally.entries > spec.budget.max_entries {
            return Err(CopyError::TooMany(spec.budget.max_entries));
        }
        match SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) {
            SFlag::S_IFDIR => {
                let Some(child) = open_same(src, &name, &st, dir_flags())? else {
                    tally.skipped += 1;
                    continue;
                };
                mkdirat(dst, name.as_c_str(), Mode::from_bits_truncate(0o700))
                    .map_err(|e| io_err(e.into()))?;
                let made = openat(dst, name.as_c_str(), dir_flags(), Mode::empty())
                    .map_err(|e| io_err(e.into()))?;
                set_owner_mode(&made, &st, spec.owners).map_err(|e| io_err(e.into()))?;
                if spec.overlay {
                    copy_opaque(&child, &made);
                }
                copy_dir(&child, &made, &path, depth + 1, spec, tally)?;
            }
            SFlag::S_IFREG => {
                let flags = OFlag::O_RDONLY
                    | OFlag::O_NOFOLLOW
                    | OFlag::O_NONBLOCK
                    | OFlag::O_NOCTTY
                    | OFlag::O_CLOEXEC;
                let Some(from) = open_same(src, &name, &st, flags)? else {
                    tally.skipped += 1;
                    continue;
                };
                copy_file(from, dst, &name, &st, spec, tally).map_err(|e| match e {
                    Copied::Budget(e) => e,
                    Copied::Io(e) => io_err(e),
                })?;
            }
            SFlag::S_IFLNK => {
                let target = match readlinkat(src, name.as_c_str()) {
                    Ok(t) => t,
                    Err(Errno::ENOENT | Errno::EINVAL) => {
                        tally.skipped += 1;
                        continue;
                    }
                    Err(e) => return Err(io_err(e.into())),
                };
                symlinkat(target.as_os_str(), dst, name.as_c_str())
                    .map_err(|e| io_err(e.into()))?;
                chown_at(dst, &name, &st, spec.owners).map_err(|e| io_err(e.into()))?;
            }
            SFlag::S_IFCHR if spec.overlay && st.st_rdev == 0 => {
                // An overlay whiteout: the sandbox deleted this path of its image.
                mknodat(dst, name.as_c_str(), SFlag::S_IFCHR, Mode::empty(), 0)
                    .map_err(|e| io_err(e.into()))?;
            }
            _ => tally.skipped += 1,
        }
    }
    Ok(())
}

/// Opens `name` in `dir` without following a link, and checks it is still the entry `st`
/// described (the sandbox may have swapped it meanwhile): `None` when it is not.
fn open_same(
    dir: &OwnedFd,
    name: &CStr,
    st: &FileStat,
    flags: OFlag,
) -> Result<Option<OwnedFd>, CopyError> {
    let fd = match openat(dir, name, flags, Mode::empty()) {
        Ok(fd) => fd,
        Err(Errno::ENOENT | Errno::ELOOP | Errno::ENOTDIR | Errno::ENXIO) => return Ok(None),
        Err(e) => {
            return Err(CopyError::Io {
                path: String::from_utf8_lossy(name.to_bytes()).into_owned(),
                source: e.into(),
            })
        }
    };
    match fstat(&fd) {
        Ok(now) if now.st_ino == st.st_ino && now.st_dev == st.st_dev => Ok(Some(fd)),
        _ => Ok(None),
    }
}

enum Copied {
    Budget(CopyError),
    Io(io::Error),
}

impl From<io::Error> for Copied {
    fn from(e: io::Error) -> Self {
        Copied::Io(e)
    }
}

impl From<Errno> for Copied {
    fn from(e: Errno) -> Self {
        Copied::Io(e.into())
    }
}

fn copy_file(
    from: OwnedFd,
    dst: &OwnedFd,
    name: &CStr,
    st: &FileStat,
    spec: &CopySpec<'_>,
    tally: &mut Tally,
) -> Result<(), Copied> {
    let room = spec.budget.max_bytes.saturating_sub(tally.bytes);
    if u64::try_from(st.st_size).unwrap_or(u64::MAX) > room {
        return Err(Copied::Budget(CopyError::TooLarge(spec.budget.max_bytes)));
    }
    let to = openat(
        dst,
        name,
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o600),
    )?;
    let mut to = File::from(to);
    // One byte past the room tells a file that grew meanwhile past the budget.
    let copied = io::copy(&mut File::from(from).take(room.saturating_add(1)), &mut to)?;
    if copied > room {
        return Err(Copied::Budget(CopyError::TooLarge(spec.budget.max_bytes)));
    }
    tally.bytes += copied;
    set_owner_mode(&to, st, spec.owners)?;
    let modified = std::time::UNIX_EPOCH
        + std::time::Duration::new(
            u64::try_from(st.st_mtime).unwrap_or(0),
            u32::try_from(st.st_mtime_nsec).unwrap_or(0),
        );
    to.set_modified(modified)?;
    Ok(())
}

/// Gives the new entry open at `fd` the mapped owner and the mode of `st`, less setuid and
/// setgid.
fn set_owner_mode(fd: &impl AsFd, st: &FileStat, owners: Owners) -> Result<(), Errno> {
    nix::unistd::fchown(
        fd,
        Some(Uid::from_raw(owners.map(st.st_uid))),
        Some(Gid::from_raw(owners.map(st.st_gid))),
    )?;
    fchmod(fd, Mode::from_bits_truncate(st.st_mode & 0o1777))
}

fn chown_at(dir: &OwnedFd, name: &CStr, st: &FileStat, owners: Owners) -> Result<(), Errno> {
    fchownat(
        dir,
        name,
        Some(Uid::from_raw(owners.map(st.st_uid))),
        Some(Gid::from_raw(owners.map(st.st_gid))),
        AtFlags::AT_SYMLINK_NOFOLLOW,
    )
}

/// Carries the overlay's opaque marker from one folder to another, when it has one.
fn copy_opaque(src: &OwnedFd, dst: &OwnedFd) {
    let (Ok(src), Ok(dst)) = (src.try_clone(), dst.try_clone()) else {
        return;
    };
    let (src, dst) = (File::from(src), File::from(dst));
    use xattr::FileExt;
    if let Ok(Some(value)) = src.get_xattr(OsStr::new(OPAQUE_XATTR)) {
        if let Err(e) = dst.set_xattr(OsStr::new(OPAQUE_XATTR), &value) {
            tracing::warn!(error = %e, "cannot mark a copied folder opaque");
        }
    }
}

/// Why a snapshot was not taken.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("the sandbox is not running on this node")]
    NotRunning,
    #[error("snapshots are of isolated sandboxes; this one runs as a plain host process ([orchestrator] isolation = \"none\")")]
    NotIsolated,
    #[error(transparent)]
    Copy(#[from] CopyError),
    #[error(transparent)]
    Image(#[from] crate::sandbox::image::ImageError),
}

/// Where a snapshot's files go in a new sandbox, before its launcher runs.
#[derive(Debug, Clone)]
pub struct Seed {
    /// The snapshot's `layer/` (absent for a snapshot of a `host` sandbox).
    pub layer: std::path::PathBuf,
    /// The snapshot's `workspace/` (absent when its sandbox had a volume there).
    pub workspace: std::path::PathBuf,
    /// The host uid its files belonged to.
    pub uid: u32,
}

impl Seed {
    /// Copies the snapshot into the new sandbox's folder `dir` (see the module's
    /// documentation): its layer into `upper/data` when the sandbox has an image root
    /// (`root`), its workspace into `workspace/` unless a volume takes that place
    /// (`workspace`). Files of the snapshot's uid become `uid`'s. Blocking.
    pub fn plant(
        &self,
        dir: &Path,
        uid: u32,
        root: bool,
        workspace: bool,
    ) -> Result<Tally, CopyError> {
        let owners = Owners {
            from: self.uid,
            to: uid,
        };
        let budget = Budget {
            max_bytes: u64::MAX,
            max_entries: u64::MAX,
        };
        let mut tally = Tally::default();
        if root && self.layer.is_dir() {
            let upper = dir.join("upper");
            std::fs::create_dir_all(&upper).map_err(|source| CopyError::Io {
                path: upper.display().to_string(),
                source,
            })?;
            let spec = CopySpec {
                owners,
                skip: &[],
                overlay: true,
                budget,
            };
            copy_tree(&self.layer, &upper.join("data"), &spec, &mut tally)?;
        }
        if workspace && self.workspace.is_dir() {
            let spec = CopySpec {
                owners,
                skip: &[],
                overlay: false,
                budget,
            };
            copy_tree(&self.workspace, &dir.join("workspace"), &spec, &mut tally)?;
        }
        Ok(tally)
    }
}

/// Size in bytes of the regular files under `dir` (not following links): a snapshot's size.
pub fn tree_bytes(dir: &Path) -> u64 {
    fn walk(fd: BorrowedFd<'_>, depth: usize) -> u64 {
        let Ok(owned) = fd.try_clone_to_owned() else {
            return 0;
        };
        let Ok(listed) = names(&owned) else {
            return 0;
        };
        let mut total = 0u64;
        for name in listed {
            let Ok(st) = fstatat(fd, name.as_c_str(), AtFlags::AT_SYMLINK_NOFOLLOW) else {
                continue;
            };
            match SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) {
                SFlag::S_IFREG => total += u64::try_from(st.st_size).unwrap_or(0),
                SFlag::S_IFDIR if depth < MAX_DEPTH => {
                    if let Ok(child) = openat(fd, name.as_c_str(), dir_flags(), Mode::empty()) {
                        total += walk(child.as_fd(), depth + 1);
                    }
                }
                _ => {}
            }
        }
        total
    }
    match openat(AT_FDCWD, dir, dir_flags(), Mode::empty()) {
        Ok(fd) => walk(fd.as_fd(), 0),
        Err(_) => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};

    fn spec(skip: &'static [&'static str]) -> CopySpec<'static> {
        CopySpec {
            owners: Owners { from: 0, to: 0 },
            skip,
            overlay: false,
            budget: Budget {
                max_bytes: 1 << 30,
                max_entries: 10_000,
            },
        }
    }

    #[test]
    fn copies_files_folders_and_links_as_links() {
        let t = tempfile::tempdir().unwrap();
        let (src, dst) = (t.path().join("src"), t.path().join("dst"));
        std::fs::create_dir_all(src.join("a/b")).unwrap();
        std::fs::write(src.join("a/b/f.txt"), b"hello").unwrap();
        std::fs::set_permissions(src.join("a/b/f.txt"), PermissionsExt::from_mode(0o4755)).unwrap();
        // A link to the host's root is copied as a link, never followed.
        symlink("/", src.join("root-link")).unwrap();
        symlink("/etc", src.join("a/etc")).unwrap();
        let mut tally = Tally::default();
        copy_tree(&src, &dst, &spec(&[]), &mut tally).unwrap();
        assert_eq!(std::fs::read(dst.join("a/b/f.txt")).unwrap(), b"hello");
        let mode = std::fs::metadata(dst.join("a/b/f.txt")).unwrap().mode();
        assert_eq!(mode & 0o7777, 0o755, "setuid dropped");
        assert_eq!(
            std::fs::read_link(dst.join("root-link")).unwrap(),
            Path::new("/")
        );
        assert!(std::fs::symlink_metadata(dst.join("a/etc"))
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(tally.bytes, 5);
        assert_eq!(tally.entries, 5);
    }

    #[test]
    fn skips_listed_paths_and_special_files() {
        let t = tempfile::tempdir().unwrap();
        let (src, dst) = (t.path().join("src"), t.path().join("dst"));
        std::fs::create_dir_all(src.join("etc")).unwrap();
        std::fs::create_dir_all(src.join("tmp/x")).unwrap();
        std::fs::write(src.join("etc/hosts"), b"generated").unwrap();
        std::fs::write(src.join("etc/keep"), b"mine").unwrap();
        nix::unistd::mkfifo(&src.join("fifo"), Mode::from_bits_truncate(0o644)).unwrap();
        let mut tally = Tally::default();
        copy_tree(&src, &dst, &spec(NOT_IN_LAYER), &mut tally).unwrap();
        assert!(dst.join("etc/keep").exists());
        assert!(!dst.join("etc/hosts").exists());
        assert!(!dst.join("tmp").exists());
        assert!(!dst.join("fifo").exists());
        assert_eq!(tally.skipped, 1);
    }

    #[test]
    fn budget_limits_bytes_and_entries() {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src");
        std::fs::create_dir_all(&src).unwrap();
        std::fs::write(src.join("big"), vec![7u8; 4096]).unwrap();
        let mut small = spec(&[]);
        small.budget.max_bytes = 1000;
        let e = copy_tree(&src, &t.path().join("d1"), &small, &mut Tally::default()).unwrap_err();
        assert!(matches!(e, CopyError::TooLarge(1000)), "{e}");
        for i in 0..20 {
            std::fs::write(src.join(format!("f{i}")), b"").unwrap();
        }
        let mut few = spec(&[]);
        few.budget.max_entries = 10;
        let e = copy_tree(&src, &t.path().join("d2"), &few, &mut Tally::default()).unwrap_err();
        assert!(matches!(e, CopyError::TooMany(10)), "{e}");
    }

    #[test]
    fn too_deep_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src");
        let mut deep = src.clone();
        for _ in 0..(MAX_DEPTH + 2) {
            deep.push("d");
        }
        std::fs::create_dir_all(&deep).unwrap();
        let e = copy_tree(
            &src,
            &t.path().join("dst"),
            &spec(&[]),
            &mut Tally::default(),
        )
        .unwrap_err();
        assert!(matches!(e, CopyError::TooDeep), "{e}");
    }

    #[test]
    fn owners_are_mapped_and_others_kept() {
        let t = tempfile::tempdir().unwrap();
        let (src, dst) = (t.path().join("src"), t.path().join("dst"));
        std::fs::create_dir_all(src.join("d")).unwrap();
        std::fs::write(src.join("d/mine"), b"x").unwrap();
        std::fs::write(src.join("d/root"), b"x").unwrap();
        std::os::unix::fs::chown(src.join("d"), Some(4242), Some(4242)).unwrap();
        std::os::unix::fs::chown(src.join("d/mine"), Some(4242), Some(4242)).unwrap();
        let mut s = spec(&[]);
        s.owners = Owners {
            from: 4242,
            to: 5151,
        };
        copy_tree(&src, &dst, &s, &mut Tally::default()).unwrap();
        let uid = |p: &str| std::fs::metadata(dst.join(p)).unwrap().uid();
        assert_eq!(uid("d"), 5151);
        assert_eq!(uid("d/mine"), 5151);
        assert_eq!(uid("d/root"), 0);
        assert_eq!(tree_bytes(&dst), 2);
    }

    #[test]
    fn whiteouts_and_opaque_folders_are_kept_for_overlay_layers() {
        let t = tempfile::tempdir().unwrap();
        let (src, dst) = (t.path().join("src"), t.path().join("dst"));
        std::fs::create_dir_all(src.join("opaque")).unwrap();
        mknodat(
            AT_FDCWD,
            &src.join("gone"),
            SFlag::S_IFCHR,
            Mode::empty(),
            0,
        )
        .unwrap();
        let opaque = xattr::set(src.join("opaque"), OPAQUE_XATTR, b"y").is_ok();
        let mut s = spec(&[]);
        s.overlay = true;
        copy_tree(&src, &dst, &s, &mut Tally::default()).unwrap();
        let m = std::fs::symlink_metadata(dst.join("gone")).unwrap();
        use std::os::unix::fs::FileTypeExt;
        assert!(m.file_type().is_char_device() && m.rdev() == 0);
        if opaque {
            assert_eq!(
                xattr::get(dst.join("opaque"), OPAQUE_XATTR).unwrap(),
                Some(b"y".to_vec())
            );
        }
        // Not an overlay layer: a device node is skipped.
        let mut tally = Tally::default();
        copy_tree(&src, &t.path().join("plain"), &spec(&[]), &mut tally).unwrap();
        assert!(!t.path().join("plain/gone").exists());
        assert_eq!(tally.skipped, 1);
    }
}
