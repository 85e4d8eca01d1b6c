//! Browsers: the link exchange, the session cookie, and the cross-origin rules that keep
//! sibling sandboxes (same site, shared cookie jar) from using each other's sessions.
// Tests (and their helpers) may unwrap: a failure is the test failing.
#![allow(clippy::unwrap_used)]

mod common;

use bytes::Bytes;
use common::*;
use futures_util::{SinkExt, StreamExt};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use serde_json::json;
use tokio_tungstenite::tungstenite::{self, Message};

const APP_ORIGIN: &str = "https://app.example.com";

struct Setup {
    echo: Echo,
    gw: TestGateway,
    id: String,
    port: u16,
    host: String,
    /// `Cookie: __Host-sandgate=...` for this sandbox host.
    cookie: String,
}

async fn setup() -> Setup {
    let echo = Echo::start().await;
    let gw = TestGateway::start().await;
    let port = echo.port();
    let id = gw
        .create_sandbox_with(json!({
            "upstream": "127.0.0.1",
            "ports": [port],
            "cors_origins": [APP_ORIGIN],
        }))
        .await;
    let host = sandbox_host(port, &id);
    let cookie = format!("__Host-sandgate={}", browser_session(&gw, &id, port).await);
    Setup {
        echo,
        gw,
        id,
        port,
        host,
        cookie,
    }
}

impl Setup {
    async fn get(&self, path: &str, headers: &[(&str, &str)]) -> Response<Bytes> {
        let mut all = vec![("cookie", self.cookie.as_str())];
        all.extend_from_slice(headers);
        self.gw.tls().get(&self.host, path, &all).await
    }

    async fn send(&self, method: Method, headers: &[(&str, &str)]) -> Response<Bytes> {
        let mut req = Request::builder()
            .method(method)
            .uri("/api")
            .header("host", &self.host)
            .header("cookie", &self.cookie);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        self.gw
            .tls()
            .send(req.body(Full::new(Bytes::from_static(b"{}"))).unwrap())
            .await
            .unwrap()
    }

    /// The origin of a sibling sandbox: same site, another origin.
    async fn sibling_origin(&self) -> String {
        let sibling = self.gw.create_sandbox(&[self.port]).await;
        format!("https://{}", sandbox_host(self.port, &sibling))
    }
}

/// The attributes of a `Set-Cookie` value, lowercased names, in order.
fn cookie_attributes(set_cookie: &str) -> Vec<(String, Option<String>)> {
    set_cookie
        .split(';')
        .skip(1)
        .map(|a| {
            let a = a.trim();
            match a.split_once('=') {
                Some((k, v)) => (k.trim().to_ascii_lowercase(), Some(v.trim().to_string())),
                None => (a.to_ascii_lowercase(), None),
            }
        })
        .collect()
}

