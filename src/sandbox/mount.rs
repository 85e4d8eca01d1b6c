//! The sandbox's filesystem view, built inside its own mount namespace by its PID 1 (as root,
//! before it drops to the sandbox's user).
//!
//! The `host` image: a tmpfs root holding the host's `/usr`, `/bin`, `/sbin` and `/lib*`
//! read-only (merged-`/usr` symlinks are recreated as symlinks), a generated `/etc` (plus the
//! host's CA certificates, `alternatives` and the dynamic linker's cache, read-only: none holds
//! a secret), a fresh `/dev` with the usual devices, its own `devpts` and `/dev/shm`, its own
//! `/proc`, a private `/tmp`, and `/workspace` bound from the sandbox's folder. Then
//! `pivot_root` makes it `/`, the host's tree is detached, and the root itself is read-only:
//! only `/workspace`, `/tmp`, `/dev/shm` and the volumes it mounts (read-write ones) are
//! writable. Nothing else of the host is visible.
//!
//! Any other image ([`crate::sandbox::image`]): the root is an overlay whose lower layer is the
//! image's unpacked tree (read-only, shared by every sandbox of the image) and whose upper layer
//! is the sandbox's own (`<data_dir>/sandboxes/<id>/upper`, gone with the sandbox): the whole
//! root is writable and what the sandbox changes stays its own. `/` and the image's top-level
//! folders belong to the sandbox's user in its layer (so it can make files there, such as
//! `/etc/x`); deeper folders and files keep the image's owners. The image's `/etc` stays, with
//! the sandbox's own `hosts`, `hostname` and `resolv.conf` bound over it; `/dev`, `/proc`,
//! `/tmp`, `/workspace` and the volumes are made as for `host`. Every mount point is made a
//! real folder (or file) first: a link of the image's there is replaced, so no mount follows one.

use std::io;
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::sandbox::spec::LaunchSpec;

/// Host folders an image of `host` shows read-only.
const HOST_TREES: &[&str] = &["usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32"];

/// Host files and folders under `/etc` shown read-only: what programs need to run (the
/// dynamic linker's cache, Debian's `alternatives` links) and to verify TLS through the egress
/// proxy (CA certificates). None of them holds a secret.
const HOST_ETC: &[&str] = &[
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "alternatives",
    "ssl/certs",
    "ca-certificates",
    "mime.types",
    "localtime",
];

/// Device nodes bound from the host's `/dev`: the harmless ones every program expects.
const DEVICES: &[&str] = &["null", "zero", "full", "random", "urandom", "tty"];

fn err(what: &str, path: &Path, e: impl std::fmt::Display) -> io::Error {
    io::Error::other(format!("{what} {}: {e}", path.display()))
}

fn bind(src: &Path, dst: &Path, read_only: bool) -> io::Result<()> {
    mount(
        Some(src),
        dst,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| err("cannot bind", src, e))?;
    let mut flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    if read_only {
        flags |= MsFlags::MS_RDONLY;
    }
    mount(None::<&str>, dst, None::<&str>, flags, None::<&str>)
        .map_err(|e| err("cannot remount", dst, e))
}

fn tmpfs(dst: &Path, flags: MsFlags, options: &str) -> io::Result<()> {
    mount(Some("tmpfs"), dst, Some("tmpfs"), flags, Some(options))
        .map_err(|e| err("cannot mount a tmpfs on", dst, e))
}

/// Makes `dst` a mount point of the same kind as `src` (a folder or an empty file).
fn mount_point(src: &Path, dst: &Path) -> io::Result<()> {
    if let Some(parent) = dst.parent() {
        std::fs::create_dir_all(parent)?;
    }
    if src.is_dir() {
        std::fs::create_dir_all(dst)
    } else {
        std::fs::write(dst, b"")
    }
}

/// Shows host path `src` at `dst` read-only: a symlink is copied as a symlink (so `/bin` →
/// `usr/bin` stays one), anything else is bound. Absent paths are skipped.
fn show_host(src: &Path, dst: &Path) -> io::Result<()> {
    match std::fs::symlink_metadata(src) {
        Err(_) => Ok(()),
        Ok(m) if m.file_type().is_symlink() => {
            if let Some(parent) = dst.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::os::unix::fs::symlink(std::fs::read_link(src)?, dst)
        }
        Ok(_) => {
            mount_point(src, dst)?;
            bind(src, dst, true)
        }
    }
}

