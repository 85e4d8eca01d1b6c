//! The HTTPS client the CLI's client commands use to call the control API.
//!
//! Names under `.localhost` resolve to loopback here (RFC 6761), as they do in browsers and
//! curl, so the dev setup needs no DNS even where the system resolver does not do it.

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::dns::{GaiResolver, Name};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower::Service;

/// Why a call to the API failed before an answer came back.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The base URL is not an https URL.
    #[error("SANDGATE_URL `{0}` is not an https:// URL")]
    BadUrl(String),
    /// TLS trust could not be set up. (Transparent: with `{0}` plus `#[from]`, the message
    /// printed twice in `error: ...` chains.)
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// The server could not be reached, or the TLS handshake failed.
    #[error("cannot reach sandgate at {url}: {detail}")]
    Connect { url: String, detail: String },
    /// The body was not valid JSON.
    #[error("the server answered {status} with a body that is not JSON")]
    NotJson { status: StatusCode },
}

/// A resolver that answers `localhost` and `*.localhost` with 127.0.0.1 and asks the system
/// for everything else.
#[derive(Clone, Debug)]
pub struct LocalhostResolver {
    gai: GaiResolver,
}

impl Default for LocalhostResolver {
    fn default() -> Self {
        LocalhostResolver {
            gai: GaiResolver::new(),
        }
    }
}

type Addrs = std::vec::IntoIter<SocketAddr>;

impl Service<Name> for LocalhostResolver {
    type Response = Addrs;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Addrs, std::io::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.gai.poll_ready(cx)
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let host = name.as_str().trim_end_matches('.').to_ascii_lowercase();
        if host == "localhost" || host.ends_with(".localhost") {
            let addrs = vec![SocketAddr::from((Ipv4Addr::LOCALHOST, 0))];
            return Box::pin(async move { Ok(addrs.into_iter()) });
        }
        let fut = self.gai.call(name);
        Box::pin(async move {
            let addrs = fut.await?;
            Ok(addrs.collect::<Vec<_>>().into_iter())
        })
    }
}

/// A request body: whole (JSON) or streamed (uploads).
pub type RequestBody = UnsyncBoxBody<Bytes, std::io::Error>;

