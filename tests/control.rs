//! The control API: who may call what (scopes, ownership), credentials (secrets shown once,
//! revocation and expiry take effect at once), token lifetimes, rate limits, the audit log, and
//! error answers that never echo what was sent.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use http::{Method, StatusCode};
use serde_json::{json, Value};

const SCOPES: [&str; 6] = [
    "admin",
    "sandboxes:read",
    "sandboxes:write",
    "upstreams:write",
    "tokens:issue",
    "tokens:revoke",
];

/// One endpoint of the matrix, against targets that exist.
struct Call {
    name: &'static str,
    method: Method,
    path: String,
    body: Option<Value>,
    /// The scope the endpoint documents (admin implies every scope); `a|b` when either opens
    /// it.
    scope: &'static str,
}

/// Every `/v1` endpoint, aimed at a fresh sandbox, credential and token so that a call that
/// is let through does something real.
fn endpoints(sandbox: &str, credential: &str, jti: &str) -> Vec<Call> {
    let call = |name, method, path: String, body, scope| Call {
        name,
        method,
        path,
        body,
        scope,
    };
    vec![
        call(
            "create credential",
            Method::POST,
            "/v1/credentials".into(),
            Some(json!({"name": "made-in-matrix", "scopes": ["sandboxes:read"]})),
            "admin",
        ),
        call(
            "list credentials",
            Method::GET,
            "/v1/credentials".into(),
            None,
            "admin",
        ),
        call(
            "revoke credential",
            Method::DELETE,
            format!("/v1/credentials/{credential}"),
            None,
            "admin",
        ),
        call(
            "create sandbox",
            Method::POST,
            "/v1/sandboxes".into(),
            Some(json!({"upstream": "127.0.0.1", "ports": [9]})),
            // Both `sandboxes:write` and `upstreams:write`: no single scope but admin allows it.
            "sandboxes:write + upstreams:write",
        ),
        call(
            "list sandboxes",
            Method::GET,
            "/v1/sandboxes".into(),
            None,
            "sandboxes:read",
        ),
        call(
            "get sandbox",
            Method::GET,
            format!("/v1/sandboxes/{sandbox}"),
            None,
            "sandboxes:read",
        ),
        call(
            "exec",
            Method::POST,
            format!("/v1/sandboxes/{sandbox}/exec"),
            Some(json!({"command": ["true"]})),
            "sandboxes:write",
        ),
        call(
            "logs",
            Method::GET,
            format!("/v1/sandboxes/{sandbox}/logs"),
            None,
            "sandboxes:read",
        ),
        call(
            "mint token",
            Method::POST,
            format!("/v1/sandboxes/{sandbox}/connect-tokens"),
            Some(json!({"port": 9})),
            "tokens:issue",
        ),
        call(
            "list tokens",
            Method::GET,
            format!("/v1/connect-tokens?sandbox={sandbox}"),
            None,
            "tokens:issue|tokens:revoke",
        ),
        call(
            "revoke token",
            Method::DELETE,
            format!("/v1/connect-tokens/{jti}"),
            None,
            "tokens:revoke",
        ),
        call("audit", Method::GET, "/v1/audit".into(), None, "admin"),
        // Last: it ends the sandbox the calls above use.
        call(
            "terminate sandbox",
            Method::DELETE,
            format!("/v1/sandboxes/{sandbox}"),
            None,
            "sandboxes:write",
        ),
    ]
}

async fn send(gw: &TestGateway, key: Option<&str>, c: &Call) -> (StatusCode, Value) {
    let tls = gw.tls();
    let resp = match &c.body {
        Some(b) => {
            api_raw(
                &tls,
                key,
                c.method.clone(),
                &c.path,
                Some("application/json"),
                b.to_string(),
            )
            .await
        }
        None => api_raw(&tls, key, c.method.clone(), &c.path, None, "").await,
    };
    (resp.status(), json_body(&resp))
}

