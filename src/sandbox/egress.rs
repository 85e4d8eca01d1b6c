//! The egress proxy of one `command` sandbox: the only way out of a network namespace that has
//! nothing but loopback.
//!
//! The orchestrator binds a listener on `127.0.0.1:<port>` *inside* the sandbox's namespace and
//! hands it to [`serve`]; connections are accepted there and dialled from the gateway's own
//! namespace. So this module is the whole of the sandbox's reach, and it treats every byte it
//! reads as hostile (SECURITY.md, "Sandboxes are hostile tenants").
//!
//! What it serves: `CONNECT host:port` (a tunnel; TLS stays end to end) and absolute-form
//! `http://host[:port]/path` requests (forwarded with their bodies streamed). What it lets
//! through: names on the sandbox's `egress.allow` list ([`EgressPolicy`]), resolved here, and
//! only when every address the name resolves to is a public unicast address: the address that
//! is checked is the address that is dialled, so a name that rebinds between two lookups gains
//! nothing. IP literals are refused outright (in every spelling a resolver would accept). The
//! operator's `[orchestrator.egress_hosts]` table is the one exception: a mapped name goes to
//! the operator's address, which is not checked, because the operator chose it.
//!
//! A refusal is a one-line `403` from the proxy, counted in `sandgate_egress_decisions_total`
//! and logged with the sandbox id and the host (never a header or a body). Redirects are not
//! followed here: a client that follows one sends a new request through the proxy, which is
//! checked like any other.

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::telemetry::Metrics;

/// At most this many `egress.allow` entries: the list is matched on every connection.
pub const MAX_ALLOW_ENTRIES: usize = 256;

/// Why an `egress.allow` list or an `[orchestrator.egress_hosts]` table was refused.
#[derive(Debug, thiserror::Error)]
pub enum EgressError {
    /// An `egress.allow` entry is not an exact host name or `*.suffix`.
    #[error("egress.allow entry {entry:?} is not allowed: {reason}")]
    Pattern { entry: String, reason: &'static str },
    /// The `egress.allow` list is longer than [`MAX_ALLOW_ENTRIES`].
    #[error("egress.allow has {count} entries; at most {MAX_ALLOW_ENTRIES} are allowed (use `*.suffix` for many subdomains)")]
    TooMany { count: usize },
    /// An `[orchestrator.egress_hosts]` key is not a host name.
    #[error("[orchestrator.egress_hosts] key {name:?} is not allowed: {reason}")]
    HostName { name: String, reason: &'static str },
    /// An `[orchestrator.egress_hosts]` value is not `ip:port`.
    #[error("[orchestrator.egress_hosts] {name:?} = {value:?} is not a socket address: write it as \"127.0.0.1:3141\" or \"[::1]:3141\"")]
    Address { name: String, value: String },
}

/// What one sandbox may reach. Built from the create body's `egress.allow` and the operator's
/// `[orchestrator.egress_hosts]` table.
///
/// An entry is an exact host name (`api.example.com`) or `*.suffix` (`*.mirror.example`), which
/// matches every name *below* the suffix (`a.mirror.example`, `b.a.mirror.example`) but not the
/// suffix itself: allow `mirror.example` as well to reach it. Names compare case-insensitively
/// and without a trailing dot. Ports are not part of an entry: an allowed name may be reached on
/// any port.
#[derive(Debug, Clone, Default)]
pub struct EgressPolicy {
    exact: BTreeSet<String>,
    /// Suffixes with their leading dot (`.mirror.example`), so a match is one `ends_with`.
    suffixes: Vec<String>,
    /// The operator's mappings for the names this sandbox may reach (the others never apply).
    mapped: BTreeMap<String, SocketAddr>,
}

impl EgressPolicy {
    /// Validates `allow` (each entry an exact host name or `*.suffix`; no IP literal, no port,
    /// not `*` alone; uppercase is lowered) and keeps the `hosts` mappings that `allow` admits.
    /// The error names the bad entry.
    pub fn new(
        allow: &[String],
        hosts: &BTreeMap<String, String>,
    ) -> Result<EgressPolicy, EgressError> {
        if allow.len() > MAX_ALLOW_ENTRIES {
            return Err(EgressError::TooMany { count: allow.len() });
        }
        let mut policy = EgressPolicy::default();
        for entry in allow {
            let bad = |reason| EgressError::Pattern {
                entry: shown(entry),
                reason,
            };
            if entry == "*" {
                return Err(bad(
                    "`*` alone would allow everything; name hosts, or `*.suffix` for subdomains",
                ));
            }
            if let Some(suffix) = entry.strip_prefix("*.") {
                let suffix = normalise(suffix).map_err(|fault| bad(fault.reason()))?;
                let dotted = format!(".{suffix}");
                if !policy.suffixes.contains(&dotted) {
                    policy.suffixes.push(dotted);
                }
            } else if entry.contains('*') {
                return Err(bad(
                    "a wildcard may only be a leading `*.` (as in `*.example.com`)",
                ));
            } else {
                policy
                    .exact
                    .insert(normalise(entry).map_err(|fault| bad(fault.reason()))?);
            }
        }
        for (name, addr) in EgressPolicy::validate_hosts(hosts)? {
            if policy.matches(&name) {
                policy.mapped.insert(name, addr);
            }
        }
        Ok(policy)
    }

    /// Checks an `[orchestrator.egress_hosts]` table at config load: each key a host name, each
    /// value a socket address. Returns the table with its keys normalised.
    pub fn validate_hosts(
        hosts: &BTreeMap<String, String>,
    ) -> Result<BTreeMap<String, SocketAddr>, EgressError> {
        hosts
            .iter()
            .map(|(name, value)| {
                let key = normalise(name).map_err(|fault| EgressError::HostName {
                    name: shown(name),
                    reason: fault.reason(),
                })?;
                let addr = value
                    .parse::<SocketAddr>()
                    .map_err(|_| EgressError::Address {
                        name: shown(name),
                        value: shown(value),
                    })?;
                Ok((key, addr))
            })
            .collect()
    }

    /// True when no name may be reached (the sandbox needs no proxy).
    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.suffixes.is_empty()
    }

    /// True when `host` (any case, trailing dot or not) is on the allow list.
    pub fn allows(&self, host: &str) -> bool {
        normalise(host).is_ok_and(|name| self.matches(&name))
    }

    /// `name` is already normalised.
    fn matches(&self, name: &str) -> bool {
        self.exact.contains(name)
            || self
                .suffixes
                .iter()
                .any(|s| name.len() > s.len() && name.ends_with(s.as_str()))
    }
}

/// Timeouts and caps of one proxy. The defaults are what [`serve`] uses; tests shorten them.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// A request head must arrive within this (also: an idle keep-alive connection is closed).
    pub head_timeout: Duration,
    /// Resolving a name and connecting to it must finish within this.
    pub connect_timeout: Duration,
    /// A request head larger than this is answered 431.
    pub max_head_bytes: usize,
    /// Connections open at once; more are answered 503.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            head_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            max_head_bytes: 64 * 1024,
            max_connections: 256,
        }
    }
}

