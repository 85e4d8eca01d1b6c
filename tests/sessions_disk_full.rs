//! A full disk: a file written through the files API and an image imported with no room left
//! are answered 507 `insufficient_storage` saying why, lose nothing (the old content of a file
//! stays, no partial file or half-made image is left, `images/.incoming` is emptied), and the
//! gateway goes on serving. The disk is a small tmpfs each test mounts for itself.
#![allow(clippy::unwrap_used)]

#[path = "common/archive.rs"]
mod archive;
mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Method, StatusCode};
use serde_json::{json, Value};

const MIB: usize = 1024 * 1024;

/// Mounting a tmpfs and isolation need root (as in CI); elsewhere these tests say so and pass
/// vacuously.
fn is_root() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    eprintln!("skipped: disk-full tests mount a tmpfs, which needs root");
    false
}

/// A tmpfs of `size` at a folder, unmounted (lazily: a sandbox may still hold it) when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        nix::mount::mount(
            Some("tmpfs"),
            at,
            Some("tmpfs"),
            nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
            Some(format!("size={size},mode=0700").as_str()),
        )
        .unwrap_or_else(|e| panic!("mount a tmpfs at {}: {e}", at.display()));
        Tmpfs(at.to_path_buf())
    }

    /// Bytes in use.
    fn used(&self) -> u64 {
        let st = nix::sys::statvfs::statvfs(&self.0).unwrap();
        (st.blocks() - st.blocks_free()) * st.fragment_size()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

fn q(path: &str) -> String {
    url::form_urlencoded::byte_serialize(path.as_bytes()).collect()
}

async fn put(
    gw: &TestGateway,
    id: &str,
    path: &str,
    body: impl Into<Bytes>,
) -> (StatusCode, Value) {
    let resp = api_raw(
        &gw.tls(),
        Some(&gw.admin_key),
        Method::PUT,
        &format!("/v1/sandboxes/{id}/files?path={}", q(path)),
        Some("application/octet-stream"),
        body,
    )
    .await;
    (resp.status(), json_body(&resp))
}

async fn get(gw: &TestGateway, id: &str, path: &str) -> (StatusCode, Bytes) {
    let resp = api_raw(
        &gw.tls(),
        Some(&gw.admin_key),
        Method::GET,
        &format!("/v1/sandboxes/{id}/files?path={}", q(path)),
        None,
        Bytes::new(),
    )
    .await;
    (resp.status(), resp.body().clone())
}

async fn import(gw: &TestGateway, name: &str, archive: Vec<u8>) -> (StatusCode, Value) {
    let resp = api_raw(
        &gw.tls(),
        Some(&gw.admin_key),
        Method::POST,
        &format!("/v1/images?name={name}"),
        Some("application/x-tar"),
        archive,
    )
    .await;
    (resp.status(), json_body(&resp))
}

/// `GET /healthz` on the telemetry listener (plain HTTP): the status line.
async fn healthz(gw: &TestGateway) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(gw.telemetry).await.unwrap();
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    tcp.read_to_string(&mut answer).await.unwrap();
    answer.lines().next().unwrap_or("").to_string()
}

