//! Tracing set-up and Prometheus metrics.
//!
//! Metrics are served on the loopback telemetry listener only. Labels are closed sets (route
//! kind, status code): never a host, path, token or sandbox id, so nothing secret and nothing
//! unbounded reaches a label.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use prometheus_client::encoding::{
    EncodeLabelSet, EncodeLabelValue, EncodeMetric, LabelValueEncoder, MetricEncoder, NoLabelSet,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;

/// Installs the global tracing subscriber. `RUST_LOG` overrides `level`.
///
/// rustls is held to errors unless `level` names it: it warns about things any client can
/// send (an IP address as SNI, say), which would let anyone fill the log.
pub fn init_tracing(level: &str, json: bool) {
    let spec = if level.contains("rustls") {
        level.to_string()
    } else {
        format!("{level},rustls=error")
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(spec));
    // Colour only for a person at a terminal: escape codes in a file or a journal are noise
    // that every reader has to strip. `NO_COLOR` turns it off at a terminal too.
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
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

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EgressLabels {
    decision: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StorageLabels {
    op: &'static str,
}

/// The gateway's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    pub open_connections: Gauge<i64, std::sync::atomic::AtomicI64>,
    pub connections_total: Counter,
    pub tls_handshake_failures: Counter,
    pub connections_refused: Counter,
    pub revoked_connections: Counter,
    /// Cluster relay connections opened by another node, and hellos refused (no valid proof,
    /// or a sandbox not running here).
    pub relay_connections: Counter,
    pub relay_refused: Counter,
    pub upgrades: Counter<u64, AtomicU64>,
    /// Sandbox egress proxy decisions (`sandbox::egress`): a connection or request let out,
    /// and one refused with a 403. Resolved once, so the proxy takes no family lock.
    pub egress_allowed: Counter,
    pub egress_denied: Counter,
    /// Volume, image, snapshot and file operations done, and the bytes they wrote, by `op`
    /// (see [`Metrics::storage`]).
    storage_ops: Family<StorageLabels, Counter>,
    storage_bytes: Family<StorageLabels, Counter>,
    /// Handles into `requests` and `latency`, resolved once: the families hash their labels
    /// and take a lock on every lookup, which the hot path should not pay per request.
    request_counters: Box<[OnceLock<Counter>]>,
    latency_by_route: [LatencyHistogram; RouteKind::ALL.len()],
}

/// Upper bounds of the latency buckets: 0.5 ms doubling to about 16 s.
const LATENCY_BUCKETS: usize = 16;

/// A latency histogram that records with atomics only, striped so that data-plane workers on
/// different cores write different cache lines (the stock histogram takes a lock per
/// observation, which every request on every core would contend for).
#[derive(Debug, Clone, Default)]
pub struct LatencyHistogram {
    stripes: std::sync::Arc<[Stripe; STRIPES]>,
}

const STRIPES: usize = 8;

#[derive(Debug, Default)]
#[repr(align(128))]
struct Stripe {
    count: AtomicU64,
    sum_nanos: AtomicU64,
    buckets: [AtomicU64; LATENCY_BUCKETS],
}

fn bucket_bound(i: usize) -> f64 {
    0.0005 * f64::from(1u32 << i)
}

thread_local! {
    /// The stripe this thread writes: threads are dealt stripes in turn.
    static STRIPE: usize = {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        usize::try_from(NEXT.fetch_add(1, Ordering::Relaxed)).unwrap_or(0) % STRIPES
    };
}

impl LatencyHistogram {
    /// Records one observation.
    pub fn observe(&self, elapsed: Duration) {
        let stripe = STRIPE.try_with(|s| *s).unwrap_or(0);
        let Some(stripe) = self.stripes.get(stripe) else {
            return;
        };
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        stripe.count.fetch_add(1, Ordering::Relaxed);
        stripe.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
        let secs = elapsed.as_secs_f64();
        if let Some(bucket) = (0..LATENCY_BUCKETS)
            .find(|&i| secs <= bucket_bound(i))
            .and_then(|i| stripe.buckets.get(i))
        {
            bucket.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Sum in seconds, count, and per-bucket (not cumulative) counts.
    fn snapshot(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let mut count = 0u64;
        let mut nanos = 0u64;
        let mut buckets: Vec<(f64, u64)> =
            (0..LATENCY_BUCKETS).map(|i| (bucket_bound(i), 0)).collect();
        for stripe in self.stripes.iter() {
            count = count.wrapping_add(stripe.count.load(Ordering::Relaxed));
            nanos = nanos.wrapping_add(stripe.sum_nanos.load(Ordering::Relaxed));
            for (slot, b) in buckets.iter_mut().zip(&stripe.buckets) {
                slot.1 = slot.1.wrapping_add(b.load(Ordering::Relaxed));
            }
        }
        #[allow(clippy::cast_precision_loss)]
        let sum = nanos as f64 / 1e9;
        (sum, count, buckets)
    }
}

impl TypedMetric for LatencyHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for LatencyHistogram {
    fn encode(&self, mut encoder: MetricEncoder<'_>) -> Result<(), std::fmt::Error> {
        let (sum, count, buckets) = self.snapshot();
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// Status codes 100..=599 have a slot each, per route kind.
const STATUS_SLOTS: usize = 500;

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Counts one storage operation `op` (`volume_create`, `volume_delete`, `image_import`,
    /// `image_delete`, `snapshot_create`, `snapshot_delete`, `file_write`, `file_delete`) that
    /// wrote `bytes`. Control-plane only: the family lookup takes a lock.
    pub fn storage(&self, op: &'static str, bytes: u64) {
        let labels = StorageLabels { op };
        self.storage_ops.get_or_create(&labels).inc();
        if bytes > 0 {
            self.storage_bytes.get_or_create(&labels).inc_by(bytes);
        }
    }

    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("sandgate");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests answered, by route kind and status",
            requests.clone(),
        );
        let latency = Family::<RouteLabels, LatencyHistogram>::default();
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
        let relay_connections = Counter::default();
        registry.register(
            "relay_connections",
            "Cluster relay connections other nodes opened to this node's isolated sandboxes",
            relay_connections.clone(),
        );
        let relay_refused = Counter::default();
        registry.register(
            "relay_refused",
            "Cluster relay connections refused: no valid cluster proof, or no such sandbox here",
            relay_refused.clone(),
        );
        let upgrades = Counter::default();
        registry.register(
            "upgrades",
            "Protocol upgrades (WebSocket) tunnelled",
            upgrades.clone(),
        );
        let egress = Family::<EgressLabels, Counter>::default();
        registry.register(
            "egress_decisions",
            "Sandbox egress proxy decisions, allowed or denied",
            egress.clone(),
        );
        let egress_allowed = egress
            .get_or_create(&EgressLabels {
                decision: "allowed",
            })
            .clone();
        let egress_denied = egress
            .get_or_create(&EgressLabels { decision: "denied" })
            .clone();
        let storage_ops = Family::<StorageLabels, Counter>::default();
        registry.register(
            "storage_operations",
            "Volume, image, snapshot and file operations done, by op",
            storage_ops.clone(),
        );
        let storage_bytes = Family::<StorageLabels, Counter>::default();
        registry.register(
            "storage_written_bytes",
            "Bytes written by image imports, snapshots and file writes, by op",
            storage_bytes.clone(),
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
            open_connections,
            connections_total,
            tls_handshake_failures,
            connections_refused,
            revoked_connections,
            relay_connections,
            relay_refused,
            upgrades,
            egress_allowed,
            egress_denied,
            storage_ops,
            storage_bytes,
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
            h.observe(elapsed);
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
