//! `idle_timeout_secs`: a `command` sandbox with no proxied request, no open connection and
//! no exec for that long is ended as `stopped`, saying why; any of the three keeps it alive.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};

/// Real sandboxes need root (as in CI); elsewhere these tests say so and pass vacuously.
fn can_isolate() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    eprintln!("skipped: idle timeout tests run real sandboxes, which need root");
    false
}

/// Serves `/` and, on `/stream`, an endless event stream with a line every 100 ms.
const STREAMING_SERVER: &str = r#"
import http.server, time
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        if self.path == "/stream":
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()
            while True:
                data = b"data: tick\n\n"
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()
                time.sleep(0.1)
        body = b"hello"
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", 8000), H).serve_forever()
"#;

/// A running sandbox with `idle_timeout_secs` 3, serving `command` on port 8000.
async fn idle_sandbox(gw: &TestGateway, command: Value) -> String {
    let (status, v) = gw
        .api(
            Method::POST,
            "/v1/sandboxes",
            Some(json!({"command": command, "ports": [8000], "idle_timeout_secs": 3})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    assert_eq!(v["idle_timeout_secs"], 3, "{v}");
    assert_eq!(v["isolation"], "namespaces", "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    wait_for_status(gw, &id, &["running"], Duration::from_secs(20)).await;
    id
}

async fn status_of(gw: &TestGateway, id: &str) -> Value {
    let (status, v) = gw
        .api(Method::GET, &format!("/v1/sandboxes/{id}"), None)
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    v
}

/// Waits for the idle end and checks how it is reported.
async fn assert_ends_idle(gw: &TestGateway, id: &str, within: Duration) -> Value {
    let v = wait_for_status(gw, id, &["stopped", "failed"], within).await;
    assert_eq!(v["status"], "stopped", "{v}");
    let detail = v["detail"].as_str().unwrap_or("");
    assert!(detail.contains("idle timeout"), "{v}");
    assert!(detail.contains("3 s"), "{v}");
    v
}

async fn get_root(gw: &TestGateway, id: &str, token: &str) -> StatusCode {
    gw.tls()
        .get(&sandbox_host(8000, id), "/", &[("x-sandgate-token", token)])
        .await
        .status()
}

#[tokio::test]
async fn a_sandbox_with_no_traffic_stops_after_its_idle_timeout() {
    if !can_isolate() {
        return;
    }
    let gw = TestGateway::start().await;
    let id = idle_sandbox(&gw, json!(["python3", "-m", "http.server", "8000"])).await;
    let running = Instant::now();
    let pid = gw
        .gw
        .store
        .sandbox(&id)
        .await
        .unwrap()
        .unwrap()
        .process
        .pgid;

    assert_ends_idle(&gw, &id, Duration::from_secs(8)).await;
    let after = running.elapsed();
    assert!(
        after >= Duration::from_millis(2500),
        "ended {after:?} after it started running, before its 3 s idle timeout"
    );
    // Nothing of it is left, and its end is in the audit log.
    wait_processes_gone(&id, pid, Duration::from_secs(10)).await;
    let (status, audit) = gw.api(Method::GET, "/v1/audit?limit=100", None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        audit["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["action"] == "sandbox.idle" && e["target"] == id.as_str()),
        "{audit}"
    );
}

#[tokio::test]
async fn requests_keep_a_sandbox_alive_until_they_stop() {
    if !can_isolate() {
        return;
    }
    let gw = TestGateway::start().await;
    let id = idle_sandbox(&gw, json!(["python3", "-m", "http.server", "8000"])).await;
    let token = gw.token(&id, 8000).await;

    // A request a second for 8 s, each on a connection of its own (closed when answered):
    // past the 3 s timeout, and nothing but the requests keeps it.
    let busy = Instant::now();
    while busy.elapsed() < Duration::from_secs(8) {
        assert_eq!(get_root(&gw, &id, &token).await, StatusCode::OK);
        assert_eq!(status_of(&gw, &id).await["status"], "running");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let quiet = Instant::now();
    assert_ends_idle(&gw, &id, Duration::from_secs(8)).await;
    let after = quiet.elapsed();
    assert!(
        after >= Duration::from_millis(1500),
        "ended {after:?} after the last request"
    );
    // Its tokens now answer that it has ended.
    assert_eq!(get_root(&gw, &id, &token).await, StatusCode::GONE);
}

#[tokio::test]
async fn an_open_streaming_response_keeps_a_sandbox_alive() {
    if !can_isolate() {
        return;
    }
    let gw = TestGateway::start().await;
    let id = idle_sandbox(&gw, json!(["python3", "-c", STREAMING_SERVER])).await;
    let token = gw.token(&id, 8000).await;
    let host = sandbox_host(8000, &id);

    // One request, then only the stream's bytes for 7 s: the open connection keeps it.
    let mut sender = gw.tls().h1(&host).await;
    let req = Request::builder()
        .uri("/stream")
        .header("host", &host)
        .header("x-sandgate-token", &token)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let open = Instant::now();
    let mut ticks = 0;
    while open.elapsed() < Duration::from_secs(7) {
        let frame = tokio::time::timeout(Duration::from_secs(2), body.frame())
            .await
            .expect("the stream goes on")
            .expect("the stream goes on")
            .unwrap();
        if frame.data_ref().is_some_and(|d| !d.is_empty()) {
            ticks += 1;
        }
    }
    assert!(ticks > 20, "{ticks} stream events in 7 s");
    assert_eq!(status_of(&gw, &id).await["status"], "running");

    // Closed: idle from then on.
    drop(body);
    drop(sender);
    let closed = Instant::now();
    assert_ends_idle(&gw, &id, Duration::from_secs(10)).await;
    let after = closed.elapsed();
    assert!(
        after >= Duration::from_millis(1500),
        "ended {after:?} after the stream closed"
    );
}

#[tokio::test]
async fn a_running_exec_keeps_a_sandbox_alive() {
    if !can_isolate() {
        return;
    }
    let gw = TestGateway::start().await;
    let id = idle_sandbox(&gw, json!(["python3", "-m", "http.server", "8000"])).await;

    let (status, v) = gw
        .api(
            Method::POST,
            &format!("/v1/sandboxes/{id}/exec"),
            Some(json!({"command": ["sleep", "6"], "timeout_secs": 30})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["exit_code"], 0, "the exec ran to its end: {v}");
    assert!(v["duration_ms"].as_u64().unwrap() >= 5900, "{v}");
    // Twice its timeout since it started running, and still running.
    assert_eq!(status_of(&gw, &id).await["status"], "running");

    let done = Instant::now();
    assert_ends_idle(&gw, &id, Duration::from_secs(8)).await;
    assert!(done.elapsed() >= Duration::from_millis(1500));
}

#[tokio::test]
async fn idle_timeout_values_out_of_range_are_refused_naming_the_field() {
    let gw = TestGateway::start().await;
    for bad in [json!(0), json!(604_801), json!(-1), json!(2.5), json!("3")] {
        let (status, v) = gw
            .api(
                Method::POST,
                "/v1/sandboxes",
                Some(
                    json!({"command": ["sleep", "60"], "ports": [8000], "idle_timeout_secs": bad}),
                ),
            )
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{bad}: {v}");
        let message = v["error"]["message"].as_str().unwrap();
        assert!(message.contains("idle_timeout_secs"), "{bad}: {v}");
    }
    // An `upstream` sandbox runs elsewhere: the node that runs it ends it, not the gateway.
    let (status, v) = gw
        .api(
            Method::POST,
            "/v1/sandboxes",
            Some(json!({"upstream": "127.0.0.1", "ports": [8000], "idle_timeout_secs": 60})),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("idle_timeout_secs") && message.contains("command"),
        "{v}"
    );
    assert_eq!(
        gw.api(Method::GET, "/v1/sandboxes", None).await.1["items"],
        json!([])
    );
}
