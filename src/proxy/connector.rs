//! How the proxy reaches a sandbox port: the one place that knows the kinds of upstream.
//!
//! - An isolated sandbox's port (`<id>.netns.invalid:<port>`, see [`crate::sandbox::Route`]):
//!   a socket made inside its network namespace, connected to `127.0.0.1:<port>` there.
//! - An isolated sandbox that runs on another node of the cluster: a relay connection to that
//!   node ([`crate::relay`]), which pipes it into the sandbox's namespace there.
//! - Anything else (an `upstream` sandbox, a plain process sandbox's host port): TCP through
//!   hyper-util's `HttpConnector`.
//!
//! Both the pooled client and the dedicated upgrade connections dial through here, so the data
//! plane itself never learns about namespaces. Only new upstream connections pay for the
//! lookup; pooled ones are reused as before.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use tower::Service;

use hyper_util::client::legacy::connect::{Connected, Connection};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::relay::{Relay, RelayStream};
use crate::sandbox::{Routes, NETNS_SUFFIX};

/// Dials sandbox ports.
#[derive(Clone)]
pub struct Connector {
    http: HttpConnector,
    routes: Arc<Routes>,
    relay: Arc<Relay>,
    timeout: Duration,
}

/// A connection to a sandbox port: a socket (local), or a relay through its node.
#[derive(Debug)]
pub enum Upstream {
    Tcp(tokio::net::TcpStream),
    Relay(RelayStream),
}

impl Connector {
    pub fn new(routes: Arc<Routes>, relay: Arc<Relay>, timeout: Duration) -> Connector {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.set_connect_timeout(Some(timeout));
        http.enforce_http(true);
        Connector {
            http,
            routes,
            relay,
            timeout,
        }
    }

    /// A connection to `authority` (a route's): what upgrades (WebSocket) use.
    pub async fn dial(&self, authority: &http::uri::Authority) -> std::io::Result<Upstream> {
        if let Some(id) = authority.host().strip_suffix(NETNS_SUFFIX) {
            let port = authority.port_u16().unwrap_or(80);
            if let Some(netns) = self.routes.netns(id) {
                return with_timeout(self.timeout, netns.connect(port))
                    .await
                    .map(Upstream::Tcp);
            }
            // Not here: through the node that runs it, if that is another one.
            let node = self.routes.get(id).and_then(|r| r.node.clone());
            let Some(node) = node.filter(|n| self.relay.enabled() && !self.relay.is_self(n)) else {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "the sandbox is not running on this node",
                ));
            };
            return match self.relay.dial(&node, id, port, self.timeout).await {
                Ok(stream) => Ok(Upstream::Relay(stream)),
                Err(e) => {
                    tracing::warn!(sandbox = %id, error = %e, "cannot reach a sandbox on another node");
                    Err(e.into())
                }
            };
        }
        let stream = with_timeout(
            self.timeout,
            tokio::net::TcpStream::connect(authority.as_str()),
        )
        .await?;
        let _ = stream.set_nodelay(true);
        Ok(Upstream::Tcp(stream))
    }
}

impl AsyncRead for Upstream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Upstream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Upstream::Relay(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Upstream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Upstream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Upstream::Relay(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Upstream::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Upstream::Relay(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Upstream::Tcp(s) => s.is_write_vectored(),
            Upstream::Relay(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Upstream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Upstream::Relay(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Upstream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Upstream::Relay(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

impl Connection for Upstream {
    fn connected(&self) -> Connected {
        match self {
            Upstream::Tcp(s) => s.connected(),
            Upstream::Relay(_) => Connected::new(),
        }
    }
}

async fn with_timeout<T>(
    limit: Duration,
    f: impl Future<Output = std::io::Result<T>>,
) -> std::io::Result<T> {
    tokio::time::timeout(limit, f)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))?
}

impl Service<Uri> for Connector {
    type Response = TokioIo<Upstream>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.http
            .poll_ready(cx)
            .map_err(|e| std::io::Error::other(e.to_string()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let netns = uri
            .authority()
            .is_some_and(|a| a.host().ends_with(NETNS_SUFFIX));
        if netns {
            let this = self.clone();
            return Box::pin(async move {
                let authority = uri
                    .authority()
                    .ok_or_else(|| std::io::Error::other("no authority"))?;
                this.dial(authority).await.map(TokioIo::new)
            });
        }
        let fut = self.http.call(uri);
        Box::pin(async move {
            fut.await
                .map(|io| TokioIo::new(Upstream::Tcp(io.into_inner())))
                .map_err(|e| {
                    std::io::Error::new(std::io::ErrorKind::ConnectionRefused, e.to_string())
                })
        })
    }
}
