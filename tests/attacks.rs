//! Attacks over real sockets with raw bytes, where a client library would refuse to send the
//! input: HTTP/1.1 request smuggling, HTTP/2 abuse (connection-specific headers, lying
//! `content-length`, `:authority` ≠ `host`, rapid reset, CONTINUATION floods), SSRF through
//! hosts, headers and absolute-form targets, and path tricks.
//!
//! Every malicious request carries a valid token, so a gateway that let it through would reach
//! the upstream; each test checks the answer, that the connection is closed where it must be,
//! and through [`Echo`] what the upstream saw.
#![allow(clippy::unwrap_used)] // helpers here are test code too

mod common;

use std::time::{Duration, Instant};

use common::h2raw::{self, Outcome};
use common::*;
use http::StatusCode;

/// A gateway with one sandbox whose port is served by an [`Echo`], and a token for it.
struct Setup {
    echo: Echo,
    gw: TestGateway,
    id: String,
    port: u16,
    host: String,
    token: String,
}

async fn setup() -> Setup {
    let echo = Echo::start().await;
    let gw = TestGateway::start().await;
    let port = echo.port();
    let id = gw.create_sandbox(&[port]).await;
    let token = gw.token(&id, port).await;
    Setup {
        host: sandbox_host(port, &id),
        echo,
        gw,
        id,
        port,
        token,
    }
}

/// Long enough for any answer on a loaded machine; a connection still open after it was kept
/// alive.
const WAIT: Duration = Duration::from_secs(4);

impl Setup {
    /// A second request, valid on its own: if it ever reaches the upstream, the gateway and
    /// some parser disagreed about where the first request ended.
    fn smuggled(&self) -> String {
        format!(
            "GET /smuggled HTTP/1.1\r\nHost: {}\r\nX-Sandgate-Token: {}\r\n\r\n",
            self.host, self.token
        )
    }

    async fn raw(&self, request: &str) -> RawAnswer {
        raw_exchange(&self.gw.tls(), &self.host, request.as_bytes(), WAIT).await
    }

    fn assert_nothing_smuggled(&self, case: &str) {
        for seen in self.echo.requests() {
            assert!(
                !seen.uri.contains("smuggled"),
                "{case}: the smuggled request reached the upstream: {seen:?}"
            );
        }
    }

    /// The gateway answers 400 (its own or hyper's), closes the connection, and the upstream
    /// sees nothing.
    async fn assert_refused(&self, case: &str, request: &str) {
        let before = self.echo.count();
        let answer = self.raw(request).await;
        assert_eq!(answer.status(), 400, "{case}: {}", answer.text);
        assert_eq!(answer.statuses(), vec![400], "{case}: {}", answer.text);
        assert!(
            answer.closed,
            "{case}: the connection stayed open after the 400"
        );
        assert_eq!(
            self.echo.count(),
            before,
            "{case}: the upstream saw {:?}",
            self.echo.requests()
        );
        self.assert_nothing_smuggled(case);
    }
}

#[tokio::test]
async fn raw_requests_reach_the_upstream_when_well_formed() {
    // The baseline for every test below: the same raw bytes, minus the attack, are forwarded.
    let s = setup().await;
    let answer = s
        .raw(&format!(
            "POST /ok HTTP/1.1\r\nHost: {}\r\nX-Sandgate-Token: {}\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
            s.host, s.token
        ))
        .await;
    assert_eq!(answer.statuses(), vec![200], "{}", answer.text);
    assert!(answer.closed);
    let seen = s.echo.last();
    assert_eq!(seen.uri, "/ok");
    assert_eq!(&seen.body[..], b"hello");
}

