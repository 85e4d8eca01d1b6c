//! The `sandgate` binary as people and scripts use it: client commands against a running
//! gateway (found through SANDGATE_URL / SANDGATE_API_KEY / SANDGATE_CA_CERT), their output,
//! their exit codes, and `--help` everywhere.
#![allow(clippy::unwrap_used)]

#[path = "common/archive.rs"]
mod archive;
mod common;

use std::path::PathBuf;
use std::process::{Output, Stdio};
use std::time::Duration;

use common::*;
use http::{Method, StatusCode};
use serde_json::{json, Value};

/// What one run of the binary did.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn of(out: Output) -> Run {
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    #[track_caller]
    fn ok(self) -> Run {
        assert_eq!(
            self.code, 0,
            "stdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        self
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.stdout))
    }
}

/// Runs the CLI against one gateway, from an empty working directory (so no local config or
/// dev data is picked up by accident).
struct Cli {
    url: String,
    ca: PathBuf,
    key: String,
    cwd: tempfile::TempDir,
}

impl Cli {
    fn new(gw: &TestGateway) -> Cli {
        Cli {
            url: format!("https://{BASE}:{}", gw.addr.port()),
            ca: gw.gw.config.store.certs_dir().join("ca.pem"),
            key: gw.admin_key.clone(),
            cwd: tempfile::tempdir().unwrap(),
        }
    }

    fn command(&self) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_sandgate"));
        cmd.current_dir(self.cwd.path())
            .env_remove("SANDGATE_CONFIG")
            .env("SANDGATE_URL", &self.url)
            .env("SANDGATE_CA_CERT", &self.ca)
            .env("SANDGATE_API_KEY", &self.key)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        cmd
    }

    async fn run(&self, args: &[&str]) -> Run {
        run(self.command().args(args)).await
    }

    async fn run_as(&self, key: &str, args: &[&str]) -> Run {
        run(self.command().env("SANDGATE_API_KEY", key).args(args)).await
    }
}

async fn run(cmd: &mut tokio::process::Command) -> Run {
    let out = tokio::time::timeout(Duration::from_secs(30), cmd.output())
        .await
        .expect("the CLI finishes within 30 s")
        .expect("the CLI runs");
    Run::of(out)
}

/// A sandbox id as the CLI prints it: the only word on its line.
fn is_id(s: &str) -> bool {
    s.len() >= 20
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// `key: value` from human output.
fn field<'a>(out: &'a str, key: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.strip_prefix(key))
        .map(str::trim)
        .unwrap_or_else(|| panic!("no `{key}` in:\n{out}"))
}

#[tokio::test]
async fn credentials_are_created_listed_and_revoked() {
    let gw = TestGateway::start().await;
    let cli = Cli::new(&gw);
    let out = cli
        .run(&[
            "credential",
            "create",
            "--name",
            "ci-bot",
            "--scope",
            "sandboxes:read",
            "--scope",
            "tokens:issue",
            "--ttl",
            "1h",
            "--max-token-ttl",
            "5m",
        ])
        .await
        .ok();
    let id = field(&out.stdout, "id:").to_string();
    let secret = field(&out.stdout, "secret:").to_string();
    assert!(id.starts_with("cred_"), "{}", out.stdout);
    assert!(secret.starts_with("sgk_"), "{}", out.stdout);
    assert!(out.stdout.contains("shown only now"), "{}", out.stdout);
    let (_, list) = gw.api(Method::GET, "/v1/credentials", None).await;
    let made = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == id.as_str())
        .cloned()
        .expect("the credential exists");
    assert_eq!(made["scopes"], json!(["sandboxes:read", "tokens:issue"]));
    assert_eq!(made["max_token_ttl_secs"], 300);
    assert!(made["expires_at"].is_string());

    // The new secret works with the CLI, within its scopes.
    cli.run_as(&secret, &["sandbox", "list"]).await.ok();
    let out = cli
        .run_as(
            &secret,
            &[
                "sandbox",
                "create",
                "--upstream",
                "127.0.0.1",
                "--port",
                "9",
            ],
        )
        .await;
    assert_eq!(out.code, 3, "forbidden: {}", out.stderr);
    assert!(out.stderr.contains("forbidden"), "{}", out.stderr);

    let out = cli.run(&["credential", "list"]).await.ok();
    let mut lines = out.stdout.lines();
    let header = lines.next().unwrap();
    for col in ["ID", "NAME", "SCOPES", "EXPIRES", "REVOKED"] {
        assert!(header.contains(col), "{header}");
    }
    let row = lines.find(|l| l.starts_with(&id)).expect("listed");
    assert!(row.contains("ci-bot") && row.contains("sandboxes:read,tokens:issue"));
    assert!(!out.stdout.contains(&secret), "the list shows a secret");
    assert!(
        !out.stdout.contains(&gw.admin_key),
        "the list shows a secret"
    );

    let out = cli.run(&["credential", "revoke", &id]).await.ok();
    assert!(
        out.stdout.contains(&format!("Revoked {id}")),
        "{}",
        out.stdout
    );
    let out = cli.run_as(&secret, &["sandbox", "list"]).await;
    assert_eq!(out.code, 3, "a revoked key: {}", out.stderr);
    let out = cli.run(&["credential", "revoke", "cred_nonexistent"]).await;
    assert_eq!(out.code, 4, "{}", out.stderr);
    let out = cli
        .run(&["credential", "create", "--name", "x", "--scope", "root"])
        .await;
    assert_eq!(out.code, 6, "an invalid scope: {}", out.stderr);
    assert!(out.stderr.contains("unknown scope"), "{}", out.stderr);
}

