//! The upstream policy (SSRF): registering an `upstream` sandbox needs `upstreams:write`; no
//! one may aim one at link-local, multicast, unspecified or broadcast addresses or at the
//! gateway's own listeners; `[gateway] upstream_allow` narrows the rest; and a host name is held
//! to the same rules at every connect, not only when it was registered.
//!
//! Traffic goes to loopback only: refused non-loopback addresses are only ever *registered*.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use futures_util::{SinkExt, StreamExt};
use http::{Method, StatusCode};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::{self, Message};

async fn register(
    gw: &TestGateway,
    key: &str,
    upstream: &str,
    ports: &[u16],
) -> (StatusCode, Value) {
    gw.api_as(
        key,
        Method::POST,
        "/v1/sandboxes",
        Some(json!({"upstream": upstream, "ports": ports})),
    )
    .await
}

/// How many sandboxes the admin sees.
async fn sandbox_count(gw: &TestGateway) -> usize {
    let (_, list) = gw.api(Method::GET, "/v1/sandboxes", None).await;
    list["items"].as_array().unwrap().len()
}

#[tokio::test]
async fn registering_an_upstream_needs_the_upstreams_write_scope() {
    let gw = TestGateway::start().await;
    let admin = gw.admin_key.clone();
    let (_, write_only) =
        create_credential(&gw, json!({"name": "w", "scopes": ["sandboxes:write"]})).await;
    let (_, upstreams_only) =
        create_credential(&gw, json!({"name": "u", "scopes": ["upstreams:write"]})).await;
    let (_, both) = create_credential(
        &gw,
        json!({"name": "wu", "scopes": ["sandboxes:write", "upstreams:write"]}),
    )
    .await;

    for (key, missing) in [
        (&write_only, "upstreams:write"),
        (&upstreams_only, "sandboxes:write"),
    ] {
        for upstream in ["127.0.0.1", "localhost", "10.0.3.7"] {
            let (status, v) = register(&gw, key, upstream, &[9]).await;
            assert_eq!(status, StatusCode::FORBIDDEN, "{upstream}: {v}");
            assert_eq!(v["error"]["code"], "forbidden", "{v}");
            let msg = v["error"]["message"].as_str().unwrap();
            assert!(msg.contains(missing), "{msg}");
        }
        // The scope is checked before the policy: a refused address is no oracle for it.
        let (status, _) = register(&gw, key, "169.254.169.254", &[80]).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
    }
    assert_eq!(
        sandbox_count(&gw).await,
        0,
        "a refused call created a sandbox"
    );

    for key in [&both, &admin] {
        let (status, v) = register(&gw, key, "127.0.0.1", &[9]).await;
        assert_eq!(status, StatusCode::CREATED, "{v}");
        assert_eq!(v["upstream"], "127.0.0.1");
    }
    // The new scope is listed like any other.
    let (_, list) = gw.api(Method::GET, "/v1/credentials", None).await;
    assert!(list["items"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["scopes"] == json!(["sandboxes:write", "upstreams:write"])));
}

