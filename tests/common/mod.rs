//! Test support: a real gateway on 127.0.0.1:0 with real TLS (trusting its own dev CA), a
//! recording echo upstream (HTTP, WebSocket, SSE), and clients for HTTP/1.1 and HTTP/2.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use sandgate::config::Config;
use sandgate::gateway::Gateway;
use sandgate::server::{self, Listeners};

pub const BASE: &str = "sandbox.localhost";

/// A running gateway; stops (gracefully) when dropped or when [`TestGateway::stop`] is called.
pub struct TestGateway {
    pub addr: SocketAddr,
    pub telemetry: SocketAddr,
    pub dir: PathBuf,
    pub admin_key: String,
    pub ca_pem: Vec<u8>,
    pub gw: Arc<Gateway>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    _tmp: Option<tempfile::TempDir>,
}

impl TestGateway {
    pub async fn start() -> TestGateway {
        Self::start_with("").await
    }

    /// Starts with extra TOML appended to the test config (e.g. `[tokens]\nleeway_secs = 0`).
    pub async fn start_with(extra_toml: &str) -> TestGateway {
        let tmp = tempfile::tempdir().expect("temp dir");
        let dir = tmp.path().to_path_buf();
        let mut g = Self::start_in(&dir, extra_toml).await;
        g._tmp = Some(tmp);
        g
    }

    /// Starts on an existing data dir (for restart tests).
    pub async fn start_in(dir: &Path, extra_toml: &str) -> TestGateway {
        sandgate::telemetry::init_tracing("warn", false);
        let toml = format!(
            "[gateway]\nbase_domain = \"{BASE}\"\nshutdown_grace_secs = 2\n[store]\ndata_dir = \"data\"\n{extra_toml}"
        );
        // Extra sections for [gateway] would repeat the table; allow callers to pass whole
        // tables only when they do not collide.
        let config_path = dir.join("sandgate.toml");
        std::fs::write(&config_path, toml).expect("write config");
        let config = Config::load(&config_path).expect("config");
        let listeners = Listeners {
            gateway: TcpListener::bind("127.0.0.1:0").await.expect("bind"),
            telemetry: TcpListener::bind("127.0.0.1:0").await.expect("bind"),
        };
        let addr = listeners.gateway.local_addr().expect("addr");
        let telemetry = listeners.telemetry.local_addr().expect("addr");
        let gw = Gateway::open(config).await.expect("gateway opens");
        let admin_key = std::fs::read_to_string(gw.config.store.admin_key_path())
            .expect("admin key")
            .trim()
            .to_string();
        let ca_pem = std::fs::read(gw.config.store.certs_dir().join("ca.pem")).expect("ca");
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn({
            let gw = Arc::clone(&gw);
            async move {
                server::run(gw, listeners, async {
                    let _ = rx.await;
                })
                .await
                .expect("server runs");
            }
        });
        TestGateway {
            addr,
            telemetry,
            dir: dir.to_path_buf(),
            admin_key,
            ca_pem,
            gw,
            shutdown: Some(tx),
            task: Some(task),
            _tmp: None,
        }
    }

