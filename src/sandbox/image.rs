//! Images on disk: root filesystems unpacked from image archives, which isolated sandboxes
//! start from (`"image": N` on creation).
//!
//! **Formats.** An OCI image layout tar (`oci-layout`, `index.json`, `blobs/sha256/…`: what
//! `podman save --format oci-archive` and Docker 25's `docker save` write) is followed from
//! `index.json` through any nested image index to the one manifest for linux on this CPU
//! (attestations passed over), then its config and layers; every blob is checked against its
//! sha256 digest (and size) as it is read, and a mismatch refuses the archive. A `docker save`
//! archive (`manifest.json`, the config, a tar per layer; also what `podman save` writes by
//! default) is read when there is no layout, or when the layout is not one this follows and a
//! `manifest.json` is beside it. `image.json` records `source` `"oci"` or `"docker-save"`.
//! Layers are plain or gzip tars, told by their first bytes (in either format); zstd layers are
//! refused by name.
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
//! names past NAME_MAX and paths past 3072 bytes are refused, and the unpacked total is capped
//! at 4 × `[orchestrator] max_image_bytes`: both the bytes of the files written and the bytes
//! of the decompressed layer streams (so a gzip bomb stops at the cap). Tests: a property test
//! below (odd entry names never lead outside the root) and `fuzz/fuzz_targets/image_tar.rs`.

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::{self, BufRead, Read, Seek, SeekFrom};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The built-in image: the host's own system trees, read-only (see [`crate::sandbox::mount`]).
pub const HOST: &str = "host";

/// Most entries (files, folders, links) one image may hold, across its layers.
pub const MAX_ENTRIES: u64 = 2_000_000;
/// Largest `manifest.json` or image config read.
const MAX_JSON: u64 = 4 * 1024 * 1024;
/// Longest name of one entry component (Linux's NAME_MAX), and of an entry's whole path or a
/// link's target (below PATH_MAX, leaving room for where the root is).
const MAX_NAME: usize = 255;
const MAX_PATH: usize = 3072;

/// What `image.json` holds: the image's record, read at list time.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ImageMeta {
    pub name: String,
    /// Unix seconds.
    pub created_at: i64,
    /// Bytes of its unpacked files.
    pub size_bytes: u64,
    /// `"docker-save"`, `"oci"` or `"snapshot"`.
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
            let mut meta = unpack_archive(archive, &rootfs, max_unpacked)?;
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

/// The outer archive's table of contents, read in one pass with nothing extracted: its files
/// and symbolic links by normalized name.
struct Outer {
    members: HashMap<String, Member>,
    links: HashMap<String, String>,
}

impl Outer {
    fn read(archive: &Path) -> Result<Outer, ImageError> {
        let mut members: HashMap<String, Member> = HashMap::new();
        let mut links: HashMap<String, String> = HashMap::new();
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
                // `docker save` (and `podman save`) link a layer to its one copy.
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
        Ok(Outer { members, links })
    }

    /// The member `name` names, through at most 8 links.
    fn find(&self, name: &str) -> Option<Member> {
        let mut name = member_name(name);
        for _ in 0..8 {
            if let Some(m) = self.members.get(&name) {
                return Some(*m);
            }
            name = self.links.get(&name)?.clone();
        }
        None
    }
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

/// An OCI descriptor: what a blob is, its digest and size (and, in an index, its platform).
#[derive(Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    #[serde(default)]
    size: Option<u64>,
    #[serde(default)]
    platform: Option<Platform>,
    #[serde(default)]
    annotations: HashMap<String, String>,
}

#[derive(Deserialize)]
struct Platform {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
}

/// `index.json`, or an image index blob it points to.
#[derive(Deserialize)]
struct OciIndex {
    #[serde(default)]
    manifests: Vec<Descriptor>,
}

/// An image manifest: its config and its layers, bottom first.
#[derive(Deserialize)]
struct OciManifest {
    config: Descriptor,
    #[serde(default)]
    layers: Vec<Descriptor>,
}

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// How deep image indexes may nest (an index of indexes is legal; a loop is not).
const MAX_INDEX_DEPTH: usize = 4;

/// One layer to apply: where its blob is, and the sha256 its bytes must have when the archive
/// states one (always in an OCI layout; in a `docker save` archive when the layer is a blob).
struct LayerRef {
    member: Member,
    sha256: Option<String>,
}

/// What an archive asks for: the config, and its layers in order.
struct Plan {
    /// `"oci"` or `"docker-save"`, as `image.json` records.
    source: &'static str,
    run: RunConfig,
    layers: Vec<LayerRef>,
}

/// Why an OCI layout was not followed.
enum OciRefusal {
    /// It is not a layout this reads (a `manifest.json` beside it is read instead, if any).
    Unsound(String),
    /// It is damaged or altered (a digest or a size differs): the archive is refused.
    Damaged(ImageError),
}

/// Normalizes a member name of the outer archive (`./a/b` → `a/b`).
fn member_name(raw: &str) -> String {
    raw.split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect::<Vec<_>>()
        .join("/")
}

