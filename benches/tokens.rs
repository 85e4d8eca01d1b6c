//! Micro-benchmarks of the data plane's per-request work: connect-token verification (full and
//! cached), issuing, the route lookup in a table of 100k sandboxes, host classification, the
//! Bearer shape test and request-header stripping.
//!
//! ```sh
//! cargo bench --bench tokens            # all of them
//! cargo bench --bench tokens -- verify  # a filter
//! ```
//! `ROUTES=N` changes the route table size (default 100000).

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use http::{HeaderMap, HeaderValue};
use sandgate::proxy::{canonical_host, headers, parse_sandbox_label};
use sandgate::sandbox::{new_id, Routes};
use sandgate::store::{SandboxRecord, SandboxStatus};
use sandgate::token::{looks_like_ours, Authority, IssueRequest, SigningKey, TokenSettings};

fn settings(cache_capacity: usize) -> TokenSettings {
    TokenSettings {
        issuer: "https://sandbox.localhost".into(),
        audience: "sandgate".into(),
        default_ttl_secs: 600,
        max_ttl_secs: 86_400,
        leeway_secs: 30,
        cache_capacity,
    }
}

fn authority(key: &SigningKey, cache_capacity: usize) -> Authority {
    Authority::new(settings(cache_capacity), vec![key.clone()]).expect("valid bench settings")
}

fn request(sbx: &str) -> IssueRequest {
    IssueRequest {
        sub: "cred_bench".into(),
        sbx: sbx.into(),
        port: 8000,
        ttl_secs: Some(3600),
        md: None,
        once: false,
    }
}

fn tokens(c: &mut Criterion) {
    let key = SigningKey::generate().expect("key generation");
    let now = sandgate::unix_now();
    let sbx = new_id();
    let issuer = authority(&key, 0);
    let (token, _) = issuer.issue(request(&sbx), now).expect("issue");

    let mut g = c.benchmark_group("token");
    g.throughput(Throughput::Elements(1));

    // Every verify is a full one: no cache at all (what a first presentation costs).
    let uncached = authority(&key, 0);
    g.bench_function("verify_uncached", |b| {
        b.iter(|| {
            uncached
                .verify(black_box(&token), now)
                .expect("valid token")
        })
    });

    // A repeat presentation: cache hit plus the expiry and revocation checks.
    let cached = authority(&key, 10_000);
    cached.verify(&token, now).expect("valid token");
    g.bench_function("verify_cached", |b| {
        b.iter(|| cached.verify(black_box(&token), now).expect("valid token"))
    });

    // Distinct tokens through a small cache: a miss, a full verify and an insert each time.
    let pool: Vec<String> = (0..4096)
        .map(|_| issuer.issue(request(&sbx), now).expect("issue").0)
        .collect();
    let small = authority(&key, 1024);
    let mut i = 0usize;
    g.bench_function("verify_miss_insert", |b| {
        b.iter(|| {
            i = (i + 1) % pool.len();
            small.verify(black_box(&pool[i]), now).expect("valid token")
        })
    });

    g.bench_function("issue", |b| {
        b.iter_batched(
            || request(&sbx),
            |req| issuer.issue(req, now).expect("issue"),
            BatchSize::SmallInput,
        )
    });

    g.bench_function("looks_like_ours", |b| {
        b.iter(|| looks_like_ours(black_box(&token)))
    });
    g.finish();
}

fn record(id: String, port: u16) -> SandboxRecord {
    SandboxRecord {
        id,
        owner: "cred_bench".into(),
        status: SandboxStatus::Running,
        ports: vec![port],
        upstream: Some("127.0.0.1".into()),
        command: None,
        env: BTreeMap::new(),
        cors_origins: Vec::new(),
        rewrite_host: false,
        metadata: serde_json::json!({}),
        created_at: 0,
        expires_at: None,
        ended_at: None,
        host_ports: BTreeMap::new(),
        node: None,
        detail: None,
        process: Default::default(),
        name: None,
        tags: BTreeMap::new(),
        secret_env: BTreeMap::new(),
    }
}

fn routes(c: &mut Criterion) {
    let n: usize = std::env::var("ROUTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let table = Routes::new();
    let ids: Vec<String> = (0..n).map(|_| new_id()).collect();
    for id in &ids {
        table.upsert(&record(id.clone(), 8000));
    }
    // Looked up in a scattered order, as real traffic would.
    let probes: Vec<&str> = ids.iter().step_by(97).map(String::as_str).collect();
    let absent = new_id();

    let mut g = c.benchmark_group(format!("routes_{n}"));
    g.throughput(Throughput::Elements(1));
    let mut i = 0usize;
    g.bench_function("get_hit", |b| {
        b.iter(|| {
            i = (i + 1) % probes.len();
            let route = table.get(black_box(probes[i])).expect("present");
            route.port(8000).is_some()
        })
    });
    g.bench_function("get_miss", |b| {
        b.iter(|| table.get(black_box(&absent)).is_none())
    });
    g.finish();

    let mut g = c.benchmark_group("host");
    g.throughput(Throughput::Elements(1));
    let host = format!("8000-{}.sandbox.localhost:8443", ids[0]);
    let suffix = ".sandbox.localhost";
    g.bench_function("classify_sandbox_host", |b| {
        b.iter(|| {
            let name = canonical_host(black_box(&host)).expect("valid host");
            let label = name.strip_suffix(suffix).expect("a sandbox host");
            parse_sandbox_label(label).map(|(port, id)| (port, id.len()))
        })
    });
    g.bench_function("classify_base_host", |b| {
        b.iter(|| canonical_host(black_box("sandbox.localhost:8443")).expect("valid host"))
    });
    g.finish();
}

fn header_strip(c: &mut Criterion) {
    let mut base = HeaderMap::new();
    for (name, value) in [
        ("host", "127.0.0.1:8443"),
        ("user-agent", "bench/1.0"),
        ("accept", "*/*"),
        ("accept-encoding", "gzip, br"),
        ("x-sandgate-sandbox", "abcdefghijklmnopqrstuvwx"),
        ("x-sandgate-port", "8000"),
        ("x-forwarded-for", "10.0.0.1"),
        ("connection", "keep-alive"),
        ("cookie", "a=b; c=d"),
    ] {
        base.insert(
            http::header::HeaderName::from_static(name),
            HeaderValue::from_static(value),
        );
    }
    let mut g = c.benchmark_group("headers");
    g.throughput(Throughput::Elements(1));
    g.bench_function("strip_request", |b| {
        b.iter_batched_ref(
            || base.clone(),
            headers::strip_request,
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

fn config() -> Criterion {
    // Short by default (2 cores shared with builds); `--measurement-time` etc. override.
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30)
}

criterion_group! {
    name = benches;
    config = config();
    targets = tokens, routes, header_strip
}
criterion_main!(benches);