#[tokio::test]
async fn every_endpoint_checks_every_scope() {
    let gw = TestGateway::start().await;
    for scope in SCOPES {
        let (_, key) = create_credential(
            &gw,
            json!({"name": format!("only-{scope}"), "scopes": [scope]}),
        )
        .await;
        // Fresh targets per scope: an allowed terminate or revoke must find something to end.
        let sandbox = gw.create_sandbox(&[9]).await;
        let (victim, _) =
            create_credential(&gw, json!({"name": "victim", "scopes": ["tokens:issue"]})).await;
        let jti = gw.mint(&sandbox, 9, Value::Null).await["jti"]
            .as_str()
            .unwrap()
            .to_string();
        for c in endpoints(&sandbox, &victim, &jti) {
            let allowed = scope == "admin" || c.scope.split('|').any(|s| s == scope);
            let (status, body) = send(&gw, Some(&key), &c).await;
            if allowed {
                assert_ne!(
                    status,
                    StatusCode::FORBIDDEN,
                    "{scope} may call {}: {body}",
                    c.name
                );
                assert_ne!(status, StatusCode::UNAUTHORIZED, "{scope} / {}", c.name);
                assert!(
                    !status.is_server_error(),
                    "{scope} / {}: {status} {body}",
                    c.name
                );
                if scope == "admin" {
                    // The admin sees everything, so each call does what it says (exec and logs
                    // answer that an `upstream` sandbox has no process to run them in).
                    let expected = match c.name {
                        "create credential" | "create sandbox" | "mint token" => {
                            StatusCode::CREATED
                        }
                        "revoke credential" | "revoke token" | "terminate sandbox" => {
                            StatusCode::NO_CONTENT
                        }
                        "exec" | "logs" => StatusCode::UNPROCESSABLE_ENTITY,
                        _ => StatusCode::OK,
                    };
                    assert_eq!(status, expected, "admin / {}: {body}", c.name);
                }
            } else {
                assert_eq!(
                    status,
                    StatusCode::FORBIDDEN,
                    "{scope} must not call {}: {body}",
                    c.name
                );
                assert_eq!(body["error"]["code"], "forbidden", "{scope} / {}", c.name);
            }
        }
        // A refused call changed nothing: the sandbox and the victim credential are intact
        // unless the scope allowed ending them.
        let (_, v) = gw
            .api(Method::GET, &format!("/v1/sandboxes/{sandbox}"), None)
            .await;
        // (`sandboxes:write` alone may terminate only its own sandboxes: 404 here.)
        let ended = scope == "admin";
        assert_eq!(
            v["status"],
            if ended { "stopped" } else { "running" },
            "{scope}: {v}"
        );
        let (_, list) = gw.api(Method::GET, "/v1/credentials", None).await;
        let victim_view = list["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["id"] == victim.as_str())
            .cloned()
            .unwrap();
        assert_eq!(
            victim_view["revoked_at"].is_null(),
            scope != "admin",
            "{scope}: {victim_view}"
        );
    }

    // Without a usable key, every endpoint answers 401 before anything else.
    let sandbox = gw.create_sandbox(&[9]).await;
    for c in endpoints(&sandbox, "cred_nonexistent", "nosuchjti") {
        for key in [None, Some("sgk_not-a-real-key"), Some("garbage"), Some("")] {
            let (status, body) = send(&gw, key, &c).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{} with {key:?}", c.name);
            assert_eq!(body["error"]["code"], "unauthenticated", "{}", c.name);
        }
    }
    // Another scheme than Bearer is not accepted either, even with the right secret.
    let resp = gw
        .tls()
        .get(
            BASE,
            "/v1/sandboxes",
            &[("authorization", &format!("Basic {}", gw.admin_key))],
        )
        .await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let (_, v) = gw
        .api(Method::GET, &format!("/v1/sandboxes/{sandbox}"), None)
        .await;
    assert_eq!(
        v["status"], "running",
        "unauthenticated calls ended it: {v}"
    );
}

#[tokio::test]
async fn a_credential_sees_and_touches_only_its_own_sandboxes() {
    let gw = TestGateway::start().await;
    let scopes = json!([
        "sandboxes:read",
        "sandboxes:write",
        "upstreams:write",
        "tokens:issue"
    ]);
    let (a_id, a) = create_credential(&gw, json!({"name": "a", "scopes": scopes})).await;
    let (b_id, b) = create_credential(&gw, json!({"name": "b", "scopes": scopes})).await;
    let new_sandbox = |key: String| {
        let gw = &gw;
        async move {
            let (status, v) = gw
                .api_as(
                    &key,
                    Method::POST,
                    "/v1/sandboxes",
                    Some(json!({"upstream": "127.0.0.1", "ports": [9]})),
                )
                .await;
            assert_eq!(status, StatusCode::CREATED, "{v}");
            v
        }
    };
    let sa = new_sandbox(a.clone()).await;
    assert_eq!(sa["owner"], a_id.as_str());
    let sa = sa["id"].as_str().unwrap().to_string();
    let sb = new_sandbox(b.clone()).await["id"]
        .as_str()
        .unwrap()
        .to_string();

    // B cannot tell A's sandbox from one that does not exist.
    let (_, unknown) = gw
        .api_as(
            &b,
            Method::GET,
            "/v1/sandboxes/zzzzzzzzzzzzzzzzzzzzzzzz",
            None,
        )
        .await;
    let attempts = [
        (Method::GET, format!("/v1/sandboxes/{sa}"), None),
        (
            Method::POST,
            format!("/v1/sandboxes/{sa}/connect-tokens"),
            Some(json!({"port": 9})),
        ),
        (
            Method::POST,
            format!("/v1/sandboxes/{sa}/exec"),
            Some(json!({"command": ["true"]})),
        ),
        (Method::GET, format!("/v1/sandboxes/{sa}/logs"), None),
        (Method::DELETE, format!("/v1/sandboxes/{sa}"), None),
    ];
    for (method, path, body) in attempts {
        let (status, v) = gw.api_as(&b, method.clone(), &path, body).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "B {method} {path}: {v}");
        assert_eq!(v, unknown, "B {method} {path} must look like an unknown id");
    }
    // ...and none of that touched it.
    let (status, v) = gw
        .api_as(&a, Method::GET, &format!("/v1/sandboxes/{sa}"), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v["status"], "running", "{v}");
    let token = gw
        .api_as(
            &a,
            Method::POST,
            &format!("/v1/sandboxes/{sa}/connect-tokens"),
            Some(json!({"port": 9})),
        )
        .await;
    assert_eq!(token.0, StatusCode::CREATED, "{}", token.1);

    let ids = |v: &Value| -> Vec<String> {
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["id"].as_str().unwrap().to_string())
            .collect()
    };
    let (_, list_a) = gw.api_as(&a, Method::GET, "/v1/sandboxes", None).await;
    let (_, list_b) = gw.api_as(&b, Method::GET, "/v1/sandboxes", None).await;
    assert_eq!(ids(&list_a), vec![sa.clone()]);
    assert_eq!(ids(&list_b), vec![sb.clone()]);
    for item in list_b["items"].as_array().unwrap() {
        assert_eq!(item["owner"], b_id.as_str());
    }
    let (_, all) = gw.api(Method::GET, "/v1/sandboxes", None).await;
    let all = ids(&all);
    assert!(all.contains(&sa) && all.contains(&sb), "{all:?}");
    for id in [&sa, &sb] {
        let (status, _) = gw
            .api(Method::GET, &format!("/v1/sandboxes/{id}"), None)
            .await;
        assert_eq!(status, StatusCode::OK);
    }

    // The owner can end its own.
    let (status, _) = gw
        .api_as(&a, Method::DELETE, &format!("/v1/sandboxes/{sa}"), None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (_, v) = gw
        .api(Method::GET, &format!("/v1/sandboxes/{sb}"), None)
        .await;
    assert_eq!(v["status"], "running", "B's sandbox must be untouched: {v}");
}

