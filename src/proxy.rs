//! The data plane: route → authenticate → forward.
//!
//! Every request on the TLS listener comes through [`Proxy::serve`]. The Host (or `:authority`)
//! decides what it is: the base domain's control API, header-routed sandbox traffic on the base
//! domain, host-routed sandbox traffic on `<port>-<id>.<base_domain>`, or an unknown host (421).
//! Sandbox traffic is admitted only with a connect token valid for exactly that sandbox and
//! port; the token is stripped and identity headers are added before the request is streamed
//! to the sandbox's registered address, the only address the proxy ever connects to.

pub mod body;
pub mod connector;
pub mod headers;
pub mod upstream;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use http::header::{self, HeaderMap, HeaderValue};
use http::request::Parts;
use http::{Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::error::HttpError;
use crate::gateway::Gateway;
use crate::sandbox::{self, PortTarget, Route};
use crate::telemetry::RouteKind;
use crate::token::{self, Claims};
use crate::tracker;
use crate::unix_now;

use self::body::GuardedBody;
use self::headers::Identity;
use self::upstream::PolicedConnector;

/// The client's address, put in request extensions for the control API's audit log.
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub SocketAddr);

/// What the proxy knows about the client connection a request arrived on.
#[derive(Debug)]
pub struct ConnContext {
    pub remote: SocketAddr,
    /// Registration for revocation: cancelled when a token or sandbox it used is revoked.
    pub conn: tracker::Connection,
    /// When the connection was accepted, and milliseconds from then to its latest request:
    /// an HTTP/2 connection with no new request for the idle timeout is wound down.
    pub started: Instant,
    pub last_request_ms: std::sync::atomic::AtomicU64,
}

impl ConnContext {
    pub fn new(remote: SocketAddr, conn: tracker::Connection) -> ConnContext {
        ConnContext {
            remote,
            conn,
            started: Instant::now(),
            last_request_ms: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Notes that a request arrived.
    pub fn touch(&self) {
        let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_request_ms
            .store(ms, std::sync::atomic::Ordering::Relaxed);
    }

    /// Completes once no request has arrived for `idle`.
    pub async fn idle_for(&self, idle: std::time::Duration) {
        loop {
            let last = std::time::Duration::from_millis(
                self.last_request_ms
                    .load(std::sync::atomic::Ordering::Relaxed),
            );
            let quiet = self.started.elapsed().saturating_sub(last);
            if quiet >= idle {
                return;
            }
            tokio::time::sleep(idle - quiet).await;
        }
    }
}

/// How a token was presented, in order of precedence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    Header,
    Bearer,
    Subprotocol,
    Query,
    Cookie,
}

/// What routing made of a request, for the metrics and the access log.
struct Routed {
    kind: RouteKind,
    /// The sandbox and port the request named, when it named one (whether or not it was
    /// admitted). The id was allocated for routing anyway; it is only moved out here.
    sandbox: Option<(String, u16)>,
}

impl Routed {
    const OTHER: Routed = Routed::kind(RouteKind::Other);

    const fn kind(kind: RouteKind) -> Routed {
        Routed {
            kind,
            sandbox: None,
        }
    }

    fn sandbox(kind: RouteKind, id: String, port: u16) -> Routed {
        Routed {
            kind,
            sandbox: Some((id, port)),
        }
    }
}

/// Where a request is going, decided from its host alone.
enum Target<'a> {
    Base,
    Sandbox { port: u16, id: &'a str },
    Unknown,
}

/// The data plane service shared by every connection.
pub struct Proxy {
    gw: Arc<Gateway>,
    /// For command sandboxes, at addresses the orchestrator chose (a host port, or a port
    /// inside an isolated sandbox's network namespace).
    client: Client<connector::Connector, Body>,
    /// The same connector, for upgrades' dedicated connections.
    connector: connector::Connector,
    /// For `upstream` sandboxes, whose addresses an API caller chose: every new connection is
    /// held to the upstream policy, a host name resolved afresh each time.
    policed: Client<PolicedConnector, Body>,
    /// The same connector, for WebSocket upgrades (which dial their own connection).
    policed_connector: PolicedConnector,
    api: axum::Router,
    /// `.<base_domain>`: the suffix of every sandbox host.
    sandbox_suffix: Box<str>,
    /// Cancelled when the drain deadline passes: upgraded tunnels close then.
    hard_stop: CancellationToken,
    /// `[telemetry] access_log`, read once: off, a request pays this one check and nothing else.
    access_log: bool,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy").finish_non_exhaustive()
    }
}