/// Serves one sandbox's egress proxy on `listener` until `stop` is cancelled (the sandbox
/// ended), then closes every connection it opened and returns.
pub async fn serve(
    listener: TcpListener,
    policy: Arc<EgressPolicy>,
    sandbox: String,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    serve_with(listener, policy, sandbox, metrics, stop, Limits::default()).await;
}

/// [`serve`] with chosen [`Limits`].
pub async fn serve_with(
    listener: TcpListener,
    policy: Arc<EgressPolicy>,
    sandbox: String,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
    limits: Limits,
) {
    let proxy = Arc::new(Proxy {
        policy,
        sandbox,
        metrics,
        limits,
        stop: stop.clone(),
        tracker: TaskTracker::new(),
    });
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    // Answering 503 takes a moment of its own; this bounds how many such answers are pending.
    let busy_slots = Arc::new(Semaphore::new(BUSY_ANSWERS));
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(err) => {
                // Out of file descriptors, say: wait a little rather than spin.
                tracing::debug!(sandbox = %proxy.sandbox, error = %err, "egress proxy accept failed");
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(Duration::from_millis(100)) => continue,
                }
            }
        };
        if let Ok(permit) = Arc::clone(&permits).try_acquire_owned() {
            let conn = Arc::clone(&proxy);
            proxy
                .tracker
                .spawn(async move { conn.serve_connection(stream, permit).await });
        } else if let Ok(slot) = Arc::clone(&busy_slots).try_acquire_owned() {
            tracing::debug!(sandbox = %proxy.sandbox, "egress proxy connection limit reached");
            proxy.tracker.spawn(answer_busy(stream, slot, stop.clone()));
        }
        // Else the connection is dropped unanswered: the sandbox is flooding its own proxy.
    }
    drop(listener);
    proxy.tracker.close();
    proxy.tracker.wait().await;
}

/// Pending 503 answers at most; beyond, excess connections are closed unanswered.
const BUSY_ANSWERS: usize = 16;

const BUSY: &str = "egress proxy busy: too many connections open; retry later\n";

/// Answers 503 on a connection over the limit, without parsing what it sent.
async fn answer_busy(mut stream: TcpStream, _slot: OwnedSemaphorePermit, stop: CancellationToken) {
    let answer = async {
        let answer = format!(
            "HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{BUSY}",
            BUSY.len()
        );
        stream.write_all(answer.as_bytes()).await?;
        stream.shutdown().await?;
        // Read (a little of) what the client sent: closing with unread data would reset the
        // connection, and a reset can destroy the answer before the client reads it.
        let mut sink = [0u8; 4096];
        let mut left = 64 * 1024usize;
        while left > 0 {
            let n = stream.read(&mut sink).await?;
            if n == 0 {
                break;
            }
            left = left.saturating_sub(n);
        }
        Ok::<(), std::io::Error>(())
    };
    tokio::select! {
        () = stop.cancelled() => {}
        _ = tokio::time::timeout(Duration::from_secs(2), answer) => {}
    }
}

/// What every connection of one proxy shares.
struct Proxy {
    policy: Arc<EgressPolicy>,
    sandbox: String,
    metrics: Arc<Metrics>,
    limits: Limits,
    stop: CancellationToken,
    /// Every task this proxy spawns (connections, tunnels, upstream connections), so that
    /// [`serve_with`] returns only once they are all gone.
    tracker: TaskTracker,
}

type ProxyBody = BoxBody<Bytes, hyper::Error>;

/// A request the proxy answers itself: 400 (not a proxy request), 403 (refused by policy) or
/// 502 (the target could not be reached).
struct Refusal {
    status: StatusCode,
    message: String,
}

impl Refusal {
    fn bad_request(message: String) -> Refusal {
        Refusal {
            status: StatusCode::BAD_REQUEST,
            message,
        }
    }

    fn into_response(self) -> Response<ProxyBody> {
        let mut body = self.message;
        body.push('\n');
        let mut res = Response::new(full(body));
        *res.status_mut() = self.status;
        let headers = res.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        // After a refusal the client's next bytes may be a tunnel's (a TLS hello sent
        // optimistically behind a CONNECT): start afresh rather than parse them as HTTP.
        headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        res
    }
}

fn full(body: impl Into<Bytes>) -> ProxyBody {
    Full::new(body.into())
        .map_err(|never: Infallible| match never {})
        .boxed()
}

impl Proxy {
    async fn serve_connection(self: Arc<Self>, stream: TcpStream, permit: OwnedSemaphorePermit) {
        let _ = stream.set_nodelay(true);
        // Shared with the tunnel a CONNECT turns into, which outlives the HTTP connection.
        let permit = Arc::new(permit);
        let proxy = Arc::clone(&self);
        let service = hyper::service::service_fn(move |req| {
            let proxy = Arc::clone(&proxy);
            let permit = Arc::clone(&permit);
            async move { Ok::<_, Infallible>(proxy.handle(req, permit).await) }
        });
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(self.limits.head_timeout)
            .max_header_size(self.limits.max_head_bytes)
            // hyper's floor is 8 KiB; the buffer also bounds what a body read takes at once.
            .max_buf_size(self.limits.max_head_bytes.max(8192));
        let conn = builder
            .serve_connection(TokioIo::new(stream), service)
            .with_upgrades();
        tokio::select! {
            () = self.stop.cancelled() => {}
            result = conn => {
                if let Err(err) = result {
                    tracing::debug!(sandbox = %self.sandbox, error = %err, "egress proxy connection ended");
                }
            }
        }
    }

    async fn handle(
        &self,
        req: Request<Incoming>,
        permit: Arc<OwnedSemaphorePermit>,
    ) -> Response<ProxyBody> {
        let result = if req.method() == Method::CONNECT {
            self.tunnel(req, permit).await
        } else {
            self.forward(req).await
        };
        result.unwrap_or_else(Refusal::into_response)
    }

    /// `CONNECT host:port`: dial, answer 200, then splice bytes both ways.
    async fn tunnel(
        &self,
        mut req: Request<Incoming>,
        permit: Arc<OwnedSemaphorePermit>,
    ) -> Result<Response<ProxyBody>, Refusal> {
        let authority = connect_authority(req.uri())?;
        let port = match authority.port_u16() {
            Some(port) if port != 0 => port,
            _ => {
                return Err(Refusal::bad_request(
                    "CONNECT needs host:port with a port from 1 to 65535".to_string(),
                ))
            }
        };
        let upstream = self.open(authority.host(), port).await?;
        let upgrade = hyper::upgrade::on(&mut req);
        let stop = self.stop.clone();
        self.tracker.spawn(async move {
            let _permit = permit;
            tokio::select! {
                () = stop.cancelled() => {}
                () = splice(upgrade, upstream) => {}
            }
        });
        let mut res = Response::new(full(Bytes::new()));
        res.extensions_mut()
            .insert(hyper::ext::ReasonPhrase::from_static(
                b"Connection established",
            ));
        Ok(res)
    }

