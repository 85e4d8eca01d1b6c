//! Images on disk: root filesystems unpacked from the archives `docker save` (and `podman
//! save`) write, which isolated sandboxes start from (`"image": N` on creation).
//!
//! An image is `<data_dir>/images/<name>/`: `rootfs/` (its layers applied in order) and
//! `image.json` ([`ImageMeta`]: when, how big, and the config's `Env`, `WorkingDir`, `Cmd`,
//! `Entrypoint`). Only root can walk `images/` (mode 0700); a sandbox sees an image through the
//! overlay its init mounts ([`crate::sandbox::mount`]), never the folder itself.
//!
//! **Atomic.** An upload is streamed to `images/.incoming/<random>.tar`, unpacked into
//! `images/.incoming/<random>/`, and renamed to `images/<name>` when complete: a listed image is
//! always whole. Whatever a crash leaves in `.incoming` is removed at start.
//!
//! **Confinement.** Layers are unpacked entry by entry, never following a link: every entry's
//! path is relative with no `..`, each folder on its way must be a real folder (a symbolic
//! link made by an earlier entry or layer is refused, so an archive cannot write outside the
//! root), setuid and setgid bits are dropped, device nodes and FIFOs are skipped (and counted),
//! and the unpacked total is capped at 4 × `[orchestrator] max_image_bytes`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The built-in image: the host's own system trees, read-only (see [`crate::sandbox::mount`]).
pub const HOST: &str = "host";

/// Most entries (files, folders, links) one image may hold, across its layers.
pub const MAX_ENTRIES: u64 = 2_000_000;
/// Largest `manifest.json` or image config read.
const MAX_JSON: u64 = 4 * 1024 * 1024;

/// What `image.json` holds: the image's record, read at list time.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ImageMeta {
    pub name: String,
    /// Unix seconds.
    pub created_at: i64,
    /// Bytes of its unpacked files.
    pub size_bytes: u64,
    /// `"docker-save"`.
    pub source: String,
    /// The config's `Env`: `KEY=value` entries.
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default)]
    pub working_dir: Option<String>,
    #[serde(default)]
    pub cmd: Vec<String>,
    #[serde(default)]
    pub entrypoint: Vec<String>,
    /// Device nodes and FIFOs in its layers, skipped.
    #[serde(default)]
    pub skipped_devices: u64,
    /// A snapshot's ([`crate::sandbox::snapshot`]): the image it is built on, `host` or an
    /// imported image. `None` for an imported image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<String>,
    /// A snapshot's: the credential that took it. Only it and admins see and use it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// A snapshot's: the host uid (and gid) its sandbox's files belonged to, which becomes
    /// the uid of each sandbox started from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
}

impl ImageMeta {
    /// Whether it is a snapshot (made of a sandbox's changes over `base`).
    pub fn is_snapshot(&self) -> bool {
        self.base.is_some()
    }

    /// Whether credential `who` may see and use it: an imported image is everyone's, a
    /// snapshot its owner's (admins see all).
    pub fn visible_to(&self, who: &str, admin: bool) -> bool {
        admin || self.owner.as_deref().is_none_or(|owner| owner == who)
    }

    /// The command a sandbox without `command` runs: `Entrypoint`, then `Cmd`.
    pub fn command(&self) -> Vec<String> {
        self.entrypoint.iter().chain(&self.cmd).cloned().collect()
    }

    /// `Env` as a map (entries without `=` are left out, later ones win).
    pub fn env_map(&self) -> BTreeMap<String, String> {
        self.env
            .iter()
            .filter_map(|kv| kv.split_once('='))
            .filter(|(k, v)| !k.is_empty() && !v.contains('\0'))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }
}

/// Why an archive was refused, or could not be unpacked.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The archive is not an image `docker save` wrote, or holds what is refused (the
    /// message says which).
    #[error("{0}")]
    Invalid(String),
    /// An image of that name exists.
    #[error("an image named {0} exists: delete it first, or pick another name")]
    Exists(String),
    /// The disk said no.
    #[error("cannot unpack the image: {0}")]
    Io(#[from] io::Error),
}

fn invalid(msg: impl Into<String>) -> ImageError {
    ImageError::Invalid(msg.into())
}