impl Proxy {
    pub fn new(gw: Arc<Gateway>, api: axum::Router, hard_stop: CancellationToken) -> Proxy {
        let cfg = &gw.config.gateway;
        let connector = connector::Connector::new(
            Arc::clone(&gw.routes),
            Arc::clone(&gw.relay),
            cfg.upstream_connect_timeout,
        );
        let mut builder = Client::builder(TokioExecutor::new());
        builder
            .pool_idle_timeout(std::time::Duration::from_secs(30))
            .pool_max_idle_per_host(256)
            .set_host(false);
        let client = builder.build(connector.clone());
        let policed_connector = PolicedConnector::new(
            Arc::clone(&gw.upstream_policy),
            cfg.upstream_connect_timeout,
        );
        let policed = builder.build(policed_connector.clone());
        Proxy {
            connector,
            access_log: gw.config.telemetry.access_log,
            sandbox_suffix: format!(".{}", cfg.base_domain).into(),
            gw,
            client,
            policed,
            policed_connector,
            api,
            hard_stop,
        }
    }

    /// Answers one request. Never fails: every refusal is a response.
    pub async fn serve(
        self: Arc<Self>,
        req: Request<Incoming>,
        ctx: Arc<ConnContext>,
    ) -> Result<Response<Body>, Infallible> {
        let start = Instant::now();
        // Only the method is kept from the request for the access log; the rest of what it
        // logs comes from the routing and the response.
        let method = self.access_log.then(|| req.method().clone());
        let (routed, response) = self.dispatch(req, &ctx).await;
        let elapsed = start.elapsed();
        self.gw
            .metrics
            .observe(routed.kind, response.status().as_u16(), elapsed);
        if let Some(method) = method {
            access_line(&method, &routed, &response, elapsed, ctx.remote);
        }
        Ok(response)
    }

    async fn dispatch(
        &self,
        mut req: Request<Incoming>,
        ctx: &Arc<ConnContext>,
    ) -> (Routed, Response<Body>) {
        if req.method() == Method::CONNECT {
            // No tunnels to arbitrary targets, and no extended CONNECT for now.
            let e = HttpError::bad_request("CONNECT is not supported by this gateway");
            return (Routed::OTHER, e.to_response(req.headers()));
        }
        // A request whose framing or host is in doubt ends its HTTP/1 connection too: the
        // bytes after it cannot be trusted to start the next request.
        if let Err(e) = check_transfer_encoding(req.headers()) {
            let r = closing(e.to_response(req.headers()), req.version());
            return (Routed::OTHER, r);
        }
        let (host_value, host) = match request_host(&req) {
            Ok(h) => h,
            Err(e) => {
                let r = closing(e.to_response(req.headers()), req.version());
                return (Routed::OTHER, r);
            }
        };
        match self.classify(&host) {
            Target::Base => {
                if req.headers().contains_key(&headers::X_SANDGATE_SANDBOX) {
                    let routed = header_route(req.headers());
                    match routed {
                        Ok((id, port)) => {
                            let r = self.sandbox(req, ctx, port, &id, false, host_value).await;
                            (Routed::sandbox(RouteKind::Header, id, port), r)
                        }
                        Err(e) => (
                            Routed::kind(RouteKind::Header),
                            e.to_response(req.headers()),
                        ),
                    }
                } else {
                    req.extensions_mut().insert(ClientAddr(ctx.remote));
                    let response = match self.api.clone().oneshot(req).await {
                        Ok(r) => r,
                        Err(never) => match never {},
                    };
                    (Routed::kind(RouteKind::Api), response)
                }
            }
            Target::Sandbox { port, id } => {
                let id = id.to_string();
                let r = self.sandbox(req, ctx, port, &id, true, host_value).await;
                (Routed::sandbox(RouteKind::Sandbox, id, port), r)
            }
            Target::Unknown => (
                Routed::OTHER,
                HttpError::unknown_host().to_response(req.headers()),
            ),
        }
    }

