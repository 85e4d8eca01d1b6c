//! Named volumes on disk: folders that outlive the isolated sandboxes that mount them.
//!
//! A volume is `<volumes_dir>/<owner>/<name>/` (`[orchestrator] volumes_dir`, default
//! `<data_dir>/volumes`). `volumes_dir` and each owner's folder belong to root, mode 0700: no
//! host user, and no sandbox, can walk them. A sandbox sees only the subtree it mounts, bound
//! at its `path` by its init ([`crate::sandbox::mount`]).
//!
//! **Whose files.** Every isolated sandbox has a host uid of its own, and two of them may mount
//! one volume, one after the other (a session resumed) or at once. Files one writes must stay
//! writable for the next, whatever modes its programs pick (`0600` included), so ownership by
//! the writer's own uid cannot work, and neither can a shared group (modes such as `0644` keep
//! the group out; a `chown -R` at every mount costs a walk of the whole tree and would take the
//! files from a sandbox still running). An idmapped mount would map each sandbox's uid onto one
//! owner on disk, but setting one up needs `mount_setattr(2)`, which no safe binding offers.
//! So a volume's files belong to one host uid per owner (and node): the first volume an owner
//! makes takes a uid from `[orchestrator] uid_range` for good (reserved while the owner has a
//! volume, never handed to another sandbox), every later volume of that owner shares it, and
//! an isolated sandbox that mounts volumes runs as that uid instead of a fresh one. Sandboxes
//! of one owner that mount volumes therefore share a uid; they remain apart in everything else
//! (their own mount, PID, IPC, network namespaces and cgroups, no capabilities, the system call
//! filter), so the uid lets one reach nothing of the other but the volumes they both mount.
//! Sandboxes of different owners never share a uid.
//!
//! **Confinement.** `sub_path` is resolved one component at a time from the volume's folder
//! with `openat(O_NOFOLLOW | O_DIRECTORY)`: a symbolic link anywhere on the way is refused, and
//! a missing folder is made (owned by the volume's uid). The gateway does it once to answer 422
//! early; the sandbox's init does it again in the sandbox's own mount namespace and binds the
//! descriptor it opened (`/proc/self/fd/N`), so a link planted between the two checks cannot
//! redirect the mount.

use std::collections::BTreeSet;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{openat, AtFlags, OFlag, AT_FDCWD};
use nix::sys::stat::{fstatat, mkdirat, Mode, SFlag};
use nix::unistd::{fchownat, Gid, Uid};

/// At most this many volumes per sandbox.
pub const MAX_MOUNTS: usize = 8;

/// Entries a size measurement visits at most (a huge tree is reported as what was counted).
const SIZE_MAX_ENTRIES: u64 = 1_000_000;
/// Folder depth a size measurement descends to at most (each level holds a descriptor).
const SIZE_MAX_DEPTH: usize = 128;

/// Folders a volume may not be mounted on or under: the system's own trees (the `lib*` ones
/// are those the `host` image shows).
const RESERVED_TARGETS: &[&str] = &[
    "proc", "dev", "sys", "usr", "bin", "sbin", "etc", "lib", "lib32", "lib64", "libx32",
];

/// Longest path component Linux file systems take (`NAME_MAX`): a longer one would fail as
/// `ENAMETOOLONG` only when the folder is made, and be reported as an I/O failure.
const NAME_MAX: usize = 255;