/// Whether `name` is an image name: 1 to 63 of `[a-z0-9-]`.
pub fn valid_name(name: &str) -> bool {
    crate::sandbox::volume::valid_name(name)
}

/// This node's images folder.
#[derive(Debug)]
pub struct Images {
    dir: PathBuf,
    /// Held exclusively while an image is renamed into place or deleted, shared while a
    /// sandbox that uses one is started: an image is not deleted under a starting sandbox.
    pub lock: tokio::sync::RwLock<()>,
}

impl Images {
    pub fn new(data_dir: &Path) -> Images {
        Images {
            dir: data_dir.join("images"),
            lock: tokio::sync::RwLock::new(()),
        }
    }

    fn incoming(&self) -> PathBuf {
        self.dir.join(".incoming")
    }

    /// Makes `images/` and `images/.incoming/` (root's alone) and removes what an
    /// interrupted import or delete left there.
    pub fn init(&self) -> io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o700))?;
        let incoming = self.incoming();
        if incoming.exists() {
            for entry in std::fs::read_dir(&incoming)? {
                let path = entry?.path();
                tracing::warn!(path = %path.display(), "removing an interrupted image import");
                remove_any(&path)?;
            }
        }
        std::fs::create_dir_all(&incoming)
    }

    /// A new file under `.incoming/` for an upload, and its path.
    pub fn upload_file(&self) -> io::Result<(PathBuf, File)> {
        self.init_incoming()?;
        let path = self
            .incoming()
            .join(format!("{}.tar", crate::sandbox::new_id()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        Ok((path, file))
    }

    fn init_incoming(&self) -> io::Result<()> {
        if !self.incoming().is_dir() {
            self.init()?;
        }
        Ok(())
    }

    pub fn rootfs(&self, name: &str) -> PathBuf {
        self.dir.join(name).join("rootfs")
    }

    /// A snapshot's copy of its sandbox's overlay layer.
    pub fn layer(&self, name: &str) -> PathBuf {
        self.dir.join(name).join("layer")
    }

    /// A snapshot's copy of its sandbox's `/workspace`.
    pub fn workspace(&self, name: &str) -> PathBuf {
        self.dir.join(name).join("workspace")
    }

    /// A new folder under `.incoming/` (root's alone) to build an image in before
    /// [`Images::commit`]; what a crash leaves there is removed at the next start.
    pub fn staging(&self) -> io::Result<PathBuf> {
        self.init_incoming()?;
        let staging = self.incoming().join(crate::sandbox::new_id());
        std::fs::create_dir(&staging)?;
        std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(0o700))?;
        Ok(staging)
    }

    /// Writes `meta` into `staging` and renames it into place as image `meta.name`: from then
    /// on it is listed, whole. On failure `staging` is left for the caller to remove.
    pub fn commit(&self, staging: &Path, meta: &ImageMeta) -> Result<(), ImageError> {
        let json =
            serde_json::to_vec_pretty(meta).map_err(|e| ImageError::Io(io::Error::other(e)))?;
        std::fs::write(staging.join("image.json"), json)?;
        let target = self.dir.join(&meta.name);
        if std::fs::symlink_metadata(&target).is_ok() {
            return Err(ImageError::Exists(meta.name.clone()));
        }
        std::fs::rename(staging, &target)?;
        Ok(())
    }

    /// The snapshots built on image `name`.
    pub fn dependents(&self, name: &str) -> Vec<String> {
        self.list()
            .into_iter()
            .filter(|m| m.base.as_deref() == Some(name))
            .map(|m| m.name)
            .collect()
    }

    /// Removes a folder made by [`Images::staging`].
    pub fn discard(&self, staging: &Path) {
        if let Err(e) = remove_any(staging) {
            tracing::warn!(path = %staging.display(), error = %e, "cannot remove a staging folder; the next start will");
        }
    }

    /// Image `name`, when it is complete.
    pub fn get(&self, name: &str) -> Option<ImageMeta> {
        if !valid_name(name) {
            return None;
        }
        let text = std::fs::read(self.dir.join(name).join("image.json")).ok()?;
        serde_json::from_slice(&text).ok()
    }

    /// Every complete image, by name.
    pub fn list(&self) -> Vec<ImageMeta> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut out: Vec<ImageMeta> = entries
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().to_str().and_then(|n| self.get(n)))
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Unpacks the archive at `archive` as image `name` and renames it into place. Blocking.
    /// `max_unpacked`: the most file bytes its layers may hold together.
    pub fn import(
        &self,
        name: &str,
        archive: &Path,
        max_unpacked: u64,
        now: i64,
    ) -> Result<ImageMeta, ImageError> {
        let staging = self.staging()?;
        let made = (|| {
            let rootfs = staging.join("rootfs");
            std::fs::create_dir(&rootfs)?;
            std::fs::set_permissions(&rootfs, std::fs::Permissions::from_mode(0o755))?;
            let mut meta = unpack_docker_save(archive, &rootfs, max_unpacked)?;
            meta.name = name.to_string();
            meta.created_at = now;
            self.commit(&staging, &meta)?;
            Ok(meta)
        })();
        if made.is_err() {
            self.discard(&staging);
        }
        made
    }

    /// Deletes image `name`: renamed out of the listing first (atomic), then removed.
    pub fn remove(&self, name: &str) -> io::Result<()> {
        self.init_incoming()?;
        let doomed = self
            .incoming()
            .join(format!("{}-deleted", crate::sandbox::new_id()));
        std::fs::rename(self.dir.join(name), &doomed)?;
        remove_any(&doomed)
    }
}

