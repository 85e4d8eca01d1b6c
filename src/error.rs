//! The one place gateway errors become HTTP responses.
//!
//! Data plane and control plane both answer with [`HttpError`]: a status, a stable machine
//! code and a public message. Browsers (an `Accept` that prefers `text/html`) get a short page
//! that says what happened and what to do; everyone else gets
//! `{"error": {"code": "...", "message": "..."}}`. Nothing secret is ever put in a message:
//! messages are written here or by callers from static text, never echoed from the request.

use std::borrow::Cow;

use axum::body::Body;
use http::header::{self, HeaderValue};
use http::{HeaderMap, Response, StatusCode};

use crate::store::StoreError;
use crate::token::TokenError;

/// An error the gateway itself answers, classified for the client.
#[derive(Debug, Clone)]
pub struct HttpError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: Cow<'static, str>,
    /// Seconds for `Retry-After` (rate limits, overload).
    pub retry_after: Option<u64>,
}

impl HttpError {
    pub fn new(
        status: StatusCode,
        code: &'static str,
        message: impl Into<Cow<'static, str>>,
    ) -> Self {
        HttpError {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn token_missing() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "token_missing",
            "this address needs a connect token; ask for a fresh link",
        )
    }

    pub fn token_scope() -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "token_scope",
            "the connect token is not valid for this sandbox port",
        )
    }

    pub fn sandbox_terminated() -> Self {
        Self::new(
            StatusCode::GONE,
            "sandbox_terminated",
            "the sandbox has ended",
        )
    }

    pub fn upstream_unreachable() -> Self {
        Self::new(
            StatusCode::BAD_GATEWAY,
            "upstream_unreachable",
            "the sandbox port refused or reset the connection",
        )
    }

    /// The sandbox's registered host now is or resolves to an address the upstream policy
    /// refuses. The code stays `upstream_unreachable` (the contract's code for a sandbox port
    /// the gateway cannot reach); the address itself is in the log only, not shown to whoever
    /// holds a link.
    pub fn upstream_refused() -> Self {
        Self::new(
            StatusCode::BAD_GATEWAY,
            "upstream_unreachable",
            "the sandbox's upstream address is refused by the gateway's upstream policy ([gateway] upstream_allow); its owner must register it at an allowed address",
        )
    }

    pub fn upstream_timeout() -> Self {
        Self::new(
            StatusCode::GATEWAY_TIMEOUT,
            "upstream_timeout",
            "the sandbox did not answer in time",
        )
    }

    pub fn bad_request(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    pub fn body_too_large() -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            "the request body is larger than this gateway accepts",
        )
    }

    pub fn unknown_host() -> Self {
        Self::new(
            StatusCode::MISDIRECTED_REQUEST,
            "unknown_host",
            "this gateway serves neither the base domain nor a sandbox at this host name",
        )
    }

    pub fn unauthenticated(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthenticated", message)
    }

    pub fn forbidden(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    pub fn not_found(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn conflict(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", message)
    }

    pub fn invalid_argument(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_argument",
            message,
        )
    }

    /// A `command` sandbox on a node that cannot isolate it.
    pub fn isolation_unavailable(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "isolation_unavailable",
            message,
        )
    }

    pub fn unavailable(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }

    /// The disk (or a quota) is full: the request was fine, there is no room for it (507, as
    /// WebDAV defined it). A client may retry once space is freed; nothing of it was kept.
    pub fn insufficient_storage(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(
            StatusCode::INSUFFICIENT_STORAGE,
            "insufficient_storage",
            message,
        )
    }

    pub fn internal() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the gateway failed; the error is in its log",
        )
    }

    /// Renders for a client whose request had `request_headers`.
    pub fn to_response(&self, request_headers: &HeaderMap) -> Response<Body> {
        if prefers_html(request_headers) {
            self.html_response()
        } else {
            self.json_response()
        }
    }

    /// The JSON shape, for API clients and agents.
    pub fn json_response(&self) -> Response<Body> {
        let body = serde_json::json!({
            "error": { "code": self.code, "message": self.message }
        });
        self.finish(
            HeaderValue::from_static("application/json"),
            Body::from(body.to_string()),
        )
    }

    /// A page for a person in a browser: what happened and what to do.
    pub fn html_response(&self) -> Response<Body> {
        let (title, advice) = match self.code {
            "token_missing" => (
                "This link needs a connect token",
                "The address has no valid access token. Ask whoever shared it, or your tool, for a fresh link to this sandbox.",
            ),
            "token_expired" => (
                "This link has expired",
                "Connect links are short-lived. Ask for a new link to this sandbox and open it again.",
            ),
            "token_revoked" => (
                "This link was revoked",
                "Access with this link has been withdrawn. Ask for a new link if you still need access.",
            ),
            "token_invalid" => (
                "This link is not valid",
                "The access token in this link could not be verified. Ask for a fresh link; do not edit it by hand.",
            ),
            "token_scope" => (
                "This link is for another sandbox or port",
                "Open the exact link you were given, or ask for a link to this port.",
            ),
            "sandbox_terminated" => (
                "This sandbox has ended",
                "The sandbox behind this address is no longer running. Start a new one and ask for a new link.",
            ),
            "upstream_unreachable" => (
                "The sandbox is not answering on this port",
                "The service inside the sandbox refused the connection. It may still be starting, or it may have crashed; retry in a moment.",
            ),
            "upstream_timeout" => (
                "The sandbox took too long to answer",
                "The service inside the sandbox did not respond in time. Retry, or check the sandbox's logs.",
            ),
            "unknown_host" => (
                "Unknown address",
                "This gateway does not serve this host name. Check the link.",
            ),
            "forbidden" => (
                "Request refused",
                "This request came from another site and is not allowed to use your session for this sandbox.",
            ),
            _ => ("Request failed", "Check the address and try again."),
        };
        let page = format!(
            "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
             <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
             <title>{title} · sandgate</title>\
             <style>body{{font-family:system-ui,sans-serif;max-width:40rem;margin:4rem auto;padding:0 1rem;color:#222}}\
             code{{background:#eee;padding:.1rem .3rem;border-radius:3px}}</style></head>\
             <body><h1>{title}</h1><p>{advice}</p><p>{message}</p>\
             <p><small>HTTP {status} · <code>{code}</code> · sandgate</small></p></body></html>\n",
            message = escape_html(&self.message),
            status = self.status.as_u16(),
            code = self.code,
        );
        self.finish(
            HeaderValue::from_static("text/html; charset=utf-8"),
            Body::from(page),
        )
    }

    fn finish(&self, content_type: HeaderValue, body: Body) -> Response<Body> {
        let mut response = Response::new(body);
        *response.status_mut() = self.status;
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, content_type);
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        headers.insert(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        );
        if self.status == StatusCode::UNAUTHORIZED {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let Some(secs) = self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

impl std::fmt::Display for HttpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.code,
            self.message
        )
    }
}

impl From<TokenError> for HttpError {
    fn from(err: TokenError) -> Self {
        let code = err.code();
        let status = match code {
            "token_invalid" | "token_expired" | "token_revoked" => StatusCode::UNAUTHORIZED,
            "invalid_argument" => StatusCode::UNPROCESSABLE_ENTITY,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let message: Cow<'static, str> = match code {
            "token_expired" => "the connect token has expired; ask for a fresh one".into(),
            "token_revoked" => "the connect token has been revoked or already used".into(),
            "token_invalid" => "the connect token is not valid".into(),
            // Issue-side errors describe the caller's own request and contain no secret.
            "invalid_argument" => err.to_string().into(),
            _ => {
                tracing::error!(error = %err, "token operation failed");
                return HttpError::internal();
            }
        };
        HttpError::new(status, code, message)
    }
}

impl From<StoreError> for HttpError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::NotFound => HttpError::not_found("no such object"),
            StoreError::Conflict(what) => HttpError::conflict(what),
            StoreError::NameInUse(name) => HttpError::conflict(format!(
                "a live sandbox is already named `{name}`; delete it, or send \"reuse\": true to get it"
            )),
            other => {
                tracing::error!(error = %other, "store operation failed");
                HttpError::unavailable("the gateway's store is unavailable; retry shortly")
            }
        }
    }
}