#[tokio::test]
async fn an_upstreams_write_credential_made_by_the_cli_registers_upstreams() {
    let gw = TestGateway::start().await;
    let cli = Cli::new(&gw);
    let out = cli
        .run(&[
            "credential",
            "create",
            "--name",
            "registrar",
            "--scope",
            "sandboxes:write",
            "--scope",
            "upstreams:write",
        ])
        .await
        .ok();
    let secret = field(&out.stdout, "secret:").to_string();
    let create = [
        "sandbox",
        "create",
        "--upstream",
        "127.0.0.1",
        "--port",
        "9",
    ];
    let out = cli.run_as(&secret, &create).await.ok();
    assert!(is_id(out.stdout.trim()), "{}", out.stdout);
    // Refused by the upstream policy whoever asks: the gateway's own TLS port.
    let own = gw.addr.port().to_string();
    let out = cli
        .run_as(
            &secret,
            &[
                "sandbox",
                "create",
                "--upstream",
                "127.0.0.1",
                "--port",
                &own,
            ],
        )
        .await;
    assert_ne!(out.code, 0, "{}", out.stdout);
    assert!(out.stderr.contains("upstream_allow"), "{}", out.stderr);
}

#[tokio::test]
async fn upstream_sandboxes_are_created_listed_shown_and_removed() {
    let gw = TestGateway::start().await;
    let cli = Cli::new(&gw);
    let echo = Echo::start().await;
    let port = echo.port().to_string();
    let out = cli
        .run(&[
            "sandbox",
            "create",
            "--upstream",
            "127.0.0.1",
            "--port",
            &port,
            "--metadata",
            r#"{"team": "blue"}"#,
        ])
        .await
        .ok();
    let id = out.stdout.trim().to_string();
    assert!(is_id(&id), "create prints the id alone: {:?}", out.stdout);
    let (status, v) = gw
        .api(Method::GET, &format!("/v1/sandboxes/{id}"), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v["upstream"], "127.0.0.1");
    assert_eq!(v["metadata"], json!({"team": "blue"}));

    let out = cli.run(&["sandbox", "list"]).await.ok();
    let mut lines = out.stdout.lines();
    let header = lines.next().unwrap();
    assert!(
        header.starts_with("ID") && header.contains("STATUS") && header.contains("PORTS"),
        "{header}"
    );
    let row = lines.find(|l| l.starts_with(&id)).expect("listed");
    assert!(row.contains("running") && row.contains(&port), "{row}");

    let out = cli.run(&["sandbox", "get", &id]).await.ok();
    assert_eq!(field(&out.stdout, "status"), "running");
    assert_eq!(field(&out.stdout, "ports"), port);
    assert_eq!(field(&out.stdout, "upstream"), "127.0.0.1");

    let out = cli.run(&["sandbox", "rm", &id]).await.ok();
    assert!(out.stdout.contains(&format!("Terminated {id}")));
    let out = cli.run(&["sandbox", "get", &id]).await.ok();
    assert_eq!(field(&out.stdout, "status"), "stopped");

    let out = cli
        .run(&["sandbox", "get", "zzzzzzzzzzzzzzzzzzzzzzzz"])
        .await;
    assert_eq!(out.code, 4, "{}", out.stderr);
    assert!(out.stderr.contains("not_found"), "{}", out.stderr);
    let out = cli
        .run(&[
            "sandbox",
            "create",
            "--upstream",
            "http://x",
            "--port",
            "80",
        ])
        .await;
    assert_eq!(out.code, 6, "an invalid upstream: {}", out.stderr);
    let out = cli.run(&["sandbox", "create", "--port", "80"]).await;
    assert_ne!(out.code, 0, "neither a command nor an upstream");
    let out = cli.run(&["sandbox", "get", "../credentials"]).await;
    assert_ne!(out.code, 0, "ids are not paths");
}