/// Removes a file, link or folder tree, never following links.
fn remove_any(path: &Path) -> io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Where one member of the outer archive is: its data's offset and size.
#[derive(Clone, Copy)]
struct Member {
    offset: u64,
    size: u64,
}

#[derive(Deserialize)]
struct ManifestEntry {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "Layers")]
    layers: Vec<String>,
}

#[derive(Deserialize, Default)]
struct ConfigFile {
    #[serde(default)]
    config: Option<RunConfig>,
}

#[derive(Deserialize, Default)]
struct RunConfig {
    #[serde(rename = "Env", default)]
    env: Option<Vec<String>>,
    #[serde(rename = "WorkingDir", default)]
    working_dir: Option<String>,
    #[serde(rename = "Cmd", default)]
    cmd: Option<Vec<String>>,
    #[serde(rename = "Entrypoint", default)]
    entrypoint: Option<Vec<String>>,
}

/// Normalizes a member name of the outer archive (`./a/b` → `a/b`).
fn member_name(raw: &str) -> String {
    raw.split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect::<Vec<_>>()
        .join("/")
}

/// Reads a `docker save` archive's index (one pass, nothing extracted), then applies its
/// layers in the manifest's order into `rootfs`.
fn unpack_docker_save(
    archive: &Path,
    rootfs: &Path,
    max_unpacked: u64,
) -> Result<ImageMeta, ImageError> {
    let mut members: HashMap<String, Member> = HashMap::new();
    let mut links: HashMap<String, String> = HashMap::new();
    {
        let mut outer = tar::Archive::new(File::open(archive)?);
        let entries = outer.entries().map_err(|e| not_a_tar(&e))?;
        for entry in entries {
            let entry = entry.map_err(|e| not_a_tar(&e))?;
            let Ok(path) = std::str::from_utf8(&entry.path_bytes()).map(member_name) else {
                continue;
            };
            match entry.header().entry_type() {
                tar::EntryType::Regular | tar::EntryType::Continuous => {
                    members.insert(
                        path,
                        Member {
                            offset: entry.raw_file_position(),
                            size: entry.size(),
                        },
                    );
                }
                // Old `docker save` links a layer that two images share to its one copy.
                tar::EntryType::Symlink => {
                    if let Some(target) = entry.link_name_bytes() {
                        let target = String::from_utf8_lossy(&target).into_owned();
                        let base = Path::new(&path)
                            .parent()
                            .map(|p| p.to_string_lossy().into_owned())
                            .unwrap_or_default();
                        links.insert(path, resolve_relative(&base, &target));
                    }
                }
                _ => {}
            }
        }
    }
    let find = |name: &str| -> Option<Member> {
        let mut name = member_name(name);
        for _ in 0..8 {
            if let Some(m) = members.get(&name) {
                return Some(*m);
            }
            name = links.get(&name)?.clone();
        }
        None
    };
    let mut file = File::open(archive)?;
    let Some(manifest) = find("manifest.json") else {
        if find("index.json").is_some() || find("oci-layout").is_some() {
            return Err(invalid(
                "this is an OCI image layout without manifest.json: only the archives `docker save` and `podman save` write are supported yet",
            ));
        }
        return Err(invalid(
            "the archive has no manifest.json: make it with `docker save IMAGE` (or `podman save`)",
        ));
    };
    let manifest: Vec<ManifestEntry> =
        serde_json::from_slice(&read_member(&mut file, manifest, MAX_JSON)?)
            .map_err(|e| invalid(format!("manifest.json is not a docker save manifest: {e}")))?;
    let [image] = manifest.as_slice() else {
        return Err(invalid(format!(
            "the archive holds {} images: save one image per archive",
            manifest.len()
        )));
    };
    let config = find(&image.config)
        .ok_or_else(|| invalid("the archive lacks the image config manifest.json names"))?;
    let config: ConfigFile = serde_json::from_slice(&read_member(&mut file, config, MAX_JSON)?)
        .map_err(|e| invalid(format!("the image config is not JSON: {e}")))?;
    let run = config.config.unwrap_or_default();

    let mut state = Unpack {
        root: rootfs.to_path_buf(),
        bytes: 0,
        entries: 0,
        max_bytes: max_unpacked,
        skipped_devices: 0,
    };
    for (i, layer) in image.layers.iter().enumerate() {
        let member = find(layer).ok_or_else(|| {
            invalid(format!(
                "the archive lacks layer {} that manifest.json names",
                i + 1
            ))
        })?;
        file.seek(SeekFrom::Start(member.offset))?;
        let mut magic = [0u8; 2];
        let head = (&mut file).take(2).read(&mut magic)?;
        if head == 2 && magic == [0x1f, 0x8b] {
            return Err(invalid(
                "compressed layers are not supported yet: use the archive `docker save` writes",
            ));
        }
        file.seek(SeekFrom::Start(member.offset))?;
        state.layer(i + 1, (&mut file).take(member.size))?;
    }
    Ok(ImageMeta {
        name: String::new(),
        created_at: 0,
        size_bytes: state.bytes,
        source: "docker-save".into(),
        env: run.env.unwrap_or_default(),
        working_dir: run.working_dir.filter(|w| !w.is_empty()),
        cmd: run.cmd.unwrap_or_default(),
        entrypoint: run.entrypoint.unwrap_or_default(),
        skipped_devices: state.skipped_devices,
        base: None,
        owner: None,
        uid: None,
    })
}

