//! Images (`/v1/images`, `image` on sandbox creation): an archive in the format `docker save`
//! writes, built here from a static busybox, becomes an image whose layers (whiteouts
//! included) make the root of isolated sandboxes; its `Env` and `Cmd` apply; each sandbox
//! writes its own layer and never the image; archives that would write outside the image are
//! refused with nothing written; only an admin imports; a used image is not deleted; images
//! outlive the gateway.
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
    eprintln!("skipped: image tests need root");
    false
}

/// The static busybox of Debian's busybox-static package (installed by .ci/run).
fn busybox() -> Vec<u8> {
    std::fs::read("/bin/busybox").expect("/bin/busybox: apt-get install busybox-static")
}

fn header(kind: tar::EntryType, path: &str, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_path(path).unwrap();
    h.set_mode(mode);
    h.set_size(size);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_cksum();
    h
}

/// A layer (or an archive): entries as `(kind, path, mode, data or link target)`.
fn tar_of(entries: &[(tar::EntryType, &str, u32, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (kind, path, mode, data) in entries {
        match kind {
            tar::EntryType::Symlink => {
                let mut h = header(*kind, path, *mode, 0);
                h.set_link_name(std::str::from_utf8(data).unwrap()).unwrap();
                h.set_cksum();
                b.append(&h, std::io::empty()).unwrap();
            }
            _ => {
                let h = header(*kind, path, *mode, data.len() as u64);
                b.append(&h, *data).unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

/// What `docker save` writes: `manifest.json`, the config, one `layer.tar` per layer.
fn docker_save(layers: &[Vec<u8>], config: Value) -> Vec<u8> {
    let names: Vec<String> = (0..layers.len())
        .map(|i| format!("layer{i}/layer.tar"))
        .collect();
    let manifest = json!([{"Config": "config.json", "RepoTags": ["test:latest"], "Layers": names}])
        .to_string();
    let config = config.to_string();
    let mut entries: Vec<(tar::EntryType, &str, u32, &[u8])> = vec![
        (
            tar::EntryType::Regular,
            "config.json",
            0o644,
            config.as_bytes(),
        ),
        (
            tar::EntryType::Regular,
            "manifest.json",
            0o644,
            manifest.as_bytes(),
        ),
    ];
    for (name, layer) in names.iter().zip(layers) {
        entries.push((tar::EntryType::Regular, name, 0o644, layer));
    }
    tar_of(&entries)
}

/// The test image: busybox with its applets as links, `/marker.txt`, and `/gone.txt` that the
/// second layer's whiteout removes.
fn busybox_image() -> Vec<u8> {
    use tar::EntryType::{Directory, Fifo, Regular, Symlink};
    let busybox = busybox();
    let mut layer1: Vec<(tar::EntryType, &str, u32, &[u8])> = vec![
        (Directory, "bin/", 0o755, b""),
        (Directory, "etc/", 0o755, b""),
        (Regular, "bin/busybox", 0o4755, &busybox),
        (Regular, "marker.txt", 0o644, b"from the image\n"),
        (Regular, "gone.txt", 0o644, b"removed by layer 2\n"),
        (Regular, "etc/motd", 0o644, b"hello\n"),
        (Directory, "opq/", 0o755, b""),
        (Regular, "opq/old.txt", 0o644, b"old\n"),
        (Fifo, "fifo", 0o644, b""),
        // An absolute link where a volume will be mounted: the mount must not follow it.
        (Symlink, "data", 0o777, b"/etc"),
    ];
    let applets = [
        "sh", "cat", "ls", "echo", "test", "touch", "id", "env", "mkdir", "rm", "stat",
    ];
    let paths: Vec<String> = applets.iter().map(|a| format!("bin/{a}")).collect();
    for p in &paths {
        layer1.push((Symlink, p, 0o777, b"busybox"));
    }
    let layer1 = tar_of(&layer1);
    let layer2 = tar_of(&[
        (Regular, ".wh.gone.txt", 0o644, b""),
        (Regular, "opq/new.txt", 0o644, b"new\n"),
        (Regular, "opq/.wh..wh..opq", 0o644, b""),
    ]);
    docker_save(
        &[layer1, layer2],
        json!({"architecture": "amd64", "os": "linux", "config": {
            "Env": ["GREETING=hello", "PATH=/bin"],
            "Cmd": ["/bin/busybox", "httpd", "-f", "-p", "8000"],
        }}),
    )
}

async fn import(gw: &TestGateway, key: &str, name: &str, archive: Vec<u8>) -> (StatusCode, Value) {
    let resp = api_raw(
        &gw.tls(),
        Some(key),
        Method::POST,
        &format!("/v1/images?name={name}"),
        Some("application/x-tar"),
        archive,
    )
    .await;
    let status = resp.status();
    let v = serde_json::from_slice(resp.body()).unwrap_or(Value::Null);
    (status, v)
}

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

/// A running sandbox of `image` that runs the image's `Cmd` (no `command`).
async fn from_image(gw: &TestGateway, image: &str) -> String {
    let (status, v) = gw
        .api(
            Method::POST,
            "/v1/sandboxes",
            Some(json!({"image": image, "ports": [8000], "env": {"MINE": "yes"}})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    assert_eq!(v["image"], image, "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    wait_for_status(gw, &id, &["running"], Duration::from_secs(20)).await;
    id
}

fn names(list: &Value) -> Vec<String> {
    list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_imported_image_is_the_root_of_its_sandboxes_and_stays_unchanged() {
    if !can_isolate() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let gw = TestGateway::start_in(tmp.path(), "").await;
    let key = gw.admin_key.clone();

    let (status, v) = import(&gw, &key, "bb", busybox_image()).await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    assert_eq!(v["name"], "bb");
    assert_eq!(v["source"], "docker-save");
    assert!(v["size_bytes"].as_u64().unwrap() > 100_000, "{v}");
    // Refusals answered before the body is read get a small one: a client still sending a
    // large body when the answer comes may find the connection closed under it.
    let small = || vec![0u8; 1024];
    let (status, v) = import(&gw, &key, "bb", small()).await;
    assert_eq!(status, StatusCode::CONFLICT, "{v}");
    let (status, _) = import(&gw, &key, "Bad_Name", small()).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);

    let (status, list) = gw.api(Method::GET, "/v1/images", None).await;
    assert_eq!(status, StatusCode::OK, "{list}");
    assert_eq!(names(&list), ["host", "bb"]);

    // The setuid bit of the archive is dropped on disk.
    let rootfs = tmp.path().join("data/images/bb/rootfs");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(rootfs.join("bin/busybox"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o7777, 0o755, "setuid stripped");

    // No command: the image's Cmd runs (busybox httpd), and the sandbox becomes running.
    let a = from_image(&gw, "bb").await;
    let (code, out) = sh(
        &gw,
        &a,
        "cat /marker.txt; echo \"$GREETING $MINE\"; pwd; \
         if test -e /gone.txt; then echo gone-present; else echo gone-absent; fi",
    )
    .await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("from the image"), "{out}");
    assert!(
        out.contains("hello yes"),
        "the image's Env and the sandbox's: {out}"
    );
    assert!(out.contains("/workspace"), "{out}");
    assert!(
        out.contains("gone-absent"),
        "the whiteout removed it: {out}"
    );
    // The whole root is writable, in the sandbox's own layer.
    let (code, out) = sh(
        &gw,
        &a,
        "echo mine > /etc/x && echo top > /top.txt && cat /etc/x /top.txt && \
         rm /marker.txt && echo removed",
    )
    .await;
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("mine") && out.contains("top") && out.contains("removed"),
        "{out}"
    );
    // Its /etc/hosts is its own.
    let (_, out) = sh(&gw, &a, "cat /etc/hosts").await;
    assert!(out.contains(&a), "{out}");

    // The image did not change, and another sandbox of it does not see the first's writes.
    assert!(!rootfs.join("etc/x").exists());
    assert!(rootfs.join("marker.txt").exists());
    let b = from_image(&gw, "bb").await;
    let (_, out) = sh(
        &gw,
        &b,
        "cat /etc/x 2>/dev/null || echo no-x; cat /marker.txt",
    )
    .await;
    assert!(out.contains("no-x"), "{out}");
    assert!(out.contains("from the image"), "{out}");

    // A volume in an image sandbox, at a path the image has a link on.
    let (status, v) = gw
        .api(Method::POST, "/v1/volumes", Some(json!({"name": "vol"})))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    let (status, v) = gw
        .api(
            Method::POST,
            "/v1/sandboxes",
            Some(json!({"image": "bb", "ports": [8000],
                        "volumes": [{"volume": "vol", "path": "/data"}]})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    let v_id = v["id"].as_str().unwrap().to_string();
    wait_for_status(&gw, &v_id, &["running"], Duration::from_secs(20)).await;
    let (code, out) = sh(&gw, &v_id, "echo kept > /data/v.txt && cat /data/v.txt").await;
    assert_eq!(code, 0, "{out}");
    assert!(
        tmp.path().join("data/volumes").read_dir().unwrap().count() > 0
            && find_named(&tmp.path().join("data/volumes"), "v.txt").len() == 1,
        "the write reached the volume"
    );
    let (status, _) = gw
        .api(Method::DELETE, &format!("/v1/sandboxes/{v_id}"), None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);

    // Used: not deleted.
    let (status, v) = gw.api(Method::DELETE, "/v1/images/bb", None).await;
    assert_eq!(status, StatusCode::CONFLICT, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains(&a), "{v}");
    for id in [&a, &b] {
        let (status, _) = gw
            .api(Method::DELETE, &format!("/v1/sandboxes/{id}"), None)
            .await;
        assert_eq!(status, StatusCode::NO_CONTENT);
    }

    // An unknown image, and an image without Cmd and no command, are refused.
    let (status, v) = gw
        .api(
            Method::POST,
            "/v1/sandboxes",
            Some(json!({"image": "nope", "ports": [8000]})),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    let plain = docker_save(
        &[tar_of(&[(tar::EntryType::Regular, "f", 0o644, b"x")])],
        json!({"config": {}}),
    );
    let (status, v) = import(&gw, &key, "nocmd", plain).await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    let (status, v) = gw
        .api(
            Method::POST,
            "/v1/sandboxes",
            Some(json!({"image": "nocmd", "ports": [8000]})),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("no Cmd"),
        "{v}"
    );

    // Images outlive the gateway; what an interrupted import left is removed at start.
    let incoming = tmp.path().join("data/images/.incoming");
    std::fs::create_dir_all(incoming.join("half-done/rootfs")).unwrap();
    gw.stop().await;
    let gw = TestGateway::start_in(tmp.path(), "").await;
    let (_, list) = gw.api(Method::GET, "/v1/images", None).await;
    assert_eq!(names(&list), ["host", "bb", "nocmd"]);
    assert!(!incoming.join("half-done").exists());
    let c = from_image(&gw, "bb").await;
    let (_, out) = sh(&gw, &c, "cat /marker.txt").await;
    assert!(out.contains("from the image"), "{out}");
    let (status, _) = gw
        .api(Method::DELETE, &format!("/v1/sandboxes/{c}"), None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);

    let (status, _) = gw.api(Method::DELETE, "/v1/images/bb", None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = gw.api(Method::DELETE, "/v1/images/bb", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (_, list) = gw.api(Method::GET, "/v1/images", None).await;
    assert_eq!(names(&list), ["host", "nocmd"]);
    assert!(!tmp.path().join("data/images/bb").exists());
    gw.stop().await;
}

/// A layer entry named `../evil`, written as raw header bytes (the tar crate's builder refuses
/// such paths itself).
fn escaping_layer() -> Vec<u8> {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o644);
    h.set_size(5);
    let name = b"../evil";
    h.as_old_mut().name[..name.len()].copy_from_slice(name);
    h.set_cksum();
    let mut b = tar::Builder::new(Vec::new());
    b.append(&h, &b"evil\n"[..]).unwrap();
    b.into_inner().unwrap()
}

/// Every path under `dir` whose last component is `name`, links not followed.
fn find_named(dir: &std::path::Path, name: &str) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if entry.file_name() == name {
            found.push(path.clone());
        }
        if entry.file_type().unwrap().is_dir() {
            found.extend(find_named(&path, name));
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn archives_that_would_write_outside_the_image_are_refused() {
    if !can_isolate() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let gw = TestGateway::start_in(tmp.path(), "").await;
    let key = gw.admin_key.clone();
    let images = tmp.path().join("data/images");

    // Garbage, and a tar that is no image.
    let (status, v) = import(&gw, &key, "junk", vec![0x42; 4096]).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("docker save"),
        "{v}"
    );
    let no_manifest = tar_of(&[(tar::EntryType::Regular, "hello.txt", 0o644, b"hi")]);
    let (status, v) = import(&gw, &key, "junk", no_manifest).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("manifest.json"),
        "{v}"
    );

    // An OCI layout whose index names no manifest (and no manifest.json beside it): refused,
    // and the message says what is missing.
    let oci = tar_of(&[
        (
            tar::EntryType::Regular,
            "oci-layout",
            0o644,
            br#"{"imageLayoutVersion":"1.0.0"}"#,
        ),
        (tar::EntryType::Regular, "index.json", 0o644, b"{}"),
    ]);
    let (status, v) = import(&gw, &key, "oci", oci).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("index.json names no image manifest"),
        "{v}"
    );

    // `../evil`: refused, and nothing lands beside the image's root.
    let (status, v) = import(
        &gw,
        &key,
        "evil",
        docker_save(&[escaping_layer()], json!({})),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains(".."),
        "{v}"
    );

    // A link made by one layer, written through by the next: refused, the target untouched.
    let outside = tempfile::tempdir().unwrap();
    let target = outside.path().to_str().unwrap().to_string();
    let layer1 = tar_of(&[(tar::EntryType::Symlink, "escape", 0o777, target.as_bytes())]);
    let layer2 = tar_of(&[(tar::EntryType::Regular, "escape/planted", 0o644, b"x")]);
    let (status, v) = import(&gw, &key, "evil", docker_save(&[layer1, layer2], json!({}))).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("symbolic link"),
        "{v}"
    );
    assert!(!outside.path().join("planted").exists());

    // An absolute path is refused too.
    let mut h = header(tar::EntryType::Regular, "x", 0o644, 1);
    h.as_old_mut().name[..6].copy_from_slice(b"/abs\0\0");
    h.set_cksum();
    let mut b = tar::Builder::new(Vec::new());
    b.append(&h, &b"x"[..]).unwrap();
    let (status, v) = import(
        &gw,
        &key,
        "evil",
        docker_save(&[b.into_inner().unwrap()], json!({})),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{v}");

    // Nothing of the refused imports is left: no image, no staging folder, no upload, and no
    // `evil` anywhere under the data folder.
    let (_, list) = gw.api(Method::GET, "/v1/images", None).await;
    assert_eq!(names(&list), ["host"]);
    assert_eq!(
        std::fs::read_dir(images.join(".incoming")).unwrap().count(),
        0
    );
    assert_eq!(
        find_named(tmp.path(), "evil"),
        Vec::<std::path::PathBuf>::new()
    );

    // Only an admin imports and deletes; sandboxes:read lists.
    let (_, other) = create_credential(
        &gw,
        json!({"name": "other", "scopes": ["sandboxes:read", "sandboxes:write"]}),
    )
    .await;
    let (status, v) = import(&gw, &other, "mine", vec![0u8; 1024]).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{v}");
    let (status, list) = gw.api_as(&other, Method::GET, "/v1/images", None).await;
    assert_eq!(status, StatusCode::OK, "{list}");
    let (status, _) = gw
        .api_as(&other, Method::DELETE, "/v1/images/host", None)
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    // Past [orchestrator] max_image_bytes: 413.
    gw.stop().await;
    let gw = TestGateway::start_in(tmp.path(), "[orchestrator]\nmax_image_bytes = 65536\n").await;
    let (status, v) = import(&gw, &key, "big", vec![0u8; 70_000]).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{v}");
    assert!(!images.join("big").exists());
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn images_on_the_command_line() {
    if !can_isolate() {
        return;
    }
    let gw = TestGateway::start().await;
    let work = tempfile::tempdir().unwrap();
    std::fs::write(work.path().join("bb.tar"), busybox_image()).unwrap();
    let ca = gw.gw.config.store.certs_dir().join("ca.pem");
    let cli = |args: &[&str], stdin: Option<Vec<u8>>| {
        use std::io::Write;
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_sandgate"))
            .args(args)
            .current_dir(work.path())
            .env_remove("SANDGATE_CONFIG")
            .env("SANDGATE_URL", format!("https://{BASE}:{}", gw.addr.port()))
            .env("SANDGATE_API_KEY", &gw.admin_key)
            .env("SANDGATE_CA_CERT", &ca)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut input = child.stdin.take().unwrap();
        // A writer of its own, as `docker save … |` is: the CLI reads while it writes.
        let writer = std::thread::spawn(move || {
            if let Some(bytes) = stdin {
                let _ = input.write_all(&bytes);
            }
        });
        let out = child.wait_with_output().unwrap();
        writer.join().unwrap();
        out
    };
    let run =
        |args: &[&str], stdin: Option<Vec<u8>>| tokio::task::block_in_place(|| cli(args, stdin));

    let out = run(&["image", "import", "from-file", "bb.tar"], None);
    assert!(out.status.success(), "{out:?}");
    let out = run(
        &["image", "import", "from-pipe", "-"],
        Some(busybox_image()),
    );
    assert!(out.status.success(), "{out:?}");
    let out = run(&["image", "list"], None);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("NAME"), "{text}");
    assert!(lines[1].starts_with("host"), "{text}");
    assert!(
        lines[2].starts_with("from-file") && lines[2].contains("docker-save"),
        "{text}"
    );
    assert!(lines[3].starts_with("from-pipe"), "{text}");
    // Refusals keep the API's message and a failing exit code.
    let out = run(&["image", "import", "junk", "-"], Some(vec![0x42; 4096]));
    assert!(!out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("docker save"),
        "{out:?}"
    );
    let out = run(&["image", "rm", "from-pipe"], None);
    assert!(out.status.success(), "{out:?}");
    let out = run(&["image", "rm", "from-pipe"], None);
    assert!(!out.status.success(), "{out:?}");
    let (_, list) = gw.api(Method::GET, "/v1/images", None).await;
    assert_eq!(names(&list), ["host", "from-file"]);

    // A sandbox of the image (its Cmd), a snapshot of it, and a sandbox of the snapshot.
    let out = run(
        &[
            "sandbox",
            "create",
            "--image",
            "from-file",
            "--port",
            "8000",
            "--wait",
        ],
        None,
    );
    assert!(out.status.success(), "{out:?}");
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let (code, out) = sh(&gw, &id, "echo from-cli > /workspace/cli.txt").await;
    assert_eq!(code, 0, "{out}");
    let out = run(&["snapshot", &id, "cli-snap"], None);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("cli-snap") && text.contains("from-file"),
        "{text}"
    );
    let out = run(&["snapshot", &id, "cli-snap"], None);
    assert!(!out.status.success(), "a taken name: {out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("exists"),
        "{out:?}"
    );
    let out = run(&["image", "list"], None);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines().any(|l| l.starts_with("cli-snap")
            && l.contains("snapshot")
            && l.contains("from-file")),
        "{text}"
    );
    let out = run(
        &[
            "sandbox",
            "create",
            "--image",
            "cli-snap",
            "--port",
            "8000",
            "--wait",
            "--",
            "/bin/busybox",
            "httpd",
            "-f",
            "-p",
            "8000",
        ],
        None,
    );
    assert!(out.status.success(), "{out:?}");
    let second = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let (_, out) = sh(&gw, &second, "cat /workspace/cli.txt").await;
    assert!(out.contains("from-cli"), "{out}");
    gw.stop().await;
}

/// Snapshots (`POST /v1/sandboxes/{id}/snapshots`): a running sandbox's `/workspace` and the
/// changes to its root (new files, edits, deletions) become an image built on its image; a
/// sandbox started from it has those files as its own, and neither the original nor the
/// snapshot changes when it writes; links the sandbox planted are copied as links, never
/// followed; a non-admin's snapshot is its own; snapshots outlive the gateway.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_snapshot_starts_new_sandboxes_with_the_changes_and_leaves_the_original_alone() {
    if !can_isolate() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let gw = TestGateway::start_in(tmp.path(), "").await;
    let key = gw.admin_key.clone();
    let (status, v) = import(&gw, &key, "bb", busybox_image()).await;
    assert_eq!(status, StatusCode::CREATED, "{v}");

    let a = from_image(&gw, "bb").await;
    let secret_file = tmp.path().join("host-secret.txt");
    std::fs::write(&secret_file, "host secret\n").unwrap();
    let (code, out) = sh(
        &gw,
        &a,
        &format!(
            "echo v1 > /workspace/w.txt && mkdir -p /workspace/deep/er && echo d > /workspace/deep/er/d.txt && \
             mkdir -p /opt && echo rooted > /opt/x.txt && rm /marker.txt && echo mine > /etc/mine && \
             busybox ln -s / /workspace/to-root && busybox ln -s {} /workspace/to-host-file && busybox ln -s /etc /workspace/etc-link && \
             echo ok",
            secret_file.display()
        ),
    )
    .await;
    assert_eq!(code, 0, "{out}");

    // Refusals first: a bad name, an existing one, another owner's sandbox.
    let snap = |id: &str, name: &str| {
        let (id, name) = (id.to_string(), name.to_string());
        let gw = &gw;
        async move {
            gw.api(
                Method::POST,
                &format!("/v1/sandboxes/{id}/snapshots"),
                Some(json!({ "name": name })),
            )
            .await
        }
    };
    let (status, v) = snap(&a, "Bad_Name").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("name"),
        "{v}"
    );
    let (status, v) = snap(&a, "bb").await;
    assert_eq!(status, StatusCode::CONFLICT, "{v}");
    let (status, v) = snap(&a, "host").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{v}");

    let (status, v) = snap(&a, "prepared").await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    assert_eq!(v["name"], "prepared");
    assert_eq!(v["source"], "snapshot");
    assert_eq!(v["base"], "bb");
    let size = v["size_bytes"].as_u64().unwrap();
    assert!((10..100_000).contains(&size), "only the changes: {v}");
    let (status, v) = snap(&a, "prepared").await;
    assert_eq!(status, StatusCode::CONFLICT, "{v}");
    let (status, v) = gw.api(Method::GET, "/v1/images/prepared", None).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["base"], "bb");
    // Links were copied as links: no host content in the snapshot.
    let stored = tmp.path().join("data/images/prepared");
    assert!(std::fs::symlink_metadata(stored.join("workspace/to-root"))
        .unwrap()
        .file_type()
        .is_symlink());
    assert!(find_named(&stored, "host-secret.txt").is_empty());
    assert!(std::fs::symlink_metadata(stored.join("workspace/etc-link"))
        .unwrap()
        .file_type()
        .is_symlink());

    // A sandbox of the snapshot: the changes are there, it runs the image's Cmd, its files
    // are its own user's, and nothing of the host came through the planted links.
    let b = from_image(&gw, "prepared").await;
    let (code, out) = sh(
        &gw,
        &b,
        "cat /workspace/w.txt /workspace/deep/er/d.txt /opt/x.txt /etc/mine; \
         test -e /marker.txt && echo marker-present || echo marker-absent; \
         test \"$(stat -c %u /workspace/w.txt)\" = \"$(id -u)\" && echo owned; \
         test \"$(stat -c %u /opt/x.txt)\" = \"$(id -u)\" && echo root-owned-too; \
         cat /workspace/to-host-file 2>&1 | busybox head -c 200; echo; echo \"$GREETING\"",
    )
    .await;
    assert_eq!(code, 0, "{out}");
    for want in [
        "v1",
        "d\n",
        "rooted",
        "mine",
        "marker-absent",
        "owned",
        "root-owned-too",
        "hello",
    ] {
        assert!(out.contains(want), "missing {want:?}: {out}");
    }
    assert!(!out.contains("host secret"), "{out}");
    // It writes its own copy: the original and the snapshot keep theirs.
    let (code, out) = sh(
        &gw,
        &b,
        "echo v2 > /workspace/w.txt && echo changed > /opt/x.txt && cat /workspace/w.txt",
    )
    .await;
    assert_eq!(code, 0, "{out}");
    let (_, out) = sh(&gw, &a, "cat /workspace/w.txt /opt/x.txt").await;
    assert!(
        out.contains("v1") && out.contains("rooted"),
        "the original: {out}"
    );
    let c = from_image(&gw, "prepared").await;
    let (_, out) = sh(&gw, &c, "cat /workspace/w.txt /opt/x.txt").await;
    assert!(
        out.contains("v1") && out.contains("rooted"),
        "the snapshot: {out}"
    );

    // A snapshot of a sandbox started from a snapshot is built on the same base, whole.
    let (status, v) = snap(&b, "second").await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    assert_eq!(v["base"], "bb");
    let d = from_image(&gw, "second").await;
    let (_, out) = sh(&gw, &d, "cat /workspace/w.txt /opt/x.txt /etc/mine").await;
    assert!(
        out.contains("v2") && out.contains("changed") && out.contains("mine"),
        "{out}"
    );

    // In use, and built upon: neither is deleted.
    let (status, v) = gw.api(Method::DELETE, "/v1/images/prepared", None).await;
    assert_eq!(status, StatusCode::CONFLICT, "{v}");
    let (status, v) = gw.api(Method::DELETE, "/v1/images/bb", None).await;
    assert_eq!(status, StatusCode::CONFLICT, "{v}");
    for id in [&b, &c, &d] {
        let (status, _) = gw
            .api(Method::DELETE, &format!("/v1/sandboxes/{id}"), None)
            .await;
        assert_eq!(status, StatusCode::NO_CONTENT);
    }
    let (status, v) = gw.api(Method::DELETE, "/v1/images/bb", None).await;
    assert_eq!(status, StatusCode::CONFLICT, "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("snapshot"),
        "{v}"
    );

    // A non-admin's snapshot, of a sandbox on the host image: its own, unseen by another.
    let scopes = json!(["sandboxes:read", "sandboxes:write", "tokens:issue"]);
    let (alice_id, alice) =
        create_credential(&gw, json!({"name": "alice", "scopes": scopes})).await;
    let (_, bob) = create_credential(&gw, json!({"name": "bob", "scopes": scopes})).await;
    let (status, v) = gw
        .api_as(
            &alice,
            Method::POST,
            "/v1/sandboxes",
            Some(json!({"command": ["sleep", "600"], "ports": [8000]})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    let h = v["id"].as_str().unwrap().to_string();
    let (code, out) = sh(&gw, &h, "echo from-host-image > /workspace/notes.txt").await;
    assert_eq!(code, 0, "{out}");
    let path = format!("/v1/sandboxes/{h}/snapshots");
    let (status, v) = gw
        .api_as(&bob, Method::POST, &path, Some(json!({"name": "alices"})))
        .await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "another owner's sandbox: {v}"
    );
    let (status, v) = gw
        .api_as(&alice, Method::POST, &path, Some(json!({"name": "alices"})))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    assert_eq!(v["base"], "host");
    assert_eq!(v["owner"], alice_id.as_str());
    let (_, list) = gw.api_as(&bob, Method::GET, "/v1/images", None).await;
    assert!(!names(&list).contains(&"alices".to_string()), "{list}");
    let (status, _) = gw
        .api_as(&bob, Method::GET, "/v1/images/alices", None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, v) = gw
        .api_as(
            &bob,
            Method::POST,
            "/v1/sandboxes",
            Some(json!({"image": "alices", "command": ["sleep", "60"], "ports": [8000]})),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    let (_, list) = gw.api(Method::GET, "/v1/images", None).await;
    assert_eq!(names(&list), ["host", "alices", "bb", "prepared", "second"]);
    let (status, v) = gw
        .api_as(
            &alice,
            Method::POST,
            "/v1/sandboxes",
            Some(json!({"image": "alices", "command": ["sleep", "600"], "ports": [8000]})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    let from_alices = v["id"].as_str().unwrap().to_string();
    let (code, out) = sh(&gw, &from_alices, "cat /workspace/notes.txt").await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("from-host-image"), "{out}");

    // Counted: three snapshots taken (their bytes too), one image imported.
    let metrics = {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(gw.telemetry).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    };
    assert!(
        metrics.contains("sandgate_storage_operations_total{op=\"snapshot_create\"} 3"),
        "{metrics}"
    );
    assert!(
        metrics.contains("sandgate_storage_operations_total{op=\"image_import\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("sandgate_storage_written_bytes_total{op=\"snapshot_create\"}"),
        "{metrics}"
    );
    let (_, audit) = gw.api(Method::GET, "/v1/audit?limit=200", None).await;
    let snapshots = audit["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "snapshot.create")
        .count();
    assert_eq!(snapshots, 3, "{audit}");

    // Snapshots outlive the gateway.
    gw.stop().await;
    let gw = TestGateway::start_in(tmp.path(), "").await;
    let (_, list) = gw.api(Method::GET, "/v1/images", None).await;
    assert_eq!(names(&list), ["host", "alices", "bb", "prepared", "second"]);
    let e = from_image(&gw, "prepared").await;
    let (_, out) = sh(&gw, &e, "cat /workspace/w.txt /opt/x.txt").await;
    assert!(out.contains("v1") && out.contains("rooted"), "{out}");
    let (status, _) = gw
        .api(Method::DELETE, &format!("/v1/sandboxes/{e}"), None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    // The owner deletes its own snapshot; then the base goes once nothing is built on it.
    let (status, v) = gw
        .api_as(&alice, Method::DELETE, "/v1/images/alices", None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{v}");
    for name in ["prepared", "second", "bb"] {
        let (status, v) = gw
            .api(Method::DELETE, &format!("/v1/images/{name}"), None)
            .await;
        assert_eq!(status, StatusCode::NO_CONTENT, "{name}: {v}");
    }
    let (_, list) = gw.api(Method::GET, "/v1/images", None).await;
    assert_eq!(names(&list), ["host"]);
    gw.stop().await;
}
