//! The files API on isolated sandboxes (`/v1/sandboxes/{id}/files`) and `sandgate cp`/`ls`:
//! bytes go in and come out exactly, modes and listings are right, deletes do what they say,
//! and every operation happens as the sandbox's user in its own view, so no symlink it plants
//! ever reaches a host file. A 1 GiB upload and download stream in bounded memory.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use futures_util::StreamExt;
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use serde_json::json;

/// The tests run one at a time: the large one measures this process's memory.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Isolation needs root (as in CI); elsewhere these tests say so and pass vacuously.
fn can_isolate() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    eprintln!("skipped: isolation tests need root");
    false
}

/// A running isolated sandbox (a web server keeps it up).
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

async fn sh(gw: &TestGateway, id: &str, script: &str) -> String {
    let (status, v) = gw
        .api(
            Method::POST,
            &format!("/v1/sandboxes/{id}/exec"),
            Some(json!({"command": ["sh", "-c", script], "timeout_secs": 30})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    format!(
        "{}{}",
        v["stdout"].as_str().unwrap(),
        v["stderr"].as_str().unwrap()
    )
}

fn q(path: &str) -> String {
    url::form_urlencoded::byte_serialize(path.as_bytes()).collect()
}

async fn files(
    gw: &TestGateway,
    key: &str,
    method: Method,
    id: &str,
    query: &str,
    body: impl Into<Bytes>,
) -> Response<Bytes> {
    api_raw(
        &gw.tls(),
        Some(key),
        method,
        &format!("/v1/sandboxes/{id}/files?{query}"),
        Some("application/octet-stream"),
        body,
    )
    .await
}

async fn put(gw: &TestGateway, id: &str, path: &str, body: impl Into<Bytes>) -> Response<Bytes> {
    files(
        gw,
        &gw.admin_key,
        Method::PUT,
        id,
        &format!("path={}", q(path)),
        body,
    )
    .await
}

async fn get(gw: &TestGateway, id: &str, path: &str) -> Response<Bytes> {
    files(
        gw,
        &gw.admin_key,
        Method::GET,
        id,
        &format!("path={}", q(path)),
        "",
    )
    .await
}

async fn delete(gw: &TestGateway, id: &str, query: &str) -> Response<Bytes> {
    files(gw, &gw.admin_key, Method::DELETE, id, query, "").await
}

/// Deterministic bytes that no pattern-repeating bug could fake.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

#[tokio::test]
async fn files_round_trip_byte_for_byte() {
    if !can_isolate() {
        return;
    }
    let _one = SERIAL.lock().await;
    let gw = TestGateway::start().await;
    let id = sandbox(&gw).await;

    let mut every_byte: Vec<u8> = (0..=255u8).cycle().take(256 * 64).collect();
    every_byte.extend(noise(4096, 7));
    let big = noise(10 * 1024 * 1024, 42);
    for (path, content) in [
        ("/workspace/bytes.bin", every_byte.clone()),
        ("/workspace/empty", Vec::new()),
        ("/workspace/big/ten-mib.bin", big.clone()),
        ("/tmp/in-tmp.bin", every_byte.clone()),
    ] {
        let r = put(&gw, &id, path, content.clone()).await;
        assert_eq!(r.status(), StatusCode::CREATED, "{path}: {:?}", r.body());
        assert_eq!(json_body(&r)["size"], content.len(), "{path}");
        let r = get(&gw, &id, path).await;
        assert_eq!(r.status(), StatusCode::OK, "{path}");
        assert_eq!(r.headers()["content-type"], "application/octet-stream");
        assert_eq!(
            r.headers()["content-length"],
            content.len().to_string().as_str()
        );
        assert!(r.body()[..] == content[..], "{path} came back different");
    }
    // The sandbox sees the same bytes, in files of its own user.
    let seen = sh(
        &gw,
        &id,
        "cmp /workspace/bytes.bin /tmp/in-tmp.bin && wc -c < /workspace/big/ten-mib.bin && \
         [ \"$(stat -c %u /workspace/bytes.bin)\" = \"$(id -u)\" ] && stat -c %a /workspace/bytes.bin",
    )
    .await;
    assert_eq!(seen, "10485760\n644\n");

    // Replacing answers 204 and keeps the mode it had.
    sh(&gw, &id, "chmod 600 /workspace/bytes.bin").await;
    let r = put(&gw, &id, "/workspace/bytes.bin", "new").await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(get(&gw, &id, "/workspace/bytes.bin").await.body(), "new");
    assert_eq!(
        sh(&gw, &id, "stat -c %a /workspace/bytes.bin").await,
        "600\n"
    );
    gw.stop().await;
}

#[tokio::test]
async fn modes_listings_deletes_and_refusals() {
    if !can_isolate() {
        return;
    }
    let _one = SERIAL.lock().await;
    let gw = TestGateway::start().await;
    let id = sandbox(&gw).await;

    let script = "#!/bin/sh\necho ran\n";
    let r = files(
        &gw,
        &gw.admin_key,
        Method::PUT,
        &id,
        "path=/workspace/dir/sub/run.sh&mode=0755",
        script,
    )
    .await;
    assert_eq!(r.status(), StatusCode::CREATED, "{:?}", r.body());
    assert_eq!(
        sh(&gw, &id, "stat -c %a dir/sub/run.sh && dir/sub/run.sh").await,
        "755\nran\n"
    );
    assert_eq!(
        put(&gw, &id, "/workspace/dir/a.txt", "aaa").await.status(),
        StatusCode::CREATED
    );
    sh(&gw, &id, "ln -s run.sh /workspace/dir/sub/link").await;

    let r = get(&gw, &id, "/workspace/dir").await;
    assert_eq!(r.status(), StatusCode::OK);
    let items = json_body(&r)["items"].as_array().unwrap().clone();
    let names: Vec<&str> = items.iter().map(|i| i["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["a.txt", "sub"]);
    assert_eq!(items[0]["type"], "file");
    assert_eq!(items[0]["size"], 3);
    assert_eq!(items[0]["mode"], "0644");
    assert_eq!(items[1]["type"], "dir");
    let modified = items[0]["modified_at"].as_str().unwrap();
    let t = time::OffsetDateTime::parse(modified, &time::format_description::well_known::Rfc3339)
        .unwrap();
    assert!(
        (time::OffsetDateTime::now_utc() - t).whole_seconds().abs() < 120,
        "{modified}"
    );
    let sub = json_body(&get(&gw, &id, "/workspace/dir/sub").await)["items"].clone();
    assert_eq!(sub[0]["name"], "link");
    assert_eq!(sub[0]["type"], "symlink");
    assert_eq!(sub[1]["name"], "run.sh");
    assert_eq!(sub[1]["mode"], "0755");
    assert_eq!(sub[1]["size"], script.len());

    // Bad modes, relative paths, `..`, places outside the writable ones: 422.
    for query in [
        "path=/workspace/m&mode=999",
        "path=/workspace/m&mode=abc",
        "path=/workspace/m&mode=01777",
        "path=workspace/m",
        "path=/workspace/../etc/m",
        "path=/etc/m",
        "path=/workspace",
        "path=/usr/bin/m",
        "mode=0644",
    ] {
        let r = files(&gw, &gw.admin_key, Method::PUT, &id, query, "x").await;
        assert_eq!(
            r.status(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "{query}: {:?}",
            r.body()
        );
        assert_eq!(error_code(&r), "invalid_argument");
    }
    for query in ["path=/workspace", "path=/etc/passwd", "path=tmp/x"] {
        let r = delete(&gw, &id, query).await;
        assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY, "{query}");
    }
    // Missing paths: 404 not_found.
    for r in [
        get(&gw, &id, "/workspace/nope").await,
        get(&gw, &id, "/workspace/dir/a.txt/below").await,
        delete(&gw, &id, "path=/workspace/nope").await,
    ] {
        assert_eq!(r.status(), StatusCode::NOT_FOUND, "{:?}", r.body());
        assert_eq!(error_code(&r), "not_found");
    }
    // A folder where a file goes, a non-empty folder without recursive: 409.
    assert_eq!(
        put(&gw, &id, "/workspace/dir", "x").await.status(),
        StatusCode::CONFLICT
    );
    assert_eq!(
        delete(&gw, &id, "path=/workspace/dir").await.status(),
        StatusCode::CONFLICT
    );
    // Reads may go wherever the sandbox itself reads; writes there are its own user's.
    let r = get(&gw, &id, "/etc/hostname").await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.body(), &format!("{id}\n"));
    assert!(get(&gw, &id, "/dev/zero").await.status().is_client_error());

    // Deletes: a file, then a folder and all it holds.
    assert_eq!(
        delete(&gw, &id, "path=/workspace/dir/a.txt").await.status(),
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        get(&gw, &id, "/workspace/dir/a.txt").await.status(),
        StatusCode::NOT_FOUND
    );
    let r = delete(&gw, &id, "path=/workspace/dir&recursive=true").await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(sh(&gw, &id, "ls -A /workspace").await, "");

    // The audit log has the path and the size, never the content.
    let (_, audit) = gw.api(Method::GET, "/v1/audit?limit=100", None).await;
    let events: Vec<(String, String)> = audit["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["action"].as_str().unwrap().into(),
                e["target"].as_str().unwrap().into(),
            )
        })
        .collect();
    let wrote = format!("{id}:/workspace/dir/a.txt (3 bytes)");
    assert!(
        events.contains(&("file.write".into(), wrote.clone())),
        "{events:?}"
    );
    assert!(
        events.contains(&("file.delete".into(), wrote)),
        "{events:?}"
    );
    assert!(events.contains(&("file.delete".into(), format!("{id}:/workspace/dir"))));
    assert!(!audit.to_string().contains("echo ran"));
    gw.stop().await;
}

#[tokio::test]
async fn symlinks_planted_by_the_sandbox_never_reach_the_host() {
    if !can_isolate() {
        return;
    }
    let _one = SERIAL.lock().await;
    let gw = TestGateway::start().await;
    let id = sandbox(&gw).await;

    // A host folder anyone may enter, holding a file anyone may read: were the operations
    // done in the host's view, even the sandbox's own uid would get at it.
    let host = tempfile::Builder::new()
        .prefix("sandgate-host-")
        .tempdir_in("/tmp")
        .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(host.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let secret_file = host.path().join("secret.txt");
    std::fs::write(&secret_file, "host secret 5f1c").unwrap();
    std::fs::set_permissions(&secret_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let host_dir = host.path().display().to_string();
    let secret = secret_file.display().to_string();
    let data_dir = gw
        .gw
        .config
        .store
        .admin_key_path()
        .parent()
        .unwrap()
        .display()
        .to_string();
    let admin_key = gw.admin_key.clone();

    sh(
        &gw,
        &id,
        &format!(
            "ln -s / /workspace/root && ln -s {data_dir} /workspace/data && \
             ln -s {secret} /workspace/h && ln -s {host_dir} /workspace/hd"
        ),
    )
    .await;

    // Reads resolve in the sandbox's view: the host's files are simply not there.
    for path in [
        "/workspace/h".to_string(),
        format!("/workspace/root{secret}"),
        "/workspace/hd/secret.txt".to_string(),
        "/workspace/data/admin.key".to_string(),
        format!("/workspace/root{data_dir}/admin.key"),
    ] {
        let r = get(&gw, &id, &path).await;
        assert_eq!(r.status(), StatusCode::NOT_FOUND, "{path}: {:?}", r.body());
        let text = String::from_utf8_lossy(r.body());
        assert!(
            !text.contains("host secret") && !text.contains(&admin_key),
            "{path}"
        );
    }
    for path in ["/workspace/data", "/workspace/hd"] {
        assert_eq!(
            get(&gw, &id, path).await.status(),
            StatusCode::NOT_FOUND,
            "{path}"
        );
    }
    // `/` through the link is the sandbox's own root: its generated passwd, not the host's.
    let r = get(&gw, &id, "/workspace/root/etc/passwd").await;
    assert_eq!(r.status(), StatusCode::OK);
    assert!(String::from_utf8_lossy(r.body()).contains("sandbox:x:"));
    assert_ne!(r.body(), &std::fs::read("/etc/passwd").unwrap());

    // Writes through the links never write a host file.
    let r = put(&gw, &id, "/workspace/h", "replaced").await;
    assert_eq!(
        r.status(),
        StatusCode::NO_CONTENT,
        "the link itself is replaced"
    );
    assert_eq!(get(&gw, &id, "/workspace/h").await.body(), "replaced");
    for path in [
        "/workspace/hd/new.txt".to_string(),
        "/workspace/data/new.txt".to_string(),
        "/workspace/root/etc/new.txt".to_string(),
    ] {
        let r = put(&gw, &id, &path, "evil").await;
        assert!(
            r.status().is_client_error(),
            "{path}: {} {:?}",
            r.status(),
            r.body()
        );
    }
    // Through `/`, the host's /tmp/<folder> is the sandbox's own /tmp: written there.
    let r = put(
        &gw,
        &id,
        &format!("/workspace/root{host_dir}/new.txt"),
        "inside",
    )
    .await;
    assert_eq!(r.status(), StatusCode::CREATED, "{:?}", r.body());
    assert_eq!(
        sh(&gw, &id, &format!("cat {host_dir}/new.txt")).await,
        "inside"
    );
    // Deleting through them: the link goes, never what it names.
    let r = delete(
        &gw,
        &id,
        &format!("path={}", q(&format!("/workspace/root{secret}"))),
    )
    .await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        delete(&gw, &id, "path=/workspace/hd").await.status(),
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        delete(&gw, &id, "path=/workspace/data&recursive=true")
            .await
            .status(),
        StatusCode::NO_CONTENT
    );

    assert_eq!(
        std::fs::read_to_string(&secret_file).unwrap(),
        "host secret 5f1c"
    );
    let left: Vec<_> = std::fs::read_dir(host.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, ["secret.txt"]);
    let data = std::path::Path::new(&data_dir);
    assert!(!data.join("new.txt").exists());
    assert!(data.join("admin.key").exists());
    assert!(!std::path::Path::new("/etc/new.txt").exists());
    gw.stop().await;
}

#[tokio::test]
async fn owners_scopes_and_unisolated_sandboxes() {
    if !can_isolate() {
        return;
    }
    let _one = SERIAL.lock().await;
    let gw = TestGateway::start().await;
    let id = sandbox(&gw).await;
    assert_eq!(
        put(&gw, &id, "/workspace/mine.txt", "mine").await.status(),
        StatusCode::CREATED
    );

    let (_, other) = create_credential(
        &gw,
        json!({"name": "other", "scopes": ["sandboxes:read", "sandboxes:write"]}),
    )
    .await;
    let query = "path=/workspace/mine.txt";
    for method in [Method::GET, Method::PUT, Method::DELETE] {
        let r = files(&gw, &other, method.clone(), &id, query, "x").await;
        assert_eq!(r.status(), StatusCode::NOT_FOUND, "{method}");
        assert_eq!(error_code(&r), "not_found");
    }
    let (_, reader) =
        create_credential(&gw, json!({"name": "reader", "scopes": ["sandboxes:read"]})).await;
    for method in [Method::PUT, Method::DELETE] {
        let r = files(&gw, &reader, method.clone(), &id, query, "x").await;
        assert_eq!(r.status(), StatusCode::FORBIDDEN, "{method}");
    }
    assert_eq!(get(&gw, &id, "/workspace/mine.txt").await.body(), "mine");
    gw.stop().await;

    let gw = TestGateway::start_with("[orchestrator]\nisolation = \"none\"\n").await;
    let (status, v) = gw
        .api(
            Method::POST,
            "/v1/sandboxes",
            Some(json!({"command": ["sh", "-c", "exec python3 -m http.server $PORT"], "ports": [8000]})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    let plain = v["id"].as_str().unwrap().to_string();
    let r = put(&gw, &plain, "/workspace/a", "x").await;
    assert_eq!(r.status(), StatusCode::CONFLICT);
    assert!(String::from_utf8_lossy(r.body()).contains("isolated sandboxes only"));
    gw.stop().await;
}

#[tokio::test]
async fn uploads_past_max_body_bytes_are_refused() {
    if !can_isolate() {
        return;
    }
    let _one = SERIAL.lock().await;
    let gw = TestGateway::start_with_gateway("max_body_bytes = 1000\n", "").await;
    let id = sandbox(&gw).await;
    let r = put(&gw, &id, "/workspace/big", vec![7u8; 1001]).await;
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    // Without a declared length (chunked), cut off as it streams: nothing is left behind.
    let r = chunked_put(&gw, &id, "/workspace/big", 1001).await;
    assert_eq!(r, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(sh(&gw, &id, "ls -A /workspace").await, "");
    assert_eq!(
        put(&gw, &id, "/workspace/ok", vec![7u8; 1000])
            .await
            .status(),
        StatusCode::CREATED
    );
    gw.stop().await;
}

type Chunks = std::pin::Pin<
    Box<dyn futures_util::Stream<Item = Result<http_body::Frame<Bytes>, std::io::Error>> + Send>,
>;

/// One request with a streamed body on a fresh HTTP/1.1 connection; the response unread.
async fn streamed(
    gw: &TestGateway,
    method: Method,
    path: &str,
    body: Chunks,
) -> Response<hyper::body::Incoming> {
    let tls = gw.tls().connect(BASE, &[b"http/1.1"]).await;
    let (mut sender, conn) = hyper::client::conn::http1::handshake::<
        _,
        http_body_util::StreamBody<Chunks>,
    >(TokioIo::new(tls))
    .await
    .unwrap();
    tokio::spawn(conn);
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", BASE)
        .header("authorization", format!("Bearer {}", gw.admin_key))
        .body(http_body_util::StreamBody::new(body))
        .unwrap();
    sender.send_request(req).await.unwrap()
}

async fn chunked_put(gw: &TestGateway, id: &str, path: &str, len: usize) -> StatusCode {
    let chunks: Chunks = Box::pin(futures_util::stream::iter(vec![Ok(
        http_body::Frame::data(Bytes::from(vec![1u8; len])),
    )]));
    let path = format!("/v1/sandboxes/{id}/files?path={}", q(path));
    streamed(gw, Method::PUT, &path, chunks).await.status()
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// The highest resident size of this process (gateway and client alike) while `f` runs.
async fn peak_rss_during<T>(f: impl std::future::Future<Output = T>) -> (T, u64) {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let stop = std::sync::Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut peak = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(rss_kib());
                std::thread::sleep(Duration::from_millis(20));
            }
            peak.max(rss_kib())
        })
    };
    let out = f.await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    (out, sampler.join().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gibibyte_streams_through_in_bounded_memory() {
    if !can_isolate() {
        return;
    }
    let _one = SERIAL.lock().await;
    let gw = TestGateway::start().await;
    let id = sandbox(&gw).await;
    const CHUNK: usize = 1 << 20;
    const CHUNKS: u64 = 1024;
    let block = Bytes::from(noise(CHUNK, 99));
    // Warm up the connection machinery once, so its first allocations are not counted.
    assert_eq!(
        put(&gw, &id, "/workspace/warm", block.clone())
            .await
            .status(),
        StatusCode::CREATED
    );
    let before = rss_kib();

    let sent = std::sync::Arc::new(std::sync::Mutex::new(aws_lc_rs::digest::Context::new(
        &aws_lc_rs::digest::SHA256,
    )));
    let hashing = std::sync::Arc::clone(&sent);
    // Each chunk is the block with its own index in front: a reordered or repeated chunk
    // changes the hash.
    let chunks: Chunks = Box::pin(futures_util::stream::iter(0..CHUNKS).map(move |i| {
        let mut chunk = block.to_vec();
        chunk[..8].copy_from_slice(&i.to_be_bytes());
        hashing.lock().unwrap().update(&chunk);
        Ok(http_body::Frame::data(Bytes::from(chunk)))
    }));
    let path = format!("/v1/sandboxes/{id}/files?path=/workspace/gib.bin");
    let ((put_status, got), peak) = peak_rss_during(async {
        let put_status = streamed(&gw, Method::PUT, &path, chunks).await.status();
        let mut response = streamed(
            &gw,
            Method::GET,
            &path,
            Box::pin(futures_util::stream::empty()),
        )
        .await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            response.headers()["content-length"],
            (CHUNKS * CHUNK as u64).to_string().as_str()
        );
        let mut hash = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
        let mut total = 0u64;
        while let Some(frame) = response.body_mut().frame().await {
            if let Some(data) = frame.unwrap().data_ref() {
                hash.update(data);
                total += data.len() as u64;
            }
        }
        assert_eq!(total, CHUNKS * CHUNK as u64);
        (put_status, hash.finish())
    })
    .await;
    assert_eq!(put_status, StatusCode::CREATED);
    let sent = std::sync::Arc::try_unwrap(sent)
        .ok()
        .unwrap()
        .into_inner()
        .unwrap()
        .finish();
    assert_eq!(got.as_ref(), sent.as_ref(), "the file came back different");
    let grew = peak.saturating_sub(before);
    eprintln!("1 GiB up and down: RSS {before} KiB before, peak {peak} KiB (+{grew} KiB)");
    assert!(
        grew < 48 * 1024,
        "RSS grew by {grew} KiB moving 1 GiB each way"
    );
    assert_eq!(
        sh(&gw, &id, "stat -c %s /workspace/gib.bin").await,
        "1073741824\n"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cp_and_ls_on_the_command_line() {
    if !can_isolate() {
        return;
    }
    let _one = SERIAL.lock().await;
    let gw = TestGateway::start().await;
    let id = sandbox(&gw).await;
    let work = tempfile::tempdir().unwrap();
    let local = work.path().join("in.bin");
    let content = noise(300_000, 3);
    std::fs::write(&local, &content).unwrap();
    let ca = gw.gw.config.store.certs_dir().join("ca.pem");
    let cli = |args: &[&str], stdin: Option<&[u8]>| {
        use std::io::Write;
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_sandgate"))
            .args(args)
            .current_dir(work.path())
            .env("SANDGATE_URL", format!("https://{BASE}:{}", gw.addr.port()))
            .env("SANDGATE_API_KEY", &gw.admin_key)
            .env("SANDGATE_CA_CERT", &ca)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut input = child.stdin.take().unwrap();
        if let Some(bytes) = stdin {
            input.write_all(bytes).unwrap();
        }
        drop(input);
        child.wait_with_output().unwrap()
    };
    let run = |args: Vec<String>, stdin: Option<Vec<u8>>| {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        tokio::task::block_in_place(|| cli(&refs, stdin.as_deref()))
    };
    let s = |v: &str| v.to_string();

    let out = run(
        vec![
            s("cp"),
            s("--mode"),
            s("0700"),
            local.display().to_string(),
            format!("{id}:/workspace/up/in.bin"),
        ],
        None,
    );
    assert!(out.status.success(), "{out:?}");
    assert!(
        out.stderr.is_empty(),
        "no progress bar off a terminal: {out:?}"
    );
    let out = run(
        vec![s("cp"), s("-"), format!("{id}:/workspace/up/stdin.bin")],
        Some(b"from stdin".to_vec()),
    );
    assert!(out.status.success(), "{out:?}");
    let out = run(
        vec![s("cp"), format!("{id}:/workspace/up/in.bin"), s(".")],
        None,
    );
    assert!(out.status.success(), "{out:?}");
    assert!(std::fs::read(work.path().join("in.bin")).unwrap() == content);
    let out = run(
        vec![s("cp"), format!("{id}:/workspace/up/stdin.bin"), s("-")],
        None,
    );
    assert_eq!(out.stdout, b"from stdin");

    let out = run(vec![s("ls"), format!("{id}:/workspace/up")], None);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("TYPE"), "{text}");
    assert!(
        lines[1].starts_with("file  0700  300000") && lines[1].ends_with("in.bin"),
        "{text}"
    );
    assert!(lines[2].ends_with("stdin.bin"), "{text}");
    let out = run(
        vec![s("cp"), format!("{id}:/workspace/missing"), s("-")],
        None,
    );
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    gw.stop().await;
}