/// Whether `name` is a volume name: 1 to 63 of `[a-z0-9-]`.
pub fn valid_name(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// Checks a mount `path`: absolute, normalized (no `.`, `..`, empty components or trailing
/// `/`), not `/`, and not on or under the system's trees (`/proc`, `/dev`, `/sys`, `/usr`,
/// `/bin`, `/sbin`, `/lib*`, `/etc`).
pub fn validate_target(path: &str) -> Result<(), String> {
    let Some(rest) = path.strip_prefix('/') else {
        return Err(format!(
            "volume path `{}` must be absolute, such as /workspace",
            short(path)
        ));
    };
    if rest.is_empty() {
        return Err("a volume cannot be mounted at /".into());
    }
    if path.len() > 1024 || path.contains('\0') {
        return Err("volume path must be at most 1024 bytes, without NUL".into());
    }
    if rest
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err(format!(
            "volume path `{}` must be normalized: no `.`, `..`, `//` or trailing `/`",
            short(path)
        ));
    }
    if rest.split('/').any(|c| c.len() > NAME_MAX) {
        return Err(format!(
            "volume path `{}` has a component longer than {NAME_MAX} bytes",
            short(path)
        ));
    }
    let first = rest.split('/').next().unwrap_or_default();
    if RESERVED_TARGETS.contains(&first) {
        return Err(format!(
            "a volume cannot be mounted on or under /{first}: that is the system's own tree"
        ));
    }
    Ok(())
}

/// Splits a `sub_path` into its components: relative, no `..` or `.`, no empty components.
pub fn sub_path_components(sub_path: &str) -> Result<Vec<String>, String> {
    if sub_path.is_empty() {
        return Err("sub_path is empty: leave it out to mount the whole volume".into());
    }
    if sub_path.starts_with('/') {
        return Err(format!(
            "sub_path `{}` must be relative to the volume, such as sessions/s-42",
            short(sub_path)
        ));
    }
    if sub_path.len() > 1024 || sub_path.contains('\0') {
        return Err("sub_path must be at most 1024 bytes, without NUL".into());
    }
    let parts: Vec<String> = sub_path.split('/').map(str::to_owned).collect();
    if parts.iter().any(|c| c.is_empty() || c == "." || c == "..") {
        return Err(format!(
            "sub_path `{}` may not hold `..`, `.` or empty components: it never leaves the volume",
            short(sub_path)
        ));
    }
    if parts.iter().any(|c| c.len() > NAME_MAX) {
        return Err(format!(
            "sub_path `{}` has a component longer than {NAME_MAX} bytes",
            short(sub_path)
        ));
    }
    Ok(parts)
}

/// Whether two normalized mount paths overlap (one is the other or lies under it).
pub fn overlaps(a: &str, b: &str) -> bool {
    let under = |inner: &str, outer: &str| {
        inner == outer
            || inner
                .strip_prefix(outer)
                .is_some_and(|rest| rest.starts_with('/'))
    };
    under(a, b) || under(b, a)
}

fn short(s: &str) -> String {
    s.chars().take(80).collect()
}

/// Why a `sub_path` could not be opened inside its volume.
#[derive(Debug, thiserror::Error)]
pub enum ConfineError {
    /// A component is a symbolic link (which could point anywhere).
    #[error("sub_path component `{0}` is a symbolic link: sub_path must name real folders inside the volume")]
    Symlink(String),
    /// A component exists and is not a folder.
    #[error("sub_path component `{0}` is not a folder")]
    NotDir(String),
    /// The volume's folder is missing (deleted meanwhile) or unreadable.
    #[error("cannot open {what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
}

fn nofollow_dir() -> OFlag {
    OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC
}

