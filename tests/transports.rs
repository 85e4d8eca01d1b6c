//! Each token transport admits; the upstream never sees our token and does see identity headers.
// Tests (and their helpers) may unwrap: a failure is the test failing.
#![allow(clippy::unwrap_used)]

mod common;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use bytes::Bytes;
use common::*;
use futures_util::{SinkExt, StreamExt};
use http::{Method, Request, StatusCode};
use http_body_util::Full;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

/// A token-shaped value (`typ: connect+jwt`, three segments) that no key signed.
fn forged_sandgate_shaped() -> String {
    let header = URL_SAFE_NO_PAD.encode(r#"{"alg":"EdDSA","typ":"connect+jwt","kid":"nope"}"#);
    let payload = URL_SAFE_NO_PAD.encode(r#"{"sbx":"x","port":1}"#);
    format!("{header}.{payload}.{}", URL_SAFE_NO_PAD.encode([7u8; 64]))
}

/// An ordinary JWT of the app's own (`typ: JWT`): not ours, so it passes through.
fn app_jwt() -> String {
    let header = URL_SAFE_NO_PAD.encode(r#"{"alg":"HS256","typ":"JWT"}"#);
    let payload = URL_SAFE_NO_PAD.encode(r#"{"sub":"app-user"}"#);
    format!("{header}.{payload}.c2lnbmF0dXJl")
}

/// The signature segment: present in every copy of the token, whatever wraps it.
fn signature(token: &str) -> &str {
    token.rsplit('.').next().unwrap()
}

#[tokio::test]
async fn header_transport_admits_and_strips() {
    let echo = Echo::start().await;
    let gw = TestGateway::start().await;
    let id = gw.create_sandbox(&[echo.port()]).await;
    let minted = gw
        .mint(&id, echo.port(), json!({"user_metadata": {"user": "ada"}}))
        .await;
    let token = minted["token"].as_str().unwrap();
    let host = sandbox_host(echo.port(), &id);

    let resp = gw
        .tls()
        .get(
            &host,
            "/hello?x=1",
            &[
                ("x-sandgate-token", token),
                ("x-sandgate-subject", "forged"),
                ("x-forwarded-for", "6.6.6.6"),
            ],
        )
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let seen = echo.last();
    assert_eq!(seen.uri, "/hello?x=1");
    assert!(seen.headers.get("x-sandgate-token").is_none());
    assert_eq!(
        seen.headers["x-sandgate-token-id"],
        minted["jti"].as_str().unwrap()
    );
    assert!(seen.headers["x-sandgate-subject"]
        .to_str()
        .unwrap()
        .starts_with("cred_"));
    assert_eq!(
        seen.headers["x-sandgate-user-metadata"],
        r#"{"user":"ada"}"#
    );
    assert_eq!(seen.headers["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen.headers["x-forwarded-proto"], "https");
    assert_eq!(seen.headers["host"], host.as_str());
}

#[tokio::test]
async fn every_transport_admits_and_the_upstream_never_sees_the_token() {
    let echo = Echo::start().await;
    let gw = TestGateway::start().await;
    let port = echo.port();
    let id = gw.create_sandbox(&[port]).await;
    let host = sandbox_host(port, &id);
    let tls = gw.tls();
    let mut tokens = Vec::new();
    let mut expect_seen = 0;

    // 1. X-Sandgate-Token.
    let t = gw.token(&id, port).await;
    let resp = tls.get(&host, "/h", &[("x-sandgate-token", &t)]).await;
    assert_eq!(resp.status(), StatusCode::OK, "header");
    expect_seen += 1;
    tokens.push(t);

    // 2. Authorization: Bearer <ours>.
    let t = gw.token(&id, port).await;
    let bearer = format!("Bearer {t}");
    let resp = tls.get(&host, "/b", &[("authorization", &bearer)]).await;
    assert_eq!(resp.status(), StatusCode::OK, "bearer");
    expect_seen += 1;
    assert!(
        echo.last().headers.get("authorization").is_none(),
        "our Bearer is removed"
    );
    tokens.push(t);

    // 3a. Sec-WebSocket-Protocol on a plain GET still counts as a transport.
    let t = gw.token(&id, port).await;
    let proto = format!("sandgate.token.{t}");
    let resp = tls
        .get(&host, "/p", &[("sec-websocket-protocol", &proto)])
        .await;
    assert_eq!(resp.status(), StatusCode::OK, "subprotocol on a GET");
    expect_seen += 1;
    assert!(echo.last().headers.get("sec-websocket-protocol").is_none());
    tokens.push(t);

    // 3b. The same on a real WebSocket, with the browser's `sandgate` marker: the gateway's 101
    // selects `sandgate`, since the upstream selected nothing.
    let t = gw.token(&id, port).await;
    let protos = format!("sandgate.token.{t}, sandgate");
    let (mut ws, resp) = websocket(&tls, &host, "/ws", &[("sec-websocket-protocol", &protos)])
        .await
        .expect("websocket with a subprotocol token");
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    assert_eq!(resp.headers()["sec-websocket-protocol"], "sandgate");
    ws.send(Message::text("ping")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("ping"));
    expect_seen += 1;
    assert!(echo.last().headers.get("sec-websocket-protocol").is_none());
    drop(ws);

    // 3c. The app's own subprotocol survives, and is what gets selected.
    let protos = format!("sandgate.token.{t}, chat");
    let (ws, resp) = websocket(&tls, &host, "/ws", &[("sec-websocket-protocol", &protos)])
        .await
        .expect("websocket with the app's subprotocol");
    assert_eq!(resp.headers()["sec-websocket-protocol"], "chat");
    expect_seen += 1;
    assert_eq!(echo.last().headers["sec-websocket-protocol"], "chat");
    drop(ws);
    tokens.push(t);

    // 4. The query parameter: exchanged for a cookie, never forwarded.
    let t = gw.token(&id, port).await;
    let resp = tls
        .get(&host, &format!("/q?keep=1&_sandgate_token={t}"), &[])
        .await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER, "query exchange");
    let cookie = session_cookie(&resp);
    tokens.push(t);

    // 5. The cookie, among the app's own cookies which pass through as sent.
    let cookie_header = format!("app=1; __Host-sandgate={cookie}; other=2");
    let resp = tls
        .get(&host, "/c?keep=1", &[("cookie", &cookie_header)])
        .await;
    assert_eq!(resp.status(), StatusCode::OK, "cookie");
    expect_seen += 1;
    assert_eq!(echo.last().headers["cookie"], "app=1; other=2");
    assert_eq!(echo.last().uri, "/c?keep=1");
    tokens.push(cookie);

    // 6. HTTP/2, by header and by Bearer.
    let t = gw.token(&id, port).await;
    let resp = h2_get(&tls, &host, "/h2", &[("x-sandgate-token", &t)]).await;
    assert_eq!(resp.status(), StatusCode::OK, "h2 header");
    let bearer = format!("Bearer {t}");
    let resp = h2_get(&tls, &host, "/h2b", &[("authorization", &bearer)]).await;
    assert_eq!(resp.status(), StatusCode::OK, "h2 bearer");
    expect_seen += 2;
    tokens.push(t);

    // 7. Header routing on the base domain, by header, with our cookie and query parameter
    // also present: neither reaches the upstream.
    let t = gw.token(&id, port).await;
    let port_s = port.to_string();
    let cookie_header = format!("app=1; __Host-sandgate={t}");
    let resp = tls
        .get(
            BASE,
            &format!("/r?a=1&_sandgate_token={t}"),
            &[
                ("x-sandgate-sandbox", &id),
                ("x-sandgate-port", &port_s),
                ("x-sandgate-token", &t),
                ("cookie", &cookie_header),
            ],
        )
        .await;
    assert_eq!(resp.status(), StatusCode::OK, "header routing");
    expect_seen += 1;
    assert_eq!(echo.last().uri, "/r?a=1");
    tokens.push(t);

    assert_eq!(echo.count(), expect_seen);
    for t in &tokens {
        assert_upstream_never_saw(&echo, t);
        assert_upstream_never_saw(&echo, signature(t));
    }
}

#[tokio::test]
async fn the_apps_own_authorization_passes_through_untouched() {
    let echo = Echo::start().await;
    let gw = TestGateway::start().await;
    let port = echo.port();
    let id = gw.create_sandbox(&[port]).await;
    let host = sandbox_host(port, &id);
    let tls = gw.tls();
    let t = gw.token(&id, port).await;

    let basic = "Basic YWxhZGRpbjpvcGVuc2VzYW1l";
    let resp = tls
        .get(
            &host,
            "/",
            &[("x-sandgate-token", &t), ("authorization", basic)],
        )
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(echo.last().headers["authorization"], basic);

    let app_bearer = format!("Bearer {}", app_jwt());
    let resp = tls
        .get(
            &host,
            "/",
            &[("x-sandgate-token", &t), ("authorization", &app_bearer)],
        )
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        echo.last().headers["authorization"],
        app_bearer.as_str(),
        "a Bearer that is not ours belongs to the app"
    );

    // An opaque Bearer of the app's, without our header: not ours, so not a token at all.
    let resp = tls
        .get(&host, "/", &[("authorization", "Bearer opaque-app-key")])
        .await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(error_code(&resp), "token_missing");

    // A Bearer that is ours is removed, even when the header token is the one that decides.
    let ours = format!("Bearer {t}");
    let resp = tls
        .get(
            &host,
            "/",
            &[("x-sandgate-token", &t), ("authorization", &ours)],
        )
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(echo.last().headers.get("authorization").is_none());

    // Both ours and the app's: only the app's reaches the upstream.
    let mut req = Request::builder()
        .uri("/both")
        .header("host", &host)
        .header("authorization", &ours)
        .header("authorization", basic);
    req = req.header("accept", "application/json");
    let resp = tls
        .send(req.body(Full::new(Bytes::new())).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let seen = echo.last();
    let auths: Vec<_> = seen.headers.get_all("authorization").iter().collect();
    assert_eq!(auths, [basic]);
    assert_upstream_never_saw(&echo, &t);
}

#[tokio::test]
async fn the_first_present_transport_decides() {
    let echo = Echo::start().await;
    let gw = TestGateway::start().await;
    let port = echo.port();
    let id = gw.create_sandbox(&[port]).await;
    let host = sandbox_host(port, &id);
    let tls = gw.tls();
    let t = gw.token(&id, port).await;
    let forged = forged_sandgate_shaped();
    let forged_bearer = format!("Bearer {forged}");

    // A valid header token wins over a garbage sandgate-shaped Bearer, which is still removed.
    let resp = tls
        .get(
            &host,
            "/",
            &[("x-sandgate-token", &t), ("authorization", &forged_bearer)],
        )
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(echo.last().headers.get("authorization").is_none());
    assert_eq!(echo.count(), 1);

    // An invalid header token is not rescued by a valid cookie, Bearer or query parameter.
    let cookie = browser_session(&gw, &id, port).await;
    let cookie_header = format!("__Host-sandgate={cookie}");
    let good_bearer = format!("Bearer {t}");
    for extra in [
        ("cookie", cookie_header.as_str()),
        ("authorization", good_bearer.as_str()),
    ] {
        let resp = tls
            .get(&host, "/", &[("x-sandgate-token", "not-a-token"), extra])
            .await;
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{extra:?}");
        assert_eq!(error_code(&resp), "token_invalid");
    }
    let resp = tls
        .get(
            &host,
            &format!("/?_sandgate_token={t}"),
            &[("x-sandgate-token", "not-a-token")],
        )
        .await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);

    // A bad sandgate-shaped Bearer is ours and refused: the cookie behind it is not consulted.
    let resp = tls
        .get(
            &host,
            "/",
            &[
                ("authorization", &forged_bearer),
                ("cookie", &cookie_header),
            ],
        )
        .await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(error_code(&resp), "token_invalid");

    // A bad subprotocol token is refused even with a good cookie.
    let resp = tls
        .get(
            &host,
            "/",
            &[
                ("sec-websocket-protocol", "sandgate.token.garbage"),
                ("cookie", &cookie_header),
            ],
        )
        .await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);

    assert_eq!(echo.count(), 1, "no refused request reached the upstream");
}

#[tokio::test]
async fn client_identity_and_forwarding_headers_never_reach_the_upstream() {
    let echo = Echo::start().await;
    let gw = TestGateway::start().await;
    let port = echo.port();
    let id = gw.create_sandbox(&[port]).await;
    let host = sandbox_host(port, &id);
    let minted = gw
        .mint(&id, port, json!({"user_metadata": {"team": "blue"}}))
        .await;
    let t = minted["token"].as_str().unwrap();
    let claims = gw.gw.tokens.verify(t, sandgate::unix_now()).unwrap();

    let forged: &[(&str, &str)] = &[
        ("x-sandgate-subject", "forged"),
        ("X_Sandgate_Subject", "forged"),
        ("x-sandgate-token-id", "forged"),
        ("x_sandgate_token_id", "forged"),
        ("x-sandgate-user-metadata", r#"{"admin":true}"#),
        ("X_SANDGATE_USER_METADATA", r#"{"admin":true}"#),
        ("x-sandgate-sandbox", "forged"),
        ("x-sandgate-anything", "forged"),
        ("x-forwarded-for", "6.6.6.6"),
        ("X_Forwarded_For", "6.6.6.6"),
        ("x-forwarded-host", "evil.com"),
        ("x_forwarded_host", "evil.com"),
        ("x-forwarded-proto", "http"),
        ("x-forwarded-port", "80"),
        ("x-forwarded-prefix", "/evil"),
        ("forwarded", "for=6.6.6.6;host=evil.com;proto=http"),
        ("x-real-ip", "6.6.6.6"),
        (
            "connection",
            "x-sandgate-subject, host, x-sandgate-token-id, x-forwarded-for, x-sandgate-user-metadata",
        ),
    ];
    let mut headers = vec![("x-sandgate-token", t)];
    headers.extend_from_slice(forged);
    let resp = gw.tls().get(&host, "/id", &headers).await;
    assert_eq!(resp.status(), StatusCode::OK, "{:?}", resp.body());

    let seen = echo.last();
    let md = r#"{"team":"blue"}"#;
    let expected: &[(&str, &str)] = &[
        ("x-sandgate-subject", &claims.sub),
        ("x-sandgate-token-id", minted["jti"].as_str().unwrap()),
        ("x-sandgate-user-metadata", md),
        ("x-forwarded-for", "127.0.0.1"),
        ("x-forwarded-host", &host),
        ("x-forwarded-proto", "https"),
    ];
    for (name, value) in expected {
        let all: Vec<_> = seen.headers.get_all(*name).iter().collect();
        assert_eq!(all, [*value], "{name}");
    }
    for name in seen.headers.keys() {
        let normalized = name.as_str().replace('_', "-");
        let reserved = normalized.starts_with("x-sandgate-")
            || normalized.starts_with("x-forwarded-")
            || normalized == "forwarded"
            || normalized == "x-real-ip";
        if reserved {
            assert!(
                expected.iter().any(|(n, _)| *n == name.as_str()),
                "the upstream saw the client's {name}"
            );
        }
    }
    assert_eq!(
        seen.headers["host"],
        host.as_str(),
        "Connection cannot remove Host"
    );
    assert!(seen
        .headers
        .get("connection")
        .is_none_or(|c| c != "x-sandgate-subject"));
    assert_upstream_never_saw(&echo, "forged");
    assert_upstream_never_saw(&echo, "6.6.6.6");
    assert_upstream_never_saw(&echo, "evil.com");
}

#[tokio::test]
async fn header_routing_on_the_base_domain() {
    let echo = Echo::start().await;
    let gw = TestGateway::start().await;
    let port = echo.port();
    let port_s = port.to_string();
    let id = gw.create_sandbox(&[port]).await;
    let tls = gw.tls();
    let t = gw.token(&id, port).await;
    let route = [
        ("x-sandgate-sandbox", id.as_str()),
        ("x-sandgate-port", &port_s),
    ];

    // Header token: admitted; our query parameter is stripped, every other byte kept.
    let mut headers = route.to_vec();
    headers.push(("x-sandgate-token", &t));
    let resp = tls
        .get(BASE, "/agent/x?a=1&_sandgate_token=junk&b=%41&c", &headers)
        .await;
    assert_eq!(resp.status(), StatusCode::OK, "{:?}", resp.body());
    assert!(
        resp.headers().get("set-cookie").is_none(),
        "header routing never sets cookies"
    );
    let seen = echo.last();
    assert_eq!(seen.uri, "/agent/x?a=1&b=%41&c");
    assert_eq!(seen.headers["host"], BASE, "Host as received");
    assert_eq!(seen.headers["x-forwarded-host"], BASE);
    assert!(seen.headers.get("x-sandgate-sandbox").is_none());
    assert!(seen.headers.get("x-sandgate-port").is_none());
    assert!(seen.headers.get("x-sandgate-token").is_none());

    // Only the parameter: no `?` left behind.
    let resp = tls.get(BASE, "/only?_sandgate_token=junk", &headers).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(echo.last().uri, "/only");

    // Bearer works too.
    let bearer = format!("Bearer {t}");
    let mut headers = route.to_vec();
    headers.push(("authorization", &bearer));
    let resp = tls.get(BASE, "/bearer", &headers).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(echo.last().headers.get("authorization").is_none());
    let seen_so_far = echo.count();

    // Cookies are never read by header routing, and the query parameter is no exchange there.
    let cookie = browser_session(&gw, &id, port).await;
    let cookie_header = format!("__Host-sandgate={cookie}");
    let mut headers = route.to_vec();
    headers.push(("cookie", &cookie_header));
    let resp = tls.get(BASE, "/", &headers).await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(error_code(&resp), "token_missing");
    assert_eq!(resp.headers()["www-authenticate"], "Bearer");
    let resp = tls
        .get(BASE, &format!("/?_sandgate_token={t}"), &route)
        .await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(error_code(&resp), "token_missing");
    assert!(resp.headers().get("set-cookie").is_none());

    // Malformed routing headers are a bad request, never a route.
    let mut headers = vec![
        ("x-sandgate-sandbox", "../../admin"),
        ("x-sandgate-port", port_s.as_str()),
    ];
    headers.push(("x-sandgate-token", &t));
    let resp = tls.get(BASE, "/", &headers).await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let headers = [
        ("x-sandgate-sandbox", id.as_str()),
        ("x-sandgate-port", "0"),
        ("x-sandgate-token", &t),
    ];
    let resp = tls.get(BASE, "/", &headers).await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);

    assert_eq!(echo.count(), seen_so_far);
    assert_upstream_never_saw(&echo, signature(&t));
}

#[tokio::test]
async fn host_is_forwarded_as_received_unless_rewrite_host() {
    let echo = Echo::start().await;
    let gw = TestGateway::start().await;
    let port = echo.port();
    let tls = gw.tls();

    let id = gw.create_sandbox(&[port]).await;
    let host = sandbox_host(port, &id);
    let t = gw.token(&id, port).await;
    let with_port = format!("{host}:{}", gw.addr.port());
    let resp = tls.get(&with_port, "/", &[("x-sandgate-token", &t)]).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let seen = echo.last();
    assert_eq!(seen.headers["host"], with_port.as_str());
    assert_eq!(seen.headers["x-forwarded-host"], with_port.as_str());

    let rewritten = gw
        .create_sandbox_with(json!({
            "upstream": "127.0.0.1",
            "ports": [port],
            "rewrite_host": true,
        }))
        .await;
    let rhost = sandbox_host(port, &rewritten);
    let t = gw.token(&rewritten, port).await;
    let resp = tls.get(&rhost, "/", &[("x-sandgate-token", &t)]).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let seen = echo.last();
    assert_eq!(seen.headers["host"], format!("127.0.0.1:{port}").as_str());
    assert_eq!(
        seen.headers["x-forwarded-host"],
        rhost.as_str(),
        "the original Host is still told"
    );
    let hosts: Vec<_> = seen.headers.get_all("host").iter().collect();
    assert_eq!(hosts.len(), 1);
}

#[tokio::test]
async fn path_and_query_are_forwarded_byte_for_byte() {
    let echo = Echo::start().await;
    let gw = TestGateway::start().await;
    let port = echo.port();
    let id = gw.create_sandbox(&[port]).await;
    let host = sandbox_host(port, &id);
    let tls = gw.tls();
    let t = gw.token(&id, port).await;

    for target in [
        "/a%2Fb/../c?x=%41&y",
        "/./x//y/?q=a+b&q=%2B&&z=",
        "/%2e%2e/%2E%2E/etc/passwd",
        "//double//slash",
        "/semi;p=1/x?%00=%zz",
        "/~user/%7Efoo?a=1&a=2&_sandgate_tokenx=keep",
        "/?",
    ] {
        let resp = tls.get(&host, target, &[("x-sandgate-token", &t)]).await;
        assert_eq!(resp.status(), StatusCode::OK, "{target}");
        let seen = echo.last();
        let expected = if target == "/?" { "/" } else { target };
        // hyper may drop an empty query; anything else must be exact.
        if target == "/?" {
            assert!(seen.uri == "/" || seen.uri == "/?", "{}", seen.uri);
        } else {
            assert_eq!(seen.uri, expected);
        }
    }

    // Our parameter is removed from the query (header token on the sandbox host), every other
    // byte kept in order.
    let resp = tls
        .get(
            &host,
            "/p?x=%41&_sandgate_token=junk&y&_sandgate_token=again&z=%2F",
            &[("x-sandgate-token", &t)],
        )
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(echo.last().uri, "/p?x=%41&y&z=%2F");

    // A cookie request keeps its other parameters as sent.
    let cookie = browser_session(&gw, &id, port).await;
    let cookie_header = format!("__Host-sandgate={cookie}");
    let resp = tls
        .get(&host, "/a%2Fb/../c?x=%41&y", &[("cookie", &cookie_header)])
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(echo.last().uri, "/a%2Fb/../c?x=%41&y");

    // The method and body pass through as well.
    let req = Request::builder()
        .method(Method::POST)
        .uri("/upload?x=1")
        .header("host", &host)
        .header("x-sandgate-token", &t)
        .body(Full::new(Bytes::from_static(b"hello body")))
        .unwrap();
    let resp = tls.send(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let seen = echo.last();
    assert_eq!(seen.method, "POST");
    assert_eq!(seen.uri, "/upload?x=1");
    assert_eq!(&seen.body[..], b"hello body");
}
