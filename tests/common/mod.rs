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
        // This test binary embeds the gateway; sandboxes are launched by the real one.
        sandgate::sandbox::launch::set_launcher(env!("CARGO_BIN_EXE_sandgate"));
        let toml = format!(
            "[gateway]\nbase_domain = \"{BASE}\"\nshutdown_grace_secs = 2\n[store]\ndata_dir = \"data\"\n{extra_toml}"
        );
        Self::start_from_toml(dir, &toml).await
    }

    /// Writes `toml` as the config in `dir`, opens the gateway and serves it on 127.0.0.1:0.
    async fn start_from_toml(dir: &Path, toml: &str) -> TestGateway {
        let config_path = dir.join("sandgate.toml");
        std::fs::write(&config_path, toml).expect("write config");
        let config = Config::load(&config_path).expect("config");
        let loopback: std::net::SocketAddr = "127.0.0.1:0".parse().expect("addr");
        let listeners = Listeners::bind(loopback, loopback, config.gateway.workers)
            .await
            .expect("bind");
        let addr = listeners.gateway_addr().expect("addr");
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
            // Dropped without `stop` (a failed test): its isolated sandboxes must not outlive
            // it on the machine.
            if let Some(driver) = &self.gw.driver {
                driver.kill_all_now();
            }
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

// -------------------------------------------------------------------------------------------------
// Helpers for the attack and limit tests

impl TestGateway {
    /// Starts with a whole `[gateway]` table of its own: `base_domain` is [`BASE`], followed by
    /// the `gateway_toml` lines (e.g. `max_body_bytes = 1024`); `extra_toml` is appended after
    /// the `[store]` table as with [`TestGateway::start_with`].
    pub async fn start_with_gateway(gateway_toml: &str, extra_toml: &str) -> TestGateway {
        sandgate::telemetry::init_tracing("warn", false);
        sandgate::sandbox::launch::set_launcher(env!("CARGO_BIN_EXE_sandgate"));
        let tmp = tempfile::tempdir().expect("temp dir");
        let toml = format!(
            "[gateway]\nbase_domain = \"{BASE}\"\n{gateway_toml}\n[store]\ndata_dir = \"data\"\n{extra_toml}"
        );
        let mut g = Self::start_from_toml(tmp.path(), &toml).await;
        g._tmp = Some(tmp);
        g
    }

    /// [`TestGateway::start_with_gateway`] on an existing data dir (restart tests that change
    /// a `[gateway]` key between runs).
    pub async fn start_in_with_gateway(dir: &Path, gateway_toml: &str) -> TestGateway {
        sandgate::telemetry::init_tracing("warn", false);
        let toml = format!(
            "[gateway]\nbase_domain = \"{BASE}\"\nshutdown_grace_secs = 2\n{gateway_toml}\n[store]\ndata_dir = \"data\"\n"
        );
        Self::start_from_toml(dir, &toml).await
    }

    /// Waits until the gateway holds no client connection (the harness's own API calls close
    /// theirs asynchronously); panics after 5 s.
    pub async fn wait_idle(&self) {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while self.gw.metrics.open_connections.get() != 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "{} client connections still open",
                self.gw.metrics.open_connections.get()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// What the gateway answered on a raw connection.
#[derive(Debug)]
pub struct RawAnswer {
    /// Everything received, lossily decoded.
    pub text: String,
    /// True when the gateway closed the connection (EOF or reset) within the wait.
    pub closed: bool,
}

impl RawAnswer {
    /// The status codes of every response in the answer, in order.
    pub fn statuses(&self) -> Vec<u16> {
        // A status line may follow the previous response's body without a line break.
        self.text
            .split("HTTP/1.1 ")
            .skip(1)
            .filter(|rest| rest.as_bytes().get(3) == Some(&b' '))
            .filter_map(|rest| rest.get(..3)?.parse().ok())
            .collect()
    }

    /// The first status code, 0 when there was no response at all.
    pub fn status(&self) -> u16 {
        self.statuses().first().copied().unwrap_or(0)
    }
}

/// Writes `request` on a fresh HTTP/1.1 TLS connection with SNI `sni` and reads until the
/// gateway closes it or `wait` passes.
pub async fn raw_exchange(tls: &TlsClient, sni: &str, request: &[u8], wait: Duration) -> RawAnswer {
    use tokio::io::AsyncWriteExt;
    let mut stream = tls.connect(sni, &[b"http/1.1"]).await;
    // The gateway may answer and close before it has read everything; that is not an error.
    let _ = stream.write_all(request).await;
    let _ = stream.flush().await;
    let mut out = Vec::new();
    let closed = read_until_closed(&mut stream, &mut out, wait).await;
    RawAnswer {
        text: String::from_utf8_lossy(&out).into_owned(),
        closed,
    }
}

/// Reads into `out` until EOF or a read error (true) or until `wait` passes (false).
pub async fn read_until_closed<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
    out: &mut Vec<u8>,
    wait: Duration,
) -> bool {
    use tokio::io::AsyncReadExt;
    let deadline = tokio::time::Instant::now() + wait;
    let mut buf = [0u8; 16 * 1024];
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
}

// -------------------------------------------------------------------------------------------------
// Hand-made HTTP/2 frames, for input a client library refuses to send

pub mod h2raw {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    pub const DATA: u8 = 0x0;
    pub const HEADERS: u8 = 0x1;
    pub const RST_STREAM: u8 = 0x3;
    pub const SETTINGS: u8 = 0x4;
    pub const PING: u8 = 0x6;
    pub const GOAWAY: u8 = 0x7;
    pub const WINDOW_UPDATE: u8 = 0x8;
    pub const CONTINUATION: u8 = 0x9;
    pub const END_STREAM: u8 = 0x1;
    pub const ACK: u8 = 0x1;
    pub const END_HEADERS: u8 = 0x4;
    pub const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;

    /// One frame as received.
    #[derive(Debug, Clone)]
    pub struct Frame {
        pub kind: u8,
        pub flags: u8,
        pub stream: u32,
        pub payload: Vec<u8>,
    }

    /// The bytes of one frame.
    pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        assert!(len < 1 << 24);
        let mut out = Vec::with_capacity(9 + len);
        out.extend_from_slice(&(len as u32).to_be_bytes()[1..]);
        out.push(kind);
        out.push(flags);
        out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    /// An HPACK integer with an `n`-bit prefix; `first` holds the bits above the prefix.
    fn int(out: &mut Vec<u8>, first: u8, n: u8, mut value: usize) {
        let max = (1usize << n) - 1;
        if value < max {
            out.push(first | value as u8);
            return;
        }
        out.push(first | max as u8);
        value -= max;
        while value >= 128 {
            out.push((value % 128) as u8 | 0x80);
            value /= 128;
        }
        out.push(value as u8);
    }

    /// A header block of "literal header field without indexing — new name" entries
    /// (RFC 7541 §6.2.2), no Huffman: every byte is exactly what the test wrote.
    pub fn hpack(fields: &[(&str, &str)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (name, value) in fields {
            out.push(0x00);
            int(&mut out, 0x00, 7, name.len());
            out.extend_from_slice(name.as_bytes());
            int(&mut out, 0x00, 7, value.len());
            out.extend_from_slice(value.as_bytes());
        }
        out
    }

    /// The `:status` of a response header block (its first field, as the server's encoder
    /// writes it). Handles the static-table statuses and literal ones with Huffman digits.
    pub fn status(block: &[u8]) -> Option<u16> {
        let first = *block.first()?;
        if first & 0x80 != 0 {
            return match first & 0x7f {
                8 => Some(200),
                9 => Some(204),
                10 => Some(206),
                11 => Some(304),
                12 => Some(400),
                13 => Some(404),
                14 => Some(500),
                _ => None,
            };
        }
        // Literal with a name index: incremental indexing (01), without (0000), never (0001).
        let name_index = if first & 0xc0 == 0x40 {
            first & 0x3f
        } else {
            first & 0x0f
        };
        if !(8..=14).contains(&name_index) {
            return None;
        }
        let len_byte = *block.get(1)?;
        let len = usize::from(len_byte & 0x7f);
        let value = block.get(2..2 + len)?;
        let digits = if len_byte & 0x80 != 0 {
            huffman_digits(value)?
        } else {
            String::from_utf8(value.to_vec()).ok()?
        };
        digits.parse().ok()
    }

    /// Decodes a Huffman string of ASCII digits (RFC 7541 Appendix B: '0'–'2' are 5 bits,
    /// '3'–'9' 6 bits).
    fn huffman_digits(bytes: &[u8]) -> Option<String> {
        let bits: Vec<u8> = bytes
            .iter()
            .flat_map(|b| (0..8).rev().map(move |i| (b >> i) & 1))
            .collect();
        let take = |at: usize, n: usize| -> Option<u8> {
            bits.get(at..at + n)
                .map(|s| s.iter().fold(0u8, |acc, b| (acc << 1) | b))
        };
        let mut out = String::new();
        let mut at = 0;
        while at < bits.len() {
            // The rest is padding (all ones, fewer than 8 bits).
            if bits.len() - at < 8 && bits[at..].iter().all(|b| *b == 1) {
                break;
            }
            let five = take(at, 5)?;
            if five <= 2 {
                out.push(char::from(b'0' + five));
                at += 5;
                continue;
            }
            let six = take(at, 6)?;
            if (0b011001..=0b011111).contains(&six) {
                out.push(char::from(b'0' + 3 + (six - 0b011001)));
                at += 6;
                continue;
            }
            return None;
        }
        Some(out)
    }

    /// A raw HTTP/2 connection over TLS (ALPN h2) that has sent the preface and its SETTINGS.
    pub struct Conn {
        pub stream: TlsStream<TcpStream>,
        buf: Vec<u8>,
        /// The gateway closed the connection (EOF or a read error).
        pub closed: bool,
    }

    impl Conn {
        pub async fn open(tls: &TlsClient, sni: &str) -> Conn {
            let mut stream = tls.connect(sni, &[b"h2"]).await;
            assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
            stream
                .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
                .await
                .unwrap();
            stream.write_all(&frame(SETTINGS, 0, 0, &[])).await.unwrap();
            stream.flush().await.unwrap();
            Conn {
                stream,
                buf: Vec::new(),
                closed: false,
            }
        }

        /// Writes raw bytes; false when the gateway has already closed the connection.
        pub async fn write(&mut self, bytes: &[u8]) -> bool {
            self.stream.write_all(bytes).await.is_ok() && self.stream.flush().await.is_ok()
        }

        pub async fn send(&mut self, kind: u8, flags: u8, stream: u32, payload: &[u8]) -> bool {
            self.write(&frame(kind, flags, stream, payload)).await
        }

        /// A complete HEADERS frame carrying `fields`.
        pub async fn headers(&mut self, stream: u32, fields: &[(&str, &str)], end: bool) -> bool {
            let flags = END_HEADERS | if end { END_STREAM } else { 0 };
            self.send(HEADERS, flags, stream, &hpack(fields)).await
        }

        /// The next frame, acknowledging the server's SETTINGS and PINGs on the way; `None`
        /// when the connection closed or nothing arrived within `wait`.
        pub async fn next(&mut self, wait: Duration) -> Option<Frame> {
            let deadline = tokio::time::Instant::now() + wait;
            loop {
                if self.buf.len() >= 9 {
                    let len = (usize::from(self.buf[0]) << 16)
                        | (usize::from(self.buf[1]) << 8)
                        | usize::from(self.buf[2]);
                    if self.buf.len() >= 9 + len {
                        let f = Frame {
                            kind: self.buf[3],
                            flags: self.buf[4],
                            stream: u32::from_be_bytes([
                                self.buf[5],
                                self.buf[6],
                                self.buf[7],
                                self.buf[8],
                            ]) & 0x7fff_ffff,
                            payload: self.buf[9..9 + len].to_vec(),
                        };
                        self.buf.drain(..9 + len);
                        if f.kind == SETTINGS && f.flags & ACK == 0 {
                            let _ = self.send(SETTINGS, ACK, 0, &[]).await;
                        }
                        if f.kind == PING && f.flags & ACK == 0 {
                            let payload = f.payload.clone();
                            let _ = self.send(PING, ACK, 0, &payload).await;
                        }
                        return Some(f);
                    }
                }
                let mut chunk = [0u8; 16 * 1024];
                match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                    Ok(Ok(n)) if n > 0 => self.buf.extend_from_slice(&chunk[..n]),
                    Ok(_) => {
                        self.closed = true;
                        return None;
                    }
                    Err(_) => return None,
                }
            }
        }

        /// Reads frames until one says how `stream` ended.
        pub async fn outcome(&mut self, stream: u32, wait: Duration) -> Outcome {
            let deadline = tokio::time::Instant::now() + wait;
            loop {
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                let Some(f) = self.next(left).await else {
                    return if self.closed {
                        Outcome::Closed
                    } else {
                        Outcome::TimedOut
                    };
                };
                let code =
                    |at: usize| u32::from_be_bytes(f.payload[at..at + 4].try_into().unwrap());
                match f.kind {
                    HEADERS if f.stream == stream => {
                        return status(&f.payload).map_or(Outcome::UnknownStatus, Outcome::Status);
                    }
                    RST_STREAM if f.stream == stream => return Outcome::Reset(code(0)),
                    GOAWAY => return Outcome::GoAway(code(4)),
                    _ => {}
                }
            }
        }
    }

    /// How a stream ended, as far as the client can tell.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Outcome {
        /// A response with this status.
        Status(u16),
        /// A response whose status the tests' small HPACK decoder cannot read.
        UnknownStatus,
        /// RST_STREAM with this error code.
        Reset(u32),
        /// GOAWAY with this error code.
        GoAway(u32),
        /// The connection closed.
        Closed,
        /// Nothing within the wait.
        TimedOut,
    }

    impl Outcome {
        /// The stream or the connection was refused with an error (not answered, not hung).
        pub fn is_error(self) -> bool {
            matches!(
                self,
                Outcome::Reset(_) | Outcome::GoAway(_) | Outcome::Closed
            )
        }
    }
}