#[tokio::test]
async fn transfer_encoding_other_than_chunked_is_refused() {
    let s = setup().await;
    let (h, t, tail) = (&s.host, &s.token, s.smuggled());
    for (case, te) in [
        ("gzip, chunked", "Transfer-Encoding: gzip, chunked"),
        ("chunked, identity", "Transfer-Encoding: chunked, identity"),
        ("xchunked", "Transfer-Encoding: xchunked"),
        ("chunked twice", "Transfer-Encoding: chunked, chunked"),
        (
            "two TE headers",
            "Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked",
        ),
        (
            "two TE headers, chunked first",
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: identity",
        ),
    ] {
        s.assert_refused(
            case,
            &format!("POST / HTTP/1.1\r\nHost: {h}\r\nX-Sandgate-Token: {t}\r\n{te}\r\n\r\n0\r\n\r\n{tail}"),
        )
        .await;
    }
    // HTTP/1.0 has no chunked coding at all.
    s.assert_refused(
        "TE on HTTP/1.0",
        &format!("POST / HTTP/1.0\r\nHost: {h}\r\nX-Sandgate-Token: {t}\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{tail}"),
    )
    .await;
}

#[tokio::test]
async fn content_length_with_transfer_encoding_never_smuggles() {
    // RFC 9112 §6.1: a server may reject the pair, or use Transfer-Encoding alone, and must
    // close the connection after answering either way. hyper (below the gateway) does the
    // latter and drops Content-Length, so the gateway cannot tell; either answer passes here,
    // but the upstream must see at most one request framed by the chunked coding, and the
    // connection must close so the bytes after the chunked body are never read as a request.
    let s = setup().await;
    let (h, t, tail) = (&s.host, &s.token, s.smuggled());
    for (case, framing) in [
        (
            "CL then TE",
            "Content-Length: 5\r\nTransfer-Encoding: chunked",
        ),
        (
            "TE then CL",
            "Transfer-Encoding: chunked\r\nContent-Length: 5",
        ),
    ] {
        let before = s.echo.count();
        let answer = s
            .raw(&format!(
                "POST /cl-te HTTP/1.1\r\nHost: {h}\r\nX-Sandgate-Token: {t}\r\n{framing}\r\n\r\n0\r\n\r\n{tail}"
            ))
            .await;
        assert!(answer.closed, "{case}: the connection stayed open");
        s.assert_nothing_smuggled(case);
        match answer.statuses().as_slice() {
            [400] => assert_eq!(s.echo.count(), before, "{case}"),
            [200] => {
                let seen = s.echo.requests();
                assert_eq!(seen.len(), before + 1, "{case}: {seen:?}");
                let last = seen.last().unwrap();
                assert_eq!(last.uri, "/cl-te");
                assert!(last.body.is_empty(), "{case}: body {:?}", last.body);
                assert!(
                    last.headers
                        .get("content-length")
                        .is_none_or(|v| v.as_bytes() == b"0"),
                    "{case}: the upstream got a contradicting length: {:?}",
                    last.headers
                );
            }
            other => panic!("{case}: statuses {other:?}: {}", answer.text),
        }
    }
}

#[tokio::test]
async fn malformed_content_length_is_refused() {
    let s = setup().await;
    let (h, t, tail) = (&s.host, &s.token, s.smuggled());
    for (case, cl) in [
        ("two differing", "Content-Length: 5\r\nContent-Length: 6"),
        ("plus sign", "Content-Length: +5"),
        ("list", "Content-Length: 5,5"),
        ("hex", "Content-Length: 0x5"),
        ("negative", "Content-Length: -5"),
        ("space inside", "Content-Length: 5 5"),
    ] {
        s.assert_refused(
            case,
            &format!(
                "POST / HTTP/1.1\r\nHost: {h}\r\nX-Sandgate-Token: {t}\r\n{cl}\r\n\r\nhello{tail}"
            ),
        )
        .await;
    }
}

