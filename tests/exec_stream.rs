//! The streaming exec (`GET /v1/sandboxes/{id}/exec` with a WebSocket upgrade) against a
//! real gateway and isolated sandboxes: output arrives as it is printed, stdin reaches the
//! command and its end closes it, exit codes and timeouts come back in the last message, a
//! closed socket kills the command, a client that stops reading stops the command, and bad
//! input ends the session with a close frame that says why.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures_util::{SinkExt, StreamExt};
use http::{Method, StatusCode};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

type Ws = WebSocketStream<TlsStream<TcpStream>>;

/// Isolation needs root (as in CI); elsewhere these tests say so and pass vacuously.
fn can_isolate() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    eprintln!("skipped: isolation tests need root");
    false
}

/// A running isolated sandbox on the host image.
async fn sandbox(gw: &TestGateway) -> String {
    let (status, v) = gw
        .api(
            Method::POST,
            "/v1/sandboxes",
            Some(json!({"command": ["python3", "-m", "http.server", "8000"], "ports": [8000]})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    assert_eq!(v["isolation"], "namespaces", "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    wait_for_status(gw, &id, &["running"], Duration::from_secs(20)).await;
    id
}

async fn open(gw: &TestGateway, key: &str, id: &str) -> Ws {
    let auth = format!("Bearer {key}");
    let (ws, resp) = websocket(
        &gw.tls(),
        BASE,
        &format!("/v1/sandboxes/{id}/exec"),
        &[("authorization", &auth)],
    )
    .await
    .expect("upgrade");
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    ws
}

/// Opens a session as the admin and sends its start message.
async fn start(gw: &TestGateway, id: &str, start: Value) -> Ws {
    let mut ws = open(gw, &gw.admin_key, id).await;
    ws.send(Message::text(start.to_string())).await.unwrap();
    ws
}

fn stdin(bytes: &[u8]) -> Message {
    let mut frame = vec![0u8];
    frame.extend_from_slice(bytes);
    Message::binary(frame)
}

/// Everything a session sent, up to its close.
#[derive(Default, Debug)]
struct Session {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    /// Each stdout frame and when it arrived.
    arrivals: Vec<(Instant, Vec<u8>)>,
    exit: Option<Value>,
    close: Option<CloseFrame>,
}

async fn collect(ws: &mut Ws, within: Duration) -> Session {
    let mut s = Session::default();
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let next = tokio::time::timeout_at(deadline, ws.next())
            .await
            .unwrap_or_else(|_| panic!("the session did not end within {within:?}: {s:?}"));
        match next {
            Some(Ok(Message::Binary(b))) => {
                assert!(s.exit.is_none(), "output after the exit message");
                match b[0] {
                    1 => {
                        s.stdout.extend_from_slice(&b[1..]);
                        s.arrivals.push((Instant::now(), b[1..].to_vec()));
                    }
                    2 => s.stderr.extend_from_slice(&b[1..]),
                    c => panic!("unexpected channel {c}"),
                }
            }
            Some(Ok(Message::Text(t))) => {
                assert!(s.exit.is_none(), "two exit messages");
                s.exit = Some(serde_json::from_str(t.as_str()).unwrap());
            }
            Some(Ok(Message::Close(c))) => {
                s.close = c;
                // Answer the close, as a client does.
                while let Some(Ok(_)) = ws.next().await {}
                return s;
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => panic!("the session failed: {e} ({s:?})"),
            None => return s,
        }
    }
}

fn sh(script: &str) -> Value {
    json!({"command": ["sh", "-c", script]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_arrives_as_it_is_printed_and_exit_codes_come_last() {
    if !can_isolate() {
        return;
    }
    let gw = TestGateway::start().await;
    let id = sandbox(&gw).await;

    let mut ws = start(&gw, &id, sh("for i in 1 2 3; do echo $i; sleep 1; done")).await;
    let s = collect(&mut ws, Duration::from_secs(20)).await;
    assert_eq!(s.stdout, b"1\n2\n3\n", "{s:?}");
    assert_eq!(s.arrivals.len(), 3, "one frame a line: {s:?}");
    for pair in s.arrivals.windows(2) {
        let gap = pair[1].0 - pair[0].0;
        assert!(
            gap >= Duration::from_millis(800),
            "lines {gap:?} apart: {s:?}"
        );
    }
    assert_eq!(s.exit.as_ref().unwrap()["exit_code"], 0, "{s:?}");
    assert_eq!(s.close.unwrap().code, CloseCode::Normal);

    let mut ws = start(&gw, &id, sh("echo out; echo err >&2; exit 3")).await;
    let s = collect(&mut ws, Duration::from_secs(20)).await;
    assert_eq!(s.stdout, b"out\n");
    assert_eq!(s.stderr, b"err\n");
    let exit = s.exit.unwrap();
    assert_eq!(exit["exit_code"], 3, "{exit}");
    assert_eq!(exit["signal"], Value::Null, "{exit}");
    assert_eq!(exit["timed_out"], false, "{exit}");

    // Inside the sandbox, as its user, with the exec's own environment.
    let mut ws = start(
        &gw,
        &id,
        json!({"command": ["sh", "-c", "echo $MARK $(id -u) $SANDGATE_SANDBOX_ID"], "env": {"MARK": "m1"}}),
    )
    .await;
    let s = collect(&mut ws, Duration::from_secs(20)).await;
    let out = String::from_utf8(s.stdout).unwrap();
    assert!(
        out.starts_with("m1 ") && out.trim_end().ends_with(&id),
        "{out}"
    );
    assert_ne!(out.split(' ').nth(1), Some("0"), "not as root: {out}");

    // A timeout kills it and says so.
    let started = Instant::now();
    let mut ws = start(
        &gw,
        &id,
        json!({"command": ["sleep", "60"], "timeout_secs": 1}),
    )
    .await;
    let s = collect(&mut ws, Duration::from_secs(20)).await;
    let exit = s.exit.unwrap();
    assert_eq!(exit["timed_out"], true, "{exit}");
    assert_eq!(exit["exit_code"], Value::Null, "{exit}");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );

    // A command that cannot run: the launcher's message and exit code 127.
    let mut ws = start(&gw, &id, json!({"command": ["/no/such/program"]})).await;
    let s = collect(&mut ws, Duration::from_secs(20)).await;
    assert_eq!(s.exit.unwrap()["exit_code"], 127);
    assert!(!s.stderr.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdin_reaches_the_command_and_its_end_closes_it() {
    if !can_isolate() {
        return;
    }
    let gw = TestGateway::start().await;
    let id = sandbox(&gw).await;

    let ws = start(&gw, &id, json!({"command": ["cat"]})).await;
    let (mut tx, mut rx) = ws.split();
    // More than any pipe holds, so input and output have to flow at once.
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        for chunk in sent.chunks(100_000) {
            tx.send(stdin(chunk)).await.unwrap();
        }
        // An empty stdin frame: end of input.
        tx.send(stdin(b"")).await.unwrap();
        tx
    });
    let mut out = Vec::new();
    let mut exit = None;
    while let Some(msg) = tokio::time::timeout(Duration::from_secs(30), rx.next())
        .await
        .expect("cat answers")
    {
        match msg.unwrap() {
            Message::Binary(b) if b[0] == 1 => out.extend_from_slice(&b[1..]),
            Message::Text(t) => exit = Some(serde_json::from_str::<Value>(t.as_str()).unwrap()),
            Message::Close(_) => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    let _tx = writer.await.unwrap();
    assert_eq!(out.len(), data.len());
    assert!(out == data, "cat gave back other bytes");
    assert_eq!(exit.unwrap()["exit_code"], 0);
}

/// Pids whose environment carries `entry`.
fn pids_with_env(entry: &str) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| env.split(|b| *b == 0).any(|e| e == entry.as_bytes()))
        })
        .filter(|pid| process_alive(*pid))
        .collect()
}

async fn wait_for_pids(entry: &str, within: Duration) -> Vec<i32> {
    let deadline = Instant::now() + within;
    loop {
        let pids = pids_with_env(entry);
        if !pids.is_empty() {
            return pids;
        }
        assert!(Instant::now() < deadline, "no process has {entry}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_pids_gone(entry: &str, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let pids = pids_with_env(entry);
        if pids.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "processes with {entry} still alive after {within:?}: {pids:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_the_socket_kills_the_command() {
    if !can_isolate() {
        return;
    }
    let gw = TestGateway::start().await;
    let id = sandbox(&gw).await;

    // A close frame from the client.
    let mark = format!("EXEC_MARK={}", rand_mark());
    let mut ws = start(
        &gw,
        &id,
        json!({"command": ["sh", "-c", "sleep 300 & sleep 300"], "env": {"EXEC_MARK": &mark[10..]}}),
    )
    .await;
    let pids = wait_for_pids(&mark, Duration::from_secs(10)).await;
    assert!(pids.len() >= 2, "{pids:?}");
    ws.close(None).await.unwrap();
    wait_pids_gone(&mark, Duration::from_secs(2)).await;

    // A connection that just drops.
    let mark = format!("EXEC_MARK={}", rand_mark());
    let ws = start(
        &gw,
        &id,
        json!({"command": ["sleep", "300"], "env": {"EXEC_MARK": &mark[10..]}}),
    )
    .await;
    wait_for_pids(&mark, Duration::from_secs(10)).await;
    drop(ws);
    wait_pids_gone(&mark, Duration::from_secs(2)).await;

    // And the sandbox's own command lives on.
    let v = wait_for_status(&gw, &id, &["running"], Duration::from_secs(1)).await;
    assert_eq!(v["status"], "running");
}

fn rand_mark() -> String {
    format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_stops_the_command() {
    if !can_isolate() {
        return;
    }
    let gw = TestGateway::start().await;
    let id = sandbox(&gw).await;

    // 1000 × 64 KiB, noting its progress after each.
    let script = "i=0; while [ $i -lt 1000 ]; do head -c 65536 /dev/zero; i=$((i+1)); echo $i > /tmp/progress; done";
    let mut ws = start(&gw, &id, sh(script)).await;
    let progress = || async {
        let (status, v) = gw
            .api(
                Method::POST,
                &format!("/v1/sandboxes/{id}/exec"),
                Some(json!({"command": ["cat", "/tmp/progress"]})),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{v}");
        v["stdout"]
            .as_str()
            .unwrap()
            .trim()
            .parse::<u32>()
            .unwrap_or(0)
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let first = progress().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let second = progress().await;
    // What sits in the pipe, the gateway's few chunks and the sockets' buffers: a few MiB.
    assert!(second < 1000, "the command ran to its end unread");
    assert_eq!(first, second, "the command went on while nobody read");
    eprintln!("stalled after {second} × 64 KiB");
    let s = collect(&mut ws, Duration::from_secs(60)).await;
    assert_eq!(s.stdout.len(), 1000 * 65536);
    assert_eq!(s.exit.unwrap()["exit_code"], 0);
}

async fn refused_with(ws: &mut Ws) -> CloseFrame {
    let s = collect(ws, Duration::from_secs(10)).await;
    assert!(s.exit.is_none(), "{s:?}");
    s.close.expect("a close frame with a reason")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_ends_the_session_with_a_reason() {
    if !can_isolate() {
        return;
    }
    let gw = TestGateway::start().await;
    let id = sandbox(&gw).await;

    let mut ws = open(&gw, &gw.admin_key, &id).await;
    ws.send(Message::text("not json")).await.unwrap();
    let close = refused_with(&mut ws).await;
    assert_eq!(close.code, CloseCode::Policy);
    assert!(close.reason.contains("start message"), "{close:?}");

    let mut ws = open(&gw, &gw.admin_key, &id).await;
    ws.send(Message::binary(vec![0u8, 1, 2])).await.unwrap();
    assert_eq!(refused_with(&mut ws).await.code, CloseCode::Unsupported);

    let mut ws = start(&gw, &id, json!({"command": []})).await;
    assert_eq!(refused_with(&mut ws).await.code, CloseCode::Policy);

    let mut ws = start(&gw, &id, json!({"command": ["cat"], "nonsense": 1})).await;
    assert_eq!(refused_with(&mut ws).await.code, CloseCode::Policy);

    let mut ws = start(&gw, &id, json!({"command": ["cat"]})).await;
    ws.send(Message::binary(vec![7u8, b'x'])).await.unwrap();
    let close = refused_with(&mut ws).await;
    assert_eq!(close.code, CloseCode::Policy);
    assert!(close.reason.contains("unknown channel 7"), "{close:?}");

    let mut ws = start(&gw, &id, json!({"command": ["cat"]})).await;
    ws.send(Message::binary(b"\x04{\"cols\":10,\"rows\":5}".to_vec()))
        .await
        .unwrap();
    let close = refused_with(&mut ws).await;
    assert!(close.reason.contains("tty"), "{close:?}");

    let mut ws = start(&gw, &id, json!({"command": ["cat"]})).await;
    ws.send(Message::text("{}")).await.unwrap();
    assert_eq!(refused_with(&mut ws).await.code, CloseCode::Unsupported);

    let mut ws = start(&gw, &id, json!({"command": ["cat"]})).await;
    let mut big = vec![0u8; 1024 * 1024 + 1];
    big[0] = 0;
    let _ = ws.send(Message::binary(big)).await;
    let close = refused_with(&mut ws).await;
    assert_eq!(close.code, CloseCode::Size, "{close:?}");

    // After all that, the gateway streams on.
    let mut ws = start(&gw, &id, sh("echo still")).await;
    let s = collect(&mut ws, Duration::from_secs(20)).await;
    assert_eq!(s.stdout, b"still\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_owner_with_write_scope_gets_an_upgrade() {
    if !can_isolate() {
        return;
    }
    let gw = TestGateway::start().await;
    let id = sandbox(&gw).await;
    let path = format!("/v1/sandboxes/{id}/exec");
    let refused = |key: String| {
        let (tls, path) = (gw.tls(), path.clone());
        async move {
            let auth = format!("Bearer {key}");
            match websocket(&tls, BASE, &path, &[("authorization", &auth)]).await {
                Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => resp.status(),
                other => panic!("upgraded: {:?}", other.map(|(_, r)| r.status())),
            }
        }
    };
    let (_, other) = create_credential(
        &gw,
        json!({"name": "other", "scopes": ["sandboxes:read", "sandboxes:write"]}),
    )
    .await;
    assert_eq!(refused(other).await, StatusCode::NOT_FOUND);
    let (_, reader) =
        create_credential(&gw, json!({"name": "reader", "scopes": ["sandboxes:read"]})).await;
    assert_eq!(refused(reader).await, StatusCode::FORBIDDEN);
    assert_eq!(
        refused("sk_nonsense".into()).await,
        StatusCode::UNAUTHORIZED
    );
    let (status, _) = gw
        .api(Method::GET, "/v1/sandboxes/sb_nosuch/exec", None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // A plain GET (no upgrade) is refused; the one-shot POST still works.
    let (status, v) = gw.api(Method::GET, &path, None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    let (status, v) = gw
        .api(
            Method::POST,
            &path,
            Some(json!({"command": ["echo", "hi"]})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["stdout"], "hi\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_sandboxes_stream_too() {
    let gw = TestGateway::start_with(
        "[orchestrator]\nisolation = \"none\"\nport_range = \"31580-31589\"\ngrace_secs = 1\n",
    )
    .await;
    let (status, v) = gw
        .api(
            Method::POST,
            "/v1/sandboxes",
            Some(json!({"command": ["sh", "-c", "exec python3 -m http.server $PORT --bind 127.0.0.1"], "ports": [8000]})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    assert_eq!(v["isolation"], "none", "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    wait_for_status(&gw, &id, &["running"], Duration::from_secs(20)).await;

    let mut ws = start(&gw, &id, sh("read line; echo got $line; exit 4")).await;
    ws.send(stdin(b"hello\n")).await.unwrap();
    let s = collect(&mut ws, Duration::from_secs(20)).await;
    assert_eq!(s.stdout, b"got hello\n", "{s:?}");
    assert_eq!(s.exit.unwrap()["exit_code"], 4);

    let mark = format!("EXEC_MARK={}", rand_mark());
    let ws = start(
        &gw,
        &id,
        json!({"command": ["sleep", "300"], "env": {"EXEC_MARK": &mark[10..]}}),
    )
    .await;
    wait_for_pids(&mark, Duration::from_secs(10)).await;
    drop(ws);
    wait_pids_gone(&mark, Duration::from_secs(2)).await;
    let (status, _) = gw
        .api(Method::DELETE, &format!("/v1/sandboxes/{id}"), None)
        .await;
    assert!(status.is_success(), "{status}");
}