/// Opens `base` (the volume's folder, whose parents only root may change), then each of
/// `components` below it without following a symbolic link, making missing folders owned by
/// `uid` (mode 0700). Returns the descriptor of the last folder.
pub fn open_confined(
    base: &Path,
    components: &[String],
    uid: u32,
) -> Result<OwnedFd, ConfineError> {
    let io_err = |what: &str, e: Errno| ConfineError::Io {
        what: what.to_owned(),
        source: io::Error::from(e),
    };
    let mut dir = openat(AT_FDCWD, base, nofollow_dir(), Mode::empty())
        .map_err(|e| io_err("the volume's folder", e))?;
    for c in components {
        let next = match openat(dir.as_fd(), c.as_str(), nofollow_dir(), Mode::empty()) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) => {
                match mkdirat(dir.as_fd(), c.as_str(), Mode::from_bits_truncate(0o700)) {
                    Ok(()) => {
                        fchownat(
                            dir.as_fd(),
                            c.as_str(),
                            Some(Uid::from_raw(uid)),
                            Some(Gid::from_raw(uid)),
                            AtFlags::AT_SYMLINK_NOFOLLOW,
                        )
                        .map_err(|e| io_err(c, e))?;
                    }
                    Err(Errno::EEXIST) => {}
                    Err(e) => return Err(io_err(c, e)),
                }
                openat(dir.as_fd(), c.as_str(), nofollow_dir(), Mode::empty())
                    .map_err(|e| classify(dir.as_fd(), c, e))?
            }
            Err(e) => return Err(classify(dir.as_fd(), c, e)),
        };
        dir = next;
    }
    Ok(dir)
}

/// What an `openat` failure on `name` means: a link, something else than a folder, or I/O.
fn classify(dir: std::os::fd::BorrowedFd<'_>, name: &str, e: Errno) -> ConfineError {
    match fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFLNK => {
            ConfineError::Symlink(name.to_owned())
        }
        Ok(st) if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFDIR => {
            ConfineError::NotDir(name.to_owned())
        }
        _ => ConfineError::Io {
            what: name.to_owned(),
            source: io::Error::from(e),
        },
    }
}

/// A uid of `range` not in `taken`, picked at random (so uids are not reused in order).
pub fn pick_uid(range: (u32, u32), taken: &BTreeSet<u32>) -> Option<u32> {
    let (lo, hi) = range;
    let span = u64::from(hi - lo) + 1;
    let start = rand::random::<u64>() % span;
    (0..span.min(1 << 20))
        .map(|i| lo + u32::try_from((start + i) % span).unwrap_or(0))
        .find(|uid| !taken.contains(uid))
}

/// This node's volume folders, and the lock that keeps a volume's deletion from racing a
/// sandbox that is mounting it.
#[derive(Debug)]
pub struct Volumes {
    dir: PathBuf,
    /// Held shared while a sandbox with volumes starts, exclusively while volumes are made or
    /// deleted (so an owner's volumes get one uid, and a deleted volume is never mounted).
    pub lock: tokio::sync::RwLock<()>,
}

impl Volumes {
    pub fn new(dir: PathBuf) -> Volumes {
        Volumes {
            dir,
            lock: tokio::sync::RwLock::new(()),
        }
    }

    /// The folder of `owner`'s volume `name`. The owner id is encoded so that it is always
    /// one plain path component: `[A-Za-z0-9_-]` stay, every other byte is `%XX`.
    pub fn dir_of(&self, owner: &str, name: &str) -> PathBuf {
        let mut encoded = String::with_capacity(owner.len());
        for b in owner.bytes() {
            if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
                encoded.push(char::from(b));
            } else {
                encoded.push_str(&format!("%{b:02X}"));
            }
        }
        self.dir.join(encoded).join(name)
    }

    /// Makes the volume's folder (empty), owned by `uid`, mode 0700, under root-only parents.
    /// A leftover folder of that name (whose record is gone) is emptied first.
    pub fn make_dir(&self, owner: &str, name: &str, uid: u32) -> io::Result<PathBuf> {
        use std::os::unix::fs::PermissionsExt;
        let dir = self.dir_of(owner, name);
        let private = std::fs::Permissions::from_mode(0o700);
        std::fs::create_dir_all(&self.dir)?;
        std::fs::set_permissions(&self.dir, private.clone())?;
        if let Some(owner_dir) = dir.parent() {
            std::fs::create_dir_all(owner_dir)?;
            std::fs::set_permissions(owner_dir, private.clone())?;
        }
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => tracing::warn!(path = %dir.display(), "removed a leftover volume folder"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        std::fs::create_dir(&dir)?;
        std::os::unix::fs::chown(&dir, Some(uid), Some(uid))?;
        std::fs::set_permissions(&dir, private)?;
        Ok(dir)
    }

    /// Deletes the volume's folder and all in it (never following a link out).
    pub fn remove_dir(&self, owner: &str, name: &str) -> io::Result<()> {
        match std::fs::remove_dir_all(self.dir_of(owner, name)) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            other => other,
        }
    }

    /// Apparent size of the volume's files (bytes of regular files and links), walking its
    /// tree by descriptors without following links, at most [`SIZE_MAX_ENTRIES`] entries and
    /// [`SIZE_MAX_DEPTH`] levels deep. `None` when its folder is not on this node's disk.
    pub fn size(&self, owner: &str, name: &str) -> Option<u64> {
        let root = openat(
            AT_FDCWD,
            &self.dir_of(owner, name),
            nofollow_dir(),
            Mode::empty(),
        )
        .ok()?;
        let mut budget = SIZE_MAX_ENTRIES;
        let mut total = 0u64;
        walk(root, 0, &mut budget, &mut total);
        Some(total)
    }
}

