//! WebSocket scale benchmark: holds N WebSockets open through the gateway, measures what they
//! cost the gateway in RSS, then echoes messages round-robin across them at a modest rate and
//! reports the round-trip times.
//!
//! ```sh
//! SANDGATE_URL=https://127.0.0.1:8443 SANDGATE_CA_CERT=data/certs/ca.pem \
//! SANDGATE_API_KEY=$(cat data/admin.key) \
//!   cargo run --release --example ws_scale -- run -n 10000 --gateway-pid "$(pidof sandgate)"
//! ```
//!
//! `run` starts its own echo backend (`ws_scale echo`, a separate process, so the gateway's RSS
//! is not mixed up with it) unless `--echo ADDR` names one, registers it as a sandbox, mints a
//! connect token, and routes by header (`X-Sandgate-Sandbox`/`X-Sandgate-Port` on the base
//! domain). The gateway needs `max_connections_per_ip` and `max_connections_per_sandbox` of at
//! least N. Progress goes to stderr; the last line on stdout is one JSON object.
//!
//! CPU is reported as percent of one core for the gateway (from `/proc/<pid>/stat`), this
//! client (`getrusage`) and the echo backend, separately for the opening and the echo phases.

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use futures_util::{SinkExt, StreamExt};
use http::{HeaderValue, Method};
use sandgate::client::ApiClient;
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

#[derive(Parser, Debug)]
#[command(about = "Hold N WebSockets open through sandgate; measure RSS per connection and RTT")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// A WebSocket echo server on plain TCP; prints `LISTEN <addr>` once bound.
    Echo {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
    },
    /// Open the connections through the gateway and measure.
    Run(RunArgs),
}

#[derive(Parser, Debug)]
struct RunArgs {
    /// Gateway base URL (the control API's base domain).
    #[arg(long, env = "SANDGATE_URL")]
    url: String,
    /// PEM file of the CA that signed the gateway's certificate.
    #[arg(long, env = "SANDGATE_CA_CERT")]
    ca: PathBuf,
    /// API key with `sandboxes:write` and `tokens:issue`.
    #[arg(long, env = "SANDGATE_API_KEY", hide_env_values = true)]
    api_key: String,
    /// An echo backend already running (else one is started as a child process).
    #[arg(long)]
    echo: Option<SocketAddr>,
    /// WebSockets to hold open.
    #[arg(short, long, default_value_t = 10_000)]
    n: usize,
    /// Handshakes in flight while opening.
    #[arg(long, default_value_t = 64)]
    open_concurrency: usize,
    /// The gateway's pid: its RSS and CPU are read from /proc.
    #[arg(long)]
    gateway_pid: u32,
    /// Echo messages per second, round-robin over the connections.
    #[arg(long, default_value_t = 1000)]
    rate: u32,
    /// Seconds of echo traffic.
    #[arg(long, default_value_t = 5.0)]
    secs: f64,
    /// Message size in bytes (at least 8).
    #[arg(long, default_value_t = 64)]
    size: usize,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    raise_nofile();
    match cli.cmd {
        Cmd::Echo { listen } => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(echo(listen)),
        Cmd::Run(args) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
            .block_on(run(args)),
    }
}

/// Lifts the soft open-files limit to the hard one: N connections need N descriptors here and
/// 2N in the gateway.
fn raise_nofile() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

fn ws_config() -> WebSocketConfig {
    // Small buffers: the messages are tiny, and 10k connections of 128 KiB buffers would make
    // the load generator, not the gateway, the thing that runs out of memory.
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
}

async fn echo(listen: SocketAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    println!("LISTEN {}", listener.local_addr()?);
    // The parent reads that line and then stops reading: nothing more goes to stdout.
    loop {
        let (tcp, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("ws_scale echo: accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        tokio::spawn(async move {
            let Ok(mut ws) =
                tokio_tungstenite::accept_async_with_config(tcp, Some(ws_config())).await
            else {
                return;
            };
            while let Some(Ok(m)) = ws.next().await {
                if m.is_binary() || m.is_text() {
                    if ws.send(m).await.is_err() {
                        break;
                    }
                } else if m.is_close() {
                    break;
                }
            }
        });
    }
}

