//! `/v1/sandboxes/{id}/files`: read, write and delete files of a running isolated sandbox, as
//! its own user sees them ([`crate::sandbox::files`] does the work inside the sandbox).
//!
//! Bodies stream both ways: an upload goes chunk by chunk into the helper's pipe (bounded by
//! `[gateway] max_body_bytes` and the body read timeout), a download is the helper's output.

use std::path::PathBuf;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};

use super::{driver_error, owned_sandbox, rfc3339, AppState, Caller};
use crate::credential::Scope;
use crate::error::HttpError;
use crate::gateway::Gateway;
use crate::sandbox::files::{self, ErrorKind, FilesError, ReadOutcome, UploadLimits};
use crate::sandbox::spec::FileOp;
use crate::store::SandboxRecord;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FilesQuery {
    path: Option<String>,
    mode: Option<String>,
    recursive: Option<String>,
}

type QueryResult = Result<Query<FilesQuery>, axum::extract::rejection::QueryRejection>;

fn query(q: QueryResult) -> Result<(FilesQuery, PathBuf), HttpError> {
    let Ok(Query(q)) = q else {
        return Err(HttpError::invalid_argument(
            "the query takes path, and mode (PUT) or recursive (DELETE)",
        ));
    };
    let Some(raw) = q.path.as_deref() else {
        return Err(HttpError::invalid_argument(
            "give ?path=/workspace/... (an absolute path as the sandbox sees it)",
        ));
    };
    let path = files::normalize(raw).map_err(HttpError::invalid_argument)?;
    Ok((q, path))
}

/// Writes and deletes stay inside the writable places.
fn check_writable(s: &SandboxRecord, path: &std::path::Path) -> Result<(), HttpError> {
    let roots: Vec<PathBuf> = crate::sandbox::process::Driver::writable_places(s);
    if files::inside(path, &roots) {
        Ok(())
    } else {
        Err(HttpError::invalid_argument(files::outside_message(&roots)))
    }
}

/// `0755`, `755` or `0o755`: permission bits only.
fn parse_mode(text: &str) -> Result<u32, HttpError> {
    let digits = text.strip_prefix("0o").unwrap_or(text);
    match u32::from_str_radix(digits, 8) {
        Ok(m) if !digits.is_empty() && digits.len() <= 4 && m <= 0o777 => Ok(m),
        _ => Err(HttpError::invalid_argument(
            "mode must be octal permission bits from 0000 to 0777, e.g. 0755",
        )),
    }
}

/// The caller's live `command` sandbox run by this node.
async fn live_sandbox(
    gw: &Gateway,
    caller: &Caller,
    id: &str,
) -> Result<
    (
        SandboxRecord,
        std::sync::Arc<crate::sandbox::process::Driver>,
    ),
    HttpError,
> {
    let s = owned_sandbox(gw, caller, id).await?;
    let Some(driver) = gw.driver.clone().filter(|_| s.command.is_some()) else {
        return Err(HttpError::invalid_argument(
            "files work on `command` sandboxes run by this node",
        ));
    };
    if !s.status.is_live() {
        return Err(HttpError::conflict("the sandbox has ended"));
    }
    Ok((s, driver))
}

fn files_error(e: FilesError) -> HttpError {
    match e {
        FilesError::Refused { kind, message } => match kind {
            ErrorKind::NotFound => HttpError::not_found(message),
            ErrorKind::IsDir | ErrorKind::ExistsNotEmpty => HttpError::conflict(message),
            ErrorKind::Permission => HttpError::forbidden(message),
            ErrorKind::Invalid => HttpError::invalid_argument(message),
            ErrorKind::NoSpace => HttpError::new(
                StatusCode::INSUFFICIENT_STORAGE,
                "insufficient_storage",
                message,
            ),
            ErrorKind::Io => {
                tracing::error!(error = %message, "a file operation failed inside a sandbox");
                HttpError::internal()
            }
        },
        FilesError::TooLarge => HttpError::body_too_large(),
        FilesError::Body(why) => HttpError::bad_request(format!("the upload broke off: {why}")),
        FilesError::Helper(why) => {
            tracing::error!(error = %why, "the file helper failed");
            HttpError::unavailable("the file operation could not be run inside the sandbox")
        }
    }
}

#[derive(Serialize)]
struct Written {
    path: String,
    size: u64,
}

