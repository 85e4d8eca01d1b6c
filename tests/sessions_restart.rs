//! Sessions across restarts of the real binary: an image import cut off by a SIGKILL leaves
//! nothing listed and nothing in `images/.incoming` once the gateway is back (and the name
//! imports again), and volumes (with their files) and images outlive a restart, usable by new
//! sandboxes.
#![allow(clippy::unwrap_used)]

#[path = "common/archive.rs"]
mod archive;
mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::{Method, StatusCode};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Isolation needs root (as in CI); elsewhere these tests say so and pass vacuously.
fn can_isolate() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    eprintln!("skipped: session restart tests need root");
    false
}

/// `sandgate serve` on free ports with its data dir in `dir/data`; its log in `dir/server.log`.
struct Serve {
    child: tokio::process::Child,
    dir: PathBuf,
    tls: TlsClient,
    admin_key: String,
}

impl Serve {
    async fn start(dir: &Path) -> Serve {
        let config = dir.join("sandgate.toml");
        std::fs::write(
            &config,
            format!(
                "[gateway]\nlisten = \"127.0.0.1:{}\"\nbase_domain = \"{BASE}\"\nshutdown_grace_secs = 2\n\
                 [telemetry]\nlisten = \"127.0.0.1:{}\"\n\
                 [store]\ndata_dir = \"data\"\n\
                 [orchestrator]\nisolation = \"namespaces\"\n",
                free_port(),
                free_port()
            ),
        )
        .unwrap();
        Serve::start_with(dir, &config).await
    }

