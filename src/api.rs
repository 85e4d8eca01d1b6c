//! The control plane: the JSON API on the base domain, the JWKS, and the telemetry listener.
//!
//! Every `/v1` call authenticates with `Authorization: Bearer <api key>`: the key is hashed and
//! looked up in the store on every call, so a revoked or expired credential fails on its very
//! next request. A non-admin credential sees only the sandboxes it created; others are 404.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::credential::{self, Scope, Secret};
use crate::error::HttpError;
use crate::gateway::Gateway;
use crate::proxy::ClientAddr;
use crate::sandbox;
use crate::store::{
    CredentialRecord, IssuedToken, SandboxFilter, SandboxRecord, SandboxStatus, StoreError,
};
use crate::token::IssueRequest;
use crate::unix_now;

mod exec_ws;
mod files;
mod image;
mod volume;

type AppState = Arc<Gateway>;

/// Largest JSON body the API reads.
const MAX_JSON_BYTES: usize = 256 * 1024;

/// The control API router (served on the base-domain host by the proxy).
pub fn router(gw: Arc<Gateway>) -> Router {
    Router::new()
        .route("/.well-known/jwks.json", get(jwks))
        .route(
            "/v1/credentials",
            post(create_credential).get(list_credentials),
        )
        .route("/v1/credentials/{id}", delete(revoke_credential))
        .route("/v1/sandboxes", post(create_sandbox).get(list_sandboxes))
        .route(
            "/v1/sandboxes/{id}",
            get(get_sandbox).delete(delete_sandbox).patch(patch_sandbox),
        )
        .route("/v1/sandboxes/{id}/connect-tokens", post(create_token))
        .route(
            "/v1/sandboxes/{id}/exec",
            post(exec).get(exec_ws::exec_stream),
        )
        .route(
            "/v1/sandboxes/{id}/files",
            get(files::get_file)
                .put(files::put_file)
                .delete(files::delete_file),
        )
        .route("/v1/sandboxes/{id}/logs", get(logs))
        .route("/v1/sandboxes/{id}/stats", get(stats))
        .route("/v1/connect-tokens", get(list_tokens))
        .route("/v1/connect-tokens/{jti}", delete(revoke_token))
        .route(
            "/v1/volumes",
            post(volume::create_volume).get(volume::list_volumes),
        )
        .route(
            "/v1/volumes/{name}",
            get(volume::get_volume).delete(volume::delete_volume),
        )
        .route(
            "/v1/images",
            post(image::import_image).get(image::list_images),
        )
        .route(
            "/v1/images/{name}",
            get(image::get_image).delete(image::delete_image),
        )
        .route("/v1/sandboxes/{id}/snapshots", post(image::create_snapshot))
        .route("/v1/audit", get(audit))
        .route("/v1/nodes", get(list_nodes))
        .fallback(|| async { HttpError::not_found("no such endpoint") })
        .method_not_allowed_fallback(|| async {
            HttpError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this endpoint does not accept that method",
            )
        })
        .with_state(gw)
}

// ---------------------------------------------------------------------------------------------
// Authentication and extractors

type KeyedLimiter<K> = governor::DefaultKeyedRateLimiter<K>;

/// Rate limits on the control API: per credential, and per client address.
pub struct RateLimits {
    credential: KeyedLimiter<String>,
    address: KeyedLimiter<std::net::IpAddr>,
}

impl std::fmt::Debug for RateLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimits").finish_non_exhaustive()
    }
}

impl RateLimits {
    pub fn new(cfg: &crate::config::ApiConfig) -> RateLimits {
        use governor::Quota;
        RateLimits {
            credential: governor::RateLimiter::keyed(
                Quota::per_second(cfg.requests_per_second).allow_burst(cfg.burst),
            ),
            address: governor::RateLimiter::keyed(
                Quota::per_second(cfg.address_requests_per_second).allow_burst(cfg.address_burst),
            ),
        }
    }

    /// Forgets idle keys (called periodically so the maps stay bounded).
    pub fn shrink(&self) {
        self.credential.retain_recent();
        self.address.retain_recent();
    }

    fn check<K: std::hash::Hash + Eq + Clone>(
        limiter: &KeyedLimiter<K>,
        key: &K,
    ) -> Result<(), HttpError> {
        use governor::clock::{Clock, DefaultClock};
        limiter.check_key(key).map_err(|not_until| {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            let mut e = HttpError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "too many API requests; retry after the time in Retry-After",
            );
            e.retry_after = Some(wait.as_secs().max(1));
            e
        })
    }
}

/// The authenticated caller of a `/v1` endpoint.
pub struct Caller {
    pub credential: CredentialRecord,
    pub client_addr: Option<String>,
}

impl Caller {
    fn require(&self, scope: Scope) -> Result<(), HttpError> {
        if credential::allows(&self.credential.scopes, scope) {
            Ok(())
        } else {
            Err(HttpError::forbidden(format!(
                "this credential lacks the `{}` scope",
                scope.as_str()
            )))
        }
    }

    /// Like [`Caller::require`], for endpoints that either of two scopes opens.
    fn require_either(&self, a: Scope, b: Scope) -> Result<(), HttpError> {
        if credential::allows(&self.credential.scopes, a)
            || credential::allows(&self.credential.scopes, b)
        {
            Ok(())
        } else {
            Err(HttpError::forbidden(format!(
                "this credential lacks the `{}` or `{}` scope",
                a.as_str(),
                b.as_str()
            )))
        }
    }

    fn is_admin(&self) -> bool {
        self.credential.scopes.contains(&Scope::Admin)
    }

    /// Whether the caller may see a sandbox (its own, or any for an admin).
    fn owns(&self, record: &SandboxRecord) -> bool {
        self.is_admin() || record.owner == self.credential.id
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = HttpError;

    async fn from_request_parts(parts: &mut Parts, gw: &AppState) -> Result<Self, HttpError> {
        let ip = parts.extensions.get::<ClientAddr>().map(|a| a.0.ip());
        if let Some(ip) = &ip {
            RateLimits::check(&gw.api_limits.address, ip)?;
        }
        let client_addr = ip.map(|ip| ip.to_string());
        let presented = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, key)| key.trim())
            .filter(|key| !key.is_empty())
            .ok_or_else(|| HttpError::unauthenticated("send `Authorization: Bearer <api key>`"))?;
        let hash = credential::hash_secret(presented);
        let record = gw.store.credential_by_hash(&hash).await?;
        match record {
            Some(c) if c.secret_hash.matches(&hash) && c.is_active(unix_now()) => {
                RateLimits::check(&gw.api_limits.credential, &c.id)?;
                Ok(Caller {
                    credential: c,
                    client_addr,
                })
            }
            _ => Err(HttpError::unauthenticated(
                "the API key is unknown, revoked or expired",
            )),
        }
    }
}

/// A JSON body whose errors never echo values back (a misplaced secret stays out of the
/// answer).
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = HttpError;

    async fn from_request(req: Request, state: &S) -> Result<Self, HttpError> {
        let is_json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| {
                ct.trim_start()
                    .to_ascii_lowercase()
                    .starts_with("application/json")
            });
        if !is_json {
            return Err(HttpError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "bad_request",
                "send a JSON body with `Content-Type: application/json`",
            ));
        }
        let req = req.map(|b| Body::new(http_body_util::Limited::new(b, MAX_JSON_BYTES)));
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(|_| HttpError::body_too_large())?;
        serde_json::from_slice(&bytes)
            .map(ApiJson)
            .map_err(|e| HttpError::invalid_argument(redact_json_error(&e)))
    }
}

/// serde_json's message without any input the caller sent: string values (quoted `"..."` in
/// Debug form, so a value may hold an escaped `\"`) and unknown field or variant names (quoted
/// in backticks, and free to hold backticks themselves).
fn redact_json_error(e: &serde_json::Error) -> String {
    let text = e.to_string();
    let text = redact_unknown_name(&text);
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '"' {
            out.push(c);
            continue;
        }
        // Skip to the closing quote, stepping over escapes.
        while let Some(c) = chars.next() {
            match c {
                '\\' => {
                    chars.next();
                }
                '"' => break,
                _ => {}
            }
        }
        out.push_str("\"…\"");
    }
    format!("invalid request body: {out}")
}