fn walk(dir: OwnedFd, depth: usize, budget: &mut u64, total: &mut u64) {
    let Ok(mut listing) = nix::dir::Dir::from_fd(dir) else {
        return;
    };
    let mut names = Vec::new();
    for entry in listing.iter().flatten() {
        let name = entry.file_name();
        if name.to_bytes() == b"." || name.to_bytes() == b".." {
            continue;
        }
        if *budget == 0 {
            break;
        }
        *budget -= 1;
        names.push(name.to_owned());
    }
    for name in names {
        let Ok(st) = fstatat(
            listing.as_fd(),
            name.as_c_str(),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        ) else {
            continue;
        };
        let kind = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
        if kind == SFlag::S_IFREG || kind == SFlag::S_IFLNK {
            *total = total.saturating_add(u64::try_from(st.st_size).unwrap_or(0));
        } else if kind == SFlag::S_IFDIR && depth < SIZE_MAX_DEPTH {
            if let Ok(sub) = openat(
                listing.as_fd(),
                name.as_c_str(),
                nofollow_dir(),
                Mode::empty(),
            ) {
                walk(sub, depth + 1, budget, total);
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "in tests a panic is the failure report")]
mod tests {
    use super::*;

    #[test]
    fn names_and_paths() {
        assert!(valid_name("agents") && valid_name("a-1") && valid_name(&"x".repeat(63)));
        for bad in ["", "Agents", "a_b", "a/b", "..", &"x".repeat(64)] {
            assert!(!valid_name(bad), "{bad}");
        }
        for good in [
            "/workspace",
            "/data",
            "/opt/models",
            "/tmp/cache",
            "/library",
        ] {
            validate_target(good).unwrap();
        }
        for bad in [
            "/",
            "workspace",
            "/a/",
            "/a//b",
            "/a/./b",
            "/a/../etc",
            "/proc",
            "/dev/x",
            "/sys",
            "/usr/local",
            "/bin",
            "/sbin",
            "/lib",
            "/lib64/x",
            "/libx32",
            "/etc",
            "/etc/ssl",
        ] {
            assert!(validate_target(bad).is_err(), "{bad}");
        }
        assert_eq!(
            sub_path_components("sessions/s-42").unwrap(),
            vec!["sessions", "s-42"]
        );
        for bad in ["", "/abs", "../x", "a/../b", "a//b", "a/", "./a", "a/."] {
            assert!(sub_path_components(bad).is_err(), "{bad}");
        }
        let long = "x".repeat(256);
        assert!(sub_path_components(&long).is_err());
        assert!(validate_target(&format!("/data/{long}")).is_err());
        sub_path_components(&"x".repeat(255)).unwrap();
        assert!(overlaps("/workspace", "/workspace/x"));
        assert!(overlaps("/data", "/data"));
        assert!(!overlaps("/data", "/database"));
        assert!(!overlaps("/a/b", "/a/c"));
    }

    #[test]
    fn owner_ids_are_one_path_component() {
        let v = Volumes::new(PathBuf::from("/v"));
        assert_eq!(v.dir_of("cred_a-1", "x"), Path::new("/v/cred_a-1/x"));
        assert_eq!(v.dir_of("../..", "x"), Path::new("/v/%2E%2E%2F%2E%2E/x"));
        assert_eq!(v.dir_of("a%2F", "x"), Path::new("/v/a%252F/x"));
    }

    #[test]
    fn sub_paths_never_follow_links_and_are_made_when_missing() {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().join("vol");
        std::fs::create_dir(&base).unwrap();
        let outside = tmp.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, base.join("evil")).unwrap();
        std::fs::write(base.join("file"), b"x").unwrap();
        let me = nix::unistd::geteuid().as_raw();

        let parts = |s: &str| sub_path_components(s).unwrap();
        open_confined(&base, &parts("sessions/a"), me).unwrap();
        assert!(base.join("sessions/a").is_dir());
        assert!(matches!(
            open_confined(&base, &parts("evil/etc"), me),
            Err(ConfineError::Symlink(c)) if c == "evil"
        ));
        assert!(matches!(
            open_confined(&base, &parts("evil"), me),
            Err(ConfineError::Symlink(_))
        ));
        assert!(
            !outside.join("etc").exists(),
            "nothing made through the link"
        );
        assert!(matches!(
            open_confined(&base, &parts("file/x"), me),
            Err(ConfineError::NotDir(_))
        ));
    }

    /// Path-like text: the pieces that matter to a path parser (`..`, `.`, empty components,
    /// `/`, NUL, unicode, over-long components) joined by `/`, or any text at all.
    fn path_like() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        let piece = prop_oneof![
            Just(String::new()),
            Just(".".to_string()),
            Just("..".to_string()),
            Just("/".to_string()),
            Just("\0".to_string()),
            Just("...".to_string()),
            Just("a\0b".to_string()),
            "[a-z0-9._-]{1,12}",
            "\\PC{1,6}",
            "[.a/]{1,6}",
            "x{250,260}",
        ];
        prop_oneof![
            4 => proptest::collection::vec(piece, 0..10).prop_map(|v| v.join("/")),
            1 => any::<String>(),
            1 => "[a/.]{1000,1100}",
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config::with_cases(512))]

        /// Whatever a client sends as `sub_path`: no panic, and what is accepted is a list of
        /// plain names that spell exactly what was sent.
        #[test]
        fn any_sub_path_is_refused_or_plain_names(s in path_like()) {
            if let Ok(parts) = sub_path_components(&s) {
                proptest::prop_assert!(!parts.is_empty());
                proptest::prop_assert!(s.len() <= 1024);
                for c in &parts {
                    proptest::prop_assert!(!c.is_empty() && c != "." && c != "..", "{c:?}");
                    proptest::prop_assert!(!c.contains('/') && !c.contains('\0'), "{c:?}");
                    proptest::prop_assert!(c.len() <= NAME_MAX);
                }
                proptest::prop_assert_eq!(parts.join("/"), s);
            }
        }

        /// Whatever a client sends as a volume's mount `path`: no panic, and what is accepted
        /// is absolute, normalized and off the system's trees.
        #[test]
        fn any_mount_path_is_refused_or_normal(s in proptest::strategy::Strategy::prop_map(path_like(), |s| format!("/{s}"))) {
            if validate_target(&s).is_ok() {
                let rest = &s[1..];
                proptest::prop_assert!(!rest.is_empty() && s.len() <= 1024);
                for c in rest.split('/') {
                    proptest::prop_assert!(!c.is_empty() && c != "." && c != ".." && !c.contains('\0'));
                    proptest::prop_assert!(c.len() <= NAME_MAX);
                }
                let first = rest.split('/').next().unwrap();
                proptest::prop_assert!(!RESERVED_TARGETS.contains(&first));
                // As the kernel would read it: the same path, nothing resolved away.
                let p = Path::new(&s);
                proptest::prop_assert!(p.components().all(|c| matches!(
                    c,
                    std::path::Component::RootDir | std::path::Component::Normal(_)
                )));
            }
        }
    }

    /// Every accepted `sub_path`, opened in a volume whose tree holds a link out, a file and
    /// folders: the folder it ends in is inside the volume, and nothing appears outside.
    #[test]
    fn accepted_sub_paths_open_inside_the_volume() {
        use proptest::strategy::{Strategy, ValueTree};
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().join("vol");
        let outside = tmp.path().join("outside");
        std::fs::create_dir_all(base.join("a/b")).unwrap();
        std::fs::create_dir(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, base.join("out")).unwrap();
        std::os::unix::fs::symlink("../..", base.join("a/up")).unwrap();
        std::fs::write(base.join("a/file"), b"x").unwrap();
        let real_base = std::fs::canonicalize(&base).unwrap();
        let me = nix::unistd::geteuid().as_raw();
        // Names that hit the tree's links, file and folders, and the attack pieces.
        let piece = proptest::sample::select(vec![
            "a", "b", "out", "up", "file", "..", ".", "", "new", "x\u{e9}",
        ]);
        let strategy = proptest::collection::vec(piece, 1..6).prop_map(|v| v.join("/"));
        let mut runner = proptest::test_runner::TestRunner::deterministic();
        let mut accepted = 0;
        for _ in 0..400 {
            let s = strategy.new_tree(&mut runner).unwrap().current();
            let Ok(parts) = sub_path_components(&s) else {
                continue;
            };
            accepted += 1;
            match open_confined(&base, &parts, me) {
                Ok(fd) => {
                    let at = std::fs::read_link(format!(
                        "/proc/self/fd/{}",
                        std::os::fd::AsRawFd::as_raw_fd(&fd)
                    ))
                    .unwrap();
                    assert!(at.starts_with(&real_base), "{s} opened {}", at.display());
                    assert_eq!(at, real_base.join(parts.join("/")), "{s}");
                }
                Err(ConfineError::Symlink(c)) => assert!(c == "out" || c == "up", "{s}: {c}"),
                Err(ConfineError::NotDir(c)) => assert_eq!(c, "file", "{s}"),
                Err(e) => panic!("{s}: {e}"),
            }
        }
        assert!(
            accepted > 50,
            "the strategy yields accepted sub_paths ({accepted})"
        );
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
    }

    #[test]
    fn size_counts_apparent_bytes_and_skips_links() {
        let tmp = tempfile::tempdir().unwrap();
        let v = Volumes::new(tmp.path().join("volumes"));
        let me = nix::unistd::geteuid().as_raw();
        let dir = v.make_dir("cred_a", "agents", me).unwrap();
        assert_eq!(v.size("cred_a", "agents"), Some(0));
        std::fs::create_dir_all(dir.join("a/b")).unwrap();
        std::fs::write(dir.join("a/b/f"), vec![0u8; 1000]).unwrap();
        std::fs::write(dir.join("g"), vec![0u8; 24]).unwrap();
        // A link to a big tree counts as the link itself (its target's length).
        std::os::unix::fs::symlink("/usr", dir.join("usr")).unwrap();
        assert_eq!(v.size("cred_a", "agents"), Some(1000 + 24 + 4));
        assert_eq!(v.size("cred_a", "other"), None);
        v.remove_dir("cred_a", "agents").unwrap();
        assert!(!dir.exists());
        v.remove_dir("cred_a", "agents").unwrap();
    }
}