#[tokio::test]
async fn the_link_exchange_sets_a_host_only_session_cookie() {
    let echo = Echo::start().await;
    let gw = TestGateway::start().await;
    let port = echo.port();
    let id = gw.create_sandbox(&[port]).await;
    let host = sandbox_host(port, &id);
    let minted = gw.mint(&id, port, json!({"ttl_secs": 300})).await;
    let t = minted["token"].as_str().unwrap();

    let resp = gw
        .tls()
        .get(
            &host,
            &format!("/lab/tree?a=1&_sandgate_token={t}&b=%41&c"),
            &[],
        )
        .await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    let location = resp.headers()["location"].to_str().unwrap();
    assert_eq!(location, format!("https://{host}/lab/tree?a=1&b=%41&c"));
    assert_eq!(resp.headers()["referrer-policy"], "no-referrer");
    assert_eq!(resp.headers()["cache-control"], "no-store");

    let set_cookies: Vec<_> = resp.headers().get_all("set-cookie").iter().collect();
    assert_eq!(set_cookies.len(), 1);
    let set_cookie = set_cookies[0].to_str().unwrap();
    assert!(set_cookie.starts_with("__Host-sandgate="), "{set_cookie}");
    let attrs = cookie_attributes(set_cookie);
    let has = |name: &str| attrs.iter().any(|(k, _)| k == name);
    let value = |name: &str| {
        attrs
            .iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.clone())
    };
    assert_eq!(value("path").as_deref(), Some("/"));
    assert!(has("secure"), "{set_cookie}");
    assert!(has("httponly"), "{set_cookie}");
    assert_eq!(
        value("samesite").map(|v| v.to_ascii_lowercase()).as_deref(),
        Some("lax")
    );
    assert!(
        !has("domain"),
        "a __Host- cookie has no Domain: {set_cookie}"
    );
    let max_age: i64 = value("max-age").expect("Max-Age").parse().unwrap();
    assert!(max_age > 0 && max_age <= 300, "Max-Age {max_age}");
    if has("expires") {
        // An Expires, if any, must not outlive the token either.
        let expires = httpdate::parse_http_date(&value("expires").unwrap()).unwrap();
        let left = expires
            .duration_since(std::time::SystemTime::now())
            .unwrap_or_default();
        assert!(left.as_secs() <= 301);
    }
    assert_eq!(
        echo.count(),
        0,
        "the exchange itself is answered by the gateway"
    );

    // Following the redirect with the cookie reaches the app, without the token anywhere.
    let cookie = format!("__Host-sandgate={}", session_cookie(&resp));
    let path = location.strip_prefix(&format!("https://{host}")).unwrap();
    let resp = gw.tls().get(&host, path, &[("cookie", &cookie)]).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(echo.last().uri, "/lab/tree?a=1&b=%41&c");
    assert_upstream_never_saw(&echo, t);

    // Only our parameter in the query: no dangling `?`.
    let resp = gw
        .tls()
        .get(&host, &format!("/x?_sandgate_token={t}"), &[])
        .await;
    assert_eq!(
        resp.headers()["location"],
        format!("https://{host}/x").as_str()
    );
}

