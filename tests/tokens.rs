//! Issued connect tokens through the control API: `GET /v1/connect-tokens` lists the live ones
//! (ids and claims, never the tokens) to whoever may see them, and `DELETE
//! /v1/connect-tokens/{jti}` revokes only a token that exists, is still live and is the
//! caller's to revoke.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use http::{Method, StatusCode};
use serde_json::{json, Value};

/// A worker that registers `upstream` sandboxes (hence `upstreams:write`) and mints tokens.
const WORKER_SCOPES: [&str; 4] = [
    "sandboxes:write",
    "upstreams:write",
    "tokens:issue",
    "tokens:revoke",
];

/// Mints a token as `key` and returns the whole answer (`token`, `url`, `jti`, `expires_at`).
async fn mint_as(gw: &TestGateway, key: &str, sandbox: &str, body: Value) -> Value {
    let (status, v) = gw
        .api_as(
            key,
            Method::POST,
            &format!("/v1/sandboxes/{sandbox}/connect-tokens"),
            Some(body),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    v
}

async fn sandbox_as(gw: &TestGateway, key: &str, ports: &[u16]) -> String {
    let (status, v) = gw
        .api_as(
            key,
            Method::POST,
            "/v1/sandboxes",
            Some(json!({"upstream": "127.0.0.1", "ports": ports})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    v["id"].as_str().unwrap().to_string()
}

/// The jtis of a list answer, in order.
fn jtis(list: &Value) -> Vec<String> {
    list["items"]
        .as_array()
        .unwrap_or_else(|| panic!("not a list: {list}"))
        .iter()
        .map(|t| t["jti"].as_str().unwrap().to_string())
        .collect()
}

fn jti(minted: &Value) -> String {
    minted["jti"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn live_tokens_are_listed_with_their_claims_and_never_the_token() {
    let gw = TestGateway::start_with("[tokens]\nleeway_secs = 0\n").await;
    let (worker_id, worker) =
        create_credential(&gw, json!({"name": "worker", "scopes": WORKER_SCOPES})).await;
    let (_, other) =
        create_credential(&gw, json!({"name": "other", "scopes": WORKER_SCOPES})).await;
    let mine = sandbox_as(&gw, &worker, &[9, 10]).await;
    let theirs = sandbox_as(&gw, &other, &[9]).await;

    let plain = mint_as(&gw, &worker, &mine, json!({"port": 9, "ttl_secs": 600})).await;
    let once = mint_as(&gw, &worker, &mine, json!({"port": 10, "single_use": true})).await;
    let revoked = mint_as(&gw, &worker, &mine, json!({"port": 9})).await;
    let short = mint_as(&gw, &worker, &mine, json!({"port": 9, "ttl_secs": 1})).await;
    let by_admin = gw.mint(&mine, 10, Value::Null).await;
    let foreign = mint_as(&gw, &other, &theirs, json!({"port": 9})).await;
    let (status, _) = gw
        .api_as(
            &worker,
            Method::DELETE,
            &format!("/v1/connect-tokens/{}", jti(&revoked)),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);

    // The owner of a sandbox sees every live token of it, the admin's included, oldest first.
    let (status, list) = gw
        .api_as(
            &worker,
            Method::GET,
            &format!("/v1/connect-tokens?sandbox={mine}"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{list}");
    assert_eq!(
        jtis(&list),
        [jti(&plain), jti(&once), jti(&short), jti(&by_admin)]
    );
    let first = &list["items"][0];
    assert_eq!(first["jti"], plain["jti"]);
    assert_eq!(first["sandbox"], mine.as_str());
    assert_eq!(first["port"], 9);
    assert_eq!(first["sub"], worker_id.as_str());
    assert_eq!(first["single_use"], false);
    assert_eq!(
        first["expires_at"], plain["expires_at"],
        "RFC 3339, as minted"
    );
    let issued = time::OffsetDateTime::parse(
        first["issued_at"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    let expires = time::OffsetDateTime::parse(
        first["expires_at"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    assert_eq!((expires - issued).whole_seconds(), 600);
    let second = &list["items"][1];
    assert_eq!(
        (second["port"].clone(), second["single_use"].clone()),
        (json!(10), json!(true))
    );
    assert_ne!(
        list["items"][3]["sub"],
        worker_id.as_str(),
        "the admin minted it"
    );
    let mut keys: Vec<&str> = first
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "expires_at",
            "issued_at",
            "jti",
            "port",
            "sandbox",
            "single_use",
            "sub"
        ]
    );

    // Without a filter: everything the caller may see, and nothing of another owner.
    let (status, all_mine) = gw
        .api_as(&worker, Method::GET, "/v1/connect-tokens", None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(jtis(&all_mine), jtis(&list));
    let (_, all) = gw.api(Method::GET, "/v1/connect-tokens", None).await;
    assert!(
        jtis(&all).contains(&jti(&foreign)),
        "the admin sees all: {all}"
    );
    assert!(!jtis(&all).contains(&jti(&revoked)), "{all}");

    // The tokens themselves never appear, in any listing.
    for listing in [&list, &all_mine, &all] {
        let text = listing.to_string();
        for minted in [&plain, &once, &revoked, &short, &by_admin, &foreign] {
            let token = minted["token"].as_str().unwrap();
            assert!(!text.contains(token), "a token is listed: {text}");
            // Not even its signature.
            assert!(!text.contains(token.rsplit('.').next().unwrap()));
        }
    }

    // Another owner's sandbox is 404, as for every sandbox endpoint; so is an unknown one.
    for id in [theirs.as_str(), "zzzzzzzzzzzzzzzzzzzzzzzz"] {
        let (status, v) = gw
            .api_as(
                &worker,
                Method::GET,
                &format!("/v1/connect-tokens?sandbox={id}"),
                None,
            )
            .await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{v}");
        assert_eq!(v["error"]["code"], "not_found");
    }

    // Either token scope may list; other scopes may not.
    for (scope, allowed) in [
        ("tokens:issue", true),
        ("tokens:revoke", true),
        ("sandboxes:read", false),
        ("sandboxes:write", false),
    ] {
        let (_, key) = create_credential(&gw, json!({"name": scope, "scopes": [scope]})).await;
        let (status, v) = gw
            .api_as(&key, Method::GET, "/v1/connect-tokens", None)
            .await;
        if allowed {
            assert_eq!(status, StatusCode::OK, "{scope}: {v}");
            assert_eq!(jtis(&v), Vec::<String>::new(), "{scope} owns nothing");
        } else {
            assert_eq!(status, StatusCode::FORBIDDEN, "{scope}: {v}");
        }
    }

    // Odd query input is 422 and names the parameter.
    for query in [
        "sandbox=",
        "sandbox=..%2Fx",
        "sandbox=a%20b",
        &format!("sandbox={mine}&sandbox={mine}"),
        "sandbox_id=x",
        "limit=5",
    ] {
        let (status, v) = gw
            .api_as(
                &worker,
                Method::GET,
                &format!("/v1/connect-tokens?{query}"),
                None,
            )
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{query}: {v}");
        assert_eq!(v["error"]["code"], "invalid_argument");
        let message = v["error"]["message"].as_str().unwrap();
        assert!(message.contains("sandbox"), "{query}: {message}");
        assert!(
            !message.contains("..") && !message.contains("limit"),
            "{message}"
        );
    }

    // An expired token drops out of the list (the leeway is 0 here).
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let (_, list) = gw
        .api_as(
            &worker,
            Method::GET,
            &format!("/v1/connect-tokens?sandbox={mine}"),
            None,
        )
        .await;
    assert_eq!(jtis(&list), [jti(&plain), jti(&once), jti(&by_admin)]);
}

#[tokio::test]
async fn only_live_tokens_of_the_callers_own_can_be_revoked() {
    let gw = TestGateway::start_with("[tokens]\nleeway_secs = 0\n").await;
    let echo = Echo::start().await;
    let port = echo.port();
    let (_, worker) =
        create_credential(&gw, json!({"name": "worker", "scopes": WORKER_SCOPES})).await;
    let (_, other) =
        create_credential(&gw, json!({"name": "other", "scopes": WORKER_SCOPES})).await;
    let (_, revoker) =
        create_credential(&gw, json!({"name": "revoker", "scopes": ["tokens:revoke"]})).await;
    let mine = sandbox_as(&gw, &worker, &[port]).await;
    let theirs = sandbox_as(&gw, &other, &[port]).await;
    let revoke = async |key: &str, jti: &str| {
        gw.api_as(
            key,
            Method::DELETE,
            &format!("/v1/connect-tokens/{jti}"),
            None,
        )
        .await
    };
    let works = async |sandbox: &str, token: &Value| {
        let token = token["token"].as_str().unwrap();
        gw.tls()
            .get(
                &sandbox_host(port, sandbox),
                "/",
                &[("x-sandgate-token", token)],
            )
            .await
            .status()
    };

    // A jti that was never issued: 404, and nothing is written to the revocation set.
    let before = gw.gw.store.revoked_tokens(0).await.unwrap();
    for unknown in ["nosuchjti", "some-token-id", "AAAAAAAAAAAAAAAAAAAAAA"] {
        let (status, v) = revoke(&worker, unknown).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{v}");
        assert_eq!(v["error"]["code"], "not_found");
        let message = v["error"]["message"].as_str().unwrap();
        assert!(message.contains("no such token"), "{message}");
    }
    assert_eq!(gw.gw.store.revoked_tokens(0).await.unwrap(), before);
    let (status, _) = revoke(&gw.admin_key, "nosuchjti").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "an admin too");

    // Another owner's token: 404 for the worker and for a bare `tokens:revoke` credential,
    // and the token keeps working.
    let foreign = mint_as(&gw, &other, &theirs, json!({"port": port})).await;
    for key in [&worker, &revoker] {
        let (status, v) = revoke(key, &jti(&foreign)).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{v}");
        assert!(v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no such token"));
    }
    assert_eq!(works(&theirs, &foreign).await, StatusCode::OK);

    // A live token of one's own: 204, refused at once, and revoked in the store until the
    // token's own expiry (the set other nodes load).
    let live = mint_as(&gw, &worker, &mine, json!({"port": port})).await;
    assert_eq!(works(&mine, &live).await, StatusCode::OK);
    let (status, v) = revoke(&worker, &jti(&live)).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{v}");
    let resp = gw
        .tls()
        .get(
            &sandbox_host(port, &mine),
            "/",
            &[("x-sandgate-token", live["token"].as_str().unwrap())],
        )
        .await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(error_code(&resp), "token_revoked");
    let exp = time::OffsetDateTime::parse(
        live["expires_at"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap()
    .unix_timestamp();
    assert!(gw
        .gw
        .store
        .revoked_tokens(0)
        .await
        .unwrap()
        .contains(&(jti(&live), exp)));
    // Already revoked: 204 again, so a retried DELETE is safe.
    let (status, _) = revoke(&worker, &jti(&live)).await;
    assert_eq!(status, StatusCode::NO_CONTENT);

    // The owner of a sandbox may revoke a token the admin minted for it.
    let by_admin = gw.mint(&mine, port, Value::Null).await;
    let (status, _) = revoke(&worker, &jti(&by_admin)).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(works(&mine, &by_admin).await, StatusCode::UNAUTHORIZED);

    // An expired token: 404, nothing left to revoke.
    let short = mint_as(&gw, &worker, &mine, json!({"port": port, "ttl_secs": 1})).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let (status, v) = revoke(&worker, &jti(&short)).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{v}");
    assert_eq!(v["error"]["code"], "not_found");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("expired"),
        "{v}"
    );
    // And for someone else it is just unknown: whether it existed is not theirs to learn.
    let (status, v) = revoke(&revoker, &jti(&short)).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("no such token"));

    // The admin may revoke anyone's.
    let (status, _) = revoke(&gw.admin_key, &jti(&foreign)).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(works(&theirs, &foreign).await, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn token_errors_name_the_limits_that_apply() {
    let gw = TestGateway::start().await;
    let sandbox = gw.create_sandbox(&[8000, 3000]).await;
    let path = format!("/v1/sandboxes/{sandbox}/connect-tokens");

    // An unpublished port: the answer lists the published ones.
    let (status, v) = gw
        .api(Method::POST, &path, Some(json!({"port": 8001})))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("8001") && message.contains("8000, 3000"),
        "{message}"
    );

    // Too long for the gateway: the limit in human units, and the key that sets it.
    let (status, v) = gw
        .api(
            Method::POST,
            &path,
            Some(json!({"port": 8000, "ttl_secs": 8_640_000})),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("24h") && message.contains("[tokens] max_ttl_secs"),
        "{message}"
    );
    // Too long for the credential's own cap.
    let (_, capped) = create_credential(
        &gw,
        json!({"name": "capped", "scopes": ["admin"], "max_token_ttl_secs": 300}),
    )
    .await;
    let (status, v) = gw
        .api_as(
            &capped,
            Method::POST,
            &path,
            Some(json!({"port": 8000, "ttl_secs": 301})),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("5m") && message.contains("max_token_ttl_secs"),
        "{message}"
    );
    for ttl in [0, -5] {
        let (status, _) = gw
            .api(
                Method::POST,
                &path,
                Some(json!({"port": 8000, "ttl_secs": ttl})),
            )
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{ttl}");
    }
    // At the limit is fine.
    let (status, v) = gw
        .api_as(
            &capped,
            Method::POST,
            &path,
            Some(json!({"port": 8000, "ttl_secs": 300})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
}
