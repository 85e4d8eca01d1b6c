//! Isolated `command` sandboxes (`[orchestrator] isolation`, the default `auto` as root):
//! each is served through the gateway, and from inside nothing of the host or of another
//! sandbox is reachable or visible; limits hold, and an end leaves nothing behind.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::*;
use http::{Method, StatusCode};
use serde_json::{json, Value};

/// Isolation needs root (as in CI); elsewhere these tests say so and pass vacuously.
fn can_isolate() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    eprintln!("skipped: isolation tests need root");
    false
}

async fn create(gw: &TestGateway, body: Value) -> String {
    let (status, v) = gw.api(Method::POST, "/v1/sandboxes", Some(body)).await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    assert_eq!(v["isolation"], "namespaces", "{v}");
    v["id"].as_str().unwrap().to_string()
}

async fn exec(gw: &TestGateway, id: &str, command: &[&str]) -> Value {
    let (status, v) = gw
        .api(
            Method::POST,
            &format!("/v1/sandboxes/{id}/exec"),
            Some(json!({"command": command, "timeout_secs": 30})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    v
}

async fn sh(gw: &TestGateway, id: &str, script: &str) -> String {
    let v = exec(gw, id, &["sh", "-c", script]).await;
    format!(
        "{}{}",
        v["stdout"].as_str().unwrap(),
        v["stderr"].as_str().unwrap()
    )
}

/// A sandbox serving its own `whoami.txt` on port 8000.
async fn server(gw: &TestGateway, name: &str) -> String {
    let id = create(
        gw,
        json!({"command": ["sh", "-c", format!("echo {name} > whoami.txt; exec python3 -m http.server 8000")],
               "ports": [8000]}),
    )
    .await;
    wait_for_status(gw, &id, &["running"], Duration::from_secs(20)).await;
    id
}

async fn fetch(gw: &TestGateway, id: &str, path: &str) -> (StatusCode, String) {
    let token = gw.token(id, 8000).await;
    let r = gw
        .tls()
        .get(
            &sandbox_host(8000, id),
            path,
            &[("x-sandgate-token", &token)],
        )
        .await;
    (r.status(), String::from_utf8_lossy(r.body()).into_owned())
}

/// Ports listening on the host's own network namespace (from /proc/net/tcp{,6}).
fn host_listening_ports() -> BTreeSet<u16> {
    let mut ports = BTreeSet::new();
    for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.get(3) == Some(&"0A") {
                if let Some(port) = fields
                    .get(1)
                    .and_then(|a| a.rsplit(':').next())
                    .and_then(|p| u16::from_str_radix(p, 16).ok())
                {
                    ports.insert(port);
                }
            }
        }
    }
    ports
}

/// Pids of live processes owned by host uid `uid`.
fn pids_of_uid(uid: u32) -> Vec<i32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
            continue;
        };
        let owned = status
            .lines()
            .find(|l| l.starts_with("Uid:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .is_some_and(|u| u == uid.to_string());
        if owned && process_alive(pid) {
            out.push(pid);
        }
    }
    out
}

async fn uid_of(gw: &TestGateway, id: &str) -> u32 {
    gw.gw
        .store
        .sandbox(id)
        .await
        .unwrap()
        .unwrap()
        .process
        .uid
        .unwrap()
}

const PROBE: &str = r#"
import socket, sys
for host, port in [(h, int(p)) for h, p in (a.split('=') for a in sys.argv[1:])]:
    try:
        s = socket.create_connection((host, port), timeout=2)
        print("REACHED", host, port)
        s.close()
    except OSError as e:
        print("blocked", host, port, type(e).__name__)
"#;