fn not_a_tar(e: &io::Error) -> ImageError {
    invalid(format!(
        "the body is not a tar archive ({e}): send the archive `docker save IMAGE` writes"
    ))
}

/// `target` of a link in folder `base`, as a member name (`..` steps up; never above the top).
fn resolve_relative(base: &str, target: &str) -> String {
    let mut parts: Vec<&str> = if target.starts_with('/') {
        Vec::new()
    } else {
        base.split('/').filter(|c| !c.is_empty()).collect()
    };
    for c in target.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    parts.join("/")
}

fn read_member(file: &mut File, m: Member, max: u64) -> Result<Vec<u8>, ImageError> {
    if m.size > max {
        return Err(invalid("manifest.json or the image config is too large"));
    }
    file.seek(SeekFrom::Start(m.offset))?;
    let mut out = Vec::with_capacity(m.size as usize);
    file.take(m.size).read_to_end(&mut out)?;
    Ok(out)
}

/// Applying layers into one root.
struct Unpack {
    root: PathBuf,
    bytes: u64,
    entries: u64,
    max_bytes: u64,
    skipped_devices: u64,
}

/// An entry's path split into checked components: relative, without `..`. `None`: the root.
fn components(raw: &[u8], layer: usize) -> Result<Vec<String>, ImageError> {
    let text = std::str::from_utf8(raw).map_err(|_| {
        invalid(format!(
            "layer {layer} has an entry whose path is not UTF-8"
        ))
    })?;
    let shown: String = text.chars().take(120).collect();
    if text.starts_with('/') {
        return Err(invalid(format!(
            "layer {layer} has the absolute entry path `{shown}`: entries must stay inside the image"
        )));
    }
    let mut out = Vec::new();
    for c in text.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                return Err(invalid(format!(
                    "layer {layer} has the entry `{shown}`, whose `..` would leave the image"
                )))
            }
            c if c.contains('\0') => return Err(invalid("an entry path holds NUL")),
            c => out.push(c.to_string()),
        }
    }
    Ok(out)
}

