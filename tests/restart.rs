//! State survives a restart on the same data dir, and a signing-key rotation reaches a running
//! gateway within 5 s without invalidating tokens signed before it.
#![allow(clippy::unwrap_used)] // helpers here are test code too

mod common;

use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use common::*;
use http::{Method, StatusCode};
use serde_json::{json, Value};

/// The `kid` in a JWS header.
fn kid_of(token: &str) -> String {
    let header = token.split('.').next().unwrap();
    let header: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(header).unwrap()).unwrap();
    assert_eq!(header["typ"], "connect+jwt");
    header["kid"].as_str().unwrap().to_string()
}

/// The kids the gateway publishes.
async fn jwks_kids(gw: &TestGateway) -> Vec<String> {
    let resp = gw.tls().get(BASE, "/.well-known/jwks.json", &[]).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let mut kids: Vec<String> = json_body(&resp)["keys"]
        .as_array()
        .expect("a JWKS has keys")
        .iter()
        .map(|k| k["kid"].as_str().unwrap().to_string())
        .collect();
    kids.sort();
    kids
}

#[tokio::test]
async fn state_survives_a_restart_on_the_same_data_dir() {
    let echo = Echo::start().await;
    let port = echo.port();
    let gw = TestGateway::start_with("").await;
    let dir = gw.dir.clone();
    let host_of = |id: &str| sandbox_host(port, id);

    // Before: a credential, a sandbox, a working token and a revoked one.
    let (status, cred) = gw
        .api(
            Method::POST,
            "/v1/credentials",
            Some(json!({"name": "ci", "scopes": ["sandboxes:read", "sandboxes:write", "upstreams:write", "tokens:issue"]})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{cred}");
    let secret = cred["secret"].as_str().unwrap().to_string();
    let id = gw.create_sandbox(&[port]).await;
    let host = host_of(&id);
    let kept = gw.token(&id, port).await;
    let revoked = gw.mint(&id, port, Value::Null).await;
    let (revoked_token, revoked_jti) = (
        revoked["token"].as_str().unwrap().to_string(),
        revoked["jti"].as_str().unwrap().to_string(),
    );
    let (status, _) = gw
        .api(
            Method::DELETE,
            &format!("/v1/connect-tokens/{revoked_jti}"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let resp = gw
        .tls()
        .get(&host, "/", &[("x-sandgate-token", &kept)])
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let kids_before = jwks_kids(&gw).await;
    let admin_key_path = gw.gw.config.store.admin_key_path();
    let admin_key_before = std::fs::read(&admin_key_path).unwrap();
    let admin_mtime_before = std::fs::metadata(&admin_key_path)
        .unwrap()
        .modified()
        .unwrap();
    let admin_before = gw.admin_key.clone();

    let _guard = gw
        .stop()
        .await
        .expect("the temp dir outlives the first gateway");
    let gw = TestGateway::start_in(&dir, "").await;

    // Signing keys: the same key set, and tokens signed before still verify.
    assert_eq!(jwks_kids(&gw).await, kids_before);
    assert_eq!(kid_of(&gw.token(&id, port).await), kid_of(&kept));
    let resp = gw
        .tls()
        .get(&host, "/after-restart", &[("x-sandgate-token", &kept)])
        .await;
    assert_eq!(resp.status(), StatusCode::OK, "{:?}", resp.body());
    assert_eq!(echo.last().uri, "/after-restart");

    // Credentials: the bootstrap admin key is reused, not rewritten; the other one still works.
    assert_eq!(gw.admin_key, admin_before);
    assert_eq!(std::fs::read(&admin_key_path).unwrap(), admin_key_before);
    assert_eq!(
        std::fs::metadata(&admin_key_path)
            .unwrap()
            .modified()
            .unwrap(),
        admin_mtime_before,
        "admin.key was rewritten"
    );
    let (status, _) = gw.api(Method::GET, "/v1/credentials", None).await;
    assert_eq!(status, StatusCode::OK);
    let (status, listed) = gw.api_as(&secret, Method::GET, "/v1/sandboxes", None).await;
    assert_eq!(status, StatusCode::OK, "{listed}");

    // Sandboxes: listed and still routed.
    let (status, listed) = gw.api(Method::GET, "/v1/sandboxes", None).await;
    assert_eq!(status, StatusCode::OK);
    let sandbox = listed["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == id.as_str())
        .unwrap_or_else(|| panic!("the sandbox is listed after the restart: {listed}"))
        .clone();
    assert_eq!(sandbox["status"], "running");
    let fresh = gw.token(&id, port).await;
    let resp = gw
        .tls()
        .get(&host, "/fresh", &[("x-sandgate-token", &fresh)])
        .await;
    assert_eq!(resp.status(), StatusCode::OK);

    // Revocations: still refused.
    let resp = gw
        .tls()
        .get(&host, "/", &[("x-sandgate-token", &revoked_token)])
        .await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(error_code(&resp), "token_revoked");

    // The non-admin credential can still do its work.
    let (status, body) = gw
        .api_as(
            &secret,
            Method::POST,
            &format!("/v1/sandboxes/{id}/connect-tokens"),
            Some(json!({"port": port})),
        )
        .await;
    // It did not create this sandbox, so it may not mint for it: the answer is a refusal by
    // ownership, not by authentication.
    assert_ne!(status, StatusCode::UNAUTHORIZED, "{body}");
    let (status, own) = gw
        .api_as(
            &secret,
            Method::POST,
            "/v1/sandboxes",
            Some(json!({"upstream": "127.0.0.1", "ports": [port]})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{own}");

    gw.stop().await;
}

#[tokio::test]
async fn a_rotated_key_signs_within_five_seconds_and_old_tokens_still_work() {
    let echo = Echo::start().await;
    let port = echo.port();
    let gw = TestGateway::start().await;
    let id = gw.create_sandbox(&[port]).await;
    let host = sandbox_host(port, &id);
    let old = gw.token(&id, port).await;
    let old_kid = kid_of(&old);

    let rotated = sandgate::gateway::add_signing_key(gw.gw.store.as_ref())
        .await
        .expect("rotate");
    let new_kid = rotated.kid().to_string();
    assert_ne!(new_kid, old_kid);

    let start = Instant::now();
    let fresh = loop {
        let t = gw.token(&id, port).await;
        if kid_of(&t) != old_kid {
            break t;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "still signing with the old key 5 s after the rotation"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!("new key in use after {:?}", start.elapsed());
    assert_eq!(kid_of(&fresh), new_kid);

    let kids = jwks_kids(&gw).await;
    assert!(
        kids.contains(&old_kid) && kids.contains(&new_kid),
        "{kids:?}"
    );
    for t in [&old, &fresh] {
        let resp = gw.tls().get(&host, "/", &[("x-sandgate-token", t)]).await;
        assert_eq!(resp.status(), StatusCode::OK, "{:?}", resp.body());
    }
}