    /// An absolute-form `http://` request: dial, send it on in origin form, stream both bodies.
    async fn forward(&self, req: Request<Incoming>) -> Result<Response<ProxyBody>, Refusal> {
        let uri = req.uri();
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => {
                return Err(Refusal::bad_request(
                    "https:// URLs go through CONNECT (a client does that when HTTPS_PROXY names this proxy)".to_string(),
                ))
            }
            Some(_) => {
                return Err(Refusal::bad_request(
                    "only http:// URLs and CONNECT host:port are proxied".to_string(),
                ))
            }
            None => {
                return Err(Refusal::bad_request(
                    "this is a proxy: send an absolute URL (GET http://host/path) or CONNECT host:port".to_string(),
                ))
            }
        }
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| Refusal::bad_request("the URL names no host".to_string()))?;
        no_userinfo(&authority)?;
        let port = match authority.port_u16() {
            None => 80,
            Some(0) => return Err(Refusal::bad_request("port 0 cannot be reached".to_string())),
            Some(port) => port,
        };
        let path = uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        let host_header = HeaderValue::from_str(authority.as_str()).map_err(|_| {
            Refusal::bad_request("the URL's host is not a header value".to_string())
        })?;

        let upstream = self.open(authority.host(), port).await?;
        let unreachable = |what: &str, err: hyper::Error| Refusal {
            status: StatusCode::BAD_GATEWAY,
            message: format!("egress to {authority} failed: {what} ({err})"),
        };
        let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
            .handshake::<_, Incoming>(TokioIo::new(upstream))
            .await
            .map_err(|err| unreachable("the HTTP handshake failed", err))?;
        let stop = self.stop.clone();
        self.tracker.spawn(async move {
            tokio::select! {
                () = stop.cancelled() => {}
                _ = conn => {}
            }
        });

        let (mut parts, body) = req.into_parts();
        parts.uri = Uri::from(path);
        parts.version = Version::HTTP_11;
        parts.extensions = http::Extensions::new();
        strip_request(&mut parts.headers);
        parts.headers.insert(header::HOST, host_header);
        let res = sender
            .send_request(Request::from_parts(parts, body))
            .await
            .map_err(|err| unreachable("the upstream did not answer", err))?;
        if res.status() == StatusCode::SWITCHING_PROTOCOLS {
            // No Upgrade was passed on, so a 101 is an upstream that ignores HTTP.
            return Err(Refusal {
                status: StatusCode::BAD_GATEWAY,
                message: format!("egress to {authority} failed: it switched protocols unasked"),
            });
        }
        let (mut parts, body) = res.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        Ok(Response::from_parts(parts, body.boxed()))
    }

    /// Decides whether `host:port` may be reached and, if so, connects to it.
    async fn open(&self, raw_host: &str, port: u16) -> Result<TcpStream, Refusal> {
        let host = match normalise(raw_host) {
            Ok(host) => host,
            Err(NameFault::Address) => {
                let reason = match literal_ip(raw_host) {
                    Some(ip) => match refused_class(ip) {
                        Some(class) => class,
                        None => format!("an IP address ({ip}); egress.allow names hosts"),
                    },
                    None => "an IP address; egress.allow names hosts".to_string(),
                };
                return Err(self.deny(&raw_host.to_ascii_lowercase(), port, &reason));
            }
            Err(fault) => {
                return Err(Refusal::bad_request(format!(
                    "{:?} is not a host name: {}",
                    shown(raw_host),
                    fault.reason()
                )))
            }
        };
        if !self.policy.matches(&host) {
            return Err(self.deny(&host, port, "not in this sandbox's egress.allow"));
        }
        let deadline = Instant::now() + self.limits.connect_timeout;
        let addrs: Vec<SocketAddr> = if let Some(addr) = self.policy.mapped.get(&host) {
            // The operator's choice: reached as configured, whatever port was asked for.
            vec![*addr]
        } else {
            let resolved =
                tokio::time::timeout_at(deadline, tokio::net::lookup_host((host.as_str(), port)))
                    .await
                    .map_err(|_| {
                        self.unreachable(&host, port, "resolving the name timed out".to_string())
                    })?
                    .map_err(|err| {
                        self.unreachable(&host, port, format!("the name does not resolve ({err})"))
                    })?;
            let mut addrs: Vec<SocketAddr> = Vec::new();
            for addr in resolved.take(MAX_ADDRESSES) {
                if let Some(class) = refused_class(addr.ip()) {
                    // One bad address refuses the name: a public name has no business
                    // resolving to an internal address, and trying the others would make the
                    // outcome depend on the resolver's order.
                    return Err(self.deny(
                        &host,
                        port,
                        &format!("it resolves to {}, {}", addr.ip(), with_article(&class)),
                    ));
                }
                if !addrs.contains(&addr) {
                    addrs.push(addr);
                }
            }
            if addrs.is_empty() {
                return Err(self.unreachable(&host, port, "the name has no address".to_string()));
            }
            addrs
        };
        self.metrics.egress_allowed.inc();
        tracing::info!(sandbox = %self.sandbox, host = %host, port, decision = "allowed", "egress");
        let mut last_error = None;
        for addr in addrs {
            match tokio::time::timeout_at(deadline, TcpStream::connect(addr)).await {
                Ok(Ok(stream)) => {
                    let _ = stream.set_nodelay(true);
                    return Ok(stream);
                }
                Ok(Err(err)) => last_error = Some(err.to_string()),
                Err(_) => {
                    last_error = Some("timed out".to_string());
                    break;
                }
            }
        }
        Err(self.unreachable(
            &host,
            port,
            format!(
                "could not connect ({})",
                last_error.unwrap_or_else(|| "no address".to_string())
            ),
        ))
    }

    /// A 403: counted, logged, and explained in one line.
    fn deny(&self, host: &str, port: u16, reason: &str) -> Refusal {
        self.metrics.egress_denied.inc();
        tracing::info!(sandbox = %self.sandbox, host = %host, port, decision = "denied", reason, "egress");
        Refusal {
            status: StatusCode::FORBIDDEN,
            message: format!("egress to {host} refused: {reason}"),
        }
    }

    fn unreachable(&self, host: &str, port: u16, why: String) -> Refusal {
        tracing::debug!(sandbox = %self.sandbox, host = %host, port, why = %why, "egress target unreachable");
        Refusal {
            status: StatusCode::BAD_GATEWAY,
            message: format!("egress to {host}:{port} failed: {why}"),
        }
    }
}

/// Addresses of one name that are checked and tried at most.
const MAX_ADDRESSES: usize = 16;

/// Copies bytes both ways once hyper hands over the connection; an end that closes its sending
/// side has that close passed on, and the other direction keeps flowing until it closes too.
async fn splice(upgrade: OnUpgrade, mut upstream: TcpStream) {
    let Ok(upgraded) = upgrade.await else {
        return;
    };
    let mut client = TokioIo::new(upgraded);
    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
}