#[track_caller]
fn assert_full(status: StatusCode, v: &Value) {
    assert_eq!(status, StatusCode::INSUFFICIENT_STORAGE, "{v}");
    assert_eq!(v["error"]["code"], "insufficient_storage", "{v}");
    let message = v["error"]["message"].as_str().unwrap().to_lowercase();
    assert!(message.contains("no space left on device"), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_file_write_on_a_full_disk_is_507_and_leaves_the_old_content() {
    if !is_root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let disk = Tmpfs::mount(&tmp.path().join("volumes"), "24m");
    let gw = TestGateway::start_in(
        tmp.path(),
        &format!(
            "[orchestrator]\nvolumes_dir = \"{}\"\n",
            tmp.path().join("volumes").display()
        ),
    )
    .await;
    let (status, v) = gw
        .api(Method::POST, "/v1/volumes", Some(json!({"name": "small"})))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    let (status, v) = gw
        .api(
            Method::POST,
            "/v1/sandboxes",
            Some(
                json!({"command": ["python3", "-m", "http.server", "8000"], "ports": [8000],
                        "volumes": [{"volume": "small", "path": "/data"}]}),
            ),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    wait_for_status(&gw, &id, &["running"], Duration::from_secs(20)).await;

    let (status, v) = put(&gw, &id, "/data/keep.txt", "kept\n").await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    let before = disk.used();

    // Replacing a file with more than the disk holds: 507, and the old content stays.
    let (status, v) = put(&gw, &id, "/data/keep.txt", vec![7u8; 25 * MIB]).await;
    assert_full(status, &v);
    assert_eq!(
        get(&gw, &id, "/data/keep.txt").await,
        (StatusCode::OK, Bytes::from("kept\n"))
    );
    // A new file (in a new folder): 507, and the partial file does not stay (the helper
    // removes what it wrote: a reader never sees half a file); the folder made on the way
    // does, empty.
    let (status, v) = put(&gw, &id, "/data/new/big.bin", vec![9u8; 25 * MIB]).await;
    assert_full(status, &v);
    let (status, _) = get(&gw, &id, "/data/new/big.bin").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, listing) = get(&gw, &id, "/data/new").await;
    assert_eq!(status, StatusCode::OK);
    let listing: Value = serde_json::from_slice(&listing).unwrap();
    assert_eq!(listing["items"], json!([]), "{listing}");
    let after = disk.used();
    assert!(
        after < before + 64 * 1024,
        "the disk holds {after} bytes after the failed writes, {before} before"
    );

    // The gateway goes on serving, and the room is usable again.
    assert!(healthz(&gw).await.contains("200"));
    let (status, v) = put(&gw, &id, "/data/after.txt", vec![1u8; 4 * MIB]).await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    let (status, v) = gw.api(Method::GET, "/v1/volumes/small", None).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["size_bytes"], 4 * MIB + 5, "{v}");

    gw.stop().await;
    drop(disk);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_image_import_on_a_full_disk_is_507_and_nothing_is_listed() {
    if !is_root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let images_dir = tmp.path().join("data/images");
    let disk = Tmpfs::mount(&images_dir, "24m");
    let gw = TestGateway::start_in(tmp.path(), "").await;
    let incoming = images_dir.join(".incoming");
    let leftovers = || std::fs::read_dir(&incoming).unwrap().count();
    let listed = |v: &Value| -> Vec<String> {
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["name"].as_str().unwrap().to_string())
            .collect()
    };
    let base = disk.used();

    // The upload itself does not fit.
    let (status, v) = import(&gw, "huge", archive::sized_image(25 * MIB)).await;
    assert_full(status, &v);
    assert_eq!(leftovers(), 0, "the upload file is removed");
    // The upload fits, its unpacked files do not.
    let (status, v) = import(&gw, "big", archive::sized_image(13 * MIB)).await;
    assert_full(status, &v);
    assert!(
        v["error"]["message"].as_str().unwrap().contains("unpack"),
        "{v}"
    );
    assert_eq!(
        leftovers(),
        0,
        "the upload and the staged folder are removed"
    );
    let (status, v) = gw.api(Method::GET, "/v1/images", None).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(listed(&v), ["host"], "{v}");
    let used = disk.used();
    assert!(
        used < base + 64 * 1024,
        "the disk holds {used} bytes after the failed imports, {base} before"
    );

    // The gateway goes on serving: an image that fits imports, and it is listed.
    assert!(healthz(&gw).await.contains("200"));
    let (status, v) = import(&gw, "big", archive::sized_image(4 * MIB)).await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    let (_, v) = gw.api(Method::GET, "/v1/images", None).await;
    assert_eq!(listed(&v), ["host", "big"], "{v}");
    assert_eq!(leftovers(), 0);

    gw.stop().await;
    drop(disk);
}