    fn classify<'h>(&self, host: &'h str) -> Target<'h> {
        let base = &self.sandbox_suffix[1..];
        if host == base {
            return Target::Base;
        }
        let Some(label) = host.strip_suffix(&*self.sandbox_suffix) else {
            return Target::Unknown;
        };
        match parse_sandbox_label(label) {
            Some((port, id)) => Target::Sandbox { port, id },
            None => Target::Unknown,
        }
    }

    /// Sandbox traffic, host-routed (`via_host`) or header-routed.
    async fn sandbox(
        &self,
        req: Request<Incoming>,
        ctx: &Arc<ConnContext>,
        port: u16,
        id: &str,
        via_host: bool,
        host: HeaderValue,
    ) -> Response<Body> {
        if via_host && is_preflight(&req) {
            return self.preflight(req.headers(), id);
        }
        let (parts, body) = req.into_parts();
        match self.admit(&parts, ctx, port, id, via_host, &host).await {
            Ok(Admitted::Forward { claims, route }) => {
                self.forward(parts, body, ctx, &route, port, &claims, host)
                    .await
            }
            Ok(Admitted::Exchange {
                claims,
                cookie_token,
            }) => exchange(&parts.uri, &host, &claims, &cookie_token)
                .unwrap_or_else(|e| e.to_response(&parts.headers)),
            Err(e) => e.to_response(&parts.headers),
        }
    }

    /// Finds, verifies and scopes the token; checks the sandbox and the browser rules.
    async fn admit(
        &self,
        parts: &Parts,
        ctx: &ConnContext,
        port: u16,
        id: &str,
        via_host: bool,
        host: &HeaderValue,
    ) -> Result<Admitted, HttpError> {
        let Some((transport, token)) = find_token(parts, via_host)? else {
            return Err(HttpError::token_missing());
        };
        let now = unix_now();
        let epoch = self.gw.tokens.epoch();
        let claims = self.gw.tokens.verify(token, now)?;
        if claims.sbx != id || claims.port != port {
            return Err(HttpError::token_scope());
        }
        let route = match self.gw.routes.get(id) {
            Some(route) if route.live => route,
            _ => return Err(HttpError::sandbox_terminated()),
        };
        if route.port(port).is_none() {
            return Err(HttpError::token_scope());
        }
        if claims.once {
            if !self.gw.tokens.mark_used(&claims.jti, claims.exp) {
                return Err(token::TokenError::AlreadyUsed.into());
            }
            if self.gw.config.store.url.is_some() {
                // Cluster mode: another node may see the same token, so the shared store,
                // where the first use wins atomically, decides; and a use that cannot be
                // recorded is not allowed.
                match self.gw.store.mark_token_used(&claims.jti, claims.exp).await {
                    Ok(true) => {}
                    Ok(false) => return Err(token::TokenError::AlreadyUsed.into()),
                    Err(err) => return Err(err.into()),
                }
            } else {
                let store = Arc::clone(&self.gw.store);
                let (jti, exp) = (claims.jti.clone(), claims.exp);
                tokio::spawn(async move {
                    if let Err(err) = store.mark_token_used(&jti, exp).await {
                        tracing::error!(error = %err, "could not persist a single-use token's use");
                    }
                });
            }
        }
        // For the idle timeout: a relaxed load, and a store once a second at most.
        route.activity.touch(now);
        if transport == Transport::Query {
            // The cookie carries a reusable copy of the same grant (same jti, so revoking the
            // token ends the session too).
            let cookie_token = if claims.once {
                let mut reusable = (*claims).clone();
                reusable.once = false;
                self.gw.tokens.sign(&reusable)?
            } else {
                token.to_string()
            };
            return Ok(Admitted::Exchange {
                claims,
                cookie_token,
            });
        }
        if transport == Transport::Cookie
            && !cookie_request_allowed(&parts.method, &parts.headers, host, &route)
        {
            return Err(HttpError::forbidden(
                "a request from another origin may not use this sandbox's browser session",
            ));
        }
        if !ctx.conn.admit(
            &claims.jti,
            id,
            self.gw.config.gateway.max_connections_per_sandbox,
        ) {
            let mut e = HttpError::new(
                http::StatusCode::SERVICE_UNAVAILABLE,
                "too_many_connections",
                "this sandbox has as many open connections as the gateway allows; retry later",
            );
            e.retry_after = Some(1);
            return Err(e);
        }
        // A revocation between the checks above and the registration would miss this
        // connection; checking again after registering closes that window.
        if self.gw.tokens.revoked_since(&claims.jti, epoch) {
            return Err(token::TokenError::Revoked.into());
        }
        if !self.gw.routes.get(id).is_some_and(|r| r.live) {
            return Err(HttpError::sandbox_terminated());
        }
        Ok(Admitted::Forward { claims, route })
    }

    /// Streams the request to the sandbox and its answer back.
    #[allow(clippy::too_many_arguments)]
    async fn forward(
        &self,
        parts: Parts,
        body: Incoming,
        ctx: &Arc<ConnContext>,
        route: &Route,
        port: u16,
        claims: &Claims,
        host: HeaderValue,
    ) -> Response<Body> {
        let cfg = &self.gw.config.gateway;
        let Parts {
            method,
            uri,
            version,
            headers: mut hdrs,
            mut extensions,
            ..
        } = parts;
        let wants_html = crate::error::prefers_html(&hdrs);
        let fail = |e: HttpError| {
            if wants_html {
                e.html_response()
            } else {
                e.json_response()
            }
        };
        let Some(target) = route.port(port) else {
            return fail(HttpError::token_scope());
        };

        if let Some(len) = hdrs
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
        {
            if len > cfg.max_body_bytes {
                return fail(HttpError::body_too_large());
            }
        }

        let origin = hdrs.get(header::ORIGIN).cloned();
        let upgrade = headers::strip_request(&mut hdrs);
        strip_bearer(&mut hdrs);
        // Our cookie goes in every mode: header routing never reads it, but a client that sends
        // it anyway must not hand its session to the sandbox.
        headers::remove_cookie(&mut hdrs);
        let offered_marker = headers::remove_subprotocols(&mut hdrs);
        if route.rewrite_host {
            hdrs.insert(header::HOST, target.host_header.clone());
        } else {
            hdrs.insert(header::HOST, host.clone());
        }
        let metadata = claims
            .md
            .as_ref()
            .map(|m| serde_json::to_string(m).unwrap_or_else(|_| "{}".into()));
        headers::add_identity(
            &mut hdrs,
            &Identity {
                subject: &claims.sub,
                token_id: &claims.jti,
                metadata: metadata.as_deref().unwrap_or("{}"),
                client_ip: ctx.remote.ip(),
                host: &host,
            },
        );
        let upstream_uri = match upstream_uri(target, &uri) {
            Ok(u) => u,
            Err(e) => return fail(e),
        };

        if let Some(upgrade) =
            upgrade.filter(|_| version == Version::HTTP_11 && method == Method::GET)
        {
            hdrs.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            hdrs.insert(header::UPGRADE, upgrade);
            let on_client_upgrade = extensions.remove::<hyper::upgrade::OnUpgrade>();
            let mut up = Request::new(Body::empty());
            *up.method_mut() = method;
            // A dedicated connection writes the target as given: origin-form, as received.
            let origin_form = upstream_uri
                .path_and_query()
                .map_or_else(|| Uri::from_static("/"), |pq| Uri::from(pq.clone()));
            *up.uri_mut() = origin_form;
            *up.headers_mut() = hdrs;
            return match self
                .upgrade(up, on_client_upgrade, route, target, ctx, offered_marker)
                .await
            {
                Ok(r) => r,
                Err(e) => fail(e),
            };
        }

        let body = Body::new(GuardedBody::new(
            body,
            cfg.max_body_bytes,
            cfg.body_read_timeout,
        ));
        let mut up = Request::new(body);
        *up.method_mut() = method;
        *up.uri_mut() = upstream_uri;
        *up.headers_mut() = hdrs;
        let request = if route.policed {
            self.policed.request(up)
        } else {
            self.client.request(up)
        };
        let response = match tokio::time::timeout(cfg.upstream_response_timeout, request).await {
            Err(_) => return fail(HttpError::upstream_timeout()),
            Ok(Err(err)) => {
                if let Some((host, refused)) = upstream::refusal(&err) {
                    return fail(policy_refusal(route, host, refused));
                }
                tracing::debug!(error = %err, sandbox = %route.id, "upstream request failed");
                // The client's body failed while it was being forwarded: the client's fault,
                // not the sandbox's. What is left of that body is unread, so HTTP/1 closes.
                if let Some(e) = client_body_error(&err) {
                    return closing(fail(e), version);
                }
                return fail(HttpError::upstream_unreachable());
            }
            Ok(Ok(r)) => r,
        };
        let (mut rparts, rbody) = response.into_parts();
        headers::strip_response(&mut rparts.headers);
        add_cors(&mut rparts.headers, origin.as_ref(), route);
        Response::from_parts(rparts, Body::new(rbody))
    }

    /// Proxies a WebSocket upgrade on a dedicated upstream connection: a 101 becomes a tunnel
    /// both ways; anything else is relayed and the connection is never reused.
    async fn upgrade(
        &self,
        up: Request<Body>,
        on_client_upgrade: Option<hyper::upgrade::OnUpgrade>,
        route: &Route,
        target: &PortTarget,
        ctx: &Arc<ConnContext>,
        offered_marker: bool,
    ) -> Result<Response<Body>, HttpError> {
        let cfg = &self.gw.config.gateway;
        let Some(on_client_upgrade) = on_client_upgrade else {
            return Err(HttpError::bad_request("this connection cannot be upgraded"));
        };
        let stream = if route.policed {
            // The same connector as the pooled client's, so an upgrade is held to the same
            // upstream policy (it bounds itself by the connect timeout).
            let port = target.authority.port_u16().unwrap_or(80);
            match self
                .policed_connector
                .connect(target.authority.host(), port)
                .await
            {
                Ok(s) => connector::Upstream::Tcp(s),
                Err(upstream::ConnectError::Refused { host, refused }) => {
                    return Err(policy_refusal(route, &host, &refused))
                }
                Err(upstream::ConnectError::Timeout) => return Err(HttpError::upstream_timeout()),
                Err(_) => return Err(HttpError::upstream_unreachable()),
            }
        } else {
            match self.connector.dial(&target.authority).await {
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                    return Err(HttpError::upstream_timeout())
                }
                Err(_) => return Err(HttpError::upstream_unreachable()),
                Ok(s) => s,
            }
        };
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|_| HttpError::upstream_unreachable())?;
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        let mut response = match tokio::time::timeout(
            cfg.upstream_response_timeout,
            sender.send_request(up),
        )
        .await
        {
            Err(_) => return Err(HttpError::upstream_timeout()),
            Ok(Err(_)) => return Err(HttpError::upstream_unreachable()),
            Ok(Ok(r)) => r,
        };
        if response.status() != StatusCode::SWITCHING_PROTOCOLS {
            let (mut rparts, rbody) = response.into_parts();
            headers::strip_response(&mut rparts.headers);
            return Ok(Response::from_parts(rparts, Body::new(rbody)));
        }
        let on_upstream_upgrade = hyper::upgrade::on(&mut response);
        let mut client_response = Response::new(Body::empty());
        *client_response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let out = client_response.headers_mut();
        for (name, value) in response.headers() {
            out.append(name.clone(), value.clone());
        }
        if offered_marker && !out.contains_key(header::SEC_WEBSOCKET_PROTOCOL) {
            out.insert(
                header::SEC_WEBSOCKET_PROTOCOL,
                HeaderValue::from_static(headers::SUBPROTOCOL_MARKER),
            );
        }
        self.gw.metrics.upgrades.inc();
        let ctx = Arc::clone(ctx);
        let hard_stop = self.hard_stop.clone();
        let metrics = Arc::clone(&self.gw.metrics);
        let idle = cfg.websocket_idle_timeout;
        tokio::spawn(async move {
            let (client, upstream) = match tokio::join!(on_client_upgrade, on_upstream_upgrade) {
                (Ok(c), Ok(u)) => (c, u),
                _ => return,
            };
            let mut client = TokioIo::new(client);
            let mut upstream = TokioIo::new(upstream);
            tokio::select! {
                _ = tunnel(&mut client, &mut upstream, idle) => {}
                _ = ctx.conn.cancelled().cancelled() => {
                    metrics.revoked_connections.inc();
                }
                _ = hard_stop.cancelled() => {}
            }
        });
        Ok(client_response)
    }

    /// Answers a CORS preflight on a sandbox host, for listed origins only.
    fn preflight(&self, hdrs: &HeaderMap, id: &str) -> Response<Body> {
        let origin = hdrs.get(header::ORIGIN);
        let allowed = origin
            .and_then(|o| o.to_str().ok())
            .zip(self.gw.routes.get(id))
            .is_some_and(|(o, route)| route.live && route.allows_origin(o));
        let (Some(origin), true) = (origin, allowed) else {
            return HttpError::forbidden("this origin may not call this sandbox").to_response(hdrs);
        };
        let mut response = Response::new(Body::empty());
        *response.status_mut() = StatusCode::NO_CONTENT;
        let out = response.headers_mut();
        out.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
        out.insert(
            header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
            HeaderValue::from_static("true"),
        );
        if let Some(m) = hdrs.get(header::ACCESS_CONTROL_REQUEST_METHOD) {
            out.insert(header::ACCESS_CONTROL_ALLOW_METHODS, m.clone());
        }
        if let Some(h) = hdrs.get(header::ACCESS_CONTROL_REQUEST_HEADERS) {
            out.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, h.clone());
        }
        out.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static("600"),
        );
        out.insert(header::VARY, HeaderValue::from_static("Origin"));
        out.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        response
    }
}