/// The `host:port` of a CONNECT, which must be in authority form and nothing more.
fn connect_authority(uri: &Uri) -> Result<Authority, Refusal> {
    let authority = match (uri.scheme(), uri.authority(), uri.path_and_query()) {
        (None, Some(authority), None) => authority.clone(),
        _ => {
            return Err(Refusal::bad_request(
                "CONNECT takes host:port (as in CONNECT example.com:443)".to_string(),
            ))
        }
    };
    no_userinfo(&authority)?;
    Ok(authority)
}

/// `user@host` is refused rather than interpreted: two parsers can disagree on where the host
/// begins, and credentials in a URL are not forwarded anyway.
fn no_userinfo(authority: &Authority) -> Result<(), Refusal> {
    if authority.as_str().contains('@') {
        return Err(Refusal::bad_request(
            "credentials in the URL (user@host) are not accepted".to_string(),
        ));
    }
    Ok(())
}

static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");

/// Removes the headers that belong to one hop: those a `Connection` header names, the
/// hop-by-hop headers of RFC 9110 §7.6.1, and every `Proxy-*` header (`Proxy-Authorization`
/// is for this proxy, never for the target).
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        &header::CONNECTION,
        &KEEP_ALIVE,
        &header::TE,
        &header::TRAILER,
        &header::TRANSFER_ENCODING,
        &header::UPGRADE,
    ] {
        headers.remove(name);
    }
    let proxy: Vec<HeaderName> = headers
        .keys()
        .filter(|k| k.as_str().starts_with("proxy-"))
        .cloned()
        .collect();
    for name in proxy {
        headers.remove(name);
    }
}

/// [`strip_hop_by_hop`] for a request going upstream. A chunked request's `Content-Length`
/// goes too (hyper framed the body by `Transfer-Encoding`; the upstream must not see a length
/// that disagrees), and `Expect` (hyper already answered `100 Continue` when the body was read).
fn strip_request(headers: &mut HeaderMap) {
    if headers.contains_key(header::TRANSFER_ENCODING) {
        headers.remove(header::CONTENT_LENGTH);
    }
    headers.remove(header::EXPECT);
    strip_hop_by_hop(headers);
}

/// What is wrong with a host name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NameFault {
    Empty,
    /// An IP literal, in any spelling a resolver accepts.
    Address,
    Port,
    TooLong,
    EmptyLabel,
    LongLabel,
    Characters,
}

impl NameFault {
    fn reason(self) -> &'static str {
        match self {
            NameFault::Empty => "empty",
            NameFault::Address => "an IP address; name a host instead",
            NameFault::Port => "a port or an IPv6 address; name a host only (any port may be used)",
            NameFault::TooLong => "longer than 253 characters",
            NameFault::EmptyLabel => "an empty label (two dots in a row, or a leading dot)",
            NameFault::LongLabel => "a label longer than 63 characters",
            NameFault::Characters => "characters other than letters, digits, '-', '_' and '.'",
        }
    }
}

/// Lowercases `raw` and drops one trailing dot; refuses what is not a host name, and IP
/// literals (`NameFault::Address`) in every spelling: dotted quads, bracketed IPv6, and the
/// numeric forms resolvers also accept (`2130706433`, `0x7f.1`, `017700000001`, `127.1`), which
/// are recognised as the URL standard does: a name whose last label is a number is an address.
fn normalise(raw: &str) -> Result<String, NameFault> {
    let lower = raw.to_ascii_lowercase();
    let name = lower.strip_suffix('.').unwrap_or(&lower);
    if name.is_empty() {
        return Err(NameFault::Empty);
    }
    if name.starts_with('[') || name.parse::<IpAddr>().is_ok() {
        return Err(NameFault::Address);
    }
    if name.contains(':') {
        return Err(NameFault::Port);
    }
    if name.len() > 253 {
        return Err(NameFault::TooLong);
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err(NameFault::EmptyLabel);
        }
        if label.len() > 63 {
            return Err(NameFault::LongLabel);
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        {
            return Err(NameFault::Characters);
        }
    }
    if name.rsplit('.').next().is_some_and(is_number) {
        return Err(NameFault::Address);
    }
    Ok(name.to_string())
}

/// A decimal, `0x` hex or leading-zero octal number, as an IPv4 part is written.
fn is_number(label: &str) -> bool {
    if let Some(hex) = label.strip_prefix("0x") {
        return hex.bytes().all(|b| b.is_ascii_hexdigit());
    }
    !label.is_empty() && label.bytes().all(|b| b.is_ascii_digit())
}

/// The address an IP literal names, for the refusal's message; `None` when it is numeric but
/// names no address (`999.1`).
fn literal_ip(raw: &str) -> Option<IpAddr> {
    let lower = raw.to_ascii_lowercase();
    let name = lower.strip_suffix('.').unwrap_or(&lower);
    if let Some(inner) = name.strip_prefix('[').and_then(|n| n.strip_suffix(']')) {
        return inner.parse::<Ipv6Addr>().ok().map(IpAddr::V6);
    }
    if let Ok(ip) = name.parse::<IpAddr>() {
        return Some(ip);
    }
    parse_ipv4_loose(name).map(IpAddr::V4)
}

/// IPv4 the way `inet_aton` and the URL standard read it: one to four parts, each decimal,
/// `0x` hex or `0` octal; the last part fills the remaining bytes.
fn parse_ipv4_loose(name: &str) -> Option<Ipv4Addr> {
    let parts: Vec<&str> = name.split('.').collect();
    if parts.is_empty() || parts.len() > 4 {
        return None;
    }
    let mut numbers = Vec::with_capacity(parts.len());
    for part in &parts {
        numbers.push(parse_ipv4_part(part)?);
    }
    let (last, init) = numbers.split_last()?;
    let mut addr: u64 = 0;
    for (i, n) in init.iter().enumerate() {
        if *n > 255 {
            return None;
        }
        addr |= n << (8 * (3 - i));
    }
    if *last >= 1u64 << (8 * (5 - numbers.len())) {
        return None;
    }
    addr |= last;
    u32::try_from(addr).ok().map(Ipv4Addr::from)
}

fn parse_ipv4_part(part: &str) -> Option<u64> {
    let (digits, radix) = if let Some(hex) = part.strip_prefix("0x") {
        (hex, 16)
    } else if part.len() > 1 && part.starts_with('0') {
        (&part[1..], 8)
    } else {
        (part, 10)
    };
    if digits.is_empty() {
        // "0x" alone is zero, as the URL standard reads it; "" is no part at all.
        return (radix == 16).then_some(0);
    }
    if !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    u64::from_str_radix(digits, radix).ok()
}