#[tokio::test]
async fn a_command_sandbox_from_create_to_exec_logs_tokens_and_rm() {
    let gw = TestGateway::start_with("[orchestrator]\nport_range = \"31500-31549\"\n").await;
    let cli = Cli::new(&gw);
    let out = cli
        .run(&[
            "sandbox",
            "create",
            "--port",
            "8000",
            "--wait",
            "--open-port",
            "8000",
            "--env",
            "GREETING=hi",
            "--timeout",
            "2m",
            "--",
            "sh",
            "-c",
            "echo started-$GREETING; exec python3 -m http.server $PORT --bind 127.0.0.1",
        ])
        .await;
    // Whatever happens next, the sandbox's process must not outlive the test.
    let lines: Vec<String> = out.stdout.lines().map(str::to_string).collect();
    let id = lines.first().cloned().unwrap_or_default();
    struct Cleanup(String);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            for pid in sandbox_pids(&self.0) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
    let _cleanup = Cleanup(id.clone());
    let out = out.ok();
    assert!(is_id(&id), "{:?}", out.stdout);
    assert!(out.stderr.contains("running"), "progress: {}", out.stderr);
    let url = lines.get(1).expect("a URL to open");
    // (The port in it is `[gateway] public_port`, the configured listen port; the harness
    // listens elsewhere, so only the path is used below.)
    let expected_prefix = format!("https://8000-{id}.{BASE}:");
    assert!(url.starts_with(&expected_prefix), "{url}");
    assert!(url.contains("/?_sandgate_token=ey"), "{url}");
    // The URL opens the sandbox: the link exchange answers with a session.
    let path = &url[url.find("/?").unwrap()..];
    let resp = gw.tls().get(&sandbox_host(8000, &id), path, &[]).await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER, "{:?}", resp.body());
    let cookie = session_cookie(&resp);
    let resp = gw
        .tls()
        .get(
            &sandbox_host(8000, &id),
            "/",
            &[("cookie", &format!("__Host-sandgate={cookie}"))],
        )
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(String::from_utf8_lossy(resp.body()).contains("Directory listing"));

    // exec: the command's output, and its exit code as the CLI's.
    let out = cli
        .run(&[
            "sandbox",
            "exec",
            &id,
            "--",
            "sh",
            "-c",
            "echo out-$GREETING; echo err >&2; exit 5",
        ])
        .await;
    assert_eq!(out.code, 5, "{}", out.stderr);
    assert_eq!(out.stdout, "out-hi\n");
    assert!(out.stderr.contains("err"), "{}", out.stderr);
    cli.run(&["sandbox", "exec", &id, "--", "true"]).await.ok();
    let out = cli
        .run(&["sandbox", "exec", &id, "--", "sh", "-c", "kill -9 $$"])
        .await;
    assert_eq!(out.code, 137, "killed by SIGKILL: 128 + 9: {}", out.stderr);
    let out = cli
        .run(&[
            "sandbox",
            "exec",
            &id,
            "--timeout",
            "1s",
            "--",
            "sleep",
            "10",
        ])
        .await;
    assert_eq!(out.code, 124, "a timed-out command: {}", out.stderr);
    assert!(out.stderr.contains("timed out"), "{}", out.stderr);
    let out = cli
        .run(&["sandbox", "exec", &id, "--json", "--", "echo", "hi"])
        .await
        .ok();
    let v = out.json();
    assert_eq!(v["stdout"], "hi\n");
    assert_eq!(v["exit_code"], 0);

    // logs
    let out = cli.run(&["sandbox", "logs", &id]).await.ok();
    assert!(out.stdout.contains("started-hi"), "{}", out.stdout);

    // token create / revoke
    let out = cli
        .run(&["token", "create", &id, "--port", "8000", "--ttl", "90s"])
        .await
        .ok();
    let token = field(&out.stdout, "token:").to_string();
    let jti = field(&out.stdout, "jti:").to_string();
    assert!(field(&out.stdout, "url:").contains(&token));
    let host = sandbox_host(8000, &id);
    let resp = gw
        .tls()
        .get(&host, "/", &[("x-sandgate-token", &token)])
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let out = cli.run(&["token", "revoke", &jti]).await.ok();
    assert!(out.stdout.contains(&format!("Revoked {jti}")));
    let resp = gw
        .tls()
        .get(&host, "/", &[("x-sandgate-token", &token)])
        .await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{:?}", resp.body());
    let out = cli.run(&["token", "create", &id, "--port", "8001"]).await;
    assert_eq!(out.code, 6, "an unpublished port: {}", out.stderr);
    let out = cli
        .run(&[
            "token",
            "create",
            &id,
            "--port",
            "8000",
            "--json",
            "--single-use",
        ])
        .await
        .ok();
    assert!(out.json()["jti"].is_string(), "{}", out.stdout);

    // rm ends the process group; follow-mode logs then end too.
    let pgid = gw
        .gw
        .store
        .sandbox(&id)
        .await
        .unwrap()
        .unwrap()
        .process
        .pgid
        .unwrap();
    let follower = cli.command().args(["sandbox", "logs", &id, "-f"]).output();
    let follower = tokio::spawn(follower);
    tokio::time::sleep(Duration::from_millis(300)).await;
    cli.run(&["sandbox", "rm", &id]).await.ok();
    wait_processes_gone(&id, Some(pgid), Duration::from_secs(5)).await;
    let followed = tokio::time::timeout(Duration::from_secs(5), follower)
        .await
        .expect("logs -f ends with the sandbox")
        .unwrap()
        .unwrap();
    let followed = Run::of(followed).ok();
    assert!(
        followed.stdout.contains("started-hi"),
        "{}",
        followed.stdout
    );
    let out = cli.run(&["sandbox", "exec", &id, "--", "true"]).await;
    assert_eq!(out.code, 6, "exec in an ended sandbox: {}", out.stderr);

    // A command that fails at once: --wait says so and exits 1.
    let out = cli
        .run(&[
            "sandbox",
            "create",
            "--port",
            "8000",
            "--wait",
            "--",
            "sh",
            "-c",
            "echo nope; exit 2",
        ])
        .await;
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(
        out.stderr.contains("failed") && out.stderr.contains("nope"),
        "{}",
        out.stderr
    );
    gw.stop().await;
}

