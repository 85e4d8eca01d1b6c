//! Admission: every bad, foreign, stale or misplaced token is refused with the contract's status
//! and code, and the upstream never hears of it.
// Tests (and their helpers) may unwrap: a failure is the test failing.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use bytes::Bytes;
use common::*;
use http::{Method, Request, StatusCode};
use http_body_util::Full;
use serde_json::{json, Value};

use sandgate::token::{Authority, Claims, SigningKey};

fn b64(json: &Value) -> String {
    URL_SAFE_NO_PAD.encode(json.to_string())
}

fn decode_segment(segment: &str) -> Value {
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(segment).unwrap()).unwrap()
}

fn segments(token: &str) -> (&str, &str, &str) {
    let mut it = token.split('.');
    let t = (it.next().unwrap(), it.next().unwrap(), it.next().unwrap());
    assert!(it.next().is_none());
    t
}

/// The claims of a token this gateway issued.
fn claims_of(gw: &TestGateway, token: &str) -> Claims {
    (*gw.gw.tokens.verify(token, sandgate::unix_now()).unwrap()).clone()
}

/// Asserts a 401 with `code` (any token code when `None`), `WWW-Authenticate: Bearer`, a JSON
/// body, and no trace of `token` in the body.
fn assert_401(resp: &http::Response<Bytes>, code: Option<&str>, token: &str, what: &str) {
    assert_eq!(
        resp.status(),
        StatusCode::UNAUTHORIZED,
        "{what}: {:?}",
        resp.body()
    );
    assert_eq!(resp.headers()["www-authenticate"], "Bearer", "{what}");
    let got = error_code(resp);
    match code {
        Some(code) => assert_eq!(got, code, "{what}"),
        None => assert!(
            [
                "token_invalid",
                "token_expired",
                "token_revoked",
                "token_missing"
            ]
            .contains(&got.as_str()),
            "{what}: {got}"
        ),
    }
    assert_body_free_of(resp, token);
}

fn assert_body_free_of(resp: &http::Response<Bytes>, token: &str) {
    let body = String::from_utf8_lossy(resp.body());
    if !token.is_empty() {
        assert!(!body.contains(token), "error body contains the token");
        if let Some(sig) = token.rsplit('.').next().filter(|s| s.len() > 16) {
            assert!(
                !body.contains(sig),
                "error body contains the token's signature"
            );
        }
    }
}

struct Setup {
    echo: Echo,
    gw: TestGateway,
    id: String,
    port: u16,
    host: String,
}

async fn setup_with(extra: &str) -> Setup {
    let echo = Echo::start().await;
    let gw = TestGateway::start_with(extra).await;
    let port = echo.port();
    let id = gw.create_sandbox(&[port]).await;
    let host = sandbox_host(port, &id);
    Setup {
        echo,
        gw,
        id,
        port,
        host,
    }
}

async fn setup() -> Setup {
    setup_with("").await
}

async fn get_with_token(s: &Setup, host: &str, token: &str) -> http::Response<Bytes> {
    s.gw.tls()
        .get(host, "/", &[("x-sandgate-token", token)])
        .await
}

#[tokio::test]
async fn a_token_for_another_sandbox_or_port_is_out_of_scope() {
    let echo = Echo::start().await;
    let other = Echo::start().await;
    let gw = TestGateway::start().await;
    let (p1, p2) = (echo.port(), other.port());
    let a = gw.create_sandbox(&[p1, p2]).await;
    let b = gw.create_sandbox(&[p1]).await;
    let tls = gw.tls();
    let ta = gw.token(&a, p1).await;

    // Another sandbox, same port.
    let resp = tls
        .get(&sandbox_host(p1, &b), "/", &[("x-sandgate-token", &ta)])
        .await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    assert_eq!(error_code(&resp), "token_scope");
    assert_body_free_of(&resp, &ta);

    // Another port of the same sandbox.
    let resp = tls
        .get(&sandbox_host(p2, &a), "/", &[("x-sandgate-token", &ta)])
        .await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    assert_eq!(error_code(&resp), "token_scope");

    // The same by header routing and by every other transport.
    let p1s = p1.to_string();
    let resp = tls
        .get(
            BASE,
            "/",
            &[
                ("x-sandgate-sandbox", &b),
                ("x-sandgate-port", &p1s),
                ("x-sandgate-token", &ta),
            ],
        )
        .await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let bearer = format!("Bearer {ta}");
    let resp = tls
        .get(&sandbox_host(p1, &b), "/", &[("authorization", &bearer)])
        .await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let resp = tls
        .get(
            &sandbox_host(p1, &b),
            &format!("/?_sandgate_token={ta}"),
            &[],
        )
        .await;
    assert_eq!(
        resp.status(),
        StatusCode::FORBIDDEN,
        "no cookie for another sandbox"
    );
    assert!(resp.headers().get("set-cookie").is_none());
    let cookie = format!("__Host-sandgate={ta}");
    let resp = tls
        .get(&sandbox_host(p2, &a), "/", &[("cookie", &cookie)])
        .await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);

    // The right host still works.
    let resp = tls
        .get(&sandbox_host(p1, &a), "/", &[("x-sandgate-token", &ta)])
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(echo.count(), 1);
    assert_eq!(other.count(), 0);
}