/// `unknown field `<name>`, expected one of `a`, `b`` without `<name>`: the expected names
/// are our own and stay, as they tell the caller what to send.
fn redact_unknown_name(text: &str) -> std::borrow::Cow<'_, str> {
    for prefix in ["unknown field `", "unknown variant `"] {
        let Some(at) = text.find(prefix) else {
            continue;
        };
        let from = at + prefix.len();
        let rest = &text[from..];
        // The name ends at the last of serde's follow-ups (a name may itself hold a backtick).
        let end = ["`, expected", "`, there are no"]
            .iter()
            .filter_map(|m| rest.rfind(m))
            .max()
            .unwrap_or(rest.len());
        return format!("{}…{}", &text[..from], &rest[end..]).into();
    }
    text.into()
}

fn created<T: Serialize>(value: T) -> Response {
    (StatusCode::CREATED, Json(value)).into_response()
}

#[derive(Serialize)]
struct Items<T> {
    items: Vec<T>,
}

fn rfc3339(t: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(t)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// JWKS

async fn jwks(State(gw): State<AppState>) -> Response {
    let mut response = Json(gw.tokens.jwks()).into_response();
    response.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("public, max-age=60"),
    );
    response
}

// ---------------------------------------------------------------------------------------------
// Credentials

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateCredential {
    name: String,
    scopes: Vec<String>,
    ttl_secs: Option<i64>,
    max_token_ttl_secs: Option<i64>,
}

#[derive(Serialize)]
struct CredentialView {
    id: String,
    name: String,
    scopes: Vec<Scope>,
    created_at: String,
    expires_at: Option<String>,
    max_token_ttl_secs: Option<i64>,
    revoked_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    secret: Option<String>,
}

impl CredentialView {
    fn of(c: &CredentialRecord) -> Self {
        CredentialView {
            id: c.id.clone(),
            name: c.name.clone(),
            scopes: c.scopes.clone(),
            created_at: rfc3339(c.created_at),
            expires_at: c.expires_at.map(rfc3339),
            max_token_ttl_secs: c.max_token_ttl_secs,
            revoked_at: c.revoked_at.map(rfc3339),
            secret: None,
        }
    }
}

async fn create_credential(
    State(gw): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<CreateCredential>,
) -> Result<Response, HttpError> {
    caller.require(Scope::Admin)?;
    let name = body.name.trim();
    if name.is_empty() || name.len() > 128 || name.chars().any(char::is_control) {
        return Err(HttpError::invalid_argument(
            "name must be 1-128 printable characters",
        ));
    }
    let mut scopes = Vec::new();
    for s in &body.scopes {
        let scope = Scope::parse(s).ok_or_else(|| {
            HttpError::invalid_argument(
                "unknown scope; use admin, sandboxes:read, sandboxes:write, upstreams:write, tokens:issue, tokens:revoke",
            )
        })?;
        if !scopes.contains(&scope) {
            scopes.push(scope);
        }
    }
    if scopes.is_empty() {
        return Err(HttpError::invalid_argument(
            "scopes must name at least one scope",
        ));
    }
    let now = unix_now();
    if body.ttl_secs.is_some_and(|t| t <= 0) {
        return Err(HttpError::invalid_argument("ttl_secs must be positive"));
    }
    if body.max_token_ttl_secs.is_some_and(|t| t <= 0) {
        return Err(HttpError::invalid_argument(
            "max_token_ttl_secs must be positive",
        ));
    }
    let secret = Secret::generate();
    let record = CredentialRecord {
        id: credential::new_credential_id(),
        name: name.to_string(),
        scopes,
        secret_hash: secret.hash(),
        created_at: now,
        expires_at: body.ttl_secs.map(|t| now.saturating_add(t)),
        max_token_ttl_secs: body.max_token_ttl_secs,
        revoked_at: None,
    };
    gw.store.insert_credential(&record).await?;
    gw.audit(
        &caller.credential.id,
        "credential.create",
        &record.id,
        caller.client_addr,
    )
    .await;
    let mut view = CredentialView::of(&record);
    view.secret = Some(secret.expose().to_string());
    Ok(created(view))
}

async fn list_credentials(
    State(gw): State<AppState>,
    caller: Caller,
) -> Result<Json<Items<CredentialView>>, HttpError> {
    caller.require(Scope::Admin)?;
    let items = gw
        .store
        .credentials()
        .await?
        .iter()
        .map(CredentialView::of)
        .collect();
    Ok(Json(Items { items }))
}

async fn revoke_credential(
    State(gw): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, HttpError> {
    caller.require(Scope::Admin)?;
    if gw.store.credential(&id).await?.is_none() {
        return Err(HttpError::not_found("no such credential"));
    }
    gw.store.revoke_credential(&id, unix_now()).await?;
    gw.audit(
        &caller.credential.id,
        "credential.revoke",
        &id,
        caller.client_addr,
    )
    .await;
    Ok(StatusCode::NO_CONTENT)
}

// ---------------------------------------------------------------------------------------------
// Sandboxes

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateSandbox {
    command: Option<Vec<String>>,
    upstream: Option<String>,
    ports: Vec<u16>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    /// Like `env`, but never shown (only its keys), logged or audited; see
    /// [`SandboxRecord::secret_env`].
    #[serde(default, deserialize_with = "secret_env_field")]
    secret_env: BTreeMap<String, String>,
    timeout_secs: Option<i64>,
    #[serde(default)]
    cors_origins: Vec<String>,
    #[serde(default)]
    rewrite_host: bool,
    metadata: Option<serde_json::Value>,
    memory_mb: Option<u64>,
    cpu_secs: Option<u64>,
    max_processes: Option<u64>,
    max_open_files: Option<u64>,
    /// A CPU limit such as 0.5 or 2 (isolated sandboxes).
    cpus: Option<f64>,
    egress: Option<EgressBody>,
    /// Taken as any JSON value so that a string, a fraction or a negative number is refused
    /// with a message naming the field (serde's own would not).
    idle_timeout_secs: Option<serde_json::Value>,
    /// Unique among the caller's live sandboxes (see [`check_name`]).
    #[serde(default, deserialize_with = "name_field")]
    name: Option<String>,
    /// With `name`: answer a live sandbox of that name with 200 and that sandbox, not 409.
    #[serde(default)]
    reuse: bool,
    #[serde(default, deserialize_with = "tags_field")]
    tags: BTreeMap<String, String>,
    /// Volumes to mount (isolated `command` sandboxes).
    volumes: Option<Vec<VolumeBody>>,
    /// The root filesystem (isolated `command` sandboxes): `host` (the default) or an
    /// imported image, whose `Cmd` is the command when `command` is left out.
    image: Option<String>,
}

/// One entry of `volumes` on creation.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VolumeBody {
    volume: String,
    path: String,
    sub_path: Option<String>,
    #[serde(default)]
    read_only: bool,
}

/// `PATCH /v1/sandboxes/{id}`: what may change after creation.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PatchSandbox {
    /// Replaces every tag.
    #[serde(default, deserialize_with = "some_tags_field")]
    tags: Option<BTreeMap<String, String>>,
}

/// `name` of the wrong JSON type: a message naming the field (serde's alone names only types).
/// Examples are in backticks: [`redact_json_error`] hides whatever is in double quotes.
fn name_field<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Option::<String>::deserialize(d)
        .map_err(|_| serde::de::Error::custom("name must be a string such as `job-42`"))
}

/// `tags` of the wrong JSON shape: a message naming the field.
fn tags_field<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<BTreeMap<String, String>, D::Error> {
    BTreeMap::<String, String>::deserialize(d).map_err(|_| {
        serde::de::Error::custom(
            "tags must be an object whose values are strings (such as `env`: `prod`)",
        )
    })
}

