//! Control-plane benchmark against a running gateway: sandbox create-to-running latency
//! (median of 20, a trivial server), exec round trip (median of 20), and connect-token
//! issuance rate with 16 concurrent TLS clients.
//!
//! ```sh
//! SANDGATE_URL=https://sandbox.localhost:8443 SANDGATE_CA_CERT=data/certs/ca.pem \
//! SANDGATE_API_KEY=$(cat data/admin.key) cargo run --release --example control_bench
//! ```
//! The gateway needs `[api] requests_per_second` high enough not to throttle the run.

use std::time::{Duration, Instant};

use http::Method;
use sandgate::client::ApiClient;
use serde_json::{json, Value};

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("set {name}"))
}

fn client() -> ApiClient {
    let ca = std::env::var("SANDGATE_CA_CERT").ok();
    ApiClient::new(
        &env("SANDGATE_URL"),
        Some(env("SANDGATE_API_KEY")),
        ca.as_deref().map(std::path::Path::new),
    )
    .expect("client")
}

async fn call(c: &ApiClient, method: Method, path: &str, body: Option<Value>) -> Value {
    let r = c.call(method, path, body.as_ref()).await.expect("call");
    assert!(r.status.is_success(), "{path}: {} {:?}", r.status, r.body);
    r.json().expect("json")
}

fn median(v: Vec<Duration>) -> Duration {
    percentile(v, 50)
}

/// The `p`th percentile (nearest rank).
fn percentile(mut v: Vec<Duration>, p: usize) -> Duration {
    v.sort();
    let rank = (v.len() * p).div_ceil(100).max(1);
    v[rank - 1]
}

#[tokio::main]
async fn main() {
    let c = client();
    let runs: usize = std::env::var("RUNS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(20);

    // Create to running: a trivial server that listens at once.
    let mut startup = Vec::new();
    let mut last = String::new();
    for _ in 0..runs {
        let t = Instant::now();
        let s = call(
            &c,
            Method::POST,
            "/v1/sandboxes",
            Some(json!({
                "command": ["python3", "-c", "import socket,os,time; s=socket.socket(); s.bind(('127.0.0.1', int(os.environ['PORT']))); s.listen(); time.sleep(600)"],
                "ports": [8000]
            })),
        )
        .await;
        let id = s["id"].as_str().expect("id").to_string();
        loop {
            let v = call(&c, Method::GET, &format!("/v1/sandboxes/{id}"), None).await;
            match v["status"].as_str() {
                Some("running") => break,
                Some("starting") => tokio::time::sleep(Duration::from_millis(5)).await,
                other => panic!("sandbox {id} went {other:?}: {}", v["detail"]),
            }
        }
        startup.push(t.elapsed());
        if !last.is_empty() {
            call(&c, Method::DELETE, &format!("/v1/sandboxes/{last}"), None).await;
        }
        last = id;
    }
    println!(
        "create-to-running: median {:.1} ms, p99 {:.1} ms, min {:.1} ms, max {:.1} ms (n={runs}, 5 ms poll)",
        median(startup.clone()).as_secs_f64() * 1e3,
        percentile(startup.clone(), 99).as_secs_f64() * 1e3,
        startup.iter().min().expect("runs").as_secs_f64() * 1e3,
        startup.iter().max().expect("runs").as_secs_f64() * 1e3,
    );

    // Exec round trip.
    let mut execs = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        let v = call(
            &c,
            Method::POST,
            &format!("/v1/sandboxes/{last}/exec"),
            Some(json!({"command": ["true"]})),
        )
        .await;
        assert_eq!(v["exit_code"], 0);
        execs.push(t.elapsed());
    }
    println!(
        "exec round trip (`true`): median {:.1} ms, p99 {:.1} ms, min {:.1} ms, max {:.1} ms (n={runs})",
        median(execs.clone()).as_secs_f64() * 1e3,
        percentile(execs.clone(), 99).as_secs_f64() * 1e3,
        execs.iter().min().expect("runs").as_secs_f64() * 1e3,
        execs.iter().max().expect("runs").as_secs_f64() * 1e3,
    );

    // Token issuance: 16 clients, each with its own TLS connection, for 5 s.
    let secs = 5.0;
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let c = client();
        let path = format!("/v1/sandboxes/{last}/connect-tokens");
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < deadline {
                call(&c, Method::POST, &path, Some(json!({"port": 8000}))).await;
                n += 1;
            }
            n
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.expect("task");
    }
    println!(
        "token issuance: {total} tokens in {secs} s = {:.0} tokens/s (16 concurrent TLS clients)",
        total as f64 / secs
    );
    call(&c, Method::DELETE, &format!("/v1/sandboxes/{last}"), None).await;
}
