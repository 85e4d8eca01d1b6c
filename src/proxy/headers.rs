//! Header surgery for forwarded requests and responses: hop-by-hop removal, credential
//! stripping, and the identity headers the gateway adds.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// The cookie that carries a browser's session for one sandbox host.
pub const COOKIE_NAME: &str = "__Host-sandgate";
/// The query parameter a token arrives in before the exchange.
pub const QUERY_PARAM: &str = "_sandgate_token";
/// A WebSocket subprotocol entry that carries a token.
pub const SUBPROTOCOL_PREFIX: &str = "sandgate.token.";
/// The subprotocol a browser offers so that some protocol is always selected.
pub const SUBPROTOCOL_MARKER: &str = "sandgate";

pub static X_SANDGATE_TOKEN: HeaderName = HeaderName::from_static("x-sandgate-token");
pub static X_SANDGATE_SANDBOX: HeaderName = HeaderName::from_static("x-sandgate-sandbox");
pub static X_SANDGATE_PORT: HeaderName = HeaderName::from_static("x-sandgate-port");
static X_SANDGATE_SUBJECT: HeaderName = HeaderName::from_static("x-sandgate-subject");
static X_SANDGATE_TOKEN_ID: HeaderName = HeaderName::from_static("x-sandgate-token-id");
static X_SANDGATE_USER_METADATA: HeaderName = HeaderName::from_static("x-sandgate-user-metadata");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Hop-by-hop headers (RFC 9110 §7.6.1) plus the legacy ones proxies also drop.
fn hop_by_hop() -> [&'static HeaderName; 8] {
    [
        &header::CONNECTION,
        &KEEP_ALIVE,
        &PROXY_CONNECTION,
        &header::TE,
        &header::TRAILER,
        &header::TRANSFER_ENCODING,
        &header::UPGRADE,
        &header::PROXY_AUTHORIZATION,
    ]
}

/// True for header names the gateway owns on the way in: anything `X-Sandgate-*`,
/// `X-Forwarded-*`, `Forwarded` or `X-Real-IP`, also when spelled with underscores (which some
/// servers normalise to dashes).
fn is_reserved(name: &str) -> bool {
    let n = name.as_bytes();
    let starts = |prefix: &[u8]| {
        n.len() >= prefix.len()
            && n[..prefix.len()]
                .iter()
                .zip(prefix)
                .all(|(a, b)| a == b || (*a == b'_' && *b == b'-'))
    };
    starts(b"x-sandgate-") || starts(b"x-forwarded-") || name == "forwarded" || starts(b"x-real-ip")
}

/// Removes hop-by-hop headers, the headers a `Connection` header names (except `Host`), and
/// every reserved header the client sent. Returns the `Upgrade` value when the request asked
/// for a WebSocket upgrade (the only upgrade passed upstream; `h2c` never is).
pub fn strip_request(headers: &mut HeaderMap) -> Option<HeaderValue> {
    // Most requests carry none of these: one pass over the names spares a lookup per name.
    let hop = hop_by_hop();
    if !headers
        .keys()
        .any(|k| hop.contains(&k) || is_reserved(k.as_str()))
    {
        return None;
    }
    let upgrade = websocket_upgrade(headers);
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
            .filter(|n| n != header::HOST)
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for name in hop_by_hop() {
        headers.remove(name);
    }
    let reserved: Vec<HeaderName> = headers
        .keys()
        .filter(|k| is_reserved(k.as_str()))
        .cloned()
        .collect();
    for name in reserved {
        headers.remove(name);
    }
    upgrade
}

/// The `Upgrade` value when this is a WebSocket upgrade request.
fn websocket_upgrade(headers: &HeaderMap) -> Option<HeaderValue> {
    let connection_upgrade = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    if !connection_upgrade {
        return None;
    }
    let upgrade = headers.get(header::UPGRADE)?;
    upgrade
        .to_str()
        .ok()?
        .split(',')
        .any(|p| p.trim().eq_ignore_ascii_case("websocket"))
        .then(|| HeaderValue::from_static("websocket"))
}

/// Removes hop-by-hop headers from an upstream response.
pub fn strip_response(headers: &mut HeaderMap) {
    for name in hop_by_hop() {
        headers.remove(name);
    }
}

/// Who the request is from and for, as the upstream sees it.
pub struct Identity<'a> {
    pub subject: &'a str,
    pub token_id: &'a str,
    /// The `md` claim as compact JSON (`{}` when absent).
    pub metadata: &'a str,
    pub client_ip: std::net::IpAddr,
    /// The Host as received.
    pub host: &'a HeaderValue,
}

/// Adds the identity and forwarding headers. Called after [`strip_request`], so the client
/// cannot have supplied any of them.
pub fn add_identity(headers: &mut HeaderMap, id: &Identity<'_>) {
    let put = |headers: &mut HeaderMap, name: &HeaderName, value: &str| {
        if let Ok(v) = HeaderValue::from_str(value) {
            headers.insert(name.clone(), v);
        }
    };
    put(headers, &X_SANDGATE_SUBJECT, id.subject);
    put(headers, &X_SANDGATE_TOKEN_ID, id.token_id);
    put(headers, &X_SANDGATE_USER_METADATA, id.metadata);
    put(headers, &X_FORWARDED_FOR, &id.client_ip.to_string());
    headers.insert(X_FORWARDED_HOST.clone(), id.host.clone());
    headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("https"));
}

/// The value of our cookie, when the request carries it.
pub fn find_cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| {
            let (name, value) = pair.trim().split_once('=')?;
            (name.trim() == COOKIE_NAME).then(|| value.trim().trim_matches('"'))
        })
}

