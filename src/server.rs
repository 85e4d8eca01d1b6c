//! Listeners, TLS accept, HTTP/1.1 and HTTP/2 serving, connection limits and graceful shutdown.
//!
//! [`run`] takes already-bound listeners and a shutdown future, so tests bind `127.0.0.1:0` and
//! run as many gateways as they like side by side.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::gateway::Gateway;
use crate::proxy::{ConnContext, Proxy};
use crate::unix_now;

/// The sockets a gateway serves on, bound by the caller.
#[derive(Debug)]
pub struct Listeners {
    /// The TLS listening sockets, all on one address: one per data-plane worker, bound with
    /// `SO_REUSEPORT` so the kernel spreads new connections across the workers.
    pub gateway: Vec<std::net::TcpListener>,
    /// Plain-HTTP loopback listener: `/metrics`, `/healthz`, `/readyz`.
    pub telemetry: TcpListener,
}

impl Listeners {
    /// Binds the addresses from the config, with `workers` sockets for the gateway address.
    ///
    /// `SO_REUSEPORT` would also let a second process of the same user join the port and take
    /// a share of its connections, so the address is first claimed without it: if anything
    /// holds it, binding fails here with `AddrInUse`.
    pub async fn bind(
        gateway: SocketAddr,
        telemetry: SocketAddr,
        workers: usize,
    ) -> Result<Listeners, BindError> {
        let gateway_err = |source| BindError {
            key: "[gateway] listen",
            addr: gateway,
            source,
        };
        let addr = {
            let probe = std::net::TcpListener::bind(gateway).map_err(gateway_err)?;
            probe.local_addr().map_err(gateway_err)?
        };
        let gateway = (0..workers.max(1))
            .map(|_| reuseport_listener(addr))
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(gateway_err)?;
        let telemetry = TcpListener::bind(telemetry)
            .await
            .map_err(|source| BindError {
                key: "[telemetry] listen",
                addr: telemetry,
                source,
            })?;
        Ok(Listeners { gateway, telemetry })
    }

    /// The address the gateway sockets are bound to.
    pub fn gateway_addr(&self) -> std::io::Result<SocketAddr> {
        match self.gateway.first() {
            Some(l) => l.local_addr(),
            None => Err(std::io::Error::other("no gateway listener")),
        }
    }
}

fn reuseport_listener(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

/// A listener could not be bound. The message names the config key that set the address, so
/// an operator knows which of the two listeners failed and what to change.
#[derive(Debug)]
pub struct BindError {
    /// `[gateway] listen` or `[telemetry] listen`.
    pub key: &'static str,
    pub addr: SocketAddr,
    pub source: std::io::Error,
}

impl std::fmt::Display for BindError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Self { key, addr, source } = self;
        write!(f, "cannot listen on {addr} ({key}): {source}")?;
        match source.kind() {
            std::io::ErrorKind::AddrInUse => write!(
                f,
                ". Another program holds this address: is another sandgate running? Stop it, \
                 or set {key} in the config file to a free address"
            ),
            std::io::ErrorKind::AddrNotAvailable => write!(
                f,
                ". This host has no such address: set {key} to one of its addresses, or \
                 0.0.0.0 for all"
            ),
            std::io::ErrorKind::PermissionDenied if addr.port() < 1024 => write!(
                f,
                ". Ports below 1024 need root or CAP_NET_BIND_SERVICE \
                 (setcap cap_net_bind_service=+ep on the binary), or set {key} to a port \
                 from 1024 up"
            ),
            _ => Ok(()),
        }
    }
}

impl std::error::Error for BindError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// Why serving stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The TLS configuration could not be built.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// A worker thread or its runtime could not be started.
    #[error("could not start a data-plane worker: {0}")]
    Worker(#[source] std::io::Error),
}

/// What every data-plane worker shares.
struct Shared {
    gw: Arc<Gateway>,
    acceptor: TlsAcceptor,
    protocols: Protocols,
    limits: Arc<Limits>,
    api: axum::Router,
    /// Cancelled when shutdown starts: stop accepting, finish what is in flight.
    draining: CancellationToken,
    /// Cancelled when the drain deadline passes: whatever is still open closes.
    hard_stop: CancellationToken,
    /// Cancelled last, once the process driver has stopped its sandboxes: workers' runtimes
    /// (which host tasks spawned by requests, such as sandbox supervisors) may end.
    release: CancellationToken,
}