pub(super) async fn put_file(
    State(gw): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    q: QueryResult,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, HttpError> {
    caller.require(Scope::SandboxesWrite)?;
    let (s, driver) = live_sandbox(&gw, &caller, &id).await?;
    let (q, path) = query(q)?;
    check_writable(&s, &path)?;
    if q.recursive.is_some() {
        return Err(HttpError::invalid_argument("recursive applies to DELETE"));
    }
    let mode = q.mode.as_deref().map(parse_mode).transpose()?;
    let max = gw.config.gateway.max_body_bytes;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > max) {
        return Err(HttpError::body_too_large());
    }
    let _busy = driver.file_op(&s.id);
    let (cmd, spec) = driver
        .files_command(
            &s,
            FileOp::Write {
                path: path.clone(),
                mode,
            },
        )
        .map_err(driver_error)?;
    let limits = UploadLimits {
        max_bytes: max,
        chunk_timeout: gw.config.gateway.body_read_timeout,
    };
    let (created, size) = files::write(cmd, &spec, body.into_data_stream(), limits)
        .await
        .map_err(files_error)?;
    // The path and the size, never the content.
    gw.metrics.storage("file_write", size);
    gw.audit(
        &caller.credential.id,
        "file.write",
        &format!("{id}:{} ({size} bytes)", path.display()),
        caller.client_addr.clone(),
    )
    .await;
    if created {
        let view = Written {
            path: path.display().to_string(),
            size,
        };
        Ok((StatusCode::CREATED, Json(view)).into_response())
    } else {
        Ok(StatusCode::NO_CONTENT.into_response())
    }
}

#[derive(Serialize)]
struct EntryView {
    name: String,
    #[serde(rename = "type")]
    kind: String,
    size: u64,
    /// Octal, as `ls` and chmod write it: `"0644"`.
    mode: String,
    modified_at: String,
}

#[derive(Serialize)]
struct Listing {
    items: Vec<EntryView>,
    /// True when the folder holds more entries than one listing shows.
    truncated: bool,
}

pub(super) async fn get_file(
    State(gw): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    q: QueryResult,
) -> Result<Response, HttpError> {
    caller.require(Scope::SandboxesRead)?;
    let (s, driver) = live_sandbox(&gw, &caller, &id).await?;
    let (q, path) = query(q)?;
    if q.mode.is_some() || q.recursive.is_some() {
        return Err(HttpError::invalid_argument("GET takes only path"));
    }
    let busy = driver.file_op(&s.id);
    let (cmd, spec) = driver
        .files_command(&s, FileOp::Read { path })
        .map_err(driver_error)?;
    match files::read(cmd, &spec).await.map_err(files_error)? {
        ReadOutcome::Dir { items, truncated } => {
            let items = items
                .into_iter()
                .map(|e| EntryView {
                    name: e.name,
                    kind: e.kind,
                    size: e.size,
                    mode: format!("{:04o}", e.mode),
                    modified_at: rfc3339(e.mtime),
                })
                .collect();
            Ok(Json(Listing { items, truncated }).into_response())
        }
        ReadOutcome::File { size, body } => Ok((
            [
                (header::CONTENT_TYPE, "application/octet-stream".to_string()),
                (header::CONTENT_LENGTH, size.to_string()),
                (header::CACHE_CONTROL, "no-store".to_string()),
            ],
            // Busy until the last byte is sent (or the client goes away).
            Body::from_stream(futures_util::StreamExt::map(body, move |chunk| {
                let _ = &busy;
                chunk
            })),
        )
            .into_response()),
    }
}

pub(super) async fn delete_file(
    State(gw): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    q: QueryResult,
) -> Result<StatusCode, HttpError> {
    caller.require(Scope::SandboxesWrite)?;
    let (s, driver) = live_sandbox(&gw, &caller, &id).await?;
    let (q, path) = query(q)?;
    check_writable(&s, &path)?;
    if q.mode.is_some() {
        return Err(HttpError::invalid_argument("mode applies to PUT"));
    }
    let recursive = match q.recursive.as_deref() {
        None | Some("false") => false,
        Some("true") => true,
        Some(_) => {
            return Err(HttpError::invalid_argument(
                "recursive must be true or false",
            ))
        }
    };
    let _busy = driver.file_op(&s.id);
    let (cmd, spec) = driver
        .files_command(
            &s,
            FileOp::Delete {
                path: path.clone(),
                recursive,
            },
        )
        .map_err(driver_error)?;
    let size = files::delete(cmd, &spec).await.map_err(files_error)?;
    let target = match size {
        Some(n) => format!("{id}:{} ({n} bytes)", path.display()),
        None => format!("{id}:{}", path.display()),
    };
    gw.metrics.storage("file_delete", 0);
    gw.audit(
        &caller.credential.id,
        "file.delete",
        &target,
        caller.client_addr.clone(),
    )
    .await;
    Ok(StatusCode::NO_CONTENT)
}