/// `secret_env` of the wrong JSON shape: a message naming the field and nothing it held.
fn secret_env_field<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<BTreeMap<String, String>, D::Error> {
    BTreeMap::<String, String>::deserialize(d).map_err(|_| {
        serde::de::Error::custom(
            "secret_env must be an object whose values are strings (such as `API_KEY`: `...`)",
        )
    })
}

fn some_tags_field<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<BTreeMap<String, String>>, D::Error> {
    tags_field(d).map(Some)
}

/// The longest `idle_timeout_secs`: a week.
const MAX_IDLE_TIMEOUT_SECS: u64 = 604_800;

/// `egress` on creation: the host names an isolated sandbox may reach through its proxy.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EgressBody {
    #[serde(default)]
    allow: Vec<String>,
}

#[derive(Serialize)]
struct SandboxView {
    id: String,
    status: SandboxStatus,
    ports: Vec<u16>,
    created_at: String,
    expires_at: Option<String>,
    ended_at: Option<String>,
    owner: String,
    metadata: serde_json::Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    upstream: Option<String>,
    cors_origins: Vec<String>,
    rewrite_host: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<String>,
    /// `command` sandboxes: `"namespaces"` or `"none"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    isolation: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    idle_timeout_secs: Option<u64>,
    name: Option<String>,
    tags: BTreeMap<String, String>,
    /// The imported image it started from; left out for `host`.
    #[serde(skip_serializing_if = "Option::is_none")]
    image: Option<String>,
    /// The names in `secret_env`, sorted; its values are never shown.
    secret_env_keys: Vec<String>,
}

impl SandboxView {
    fn of(s: &SandboxRecord) -> Self {
        SandboxView {
            id: s.id.clone(),
            status: s.status,
            ports: s.ports.clone(),
            created_at: rfc3339(s.created_at),
            expires_at: s.expires_at.map(rfc3339),
            ended_at: s.ended_at.map(rfc3339),
            owner: s.owner.clone(),
            metadata: s.metadata.clone(),
            upstream: s.upstream.clone(),
            cors_origins: s.cors_origins.clone(),
            rewrite_host: s.rewrite_host,
            detail: s.detail.clone(),
            isolation: s.process.isolation.clone(),
            idle_timeout_secs: s.process.idle_timeout_secs,
            name: s.name.clone(),
            tags: s.tags.clone(),
            image: s.process.image.clone(),
            secret_env_keys: s.secret_env.keys().cloned().collect(),
        }
    }
}

/// Longest sandbox name and tag key: a DNS label's length.
const MAX_NAME_LEN: usize = 63;
/// Most tags on one sandbox (and tag filters in one list request).
const MAX_TAGS: usize = 32;
/// Longest tag value, in characters.
const MAX_TAG_VALUE_CHARS: usize = 256;

/// A sandbox name: 1–63 of `[a-z0-9-]`, in a creation body or a `?name=` filter alike.
fn check_name(name: &str) -> Result<(), HttpError> {
    let ok = (1..=MAX_NAME_LEN).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(HttpError::invalid_argument(
            "name must be 1-63 characters of a-z, 0-9 and - (such as \"job-42\")",
        ))
    }
}

/// One tag. `field` is what the message names: `tags` in a body, `tag` in a list filter. An
/// invalid key is not echoed (errors never repeat what was sent); a valid one is, to say which
/// value is wrong.
fn check_tag(field: &str, key: &str, value: &str) -> Result<(), HttpError> {
    let key_ok = (1..=MAX_NAME_LEN).contains(&key.len())
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'/' | b'-'));
    if !key_ok {
        return Err(HttpError::invalid_argument(format!(
            "{field} keys must be 1-63 characters of A-Z, a-z, 0-9 and . _ / - (such as \"team\" or \"app.example/env\")"
        )));
    }
    if value.chars().count() > MAX_TAG_VALUE_CHARS || value.contains('\0') {
        return Err(HttpError::invalid_argument(format!(
            "{field}.{key} must be at most {MAX_TAG_VALUE_CHARS} characters, without NUL"
        )));
    }
    Ok(())
}

/// A sandbox's `tags`: at most 32, each as [`check_tag`] says.
fn check_tags(tags: &BTreeMap<String, String>) -> Result<(), HttpError> {
    if tags.len() > MAX_TAGS {
        return Err(HttpError::invalid_argument(format!(
            "tags may hold at most {MAX_TAGS} entries"
        )));
    }
    tags.iter().try_for_each(|(k, v)| check_tag("tags", k, v))
}

/// The answer to a create whose `name` a live sandbox of the caller already has.
fn name_taken(existing: &SandboxRecord, reuse: bool) -> Result<Response, HttpError> {
    if reuse {
        return Ok((StatusCode::OK, Json(SandboxView::of(existing))).into_response());
    }
    Err(HttpError::conflict(format!(
        "the live sandbox {} is already named `{}`; send \"reuse\": true to get it, or delete it first",
        existing.id,
        existing.name.as_deref().unwrap_or_default()
    )))
}