#[tokio::test]
async fn a_token_for_an_unpublished_port_is_out_of_scope() {
    let s = setup().await;
    let unpublished = dead_port().await;

    // The API will not mint one.
    let (status, body) =
        s.gw.api(
            Method::POST,
            &format!("/v1/sandboxes/{}/connect-tokens", s.id),
            Some(json!({ "port": unpublished })),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["error"]["code"], "invalid_argument");

    // A token signed with the gateway's own key for that port is still refused.
    let mut claims = claims_of(&s.gw, &s.gw.token(&s.id, s.port).await);
    claims.port = unpublished;
    claims.jti = "craftedunpublishedport".into();
    let crafted = s.gw.gw.tokens.sign(&claims).unwrap();
    let resp = get_with_token(&s, &sandbox_host(unpublished, &s.id), &crafted).await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    assert_eq!(error_code(&resp), "token_scope");
    assert_body_free_of(&resp, &crafted);
    assert_eq!(s.echo.count(), 0);
}

#[tokio::test]
async fn an_expired_token_is_refused() {
    let s = setup_with("[tokens]\nleeway_secs = 0\n").await;
    let t = s.gw.mint(&s.id, s.port, json!({"ttl_secs": 1})).await["token"]
        .as_str()
        .unwrap()
        .to_string();
    // Verified (and cached) while fresh, so expiry must also beat the cache.
    let resp = get_with_token(&s, &s.host, &t).await;
    assert_eq!(resp.status(), StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(2200)).await;

    let resp = get_with_token(&s, &s.host, &t).await;
    assert_401(&resp, Some("token_expired"), &t, "expired header token");
    let bearer = format!("Bearer {t}");
    let resp =
        s.gw.tls()
            .get(&s.host, "/", &[("authorization", &bearer)])
            .await;
    assert_401(&resp, Some("token_expired"), &t, "expired bearer");
    let resp =
        s.gw.tls()
            .get(&s.host, &format!("/?_sandgate_token={t}"), &[])
            .await;
    assert_401(&resp, Some("token_expired"), &t, "expired link");
    assert!(resp.headers().get("set-cookie").is_none());

    // A browser is told, in words, that the link expired and a fresh one is needed.
    let resp =
        s.gw.tls()
            .get(
                &s.host,
                &format!("/?_sandgate_token={t}"),
                &[("accept", "text/html,application/xhtml+xml,*/*;q=0.8")],
            )
            .await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    let page = String::from_utf8_lossy(resp.body()).to_lowercase();
    assert!(page.contains("expired"), "{page}");
    assert!(
        page.contains("new link") || page.contains("fresh link"),
        "{page}"
    );
    assert_body_free_of(&resp, &t);
    assert_eq!(s.echo.count(), 1);
}