#[tokio::test]
async fn json_output_parses_and_the_audit_log_is_shown() {
    let gw = TestGateway::start().await;
    let cli = Cli::new(&gw);
    // `--json` goes anywhere after the command group.
    let out = cli
        .run(&[
            "sandbox",
            "--json",
            "create",
            "--upstream",
            "127.0.0.1",
            "--port",
            "9",
        ])
        .await
        .ok();
    let sandbox = out.json();
    let id = sandbox["id"].as_str().unwrap().to_string();
    assert_eq!(sandbox["status"], "running");
    let list = cli.run(&["sandbox", "list", "--json"]).await.ok().json();
    assert_eq!(list["items"][0]["id"], id.as_str());
    let got = cli
        .run(&["sandbox", "get", &id, "--json"])
        .await
        .ok()
        .json();
    assert_eq!(got["id"], id.as_str());
    let token = cli
        .run(&["token", "create", &id, "--port", "9", "--json"])
        .await
        .ok()
        .json();
    assert!(token["token"].is_string() && token["url"].is_string());
    let cred = cli
        .run(&[
            "credential",
            "create",
            "--name",
            "j",
            "--scope",
            "admin",
            "--json",
        ])
        .await
        .ok()
        .json();
    assert!(cred["secret"].as_str().unwrap().starts_with("sgk_"));
    let creds = cli.run(&["credential", "list", "--json"]).await.ok().json();
    assert_eq!(creds["items"].as_array().unwrap().len(), 2);
    assert!(!creds.to_string().contains(cred["secret"].as_str().unwrap()));

    let audit = cli
        .run(&["audit", "--limit", "3", "--json"])
        .await
        .ok()
        .json();
    let items = audit["items"].as_array().unwrap();
    assert_eq!(items.len(), 3);
    let actions: Vec<&str> = items
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        ["credential.create", "token.issue", "sandbox.create"]
    );
    let out = cli.run(&["audit", "--limit", "2"]).await.ok();
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "a header and two events: {}", out.stdout);
    for col in ["TIME", "ACTOR", "ACTION", "TARGET", "CLIENT"] {
        assert!(lines[0].contains(col), "{}", lines[0]);
    }
    assert!(lines[1].contains("credential.create") && lines[1].contains("127.0.0.1"));
    assert!(lines[2].contains("token.issue"));
    // Errors stay on stderr, so `--json` stdout is always JSON or nothing.
    let out = cli
        .run(&["sandbox", "get", "zzzzzzzzzzzzzzzzzzzzzzzz", "--json"])
        .await;
    assert_eq!(out.code, 4);
    assert!(out.stdout.is_empty(), "{}", out.stdout);
}

#[tokio::test]
async fn bad_keys_and_unreachable_gateways_get_distinct_exit_codes_and_hints() {
    let gw = TestGateway::start().await;
    let cli = Cli::new(&gw);
    let out = cli.run_as("sgk_wrong", &["sandbox", "list"]).await;
    assert_eq!(out.code, 3, "{}", out.stderr);
    assert!(
        out.stderr.contains("SANDGATE_API_KEY") && out.stderr.contains("admin.key"),
        "a helpful message: {}",
        out.stderr
    );
    assert!(out.stdout.is_empty());

    // Nothing listens there.
    let dead = dead_port().await;
    let out = run(cli
        .command()
        .env("SANDGATE_URL", format!("https://{BASE}:{dead}"))
        .args(["sandbox", "list"]))
    .await;
    assert_eq!(out.code, 5, "{}", out.stderr);
    assert!(out.stderr.contains("cannot reach"), "{}", out.stderr);
    // A gateway whose certificate the CLI does not trust is unreachable too, with a hint.
    let other = tempfile::tempdir().unwrap();
    let other_ca = sandgate::tls::ensure_dev_certs(other.path(), BASE)
        .unwrap()
        .0
        .ca_cert;
    let out = run(cli
        .command()
        .env("SANDGATE_CA_CERT", &other_ca)
        .args(["sandbox", "list"]))
    .await;
    assert_eq!(out.code, 5, "{}", out.stderr);
    assert!(out.stderr.contains("SANDGATE_CA_CERT"), "{}", out.stderr);
    // No CA at all: the CLI says which setting is missing, once.
    let out = run(cli
        .command()
        .env_remove("SANDGATE_CA_CERT")
        .args(["sandbox", "list"]))
    .await;
    assert_ne!(out.code, 0);
    assert_eq!(
        out.stderr.matches("SANDGATE_CA_CERT").count(),
        1,
        "{}",
        out.stderr
    );

    // No key at all: a clear message before any call.
    let out = run(cli
        .command()
        .env_remove("SANDGATE_API_KEY")
        .args(["sandbox", "list"]))
    .await;
    assert_ne!(out.code, 0);
    assert!(out.stderr.contains("SANDGATE_API_KEY"), "{}", out.stderr);
    let out = run(cli
        .command()
        .env("SANDGATE_URL", "http://plain.example")
        .args(["sandbox", "list"]))
    .await;
    assert_ne!(out.code, 0);
    assert!(out.stderr.contains("https://"), "{}", out.stderr);
}