async fn create_sandbox(
    State(gw): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<CreateSandbox>,
) -> Result<Response, HttpError> {
    caller.require(Scope::SandboxesWrite)?;
    if let Some(name) = &body.name {
        check_name(name)?;
    } else if body.reuse {
        return Err(HttpError::invalid_argument(
            "reuse needs a name: it returns the live sandbox of that name",
        ));
    }
    check_tags(&body.tags)?;
    // An imported image: its config fills in the command, environment and working folder.
    let image = match body.image.as_deref() {
        None | Some(sandbox::image::HOST) => None,
        Some(_) if body.upstream.is_some() => {
            return Err(HttpError::invalid_argument(
                "`image` applies to isolated `command` sandboxes only",
            ))
        }
        Some(name) => {
            let driver = gw.driver.as_ref().ok_or_else(|| {
                HttpError::invalid_argument(
                    "this node runs no sandboxes ([orchestrator] enabled = false), so it has no images",
                )
            })?;
            let images = Arc::clone(driver.images());
            let n = name.to_string();
            let meta = tokio::task::spawn_blocking(move || images.get(&n))
                .await
                .map_err(|_| HttpError::internal())?
                // Another credential's snapshot is not there for this one.
                .filter(|m| m.visible_to(&caller.credential.id, caller.is_admin()));
            Some(meta.ok_or_else(|| {
                HttpError::invalid_argument(format!(
                    "no image named `{}` on this node (images and snapshots are each node's own): see GET /v1/images, or import one with POST /v1/images?name=N",
                    name.chars().take(63).collect::<String>()
                ))
            })?)
        }
    };
    let mut body = body;
    if let Some(meta) = &image {
        if body.command.is_none() {
            let command = meta.command();
            if command.is_empty() {
                return Err(HttpError::invalid_argument(
                    "the image has no Cmd; give a command",
                ));
            }
            body.command = Some(command);
        }
    }
    let body = body;
    let upstream = match (&body.command, &body.upstream) {
        (Some(_), Some(_)) => {
            return Err(HttpError::invalid_argument(
                "give either `command` or `upstream`, not both",
            ))
        }
        (None, None) => {
            return Err(HttpError::invalid_argument(
                "give `upstream` (the host of a sandbox run elsewhere) or `command`",
            ))
        }
        (Some(command), None) => {
            if gw.driver.is_none() {
                return Err(HttpError::invalid_argument(
                    "this node runs no sandboxes ([orchestrator] enabled = false); register a running service with `upstream`",
                ));
            }
            if command.is_empty() || command[0].is_empty() || command.len() > 256 {
                return Err(HttpError::invalid_argument(
                    "command must be a non-empty array such as [\"python3\", \"-m\", \"http.server\"]",
                ));
            }
            if command.iter().any(|a| a.contains('\0')) {
                return Err(HttpError::invalid_argument(
                    "command arguments may not contain NUL",
                ));
            }
            None
        }
        (None, Some(u)) => {
            // An upstream points the proxy at the network: a scope of its own.
            caller.require(Scope::UpstreamsWrite)?;
            Some(validate_upstream(u)?)
        }
    };
    check_env("env", &body.env)?;
    check_env("secret_env", &body.secret_env)?;
    if let Some(key) = body.secret_env.keys().find(|k| body.env.contains_key(*k)) {
        return Err(HttpError::invalid_argument(format!(
            "{key} is in both env and secret_env: set it in one"
        )));
    }
    if body.ports.is_empty() || body.ports.len() > 64 {
        return Err(HttpError::invalid_argument("ports must list 1 to 64 ports"));
    }
    let mut ports = body.ports.clone();
    ports.sort_unstable();
    ports.dedup();
    if ports.len() != body.ports.len() || ports.contains(&0) {
        return Err(HttpError::invalid_argument(
            "ports must be distinct numbers 1-65535",
        ));
    }
    if let Some(host) = &upstream {
        check_upstream(&gw, host, &ports).await?;
    }
    for origin in &body.cors_origins {
        validate_origin(origin)?;
    }
    validate_limits(&body)?;
    let metadata = body.metadata.unwrap_or_else(|| serde_json::json!({}));
    if !metadata.is_object() || metadata.to_string().len() > 4096 {
        return Err(HttpError::invalid_argument(
            "metadata must be a JSON object of at most 4 KiB",
        ));
    }
    if upstream.is_some() && !body.env.is_empty() {
        return Err(HttpError::invalid_argument(
            "`env` applies to `command` sandboxes only",
        ));
    }
    if upstream.is_some() && !body.secret_env.is_empty() {
        return Err(HttpError::invalid_argument(
            "`secret_env` applies to `command` sandboxes only",
        ));
    }
    let egress = match &body.egress {
        Some(e) if upstream.is_some() => {
            let _ = e;
            return Err(HttpError::invalid_argument(
                "`egress` applies to `command` sandboxes only",
            ));
        }
        Some(e) => validate_egress(&e.allow, &body.ports)?,
        None => Vec::new(),
    };
    let idle_timeout_secs = match &body.idle_timeout_secs {
        None | Some(serde_json::Value::Null) => None,
        Some(_) if upstream.is_some() => {
            return Err(HttpError::invalid_argument(
                "`idle_timeout_secs` applies to `command` sandboxes only: an `upstream` sandbox runs elsewhere, and the node that runs it ends it",
            ))
        }
        Some(v) => match v.as_u64() {
            Some(secs) if (1..=MAX_IDLE_TIMEOUT_SECS).contains(&secs) => Some(secs),
            _ => {
                return Err(HttpError::invalid_argument(format!(
                    "idle_timeout_secs must be a whole number of seconds from 1 to {MAX_IDLE_TIMEOUT_SECS} (a week)"
                )))
            }
        },
    };
    let volumes = match &body.volumes {
        Some(_) if upstream.is_some() => {
            return Err(HttpError::invalid_argument(
                "`volumes` apply to isolated `command` sandboxes only",
            ))
        }
        Some(v) => validate_volumes(v)?,
        None => Vec::new(),
    };
    let now = unix_now();
    if body.timeout_secs.is_some_and(|t| t <= 0) {
        return Err(HttpError::invalid_argument("timeout_secs must be positive"));
    }
    let mut record = SandboxRecord {
        id: sandbox::new_id(),
        owner: caller.credential.id.clone(),
        status: SandboxStatus::Running,
        ports: body.ports,
        upstream,
        command: body.command,
        env: body.env,
        cors_origins: body.cors_origins,
        rewrite_host: body.rewrite_host,
        metadata,
        created_at: now,
        expires_at: body.timeout_secs.map(|t| now.saturating_add(t)),
        ended_at: None,
        host_ports: BTreeMap::new(),
        node: None,
        detail: None,
        process: Default::default(),
        name: body.name,
        tags: body.tags,
        secret_env: body.secret_env,
    };
    if let (Some(driver), Some(_)) = (&gw.driver, &record.command) {
        if gw.config.store.url.is_some() {
            // Other nodes reach this node's sandboxes over the private network.
            record.upstream = Some(gw.config.cluster.advertise_addr.clone());
        }
        let defaults = driver.default_limits();
        record.process.memory_mb = body.memory_mb.or(defaults.memory_mb);
        record.process.cpu_secs = body.cpu_secs.or(defaults.cpu_secs);
        record.process.max_processes = body.max_processes.or(defaults.max_processes);
        record.process.max_open_files = body.max_open_files.or(defaults.max_open_files);
        record.process.cpu_millis = body
            .cpus
            .map(|c| (c * 1000.0).round().max(1.0) as u64)
            .or(defaults.cpu_millis);
        record.process.egress = egress;
        record.process.idle_timeout_secs = idle_timeout_secs;
        record.process.volumes = volumes;
        if let Some(meta) = &image {
            // The image's `Env` under the sandbox's own: the create's `env` wins.
            let mut env = meta.env_map();
            env.retain(|k, _| {
                k != "PORT" && !k.starts_with("PORT_") && !k.starts_with("SANDGATE_")
            });
            env.extend(std::mem::take(&mut record.env));
            record.env = env;
            record.process.image = Some(meta.name.clone());
            record.process.working_dir = meta
                .working_dir
                .clone()
                .filter(|w| w.starts_with('/') && !w.contains('\0'));
        }
    }
    // The look-up answers a taken name before a process is started for nothing; the store's
    // check at insert is what makes it race-free (of two creates with one name, one inserts,
    // and the other comes back here to find the winner). Should the name be freed and taken
    // again between the two, look again, a few times.
    let mut tries = 0;
    let record = loop {
        if let Some(name) = &record.name {
            if let Some(existing) = gw.store.live_sandbox_named(&record.owner, name).await? {
                return name_taken(&existing, body.reuse);
            }
        }
        // `Err(Ok(_))` is a store error (a taken name among them), `Err(Err(_))` any other
        // failure, answered as it is.
        let started = match &gw.driver {
            Some(driver) if record.command.is_some() => {
                driver.start(record.clone()).await.map_err(|e| match e {
                    crate::sandbox::process::DriverError::Store(e) => Ok(e),
                    other => Err(driver_error(other)),
                })
            }
            _ => match gw.store.insert_sandbox(&record).await {
                Ok(()) => {
                    gw.routes.upsert(&record);
                    Ok(record.clone())
                }
                Err(e) => Err(Ok(e)),
            },
        };
        match started {
            Ok(started) => break started,
            Err(Ok(StoreError::NameInUse(_))) if tries < 3 => tries += 1,
            Err(Ok(e)) => return Err(e.into()),
            Err(Err(e)) => return Err(e),
        }
    };
    gw.audit(
        &caller.credential.id,
        "sandbox.create",
        &record.id,
        caller.client_addr,
    )
    .await;
    Ok(created(SandboxView::of(&record)))
}

/// `env` and `secret_env` on creation: names like `API_URL` (not the gateway's own `PORT`,
/// `PORT_<n>` and `SANDGATE_*`) and values without NUL. A message names the field and the key
/// (never a value: a key is not secret, a value may be).
fn check_env(field: &str, env: &BTreeMap<String, String>) -> Result<(), HttpError> {
    for (key, value) in env {
        let valid = !key.is_empty()
            && !key.starts_with(|c: char| c.is_ascii_digit())
            && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
            && !value.contains('\0');
        if !valid {
            return Err(HttpError::invalid_argument(format!(
                "{field} keys must be names like API_URL and values may not contain NUL"
            )));
        }
        if key == "PORT" || key.starts_with("PORT_") || key.starts_with("SANDGATE_") {
            return Err(HttpError::invalid_argument(format!(
                "{field} may not set PORT, PORT_<n> or SANDGATE_*: the gateway sets them"
            )));
        }
    }
    Ok(())
}

