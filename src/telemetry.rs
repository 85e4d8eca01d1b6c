//! Tracing set-up and Prometheus metrics.
//!
//! Metrics are served on the loopback telemetry listener only. Labels are closed sets (route
//! kind, status code): never a host, path, token or sandbox id, so nothing secret and nothing
//! unbounded reaches a label.

use std::sync::atomic::AtomicU64;
use std::sync::OnceLock;
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Installs the global tracing subscriber. `RUST_LOG` overrides `level`.
pub fn init_tracing(level: &str, json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second call (tests start several gateways) keeps the first subscriber.
    if json {
        let _ = builder.json().try_init();
    } else {
        let _ = builder.try_init();
    }
}

/// What kind of traffic a request was.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
#[repr(usize)]
pub enum RouteKind {
    /// `<port>-<id>.<base_domain>`
    Sandbox,
    /// The base domain with `X-Sandgate-Sandbox` / `X-Sandgate-Port`.
    Header,
    /// The control API and JWKS on the base domain.
    Api,
    /// Anything refused before routing (unknown host, malformed).
    Other,
}

impl RouteKind {
    const ALL: [RouteKind; 4] = [
        RouteKind::Sandbox,
        RouteKind::Header,
        RouteKind::Api,
        RouteKind::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RouteKind::Sandbox => "sandbox",
            RouteKind::Header => "header",
            RouteKind::Api => "api",
            RouteKind::Other => "other",
        }
    }
}

impl EncodeLabelValue for RouteKind {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(encoder, self.as_str())
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: RouteKind,
    status: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: RouteKind,
}

/// The gateway's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: Family<RouteLabels, Histogram>,
    pub open_connections: Gauge<i64, std::sync::atomic::AtomicI64>,
    pub connections_total: Counter,
    pub tls_handshake_failures: Counter,
    pub connections_refused: Counter,
    pub revoked_connections: Counter,
    pub upgrades: Counter<u64, AtomicU64>,
    /// Handles into `requests` and `latency`, resolved once: the families hash their labels
    /// and take a lock on every lookup, which the hot path should not pay per request.
    request_counters: Box<[OnceLock<Counter>]>,
    latency_by_route: [Histogram; RouteKind::ALL.len()],
}

/// Status codes 100..=599 have a slot each, per route kind.
const STATUS_SLOTS: usize = 500;

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("sandgate");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests answered, by route kind and status",
            requests.clone(),
        );
        let latency = Family::<RouteLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0005, 2.0, 16))
        });
        registry.register(
            "request_duration_seconds",
            "Time to response headers, by route kind",
            latency.clone(),
        );
        let open_connections = Gauge::default();
        registry.register(
            "open_connections",
            "Client connections open now",
            open_connections.clone(),
        );
        let connections_total = Counter::default();
        registry.register(
            "connections",
            "Client connections accepted",
            connections_total.clone(),
        );
        let tls_handshake_failures = Counter::default();
        registry.register(
            "tls_handshake_failures",
            "TLS handshakes that failed or timed out",
            tls_handshake_failures.clone(),
        );
        let connections_refused = Counter::default();
        registry.register(
            "connections_refused",
            "Connections refused by a connection limit",
            connections_refused.clone(),
        );
        let revoked_connections = Counter::default();
        registry.register(
            "revoked_connections",
            "Connections closed because their token or sandbox was revoked",
            revoked_connections.clone(),
        );
        let upgrades = Counter::default();
        registry.register(
            "upgrades",
            "Protocol upgrades (WebSocket) tunnelled",
            upgrades.clone(),
        );
        let latency_by_route =
            RouteKind::ALL.map(|route| latency.get_or_create(&RouteLabels { route }).clone());
        Metrics {
            request_counters: (0..RouteKind::ALL.len() * STATUS_SLOTS)
                .map(|_| OnceLock::new())
                .collect(),
            latency_by_route,
            registry,
            requests,
            latency,
            open_connections,
            connections_total,
            tls_handshake_failures,
            connections_refused,
            revoked_connections,
            upgrades,
        }
    }

    /// Counts one answered request.
    pub fn observe(&self, route: RouteKind, status: u16, elapsed: Duration) {
        let labels = || RequestLabels { route, status };
        match usize::from(status)
            .checked_sub(100)
            .filter(|&s| s < STATUS_SLOTS)
            .and_then(|s| self.request_counters.get(route as usize * STATUS_SLOTS + s))
        {
            Some(slot) => slot
                .get_or_init(|| self.requests.get_or_create(&labels()).clone())
                .inc(),
            None => self.requests.get_or_create(&labels()).inc(),
        };
        if let Some(h) = self.latency_by_route.get(route as usize) {
            h.observe(elapsed.as_secs_f64());
        }
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_requests_latency_and_connections() {
        let m = Metrics::new();
        m.observe(RouteKind::Sandbox, 200, Duration::from_millis(3));
        m.open_connections.inc();
        let text = m.encode();
        assert!(
            text.contains("sandgate_requests_total{route=\"sandbox\",status=\"200\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("sandgate_request_duration_seconds_bucket"),
            "{text}"
        );
        assert!(text.contains("sandgate_open_connections 1"), "{text}");
    }
}
