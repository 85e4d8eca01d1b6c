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
    /// The TLS listener: control API and sandbox traffic.
    pub gateway: TcpListener,
    /// Plain-HTTP loopback listener: `/metrics`, `/healthz`, `/readyz`.
    pub telemetry: TcpListener,
}

impl Listeners {
    /// Binds the addresses from the config.
    pub async fn bind(gateway: SocketAddr, telemetry: SocketAddr) -> std::io::Result<Listeners> {
        Ok(Listeners {
            gateway: TcpListener::bind(gateway).await?,
            telemetry: TcpListener::bind(telemetry).await?,
        })
    }
}

/// Why serving stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The TLS configuration could not be built.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
}

/// Serves until `shutdown` completes, then stops accepting, lets in-flight requests finish
/// within `[gateway] shutdown_grace_secs`, and returns.
pub async fn run(
    gw: Arc<Gateway>,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    let cfg = gw.config.gateway.clone();
    let acceptor = TlsAcceptor::from(crate::tls::server_config(Arc::clone(&gw.certs))?);
    let draining = CancellationToken::new();
    let hard_stop = CancellationToken::new();
    let api = crate::api::router(Arc::clone(&gw));
    let proxy = Arc::new(Proxy::new(Arc::clone(&gw), api, hard_stop.clone()));
    let tasks = TaskTracker::new();

    let background = spawn_maintenance(Arc::clone(&gw), draining.clone());
    let telemetry = tokio::spawn(crate::api::serve_telemetry(
        Arc::clone(&gw),
        listeners.telemetry,
        draining.clone(),
    ));

    let builder = Arc::new(Protocols::new(&cfg));

    let limits = Arc::new(Limits {
        total: Arc::new(Semaphore::new(cfg.max_connections)),
        per_ip: DashMap::default(),
        max_per_ip: cfg.max_connections_per_ip,
    });

    tracing::info!(
        listen = %listeners.gateway.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        base_domain = %cfg.base_domain,
        "gateway listening"
    );
    tokio::pin!(shutdown);
    loop {
        let (tcp, remote) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listeners.gateway.accept() => match accepted {
                Ok(a) => a,
                Err(err) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Some(slot) = limits.admit(remote.ip()) else {
            gw.metrics.connections_refused.inc();
            drop(tcp);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        tasks.spawn(serve_connection(
            tcp,
            remote,
            slot,
            acceptor.clone(),
            Arc::clone(&builder),
            Arc::clone(&proxy),
            Arc::clone(&gw),
            draining.clone(),
        ));
    }

    tracing::info!(
        grace_secs = cfg.shutdown_grace.as_secs(),
        "shutting down: draining connections"
    );
    drop(listeners.gateway);
    draining.cancel();
    tasks.close();
    if tokio::time::timeout(cfg.shutdown_grace, tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("drain deadline passed; closing remaining connections");
    }
    hard_stop.cancel();
    if let Some(driver) = &gw.driver {
        driver.shutdown().await;
    }
    background.abort();
    let _ = telemetry.await;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn serve_connection(
    tcp: TcpStream,
    remote: SocketAddr,
    slot: Slot,
    acceptor: TlsAcceptor,
    builder: Arc<Protocols>,
    proxy: Arc<Proxy>,
    gw: Arc<Gateway>,
    draining: CancellationToken,
) {
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
    ip: IpAddr,
    limits: Arc<Limits>,
}

impl Limits {
    fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<Slot> {
        let permit = Arc::clone(&self.total).try_acquire_owned().ok()?;
        let mut count = self.per_ip.entry(ip).or_insert(0);
        if *count >= self.max_per_ip {
            return None;
        }
        *count += 1;
        drop(count);
        Some(Slot {
            _permit: permit,
            ip,
            limits: Arc::clone(self),
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let ip = self.ip;
        if let Some(mut count) = self.limits.per_ip.get_mut(&ip) {
            *count = count.saturating_sub(1);
        }
        self.limits.per_ip.remove_if(&ip, |_, c| *c == 0);
    }
}

/// Periodic work: pick up rotated signing keys (within 5 s) and forget expired revocations.
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
                    if let Err(err) = gw.expire_sandboxes(unix_now()).await {
                        tracing::warn!(error = %err, "could not end expired sandboxes");
                    }
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