#[tokio::test]
async fn the_exchange_never_redirects_off_the_host() {
    let echo = Echo::start().await;
    let gw = TestGateway::start().await;
    let port = echo.port();
    let id = gw.create_sandbox(&[port]).await;
    let host = sandbox_host(port, &id);
    let t = gw.token(&id, port).await;
    let tls = gw.tls();

    let check = |location: &str, what: &str| {
        assert!(
            location.starts_with(&format!("https://{host}/")),
            "{what}: {location}"
        );
        let url = url::Url::parse(location).unwrap();
        assert_eq!(url.host_str(), Some(host.as_str()), "{what}: {location}");
        assert!(!location.contains(&t), "{what}");
    };
    for target in [
        format!("//evil.com/?_sandgate_token={t}"),
        format!("//evil.com?_sandgate_token={t}"),
        format!("///evil.com/?_sandgate_token={t}"),
        format!("/%09/evil.com?_sandgate_token={t}"),
        format!("/%2F%2Fevil.com?_sandgate_token={t}"),
        format!("/%5Cevil.com?_sandgate_token={t}"),
        format!("/.//evil.com?_sandgate_token={t}&next=https://evil.com"),
    ] {
        let resp = tls.get(&host, &target, &[]).await;
        if resp.status() == StatusCode::SEE_OTHER {
            check(resp.headers()["location"].to_str().unwrap(), &target);
        } else {
            assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{target}");
        }
    }

    // Targets http::Uri will not build: sent raw.
    for target in [
        format!("/\\evil.com?_sandgate_token={t}"),
        format!("/\\/evil.com/?_sandgate_token={t}"),
        format!("https://evil.com/?_sandgate_token={t}"),
    ] {
        let raw = format!("GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        let answer = raw_h1(&tls, &host, raw.as_bytes()).await;
        let status = answer.lines().next().unwrap_or("");
        if status.starts_with("HTTP/1.1 303") {
            let location = answer
                .lines()
                .find_map(|l| {
                    l.split_once(':')
                        .filter(|(k, _)| k.eq_ignore_ascii_case("location"))
                        .map(|(_, v)| v.trim().to_string())
                })
                .expect("a 303 has a Location");
            check(&location, &target);
        } else {
            assert!(
                status.starts_with("HTTP/1.1 400") || status.starts_with("HTTP/1.1 421"),
                "{target}: {status}"
            );
        }
    }
    assert_eq!(echo.count(), 0);
}

#[tokio::test]
async fn cookie_requests_from_the_same_origin_are_admitted() {
    let s = setup().await;
    let own = format!("https://{}", s.host);
    let resp = s.get("/", &[("origin", &own)]).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(
        s.echo.last().headers.get("cookie").is_none(),
        "our cookie is removed"
    );

    let resp = s.send(Method::POST, &[("origin", &own)]).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let resp = s
        .send(
            Method::DELETE,
            &[("origin", &own), ("sec-fetch-site", "same-origin")],
        )
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    // No Origin, no Sec-Fetch-*: an old browser or a direct visit.
    let resp = s.get("/", &[]).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let resp = s.get("/", &[("sec-fetch-site", "none")]).await;
    assert_eq!(resp.status(), StatusCode::OK);

    // A real browser's Host carries the gateway's port, and so does its Origin.
    let host_port = format!("{}:{}", s.host, s.gw.addr.port());
    let origin = format!("https://{host_port}");
    let resp =
        s.gw.tls()
            .get(
                &host_port,
                "/",
                &[("cookie", &s.cookie), ("origin", &origin)],
            )
            .await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(s.echo.count(), 6);
}

#[tokio::test]
async fn cookie_requests_over_http2_follow_the_same_rules() {
    let s = setup().await;
    let tls = s.gw.tls();
    let own = format!("https://{}", s.host);
    let resp = h2_get(
        &tls,
        &s.host,
        "/",
        &[("cookie", &s.cookie), ("origin", &own)],
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK, "same origin over h2");
    assert!(s.echo.last().headers.get("cookie").is_none());
    let sibling = s.sibling_origin().await;
    let resp = h2_get(
        &tls,
        &s.host,
        "/",
        &[("cookie", &s.cookie), ("origin", &sibling)],
    )
    .await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN, "sibling over h2");
    assert_eq!(s.echo.count(), 1);
}

#[tokio::test]
async fn cookie_requests_from_other_origins_are_refused() {
    let s = setup().await;
    let sibling = s.sibling_origin().await;
    let other_port = format!("https://{}:444", s.host);
    let plain_http = format!("http://{}", s.host);

    for (what, headers) in [
        ("sibling Origin", vec![("origin", sibling.as_str())]),
        ("other port", vec![("origin", other_port.as_str())]),
        ("other scheme", vec![("origin", plain_http.as_str())]),
        ("opaque Origin", vec![("origin", "null")]),
        ("evil Origin", vec![("origin", "https://evil.com")]),
        ("cross-site fetch", vec![("sec-fetch-site", "cross-site")]),
        ("same-site fetch", vec![("sec-fetch-site", "same-site")]),
        (
            "cross-site iframe",
            vec![
                ("sec-fetch-site", "cross-site"),
                ("sec-fetch-mode", "navigate"),
                ("sec-fetch-dest", "iframe"),
            ],
        ),
        (
            "same-site iframe",
            vec![
                ("sec-fetch-site", "same-site"),
                ("sec-fetch-mode", "navigate"),
                ("sec-fetch-dest", "iframe"),
                ("origin", sibling.as_str()),
            ],
        ),
        (
            "cross-site no-cors image",
            vec![
                ("sec-fetch-site", "cross-site"),
                ("sec-fetch-mode", "no-cors"),
                ("sec-fetch-dest", "image"),
            ],
        ),
    ] {
        let resp = s.get("/", &headers).await;
        assert_eq!(resp.status(), StatusCode::FORBIDDEN, "{what}");
        assert!(
            resp.headers().get("access-control-allow-origin").is_none(),
            "{what}"
        );
    }
    // A cross-site form POST is a navigation, but not a GET: refused.
    let resp = s
        .send(
            Method::POST,
            &[
                ("origin", &sibling),
                ("sec-fetch-site", "same-site"),
                ("sec-fetch-mode", "navigate"),
                ("sec-fetch-dest", "document"),
            ],
        )
        .await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN, "cross-site form POST");
    let resp = s.send(Method::PUT, &[("origin", &sibling)]).await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);

    // HTML for a browser.
    let resp = s
        .get("/", &[("origin", &sibling), ("accept", "text/html")])
        .await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    assert_eq!(s.echo.count(), 0, "none of them reached the app");
}