#[tokio::test]
async fn help_works_for_every_command() {
    let gw = TestGateway::start().await;
    let cli = Cli::new(&gw);
    let commands: &[&[&str]] = &[
        &[],
        &["serve"],
        &["certs"],
        &["certs", "dev"],
        &["keys"],
        &["keys", "rotate"],
        &["sandbox"],
        &["sandbox", "create"],
        &["sandbox", "list"],
        &["sandbox", "get"],
        &["sandbox", "rm"],
        &["sandbox", "exec"],
        &["sandbox", "logs"],
        &["sandbox", "tag"],
        &["token"],
        &["token", "create"],
        &["token", "list"],
        &["token", "revoke"],
        &["credential"],
        &["credential", "create"],
        &["credential", "list"],
        &["credential", "revoke"],
        &["audit"],
    ];
    for args in commands {
        let mut all: Vec<&str> = args.to_vec();
        all.push("--help");
        let out = cli.run(&all).await;
        assert_eq!(out.code, 0, "{all:?}: {}", out.stderr);
        assert!(
            out.stdout.contains("Usage: sandgate"),
            "{all:?}: {}",
            out.stdout
        );
        assert_every_option_is_explained(&all, &out.stdout);
        // clap names each option's variable itself; the help text must not say it again.
        for var in ["SANDGATE_URL", "SANDGATE_API_KEY", "SANDGATE_CA_CERT"] {
            assert!(
                out.stdout.matches(var).count() <= 1,
                "{all:?} names {var} twice: {}",
                out.stdout
            );
        }
    }
    let out = cli.run(&["sandbox", "list", "--help"]).await.ok();
    for var in ["SANDGATE_URL", "SANDGATE_API_KEY", "SANDGATE_CA_CERT"] {
        assert_eq!(out.stdout.matches(var).count(), 1, "{}", out.stdout);
    }
    assert!(out.stdout.contains("--all"), "{}", out.stdout);
    let out = cli.run(&["credential", "create", "--help"]).await.ok();
    assert!(
        out.stdout.contains("--name <NAME>")
            && out.stdout.contains("--scope <SCOPES>")
            && out
                .stdout
                .contains("sandgate credential create --name ci --scope sandboxes:write"),
        "{}",
        out.stdout
    );
    let out = cli.run(&["token", "create", "--help"]).await.ok();
    let port_line = out
        .stdout
        .lines()
        .find(|l| l.trim_start().starts_with("--port"))
        .unwrap();
    assert!(port_line.contains("sandbox port"), "{port_line}");
    let out = cli.run(&["--help"]).await;
    for cmd in [
        "serve",
        "sandbox",
        "token",
        "credential",
        "keys",
        "certs",
        "audit",
    ] {
        assert!(out.stdout.contains(cmd), "{cmd} missing: {}", out.stdout);
    }
    let out = cli.run(&["sandbox", "create", "--help"]).await;
    assert!(out.stdout.contains("--open-port") && out.stdout.contains("Examples"));
    // The API key never shows in help, even when set in the environment.
    assert!(!out.stdout.contains(&gw.admin_key));
    let out = cli.run(&["--version"]).await.ok();
    assert!(out.stdout.starts_with("sandgate "), "{}", out.stdout);
    let out = cli.run(&["sandbox", "frobnicate"]).await;
    assert_eq!(out.code, 2, "clap's usage error: {}", out.stderr);
}

/// Every option and argument in a `--help` page has a help text: on its own line (`--opt
/// <X>  Text`) or, when clap wraps, on the indented line after it.
#[track_caller]
fn assert_every_option_is_explained(args: &[&str], help: &str) {
    let lines: Vec<&str> = help.lines().collect();
    let mut section = "";
    for (i, line) in lines.iter().enumerate() {
        if !line.starts_with(' ') {
            section = line;
            continue;
        }
        if !(section.ends_with("options:")
            || section.ends_with("Options:")
            || section == "Arguments:")
        {
            continue;
        }
        let item = line.trim_start();
        let is_item = item.starts_with('-') || item.starts_with('<') || item.starts_with('[');
        if !is_item || line.len() - item.len() > 6 {
            continue;
        }
        // The item's own text: what follows two spaces after the option and its value name.
        let own_text = item
            .split_once("  ")
            .is_some_and(|(_, text)| !text.trim().is_empty());
        let next_is_text = lines.get(i + 1).is_some_and(|next| {
            let t = next.trim_start();
            next.len() - t.len() > 6 && !t.is_empty() && !t.starts_with('-')
        });
        assert!(
            own_text || next_is_text,
            "{args:?}: `{item}` has no help text:\n{help}"
        );
    }
}