/// `/etc` files of the sandbox's own: its users, its name, no name server (names resolve
/// through the egress proxy, which resolves them itself).
fn write_etc(root: &Path, spec: &LaunchSpec) -> io::Result<()> {
    let etc = root.join("etc");
    std::fs::create_dir_all(&etc)?;
    let (uid, gid) = (spec.uid, spec.gid);
    std::fs::write(
        etc.join("passwd"),
        format!(
            "root:x:0:0:root:/root:/bin/sh\nsandbox:x:{uid}:{gid}:sandbox:/workspace:/bin/sh\n\
             nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
        ),
    )?;
    std::fs::write(
        etc.join("group"),
        format!("root:x:0:\nsandbox:x:{gid}:\ntty:x:5:\nnogroup:x:65534:\n"),
    )?;
    std::fs::write(
        etc.join("hosts"),
        format!(
            "127.0.0.1\tlocalhost {id}\n::1\tlocalhost ip6-localhost\n",
            id = spec.id
        ),
    )?;
    std::fs::write(etc.join("hostname"), format!("{}\n", spec.id))?;
    std::fs::write(
        etc.join("resolv.conf"),
        "# No name server: reach allowed hosts through $HTTPS_PROXY (the egress proxy).\n",
    )?;
    std::fs::write(
        etc.join("nsswitch.conf"),
        "passwd: files\ngroup: files\nhosts: files\n",
    )?;
    for name in HOST_ETC {
        show_host(&Path::new("/etc").join(name), &etc.join(name))?;
    }
    Ok(())
}

