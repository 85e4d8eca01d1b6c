//! Every protocol the gateway carries: WebSocket (both token transports and subprotocol
//! negotiation), HTTP/2 to an HTTP/1.1 upstream, server-sent events, large streamed uploads,
//! refused upgrades, `h2c`, and the telemetry listener.
#![allow(clippy::unwrap_used)] // helpers here are test code too

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use futures_util::{SinkExt, StreamExt};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;

/// The path and query of a request target, whatever its form.
fn path_of(uri: &str) -> String {
    let uri: http::Uri = uri.parse().unwrap();
    uri.path_and_query()
        .map(|pq| pq.to_string())
        .unwrap_or_default()
}

#[tokio::test]
async fn websocket_echo_with_the_header_token() {
    let echo = Echo::start().await;
    let gw = TestGateway::start().await;
    let port = echo.port();
    let id = gw.create_sandbox(&[port]).await;
    let host = sandbox_host(port, &id);
    let t = gw.token(&id, port).await;

    let (mut ws, resp) = websocket(&gw.tls(), &host, "/ws", &[("x-sandgate-token", &t)])
        .await
        .expect("websocket through the gateway");
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);

    ws.send(Message::text("hello over tls")).await.unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::text("hello over tls")
    );
    let binary: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    ws.send(Message::binary(binary.clone())).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::binary(binary));
    ws.send(Message::text("again")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("again"));
    ws.close(None).await.unwrap();

    let seen = echo.last();
    assert_eq!(path_of(&seen.uri), "/ws");
    assert_eq!(seen.headers["host"], host.as_str());
    assert!(seen.headers.get("x-sandgate-token").is_none());
    assert_upstream_never_saw(&echo, t.rsplit('.').next().unwrap());
}

#[tokio::test]
async fn websocket_subprotocol_token_and_the_marker() {
    let echo = Echo::start().await;
    let gw = TestGateway::start().await;
    let port = echo.port();
    let id = gw.create_sandbox(&[port]).await;
    let host = sandbox_host(port, &id);
    let tls = gw.tls();
    let t = gw.token(&id, port).await;

    // The upstream selects nothing: the gateway's 101 selects `sandgate`, as a browser needs.
    let protos = format!("sandgate.token.{t}, sandgate");
    let (mut ws, resp) = websocket(&tls, &host, "/ws", &[("sec-websocket-protocol", &protos)])
        .await
        .expect("websocket with the subprotocol token");
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    assert_eq!(resp.headers()["sec-websocket-protocol"], "sandgate");
    ws.send(Message::text("ping")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("ping"));
    drop(ws);
    let seen = echo.last();
    let offered: Vec<_> = seen
        .headers
        .get_all("sec-websocket-protocol")
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .collect();
    assert!(
        offered.iter().all(|v| !v.contains("sandgate")),
        "the upstream saw our subprotocols: {offered:?}"
    );

    // The app's own protocol offered too: the upstream selects it and the gateway passes that.
    let protos = format!("sandgate.token.{t}, sandgate, chat");
    let (mut ws, resp) = websocket(&tls, &host, "/ws", &[("sec-websocket-protocol", &protos)])
        .await
        .expect("websocket with the app's subprotocol");
    assert_eq!(resp.headers()["sec-websocket-protocol"], "chat");
    let protocols: Vec<_> = resp
        .headers()
        .get_all("sec-websocket-protocol")
        .iter()
        .collect();
    assert_eq!(protocols.len(), 1, "exactly one protocol is selected");
    ws.send(Message::text("chat message")).await.unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::text("chat message")
    );
    drop(ws);
    let seen = echo.last();
    let offered: Vec<_> = seen
        .headers
        .get_all("sec-websocket-protocol")
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .collect();
    assert_eq!(
        offered.join(","),
        "chat",
        "only the app's protocol goes upstream"
    );
    assert_upstream_never_saw(&echo, "sandgate.token.");
    assert_upstream_never_saw(&echo, t.rsplit('.').next().unwrap());
}

/// An origin server is sent origin-form targets (RFC 9112 §3.2.1): `/ws`, never
/// `http://127.0.0.1:<port>/ws`, which apps that route on the raw target do not recognise.
#[tokio::test]
async fn upgrade_requests_reach_the_upstream_in_origin_form() {
    let echo = Echo::start().await;
    let gw = TestGateway::start().await;
    let port = echo.port();
    let id = gw.create_sandbox(&[port]).await;
    let host = sandbox_host(port, &id);
    let t = gw.token(&id, port).await;

    let (ws, _) = websocket(&gw.tls(), &host, "/ws?room=1", &[("x-sandgate-token", &t)])
        .await
        .expect("websocket through the gateway");
    drop(ws);
    assert_eq!(echo.last().uri, "/ws?room=1");

    // An upgrade the upstream refuses goes the same way.
    let mut sender = gw.tls().h1(&host).await;
    let req = Request::builder()
        .uri("/plain?a=1")
        .header("host", &host)
        .header("x-sandgate-token", &t)
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(echo.last().uri, "/plain?a=1");
}