fn whole(bytes: Bytes) -> RequestBody {
    Full::new(bytes)
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// A JSON client for the control API.
#[derive(Clone)]
pub struct ApiClient {
    base: String,
    api_key: Option<String>,
    http: Client<HttpsConnector<HttpConnector<LocalhostResolver>>, RequestBody>,
}

impl std::fmt::Debug for ApiClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiClient")
            .field("base", &self.base)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// An answer from the API.
#[derive(Debug)]
pub struct ApiResponse {
    pub status: StatusCode,
    pub body: Bytes,
}

impl ApiResponse {
    pub fn json(&self) -> Result<serde_json::Value, ClientError> {
        if self.body.is_empty() {
            return Ok(serde_json::Value::Null);
        }
        serde_json::from_slice(&self.body).map_err(|_| ClientError::NotJson {
            status: self.status,
        })
    }

    /// The `{"error": {"code", "message"}}` of a failed call, if it has one.
    pub fn error(&self) -> Option<(String, String)> {
        let v: serde_json::Value = serde_json::from_slice(&self.body).ok()?;
        let e = v.get("error")?;
        Some((
            e.get("code")?.as_str()?.to_string(),
            e.get("message")?.as_str()?.to_string(),
        ))
    }
}

impl ApiClient {
    /// `base_url` such as `https://sandbox.localhost:8443`; `ca` is the PEM file of the CA to
    /// trust (the dev CA, or a private one).
    pub fn new(
        base_url: &str,
        api_key: Option<String>,
        ca: Option<&Path>,
    ) -> Result<ApiClient, ClientError> {
        let base = base_url.trim_end_matches('/').to_string();
        if !base.starts_with("https://") || url::Url::parse(&base).is_err() {
            return Err(ClientError::BadUrl(base));
        }
        let tls = crate::tls::client_config(ca)?;
        let mut http = HttpConnector::new_with_resolver(LocalhostResolver::default());
        http.enforce_http(false);
        http.set_connect_timeout(Some(std::time::Duration::from_secs(10)));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_only()
            .enable_http1()
            .wrap_connector(http);
        Ok(ApiClient {
            base,
            api_key,
            http: Client::builder(TokioExecutor::new()).build(https),
        })
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// Sends a GET-like call and returns the response with its body unread (for streams).
    pub async fn stream(
        &self,
        method: Method,
        path: &str,
    ) -> Result<http::Response<hyper::body::Incoming>, ClientError> {
        self.send_body(method, path, None, whole(Bytes::new()))
            .await
    }

    /// Sends `body` (streamed as it is produced; `length` when known) and returns the
    /// response with its body unread.
    pub async fn send_body(
        &self,
        method: Method,
        path: &str,
        length: Option<u64>,
        body: RequestBody,
    ) -> Result<http::Response<hyper::body::Incoming>, ClientError> {
        let url = format!("{}{}", self.base, path);
        let mut req = Request::builder().method(method).uri(&url);
        if let Some(key) = &self.api_key {
            req = req.header(http::header::AUTHORIZATION, format!("Bearer {key}"));
        }
        if let Some(len) = length {
            req = req.header(http::header::CONTENT_LENGTH, len);
        }
        let req = req
            .body(body)
            .map_err(|_| ClientError::BadUrl(url.clone()))?;
        self.http
            .request(req)
            .await
            .map_err(|e| ClientError::Connect {
                url: self.base.clone(),
                detail: error_chain(&e),
            })
    }

    /// Like [`ApiClient::send_body`], with `Expect: 100-continue`: the body is held back until
    /// the server asks for it (its interim `100 Continue`), so that an answer it gives before
    /// reading any (403, 409, 413) reaches the client whole instead of a broken pipe halfway
    /// through a large upload. A server that sends no interim answer within
    /// [`CONTINUE_WAIT`] gets the body anyway (RFC 9110 §10.1.1: the client need not wait
    /// forever); once a final answer has come first, the body is never sent.
    pub async fn send_upload(
        &self,
        method: Method,
        path: &str,
        length: Option<u64>,
        body: RequestBody,
    ) -> Result<http::Response<hyper::body::Incoming>, ClientError> {
        let gate = std::sync::Arc::new(Gate::default());
        let url = format!("{}{}", self.base, path);
        let mut req = Request::builder()
            .method(method)
            .uri(&url)
            .header(http::header::EXPECT, "100-continue");
        if let Some(key) = &self.api_key {
            req = req.header(http::header::AUTHORIZATION, format!("Bearer {key}"));
        }
        if let Some(len) = length {
            req = req.header(http::header::CONTENT_LENGTH, len);
        }
        let mut req = req
            .body(gated(body, std::sync::Arc::clone(&gate)))
            .map_err(|_| ClientError::BadUrl(url.clone()))?;
        {
            let gate = std::sync::Arc::clone(&gate);
            hyper::ext::on_informational(&mut req, move |res| {
                if res.status() == StatusCode::CONTINUE {
                    gate.set(Gate::GO);
                }
            });
        }
        let response = self
            .http
            .request(req)
            .await
            .map_err(|e| ClientError::Connect {
                url: self.base.clone(),
                detail: error_chain(&e),
            })?;
        // A final answer before the body went: it never goes.
        gate.set(Gate::STOP);
        Ok(response)
    }

    /// Sends one call; `body` is sent as JSON.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<ApiResponse, ClientError> {
        let url = format!("{}{}", self.base, path);
        let mut req = Request::builder().method(method).uri(&url);
        if let Some(key) = &self.api_key {
            req = req.header(http::header::AUTHORIZATION, format!("Bearer {key}"));
        }
        let payload = match body {
            Some(b) => {
                req = req.header(http::header::CONTENT_TYPE, "application/json");
                Bytes::from(b.to_string())
            }
            None => Bytes::new(),
        };
        let req = req
            .body(whole(payload))
            .map_err(|_| ClientError::BadUrl(url.clone()))?;
        let connect_err = |detail: String| ClientError::Connect {
            url: self.base.clone(),
            detail,
        };
        let response = self
            .http
            .request(req)
            .await
            .map_err(|e| connect_err(error_chain(&e)))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| connect_err(e.to_string()))?
            .to_bytes();
        Ok(ApiResponse { status, body })
    }
}

/// How long an upload waits for the server's `100 Continue` before it sends its body anyway.
pub const CONTINUE_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// Whether an upload's body may go: still waiting, go (the server asked for it, or it said
/// nothing in time), or never (a final answer came first).
#[derive(Default)]
struct Gate {
    state: std::sync::atomic::AtomicU8,
    changed: tokio::sync::Notify,
}

impl Gate {
    const WAIT: u8 = 0;
    const GO: u8 = 1;
    const STOP: u8 = 2;

    /// Moves on from waiting (once: a later `set` changes nothing).
    fn set(&self, to: u8) {
        use std::sync::atomic::Ordering;
        if self
            .state
            .compare_exchange(Self::WAIT, to, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.changed.notify_one();
        }
    }

    /// Returns when the body may go; pends forever when it never may.
    async fn opened(&self) {
        use std::sync::atomic::Ordering;
        let deadline = tokio::time::Instant::now() + CONTINUE_WAIT;
        loop {
            match self.state.load(Ordering::Acquire) {
                Self::WAIT => {}
                Self::GO => return,
                _ => std::future::pending::<()>().await,
            }
            if tokio::time::timeout_at(deadline, self.changed.notified())
                .await
                .is_err()
            {
                self.set(Self::GO);
            }
        }
    }
}

/// `body`, held back until `gate` opens.
fn gated(body: RequestBody, gate: std::sync::Arc<Gate>) -> RequestBody {
    use futures_util::StreamExt;
    let opened = futures_util::stream::once(async move {
        gate.opened().await;
        None
    })
    .filter_map(
        |none: Option<Result<http_body::Frame<Bytes>, std::io::Error>>| async move { none },
    );
    let frames = futures_util::stream::unfold(body, |mut body| async move {
        body.frame().await.map(|frame| (frame, body))
    });
    http_body_util::StreamBody::new(opened.chain(frames)).boxed_unsync()
}

/// An error and its causes on one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut detail = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        detail = format!("{detail}: {s}");
        source = s.source();
    }
    detail
}