#[tokio::test]
async fn malformed_header_lines_are_refused() {
    let s = setup().await;
    let (h, t, tail) = (&s.host, &s.token, s.smuggled());
    for (case, line) in [
        // obs-fold: the continuation would hide a header from one parser and not another.
        ("obs-fold", "X-Folded: a\r\n Transfer-Encoding: chunked"),
        ("obs-fold with a tab", "X-Folded: a\r\n\tcontinued"),
        ("NUL in a value", "X-Nul: a\0b"),
        ("bare CR in a value", "X-Cr: a\rTransfer-Encoding: chunked"),
        ("space before the colon", "Transfer-Encoding : chunked"),
    ] {
        s.assert_refused(
            case,
            &format!(
                "GET / HTTP/1.1\r\nHost: {h}\r\nX-Sandgate-Token: {t}\r\n{line}\r\n\r\n{tail}"
            ),
        )
        .await;
    }
}

#[tokio::test]
async fn bare_lf_line_endings_never_smuggle() {
    // RFC 9112 §2.2 lets a recipient accept a bare LF as a line end, and hyper's parser does.
    // What matters is that the gateway's reading is the one the upstream gets: it re-frames the
    // request with CRLF, so a second parser cannot find a different message in it. Either a
    // 400 that closes the connection, or exactly the one request as the LF reading frames it.
    let s = setup().await;
    let (h, t, tail) = (&s.host, &s.token, s.smuggled());
    let body = tail.clone();
    let request = format!(
        "POST /lf HTTP/1.1\nHost: {h}\nX-Sandgate-Token: {t}\nX-Split: a\nContent-Length: {}\nConnection: close\n\n{body}",
        body.len()
    );
    let answer = s.raw(&request).await;
    assert!(answer.closed, "{}", answer.text);
    match answer.statuses().as_slice() {
        [400] => assert_eq!(s.echo.count(), 0),
        [200] => {
            let seen = s.echo.requests();
            assert_eq!(seen.len(), 1, "{seen:?}");
            assert_eq!(seen[0].uri, "/lf");
            // The upstream got the header and the body as the LF reading has them.
            assert_eq!(seen[0].headers["x-split"], "a");
            assert_eq!(seen[0].body, body.as_bytes());
        }
        other => panic!("statuses {other:?}: {}", answer.text),
    }
    s.assert_nothing_smuggled("bare LF");
}

#[tokio::test]
async fn malformed_chunked_framing_is_refused() {
    // The head is forwarded before the body is read, so the upstream may see a request start;
    // it must never get a body, and the client gets a 400 (its fault), not a 200 or a 502.
    let s = setup().await;
    let (h, t, tail) = (&s.host, &s.token, s.smuggled());
    for (case, body) in [
        ("bare LF in chunk lines", "5\nhello\n0\n\n"),
        (
            "chunk size overflow",
            "fffffffffffffffffffff\r\nhello\r\n0\r\n\r\n",
        ),
        ("0x chunk size", "0x5\r\nhello\r\n0\r\n\r\n"),
        ("negative chunk size", "-5\r\nhello\r\n0\r\n\r\n"),
        ("chunk longer than its size", "3\r\nhello\r\n0\r\n\r\n"),
    ] {
        let answer = s
            .raw(&format!(
                "POST /chunks HTTP/1.1\r\nHost: {h}\r\nX-Sandgate-Token: {t}\r\nTransfer-Encoding: chunked\r\n\r\n{body}{tail}"
            ))
            .await;
        assert_eq!(answer.statuses(), vec![400], "{case}: {}", answer.text);
        assert!(answer.closed, "{case}: the connection stayed open");
        for seen in s.echo.requests() {
            assert!(
                seen.body.is_empty(),
                "{case}: the upstream got {:?}",
                seen.body
            );
        }
        s.assert_nothing_smuggled(case);
    }
}