/// Copies both ways until both sides have closed, or until nothing has moved in either
/// direction for `idle` (an abandoned WebSocket must not hold a connection forever).
async fn tunnel<A, B>(a: &mut A, b: &mut B, idle: std::time::Duration)
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut ar, mut aw) = tokio::io::split(a);
    let (mut br, mut bw) = tokio::io::split(b);
    let mut up = vec![0u8; 16 * 1024];
    let mut down = vec![0u8; 16 * 1024];
    let (mut a_open, mut b_open) = (true, true);
    while a_open || b_open {
        // Reads are cancel-safe, so losing a race to the other side or the timer loses nothing.
        tokio::select! {
            n = ar.read(&mut up), if a_open => match n {
                Ok(0) | Err(_) => {
                    a_open = false;
                    let _ = bw.shutdown().await;
                }
                Ok(n) => {
                    if bw.write_all(&up[..n]).await.is_err() {
                        return;
                    }
                }
            },
            n = br.read(&mut down), if b_open => match n {
                Ok(0) | Err(_) => {
                    b_open = false;
                    let _ = aw.shutdown().await;
                }
                Ok(n) => {
                    if aw.write_all(&down[..n]).await.is_err() {
                        return;
                    }
                }
            },
            _ = tokio::time::sleep(idle) => return,
        }
    }
}

