//! `/v1/images`: root filesystems imported from `docker save`, `podman save` and OCI layout
//! archives (see [`crate::sandbox::image`]), and snapshots of sandboxes
//! ([`crate::sandbox::snapshot`]). Importing and deleting an imported image take scope
//! `admin`; a snapshot is taken with `sandboxes:write` and is its owner's (to see, use and
//! delete) and the admins'; listing takes `sandboxes:read`. The list always starts with the
//! built-in `host` image.

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::Response;
use axum::Json;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;

use super::{created, owned_sandbox, rfc3339, ApiJson, AppState, Caller, Items};
use crate::credential::Scope;
use crate::error::HttpError;
use crate::gateway::Gateway;
use crate::sandbox::image::{self, ImageError, ImageMeta};
use crate::sandbox::process::Driver;
use crate::sandbox::snapshot::{CopyError, SnapshotError};
use crate::unix_now;

#[derive(Deserialize)]
pub(super) struct ImportQuery {
    name: Option<String>,
}

#[derive(Serialize)]
pub(super) struct ImageView {
    name: String,
    /// `null` for `host`.
    created_at: Option<String>,
    /// `null` for `host`.
    size_bytes: Option<u64>,
    /// `"host"`, `"docker-save"`, `"oci"` or `"snapshot"`.
    source: String,
    /// A snapshot's: the image it is built on.
    #[serde(skip_serializing_if = "Option::is_none")]
    base: Option<String>,
    /// A snapshot's: the credential that took it.
    #[serde(skip_serializing_if = "Option::is_none")]
    owner: Option<String>,
}

impl ImageView {
    fn of(m: &ImageMeta) -> ImageView {
        ImageView {
            name: m.name.clone(),
            created_at: Some(rfc3339(m.created_at)),
            size_bytes: Some(m.size_bytes),
            source: m.source.clone(),
            base: m.base.clone(),
            owner: m.owner.clone(),
        }
    }

    fn host() -> ImageView {
        ImageView {
            name: image::HOST.into(),
            created_at: None,
            size_bytes: None,
            source: "host".into(),
            base: None,
            owner: None,
        }
    }
}

/// Image `name` as `caller` may see it: 404 for a snapshot of someone else's.
async fn visible(driver: &Driver, caller: &Caller, name: &str) -> Result<ImageMeta, HttpError> {
    let images = std::sync::Arc::clone(driver.images());
    let n = name.to_string();
    tokio::task::spawn_blocking(move || images.get(&n))
        .await
        .map_err(|_| HttpError::internal())?
        .filter(|m| m.visible_to(&caller.credential.id, caller.is_admin()))
        .ok_or_else(|| HttpError::not_found("no such image"))
}

fn driver(gw: &Gateway) -> Result<&std::sync::Arc<Driver>, HttpError> {
    gw.driver.as_ref().ok_or_else(|| {
        HttpError::invalid_argument(
            "this node runs no sandboxes ([orchestrator] enabled = false), so it keeps no images",
        )
    })
}

fn check_name(name: &str) -> Result<(), HttpError> {
    if name == image::HOST {
        return Err(HttpError::conflict("`host` is the built-in image"));
    }
    if image::valid_name(name) {
        Ok(())
    } else {
        Err(HttpError::invalid_argument(
            "an image name is 1 to 63 of a-z, 0-9 and -, such as python-3-12",
        ))
    }
}

/// Removes the upload file however the import ends.
struct Upload(std::path::PathBuf);