#[tokio::test]
async fn missing_duplicate_or_contradicting_hosts_are_refused() {
    let s = setup().await;
    let (h, t, tail) = (&s.host, &s.token, s.smuggled());
    s.assert_refused(
        "missing Host",
        &format!("GET / HTTP/1.1\r\nX-Sandgate-Token: {t}\r\n\r\n{tail}"),
    )
    .await;
    s.assert_refused(
        "duplicate Host, same value",
        &format!("GET / HTTP/1.1\r\nHost: {h}\r\nHost: {h}\r\nX-Sandgate-Token: {t}\r\n\r\n{tail}"),
    )
    .await;
    s.assert_refused(
        "duplicate Host, another value",
        &format!(
            "GET / HTTP/1.1\r\nHost: {h}\r\nHost: {BASE}\r\nX-Sandgate-Token: {t}\r\n\r\n{tail}"
        ),
    )
    .await;
    s.assert_refused(
        "absolute-form target for another host",
        &format!("GET https://{BASE}/v1/sandboxes HTTP/1.1\r\nHost: {h}\r\nX-Sandgate-Token: {t}\r\n\r\n{tail}"),
    )
    .await;
    s.assert_refused(
        "absolute-form target with userinfo",
        &format!("GET http://{h}@127.0.0.1/ HTTP/1.1\r\nHost: {h}\r\nX-Sandgate-Token: {t}\r\n\r\n{tail}"),
    )
    .await;
}

#[tokio::test]
async fn a_request_hidden_in_a_body_stays_a_body() {
    let s = setup().await;
    let (h, t) = (&s.host, &s.token);
    let hidden = s.smuggled();
    // Content-Length framing.
    let answer = s
        .raw(&format!(
            "POST /outer HTTP/1.1\r\nHost: {h}\r\nX-Sandgate-Token: {t}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{hidden}",
            hidden.len()
        ))
        .await;
    assert_eq!(answer.statuses(), vec![200], "{}", answer.text);
    // Chunked framing, the hidden request split across chunks.
    let (a, b) = hidden.split_at(hidden.len() / 2);
    let answer = s
        .raw(&format!(
            "POST /outer HTTP/1.1\r\nHost: {h}\r\nX-Sandgate-Token: {t}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{:x}\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\n\r\n",
            a.len(),
            b.len()
        ))
        .await;
    assert_eq!(answer.statuses(), vec![200], "{}", answer.text);

    let seen = s.echo.requests();
    assert_eq!(seen.len(), 2, "{seen:?}");
    for r in &seen {
        assert_eq!(r.uri, "/outer");
        assert_eq!(r.body, hidden.as_bytes());
    }
    s.assert_nothing_smuggled("hidden in a body");
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order_and_each_is_checked() {
    // Two well-formed requests in one write: the second carries no token and must be refused
    // on its own merits, whatever the first one was.
    let s = setup().await;
    let (h, t) = (&s.host, &s.token);
    let answer = s
        .raw(&format!(
            "GET /first HTTP/1.1\r\nHost: {h}\r\nX-Sandgate-Token: {t}\r\n\r\nGET /second HTTP/1.1\r\nHost: {h}\r\nConnection: close\r\n\r\n"
        ))
        .await;
    assert_eq!(answer.statuses(), vec![200, 401], "{}", answer.text);
    let seen = s.echo.requests();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].uri, "/first");
}

// -------------------------------------------------------------------------------------------------
// HTTP/2

impl Setup {
    fn h2_request<'a>(&'a self, path: &'a str) -> Vec<(&'a str, &'a str)> {
        vec![
            (":method", "GET"),
            (":scheme", "https"),
            (":authority", &self.host),
            (":path", path),
            ("x-sandgate-token", &self.token),
        ]
    }
}

#[tokio::test]
async fn hand_made_h2_requests_reach_the_upstream_when_well_formed() {
    // Validates the hand-written frames and HPACK the tests below rely on.
    let s = setup().await;
    let mut conn = h2raw::Conn::open(&s.gw.tls(), &s.host).await;
    assert!(conn.headers(1, &s.h2_request("/h2-ok"), true).await);
    assert_eq!(conn.outcome(1, WAIT).await, Outcome::Status(200));
    let mut post = s.h2_request("/h2-post");
    post[0] = (":method", "POST");
    post.push(("content-length", "5"));
    assert!(conn.headers(3, &post, false).await);
    assert!(conn.send(h2raw::DATA, h2raw::END_STREAM, 3, b"hello").await);
    assert_eq!(conn.outcome(3, WAIT).await, Outcome::Status(200));
    let seen = s.echo.requests();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(seen[0].uri, "/h2-ok");
    assert_eq!(&seen[1].body[..], b"hello");
}