#[tokio::test]
async fn tokens_are_created_listed_and_revoked_by_their_jti() {
    let gw = TestGateway::start().await;
    let cli = Cli::new(&gw);
    let echo = Echo::start().await;
    let port = echo.port().to_string();
    let id = gw.create_sandbox(&[echo.port()]).await;

    // Human output: the token, its URL, its id and its expiry.
    let out = cli
        .run(&["token", "create", &id, "--port", &port, "--ttl", "10m"])
        .await
        .ok();
    let token = field(&out.stdout, "token:").to_string();
    let url = field(&out.stdout, "url:").to_string();
    let jti = field(&out.stdout, "jti:").to_string();
    let expires = field(&out.stdout, "expires_at:").to_string();
    assert!(url.contains(&token) && url.contains(&id), "{}", out.stdout);
    assert!(jti.len() >= 16, "{}", out.stdout);
    let (_, list) = gw.api(Method::GET, "/v1/connect-tokens", None).await;
    assert_eq!(
        list["items"][0]["jti"],
        jti.as_str(),
        "the jti printed is the token's"
    );
    assert_eq!(list["items"][0]["expires_at"], expires.as_str());
    let resp = gw
        .tls()
        .get(
            &sandbox_host(echo.port(), &id),
            "/",
            &[("x-sandgate-token", &token)],
        )
        .await;
    assert_eq!(resp.status(), StatusCode::OK);

    // `token list`: a table of jti, sandbox, port and expiry, never the token.
    let out = cli.run(&["token", "list"]).await.ok();
    let mut lines = out.stdout.lines();
    let header = lines.next().unwrap();
    for col in ["JTI", "SANDBOX", "PORT", "EXPIRES"] {
        assert!(header.contains(col), "{header}");
    }
    let row = lines.find(|l| l.starts_with(&jti)).expect("listed");
    assert!(
        row.contains(&id) && row.contains(&port) && row.contains(&expires),
        "{row}"
    );
    assert!(!out.stdout.contains(&token), "the list shows a token");
    let listed = cli
        .run(&["token", "list", "--sandbox", &id, "--json"])
        .await
        .ok()
        .json();
    assert_eq!(listed["items"][0]["jti"], jti.as_str());
    assert_eq!(listed["items"][0]["port"], echo.port());
    assert!(!listed.to_string().contains(&token));
    let out = cli
        .run(&["token", "list", "--sandbox", "zzzzzzzzzzzzzzzzzzzzzzzz"])
        .await;
    assert_eq!(out.code, 4, "an unknown sandbox: {}", out.stderr);

    // Revoke by the jti printed: the token stops working and leaves the list.
    let out = cli.run(&["token", "revoke", &jti]).await.ok();
    assert!(
        out.stdout.contains(&format!("Revoked {jti}")),
        "{}",
        out.stdout
    );
    let resp = gw
        .tls()
        .get(
            &sandbox_host(echo.port(), &id),
            "/",
            &[("x-sandgate-token", &token)],
        )
        .await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let out = cli.run(&["token", "list"]).await.ok();
    assert!(!out.stdout.contains(&jti), "{}", out.stdout);

    // An id no token has: not found (exit 4), said plainly, nothing on stdout.
    let out = cli.run(&["token", "revoke", "nosuchjti"]).await;
    assert_eq!(out.code, 4, "{}", out.stderr);
    assert!(
        out.stderr.contains("no such token") && out.stderr.contains("not_found"),
        "{}",
        out.stderr
    );
    assert!(out.stdout.is_empty(), "{}", out.stdout);

    // Durations need a unit; a too-long one is answered with the limit and its key.
    let out = cli
        .run(&["token", "create", &id, "--port", &port, "--ttl", "10"])
        .await;
    assert_eq!(out.code, 2, "a usage error: {}", out.stderr);
    assert!(
        out.stderr.contains("add a unit, e.g. 10s or 10m"),
        "{}",
        out.stderr
    );
    let out = cli
        .run(&["token", "create", &id, "--port", &port, "--ttl", "100d"])
        .await;
    assert_eq!(out.code, 6, "{}", out.stderr);
    assert!(
        out.stderr.contains("at most 24h") && out.stderr.contains("[tokens] max_ttl_secs"),
        "{}",
        out.stderr
    );
    for (flag, value) in [("--ttl", "0m"), ("--ttl", "5w"), ("--ttl", "ten")] {
        let out = cli
            .run(&["token", "create", &id, "--port", &port, flag, value])
            .await;
        assert_eq!(out.code, 2, "{value}: {}", out.stderr);
    }
    for args in [
        &[
            "sandbox",
            "create",
            "--upstream",
            "127.0.0.1",
            "--port",
            "9",
            "--timeout",
            "30",
        ][..],
        &[
            "credential",
            "create",
            "--name",
            "x",
            "--scope",
            "admin",
            "--ttl",
            "7",
        ][..],
        &[
            "credential",
            "create",
            "--name",
            "x",
            "--scope",
            "admin",
            "--max-token-ttl",
            "60",
        ][..],
        &["sandbox", "exec", &id, "--timeout", "5", "--", "true"][..],
    ] {
        let out = cli.run(args).await;
        assert_eq!(out.code, 2, "{args:?}: {}", out.stderr);
        assert!(
            out.stderr.contains("add a unit"),
            "{args:?}: {}",
            out.stderr
        );
    }
    // An unpublished port: the answer lists the published one.
    let out = cli.run(&["token", "create", &id, "--port", "1"]).await;
    assert_eq!(out.code, 6, "{}", out.stderr);
    assert!(
        out.stderr.contains(&format!("published ports are {port}")),
        "{}",
        out.stderr
    );
}

