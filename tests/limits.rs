//! Limits, timeouts and faults: header and body sizes, slowloris and slow bodies, connection
//! caps per client address and per sandbox, HTTP/2 stream caps, idle WebSockets, upstreams
//! that hang or break mid-body, the TLS handshake deadline, and — on the real binary — SIGTERM
//! under load and certificate reload on SIGHUP; plus signing-key rotation under load.
//!
//! Every timeout here is configured at 1 s and checked with generous upper bounds, so the tests
//! hold on a loaded two-core machine.
#![allow(clippy::unwrap_used)] // helpers here are test code too

mod common;

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::h2raw::{self, Outcome};
use common::*;
use futures_util::{SinkExt, StreamExt};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;

/// A gateway with the given `[gateway]` keys and one sandbox served by an [`Echo`].
struct Setup {
    echo: Echo,
    gw: TestGateway,
    host: String,
    token: String,
}

async fn setup(gateway_toml: &str) -> Setup {
    let echo = Echo::start().await;
    let gw = TestGateway::start_with_gateway(gateway_toml, "").await;
    let id = gw.create_sandbox(&[echo.port()]).await;
    let token = gw.token(&id, echo.port()).await;
    Setup {
        host: sandbox_host(echo.port(), &id),
        echo,
        gw,
        token,
    }
}

impl Setup {
    fn get(&self, path: &str) -> Request<Full<Bytes>> {
        Request::builder()
            .uri(path)
            .header("host", &self.host)
            .header("x-sandgate-token", &self.token)
            .body(Full::new(Bytes::new()))
            .unwrap()
    }

    fn head(&self, method: &str, path: &str, extra: &str) -> String {
        format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nX-Sandgate-Token: {}\r\n{extra}\r\n",
            self.host, self.token
        )
    }
}

/// Sends `req` on `sender` and collects the answer.
async fn send(
    sender: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    req: Request<Full<Bytes>>,
) -> Response<Bytes> {
    let resp = sender.send_request(req).await.expect("request");
    let (parts, body) = resp.into_parts();
    Response::from_parts(parts, body.collect().await.expect("body").to_bytes())
}

// -------------------------------------------------------------------------------------------------
// Sizes