/// Reads an image archive (an OCI image layout tar, or what `docker save` writes) and applies
/// its layers in order into `rootfs`. `max_unpacked`: the most bytes its layers may unpack to
/// (the decompressed tar streams, and the files they hold).
fn unpack_archive(
    archive: &Path,
    rootfs: &Path,
    max_unpacked: u64,
) -> Result<ImageMeta, ImageError> {
    let outer = Outer::read(archive)?;
    let mut file = File::open(archive)?;
    let plan = plan(&outer, &mut file)?;
    let mut state = Unpack {
        root: rootfs.to_path_buf(),
        bytes: 0,
        stream_bytes: 0,
        entries: 0,
        max_bytes: max_unpacked,
        skipped_devices: 0,
    };
    for (i, layer) in plan.layers.iter().enumerate() {
        state.apply(&mut file, i + 1, layer)?;
    }
    let run = plan.run;
    Ok(ImageMeta {
        name: String::new(),
        created_at: 0,
        size_bytes: state.bytes,
        source: plan.source.into(),
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

/// For the fuzz target (`fuzz/fuzz_targets/image_tar.rs`): unpacks `bytes` as an image archive
/// (or, when they start with `L`, the rest as the one layer of a `docker save` archive made
/// here) into a fresh folder under the temp dir, beside an empty `canary/` folder, then removes
/// it all. Returns what was found beside the root or in `canary/`: empty while the unpacker
/// keeps to its root. Refusals are expected and not reported.
#[doc(hidden)]
pub fn fuzz_unpack(bytes: &[u8]) -> io::Result<Vec<String>> {
    let base = std::env::temp_dir().join(format!("sandgate-fuzz-{}", crate::sandbox::new_id()));
    std::fs::create_dir(&base)?;
    let found = (|| {
        let archive = base.join("archive.tar");
        match bytes.strip_prefix(b"L") {
            Some(layer) => {
                let mut outer = tar::Builder::new(File::create(&archive)?);
                for (name, data) in [
                    (
                        "manifest.json",
                        &br#"[{"Config":"c.json","Layers":["l/layer.tar"]}]"#[..],
                    ),
                    ("c.json", &br#"{"config":{"Cmd":["/bin/sh"]}}"#[..]),
                    ("l/layer.tar", layer),
                ] {
                    let mut h = tar::Header::new_gnu();
                    h.set_size(data.len() as u64);
                    h.set_mode(0o644);
                    outer.append_data(&mut h, name, data)?;
                }
                outer.into_inner()?.sync_all()?;
            }
            None => std::fs::write(&archive, bytes)?,
        }
        let (root, canary) = (base.join("root"), base.join("canary"));
        std::fs::create_dir(&root)?;
        std::fs::create_dir(&canary)?;
        let _ = unpack_archive(&archive, &root, 16 << 20);
        let mut stray = Vec::new();
        for e in std::fs::read_dir(&base)? {
            let name = e?.file_name().to_string_lossy().into_owned();
            if !["archive.tar", "root", "canary"].contains(&name.as_str()) {
                stray.push(name);
            }
        }
        for e in std::fs::read_dir(&canary)? {
            stray.push(format!("canary/{}", e?.file_name().to_string_lossy()));
        }
        Ok(stray)
    })();
    remove_any(&base)?;
    found
}

/// Which metadata to follow. An OCI layout (`index.json`) is preferred, its every blob being
/// checked against its digest; `manifest.json` (which Docker 25 and later write beside it) is
/// read when the layout is not one this follows, or is all there is.
fn plan(outer: &Outer, file: &mut File) -> Result<Plan, ImageError> {
    let manifest = outer.find("manifest.json");
    if outer.find("index.json").is_some() || outer.find("oci-layout").is_some() {
        match oci_plan(outer, file) {
            Ok(plan) => return Ok(plan),
            Err(OciRefusal::Damaged(e)) => return Err(e),
            Err(OciRefusal::Unsound(why)) => {
                let Some(manifest) = manifest else {
                    return Err(invalid(format!(
                        "{why}: make the archive with `podman save --format oci-archive` or `docker save IMAGE`"
                    )));
                };
                tracing::info!(why = %why, "an image archive's OCI layout is not followed: reading its manifest.json");
                return docker_plan(outer, file, manifest);
            }
        }
    }
    match manifest {
        Some(m) => docker_plan(outer, file, m),
        None => Err(invalid(
            "the archive has neither manifest.json nor index.json: make it with `docker save IMAGE` or `podman save`",
        )),
    }
}

/// The plan of a `docker save` archive: `manifest.json` → config and layer files.
fn docker_plan(outer: &Outer, file: &mut File, manifest: Member) -> Result<Plan, ImageError> {
    let manifest: Vec<ManifestEntry> =
        serde_json::from_slice(&read_member(file, manifest, MAX_JSON)?)
            .map_err(|e| invalid(format!("manifest.json is not a docker save manifest: {e}")))?;
    let [image] = manifest.as_slice() else {
        return Err(invalid(format!(
            "the archive holds {} images: save one image per archive",
            manifest.len()
        )));
    };
    let config = outer
        .find(&image.config)
        .ok_or_else(|| invalid("the archive lacks the image config manifest.json names"))?;
    let config_bytes = read_member(file, config, MAX_JSON)?;
    if let Some(want) = blob_sha256(&image.config) {
        check_sha256(&sha256_hex(&config_bytes), &want, "the image config")?;
    }
    let config: ConfigFile = serde_json::from_slice(&config_bytes)
        .map_err(|e| invalid(format!("the image config is not JSON: {e}")))?;
    let layers = image
        .layers
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let member = outer.find(name).ok_or_else(|| {
                invalid(format!(
                    "the archive lacks layer {} that manifest.json names",
                    i + 1
                ))
            })?;
            Ok(LayerRef {
                member,
                sha256: blob_sha256(name),
            })
        })
        .collect::<Result<Vec<_>, ImageError>>()?;
    Ok(Plan {
        source: "docker-save",
        run: config.config.unwrap_or_default(),
        layers,
    })
}

/// The sha256 a member named `blobs/sha256/<hex>` must have (Docker 25's `manifest.json` names
/// its layers so).
fn blob_sha256(name: &str) -> Option<String> {
    let hex = member_name(name).strip_prefix("blobs/sha256/")?.to_string();
    is_sha256_hex(&hex).then_some(hex)
}

fn is_sha256_hex(hex: &str) -> bool {
    hex.len() == 64
        && hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The plan of an OCI image layout: `index.json` → (image index →) manifest → config, layers.
fn oci_plan(outer: &Outer, file: &mut File) -> Result<Plan, OciRefusal> {
    let unsound = |why: String| OciRefusal::Unsound(why);
    let index = outer
        .find("index.json")
        .ok_or_else(|| unsound("the OCI layout has no index.json".into()))?;
    let index: OciIndex =
        serde_json::from_slice(&read_member(file, index, MAX_JSON).map_err(OciRefusal::Damaged)?)
            .map_err(|e| unsound(format!("index.json is not an OCI image index: {e}")))?;
    let manifest = pick_manifest(outer, file, index, 0)?;
    let config = read_blob(outer, file, &manifest.config, "the image config")?;
    let config: ConfigFile = serde_json::from_slice(&config)
        .map_err(|e| unsound(format!("the image config is not JSON: {e}")))?;
    let mut layers = Vec::with_capacity(manifest.layers.len());
    for (i, layer) in manifest.layers.iter().enumerate() {
        let n = i + 1;
        let media = layer.media_type.as_str();
        if media.contains("zstd") {
            return Err(OciRefusal::Damaged(zstd_refused(n)));
        }
        let known = media.is_empty()
            || media.starts_with("application/vnd.oci.image.layer.")
            || media.starts_with("application/vnd.docker.image.rootfs.");
        if !known || media.contains("encrypted") {
            return Err(OciRefusal::Damaged(invalid(format!(
                "layer {n} has the media type `{media}`, which is not a layer this reads (plain or gzip tar)"
            ))));
        }
        let (member, hex) = blob(outer, layer, &format!("layer {n}"))?;
        layers.push(LayerRef {
            member,
            sha256: Some(hex),
        });
    }
    Ok(Plan {
        source: "oci",
        run: config.config.unwrap_or_default(),
        layers,
    })
}

/// The one image manifest an index names for this machine's platform (linux on this CPU),
/// following nested indexes; attestations and other platforms are passed over.
fn pick_manifest(
    outer: &Outer,
    file: &mut File,
    index: OciIndex,
    depth: usize,
) -> Result<OciManifest, OciRefusal> {
    if depth >= MAX_INDEX_DEPTH {
        return Err(OciRefusal::Unsound(format!(
            "the OCI layout nests image indexes more than {MAX_INDEX_DEPTH} deep"
        )));
    }
    let arch = oci_arch();
    let fits = |d: &Descriptor| {
        let kind_ok = [OCI_MANIFEST, DOCKER_MANIFEST, OCI_INDEX, DOCKER_LIST, ""]
            .contains(&d.media_type.as_str());
        let attestation = d
            .annotations
            .get("vnd.docker.reference.type")
            .is_some_and(|t| t == "attestation-manifest");
        let platform_ok = d
            .platform
            .as_ref()
            .is_none_or(|p| p.os == "linux" && p.architecture == arch);
        kind_ok && !attestation && platform_ok
    };
    let mut picked: Vec<&Descriptor> = Vec::new();
    for d in index.manifests.iter().filter(|d| fits(d)) {
        let present = d
            .digest
            .strip_prefix("sha256:")
            .is_some_and(|hex| outer.find(&format!("blobs/sha256/{hex}")).is_some());
        if present && !picked.iter().any(|p| p.digest == d.digest) {
            picked.push(d);
        }
    }
    // Several: one stated for this platform wins over those stating none.
    if picked.len() > 1 {
        let exact: Vec<&Descriptor> = picked
            .iter()
            .copied()
            .filter(|d| d.platform.is_some())
            .collect();
        if exact.len() == 1 {
            picked = exact;
        }
    }
    let chosen = match picked.as_slice() {
        [one] => *one,
        [] => {
            return Err(OciRefusal::Unsound(format!(
                "index.json names no image manifest for linux/{arch} whose blob the archive holds"
            )))
        }
        many => {
            return Err(OciRefusal::Unsound(format!(
                "the archive holds {} images: save one image per archive",
                many.len()
            )))
        }
    };
    let bytes = read_blob(outer, file, chosen, "the image manifest")?;
    let value: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| OciRefusal::Unsound(format!("the image manifest is not JSON: {e}")))?;
    if value.get("manifests").is_some() {
        let nested: OciIndex = serde_json::from_value(value)
            .map_err(|e| OciRefusal::Unsound(format!("an image index is not one: {e}")))?;
        return pick_manifest(outer, file, nested, depth + 1);
    }
    serde_json::from_value(value)
        .map_err(|e| OciRefusal::Unsound(format!("the image manifest is not an OCI manifest: {e}")))
}

/// The OCI name of this machine's CPU (`amd64` on x86_64).
fn oci_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

/// The member a descriptor points to (`blobs/sha256/<hex>`), its size checked.
fn blob(outer: &Outer, d: &Descriptor, what: &str) -> Result<(Member, String), OciRefusal> {
    let Some(hex) = d
        .digest
        .strip_prefix("sha256:")
        .filter(|h| is_sha256_hex(h))
    else {
        return Err(OciRefusal::Unsound(format!(
            "{what} has the digest `{}`: only sha256 digests are read",
            d.digest.chars().take(80).collect::<String>()
        )));
    };
    let member = outer.find(&format!("blobs/sha256/{hex}")).ok_or_else(|| {
        OciRefusal::Unsound(format!(
            "the archive lacks the blob of {what} (sha256:{hex})"
        ))
    })?;
    if d.size.is_some_and(|s| s != member.size) {
        return Err(OciRefusal::Damaged(invalid(format!(
            "the blob of {what} (sha256:{hex}) is {} bytes, not the {} its descriptor states: the archive is damaged or was altered",
            member.size,
            d.size.unwrap_or_default()
        ))));
    }
    Ok((member, hex.to_string()))
}

/// A small blob (a manifest, a config), its digest checked.
fn read_blob(
    outer: &Outer,
    file: &mut File,
    d: &Descriptor,
    what: &str,
) -> Result<Vec<u8>, OciRefusal> {
    let (member, hex) = blob(outer, d, what)?;
    let bytes = read_member(file, member, MAX_JSON).map_err(OciRefusal::Damaged)?;
    check_sha256(&sha256_hex(&bytes), &hex, what).map_err(OciRefusal::Damaged)?;
    Ok(bytes)
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes).as_ref())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn check_sha256(got: &str, want: &str, what: &str) -> Result<(), ImageError> {
    if got == want {
        Ok(())
    } else {
        Err(invalid(format!(
            "{what} does not match its digest (sha256:{want}, but its bytes hash to sha256:{got}): the archive is damaged or was altered"
        )))
    }
}

fn zstd_refused(layer: usize) -> ImageError {
    invalid(format!(
        "layer {layer} is compressed with zstd, which is not read: save the image with gzip or uncompressed layers (`podman save` and `docker save` write those)"
    ))
}

fn not_a_tar(e: &io::Error) -> ImageError {
    invalid(format!(
        "the body is not a tar archive ({e}): send the archive `docker save IMAGE` or `podman save` writes"
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
        return Err(invalid(
            "a manifest, index or image config is too large (4 MiB at most)",
        ));
    }
    file.seek(SeekFrom::Start(m.offset))?;
    let mut out = Vec::with_capacity(m.size as usize);
    file.take(m.size).read_to_end(&mut out)?;
    Ok(out)
}

/// A layer blob as read from the archive: its bytes hashed on the way.
struct Hashing<R> {
    inner: R,
    digest: aws_lc_rs::digest::Context,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.digest.update(&buf[..n]);
        Ok(n)
    }
}

/// A layer's tar stream as decompressed: counted, and cut off past `limit` bytes (so a
/// gzip bomb ends at the cap, never fills the disk or memory); `over` says it was.
struct Capped<'a, R> {
    inner: R,
    read: &'a Cell<u64>,
    limit: u64,
    over: &'a Cell<bool>,
}