#[tokio::test]
async fn sandbox_list_shows_live_sandboxes_unless_asked_for_all() {
    let gw = TestGateway::start().await;
    let cli = Cli::new(&gw);
    let live = gw.create_sandbox(&[9]).await;
    let ended = gw.create_sandbox(&[9]).await;
    cli.run(&["sandbox", "rm", &ended]).await.ok();

    let out = cli.run(&["sandbox", "list"]).await.ok();
    assert!(out.stdout.contains(&live), "{}", out.stdout);
    assert!(
        !out.stdout.contains(&ended),
        "a stopped sandbox is listed: {}",
        out.stdout
    );
    let ids = |v: &Value| -> Vec<String> {
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["id"].as_str().unwrap().to_string())
            .collect()
    };
    let listed = cli.run(&["sandbox", "list", "--json"]).await.ok().json();
    assert_eq!(ids(&listed), std::slice::from_ref(&live));

    let out = cli.run(&["sandbox", "list", "--all"]).await.ok();
    let row = out
        .stdout
        .lines()
        .find(|l| l.starts_with(&ended))
        .expect("--all lists the stopped one");
    assert!(row.contains("stopped"), "{row}");
    assert!(out.stdout.contains(&live));
    let listed = cli
        .run(&["sandbox", "list", "--all", "--json"])
        .await
        .ok()
        .json();
    assert_eq!(ids(&listed), [live, ended]);
}

#[tokio::test]
async fn hints_name_the_local_gateways_real_files() {
    let gw = TestGateway::start().await;
    let cli = Cli::new(&gw);
    let config = gw.dir.join("sandgate.toml");
    let admin_key = std::fs::canonicalize(gw.gw.config.store.admin_key_path()).unwrap();
    let ca = std::fs::canonicalize(gw.gw.config.store.certs_dir().join("ca.pem")).unwrap();

    // A wrong key, run where the local config is found: the hint names the real key file.
    let out = run(cli
        .command()
        .env("SANDGATE_CONFIG", &config)
        .env("SANDGATE_API_KEY", "sgk_wrong")
        .args(["sandbox", "list"]))
    .await;
    assert_eq!(out.code, 3, "{}", out.stderr);
    assert!(
        out.stderr.contains(&admin_key.display().to_string()),
        "{}",
        out.stderr
    );
    assert!(!out.stderr.contains("<data_dir>"), "{}", out.stderr);
    // An untrusted certificate: the hint names the real dev CA.
    let other = tempfile::tempdir().unwrap();
    let other_ca = sandgate::tls::ensure_dev_certs(other.path(), BASE)
        .unwrap()
        .0
        .ca_cert;
    let out = run(cli
        .command()
        .env("SANDGATE_CONFIG", &config)
        .env("SANDGATE_CA_CERT", &other_ca)
        .args(["sandbox", "list"]))
    .await;
    assert_eq!(out.code, 5, "{}", out.stderr);
    assert!(
        out.stderr
            .contains(&format!("SANDGATE_CA_CERT={}", ca.display())),
        "{}",
        out.stderr
    );

    // Without a local gateway, a description instead of a placeholder.
    let out = cli.run_as("sgk_wrong", &["sandbox", "list"]).await;
    assert_eq!(out.code, 3);
    assert!(
        out.stderr.contains("admin.key") && out.stderr.contains("data_dir"),
        "{}",
        out.stderr
    );
    assert!(!out.stderr.contains("<data_dir>"), "{}", out.stderr);
    let out = run(cli
        .command()
        .env("SANDGATE_CA_CERT", &other_ca)
        .args(["sandbox", "list"]))
    .await;
    assert_eq!(out.code, 5);
    assert!(
        out.stderr.contains("certs/ca.pem") && !out.stderr.contains("<data_dir>"),
        "{}",
        out.stderr
    );
}

#[tokio::test]
async fn keys_rotate_adds_a_signing_key() {
    let gw = TestGateway::start().await;
    let cli = Cli::new(&gw);
    let before = gw.gw.store.signing_keys().await.unwrap().len();
    let config = gw.dir.join("sandgate.toml");
    let out = cli
        .run(&["keys", "rotate", "--config", config.to_str().unwrap()])
        .await
        .ok();
    assert!(out.stdout.contains("Added signing key"), "{}", out.stdout);
    let keys = gw.gw.store.signing_keys().await.unwrap();
    assert_eq!(keys.len(), before + 1);
    let kid = out
        .stdout
        .split_whitespace()
        .nth(3)
        .expect("the new key's id")
        .trim_end_matches(';');
    assert!(keys.iter().any(|k| k.kid == kid), "{kid} not stored");
    let out = cli
        .run(&["keys", "rotate", "--config", "/nonexistent/sandgate.toml"])
        .await;
    assert_ne!(out.code, 0);
    assert!(
        out.stderr.contains("/nonexistent/sandgate.toml"),
        "{}",
        out.stderr
    );
}