#[tokio::test]
async fn garbage_and_forged_tokens_are_refused() {
    let s = setup().await;
    let good = s.gw.token(&s.id, s.port).await;
    let (h, p, sig) = segments(&good);
    let header = decode_segment(h);
    let payload = decode_segment(p);
    let kid = header["kid"].as_str().unwrap().to_string();

    let mut bad: Vec<(String, String)> = Vec::new();
    let mut add = |what: &str, t: String| bad.push((what.to_string(), t));

    add("garbage", "garbage".into());
    add("empty segments", "..".into());
    add("two segments", format!("{h}.{p}"));
    add("four segments", format!("{good}.{sig}"));
    add("bad base64", format!("{h}.{p}!.{sig}"));
    add("padding", format!("{h}=.{p}.{sig}"));
    add(
        "signature cut",
        format!("{h}.{p}.{}", &sig[..sig.len() - 2]),
    );
    let mut flipped = sig.to_string().into_bytes();
    flipped[10] = if flipped[10] == b'A' { b'B' } else { b'A' };
    add(
        "signature flipped",
        format!("{h}.{p}.{}", String::from_utf8(flipped).unwrap()),
    );
    for alg in ["none", "None", "NONE", "HS256", "ES256", "RS256"] {
        let hdr = b64(&json!({"alg": alg, "typ": "connect+jwt", "kid": kid}));
        add(&format!("alg {alg}, no signature"), format!("{hdr}.{p}."));
        add(
            &format!("alg {alg}, old signature"),
            format!("{hdr}.{p}.{sig}"),
        );
    }
    // HS256 keyed with the gateway's public key (the classic algorithm-confusion attack).
    let (_, jwks) = s.gw.api(Method::GET, "/.well-known/jwks.json", None).await;
    let public = URL_SAFE_NO_PAD
        .decode(jwks["keys"][0]["x"].as_str().expect("JWKS has x"))
        .unwrap();
    let hs_header = b64(&json!({"alg": "HS256", "typ": "connect+jwt", "kid": kid}));
    let signing_input = format!("{hs_header}.{p}");
    let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &public);
    let mac = aws_lc_rs::hmac::sign(&key, signing_input.as_bytes());
    add(
        "HS256 with the public key",
        format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(mac.as_ref())),
    );
    // Header games.
    for (what, hdr) in [
        (
            "unknown kid",
            json!({"alg": "EdDSA", "typ": "connect+jwt", "kid": "nope"}),
        ),
        (
            "path kid",
            json!({"alg": "EdDSA", "typ": "connect+jwt", "kid": "../../data/admin.key"}),
        ),
        ("no kid", json!({"alg": "EdDSA", "typ": "connect+jwt"})),
        ("typ JWT", json!({"alg": "EdDSA", "typ": "JWT", "kid": kid})),
        (
            "jku",
            json!({"alg": "EdDSA", "typ": "connect+jwt", "kid": kid, "jku": "https://evil.com/jwks"}),
        ),
        (
            "crit",
            json!({"alg": "EdDSA", "typ": "connect+jwt", "kid": kid, "crit": ["exp"]}),
        ),
    ] {
        add(what, format!("{}.{p}.{sig}", b64(&hdr)));
    }
    // Tampered payloads with the original header and signature.
    let mut tamper = |what: &str, f: &dyn Fn(&mut Value)| {
        let mut v = payload.clone();
        f(&mut v);
        bad.push((what.to_string(), format!("{h}.{}.{sig}", b64(&v))));
    };
    tamper("port changed", &|v| {
        v["port"] = json!(v["port"].as_u64().unwrap() ^ 1)
    });
    tamper("sbx changed", &|v| {
        v["sbx"] = json!("aaaaaaaaaaaaaaaaaaaaaaaa");
    });
    tamper("exp extended", &|v| {
        v["exp"] = json!(v["exp"].as_i64().unwrap() + 3600);
    });
    tamper("exp as string", &|v| v["exp"] = json!("99999999999"));
    tamper("no exp", &|v| {
        v.as_object_mut().unwrap().remove("exp");
    });
    tamper("no sbx", &|v| {
        v.as_object_mut().unwrap().remove("sbx");
    });
    tamper("metadata added", &|v| v["md"] = json!({"admin": true}));
    // The original payload, re-encoded byte for byte differently (key order), is a new
    // signing input too.
    let reordered: serde_json::Map<String, Value> = payload
        .as_object()
        .unwrap()
        .iter()
        .rev()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let reordered = format!(
        "{h}.{}.{sig}",
        URL_SAFE_NO_PAD.encode(
            format!(
                "{{{}}}",
                reordered
                    .iter()
                    .map(|(k, v)| format!("{}:{v}", json!(k)))
                    .collect::<Vec<_>>()
                    .join(",")
            )
            .as_bytes()
        )
    );
    bad.push(("payload re-encoded".into(), reordered));

    let tls = s.gw.tls();
    for (what, t) in &bad {
        let resp = tls.get(&s.host, "/", &[("x-sandgate-token", t)]).await;
        assert_401(&resp, None, t, what);
        assert_eq!(error_code(&resp), "token_invalid", "{what}");
        // The same value as a Bearer: when it is shaped as ours it is refused; when not, it
        // is the app's and the request has no token at all. Either way: 401.
        let bearer = format!("Bearer {t}");
        let resp = tls.get(&s.host, "/", &[("authorization", &bearer)]).await;
        assert_401(&resp, None, t, what);
    }
    assert_eq!(s.echo.count(), 0, "the upstream heard of none of them");

    // And the good one still works.
    let resp = get_with_token(&s, &s.host, &good).await;
    assert_eq!(resp.status(), StatusCode::OK);
}

