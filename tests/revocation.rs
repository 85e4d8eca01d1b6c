//! Revoking a token or terminating a sandbox closes the connections opened with it within one
//! second: WebSockets, HTTP/2 connections and long-lived HTTP/1.1 responses. Connections opened
//! with other tokens stay up.
#![allow(clippy::unwrap_used)] // helpers here are test code too

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use futures_util::{SinkExt, StreamExt};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// How soon a revoked connection must close.
const DEADLINE: Duration = Duration::from_secs(1);

type Ws = WebSocketStream<TlsStream<TcpStream>>;

/// A sandbox on a fresh echo upstream, with its host.
async fn setup() -> (Echo, TestGateway, String, u16, String) {
    let echo = Echo::start().await;
    let gw = TestGateway::start().await;
    let port = echo.port();
    let id = gw.create_sandbox(&[port]).await;
    let host = sandbox_host(port, &id);
    (echo, gw, id, port, host)
}

/// Opens a WebSocket with `token` in the header and checks it echoes.
async fn open_ws(gw: &TestGateway, host: &str, token: &str) -> Ws {
    let (mut ws, resp) = websocket(&gw.tls(), host, "/ws", &[("x-sandgate-token", token)])
        .await
        .expect("websocket opens");
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    ws.send(Message::text("before")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("before"));
    ws
}

/// Waits until the WebSocket ends (None, an error or a Close frame); panics after `DEADLINE`
/// measured from `since`.
async fn expect_ws_closed(ws: &mut Ws, since: Instant) -> Duration {
    let left = DEADLINE.saturating_sub(since.elapsed());
    match tokio::time::timeout(left, ws.next()).await {
        Err(_) => panic!("the WebSocket was still open {DEADLINE:?} after revocation"),
        Ok(None) | Ok(Some(Err(_))) | Ok(Some(Ok(Message::Close(_)))) => since.elapsed(),
        Ok(Some(Ok(other))) => panic!("unexpected message after revocation: {other:?}"),
    }
}

/// Opens `/sse` on an HTTP/1.1 connection and waits for its first event; returns the body.
async fn open_sse_h1(gw: &TestGateway, host: &str, token: &str) -> Incoming {
    let mut sender = gw.tls().h1(host).await;
    let req = Request::builder()
        .uri("/sse")
        .header("host", host)
        .header("x-sandgate-token", token)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    first_event(&mut body).await;
    body
}

async fn first_event(body: &mut Incoming) {
    let mut text = String::new();
    while !text.contains("data: event 0") {
        let frame = tokio::time::timeout(Duration::from_secs(2), body.frame())
            .await
            .expect("the first event arrives")
            .expect("the stream is open")
            .unwrap();
        if let Some(d) = frame.data_ref() {
            text.push_str(std::str::from_utf8(d).unwrap());
        }
    }
}

/// Waits until a streamed body ends (end of stream or an error); panics after `DEADLINE`
/// measured from `since`. Events that were already in flight may still arrive first.
async fn expect_body_cut(body: &mut Incoming, since: Instant) -> Duration {
    loop {
        let left = DEADLINE.saturating_sub(since.elapsed());
        match tokio::time::timeout(left, body.frame()).await {
            Err(_) => panic!("the stream was still open {DEADLINE:?} after revocation"),
            Ok(None) | Ok(Some(Err(_))) => return since.elapsed(),
            Ok(Some(Ok(_))) => continue,
        }
    }
}