    /// Stops gracefully and waits; keeps the temp dir alive in the returned guard.
    pub async fn stop(mut self) -> Option<tempfile::TempDir> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
        }
        self._tmp.take()
    }

    pub fn tls(&self) -> TlsClient {
        TlsClient::new(self.addr, &self.ca_pem)
    }

    /// A control-API call as the bootstrap admin.
    pub async fn api(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let key = self.admin_key.clone();
        self.api_as(&key, method, path, body).await
    }

    pub async fn api_as(
        &self,
        key: &str,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("https://{BASE}{path}"))
            .header("host", BASE)
            .header("authorization", format!("Bearer {key}"));
        let payload = match body {
            Some(b) => {
                req = req.header("content-type", "application/json");
                Bytes::from(b.to_string())
            }
            None => Bytes::new(),
        };
        let resp = self
            .tls()
            .send(req.body(Full::new(payload)).unwrap())
            .await
            .expect("api call");
        let status = resp.status();
        let body = resp.into_body();
        let value = if body.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&body)
                .unwrap_or(Value::String(String::from_utf8_lossy(&body).into()))
        };
        (status, value)
    }

    /// Registers a sandbox whose ports are served at 127.0.0.1:<port>.
    pub async fn create_sandbox(&self, ports: &[u16]) -> String {
        self.create_sandbox_with(serde_json::json!({ "upstream": "127.0.0.1", "ports": ports }))
            .await
    }

    pub async fn create_sandbox_with(&self, body: Value) -> String {
        let (status, v) = self.api(Method::POST, "/v1/sandboxes", Some(body)).await;
        assert_eq!(status, StatusCode::CREATED, "{v}");
        v["id"].as_str().unwrap().to_string()
    }

    /// Mints a token; returns the whole response object (`token`, `url`, `jti`, `expires_at`).
    pub async fn mint(&self, sandbox: &str, port: u16, extra: Value) -> Value {
        let mut body = serde_json::json!({ "port": port });
        if let Value::Object(m) = extra {
            for (k, v) in m {
                body[k] = v;
            }
        }
        let (status, v) = self
            .api(
                Method::POST,
                &format!("/v1/sandboxes/{sandbox}/connect-tokens"),
                Some(body),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{v}");
        v
    }

    pub async fn token(&self, sandbox: &str, port: u16) -> String {
        self.mint(sandbox, port, Value::Null).await["token"]
            .as_str()
            .unwrap()
            .to_string()
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

pub fn sandbox_host(port: u16, id: &str) -> String {
    format!("{port}-{id}.{BASE}")
}

// -------------------------------------------------------------------------------------------------
// TLS clients

/// Opens TLS connections to the gateway, trusting its dev CA.
#[derive(Clone)]
pub struct TlsClient {
    addr: SocketAddr,
    config: rustls::ClientConfig,
}

impl TlsClient {
    pub fn new(addr: SocketAddr, ca_pem: &[u8]) -> TlsClient {
        let config = sandgate::tls::client_config_from_pem(ca_pem).expect("client config");
        TlsClient { addr, config }
    }

    /// A TLS stream to the gateway with SNI `host` and the given ALPN protocols.
    pub async fn connect(&self, host: &str, alpn: &[&[u8]]) -> TlsStream<TcpStream> {
        let mut config = self.config.clone();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let connector = TlsConnector::from(Arc::new(config));
        let tcp = TcpStream::connect(self.addr).await.expect("connect");
        let name = ServerName::try_from(host.to_string()).expect("server name");
        connector.connect(name, tcp).await.expect("TLS handshake")
    }

    /// An HTTP/1.1 connection; the caller sets Host on each request.
    pub async fn h1(&self, host: &str) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
        let tls = self.connect(host, &[b"http/1.1"]).await;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .expect("h1 handshake");
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        sender
    }

    /// An HTTP/2 connection (ALPN h2).
    pub async fn h2(&self, host: &str) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
        let tls = self.connect(host, &[b"h2"]).await;
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        let (sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .expect("h2 handshake");
        tokio::spawn(async move {
            let _ = conn.await;
        });
        sender
    }

    /// Sends one request on a fresh HTTP/1.1 connection to the request's Host and collects
    /// the body.
    pub async fn send(&self, req: Request<Full<Bytes>>) -> hyper::Result<Response<Bytes>> {
        let host = req
            .headers()
            .get("host")
            .and_then(|h| h.to_str().ok())
            .map(|h| h.split(':').next().unwrap_or(h).to_string())
            .or_else(|| req.uri().host().map(str::to_string))
            .expect("request has a host");
        let mut sender = self.h1(&host).await;
        let resp = sender.send_request(req).await?;
        let (parts, body) = resp.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok(Response::from_parts(parts, body))
    }

    /// GET `path` on `host` with extra headers, on a fresh connection.
    pub async fn get(&self, host: &str, path: &str, headers: &[(&str, &str)]) -> Response<Bytes> {
        let mut req = Request::builder()
            .method(Method::GET)
            .uri(path)
            .header("host", host);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        self.send(req.body(Full::new(Bytes::new())).unwrap())
            .await
            .expect("request")
    }
}

pub fn json_body(resp: &Response<Bytes>) -> Value {
    serde_json::from_slice(resp.body()).unwrap_or(Value::Null)
}

pub fn error_code(resp: &Response<Bytes>) -> String {
    json_body(resp)["error"]["code"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

// -------------------------------------------------------------------------------------------------
// Echo upstream

/// What the upstream saw of one request.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub uri: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// A real upstream on 127.0.0.1:<port>: echoes requests as JSON and records them.
/// - `/ws`: a WebSocket echo (text and binary);
/// - `/sse`: `text/event-stream`, one event now, then one every 200 ms for 10 s;
/// - `/slow`: answers after 30 s;
/// - anything else: JSON `{method, uri, headers, body_len}`.
pub struct Echo {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    task: JoinHandle<()>,
}

impl Echo {
    pub async fn start() -> Echo {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let task = tokio::spawn({
            let seen = Arc::clone(&seen);
            async move {
                loop {
                    let Ok((tcp, _)) = listener.accept().await else {
                        return;
                    };
                    let seen = Arc::clone(&seen);
                    tokio::spawn(async move {
                        let service = service_fn(move |req| echo(req, Arc::clone(&seen)));
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(tcp), service)
                            .with_upgrades()
                            .await;
                    });
                }
            }
        });
        Echo { addr, seen, task }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn requests(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    pub fn last(&self) -> Seen {
        self.requests().pop().expect("upstream saw a request")
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type EchoBody = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

fn full(b: impl Into<Bytes>) -> EchoBody {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

async fn echo(
    mut req: Request<Incoming>,
    seen: Arc<Mutex<Vec<Seen>>>,
) -> Result<Response<EchoBody>, std::convert::Infallible> {
    let path = req.uri().path().to_string();
    if path == "/ws" {
        seen.lock().unwrap().push(Seen {
            method: req.method().to_string(),
            uri: req.uri().to_string(),
            headers: req.headers().clone(),
            body: Bytes::new(),
        });
        let key = req
            .headers()
            .get("sec-websocket-key")
            .map(|k| tokio_tungstenite::tungstenite::handshake::derive_accept_key(k.as_bytes()));
        let Some(accept) = key else {
            return Ok(Response::builder()
                .status(400)
                .body(full("not a websocket"))
                .unwrap());
        };
        let protocol = req
            .headers()
            .get("sec-websocket-protocol")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(',').next())
            .map(|p| p.trim().to_string());
        let on_upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            let Ok(upgraded) = on_upgrade.await else {
                return;
            };
            let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
                TokioIo::new(upgraded),
                tokio_tungstenite::tungstenite::protocol::Role::Server,
                None,
            )
            .await;
            while let Some(Ok(msg)) = ws.next().await {
                if msg.is_text() || msg.is_binary() {
                    if ws.send(msg).await.is_err() {
                        break;
                    }
                } else if msg.is_close() {
                    break;
                }
            }
        });
        let mut resp = Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-accept", accept);
        if let Some(p) = protocol.filter(|p| p == "chat") {
            resp = resp.header("sec-websocket-protocol", p);
        }
        return Ok(resp.body(full(Bytes::new())).unwrap());
    }
    if path == "/sse" {
        seen.lock().unwrap().push(Seen {
            method: req.method().to_string(),
            uri: req.uri().to_string(),
            headers: req.headers().clone(),
            body: Bytes::new(),
        });
        let stream = futures_util::stream::unfold(0u32, |n| async move {
            if n >= 50 {
                return None;
            }
            if n > 0 {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            let frame = hyper::body::Frame::data(Bytes::from(format!("data: event {n}\n\n")));
            Some((Ok::<_, std::io::Error>(frame), n + 1))
        });
        let body = BodyExt::boxed(http_body_util::StreamBody::new(stream));
        return Ok(Response::builder()
            .header("content-type", "text/event-stream")
            .header("cache-control", "no-cache")
            .body(body)
            .unwrap());
    }
    if path == "/slow" {
        tokio::time::sleep(Duration::from_secs(30)).await;
    }
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let headers: serde_json::Map<String, Value> = parts
        .headers
        .iter()
        .map(|(k, v)| {
            (
                k.to_string(),
                Value::String(String::from_utf8_lossy(v.as_bytes()).into()),
            )
        })
        .collect();
    let answer = serde_json::json!({
        "method": parts.method.to_string(),
        "uri": parts.uri.to_string(),
        "headers": headers,
        "body_len": body.len(),
    });
    seen.lock().unwrap().push(Seen {
        method: parts.method.to_string(),
        uri: parts.uri.to_string(),
        headers: parts.headers,
        body,
    });
    Ok(Response::builder()
        .header("content-type", "application/json")
        .body(full(answer.to_string()))
        .unwrap())
}

/// A port on 127.0.0.1 where nothing listens.
pub async fn dead_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap().port()
}

/// Opens a WebSocket through the gateway over HTTP/1.1 + TLS.
pub async fn websocket(
    tls: &TlsClient,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<
    (
        tokio_tungstenite::WebSocketStream<TlsStream<TcpStream>>,
        tokio_tungstenite::tungstenite::handshake::client::Response,
    ),
    tokio_tungstenite::tungstenite::Error,
> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let stream = tls.connect(host, &[b"http/1.1"]).await;
    let mut req = format!("wss://{host}{path}").into_client_request()?;
    for (k, v) in headers {
        req.headers_mut().insert(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            http::HeaderValue::from_str(v).unwrap(),
        );
    }
    tokio_tungstenite::client_async(req, stream).await
}

// -------------------------------------------------------------------------------------------------
// Helpers for the transport, auth and browser tests

/// Sends `req` on a fresh HTTP/1.1 connection whose TLS SNI is `sni`, whatever its Host says
/// (for Hosts the dev certificate does not cover, or spelled in odd case).
pub async fn send_with_sni(
    tls: &TlsClient,
    sni: &str,
    req: Request<Full<Bytes>>,
) -> Response<Bytes> {
    let mut sender = tls.h1(sni).await;
    let resp = sender.send_request(req).await.expect("request");
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    Response::from_parts(parts, body)
}

/// GET `path` with Host `host` on a connection whose SNI is `sni`.
pub async fn get_with_sni(
    tls: &TlsClient,
    sni: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Response<Bytes> {
    let mut req = Request::builder()
        .method(Method::GET)
        .uri(path)
        .header("host", host);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(Bytes::new())).expect("valid request");
    send_with_sni(tls, sni, req).await
}

/// GET `path` over a fresh HTTP/2 connection to `host` (`:authority` = `host`).
pub async fn h2_get(
    tls: &TlsClient,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Response<Bytes> {
    let mut sender = tls.h2(host).await;
    let mut req = Request::builder()
        .method(Method::GET)
        .version(http::Version::HTTP_2)
        .uri(format!("https://{host}{path}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = sender
        .send_request(req.body(Full::new(Bytes::new())).expect("valid request"))
        .await
        .expect("h2 request");
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    Response::from_parts(parts, body)
}

/// Writes `request` as raw bytes on a fresh HTTP/1.1 TLS connection with SNI `sni` and returns
/// everything the gateway answered until it closed (or 5 s passed).
pub async fn raw_h1(tls: &TlsClient, sni: &str, request: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tls.connect(sni, &[b"http/1.1"]).await;
    stream.write_all(request).await.expect("write");
    stream.flush().await.expect("flush");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Asserts that `needle` (a token or a piece of one) appears in neither the URI nor any header
/// value of any request the upstream recorded.
pub fn assert_upstream_never_saw(echo: &Echo, needle: &str) {
    assert!(!needle.is_empty());
    for seen in echo.requests() {
        assert!(
            !seen.uri.contains(needle),
            "upstream saw {needle:?} in the URI {}",
            seen.uri
        );
        for (name, value) in &seen.headers {
            let value = String::from_utf8_lossy(value.as_bytes());
            assert!(
                !value.contains(needle),
                "upstream saw {needle:?} in {name}: {value}"
            );
        }
        let body = String::from_utf8_lossy(&seen.body);
        assert!(!body.contains(needle), "upstream saw {needle:?} in a body");
    }
}

/// The value of the `__Host-sandgate` cookie a response sets.
pub fn session_cookie(resp: &Response<Bytes>) -> String {
    resp.headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|v| v.strip_prefix("__Host-sandgate="))
        .map(|v| v.split(';').next().unwrap_or("").to_string())
        .expect("response sets the __Host-sandgate cookie")
}

/// Mints a token valid for a sandbox host and runs the query exchange; returns the cookie value.
pub async fn browser_session(gw: &TestGateway, id: &str, port: u16) -> String {
    let token = gw.token(id, port).await;
    let resp = gw
        .tls()
        .get(
            &sandbox_host(port, id),
            &format!("/?_sandgate_token={token}"),
            &[],
        )
        .await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER, "{:?}", resp.body());
    session_cookie(&resp)
}

// -------------------------------------------------------------------------------------------------
// Helpers for the control-API, process-driver and CLI tests

/// One control-API request with everything under the caller's control (no key, any content
/// type, raw body) against any gateway address; returns the whole response.
pub async fn api_raw(
    tls: &TlsClient,
    key: Option<&str>,
    method: Method,
    path: &str,
    content_type: Option<&str>,
    body: impl Into<Bytes>,
) -> Response<Bytes> {
    let mut req = Request::builder()
        .method(method)
        .uri(format!("https://{BASE}{path}"))
        .header("host", BASE);
    if let Some(key) = key {
        req = req.header("authorization", format!("Bearer {key}"));
    }
    if let Some(ct) = content_type {
        req = req.header("content-type", ct);
    }
    let req = req.body(Full::new(body.into())).expect("valid request");
    tls.send(req).await.expect("api call")
}

/// A JSON control-API call as `key` through `tls` (for gateways not run by [`TestGateway`],
/// such as the real binary); returns the status and the parsed body (`Null` when empty).
pub async fn api_via(
    tls: &TlsClient,
    key: &str,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let resp = match body {
        Some(b) => {
            api_raw(
                tls,
                Some(key),
                method,
                path,
                Some("application/json"),
                b.to_string(),
            )
            .await
        }
        None => api_raw(tls, Some(key), method, path, None, Bytes::new()).await,
    };
    let status = resp.status();
    let value = if resp.body().is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(resp.body())
            .unwrap_or(Value::String(String::from_utf8_lossy(resp.body()).into()))
    };
    (status, value)
}

/// Creates a credential as the bootstrap admin; returns `(id, secret)`.
pub async fn create_credential(gw: &TestGateway, body: Value) -> (String, String) {
    let (status, v) = gw.api(Method::POST, "/v1/credentials", Some(body)).await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    (
        v["id"].as_str().expect("credential id").to_string(),
        v["secret"].as_str().expect("credential secret").to_string(),
    )
}

/// Polls `GET /v1/sandboxes/{id}` (as admin) until its status is one of `want`; panics with the
/// last object seen when `within` passes first.
pub async fn wait_for_status(gw: &TestGateway, id: &str, want: &[&str], within: Duration) -> Value {
    let deadline = std::time::Instant::now() + within;
    loop {
        let (status, v) = gw
            .api(Method::GET, &format!("/v1/sandboxes/{id}"), None)
            .await;
        assert_eq!(status, StatusCode::OK, "{v}");
        if want.iter().any(|w| v["status"] == *w) {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "sandbox {id} did not reach {want:?} within {within:?}: {v}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// True while process `pid` exists and is not a zombie.
pub fn process_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name, which may itself hold spaces.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// Pids of the live processes whose environment carries `SANDGATE_SANDBOX_ID=<id>`: every
/// process a sandbox started (its children inherit the variable).
pub fn sandbox_pids(id: &str) -> Vec<i32> {
    let marker = format!("SANDGATE_SANDBOX_ID={id}");
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ")).is_ok_and(|env| {
                env.split(|b| *b == 0)
                    .any(|entry| entry == marker.as_bytes())
            })
        })
        .filter(|pid| process_alive(*pid))
        .collect()
}

/// Waits until no process of sandbox `id` (and not `pid`, if given) is alive; panics after
/// `within`.
pub async fn wait_processes_gone(id: &str, pid: Option<i32>, within: Duration) {
    let deadline = std::time::Instant::now() + within;
    loop {
        let left = sandbox_pids(id);
        let leader = pid.is_some_and(process_alive);
        if left.is_empty() && !leader {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "processes of sandbox {id} still alive after {within:?}: {left:?} (leader {pid:?} alive: {leader})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A free TCP port on 127.0.0.1 (bound then released), for configs of the real binary.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}
