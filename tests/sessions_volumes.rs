//! Volumes (`/v1/volumes`, `volumes` on sandbox creation): what one isolated sandbox writes to
//! a volume's sub-path the next one that mounts it finds, another sub-path does not, a
//! `sub_path` never leaves the volume, read-only mounts refuse writes, a mounted volume is not
//! deleted, owners see only their own, and volumes outlive the gateway.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use http::{Method, StatusCode};
use serde_json::{json, Value};

/// Isolation needs root (as in CI); elsewhere these tests say so and pass vacuously.
fn can_isolate() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    eprintln!("skipped: volume tests need root");
    false
}

/// A running isolated sandbox (a web server, so it becomes `running`) mounting `volumes`.
async fn sandbox(gw: &TestGateway, volumes: Value) -> String {
    let (status, v) = gw
        .api(
            Method::POST,
            "/v1/sandboxes",
            Some(
                json!({"command": ["python3", "-m", "http.server", "8000"], "ports": [8000],
                        "volumes": volumes}),
            ),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    assert_eq!(v["isolation"], "namespaces", "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    wait_for_status(gw, &id, &["running"], Duration::from_secs(20)).await;
    id
}

/// A create that must be refused: its status and message.
async fn refused(gw: &TestGateway, volumes: Value) -> (StatusCode, String) {
    let (status, v) = gw
        .api(
            Method::POST,
            "/v1/sandboxes",
            Some(
                json!({"command": ["python3", "-m", "http.server", "8000"], "ports": [8000],
                        "volumes": volumes}),
            ),
        )
        .await;
    (
        status,
        v["error"]["message"].as_str().unwrap_or("").to_string(),
    )
}

/// Runs `script` with `sh -c` inside `id`: exit code and stdout + stderr.
async fn sh(gw: &TestGateway, id: &str, script: &str) -> (i64, String) {
    let (status, v) = gw
        .api(
            Method::POST,
            &format!("/v1/sandboxes/{id}/exec"),
            Some(json!({"command": ["sh", "-c", script], "timeout_secs": 30})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    (
        v["exit_code"].as_i64().unwrap_or(-1),
        format!(
            "{}{}",
            v["stdout"].as_str().unwrap(),
            v["stderr"].as_str().unwrap()
        ),
    )
}

async fn delete_sandbox(gw: &TestGateway, id: &str) {
    let (status, v) = gw
        .api(Method::DELETE, &format!("/v1/sandboxes/{id}"), None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{v}");
}

async fn volume(gw: &TestGateway, name: &str) -> (StatusCode, Value) {
    gw.api(Method::GET, &format!("/v1/volumes/{name}"), None)
        .await
}

fn mount(sub_path: &str) -> Value {
    json!([{"volume": "agents", "path": "/workspace", "sub_path": sub_path}])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_volume_keeps_a_sessions_files_and_nothing_leaves_it() {
    if !can_isolate() {
        return;
    }
    let gw = TestGateway::start().await;

    let (status, v) = gw
        .api(Method::POST, "/v1/volumes", Some(json!({"name": "agents"})))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    assert_eq!(v["name"], "agents");
    assert_eq!(v["size_bytes"], 0, "{v}");
    let admin_id = v["owner"].as_str().unwrap().to_string();
    let (status, _) = gw
        .api(Method::POST, "/v1/volumes", Some(json!({"name": "agents"})))
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    for bad in ["Agents", "a_b", "", "../x"] {
        let (status, v) = gw
            .api(Method::POST, "/v1/volumes", Some(json!({"name": bad})))
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{bad}: {v}");
    }

    // Sandbox 1: session a at /workspace, and the whole `sessions` folder at /sessions.
    let one = sandbox(
        &gw,
        json!([{"volume": "agents", "path": "/workspace", "sub_path": "sessions/a"},
               {"volume": "agents", "path": "/sessions", "sub_path": "sessions"}]),
    )
    .await;
    let (code, out) = sh(
        &gw,
        &one,
        "cd && pwd && printf hello > note.txt && chmod 600 note.txt && ls /sessions && \
         ln -s / /sessions/evil && id -u",
    )
    .await;
    assert_eq!(code, 0, "{out}");
    let mut lines = out.lines();
    assert_eq!(
        lines.next(),
        Some("/workspace"),
        "HOME is the volume: {out}"
    );
    assert_eq!(lines.next(), Some("a"), "{out}");
    let volume_uid = lines.next().unwrap().to_string();
    let (_, v) = volume(&gw, "agents").await;
    let size = v["size_bytes"].as_u64().unwrap();
    assert_eq!(size, 5 + 1, "the file and the link count: {v}");

    // A mounted volume is not deleted.
    let (status, v) = gw.api(Method::DELETE, "/v1/volumes/agents", None).await;
    assert_eq!(status, StatusCode::CONFLICT, "{v}");
    assert!(v.to_string().contains(&one), "{v}");

    // sub_path never leaves the volume: `..`, absolute, and the link sandbox 1 planted.
    for bad in [
        "../x",
        "sessions/../../x",
        "/abs",
        "/etc",
        "sessions/evil/etc",
        "sessions/evil",
    ] {
        let (status, message) = refused(&gw, mount(bad)).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{bad}: {message}");
    }
    let (_, message) = refused(&gw, mount("sessions/evil/etc")).await;
    assert!(message.contains("symbolic link"), "{message}");
    for (bad, why) in [
        (json!([{"volume": "agents", "path": "/etc"}]), "system"),
        (
            json!([{"volume": "agents", "path": "/usr/local"}]),
            "system",
        ),
        (json!([{"volume": "agents", "path": "/"}]), "/"),
        (
            json!([{"volume": "agents", "path": "/a/../b"}]),
            "normalized",
        ),
        (
            json!([{"volume": "agents", "path": "relative"}]),
            "absolute",
        ),
        (
            json!([{"volume": "agents", "path": "/a"}, {"volume": "agents", "path": "/a/b"}]),
            "overlap",
        ),
        (json!([{"volume": "nope", "path": "/a"}]), "no volume"),
        (
            json!((0..9)
                .map(|i| json!({"volume": "agents", "path": format!("/v{i}")}))
                .collect::<Vec<_>>()),
            "at most 8",
        ),
    ] {
        let (status, message) = refused(&gw, bad.clone()).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{bad}: {message}");
        assert!(message.contains(why), "{bad}: {message}");
    }
    let (status, v) = gw
        .api(
            Method::POST,
            "/v1/sandboxes",
            Some(json!({"upstream": "127.0.0.1", "ports": [8000], "volumes": mount("x")})),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{v}");

    // Nothing was made through the link, on the host or anywhere.
    assert!(!std::path::Path::new("/etc/etc").exists());
    delete_sandbox(&gw, &one).await;

    // Sandbox 2 resumes session a: the file is there, writable, under the same uid; a
    // read-only mount of it refuses writes.
    let two = sandbox(
        &gw,
        json!([{"volume": "agents", "path": "/workspace", "sub_path": "sessions/a"},
               {"volume": "agents", "path": "/opt/ro", "sub_path": "sessions/a", "read_only": true}]),
    )
    .await;
    let (code, out) = sh(
        &gw,
        &two,
        "cat note.txt && printf ' again' >> note.txt && id -u",
    )
    .await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(out, format!("hello{volume_uid}\n"), "{out}");
    let (code, out) = sh(&gw, &two, "cat /opt/ro/note.txt && touch /opt/ro/x").await;
    assert_ne!(code, 0, "{out}");
    assert!(out.starts_with("hello again"), "{out}");
    assert!(out.contains("Read-only file system"), "{out}");
    let (_, v) = volume(&gw, "agents").await;
    assert!(v["size_bytes"].as_u64().unwrap() > size, "{v}");

    // Session b is another folder: none of a's files.
    let three = sandbox(&gw, mount("sessions/b")).await;
    let (code, out) = sh(&gw, &three, "ls -A /workspace; cat /workspace/note.txt").await;
    assert_ne!(code, 0, "{out}");
    assert!(!out.contains("hello"), "{out}");
    // A sandbox without volumes has a uid of its own.
    let plain = sandbox(&gw, json!([])).await;
    let (_, out) = sh(&gw, &plain, "id -u").await;
    assert_ne!(out.trim(), volume_uid);

    // Another owner sees none of it, and has names of its own.
    let (other_id, other) = create_credential(
        &gw,
        json!({"name": "other", "scopes": ["sandboxes:read", "sandboxes:write"]}),
    )
    .await;
    assert_ne!(other_id, admin_id);
    let (status, _) = gw
        .api_as(&other, Method::GET, "/v1/volumes/agents", None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = gw
        .api_as(&other, Method::DELETE, "/v1/volumes/agents", None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, v) = gw.api_as(&other, Method::GET, "/v1/volumes", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v["items"], json!([]), "{v}");
    let (status, v) = gw
        .api_as(
            &other,
            Method::POST,
            "/v1/volumes",
            Some(json!({"name": "agents"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    assert_eq!(v["owner"], other_id);
    let (_, v) = gw.api(Method::GET, "/v1/volumes", None).await;
    assert_eq!(
        v["items"].as_array().unwrap().len(),
        2,
        "the admin sees all: {v}"
    );
    let (status, _) = gw
        .api_as(&other, Method::DELETE, "/v1/volumes/agents", None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);

    // Once no live sandbox mounts it, it is deleted, folder and all.
    for id in [&two, &three, &plain] {
        delete_sandbox(&gw, id).await;
    }
    let (status, v) = gw.api(Method::DELETE, "/v1/volumes/agents", None).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{v}");
    let (status, _) = volume(&gw, "agents").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let leftovers: Vec<_> = walk_files(&gw.dir.join("data/volumes"));
    assert!(
        leftovers.iter().all(|p| !p.ends_with("note.txt")),
        "{leftovers:?}"
    );
    let (_, v) = gw.api(Method::GET, "/v1/audit?limit=1000", None).await;
    let actions: Vec<&str> = v["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["action"].as_str())
        .collect();
    assert!(
        actions.contains(&"volume.create") && actions.contains(&"volume.delete"),
        "{actions:?}"
    );
    gw.stop().await;
}

fn walk_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let path = e.path();
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            out.extend(walk_files(&path));
        } else {
            out.push(path);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn volumes_outlive_the_gateway() {
    if !can_isolate() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let gw = TestGateway::start_in(tmp.path(), "").await;
    let (status, v) = gw
        .api(Method::POST, "/v1/volumes", Some(json!({"name": "agents"})))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    let id = sandbox(&gw, mount("sessions/s-42")).await;
    let (code, out) = sh(&gw, &id, "echo kept > /workspace/state && id -u").await;
    assert_eq!(code, 0, "{out}");
    let uid = out.trim().to_string();
    gw.stop().await;

    let gw = TestGateway::start_in(tmp.path(), "").await;
    let (status, v) = volume(&gw, "agents").await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert!(v["size_bytes"].as_u64().unwrap() >= 5, "{v}");
    // The sandbox that mounted it ended with the old gateway: the volume can be deleted, but
    // first a new sandbox finds the state, under the volume's same uid.
    let id = sandbox(&gw, mount("sessions/s-42")).await;
    let (code, out) = sh(&gw, &id, "cat /workspace/state && id -u").await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(out, format!("kept\n{uid}\n"));
    // Its uid stayed reserved: a sandbox without volumes gets another.
    let plain = sandbox(&gw, json!([])).await;
    let (_, out) = sh(&gw, &plain, "id -u").await;
    assert_ne!(out.trim(), uid);
    delete_sandbox(&gw, &id).await;
    delete_sandbox(&gw, &plain).await;
    let (status, v) = gw.api(Method::DELETE, "/v1/volumes/agents", None).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{v}");
    gw.stop().await;
}

/// The files API writes where the sandbox may: its writable volumes too, never a read-only one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_files_api_writes_a_writable_volume_and_not_a_read_only_one() {
    if !can_isolate() {
        return;
    }
    let gw = TestGateway::start().await;
    let (status, v) = gw
        .api(Method::POST, "/v1/volumes", Some(json!({"name": "agents"})))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    let id = sandbox(
        &gw,
        json!([{"volume": "agents", "path": "/data", "sub_path": "s1"},
               {"volume": "agents", "path": "/ro", "sub_path": "s1", "read_only": true}]),
    )
    .await;
    let file = |method: Method, path: &str, body: &'static str| {
        let tls = gw.tls();
        let key = gw.admin_key.clone();
        let uri = format!("/v1/sandboxes/{id}/files?path={path}");
        async move {
            api_raw(
                &tls,
                Some(&key),
                method,
                &uri,
                Some("application/octet-stream"),
                body,
            )
            .await
        }
    };
    let put = file(Method::PUT, "/data/hello.txt", "from the files API").await;
    assert_eq!(put.status(), StatusCode::CREATED, "{:?}", put.body());
    let (code, out) = sh(&gw, &id, "cat /data/hello.txt; echo; cat /ro/hello.txt").await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(out, "from the files API\nfrom the files API");
    let got = file(Method::GET, "/ro/hello.txt", "").await;
    assert_eq!(got.status(), StatusCode::OK);
    assert_eq!(&got.body()[..], b"from the files API");
    // The read-only mount is not a writable place: refused before anything runs.
    let refused = file(Method::PUT, "/ro/other.txt", "x").await;
    assert_eq!(
        refused.status(),
        StatusCode::UNPROCESSABLE_ENTITY,
        "{:?}",
        refused.body()
    );
    let (_, out) = sh(&gw, &id, "ls /data").await;
    assert_eq!(out.trim(), "hello.txt");
    delete_sandbox(&gw, &id).await;
    gw.stop().await;
}