impl Unpack {
    /// Makes sure every folder on the way to `parts` (all but the last) is a real folder,
    /// making missing ones; a link or a file on the way is refused.
    fn parent(&self, parts: &[String], layer: usize) -> Result<PathBuf, ImageError> {
        let mut at = self.root.clone();
        for c in &parts[..parts.len().saturating_sub(1)] {
            at.push(c);
            match std::fs::symlink_metadata(&at) {
                Ok(m) if m.is_dir() => {}
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(invalid(format!(
                        "layer {layer} has the entry `{}`, which goes through the symbolic link `{}`: refused, it could lead outside the image",
                        parts.join("/"),
                        relative(&self.root, &at)
                    )))
                }
                Ok(_) => {
                    return Err(invalid(format!(
                        "layer {layer} has the entry `{}` under `{}`, which is not a folder",
                        parts.join("/"),
                        relative(&self.root, &at)
                    )))
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    std::fs::create_dir(&at)?;
                    std::fs::set_permissions(&at, std::fs::Permissions::from_mode(0o755))?;
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(at)
    }

    fn layer(&mut self, layer: usize, src: impl Read) -> Result<(), ImageError> {
        // What this layer wrote: its own whiteouts apply to the layers below only.
        let mut written: HashSet<Vec<String>> = HashSet::new();
        let mut archive = tar::Archive::new(src);
        let entries = archive
            .entries()
            .map_err(|e| invalid(format!("layer {layer} is not a tar archive: {e}")))?;
        for entry in entries {
            let mut entry =
                entry.map_err(|e| invalid(format!("layer {layer} is not a tar archive: {e}")))?;
            self.entries += 1;
            if self.entries > MAX_ENTRIES {
                return Err(invalid(format!(
                    "the image holds more than {MAX_ENTRIES} entries"
                )));
            }
            let parts = components(&entry.path_bytes(), layer)?;
            let Some(last) = parts.last().cloned() else {
                continue;
            };
            let parent = self.parent(&parts, layer)?;
            let dst = parent.join(&last);
            if last == ".wh..wh..opq" {
                // An opaque folder: what lower layers put in it goes.
                let dir_parts = &parts[..parts.len() - 1];
                for child in std::fs::read_dir(&parent)? {
                    let child = child?;
                    let mut key = dir_parts.to_vec();
                    key.push(child.file_name().to_string_lossy().into_owned());
                    if !written.contains(&key) {
                        remove_any(&child.path())?;
                    }
                }
                continue;
            }
            if let Some(gone) = last.strip_prefix(".wh.") {
                let mut key = parts[..parts.len() - 1].to_vec();
                key.push(gone.to_string());
                if !written.contains(&key) && !gone.is_empty() && gone != "." && gone != ".." {
                    remove_any(&parent.join(gone))?;
                }
                continue;
            }
            let header = entry.header();
            let kind = header.entry_type();
            let mode = header.mode().unwrap_or(0o644) & 0o1777;
            let uid = header.uid().ok().and_then(|u| u32::try_from(u).ok());
            let gid = header.gid().ok().and_then(|g| u32::try_from(g).ok());
            let existing = std::fs::symlink_metadata(&dst).ok();
            match kind {
                tar::EntryType::Directory => {
                    match existing {
                        Some(m) if m.is_dir() => {}
                        Some(_) => {
                            std::fs::remove_file(&dst)?;
                            std::fs::create_dir(&dst)?;
                        }
                        None => std::fs::create_dir(&dst)?,
                    }
                    std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(mode))?;
                    std::os::unix::fs::lchown(&dst, uid, gid)?;
                }
                tar::EntryType::Regular | tar::EntryType::Continuous => {
                    if existing.is_some() {
                        remove_any(&dst)?;
                    }
                    let size = entry.size();
                    if self.bytes.saturating_add(size) > self.max_bytes {
                        return Err(self.too_big());
                    }
                    let mut out = std::fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(0o600)
                        .custom_flags(nix::libc::O_NOFOLLOW)
                        .open(&dst)?;
                    let copied = io::copy(&mut (&mut entry).take(size), &mut out)?;
                    self.bytes = self.bytes.saturating_add(copied);
                    std::os::unix::fs::fchown(&out, uid, gid)?;
                    out.set_permissions(std::fs::Permissions::from_mode(mode))?;
                }
                tar::EntryType::Symlink => {
                    if existing.is_some() {
                        remove_any(&dst)?;
                    }
                    let target = entry
                        .link_name_bytes()
                        .ok_or_else(|| invalid(format!("layer {layer}: a link without target")))?;
                    let target = std::str::from_utf8(&target).map_err(|_| {
                        invalid(format!("layer {layer}: a link target is not UTF-8"))
                    })?;
                    std::os::unix::fs::symlink(target, &dst)?;
                    std::os::unix::fs::lchown(&dst, uid, gid)?;
                }
                tar::EntryType::Link => {
                    let target = entry
                        .link_name_bytes()
                        .ok_or_else(|| invalid(format!("layer {layer}: a link without target")))?;
                    let target_parts = components(&target, layer)?;
                    if target_parts.is_empty() {
                        return Err(invalid(format!(
                            "layer {layer}: a hard link to the root folder"
                        )));
                    }
                    let source = self
                        .parent(&target_parts, layer)?
                        .join(&target_parts[target_parts.len() - 1]);
                    match std::fs::symlink_metadata(&source) {
                        Ok(m) if !m.is_dir() => {}
                        _ => {
                            return Err(invalid(format!(
                                "layer {layer} has a hard link `{}` to `{}`, which is not a file of the image",
                                parts.join("/"),
                                target_parts.join("/")
                            )))
                        }
                    }
                    if existing.is_some() {
                        remove_any(&dst)?;
                    }
                    std::fs::hard_link(&source, &dst)?;
                }
                tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                    self.skipped_devices += 1;
                    continue;
                }
                other => {
                    return Err(invalid(format!(
                        "layer {layer} has the entry `{}` of a kind not supported ({other:?})",
                        parts.join("/")
                    )))
                }
            }
            written.insert(parts);
        }
        Ok(())
    }