/// Serves until `shutdown` completes, then stops accepting, lets in-flight requests finish
/// within `[gateway] shutdown_grace_secs`, and returns.
///
/// Each gateway socket gets a worker: an OS thread with a single-threaded tokio runtime that
/// accepts, terminates TLS and proxies through its own upstream pool. A request never crosses
/// threads, which is what lets the proxy keep up with HAProxy (see PERFORMANCE in the README).
/// Maintenance and telemetry run on the caller's runtime.
pub async fn run(
    gw: Arc<Gateway>,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    let cfg = gw.config.gateway.clone();
    // The upstream policy refuses the gateway's own listeners, wherever they were really
    // bound (a configured port 0 is only known now).
    if let (Ok(tls), Ok(telemetry)) = (listeners.gateway_addr(), listeners.telemetry.local_addr()) {
        gw.upstream_policy.set_listeners(tls, telemetry);
        gw.relay.set_listen_port(tls.port());
    }
    let shared = Arc::new(Shared {
        acceptor: TlsAcceptor::from(crate::tls::server_config(
            Arc::clone(&gw.certs),
            gw.relay.enabled(),
        )?),
        protocols: Protocols::new(&cfg),
        limits: Arc::new(Limits {
            total: Arc::new(Semaphore::new(cfg.max_connections)),
            per_ip: DashMap::default(),
            max_per_ip: cfg.max_connections_per_ip,
        }),
        api: crate::api::router(Arc::clone(&gw)),
        draining: CancellationToken::new(),
        hard_stop: CancellationToken::new(),
        release: CancellationToken::new(),
        gw: Arc::clone(&gw),
    });

    let background = spawn_maintenance(Arc::clone(&gw), shared.draining.clone());
    let cluster = tokio::spawn(crate::cluster::run(
        Arc::clone(&gw),
        shared.draining.clone(),
    ));
    let telemetry = tokio::spawn(crate::api::serve_telemetry(
        Arc::clone(&gw),
        listeners.telemetry,
        shared.draining.clone(),
    ));

    let addr = listeners.gateway.first().and_then(|l| l.local_addr().ok());
    let mut workers = Vec::with_capacity(listeners.gateway.len());
    let mut drained = Vec::with_capacity(listeners.gateway.len());
    for (index, listener) in listeners.gateway.into_iter().enumerate() {
        let (done, drained_rx) = tokio::sync::oneshot::channel::<()>();
        let for_worker = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name(format!("sandgate-worker-{index}"))
            .spawn(move || worker(listener, for_worker, done));
        match thread {
            Ok(t) => {
                workers.push(t);
                drained.push(drained_rx);
            }
            Err(err) => {
                shared.draining.cancel();
                shared.hard_stop.cancel();
                shared.release.cancel();
                return Err(ServerError::Worker(err));
            }
        }
    }
    tracing::info!(
        listen = %addr.map(|a| a.to_string()).unwrap_or_default(),
        base_domain = %cfg.base_domain,
        workers = workers.len(),
        "gateway listening"
    );

    shutdown.await;
    tracing::info!(
        grace_secs = cfg.shutdown_grace.as_secs(),
        "shutting down: draining connections"
    );
    shared.draining.cancel();
    let all_drained = futures_util::future::join_all(drained);
    if tokio::time::timeout(cfg.shutdown_grace, all_drained)
        .await
        .is_err()
    {
        tracing::warn!("drain deadline passed; closing remaining connections");
    }
    shared.hard_stop.cancel();
    if let Some(driver) = &gw.driver {
        driver.shutdown().await;
    }
    shared.release.cancel();
    let _ = tokio::task::spawn_blocking(move || {
        for w in workers {
            let _ = w.join();
        }
    })
    .await;
    background.abort();
    cluster.abort();
    let _ = telemetry.await;
    Ok(())
}

/// One data-plane worker: its own runtime, listener, upstream pool and connections.
fn worker(
    listener: std::net::TcpListener,
    shared: Arc<Shared>,
    done: tokio::sync::oneshot::Sender<()>,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            tracing::error!(error = %err, "could not start a worker runtime");
            return;
        }
    };
    runtime.block_on(async {
        match TcpListener::from_std(listener) {
            Ok(listener) => accept_loop(listener, &shared).await,
            Err(err) => tracing::error!(error = %err, "could not register a listener"),
        }
        let _ = done.send(());
        shared.release.cancelled().await;
    });
    // Tasks still parked here (a tunnel past the deadline, say) are dropped now.
    runtime.shutdown_timeout(Duration::from_secs(1));
}

