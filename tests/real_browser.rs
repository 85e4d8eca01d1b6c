//! A real browser (headless Chromium driven over WebDriver by chromedriver) against a real
//! sandbox app served through sandgate: the link exchange, assets and a WebSocket over the
//! session cookie, the clean address bar, sibling-sandbox isolation, and the expired-link page.
//!
//! Needs `/usr/bin/chromium` and `/usr/bin/chromedriver` (Debian `chromium`,
//! `chromium-driver`; `.ci/run` installs them). Set `SANDGATE_SKIP_BROWSER=1` to skip.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use common::*;
use futures_util::{SinkExt, StreamExt};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use tokio::net::TcpListener;

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

const INDEX: &str = r#"<!doctype html>
<html><head><meta charset="utf-8"><title>loading</title><script src="/app.js"></script></head>
<body><h1>sandbox app</h1><p id="status">loading</p></body></html>"#;

const APP_JS: &str = r#"
window.addEventListener('load', async () => {
  const status = document.getElementById('status');
  try {
    const data = await (await fetch('/data')).json();
    const ws = new WebSocket('wss://' + location.host + '/ws');
    ws.onopen = () => ws.send('ping ' + data.app);
    ws.onmessage = (e) => { status.textContent = 'ws ok: ' + e.data; document.title = 'ready'; };
    ws.onerror = () => { status.textContent = 'ws failed'; document.title = 'failed'; };
  } catch (e) {
    status.textContent = 'error ' + e; document.title = 'failed';
  }
});
"#;

/// What the app saw: (path, Origin header) of each request.
type Log = Arc<Mutex<Vec<(String, Option<String>)>>>;

/// A small web app: an HTML page, a script, a JSON endpoint and a WebSocket echo.
async fn start_app(name: &'static str) -> (SocketAddr, Log) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let log: Log = Arc::default();
    let seen = Arc::clone(&log);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let seen = Arc::clone(&seen);
            tokio::spawn(async move {
                let svc = service_fn(move |req| app(req, name, Arc::clone(&seen)));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .with_upgrades()
                    .await;
            });
        }
    });
    (addr, log)
}

async fn app(
    mut req: Request<Incoming>,
    name: &'static str,
    log: Log,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    let origin = req
        .headers()
        .get("origin")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let path = req.uri().path().to_string();
    log.lock().unwrap().push((path.clone(), origin));
    let ok = |ct: &str, body: String| {
        Ok(Response::builder()
            .header("content-type", ct)
            .body(Full::new(Bytes::from(body)))
            .unwrap())
    };
    match path.as_str() {
        "/" => ok("text/html; charset=utf-8", INDEX.to_string()),
        "/app.js" => ok("text/javascript", APP_JS.to_string()),
        "/data" => ok("application/json", json!({ "app": name }).to_string()),
        "/ws" => {
            let key = req.headers().get("sec-websocket-key").cloned();
            let Some(key) = key else {
                return Ok(Response::builder()
                    .status(400)
                    .body(Full::default())
                    .unwrap());
            };
            let accept =
                tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
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
                    if msg.is_text() && ws.send(msg).await.is_err() {
                        break;
                    }
                }
            });
            Ok(Response::builder()
                .status(StatusCode::SWITCHING_PROTOCOLS)
                .header("connection", "upgrade")
                .header("upgrade", "websocket")
                .header("sec-websocket-accept", accept)
                .body(Full::default())
                .unwrap())
        }
        _ => Ok(Response::builder()
            .status(404)
            .body(Full::default())
            .unwrap()),
    }
}

/// A chromedriver process and one browser session, ended on drop.
struct Browser {
    driver: tokio::process::Child,
    base: String,
    session: String,
    http: Client<HttpConnector, Full<Bytes>>,
    _profile: tempfile::TempDir,
}

