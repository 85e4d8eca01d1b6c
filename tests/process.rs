//! The process driver: `command` sandboxes run as real process groups under their limits, are
//! served through the gateway, and leave nothing behind when they end — not even when the
//! gateway itself is killed.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};

/// Config for a gateway whose sandboxes take host ports from `range` only, so tests running in
/// parallel never compete for a port.
fn ports(range: &str) -> String {
    format!("[orchestrator]\nisolation = \"none\"\nport_range = \"{range}\"\ngrace_secs = 2\n")
}

const HTTP_SERVER: &str = "exec python3 -m http.server $PORT --bind 127.0.0.1";

/// Kills whatever a test's sandboxes left running if the test fails half-way (a passing test
/// ends them itself), so a failure never leaves orphans on the machine.
struct Reaper(Vec<String>);

impl Reaper {
    fn watch(&mut self, id: &str) {
        self.0.push(id.to_string());
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        for id in &self.0 {
            for pid in sandbox_pids(id) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

async fn create(gw: &TestGateway, body: Value) -> Value {
    let (status, v) = gw.api(Method::POST, "/v1/sandboxes", Some(body)).await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    v
}

async fn exec(gw: &TestGateway, id: &str, body: Value) -> Value {
    let (status, v) = gw
        .api(
            Method::POST,
            &format!("/v1/sandboxes/{id}/exec"),
            Some(body),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    v
}

async fn pgid_of(gw: &TestGateway, id: &str) -> i32 {
    gw.gw
        .store
        .sandbox(id)
        .await
        .unwrap()
        .expect("stored sandbox")
        .process
        .pgid
        .expect("a running sandbox has a process group")
}

/// A sandbox whose process only sleeps (ending by itself in `secs` at worst), for exec tests.
async fn sleeper(gw: &TestGateway, reaper: &mut Reaper, extra: Value) -> String {
    let mut body = json!({"command": ["sh", "-c", "exec sleep 60"], "ports": [8000]});
    if let Value::Object(m) = extra {
        for (k, v) in m {
            body[k] = v;
        }
    }
    let id = create(gw, body).await["id"].as_str().unwrap().to_string();
    reaper.watch(&id);
    id
}

#[tokio::test]
async fn a_command_sandbox_runs_is_served_and_leaves_nothing_behind() {
    let gw = TestGateway::start_with(&ports("31000-31049")).await;
    let mut reaper = Reaper(Vec::new());
    let v = create(
        &gw,
        json!({"command": ["sh", "-c", HTTP_SERVER], "ports": [8000], "metadata": {"k": "v"}}),
    )
    .await;
    let id = v["id"].as_str().unwrap().to_string();
    reaper.watch(&id);
    assert_eq!(v["status"], "starting", "{v}");
    assert_eq!(v["ports"], json!([8000]));
    assert!(v.get("upstream").is_none(), "{v}");

    let v = wait_for_status(&gw, &id, &["running", "failed"], Duration::from_secs(15)).await;
    assert_eq!(v["status"], "running", "{v}");
    let record = gw.gw.store.sandbox(&id).await.unwrap().unwrap();
    let host_port = record.host_ports[&8000];
    assert!((31000..=31049).contains(&host_port), "{host_port}");
    let pgid = record.process.pgid.unwrap();
    assert!(process_alive(pgid));
    assert_eq!(
        sandbox_pids(&id),
        vec![pgid],
        "the server is the group leader"
    );
    // It runs in its own directory, in its own process group.
    let cwd = std::fs::read_link(format!("/proc/{pgid}/cwd")).unwrap();
    assert_eq!(cwd, gw.dir.join("data").join("sandboxes").join(&id));
    let stat = std::fs::read_to_string(format!("/proc/{pgid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    assert_eq!(fields[2], pgid.to_string(), "its own process group: {stat}");

    // Served through the gateway at the published port, not the host port.
    let token = gw.token(&id, 8000).await;
    let host = sandbox_host(8000, &id);
    let resp = gw
        .tls()
        .get(&host, "/", &[("x-sandgate-token", &token)])
        .await;
    assert_eq!(resp.status(), StatusCode::OK, "{:?}", resp.body());
    let page = String::from_utf8_lossy(resp.body()).into_owned();
    assert!(page.contains("Directory listing"), "{page}");
    let resp = gw.tls().get(&host, "/", &[]).await;
    assert_eq!(
        resp.status(),
        StatusCode::UNAUTHORIZED,
        "no token, no entry"
    );

    // Terminate: the whole group goes, and the token stops working.
    let started = Instant::now();
    let (status, _) = gw
        .api(Method::DELETE, &format!("/v1/sandboxes/{id}"), None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    wait_processes_gone(&id, Some(pgid), Duration::from_secs(5)).await;
    assert!(!Path::new(&format!("/proc/{pgid}")).exists() || !process_alive(pgid));
    assert!(started.elapsed() < Duration::from_secs(5));
    let (_, v) = gw
        .api(Method::GET, &format!("/v1/sandboxes/{id}"), None)
        .await;
    assert_eq!(v["status"], "stopped", "{v}");
    assert!(v["ended_at"].is_string(), "{v}");
    let resp = gw
        .tls()
        .get(&host, "/", &[("x-sandgate-token", &token)])
        .await;
    assert_eq!(resp.status(), StatusCode::GONE, "{:?}", resp.body());
    assert_eq!(error_code(&resp), "sandbox_terminated");
    // The host port is free again.
    assert!(std::net::TcpListener::bind(("127.0.0.1", host_port)).is_ok());
    // An ended sandbox mints no tokens and runs no commands.
    let (status, _) = gw
        .api(
            Method::POST,
            &format!("/v1/sandboxes/{id}/connect-tokens"),
            Some(json!({"port": 8000})),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    let (status, _) = gw
        .api(
            Method::POST,
            &format!("/v1/sandboxes/{id}/exec"),
            Some(json!({"command": ["true"]})),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    gw.stop().await;
}

#[tokio::test]
async fn the_command_gets_its_ports_and_id_but_not_the_gateways_secrets() {
    // A variable only this test sets: the environment is shared by every test in the binary.
    let secret_name = format!("SANDGATE_TEST_SECRET_{}", std::process::id());
    std::env::set_var(&secret_name, "do-not-pass-me-on");
    let gw = TestGateway::start_with(&ports("31050-31099")).await;
    let mut reaper = Reaper(Vec::new());
    // Published ports listed out of order: PORT is the first one listed.
    let id = sleeper(
        &gw,
        &mut reaper,
        json!({"ports": [9000, 8000], "env": {"GREETING": "hello"}}),
    )
    .await;
    let record = gw.gw.store.sandbox(&id).await.unwrap().unwrap();
    let (p9000, p8000) = (record.host_ports[&9000], record.host_ports[&8000]);
    assert_ne!(p9000, p8000);

    let out = exec(&gw, &id, json!({"command": ["env"], "env": {"EXTRA": "1"}})).await;
    assert_eq!(out["exit_code"], 0, "{out}");
    let env: Vec<&str> = out["stdout"].as_str().unwrap().lines().collect();
    for expected in [
        format!("PORT={p9000}"),
        format!("PORT_9000={p9000}"),
        format!("PORT_8000={p8000}"),
        format!("SANDGATE_SANDBOX_ID={id}"),
        "GREETING=hello".to_string(),
        "EXTRA=1".to_string(),
    ] {
        assert!(
            env.contains(&expected.as_str()),
            "{expected} missing: {env:?}"
        );
    }
    assert!(
        !env.iter().any(|l| l.starts_with(&secret_name)),
        "the gateway's own variable leaked: {env:?}"
    );
    // The same for the sandbox's own process.
    let pgid = pgid_of(&gw, &id).await;
    let environ = std::fs::read(format!("/proc/{pgid}/environ")).unwrap();
    let environ: Vec<String> = environ
        .split(|b| *b == 0)
        .map(|e| String::from_utf8_lossy(e).into_owned())
        .collect();
    assert!(environ.contains(&format!("PORT={p9000}")), "{environ:?}");
    assert!(environ.contains(&format!("SANDGATE_SANDBOX_ID={id}")));
    assert!(environ.contains(&"GREETING=hello".to_string()));
    assert!(!environ.iter().any(|e| e.starts_with(&secret_name)));
    std::env::remove_var(&secret_name);

    // exec cannot override what the gateway sets.
    let out = exec(
        &gw,
        &id,
        json!({"command": ["sh", "-c", "echo $SANDGATE_SANDBOX_ID $PORT"],
               "env": {"SANDGATE_SANDBOX_ID": "other", "PORT": "1"}}),
    )
    .await;
    assert_eq!(out["stdout"], format!("{id} {p9000}\n"), "{out}");
    gw.stop().await;
    wait_processes_gone(&id, Some(pgid), Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_command_that_exits_at_once_fails_with_its_output() {
    let gw = TestGateway::start_with(&ports("31100-31149")).await;
    let mut reaper = Reaper(Vec::new());
    let v = create(
        &gw,
        json!({"command": ["sh", "-c", "echo boom; echo bang >&2; exit 3"], "ports": [8000]}),
    )
    .await;
    let id = v["id"].as_str().unwrap().to_string();
    reaper.watch(&id);
    let v = wait_for_status(&gw, &id, &["failed", "stopped"], Duration::from_secs(10)).await;
    assert_eq!(v["status"], "failed", "{v}");
    let detail = v["detail"].as_str().unwrap();
    assert!(
        detail.contains("boom") && detail.contains("bang"),
        "{detail}"
    );
    assert!(detail.contains("exit code 3"), "{detail}");
    assert!(v["ended_at"].is_string());
    let token_call = gw
        .api(
            Method::POST,
            &format!("/v1/sandboxes/{id}/connect-tokens"),
            Some(json!({"port": 8000})),
        )
        .await;
    assert_eq!(token_call.0, StatusCode::CONFLICT, "{}", token_call.1);

    // A command that cannot start at all is refused up front.
    let (status, v) = gw
        .api(
            Method::POST,
            "/v1/sandboxes",
            Some(json!({"command": ["/nonexistent/program"], "ports": [8000]})),
        )
        .await;
    // (prlimit starts, then fails to exec it: the sandbox fails rather than the request.)
    if status == StatusCode::CREATED {
        let id = v["id"].as_str().unwrap().to_string();
        let v = wait_for_status(&gw, &id, &["failed"], Duration::from_secs(10)).await;
        assert!(v["detail"].as_str().unwrap().contains("nonexistent"), "{v}");
    } else {
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    }
    gw.stop().await;
}

#[tokio::test]
async fn a_sandbox_ends_at_its_timeout() {
    let gw = TestGateway::start_with(&ports("31150-31199")).await;
    let mut reaper = Reaper(Vec::new());
    let started = Instant::now();
    let v = create(
        &gw,
        json!({"command": ["sh", "-c", HTTP_SERVER], "ports": [8000], "timeout_secs": 2}),
    )
    .await;
    let id = v["id"].as_str().unwrap().to_string();
    reaper.watch(&id);
    assert!(v["expires_at"].is_string(), "{v}");
    let v = wait_for_status(&gw, &id, &["running", "failed"], Duration::from_secs(10)).await;
    assert_eq!(v["status"], "running", "{v}");
    let pgid = pgid_of(&gw, &id).await;
    let token = gw.token(&id, 8000).await;

    let v = wait_for_status(&gw, &id, &["stopped", "failed"], Duration::from_secs(5)).await;
    assert_eq!(v["status"], "stopped", "{v}");
    assert!(
        started.elapsed() < Duration::from_secs(4) + Duration::from_millis(500),
        "{:?}",
        started.elapsed()
    );
    assert!(
        v["detail"].as_str().unwrap_or("").contains("timeout"),
        "{v}"
    );
    wait_processes_gone(&id, Some(pgid), Duration::from_secs(3)).await;
    let resp = gw
        .tls()
        .get(
            &sandbox_host(8000, &id),
            "/",
            &[("x-sandgate-token", &token)],
        )
        .await;
    assert_eq!(resp.status(), StatusCode::GONE);
    gw.stop().await;
}

#[tokio::test]
async fn a_memory_limit_stops_a_process_that_allocates_past_it() {
    let gw = TestGateway::start_with(&ports("31200-31249")).await;
    let mut reaper = Reaper(Vec::new());
    let id = sleeper(&gw, &mut reaper, json!({"memory_mb": 64})).await;
    let record = gw.gw.store.sandbox(&id).await.unwrap().unwrap();
    assert_eq!(record.process.memory_mb, Some(64));

    let out = exec(
        &gw,
        &id,
        json!({"command": ["python3", "-c", "x = bytearray(512 * 1024 * 1024)"]}),
    )
    .await;
    assert_ne!(out["exit_code"], 0, "{out}");
    assert!(
        out["stderr"].as_str().unwrap().contains("MemoryError"),
        "{out}"
    );
    // Under the limit, the same program works: it is the limit that stopped it.
    let out = exec(
        &gw,
        &id,
        json!({"command": ["python3", "-c", "x = bytearray(8 * 1024 * 1024); print(len(x))"]}),
    )
    .await;
    assert_eq!(out["exit_code"], 0, "{out}");
    assert_eq!(out["stdout"], "8388608\n");
    // The sandbox's own process runs under it too.
    let pgid = pgid_of(&gw, &id).await;
    let limits = std::fs::read_to_string(format!("/proc/{pgid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max address space"))
        .unwrap();
    assert!(line.contains(&(64u64 * 1024 * 1024).to_string()), "{line}");
    gw.stop().await;
}

#[tokio::test]
async fn exec_returns_output_and_exit_code_and_honours_its_limits() {
    let gw = TestGateway::start_with(&ports("31250-31299")).await;
    let mut reaper = Reaper(Vec::new());
    let id = sleeper(&gw, &mut reaper, Value::Null).await;

    let out = exec(
        &gw,
        &id,
        json!({"command": ["sh", "-c", "echo out; echo err >&2; pwd; exit 7"]}),
    )
    .await;
    let dir = gw.dir.join("data").join("sandboxes").join(&id);
    assert_eq!(out["exit_code"], 7, "{out}");
    assert_eq!(out["stdout"], format!("out\n{}\n", dir.display()));
    assert_eq!(out["stderr"], "err\n");
    assert_eq!(out["timed_out"], false);
    assert_eq!(out["stdout_truncated"], false);
    assert!(out["signal"].is_null());
    assert!(out["duration_ms"].is_u64());

    // The timeout kills it (and whatever it started) and says so.
    let started = Instant::now();
    let out = exec(
        &gw,
        &id,
        json!({"command": ["sh", "-c", "sleep 10 & sleep 10"], "timeout_secs": 1}),
    )
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(out["timed_out"], true, "{out}");
    assert!(out["exit_code"].is_null(), "{out}");
    assert_eq!(out["signal"], 9, "{out}");
    let sleeping: Vec<i32> = sandbox_pids(&id)
        .into_iter()
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.starts_with("sleep\u{0}10"))
        })
        .collect();
    assert!(sleeping.is_empty(), "exec left {sleeping:?} behind");

    // Output past 1 MiB is cut, and flagged.
    let out = exec(
        &gw,
        &id,
        json!({"command": ["sh", "-c", "head -c 3000000 /dev/zero | tr '\\0' x; echo done >&2"]}),
    )
    .await;
    assert_eq!(out["exit_code"], 0, "{}", out["stderr"]);
    assert_eq!(out["stdout"].as_str().unwrap().len(), 1024 * 1024);
    assert!(out["stdout"].as_str().unwrap().bytes().all(|b| b == b'x'));
    assert_eq!(out["stdout_truncated"], true);
    assert_eq!(out["stderr"], "done\n");
    assert_eq!(out["stderr_truncated"], false);

    // Bad requests.
    for body in [
        json!({"command": []}),
        json!({"command": [""]}),
        json!({"command": ["true"], "timeout_secs": 0}),
    ] {
        let (status, v) = gw
            .api(
                Method::POST,
                &format!("/v1/sandboxes/{id}/exec"),
                Some(body),
            )
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    }
    let (status, v) = gw
        .api(
            Method::POST,
            &format!("/v1/sandboxes/{id}/exec"),
            Some(json!({"command": ["/nonexistent/program"]})),
        )
        .await;
    assert!(
        status == StatusCode::OK && v["exit_code"] != 0,
        "{status} {v}"
    );
    gw.stop().await;
}

/// Pids of the sandbox's processes running `sleep <secs>`.
fn sleeping(id: &str, secs: &str) -> Vec<i32> {
    let cmdline = format!("sleep\u{0}{secs}\u{0}");
    sandbox_pids(id)
        .into_iter()
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.starts_with(&cmdline))
        })
        .collect()
}

async fn wait_until(what: &str, within: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !check() {
        assert!(Instant::now() < deadline, "{what} within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn exec_commands_end_with_their_sandbox_and_with_their_caller() {
    use tokio::io::AsyncWriteExt;
    let gw = TestGateway::start_with(&ports("31350-31399")).await;
    let mut reaper = Reaper(Vec::new());

    // A long exec is running when the sandbox is terminated: it ends with the sandbox.
    let id = sleeper(&gw, &mut reaper, Value::Null).await;
    let call = tokio::spawn({
        let (tls, key, id) = (gw.tls(), gw.admin_key.clone(), id.clone());
        async move {
            api_via(
                &tls,
                &key,
                Method::POST,
                &format!("/v1/sandboxes/{id}/exec"),
                Some(json!({"command": ["sleep", "31"], "timeout_secs": 60})),
            )
            .await
        }
    });
    wait_until("the exec starts", Duration::from_secs(5), || {
        !sleeping(&id, "31").is_empty()
    })
    .await;
    let (status, _) = gw
        .api(Method::DELETE, &format!("/v1/sandboxes/{id}"), None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    wait_processes_gone(&id, None, Duration::from_secs(5)).await;
    let (status, out) = tokio::time::timeout(Duration::from_secs(5), call)
        .await
        .expect("the exec call returns once its sandbox ended")
        .unwrap();
    assert_eq!(status, StatusCode::OK, "{out}");
    assert!(out["exit_code"] != 0, "{out}");

    // The caller goes away mid-exec: the command does not run on unsupervised.
    let id = sleeper(&gw, &mut reaper, Value::Null).await;
    let body = json!({"command": ["sleep", "32"], "timeout_secs": 3600}).to_string();
    let mut stream = gw.tls().connect(BASE, &[b"http/1.1"]).await;
    let request = format!(
        "POST /v1/sandboxes/{id}/exec HTTP/1.1\r\nhost: {BASE}\r\nauthorization: Bearer {}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        gw.admin_key,
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    stream.flush().await.unwrap();
    wait_until("the exec starts", Duration::from_secs(5), || {
        !sleeping(&id, "32").is_empty()
    })
    .await;
    drop(stream);
    wait_until("the abandoned exec ends", Duration::from_secs(5), || {
        sleeping(&id, "32").is_empty()
    })
    .await;
    // The sandbox itself is untouched.
    let (_, v) = gw
        .api(Method::GET, &format!("/v1/sandboxes/{id}"), None)
        .await;
    assert_eq!(v["status"], "starting", "{v}");
    assert!(!sandbox_pids(&id).is_empty());
    gw.stop().await;
    wait_processes_gone(&id, None, Duration::from_secs(5)).await;
}

#[tokio::test]
async fn logs_return_the_output_and_follow_streams_until_the_sandbox_ends() {
    let gw = TestGateway::start_with(&ports("31300-31349")).await;
    let mut reaper = Reaper(Vec::new());
    let script = "i=0; while [ $i -lt 100 ]; do echo line-$i; i=$((i+1)); sleep 0.2; done";
    let v = create(
        &gw,
        json!({"command": ["sh", "-c", script], "ports": [8000]}),
    )
    .await;
    let id = v["id"].as_str().unwrap().to_string();
    reaper.watch(&id);
    let logs_path = format!("/v1/sandboxes/{id}/logs");

    // Plain: the output so far, as text.
    let deadline = Instant::now() + Duration::from_secs(5);
    let so_far = loop {
        let resp = api_raw(
            &gw.tls(),
            Some(&gw.admin_key),
            Method::GET,
            &logs_path,
            None,
            "",
        )
        .await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert!(resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain"));
        let text = String::from_utf8_lossy(resp.body()).into_owned();
        if text.contains("line-1\n") {
            break text;
        }
        assert!(Instant::now() < deadline, "no output: {text:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(so_far.starts_with("line-0\nline-1\n"), "{so_far:?}");
    let last_seen = so_far.lines().count();

    // Follow: first what is there, then lines written after the request started.
    let mut sender = gw.tls().h1(BASE).await;
    let req = Request::builder()
        .uri(format!("https://{BASE}{logs_path}?follow=true"))
        .header("host", BASE)
        .header("authorization", format!("Bearer {}", gw.admin_key))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let mut streamed = String::new();
    let later = format!("line-{}\n", last_seen + 3);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !streamed.contains(&later) {
        assert!(Instant::now() < deadline, "no new output: {streamed:?}");
        let frame = tokio::time::timeout(Duration::from_secs(2), body.frame())
            .await
            .expect("a new line within 2 s")
            .expect("the stream goes on while the sandbox runs")
            .unwrap();
        if let Some(data) = frame.data_ref() {
            streamed.push_str(&String::from_utf8_lossy(data));
        }
    }
    assert!(streamed.starts_with("line-0\n"), "{streamed:?}");

    // Ending the sandbox ends the stream.
    let (status, _) = gw
        .api(Method::DELETE, &logs_path.replace("/logs", ""), None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(frame) = body.frame().await {
            if frame.is_err() {
                break;
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the log stream outlived its sandbox");
    // The log stays readable after the end.
    let resp = api_raw(
        &gw.tls(),
        Some(&gw.admin_key),
        Method::GET,
        &logs_path,
        None,
        "",
    )
    .await;
    assert!(String::from_utf8_lossy(resp.body()).contains(&later));
    gw.stop().await;
}

// -------------------------------------------------------------------------------------------------
// The real binary, killed with SIGKILL

/// A `sandgate serve` child process on fixed (free) ports and a data dir in `dir`.
struct Server {
    child: tokio::process::Child,
    tls: TlsClient,
    admin_key: String,
}

impl Server {
    async fn start(dir: &Path, config: &Path) -> Server {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("server.log"))
            .unwrap();
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_sandgate"))
            .arg("serve")
            .arg("--config")
            .arg(config)
            .current_dir(dir)
            .env_remove("SANDGATE_CONFIG")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("start sandgate serve");
        let text = std::fs::read_to_string(config).unwrap();
        let listen: std::net::SocketAddr = text
            .lines()
            .find_map(|l| l.strip_prefix("listen = \""))
            .and_then(|l| l.strip_suffix('"'))
            .unwrap()
            .parse()
            .unwrap();
        let data = dir.join("data");
        let deadline = Instant::now() + Duration::from_secs(20);
        let failed = |what: &str| -> ! {
            panic!(
                "sandgate did not start ({what}): {}",
                std::fs::read_to_string(dir.join("server.log")).unwrap_or_default()
            )
        };
        // The key and the CA are written on start; then the API must answer.
        let (key, ca) = loop {
            if let (Ok(key), Ok(ca)) = (
                std::fs::read_to_string(data.join("admin.key")),
                std::fs::read(data.join("certs").join("ca.pem")),
            ) {
                break (key, ca);
            }
            if Instant::now() > deadline {
                failed("no admin key");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let server = Server {
            child,
            tls: TlsClient::new(listen, &ca),
            admin_key: key.trim().to_string(),
        };
        loop {
            if tokio::net::TcpStream::connect(listen).await.is_ok() {
                let (status, _) = server.api(Method::GET, "/v1/sandboxes", None).await;
                if status == StatusCode::OK {
                    return server;
                }
            }
            if Instant::now() > deadline {
                failed("the API does not answer");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn api(&self, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        api_via(&self.tls, &self.admin_key, method, path, body).await
    }
}

#[tokio::test]
async fn after_a_kill_9_a_restart_keeps_the_state_and_ends_the_orphans() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (listen, telemetry) = (free_port(), free_port());
    let config = dir.join("sandgate.toml");
    std::fs::write(
        &config,
        format!(
            "[gateway]\nlisten = \"127.0.0.1:{listen}\"\nbase_domain = \"{BASE}\"\nshutdown_grace_secs = 2\n\
             [telemetry]\nlisten = \"127.0.0.1:{telemetry}\"\n\
             [store]\ndata_dir = \"data\"\n\
             [orchestrator]\nisolation = \"none\"\nport_range = \"31400-31449\"\ngrace_secs = 2\n"
        ),
    )
    .unwrap();
    let mut reaper = Reaper(Vec::new());

    let mut server = Server::start(dir, &config).await;
    let (status, cred) = server
        .api(
            Method::POST,
            "/v1/credentials",
            Some(json!({"name": "survivor", "scopes": ["sandboxes:read"]})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{cred}");
    let cred_secret = cred["secret"].as_str().unwrap().to_string();
    let (status, v) = server
        .api(
            Method::POST,
            "/v1/sandboxes",
            Some(json!({"command": ["sh", "-c", HTTP_SERVER], "ports": [8000]})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    reaper.watch(&id);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (_, v) = server
            .api(Method::GET, &format!("/v1/sandboxes/{id}"), None)
            .await;
        if v["status"] == "running" {
            break;
        }
        assert!(
            v["status"] == "starting" && Instant::now() < deadline,
            "{v}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, token) = server
        .api(
            Method::POST,
            &format!("/v1/sandboxes/{id}/connect-tokens"),
            Some(json!({"port": 8000})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let token = token["token"].as_str().unwrap().to_string();
    let host = sandbox_host(8000, &id);
    let resp = server
        .tls
        .get(&host, "/", &[("x-sandgate-token", &token)])
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let pids = sandbox_pids(&id);
    assert_eq!(pids.len(), 1, "{pids:?}");
    let leader = pids[0];
    // A second sandbox whose shell writes all the time and has a quiet child: when the gateway
    // dies, the shell dies of SIGPIPE on its next write, and the child lives on in its group.
    let (status, v) = server
        .api(
            Method::POST,
            "/v1/sandboxes",
            Some(json!({
                "command": ["sh", "-c", "sleep 41 & while :; do echo tick; sleep 0.1; done"],
                "ports": [8000],
            })),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    let chatty = v["id"].as_str().unwrap().to_string();
    reaper.watch(&chatty);
    let quiet_child = || {
        sandbox_pids(&chatty).into_iter().find(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.starts_with("sleep\u{0}41\u{0}"))
        })
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while quiet_child().is_none() {
        assert!(
            Instant::now() < deadline,
            "the second sandbox did not start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let chatty_leader = sandbox_pids(&chatty).into_iter().min().unwrap();

    // SIGKILL: no chance to clean up. The sandbox, in its own group, lives on.
    server.child.kill().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(process_alive(leader), "the sandbox died with the gateway");
    assert!(
        !process_alive(chatty_leader),
        "the chatty shell outlived its pipe"
    );
    assert!(quiet_child().is_some(), "the quiet child lives on");

    // Restart on the same data dir.
    let server = Server::start(dir, &config).await;
    let (status, list) = server.api(Method::GET, "/v1/credentials", None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        list["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["id"] == cred["id"] && c["name"] == "survivor"),
        "{list}"
    );
    let (status, _) = api_via(
        &server.tls,
        &cred_secret,
        Method::GET,
        "/v1/sandboxes",
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "the credential still works");
    let (_, audit) = server.api(Method::GET, "/v1/audit", None).await;
    let actions: Vec<&str> = audit["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    for action in ["credential.create", "sandbox.create", "token.issue"] {
        assert!(actions.contains(&action), "{action} lost: {actions:?}");
    }
    let (status, v) = server
        .api(Method::GET, &format!("/v1/sandboxes/{id}"), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v["status"], "stopped", "{v}");
    // Its process group did not outlive the restart, nor did the leaderless one.
    wait_processes_gone(&id, Some(leader), Duration::from_secs(5)).await;
    wait_processes_gone(&chatty, None, Duration::from_secs(5)).await;
    let resp = server
        .tls
        .get(&host, "/", &[("x-sandgate-token", &token)])
        .await;
    assert_eq!(resp.status(), StatusCode::GONE);
    drop(server);
}

#[tokio::test]
async fn sandboxes_cannot_read_the_gateways_secrets() {
    let gw = TestGateway::start_with(&ports("31450-31469")).await;
    let mut reaper = Reaper(Vec::new());
    let id = sleeper(&gw, &mut reaper, json!({})).await;
    let data = gw.gw.config.store.data_dir.clone();
    let whoami = exec(&gw, &id, json!({"command": ["id", "-u"]})).await;
    if nix::unistd::geteuid().is_root() {
        // As root, the default `run_as = "auto"` runs sandboxes as `nobody`.
        assert_ne!(whoami["stdout"].as_str().unwrap().trim(), "0", "{whoami}");
        for secret in [
            "admin.key",
            "sandgate.db",
            "certs/server-key.pem",
            "certs/ca-key.pem",
        ] {
            let path = data.join(secret);
            let out = exec(
                &gw,
                &id,
                json!({"command": ["cat", path.to_str().unwrap()]}),
            )
            .await;
            assert_ne!(out["exit_code"], 0, "{secret} was readable: {out}");
            assert!(
                out["stdout"].as_str().unwrap().is_empty(),
                "{secret} leaked: {out}"
            );
        }
        let listing = exec(&gw, &id, json!({"command": ["ls", data.to_str().unwrap()]})).await;
        assert_ne!(
            listing["exit_code"], 0,
            "the data dir was listable: {listing}"
        );
        let logs = exec(
            &gw,
            &id,
            json!({"command": ["ls", data.join("logs").to_str().unwrap()]}),
        )
        .await;
        assert_ne!(logs["exit_code"], 0, "the log folder was listable: {logs}");
        // Its own directory is its own.
        let write = exec(
            &gw,
            &id,
            json!({"command": ["sh", "-c", "echo hi > mine && cat mine"]}),
        )
        .await;
        assert_eq!(write["stdout"], "hi\n", "{write}");
    } else {
        eprintln!("not root: sandboxes run as the gateway's user; isolation not testable here");
    }
    let (status, _) = gw
        .api(Method::DELETE, &format!("/v1/sandboxes/{id}"), None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
}

#[tokio::test]
async fn the_environment_is_clean_and_pass_env_passes_only_what_it_names() {
    // Variables only this test sets (the environment is shared by every test in the binary).
    // Neither is a `SANDGATE_*` name: nothing of the gateway's environment may pass by default.
    let secret = format!("OPERATOR_SECRET_{}", std::process::id());
    let passed = format!("OPERATOR_MIRROR_{}", std::process::id());
    std::env::set_var(&secret, "do-not-pass-me-on");
    std::env::set_var(&passed, "https://mirror.internal/simple");
    let gw = TestGateway::start_with(&format!(
        "{}pass_env = [\"{passed}\", \"UNSET_IN_THE_GATEWAY_{}\"]\n",
        ports("31470-31489"),
        std::process::id()
    ))
    .await;
    let mut reaper = Reaper(Vec::new());
    let id = sleeper(
        &gw,
        &mut reaper,
        json!({"ports": [8000], "env": {"GREETING": "hello"}}),
    )
    .await;
    let out = exec(&gw, &id, json!({"command": ["env"], "env": {"EXTRA": "1"}})).await;
    assert_eq!(out["exit_code"], 0, "{out}");
    let env: std::collections::BTreeMap<&str, &str> = out["stdout"]
        .as_str()
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once('='))
        .collect();
    let names: Vec<&str> = env.keys().copied().collect();
    let allowed = [
        "PATH",
        "HOME",
        "LANG",
        "TERM",
        "PORT",
        "PORT_8000",
        "SANDGATE_SANDBOX_ID",
        "GREETING",
        "EXTRA",
        passed.as_str(),
    ];
    for name in &names {
        // `PWD` and `SHLVL` are set by no shell here: `env` runs straight under prlimit.
        assert!(
            allowed.contains(name),
            "`{name}` reached the sandbox: {names:?}"
        );
    }
    assert!(!names.contains(&secret.as_str()), "{names:?}");
    assert_eq!(env[passed.as_str()], "https://mirror.internal/simple");
    assert_eq!(
        env["PATH"],
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    );
    assert!(
        env["HOME"].ends_with(&id),
        "HOME is the sandbox's folder: {env:?}"
    );
    // The same for the sandbox's own process, not only for exec.
    let pgid = pgid_of(&gw, &id).await;
    let environ = String::from_utf8_lossy(&std::fs::read(format!("/proc/{pgid}/environ")).unwrap())
        .into_owned();
    assert!(!environ.contains(&secret), "{environ}");
    assert!(!environ.contains("CARGO_"), "{environ}");
    assert!(environ.contains(&passed), "{environ}");
    std::env::remove_var(&secret);
    std::env::remove_var(&passed);
    gw.stop().await;
    wait_processes_gone(&id, Some(pgid), Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_command_that_never_listens_fails_at_the_start_deadline_naming_its_port() {
    let gw =
        TestGateway::start_with(&format!("{}start_timeout_secs = 2\n", ports("31490-31499"))).await;
    let mut reaper = Reaper(Vec::new());
    // Listens on the published number instead of $PORT: the classic mistake.
    let v = create(
        &gw,
        json!({"command": ["sh", "-c", "echo listening on 8000; exec sleep 30"], "ports": [8000]}),
    )
    .await;
    let id = v["id"].as_str().unwrap().to_string();
    reaper.watch(&id);
    // While it starts, the object says what it waits for.
    assert_eq!(v["status"], "starting", "{v}");
    let waiting = v["detail"].as_str().unwrap_or_default();
    assert!(
        waiting.contains("port 8000") && waiting.contains("$PORT"),
        "{v}"
    );
    let started = Instant::now();
    let v = wait_for_status(&gw, &id, &["failed", "stopped"], Duration::from_secs(15)).await;
    assert_eq!(v["status"], "failed", "{v}");
    assert!(started.elapsed() >= Duration::from_millis(1500), "{v}");
    let detail = v["detail"].as_str().unwrap();
    for needle in [
        "port 8000",
        "$PORT",
        "start_timeout_secs",
        "listening on 8000",
    ] {
        assert!(detail.contains(needle), "`{needle}` missing from: {detail}");
    }
    let pgid = gw
        .gw
        .store
        .sandbox(&id)
        .await
        .unwrap()
        .unwrap()
        .process
        .pgid;
    wait_processes_gone(&id, pgid, Duration::from_secs(5)).await;
    gw.stop().await;
}

#[tokio::test]
async fn after_a_kill_9_a_restart_ends_every_isolated_sandbox_and_its_cgroup() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: isolation needs root");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (listen, telemetry) = (free_port(), free_port());
    let config = dir.join("sandgate.toml");
    std::fs::write(
        &config,
        format!(
            "[gateway]\nlisten = \"127.0.0.1:{listen}\"\nbase_domain = \"{BASE}\"\nshutdown_grace_secs = 2\n\
             [telemetry]\nlisten = \"127.0.0.1:{telemetry}\"\n\
             [store]\ndata_dir = \"data\"\n\
             [orchestrator]\nisolation = \"namespaces\"\ngrace_secs = 2\n"
        ),
    )
    .unwrap();
    let mut reaper = Reaper(Vec::new());
    let mut server = Server::start(dir, &config).await;
    let (status, v) = server
        .api(
            Method::POST,
            "/v1/sandboxes",
            Some(json!({"command": ["sh", "-c", "setsid -f sleep 4141; exec python3 -m http.server 8000"], "ports": [8000]})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    assert_eq!(v["isolation"], "namespaces", "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    reaper.watch(&id);
    let deadline = Instant::now() + Duration::from_secs(15);
    while sandbox_pids(&id).len() < 2 {
        assert!(Instant::now() < deadline, "the sandbox did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pids = sandbox_pids(&id);
    let cgroups = || -> Vec<String> {
        let mut found = Vec::new();
        for hierarchy in std::fs::read_dir("/sys/fs/cgroup")
            .into_iter()
            .flatten()
            .flatten()
        {
            let out = std::process::Command::new("find")
                .arg(hierarchy.path())
                .args(["-type", "d", "-name", &id])
                .output()
                .unwrap();
            found.extend(
                String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .map(str::to_string),
            );
        }
        found
    };
    assert!(!cgroups().is_empty(), "no cgroup for the sandbox");

    // SIGKILL: the gateway cannot clean up; the sandbox lives on in its cgroup.
    server.child.kill().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        pids.iter().all(|p| process_alive(*p)),
        "the sandbox died with the gateway"
    );

    let server = Server::start(dir, &config).await;
    let (status, v) = server
        .api(Method::GET, &format!("/v1/sandboxes/{id}"), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v["status"], "stopped", "{v}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while pids.iter().any(|p| process_alive(*p)) {
        assert!(
            Instant::now() < deadline,
            "processes outlived the restart: {pids:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(cgroups().is_empty(), "cgroups left: {:?}", cgroups());
    drop(server);
}
