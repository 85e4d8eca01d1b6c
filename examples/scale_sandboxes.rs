//! Registers many `upstream` sandboxes through the control API, concurrently, and reports the
//! rate: the first half of the route-table scale benchmark (`bench/scale.sh` then measures the
//! gateway's RSS and its HTTP/1.1 throughput against one of them).
//!
//! ```sh
//! SANDGATE_URL=https://127.0.0.1:8443 SANDGATE_CA_CERT=data/certs/ca.pem \
//! SANDGATE_API_KEY=$(cat data/admin.key) \
//!   cargo run --release --example scale_sandboxes -- --backend 127.0.0.1:8000 -n 100000
//! ```
//!
//! Progress goes to stderr; the last line on stdout is one JSON object:
//! `{"created", "failed", "retried", "secs", "per_sec", "client_cpu_secs", "gateway_cpu_secs",
//! "last_id"}`. `--gateway-pid` adds the gateway's CPU time over the run (from `/proc`).
//! The gateway needs `[api] requests_per_second` (and the per-address limit) high enough not to
//! throttle the run; answers 429 are retried after a short pause and counted.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use http::{Method, StatusCode};
use sandgate::client::ApiClient;
use serde_json::json;

#[derive(Parser, Debug)]
#[command(about = "Register N upstream sandboxes through the control API")]
struct Args {
    /// Gateway base URL (the control API's base domain).
    #[arg(long, env = "SANDGATE_URL")]
    url: String,
    /// PEM file of the CA that signed the gateway's certificate.
    #[arg(long, env = "SANDGATE_CA_CERT")]
    ca: std::path::PathBuf,
    /// API key with `sandboxes:write`.
    #[arg(long, env = "SANDGATE_API_KEY", hide_env_values = true)]
    api_key: String,
    /// `host:port` every sandbox routes to (its one published port is this port).
    #[arg(long)]
    backend: String,
    /// How many sandboxes to create.
    #[arg(short, long, default_value_t = 100_000)]
    n: usize,
    /// Requests in flight (each worker keeps one keep-alive TLS connection).
    #[arg(short, long, default_value_t = 32)]
    concurrency: usize,
    /// The gateway's pid: report its CPU time over the run.
    #[arg(long)]
    gateway_pid: Option<u32>,
}

/// utime + stime of a process, in seconds (all threads), from `/proc/<pid>/stat`.
fn proc_cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(") ")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // USER_HZ is 100 on every Linux architecture the bench runs on.
    Some((utime + stime) / 100.0)
}

fn own_cpu_secs() -> f64 {
    use nix::sys::resource::{getrusage, UsageWho};
    getrusage(UsageWho::RUSAGE_SELF).map_or(0.0, |u| {
        let t = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 / 1e6;
        t(u.user_time()) + t(u.system_time())
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let (host, port) = args
        .backend
        .rsplit_once(':')
        .ok_or_else(|| anyhow::anyhow!("--backend must be host:port"))?;
    let port: u16 = port.parse()?;
    let client = ApiClient::new(&args.url, Some(args.api_key.clone()), Some(&args.ca))?;
    let body = json!({"upstream": host, "ports": [port]});

    let next = Arc::new(AtomicUsize::new(0));
    let created = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let retried = Arc::new(AtomicU64::new(0));
    let last_id = Arc::new(std::sync::Mutex::new(String::new()));

    let gw0 = args.gateway_pid.and_then(proc_cpu_secs);
    let cpu0 = own_cpu_secs();
    let start = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..args.concurrency.max(1) {
        let (client, body) = (client.clone(), body.clone());
        let (next, created, failed, retried, last_id) = (
            next.clone(),
            created.clone(),
            failed.clone(),
            retried.clone(),
            last_id.clone(),
        );
        let n = args.n;
        workers.push(tokio::spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < n {
                let mut attempts = 0;
                loop {
                    attempts += 1;
                    match client
                        .call(Method::POST, "/v1/sandboxes", Some(&body))
                        .await
                    {
                        Ok(r) if r.status.is_success() => {
                            let done = created.fetch_add(1, Ordering::Relaxed) + 1;
                            if done % 10_000 == 0 {
                                eprintln!(
                                    "scale_sandboxes: {done} created ({:.0}/s)",
                                    done as f64 / start.elapsed().as_secs_f64()
                                );
                            }
                            if let Some(id) = r.json().ok().and_then(|v| {
                                v.get("id").and_then(|i| i.as_str()).map(str::to_owned)
                            }) {
                                *last_id.lock().expect("no panics while held") = id;
                            }
                            break;
                        }
                        Ok(r) if r.status == StatusCode::TOO_MANY_REQUESTS && attempts < 100 => {
                            retried.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        Ok(r) => {
                            if failed.fetch_add(1, Ordering::Relaxed) < 5 {
                                eprintln!(
                                    "scale_sandboxes: create failed: {} {:?}",
                                    r.status,
                                    r.error()
                                );
                            }
                            break;
                        }
                        Err(e) => {
                            if failed.fetch_add(1, Ordering::Relaxed) < 5 {
                                eprintln!("scale_sandboxes: create failed: {e}");
                            }
                            break;
                        }
                    }
                }
            }
        }));
    }
    for w in workers {
        w.await?;
    }
    let secs = start.elapsed().as_secs_f64();
    let created = created.load(Ordering::Relaxed);
    let gateway_cpu = match (gw0, args.gateway_pid.and_then(proc_cpu_secs)) {
        (Some(a), Some(b)) => json!(b - a),
        _ => json!(null),
    };
    let last_id = last_id.lock().expect("no panics while held").clone();
    eprintln!(
        "scale_sandboxes: {created} sandboxes in {secs:.1} s = {:.0}/s ({} failed)",
        created as f64 / secs,
        failed.load(Ordering::Relaxed)
    );
    println!(
        "{}",
        json!({
            "created": created,
            "failed": failed.load(Ordering::Relaxed),
            "retried": retried.load(Ordering::Relaxed),
            "secs": secs,
            "per_sec": created as f64 / secs,
            "client_cpu_secs": own_cpu_secs() - cpu0,
            "gateway_cpu_secs": gateway_cpu,
            "last_id": last_id,
        })
    );
    if failed.load(Ordering::Relaxed) > 0 {
        std::process::exit(1);
    }
    Ok(())
}