/// Starts `ws_scale echo` as a child process and returns it with its address.
fn spawn_echo() -> anyhow::Result<(std::process::Child, SocketAddr)> {
    let mut child = std::process::Command::new(std::env::current_exe()?)
        .args(["echo", "--listen", "127.0.0.1:0"])
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("echo child has no stdout"))?;
    let mut line = String::new();
    std::io::BufReader::new(stdout).read_line(&mut line)?;
    let addr = line
        .trim()
        .strip_prefix("LISTEN ")
        .ok_or_else(|| anyhow::anyhow!("echo child printed {line:?}"))?
        .parse()?;
    Ok((child, addr))
}

/// Resident set size of a process in KiB, from `/proc/<pid>/status`.
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// utime + stime of a process in seconds, from `/proc/<pid>/stat` (USER_HZ = 100).
fn proc_cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(") ")?.1.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

fn own_cpu_secs() -> f64 {
    use nix::sys::resource::{getrusage, UsageWho};
    getrusage(UsageWho::RUSAGE_SELF).map_or(0.0, |u| {
        let t = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 / 1e6;
        t(u.user_time()) + t(u.system_time())
    })
}

/// CPU of the gateway, this process and the echo backend over a phase, as % of one core.
struct CpuMeter {
    pids: [Option<u32>; 2],
    start: [f64; 3],
    t0: Instant,
}

impl CpuMeter {
    fn start(gateway: u32, echo: Option<u32>) -> CpuMeter {
        let pids = [Some(gateway), echo];
        CpuMeter {
            pids,
            start: Self::sample(&pids),
            t0: Instant::now(),
        }
    }

    fn sample(pids: &[Option<u32>; 2]) -> [f64; 3] {
        let p = |pid: Option<u32>| pid.and_then(proc_cpu_secs).unwrap_or(0.0);
        [p(pids[0]), own_cpu_secs(), p(pids[1])]
    }

    fn stop(&self) -> Value {
        let end = Self::sample(&self.pids);
        let wall = self.t0.elapsed().as_secs_f64().max(1e-9);
        let pct = |i: usize| ((end[i] - self.start[i]) / wall * 100.0).round();
        json!({
            "wall_secs": wall,
            "gateway_pct": pct(0),
            "client_pct": pct(1),
            "echo_pct": if self.pids[1].is_some() { json!(pct(2)) } else { Value::Null },
        })
    }
}

async fn api(c: &ApiClient, path: &str, body: Value) -> anyhow::Result<Value> {
    let r = c.call(Method::POST, path, Some(&body)).await?;
    anyhow::ensure!(
        r.status.is_success(),
        "{path}: {} {:?}",
        r.status,
        r.error()
    );
    Ok(r.json()?)
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<TcpStream>>;

struct Target {
    addr: SocketAddr,
    server_name: rustls::pki_types::ServerName<'static>,
    tls: tokio_rustls::TlsConnector,
    request: http::Request<()>,
}

async fn open(t: &Target) -> anyhow::Result<Ws> {
    let tcp = TcpStream::connect(t.addr).await?;
    tcp.set_nodelay(true)?;
    let tls = t.tls.connect(t.server_name.clone(), tcp).await?;
    let (ws, _) =
        tokio_tungstenite::client_async_with_config(t.request.clone(), tls, Some(ws_config()))
            .await?;
    Ok(ws)
}

/// One connection: waits for a go, sends a timestamped message, waits for its echo, reports
/// the round trip. Dropping the command sender ends it (and closes the WebSocket).
async fn hold(
    mut ws: Ws,
    mut go: mpsc::Receiver<()>,
    rtts: mpsc::UnboundedSender<Duration>,
    errors: mpsc::UnboundedSender<String>,
    size: usize,
) {
    let payload = vec![b'x'; size.max(8)];
    while go.recv().await.is_some() {
        let t = Instant::now();
        if let Err(e) = ws.send(Message::binary(payload.clone())).await {
            let _ = errors.send(format!("send: {e}"));
            return;
        }
        loop {
            match ws.next().await {
                Some(Ok(Message::Binary(_))) => break,
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                other => {
                    let _ = errors.send(format!("recv: {other:?}"));
                    return;
                }
            }
        }
        let _ = rtts.send(t.elapsed());
    }
    let _ = ws.close(None).await;
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i].as_secs_f64() * 1e3
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let (mut child, echo_addr) = match args.echo {
        Some(a) => (None, a),
        None => {
            let (c, a) = spawn_echo()?;
            (Some(c), a)
        }
    };
    let echo_pid = child.as_ref().map(std::process::Child::id);
    let result = measure(&args, echo_addr, echo_pid).await;
    if let Some(c) = child.as_mut() {
        let _ = c.kill();
        let _ = c.wait();
    }
    let out = result?;
    println!("{out}");
    Ok(())
}