#[tokio::test]
async fn every_refused_address_class_is_422_naming_the_address_and_upstream_allow() {
    let gw = TestGateway::start().await;
    let admin = gw.admin_key.clone();
    let echo = Echo::start().await;
    let (tls_port, telemetry_port) = (gw.addr.port(), gw.telemetry.port());
    let cases: Vec<(&str, Vec<u16>, &str)> = vec![
        ("169.254.169.254", vec![80], "169.254.169.254"),
        ("fe80::1", vec![80], "fe80::1"),
        ("224.0.0.1", vec![80], "224.0.0.1"),
        ("ff02::1", vec![80], "ff02::1"),
        ("0.0.0.0", vec![80], "0.0.0.0"),
        ("::", vec![80], "`::`"),
        ("255.255.255.255", vec![80], "255.255.255.255"),
        ("::ffff:169.254.169.254", vec![80], "::ffff:169.254.169.254"),
        // The gateway's own listeners, on any published port of the sandbox.
        ("127.0.0.1", vec![tls_port], "127.0.0.1"),
        ("127.0.0.1", vec![echo.port(), telemetry_port], "127.0.0.1"),
        ("::ffff:127.0.0.1", vec![telemetry_port], "127.0.0.1"),
        // A name is held to the rules by what it resolves to now (from /etc/hosts).
        ("localhost", vec![telemetry_port], "127.0.0.1"),
    ];
    for (upstream, ports, named) in &cases {
        let (status, v) = register(&gw, &admin, upstream, ports).await;
        assert_eq!(
            status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{upstream} {ports:?}: {v}"
        );
        assert_eq!(v["error"]["code"], "invalid_argument", "{v}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains(named), "{upstream}: {msg}");
        assert!(msg.contains("upstream_allow"), "{upstream}: {msg}");
    }
    let own = register(&gw, &admin, "127.0.0.1", &[tls_port]).await.1;
    let msg = own["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains(&format!("127.0.0.1:{tls_port}")) && msg.contains("TLS"),
        "{msg}"
    );
    let own = register(&gw, &admin, "127.0.0.1", &[telemetry_port])
        .await
        .1;
    let msg = own["error"]["message"].as_str().unwrap();
    assert!(msg.contains("telemetry"), "{msg}");
    assert_eq!(
        sandbox_count(&gw).await,
        0,
        "a refused upstream was registered"
    );

    // Loopback on another port, and other ordinary addresses, are fine by default.
    for upstream in ["127.0.0.1", "::1", "localhost", "10.1.2.3"] {
        let (status, v) = register(&gw, &admin, upstream, &[echo.port()]).await;
        assert_eq!(status, StatusCode::CREATED, "{upstream}: {v}");
    }
}

#[tokio::test]
async fn upstream_allow_narrows_registration() {
    let gw = TestGateway::start_with_gateway("upstream_allow = [\"10.0.0.0/8\"]", "").await;
    let admin = gw.admin_key.clone();
    for (upstream, named) in [
        ("127.0.0.1", "127.0.0.1"),
        ("::1", "::1"),
        ("localhost", "127.0.0.1"),
        ("192.168.1.1", "192.168.1.1"),
        ("::ffff:127.0.0.1", "::ffff:127.0.0.1"),
    ] {
        let (status, v) = register(&gw, &admin, upstream, &[8000]).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{upstream}: {v}");
        let msg = v["error"]["message"].as_str().unwrap();
        // (`localhost` may resolve to ::1 first on another machine.)
        let names = msg.contains(named) || (upstream == "localhost" && msg.contains("`::1`"));
        assert!(msg.contains("upstream_allow") && names, "{msg}");
    }
    // The fixed rules still hold inside the allowed networks' reach: named as what they are.
    let (status, v) = register(&gw, &admin, "169.254.169.254", &[80]).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("link-local"),
        "{v}"
    );
    assert_eq!(sandbox_count(&gw).await, 0);

    // Inside the list: accepted (registration only; nothing is sent there).
    for upstream in ["10.1.2.3", "::ffff:10.1.2.4"] {
        let (status, v) = register(&gw, &admin, upstream, &[8000]).await;
        assert_eq!(status, StatusCode::CREATED, "{upstream}: {v}");
    }
}

/// Opens a WebSocket to the sandbox; `Err(status)` when the gateway answered without upgrading.
async fn open_ws(gw: &TestGateway, id: &str, port: u16, token: &str) -> Result<(), StatusCode> {
    let host = sandbox_host(port, id);
    match websocket(&gw.tls(), &host, "/ws", &[("x-sandgate-token", token)]).await {
        Ok((mut ws, _)) => {
            ws.send(Message::text("ping")).await.unwrap();
            assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("ping"));
            Ok(())
        }
        Err(tungstenite::Error::Http(resp)) => Err(resp.status()),
        Err(e) => panic!("websocket: {e}"),
    }
}