/// Accepts until draining starts, then waits for this worker's connections (or the deadline).
async fn accept_loop(listener: TcpListener, shared: &Arc<Shared>) {
    let gw = &shared.gw;
    let proxy = Arc::new(Proxy::new(
        Arc::clone(gw),
        shared.api.clone(),
        shared.hard_stop.clone(),
    ));
    let tasks = TaskTracker::new();
    loop {
        let (tcp, remote) = tokio::select! {
            _ = shared.draining.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(err) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // Other cluster nodes relay many clients' connections: only the total cap holds them.
        let node = gw.relay.is_node_ip(remote.ip());
        let Some(slot) = shared.limits.admit(remote.ip(), node) else {
            gw.metrics.connections_refused.inc();
            drop(tcp);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        tasks.spawn(serve_connection(
            tcp,
            remote,
            slot,
            Arc::clone(shared),
            Arc::clone(&proxy),
        ));
    }
    drop(listener);
    tasks.close();
    tokio::select! {
        _ = tasks.wait() => {}
        _ = shared.hard_stop.cancelled() => {}
    }
}

async fn serve_connection(
    tcp: TcpStream,
    remote: SocketAddr,
    slot: Slot,
    shared: Arc<Shared>,
    proxy: Arc<Proxy>,
) {
    let (gw, acceptor, builder, draining) = (
        &shared.gw,
        &shared.acceptor,
        &shared.protocols,
        &shared.draining,
    );
    let handshake_timeout = gw.config.gateway.handshake_timeout;
    let tls = match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(err)) => {
            gw.metrics.tls_handshake_failures.inc();
            tracing::debug!(%remote, error = %err, "TLS handshake failed");
            return;
        }
        Err(_) => {
            gw.metrics.tls_handshake_failures.inc();
            tracing::debug!(%remote, "TLS handshake timed out");
            return;
        }
    };
    gw.metrics.connections_total.inc();
    if tls.get_ref().1.alpn_protocol() == Some(crate::relay::ALPN) {
        return serve_relay(tls, remote, slot, &shared).await;
    }
    let ctx = Arc::new(ConnContext::new(remote, gw.tracker.connection()));
    // The slot and the gauge are released when the connection is, which for a WebSocket is
    // when its tunnel ends, not when this task returns after the 101.
    ctx.conn.hold(slot);
    ctx.conn.hold(OpenConnection::new(Arc::clone(&gw.metrics)));
    let cancelled = ctx.conn.cancelled().clone();
    let service = {
        let ctx = Arc::clone(&ctx);
        service_fn(move |req| {
            ctx.touch();
            Arc::clone(&proxy).serve(req, Arc::clone(&ctx))
        })
    };
    // The protocol is the one ALPN settled; a client that offered none speaks HTTP/1.1.
    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    let io = TokioIo::new(tls);
    // Both connection types have the same shape but no common trait: one body, twice.
    macro_rules! drive {
        ($conn:expr, $idle:expr) => {{
            let conn = $conn;
            tokio::pin!(conn);
            tokio::select! {
                res = conn.as_mut() => {
                    if let Err(err) = res {
                        tracing::debug!(%remote, error = %err, "connection ended with an error");
                    }
                }
                _ = cancelled.cancelled() => {
                    gw.metrics.revoked_connections.inc();
                    tracing::debug!(%remote, "connection closed: its token or sandbox was revoked");
                }
                // Draining, or an idle HTTP/2 connection: GOAWAY, let open streams finish.
                _ = async { tokio::select! { _ = draining.cancelled() => {}, _ = $idle => {} } } => {
                    conn.as_mut().graceful_shutdown();
                    tokio::select! {
                        _ = conn.as_mut() => {}
                        _ = cancelled.cancelled() => {}
                    }
                }
            }
        }};
    }
    if h2 {
        let idle = gw.config.gateway.idle_timeout;
        drive!(builder.h2.serve_connection(io, service), ctx.idle_for(idle))
    } else {
        // HTTP/1.1 idleness is bounded by hyper's header timer (see `Protocols::new`).
        drive!(
            builder.h1.serve_connection(io, service).with_upgrades(),
            std::future::pending::<()>()
        )
    }
}

/// A relay connection from another node ([`crate::relay`]): into one of this node's isolated
/// sandboxes, closed when the sandbox ends or the gateway stops.
async fn serve_relay(
    tls: tokio_rustls::server::TlsStream<TcpStream>,
    remote: SocketAddr,
    slot: Slot,
    shared: &Arc<Shared>,
) {
    let gw = &shared.gw;
    let conn = gw.tracker.connection();
    conn.hold(slot);
    conn.hold(OpenConnection::new(Arc::clone(&gw.metrics)));
    let closed = conn.cancelled().clone();
    let stop = shared.hard_stop.clone();
    let routes = &gw.routes;
    let connect = |id: String, port: u16| async move {
        let live = routes
            .get(&id)
            .is_some_and(|r| r.live && r.port(port).is_some());
        let netns = routes.netns(&id).filter(|_| live);
        let Some(netns) = netns else {
            return Err(format!(
                "sandbox {id} is not running on this node with port {port}"
            ));
        };
        netns
            .connect(port)
            .await
            .map_err(|e| format!("cannot reach port {port} in sandbox {id}: {e}"))
    };
    let admit = |id: &str| {
        gw.metrics.relay_connections.inc();
        conn.admit("relay", id, usize::MAX);
    };
    let relayed = tokio::select! {
        r = gw.relay.serve(tls, remote, gw.config.gateway.handshake_timeout, connect, admit, &closed) => r,
        _ = stop.cancelled() => Ok(()),
    };
    match relayed {
        Ok(()) => {}
        Err(reason) => {
            gw.metrics.relay_refused.inc();
            tracing::debug!(%remote, %reason, "relay connection refused");
        }
    }
}