/// The outcome of admission.
enum Admitted {
    /// Forward the request to the sandbox.
    Forward {
        claims: Arc<Claims>,
        route: Arc<Route>,
    },
    /// A query-parameter token: answer with the cookie exchange.
    Exchange {
        claims: Arc<Claims>,
        cookie_token: String,
    },
}

/// Logs a connection the upstream policy refused (which sandbox, its host, the address; nothing
/// secret) and gives the answer for it.
fn policy_refusal(route: &Route, host: &str, refused: &upstream::Refused) -> HttpError {
    tracing::warn!(
        sandbox = %route.id,
        host,
        address = %refused.address,
        reason = %refused,
        "upstream address refused by the upstream policy"
    );
    HttpError::upstream_refused()
}

/// One access-log line (`[telemetry] access_log`), at `info` with target `sandgate::access`.
///
/// Written when the response head is ready, where the metrics are recorded, so it covers
/// every answer on the TLS listener: forwarded responses, the gateway's own refusals on
/// sandbox hosts (401, 403, 410, 502, ...), control API calls and unknown hosts.
///
/// Never the path or the query: a query can carry the connect token (`_sandgate_token`),
/// and a path is the sandbox application's own data, which can hold secrets of its own
/// (reset links, signed URLs) that the gateway cannot tell apart; an application that wants
/// its paths logged logs them itself. No header either, so no token and no cookie.
/// `duration_ms` is the time to the response head (as in the latency metric). `bytes` is
/// the response body's declared size (its `Content-Length`, or the exact size of an answer
/// the gateway made itself), absent when the body is streamed without one: counting the
/// bytes as they pass would cost every chunk.
fn access_line(
    method: &Method,
    routed: &Routed,
    response: &Response<Body>,
    elapsed: std::time::Duration,
    client: SocketAddr,
) {
    let (sandbox, port) = match &routed.sandbox {
        Some((id, port)) => (Some(id.as_str()), Some(*port)),
        None => (None, None),
    };
    tracing::info!(
        target: "sandgate::access",
        method = %method,
        route = %routed.kind.as_str(),
        sandbox = sandbox.map(tracing::field::display),
        port,
        status = response.status().as_u16(),
        bytes = http_body::Body::size_hint(response.body()).exact(),
        // Microsecond resolution: most answers take well under a millisecond.
        duration_ms = elapsed.as_micros() as f64 / 1000.0,
        client = %client,
        "request"
    );
}

