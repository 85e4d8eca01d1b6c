//! Cluster mode: real `sandgate serve` processes sharing one PostgreSQL database.
//!
//! Every test gets a schema of its own in the database named by `$SANDGATE_TEST_PG` (default
//! `postgres://postgres@127.0.0.1:5432/test`), so the tests run in parallel. A PostgreSQL that
//! cannot be reached fails the tests: they are never skipped.

#![allow(clippy::unwrap_used)] // helpers here are test code too

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use futures_util::{SinkExt, StreamExt};
use http::{Method, StatusCode};
use serde_json::{json, Value};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;

fn pg_url() -> String {
    std::env::var("SANDGATE_TEST_PG")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// A schema of its own, and the key-encryption key its nodes share.
struct Db {
    admin: PgPool,
    schema: String,
    kek: String,
}

impl Db {
    async fn new() -> Db {
        let admin = PgPoolOptions::new()
            .max_connections(2)
            .acquire_timeout(Duration::from_secs(5))
            .connect(&pg_url())
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "PostgreSQL is not reachable at {} ({e}); cluster tests need it \
                     (set SANDGATE_TEST_PG)",
                    pg_url()
                )
            });
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let schema = format!("sg_test_{now}_{:08x}", rand::random::<u32>());
        sqlx::query(&format!("CREATE SCHEMA {schema}"))
            .execute(&admin)
            .await
            .unwrap();
        Db {
            admin,
            schema,
            kek: sandgate::store::postgres::generate_kek(),
        }
    }

    /// The store URL for nodes, optionally through `via` (a forwarder's address).
    fn url(&self, via: Option<SocketAddr>) -> String {
        let base = pg_url();
        let base = match via {
            Some(addr) => base.replace("127.0.0.1:5432", &addr.to_string()),
            None => base,
        };
        let sep = if base.contains('?') { '&' } else { '?' };
        format!("{base}{sep}options[search_path]={}", self.schema)
    }

    /// A node name unique to this test: `name` and the schema's random tag.
    fn node(&self, name: &str) -> String {
        let tag = self.schema.rsplit('_').next().unwrap_or_default();
        format!("{name}-{tag}")
    }

    async fn drop_schema(self) {
        let _ = sqlx::query(&format!("DROP SCHEMA {} CASCADE", self.schema))
            .execute(&self.admin)
            .await;
    }
}

/// One `sandgate serve` process.
struct Node {
    dir: tempfile::TempDir,
    child: tokio::process::Child,
    tls: TlsClient,
    /// Its `[cluster] node_name`.
    name: String,
    /// Its gateway port on 127.0.0.1.
    port: u16,
}

impl Node {
    /// `name` gets this test's tag appended (see [`Db::node`]), so that names, and the
    /// PostgreSQL sessions named after them, are unique even across concurrent test runs.
    async fn start(db: &Db, name: &str, via: Option<SocketAddr>, orchestrator: bool) -> Node {
        Node::start_with(db, name, via, orchestrator, "none").await
    }

    /// A node whose command sandboxes are isolated (`isolation = "namespaces"`).
    async fn start_isolated(db: &Db, name: &str) -> Node {
        Node::start_with(db, name, None, true, "namespaces").await
    }