fn build_dev(root: &Path) -> io::Result<()> {
    let dev = root.join("dev");
    std::fs::create_dir_all(&dev)?;
    tmpfs(
        &dev,
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        "mode=0755,size=64k",
    )?;
    for name in DEVICES {
        let src = Path::new("/dev").join(name);
        if src.exists() {
            let dst = dev.join(name);
            std::fs::write(&dst, b"")?;
            mount(
                Some(&src),
                &dst,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(|e| err("cannot bind", &src, e))?;
        }
    }
    let pts = dev.join("pts");
    std::fs::create_dir_all(&pts)?;
    mount(
        Some("devpts"),
        &pts,
        Some("devpts"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
    )
    .map_err(|e| err("cannot mount devpts on", &pts, e))?;
    std::os::unix::fs::symlink("pts/ptmx", dev.join("ptmx"))?;
    let shm = dev.join("shm");
    std::fs::create_dir_all(&shm)?;
    tmpfs(
        &shm,
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        "mode=1777,size=64m",
    )?;
    for (name, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        std::os::unix::fs::symlink(target, dev.join(name))?;
    }
    Ok(())
}

/// Binds one volume's subtree at its target. The subtree is opened here, in the sandbox's own
/// mount namespace, one component at a time without following links, and the mount's source
/// is that descriptor: nothing the sandboxes did to the volume meanwhile can make it name
/// another folder. Targets were validated (absolute, normalized, not overlapping each other,
/// not on the host trees), so the mount point is made in this fresh root only.
fn bind_volume(root: &Path, volume: &crate::sandbox::spec::VolumeBind, uid: u32) -> io::Result<()> {
    let fd = crate::sandbox::volume::open_confined(&volume.dir, &volume.sub_path, uid)
        .map_err(|e| io::Error::other(format!("volume at {}: {e}", volume.target.display())))?;
    let relative = volume.target.strip_prefix("/").unwrap_or(&volume.target);
    // One real folder at a time: an image's link on the way (`/data` → `/etc`) is replaced, so
    // the mount lands where the sandbox will look, not where the link points on the host.
    let mut dst = root.to_path_buf();
    for part in relative.components() {
        dst.push(part);
        real_dir(&dst)?;
    }
    use std::os::fd::AsRawFd;
    let source = PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
    bind(&source, &dst, volume.read_only)
}

/// Builds the sandbox's root at `spec.root` and makes it `/`. Must run in a fresh mount
/// namespace (and PID namespace, for `/proc`), as root.
pub fn build_root(spec: &LaunchSpec) -> io::Result<()> {
    // Nothing mounted from here on propagates back to the host.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| err("cannot make private", Path::new("/"), e))?;
    let root: PathBuf = spec.root.clone();
    if let Some(image) = &spec.image {
        image_root(&root, image, spec)?;
    } else {
        tmpfs(
            &root,
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            "mode=0755,size=16m",
        )?;
        for tree in HOST_TREES {
            show_host(&Path::new("/").join(tree), &root.join(tree))?;
        }
        write_etc(&root, spec)?;
    }
    build_dev(&root)?;

    let proc_dir = root.join("proc");
    std::fs::create_dir_all(&proc_dir)?;
    mount(
        Some("proc"),
        &proc_dir,
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(|e| err("cannot mount proc on", &proc_dir, e))?;

    let tmp = root.join("tmp");
    std::fs::create_dir_all(&tmp)?;
    tmpfs(
        &tmp,
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        &format!("mode=1777,size={}", spec.tmp_bytes.max(1024 * 1024)),
    )?;

    let workspace = root.join("workspace");
    std::fs::create_dir_all(&workspace)?;
    // A volume at `/workspace` takes the place of the sandbox's own folder.
    if !spec
        .volumes
        .iter()
        .any(|v| v.target == Path::new("/workspace"))
    {
        bind(&spec.workspace, &workspace, false)?;
    }
    for volume in &spec.volumes {
        bind_volume(&root, volume, spec.uid)?;
    }
    if spec.image.is_none() {
        for empty in ["root", "home", "run", "var/tmp", "sys"] {
            std::fs::create_dir_all(root.join(empty))?;
        }
        // The root itself becomes read-only; the mounts on it keep their own flags.
        mount(
            None::<&str>,
            &root,
            None::<&str>,
            MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=0755,size=16m"),
        )
        .map_err(|e| err("cannot make read-only", &root, e))?;
    }

    // `pivot_root(".", ".")` stacks the old root under the new one; detaching it leaves
    // nothing of the host reachable.
    nix::unistd::chdir(&root).map_err(|e| err("cannot enter", &root, e))?;
    nix::unistd::pivot_root(".", ".").map_err(|e| err("cannot pivot_root to", &root, e))?;
    umount2(".", MntFlags::MNT_DETACH)
        .map_err(|e| err("cannot detach the host's root at", Path::new("/"), e))?;
    let cwd = spec
        .image
        .as_ref()
        .map_or_else(|| PathBuf::from("/workspace"), |i| i.cwd.clone());
    // Made after the pivot: a link of the image's on the way resolves inside the sandbox.
    if !cwd.exists() {
        std::fs::create_dir_all(&cwd)?;
        std::os::unix::fs::chown(&cwd, Some(spec.uid), Some(spec.gid))?;
    }
    nix::unistd::chdir(&cwd).map_err(|e| err("cannot enter", &cwd, e))?;
    Ok(())
}

/// Makes `root/name` a real folder: a link, file or anything else of the image's there is
/// removed first (in the sandbox's own layer), so a mount on it cannot follow a link.
fn real_dir(path: &Path) -> io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => {
            std::fs::remove_file(path)?;
            std::fs::create_dir(path)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => std::fs::create_dir(path),
        Err(e) => Err(e),
    }
}

/// Makes `path` a real file to bind over (see [`real_dir`]).
fn real_file(path: &Path) -> io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_file() => Ok(()),
        Ok(m) => {
            if m.is_dir() {
                std::fs::remove_dir_all(path)?;
            } else {
                std::fs::remove_file(path)?;
            }
            std::fs::write(path, b"")
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => std::fs::write(path, b""),
        Err(e) => Err(e),
    }
}

/// The overlay root of an image: see the module's documentation.
fn image_root(
    root: &Path,
    image: &crate::sandbox::spec::ImageRoot,
    spec: &LaunchSpec,
) -> io::Result<()> {
    use std::os::unix::fs::{chown, MetadataExt, PermissionsExt};
    let (upper, work, generated) = (
        image.upper.join("data"),
        image.upper.join("work"),
        image.upper.join("etc"),
    );
    for dir in [&upper, &work, &generated] {
        std::fs::create_dir_all(dir)?;
    }
    chown(&upper, Some(spec.uid), Some(spec.gid))?;
    std::fs::set_permissions(&upper, std::fs::Permissions::from_mode(0o755))?;
    // The image's top-level folders, owned by the sandbox's user in its own layer: the overlay
    // merges each with the image's (not opaque), and shows this one's owner and mode.
    for entry in std::fs::read_dir(&image.rootfs)? {
        let entry = entry?;
        let meta = std::fs::symlink_metadata(entry.path())?;
        let name = entry.file_name();
        if !meta.is_dir() || ["proc", "dev", "sys"].contains(&name.to_string_lossy().as_ref()) {
            continue;
        }
        let mine = upper.join(&name);
        match std::fs::create_dir(&mine) {
            Ok(()) => {}
            // Planted from a snapshot: already the sandbox's (or a whiteout, kept).
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
        chown(&mine, Some(spec.uid), Some(spec.gid))?;
        std::fs::set_permissions(&mine, std::fs::Permissions::from_mode(meta.mode() & 0o1777))?;
    }
    let options = format!(
        "lowerdir={},upperdir={},workdir={}",
        image.rootfs.display(),
        upper.display(),
        work.display()
    );
    if options.contains(['\\', '\n'])
        || [&image.rootfs, &upper, &work]
            .iter()
            .any(|p| p.to_string_lossy().contains([',', ':']))
    {
        return Err(io::Error::other(
            "the image and sandbox folders may not hold `,` or `:` ([store] data_dir)",
        ));
    }
    mount(
        Some("overlay"),
        root,
        Some("overlay"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(options.as_str()),
    )
    .map_err(|e| err("cannot mount the image's overlay on", root, e))?;
    for name in ["dev", "proc", "tmp", "workspace", "etc"] {
        real_dir(&root.join(name))?;
    }
    let etc = root.join("etc");
    for (name, content) in [
        (
            "hosts",
            format!(
                "127.0.0.1\tlocalhost {id}\n::1\tlocalhost ip6-localhost\n",
                id = spec.id
            ),
        ),
        ("hostname", format!("{}\n", spec.id)),
        (
            "resolv.conf",
            "# No name server: reach allowed hosts through $HTTPS_PROXY (the egress proxy).\n"
                .to_string(),
        ),
    ] {
        let src = generated.join(name);
        std::fs::write(&src, content)?;
        let dst = etc.join(name);
        real_file(&dst)?;
        bind(&src, &dst, true)?;
    }
    Ok(())
}