#[tokio::test]
async fn request_heads_over_64_kib_get_431_and_the_connection_closes() {
    let s = setup("").await;
    let tls = s.gw.tls();

    // Just under the limit is forwarded: the limit is the configured one, not something lower.
    let under = s.head(
        "GET",
        "/under",
        &format!("X-Big: {}\r\n", "a".repeat(60 * 1024)),
    );
    let answer = raw_exchange(
        &tls,
        &s.host,
        under
            .replace("\r\n\r\n", "\r\nConnection: close\r\n\r\n")
            .as_bytes(),
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(
        answer.statuses(),
        vec![200],
        "{}",
        &answer.text[..200.min(answer.text.len())]
    );
    assert_eq!(s.echo.count(), 1);

    // One 70 KiB header.
    let big = s.head(
        "GET",
        "/big",
        &format!("X-Big: {}\r\n", "a".repeat(70 * 1024)),
    );
    let answer = raw_exchange(&tls, &s.host, big.as_bytes(), Duration::from_secs(5)).await;
    assert_eq!(answer.status(), 431, "{}", answer.text);
    assert!(answer.closed, "the connection stayed open after the 431");

    // Many small headers that add up to more than 64 KiB (90 × ~770 bytes).
    let many: String = (0..90)
        .map(|i| format!("X-Pad-{i}: {}\r\n", "b".repeat(760)))
        .collect();
    let answer = raw_exchange(
        &tls,
        &s.host,
        s.head("GET", "/many", &many).as_bytes(),
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(answer.status(), 431, "{}", answer.text);
    assert!(answer.closed, "the connection stayed open after the 431");

    // A request line alone over the limit.
    let line = format!(
        "GET /{} HTTP/1.1\r\nHost: {}\r\nX-Sandgate-Token: {}\r\n\r\n",
        "c".repeat(70 * 1024),
        s.host,
        s.token
    );
    let answer = raw_exchange(&tls, &s.host, line.as_bytes(), Duration::from_secs(5)).await;
    assert!(
        matches!(answer.status(), 414 | 431),
        "{}",
        &answer.text[..200.min(answer.text.len())]
    );
    assert!(answer.closed);

    assert_eq!(s.echo.count(), 1, "{:?}", s.echo.requests().last());
}

#[tokio::test]
async fn bodies_over_max_body_bytes_never_reach_the_upstream_whole() {
    let s = setup("max_body_bytes = 1024").await;
    let tls = s.gw.tls();
    let post = |len: usize| {
        Request::builder()
            .method(Method::POST)
            .uri("/upload")
            .header("host", &s.host)
            .header("x-sandgate-token", &s.token)
            .body(Full::new(Bytes::from(vec![b'x'; len])))
            .unwrap()
    };

    // Exactly the limit goes through.
    let resp = tls.send(post(1024)).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(json_body(&resp)["body_len"], 1024);
    assert_eq!(s.echo.count(), 1);

    // Over it with a Content-Length: refused before anything is forwarded.
    let resp = tls.send(post(2048)).await.unwrap();
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(error_code(&resp), "body_too_large");
    assert_eq!(s.echo.count(), 1, "{:?}", s.echo.requests());

    // Over it in chunks: the head is forwarded before the size is known, then the body is cut.
    let chunk = "y".repeat(512);
    let mut chunked = s.head("POST", "/chunked", "Transfer-Encoding: chunked\r\n");
    for _ in 0..4 {
        chunked.push_str(&format!("200\r\n{chunk}\r\n"));
    }
    chunked.push_str("0\r\n\r\n");
    let answer = raw_exchange(&tls, &s.host, chunked.as_bytes(), Duration::from_secs(5)).await;
    // The client's fault, said as such (not a 502 blaming the sandbox), and the rest of the
    // body is never read as a request.
    assert_eq!(answer.status(), 413, "{}", answer.text);
    assert!(answer.text.contains("body_too_large"), "{}", answer.text);
    assert!(answer.closed, "the connection stayed open");
    for seen in s.echo.requests() {
        assert!(
            seen.body.len() <= 1024,
            "the upstream got {} bytes of body",
            seen.body.len()
        );
    }
}

// -------------------------------------------------------------------------------------------------
// Slow clients

#[tokio::test]
async fn slowloris_heads_are_cut_at_the_header_timeout() {
    let s = setup("header_read_timeout_secs = 1").await;
    let tls = s.gw.tls();

    // A partial head, then nothing.
    let mut stream = tls.connect(&s.host, &[b"http/1.1"]).await;
    let start = Instant::now();
    stream
        .write_all(format!("GET / HTTP/1.1\r\nHost: {}\r\n", s.host).as_bytes())
        .await
        .unwrap();
    let mut out = Vec::new();
    assert!(
        read_until_closed(&mut stream, &mut out, Duration::from_secs(4)).await,
        "a stalled head kept its connection"
    );
    let took = start.elapsed();
    assert!(took < Duration::from_secs(3), "cut after {took:?}");
    assert!(
        took >= Duration::from_millis(800),
        "cut after only {took:?}"
    );

    // A head trickled one byte every 200 ms: each byte is progress, but the head as a whole
    // has the same deadline.
    let mut stream = tls.connect(&s.host, &[b"http/1.1"]).await;
    let start = Instant::now();
    let head = s.head("GET", "/trickle", "");
    let mut closed = false;
    for b in head.as_bytes() {
        if stream.write_all(&[*b]).await.is_err() || stream.flush().await.is_err() {
            closed = true;
            break;
        }
        let mut probe = [0u8; 1024];
        match tokio::time::timeout(Duration::from_millis(200), stream.read(&mut probe)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed = true;
                break;
            }
            _ => {}
        }
        if start.elapsed() > Duration::from_secs(4) {
            break;
        }
    }
    let took = start.elapsed();
    assert!(closed, "a trickled head kept its connection for {took:?}");
    assert!(took < Duration::from_secs(3), "cut after {took:?}");
    assert_eq!(s.echo.count(), 0);
}

#[tokio::test]
async fn slow_bodies_are_cut_at_the_body_timeout() {
    let s = setup("body_read_timeout_secs = 1").await;
    let tls = s.gw.tls();

    // Ten of a hundred announced bytes, then nothing.
    let mut stream = tls.connect(&s.host, &[b"http/1.1"]).await;
    let start = Instant::now();
    let request = format!(
        "{}0123456789",
        s.head("POST", "/stalled", "Content-Length: 100\r\n")
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let closed = read_until_closed(&mut stream, &mut out, Duration::from_secs(4)).await;
    let took = start.elapsed();
    let answer = String::from_utf8_lossy(&out);
    // An error that says so (not a 502 blaming the sandbox), and the connection closed,
    // within the timeout plus slack.
    assert!(closed, "a stalled body held its connection for {took:?}");
    assert!(
        took < Duration::from_secs(3),
        "cut after {took:?}: {answer}"
    );
    assert!(
        took >= Duration::from_millis(800),
        "cut after only {took:?}"
    );
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("body_timeout"), "{answer}");
    for seen in s.echo.requests() {
        assert!(seen.body.len() < 100, "the upstream got the whole body");
    }

    // A body that keeps coming, a little at a time, is not slow: each chunk arrives within
    // the timeout, though the whole takes longer than it.
    let mut stream = tls.connect(&s.host, &[b"http/1.1"]).await;
    let start = Instant::now();
    stream
        .write_all(
            s.head(
                "POST",
                "/steady",
                "Content-Length: 8\r\nConnection: close\r\n",
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    for b in b"abcdefgh" {
        tokio::time::sleep(Duration::from_millis(250)).await;
        stream.write_all(&[*b]).await.unwrap();
        stream.flush().await.unwrap();
    }
    let mut out = Vec::new();
    read_until_closed(&mut stream, &mut out, Duration::from_secs(4)).await;
    let answer = String::from_utf8_lossy(&out);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(start.elapsed() > Duration::from_secs(1));
    assert_eq!(&s.echo.last().body[..], b"abcdefgh");
}

// -------------------------------------------------------------------------------------------------
// Connection caps

/// A TLS connection attempt that may fail: `Some` with the stream when the handshake
/// completed and the gateway did not close it right after.
async fn try_tls(
    gw: &TestGateway,
    host: &str,
) -> Option<tokio_rustls::client::TlsStream<TcpStream>> {
    let mut config = sandgate::tls::client_config_from_pem(&gw.ca_pem).unwrap();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(gw.addr).await.ok()?;
    let name = rustls::pki_types::ServerName::try_from(host.to_string()).unwrap();
    let mut tls = tokio::time::timeout(Duration::from_secs(3), connector.connect(name, tcp))
        .await
        .ok()?
        .ok()?;
    // TLS 1.3: the client may finish before the server's verdict; a closed connection shows on
    // the first read.
    let mut probe = [0u8; 1];
    match tokio::time::timeout(Duration::from_millis(300), tls.read(&mut probe)).await {
        Ok(_) => None,
        Err(_) => Some(tls),
    }
}

#[tokio::test]
async fn connections_per_client_address_are_capped() {
    let s = setup("max_connections_per_ip = 3").await;
    s.gw.wait_idle().await;
    let tls = s.gw.tls();
    let mut held = Vec::new();
    for i in 0..3 {
        let mut sender = tls.h1(&s.host).await;
        let resp = send(&mut sender, s.get(&format!("/held-{i}"))).await;
        assert_eq!(resp.status(), StatusCode::OK);
        held.push(sender);
    }
    // The fourth is closed at once: no handshake, or EOF right after it.
    let start = Instant::now();
    assert!(
        try_tls(&s.gw, &s.host).await.is_none(),
        "a fourth connection from one address was kept"
    );
    assert!(start.elapsed() < Duration::from_secs(3));
    // The three still work.
    for (i, sender) in held.iter_mut().enumerate() {
        let resp = send(sender, s.get(&format!("/again-{i}"))).await;
        assert_eq!(resp.status(), StatusCode::OK);
    }
    // Closing one frees its place.
    drop(held.pop());
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut fresh = loop {
        if let Some(stream) = try_tls(&s.gw, &s.host).await {
            break stream;
        }
        assert!(
            Instant::now() < deadline,
            "the freed place was not given back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    fresh
        .write_all(s.head("GET", "/freed", "Connection: close\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = Vec::new();
    read_until_closed(&mut fresh, &mut out, Duration::from_secs(4)).await;
    assert!(
        out.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&out)
    );
}

#[tokio::test]
async fn connections_per_sandbox_are_capped_with_503() {
    let s = setup("max_connections_per_sandbox = 2").await;
    let tls = s.gw.tls();
    let mut first = tls.h1(&s.host).await;
    let mut second = tls.h1(&s.host).await;
    assert_eq!(send(&mut first, s.get("/1")).await.status(), StatusCode::OK);
    assert_eq!(
        send(&mut second, s.get("/2")).await.status(),
        StatusCode::OK
    );
    // Another request on an admitted connection is not another connection.
    assert_eq!(
        send(&mut first, s.get("/1b")).await.status(),
        StatusCode::OK
    );

    let mut third = tls.h1(&s.host).await;
    let resp = send(&mut third, s.get("/3")).await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(error_code(&resp), "too_many_connections");
    assert!(
        resp.headers().contains_key("retry-after"),
        "{:?}",
        resp.headers()
    );
    // The control API and other sandboxes are not affected.
    let (status, _) = s.gw.api(Method::GET, "/v1/sandboxes", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(s.echo.count(), 3);

    // When one closes, the next one gets in.
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let mut sender = tls.h1(&s.host).await;
        let resp = send(&mut sender, s.get("/after")).await;
        if resp.status() == StatusCode::OK {
            break;
        }
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            Instant::now() < deadline,
            "the closed connection's place was kept"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(third);
    assert_eq!(
        send(&mut second, s.get("/2b")).await.status(),
        StatusCode::OK
    );
}

#[tokio::test]
async fn h2_concurrent_streams_are_capped_at_the_configured_number() {
    let s = setup("h2_max_concurrent_streams = 4").await;
    let mut conn = h2raw::Conn::open(&s.gw.tls(), &s.host).await;
    let settings = loop {
        let f = conn
            .next(Duration::from_secs(5))
            .await
            .expect("the server's SETTINGS");
        if f.kind == h2raw::SETTINGS && f.flags & h2raw::ACK == 0 {
            break f.payload;
        }
    };
    let advertised = settings.chunks(6).find_map(|entry| {
        (u16::from_be_bytes([entry[0], entry[1]]) == h2raw::SETTINGS_MAX_CONCURRENT_STREAMS)
            .then(|| u32::from_be_bytes([entry[2], entry[3], entry[4], entry[5]]))
    });
    assert_eq!(advertised, Some(4));

    // Four open streams (request bodies never sent), then a fifth: refused.
    let fields = |path: &'static str| {
        vec![
            (":method", "POST"),
            (":scheme", "https"),
            (":authority", s.host.as_str()),
            (":path", path),
            ("x-sandgate-token", s.token.as_str()),
        ]
    };
    for stream in [1, 3, 5, 7] {
        assert!(conn.headers(stream, &fields("/open"), false).await);
    }
    assert!(conn.headers(9, &fields("/fifth"), false).await);
    let outcome = conn.outcome(9, Duration::from_secs(5)).await;
    // REFUSED_STREAM (7), or PROTOCOL_ERROR (1) from a peer that had not seen our ACK yet.
    assert!(
        matches!(outcome, Outcome::Reset(7 | 1) | Outcome::GoAway(_)),
        "the fifth stream was {outcome:?}"
    );
}

// -------------------------------------------------------------------------------------------------
// WebSocket idle timeout

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_websockets_close_and_active_ones_stay() {
    let s = setup("websocket_idle_timeout_secs = 1").await;
    let tls = s.gw.tls();
    let auth = [("x-sandgate-token", s.token.as_str())];

    let (mut idle, _) = websocket(&tls, &s.host, "/ws", &auth).await.unwrap();
    let (mut active, _) = websocket(&tls, &s.host, "/ws", &auth).await.unwrap();
    let start = Instant::now();

    let idle_task = tokio::spawn(async move {
        let start = Instant::now();
        // Anything but a message: end of stream, an error, or a close frame.
        let next = tokio::time::timeout(Duration::from_secs(4), idle.next()).await;
        (
            start.elapsed(),
            next.map(|m| matches!(m, Some(Ok(Message::Text(_))))),
        )
    });

    // A message every 300 ms for 2.5 s: always answered.
    let mut n = 0;
    while start.elapsed() < Duration::from_millis(2500) {
        let text = format!("ping {n}");
        active.send(Message::text(text.clone())).await.unwrap();
        let echoed = tokio::time::timeout(Duration::from_secs(2), active.next())
            .await
            .expect("an active websocket got no answer")
            .expect("an active websocket was closed")
            .unwrap();
        assert_eq!(echoed, Message::text(text));
        n += 1;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(n >= 5);

    let (took, next) = idle_task.await.unwrap();
    assert_eq!(
        next,
        Ok(false),
        "the idle websocket was not closed within 4 s"
    );
    assert!(took < Duration::from_millis(2500), "closed after {took:?}");
    assert!(
        took >= Duration::from_millis(800),
        "closed after only {took:?}"
    );

    // Once it goes quiet, the active one closes too.
    let next = tokio::time::timeout(Duration::from_secs(4), active.next()).await;
    assert!(
        !matches!(next, Err(_) | Ok(Some(Ok(Message::Text(_))))),
        "a websocket gone quiet stayed open: {next:?}"
    );
}

// -------------------------------------------------------------------------------------------------
// Faults

#[tokio::test]
async fn an_upstream_that_hangs_gets_504_at_the_response_timeout() {
    let s = setup("upstream_response_timeout_secs = 1").await;
    let start = Instant::now();
    let resp =
        s.gw.tls()
            .get(&s.host, "/slow", &[("x-sandgate-token", &s.token)])
            .await;
    let took = start.elapsed();
    assert_eq!(resp.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(error_code(&resp), "upstream_timeout");
    assert!(
        took >= Duration::from_millis(900),
        "answered after {took:?}"
    );
    assert!(took < Duration::from_secs(3), "answered after {took:?}");
}

/// An upstream that answers every request with a head announcing 100 000 bytes, sends 10 and
/// drops the connection.
async fn breaking_upstream() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tcp.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = tcp
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\nContent-Type: text/plain\r\n\r\n0123456789")
                    .await;
                let _ = tcp.flush().await;
                tokio::time::sleep(Duration::from_millis(100)).await;
                drop(tcp);
            });
        }
    });
    port
}

#[tokio::test]
async fn an_upstream_reset_mid_body_is_an_error_not_a_short_body() {
    let gw = TestGateway::start().await;
    let port = breaking_upstream().await;
    let id = gw.create_sandbox(&[port]).await;
    let host = sandbox_host(port, &id);
    let token = gw.token(&id, port).await;
    let tls = gw.tls();
    let get = || {
        Request::builder()
            .uri("/big")
            .header("host", &host)
            .header("x-sandgate-token", &token)
            .body(Full::new(Bytes::new()))
            .unwrap()
    };

    // HTTP/1.1: the head passes, the body ends in an error, the connection is not reused.
    let mut sender = tls.h1(&host).await;
    let resp = sender.send_request(get()).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body = tokio::time::timeout(Duration::from_secs(5), resp.into_body().collect())
        .await
        .expect("the body neither ended nor failed");
    assert!(body.is_err(), "a broken body looked complete: {body:?}");
    let reused = tokio::time::timeout(Duration::from_secs(3), async {
        sender.ready().await?;
        sender.send_request(get()).await.map(|r| r.status())
    })
    .await
    .expect("the broken connection hung");
    assert!(
        reused.is_err(),
        "the broken connection answered again: {reused:?}"
    );

    // The same as raw bytes: fewer bytes than announced, then the connection closes.
    let answer = raw_exchange(
        &tls,
        &host,
        format!("GET /big HTTP/1.1\r\nHost: {host}\r\nX-Sandgate-Token: {token}\r\n\r\n")
            .as_bytes(),
        Duration::from_secs(5),
    )
    .await;
    assert!(answer.closed);
    assert_eq!(answer.statuses(), vec![200]);
    assert!(answer
        .text
        .to_ascii_lowercase()
        .contains("content-length: 100000"));
    assert!(answer.text.ends_with("0123456789"), "{}", answer.text);

    // HTTP/2: only that stream fails; the connection carries on.
    let mut h2 = tls.h2(&host).await;
    for _ in 0..2 {
        let mut req = get();
        *req.uri_mut() = format!("https://{host}/big").parse().unwrap();
        req.headers_mut().remove("host");
        let resp = h2.send_request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let body = tokio::time::timeout(Duration::from_secs(5), resp.into_body().collect())
            .await
            .unwrap();
        assert!(body.is_err(), "a broken body looked complete over h2");
    }
}

#[tokio::test]
async fn tls_handshakes_have_a_deadline() {
    let s = setup("handshake_timeout_secs = 1").await;
    // A TCP connection that never says hello, and one that stops mid-record.
    for opening in [&b""[..], &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01][..]] {
        let mut tcp = TcpStream::connect(s.gw.addr).await.unwrap();
        let start = Instant::now();
        tcp.write_all(opening).await.unwrap();
        let mut out = Vec::new();
        assert!(
            read_until_closed(&mut tcp, &mut out, Duration::from_secs(4)).await,
            "a silent client kept its connection (sent {opening:?})"
        );
        let took = start.elapsed();
        assert!(took < Duration::from_secs(3), "closed after {took:?}");
        assert!(
            took >= Duration::from_millis(800),
            "closed after only {took:?}"
        );
    }
}

// -------------------------------------------------------------------------------------------------
// The real binary: SIGTERM and SIGHUP

/// `sandgate serve` on free ports with the given config body (the `[gateway] listen` and
/// `[telemetry]` tables are added here); its output is collected in `log`.
struct Binary {
    child: tokio::process::Child,
    port: u16,
    dir: tempfile::TempDir,
    log: Arc<Mutex<String>>,
}

impl Binary {
    async fn start(dir: tempfile::TempDir, gateway_toml: &str, rest: &str) -> Binary {
        let port = free_port();
        let config = dir.path().join("sandgate.toml");
        std::fs::write(
            &config,
            format!(
                "[gateway]\nlisten = \"127.0.0.1:{port}\"\n{gateway_toml}\n[telemetry]\nlisten = \"127.0.0.1:{}\"\nlog_level = \"info\"\n[store]\ndata_dir = \"data\"\n[orchestrator]\nenabled = false\n{rest}",
                free_port()
            ),
        )
        .unwrap();
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_sandgate"))
            .args(["serve", "--config"])
            .arg(&config)
            .env_remove("RUST_LOG")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        for out in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn tokio::io::AsyncRead + Send + Unpin>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let log = Arc::clone(&log);
            tokio::spawn(async move {
                let mut lines = tokio::io::BufReader::new(out);
                let mut line = String::new();
                while tokio::io::AsyncBufReadExt::read_line(&mut lines, &mut line)
                    .await
                    .is_ok_and(|n| n > 0)
                {
                    log.lock().unwrap().push_str(&line);
                    line.clear();
                }
            });
        }
        let data = dir.path().join("data");
        let deadline = Instant::now() + Duration::from_secs(8);
        loop {
            if TcpStream::connect(("127.0.0.1", port)).await.is_ok()
                && data.join("admin.key").exists()
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "sandgate did not start: {}",
                log.lock().unwrap()
            );
            assert!(
                child.try_wait().unwrap().is_none(),
                "sandgate exited: {}",
                log.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Binary {
            child,
            port,
            dir,
            log,
        }
    }

    fn addr(&self) -> std::net::SocketAddr {
        ([127, 0, 0, 1], self.port).into()
    }

    fn key(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("data/admin.key"))
            .unwrap()
            .trim()
            .to_string()
    }

    fn signal(&self, signal: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.child.id().unwrap() as i32);
        nix::sys::signal::kill(pid, signal).unwrap();
    }

    /// Waits until the log holds `needle`; panics after `within`.
    async fn wait_log(&self, needle: &str, within: Duration) {
        let deadline = Instant::now() + within;
        while !self.log.lock().unwrap().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "the log never said {needle:?}: {}",
                self.log.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// An upstream that answers every request after 1.5 s, counting the requests it has received.
async fn slow_upstream() -> (u16, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let received = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&received);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let counter = Arc::clone(&counter);
            tokio::spawn(async move {
                let service = service_fn(move |_req: Request<Incoming>| {
                    let counter = Arc::clone(&counter);
                    async move {
                        counter.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(1500)).await;
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"done"))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    (port, received)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests_and_exits_cleanly() {
    let (up_port, received) = slow_upstream().await;
    let mut bin = Binary::start(tempfile::tempdir().unwrap(), "shutdown_grace_secs = 5", "").await;
    let ca = std::fs::read(bin.dir.path().join("data/certs/ca.pem")).unwrap();
    let tls = TlsClient::new(bin.addr(), &ca);
    let key = bin.key();
    let (status, v) = api_via(
        &tls,
        &key,
        Method::POST,
        "/v1/sandboxes",
        Some(json!({"upstream": "127.0.0.1", "ports": [up_port]})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    let (status, v) = api_via(
        &tls,
        &key,
        Method::POST,
        &format!("/v1/sandboxes/{id}/connect-tokens"),
        Some(json!({"port": up_port})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    let token = v["token"].as_str().unwrap().to_string();
    let host = sandbox_host(up_port, &id);

    // Four requests over HTTP/1.1 and two over one HTTP/2 connection, all in flight.
    let mut in_flight = Vec::new();
    for _ in 0..4 {
        let (tls, host, token) = (tls.clone(), host.clone(), token.clone());
        in_flight.push(tokio::spawn(async move {
            let req = Request::builder()
                .uri("/work")
                .header("host", &host)
                .header("x-sandgate-token", &token)
                .body(Full::new(Bytes::new()))
                .unwrap();
            let resp = tls.send(req).await.map_err(|e| e.to_string())?;
            Ok::<_, String>((resp.status(), resp.into_body()))
        }));
    }
    let h2 = tls.h2(&host).await;
    for _ in 0..2 {
        let (mut h2, host, token) = (h2.clone(), host.clone(), token.clone());
        in_flight.push(tokio::spawn(async move {
            let req = Request::builder()
                .uri(format!("https://{host}/work"))
                .header("x-sandgate-token", &token)
                .body(Full::new(Bytes::new()))
                .unwrap();
            let resp = h2.send_request(req).await.map_err(|e| e.to_string())?;
            let status = resp.status();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>((status, body.to_bytes()))
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while received.load(Ordering::SeqCst) < 6 {
        assert!(
            Instant::now() < deadline,
            "the requests never reached the upstream"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let signalled = Instant::now();
    bin.signal(nix::sys::signal::Signal::SIGTERM);

    // New connections are refused shortly after.
    let deadline = Instant::now() + Duration::from_secs(2);
    while TcpStream::connect(bin.addr()).await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "still accepting connections 2 s after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Every in-flight request completes.
    for task in in_flight {
        let (status, body) = task.await.unwrap().expect("an in-flight request failed");
        assert_eq!(status, StatusCode::OK);
        assert_eq!(&body[..], b"done");
    }

    // And the process exits with success within the grace period.
    let exit = tokio::time::timeout(Duration::from_secs(7), bin.child.wait())
        .await
        .expect("sandgate did not exit within the grace period")
        .unwrap();
    let took = signalled.elapsed();
    assert!(exit.success(), "{exit:?}: {}", bin.log.lock().unwrap());
    assert!(took < Duration::from_secs(6), "exit took {took:?}");
    drop(h2);
}

/// The DER of the first certificate in a PEM file.
fn leaf_der(pem: &[u8]) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::from_pem_slice(pem)
        .unwrap()
        .to_vec()
}

/// Handshakes afresh and returns the certificate the gateway presented.
async fn presented(tls: &TlsClient) -> Vec<u8> {
    let stream = tls.connect(BASE, &[b"http/1.1"]).await;
    stream.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

/// Writes `contents` to `path` by rename, as a careful renewal would.
fn replace(path: &std::path::Path, contents: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_certificate_and_keeps_it_on_a_broken_file() {
    let dir = tempfile::tempdir().unwrap();
    let (a, _) = sandgate::tls::ensure_dev_certs(&dir.path().join("ca-a"), BASE).unwrap();
    let (b, _) = sandgate::tls::ensure_dev_certs(&dir.path().join("ca-b"), BASE).unwrap();
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    std::fs::copy(&a.cert, &cert).unwrap();
    std::fs::copy(&a.key, &key).unwrap();
    let (cert_a, cert_b) = (
        leaf_der(&std::fs::read(&a.cert).unwrap()),
        leaf_der(&std::fs::read(&b.cert).unwrap()),
    );
    assert_ne!(cert_a, cert_b);

    let bin = Binary::start(
        dir,
        "",
        "[tls]\ndev_cert = false\ncert_file = \"cert.pem\"\nkey_file = \"key.pem\"\n",
    )
    .await;
    let mut both = std::fs::read(&a.ca_cert).unwrap();
    both.extend(std::fs::read(&b.ca_cert).unwrap());
    let tls = TlsClient::new(bin.addr(), &both);
    assert_eq!(presented(&tls).await, cert_a);
    assert!(
        !bin.dir.path().join("data/certs").exists(),
        "a dev certificate was made"
    );

    // A keep-alive connection opened on the old certificate.
    let mut old = tls.h1(BASE).await;
    let jwks = || {
        Request::builder()
            .uri("/.well-known/jwks.json")
            .header("host", BASE)
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    assert_eq!(send(&mut old, jwks()).await.status(), StatusCode::OK);

    // Renewal: new files, then SIGHUP.
    replace(&cert, &std::fs::read(&b.cert).unwrap());
    replace(&key, &std::fs::read(&b.key).unwrap());
    bin.signal(nix::sys::signal::Signal::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(5);
    while presented(&tls).await != cert_b {
        assert!(
            Instant::now() < deadline,
            "new handshakes still get the old certificate: {}",
            bin.log.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(send(&mut old, jwks()).await.status(), StatusCode::OK);

    // A broken renewal: the certificate in service stays.
    replace(
        &cert,
        b"-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n",
    );
    bin.signal(nix::sys::signal::Signal::SIGHUP);
    bin.wait_log("reload failed", Duration::from_secs(5)).await;
    assert_eq!(presented(&tls).await, cert_b);
    let mut fresh = tls.h1(BASE).await;
    assert_eq!(send(&mut fresh, jwks()).await.status(), StatusCode::OK);
    assert_eq!(send(&mut old, jwks()).await.status(), StatusCode::OK);
}

// -------------------------------------------------------------------------------------------------
// Signing-key rotation under load

fn kid_of(token: &str) -> String {
    use base64::Engine as _;
    let header = token.split('.').next().unwrap();
    let json: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(header)
            .unwrap(),
    )
    .unwrap();
    json["kid"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_the_signing_key_under_load_fails_no_request() {
    let echo = Echo::start().await;
    let gw = Arc::new(
        TestGateway::start_with(
            "[api]\nrequests_per_second = 100000\nburst = 100000\naddress_requests_per_second = 100000\naddress_burst = 100000\n",
        )
        .await,
    );
    let port = echo.port();
    let id = gw.create_sandbox(&[port]).await;
    let host = sandbox_host(port, &id);
    let before = gw.token(&id, port).await;
    let old_kid = kid_of(&before);

    let stop = Arc::new(AtomicBool::new(false));
    let kids = Arc::new(Mutex::new(std::collections::HashSet::new()));
    let mut workers = Vec::new();
    for _ in 0..3 {
        let (gw, id, host, stop, kids, before) = (
            Arc::clone(&gw),
            id.clone(),
            host.clone(),
            Arc::clone(&stop),
            Arc::clone(&kids),
            before.clone(),
        );
        workers.push(tokio::spawn(async move {
            let tls = gw.tls();
            let mut sender = tls.h1(&host).await;
            let (mut ok, mut failed) = (0usize, Vec::new());
            while !stop.load(Ordering::SeqCst) {
                let token = gw.token(&id, port).await;
                kids.lock().unwrap().insert(kid_of(&token));
                // Each fresh token, and the one minted before the rotation.
                for t in [&token, &before] {
                    let req = Request::builder()
                        .uri("/rotating")
                        .header("host", &host)
                        .header("x-sandgate-token", t)
                        .body(Full::new(Bytes::new()))
                        .unwrap();
                    let resp = send(&mut sender, req).await;
                    if resp.status() == StatusCode::OK {
                        ok += 1;
                    } else {
                        failed.push((
                            resp.status(),
                            String::from_utf8_lossy(resp.body()).into_owned(),
                        ));
                    }
                }
            }
            (ok, failed)
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let new_key = sandgate::gateway::add_signing_key(gw.gw.store.as_ref())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    stop.store(true, Ordering::SeqCst);

    let mut total = 0;
    for w in workers {
        let (ok, failed) = w.await.unwrap();
        assert!(
            failed.is_empty(),
            "requests failed during rotation: {failed:?}"
        );
        total += ok;
    }
    assert!(total >= 30, "only {total} requests ran");
    let kids = kids.lock().unwrap();
    assert!(kids.contains(&old_kid), "{kids:?}");
    assert!(
        kids.contains(new_key.kid()),
        "the new key never signed within 5 s: {kids:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// HTTP/2 idle timeout

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_http2_connections_are_wound_down() {
    let s = setup("idle_timeout_secs = 1").await;
    let tls = s.gw.tls();
    let mut busy = tls.h2(&s.host).await;
    let mut quiet = tls.h2(&s.host).await;
    let req = |s: &Setup| {
        Request::builder()
            .uri(format!("https://{}/", s.host))
            .header("x-sandgate-token", &s.token)
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    assert_eq!(quiet.send_request(req(&s)).await.unwrap().status(), 200);
    // The busy connection sends a request every 300 ms for 2.5 s and is never refused.
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(2500) {
        let r = busy
            .send_request(req(&s))
            .await
            .expect("a busy h2 connection was closed");
        assert_eq!(r.status(), 200);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // The quiet one got GOAWAY after about a second with nothing in flight, and is closed.
    let deadline = Instant::now() + Duration::from_secs(3);
    while !quiet.is_closed() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(quiet.is_closed(), "an idle HTTP/2 connection stayed open");
}