    async fn start_with(
        db: &Db,
        name: &str,
        via: Option<SocketAddr>,
        orchestrator: bool,
        isolation: &str,
    ) -> Node {
        let name = &db.node(name);
        let dir = tempfile::tempdir().unwrap();
        let (port, telemetry) = (free_port(), free_port());
        let config = format!(
            "[gateway]\nlisten = \"127.0.0.1:{port}\"\nbase_domain = \"{BASE}\"\n\
             shutdown_grace_secs = 1\nworkers = 1\n\
             [telemetry]\nlisten = \"127.0.0.1:{telemetry}\"\nlog_level = \"info\"\n\
             [store]\ndata_dir = \"data\"\nurl = \"{url}\"\n\
             [cluster]\nnode_name = \"{name}\"\nadvertise_addr = \"127.0.0.1\"\nheartbeat_secs = 1\n\
             [orchestrator]\nenabled = {orchestrator}\nisolation = \"{isolation}\"\n",
            url = db.url(via),
        );
        std::fs::write(dir.path().join("sandgate.toml"), config).unwrap();
        let log = std::fs::File::create(dir.path().join("node.log")).unwrap();
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_sandgate"))
            .args(["serve", "--config"])
            .arg(dir.path().join("sandgate.toml"))
            .env("SANDGATE_KEK", &db.kek)
            .env_remove("SANDGATE_STORE_URL")
            .env_remove("SANDGATE_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let mut child = child;
        let log = |dir: &tempfile::TempDir| {
            std::fs::read_to_string(dir.path().join("node.log")).unwrap_or_default()
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("node {name} exited ({status}):\n{}", log(&dir));
            }
            let ca = dir.path().join("data/certs/ca.pem");
            if let (Ok(pem), Ok(_)) = (std::fs::read(&ca), TcpStream::connect(addr).await) {
                // The port is bound before the store opens: wait for an answer.
                let tls = TlsClient::new(addr, &pem);
                let ready = tokio::time::timeout(
                    Duration::from_secs(20),
                    tls.get(BASE, "/.well-known/jwks.json", &[]),
                )
                .await;
                if ready.is_ok_and(|r| r.status() == StatusCode::OK) {
                    return Node {
                        tls,
                        dir,
                        child,
                        name: name.clone(),
                        port,
                    };
                }
            }
            assert!(
                Instant::now() < deadline,
                "node {name} did not start:\n{}",
                log(&dir)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn admin_key_file(&self) -> PathBuf {
        self.dir.path().join("data/admin.key")
    }

    async fn api(
        &self,
        key: &str,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        api_via(&self.tls, key, method, path, body).await
    }

    /// A request to `port` of sandbox `id` through this node, with the token in a header.
    ///
    /// A revocation closes the connections opened with the token, so a request in flight when
    /// it lands may see its connection cut: that one is asked again on a new connection, as a
    /// client would, and the answer then tells what the node decided.
    async fn get(&self, id: &str, port: u16, token: &str) -> StatusCode {
        let request = || {
            http::Request::builder()
                .method(http::Method::GET)
                .uri("/")
                .header("host", sandbox_host(port, id))
                .header("x-sandgate-token", token)
                .body(http_body_util::Full::new(bytes::Bytes::new()))
                .unwrap()
        };
        match self.tls.send(request()).await {
            Ok(r) => r.status(),
            Err(_) => self.tls.send(request()).await.expect("request").status(),
        }
    }

    async fn kill(mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }
}

/// Node A first (it initialises the schema and writes the admin key), then the others.
async fn cluster(db: &Db, names: &[&str]) -> (Vec<Node>, String) {
    let first = Node::start(db, names[0], None, true).await;
    let key = std::fs::read_to_string(first.admin_key_file())
        .expect("the first node writes the admin key")
        .trim()
        .to_string();
    let mut nodes = vec![first];
    for name in &names[1..] {
        let node = Node::start(db, name, None, true).await;
        assert!(
            !node.admin_key_file().exists(),
            "a later node reuses the cluster's credentials and writes no key file"
        );
        nodes.push(node);
    }
    (nodes, key)
}

async fn sandbox(node: &Node, key: &str, port: u16) -> String {
    let (status, v) = node
        .api(
            key,
            Method::POST,
            "/v1/sandboxes",
            Some(json!({"upstream": "127.0.0.1", "ports": [port]})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    v["id"].as_str().unwrap().to_string()
}

async fn mint(node: &Node, key: &str, id: &str, port: u16) -> (String, String) {
    let (status, v) = node
        .api(
            key,
            Method::POST,
            &format!("/v1/sandboxes/{id}/connect-tokens"),
            Some(json!({"port": port})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    (
        v["token"].as_str().unwrap().to_string(),
        v["jti"].as_str().unwrap().to_string(),
    )
}

/// Polls `check` every 5 ms until it holds; returns how long that took.
async fn within(limit: Duration, what: &str, mut check: impl AsyncFnMut() -> bool) -> Duration {
    let start = Instant::now();
    loop {
        if check().await {
            return start.elapsed();
        }
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_credentials_and_revocations_work_across_nodes() {
    let db = Db::new().await;
    let echo = Echo::start().await;
    let (nodes, key) = cluster(&db, &["node-a", "node-b", "node-c"]).await;
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);

    // A token minted through A works through B and C.
    let id = sandbox(a, &key, echo.port()).await;
    let (token, jti) = mint(a, &key, &id, echo.port()).await;
    within(
        Duration::from_secs(2),
        "the sandbox reaches B",
        async || b.get(&id, echo.port(), &token).await == StatusCode::OK,
    )
    .await;
    within(
        Duration::from_secs(2),
        "the sandbox reaches C",
        async || c.get(&id, echo.port(), &token).await == StatusCode::OK,
    )
    .await;

    // Revoked through C: refused by A and B within a second.
    let (status, _) = c
        .api(
            &key,
            Method::DELETE,
            &format!("/v1/connect-tokens/{jti}"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    for node in [a, b] {
        within(
            Duration::from_secs(1),
            "the revocation reaches every node",
            async || node.get(&id, echo.port(), &token).await == StatusCode::UNAUTHORIZED,
        )
        .await;
    }

    // A credential revoked on A is refused on B at its next call.
    let (status, v) = a
        .api(
            &key,
            Method::POST,
            "/v1/credentials",
            Some(json!({"name": "agent", "scopes": ["sandboxes:read"]})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    let (cred_id, secret) = (
        v["id"].as_str().unwrap().to_string(),
        v["secret"].as_str().unwrap().to_string(),
    );
    assert_eq!(
        b.api(&secret, Method::GET, "/v1/sandboxes", None).await.0,
        StatusCode::OK
    );
    let (status, _) = a
        .api(
            &key,
            Method::DELETE,
            &format!("/v1/credentials/{cred_id}"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(
        b.api(&secret, Method::GET, "/v1/sandboxes", None).await.0,
        StatusCode::UNAUTHORIZED
    );

    // A single-use token works once in the whole cluster, not once per node.
    let (status, v) = a
        .api(
            &key,
            Method::POST,
            &format!("/v1/sandboxes/{id}/connect-tokens"),
            Some(json!({"port": echo.port(), "single_use": true})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    let once = v["token"].as_str().unwrap().to_string();
    assert_eq!(b.get(&id, echo.port(), &once).await, StatusCode::OK);
    assert_eq!(
        c.get(&id, echo.port(), &once).await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        a.get(&id, echo.port(), &once).await,
        StatusCode::UNAUTHORIZED
    );

    // `sandgate keys rotate` against the shared database: every node verifies the new key
    // within seconds, and tokens from either key keep working everywhere.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_sandgate"))
        .args(["keys", "rotate", "--config"])
        .arg(a.dir.path().join("sandgate.toml"))
        .env("SANDGATE_KEK", &db.kek)
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (old_token, _) = mint(a, &key, &id, echo.port()).await;
    for node in [a, b, c] {
        within(
            Duration::from_secs(5),
            "every node has both keys",
            async || {
                let jwks = node.tls.get(BASE, "/.well-known/jwks.json", &[]).await;
                json_body(&jwks)["keys"].as_array().map_or(0, Vec::len) == 2
            },
        )
        .await;
    }
    let (new_token, _) = mint(b, &key, &id, echo.port()).await;
    for node in [a, b, c] {
        assert_eq!(node.get(&id, echo.port(), &new_token).await, StatusCode::OK);
        assert_eq!(node.get(&id, echo.port(), &old_token).await, StatusCode::OK);
    }

    // Every node is listed, up.
    let (status, v) = b.api(&key, Method::GET, "/v1/nodes", None).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let names: Vec<&str> = v["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["status"] == "up")
        .map(|n| n["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [db.node("node-a"), db.node("node-b"), db.node("node-c")],
        "{v}"
    );

    // Propagation latency: revoke through A, time until B refuses (B had the token cached).
    let mut samples = Vec::new();
    for _ in 0..100 {
        let (token, jti) = mint(a, &key, &id, echo.port()).await;
        within(
            Duration::from_secs(2),
            "a fresh token works on B",
            async || b.get(&id, echo.port(), &token).await == StatusCode::OK,
        )
        .await;
        let (status, _) = a
            .api(
                &key,
                Method::DELETE,
                &format!("/v1/connect-tokens/{jti}"),
                None,
            )
            .await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        let took = within(Duration::from_secs(1), "revocation reaches B", async || {
            b.get(&id, echo.port(), &token).await == StatusCode::UNAUTHORIZED
        })
        .await;
        samples.push(took);
    }
    samples.sort();
    println!(
        "revocation propagation A -> B over {} revocations: p50 {:?}, p99 {:?}, max {:?} \
         (measured from the API's 204 on A; includes one request through B per 5 ms poll)",
        samples.len(),
        samples[samples.len() / 2],
        samples[samples.len() * 99 / 100],
        samples[samples.len() - 1]
    );

    for n in nodes {
        n.kill().await;
    }
    db.drop_schema().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_through_b_closes_when_the_sandbox_is_deleted_through_c() {
    let db = Db::new().await;
    let echo = Echo::start().await;
    let (nodes, key) = cluster(&db, &["ws-a", "ws-b", "ws-c"]).await;
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
    let id = sandbox(a, &key, echo.port()).await;
    let (token, _) = mint(a, &key, &id, echo.port()).await;
    within(
        Duration::from_secs(2),
        "the sandbox reaches B",
        async || b.get(&id, echo.port(), &token).await == StatusCode::OK,
    )
    .await;

    let (mut ws, _) = websocket(
        &b.tls,
        &sandbox_host(echo.port(), &id),
        "/ws",
        &[("x-sandgate-token", &token)],
    )
    .await
    .expect("websocket through B");
    ws.send(Message::Text("ping".into())).await.unwrap();
    let echoed = tokio::time::timeout(Duration::from_secs(2), ws.next())
        .await
        .expect("echo")
        .expect("a frame")
        .expect("a message");
    assert_eq!(echoed.into_text().unwrap().as_str(), "ping");

    let deleted = Instant::now();
    let (status, v) = c
        .api(&key, Method::DELETE, &format!("/v1/sandboxes/{id}"), None)
        .await;
    assert!(status.is_success(), "{status} {v}");
    let closed = tokio::time::timeout(Duration::from_secs(1), async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => continue,
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "the WebSocket through B is still open 1 s after the delete on C"
    );
    println!(
        "WebSocket on B closed {:?} after the delete on C",
        deleted.elapsed()
    );
    assert_eq!(
        b.get(&id, echo.port(), &token).await,
        StatusCode::GONE,
        "the sandbox is terminated on B too"
    );

    for n in nodes {
        n.kill().await;
    }
    db.drop_schema().await;
}

/// A TCP forwarder to PostgreSQL that the test can cut (every connection dropped, new ones
/// refused) and restore: a database outage as one node sees it.
struct Forwarder {
    addr: SocketAddr,
    up: tokio::sync::watch::Sender<bool>,
}

impl Forwarder {
    async fn start() -> Forwarder {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (up, _) = tokio::sync::watch::channel(true);
        let watch = up.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    return;
                };
                let mut state = watch.subscribe();
                if !*state.borrow() {
                    continue;
                }
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect("127.0.0.1:5432").await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = state.wait_for(|up| !*up) => {}
                    }
                });
            }
        });
        Forwarder { addr, up }
    }

    fn set(&self, up: bool) {
        self.up.send_replace(up);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateways_ride_out_a_lost_database_connection_and_catch_up() {
    let db = Db::new().await;
    let echo = Echo::start().await;
    let (mut nodes, key) = cluster(&db, &["db-a"]).await;
    let forwarder = Forwarder::start().await;
    let b = Node::start(&db, "db-b", Some(forwarder.addr), false).await;
    let a = &nodes[0];
    let id = sandbox(a, &key, echo.port()).await;
    let (kept, _) = mint(a, &key, &id, echo.port()).await;
    let (doomed, doomed_jti) = mint(a, &key, &id, echo.port()).await;
    for t in [&kept, &doomed] {
        within(Duration::from_secs(2), "tokens work on B", async || {
            b.get(&id, echo.port(), t).await == StatusCode::OK
        })
        .await;
    }

    // 1. The database ends B's sessions (pg_terminate_backend): B keeps proxying, and its
    //    listener comes back and hears the next revocation.
    let (killed,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE application_name LIKE $1) t",
    )
    .bind(format!("sandgate {}%", db.node("db-b")))
    .fetch_one(&db.admin)
    .await
    .unwrap();
    assert!(killed >= 1, "B had database sessions to end");
    assert_eq!(b.get(&id, echo.port(), &kept).await, StatusCode::OK);

    // 2. B cut off from the database entirely: still proxies from memory, and refuses writes
    //    with a clear 503.
    forwarder.set(false);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(b.get(&id, echo.port(), &kept).await, StatusCode::OK);
    let (status, v) = b
        .api(
            &key,
            Method::POST,
            "/v1/sandboxes",
            Some(json!({"upstream": "127.0.0.1", "ports": [echo.port()]})),
        )
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{v}");

    // A revocation while B is disconnected...
    let (status, _) = a
        .api(
            &key,
            Method::DELETE,
            &format!("/v1/connect-tokens/{doomed_jti}"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        b.get(&id, echo.port(), &doomed).await,
        StatusCode::OK,
        "B cannot know yet (it is cut off)"
    );

    // ...is caught up once the connection is back (reconnect backoff is at most 5 s).
    forwarder.set(true);
    within(
        Duration::from_secs(10),
        "B catches up on the missed revocation",
        async || b.get(&id, echo.port(), &doomed).await == StatusCode::UNAUTHORIZED,
    )
    .await;
    assert_eq!(b.get(&id, echo.port(), &kept).await, StatusCode::OK);

    // And the kill-and-reconnect above did not cost A anything.
    let (status, _) = a.api(&key, Method::GET, "/v1/nodes", None).await;
    assert_eq!(status, StatusCode::OK);

    b.kill().await;
    nodes.pop().unwrap().kill().await;
    db.drop_schema().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_orchestrator_nodes_sandboxes_become_lost() {
    let db = Db::new().await;
    let (mut nodes, key) = cluster(&db, &["lost-a", "lost-b"]).await;
    let b = nodes.pop().unwrap();
    let a = &nodes[0];

    // A command sandbox on B, reached through A over B's advertised address.
    let (status, v) = b
        .api(
            &key,
            Method::POST,
            "/v1/sandboxes",
            Some(json!({
                "command": ["sh", "-c", "exec python3 -m http.server $PORT --bind 127.0.0.1"],
                "ports": [8000],
            })),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    let (token, _) = mint(&b, &key, &id, 8000).await;
    within(
        Duration::from_secs(15),
        "the process sandbox answers through A",
        async || a.get(&id, 8000, &token).await == StatusCode::OK,
    )
    .await;
    // Its node marks it running once the port answers there; A sees that through the feed.
    within(
        Duration::from_secs(5),
        "A sees the sandbox running",
        async || {
            let (_, v) = a
                .api(&key, Method::GET, &format!("/v1/sandboxes/{id}"), None)
                .await;
            v["status"] == "running"
        },
    )
    .await;

    // SIGKILL: no goodbye. Heartbeats every 1 s, lost after 3 missed.
    let pid = b.child.id().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let killed = Instant::now();
    within(
        Duration::from_secs(8),
        "A marks B's sandbox lost",
        async || {
            let (_, v) = a
                .api(&key, Method::GET, &format!("/v1/sandboxes/{id}"), None)
                .await;
            v["status"] == "lost"
        },
    )
    .await;
    println!(
        "sandbox lost {:?} after its node was killed",
        killed.elapsed()
    );
    assert_eq!(a.get(&id, 8000, &token).await, StatusCode::GONE);
    let (_, v) = a.api(&key, Method::GET, "/v1/nodes", None).await;
    let b_status = v["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == db.node("lost-b").as_str())
        .map(|n| n["status"].clone());
    assert_eq!(b_status, Some(json!("lost")), "{v}");

    // The orphaned process is B's to clean up; stop it here so the test leaves nothing.
    for pid in sandbox_pids(&id) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    drop(b);
    nodes.pop().unwrap().kill().await;
    db.drop_schema().await;
}

#[tokio::test]
async fn a_node_without_the_kek_refuses_to_start_and_says_why() {
    let db = Db::new().await;
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "[gateway]\nlisten = \"127.0.0.1:{}\"\nbase_domain = \"{BASE}\"\n\
         [telemetry]\nlisten = \"127.0.0.1:{}\"\n[store]\ndata_dir = \"data\"\nurl = \"{}\"\n",
        free_port(),
        free_port(),
        db.url(None)
    );
    std::fs::write(dir.path().join("sandgate.toml"), config).unwrap();
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_sandgate"))
            .args(["serve", "--config"])
            .arg(dir.path().join("sandgate.toml"))
            .env_remove("SANDGATE_KEK")
            .env_remove("SANDGATE_STORE_URL")
            .stdin(Stdio::null())
            .output(),
    )
    .await
    .expect("exits promptly")
    .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("SANDGATE_KEK") && err.contains("kek_file"),
        "{err}"
    );
    db.drop_schema().await;
}

/// Inside the sandbox: `/` answers with its hostname (the sandbox id), `/stream` never ends
/// (a tick every 100 ms), like a log or an SSE feed.
const STREAMING_SERVER: &str = r#"
import http.server, socket, time
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        if self.path == "/stream":
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()
            while True:
                data = b"data: tick\n\n"
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()
                time.sleep(0.1)
        body = ("hello from " + socket.gethostname()).encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", 8000), H).serve_forever()
"#;

/// Socket inodes of the TCP listeners in the test's (the host's) network namespace.
fn host_listener_inodes() -> std::collections::HashSet<String> {
    let mut inodes = std::collections::HashSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        for line in std::fs::read_to_string(table).unwrap().lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.get(3) == Some(&"0A") {
                inodes.insert(fields[9].to_string());
            }
        }
    }
    inodes
}

/// Socket inodes open in the processes of sandbox `id`.
fn sandbox_socket_inodes(id: &str) -> std::collections::HashSet<String> {
    let mut inodes = std::collections::HashSet::new();
    for pid in sandbox_pids(id) {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path()) {
                let t = target.to_string_lossy();
                if let Some(inode) = t.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')) {
                    inodes.insert(inode.to_string());
                }
            }
        }
    }
    inodes
}

/// Reads a streaming response's body until it ends or fails; `Instant` of the end.
fn read_until_closed(
    body: hyper::body::Incoming,
    ticks: std::sync::Arc<std::sync::atomic::AtomicUsize>,
) -> tokio::task::JoinHandle<Instant> {
    use http_body_util::BodyExt;
    tokio::spawn(async move {
        let mut body = body;
        while let Some(Ok(_)) = body.frame().await {
            ticks.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        Instant::now()
    })
}

/// A streaming GET through `node`; the body's reader and its tick count.
async fn open_stream(
    node: &Node,
    id: &str,
    token: &str,
) -> (
    tokio::task::JoinHandle<Instant>,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    let host = sandbox_host(8000, id);
    let mut sender = node.tls.h1(&host).await;
    let req = http::Request::builder()
        .uri("/stream")
        .header("host", &host)
        .header("x-sandgate-token", token)
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let resp = sender.send_request(req).await.expect("stream response");
    assert_eq!(resp.status(), StatusCode::OK);
    let ticks = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let reader = read_until_closed(resp.into_body(), std::sync::Arc::clone(&ticks));
    within(Duration::from_secs(5), "the stream ticks", async || {
        ticks.load(std::sync::atomic::Ordering::SeqCst) >= 3
    })
    .await;
    (reader, ticks)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_isolated_sandbox_on_b_is_served_through_a_over_the_relay() {
    let db = Db::new().await;
    // A is a gateway-only node; B runs isolated sandboxes.
    let a = Node::start(&db, "relay-a", None, false).await;
    let key = std::fs::read_to_string(a.admin_key_file())
        .unwrap()
        .trim()
        .to_string();
    let b = Node::start_isolated(&db, "relay-b").await;
    let (status, v) = b
        .api(
            &key,
            Method::POST,
            "/v1/sandboxes",
            Some(json!({"command": ["python3", "-c", STREAMING_SERVER], "ports": [8000]})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    assert_eq!(v["isolation"], "namespaces", "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    within(Duration::from_secs(20), "the sandbox runs", async || {
        let (_, v) = b
            .api(&key, Method::GET, &format!("/v1/sandboxes/{id}"), None)
            .await;
        assert_ne!(v["status"], "failed", "{v}");
        v["status"] == "running"
    })
    .await;

    // Served through A (which cannot reach B's namespace itself), as through B.
    let (token, jti) = mint(&b, &key, &id, 8000).await;
    let host = sandbox_host(8000, &id);
    within(Duration::from_secs(5), "A learns B's relay", async || {
        a.get(&id, 8000, &token).await == StatusCode::OK
    })
    .await;
    for node in [&a, &b] {
        let resp = node
            .tls
            .get(&host, "/", &[("x-sandgate-token", &token)])
            .await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(
            std::str::from_utf8(resp.body()).unwrap(),
            format!("hello from {id}")
        );
    }

    // The port exists only inside the sandbox's namespace: none of the sandbox's sockets is a
    // listener on the host, and no host listener is on its port...
    let inside = sandbox_socket_inodes(&id);
    assert!(!inside.is_empty(), "the sandbox's server holds its socket");
    let host_listeners = host_listener_inodes();
    assert!(
        inside.is_disjoint(&host_listeners),
        "a socket of the sandbox listens on the host"
    );
    // ...while inside, it does listen (the control: these are the right sockets).
    let pid = sandbox_pids(&id)[0];
    let table = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")).unwrap();
    assert!(
        table
            .lines()
            .any(|l| l.contains(":1F40 ") && l.contains(" 0A ")),
        "listening on 8000 in its own namespace:\n{table}"
    );

    // A forged relay (the protocol, but a key not derived from this cluster's KEK) is refused;
    // the same client with the cluster's key gets in.
    let b_record = sandgate::store::NodeRecord {
        name: b.name.clone(),
        advertise_addr: "127.0.0.1".into(),
        runs_sandboxes: true,
        version: String::new(),
        started_at: 0,
        last_heartbeat: 0,
        relay_addr: Some(format!("127.0.0.1:{}", b.port)),
    };
    let forger = sandgate::relay::Relay::new("intruder", "127.0.0.1", Some([7; 32]));
    forger.learn(std::slice::from_ref(&b_record));
    let err = forger
        .dial(&b.name, &id, 8000, Duration::from_secs(5))
        .await
        .expect_err("a forged relay is refused");
    assert!(
        err.to_string().contains("not a node of this cluster"),
        "{err}"
    );
    let cluster_key = sandgate::store::postgres::Kek::parse(&db.kek)
        .unwrap()
        .derive(sandgate::relay::KEY_LABEL);
    let member = sandgate::relay::Relay::new("member", "127.0.0.1", Some(cluster_key));
    member.learn(std::slice::from_ref(&b_record));
    let mut stream = member
        .dial(&b.name, &id, 8000, Duration::from_secs(5))
        .await
        .expect("the cluster's key opens the relay");
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        stream
            .write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.unwrap();
        assert!(answer.contains(&format!("hello from {id}")), "{answer}");
    }
    // A relay hello that is not one, and a stranger's TLS client speaking HTTP on the relay
    // protocol, get nothing.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut tls = b.tls.connect(BASE, &[sandgate::relay::ALPN]).await;
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(sandgate::relay::ALPN));
        let hello = json!({"v": 1, "from": "x", "to": b.name, "sandbox": id, "port": 8000, "proof": "00".repeat(32)});
        tls.write_all(format!("{hello}\n").as_bytes())
            .await
            .unwrap();
        let mut answer = String::new();
        let _ = tls.read_to_string(&mut answer).await;
        assert_eq!(answer, "error not a node of this cluster\n");
        let mut tls = b.tls.connect(BASE, &[sandgate::relay::ALPN]).await;
        tls.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        let _ = tls.read_to_string(&mut answer).await;
        assert_eq!(answer, "error not a relay hello\n");
    }

    // Revoking the token closes a relayed stream through A within 1 s...
    let (reader, _) = open_stream(&a, &id, &token).await;
    let revoked = Instant::now();
    let (status, _) = b
        .api(
            &key,
            Method::DELETE,
            &format!("/v1/connect-tokens/{jti}"),
            None,
        )
        .await;
    assert!(status.is_success(), "{status}");
    let ended = tokio::time::timeout(Duration::from_secs(1), reader)
        .await
        .expect("the relayed stream is still open 1 s after the revocation")
        .unwrap();
    println!(
        "relayed stream closed {:?} after the revocation",
        ended - revoked
    );
    assert_eq!(a.get(&id, 8000, &token).await, StatusCode::UNAUTHORIZED);

    // ...and deleting the sandbox closes another one.
    let (token, _) = mint(&b, &key, &id, 8000).await;
    let (reader, _) = open_stream(&a, &id, &token).await;
    let (status, _) = a
        .api(&key, Method::DELETE, &format!("/v1/sandboxes/{id}"), None)
        .await;
    assert!(status.is_success(), "{status}");
    tokio::time::timeout(Duration::from_secs(5), reader)
        .await
        .expect("the relayed stream outlives its sandbox")
        .unwrap();
    wait_processes_gone(&id, None, Duration::from_secs(10)).await;

    a.kill().await;
    b.kill().await;
    db.drop_schema().await;
}