async fn revoke(gw: &TestGateway, jti: &str) {
    let (status, v) = gw
        .api(Method::DELETE, &format!("/v1/connect-tokens/{jti}"), None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{v}");
}

fn token_and_jti(minted: &Value) -> (String, String) {
    (
        minted["token"].as_str().unwrap().to_string(),
        minted["jti"].as_str().unwrap().to_string(),
    )
}

#[tokio::test]
async fn revoking_a_token_closes_its_websocket() {
    let (_echo, gw, id, port, host) = setup().await;
    let (t, jti) = token_and_jti(&gw.mint(&id, port, Value::Null).await);
    let mut ws = open_ws(&gw, &host, &t).await;

    let since = Instant::now();
    revoke(&gw, &jti).await;
    let took = expect_ws_closed(&mut ws, since).await;
    eprintln!("WebSocket closed {took:?} after the revocation call began");

    // The socket is gone for writing too.
    let write = ws.send(Message::text("after")).await;
    let echoed = match write {
        Err(_) => None,
        Ok(()) => tokio::time::timeout(Duration::from_millis(500), ws.next())
            .await
            .ok()
            .flatten()
            .and_then(Result::ok)
            .filter(|m| m.is_text()),
    };
    assert!(
        echoed.is_none(),
        "a revoked WebSocket still echoed {echoed:?}"
    );

    let resp = gw.tls().get(&host, "/", &[("x-sandgate-token", &t)]).await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(error_code(&resp), "token_revoked");
    let err = websocket(&gw.tls(), &host, "/ws", &[("x-sandgate-token", &t)]).await;
    assert!(err.is_err(), "a revoked token opened a WebSocket");
}

#[tokio::test]
async fn terminating_the_sandbox_closes_its_websocket() {
    let (_echo, gw, id, port, host) = setup().await;
    let t = gw.token(&id, port).await;
    let mut ws = open_ws(&gw, &host, &t).await;

    let since = Instant::now();
    let (status, v) = gw
        .api(Method::DELETE, &format!("/v1/sandboxes/{id}"), None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{v}");
    let took = expect_ws_closed(&mut ws, since).await;
    eprintln!("WebSocket closed {took:?} after the terminate call began");

    let resp = gw.tls().get(&host, "/", &[("x-sandgate-token", &t)]).await;
    assert_eq!(resp.status(), StatusCode::GONE);
    assert_eq!(error_code(&resp), "sandbox_terminated");
}

#[tokio::test]
async fn revoking_a_token_closes_its_http2_connection() {
    let (echo, gw, id, port, host) = setup().await;
    let (t, jti) = token_and_jti(&gw.mint(&id, port, Value::Null).await);

    let mut sender = gw.tls().h2(&host).await;
    let req = |path: &str| {
        Request::builder()
            .version(http::Version::HTTP_2)
            .uri(format!("https://{host}{path}"))
            .header("x-sandgate-token", &t)
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    let resp = sender.send_request(req("/sse")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let mut sse = resp.into_body();
    first_event(&mut sse).await;
    // Another stream on the same connection works before the revocation.
    let resp = sender.send_request(req("/other")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let seen_before = echo.count();

    let since = Instant::now();
    revoke(&gw, &jti).await;
    let took = expect_body_cut(&mut sse, since).await;
    eprintln!("HTTP/2 stream cut {took:?} after the revocation call began");

    // The connection itself is closed: no new stream can be sent on it.
    let answered = tokio::time::timeout(DEADLINE, async {
        if sender.ready().await.is_err() {
            return false;
        }
        sender.send_request(req("/after")).await.is_ok()
    })
    .await
    .expect("the connection's fate is known at once");
    assert!(!answered, "a new stream was answered after revocation");
    assert!(sender.is_closed());
    assert_eq!(
        echo.count(),
        seen_before,
        "nothing more reached the upstream"
    );
}

#[tokio::test]
async fn terminating_the_sandbox_closes_its_http2_connection() {
    let (_echo, gw, id, port, host) = setup().await;
    let t = gw.token(&id, port).await;

    let mut sender = gw.tls().h2(&host).await;
    let req = Request::builder()
        .version(http::Version::HTTP_2)
        .uri(format!("https://{host}/sse"))
        .header("x-sandgate-token", &t)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut sse = resp.into_body();
    first_event(&mut sse).await;

    let since = Instant::now();
    let (status, _) = gw
        .api(Method::DELETE, &format!("/v1/sandboxes/{id}"), None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    expect_body_cut(&mut sse, since).await;
}

#[tokio::test]
async fn revoking_a_token_cuts_a_long_poll_over_http1() {
    let (_echo, gw, id, port, host) = setup().await;
    let (t, jti) = token_and_jti(&gw.mint(&id, port, Value::Null).await);
    let mut sse = open_sse_h1(&gw, &host, &t).await;

    let since = Instant::now();
    revoke(&gw, &jti).await;
    let took = expect_body_cut(&mut sse, since).await;
    eprintln!("HTTP/1.1 stream cut {took:?} after the revocation call began");
}

#[tokio::test]
async fn revoking_one_token_leaves_other_tokens_connections_open() {
    let (_echo, gw, id, port, host) = setup().await;
    let (revoked, revoked_jti) = token_and_jti(&gw.mint(&id, port, Value::Null).await);
    let kept = gw.token(&id, port).await;

    let mut doomed = open_ws(&gw, &host, &revoked).await;
    let mut survivor = open_ws(&gw, &host, &kept).await;
    let mut survivor_sse = open_sse_h1(&gw, &host, &kept).await;

    let since = Instant::now();
    revoke(&gw, &revoked_jti).await;
    expect_ws_closed(&mut doomed, since).await;

    // Well past the deadline, the other token's connections still work.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for i in 0..3 {
        let msg = Message::text(format!("still here {i}"));
        survivor.send(msg.clone()).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(1), survivor.next())
            .await
            .expect("the other WebSocket answers")
            .unwrap()
            .unwrap();
        assert_eq!(got, msg);
    }
    let frame = tokio::time::timeout(Duration::from_secs(1), survivor_sse.frame())
        .await
        .expect("the other token's event stream keeps flowing")
        .expect("still open")
        .unwrap();
    assert!(frame
        .data_ref()
        .is_some_and(|d| d.starts_with(b"data: event")));
    let resp = gw
        .tls()
        .get(&host, "/", &[("x-sandgate-token", &kept)])
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
}
