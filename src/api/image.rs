//! `/v1/images`: root filesystems imported from `docker save` archives (see
//! [`crate::sandbox::image`]). Importing and deleting take scope `admin`; listing
//! `sandboxes:read`. The list always starts with the built-in `host` image.

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::Response;
use axum::Json;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;

use super::{created, rfc3339, AppState, Caller, Items};
use crate::credential::Scope;
use crate::error::HttpError;
use crate::gateway::Gateway;
use crate::sandbox::image::{self, ImageError, ImageMeta};
use crate::sandbox::process::Driver;
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
    /// `"host"` or `"docker-save"`.
    source: String,
}

impl ImageView {
    fn of(m: &ImageMeta) -> ImageView {
        ImageView {
            name: m.name.clone(),
            created_at: Some(rfc3339(m.created_at)),
            size_bytes: Some(m.size_bytes),
            source: m.source.clone(),
        }
    }
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
    let mut items = vec![ImageView {
        name: image::HOST.into(),
        created_at: None,
        size_bytes: None,
        source: "host".into(),
    }];
    items.extend(listed.iter().map(ImageView::of));
    Ok(Json(Items { items }))
}

pub(super) async fn delete_image(
    State(gw): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<StatusCode, HttpError> {
    caller.require(Scope::Admin)?;
    if name == image::HOST {
        return Err(HttpError::conflict(
            "`host` is the built-in image: it cannot be deleted",
        ));
    }
    let driver = driver(&gw)?;
    {
        let _held = driver.images().lock.write().await;
        if driver.images().get(&name).is_none() {
            return Err(HttpError::not_found("no such image"));
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
    }
    gw.audit(
        &caller.credential.id,
        "image.delete",
        &name,
        caller.client_addr,
    )
    .await;
    Ok(StatusCode::NO_CONTENT)
}