    fn too_big(&self) -> ImageError {
        invalid(format!(
            "the image unpacks to more than {} bytes (4 × [orchestrator] max_image_bytes)",
            self.max_bytes
        ))
    }
}

fn relative(root: &Path, p: &Path) -> String {
    p.strip_prefix(root)
        .unwrap_or(p)
        .to_string_lossy()
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_paths_stay_inside() {
        assert_eq!(components(b"./a/b", 1).unwrap(), vec!["a", "b"]);
        assert!(components(b"/etc/passwd", 1).is_err());
        assert!(components(b"a/../../x", 1).is_err());
        assert!(components(b"./", 1).unwrap().is_empty());
    }

    #[test]
    fn shared_layers_resolve_through_links() {
        assert_eq!(resolve_relative("abc", "../def/layer.tar"), "def/layer.tar");
        assert_eq!(resolve_relative("", "x/./y"), "x/y");
    }

    #[test]
    fn command_is_entrypoint_then_cmd() {
        let meta = ImageMeta {
            name: "x".into(),
            created_at: 0,
            size_bytes: 0,
            source: "docker-save".into(),
            env: vec!["A=1".into(), "BAD".into(), "B=x=y".into()],
            working_dir: None,
            cmd: vec!["-p".into(), "80".into()],
            entrypoint: vec!["/bin/srv".into()],
            skipped_devices: 0,
            base: None,
            owner: None,
            uid: None,
        };
        assert_eq!(meta.command(), vec!["/bin/srv", "-p", "80"]);
        let env = meta.env_map();
        assert_eq!(env.get("B").map(String::as_str), Some("x=y"));
        assert_eq!(env.len(), 2);
    }
}