/// `volumes` on creation: at most [`crate::sandbox::volume::MAX_MOUNTS`], each a volume name, a
/// normalized absolute `path` off the system's trees (no two overlapping), and a relative
/// `sub_path` that cannot leave the volume. Whether each volume exists and where its sub-path
/// leads is the driver's to check.
fn validate_volumes(mounts: &[VolumeBody]) -> Result<Vec<crate::store::VolumeMount>, HttpError> {
    use crate::sandbox::volume;
    if mounts.len() > volume::MAX_MOUNTS {
        return Err(HttpError::invalid_argument(format!(
            "a sandbox mounts at most {} volumes",
            volume::MAX_MOUNTS
        )));
    }
    for (i, m) in mounts.iter().enumerate() {
        if !volume::valid_name(&m.volume) {
            return Err(HttpError::invalid_argument(
                "volumes[].volume must be a volume name (1 to 63 of a-z, 0-9 and -)",
            ));
        }
        volume::validate_target(&m.path).map_err(HttpError::invalid_argument)?;
        if let Some(sub) = &m.sub_path {
            volume::sub_path_components(sub).map_err(HttpError::invalid_argument)?;
        }
        if let Some(other) = mounts[..i]
            .iter()
            .find(|o| volume::overlaps(&o.path, &m.path))
        {
            return Err(HttpError::invalid_argument(format!(
                "volume paths {} and {} overlap: mount each volume at a path of its own",
                other.path, m.path
            )));
        }
    }
    Ok(mounts
        .iter()
        .map(|m| crate::store::VolumeMount {
            volume: m.volume.clone(),
            path: m.path.clone(),
            sub_path: m.sub_path.clone(),
            read_only: m.read_only,
        })
        .collect())
}

/// Limits out of range are refused naming the field, rather than clamped.
fn validate_limits(body: &CreateSandbox) -> Result<(), HttpError> {
    if body
        .memory_mb
        .is_some_and(|m| !(16..=1_048_576).contains(&m))
    {
        return Err(HttpError::invalid_argument(
            "memory_mb must be between 16 and 1048576 (MiB)",
        ));
    }
    if body
        .cpus
        .is_some_and(|c| !(c.is_finite() && (0.01..=1024.0).contains(&c)))
    {
        return Err(HttpError::invalid_argument(
            "cpus must be between 0.01 and 1024 (e.g. 0.5 or 2)",
        ));
    }
    if body
        .max_processes
        .is_some_and(|n| !(1..=1_000_000).contains(&n))
    {
        return Err(HttpError::invalid_argument(
            "max_processes must be between 1 and 1000000",
        ));
    }
    if body
        .max_open_files
        .is_some_and(|n| !(16..=1_048_576).contains(&n))
    {
        return Err(HttpError::invalid_argument(
            "max_open_files must be between 16 and 1048576",
        ));
    }
    if body.cpu_secs.is_some_and(|n| n == 0) {
        return Err(HttpError::invalid_argument(
            "cpu_secs must be at least 1 (leave it out for no limit)",
        ));
    }
    Ok(())
}

/// Holds an `upstream` to the gateway's upstream policy on each published port (the
/// own-listener rule is about ports): an IP literal as it is, a host name by what it resolves
/// to now. A name that does not resolve yet is accepted: the proxy resolves it again at every
/// connect and holds each address to the same rules then. Messages name the address (a parsed
/// IP, never the caller's text: error messages do not echo requests).
async fn check_upstream(gw: &Gateway, host: &str, ports: &[u16]) -> Result<(), HttpError> {
    use std::net::{IpAddr, SocketAddr};
    let policy = &gw.upstream_policy;
    if let Ok(ip) = host.parse::<IpAddr>() {
        for &port in ports {
            policy
                .check(SocketAddr::new(ip, port))
                .map_err(|refused| HttpError::invalid_argument(format!("upstream {refused}")))?;
        }
        return Ok(());
    }
    let resolved = tokio::time::timeout(
        gw.config.gateway.upstream_connect_timeout,
        tokio::net::lookup_host((host, 0)),
    )
    .await;
    let Ok(Ok(addrs)) = resolved else {
        return Ok(());
    };
    for addr in addrs {
        for &port in ports {
            policy
                .check(SocketAddr::new(addr.ip(), port))
                .map_err(|refused| {
                    HttpError::invalid_argument(format!(
                        "upstream resolves to a refused address: {refused}"
                    ))
                })?;
        }
    }
    Ok(())
}

/// `egress.allow`: host names or `*.suffix` patterns, lowercase; the egress proxy's own port
/// cannot be published beside it.
fn validate_egress(allow: &[String], ports: &[u16]) -> Result<Vec<String>, HttpError> {
    use crate::sandbox::isolate::EGRESS_PORT;
    if allow.is_empty() || allow.len() > 256 {
        return Err(HttpError::invalid_argument(
            "egress.allow must list 1 to 256 host names such as \"api.example.com\" or \"*.example.com\"",
        ));
    }
    if ports.contains(&EGRESS_PORT) {
        return Err(HttpError::invalid_argument(format!(
            "port {EGRESS_PORT} is the egress proxy's inside the sandbox and cannot be published with egress"
        )));
    }
    let mut out = Vec::with_capacity(allow.len());
    for entry in allow {
        let name = entry.trim().trim_end_matches('.').to_ascii_lowercase();
        let bare = name.strip_prefix("*.").unwrap_or(&name);
        let is_ip = bare.parse::<std::net::IpAddr>().is_ok()
            || bare
                .trim_matches(['[', ']'])
                .parse::<std::net::IpAddr>()
                .is_ok();
        let valid = !bare.is_empty()
            && bare.len() <= 253
            && !is_ip
            && bare.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    && !label.starts_with('-')
                    && !label.ends_with('-')
            });
        if !valid {
            return Err(HttpError::invalid_argument(format!(
                "egress.allow entry `{}` is not a host name or `*.suffix` pattern (IP addresses are not allowed)",
                entry.chars().take(80).collect::<String>()
            )));
        }
        out.push(name);
    }
    Ok(out)
}

/// An upstream is a bare host: an IP literal or a DNS name, no scheme, port or path. An IP
/// literal is kept in its canonical form.
fn validate_upstream(u: &str) -> Result<String, HttpError> {
    let u = u.trim();
    let bad = || {
        HttpError::invalid_argument(
            "upstream must be a bare host such as 10.0.3.7, ::1 or sandbox-7.internal (no scheme, port or path)",
        )
    };
    if let Ok(ip) = u.parse::<std::net::IpAddr>() {
        return Ok(ip.to_string());
    }
    let name = u.trim_end_matches('.').to_ascii_lowercase();
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
        // A last label that is a number (`2852039166`, `127.1`, `0x7f.1`) is an IPv4 address
        // in a legacy notation the resolver would accept: only the dotted form is.
        && !name.rsplit('.').next().is_some_and(|last| {
            last.bytes().all(|b| b.is_ascii_digit())
                || last
                    .strip_prefix("0x")
                    .is_some_and(|hex| hex.bytes().all(|b| b.is_ascii_hexdigit()))
        });
    if ok {
        Ok(name)
    } else {
        Err(bad())
    }
}

/// An origin as browsers send it: `scheme://host[:port]`, nothing after.
fn validate_origin(o: &str) -> Result<(), HttpError> {
    let ok = url::Url::parse(o).ok().is_some_and(|u| {
        matches!(u.scheme(), "https" | "http")
            && u.host_str().is_some()
            && u.path() == "/"
            && !o.ends_with('/')
            && u.query().is_none()
            && u.fragment().is_none()
            && u.username().is_empty()
            && u.origin().ascii_serialization() == o.to_ascii_lowercase()
    });
    if ok {
        Ok(())
    } else {
        Err(HttpError::invalid_argument(
            "cors_origins entries must be origins such as https://app.example.com",
        ))
    }
}