impl Drop for Upload {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

pub(super) async fn import_image(
    State(gw): State<AppState>,
    caller: Caller,
    Query(q): Query<ImportQuery>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, HttpError> {
    caller.require(Scope::Admin)?;
    let name = q.name.ok_or_else(|| {
        HttpError::invalid_argument("give the image a name: POST /v1/images?name=N")
    })?;
    check_name(&name)?;
    let driver = driver(&gw)?;
    let images = std::sync::Arc::clone(driver.images());
    if images.get(&name).is_some() {
        return Err(HttpError::conflict(format!(
            "an image named {name} exists: delete it first, or pick another name"
        )));
    }
    let max = gw.config.orchestrator.max_image_bytes;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > max) {
        return Err(too_large(max));
    }
    let (path, file) = {
        let images = std::sync::Arc::clone(&images);
        tokio::task::spawn_blocking(move || images.upload_file())
            .await
            .map_err(|_| HttpError::internal())?
            .map_err(|e| storage_error("cannot write under <data_dir>/images", &e))?
    };
    let upload = Upload(path);
    let mut file = tokio::fs::File::from_std(file);
    let mut stream = body.into_data_stream();
    let mut total: u64 = 0;
    let timeout = gw.config.gateway.body_read_timeout;
    loop {
        let chunk = match tokio::time::timeout(timeout, stream.next()).await {
            Err(_) => {
                return Err(HttpError::bad_request(
                    "the upload stalled: no data within [gateway] body_read_timeout_secs",
                ))
            }
            Ok(None) => break,
            Ok(Some(Err(_))) => {
                return Err(HttpError::bad_request("the upload ended before its end"))
            }
            Ok(Some(Ok(chunk))) => chunk,
        };
        total = total.saturating_add(chunk.len() as u64);
        if total > max {
            return Err(too_large(max));
        }
        file.write_all(&chunk)
            .await
            .map_err(|e| storage_error("cannot store the upload", &e))?;
    }
    file.flush()
        .await
        .map_err(|e| storage_error("cannot store the upload", &e))?;
    drop(file);
    let meta = {
        let _held = driver.images().lock.write().await;
        let (images, name, path) = (images, name.clone(), upload.0.clone());
        let limit = max.saturating_mul(4);
        tokio::task::spawn_blocking(move || images.import(&name, &path, limit, unix_now()))
            .await
            .map_err(|_| HttpError::internal())?
    };
    drop(upload);
    let meta = match meta {
        Ok(m) => m,
        Err(ImageError::Invalid(why)) => return Err(HttpError::invalid_argument(why)),
        Err(e @ ImageError::Exists(_)) => return Err(HttpError::conflict(e.to_string())),
        Err(ImageError::Io(e)) => {
            tracing::error!(image = %name, error = %e, "cannot unpack an image");
            return Err(storage_error("cannot unpack the image", &e));
        }
    };
    if meta.skipped_devices > 0 {
        tracing::info!(image = %name, skipped = meta.skipped_devices, "device nodes and FIFOs of an image were skipped");
    }
    gw.metrics.storage("image_import", meta.size_bytes);
    gw.audit(
        &caller.credential.id,
        "image.import",
        &name,
        caller.client_addr.clone(),
    )
    .await;
    Ok(created(ImageView::of(&meta)))
}

/// A failed write under `images/`: 507 when the disk is full (the upload file and the staged
/// folder are removed on the way out, so nothing is listed and `.incoming` is left empty),
/// 503 otherwise.
fn storage_error(what: &str, e: &std::io::Error) -> HttpError {
    if crate::error::is_storage_full(e) {
        HttpError::insufficient_storage(format!(
            "{what}: the disk that holds <data_dir>/images is full ({e}); nothing was kept"
        ))
    } else {
        HttpError::unavailable(format!("{what}: {e}"))
    }
}

fn too_large(max: u64) -> HttpError {
    HttpError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "body_too_large",
        format!("an image archive may be at most {max} bytes ([orchestrator] max_image_bytes)"),
    )
}

pub(super) async fn list_images(
    State(gw): State<AppState>,
    caller: Caller,
) -> Result<Json<Items<ImageView>>, HttpError> {
    caller.require(Scope::SandboxesRead)?;
    let driver = driver(&gw)?;
    let images = std::sync::Arc::clone(driver.images());
    let listed = tokio::task::spawn_blocking(move || images.list())
        .await
        .map_err(|_| HttpError::internal())?;
    let mut items = vec![ImageView::host()];
    items.extend(
        listed
            .iter()
            .filter(|m| m.visible_to(&caller.credential.id, caller.is_admin()))
            .map(ImageView::of),
    );
    Ok(Json(Items { items }))
}