#[tokio::test]
async fn h2_connection_specific_headers_are_stream_errors() {
    let s = setup().await;
    for (name, value) in [
        ("connection", "keep-alive"),
        ("transfer-encoding", "chunked"),
        ("keep-alive", "timeout=5"),
        ("proxy-connection", "keep-alive"),
        ("upgrade", "websocket"),
        ("te", "gzip"),
    ] {
        let mut conn = h2raw::Conn::open(&s.gw.tls(), &s.host).await;
        let mut fields = s.h2_request("/h2-bad");
        fields.push((name, value));
        conn.headers(1, &fields, true).await;
        let outcome = conn.outcome(1, WAIT).await;
        assert!(
            outcome.is_error() || outcome == Outcome::Status(400),
            "{name}: {value} was answered {outcome:?}"
        );
        assert_eq!(s.echo.count(), 0, "{name}: {:?}", s.echo.requests());
    }
}

#[tokio::test]
async fn h2_content_length_that_disagrees_with_data_is_a_stream_error() {
    let s = setup().await;
    // More data than announced, and less data than announced.
    for (case, announced, data) in [
        ("longer", "5", &b"hello, smuggled world"[..]),
        ("shorter", "50", &b"hello"[..]),
    ] {
        let mut conn = h2raw::Conn::open(&s.gw.tls(), &s.host).await;
        let mut fields = s.h2_request("/h2-length");
        fields[0] = (":method", "POST");
        fields.push(("content-length", announced));
        conn.headers(1, &fields, false).await;
        conn.send(h2raw::DATA, h2raw::END_STREAM, 1, data).await;
        let outcome = conn.outcome(1, WAIT).await;
        assert!(
            outcome.is_error() || matches!(outcome, Outcome::Status(400 | 413 | 502)),
            "{case}: answered {outcome:?}"
        );
        // The upstream may have seen the head (the body is streamed), but never a body.
        for seen in s.echo.requests() {
            assert!(
                seen.body.is_empty(),
                "{case}: the upstream got a body {:?}",
                seen.body
            );
        }
    }
}

#[tokio::test]
async fn h2_authority_and_host_must_agree() {
    let s = setup().await;
    let h = s.host.clone();
    for (case, authority, host) in [
        ("host elsewhere", h.as_str(), "169.254.169.254"),
        ("authority elsewhere", "127.0.0.1", h.as_str()),
        ("host another gateway name", h.as_str(), BASE),
    ] {
        let mut conn = h2raw::Conn::open(&s.gw.tls(), &s.host).await;
        let mut fields = s.h2_request("/h2-authority");
        fields[2] = (":authority", authority);
        fields.push(("host", host));
        conn.headers(1, &fields, true).await;
        let outcome = conn.outcome(1, WAIT).await;
        assert!(
            outcome.is_error() || outcome == Outcome::Status(400),
            "{case}: answered {outcome:?}"
        );
        assert_eq!(s.echo.count(), 0, "{case}: {:?}", s.echo.requests());
    }
}

/// Reads frames until GOAWAY or EOF; panics when neither comes within `wait`.
async fn expect_goaway_or_close(conn: &mut h2raw::Conn, wait: Duration) -> &'static str {
    let deadline = Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match conn.next(left).await {
            Some(f) if f.kind == h2raw::GOAWAY => return "GOAWAY",
            Some(_) => continue,
            None => {
                assert!(
                    conn.closed,
                    "the gateway neither sent GOAWAY nor closed within {wait:?}"
                );
                return "closed";
            }
        }
    }
}