#[tokio::test]
async fn addresses_are_checked_again_at_every_connect() {
    // A host name that passed at registration and now resolves to an address the policy
    // refuses must be refused when the proxy connects. The address `localhost` resolves to
    // cannot be changed here, so the policy changes instead: registered under a gateway that
    // allows loopback, served by one (same data dir) whose `upstream_allow` leaves it out.
    // Nothing but the connect-time check stands between the proxy and the echo server then.
    let echo = Echo::start().await;
    let port = echo.port();
    let tmp = tempfile::tempdir().unwrap();
    let gw = TestGateway::start_in_with_gateway(tmp.path(), "").await;
    let by_name = gw
        .create_sandbox_with(json!({"upstream": "localhost", "ports": [port]}))
        .await;
    let by_ip = gw.create_sandbox(&[port]).await;
    let name_token = gw.token(&by_name, port).await;
    let ip_token = gw.token(&by_ip, port).await;
    for (id, token) in [(&by_name, &name_token), (&by_ip, &ip_token)] {
        let resp = gw
            .tls()
            .get(
                &sandbox_host(port, id),
                "/before",
                &[("x-sandgate-token", token)],
            )
            .await;
        assert_eq!(resp.status(), StatusCode::OK, "{id}");
    }
    assert_eq!(open_ws(&gw, &by_name, port, &name_token).await, Ok(()));
    let seen = echo.count();
    assert_eq!(seen, 3);
    let _ = gw.stop().await;

    let gw =
        TestGateway::start_in_with_gateway(tmp.path(), "upstream_allow = [\"10.0.0.0/8\"]").await;
    for (id, token) in [(&by_name, &name_token), (&by_ip, &ip_token)] {
        let resp = gw
            .tls()
            .get(
                &sandbox_host(port, id),
                "/after",
                &[("x-sandgate-token", token)],
            )
            .await;
        assert_eq!(resp.status(), StatusCode::BAD_GATEWAY, "{id}");
        let v = json_body(&resp);
        assert_eq!(v["error"]["code"], "upstream_unreachable", "{v}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(
            msg.contains("upstream policy") && msg.contains("upstream_allow"),
            "{msg}"
        );
        // The internal address is for the log, not for whoever holds the link.
        assert!(!msg.contains("127.0.0.1"), "{msg}");
    }
    // The WebSocket path dials its own connection: held to the same rules.
    assert_eq!(
        open_ws(&gw, &by_name, port, &name_token).await,
        Err(StatusCode::BAD_GATEWAY)
    );
    assert_eq!(
        open_ws(&gw, &by_ip, port, &ip_token).await,
        Err(StatusCode::BAD_GATEWAY)
    );
    assert_eq!(echo.count(), seen, "a refused upstream was connected to");
    let _ = gw.stop().await;
}

#[tokio::test]
async fn process_sandboxes_need_no_upstream_scope_and_are_not_policed() {
    // `command` sandboxes are reached at 127.0.0.1 host ports the orchestrator chose, so
    // neither the scope nor `upstream_allow` applies to them: under an allow list that leaves
    // loopback out, one is still created by a `sandboxes:write` credential and served.
    let gw = TestGateway::start_with_gateway(
        "upstream_allow = [\"10.0.0.0/8\"]",
        "[orchestrator]\nport_range = \"31570-31579\"\ngrace_secs = 2\n",
    )
    .await;
    let (_, write_only) = create_credential(
        &gw,
        json!({"name": "w", "scopes": ["sandboxes:write", "tokens:issue"]}),
    )
    .await;
    let (status, v) = gw
        .api_as(
            &write_only,
            Method::POST,
            "/v1/sandboxes",
            Some(json!({
                "command": ["sh", "-c", "exec python3 -m http.server $PORT --bind 127.0.0.1"],
                "ports": [8000],
            })),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    let v = wait_for_status(
        &gw,
        &id,
        &["running", "failed"],
        std::time::Duration::from_secs(15),
    )
    .await;
    assert_eq!(v["status"], "running", "{v}");
    let token = gw.token(&id, 8000).await;
    let host = sandbox_host(8000, &id);
    let mut status = StatusCode::BAD_GATEWAY;
    // The server inside may take a moment to listen after the process starts.
    for _ in 0..50 {
        status = gw
            .tls()
            .get(&host, "/", &[("x-sandgate-token", &token)])
            .await
            .status();
        if status == StatusCode::OK {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(status, StatusCode::OK, "the process sandbox was policed");
    let (status, _) = gw
        .api(Method::DELETE, &format!("/v1/sandboxes/{id}"), None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    wait_processes_gone(&id, None, std::time::Duration::from_secs(10)).await;
}
