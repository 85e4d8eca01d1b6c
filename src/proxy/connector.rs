//! How the proxy reaches a sandbox port: the one place that knows the kinds of upstream.
//!
//! - An isolated sandbox's port (`<id>.netns.invalid:<port>`, see [`crate::sandbox::Route`]):
//!   a socket made inside its network namespace, connected to `127.0.0.1:<port>` there.
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

use crate::sandbox::{Routes, NETNS_SUFFIX};

/// Dials sandbox ports.
#[derive(Clone)]
pub struct Connector {
    http: HttpConnector,
    routes: Arc<Routes>,
    timeout: Duration,
}

impl Connector {
    pub fn new(routes: Arc<Routes>, timeout: Duration) -> Connector {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.set_connect_timeout(Some(timeout));
        http.enforce_http(true);
        Connector {
            http,
            routes,
            timeout,
        }
    }

    /// A TCP stream to `authority` (a route's): what upgrades (WebSocket) use.
    pub async fn dial(
        &self,
        authority: &http::uri::Authority,
    ) -> std::io::Result<tokio::net::TcpStream> {
        if let Some(id) = authority.host().strip_suffix(NETNS_SUFFIX) {
            let port = authority.port_u16().unwrap_or(80);
            let netns = self.routes.netns(id).ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "the sandbox is not running on this node",
                )
            })?;
            return with_timeout(self.timeout, netns.connect(port)).await;
        }
        let stream = with_timeout(
            self.timeout,
            tokio::net::TcpStream::connect(authority.as_str()),
        )
        .await?;
        let _ = stream.set_nodelay(true);
        Ok(stream)
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
    type Response = TokioIo<tokio::net::TcpStream>;
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
            fut.await.map_err(|e| {
                std::io::Error::new(std::io::ErrorKind::ConnectionRefused, e.to_string())
            })
        })
    }
}