/// `GET /v1/sandboxes[?name=N][&tag=k=v...]`: the caller's sandboxes (every one for an admin),
/// ended ones included, oldest first; with filters, only those with that name and every tag.
async fn list_sandboxes(
    State(gw): State<AppState>,
    caller: Caller,
    query: axum::extract::RawQuery,
) -> Result<Json<Items<SandboxView>>, HttpError> {
    caller.require(Scope::SandboxesRead)?;
    let mut filter = SandboxFilter {
        owner: (!caller.is_admin()).then(|| caller.credential.id.clone()),
        ..SandboxFilter::default()
    };
    for (key, value) in url::form_urlencoded::parse(query.0.as_deref().unwrap_or("").as_bytes()) {
        match &*key {
            "name" if filter.name.is_some() => {
                return Err(HttpError::invalid_argument("name may be given only once"));
            }
            "name" => {
                check_name(&value)?;
                filter.name = Some(value.into_owned());
            }
            "tag" => {
                let Some((k, v)) = value.split_once('=') else {
                    return Err(HttpError::invalid_argument(
                        "tag must be key=value, such as tag=env=prod",
                    ));
                };
                check_tag("tag", k, v)?;
                filter.tags.push((k.to_owned(), v.to_owned()));
                if filter.tags.len() > MAX_TAGS {
                    return Err(HttpError::invalid_argument(format!(
                        "tag may be given at most {MAX_TAGS} times"
                    )));
                }
            }
            // The name is not echoed: errors never repeat what was sent.
            _ => {
                return Err(HttpError::invalid_argument(
                    "unknown query parameter; filter with name=N and tag=key=value",
                ));
            }
        }
    }
    let items = gw
        .store
        .find_sandboxes(&filter)
        .await?
        .iter()
        .map(SandboxView::of)
        .collect();
    Ok(Json(Items { items }))
}

async fn owned_sandbox(
    gw: &Gateway,
    caller: &Caller,
    id: &str,
) -> Result<SandboxRecord, HttpError> {
    match gw.store.sandbox(id).await? {
        Some(s) if caller.owns(&s) => Ok(s),
        _ => Err(HttpError::not_found("no such sandbox")),
    }
}

