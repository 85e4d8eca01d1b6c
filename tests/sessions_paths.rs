//! `sub_path` through the API, for a few hundred generated values: each is refused with 422
//! (never another status) or mounts a folder made at exactly that place inside the volume;
//! nothing is ever made through a link planted in the volume, or outside it.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;

use common::*;
use http::{Method, StatusCode};
use proptest::strategy::{Strategy, ValueTree};
use serde_json::json;

/// Isolation needs root (as in CI); elsewhere this test says so and passes vacuously.
fn can_isolate() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    eprintln!("skipped: volume tests need root");
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn generated_sub_paths_are_422_or_a_folder_inside_the_volume() {
    if !can_isolate() {
        return;
    }
    let gw = TestGateway::start().await;
    let (status, v) = gw
        .api(Method::POST, "/v1/volumes", Some(json!({"name": "paths"})))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    let owner = v["owner"].as_str().unwrap().to_string();
    assert!(
        owner
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'),
        "{owner}"
    );
    let volume = gw
        .gw
        .config
        .orchestrator
        .volumes_dir
        .join(&owner)
        .join("paths");
    // A link out (to a folder of the test's own) and a file, planted in the volume.
    let outside = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(outside.path(), volume.join("out")).unwrap();
    std::fs::write(volume.join("file"), b"x").unwrap();
    let real_volume = std::fs::canonicalize(&volume).unwrap();

    let piece = proptest::sample::select(vec![
        "..".to_string(),
        ".".to_string(),
        String::new(),
        "/".to_string(),
        "sessions".to_string(),
        "s-1".to_string(),
        "out".to_string(),
        "file".to_string(),
        "d\u{e9}j\u{e0}".to_string(),
        "a\0b".to_string(),
        "x".repeat(255),
        "x".repeat(256),
    ]);
    let strategy = proptest::collection::vec(piece, 1..5).prop_map(|v| v.join("/"));
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let (mut tried, mut mounted, mut refused) = (HashSet::new(), 0, 0);
    while tried.len() < 300 {
        let sub_path = strategy.new_tree(&mut runner).unwrap().current();
        if !tried.insert(sub_path.clone()) {
            continue;
        }
        let (status, v) = gw
            .api(
                Method::POST,
                "/v1/sandboxes",
                Some(json!({"command": ["true"], "ports": [8000], "volumes":
                    [{"volume": "paths", "path": "/data", "sub_path": sub_path}]})),
            )
            .await;
        // The planted link and file are at the volume's top; deeper, those names are new
        // folders like any other.
        let through_link = matches!(sub_path.split('/').next(), Some("out" | "file"));
        if status == StatusCode::CREATED {
            mounted += 1;
            assert!(
                !through_link,
                "{sub_path:?} mounted through a link or a file"
            );
            let made = std::fs::canonicalize(volume.join(&sub_path)).unwrap();
            assert!(made.is_dir(), "{sub_path:?}");
            assert!(made.starts_with(&real_volume), "{sub_path:?} made {made:?}");
            assert_eq!(made, real_volume.join(&sub_path), "{sub_path:?}");
            let id = v["id"].as_str().unwrap();
            let (status, v) = gw
                .api(Method::DELETE, &format!("/v1/sandboxes/{id}"), None)
                .await;
            assert_eq!(status, StatusCode::NO_CONTENT, "{v}");
        } else {
            refused += 1;
            assert_eq!(
                status,
                StatusCode::UNPROCESSABLE_ENTITY,
                "{sub_path:?} answered {v}"
            );
            assert!(
                v["error"]["message"].as_str().unwrap().contains("sub_path"),
                "{v}"
            );
        }
    }
    eprintln!(
        "{} sub_paths: {mounted} mounted, {refused} refused",
        tried.len()
    );
    assert!(
        mounted > 20 && refused > 20,
        "mounted {mounted}, refused {refused}"
    );
    assert_eq!(
        std::fs::read_dir(outside.path()).unwrap().count(),
        0,
        "a folder was made through the link"
    );
    gw.stop().await;
}