/// Why `ip` may not be dialled, or `None` for a public unicast address.
fn refused_class(ip: IpAddr) -> Option<String> {
    match ip {
        IpAddr::V4(v4) => v4_class(v4).map(str::to_string),
        IpAddr::V6(v6) => v6_class(v6),
    }
}

fn in_v4(ip: Ipv4Addr, net: [u8; 4], bits: u32) -> bool {
    let mask = u32::MAX.checked_shl(32 - bits).unwrap_or(0);
    u32::from(ip) & mask == u32::from(Ipv4Addr::from(net)) & mask
}

fn v4_class(ip: Ipv4Addr) -> Option<&'static str> {
    let class = if in_v4(ip, [0, 0, 0, 0], 8) {
        "unspecified address"
    } else if in_v4(ip, [127, 0, 0, 0], 8) {
        "loopback address"
    } else if in_v4(ip, [10, 0, 0, 0], 8)
        || in_v4(ip, [172, 16, 0, 0], 12)
        || in_v4(ip, [192, 168, 0, 0], 16)
    {
        "private address"
    } else if in_v4(ip, [169, 254, 0, 0], 16) {
        "link-local address"
    } else if in_v4(ip, [100, 64, 0, 0], 10) {
        "CGNAT address"
    } else if in_v4(ip, [224, 0, 0, 0], 4) {
        "multicast address"
    } else if ip == Ipv4Addr::BROADCAST {
        "broadcast address"
    } else if in_v4(ip, [192, 0, 2, 0], 24)
        || in_v4(ip, [198, 51, 100, 0], 24)
        || in_v4(ip, [203, 0, 113, 0], 24)
    {
        "documentation address"
    } else if in_v4(ip, [240, 0, 0, 0], 4)
        || in_v4(ip, [192, 0, 0, 0], 24)
        || in_v4(ip, [198, 18, 0, 0], 15)
        || in_v4(ip, [192, 88, 99, 0], 24)
    {
        "reserved address"
    } else {
        return None;
    };
    Some(class)
}

fn in_v6(ip: Ipv6Addr, net: [u16; 8], bits: u32) -> bool {
    let mask = u128::MAX.checked_shl(128 - bits).unwrap_or(0);
    u128::from(ip) & mask == u128::from(Ipv6Addr::from(net)) & mask
}

/// The IPv4 address in the low 32 bits.
fn low_v4(ip: Ipv6Addr) -> Ipv4Addr {
    Ipv4Addr::from(u32::try_from(u128::from(ip) & 0xffff_ffff).unwrap_or(0))
}

fn v6_class(ip: Ipv6Addr) -> Option<String> {
    let fixed = |class: &str| Some(class.to_string());
    if ip.is_unspecified() {
        return fixed("unspecified address");
    }
    if ip.is_loopback() {
        return fixed("loopback address");
    }
    if let Some(v4) = ip.to_ipv4_mapped() {
        // Dialling ::ffff:a.b.c.d reaches a.b.c.d: refused whatever a.b.c.d is, because no
        // name should resolve to one, and named after the embedded class when it has one.
        return Some(match v4_class(v4) {
            Some(class) => format!("IPv4-mapped {class}"),
            None => "IPv4-mapped IPv6 address".to_string(),
        });
    }
    if in_v6(ip, [0; 8], 96) {
        return Some(match v4_class(low_v4(ip)) {
            Some(class) => format!("IPv4-compatible {class}"),
            None => "IPv4-compatible IPv6 address".to_string(),
        });
    }
    if in_v6(ip, [0x64, 0xff9b, 0, 0, 0, 0, 0, 0], 96) {
        // NAT64: a gateway translates it to the embedded IPv4 address.
        return v4_class(low_v4(ip)).map(|class| format!("NAT64 form of a {class}"));
    }
    if in_v6(ip, [0x2002, 0, 0, 0, 0, 0, 0, 0], 16) {
        // 6to4 carries an IPv4 address in bits 16..48.
        let embedded =
            Ipv4Addr::from(u32::try_from((u128::from(ip) >> 80) & 0xffff_ffff).unwrap_or(0));
        return v4_class(embedded).map(|class| format!("6to4 form of a {class}"));
    }
    if in_v6(ip, [0xfc00, 0, 0, 0, 0, 0, 0, 0], 7) {
        return fixed("private address (unique local)");
    }
    if in_v6(ip, [0xfe80, 0, 0, 0, 0, 0, 0, 0], 10) {
        return fixed("link-local address");
    }
    if in_v6(ip, [0xfec0, 0, 0, 0, 0, 0, 0, 0], 10) {
        return fixed("private address (site-local)");
    }
    if in_v6(ip, [0xff00, 0, 0, 0, 0, 0, 0, 0], 8) {
        return fixed("multicast address");
    }
    if in_v6(ip, [0x2001, 0xdb8, 0, 0, 0, 0, 0, 0], 32)
        || in_v6(ip, [0x3fff, 0, 0, 0, 0, 0, 0, 0], 20)
    {
        return fixed("documentation address");
    }
    // IETF protocol assignments (Teredo, ORCHID, benchmarking...) and everything outside
    // global unicast.
    if in_v6(ip, [0x2001, 0, 0, 0, 0, 0, 0, 0], 23) || !in_v6(ip, [0x2000, 0, 0, 0, 0, 0, 0, 0], 3)
    {
        return fixed("reserved address");
    }
    None
}

/// "a private address", "an IPv4-mapped ...".
fn with_article(class: &str) -> String {
    let article = if class.starts_with(['a', 'e', 'i', 'o', 'u', 'I']) {
        "an"
    } else {
        "a"
    };
    format!("{article} {class}")
}

