//! Images that a real `podman` builds and saves: a `FROM scratch` image of the static busybox
//! (no registry is ever contacted), saved both as `--format docker-archive` and as
//! `--format oci-archive` (an OCI image layout with gzip layers), imports through the API as
//! its own `source`, and runs with the image's files, `Env`, `WorkingDir` and `Cmd`.
//!
//! Needs root (as in CI) and podman on PATH (.ci/run installs it): without podman the test
//! fails under `CI=true` and says it skipped elsewhere.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use http::{Method, StatusCode};
use serde_json::{json, Value};

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()))
}

/// Whether this test can run here: root, and podman present (a must in CI).
fn ready() -> bool {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: the podman image test needs root");
        return false;
    }
    if !on_path("podman") {
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "podman is not on PATH: .ci/run installs it (apt-get install podman)"
        );
        eprintln!("skipped: podman is not installed (apt-get install podman)");
        return false;
    }
    true
}

/// `podman` with its own storage under `state` (vfs, no systemd), so it touches nothing of the
/// machine's and works inside a container.
fn podman(state: &Path, args: &[&str]) {
    let out = Command::new("podman")
        .arg("--root")
        .arg(state.join("root"))
        .arg("--runroot")
        .arg(state.join("runroot"))
        .args([
            "--storage-driver",
            "vfs",
            "--cgroup-manager",
            "cgroupfs",
            "--events-backend",
            "file",
        ])
        .args(args)
        .env("TMPDIR", state)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "podman {args:?}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Builds the test image and saves it in both formats: `(docker-archive, oci-archive)` bytes.
fn build_and_save(work: &Path) -> (Vec<u8>, Vec<u8>) {
    let ctx = work.join("ctx");
    let bin = ctx.join("rootfs/bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::create_dir_all(ctx.join("rootfs/srv")).unwrap();
    std::fs::copy("/bin/busybox", bin.join("busybox"))
        .expect("/bin/busybox: apt-get install busybox-static");
    for applet in ["sh", "cat", "echo", "test", "pwd", "env"] {
        std::os::unix::fs::symlink("busybox", bin.join(applet)).unwrap();
    }
    std::fs::write(ctx.join("marker.txt"), "built by podman\n").unwrap();
    std::fs::write(
        ctx.join("Containerfile"),
        "FROM scratch\n\
         COPY rootfs/ /\n\
         COPY marker.txt /marker.txt\n\
         ENV GREETING=podman PATH=/bin\n\
         WORKDIR /srv\n\
         CMD [\"/bin/busybox\", \"httpd\", \"-f\", \"-p\", \"8000\"]\n",
    )
    .unwrap();
    let state = work.join("podman");
    std::fs::create_dir(&state).unwrap();
    let tag = "localhost/sandgate-test:1";
    let ctx = ctx.to_str().unwrap();
    podman(
        &state,
        &["build", "--pull=never", "--network", "none", "-t", tag, ctx],
    );
    let docker = work.join("docker.tar");
    let oci = work.join("oci.tar");
    for (format, path) in [("docker-archive", &docker), ("oci-archive", &oci)] {
        podman(
            &state,
            &[
                "save",
                "--format",
                format,
                "-o",
                path.to_str().unwrap(),
                tag,
            ],
        );
    }
    (std::fs::read(docker).unwrap(), std::fs::read(oci).unwrap())
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
    let status = resp.status();
    (
        status,
        serde_json::from_slice(resp.body()).unwrap_or(Value::Null),
    )
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn podman_saved_images_in_both_formats_run() {
    if !ready() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let (docker, oci) = tokio::task::block_in_place(|| build_and_save(work.path()));
    // What podman wrote is what each format is: manifest.json, or an OCI layout.
    let members = |bytes: &[u8]| -> Vec<String> {
        tar::Archive::new(bytes)
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
            .collect()
    };
    assert!(members(&docker).contains(&"manifest.json".to_string()));
    let oci_members = members(&oci);
    assert!(
        oci_members.contains(&"index.json".to_string()),
        "{oci_members:?}"
    );
    assert!(
        !oci_members.contains(&"manifest.json".to_string()),
        "{oci_members:?}"
    );

    let tmp = tempfile::tempdir().unwrap();
    let gw = TestGateway::start_in(tmp.path(), "").await;
    for (name, archive, source) in [
        ("from-docker-archive", docker, "docker-save"),
        ("from-oci-archive", oci, "oci"),
    ] {
        let (status, v) = import(&gw, name, archive).await;
        assert_eq!(status, StatusCode::CREATED, "{name}: {v}");
        assert_eq!(v["source"], source, "{v}");
        assert!(v["size_bytes"].as_u64().unwrap() > 1_000_000, "{v}");

        // No command: the image's Cmd (busybox httpd) runs, so the sandbox becomes running.
        let (status, v) = gw
            .api(
                Method::POST,
                "/v1/sandboxes",
                Some(json!({"image": name, "ports": [8000]})),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{v}");
        let id = v["id"].as_str().unwrap().to_string();
        wait_for_status(&gw, &id, &["running"], Duration::from_secs(20)).await;
        let (code, out) = sh(
            &gw,
            &id,
            "cat /marker.txt; echo \"greeting=$GREETING\"; pwd",
        )
        .await;
        assert_eq!(code, 0, "{name}: {out}");
        assert!(out.contains("built by podman"), "{name}: {out}");
        assert!(
            out.contains("greeting=podman"),
            "{name}: the image's Env: {out}"
        );
        assert!(
            out.contains("/srv"),
            "{name}: the image's WorkingDir: {out}"
        );
        // The Cmd serves: busybox httpd answers on its port inside the sandbox.
        let (code, out) = sh(
            &gw,
            &id,
            "echo hi > ./hi.txt; busybox wget -q -O - http://127.0.0.1:8000/hi.txt",
        )
        .await;
        assert_eq!(code, 0, "{name}: {out}");
        assert!(out.contains("hi"), "{name}: {out}");
        let (status, _) = gw
            .api(Method::DELETE, &format!("/v1/sandboxes/{id}"), None)
            .await;
        assert_eq!(status, StatusCode::NO_CONTENT);
    }
    let (_, list) = gw.api(Method::GET, "/v1/images", None).await;
    let sources: Vec<(String, String)> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["name"].as_str().unwrap().to_string(),
                i["source"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        sources,
        [
            ("host".to_string(), "host".to_string()),
            ("from-docker-archive".into(), "docker-save".into()),
            ("from-oci-archive".into(), "oci".into()),
        ]
    );
    gw.stop().await;
}