async fn measure(
    args: &RunArgs,
    echo_addr: SocketAddr,
    echo_pid: Option<u32>,
) -> anyhow::Result<Value> {
    let pid = args.gateway_pid;
    let api_client = ApiClient::new(&args.url, Some(args.api_key.clone()), Some(&args.ca))?;
    let port = echo_addr.port();
    let sandbox = api(
        &api_client,
        "/v1/sandboxes",
        json!({"upstream": echo_addr.ip().to_string(), "ports": [port]}),
    )
    .await?;
    let id = sandbox["id"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("no sandbox id"))?
        .to_owned();
    let token = api(
        &api_client,
        &format!("/v1/sandboxes/{id}/connect-tokens"),
        json!({"port": port, "ttl_secs": 3600}),
    )
    .await?["token"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("no token"))?
        .to_owned();

    let url = url::Url::parse(&args.url)?;
    let host = url
        .host_str()
        .ok_or_else(|| anyhow::anyhow!("--url has no host"))?
        .to_owned();
    let gw_port = url.port_or_known_default().unwrap_or(443);
    let addr = tokio::net::lookup_host((host.as_str(), gw_port))
        .await?
        .next()
        .ok_or_else(|| anyhow::anyhow!("{host} does not resolve"))?;
    let mut request = format!("wss://{host}:{gw_port}/").into_client_request()?;
    let h = request.headers_mut();
    h.insert("x-sandgate-token", HeaderValue::from_str(&token)?);
    h.insert("x-sandgate-sandbox", HeaderValue::from_str(&id)?);
    h.insert("x-sandgate-port", HeaderValue::from(port));
    let mut tls = sandgate::tls::client_config(Some(&args.ca))?;
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let target = Arc::new(Target {
        addr,
        server_name: rustls::pki_types::ServerName::try_from(host.clone())?,
        tls: tokio_rustls::TlsConnector::from(Arc::new(tls)),
        request,
    });

    // One connection first: fails fast on a bad setup, and warms the TLS session cache.
    drop(open(&target).await?);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before = rss_kib(pid).ok_or_else(|| anyhow::anyhow!("no /proc/{pid}/status"))?;

    eprintln!(
        "ws_scale: opening {} WebSockets to {echo_addr} through {addr}",
        args.n
    );
    let (rtt_tx, mut rtt_rx) = mpsc::unbounded_channel();
    let (err_tx, mut err_rx) = mpsc::unbounded_channel();
    let (open_tx, mut open_rx) = mpsc::unbounded_channel();
    let permits = Arc::new(Semaphore::new(args.open_concurrency.max(1)));
    let cpu = CpuMeter::start(pid, echo_pid);
    let t_open = Instant::now();
    for _ in 0..args.n {
        let permit = Arc::clone(&permits).acquire_owned().await?;
        let (target, open_tx) = (Arc::clone(&target), open_tx.clone());
        let (rtt_tx, err_tx, size) = (rtt_tx.clone(), err_tx.clone(), args.size);
        tokio::spawn(async move {
            let ws = open(&target).await;
            drop(permit);
            match ws {
                Ok(ws) => {
                    let (go_tx, go_rx) = mpsc::channel(1);
                    let _ = open_tx.send(Ok(go_tx));
                    hold(ws, go_rx, rtt_tx, err_tx, size).await;
                }
                Err(e) => {
                    let _ = open_tx.send(Err(e.to_string()));
                }
            }
        });
    }
    drop(open_tx);
    let mut conns = Vec::with_capacity(args.n);
    let mut open_errors = 0usize;
    // Each task reports exactly once (and keeps its sender while it holds the connection).
    while conns.len() + open_errors < args.n {
        let Some(r) = open_rx.recv().await else {
            break;
        };
        match r {
            Ok(go) => {
                conns.push(go);
                if conns.len() % 2000 == 0 {
                    eprintln!("ws_scale: {} open", conns.len());
                }
            }
            Err(e) => {
                open_errors += 1;
                if open_errors <= 5 {
                    eprintln!("ws_scale: open failed: {e}");
                }
            }
        }
    }
    let open_secs = t_open.elapsed().as_secs_f64();
    let open_cpu = cpu.stop();
    anyhow::ensure!(!conns.is_empty(), "no WebSocket could be opened");
    // Let allocator and kernel settle before reading the gateway's RSS.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_after = rss_kib(pid).unwrap_or(0);
    let per_conn = (rss_after as f64 - rss_before as f64) / conns.len() as f64;
    eprintln!(
        "ws_scale: {} open in {open_secs:.1} s; gateway RSS {rss_before} -> {rss_after} KiB \
         = {per_conn:.1} KiB per connection",
        conns.len()
    );

    // Echo phase: `rate` messages a second, round-robin, in 10 ms ticks.
    let cpu = CpuMeter::start(pid, echo_pid);
    let deadline = Instant::now() + Duration::from_secs_f64(args.secs);
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let per_tick = f64::from(args.rate) / 100.0;
    let (mut owed, mut next, mut sent, mut skipped) = (0.0f64, 0usize, 0u64, 0u64);
    while Instant::now() < deadline {
        tick.tick().await;
        owed += per_tick;
        while owed >= 1.0 {
            owed -= 1.0;
            match conns[next].try_send(()) {
                Ok(()) => sent += 1,
                // The previous message on this connection is still in flight.
                Err(_) => skipped += 1,
            }
            next = (next + 1) % conns.len();
        }
    }
    // Wait for the last echoes (at most 2 s).
    let mut rtts = Vec::with_capacity(sent as usize);
    let drain_until = Instant::now() + Duration::from_secs(2);
    while (rtts.len() as u64) < sent && Instant::now() < drain_until {
        match tokio::time::timeout(Duration::from_millis(100), rtt_rx.recv()).await {
            Ok(Some(d)) => rtts.push(d),
            Ok(None) => break,
            Err(_) => {}
        }
    }
    while let Ok(d) = rtt_rx.try_recv() {
        rtts.push(d);
    }
    let msg_cpu = cpu.stop();
    let rss_end = rss_kib(pid).unwrap_or(0);
    let mut errors = 0usize;
    while let Ok(e) = err_rx.try_recv() {
        errors += 1;
        if errors <= 5 {
            eprintln!("ws_scale: {e}");
        }
    }
    rtts.sort();
    let (p50, p99) = (percentile(&rtts, 0.50), percentile(&rtts, 0.99));
    let max = rtts.last().map_or(f64::NAN, |d| d.as_secs_f64() * 1e3);
    eprintln!(
        "ws_scale: {} echoes over {} connections: RTT p50 {p50:.2} ms, p99 {p99:.2} ms, \
         max {max:.2} ms ({skipped} skipped, {errors} errors)",
        rtts.len(),
        conns.len()
    );
    let opened = conns.len();
    drop(conns);
    Ok(json!({
        "n": args.n,
        "opened": opened,
        "open_failed": open_errors,
        "open_secs": open_secs,
        "rss_before_kib": rss_before,
        "rss_after_kib": rss_after,
        "rss_end_kib": rss_end,
        "per_conn_kib": per_conn,
        "messages": rtts.len(),
        "sent": sent,
        "skipped": skipped,
        "errors": errors,
        "rate": args.rate,
        "rtt_p50_ms": p50,
        "rtt_p99_ms": p99,
        "rtt_max_ms": max,
        "open_cpu": open_cpu,
        "echo_cpu": msg_cpu,
    }))
}