#[tokio::test]
async fn http2_reaches_an_http1_upstream_with_host_from_authority() {
    let echo = Echo::start().await;
    let gw = TestGateway::start().await;
    let port = echo.port();
    let id = gw.create_sandbox(&[port]).await;
    let host = sandbox_host(port, &id);
    let t = gw.token(&id, port).await;

    let resp = h2_get(&gw.tls(), &host, "/h2?x=1", &[("x-sandgate-token", &t)]).await;
    assert_eq!(resp.status(), StatusCode::OK, "{:?}", resp.body());
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let seen = echo.last();
    assert_eq!(seen.uri, "/h2?x=1");
    assert_eq!(
        seen.headers["host"],
        host.as_str(),
        "Host comes from :authority"
    );
    assert_eq!(seen.headers["x-forwarded-host"], host.as_str());
    assert!(seen.headers.get("x-sandgate-token").is_none());

    // Many streams at once on one connection.
    let sender = gw.tls().h2(&host).await;
    let n = 16;
    let requests = (0..n).map(|i| {
        let mut sender = sender.clone();
        let host = host.clone();
        let t = t.clone();
        async move {
            let req = Request::builder()
                .method(if i % 2 == 0 {
                    Method::PUT
                } else {
                    Method::POST
                })
                .version(http::Version::HTTP_2)
                .uri(format!("https://{host}/stream/{i}"))
                .header("x-sandgate-token", &t)
                .body(Full::new(Bytes::from(format!("body {i}"))))
                .unwrap();
            let resp = sender.send_request(req).await.expect("h2 stream");
            let status = resp.status();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            (i, status, serde_json::from_slice::<Value>(&body).unwrap())
        }
    });
    let results = futures_util::future::join_all(requests).await;
    for (i, status, body) in results {
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["uri"], format!("/stream/{i}"));
        assert_eq!(body["headers"]["host"], host.as_str());
        assert_eq!(body["method"], if i % 2 == 0 { "PUT" } else { "POST" });
        assert_eq!(body["body_len"], format!("body {i}").len());
    }
    let mut uris: Vec<_> = echo
        .requests()
        .into_iter()
        .filter(|s| s.uri.starts_with("/stream/"))
        .map(|s| s.uri)
        .collect();
    uris.sort();
    uris.dedup();
    assert_eq!(uris.len(), n);
}

#[tokio::test]
async fn server_sent_events_stream_as_they_happen() {
    let echo = Echo::start().await;
    let gw = TestGateway::start().await;
    let port = echo.port();
    let id = gw.create_sandbox(&[port]).await;
    let host = sandbox_host(port, &id);
    let t = gw.token(&id, port).await;

    let mut sender = gw.tls().h1(&host).await;
    let req = Request::builder()
        .uri("/sse")
        .header("host", &host)
        .header("accept", "text/event-stream")
        .header("x-sandgate-token", &t)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let start = Instant::now();
    let resp = tokio::time::timeout(Duration::from_secs(1), sender.send_request(req))
        .await
        .expect("response headers come at once")
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.into_body();

    // The stream lasts 10 s; seeing its first events within a second proves it is streamed.
    let mut text = String::new();
    for want in ["data: event 0", "data: event 1"] {
        while !text.contains(want) {
            let frame = tokio::time::timeout(Duration::from_secs(1), body.frame())
                .await
                .unwrap_or_else(|_| panic!("no `{want}` within 1 s; got {text:?}"))
                .expect("the stream is still open")
                .unwrap();
            if let Some(data) = frame.data_ref() {
                text.push_str(std::str::from_utf8(data).unwrap());
            }
        }
    }
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
}

/// Reads `/proc/self/status` VmRSS in bytes.
fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .expect("VmRSS line");
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb * 1024
}