/// Removes our cookie from every `Cookie` header, keeping the app's own cookies as sent.
pub fn remove_cookie(headers: &mut HeaderMap) {
    if find_cookie(headers).is_none() {
        return;
    }
    let kept: Vec<String> = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .map(str::trim)
                .filter(|pair| {
                    pair.split_once('=')
                        .map_or(pair.trim() != COOKIE_NAME, |(n, _)| n.trim() != COOKIE_NAME)
                })
                .collect::<Vec<_>>()
                .join("; ")
        })
        .filter(|v| !v.is_empty())
        .collect();
    headers.remove(header::COOKIE);
    for v in kept {
        if let Ok(v) = HeaderValue::from_str(&v) {
            headers.append(header::COOKIE, v);
        }
    }
}

/// The token in a `Sec-WebSocket-Protocol` offer, if any.
pub fn find_subprotocol_token(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .find_map(|p| p.trim().strip_prefix(SUBPROTOCOL_PREFIX))
}

/// Removes our entries (`sandgate.token.*`, `sandgate`) from the offered subprotocols.
/// Returns whether the client offered the `sandgate` marker.
pub fn remove_subprotocols(headers: &mut HeaderMap) -> bool {
    if !headers.contains_key(header::SEC_WEBSOCKET_PROTOCOL) {
        return false;
    }
    let mut marker = false;
    let kept: Vec<String> = headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|p| {
            if *p == SUBPROTOCOL_MARKER {
                marker = true;
                false
            } else {
                !p.is_empty() && !p.starts_with(SUBPROTOCOL_PREFIX)
            }
        })
        .map(str::to_string)
        .collect();
    headers.remove(header::SEC_WEBSOCKET_PROTOCOL);
    if !kept.is_empty() {
        if let Ok(v) = HeaderValue::from_str(&kept.join(", ")) {
            headers.insert(header::SEC_WEBSOCKET_PROTOCOL, v);
        }
    }
    marker
}

/// Splits `_sandgate_token` out of a raw query. Returns the token (the first occurrence) and
/// the remaining query with every occurrence removed and every other byte as received.
pub fn split_query_token(query: &str) -> (Option<&str>, String) {
    let mut token = None;
    let mut rest = String::with_capacity(query.len());
    for pair in query.split('&') {
        let name = pair.split_once('=').map_or(pair, |(n, _)| n);
        if name == QUERY_PARAM {
            if token.is_none() {
                token = pair.split_once('=').map(|(_, v)| v);
            }
            continue;
        }
        if !rest.is_empty() {
            rest.push('&');
        }
        rest.push_str(pair);
    }
    (token, rest)
}

/// True when the raw query mentions our parameter at all.
pub fn query_has_token(query: &str) -> bool {
    query
        .split('&')
        .any(|pair| pair.split_once('=').map_or(pair, |(n, _)| n) == QUERY_PARAM)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn reserved_and_hop_by_hop_headers_go() {
        let mut h = map(&[
            ("host", "x"),
            ("connection", "keep-alive, x-app, host, x-sandgate-subject"),
            ("x-app", "1"),
            ("x-sandgate-subject", "forged"),
            ("x_sandgate_token_id", "forged"),
            ("x-forwarded-for", "1.2.3.4"),
            ("X_Forwarded_Host", "evil"),
            ("forwarded", "for=1.2.3.4"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("authorization", "Basic abc"),
        ]);
        assert!(strip_request(&mut h).is_none());
        assert_eq!(h.len(), 2, "{h:?}");
        assert_eq!(h["host"], "x");
        assert_eq!(h["authorization"], "Basic abc");
    }

    #[test]
    fn only_websocket_upgrades_survive() {
        let mut h = map(&[("connection", "Upgrade"), ("upgrade", "websocket")]);
        assert_eq!(strip_request(&mut h).unwrap(), "websocket");
        let mut h = map(&[
            ("connection", "Upgrade, HTTP2-Settings"),
            ("upgrade", "h2c"),
        ]);
        assert!(strip_request(&mut h).is_none());
        assert!(h.is_empty());
    }

    #[test]
    fn cookies_and_subprotocols() {
        let mut h = map(&[
            ("cookie", "a=1; __Host-sandgate=tok; b=2"),
            ("cookie", "__Host-sandgate=x"),
        ]);
        assert_eq!(find_cookie(&h), Some("tok"));
        remove_cookie(&mut h);
        assert_eq!(h.get_all("cookie").iter().count(), 1);
        assert_eq!(h["cookie"], "a=1; b=2");

        let mut h = map(&[(
            "sec-websocket-protocol",
            "sandgate.token.abc, sandgate, chat",
        )]);
        assert_eq!(find_subprotocol_token(&h), Some("abc"));
        assert!(remove_subprotocols(&mut h));
        assert_eq!(h["sec-websocket-protocol"], "chat");
        let mut h = map(&[("sec-websocket-protocol", "sandgate.token.abc")]);
        assert!(!remove_subprotocols(&mut h));
        assert!(h.is_empty());
    }

    #[test]
    fn query_token_is_split_out_byte_for_byte() {
        let (t, rest) = split_query_token("a=%2F1&_sandgate_token=tok&b&_sandgate_token=2");
        assert_eq!(t, Some("tok"));
        assert_eq!(rest, "a=%2F1&b");
        assert!(query_has_token("x=1&_sandgate_token"));
        assert!(!query_has_token("x_sandgate_token=1"));
    }
}