#[tokio::test]
async fn sandboxes_are_named_tagged_filtered_and_retagged() {
    let gw = TestGateway::start().await;
    let cli = Cli::new(&gw);
    let create = |extra: &'static [&'static str]| {
        let mut args = vec![
            "sandbox",
            "create",
            "--upstream",
            "127.0.0.1",
            "--port",
            "9",
        ];
        args.extend_from_slice(extra);
        args
    };
    let out = cli
        .run(&create(&[
            "--name", "job-7", "--tag", "team=ml", "--tag", "env=prod",
        ]))
        .await
        .ok();
    let id = out.stdout.trim().to_string();
    assert!(is_id(&id), "{:?}", out.stdout);
    let other = cli.run(&create(&["--tag", "team=web"])).await.ok();
    let other = other.stdout.trim().to_string();

    // The same live name: refused, naming the sandbox, unless --reuse.
    let out = cli.run(&create(&["--name", "job-7"])).await;
    assert_eq!(out.code, 6, "{}", out.stderr);
    assert!(
        out.stderr.contains(&id) && out.stderr.contains("conflict"),
        "{}",
        out.stderr
    );
    let out = cli.run(&create(&["--name", "job-7", "--reuse"])).await.ok();
    assert_eq!(out.stdout.trim(), id, "reuse prints the existing id");
    assert!(out.stderr.contains("reusing"), "{}", out.stderr);

    let out = cli.run(&["sandbox", "list"]).await.ok();
    let header = out.stdout.lines().next().unwrap();
    assert!(
        header.contains("NAME") && header.contains("TAGS"),
        "{header}"
    );
    let row = out.stdout.lines().find(|l| l.starts_with(&id)).unwrap();
    assert!(
        row.contains("job-7") && row.contains("env=prod,team=ml"),
        "{row}"
    );
    let out = cli
        .run(&["sandbox", "list", "--tag", "team=ml", "--tag", "env=prod"])
        .await
        .ok();
    assert!(
        out.stdout.contains(&id) && !out.stdout.contains(&other),
        "{}",
        out.stdout
    );
    let out = cli
        .run(&["sandbox", "list", "--name", "job-7", "--json"])
        .await
        .ok();
    assert_eq!(out.json()["items"].as_array().unwrap().len(), 1);

    let out = cli.run(&["sandbox", "tag", &id, "stage=2"]).await.ok();
    assert!(out.stdout.contains("stage=2"), "{}", out.stdout);
    let out = cli.run(&["sandbox", "get", &id]).await.ok();
    assert_eq!(field(&out.stdout, "tags"), "stage=2");
    assert_eq!(field(&out.stdout, "name"), "job-7");
    cli.run(&["sandbox", "tag", &id, "--clear"]).await.ok();
    let out = cli.run(&["sandbox", "get", &id]).await.ok();
    assert_eq!(field(&out.stdout, "tags"), "-");

    // Mistakes are caught with a message saying what is wrong.
    let out = cli.run(&["sandbox", "tag", &id, "nokey"]).await;
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(out.stderr.contains("KEY=VALUE"), "{}", out.stderr);
    let out = cli.run(&["sandbox", "tag", &id]).await;
    assert_eq!(out.code, 2, "no tags and no --clear: {}", out.stderr);
    let out = cli.run(&["sandbox", "tag", &id, "a=1", "a=2"]).await;
    assert!(
        out.code != 0 && out.stderr.contains("twice"),
        "{}",
        out.stderr
    );
    let out = cli.run(&create(&["--reuse"])).await;
    assert_eq!(out.code, 2, "--reuse needs --name: {}", out.stderr);
    let out = cli.run(&create(&["--name", "Bad_Name"])).await;
    assert_eq!(out.code, 6, "{}", out.stderr);
    assert!(out.stderr.contains("name must be"), "{}", out.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_import_prints_the_refusal_the_gateway_sends_before_the_body() {
    let gw = TestGateway::start().await;
    let cli = Cli::new(&gw);
    // Large enough that a client pushing its body into a refusal gets a broken pipe, not the
    // answer (sparse: nothing of it is on the disk).
    let big = cli.cwd.path().join("big.tar");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(512 * 1024 * 1024)
        .unwrap();
    let big = big.to_str().unwrap().to_string();
    let (_, reader) = create_credential(
        &gw,
        json!({"name": "reader", "scopes": ["sandboxes:read", "sandboxes:write"]}),
    )
    .await;

    // Not an admin: 403, said before any of the body is read.
    let started = std::time::Instant::now();
    let out = cli.run_as(&reader, &["image", "import", "x", &big]).await;
    assert_eq!(
        out.code, 3,
        "stdout:\n{}\nstderr:\n{}",
        out.stdout, out.stderr
    );
    assert!(
        out.stderr.contains("lacks the `admin` scope") && out.stderr.contains("HTTP 403"),
        "{}",
        out.stderr
    );
    assert!(
        started.elapsed() < sandgate::client::CONTINUE_WAIT,
        "the refusal came at once, the body never went ({:?})",
        started.elapsed()
    );

    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped the import part: images are unpacked as root");
        return;
    }
    // An archive that is read (after the gateway's 100 Continue) imports.
    let tiny = cli.cwd.path().join("tiny.tar");
    std::fs::write(&tiny, archive::sized_image(4096)).unwrap();
    let started = std::time::Instant::now();
    let out = cli
        .run(&["image", "import", "tiny", tiny.to_str().unwrap()])
        .await
        .ok();
    assert!(out.stdout.contains("Imported tiny"), "{}", out.stdout);
    assert!(
        started.elapsed() < sandgate::client::CONTINUE_WAIT,
        "the body went on the gateway's 100 Continue, not after the wait for it ({:?})",
        started.elapsed()
    );
    // The name exists: 409, said before any of the (large) body is read.
    let out = cli.run(&["image", "import", "tiny", &big]).await;
    assert_eq!(
        out.code, 6,
        "stdout:\n{}\nstderr:\n{}",
        out.stdout, out.stderr
    );
    assert!(
        out.stderr.contains("an image named tiny exists") && out.stderr.contains("HTTP 409"),
        "{}",
        out.stderr
    );
    let (_, v) = gw.api(Method::GET, "/v1/images", None).await;
    assert_eq!(v["items"].as_array().unwrap().len(), 2, "{v}");
}