/// An entry as an error message shows it: at most 100 characters of it.
fn shown(s: &str) -> String {
    s.chars().take(100).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(allow: &[&str], hosts: &[(&str, String)]) -> EgressPolicy {
        let allow: Vec<String> = allow.iter().map(|s| s.to_string()).collect();
        let hosts: BTreeMap<String, String> = hosts
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        EgressPolicy::new(&allow, &hosts).expect("valid policy")
    }

    /// A running proxy on 127.0.0.1:0 (standing in for the in-namespace listener); stopped
    /// when dropped.
    struct TestProxy {
        addr: SocketAddr,
        metrics: Arc<Metrics>,
        stop: CancellationToken,
        done: tokio::task::JoinHandle<()>,
    }

    impl Drop for TestProxy {
        fn drop(&mut self) {
            self.stop.cancel();
        }
    }

    async fn start(policy: EgressPolicy, limits: Limits) -> TestProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let metrics = Arc::new(Metrics::new());
        let stop = CancellationToken::new();
        let done = tokio::spawn(serve_with(
            listener,
            Arc::new(policy),
            "sbxtest0000000000000000000".to_string(),
            Arc::clone(&metrics),
            stop.clone(),
            limits,
        ));
        TestProxy {
            addr,
            metrics,
            stop,
            done,
        }
    }

    /// An HTTP server that answers with what it received.
    async fn http_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(|req: Request<Incoming>| async move {
                        let (parts, body) = req.into_parts();
                        let body = body.collect().await?.to_bytes();
                        let seen = |name: &str| parts.headers.contains_key(name);
                        let text = format!(
                            "hello from mirror: {} {} host={} proxy-auth={} keep-alive={} x-custom={} body={}",
                            parts.method,
                            parts.uri,
                            parts
                                .headers
                                .get(header::HOST)
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("-"),
                            seen("proxy-authorization"),
                            seen("keep-alive"),
                            seen("x-custom"),
                            String::from_utf8_lossy(&body),
                        );
                        let mut res = Response::new(Full::new(Bytes::from(text)));
                        res.headers_mut()
                            .insert("proxy-authenticate", HeaderValue::from_static("Basic"));
                        Ok::<_, hyper::Error>(res)
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        addr
    }

    /// A raw TCP echo server that closes its side once the client closed its own.
    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let (mut r, mut w) = stream.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                });
            }
        });
        addr
    }

    /// Sends `raw`, reads until the proxy closes; returns the status and the body.
    async fn exchange(proxy: SocketAddr, raw: &[u8]) -> (u16, String) {
        let mut stream = TcpStream::connect(proxy).await.unwrap();
        stream.write_all(raw).await.unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out))
            .await
            .expect("the proxy answers and closes")
            .unwrap();
        let text = String::from_utf8_lossy(&out).to_string();
        let status = text
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no status line in {text:?}"));
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        (status, body)
    }

    async fn get(proxy: SocketAddr, url: &str) -> (u16, String) {
        exchange(
            proxy,
            format!("GET {url} HTTP/1.1\r\nHost: ignored\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
    }

    /// Opens a CONNECT tunnel; returns the stream and the status line.
    async fn connect(proxy: SocketAddr, target: &str) -> (TcpStream, String) {
        let mut stream = TcpStream::connect(proxy).await.unwrap();
        stream
            .write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
            .await
            .unwrap();
        // Byte by byte, so that nothing of the tunnel is consumed with the head.
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut byte = [0u8; 1];
            let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut byte))
                .await
                .expect("the proxy answers")
                .unwrap();
            if n == 0 {
                break;
            }
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head).to_string();
        let status_line = head.lines().next().unwrap_or_default().to_string();
        (stream, status_line)
    }

    #[tokio::test]
    async fn mapped_name_is_forwarded_with_bodies_and_without_hop_headers() {
        let mirror = http_server().await;
        let proxy = start(
            policy(&["mirror.test"], &[("mirror.test", mirror.to_string())]),
            Limits::default(),
        )
        .await;

        let (status, body) = get(proxy.addr, "http://mirror.test/simple/pkg/?q=1").await;
        assert_eq!(status, 200, "{body}");
        assert!(
            body.starts_with("hello from mirror: GET /simple/pkg/?q=1 host=mirror.test "),
            "{body}"
        );

        // Uppercase and a trailing dot are the same name; the port named is ignored for a
        // mapped name; a body streams up; hop-by-hop and Proxy-* headers stay behind.
        let (status, body) = exchange(
            proxy.addr,
            b"POST http://MIRROR.test.:8080/upload HTTP/1.1\r\nHost: x\r\nProxy-Authorization: Basic c2VjcmV0\r\nKeep-Alive: timeout=5\r\nX-Custom: 1\r\nConnection: close, x-custom\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
        )
        .await;
        assert_eq!(status, 200, "{body}");
        assert!(
            body.contains("POST /upload host=MIRROR.test.:8080"),
            "{body}"
        );
        assert!(
            body.contains("proxy-auth=false keep-alive=false x-custom=false"),
            "{body}"
        );
        assert!(body.ends_with("body=hello world"), "{body}");

        // Proxy-* headers from upstream do not reach the sandbox either.
        let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
        stream
            .write_all(b"GET http://mirror.test/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = Vec::new();
        stream.read_to_end(&mut out).await.unwrap();
        let text = String::from_utf8_lossy(&out).to_ascii_lowercase();
        assert!(text.starts_with("http/1.1 200"), "{text}");
        assert!(!text.contains("proxy-authenticate"), "{text}");

        assert_eq!(proxy.metrics.egress_allowed.get(), 3);
        assert_eq!(proxy.metrics.egress_denied.get(), 0);
    }

    #[tokio::test]
    async fn connect_to_a_mapped_name_tunnels_both_ways_with_half_close() {
        let echo = echo_server().await;
        let proxy = start(
            policy(&["mirror.test"], &[("mirror.test", echo.to_string())]),
            Limits::default(),
        )
        .await;
        let (mut tunnel, status) = connect(proxy.addr, "mirror.test:443").await;
        assert_eq!(status, "HTTP/1.1 200 Connection established");
        tunnel.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        tunnel.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
        // Closing our sending side reaches the echo server, which then closes its own: the
        // bytes still in flight arrive, then the end.
        tunnel.write_all(b"last words").await.unwrap();
        tunnel.shutdown().await.unwrap();
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), tunnel.read_to_end(&mut rest))
            .await
            .expect("the close comes back")
            .unwrap();
        assert_eq!(rest, b"last words");
        assert_eq!(proxy.metrics.egress_allowed.get(), 1);
    }

    #[tokio::test]
    async fn ip_literals_are_refused_in_every_spelling() {
        let mirror = http_server().await;
        let port = mirror.port();
        let proxy = start(
            policy(&["mirror.test"], &[("mirror.test", mirror.to_string())]),
            Limits::default(),
        )
        .await;
        for host in [
            "127.0.0.1".to_string(),
            "2130706433".to_string(),
            "0x7f.1".to_string(),
            "0x7f000001".to_string(),
            "017700000001".to_string(),
            "127.1".to_string(),
            "127.0.0.1.".to_string(),
            "[::1]".to_string(),
            "[::ffff:127.0.0.1]".to_string(),
        ] {
            let (status, body) = get(proxy.addr, &format!("http://{host}:{port}/")).await;
            assert_eq!(status, 403, "{host}: {body}");
            assert!(body.contains("refused: "), "{host}: {body}");
            assert!(body.contains("loopback"), "{host}: {body}");
        }
        // Refused before anything is dialled: these addresses are never connected to.
        let (status, body) = get(proxy.addr, "http://10.0.0.5/").await;
        assert_eq!(
            (status, body.as_str()),
            (403, "egress to 10.0.0.5 refused: private address\n")
        );
        let (status, body) = get(proxy.addr, "http://169.254.169.254/latest/meta-data/").await;
        assert_eq!(status, 403);
        assert!(body.contains("link-local address"), "{body}");
        let (status, body) = get(proxy.addr, "http://0xa9fea9fe/").await;
        assert_eq!(status, 403);
        assert!(body.contains("link-local address"), "{body}");
        let (_, status) = connect(proxy.addr, "[fd00::1]:443").await;
        assert!(status.starts_with("HTTP/1.1 403"), "{status}");
        let (_, status) = connect(proxy.addr, "100.64.0.1:443").await;
        assert!(status.starts_with("HTTP/1.1 403"), "{status}");
        assert_eq!(proxy.metrics.egress_denied.get(), 14);
        assert_eq!(proxy.metrics.egress_allowed.get(), 0);
    }

    #[tokio::test]
    async fn a_name_resolving_to_loopback_is_refused() {
        let proxy = start(policy(&["localhost"], &[]), Limits::default()).await;
        let (status, body) = get(proxy.addr, "http://localhost:9/").await;
        assert_eq!(status, 403, "{body}");
        assert!(
            body.starts_with(
                "egress to localhost refused: it resolves to 127.0.0.1, a loopback address"
            ),
            "{body}"
        );
        let (_, status) = connect(proxy.addr, "LOCALHOST.:443").await;
        assert!(status.starts_with("HTTP/1.1 403"), "{status}");
        assert_eq!(proxy.metrics.egress_denied.get(), 2);
    }

    #[tokio::test]
    async fn a_name_not_allowed_is_refused_even_when_mapped() {
        let mirror = http_server().await;
        let proxy = start(
            policy(&["other.test"], &[("mirror.test", mirror.to_string())]),
            Limits::default(),
        )
        .await;
        let (status, body) = get(proxy.addr, "http://mirror.test/").await;
        assert_eq!(
            (status, body.as_str()),
            (
                403,
                "egress to mirror.test refused: not in this sandbox's egress.allow\n"
            )
        );
        let (_, status) = connect(proxy.addr, "mirror.test:443").await;
        assert!(status.starts_with("HTTP/1.1 403"), "{status}");

        let text = proxy.metrics.encode();
        assert!(
            text.contains("sandgate_egress_decisions_total{decision=\"denied\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("sandgate_egress_decisions_total{decision=\"allowed\"} 0"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn upstream_that_refuses_is_a_502() {
        // A port that was just free: nothing listens there.
        let free = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = free.local_addr().unwrap();
        drop(free);
        let proxy = start(
            policy(&["mirror.test"], &[("mirror.test", addr.to_string())]),
            Limits::default(),
        )
        .await;
        let (status, body) = get(proxy.addr, "http://mirror.test/").await;
        assert_eq!(status, 502, "{body}");
        assert!(
            body.starts_with("egress to mirror.test:80 failed: could not connect"),
            "{body}"
        );
        assert!(
            !body.contains(&addr.to_string()),
            "the mapped address stays private: {body}"
        );
    }

    #[tokio::test]
    async fn what_is_not_a_proxy_request_is_a_400() {
        let proxy = start(policy(&["mirror.test"], &[]), Limits::default()).await;
        for (raw, reason) in [
            (
                &b"GET / HTTP/1.1\r\nHost: mirror.test\r\n\r\n"[..],
                "this is a proxy",
            ),
            (
                b"GET https://mirror.test/ HTTP/1.1\r\nHost: x\r\n\r\n",
                "through CONNECT",
            ),
            (
                b"GET ftp://mirror.test/ HTTP/1.1\r\nHost: x\r\n\r\n",
                "only http://",
            ),
            (
                b"GET http://user@mirror.test/ HTTP/1.1\r\nHost: x\r\n\r\n",
                "credentials",
            ),
            (
                b"GET http://mirror.test:0/ HTTP/1.1\r\nHost: x\r\n\r\n",
                "port 0",
            ),
            (
                b"GET http://a..b/ HTTP/1.1\r\nHost: x\r\n\r\n",
                "not a host name",
            ),
            (
                b"CONNECT mirror.test HTTP/1.1\r\nHost: x\r\n\r\n",
                "host:port",
            ),
            (
                b"CONNECT http://mirror.test:443/ HTTP/1.1\r\nHost: x\r\n\r\n",
                "host:port",
            ),
        ] {
            let (status, body) = exchange(proxy.addr, raw).await;
            assert_eq!(status, 400, "{}: {body}", String::from_utf8_lossy(raw));
            assert!(
                body.contains(reason),
                "{}: {body}",
                String::from_utf8_lossy(raw)
            );
        }
        // What hyper cannot parse at all: its own 400.
        let (status, _) = exchange(proxy.addr, b"\x16\x03\x01garbage\r\n\r\n").await;
        assert_eq!(status, 400);
        assert_eq!(proxy.metrics.egress_denied.get(), 0, "a 400 is no decision");
    }

    #[tokio::test]
    async fn an_oversized_head_is_a_431() {
        let proxy = start(policy(&["mirror.test"], &[]), Limits::default()).await;
        let mut raw = b"GET http://mirror.test/ HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec();
        raw.extend(std::iter::repeat_n(b'a', 70 * 1024));
        raw.extend_from_slice(b"\r\n\r\n");
        let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
        // The proxy may answer and close before it has read everything.
        let _ = stream.write_all(&raw).await;
        let mut out = vec![0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut out))
            .await
            .expect("an answer")
            .unwrap();
        let text = String::from_utf8_lossy(&out[..n]);
        assert!(text.starts_with("HTTP/1.1 431"), "{text}");
    }

    #[tokio::test]
    async fn a_slow_head_is_closed_after_the_timeout() {
        let limits = Limits {
            head_timeout: Duration::from_millis(300),
            ..Limits::default()
        };
        let proxy = start(policy(&["mirror.test"], &[]), limits).await;
        let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
        stream
            .write_all(b"GET http://mirror.test/ HTTP/1.1\r\nHost: mir")
            .await
            .unwrap();
        let started = std::time::Instant::now();
        let mut out = Vec::new();
        // Closed (or reset) with no answer: a client that sends no head gets nothing.
        let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut out))
            .await
            .expect("closed by the proxy, not by this test's timeout");
        assert!(out.is_empty(), "{}", String::from_utf8_lossy(&out));
        assert!(
            started.elapsed() >= Duration::from_millis(250),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn connections_over_the_cap_get_503() {
        let echo = echo_server().await;
        let limits = Limits {
            max_connections: 1,
            ..Limits::default()
        };
        let proxy = start(
            policy(&["mirror.test"], &[("mirror.test", echo.to_string())]),
            limits,
        )
        .await;
        let (_tunnel, status) = connect(proxy.addr, "mirror.test:443").await;
        assert_eq!(status, "HTTP/1.1 200 Connection established");
        // The tunnel keeps its connection's slot after the HTTP part is over.
        let (status, body) = get(proxy.addr, "http://mirror.test/").await;
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("too many connections"), "{body}");
    }

    #[tokio::test]
    async fn stop_ends_the_listener_and_every_open_connection() {
        let echo = echo_server().await;
        let mut proxy = start(
            policy(&["mirror.test"], &[("mirror.test", echo.to_string())]),
            Limits::default(),
        )
        .await;
        let (mut tunnel, status) = connect(proxy.addr, "mirror.test:443").await;
        assert_eq!(status, "HTTP/1.1 200 Connection established");
        let mut idle = TcpStream::connect(proxy.addr).await.unwrap();
        proxy.stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), &mut proxy.done)
            .await
            .expect("serve returns once stopped")
            .expect("serve does not panic");
        let mut buf = [0u8; 16];
        let n = tunnel.read(&mut buf).await.unwrap_or(0);
        assert_eq!(n, 0, "the tunnel is closed");
        let n = idle.read(&mut buf).await.unwrap_or(0);
        assert_eq!(n, 0, "the idle connection is closed");
        assert!(
            TcpStream::connect(proxy.addr).await.is_err(),
            "nothing listens any more"
        );
    }

    #[test]
    fn wildcards_match_subdomains_only() {
        let p = policy(&["*.example", "API.Other.test."], &[]);
        assert!(p.allows("a.example"));
        assert!(p.allows("b.a.example"));
        assert!(p.allows("A.EXAMPLE."));
        assert!(!p.allows("example"));
        assert!(!p.allows("badexample"));
        assert!(!p.allows("a.example.evil"));
        assert!(p.allows("api.other.test"));
        assert!(!p.allows("x.api.other.test"));
        assert!(!p.allows("other.test"));
    }

    #[test]
    fn bad_allow_entries_are_named() {
        let none = BTreeMap::new();
        for (entry, reason) in [
            ("", "empty"),
            ("*", "`*` alone"),
            ("*.", "empty"),
            ("a.*.example", "leading `*.`"),
            ("*example.com", "leading `*.`"),
            ("10.0.0.5", "an IP address"),
            ("2130706433", "an IP address"),
            ("0x7f.1", "an IP address"),
            ("*.0.1", "an IP address"),
            ("[::1]", "an IP address"),
            ("::1", "an IP address"),
            ("example.com:443", "a port"),
            ("exa mple.com", "characters"),
            ("a..b", "empty label"),
        ] {
            let err = EgressPolicy::new(&[entry.to_string()], &none)
                .expect_err(entry)
                .to_string();
            assert!(err.contains(&format!("{entry:?}")), "{entry}: {err}");
            assert!(err.contains(reason), "{entry}: {err}");
            assert!(err.starts_with("egress.allow entry"), "{err}");
        }
        let many: Vec<String> = (0..=MAX_ALLOW_ENTRIES)
            .map(|i| format!("h{i}.test"))
            .collect();
        assert!(matches!(
            EgressPolicy::new(&many, &none),
            Err(EgressError::TooMany { .. })
        ));
    }

    #[test]
    fn egress_hosts_values_must_be_socket_addresses() {
        let table = |k: &str, v: &str| BTreeMap::from([(k.to_string(), v.to_string())]);
        let ok = EgressPolicy::validate_hosts(&table("Mirror.Internal.", "127.0.0.1:3141"))
            .expect("valid");
        assert_eq!(
            ok.get("mirror.internal"),
            Some(&"127.0.0.1:3141".parse().unwrap())
        );
        assert!(EgressPolicy::validate_hosts(&table("m.internal", "[::1]:3141")).is_ok());
        let err = EgressPolicy::validate_hosts(&table("m.internal", "localhost:3141"))
            .expect_err("a name is not an address")
            .to_string();
        assert!(err.contains("\"m.internal\" = \"localhost:3141\""), "{err}");
        assert!(EgressPolicy::validate_hosts(&table("m.internal", "127.0.0.1")).is_err());
        assert!(EgressPolicy::validate_hosts(&table("10.0.0.1", "127.0.0.1:1")).is_err());
        // A mapping applies only to names the sandbox may reach.
        let p = policy(&["a.test"], &[("b.test", "127.0.0.1:1".to_string())]);
        assert!(p.mapped.is_empty());
    }

    #[test]
    fn numeric_hosts_decode_as_resolvers_read_them() {
        let v4 = |s: &str| literal_ip(s);
        let lo = Some(IpAddr::V4(Ipv4Addr::LOCALHOST));
        assert_eq!(v4("2130706433"), lo);
        assert_eq!(v4("0x7f.1"), lo);
        assert_eq!(v4("0x7f.0.0.1"), lo);
        assert_eq!(v4("017700000001"), lo);
        assert_eq!(v4("0177.0.0.01"), lo);
        assert_eq!(v4("127.1"), lo);
        assert_eq!(v4("[::1]"), Some(IpAddr::V6(Ipv6Addr::LOCALHOST)));
        assert_eq!(v4("256.1.1.1"), None);
        assert_eq!(v4("4294967296"), None);
        assert_eq!(v4("+1"), None);
        for name in ["1.2.3.4.5", "999", "a.0x", "foo.123", "0x"] {
            assert_eq!(normalise(name), Err(NameFault::Address), "{name}");
        }
        for name in ["1e100", "0xg", "a1.b2", "x.0a"] {
            assert!(normalise(name).is_ok(), "{name}");
        }
    }

    #[test]
    fn address_classes() {
        let class = |s: &str| refused_class(s.parse().unwrap());
        for (ip, expected) in [
            ("0.0.0.0", "unspecified"),
            ("0.1.2.3", "unspecified"),
            ("127.8.9.10", "loopback"),
            ("10.0.0.5", "private"),
            ("172.16.0.1", "private"),
            ("172.31.255.255", "private"),
            ("192.168.1.1", "private"),
            ("169.254.169.254", "link-local"),
            ("100.64.0.1", "CGNAT"),
            ("100.127.255.255", "CGNAT"),
            ("224.0.0.1", "multicast"),
            ("255.255.255.255", "broadcast"),
            ("240.0.0.1", "reserved"),
            ("192.0.2.1", "documentation"),
            ("198.18.0.1", "reserved"),
            ("::", "unspecified"),
            ("::1", "loopback"),
            ("::ffff:127.0.0.1", "IPv4-mapped loopback"),
            ("::ffff:10.0.0.1", "IPv4-mapped private"),
            ("::ffff:8.8.8.8", "IPv4-mapped IPv6"),
            ("::127.0.0.1", "IPv4-compatible loopback"),
            ("64:ff9b::a9fe:a9fe", "NAT64 form of a link-local"),
            ("2002:0a00:0001::1", "6to4 form of a private"),
            ("fc00::1", "unique local"),
            ("fd12:3456::1", "unique local"),
            ("fe80::1", "link-local"),
            ("fec0::1", "site-local"),
            ("ff02::1", "multicast"),
            ("2001:db8::1", "documentation"),
            ("2001::1", "reserved"),
            ("100::1", "reserved"),
        ] {
            let got = class(ip).unwrap_or_else(|| panic!("{ip} must be refused"));
            assert!(got.contains(expected), "{ip}: {got}");
        }
        for ip in [
            "8.8.8.8",
            "1.1.1.1",
            "172.32.0.1",
            "100.128.0.1",
            "2606:4700::1111",
            "64:ff9b::808:808",
            "2002:0808:0808::1",
        ] {
            assert_eq!(class(ip), None, "{ip} is public");
        }
    }
}