#[tokio::test]
async fn two_sandboxes_are_served_and_reach_neither_each_other_nor_the_host() {
    if !can_isolate() {
        return;
    }
    // A listener of the host's own, which no sandbox may reach.
    let host = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let host_port = host.local_addr().unwrap().port();
    let reached = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = std::sync::Arc::clone(&reached);
    tokio::spawn(async move {
        while host.accept().await.is_ok() {
            seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    });
    let listening_before = host_listening_ports();
    let gw = TestGateway::start().await;
    let a = server(&gw, "sandbox-a").await;
    let b = server(&gw, "sandbox-b").await;

    // Each is served through the gateway, on the port it listens on itself.
    assert_eq!(
        fetch(&gw, &a, "/whoami.txt").await,
        (StatusCode::OK, "sandbox-a\n".into())
    );
    assert_eq!(
        fetch(&gw, &b, "/whoami.txt").await,
        (StatusCode::OK, "sandbox-b\n".into())
    );
    // Nothing listens on a host interface for either.
    let listening_after = host_listening_ports();
    assert!(
        !listening_after.contains(&8000) || listening_before.contains(&8000),
        "port 8000 appeared on the host"
    );

    // From A: its own server answers on 127.0.0.1:8000, and it is A's, never B's.
    let own = sh(
        &gw,
        &a,
        "python3 -c \"import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:8000/whoami.txt').read().decode())\"",
    )
    .await;
    assert!(
        own.contains("sandbox-a") && !own.contains("sandbox-b"),
        "{own}"
    );
    // The host's loopback services: the test's listener, telemetry, the gateway, PostgreSQL,
    // at every loopback spelling.
    let targets = [
        format!("127.0.0.1={host_port}"),
        format!("127.0.0.2={host_port}"),
        format!("localhost={host_port}"),
        format!("::1={host_port}"),
        format!("127.0.0.1={}", gw.telemetry.port()),
        format!("127.0.0.1={}", gw.addr.port()),
        "127.0.0.1=5432".to_string(),
    ];
    let mut argv = vec!["python3", "-c", PROBE];
    argv.extend(targets.iter().map(String::as_str));
    let v = exec(&gw, &a, &argv).await;
    let out = v["stdout"].as_str().unwrap();
    assert_eq!(out.matches("blocked").count(), targets.len(), "{v}");
    assert!(!out.contains("REACHED"), "{out}");
    assert_eq!(reached.load(std::sync::atomic::Ordering::SeqCst), 0);
    // Only loopback is there.
    let links = sh(&gw, &a, "cat /proc/net/dev").await;
    let names: Vec<&str> = links
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next())
        .map(str::trim)
        .collect();
    assert_eq!(names, vec!["lo"], "{links}");
    gw.stop().await;
}