#[tokio::test]
async fn a_token_signed_by_another_gateway_is_refused() {
    let s = setup().await;
    let good = s.gw.token(&s.id, s.port).await;
    let claims = claims_of(&s.gw, &good);

    // Another gateway (same base domain, so same issuer and audience) signs our claims.
    let other = TestGateway::start().await;
    let foreign = other.gw.tokens.sign(&claims).unwrap();
    let resp = get_with_token(&s, &s.host, &foreign).await;
    assert_401(&resp, Some("token_invalid"), &foreign, "foreign key");

    // Its signature under our header (our kid).
    let (h, _, _) = segments(&good);
    let (_, fp, fsig) = segments(&foreign);
    let spliced = format!("{h}.{fp}.{fsig}");
    let resp = get_with_token(&s, &s.host, &spliced).await;
    assert_401(
        &resp,
        Some("token_invalid"),
        &spliced,
        "foreign signature, our kid",
    );

    // A different key that claims our kid.
    let kid = decode_segment(h)["kid"].as_str().unwrap().to_string();
    let impostor_key = SigningKey::from_parts(
        kid,
        sandgate::unix_now(),
        SigningKey::generate().unwrap().pkcs8_der().to_vec(),
    )
    .unwrap();
    let impostor = Authority::new(
        sandgate::gateway::token_settings(&s.gw.gw.config),
        vec![impostor_key],
    )
    .unwrap();
    let same_kid = impostor.sign(&claims).unwrap();
    assert_eq!(segments(&same_kid).0, h, "the impostor's header is ours");
    let resp = get_with_token(&s, &s.host, &same_kid).await;
    assert_401(
        &resp,
        Some("token_invalid"),
        &same_kid,
        "same kid, other key",
    );

    // And a token the other gateway minted for its own sandbox on the same upstream.
    let theirs = other.create_sandbox(&[s.port]).await;
    let their_token = other.token(&theirs, s.port).await;
    let resp = get_with_token(&s, &sandbox_host(s.port, &theirs), &their_token).await;
    assert_401(
        &resp,
        Some("token_invalid"),
        &their_token,
        "their token, their id",
    );

    assert_eq!(s.echo.count(), 0);
}

#[tokio::test]
async fn an_oversized_token_is_refused_without_harm() {
    let s = setup().await;
    let tls = s.gw.tls();
    let big = "A".repeat(100 * 1024);
    let shaped = format!(
        "{}.{}.{}",
        b64(&json!({"alg":"EdDSA","typ":"connect+jwt","kid":"k"})),
        "B".repeat(7000),
        "C".repeat(86)
    );
    let bearer_big = format!("Bearer {big}");
    let cookie_big = format!("__Host-sandgate={big}");
    let bearer_shaped = format!("Bearer {shaped}");
    for (what, headers) in [
        ("header 100 KB", vec![("x-sandgate-token", big.as_str())]),
        (
            "bearer 100 KB",
            vec![("authorization", bearer_big.as_str())],
        ),
        ("cookie 100 KB", vec![("cookie", cookie_big.as_str())]),
        ("header 7 KB", vec![("x-sandgate-token", shaped.as_str())]),
        (
            "bearer 7 KB",
            vec![("authorization", bearer_shaped.as_str())],
        ),
    ] {
        let mut req = Request::builder().uri("/").header("host", &s.host);
        for (k, v) in headers {
            req = req.header(k, v);
        }
        match tls.send(req.body(Full::new(Bytes::new())).unwrap()).await {
            Ok(resp) => {
                let status = resp.status();
                assert!(
                    status == StatusCode::UNAUTHORIZED
                        || status == StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                    "{what}: {status}"
                );
                assert_body_free_of(&resp, &big);
            }
            // Refusing the oversized head by closing is acceptable; a panic is not, and the
            // gateway must keep serving (checked below).
            Err(err) => assert!(what.contains("100 KB"), "{what}: {err}"),
        }
    }
    // http::Uri will not even build a 100 KB target, so this one goes raw.
    let raw = format!(
        "GET /?_sandgate_token={big} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        s.host
    );
    let answer = raw_h1(&tls, &s.host, raw.as_bytes()).await;
    if let Some(status_line) = answer.lines().next() {
        assert!(
            ["401", "414", "431", "400"]
                .iter()
                .any(|c| status_line.starts_with(&format!("HTTP/1.1 {c}"))),
            "{status_line}"
        );
    }
    assert!(!answer.to_ascii_lowercase().contains("set-cookie"));
    assert!(!answer.contains(&big));

    // Still serving.
    let good = s.gw.token(&s.id, s.port).await;
    let resp = get_with_token(&s, &s.host, &good).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(s.echo.count(), 1);
}