#[tokio::test]
async fn top_level_navigations_are_admitted_from_anywhere() {
    let s = setup().await;
    let navigate = [
        ("sec-fetch-site", "cross-site"),
        ("sec-fetch-mode", "navigate"),
        ("sec-fetch-dest", "document"),
        ("sec-fetch-user", "?1"),
    ];
    let resp = s.get("/from-a-link", &navigate).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let mut same_site = navigate.to_vec();
    same_site[0] = ("sec-fetch-site", "same-site");
    let resp = s.get("/from-a-sibling", &same_site).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let req = Request::builder()
        .method(Method::HEAD)
        .uri("/head")
        .header("host", &s.host)
        .header("cookie", &s.cookie)
        .header("sec-fetch-site", "cross-site")
        .header("sec-fetch-mode", "navigate")
        .header("sec-fetch-dest", "document")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = s.gw.tls().send(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(s.echo.count(), 3);
    assert_eq!(s.echo.last().method, "HEAD");
}

#[tokio::test]
async fn a_listed_origin_may_use_the_session_with_cors() {
    let s = setup().await;
    let resp = s
        .get(
            "/data",
            &[("origin", APP_ORIGIN), ("sec-fetch-site", "cross-site")],
        )
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["access-control-allow-origin"], APP_ORIGIN);
    assert_eq!(resp.headers()["access-control-allow-credentials"], "true");
    assert!(resp.headers().get_all("vary").iter().any(|v| v
        .to_str()
        .unwrap()
        .to_ascii_lowercase()
        .contains("origin")));
    let resp = s.send(Method::POST, &[("origin", APP_ORIGIN)]).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["access-control-allow-origin"], APP_ORIGIN);

    // A look-alike is not listed.
    for origin in [
        "https://app.example.com.evil.com",
        "https://evil-app.example.com",
        "http://app.example.com",
        "https://app.example.com:8443",
    ] {
        let resp = s.get("/data", &[("origin", origin)]).await;
        assert_eq!(resp.status(), StatusCode::FORBIDDEN, "{origin}");
        assert!(resp.headers().get("access-control-allow-origin").is_none());
    }
    assert_eq!(s.echo.count(), 2);
}