async fn get_sandbox(
    State(gw): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<SandboxView>, HttpError> {
    caller.require(Scope::SandboxesRead)?;
    let s = owned_sandbox(&gw, &caller, &id).await?;
    Ok(Json(SandboxView::of(&s)))
}

/// `PATCH /v1/sandboxes/{id}` `{"tags": {...}}`: replaces the tags, live or ended sandbox alike.
async fn patch_sandbox(
    State(gw): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<PatchSandbox>,
) -> Result<Json<SandboxView>, HttpError> {
    caller.require(Scope::SandboxesWrite)?;
    let Some(tags) = body.tags else {
        return Err(HttpError::invalid_argument(
            "send {\"tags\": {...}}: tags are what PATCH changes",
        ));
    };
    check_tags(&tags)?;
    owned_sandbox(&gw, &caller, &id).await?;
    match gw.store.set_sandbox_tags(&id, &tags).await {
        Err(StoreError::NotFound) => return Err(HttpError::not_found("no such sandbox")),
        other => other?,
    }
    let s = owned_sandbox(&gw, &caller, &id).await?;
    gw.audit(
        &caller.credential.id,
        "sandbox.tag",
        &id,
        caller.client_addr,
    )
    .await;
    Ok(Json(SandboxView::of(&s)))
}

async fn delete_sandbox(
    State(gw): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, HttpError> {
    caller.require(Scope::SandboxesWrite)?;
    let mut s = owned_sandbox(&gw, &caller, &id).await?;
    if let Some(driver) = &gw.driver {
        if driver.terminate(&id).await {
            s = owned_sandbox(&gw, &caller, &id).await?;
        }
    }
    if s.status.is_live() {
        s.status = SandboxStatus::Stopped;
        s.ended_at = Some(unix_now());
        gw.store.update_sandbox(&s).await?;
    }
    gw.routes.upsert(&s);
    let closed = gw.tracker.close_sandbox(&id);
    tracing::debug!(sandbox = %id, closed, "sandbox terminated");
    gw.audit(
        &caller.credential.id,
        "sandbox.terminate",
        &id,
        caller.client_addr,
    )
    .await;
    Ok(StatusCode::NO_CONTENT)
}

fn driver_error(e: crate::sandbox::process::DriverError) -> HttpError {
    use crate::sandbox::process::DriverError;
    match e {
        DriverError::Spawn(err) => {
            HttpError::invalid_argument(format!("cannot start the command: {err}"))
        }
        DriverError::NoFreePort => {
            HttpError::unavailable("no free host port left for this sandbox")
        }
        DriverError::NotRunning => HttpError::conflict("the sandbox is not running"),
        DriverError::NotIsolated => HttpError::conflict(e.to_string()),
        DriverError::IsolationUnavailable(why) => HttpError::isolation_unavailable(why),
        DriverError::Isolation(err) => {
            tracing::error!(error = %err, "cannot isolate a sandbox");
            HttpError::unavailable(format!("cannot isolate the sandbox: {err}"))
        }
        DriverError::Store(err) => err.into(),
        DriverError::VolumeInvalid(why) => HttpError::invalid_argument(why),
        DriverError::VolumeConflict(why) => HttpError::conflict(why),
        DriverError::Dir(err) if crate::error::is_storage_full(&err) => {
            HttpError::insufficient_storage(format!("cannot prepare the sandbox: {err}"))
        }
        DriverError::Dir(err) => {
            tracing::error!(error = %err, "cannot prepare a sandbox directory");
            HttpError::internal()
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExecBody {
    command: Vec<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    timeout_secs: Option<u64>,
}

async fn exec(
    State(gw): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<ExecBody>,
) -> Result<Json<crate::sandbox::process::ExecOutput>, HttpError> {
    caller.require(Scope::SandboxesWrite)?;
    let s = owned_sandbox(&gw, &caller, &id).await?;
    let Some(driver) = gw.driver.as_ref().filter(|_| s.command.is_some()) else {
        return Err(HttpError::invalid_argument(
            "exec works on `command` sandboxes run by this node",
        ));
    };
    if !s.status.is_live() {
        return Err(HttpError::conflict("the sandbox has ended"));
    }
    if body.command.is_empty() || body.command[0].is_empty() {
        return Err(HttpError::invalid_argument(
            "command must be a non-empty array",
        ));
    }
    let cfg = &gw.config.orchestrator;
    let timeout = match body.timeout_secs {
        Some(0) => return Err(HttpError::invalid_argument("timeout_secs must be positive")),
        Some(t) => std::time::Duration::from_secs(t).min(cfg.exec_max_timeout),
        None => cfg.exec_timeout,
    };
    gw.audit(
        &caller.credential.id,
        "sandbox.exec",
        &id,
        caller.client_addr.clone(),
    )
    .await;
    let out = driver
        .exec(
            &s,
            crate::sandbox::process::ExecRequest {
                command: body.command,
                env: body.env,
                timeout,
            },
        )
        .await
        .map_err(driver_error)?;
    Ok(Json(out))
}

#[derive(Deserialize)]
struct LogsQuery {
    #[serde(default)]
    follow: bool,
}

/// What a running isolated sandbox uses now, from its cgroup.
#[derive(Serialize)]
struct StatsView {
    memory_bytes: u64,
    cpu_seconds: f64,
    /// How long its `cpus` limit held it back so far.
    cpu_throttled_seconds: f64,
    tasks: u64,
}

async fn stats(
    State(gw): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, HttpError> {
    caller.require(Scope::SandboxesRead)?;
    let s = owned_sandbox(&gw, &caller, &id).await?;
    let stats = gw
        .driver
        .as_ref()
        .filter(|_| s.command.is_some())
        .and_then(|d| d.stats(&s.id))
        .ok_or_else(|| {
            HttpError::conflict(
                "stats are kept for running isolated command sandboxes on this node only",
            )
        })?;
    Ok(Json(StatsView {
        memory_bytes: stats.memory_bytes,
        cpu_seconds: stats.cpu_usec as f64 / 1e6,
        cpu_throttled_seconds: stats.cpu_throttled_usec as f64 / 1e6,
        tasks: stats.tasks,
    })
    .into_response())
}

async fn logs(
    State(gw): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    query: Result<Query<LogsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, HttpError> {
    caller.require(Scope::SandboxesRead)?;
    let Ok(Query(q)) = query else {
        return Err(HttpError::invalid_argument("follow must be true or false"));
    };
    let s = owned_sandbox(&gw, &caller, &id).await?;
    let Some(driver) = gw.driver.clone().filter(|_| s.command.is_some()) else {
        return Err(HttpError::invalid_argument(
            "logs exist for `command` sandboxes run by this node",
        ));
    };
    let path = driver.log_path(&id);
    let headers = [
        (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
        (header::CACHE_CONTROL, "no-store"),
    ];
    if !q.follow {
        let bytes = tokio::fs::read(&path).await.unwrap_or_default();
        return Ok((headers, bytes).into_response());
    }
    // Stream what is there, then new output as it is written, until the sandbox ends.
    let stream = futures_util::stream::unfold((0u64, false), move |(offset, finished)| {
        let path = path.clone();
        let driver = Arc::clone(&driver);
        let id = id.clone();
        async move {
            if finished {
                return None;
            }
            loop {
                let running = driver.is_running(&id);
                let chunk = read_from(&path, offset).await;
                if !chunk.is_empty() {
                    let next = offset + chunk.len() as u64;
                    return Some((Ok::<_, std::io::Error>(Bytes::from(chunk)), (next, false)));
                }
                if !running {
                    return None;
                }
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
        }
    });
    Ok((headers, Body::from_stream(stream)).into_response())
}

/// Up to 64 KiB of a file from `offset`.
async fn read_from(path: &std::path::Path, offset: u64) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    let Ok(mut file) = tokio::fs::File::open(path).await else {
        return Vec::new();
    };
    if file.seek(std::io::SeekFrom::Start(offset)).await.is_err() {
        return Vec::new();
    }
    let mut buf = vec![0u8; 64 * 1024];
    match file.read(&mut buf).await {
        Ok(n) => {
            buf.truncate(n);
            buf
        }
        Err(_) => Vec::new(),
    }
}

// ---------------------------------------------------------------------------------------------
// Connect tokens

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateToken {
    port: u16,
    ttl_secs: Option<i64>,
    user_metadata: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default)]
    single_use: bool,
}

#[derive(Serialize)]
struct TokenView {
    token: String,
    url: String,
    expires_at: String,
    jti: String,
}

async fn create_token(
    State(gw): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<CreateToken>,
) -> Result<Response, HttpError> {
    caller.require(Scope::TokensIssue)?;
    let s = owned_sandbox(&gw, &caller, &id).await?;
    if !s.status.is_live() {
        return Err(HttpError::conflict("the sandbox has ended"));
    }
    if !s.ports.contains(&body.port) {
        let published: Vec<String> = s.ports.iter().map(u16::to_string).collect();
        return Err(HttpError::invalid_argument(format!(
            "the sandbox does not publish port {}; its published ports are {}",
            body.port,
            published.join(", ")
        )));
    }
    if let Some(ttl) = body.ttl_secs {
        check_token_ttl(
            ttl,
            gw.config.tokens.max_ttl_secs,
            caller.credential.max_token_ttl_secs,
        )?;
    }
    let ttl = match (body.ttl_secs, caller.credential.max_token_ttl_secs) {
        (Some(t), _) => Some(t),
        (None, Some(max)) if max < gw.config.tokens.default_ttl_secs => Some(max),
        (None, _) => None,
    };
    let now = unix_now();
    let (token, claims) = gw.tokens.issue(
        IssueRequest {
            sub: caller.credential.id.clone(),
            sbx: s.id.clone(),
            port: body.port,
            ttl_secs: ttl,
            md: body.user_metadata,
            once: body.single_use,
        },
        now,
    )?;
    let cfg = &gw.config.gateway;
    let port_suffix = if cfg.public_port == 443 {
        String::new()
    } else {
        format!(":{}", cfg.public_port)
    };
    let url = format!(
        "https://{}-{}.{}{}/?_sandgate_token={}",
        body.port, s.id, cfg.base_domain, port_suffix, token
    );
    // The record (never the token) and the audit event share one group commit; if it fails,
    // the token is not handed out, as it could not be revoked by its id.
    let record = IssuedToken {
        jti: claims.jti.clone(),
        sandbox: claims.sbx.clone(),
        port: claims.port,
        sub: claims.sub.clone(),
        issued_at: claims.iat,
        exp: claims.exp,
        single_use: claims.once,
    };
    gw.record_issued(
        record,
        &format!("{}:{} jti={}", s.id, body.port, claims.jti),
        caller.client_addr,
    )
    .await?;
    Ok(created(TokenView {
        token,
        url,
        expires_at: rfc3339(claims.exp),
        jti: claims.jti.clone(),
    }))
}

/// Checks a requested token lifetime against the gateway's maximum and the credential's own
/// cap, naming the limit in human units and where it is set (the CLI shows this message as is).
fn check_token_ttl(
    ttl: i64,
    gateway_max: i64,
    credential_max: Option<i64>,
) -> Result<(), HttpError> {
    if ttl <= 0 {
        return Err(HttpError::invalid_argument("ttl_secs must be positive"));
    }
    match credential_max.filter(|&max| max < gateway_max) {
        Some(max) if ttl > max => Err(HttpError::invalid_argument(format!(
            "ttl_secs is at most {} ({max} s) for this credential: its max_token_ttl_secs",
            human_duration(max)
        ))),
        _ if ttl > gateway_max => Err(HttpError::invalid_argument(format!(
            "ttl_secs is at most {} ({gateway_max} s): the gateway's [tokens] max_ttl_secs \
             (a credential's max_token_ttl_secs can only lower it)",
            human_duration(gateway_max)
        ))),
        _ => Ok(()),
    }
}

/// `86400` → `24h`, `300` → `5m`, `90` → `90s`: the largest unit that divides it exactly,
/// and hours rather than days below two days (a limit of "24h" reads better than "1d").
fn human_duration(secs: i64) -> String {
    match secs {
        s if s >= 2 * 86_400 && s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if s >= 3_600 && s % 3_600 == 0 => format!("{}h", s / 3_600),
        s if s >= 60 && s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// Token ids and sandbox ids go into queries and paths: the characters ids are made of.
fn is_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// An issued token as listed: its claims, never the token.
#[derive(Serialize)]
struct IssuedTokenView {
    jti: String,
    sandbox: String,
    port: u16,
    sub: String,
    issued_at: String,
    expires_at: String,
    single_use: bool,
}

impl IssuedTokenView {
    fn of(t: &IssuedToken) -> Self {
        IssuedTokenView {
            jti: t.jti.clone(),
            sandbox: t.sandbox.clone(),
            port: t.port,
            sub: t.sub.clone(),
            issued_at: rfc3339(t.issued_at),
            expires_at: rfc3339(t.exp),
            single_use: t.single_use,
        }
    }
}

/// `GET /v1/connect-tokens[?sandbox=ID]`: the tokens still honoured (not expired beyond the
/// leeway, not revoked), oldest first. `tokens:issue` or `tokens:revoke`: whoever mints tokens
/// or revokes them needs their ids. A non-admin sees the tokens of its own sandboxes and those
/// it minted; another owner's sandbox is 404, as everywhere.
async fn list_tokens(
    State(gw): State<AppState>,
    caller: Caller,
    query: axum::extract::RawQuery,
) -> Result<Json<Items<IssuedTokenView>>, HttpError> {
    caller.require_either(Scope::TokensIssue, Scope::TokensRevoke)?;
    let mut sandbox = None;
    for (key, value) in url::form_urlencoded::parse(query.0.as_deref().unwrap_or("").as_bytes()) {
        match &*key {
            "sandbox" if sandbox.is_some() => {
                return Err(HttpError::invalid_argument(
                    "sandbox may be given only once",
                ));
            }
            "sandbox" if !is_id(&value) => {
                return Err(HttpError::invalid_argument(
                    "sandbox must be a sandbox id (letters and digits)",
                ));
            }
            "sandbox" => sandbox = Some(value.into_owned()),
            // The name is not echoed: errors never repeat what was sent.
            _ => {
                return Err(HttpError::invalid_argument(
                    "unknown query parameter; the only one is sandbox=ID",
                ));
            }
        }
    }
    let live_after = unix_now() - gw.config.tokens.leeway_secs;
    let tokens = match &sandbox {
        Some(id) => {
            owned_sandbox(&gw, &caller, id).await?;
            gw.store.live_tokens(live_after, Some(id)).await?
        }
        None => {
            let mut tokens = gw.store.live_tokens(live_after, None).await?;
            if !caller.is_admin() {
                let own: std::collections::HashSet<String> = gw
                    .store
                    .sandboxes()
                    .await?
                    .into_iter()
                    .filter(|s| caller.owns(s))
                    .map(|s| s.id)
                    .collect();
                tokens.retain(|t| t.sub == caller.credential.id || own.contains(&t.sandbox));
            }
            tokens
        }
    };
    let items = tokens.iter().map(IssuedTokenView::of).collect();
    Ok(Json(Items { items }))
}

/// `DELETE /v1/connect-tokens/{jti}`: revokes a live token. 404 for an id that was never
/// issued, whose token has expired (beyond the leeway: nothing left to revoke) or that the
/// caller may not see; 204 again for one already revoked, so retries are safe.
async fn revoke_token(
    State(gw): State<AppState>,
    caller: Caller,
    Path(jti): Path<String>,
) -> Result<StatusCode, HttpError> {
    caller.require(Scope::TokensRevoke)?;
    if !is_id(&jti) {
        return Err(HttpError::invalid_argument("not a token id"));
    }
    const UNKNOWN: &str =
        "no such token: no token with this id was issued, or it is not yours; `sandgate token list` shows the live ones";
    let Some(record) = gw.store.issued_token(&jti).await? else {
        return Err(HttpError::not_found(UNKNOWN));
    };
    let visible = caller.is_admin()
        || record.sub == caller.credential.id
        || gw
            .store
            .sandbox(&record.sandbox)
            .await?
            .is_some_and(|s| caller.owns(&s));
    if !visible {
        return Err(HttpError::not_found(UNKNOWN));
    }
    let now = unix_now();
    if record.exp + gw.config.tokens.leeway_secs <= now {
        return Err(HttpError::not_found(
            "that token has already expired; there is nothing left to revoke",
        ));
    }
    // Revoked until the token's own expiry: after that it fails on `exp` alone. The store
    // announces the revocation to every node.
    let exp = record.exp;
    gw.store.revoke_token(&jti, exp).await?;
    gw.tokens.revoke(&jti, exp);
    let closed = gw.tracker.close_token(&jti);
    tracing::debug!(closed, "token revoked");
    gw.audit(
        &caller.credential.id,
        "token.revoke",
        &jti,
        caller.client_addr,
    )
    .await;
    Ok(StatusCode::NO_CONTENT)
}

// ---------------------------------------------------------------------------------------------
// Audit

#[derive(Deserialize)]
struct AuditQuery {
    limit: Option<usize>,
}

#[derive(Serialize)]
struct AuditView {
    id: i64,
    time: String,
    actor: String,
    action: String,
    target: String,
    client_addr: Option<String>,
}

async fn audit(
    State(gw): State<AppState>,
    caller: Caller,
    query: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Items<AuditView>>, HttpError> {
    caller.require(Scope::Admin)?;
    let Ok(Query(q)) = query else {
        return Err(HttpError::invalid_argument("limit must be a number"));
    };
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let items = gw
        .store
        .audit(limit)
        .await?
        .into_iter()
        .map(|e| AuditView {
            id: e.id,
            time: rfc3339(e.time),
            actor: e.actor,
            action: e.action,
            target: e.target,
            client_addr: e.client_addr,
        })
        .collect();
    Ok(Json(Items { items }))
}

#[derive(Serialize)]
struct NodeView {
    name: String,
    advertise_addr: String,
    /// Where other nodes reach its cluster relay; `null` outside cluster mode.
    relay_addr: Option<String>,
    last_heartbeat: String,
    status: &'static str,
    runs_sandboxes: bool,
    version: String,
    started_at: String,
}

/// `GET /v1/nodes`: every node sharing this store, with its last heartbeat.
async fn list_nodes(
    State(gw): State<AppState>,
    caller: Caller,
) -> Result<Json<Items<NodeView>>, HttpError> {
    caller.require(Scope::Admin)?;
    let now = unix_now();
    let items = gw
        .store
        .nodes()
        .await?
        .into_iter()
        .map(|n| NodeView {
            status: crate::cluster::node_status(&gw, &n, now),
            last_heartbeat: rfc3339(n.last_heartbeat),
            started_at: rfc3339(n.started_at),
            name: n.name,
            advertise_addr: n.advertise_addr,
            relay_addr: n.relay_addr,
            runs_sandboxes: n.runs_sandboxes,
            version: n.version,
        })
        .collect();
    Ok(Json(Items { items }))
}

// ---------------------------------------------------------------------------------------------
// Telemetry listener

/// Serves `/metrics`, `/healthz` and `/readyz` on plain HTTP until `stop` is cancelled.
pub async fn serve_telemetry(gw: Arc<Gateway>, listener: TcpListener, stop: CancellationToken) {
    let ready_stop = stop.clone();
    let app = Router::new()
        .route(
            "/metrics",
            get(|State(gw): State<AppState>| async move {
                let mut headers = HeaderMap::new();
                headers.insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static(
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    ),
                );
                (headers, gw.metrics.encode())
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move |State(gw): State<AppState>| async move {
                if ready_stop.is_cancelled() {
                    return (StatusCode::SERVICE_UNAVAILABLE, "draining\n");
                }
                match tokio::time::timeout(
                    std::time::Duration::from_secs(2),
                    gw.store.signing_keys(),
                )
                .await
                {
                    Ok(Ok(_)) => (StatusCode::OK, "ready\n"),
                    _ => (StatusCode::SERVICE_UNAVAILABLE, "store unavailable\n"),
                }
            }),
        )
        .with_state(gw);
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await;
    if let Err(err) = result {
        tracing::error!(error = %err, "telemetry listener failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_errors_do_not_echo_values() {
        let e = serde_json::from_str::<CreateToken>(r#"{"port": "sgk_supersecret"}"#).unwrap_err();
        let msg = redact_json_error(&e);
        assert!(!msg.contains("supersecret"), "{msg}");
        assert!(msg.contains("invalid type"), "{msg}");
        // An escaped quote inside the value does not end the redaction early.
        let e =
            serde_json::from_str::<CreateToken>(r#"{"port": "a\"sgk_supersecret"}"#).unwrap_err();
        let msg = redact_json_error(&e);
        assert!(!msg.contains("supersecret"), "{msg}");
        // Nor is a value pasted as a field name echoed; the expected names still are.
        let e = serde_json::from_str::<CreateToken>(r#"{"sgk_`supersecret": 1}"#).unwrap_err();
        let msg = redact_json_error(&e);
        assert!(!msg.contains("supersecret"), "{msg}");
        assert!(
            msg.contains("unknown field") && msg.contains("`ttl_secs`"),
            "{msg}"
        );
    }

    #[test]
    fn upstreams_and_origins() {
        assert!(validate_upstream("10.0.3.7").is_ok());
        assert!(validate_upstream("::1").is_ok());
        assert_eq!(
            validate_upstream("::FFFF:169.254.169.254").unwrap(),
            "::ffff:169.254.169.254"
        );
        assert_eq!(validate_upstream("box.0xfe-7").unwrap(), "box.0xfe-7");
        assert_eq!(validate_upstream("3box.internal").unwrap(), "3box.internal");
        assert_eq!(
            validate_upstream("Box-7.Internal").unwrap(),
            "box-7.internal"
        );
        for bad in [
            "http://x",
            "x:80",
            "x/y",
            "",
            "a..b",
            "169.254.169.254/latest",
            "2852039166",
            "127.1",
            "0x7f.0.0.1",
            "0xa9fea9fe",
        ] {
            assert!(validate_upstream(bad).is_err(), "{bad}");
        }
        assert!(validate_origin("https://app.example.com").is_ok());
        assert!(validate_origin("http://localhost:3000").is_ok());
        for bad in [
            "https://app.example.com/",
            "app.example.com",
            "https://a.com/x",
            "*",
            "null",
        ] {
            assert!(validate_origin(bad).is_err(), "{bad}");
        }
    }
}