impl Browser {
    async fn start() -> Browser {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let driver = tokio::process::Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("chromedriver starts");
        let base = format!("http://127.0.0.1:{port}");
        let http = Client::builder(TokioExecutor::new()).build_http();
        let profile = tempfile::tempdir().unwrap();
        let mut b = Browser {
            driver,
            base,
            session: String::new(),
            http,
            _profile: profile,
        };
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "acceptInsecureCerts": true,
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    "--disable-dev-shm-usage", "--window-size=1024,768",
                    format!("--user-data-dir={}", b._profile.path().display()),
                ]
            }
        }}});
        let v = b.call(Method::POST, "/session", Some(caps)).await;
        b.session = v["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {v}"))
            .to_string();
        b
    }

    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> Value {
        let req = Request::builder()
            .method(method)
            .uri(format!("{}{}", self.base, path))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(
                body.map(|b| b.to_string()).unwrap_or_default(),
            )))
            .unwrap();
        let resp = self.http.request(req).await.expect("webdriver call");
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice(&bytes).unwrap_or(Value::Null)
    }

    async fn session_call(&self, method: Method, path: &str, body: Option<Value>) -> Value {
        self.call(method, &format!("/session/{}{}", self.session, path), body)
            .await
    }

    async fn open(&self, url: &str) {
        self.session_call(Method::POST, "/url", Some(json!({ "url": url })))
            .await;
    }

    async fn url(&self) -> String {
        self.session_call(Method::GET, "/url", None).await["value"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    async fn eval(&self, script: &str) -> Value {
        self.session_call(
            Method::POST,
            "/execute/async",
            Some(json!({ "script": script, "args": [] })),
        )
        .await["value"]
            .clone()
    }

    async fn source(&self) -> String {
        self.session_call(Method::GET, "/source", None).await["value"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    async fn wait_title(&self, want: &[&str]) -> String {
        for _ in 0..100 {
            let t = self.session_call(Method::GET, "/title", None).await["value"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            if want.contains(&t.as_str()) {
                return t;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "the page never reached a title in {want:?}: {}",
            self.source().await
        );
    }

    async fn screenshot(&self, name: &str) -> std::path::PathBuf {
        let v = self.session_call(Method::GET, "/screenshot", None).await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(v["value"].as_str().unwrap_or_default())
            .expect("screenshot is base64");
        assert!(png.starts_with(b"\x89PNG"), "not a PNG");
        let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("browser");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, png).unwrap();
        path
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.start_kill();
    }
}

/// The URL the API returned, with the port the test gateway really listens on.
fn link(minted: &Value, gw: &TestGateway) -> String {
    let url = minted["url"].as_str().unwrap();
    let mut u = url::Url::parse(url).unwrap();
    u.set_port(Some(gw.addr.port())).unwrap();
    u.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_browser_uses_a_sandbox_through_the_gateway() {
    if std::env::var_os("SANDGATE_SKIP_BROWSER").is_some() {
        eprintln!("SANDGATE_SKIP_BROWSER is set: skipped");
        return;
    }
    assert!(
        std::path::Path::new(CHROMIUM).exists() && std::path::Path::new(CHROMEDRIVER).exists(),
        "install Debian's chromium and chromium-driver (or set SANDGATE_SKIP_BROWSER=1)"
    );
    let gw = TestGateway::start_with("[tokens]\nleeway_secs = 0\n").await;
    let (a_addr, a_log) = start_app("a").await;
    let (b_addr, _b_log) = start_app("b").await;
    let a = gw.create_sandbox(&[a_addr.port()]).await;
    let b = gw.create_sandbox(&[b_addr.port()]).await;
    let browser = Browser::start().await;

    // Open the link: exchange, clean address bar, assets and a WebSocket over the cookie.
    let link_a = link(&gw.mint(&a, a_addr.port(), Value::Null).await, &gw);
    browser.open(&link_a).await;
    assert_eq!(
        browser.wait_title(&["ready", "failed"]).await,
        "ready",
        "{}",
        browser.source().await
    );
    let current = browser.url().await;
    assert!(
        !current.contains("_sandgate_token"),
        "the token stayed in the address bar: {current}"
    );
    assert!(current.starts_with(&format!("https://{}:", sandbox_host(a_addr.port(), &a))));
    assert!(browser.source().await.contains("ws ok: ping a"));
    let shot = browser.screenshot("sandbox-app.png").await;
    eprintln!("screenshot: {}", shot.display());
    let seen_a = a_log.lock().unwrap().len();
    assert!(
        seen_a >= 4,
        "page, script, data and websocket reached the app: {seen_a}"
    );

    // From a sibling sandbox's page, the first sandbox's session cannot be used.
    let link_b = link(&gw.mint(&b, b_addr.port(), Value::Null).await, &gw);
    browser.open(&link_b).await;
    assert_eq!(browser.wait_title(&["ready", "failed"]).await, "ready");
    let origin_b = format!(
        "https://{}:{}",
        sandbox_host(b_addr.port(), &b),
        gw.addr.port()
    );
    let a_base = format!(
        "https://{}:{}",
        sandbox_host(a_addr.port(), &a),
        gw.addr.port()
    );
    let before = a_log.lock().unwrap().len();
    let verdict = browser
        .eval(&format!(
            r#"const done = arguments[arguments.length - 1];
            const out = {{}};
            fetch('{a_base}/data', {{credentials: 'include'}})
              .then(r => {{ out.fetch = 'status ' + r.status; }}, e => {{ out.fetch = 'blocked'; }})
              .then(() => {{
                const ws = new WebSocket('{wss}/ws');
                ws.onopen = () => {{ out.ws = 'open'; done(out); }};
                ws.onerror = () => {{ out.ws = 'refused'; done(out); }};
              }});"#,
            wss = a_base.replacen("https://", "wss://", 1)
        ))
        .await;
    assert_eq!(verdict["ws"], "refused", "{verdict}");
    assert_ne!(verdict["fetch"], "status 200", "{verdict}");
    let from_b: Vec<_> = a_log.lock().unwrap()[before..]
        .iter()
        .filter(|(_, o)| o.as_deref() == Some(origin_b.as_str()))
        .cloned()
        .collect();
    assert!(
        from_b.is_empty(),
        "app a saw requests from b's origin: {from_b:?}"
    );

    // An expired link shows a page that says so and what to do.
    let short = gw.mint(&a, a_addr.port(), json!({ "ttl_secs": 1 })).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    browser.open(&link(&short, &gw)).await;
    let page = browser.source().await;
    assert!(page.contains("expired"), "{page}");
    assert!(page.contains("new link"), "{page}");
    browser.screenshot("expired-link.png").await;
}