impl<R: Read> Read for Capped<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.limit.saturating_sub(self.read.get());
        if left == 0 {
            // One byte more tells a stream at the cap from one past it.
            let mut probe = [0u8; 1];
            if self.inner.read(&mut probe)? == 0 {
                return Ok(0);
            }
            self.over.set(true);
            return Err(io::Error::other("the image unpacks to more than its cap"));
        }
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        self.read.set(self.read.get() + n as u64);
        Ok(n)
    }
}

/// Applying layers into one root.
struct Unpack {
    root: PathBuf,
    /// Bytes of the files written.
    bytes: u64,
    /// Bytes of the (decompressed) layer tar streams read.
    stream_bytes: u64,
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
            c if c.len() > MAX_NAME => {
                return Err(invalid(format!(
                    "layer {layer} has the entry `{shown}`, a name of which is longer than {MAX_NAME} bytes"
                )))
            }
            c => out.push(c.to_string()),
        }
    }
    if text.len() > MAX_PATH {
        return Err(invalid(format!(
            "layer {layer} has the entry `{shown}…`, whose path is longer than {MAX_PATH} bytes"
        )));
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

    /// Applies layer `n` from its blob in the archive: a plain or a gzip tar (told by its first
    /// bytes, whatever a media type says), its sha256 checked when the archive states one.
    fn apply(&mut self, file: &mut File, n: usize, layer: &LayerRef) -> Result<(), ImageError> {
        file.seek(SeekFrom::Start(layer.member.offset))?;
        let hashing = Hashing {
            inner: (&mut *file).take(layer.member.size),
            digest: aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256),
        };
        let mut blob = io::BufReader::with_capacity(64 * 1024, hashing);
        let head = blob.fill_buf()?;
        if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            return Err(zstd_refused(n));
        }
        let gzip = head.starts_with(&[0x1f, 0x8b]);
        let (read, over) = (Cell::new(0), Cell::new(false));
        let limit = self.max_bytes.saturating_sub(self.stream_bytes);
        let applied = if gzip {
            let inner = flate2::read::MultiGzDecoder::new(&mut blob);
            self.layer(
                n,
                Capped {
                    inner,
                    read: &read,
                    limit,
                    over: &over,
                },
            )
        } else {
            self.layer(
                n,
                Capped {
                    inner: &mut blob,
                    read: &read,
                    limit,
                    over: &over,
                },
            )
        };
        self.stream_bytes = self.stream_bytes.saturating_add(read.get());
        if over.get() {
            return Err(self.too_big());
        }
        applied?;
        if let Some(want) = &layer.sha256 {
            // The tar reader stops at the end-of-archive blocks: hash what follows too.
            io::copy(&mut blob, &mut io::sink())?;
            let got = hex(blob.into_inner().digest.finish().as_ref());
            check_sha256(&got, want, &format!("layer {n}"))?;
        }
        Ok(())
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
            // A pax global header describes the archive, not a file of it.
            if entry.header().entry_type() == tar::EntryType::XGlobalHeader {
                continue;
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
                    if target.is_empty() || target.contains('\0') || target.len() > MAX_PATH {
                        return Err(invalid(format!(
                            "layer {layer} has the symbolic link `{}` whose target is empty, holds NUL or is longer than {MAX_PATH} bytes",
                            parts.join("/")
                        )));
                    }
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
                    // Onto itself, or onto a folder that holds its target: replacing what is
                    // there would remove the target first.
                    if target_parts.starts_with(&parts) {
                        return Err(invalid(format!(
                            "layer {layer} has a hard link `{}` to `{}`, which it would replace",
                            parts.join("/"),
                            target_parts.join("/")
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

    // ---- archives made here: tar entries written as raw headers, so that any name goes ----

    fn pad(out: &mut Vec<u8>) {
        out.resize(out.len().div_ceil(512) * 512, 0);
    }

    /// A GNU long name (`L`) or long link (`K`) entry for `bytes`.
    fn gnu_long(out: &mut Vec<u8>, kind: tar::EntryType, bytes: &[u8]) {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.as_old_mut().name[..13].copy_from_slice(b"././@LongLink");
        h.set_size(bytes.len() as u64 + 1);
        h.set_mode(0o644);
        h.set_cksum();
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(bytes);
        out.push(0);
        pad(out);
    }

    /// One entry, its name and link target as given (long ones through GNU entries).
    fn raw_entry(out: &mut Vec<u8>, kind: tar::EntryType, name: &[u8], link: &[u8], data: &[u8]) {
        if name.len() > 100 {
            gnu_long(out, tar::EntryType::GNULongName, name);
        }
        if link.len() > 100 {
            gnu_long(out, tar::EntryType::GNULongLink, link);
        }
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(if kind == tar::EntryType::Directory {
            0o755
        } else {
            0o644
        });
        h.set_size(data.len() as u64);
        h.set_uid(u64::from(nix::unistd::geteuid().as_raw()));
        h.set_gid(u64::from(nix::unistd::getegid().as_raw()));
        h.set_mtime(0);
        let n = name.len().min(100);
        h.as_old_mut().name[..n].copy_from_slice(&name[..n]);
        let l = link.len().min(100);
        h.as_old_mut().linkname[..l].copy_from_slice(&link[..l]);
        h.set_cksum();
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(data);
        pad(out);
    }

    fn end(mut out: Vec<u8>) -> Vec<u8> {
        out.extend_from_slice(&[0u8; 1024]);
        out
    }

    fn file_tar(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        for (name, data) in files {
            raw_entry(
                &mut out,
                tar::EntryType::Regular,
                name.as_bytes(),
                b"",
                data,
            );
        }
        end(out)
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        use std::io::Write;
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(bytes).unwrap();
        enc.finish().unwrap()
    }

    /// An outer archive of `(name, bytes)` members.
    fn outer_tar(members: &[(String, Vec<u8>)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (name, data) in members {
            raw_entry(
                &mut out,
                tar::EntryType::Regular,
                name.as_bytes(),
                b"",
                data,
            );
        }
        end(out)
    }

    fn docker_save(layers: &[Vec<u8>], config: serde_json::Value) -> Vec<u8> {
        let names: Vec<String> = (0..layers.len())
            .map(|i| format!("l{i}/layer.tar"))
            .collect();
        let manifest = serde_json::json!([{"Config": "c.json", "Layers": names}]);
        let mut members = vec![
            ("c.json".to_string(), config.to_string().into_bytes()),
            (
                "manifest.json".to_string(),
                manifest.to_string().into_bytes(),
            ),
        ];
        members.extend(names.into_iter().zip(layers.iter().cloned()));
        outer_tar(&members)
    }

    /// Blobs of an OCI layout, by digest.
    #[derive(Default)]
    struct Blobs(Vec<(String, Vec<u8>)>);

    impl Blobs {
        fn add(&mut self, media: &str, bytes: Vec<u8>) -> serde_json::Value {
            let hex = sha256_hex(&bytes);
            let d = serde_json::json!({"mediaType": media, "digest": format!("sha256:{hex}"),
                                       "size": bytes.len()});
            self.0.push((format!("blobs/sha256/{hex}"), bytes));
            d
        }

        fn manifest(
            &mut self,
            config: serde_json::Value,
            layers: &[(&str, Vec<u8>)],
        ) -> serde_json::Value {
            let config = self.add(
                "application/vnd.oci.image.config.v1+json",
                config.to_string().into_bytes(),
            );
            let layers: Vec<serde_json::Value> =
                layers.iter().map(|(m, b)| self.add(m, b.clone())).collect();
            let manifest = serde_json::json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                                              "config": config, "layers": layers});
            self.add(OCI_MANIFEST, manifest.to_string().into_bytes())
        }

        fn layout(mut self, index: serde_json::Value) -> Vec<u8> {
            self.0.push((
                "oci-layout".into(),
                br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
            ));
            self.0
                .push(("index.json".into(), index.to_string().into_bytes()));
            outer_tar(&self.0)
        }
    }

    fn index_of(manifests: &[serde_json::Value]) -> serde_json::Value {
        serde_json::json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests})
    }

    /// Unpacks `archive` into a fresh root: the result, and the root's folder (kept alive).
    fn unpack(archive: &[u8], max: u64) -> (Result<ImageMeta, ImageError>, tempfile::TempDir) {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("archive.tar");
        std::fs::write(&path, archive).unwrap();
        let root = tmp.path().join("root");
        std::fs::create_dir(&root).unwrap();
        (unpack_archive(&path, &root, max), tmp)
    }

    fn message(r: Result<ImageMeta, ImageError>) -> String {
        match r {
            Err(ImageError::Invalid(m)) => m,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    const GZ: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
    const TAR: &str = "application/vnd.oci.image.layer.v1.tar";

    #[test]
    fn an_oci_layout_with_gzip_and_plain_layers_unpacks_in_order() {
        let mut blobs = Blobs::default();
        let config = serde_json::json!({"architecture": "amd64", "os": "linux", "config": {
            "Env": ["A=1"], "Cmd": ["/bin/sh"], "Entrypoint": ["/init"], "WorkingDir": "/srv"}});
        let m = blobs.manifest(
            config,
            &[
                (
                    GZ,
                    gzip(&file_tar(&[("a.txt", b"one"), ("gone.txt", b"x")])),
                ),
                (TAR, file_tar(&[("b.txt", b"two"), (".wh.gone.txt", b"")])),
            ],
        );
        let (r, tmp) = unpack(&blobs.layout(index_of(&[m])), 1 << 20);
        let meta = r.unwrap();
        assert_eq!(meta.source, "oci");
        assert_eq!(meta.command(), vec!["/init", "/bin/sh"]);
        assert_eq!(meta.working_dir.as_deref(), Some("/srv"));
        assert_eq!(meta.env, vec!["A=1"]);
        let root = tmp.path().join("root");
        assert_eq!(std::fs::read(root.join("a.txt")).unwrap(), b"one");
        assert_eq!(std::fs::read(root.join("b.txt")).unwrap(), b"two");
        assert!(!root.join("gone.txt").exists());
    }

    #[test]
    fn an_index_of_platforms_picks_this_one_and_passes_over_attestations() {
        let mut blobs = Blobs::default();
        let mine = blobs.manifest(
            serde_json::json!({"config": {"Cmd": ["mine"]}}),
            &[(GZ, gzip(&file_tar(&[("m", b"m")])))],
        );
        let other_arch = if oci_arch() == "amd64" {
            "arm64"
        } else {
            "amd64"
        };
        let with = |d: serde_json::Value, platform: serde_json::Value| {
            let mut d = d;
            d["platform"] = platform;
            d
        };
        let mine = with(
            mine,
            serde_json::json!({"os": "linux", "architecture": oci_arch()}),
        );
        // Another platform's manifest, its blob absent (as a multi-platform save leaves it).
        let absent = serde_json::json!({"mediaType": OCI_MANIFEST, "size": 10,
            "digest": format!("sha256:{}", "0".repeat(64)),
            "platform": {"os": "linux", "architecture": other_arch}});
        let mut attestation = blobs.add(OCI_MANIFEST, b"{}".to_vec());
        attestation["platform"] = serde_json::json!({"os": "unknown", "architecture": "unknown"});
        attestation["annotations"] =
            serde_json::json!({"vnd.docker.reference.type": "attestation-manifest"});
        let nested = index_of(&[absent, mine, attestation]);
        let nested = blobs.add(OCI_INDEX, nested.to_string().into_bytes());
        let (r, _tmp) = unpack(&blobs.layout(index_of(&[nested])), 1 << 20);
        assert_eq!(r.unwrap().cmd, vec!["mine"]);
    }

    #[test]
    fn a_blob_that_does_not_match_its_digest_is_refused() {
        let mut blobs = Blobs::default();
        let m = blobs.manifest(serde_json::json!({}), &[(TAR, file_tar(&[("a", b"good")]))]);
        // Alter the layer's bytes, keeping its size.
        let layer = blobs.0.iter_mut().find(|(_, b)| b.len() > 1000).unwrap();
        let at = layer.1.windows(4).position(|w| w == b"good").unwrap();
        layer.1[at..at + 4].copy_from_slice(b"evil");
        let msg = message(unpack(&blobs.layout(index_of(std::slice::from_ref(&m))), 1 << 20).0);
        assert!(msg.contains("layer 1 does not match its digest"), "{msg}");

        // A manifest altered: refused before any layer.
        let mut blobs = Blobs::default();
        let m = blobs.manifest(serde_json::json!({}), &[(TAR, file_tar(&[("a", b"x")]))]);
        let manifest = blobs.0.last_mut().unwrap();
        manifest.1 = manifest
            .1
            .iter()
            .map(|b| if *b == b'2' { b'3' } else { *b })
            .collect();
        let msg = message(unpack(&blobs.layout(index_of(&[m])), 1 << 20).0);
        assert!(
            msg.contains("the image manifest does not match its digest"),
            "{msg}"
        );
    }

    #[test]
    fn docker_save_beside_an_unsound_layout_is_read_and_gzip_layers_there_too() {
        let mut members = vec![
            (
                "c.json".to_string(),
                br#"{"config":{"Cmd":["x"]}}"#.to_vec(),
            ),
            (
                "manifest.json".to_string(),
                br#"[{"Config":"c.json","Layers":["l.tar.gz"]}]"#.to_vec(),
            ),
            ("l.tar.gz".to_string(), gzip(&file_tar(&[("f", b"gz")]))),
            ("index.json".to_string(), b"{}".to_vec()),
        ];
        let (r, tmp) = unpack(&outer_tar(&members), 1 << 20);
        let meta = r.unwrap();
        assert_eq!(meta.source, "docker-save");
        assert_eq!(std::fs::read(tmp.path().join("root/f")).unwrap(), b"gz");
        // Without manifest.json, the layout's fault is the answer.
        members.retain(|(n, _)| n != "manifest.json");
        let msg = message(unpack(&outer_tar(&members), 1 << 20).0);
        assert!(msg.contains("index.json names no image manifest"), "{msg}");
    }

    #[test]
    fn gzip_bombs_stop_at_the_cap() {
        let max = 1 << 20;
        // A file far past the cap.
        let big = vec![0u8; 32 << 20];
        let bomb = gzip(&file_tar(&[("big", &big)]));
        assert!(bomb.len() < 200_000);
        let (r, tmp) = unpack(&docker_save(&[bomb], serde_json::json!({})), max);
        let msg = message(r);
        assert!(msg.contains("more than 1048576 bytes"), "{msg}");
        assert!(!tmp.path().join("root/big").exists());
        // A long name the tar reader would hold in memory: cut at the cap, not read whole.
        let mut layer = Vec::new();
        gnu_long(
            &mut layer,
            tar::EntryType::GNULongName,
            &vec![b'a'; 32 << 20],
        );
        raw_entry(&mut layer, tar::EntryType::Regular, b"x", b"", b"");
        let (r, _tmp) = unpack(
            &docker_save(&[gzip(&end(layer))], serde_json::json!({})),
            max,
        );
        let msg = message(r);
        assert!(msg.contains("more than 1048576 bytes"), "{msg}");
        // The cap counts every layer's stream together.
        let half = vec![1u8; 600 << 10];
        let layers = vec![
            gzip(&file_tar(&[("a", &half)])),
            gzip(&file_tar(&[("b", &half)])),
        ];
        let msg = message(unpack(&docker_save(&layers, serde_json::json!({})), max).0);
        assert!(msg.contains("more than"), "{msg}");
    }

    #[test]
    fn zstd_layers_are_refused_by_name() {
        let zstd = vec![0x28, 0xb5, 0x2f, 0xfd, 0, 0, 0, 0];
        let msg = message(
            unpack(
                &docker_save(std::slice::from_ref(&zstd), serde_json::json!({})),
                1 << 20,
            )
            .0,
        );
        assert!(msg.contains("zstd"), "{msg}");
        let mut blobs = Blobs::default();
        let m = blobs.manifest(
            serde_json::json!({}),
            &[("application/vnd.oci.image.layer.v1.tar+zstd", zstd)],
        );
        let msg = message(unpack(&blobs.layout(index_of(&[m])), 1 << 20).0);
        assert!(msg.contains("zstd"), "{msg}");
    }

    // ---- the property: whatever the entry names, nothing is made outside the root ----

    use proptest::prelude::*;

    /// Path components that are valid, from a small pool so that entries meet (a link, then
    /// a file under it), with odd but valid ones among them.
    fn component() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            12 => prop::sample::select(vec!["a", "b", "lnk", "dir"]).prop_map(|c| c.as_bytes().to_vec()),
            2 => Just(b".".to_vec()),
            2 => Just(Vec::new()),
            1 => Just(b".wh.a".to_vec()),
            1 => Just(b".wh.lnk".to_vec()),
            1 => Just(b".wh..wh..opq".to_vec()),
            1 => Just(b".wh.".to_vec()),
            1 => Just(b".wh...".to_vec()),
            1 => Just("\u{e9}t\u{e9}".as_bytes().to_vec()),
            1 => Just(vec![1, 0x7f, b' ', b'\\']),
            1 => Just(vec![b'n'; 200]),
            1 => proptest::collection::vec(0x20u8..0x7f, 1..8),
        ]
    }

    /// Components that must be refused: `..`, bytes that are not UTF-8, past NAME_MAX.
    fn bad_component() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            Just(b"..".to_vec()),
            Just(vec![0xff, 0xfe]),
            Just(vec![b'L'; 300]),
        ]
    }

    /// A path: components joined by `/` (so `//` too), sometimes ending in `/`; one in twenty
    /// absolute or holding a component that must be refused.
    fn path() -> impl Strategy<Value = Vec<u8>> {
        let join = |parts: Vec<Vec<u8>>, slash: bool| {
            let mut out = parts.join(&b'/');
            if slash {
                out.push(b'/');
            }
            out
        };
        let parts = || proptest::collection::vec(component(), 1..4);
        prop_oneof![
            38 => (parts(), any::<bool>()).prop_map(move |(p, s)| join(p, s)),
            1 => parts().prop_map(move |p| [b"/".to_vec(), join(p, false)].concat()),
            1 => (parts(), bad_component(), any::<prop::sample::Index>()).prop_map(move |(mut p, bad, at)| {
                p.insert(at.index(p.len() + 1), bad);
                join(p, false)
            }),
        ]
    }

    /// A link target: a path, or the folder beside the root (`@OUT`, made absolute at build).
    fn target() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            12 => path(),
            1 => Just(b"@OUT".to_vec()),
            1 => Just(b"@OUT/canary".to_vec()),
            1 => Just(b"../outside".to_vec()),
            1 => Just(b"../outside/canary".to_vec()),
        ]
    }

    #[derive(Debug, Clone)]
    enum Entry {
        File(Vec<u8>),
        Dir(Vec<u8>),
        Symlink(Vec<u8>, Vec<u8>),
        Hardlink(Vec<u8>, Vec<u8>),
    }

    fn entry() -> impl Strategy<Value = Entry> {
        prop_oneof![
            4 => path().prop_map(Entry::File),
            3 => path().prop_map(Entry::Dir),
            3 => (path(), target()).prop_map(|(p, t)| Entry::Symlink(p, t)),
            1 => (path(), target()).prop_map(|(p, t)| Entry::Hardlink(p, t)),
        ]
    }

    fn layer_of(entries: &[Entry], outside: &Path) -> Vec<u8> {
        let out_bytes = outside.as_os_str().as_encoded_bytes();
        let fix = |t: &[u8]| -> Vec<u8> {
            match t.strip_prefix(b"@OUT") {
                Some(rest) => [out_bytes, rest].concat(),
                None => t.to_vec(),
            }
        };
        let mut out = Vec::new();
        for e in entries {
            match e {
                Entry::File(p) => raw_entry(&mut out, tar::EntryType::Regular, p, b"", b"data"),
                Entry::Dir(p) => raw_entry(&mut out, tar::EntryType::Directory, p, b"", b""),
                Entry::Symlink(p, t) => {
                    raw_entry(&mut out, tar::EntryType::Symlink, p, &fix(t), b"")
                }
                Entry::Hardlink(p, t) => raw_entry(&mut out, tar::EntryType::Link, p, &fix(t), b""),
            }
        }
        end(out)
    }

    /// Every path under `dir`, links not followed, relative to it.
    fn tree(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let e = e.unwrap();
                out.push(e.path().strip_prefix(dir).unwrap().to_path_buf());
                if e.file_type().unwrap().is_dir() {
                    stack.push(e.path());
                }
            }
        }
        out.sort();
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

        #[test]
        fn odd_entry_names_never_lead_outside_the_root(
            layers in proptest::collection::vec(proptest::collection::vec(entry(), 1..10), 1..4),
            gzipped in any::<bool>(),
        ) {
            let tmp = tempfile::tempdir().unwrap();
            let outside = tmp.path().join("outside");
            std::fs::create_dir(&outside).unwrap();
            std::fs::write(outside.join("canary"), b"canary").unwrap();
            use std::os::unix::fs::MetadataExt;
            let before = std::fs::metadata(outside.join("canary")).unwrap();
            let dir_before = std::fs::metadata(&outside).unwrap().mode();
            let tars: Vec<Vec<u8>> = layers
                .iter()
                .map(|l| layer_of(l, &outside))
                .map(|t| if gzipped { gzip(&t) } else { t })
                .collect();
            let archive = tmp.path().join("archive.tar");
            std::fs::write(&archive, docker_save(&tars, serde_json::json!({}))).unwrap();
            let root = tmp.path().join("root");
            std::fs::create_dir(&root).unwrap();
            let result = unpack_archive(&archive, &root, 1 << 20);
            prop_assert!(
                matches!(result, Ok(_) | Err(ImageError::Invalid(_))),
                "neither done nor refused: {:?}", result
            );
            let mut top: Vec<String> = std::fs::read_dir(tmp.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            top.sort();
            prop_assert_eq!(top, vec!["archive.tar", "outside", "root"]);
            prop_assert_eq!(tree(&outside), vec![PathBuf::from("canary")]);
            prop_assert_eq!(std::fs::read(outside.join("canary")).unwrap(), b"canary");
            let canary = std::fs::metadata(outside.join("canary")).unwrap();
            prop_assert_eq!(canary.nlink(), 1, "a hard link to the canary was made");
            prop_assert_eq!(std::fs::metadata(&outside).unwrap().mode(), dir_before);
            prop_assert_eq!(
                (canary.mode(), canary.uid(), canary.gid()),
                (before.mode(), before.uid(), before.gid())
            );
        }
    }
}
