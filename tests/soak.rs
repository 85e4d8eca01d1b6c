//! Soak: the real `sandgate` binary under a moderate mixed load — keep-alive HTTP requests,
//! WebSocket sessions and token churn (mint, use, revoke) — with its RSS sampled every second.
//! Fails on any unexpected error or on a memory growth trend.
//!
//! `cargo test --test soak` runs a short version (15 s); the full ten minutes:
//! `SOAK_SECS=600 cargo test --release --test soak -- --nocapture`.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use futures_util::{SinkExt, StreamExt};
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// A control-API call over TLS to the spawned gateway.
async fn api(tls: &TlsClient, key: &str, method: Method, path: &str, body: Option<Value>) -> Value {
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", BASE)
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(
            body.map(|b| b.to_string()).unwrap_or_default(),
        )))
        .unwrap();
    let resp = tls.send(req).await.unwrap();
    assert!(
        resp.status().is_success(),
        "{} {:?}",
        resp.status(),
        resp.body()
    );
    serde_json::from_slice(resp.body()).unwrap_or(Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_mixed_load_without_errors_or_growth() {
    let secs: u64 = std::env::var("SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(15);
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = dir.path().join("sandgate.toml");
    std::fs::write(
        &config,
        format!(
            "[gateway]\nlisten = \"127.0.0.1:{port}\"\n[telemetry]\nlisten = \"127.0.0.1:{}\"\nlog_level = \"warn\"\n[store]\ndata_dir = \"data\"\n[api]\nrequests_per_second = 10000\nburst = 10000\naddress_requests_per_second = 10000\naddress_burst = 10000\n",
            free_port()
        ),
    )
    .unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_sandgate"))
        .args(["serve", "--config"])
        .arg(&config)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = child.id().unwrap();
    let data = dir.path().join("data");
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
            && data.join("admin.key").exists()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let key = std::fs::read_to_string(data.join("admin.key"))
        .unwrap()
        .trim()
        .to_string();
    let ca = std::fs::read(data.join("certs/ca.pem")).unwrap();
    let tls = TlsClient::new(([127, 0, 0, 1], port).into(), &ca);
    let echo = Echo::start().await;
    let created = api(
        &tls,
        &key,
        Method::POST,
        "/v1/sandboxes",
        Some(json!({"upstream": "127.0.0.1", "ports": [echo.port()]})),
    )
    .await;
    let id = created["id"].as_str().unwrap().to_string();
    let host = sandbox_host(echo.port(), &id);
    let mint = {
        let (tls, key, id) = (tls.clone(), key.clone(), id.clone());
        let port = echo.port();
        move || {
            let (tls, key, id) = (tls.clone(), key.clone(), id.clone());
            async move {
                let v = api(
                    &tls,
                    &key,
                    Method::POST,
                    &format!("/v1/sandboxes/{id}/connect-tokens"),
                    Some(json!({"port": port})),
                )
                .await;
                (
                    v["token"].as_str().unwrap().to_string(),
                    v["jti"].as_str().unwrap().to_string(),
                )
            }
        }
    };

    let deadline = Instant::now() + Duration::from_secs(secs);
    let requests = Arc::new(AtomicU64::new(0));
    let messages = Arc::new(AtomicU64::new(0));
    let churned = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();

    // HTTP: keep-alive connections, each with its own token, a new connection every 200 requests.
    for _ in 0..6 {
        let (tls, host, mint, requests, errors) = (
            tls.clone(),
            host.clone(),
            mint.clone(),
            Arc::clone(&requests),
            Arc::clone(&errors),
        );
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                let (token, _) = mint().await;
                let mut conn = tls.h1(&host).await;
                for _ in 0..200 {
                    let req = Request::builder()
                        .uri("/soak?x=1")
                        .header("host", &host)
                        .header("x-sandgate-token", &token)
                        .body(Full::new(Bytes::new()))
                        .unwrap();
                    match conn.send_request(req).await {
                        Ok(r) if r.status() == 200 => {
                            let _ = r.into_body().collect().await;
                            requests.fetch_add(1, Ordering::Relaxed);
                        }
                        _ => {
                            errors.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
        }));
    }
    // WebSockets: open, exchange ten messages, close; repeat.
    for _ in 0..2 {
        let (tls, host, mint, messages, errors) = (
            tls.clone(),
            host.clone(),
            mint.clone(),
            Arc::clone(&messages),
            Arc::clone(&errors),
        );
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                let (token, _) = mint().await;
                let Ok((mut ws, _)) = websocket(&tls, &host, "/ws", &[("x-sandgate-token", &token)]).await else {
                    errors.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                for i in 0..10 {
                    let text = format!("message {i}");
                    let ok = ws.send(Message::text(text.clone())).await.is_ok()
                        && matches!(ws.next().await, Some(Ok(Message::Text(t))) if t.as_str() == text);
                    if ok {
                        messages.fetch_add(1, Ordering::Relaxed);
                    } else {
                        errors.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                }
                let _ = ws.close(None).await;
            }
        }));
    }
    // Token churn: mint, use once, revoke, check it is refused.
    {
        let (tls, host, mint, key, churned, errors) = (
            tls.clone(),
            host.clone(),
            mint.clone(),
            key.clone(),
            Arc::clone(&churned),
            Arc::clone(&errors),
        );
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                let (token, jti) = mint().await;
                let ok = tls
                    .get(&host, "/", &[("x-sandgate-token", &token)])
                    .await
                    .status()
                    == 200;
                let req = Request::builder()
                    .method(Method::DELETE)
                    .uri(format!("/v1/connect-tokens/{jti}"))
                    .header("host", BASE)
                    .header("authorization", format!("Bearer {key}"))
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                let revoked = tls.send(req).await.unwrap().status() == 204;
                let refused = tls
                    .get(&host, "/", &[("x-sandgate-token", &token)])
                    .await
                    .status()
                    == 401;
                if ok && revoked && refused {
                    churned.fetch_add(1, Ordering::Relaxed);
                } else {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }

    let mut samples = Vec::new();
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_secs(1)).await;
        samples.push(rss_kib(pid));
    }
    for t in tasks {
        t.await.unwrap();
    }
    child.kill().await.unwrap();

    let (r, m, c, e) = (
        requests.load(Ordering::Relaxed),
        messages.load(Ordering::Relaxed),
        churned.load(Ordering::Relaxed),
        errors.load(Ordering::Relaxed),
    );
    // Growth trend: the mean of the last fifth against the mean of the second fifth (the first
    // fifth is warm-up: caches and pools filling).
    let fifth = (samples.len() / 5).max(1);
    let mean = |s: &[u64]| s.iter().sum::<u64>() / s.len().max(1) as u64;
    let early = mean(&samples[fifth.min(samples.len() - 1)..(2 * fifth).min(samples.len())]);
    let late = mean(&samples[samples.len() - fifth..]);
    let peak = samples.iter().max().copied().unwrap_or(0);
    eprintln!(
        "soak {secs}s: {r} requests, {m} websocket messages, {c} token churns, {e} errors; \
         RSS KiB early {early} late {late} peak {peak}; samples {samples:?}"
    );
    assert_eq!(e, 0, "errors under load");
    assert!(r > 0 && m > 0 && c > 0, "every kind of traffic ran");
    assert!(
        late <= early + early / 5 + 8 * 1024,
        "RSS grew from {early} KiB to {late} KiB"
    );
}
