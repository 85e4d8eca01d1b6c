//! Names and tags: a name is unique among one owner's live sandboxes (409, or the existing
//! sandbox with `reuse`), free again once its sandbox ends; tags label sandboxes, filter the
//! list and are replaced by PATCH.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use http::{Method, StatusCode};
use serde_json::{json, Value};

const SCOPES: [&str; 3] = ["sandboxes:read", "sandboxes:write", "upstreams:write"];

fn upstream(extra: Value) -> Value {
    let mut body = json!({"upstream": "127.0.0.1", "ports": [9]});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

async fn create(gw: &TestGateway, key: &str, body: Value) -> (StatusCode, Value) {
    gw.api_as(key, Method::POST, "/v1/sandboxes", Some(body))
        .await
}

/// The ids a list request answers, in order.
async fn listed(gw: &TestGateway, key: &str, query: &str) -> Vec<String> {
    let (status, v) = gw
        .api_as(key, Method::GET, &format!("/v1/sandboxes{query}"), None)
        .await;
    assert_eq!(status, StatusCode::OK, "{query}: {v}");
    v["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_owned())
        .collect()
}

/// The `invalid_argument` message of a 422.
fn invalid(status: StatusCode, v: &Value) -> String {
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert_eq!(v["error"]["code"], "invalid_argument", "{v}");
    v["error"]["message"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn a_live_name_conflicts_or_is_reused_and_is_free_once_deleted() {
    let gw = TestGateway::start().await;
    let key = gw.admin_key.clone();
    let (status, first) = create(&gw, &key, upstream(json!({"name": "job-42"}))).await;
    assert_eq!(status, StatusCode::CREATED, "{first}");
    assert_eq!(first["name"], "job-42");
    assert_eq!(first["tags"], json!({}));
    let id = first["id"].as_str().unwrap().to_owned();

    // Again: 409 naming the sandbox that has the name.
    let (status, v) = create(&gw, &key, upstream(json!({"name": "job-42"}))).await;
    assert_eq!(status, StatusCode::CONFLICT, "{v}");
    assert_eq!(v["error"]["code"], "conflict");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(
        message.contains(&id) && message.contains("reuse"),
        "{message}"
    );

    // With reuse: 200 and the existing sandbox, exactly as GET shows it.
    let (status, reused) = create(
        &gw,
        &key,
        upstream(json!({"name": "job-42", "reuse": true, "ports": [10, 11]})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{reused}");
    let (_, got) = gw
        .api(Method::GET, &format!("/v1/sandboxes/{id}"), None)
        .await;
    assert_eq!(reused, got);
    assert_eq!(listed(&gw, &key, "").await, std::slice::from_ref(&id));

    // Once it ended, the name is free; the ended sandbox keeps it.
    let (status, _) = gw
        .api(Method::DELETE, &format!("/v1/sandboxes/{id}"), None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, second) = create(
        &gw,
        &key,
        upstream(json!({"name": "job-42", "reuse": true})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{second}");
    let second_id = second["id"].as_str().unwrap().to_owned();
    assert_ne!(second_id, id);
    assert_eq!(
        listed(&gw, &key, "?name=job-42").await,
        [id.clone(), second_id.clone()]
    );
    let (_, old) = gw
        .api(Method::GET, &format!("/v1/sandboxes/{id}"), None)
        .await;
    assert_eq!(
        (&old["status"], &old["name"]),
        (&json!("stopped"), &json!("job-42"))
    );
}

#[tokio::test]
async fn one_name_under_two_owners_is_two_sandboxes_and_each_sees_its_own() {
    let gw = TestGateway::start().await;
    let (_, a) = create_credential(&gw, json!({"name": "a", "scopes": SCOPES})).await;
    let (_, b) = create_credential(&gw, json!({"name": "b", "scopes": SCOPES})).await;
    let (status, sa) = create(&gw, &a, upstream(json!({"name": "web"}))).await;
    assert_eq!(status, StatusCode::CREATED, "{sa}");
    let (status, sb) = create(&gw, &b, upstream(json!({"name": "web"}))).await;
    assert_eq!(status, StatusCode::CREATED, "{sb}");
    assert_ne!(sa["id"], sb["id"]);

    // Reuse finds the caller's own, never the other owner's.
    let (status, again) = create(&gw, &b, upstream(json!({"name": "web", "reuse": true}))).await;
    assert_eq!(status, StatusCode::OK, "{again}");
    assert_eq!(again["id"], sb["id"]);
    assert_eq!(
        listed(&gw, &a, "?name=web").await,
        [sa["id"].as_str().unwrap()]
    );
    assert_eq!(
        listed(&gw, &b, "?name=web").await,
        [sb["id"].as_str().unwrap()]
    );
    // An admin sees both.
    assert_eq!(listed(&gw, &gw.admin_key, "?name=web").await.len(), 2);
}

#[tokio::test]
async fn concurrent_creates_with_one_name_have_one_winner() {
    let gw = TestGateway::start().await;
    let key = gw.admin_key.clone();
    for round in 0..3 {
        let name = format!("race-{round}");
        let attempts = (0..2).map(|_| create(&gw, &key, upstream(json!({"name": name}))));
        let results = futures_util::future::join_all(attempts).await;
        let mut statuses: Vec<u16> = results.iter().map(|(s, _)| s.as_u16()).collect();
        statuses.sort_unstable();
        assert_eq!(statuses, [201, 409], "round {round}: {results:?}");
        let winner = results
            .iter()
            .find(|(s, _)| *s == StatusCode::CREATED)
            .map(|(_, v)| v["id"].as_str().unwrap().to_owned())
            .unwrap();
        let (_, loser) = results
            .iter()
            .find(|(s, _)| *s == StatusCode::CONFLICT)
            .unwrap();
        let message = loser["error"]["message"].as_str().unwrap();
        assert!(
            message.contains(&winner),
            "the 409 names the winner: {message}"
        );
        assert_eq!(listed(&gw, &key, &format!("?name={name}")).await, [winner]);
    }
    // Many at once, with reuse: one creates, every other gets that same sandbox.
    let attempts =
        (0..8).map(|_| create(&gw, &key, upstream(json!({"name": "herd", "reuse": true}))));
    let results = futures_util::future::join_all(attempts).await;
    let created: Vec<&Value> = results
        .iter()
        .filter(|(s, _)| *s == StatusCode::CREATED)
        .map(|(_, v)| v)
        .collect();
    assert_eq!(created.len(), 1, "{results:?}");
    for (status, v) in &results {
        assert!(matches!(status.as_u16(), 200 | 201), "{v}");
        assert_eq!(v["id"], created[0]["id"]);
    }
}

#[tokio::test]
async fn a_command_sandbox_frees_its_name_when_it_ends() {
    let gw =
        TestGateway::start_with("[orchestrator]\nisolation = \"none\"\ngrace_secs = 1\n").await;
    let key = gw.admin_key.clone();
    let body =
        json!({"command": ["sh", "-c", "sleep 1; exit 3"], "ports": [8000], "name": "build"});
    let (status, first) = create(&gw, &key, body.clone()).await;
    assert_eq!(status, StatusCode::CREATED, "{first}");
    let id = first["id"].as_str().unwrap().to_owned();

    // While it lives, the name is taken, and a second create starts no second process.
    let (status, v) = create(&gw, &key, body.clone()).await;
    assert_eq!(status, StatusCode::CONFLICT, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains(&id), "{v}");

    let ended = wait_for_status(&gw, &id, &["failed", "stopped"], Duration::from_secs(20)).await;
    assert_eq!(ended["name"], "build");
    let (status, second) = create(&gw, &key, body).await;
    assert_eq!(status, StatusCode::CREATED, "{second}");
    assert_ne!(second["id"], first["id"]);
    assert_eq!(listed(&gw, &key, "?name=build").await.len(), 2);
    let second_id = second["id"].as_str().unwrap();
    let (status, _) = gw
        .api(Method::DELETE, &format!("/v1/sandboxes/{second_id}"), None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
}

#[tokio::test]
async fn tags_filter_the_list_and_patch_replaces_them() {
    let gw = TestGateway::start().await;
    let (_, a) = create_credential(&gw, json!({"name": "a", "scopes": SCOPES})).await;
    let (_, b) = create_credential(&gw, json!({"name": "b", "scopes": SCOPES})).await;
    let mut ids = Vec::new();
    for tags in [
        json!({"env": "prod", "team": "ml"}),
        json!({"env": "prod", "team": "web"}),
        json!({"env": "dev", "app.example/x_y-z": "a=b c&d"}),
    ] {
        let (status, v) = create(&gw, &a, upstream(json!({"tags": tags}))).await;
        assert_eq!(status, StatusCode::CREATED, "{v}");
        assert_eq!(v["tags"], tags);
        ids.push(v["id"].as_str().unwrap().to_owned());
    }
    let (status, other) = create(&gw, &b, upstream(json!({"tags": {"env": "prod"}}))).await;
    assert_eq!(status, StatusCode::CREATED, "{other}");

    assert_eq!(listed(&gw, &a, "?tag=env=prod").await, ids[..2]);
    // Repeated: every one must match.
    assert_eq!(listed(&gw, &a, "?tag=env=prod&tag=team=ml").await, ids[..1]);
    assert!(listed(&gw, &a, "?tag=env=prod&tag=team=none")
        .await
        .is_empty());
    // Values are matched exactly, after URL decoding.
    assert_eq!(
        listed(&gw, &a, "?tag=app.example%2Fx_y-z=a%3Db%20c%26d").await,
        ids[2..]
    );
    assert!(listed(&gw, &a, "?tag=env=pro").await.is_empty());
    // The other owner's prod sandbox is in neither list of the other.
    assert_eq!(
        listed(&gw, &b, "?tag=env=prod").await,
        [other["id"].as_str().unwrap()]
    );

    // PATCH replaces the whole set.
    let path = format!("/v1/sandboxes/{}", ids[0]);
    let (status, v) = gw
        .api_as(
            &a,
            Method::PATCH,
            &path,
            Some(json!({"tags": {"stage": "2"}})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["tags"], json!({"stage": "2"}));
    let (_, got) = gw.api_as(&a, Method::GET, &path, None).await;
    assert_eq!(got, v);
    assert_eq!(listed(&gw, &a, "?tag=env=prod").await, ids[1..2]);
    assert_eq!(listed(&gw, &a, "?tag=stage=2").await, ids[..1]);

    // Another owner's sandbox is not found, and keeps its tags.
    let (status, v) = gw
        .api_as(&b, Method::PATCH, &path, Some(json!({"tags": {}})))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{v}");
    assert_eq!(
        gw.api_as(&a, Method::GET, &path, None).await.1["tags"],
        json!({"stage": "2"})
    );
    let (status, _) = gw
        .api_as(
            &a,
            Method::PATCH,
            "/v1/sandboxes/sbxnosuchsandbox0000",
            Some(json!({"tags": {}})),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Only `tags` may be patched; a read-only credential may not patch at all.
    let (status, v) = gw
        .api_as(
            &a,
            Method::PATCH,
            &path,
            Some(json!({"tags": {}, "name": "x"})),
        )
        .await;
    let msg = invalid(status, &v);
    assert!(
        msg.contains("unknown field") && msg.contains("tags"),
        "{msg}"
    );
    let (status, v) = gw.api_as(&a, Method::PATCH, &path, Some(json!({}))).await;
    assert!(invalid(status, &v).contains("tags"));
    let (_, reader) =
        create_credential(&gw, json!({"name": "r", "scopes": ["sandboxes:read"]})).await;
    let (status, _) = gw
        .api_as(&reader, Method::PATCH, &path, Some(json!({"tags": {}})))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    // An ended sandbox may still be relabelled.
    gw.api_as(&a, Method::DELETE, &path, None).await;
    let (status, v) = gw
        .api_as(
            &a,
            Method::PATCH,
            &path,
            Some(json!({"tags": {"done": "yes"}})),
        )
        .await;
    assert_eq!(
        (status, &v["tags"]),
        (StatusCode::OK, &json!({"done": "yes"}))
    );
}

#[tokio::test]
async fn bad_names_tags_and_filters_are_refused_naming_the_field() {
    let gw = TestGateway::start().await;
    let key = gw.admin_key.clone();
    let long = "a".repeat(64);
    for name in [
        json!(""),
        json!("Web"),
        json!("a_b"),
        json!("a.b"),
        json!(long),
        json!("ü"),
        json!(7),
    ] {
        let (status, v) = create(&gw, &key, upstream(json!({"name": name}))).await;
        assert!(invalid(status, &v).contains("name"), "{name}: {v}");
    }
    let ok = "a".repeat(63);
    let (status, v) = create(&gw, &key, upstream(json!({"name": ok}))).await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    let (status, v) = create(&gw, &key, upstream(json!({"reuse": true}))).await;
    assert!(invalid(status, &v).contains("name"), "{v}");

    let too_many: serde_json::Map<String, Value> =
        (0..33).map(|i| (format!("k{i}"), json!("v"))).collect();
    let (status, v) = create(&gw, &key, upstream(json!({"tags": too_many}))).await;
    assert!(invalid(status, &v).contains("tags"), "{v}");
    for tags in [
        json!({"": "v"}),
        json!({"has space": "v"}),
        json!({"ünï": "v"}),
        json!({ "k".repeat(64): "v" }),
    ] {
        let (status, v) = create(&gw, &key, upstream(json!({"tags": tags}))).await;
        let msg = invalid(status, &v);
        assert!(msg.contains("tags keys"), "{tags}: {msg}");
    }
    let (status, v) = create(
        &gw,
        &key,
        upstream(json!({"tags": {"big": "v".repeat(257)}})),
    )
    .await;
    assert!(invalid(status, &v).contains("tags.big"), "{v}");
    let (status, v) = create(&gw, &key, upstream(json!({"tags": {"n": null}}))).await;
    assert!(invalid(status, &v).contains("tags"), "{v}");
    let (status, v) = create(&gw, &key, upstream(json!({"tags": ["a"]}))).await;
    assert!(invalid(status, &v).contains("tags"), "{v}");
    let at_limit: serde_json::Map<String, Value> = (0..32)
        .map(|i| (format!("k{i}"), json!("ü".repeat(256))))
        .collect();
    let (status, v) = create(&gw, &key, upstream(json!({"tags": at_limit}))).await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    let path = format!("/v1/sandboxes/{}", v["id"].as_str().unwrap());
    let (status, v) = gw
        .api(
            Method::PATCH,
            &path,
            Some(json!({"tags": {"bad key": "v"}})),
        )
        .await;
    assert!(invalid(status, &v).contains("tags"), "{v}");

    for (query, field) in [
        ("?name=", "name"),
        ("?name=Bad", "name"),
        ("?name=a&name=b", "name"),
        ("?tag=env", "tag"),
        ("?tag==v", "tag"),
        ("?tag=bad%20key=v", "tag"),
        ("?tag=k=", ""),
        ("?tags=env=prod", "name=N and tag=key=value"),
        ("?owner=cred_x", "name=N and tag=key=value"),
    ] {
        let (status, v) = gw
            .api(Method::GET, &format!("/v1/sandboxes{query}"), None)
            .await;
        if field.is_empty() {
            // An empty value is a value: nothing has it here.
            assert_eq!(status, StatusCode::OK, "{query}: {v}");
            continue;
        }
        assert!(invalid(status, &v).contains(field), "{query}: {v}");
    }
    let big = format!("?tag=k={}", "v".repeat(257));
    let (status, v) = gw
        .api(Method::GET, &format!("/v1/sandboxes{big}"), None)
        .await;
    assert!(invalid(status, &v).contains("tag.k"), "{v}");
}