/// The HTTP/1.1 and HTTP/2 server settings, built once.
struct Protocols {
    h1: hyper::server::conn::http1::Builder,
    h2: hyper::server::conn::http2::Builder<TokioExecutor>,
}

impl Protocols {
    fn new(cfg: &crate::config::GatewayConfig) -> Protocols {
        let mut h1 = hyper::server::conn::http1::Builder::new();
        h1.timer(TokioTimer::new())
            // hyper's header timer also runs while a keep-alive connection waits for its next
            // request, so the shorter of the two bounds both.
            .header_read_timeout(cfg.header_read_timeout.min(cfg.idle_timeout))
            // The request head (line and headers) may not exceed this: 431 beyond it.
            .max_header_size(cfg.max_header_bytes)
            .max_buf_size(cfg.max_header_bytes.max(8192) + 8192)
            .keep_alive(true);
        let mut h2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new())
            .max_concurrent_streams(cfg.h2_max_concurrent_streams)
            .max_header_list_size(u32::try_from(cfg.max_header_bytes).unwrap_or(u32::MAX))
            .keep_alive_interval(Some(Duration::from_secs(30)))
            .keep_alive_timeout(Duration::from_secs(20));
        Protocols { h1, h2 }
    }
}

/// A place in the open-connections gauge, given back on drop.
struct OpenConnection(Arc<crate::telemetry::Metrics>);

impl OpenConnection {
    fn new(metrics: Arc<crate::telemetry::Metrics>) -> OpenConnection {
        metrics.open_connections.inc();
        OpenConnection(metrics)
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.open_connections.dec();
    }
}

/// Connection limits: a global cap and a per-client-IP cap.
struct Limits {
    total: Arc<Semaphore>,
    per_ip: DashMap<IpAddr, usize>,
    max_per_ip: usize,
}

/// A held connection slot; released on drop.
struct Slot {
    _permit: OwnedSemaphorePermit,
    /// The client address counted against the per-IP cap (`None` for a cluster node's).
    ip: Option<IpAddr>,
    limits: Arc<Limits>,
}

impl Limits {
    /// A slot for a connection from `ip`; `uncapped` (another cluster node) skips the
    /// per-IP cap.
    fn admit(self: &Arc<Self>, ip: IpAddr, uncapped: bool) -> Option<Slot> {
        let permit = Arc::clone(&self.total).try_acquire_owned().ok()?;
        if uncapped {
            return Some(Slot {
                _permit: permit,
                ip: None,
                limits: Arc::clone(self),
            });
        }
        let mut count = self.per_ip.entry(ip).or_insert(0);
        if *count >= self.max_per_ip {
            return None;
        }
        *count += 1;
        drop(count);
        Some(Slot {
            _permit: permit,
            ip: Some(ip),
            limits: Arc::clone(self),
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let Some(ip) = self.ip else {
            return;
        };
        if let Some(mut count) = self.limits.per_ip.get_mut(&ip) {
            *count = count.saturating_sub(1);
        }
        self.limits.per_ip.remove_if(&ip, |_, c| *c == 0);
    }
}

/// Periodic work: pick up rotated signing keys (within 5 s), end expired and idle sandboxes
/// (every second) and forget expired revocations.
fn spawn_maintenance(gw: Arc<Gateway>, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut keys = tokio::time::interval(Duration::from_secs(2));
        let mut prune = tokio::time::interval(Duration::from_secs(60));
        let mut expire = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = keys.tick() => {
                    if let Err(err) = gw.reload_keys().await {
                        tracing::error!(error = %err, "could not reload signing keys");
                    }
                }
                _ = expire.tick() => {
                    let now = unix_now();
                    if let Err(err) = gw.expire_sandboxes(now).await {
                        tracing::warn!(error = %err, "could not end expired sandboxes");
                    }
                    gw.end_idle_sandboxes(now).await;
                }
                _ = prune.tick() => {
                    gw.api_limits.shrink();
                    let now = unix_now();
                    gw.tokens.prune(now);
                    if let Err(err) = gw.store.prune(now).await {
                        tracing::warn!(error = %err, "could not prune expired revocations");
                    }
                }
            }
        }
    })
}