/// A second, well-behaved client gets through on its own connections.
async fn assert_others_still_served(s: &Setup, path: &str) {
    let before = s.echo.count();
    let resp = h2_get(
        &s.gw.tls(),
        &s.host,
        path,
        &[("x-sandgate-token", &s.token)],
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let resp =
        s.gw.tls()
            .get(&s.host, path, &[("x-sandgate-token", &s.token)])
            .await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(s.echo.count(), before + 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_rapid_reset_gets_goaway_while_others_are_served() {
    let s = setup().await;
    let mut conn = h2raw::Conn::open(&s.gw.tls(), &s.host).await;
    let block = h2raw::hpack(&s.h2_request("/rapid-reset"));
    let mut burst = Vec::new();
    for i in 0..2000u32 {
        let stream = 2 * i + 1;
        burst.extend(h2raw::frame(
            h2raw::HEADERS,
            h2raw::END_HEADERS | h2raw::END_STREAM,
            stream,
            &block,
        ));
        // CANCEL
        burst.extend(h2raw::frame(
            h2raw::RST_STREAM,
            0,
            stream,
            &8u32.to_be_bytes(),
        ));
    }
    let started = Instant::now();
    // The gateway may close before it has read it all.
    let _ = conn.write(&burst).await;
    let how = expect_goaway_or_close(&mut conn, Duration::from_secs(5)).await;
    eprintln!(
        "rapid reset: {how} after {:?}; the upstream saw {} of 2000 requests",
        started.elapsed(),
        s.echo.count()
    );
    assert_others_still_served(&s, "/after-rapid-reset").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_continuation_flood_gets_goaway_while_others_are_served() {
    let s = setup().await;
    let mut conn = h2raw::Conn::open(&s.gw.tls(), &s.host).await;
    let first = h2raw::hpack(&s.h2_request("/continuation"));
    let pad = "p".repeat(100);
    let more = h2raw::hpack(&[("x-pad", pad.as_str())]);
    let mut flood = h2raw::frame(h2raw::HEADERS, h2raw::END_STREAM, 1, &first);
    // ~1.1 MB of header block, never ended: far beyond the 64 KiB header list limit.
    for _ in 0..10_000 {
        flood.extend(h2raw::frame(h2raw::CONTINUATION, 0, 1, &more));
    }
    let _ = conn.write(&flood).await;
    // A 431 or a reset for the stream is fine too, as long as the flood stops being read.
    let deadline = Instant::now() + Duration::from_secs(5);
    let outcome = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match conn.next(left).await {
            Some(f) if f.kind == h2raw::GOAWAY => break "GOAWAY".to_string(),
            Some(f) if f.kind == h2raw::RST_STREAM && f.stream == 1 => break "RST".to_string(),
            Some(f) if f.kind == h2raw::HEADERS && f.stream == 1 => {
                let status = h2raw::status(&f.payload);
                assert_eq!(status, Some(431), "the flood was answered {status:?}");
                break "431".to_string();
            }
            Some(_) => continue,
            None => {
                assert!(
                    conn.closed,
                    "the gateway kept reading the CONTINUATION flood"
                );
                break "closed".to_string();
            }
        }
    };
    eprintln!("continuation flood: {outcome}");
    assert_eq!(s.echo.count(), 0, "{:?}", s.echo.requests());
    assert_others_still_served(&s, "/after-continuation-flood").await;
}

// -------------------------------------------------------------------------------------------------
// SSRF: nothing a client sends picks the upstream address

#[tokio::test]
async fn header_routing_cannot_borrow_another_sandboxs_token() {
    let s = setup().await;
    let other_echo = Echo::start().await;
    let other_port = other_echo.port();
    let other = s.gw.create_sandbox(&[other_port]).await;
    let other_token = s.gw.token(&other, other_port).await;
    let tls = s.gw.tls();

    // On the base domain: routed to the other sandbox with this sandbox's token.
    let resp = tls
        .get(
            BASE,
            "/",
            &[
                ("x-sandgate-sandbox", &other),
                ("x-sandgate-port", &other_port.to_string()),
                ("x-sandgate-token", &s.token),
            ],
        )
        .await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    assert_eq!(error_code(&resp), "token_scope");
    // The right sandbox, the wrong port.
    let resp = tls
        .get(
            BASE,
            "/",
            &[
                ("x-sandgate-sandbox", &s.id),
                ("x-sandgate-port", &other_port.to_string()),
                ("x-sandgate-token", &s.token),
            ],
        )
        .await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    assert_eq!(error_code(&resp), "token_scope");
    // On this sandbox's host, naming the other in headers with the other's token: the host
    // decides, and the other's token is not valid here.
    let resp = tls
        .get(
            &s.host,
            "/",
            &[
                ("x-sandgate-sandbox", &other),
                ("x-sandgate-port", &other_port.to_string()),
                ("x-sandgate-token", &other_token),
            ],
        )
        .await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    assert_eq!(error_code(&resp), "token_scope");

    assert_eq!(s.echo.count(), 0, "{:?}", s.echo.requests());
    assert_eq!(other_echo.count(), 0, "{:?}", other_echo.requests());

    // And the headers route where they say with the matching token.
    let resp = tls
        .get(
            BASE,
            "/via-headers",
            &[
                ("x-sandgate-sandbox", &other),
                ("x-sandgate-port", &other_port.to_string()),
                ("x-sandgate-token", &other_token),
            ],
        )
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(other_echo.last().uri, "/via-headers");
    assert_eq!(s.echo.count(), 0);
}

#[tokio::test]
async fn hosts_that_point_elsewhere_are_unknown() {
    let s = setup().await;
    let tls = s.gw.tls();
    let p = s.port;
    let tricks = [
        "127.0.0.1".to_string(),
        format!("127.0.0.1:{p}"),
        "169.254.169.254".to_string(),
        "metadata.google.internal".to_string(),
        "localhost".to_string(),
        format!("localhost:{p}"),
        "[::1]".to_string(),
        format!("[::1]:{p}"),
        format!("{}.evil.example", s.host),
        format!("{p}-{}.evil.example", s.id),
        format!("{p}-{}", s.id),
        format!("x.{}", s.host),
    ];
    for host in &tricks {
        let resp = get_with_sni(&tls, BASE, host, "/", &[("x-sandgate-token", &s.token)]).await;
        assert_eq!(
            resp.status(),
            StatusCode::MISDIRECTED_REQUEST,
            "Host {host}"
        );
        assert_eq!(error_code(&resp), "unknown_host", "Host {host}");
    }
    // Userinfo in a Host is not a host at all: malformed (400) or unknown (421).
    for host in [
        format!("{}@127.0.0.1", s.host),
        format!("{}@169.254.169.254:80", s.host),
        format!("127.0.0.1#@{}", s.host),
    ] {
        let resp = get_with_sni(&tls, BASE, &host, "/", &[("x-sandgate-token", &s.token)]).await;
        assert!(
            matches!(resp.status().as_u16(), 400 | 421),
            "Host {host}: {}",
            resp.status()
        );
    }
    assert_eq!(s.echo.count(), 0, "{:?}", s.echo.requests());
}

#[tokio::test]
async fn absolute_form_targets_cannot_pick_the_upstream() {
    let s = setup().await;
    let (h, t) = (&s.host, &s.token);
    let tail = s.smuggled();
    for target in [
        "http://169.254.169.254/latest/meta-data/".to_string(),
        format!("http://127.0.0.1:{}/", s.port),
        "http://localhost/".to_string(),
        format!("https://{BASE}/v1/credentials"),
    ] {
        s.assert_refused(
            &target,
            &format!("GET {target} HTTP/1.1\r\nHost: {h}\r\nX-Sandgate-Token: {t}\r\n\r\n{tail}"),
        )
        .await;
    }
    // An absolute-form target for the same host is fine, and goes to the registered address.
    let answer = s
        .raw(&format!(
            "GET https://{h}/absolute?q=1 HTTP/1.1\r\nHost: {h}\r\nX-Sandgate-Token: {t}\r\nConnection: close\r\n\r\n"
        ))
        .await;
    assert_eq!(answer.statuses(), vec![200], "{}", answer.text);
    let seen = s.echo.last();
    assert!(seen.uri.ends_with("/absolute?q=1"), "{}", seen.uri);
}

#[tokio::test]
async fn steering_headers_are_ignored_and_the_registered_upstream_answers() {
    let s = setup().await;
    let decoy = Echo::start().await;
    let decoy_port = decoy.port().to_string();
    let resp =
        s.gw.tls()
            .get(
                &s.host,
                "/steer",
                &[
                    ("x-sandgate-token", &s.token),
                    ("x-sandgate-port", &decoy_port),
                    ("x-sandgate-upstream", "169.254.169.254"),
                    ("x-forwarded-host", "169.254.169.254"),
                    ("x_forwarded_host", "169.254.169.254"),
                    ("x-forwarded-port", &decoy_port),
                    ("forwarded", "host=169.254.169.254;proto=http"),
                    ("x-real-ip", "127.0.0.1"),
                    ("x-original-url", "http://169.254.169.254/"),
                    ("x-rewrite-url", "http://169.254.169.254/"),
                ],
            )
            .await;
    assert_eq!(resp.status(), StatusCode::OK, "{:?}", resp.body());
    assert_eq!(decoy.count(), 0);
    let seen = s.echo.last();
    assert_eq!(seen.uri, "/steer");
    assert_eq!(seen.headers["host"], s.host.as_str());
    assert_eq!(seen.headers["x-forwarded-host"], s.host.as_str());
    for name in [
        "x-sandgate-port",
        "x-sandgate-upstream",
        "x_forwarded_host",
        "x-forwarded-port",
        "forwarded",
        "x-real-ip",
    ] {
        assert!(
            seen.headers.get(name).is_none(),
            "{name} reached the upstream"
        );
    }
}

// -------------------------------------------------------------------------------------------------
// Paths

#[tokio::test]
async fn paths_are_forwarded_byte_for_byte_and_never_route() {
    let s = setup().await;
    let other_echo = Echo::start().await;
    let other = s.gw.create_sandbox(&[other_echo.port()]).await;
    let other_host = sandbox_host(other_echo.port(), &other);
    let (h, t) = (&s.host, &s.token);
    let paths = [
        "/%2e%2e/".to_string(),
        "/%2e%2e/%2e%2e/etc/passwd".to_string(),
        "/a/../b".to_string(),
        "/a/./b/".to_string(),
        "//double".to_string(),
        "//169.254.169.254/latest".to_string(),
        "/%00".to_string(),
        "/%2F%2Fevil".to_string(),
        "/..;/admin".to_string(),
        "/%252e%252e/".to_string(),
        format!("/../{other_host}/"),
        format!("/%2e%2e/{other_host}/x?y=%2e%2e"),
        "/v1/sandboxes".to_string(),
        "/.well-known/jwks.json".to_string(),
    ];
    for path in &paths {
        let answer = s
            .raw(&format!(
                "GET {path} HTTP/1.1\r\nHost: {h}\r\nX-Sandgate-Token: {t}\r\nConnection: close\r\n\r\n"
            ))
            .await;
        assert_eq!(answer.statuses(), vec![200], "{path}: {}", answer.text);
        assert_eq!(&s.echo.last().uri, path, "the upstream saw another path");
    }
    assert_eq!(s.echo.count(), paths.len());
    assert_eq!(other_echo.count(), 0, "{:?}", other_echo.requests());

    // The same over HTTP/2, where the path is a pseudo-header.
    let mut conn = h2raw::Conn::open(&s.gw.tls(), &s.host).await;
    for (i, path) in ["/%2e%2e/", "/a/../b", "//double"].iter().enumerate() {
        let stream = 2 * i as u32 + 1;
        conn.headers(stream, &s.h2_request(path), true).await;
        assert_eq!(
            conn.outcome(stream, WAIT).await,
            Outcome::Status(200),
            "{path}"
        );
        assert_eq!(&s.echo.last().uri, path);
    }
    assert_eq!(other_echo.count(), 0);
}