/// The answer for an upstream request that failed because the client's body did (too large,
/// stalled, broken), found in the error's source chain; `None` when the upstream failed.
fn client_body_error(err: &(dyn std::error::Error + 'static)) -> Option<HttpError> {
    let mut cause = Some(err);
    while let Some(e) = cause {
        if let Some(body) = e.downcast_ref::<body::BodyError>() {
            return Some(match body {
                body::BodyError::TooLarge => HttpError::body_too_large(),
                body::BodyError::Stalled => HttpError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "body_timeout",
                    "the request body stopped arriving before it was complete",
                ),
                body::BodyError::Client(_) => {
                    HttpError::bad_request("the request body was malformed or cut off")
                }
            });
        }
        cause = e.source();
    }
    None
}

/// Transfer-Encoding, when present, must be exactly `chunked`. hyper accepts any list that
/// ends in `chunked` (`gzip, chunked`, `chunked, chunked`) and decodes only the chunking, so the
/// upstream would get a body still in a coding nobody told it about; other gateways and servers
/// read such lists differently, which is what request smuggling feeds on.
fn check_transfer_encoding(hdrs: &HeaderMap) -> Result<(), HttpError> {
    let mut codings = 0;
    for value in hdrs.get_all(header::TRANSFER_ENCODING) {
        let value = value
            .to_str()
            .map_err(|_| HttpError::bad_request("invalid Transfer-Encoding"))?;
        for coding in value.split(',').map(str::trim).filter(|c| !c.is_empty()) {
            codings += 1;
            if codings > 1 || !coding.eq_ignore_ascii_case("chunked") {
                return Err(HttpError::bad_request(
                    "Transfer-Encoding other than a single `chunked` is not accepted",
                ));
            }
        }
    }
    Ok(())
}

/// Marks an HTTP/1 response as the last on its connection (hyper closes it once sent).
/// HTTP/2 has no such header; a stream's answer never affects its neighbours there.
fn closing(mut response: Response<Body>, version: Version) -> Response<Body> {
    if matches!(
        version,
        Version::HTTP_09 | Version::HTTP_10 | Version::HTTP_11
    ) {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// The request's host: its value as received and its canonical form (lowercase, no port, no
/// trailing dot). A missing, duplicated or contradictory host is a bad request.
fn request_host(req: &Request<Incoming>) -> Result<(HeaderValue, String), HttpError> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let header_host = hosts.next();
    if hosts.next().is_some() {
        return Err(HttpError::bad_request("more than one Host header"));
    }
    let uri_host = req.uri().authority();
    let value = match (header_host, uri_host) {
        (Some(h), Some(a)) => {
            if !h.as_bytes().eq_ignore_ascii_case(a.as_str().as_bytes()) {
                return Err(HttpError::bad_request(
                    "the request target's authority and the Host header disagree",
                ));
            }
            h.clone()
        }
        (Some(h), None) => h.clone(),
        (None, Some(a)) => HeaderValue::from_str(a.as_str())
            .map_err(|_| HttpError::bad_request("invalid authority"))?,
        (None, None) => return Err(HttpError::bad_request("the request has no Host")),
    };
    let text = value
        .to_str()
        .map_err(|_| HttpError::bad_request("invalid Host header"))?;
    let canonical =
        canonical_host(text).ok_or_else(|| HttpError::bad_request("invalid Host header"))?;
    Ok((value, canonical))
}

/// Lowercases, drops a `:port` and a trailing dot. `None` for malformed hosts.
pub fn canonical_host(host: &str) -> Option<String> {
    let name = if let Some(rest) = host.strip_prefix('[') {
        // IPv6 literal: never a sandbox or base host, but not malformed either.
        let end = rest.find(']')?;
        &host[..end + 2]
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) => {
                if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) || port.len() > 5 {
                    return None;
                }
                name
            }
            None => host,
        }
    };
    let name = name.strip_suffix('.').unwrap_or(name);
    // Empty labels (`a..b`, `.a`, a second trailing dot) make no DNS name.
    if name.is_empty()
        || (!name.starts_with('[') && name.split('.').any(str::is_empty))
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'[' | b']' | b':'))
    {
        return None;
    }
    Some(name.to_ascii_lowercase())
}

