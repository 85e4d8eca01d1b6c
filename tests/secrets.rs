//! `secret_env`: the value reaches an isolated sandbox's command and every exec, and nothing
//! else: not an API answer, not the audit log, not the gateway's log (at debug level, with the
//! access log on), not a snapshot, not PostgreSQL's raw rows in cluster mode. The real binary,
//! as root (isolation needs it).
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use http::{Method, StatusCode};
use serde_json::{json, Value};

/// A value that cannot turn up by chance, and a second one.
const SECRET: &str = "sgsecretQ7b2Kf9xLw4Zp1";
const OTHER: &str = "sgsecretOtherV3m8Nq5Rt";

fn pg_url() -> String {
    std::env::var("SANDGATE_TEST_PG")
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// `sandgate serve` logging at debug level (and every request) to a file.
struct Serve {
    child: tokio::process::Child,
    tls: TlsClient,
    key: String,
    port: u16,
    dir: tempfile::TempDir,
}

impl Serve {
    /// `store` is extra `[store]` lines (a PostgreSQL URL) and `kek` the cluster's key.
    async fn start(store: &str, cluster: &str, kek: Option<&str>) -> Serve {
        Serve::start_isolated(store, cluster, kek, "namespaces").await
    }

    async fn start_isolated(
        store: &str,
        cluster: &str,
        kek: Option<&str>,
        isolation: &str,
    ) -> Serve {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let config = dir.path().join("sandgate.toml");
        std::fs::write(
            &config,
            format!(
                "[gateway]\nlisten = \"127.0.0.1:{port}\"\nbase_domain = \"{BASE}\"\nworkers = 1\n\
                 shutdown_grace_secs = 1\n\
                 [telemetry]\nlisten = \"127.0.0.1:{}\"\nlog_level = \"debug\"\naccess_log = true\n\
                 [store]\ndata_dir = \"data\"\n{store}\n{cluster}\n\
                 [orchestrator]\nisolation = \"{isolation}\"\n",
                free_port()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("out.log")).unwrap();
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_sandgate"));
        cmd.args(["serve", "--config"])
            .arg(&config)
            .env_remove("RUST_LOG")
            .env_remove("SANDGATE_STORE_URL")
            .env_remove("SANDGATE_CONFIG")
            .env_remove("SANDGATE_KEK")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .kill_on_drop(true);
        if let Some(kek) = kek {
            cmd.env("SANDGATE_KEK", kek);
        }
        let mut child = cmd.spawn().unwrap();
        let data = dir.path().join("data");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let log = std::fs::read_to_string(dir.path().join("out.log")).unwrap_or_default();
            assert!(
                child.try_wait().unwrap().is_none(),
                "sandgate exited: {log}"
            );
            assert!(Instant::now() < deadline, "sandgate did not start: {log}");
            if let (Ok(key), Ok(ca)) = (
                std::fs::read_to_string(data.join("admin.key")),
                std::fs::read(data.join("certs/ca.pem")),
            ) {
                let tls = TlsClient::new(([127, 0, 0, 1], port).into(), &ca);
                let ready = tokio::time::timeout(
                    Duration::from_secs(5),
                    tls.get(BASE, "/.well-known/jwks.json", &[]),
                )
                .await;
                if ready.is_ok_and(|r| r.status() == StatusCode::OK) {
                    return Serve {
                        child,
                        tls,
                        key: key.trim().to_string(),
                        port,
                        dir,
                    };
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn api(&self, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        api_via(&self.tls, &self.key, method, path, body).await
    }

    async fn exec(&self, id: &str, command: &[&str], env: Value) -> Value {
        let (status, v) = self
            .api(
                Method::POST,
                &format!("/v1/sandboxes/{id}/exec"),
                Some(json!({"command": command, "env": env, "timeout_secs": 20})),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{v}");
        v
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// SIGTERM, wait, and everything it logged.
    async fn stop(mut self) -> (String, tempfile::TempDir) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id().unwrap()).unwrap());
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        tokio::time::timeout(Duration::from_secs(20), self.child.wait())
            .await
            .expect("sandgate stops on SIGTERM")
            .unwrap();
        let log = std::fs::read_to_string(self.dir.path().join("out.log")).unwrap();
        (log, self.dir)
    }
}

/// Fails when `text` holds either secret.
fn assert_no_secret(what: &str, text: &str) {
    for value in [SECRET, OTHER] {
        assert!(!text.contains(value), "{what} holds a secret value: {text}");
    }
}

/// Whether any file under `dir` holds `needle` (links are not followed).
fn tree_contains(dir: &Path, needle: &[u8]) -> Option<PathBuf> {
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        let kind = entry.file_type().unwrap();
        if kind.is_dir() {
            if let Some(found) = tree_contains(&path, needle) {
                return Some(found);
            }
        } else if kind.is_file() {
            let bytes = std::fs::read(&path).unwrap_or_default();
            if bytes.windows(needle.len()).any(|w| w == needle) {
                return Some(path);
            }
        }
    }
    None
}

async fn wait_running(serve: &Serve, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, v) = serve
            .api(Method::GET, &format!("/v1/sandboxes/{id}"), None)
            .await;
        assert_eq!(status, StatusCode::OK, "{v}");
        assert_no_secret("GET /v1/sandboxes/{id}", &v.to_string());
        match v["status"].as_str() {
            Some("running") => return v,
            Some("starting") => {}
            _ => panic!("the sandbox did not run: {v}"),
        }
        assert!(Instant::now() < deadline, "not running after 30 s: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Everything through the API: creation, the command's and exec's environment, what the API
/// answers, the audit log and a snapshot. Returns the sandbox's id.
async fn exercise(serve: &Serve) -> String {
    // Refusals name the key and the field, never a value.
    for (body, needle) in [
        (
            json!({"env": {"SECRET": OTHER}, "secret_env": {"SECRET": SECRET}}),
            "SECRET",
        ),
        (json!({"secret_env": {"1BAD": SECRET}}), "secret_env"),
        (json!({"secret_env": {"PORT": SECRET}}), "secret_env"),
        (
            json!({"secret_env": {"A": format!("{SECRET}\0")}}),
            "secret_env",
        ),
        (json!({"secret_env": SECRET}), "secret_env"),
        (json!({"secret_env": {"A": 5, "B": SECRET}}), "secret_env"),
    ] {
        let mut body = body;
        body["ports"] = json!([8000]);
        body["command"] = json!(["sleep", "60"]);
        let (status, v) = serve.api(Method::POST, "/v1/sandboxes", Some(body)).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
        assert!(v.to_string().contains(needle), "{needle} in {v}");
        assert_no_secret("a refusal", &v.to_string());
    }
    let (status, v) = serve
        .api(
            Method::POST,
            "/v1/sandboxes",
            Some(json!({"upstream": "127.0.0.1", "ports": [8000], "secret_env": {"A": SECRET}})),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert_no_secret("a refusal", &v.to_string());

    // The command saves its environment where an exec can read it (in /tmp, which a snapshot
    // does not take, so the snapshot check below is about the environment alone).
    let (status, created) = serve
        .api(
            Method::POST,
            "/v1/sandboxes",
            Some(json!({
                "command": ["sh", "-c", "printf '%s|%s|%s' \"$SECRET\" \"$OTHER_TOKEN\" \"$PLAIN\" > /tmp/seen; exec python3 -m http.server 8000"],
                "ports": [8000],
                "name": "with-secrets",
                "env": {"PLAIN": "visible"},
                "secret_env": {"SECRET": SECRET, "OTHER_TOKEN": OTHER},
            })),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_no_secret("the create answer", &created.to_string());
    assert_eq!(created["secret_env_keys"], json!(["OTHER_TOKEN", "SECRET"]));
    let id = created["id"].as_str().unwrap().to_string();
    let view = wait_running(serve, &id).await;
    assert_eq!(view["isolation"], "namespaces", "{view}");
    assert_eq!(view["secret_env_keys"], json!(["OTHER_TOKEN", "SECRET"]));

    // The command saw them.
    let deadline = Instant::now() + Duration::from_secs(20);
    let seen = loop {
        let out = serve.exec(&id, &["cat", "/tmp/seen"], json!({})).await;
        if out["exit_code"] == 0 {
            break out["stdout"].as_str().unwrap().to_string();
        }
        assert!(Instant::now() < deadline, "no /tmp/seen: {out}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(seen, format!("{SECRET}|{OTHER}|visible"));
    // So does an exec; its own `env` wins, as over `env`.
    let out = serve
        .exec(&id, &["sh", "-c", "printf %s \"$SECRET\""], json!({}))
        .await;
    assert_eq!(out["stdout"], SECRET, "{out}");
    let out = serve
        .exec(
            &id,
            &["sh", "-c", "printf '%s|%s' \"$SECRET\" \"$OTHER_TOKEN\""],
            json!({"SECRET": "replaced"}),
        )
        .await;
    assert_eq!(out["stdout"], format!("replaced|{OTHER}"), "{out}");
    // An exec that prints nothing answers nothing of them.
    let out = serve.exec(&id, &["true"], json!({})).await;
    assert_no_secret("an exec answer", &out.to_string());

    for path in [
        format!("/v1/sandboxes/{id}"),
        "/v1/sandboxes".to_string(),
        "/v1/sandboxes?name=with-secrets".to_string(),
        "/v1/audit".to_string(),
    ] {
        let (status, v) = serve.api(Method::GET, &path, None).await;
        assert_eq!(status, StatusCode::OK, "{path}: {v}");
        assert_no_secret(&path, &v.to_string());
        if path == "/v1/audit" {
            assert!(v.to_string().contains("sandbox.create"), "{v}");
        }
    }
    // `reuse` answers the existing sandbox: its keys, not its values.
    let (status, v) = serve
        .api(
            Method::POST,
            "/v1/sandboxes",
            Some(json!({"command": ["sleep", "60"], "ports": [8000], "name": "with-secrets", "reuse": true})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["id"], id.as_str());
    assert_no_secret("a reuse answer", &v.to_string());

    // A snapshot holds files only.
    let (status, v) = serve
        .api(
            Method::POST,
            &format!("/v1/sandboxes/{id}/snapshots"),
            Some(json!({"name": "secret-snap"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    assert_no_secret("the snapshot answer", &v.to_string());
    let images = serve.data().join("images");
    assert!(images.join("secret-snap").is_dir());
    for value in [SECRET, OTHER] {
        assert_eq!(tree_contains(&images, value.as_bytes()), None);
    }
    id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_reaches_the_sandbox_and_nothing_else() {
    let serve = Serve::start("", "", None).await;
    let id = exercise(&serve).await;
    // Single node: in the SQLite file, which is as private as the signing keys beside it.
    let db = serve.data().join("sandgate.db");
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        // The signing keys are in this very file (its `signing_keys` table).
        assert_eq!(mode(&db), 0o600);
    }
    let (log, _dir) = serve.stop().await;
    assert!(log.contains(&id), "the log speaks of the sandbox: {log}");
    assert_no_secret("the gateway's log", &log);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_cluster_mode_the_secret_is_sealed_in_postgresql() {
    use sqlx::postgres::PgPoolOptions;
    let admin = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(5))
        .connect(&pg_url())
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL at {} is needed ({e})", pg_url()));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let schema = format!("sg_test_{now}_{:08x}", rand::random::<u32>());
    sqlx::query(&format!("CREATE SCHEMA {schema}"))
        .execute(&admin)
        .await
        .unwrap();
    let kek = sandgate::store::postgres::generate_kek();
    let url = pg_url();
    let sep = if url.contains('?') { '&' } else { '?' };
    let serve = Serve::start(
        &format!("url = \"{url}{sep}options[search_path]={schema}\""),
        &format!(
            "[cluster]\nnode_name = \"secrets-{}\"\nadvertise_addr = \"127.0.0.1\"\n",
            &schema[schema.len() - 8..]
        ),
        Some(&kek),
    )
    .await;
    let id = exercise(&serve).await;
    // Every row of every table as text, and the sealed column's bytes.
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::TEXT FROM information_schema.tables WHERE table_schema = $1",
    )
    .bind(&schema)
    .fetch_all(&admin)
    .await
    .unwrap();
    assert!(tables.iter().any(|t| t == "sandboxes"), "{tables:?}");
    for table in &tables {
        let rows: Vec<String> =
            sqlx::query_scalar(&format!("SELECT t::text FROM {schema}.{table} t"))
                .fetch_all(&admin)
                .await
                .unwrap();
        for row in rows {
            assert_no_secret(&format!("{table} in PostgreSQL"), &row);
        }
    }
    let sealed: Option<Vec<u8>> = sqlx::query_scalar(&format!(
        "SELECT secret_env FROM {schema}.sandboxes WHERE id = $1"
    ))
    .bind(&id)
    .fetch_one(&admin)
    .await
    .unwrap();
    let sealed = sealed.expect("the secrets are stored");
    for value in [SECRET, OTHER, "OTHER_TOKEN"] {
        assert!(!sealed.windows(value.len()).any(|w| w == value.as_bytes()));
    }
    // The node's own files hold it nowhere either (its data dir has no database).
    for value in [SECRET, OTHER] {
        assert_eq!(tree_contains(&serve.data(), value.as_bytes()), None);
    }
    let (log, _dir) = serve.stop().await;
    assert!(log.contains(&id), "the log speaks of the sandbox: {log}");
    assert_no_secret("the gateway's log", &log);
    let _ = sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
        .execute(&admin)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_sets_secrets_from_flags_and_a_file() {
    let serve = Serve::start("", "", None).await;
    let cwd = tempfile::tempdir().unwrap();
    let file = cwd.path().join("secrets.env");
    std::fs::write(&file, format!("# tokens\n\nSECRET={SECRET}\n")).unwrap();
    let cli = |args: &[&str]| {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_sandgate"));
        cmd.current_dir(cwd.path())
            .env_remove("SANDGATE_CONFIG")
            .env("SANDGATE_URL", format!("https://{BASE}:{}", serve.port))
            .env("SANDGATE_CA_CERT", serve.data().join("certs/ca.pem"))
            .env("SANDGATE_API_KEY", &serve.key)
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        async move {
            let out = tokio::time::timeout(Duration::from_secs(30), cmd.output())
                .await
                .unwrap()
                .unwrap();
            (
                out.status.code(),
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        }
    };
    let file_arg = file.to_str().unwrap();
    let other = format!("OTHER_TOKEN={OTHER}");
    let (code, stdout, stderr) = cli(&[
        "sandbox",
        "create",
        "--json",
        "--wait",
        "--port",
        "8000",
        "--secret-env-file",
        file_arg,
        "--secret-env",
        &other,
        "--",
        "python3",
        "-m",
        "http.server",
        "8000",
    ])
    .await;
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    assert_no_secret("the CLI's output", &format!("{stdout}{stderr}"));
    let id = serde_json::Deserializer::from_str(&stdout)
        .into_iter::<Value>()
        .find_map(|v| v.ok().and_then(|v| v["id"].as_str().map(str::to_string)))
        .unwrap_or_else(|| panic!("an id in {stdout}"));
    wait_running(&serve, &id).await;
    let out = serve
        .exec(
            &id,
            &["sh", "-c", "printf '%s|%s' \"$SECRET\" \"$OTHER_TOKEN\""],
            json!({}),
        )
        .await;
    assert_eq!(out["stdout"], format!("{SECRET}|{OTHER}"), "{out}");
    // A malformed flag or line is refused without repeating it.
    let bad = format!("NOEQUALS{SECRET}");
    let (code, stdout, stderr) = cli(&[
        "sandbox",
        "create",
        "--port",
        "8000",
        "--secret-env",
        &bad,
        "--",
        "true",
    ])
    .await;
    assert_ne!(code, Some(0));
    assert_no_secret("a CLI refusal", &format!("{stdout}{stderr}"));
    std::fs::write(&file, format!("{SECRET}\n")).unwrap();
    let (code, stdout, stderr) = cli(&[
        "sandbox",
        "create",
        "--port",
        "8000",
        "--secret-env-file",
        file_arg,
        "--",
        "true",
    ])
    .await;
    assert_ne!(code, Some(0));
    assert!(stderr.contains("line 1"), "{stderr}");
    assert_no_secret("a CLI refusal", &format!("{stdout}{stderr}"));
    let (log, _dir) = serve.stop().await;
    assert_no_secret("the gateway's log", &log);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_host_sandboxes_get_their_secrets_too() {
    let serve = Serve::start_isolated("", "", None, "none").await;
    let (status, created) = serve
        .api(
            Method::POST,
            "/v1/sandboxes",
            Some(json!({
                "command": ["sh", "-c", "printf %s \"$SECRET\" > seen; exec python3 -m http.server $PORT"],
                "ports": [8000],
                "secret_env": {"SECRET": SECRET},
            })),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_no_secret("the create answer", &created.to_string());
    let id = created["id"].as_str().unwrap().to_string();
    let view = wait_running(&serve, &id).await;
    assert_eq!(view["isolation"], "none", "{view}");
    assert_eq!(view["secret_env_keys"], json!(["SECRET"]));
    let out = serve.exec(&id, &["cat", "seen"], json!({})).await;
    assert_eq!(out["stdout"], SECRET, "the command saw it: {out}");
    let out = serve
        .exec(&id, &["sh", "-c", "printf %s \"$SECRET\""], json!({}))
        .await;
    assert_eq!(out["stdout"], SECRET, "an exec sees it: {out}");
    let (log, _dir) = serve.stop().await;
    assert!(log.contains(&id), "{log}");
    assert_no_secret("the gateway's log", &log);
}