impl axum::response::IntoResponse for HttpError {
    /// The control API speaks JSON only.
    fn into_response(self) -> axum::response::Response {
        self.json_response()
    }
}

/// Whether an I/O error says the disk is full (`ENOSPC`) or its owner's quota is
/// (`EDQUOT`): 507 rather than 500 or 503, since nothing is broken but room.
pub fn is_storage_full(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
    ) || e
        .raw_os_error()
        .is_some_and(|n| n == nix::libc::ENOSPC || n == nix::libc::EDQUOT)
}

/// True when the client ranks `text/html` above JSON (a browser navigating).
pub fn prefers_html(headers: &HeaderMap) -> bool {
    let Some(accept) = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let mut html = 0.0f32;
    let mut json = 0.0f32;
    for item in accept.split(',') {
        let mut parts = item.split(';');
        let media = parts.next().unwrap_or("").trim().to_ascii_lowercase();
        let q = parts
            .filter_map(|p| p.trim().strip_prefix("q="))
            .find_map(|q| q.trim().parse::<f32>().ok())
            .unwrap_or(1.0);
        match media.as_str() {
            "text/html" | "application/xhtml+xml" => html = html.max(q),
            "application/json" | "*/*" => json = json.max(q),
            _ => {}
        }
    }
    html > 0.0 && html >= json
}

fn escape_html(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accept(v: &'static str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::ACCEPT, HeaderValue::from_static(v));
        h
    }

    #[test]
    fn browsers_get_html_and_agents_get_json() {
        assert!(prefers_html(&accept(
            "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
        )));
        assert!(!prefers_html(&accept("application/json")));
        assert!(!prefers_html(&accept("*/*")));
        assert!(!prefers_html(&HeaderMap::new()));
        assert!(!prefers_html(&accept("text/html;q=0.1, application/json")));
    }

    #[test]
    fn a_full_disk_is_told_apart() {
        for n in [nix::libc::ENOSPC, nix::libc::EDQUOT] {
            assert!(is_storage_full(&std::io::Error::from_raw_os_error(n)));
        }
        assert!(is_storage_full(&std::io::Error::new(
            std::io::ErrorKind::StorageFull,
            "wrapped"
        )));
        assert!(!is_storage_full(&std::io::Error::from_raw_os_error(
            nix::libc::EIO
        )));
        let e = HttpError::insufficient_storage("no space left on device");
        assert_eq!(e.json_response().status(), StatusCode::INSUFFICIENT_STORAGE);
        assert_eq!(e.code, "insufficient_storage");
    }

    #[test]
    fn unauthorized_carries_www_authenticate() {
        let r = HttpError::token_missing().json_response();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(r.headers()[header::WWW_AUTHENTICATE], "Bearer");
        let r = HttpError::token_scope().html_response();
        assert!(r.headers().get(header::WWW_AUTHENTICATE).is_none());
    }
}