#[tokio::test]
async fn host_files_are_invisible_and_the_host_image_is_read_only() {
    if !can_isolate() {
        return;
    }
    // A world-readable file in a 0755 folder of the host's.
    let folder = tempfile::Builder::new()
        .prefix("sandgate-host-")
        .tempdir()
        .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(folder.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let secret = folder.path().join("host-secret.txt");
    std::fs::write(&secret, "host secret").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();

    let gw = TestGateway::start().await;
    // The data dir lies under a 0700 folder: sandboxes still run (nothing of the host's path
    // is walked by the sandbox's user).
    std::fs::set_permissions(&gw.dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    let id = server(&gw, "files").await;
    let data_dir = gw.gw.config.store.data_dir.display().to_string();
    let out = sh(
        &gw,
        &id,
        &format!(
            "cat {} 2>&1; ls {data_dir} 2>&1; ls -A /root; ls /home; test -x /usr/bin/python3 && echo python-visible; \
             touch /usr/x 2>&1; touch /etc/x 2>&1; touch /x 2>&1; echo w > /workspace/w && echo workspace-writable; \
             echo t > /tmp/t && echo tmp-writable; cat /etc/hostname",
            secret.display()
        ),
    )
    .await;
    assert!(!out.contains("host secret"), "{out}");
    assert!(out.contains("No such file"), "{out}");
    assert!(out.contains("python-visible"), "{out}");
    assert!(
        out.contains("workspace-writable") && out.contains("tmp-writable"),
        "{out}"
    );
    assert_eq!(out.matches("Read-only file system").count(), 3, "{out}");
    assert!(!out.contains("admin.key"), "{out}");
    gw.stop().await;
}

#[tokio::test]
async fn processes_hostname_and_user_are_the_sandboxs_own() {
    if !can_isolate() {
        return;
    }
    let gw = TestGateway::start().await;
    let id = server(&gw, "procs").await;
    let out = sh(
        &gw,
        &id,
        "hostname; ls /proc | grep -cE '^[0-9]+$'; cat /proc/1/cmdline | tr '\\0' ' '",
    )
    .await;
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some(id.as_str()), "{out}");
    // init, the server, and this exec's shell and its children: a handful, not the host's.
    let count: usize = lines.next().unwrap().trim().parse().unwrap();
    assert!(count <= 8, "the sandbox sees {count} processes: {out}");
    let uid = uid_of(&gw, &id).await;
    assert_ne!(uid, 0);
    assert_ne!(uid, nix::unistd::geteuid().as_raw());
    // Seen from the host, the sandbox's processes run as that uid.
    let server_pids: Vec<i32> = sandbox_pids(&id);
    assert!(!server_pids.is_empty());
    assert_eq!(
        pids_of_uid(uid)
            .iter()
            .filter(|p| server_pids.contains(p))
            .count(),
        server_pids.len()
    );
    let id_out = sh(&gw, &id, "id -u; grep Cap /proc/self/status").await;
    assert!(id_out.starts_with(&uid.to_string()), "{id_out}");
    assert!(id_out.contains("CapEff:\t0000000000000000"), "{id_out}");
    // What it uses, from its cgroup.
    let (status, stats) = gw
        .api(Method::GET, &format!("/v1/sandboxes/{id}/stats"), None)
        .await;
    assert_eq!(status, StatusCode::OK, "{stats}");
    assert!(
        stats["memory_bytes"].as_u64().unwrap() > 1024 * 1024,
        "{stats}"
    );
    assert!(stats["tasks"].as_u64().unwrap() >= 2, "{stats}");
    assert!(stats["cpu_seconds"].as_f64().unwrap() > 0.0, "{stats}");
    gw.stop().await;
}

#[tokio::test]
async fn an_escapee_that_left_its_session_and_environment_dies_with_the_sandbox() {
    if !can_isolate() {
        return;
    }
    let gw = TestGateway::start().await;
    let id = create(
        &gw,
        json!({"command": ["sh", "-c",
            "setsid -f env -i sh -c 'sleep 3131 & sleep 3132 & exec sleep 3133'; exec python3 -m http.server 8000"],
            "ports": [8000]}),
    )
    .await;
    wait_for_status(&gw, &id, &["running"], Duration::from_secs(20)).await;
    let uid = uid_of(&gw, &id).await;
    let started = Instant::now();
    while pids_of_uid(uid).len() < 4 {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "escapees never started"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, _) = gw
        .api(Method::DELETE, &format!("/v1/sandboxes/{id}"), None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let deleted = Instant::now();
    while !pids_of_uid(uid).is_empty() {
        assert!(
            deleted.elapsed() < Duration::from_secs(5),
            "still alive: {:?}",
            pids_of_uid(uid)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    gw.stop().await;
}

#[tokio::test]
async fn a_memory_hog_is_killed_and_the_sandbox_fails_naming_the_limit() {
    if !can_isolate() {
        return;
    }
    let gw = TestGateway::start().await;
    let id = create(
        &gw,
        json!({"command": ["python3", "-c", "b = []\nwhile True: b.append(bytearray(1 << 20))"],
               "ports": [8000], "memory_mb": 64}),
    )
    .await;
    let v = wait_for_status(&gw, &id, &["failed", "stopped"], Duration::from_secs(30)).await;
    assert_eq!(v["status"], "failed", "{v}");
    let detail = v["detail"].as_str().unwrap();
    assert!(
        detail.contains("memory") && detail.contains("64 MiB"),
        "{detail}"
    );
    gw.stop().await;
}

#[tokio::test]
async fn a_fork_loop_stops_at_max_processes_and_the_gateway_stays_healthy() {
    if !can_isolate() {
        return;
    }
    let gw = TestGateway::start().await;
    let id = create(
        &gw,
        json!({"command": ["sh", "-c", "exec python3 -m http.server 8000"], "ports": [8000],
               "max_processes": 32}),
    )
    .await;
    wait_for_status(&gw, &id, &["running"], Duration::from_secs(20)).await;
    let uid = uid_of(&gw, &id).await;
    // A fork loop that keeps going past failures (a shell would give up at the first).
    let v = exec(
        &gw,
        &id,
        &[
            "python3",
            "-c",
            "import os, time\nn = 0\nfor i in range(100):\n    try:\n        if os.fork() == 0:\n            time.sleep(30)\n            os._exit(0)\n        n += 1\n    except OSError:\n        pass\nprint(n, len([p for p in os.listdir('/proc') if p.isdigit()]))",
        ],
    )
    .await;
    let out = v["stdout"].as_str().unwrap();
    let mut fields = out.split_whitespace().map(|f| f.parse::<usize>().unwrap());
    let (forked, inside) = (fields.next().unwrap(), fields.next().unwrap());
    assert!(inside <= 32, "{inside} tasks inside: {v}");
    assert!((16..100).contains(&forked), "{forked} forks succeeded: {v}");
    assert!(pids_of_uid(uid).len() <= 32);
    // The gateway and the sandbox's server still answer.
    assert_eq!(fetch(&gw, &id, "/").await.0, StatusCode::OK);
    let (status, _) = gw.api(Method::GET, "/v1/sandboxes", None).await;
    assert_eq!(status, StatusCode::OK);
    gw.stop().await;
}

/// A one-thread busy loop of 2 s that prints the CPU seconds it got per wall second.
const BUSY: &str = "import time\nw = time.time(); c = time.process_time()\nwhile time.time() - w < 2: pass\nprint((time.process_time() - c) / (time.time() - w))";

/// CPU seconds per wall second [`BUSY`] gets inside the sandbox.
async fn busy_share(gw: &TestGateway, id: &str) -> f64 {
    let v = exec(gw, id, &["python3", "-c", BUSY]).await;
    let out = v["stdout"].as_str().unwrap();
    out.trim().parse().unwrap_or_else(|_| panic!("{v}"))
}

#[tokio::test]
async fn a_cpu_limit_holds_a_busy_loop_and_a_larger_one_does_not_throttle() {
    if !can_isolate() {
        return;
    }
    let gw = TestGateway::start().await;
    let half = create(
        &gw,
        json!({"command": ["sh", "-c", "exec python3 -m http.server 8000"], "ports": [8000], "cpus": 0.5}),
    )
    .await;
    let two = create(
        &gw,
        json!({"command": ["sh", "-c", "exec python3 -m http.server 8000"], "ports": [8000], "cpus": 2}),
    )
    .await;
    wait_for_status(&gw, &half, &["running"], Duration::from_secs(20)).await;
    wait_for_status(&gw, &two, &["running"], Duration::from_secs(20)).await;
    let share = busy_share(&gw, &half).await;
    assert!(
        share <= 0.6,
        "at cpus 0.5 a busy loop got {share:.2} CPU-s/s"
    );
    let throttled = |v: &Value| v["cpu_throttled_seconds"].as_f64().unwrap();
    let (_, v) = gw
        .api(Method::GET, &format!("/v1/sandboxes/{half}/stats"), None)
        .await;
    // A loop that reached its quota was held back by it; on a machine too busy to give it even
    // that much, the quota never bit.
    if share >= 0.45 {
        assert!(
            throttled(&v) > 0.05,
            "the 0.5 limit held the loop back: {v}"
        );
    }
    // Unthrottled means the limit never held it back: one busy thread under a limit of two
    // CPUs. (How much CPU it gets besides depends on what else the machine runs.)
    let share = busy_share(&gw, &two).await;
    let (_, v) = gw
        .api(Method::GET, &format!("/v1/sandboxes/{two}/stats"), None)
        .await;
    assert_eq!(
        throttled(&v),
        0.0,
        "at cpus 2 a busy loop ({share:.2} CPU-s/s) was throttled: {v}"
    );
    assert!(v["cpu_seconds"].as_f64().unwrap() > 0.1, "it ran: {v}");
    gw.stop().await;
}

#[tokio::test]
async fn creating_and_deleting_many_sandboxes_leaves_nothing_behind() {
    if !can_isolate() {
        return;
    }
    let gw = TestGateway::start().await;
    let mounts_before = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .count();
    let mut ids = Vec::new();
    let mut uids = Vec::new();
    for _ in 0..25 {
        let id = create(
            &gw,
            json!({"command": ["sh", "-c", "sleep 60 & exec python3 -m http.server 8000"], "ports": [8000]}),
        )
        .await;
        uids.push(uid_of(&gw, &id).await);
        let (status, _) = gw
            .api(Method::DELETE, &format!("/v1/sandboxes/{id}"), None)
            .await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        ids.push(id);
    }
    let Some(sandgate::sandbox::process::Isolation::Namespaces(iso)) =
        gw.gw.driver.as_ref().map(|d| d.isolation().clone())
    else {
        panic!("not isolated");
    };
    let left: Vec<String> = iso
        .leftovers()
        .into_iter()
        .filter(|l| ids.contains(l))
        .collect();
    assert!(left.is_empty(), "cgroups left: {left:?}");
    for uid in uids {
        assert!(pids_of_uid(uid).is_empty(), "processes of uid {uid} left");
    }
    let mounts_after = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .count();
    assert_eq!(mounts_before, mounts_after, "mounts changed on the host");
    for id in &ids {
        assert!(!gw
            .gw
            .config
            .store
            .data_dir
            .join("sandboxes")
            .join(id)
            .exists());
    }
    gw.stop().await;
}

#[tokio::test]
async fn bad_limits_ports_and_commands_are_refused_or_fail_clearly() {
    if !can_isolate() {
        return;
    }
    let gw = TestGateway::start().await;
    for (body, field) in [
        (
            json!({"command": ["true"], "ports": [8000], "memory_mb": 1}),
            "memory_mb",
        ),
        (
            json!({"command": ["true"], "ports": [8000], "cpus": 0}),
            "cpus",
        ),
        (
            json!({"command": ["true"], "ports": [8000], "cpus": 5000}),
            "cpus",
        ),
        (
            json!({"command": ["true"], "ports": [8000], "max_processes": 0}),
            "max_processes",
        ),
        (
            json!({"command": ["true"], "ports": (1..=65).collect::<Vec<u16>>()}),
            "ports",
        ),
        (json!({"command": ["true"], "ports": [0]}), "ports"),
        (
            json!({"command": ["true"], "ports": [3128], "egress": {"allow": ["a.example"]}}),
            "3128",
        ),
        (
            json!({"command": ["true"], "ports": [8000], "egress": {"allow": ["10.0.0.1"]}}),
            "egress.allow",
        ),
    ] {
        let (status, v) = gw
            .api(Method::POST, "/v1/sandboxes", Some(body.clone()))
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}: {v}");
        assert!(v.to_string().contains(field), "{body}: {v}");
    }
    // A command that does not exist: failed, saying so, never stuck in `starting`.
    let id = create(
        &gw,
        json!({"command": ["/no/such/program"], "ports": [8000]}),
    )
    .await;
    let v = wait_for_status(&gw, &id, &["failed"], Duration::from_secs(10)).await;
    let detail = v["detail"].as_str().unwrap();
    assert!(
        detail.contains("/no/such/program") && detail.contains("No such file"),
        "{detail}"
    );
    gw.stop().await;
}

/// Fetches each URL from inside the sandbox through its environment's proxy settings (urllib
/// honours `http_proxy`), printing the status or the error per line.
const FETCH: &str = r#"
import sys, urllib.request, urllib.error
for url in sys.argv[1:]:
    try:
        print(url, urllib.request.urlopen(url, timeout=5).status)
    except urllib.error.HTTPError as e:
        print(url, e.code, e.read().decode(errors="replace").strip())
    except Exception as e:
        print(url, "error", type(e).__name__)
"#;

#[tokio::test]
async fn egress_reaches_only_allowed_names_through_the_proxy() {
    if !can_isolate() {
        return;
    }
    // A service on the host's loopback, given to sandboxes as `mirror.test` by the operator.
    let mirror = Echo::start().await;
    let gw = TestGateway::start_with(&format!(
        "[orchestrator.egress_hosts]\n\"mirror.test\" = \"{}\"\n",
        mirror.addr
    ))
    .await;
    let start = |allow: Option<Vec<&str>>| {
        let mut body =
            json!({"command": ["sh", "-c", "exec python3 -m http.server 8000"], "ports": [8000]});
        if let Some(allow) = allow {
            body["egress"] = json!({"allow": allow});
        }
        body
    };
    let allowed = create(&gw, start(Some(vec!["mirror.test"]))).await;
    let other = create(&gw, start(Some(vec!["other.test"]))).await;
    let none = create(&gw, start(None)).await;
    for id in [&allowed, &other, &none] {
        wait_for_status(&gw, id, &["running"], Duration::from_secs(20)).await;
    }
    let by_ip = format!("http://{}/by-ip", mirror.addr);
    let fetch_all = |id: String| {
        let by_ip = by_ip.clone();
        let gw = &gw;
        async move {
            let v = exec(
                gw,
                &id,
                &["python3", "-c", FETCH, "http://mirror.test/hello", &by_ip],
            )
            .await;
            v["stdout"].as_str().unwrap().to_string()
        }
    };
    // Allowed: 200 through the proxy, from the mapped service. By IP: refused by the proxy.
    let out = fetch_all(allowed.clone()).await;
    assert!(out.contains("http://mirror.test/hello 200"), "{out}");
    assert!(out.contains(&format!("{by_ip} 403")), "{out}");
    assert_eq!(mirror.count(), 1, "the mirror saw: {:?}", mirror.requests());
    // A direct connection, past the proxy, goes nowhere.
    let port = mirror.addr.port().to_string();
    let v = exec(
        &gw,
        &allowed,
        &["python3", "-c", PROBE, &format!("127.0.0.1={port}")],
    )
    .await;
    assert!(v["stdout"].as_str().unwrap().contains("blocked"), "{v}");
    // Allowed only another name: refused, saying why.
    let out = fetch_all(other).await;
    assert!(out.contains("http://mirror.test/hello 403"), "{out}");
    assert!(out.contains("egress.allow"), "{out}");
    // No egress: no proxy variables and no route anywhere.
    let env = sh(
        &gw,
        &none,
        "env | grep -i _proxy || echo no-proxy-variables",
    )
    .await;
    assert_eq!(env.trim(), "no-proxy-variables");
    let out = fetch_all(none).await;
    assert!(!out.contains(" 200"), "{out}");
    assert_eq!(mirror.count(), 1, "the mirror saw: {:?}", mirror.requests());
    let metrics = telemetry_metrics(&gw).await;
    assert!(
        metrics.contains("sandgate_egress_decisions_total{decision=\"allowed\"} 1"),
        "{metrics}"
    );
    gw.stop().await;
}

async fn telemetry_metrics(gw: &TestGateway) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(gw.telemetry).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}