#[tokio::test]
async fn refusals_do_not_tell_whether_a_sandbox_exists() {
    let s = setup().await;
    let ghost = "abcdefghijklmnopqrstuvwx";
    assert_ne!(ghost, s.id);
    let ghost_host = sandbox_host(s.port, ghost);
    let tls = s.gw.tls();

    let cases: Vec<Vec<(&str, &str)>> = vec![
        vec![("x-sandgate-token", "garbage")],
        vec![],
        vec![("cookie", "__Host-sandgate=garbage")],
        vec![("accept", "text/html"), ("x-sandgate-token", "garbage")],
    ];
    for headers in cases {
        let real = tls.get(&s.host, "/", &headers).await;
        let fake = tls.get(&ghost_host, "/", &headers).await;
        assert_eq!(real.status(), StatusCode::UNAUTHORIZED, "{headers:?}");
        assert_eq!(real.status(), fake.status(), "{headers:?}");
        assert_eq!(real.body(), fake.body(), "{headers:?}");
        assert_eq!(
            real.headers().get("www-authenticate"),
            fake.headers().get("www-authenticate")
        );
        assert_eq!(
            real.headers().get("content-type"),
            fake.headers().get("content-type")
        );
    }
    let real = tls.get(&s.host, "/?_sandgate_token=garbage", &[]).await;
    let fake = tls.get(&ghost_host, "/?_sandgate_token=garbage", &[]).await;
    assert_eq!(real.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(real.status(), fake.status());
    assert_eq!(real.body(), fake.body());

    // Header routing alike.
    let port = s.port.to_string();
    let real = tls
        .get(
            BASE,
            "/",
            &[
                ("x-sandgate-sandbox", &s.id),
                ("x-sandgate-port", &port),
                ("x-sandgate-token", "garbage"),
            ],
        )
        .await;
    let fake = tls
        .get(
            BASE,
            "/",
            &[
                ("x-sandgate-sandbox", ghost),
                ("x-sandgate-port", &port),
                ("x-sandgate-token", "garbage"),
            ],
        )
        .await;
    assert_eq!(real.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(real.status(), fake.status());
    assert_eq!(real.body(), fake.body());
    assert_eq!(s.echo.count(), 0);
}

#[tokio::test]
async fn unknown_hosts_are_misdirected() {
    let s = setup().await;
    let tls = s.gw.tls();
    let t = s.gw.token(&s.id, s.port).await;
    for host in [
        "evil.com".to_string(),
        "sandbox.localhost.evil.com".to_string(),
        format!("{}.evil.com", s.host),
        "8000-shortid.sandbox.localhost".to_string(),
        format!("x.{}", s.host),
        format!("0-{}.sandbox.localhost", s.id),
        format!("0{}-{}.sandbox.localhost", s.port, s.id),
        format!("{}-{}.sandbox.localhost", 70000, s.id),
        format!("{}{}.sandbox.localhost", s.port, s.id),
        format!("{}-{}-x.sandbox.localhost", s.port, s.id),
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "169.254.169.254".to_string(),
    ] {
        let resp = get_with_sni(&tls, BASE, &host, "/", &[("x-sandgate-token", &t)]).await;
        assert_eq!(resp.status(), StatusCode::MISDIRECTED_REQUEST, "{host}");
        assert_eq!(error_code(&resp), "unknown_host", "{host}");
        assert_body_free_of(&resp, &t);
    }
    assert_eq!(s.echo.count(), 0);
}

#[tokio::test]
async fn hosts_are_canonicalised_before_routing() {
    let s = setup().await;
    let tls = s.gw.tls();
    let t = s.gw.token(&s.id, s.port).await;
    for host in [
        s.host.to_uppercase(),
        format!("{}.", s.host),
        format!("{}.:{}", s.host.to_uppercase(), s.gw.addr.port()),
        format!("{}:443", s.host),
    ] {
        let before = s.echo.count();
        let resp = get_with_sni(&tls, &s.host, &host, "/", &[("x-sandgate-token", &t)]).await;
        assert_eq!(resp.status(), StatusCode::OK, "{host}: {:?}", resp.body());
        assert_eq!(s.echo.count(), before + 1);
        assert_eq!(
            s.echo.last().headers["host"],
            host.as_str(),
            "Host as received"
        );
    }
    // The base domain in odd case still serves the API.
    let req = Request::builder()
        .uri("/v1/sandboxes")
        .header("host", "SANDBOX.LOCALHOST.")
        .header("authorization", format!("Bearer {}", s.gw.admin_key))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = send_with_sni(&tls, BASE, req).await;
    assert_eq!(resp.status(), StatusCode::OK);
}

#[tokio::test]
async fn an_unreachable_upstream_is_a_502() {
    let echo = Echo::start().await;
    let gw = TestGateway::start().await;
    let dead = dead_port().await;
    let id = gw.create_sandbox(&[dead]).await;
    let t = gw.token(&id, dead).await;
    let host = sandbox_host(dead, &id);
    let resp = gw.tls().get(&host, "/", &[("x-sandgate-token", &t)]).await;
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/json"));
    assert_eq!(error_code(&resp), "upstream_unreachable");
    assert_body_free_of(&resp, &t);
    // A WebSocket to the dead port fails the same way.
    let proto = format!("sandgate.token.{t}, sandgate");
    match websocket(
        &gw.tls(),
        &host,
        "/ws",
        &[("sec-websocket-protocol", &proto)],
    )
    .await
    {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
        }
        other => panic!("expected a 502, got {other:?}"),
    }
    assert_eq!(echo.count(), 0);
}

#[tokio::test]
async fn revoked_tokens_and_ended_sandboxes_are_refused() {
    let s = setup().await;
    let minted = s.gw.mint(&s.id, s.port, json!({})).await;
    let t = minted["token"].as_str().unwrap().to_string();
    let other = s.gw.token(&s.id, s.port).await;
    let resp = get_with_token(&s, &s.host, &t).await;
    assert_eq!(resp.status(), StatusCode::OK);

    let jti = minted["jti"].as_str().unwrap();
    let (status, body) =
        s.gw.api(Method::DELETE, &format!("/v1/connect-tokens/{jti}"), None)
            .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    let resp = get_with_token(&s, &s.host, &t).await;
    assert_401(&resp, Some("token_revoked"), &t, "revoked");
    let cookie = format!("__Host-sandgate={t}");
    let resp = s.gw.tls().get(&s.host, "/", &[("cookie", &cookie)]).await;
    assert_401(&resp, Some("token_revoked"), &t, "revoked cookie");
    let resp =
        s.gw.tls()
            .get(&s.host, &format!("/?_sandgate_token={t}"), &[])
            .await;
    assert_401(&resp, Some("token_revoked"), &t, "revoked link");
    assert_eq!(s.echo.count(), 1);

    // Another token of the same sandbox is unaffected, until the sandbox ends.
    let resp = get_with_token(&s, &s.host, &other).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let (status, body) =
        s.gw.api(Method::DELETE, &format!("/v1/sandboxes/{}", s.id), None)
            .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    let resp = get_with_token(&s, &s.host, &other).await;
    assert_eq!(resp.status(), StatusCode::GONE);
    assert_eq!(error_code(&resp), "sandbox_terminated");
    assert_body_free_of(&resp, &other);
    let port = s.port.to_string();
    let resp =
        s.gw.tls()
            .get(
                BASE,
                "/",
                &[
                    ("x-sandgate-sandbox", &s.id),
                    ("x-sandgate-port", &port),
                    ("x-sandgate-token", &other),
                ],
            )
            .await;
    assert_eq!(resp.status(), StatusCode::GONE);
    assert_eq!(s.echo.count(), 2);
}

#[tokio::test]
async fn a_single_use_token_works_once() {
    let s = setup().await;
    let tls = s.gw.tls();

    // By header: one request.
    let t = s.gw.mint(&s.id, s.port, json!({"single_use": true})).await["token"]
        .as_str()
        .unwrap()
        .to_string();
    let resp = get_with_token(&s, &s.host, &t).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let resp = get_with_token(&s, &s.host, &t).await;
    assert_401(&resp, None, &t, "second use by header");
    let bearer = format!("Bearer {t}");
    let resp = tls.get(&s.host, "/", &[("authorization", &bearer)]).await;
    assert_401(&resp, None, &t, "second use as Bearer");
    assert_eq!(s.echo.count(), 1);

    // By link: one exchange, and the cookie it sets keeps working.
    let t = s.gw.mint(&s.id, s.port, json!({"single_use": true})).await["token"]
        .as_str()
        .unwrap()
        .to_string();
    let link = format!("/start?_sandgate_token={t}");
    let resp = tls.get(&s.host, &link, &[]).await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    let cookie = format!("__Host-sandgate={}", session_cookie(&resp));
    for _ in 0..3 {
        let resp = tls.get(&s.host, "/app", &[("cookie", &cookie)]).await;
        assert_eq!(resp.status(), StatusCode::OK);
    }
    assert_eq!(s.echo.count(), 4);
    let resp = tls.get(&s.host, &link, &[]).await;
    assert_401(&resp, None, &t, "second exchange");
    assert!(resp.headers().get("set-cookie").is_none());
    let resp = get_with_token(&s, &s.host, &t).await;
    assert_401(&resp, None, &t, "the exchanged link by header");
    assert_eq!(s.echo.count(), 4);
    assert_upstream_never_saw(&s.echo, &t);
}

#[tokio::test]
async fn errors_are_json_by_default_and_html_for_browsers() {
    let s = setup().await;
    let tls = s.gw.tls();
    let t = s.gw.token(&s.id, s.port).await;

    let resp = tls.get(&s.host, "/", &[]).await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/json"));
    let body = json_body(&resp);
    assert_eq!(body["error"]["code"], "token_missing");
    assert!(body["error"]["message"]
        .as_str()
        .is_some_and(|m| !m.is_empty()));

    let browser = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8";
    let resp = tls.get(&s.host, "/", &[("accept", browser)]).await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(resp.headers()["www-authenticate"], "Bearer");
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    let page = String::from_utf8_lossy(resp.body()).to_lowercase();
    assert!(page.contains("<html"), "{page}");
    assert!(page.contains("link"), "{page}");
    assert!(
        page.contains("fresh") || page.contains("new link"),
        "{page}"
    );

    // Agents that accept JSON get JSON even when HTML is acceptable but ranked lower.
    let resp = tls
        .get(
            &s.host,
            "/",
            &[("accept", "application/json, text/html;q=0.5")],
        )
        .await;
    assert_eq!(error_code(&resp), "token_missing");

    // Token errors by every route: never the token in the body, JSON or HTML.
    let other = s.gw.create_sandbox(&[s.port]).await;
    let cookie = format!("__Host-sandgate={t}");
    for accept in ["application/json", browser] {
        for (host, headers) in [
            (s.host.clone(), vec![("x-sandgate-token", format!("{t}x"))]),
            (
                sandbox_host(s.port, &other),
                vec![("x-sandgate-token", t.clone())],
            ),
            (
                sandbox_host(s.port, &other),
                vec![("cookie", cookie.clone())],
            ),
            (
                sandbox_host(s.port, &other),
                vec![("authorization", format!("Bearer {t}"))],
            ),
        ] {
            let mut h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            h.push(("accept", accept));
            let resp = tls.get(&host, "/", &h).await;
            assert!(resp.status().is_client_error(), "{}", resp.status());
            assert_body_free_of(&resp, &t);
            if accept == browser {
                assert!(resp.headers()["content-type"]
                    .to_str()
                    .unwrap()
                    .starts_with("text/html"));
            } else {
                assert!(!error_code(&resp).is_empty());
            }
        }
        let link = format!("/?_sandgate_token={t}");
        let resp = tls
            .get(&sandbox_host(s.port, &other), &link, &[("accept", accept)])
            .await;
        assert_eq!(resp.status(), StatusCode::FORBIDDEN);
        assert_body_free_of(&resp, &t);
    }
    assert_eq!(s.echo.count(), 0);
}