/// Parses `<port>-<id>`: a decimal port 1–65535 without sign or leading zero, and a sandbox id.
pub fn parse_sandbox_label(label: &str) -> Option<(u16, &str)> {
    let (port, id) = label.split_once('-')?;
    if port.is_empty()
        || port.len() > 5
        || port.starts_with('0')
        || !port.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let port: u16 = port.parse().ok().filter(|p| *p != 0)?;
    sandbox::is_valid_id(id).then_some((port, id))
}

/// Header routing: `X-Sandgate-Sandbox` and `X-Sandgate-Port`.
fn header_route(hdrs: &HeaderMap) -> Result<(String, u16), HttpError> {
    let id = hdrs
        .get(&headers::X_SANDGATE_SANDBOX)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|id| sandbox::is_valid_id(id))
        .ok_or_else(|| HttpError::bad_request("X-Sandgate-Sandbox is not a sandbox id"))?;
    let port = hdrs
        .get(&headers::X_SANDGATE_PORT)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u16>().ok())
        .filter(|p| *p != 0)
        .ok_or_else(|| HttpError::bad_request("X-Sandgate-Port must be a port number 1-65535"))?;
    Ok((id.to_string(), port))
}

/// The token a request presents, by the contract's precedence. The query parameter and the
/// cookie count only on sandbox hosts (header routing never reads cookies).
fn find_token(parts: &Parts, via_host: bool) -> Result<Option<(Transport, &str)>, HttpError> {
    let hdrs = &parts.headers;
    if let Some(v) = hdrs.get(&headers::X_SANDGATE_TOKEN) {
        let t = v.to_str().map_err(|_| token::TokenError::Malformed)?;
        return Ok(Some((Transport::Header, t.trim())));
    }
    for v in hdrs.get_all(header::AUTHORIZATION) {
        if let Some(t) = bearer_value(v).filter(|t| token::looks_like_ours(t)) {
            return Ok(Some((Transport::Bearer, t)));
        }
    }
    if let Some(t) = headers::find_subprotocol_token(hdrs) {
        return Ok(Some((Transport::Subprotocol, t)));
    }
    if !via_host {
        return Ok(None);
    }
    if let Some(q) = parts.uri.query() {
        if let (Some(t), _) = headers::split_query_token(q) {
            return Ok(Some((Transport::Query, t)));
        }
    }
    Ok(headers::find_cookie(hdrs).map(|t| (Transport::Cookie, t)))
}

fn bearer_value(v: &HeaderValue) -> Option<&str> {
    let v = v.to_str().ok()?;
    let (scheme, rest) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
}

/// Removes `Authorization` values that carry a sandgate token; the app's own pass through.
fn strip_bearer(hdrs: &mut HeaderMap) {
    let ours = hdrs
        .get_all(header::AUTHORIZATION)
        .iter()
        .any(|v| bearer_value(v).is_some_and(token::looks_like_ours));
    if !ours {
        return;
    }
    let kept: Vec<HeaderValue> = hdrs
        .get_all(header::AUTHORIZATION)
        .iter()
        .filter(|v| !bearer_value(v).is_some_and(token::looks_like_ours))
        .cloned()
        .collect();
    hdrs.remove(header::AUTHORIZATION);
    for v in kept {
        hdrs.append(header::AUTHORIZATION, v);
    }
}

fn is_preflight(req: &Request<Incoming>) -> bool {
    req.method() == Method::OPTIONS
        && req.headers().contains_key(header::ORIGIN)
        && req
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
}

/// The browser rule for cookie-authenticated requests: same origin, a listed origin, or a
/// top-level navigation. Sibling sandboxes are same-site, so `SameSite=Lax` alone would let
/// them use each other's sessions.
///
/// `host` is the request's host as received: the `Host` header, or on HTTP/2 the
/// `:authority`, which arrives without a `Host` header.
fn cookie_request_allowed(
    method: &Method,
    hdrs: &HeaderMap,
    host: &HeaderValue,
    route: &Route,
) -> bool {
    let get = |name: &str| hdrs.get(name).and_then(|v| v.to_str().ok());
    if (method == Method::GET || method == Method::HEAD)
        && get("sec-fetch-mode") == Some("navigate")
        && get("sec-fetch-dest") == Some("document")
    {
        return true;
    }
    match hdrs.get(header::ORIGIN).map(|o| o.to_str()) {
        Some(Ok(origin)) => {
            let own = host
                .to_str()
                .ok()
                .zip(origin.strip_prefix("https://"))
                .is_some_and(|(host, o)| o.eq_ignore_ascii_case(host));
            own || route.allows_origin(origin)
        }
        Some(Err(_)) => false,
        None => !matches!(get("sec-fetch-site"), Some("same-site" | "cross-site")),
    }
}