#[tokio::test]
async fn secrets_are_shown_once_and_revocation_and_expiry_apply_at_once() {
    let gw = TestGateway::start().await;
    let (status, created) = gw
        .api(
            Method::POST,
            "/v1/credentials",
            Some(json!({"name": "ci", "scopes": ["sandboxes:read"]})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let id = created["id"].as_str().unwrap().to_string();
    let secret = created["secret"].as_str().unwrap().to_string();
    assert!(secret.starts_with("sgk_"), "{secret}");
    assert!(secret.len() >= 40, "a secret carries 256 bits: {secret}");
    assert_eq!(created["name"], "ci");
    assert_eq!(created["scopes"], json!(["sandboxes:read"]));
    assert!(created["expires_at"].is_null());

    let (status, _) = gw.api_as(&secret, Method::GET, "/v1/sandboxes", None).await;
    assert_eq!(status, StatusCode::OK);

    // Never again: not in the list, not in the audit log.
    let (status, list) = gw.api(Method::GET, "/v1/credentials", None).await;
    assert_eq!(status, StatusCode::OK);
    let text = list.to_string();
    assert!(!text.contains(&secret), "the list shows the secret: {text}");
    assert!(
        !text.contains(&gw.admin_key),
        "the list shows the admin key"
    );
    let items = list["items"].as_array().unwrap();
    assert!(items.iter().any(|c| c["id"] == id.as_str()));
    for c in items {
        assert!(c.get("secret").is_none(), "{c}");
    }
    let (_, audit) = gw.api(Method::GET, "/v1/audit", None).await;
    let text = audit.to_string();
    assert!(!text.contains(&secret) && !text.contains(&gw.admin_key));
    // Nor on disk: the store keeps only a hash.
    for entry in std::fs::read_dir(gw.dir.join("data")).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            let bytes = std::fs::read(&path).unwrap();
            assert!(
                !String::from_utf8_lossy(&bytes).contains(&secret),
                "{} holds the secret",
                path.display()
            );
        }
    }

    // Revoked: its very next call fails.
    let (status, _) = gw
        .api(Method::DELETE, &format!("/v1/credentials/{id}"), None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, v) = gw.api_as(&secret, Method::GET, "/v1/sandboxes", None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{v}");
    assert_eq!(v["error"]["code"], "unauthenticated");
    let (_, list) = gw.api(Method::GET, "/v1/credentials", None).await;
    let view = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == id.as_str())
        .cloned()
        .unwrap();
    assert!(view["revoked_at"].is_string(), "{view}");
    let (status, _) = gw
        .api(Method::DELETE, "/v1/credentials/cred_nonexistent", None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Expired: works until `expires_at`, fails right after. (Expiry has one-second
    // granularity, so a 2 s lifetime leaves at least a second to show it works first.)
    let (status, short) = gw
        .api(
            Method::POST,
            "/v1/credentials",
            Some(json!({"name": "short", "scopes": ["sandboxes:read"], "ttl_secs": 2})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let short_secret = short["secret"].as_str().unwrap().to_string();
    let expires_at = time::OffsetDateTime::parse(
        short["expires_at"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    let (status, _) = gw
        .api_as(&short_secret, Method::GET, "/v1/sandboxes", None)
        .await;
    assert_eq!(status, StatusCode::OK, "a fresh credential works");
    let left = expires_at - time::OffsetDateTime::now_utc();
    let wait = Duration::try_from(left).unwrap_or_default() + Duration::from_millis(100);
    assert!(wait <= Duration::from_millis(2200), "{wait:?}");
    tokio::time::sleep(wait).await;
    let (status, v) = gw
        .api_as(&short_secret, Method::GET, "/v1/sandboxes", None)
        .await;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "an expired credential: {v}"
    );
}

#[tokio::test]
async fn a_credential_cannot_mint_tokens_beyond_its_maximum_lifetime() {
    let gw = TestGateway::start().await;
    let (_, key) = create_credential(
        &gw,
        json!({
            "name": "capped",
            "scopes": ["sandboxes:write", "upstreams:write", "tokens:issue"],
            "max_token_ttl_secs": 60,
        }),
    )
    .await;
    let (status, v) = gw
        .api_as(
            &key,
            Method::POST,
            "/v1/sandboxes",
            Some(json!({"upstream": "127.0.0.1", "ports": [9]})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let id = v["id"].as_str().unwrap().to_string();
    let path = format!("/v1/sandboxes/{id}/connect-tokens");
    let mint = |ttl: Option<i64>| {
        let (gw, key, path) = (&gw, key.clone(), path.clone());
        async move {
            let mut body = json!({"port": 9});
            if let Some(t) = ttl {
                body["ttl_secs"] = json!(t);
            }
            gw.api_as(&key, Method::POST, &path, Some(body)).await
        }
    };
    let (status, v) = mint(Some(61)).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert_eq!(v["error"]["code"], "invalid_argument");
    let (status, v) = mint(Some(3600)).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{v}");

    let seconds_left = |v: &Value| {
        let exp = time::OffsetDateTime::parse(
            v["expires_at"].as_str().unwrap(),
            &time::format_description::well_known::Rfc3339,
        )
        .unwrap();
        (exp - time::OffsetDateTime::now_utc()).whole_seconds()
    };
    let (status, v) = mint(Some(60)).await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    assert!((58..=60).contains(&seconds_left(&v)), "{v}");
    // Without a ttl the default (600 s) is capped to the credential's maximum.
    let (status, v) = mint(None).await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    assert!((58..=60).contains(&seconds_left(&v)), "{v}");

    // An admin without a cap gets what it asks for, up to the gateway's maximum.
    let v = gw.mint(&id, 9, json!({"ttl_secs": 3600})).await;
    assert!(seconds_left(&v) > 3500, "{v}");
}

#[tokio::test]
async fn rapid_calls_beyond_the_burst_are_rate_limited() {
    let gw = TestGateway::start_with(
        "[api]\nrequests_per_second = 1\nburst = 3\naddress_requests_per_second = 1000\naddress_burst = 1000\n",
    )
    .await;
    let (_, key) =
        create_credential(&gw, json!({"name": "busy", "scopes": ["sandboxes:read"]})).await;
    let tls = gw.tls();
    let call = || api_raw(&tls, Some(&key), Method::GET, "/v1/sandboxes", None, "");
    for i in 0..3 {
        let resp = call().await;
        assert_eq!(
            resp.status(),
            StatusCode::OK,
            "call {i} is within the burst"
        );
    }
    for i in 3..6 {
        let resp = call().await;
        assert_eq!(
            resp.status(),
            StatusCode::TOO_MANY_REQUESTS,
            "call {i}: {:?}",
            resp.body()
        );
        assert_eq!(error_code(&resp), "rate_limited");
        let retry: u64 = resp
            .headers()
            .get("retry-after")
            .expect("a 429 says when to retry")
            .to_str()
            .unwrap()
            .parse()
            .expect("Retry-After in seconds");
        assert!((1..=2).contains(&retry), "Retry-After: {retry}");
    }
    // The limit is per credential: the admin (one call so far) is not affected.
    let (status, _) = gw.api(Method::GET, "/v1/sandboxes", None).await;
    assert_eq!(status, StatusCode::OK);
    // After waiting as told, the next call goes through.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(call().await.status(), StatusCode::OK);
}

#[tokio::test]
async fn rapid_calls_from_one_address_are_rate_limited_even_without_a_key() {
    let gw = TestGateway::start_with(
        "[api]\nrequests_per_second = 1000\nburst = 1000\naddress_requests_per_second = 1\naddress_burst = 2\n",
    )
    .await;
    let tls = gw.tls();
    let guess = || {
        api_raw(
            &tls,
            Some("sgk_guess"),
            Method::GET,
            "/v1/sandboxes",
            None,
            "",
        )
    };
    assert_eq!(guess().await.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(guess().await.status(), StatusCode::UNAUTHORIZED);
    let resp = guess().await;
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(error_code(&resp), "rate_limited");
    assert!(resp.headers().contains_key("retry-after"));
    // The right key does not get around the address limit either.
    let resp = api_raw(
        &tls,
        Some(&gw.admin_key),
        Method::GET,
        "/v1/sandboxes",
        None,
        "",
    )
    .await;
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
}

#[tokio::test]
async fn the_audit_log_records_who_did_what_newest_first() {
    let gw = TestGateway::start().await;
    let (_, list) = gw.api(Method::GET, "/v1/credentials", None).await;
    let admin_id = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "bootstrap-admin")
        .expect("the bootstrap admin is listed")["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (worker_id, worker) = create_credential(
        &gw,
        json!({
            "name": "worker",
            "scopes": ["sandboxes:write", "upstreams:write", "tokens:issue", "tokens:revoke"],
        }),
    )
    .await;
    let (status, v) = gw
        .api_as(
            &worker,
            Method::POST,
            "/v1/sandboxes",
            Some(json!({"upstream": "127.0.0.1", "ports": [9]})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let sandbox = v["id"].as_str().unwrap().to_string();
    let (status, token) = gw
        .api_as(
            &worker,
            Method::POST,
            &format!("/v1/sandboxes/{sandbox}/connect-tokens"),
            Some(json!({"port": 9})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let jti = token["jti"].as_str().unwrap().to_string();
    let (status, _) = gw
        .api_as(
            &worker,
            Method::DELETE,
            &format!("/v1/connect-tokens/{jti}"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = gw
        .api_as(
            &worker,
            Method::DELETE,
            &format!("/v1/sandboxes/{sandbox}"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = gw
        .api(
            Method::DELETE,
            &format!("/v1/credentials/{worker_id}"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    // Refused calls change nothing and are not recorded as if they had.
    let (status, _) = gw.api_as(&worker, Method::GET, "/v1/sandboxes", None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    let (status, audit) = gw.api(Method::GET, "/v1/audit?limit=100", None).await;
    assert_eq!(status, StatusCode::OK);
    let events = audit["items"].as_array().unwrap().clone();
    let got: Vec<(String, String)> = events
        .iter()
        .map(|e| {
            (
                e["actor"].as_str().unwrap().to_string(),
                e["action"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let expected: Vec<(String, String)> = [
        (&admin_id, "credential.revoke"),
        (&worker_id, "sandbox.terminate"),
        (&worker_id, "token.revoke"),
        (&worker_id, "token.issue"),
        (&worker_id, "sandbox.create"),
        (&admin_id, "credential.create"),
        (&"sandgate".to_string(), "credential.create"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    assert_eq!(got, expected, "{audit}");
    let targets: Vec<&str> = events
        .iter()
        .map(|e| e["target"].as_str().unwrap())
        .collect();
    assert_eq!(targets[0], worker_id);
    assert_eq!(targets[1], sandbox);
    assert_eq!(targets[2], jti);
    assert!(
        targets[3].contains(&sandbox) && targets[3].contains(&jti),
        "{}",
        targets[3]
    );
    assert_eq!(targets[4], sandbox);
    assert_eq!(targets[5], worker_id);
    // The oldest: the gateway creating the bootstrap admin on first start, from no address.
    assert_eq!(targets[6], admin_id);
    assert!(events[6]["client_addr"].is_null());
    for (i, e) in events.iter().enumerate() {
        if i < 6 {
            assert_eq!(e["client_addr"], "127.0.0.1", "{e}");
        }
        assert!(e["time"].as_str().unwrap().ends_with('Z'), "{e}");
        if let Some(next) = events.get(i + 1) {
            assert!(e["id"].as_i64() > next["id"].as_i64(), "newest first");
            assert!(e["time"].as_str() >= next["time"].as_str(), "newest first");
        }
    }
    assert!(!audit.to_string().contains(token["token"].as_str().unwrap()));

    // `limit` keeps the newest N.
    let (_, two) = gw.api(Method::GET, "/v1/audit?limit=2", None).await;
    let two = two["items"].as_array().unwrap();
    assert_eq!(two.len(), 2);
    assert_eq!(two[0], events[0]);
    assert_eq!(two[1], events[1]);
    let (status, v) = gw.api(Method::GET, "/v1/audit?limit=many", None).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
}

#[tokio::test]
async fn invalid_bodies_get_json_errors_that_never_echo_a_secret() {
    let gw = TestGateway::start().await;
    let tls = gw.tls();
    let key = gw.admin_key.clone();
    let sandbox = gw.create_sandbox(&[9]).await;
    let secret = "sgk_TopSecretValue0123456789";
    let post = |path: &'static str, ct: Option<&'static str>, body: String| {
        let (tls, key) = (&tls, &key);
        async move { api_raw(tls, Some(key), Method::POST, path, ct, body).await }
    };
    let json = Some("application/json");
    let cases: Vec<(&str, Option<&str>, String, StatusCode)> = vec![
        (
            "/v1/credentials",
            None,
            json!({"name": secret, "scopes": ["admin"]}).to_string(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ),
        (
            "/v1/credentials",
            Some("text/plain"),
            json!({"name": "x", "scopes": [secret]}).to_string(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ),
        (
            "/v1/credentials",
            json,
            format!("{{\"name\": \"{secret}"),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        ("/v1/credentials", json, String::new(), StatusCode::UNPROCESSABLE_ENTITY),
        (
            "/v1/credentials",
            json,
            json!({"name": "x", "scopes": secret}).to_string(),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "/v1/credentials",
            json,
            json!({"name": "x", "scopes": [secret]}).to_string(),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "/v1/credentials",
            json,
            json!({"name": "x", "scopes": ["admin"], "ttl_secs": secret}).to_string(),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        // A quote inside the value must not end the redaction early.
        (
            "/v1/credentials",
            json,
            json!({"name": "x", "scopes": format!("a\"{secret}")}).to_string(),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "/v1/credentials",
            json,
            json!({"name": "x", "scopes": ["admin"], "secret": secret}).to_string(),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        // Pasted in the wrong place: as a field name.
        (
            "/v1/credentials",
            json,
            json!({"name": "x", "scopes": ["admin"], secret: 1}).to_string(),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "/v1/credentials",
            json,
            json!({"name": "", "scopes": ["admin"]}).to_string(),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "/v1/credentials",
            json,
            json!({"name": "x", "scopes": []}).to_string(),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "/v1/credentials",
            json,
            json!({"name": "x", "scopes": ["admin"], "ttl_secs": -1}).to_string(),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "/v1/sandboxes",
            json,
            json!({"upstream": format!("{secret}.example/x"), "ports": [9]}).to_string(),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "/v1/sandboxes",
            json,
            json!({"upstream": "127.0.0.1", "command": ["true"], "ports": [9]}).to_string(),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "/v1/sandboxes",
            json,
            json!({"upstream": "127.0.0.1", "ports": []}).to_string(),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "/v1/sandboxes",
            json,
            json!({"upstream": "127.0.0.1", "ports": [70000]}).to_string(),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "/v1/sandboxes",
            json,
            json!({"command": ["sh"], "ports": [9], "env": {"SANDGATE_KEY": secret}})
                .to_string(),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "/v1/sandboxes",
            json,
            json!({"upstream": "127.0.0.1", "ports": [9], "metadata": secret}).to_string(),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "/v1/sandboxes",
            json,
            format!(
                "{{\"upstream\": \"127.0.0.1\", \"ports\": [9], \"metadata\": {{\"pad\": \"{}\"}}}}",
                "x".repeat(300 * 1024)
            ),
            StatusCode::PAYLOAD_TOO_LARGE,
        ),
    ];
    for (path, ct, body, expected) in cases {
        let resp = post(path, ct, body.clone()).await;
        let shown = &body[..body.len().min(120)];
        assert_eq!(resp.status(), expected, "{path} {shown}: {:?}", resp.body());
        assert_eq!(
            resp.headers()["content-type"],
            "application/json",
            "{path} {shown}"
        );
        let v = json_body(&resp);
        assert!(v["error"]["code"].is_string(), "{path} {shown}: {v}");
        assert!(v["error"]["message"].is_string(), "{path} {shown}: {v}");
        let text = String::from_utf8_lossy(resp.body()).into_owned();
        assert!(
            !text.contains("TopSecretValue"),
            "{path} {shown}: the answer echoes the secret: {text}"
        );
    }

    // The same for the sandbox sub-resources.
    let path = format!("/v1/sandboxes/{sandbox}/connect-tokens");
    for (body, expected) in [
        (json!({"port": 10}), StatusCode::UNPROCESSABLE_ENTITY),
        (json!({"port": secret}), StatusCode::UNPROCESSABLE_ENTITY),
        (
            json!({"port": 9, "user_metadata": secret}),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
    ] {
        let resp = api_raw(
            &tls,
            Some(&key),
            Method::POST,
            &path,
            Some("application/json"),
            body.to_string(),
        )
        .await;
        assert_eq!(resp.status(), expected, "{body}");
        assert!(!String::from_utf8_lossy(resp.body()).contains("TopSecretValue"));
    }
    let resp = api_raw(
        &tls,
        Some(&key),
        Method::POST,
        &format!("/v1/sandboxes/{sandbox}/exec"),
        None,
        "ls",
    )
    .await;
    assert_eq!(resp.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    // Unknown endpoints and methods answer in JSON too.
    let resp = api_raw(&tls, Some(&key), Method::GET, "/v1/nothing", None, "").await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert_eq!(error_code(&resp), "not_found");
    let resp = api_raw(&tls, Some(&key), Method::PUT, "/v1/sandboxes", None, "").await;
    assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(error_code(&resp), "method_not_allowed");
    // Nothing was created by any of it.
    let (_, list) = gw.api(Method::GET, "/v1/credentials", None).await;
    assert_eq!(list["items"].as_array().unwrap().len(), 1, "{list}");
    let (_, list) = gw.api(Method::GET, "/v1/sandboxes", None).await;
    assert_eq!(list["items"].as_array().unwrap().len(), 1, "{list}");
}