/// `GET /v1/images/{name}`.
pub(super) async fn get_image(
    State(gw): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<ImageView>, HttpError> {
    caller.require(Scope::SandboxesRead)?;
    if name == image::HOST {
        return Ok(Json(ImageView::host()));
    }
    let driver = driver(&gw)?;
    Ok(Json(ImageView::of(&visible(driver, &caller, &name).await?)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SnapshotBody {
    name: String,
}

/// `POST /v1/sandboxes/{id}/snapshots {"name": N}`: a new image N made of the sandbox's
/// changes over its image (see [`crate::sandbox::snapshot`]). The sandbox runs on.
pub(super) async fn create_snapshot(
    State(gw): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<SnapshotBody>,
) -> Result<Response, HttpError> {
    caller.require(Scope::SandboxesWrite)?;
    if body.name == image::HOST || !image::valid_name(&body.name) {
        return Err(HttpError::invalid_argument(
            "name: a snapshot's name is an image name, 1 to 63 of a-z, 0-9 and - (not `host`)",
        ));
    }
    let s = owned_sandbox(&gw, &caller, &id).await?;
    let Some(driver) = gw.driver.clone().filter(|_| s.command.is_some()) else {
        return Err(HttpError::invalid_argument(
            "snapshots are of `command` sandboxes run by this gateway",
        ));
    };
    if !s.status.is_live() {
        return Err(HttpError::conflict(
            "the sandbox has ended: snapshot a running one",
        ));
    }
    if let Some(node) = s.node.as_deref().filter(|n| *n != driver.node()) {
        return Err(HttpError::conflict(format!(
            "the sandbox runs on node {node}, and a snapshot is an image of the node that runs it: send this request to that node"
        )));
    }
    if driver.images().get(&body.name).is_some() {
        return Err(HttpError::conflict(format!(
            "an image named {} exists: delete it first, or pick another name",
            body.name
        )));
    }
    let max = gw.config.orchestrator.max_image_bytes.saturating_mul(4);
    let meta = match driver
        .snapshot(&s, &body.name, &caller.credential.id, max)
        .await
    {
        Ok(meta) => meta,
        Err(e) => return Err(snapshot_error(e)),
    };
    gw.metrics.storage("snapshot_create", meta.size_bytes);
    gw.audit(
        &caller.credential.id,
        "snapshot.create",
        &format!("{id} -> {} ({} bytes)", meta.name, meta.size_bytes),
        caller.client_addr.clone(),
    )
    .await;
    Ok(created(ImageView::of(&meta)))
}

fn snapshot_error(e: SnapshotError) -> HttpError {
    match e {
        SnapshotError::NotRunning => HttpError::conflict("the sandbox is not running"),
        SnapshotError::NotIsolated => HttpError::conflict(e.to_string()),
        SnapshotError::Copy(c) if c.is_no_space() => HttpError::insufficient_storage(c.to_string()),
        SnapshotError::Copy(
            c @ (CopyError::TooLarge(_) | CopyError::TooMany(_) | CopyError::TooDeep),
        ) => HttpError::invalid_argument(c.to_string()),
        SnapshotError::Copy(c) => {
            tracing::error!(error = %c, "cannot take a snapshot");
            HttpError::unavailable(format!("cannot take the snapshot: {c}"))
        }
        SnapshotError::Image(ImageError::Exists(name)) => HttpError::conflict(format!(
            "an image named {name} exists: delete it first, or pick another name"
        )),
        SnapshotError::Image(ImageError::Invalid(why)) => HttpError::conflict(why),
        SnapshotError::Image(ImageError::Io(e)) if crate::error::is_storage_full(&e) => {
            HttpError::insufficient_storage(format!("cannot store the snapshot: {e}"))
        }
        SnapshotError::Image(ImageError::Io(e)) => {
            tracing::error!(error = %e, "cannot store a snapshot");
            HttpError::unavailable(format!("cannot store the snapshot: {e}"))
        }
    }
}

pub(super) async fn delete_image(
    State(gw): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<StatusCode, HttpError> {
    caller.require(Scope::SandboxesWrite)?;
    if name == image::HOST {
        caller.require(Scope::Admin)?;
        return Err(HttpError::conflict(
            "`host` is the built-in image: it cannot be deleted",
        ));
    }
    let driver = driver(&gw)?;
    let meta_is_snapshot = {
        let _held = driver.images().lock.write().await;
        let meta = visible(driver, &caller, &name).await?;
        // An imported image is the admins'; a snapshot also its owner's.
        if !meta.is_snapshot() {
            caller.require(Scope::Admin)?;
        }
        let dependents = driver.images().dependents(&name);
        if !dependents.is_empty() {
            return Err(HttpError::conflict(format!(
                "snapshot {} is built on image {name}: delete the snapshot first",
                dependents.join(", ")
            )));
        }
        let users: Vec<String> = gw
            .store
            .sandboxes()
            .await?
            .into_iter()
            .filter(|s| s.status.is_live() && s.process.image.as_deref() == Some(name.as_str()))
            .map(|s| s.id)
            .collect();
        if !users.is_empty() {
            return Err(HttpError::conflict(format!(
                "image {name} is used by live sandbox {}: delete the sandbox first",
                users.join(", ")
            )));
        }
        let images = std::sync::Arc::clone(driver.images());
        let n = name.clone();
        tokio::task::spawn_blocking(move || images.remove(&n))
            .await
            .map_err(|_| HttpError::internal())?
            .map_err(|e| HttpError::unavailable(format!("cannot delete the image: {e}")))?;
        meta.is_snapshot()
    };
    gw.metrics.storage(
        if meta_is_snapshot {
            "snapshot_delete"
        } else {
            "image_delete"
        },
        0,
    );
    gw.audit(
        &caller.credential.id,
        if meta_is_snapshot {
            "snapshot.delete"
        } else {
            "image.delete"
        },
        &name,
        caller.client_addr,
    )
    .await;
    Ok(StatusCode::NO_CONTENT)
}