/// Adds CORS response headers for a listed origin when the app did not set its own.
fn add_cors(out: &mut HeaderMap, origin: Option<&HeaderValue>, route: &Route) {
    let Some(origin) = origin else { return };
    if out.contains_key(header::ACCESS_CONTROL_ALLOW_ORIGIN) {
        return;
    }
    if origin.to_str().is_ok_and(|o| route.allows_origin(o)) {
        out.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
        out.insert(
            header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
            HeaderValue::from_static("true"),
        );
        out.append(header::VARY, HeaderValue::from_static("Origin"));
    }
}

/// `http://<target><path>?<query without our parameter>`; the path is kept byte for byte.
fn upstream_uri(target: &PortTarget, uri: &Uri) -> Result<Uri, HttpError> {
    let path = uri.path();
    let path = if path.is_empty() { "/" } else { path };
    if !path.starts_with('/') {
        return Err(HttpError::bad_request("the request target must be a path"));
    }
    let mut s = String::with_capacity(16 + target.authority.as_str().len() + path.len() + 64);
    s.push_str("http://");
    s.push_str(target.authority.as_str());
    s.push_str(path);
    if let Some(q) = uri.query() {
        if headers::query_has_token(q) {
            let (_, rest) = headers::split_query_token(q);
            if !rest.is_empty() {
                s.push('?');
                s.push_str(&rest);
            }
        } else {
            s.push('?');
            s.push_str(q);
        }
    }
    s.parse()
        .map_err(|_| HttpError::bad_request("the request target cannot be forwarded"))
}

/// The query-parameter exchange: 303 to the same URL without the token, with the session
/// cookie. The target is absolute on the same host, so no path can turn it into a redirect
/// elsewhere (`//evil`, `/\evil`).
fn exchange(
    uri: &Uri,
    host: &HeaderValue,
    claims: &Claims,
    cookie_token: &str,
) -> Result<Response<Body>, HttpError> {
    let host = host
        .to_str()
        .map_err(|_| HttpError::bad_request("invalid Host header"))?;
    let (_, rest) = headers::split_query_token(uri.query().unwrap_or(""));
    let path = uri.path();
    let mut location = format!("https://{host}{path}");
    if !rest.is_empty() {
        location.push('?');
        location.push_str(&rest);
    }
    let location = HeaderValue::from_str(&location)
        .map_err(|_| HttpError::bad_request("the address cannot be redirected"))?;
    let max_age = (claims.exp - unix_now()).max(0);
    let cookie = HeaderValue::from_str(&format!(
        "{}={cookie_token}; Path=/; Secure; HttpOnly; SameSite=Lax; Max-Age={max_age}",
        headers::COOKIE_NAME
    ))
    .map_err(|_| HttpError::internal())?;
    let mut response = Response::new(Body::empty());
    *response.status_mut() = StatusCode::SEE_OTHER;
    let out = response.headers_mut();
    out.insert(header::LOCATION, location);
    out.insert(header::SET_COOKIE, cookie);
    out.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    out.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_canonicalised() {
        assert_eq!(
            canonical_host("Sandbox.LOCALHOST:8443").unwrap(),
            "sandbox.localhost"
        );
        assert_eq!(
            canonical_host("sandbox.localhost.").unwrap(),
            "sandbox.localhost"
        );
        assert_eq!(canonical_host("[::1]:8443").unwrap(), "[::1]");
        assert!(canonical_host("a b").is_none());
        assert!(canonical_host("host:").is_none());
        assert!(canonical_host("host:x1").is_none());
        assert!(canonical_host("").is_none());
        // Found by the host_route fuzz target: a second trailing dot.
        assert!(canonical_host("Tj..").is_none());
        assert!(canonical_host("a..b").is_none());
        assert!(canonical_host(".a").is_none());
    }

    #[test]
    fn sandbox_labels() {
        let id = "abcdefghijklmnopqrstuvwx";
        assert_eq!(parse_sandbox_label(&format!("8000-{id}")), Some((8000, id)));
        assert!(parse_sandbox_label(&format!("0-{id}")).is_none());
        assert!(parse_sandbox_label(&format!("08000-{id}")).is_none());
        assert!(parse_sandbox_label(&format!("70000-{id}")).is_none());
        assert!(parse_sandbox_label(&format!("+80-{id}")).is_none());
        assert!(parse_sandbox_label("8000-short").is_none());
        assert!(parse_sandbox_label(id).is_none());
    }
}