#[tokio::test]
async fn websocket_upgrades_are_held_to_the_origin_rule() {
    let s = setup().await;
    let tls = s.gw.tls();
    let sibling = s.sibling_origin().await;
    match websocket(
        &tls,
        &s.host,
        "/ws",
        &[("cookie", &s.cookie), ("origin", &sibling)],
    )
    .await
    {
        Err(tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), StatusCode::FORBIDDEN),
        other => panic!("a sibling's WebSocket must be refused, got {other:?}"),
    }
    match websocket(
        &tls,
        &s.host,
        "/ws",
        &[("cookie", &s.cookie), ("origin", "https://evil.com")],
    )
    .await
    {
        Err(tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), StatusCode::FORBIDDEN),
        other => panic!("a foreign WebSocket must be refused, got {other:?}"),
    }
    assert_eq!(s.echo.count(), 0);

    let own = format!("https://{}", s.host);
    let (mut ws, resp) = websocket(
        &tls,
        &s.host,
        "/ws",
        &[("cookie", &s.cookie), ("origin", &own)],
    )
    .await
    .expect("same-origin WebSocket");
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    ws.send(Message::text("hello")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("hello"));
    assert_eq!(s.echo.count(), 1);
    assert!(s.echo.last().headers.get("cookie").is_none());

    // A listed origin may open one too.
    let (_ws, resp) = websocket(
        &tls,
        &s.host,
        "/ws",
        &[("cookie", &s.cookie), ("origin", APP_ORIGIN)],
    )
    .await
    .expect("listed-origin WebSocket");
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
}

#[tokio::test]
async fn preflights_are_answered_by_the_gateway_for_listed_origins_only() {
    let s = setup().await;
    let tls = s.gw.tls();
    let preflight = |origin: &str, path: &str| {
        Request::builder()
            .method(Method::OPTIONS)
            .uri(path)
            .header("host", &s.host)
            .header("origin", origin)
            .header("access-control-request-method", "PUT")
            .header("access-control-request-headers", "content-type, x-app")
            .body(Full::new(Bytes::new()))
            .unwrap()
    };

    let resp = tls.send(preflight(APP_ORIGIN, "/api/items")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    assert_eq!(resp.headers()["access-control-allow-origin"], APP_ORIGIN);
    assert_eq!(resp.headers()["access-control-allow-credentials"], "true");
    let methods = resp.headers()["access-control-allow-methods"]
        .to_str()
        .unwrap();
    assert!(methods.contains("PUT"), "{methods}");
    let allowed = resp.headers()["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    assert!(allowed.contains("content-type") && allowed.contains("x-app"));
    assert!(resp.headers().get("location").is_none());
    assert!(resp.headers().get("set-cookie").is_none());

    // A preflight of a link that still carries a token is not exchanged or redirected.
    let t = s.gw.token(&s.id, s.port).await;
    let resp = tls
        .send(preflight(APP_ORIGIN, &format!("/?_sandgate_token={t}")))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    assert!(resp.headers().get("location").is_none());
    assert!(resp.headers().get("set-cookie").is_none());

    let sibling = s.sibling_origin().await;
    for origin in [
        sibling.as_str(),
        "https://evil.com",
        "null",
        "https://app.example.com.evil.com",
    ] {
        let resp = tls.send(preflight(origin, "/api/items")).await.unwrap();
        assert_eq!(resp.status(), StatusCode::FORBIDDEN, "{origin}");
        assert!(resp.headers().get("access-control-allow-origin").is_none());
        assert!(resp
            .headers()
            .get("access-control-allow-credentials")
            .is_none());
        assert!(resp.headers().get("location").is_none());
        let resp = tls
            .send(preflight(origin, &format!("/?_sandgate_token={t}")))
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::FORBIDDEN, "{origin} with a link");
        assert!(resp.headers().get("location").is_none());
        assert!(resp.headers().get("set-cookie").is_none());
    }

    // Even with a valid cookie or token, a preflight never reaches the upstream.
    let mut req = preflight("https://evil.com", "/api/items");
    req.headers_mut()
        .insert("cookie", s.cookie.parse().unwrap());
    req.headers_mut()
        .insert("x-sandgate-token", t.parse().unwrap());
    let resp = tls.send(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    assert_eq!(s.echo.count(), 0, "no preflight was forwarded");

    // A plain OPTIONS (no Access-Control-Request-Method) is ordinary traffic: token needed.
    let req = Request::builder()
        .method(Method::OPTIONS)
        .uri("/api/items")
        .header("host", &s.host)
        .header("origin", APP_ORIGIN)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = tls.send(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(s.echo.count(), 0);
}