    /// Starts again on the config and data dir that `dir` holds.
    async fn start_with(dir: &Path, config: &Path) -> Serve {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("server.log"))
            .unwrap();
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_sandgate"))
            .args(["serve", "--config"])
            .arg(config)
            .current_dir(dir)
            .env_remove("SANDGATE_CONFIG")
            .env_remove("SANDGATE_STORE_URL")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("start sandgate serve");
        let listen: std::net::SocketAddr = std::fs::read_to_string(config)
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("listen = \""))
            .and_then(|l| l.strip_suffix('"'))
            .unwrap()
            .parse()
            .unwrap();
        let data = dir.join("data");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("sandgate exited ({status}): {}", log_of(dir));
            }
            if let (Ok(key), Ok(ca), Ok(_)) = (
                std::fs::read_to_string(data.join("admin.key")),
                std::fs::read(data.join("certs/ca.pem")),
                tokio::net::TcpStream::connect(listen).await,
            ) {
                let tls = TlsClient::new(listen, &ca);
                let key = key.trim().to_string();
                let (status, _) = api_via(&tls, &key, Method::GET, "/v1/images", None).await;
                if status == StatusCode::OK {
                    return Serve {
                        child,
                        dir: dir.to_path_buf(),
                        tls,
                        admin_key: key,
                    };
                }
            }
            assert!(
                Instant::now() < deadline,
                "sandgate did not start: {}",
                log_of(dir)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn api(&self, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        api_via(&self.tls, &self.admin_key, method, path, body).await
    }

    async fn import(&self, name: &str, archive: Vec<u8>) -> (StatusCode, Value) {
        let resp = api_raw(
            &self.tls,
            Some(&self.admin_key),
            Method::POST,
            &format!("/v1/images?name={name}"),
            Some("application/x-tar"),
            archive,
        )
        .await;
        (resp.status(), json_body(&resp))
    }

    fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(i32::try_from(self.child.id().unwrap()).unwrap())
    }

    /// SIGKILL: no cleanup of any kind runs.
    async fn kill(mut self) {
        nix::sys::signal::kill(self.pid(), nix::sys::signal::Signal::SIGKILL).unwrap();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
    }

    /// SIGTERM, and its graceful end.
    async fn stop(mut self) {
        nix::sys::signal::kill(self.pid(), nix::sys::signal::Signal::SIGTERM).unwrap();
        let status = tokio::time::timeout(Duration::from_secs(20), self.child.wait())
            .await
            .expect("sandgate stops on SIGTERM")
            .unwrap();
        assert!(status.success(), "{}", log_of(&self.dir));
    }

    /// A running isolated sandbox made from `body` (a `command` or an `image` that serves
    /// port 8000).
    async fn sandbox(&self, body: Value) -> String {
        let (status, v) = self.api(Method::POST, "/v1/sandboxes", Some(body)).await;
        assert_eq!(status, StatusCode::CREATED, "{v}");
        assert_eq!(v["isolation"], "namespaces", "{v}");
        let id = v["id"].as_str().unwrap().to_string();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (_, v) = self
                .api(Method::GET, &format!("/v1/sandboxes/{id}"), None)
                .await;
            if v["status"] == "running" {
                return id;
            }
            assert!(
                v["status"] == "starting" && Instant::now() < deadline,
                "{v}\n{}",
                log_of(&self.dir)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn sh(&self, id: &str, script: &str) -> String {
        let (status, v) = self
            .api(
                Method::POST,
                &format!("/v1/sandboxes/{id}/exec"),
                Some(json!({"command": ["sh", "-c", script], "timeout_secs": 30})),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{v}");
        assert_eq!(v["exit_code"], 0, "{v}");
        v["stdout"].as_str().unwrap().to_string()
    }

    async fn delete(&self, id: &str) {
        let (status, v) = self
            .api(Method::DELETE, &format!("/v1/sandboxes/{id}"), None)
            .await;
        assert_eq!(status, StatusCode::NO_CONTENT, "{v}");
    }
}

fn log_of(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("server.log")).unwrap_or_default()
}

fn image_names(v: &Value) -> Vec<String> {
    v["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap().to_string())
        .collect()
}

fn incoming(dir: &Path) -> Vec<(String, u64)> {
    std::fs::read_dir(dir.join("data/images/.incoming"))
        .map(|entries| {
            entries
                .map(|e| {
                    let e = e.unwrap();
                    let len = e.metadata().map(|m| m.len()).unwrap_or(0);
                    (e.file_name().to_string_lossy().into_owned(), len)
                })
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_import_killed_midway_leaves_nothing_after_a_restart() {
    if !can_isolate() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let serve = Serve::start(dir).await;
    let upload = archive::busybox_image("imported whole\n");

    // An import whose body comes slowly: its head and a first part, then a trickle.
    let mut tls = serve.tls.connect(BASE, &[b"http/1.1"]).await;
    let head = format!(
        "POST /v1/images?name=slow HTTP/1.1\r\nhost: {BASE}\r\nauthorization: Bearer {}\r\n\
         content-type: application/x-tar\r\ncontent-length: {}\r\n\r\n",
        serve.admin_key,
        upload.len()
    );
    tls.write_all(head.as_bytes()).await.unwrap();
    let first = upload.len() / 2;
    tls.write_all(&upload[..first]).await.unwrap();
    tls.flush().await.unwrap();
    let sender = tokio::spawn(async move {
        for chunk in upload[first..].chunks(1024) {
            if tls.write_all(chunk).await.is_err() || tls.flush().await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let mut rest = Vec::new();
        let _ = tls.read_to_end(&mut rest).await;
        rest
    });
    // The upload is on disk, partly, when the gateway dies.
    let deadline = Instant::now() + Duration::from_secs(10);
    let leftover = loop {
        if let Some((name, len)) = incoming(dir).into_iter().find(|(_, len)| *len > 0) {
            break (name, len);
        }
        assert!(
            Instant::now() < deadline,
            "no upload under images/.incoming"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    serve.kill().await;
    let answer = tokio::time::timeout(Duration::from_secs(10), sender)
        .await
        .expect("the client sees the connection end")
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&answer).contains("201"),
        "the import did not finish"
    );
    assert!(leftover.0.ends_with(".tar"), "{leftover:?}");
    let left = incoming(dir);
    assert!(
        left.iter().any(|(name, _)| *name == leftover.0),
        "the killed import left its upload: {left:?}"
    );
    assert!(!dir.join("data/images/slow").exists());

    // Back on the same data dir: nothing of it is listed or left, and the name is free.
    let serve = Serve::start_with(dir, &dir.join("sandgate.toml")).await;
    let (status, v) = serve.api(Method::GET, "/v1/images", None).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(image_names(&v), ["host"], "{v}");
    assert_eq!(incoming(dir), Vec::<(String, u64)>::new());
    let (status, v) = serve
        .import("slow", archive::busybox_image("imported whole\n"))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    let (_, v) = serve.api(Method::GET, "/v1/images", None).await;
    assert_eq!(image_names(&v), ["host", "slow"], "{v}");
    let id = serve
        .sandbox(json!({"image": "slow", "ports": [8000]}))
        .await;
    assert_eq!(serve.sh(&id, "cat /marker.txt").await, "imported whole\n");
    serve.delete(&id).await;
    serve.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn volumes_and_images_survive_a_restart() {
    if !can_isolate() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let serve = Serve::start(dir).await;

    // A volume with a file a sandbox wrote (through the files API), and an image.
    let (status, v) = serve
        .api(Method::POST, "/v1/volumes", Some(json!({"name": "notes"})))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    let mounts = json!([{"volume": "notes", "path": "/data", "sub_path": "sessions/s-1"}]);
    let first = serve
        .sandbox(
            json!({"command": ["python3", "-m", "http.server", "8000"], "ports": [8000],
                        "volumes": mounts}),
        )
        .await;
    let resp = api_raw(
        &serve.tls,
        Some(&serve.admin_key),
        Method::PUT,
        &format!("/v1/sandboxes/{first}/files?path=/data/notes.txt"),
        Some("application/octet-stream"),
        Bytes::from("written before the restart\n"),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::CREATED, "{:?}", resp.body());
    let (status, v) = serve
        .import("keeper", archive::busybox_image("from the kept image\n"))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    let (_, before) = serve.api(Method::GET, "/v1/volumes/notes", None).await;
    assert_eq!(before["size_bytes"], 27, "{before}");
    serve.stop().await;

    let serve = Serve::start_with(dir, &dir.join("sandgate.toml")).await;
    // The volume: listed, its size counted, its file there for a new sandbox.
    let (status, v) = serve.api(Method::GET, "/v1/volumes", None).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let volume = v["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == "notes")
        .cloned()
        .unwrap_or_else(|| panic!("the volume is listed: {v}"));
    assert!(volume["size_bytes"].as_u64().unwrap() > 0, "{volume}");
    assert_eq!(volume["size_bytes"], before["size_bytes"], "{volume}");
    assert_eq!(volume["created_at"], before["created_at"], "{volume}");
    let second = serve
        .sandbox(
            json!({"command": ["python3", "-m", "http.server", "8000"], "ports": [8000],
                        "volumes": mounts}),
        )
        .await;
    assert_ne!(first, second);
    assert_eq!(
        serve.sh(&second, "cat /data/notes.txt").await,
        "written before the restart\n"
    );
    let resp = api_raw(
        &serve.tls,
        Some(&serve.admin_key),
        Method::GET,
        &format!("/v1/sandboxes/{second}/files?path=/data/notes.txt"),
        None,
        Bytes::new(),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.body(), "written before the restart\n");

    // The image: listed, and a sandbox starts from it.
    let (_, v) = serve.api(Method::GET, "/v1/images", None).await;
    assert_eq!(image_names(&v), ["host", "keeper"], "{v}");
    let from_image = serve
        .sandbox(json!({"image": "keeper", "ports": [8000]}))
        .await;
    assert_eq!(
        serve.sh(&from_image, "cat /marker.txt").await,
        "from the kept image\n"
    );
    for id in [&second, &from_image] {
        serve.delete(id).await;
    }
    serve.stop().await;
}

/// Bytes of the files under `dir`, not following links.
fn bytes_under(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(e.path()),
                Ok(t) if t.is_file() => total += e.metadata().map(|m| m.len()).unwrap_or(0),
                _ => {}
            }
        }
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_snapshot_killed_midway_leaves_nothing_and_the_frozen_sandbox_is_ended() {
    if !can_isolate() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let serve = Serve::start(dir).await;
    let id = serve
        .sandbox(json!({"command": ["python3", "-m", "http.server", "8000"], "ports": [8000]}))
        .await;
    // Enough to copy for a while: 48 files of 8 MiB.
    serve
        .sh(
            &id,
            "for i in $(seq 48); do head -c 8388608 /dev/urandom > /workspace/f$i; done",
        )
        .await;
    let (tls, key) = (serve.tls.clone(), serve.admin_key.clone());
    let path = format!("/v1/sandboxes/{id}/snapshots");
    let taking = tokio::spawn(async move {
        api_via(
            &tls,
            &key,
            Method::POST,
            &path,
            Some(json!({"name": "half"})),
        )
        .await
    });
    // The copy is under way in images/.incoming when the gateway dies.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let staged: u64 = incoming(dir)
            .iter()
            .map(|(name, _)| bytes_under(&dir.join("data/images/.incoming").join(name)))
            .sum();
        if staged > 0 {
            break;
        }
        assert!(
            !taking.is_finished() && Instant::now() < deadline,
            "no snapshot copy seen under images/.incoming"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let pids = sandbox_pids(&id);
    assert!(!pids.is_empty());
    serve.kill().await;
    taking.abort();
    assert!(!dir.join("data/images/half").exists());
    assert!(!incoming(dir).is_empty(), "the killed copy left its folder");

    // Back: nothing listed or left, the sandbox (frozen when the gateway died) is ended, and
    // the name is free.
    let serve = Serve::start_with(dir, &dir.join("sandgate.toml")).await;
    let (_, v) = serve.api(Method::GET, "/v1/images", None).await;
    assert_eq!(image_names(&v), ["host"], "{v}");
    assert_eq!(incoming(dir), Vec::<(String, u64)>::new());
    let (_, v) = serve
        .api(Method::GET, &format!("/v1/sandboxes/{id}"), None)
        .await;
    assert_ne!(v["status"], "running", "{v}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while pids.iter().any(|&p| process_alive(p)) {
        assert!(
            Instant::now() < deadline,
            "the frozen sandbox's processes live on"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let again = serve
        .sandbox(json!({"command": ["python3", "-m", "http.server", "8000"], "ports": [8000]}))
        .await;
    serve.sh(&again, "echo kept > /workspace/k.txt").await;
    let (status, v) = serve
        .api(
            Method::POST,
            &format!("/v1/sandboxes/{again}/snapshots"),
            Some(json!({"name": "half"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    serve.delete(&again).await;
    serve.stop().await;
}