/// An upstream that counts request bodies as they stream, without keeping them, and answers
/// `{"body_len": n}`.
async fn counting_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = service_fn(|req: Request<Incoming>| async move {
                    let mut body = req.into_body();
                    let mut len = 0u64;
                    while let Some(frame) = body.frame().await {
                        match frame {
                            Ok(frame) => {
                                len += frame.data_ref().map_or(0, |d| d.len() as u64);
                            }
                            Err(_) => break,
                        }
                    }
                    Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from(
                        json!({ "body_len": len }).to_string(),
                    ))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_large_upload_streams_in_bounded_memory() {
    const CHUNK: usize = 1024 * 1024;
    const CHUNKS: u64 = 256;
    const TOTAL: u64 = CHUNK as u64 * CHUNKS;

    let upstream = counting_upstream().await;
    let gw = TestGateway::start().await;
    let port = upstream.port();
    let id = gw.create_sandbox(&[port]).await;
    let host = sandbox_host(port, &id);
    let t = gw.token(&id, port).await;

    let tls = gw.tls().connect(&host, &[b"http/1.1"]).await;
    type Chunks =
        StreamBody<futures_util::stream::BoxStream<'static, Result<Frame<Bytes>, Infallible>>>;
    let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, Chunks>(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);

    // The body is made as it is sent: one 1 MiB chunk, shared, sent 256 times.
    let chunk = Bytes::from(vec![0x5a; CHUNK]);
    let sent = Arc::new(AtomicU64::new(0));
    let stream = futures_util::stream::iter(0..CHUNKS).map({
        let sent = Arc::clone(&sent);
        move |_| {
            sent.fetch_add(CHUNK as u64, Ordering::Relaxed);
            Ok(Frame::data(chunk.clone()))
        }
    });
    let body: Chunks = StreamBody::new(Box::pin(stream));

    let before = rss_bytes();
    let peak = Arc::new(AtomicU64::new(before));
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = std::thread::spawn({
        let peak = Arc::clone(&peak);
        let sampling = Arc::clone(&sampling);
        move || {
            while sampling.load(Ordering::Relaxed) {
                peak.fetch_max(rss_bytes(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    });

    let start = Instant::now();
    let req = Request::builder()
        .method(Method::POST)
        .uri("/upload")
        .header("host", &host)
        .header("x-sandgate-token", &t)
        .header("content-type", "application/octet-stream")
        .body(body)
        .unwrap();
    let resp = sender.send_request(req).await.expect("upload");
    let status = resp.status();
    let answer = resp.into_body().collect().await.unwrap().to_bytes();
    sampling.store(false, Ordering::Relaxed);
    sampler.join().unwrap();
    let elapsed = start.elapsed();

    assert_eq!(status, StatusCode::OK, "{answer:?}");
    let answer: Value = serde_json::from_slice(&answer).unwrap();
    assert_eq!(answer["body_len"], TOTAL, "the upstream got the whole body");
    assert_eq!(sent.load(Ordering::Relaxed), TOTAL);
    let growth = peak.load(Ordering::Relaxed).saturating_sub(before);
    assert!(
        growth < 64 * 1024 * 1024,
        "RSS grew by {} MiB while streaming {} MiB",
        growth / (1024 * 1024),
        TOTAL / (1024 * 1024)
    );
    eprintln!(
        "uploaded {} MiB in {elapsed:?}; RSS grew {} MiB",
        TOTAL / (1024 * 1024),
        growth / (1024 * 1024)
    );
}

#[tokio::test]
async fn an_upgrade_refused_by_the_upstream_is_an_ordinary_response() {
    let echo = Echo::start().await;
    let gw = TestGateway::start().await;
    let port = echo.port();
    let id = gw.create_sandbox(&[port]).await;
    let host = sandbox_host(port, &id);
    let t = gw.token(&id, port).await;

    let mut sender = gw.tls().h1(&host).await;
    let req = Request::builder()
        .uri("/plain")
        .header("host", &host)
        .header("x-sandgate-token", &t)
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let body: Value = serde_json::from_slice(&body).expect("the upstream's JSON answer");
    assert_eq!(path_of(body["uri"].as_str().unwrap()), "/plain");
    assert_eq!(
        echo.last().headers["upgrade"],
        "websocket",
        "the WebSocket upgrade was asked of the upstream"
    );

    // No tunnel: the same connection still speaks HTTP.
    sender.ready().await.expect("the connection is still HTTP");
    let req = Request::builder()
        .uri("/after")
        .header("host", &host)
        .header("x-sandgate-token", &t)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(5), sender.send_request(req))
        .await
        .expect("a second request is answered")
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["uri"], "/after");
}

#[tokio::test]
async fn h2c_upgrades_are_never_passed_upstream() {
    let echo = Echo::start().await;
    let gw = TestGateway::start().await;
    let port = echo.port();
    let id = gw.create_sandbox(&[port]).await;
    let host = sandbox_host(port, &id);
    let t = gw.token(&id, port).await;

    let mut sender = gw.tls().h1(&host).await;
    let req = Request::builder()
        .uri("/h2c")
        .header("host", &host)
        .header("x-sandgate-token", &t)
        .header("connection", "Upgrade, HTTP2-Settings")
        .header("upgrade", "h2c")
        .header("http2-settings", "AAMAAABkAARAAAAAAAIAAAAA")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let seen = echo.last();
    assert_eq!(seen.uri, "/h2c");
    assert!(seen.headers.get("upgrade").is_none(), "{:?}", seen.headers);
    assert!(seen.headers.get("http2-settings").is_none());
    for v in seen.headers.get_all("connection") {
        let v = v.to_str().unwrap().to_ascii_lowercase();
        assert!(
            !v.contains("upgrade") && !v.contains("http2-settings"),
            "{v}"
        );
    }

    // Also with `websocket` and `h2c` offered together: only the WebSocket upgrade goes up.
    let req = Request::builder()
        .uri("/both")
        .header("host", &host)
        .header("x-sandgate-token", &t)
        .header("connection", "Upgrade, HTTP2-Settings")
        .header("upgrade", "h2c, websocket")
        .header("http2-settings", "AAMAAABkAARAAAAAAAIAAAAA")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = gw.tls().send(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let seen = echo.last();
    assert_eq!(path_of(&seen.uri), "/both");
    assert!(seen.headers.get("http2-settings").is_none());
    for v in seen.headers.get_all("upgrade") {
        assert!(!v.to_str().unwrap().to_ascii_lowercase().contains("h2c"));
    }
}

/// GET `path` on the plain-HTTP telemetry listener.
async fn telemetry_get(addr: SocketAddr, path: &str) -> (StatusCode, String) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::builder()
        .uri(path)
        .header("host", addr.to_string())
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let status = resp.status();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8(body.to_vec()).unwrap())
}

#[tokio::test]
async fn telemetry_health_readiness_and_metrics() {
    let echo = Echo::start().await;
    let gw = TestGateway::start().await;
    let port = echo.port();
    let id = gw.create_sandbox(&[port]).await;
    let host = sandbox_host(port, &id);
    let t = gw.token(&id, port).await;
    let resp = gw.tls().get(&host, "/", &[("x-sandgate-token", &t)]).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let resp = gw.tls().get(&host, "/", &[]).await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);

    let (status, _) = telemetry_get(gw.telemetry, "/healthz").await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = telemetry_get(gw.telemetry, "/readyz").await;
    assert_eq!(status, StatusCode::OK);

    let (status, text) = telemetry_get(gw.telemetry, "/metrics").await;
    assert_eq!(status, StatusCode::OK);
    let has = |route: &str, code: &str| {
        text.lines().any(|l| {
            l.starts_with("sandgate_requests_total{")
                && l.contains(&format!("route=\"{route}\""))
                && l.contains(&format!("status=\"{code}\""))
        })
    };
    assert!(has("sandbox", "200"), "{text}");
    assert!(has("sandbox", "401"), "{text}");
    assert!(has("api", "201"), "{text}");
    assert!(text.contains("sandgate_request_duration_seconds"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("sandgate_open_connections")),
        "{text}"
    );
}

/// The `sandgate_open_connections` gauge.
async fn open_connections(gw: &TestGateway) -> i64 {
    let (_, text) = telemetry_get(gw.telemetry, "/metrics").await;
    text.lines()
        .find_map(|l| l.strip_prefix("sandgate_open_connections "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no open_connections gauge in {text}"))
}

/// An open WebSocket is an open client connection: it is counted (and holds its connection
/// slot) until the tunnel ends, not only until the 101 is sent.
#[tokio::test]
async fn open_websockets_count_as_open_connections() {
    let echo = Echo::start().await;
    let gw = TestGateway::start().await;
    let port = echo.port();
    let id = gw.create_sandbox(&[port]).await;
    let host = sandbox_host(port, &id);
    let t = gw.token(&id, port).await;

    let mut sockets = Vec::new();
    for _ in 0..3 {
        let (mut ws, _) = websocket(&gw.tls(), &host, "/ws", &[("x-sandgate-token", &t)])
            .await
            .unwrap();
        ws.send(Message::text("hi")).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("hi"));
        sockets.push(ws);
    }
    assert_eq!(open_connections(&gw).await, 3);

    for mut ws in sockets {
        ws.close(None).await.unwrap();
        while let Some(Ok(_)) = ws.next().await {}
    }
    let start = Instant::now();
    while open_connections(&gw).await != 0 {
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "closed tunnels still counted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
