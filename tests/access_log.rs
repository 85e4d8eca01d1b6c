//! The access log of the real binary: with `[telemetry] access_log = true`, one line per
//! request with what an operator needs (method, sandbox, port, status, duration, client) and
//! nothing secret (no token, no cookie, no query, no path); off by default.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use http::{Method, StatusCode};
use serde_json::json;

/// `sandgate serve` on free ports with `[telemetry]` lines of the test's choosing.
struct Serve {
    child: tokio::process::Child,
    tls: TlsClient,
    admin_key: String,
}

impl Serve {
    async fn start(dir: &Path, telemetry: &str) -> Serve {
        let port = free_port();
        let config = dir.join("sandgate.toml");
        std::fs::write(
            &config,
            format!(
                "[gateway]\nlisten = \"127.0.0.1:{port}\"\nbase_domain = \"{BASE}\"\nworkers = 1\n\
                 shutdown_grace_secs = 1\n\
                 [telemetry]\nlisten = \"127.0.0.1:{}\"\n{telemetry}\n\
                 [store]\ndata_dir = \"data\"\n[orchestrator]\nenabled = false\n",
                free_port()
            ),
        )
        .unwrap();
        // Output goes to a file: what a redirected log looks like.
        let log = std::fs::File::create(dir.join("out.log")).unwrap();
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_sandgate"))
            .args(["serve", "--config"])
            .arg(&config)
            .env_remove("RUST_LOG")
            .env_remove("NO_COLOR")
            .env_remove("SANDGATE_STORE_URL")
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let data = dir.join("data");
        let deadline = Instant::now() + Duration::from_secs(20);
        let (key, ca) = loop {
            let ready = tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok();
            if let (true, Ok(key), Ok(ca)) = (
                ready,
                std::fs::read_to_string(data.join("admin.key")),
                std::fs::read(data.join("certs/ca.pem")),
            ) {
                break (key, ca);
            }
            let log = std::fs::read_to_string(dir.join("out.log")).unwrap_or_default();
            assert!(
                child.try_wait().unwrap().is_none(),
                "sandgate exited: {log}"
            );
            assert!(Instant::now() < deadline, "sandgate did not start: {log}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        Serve {
            child,
            tls: TlsClient::new(([127, 0, 0, 1], port).into(), &ca),
            admin_key: key.trim().to_string(),
        }
    }

    /// Registers the echo upstream as a sandbox and mints a token for it.
    async fn sandbox_and_token(&self, port: u16) -> (String, String) {
        let (status, v) = api_via(
            &self.tls,
            &self.admin_key,
            Method::POST,
            "/v1/sandboxes",
            Some(json!({"upstream": "127.0.0.1", "ports": [port]})),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "{v}");
        let id = v["id"].as_str().unwrap().to_string();
        let (status, v) = api_via(
            &self.tls,
            &self.admin_key,
            Method::POST,
            &format!("/v1/sandboxes/{id}/connect-tokens"),
            Some(json!({ "port": port })),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "{v}");
        (id, v["token"].as_str().unwrap().to_string())
    }

    /// SIGTERM, then everything it wrote: once it has exited, no line is still on its way.
    async fn stop(mut self, dir: &Path) -> String {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id().unwrap()).unwrap());
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        let status = tokio::time::timeout(Duration::from_secs(15), self.child.wait())
            .await
            .expect("sandgate stops on SIGTERM")
            .unwrap();
        let log = std::fs::read_to_string(dir.join("out.log")).unwrap();
        assert!(status.success(), "{log}");
        log
    }
}

fn access_lines(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| l.contains("sandgate::access"))
        .collect()
}

#[tokio::test]
async fn the_access_log_has_one_line_per_request_and_nothing_secret() {
    let echo = Echo::start().await;
    let port = echo.port();
    let tmp = tempfile::tempdir().unwrap();
    let serve = Serve::start(tmp.path(), "access_log = true").await;
    let (id, token) = serve.sandbox_and_token(port).await;
    let host = sandbox_host(port, &id);

    // Proxied, with the token in a header and a query of the application's own.
    let resp = serve
        .tls
        .get(
            &host,
            "/private/path?q=hushhush",
            &[("x-sandgate-token", &token)],
        )
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    // Answered by the gateway: the token in the query is exchanged for a cookie (303), and
    // that cookie must not reach the log either.
    let resp = serve
        .tls
        .get(&host, &format!("/from-a-link?_sandgate_token={token}"), &[])
        .await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    let cookie_value = session_cookie(&resp);
    let cookie = format!("__Host-sandgate={cookie_value}");
    let resp = serve
        .tls
        .get(&host, "/with-the-cookie", &[("cookie", &cookie)])
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    // Refused by the gateway.
    let resp = serve.tls.get(&host, "/no-token", &[]).await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);

    let log = serve.stop(tmp.path()).await;
    let sandbox_lines: Vec<&str> = access_lines(&log)
        .into_iter()
        .filter(|l| l.contains("route=sandbox"))
        .collect();
    assert_eq!(sandbox_lines.len(), 4, "{log}");
    for (line, status) in sandbox_lines.iter().zip([200, 303, 200, 401]) {
        assert!(line.contains(" INFO sandgate::access: request "), "{line}");
        for field in [
            "method=GET".to_string(),
            format!("sandbox={id}"),
            format!("port={port}"),
            format!("status={status}"),
            "duration_ms=".to_string(),
            "client=127.0.0.1:".to_string(),
        ] {
            assert!(line.contains(&field), "{field} missing in {line}");
        }
    }
    // The echo's 200 declares its length, so the line has it.
    assert!(sandbox_lines[0].contains(" bytes="), "{}", sandbox_lines[0]);
    // The control API calls are logged too, without a sandbox.
    assert!(
        access_lines(&log).iter().any(|l| l.contains("route=api")
            && l.contains("method=POST")
            && l.contains("status=201")),
        "{log}"
    );
    for secret in [
        token.as_str(),
        cookie_value.as_str(),
        "_sandgate_token",
        "hushhush",
        "private/path",
        "from-a-link",
        admin_key(tmp.path()).as_str(),
    ] {
        assert!(!log.contains(secret), "{secret:?} reached the log:\n{log}");
    }
    assert!(
        !log.contains("\x1b["),
        "ANSI escape in a log written to a file:\n{log:?}"
    );
}

/// The bootstrap admin key, which every API call above carried.
fn admin_key(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("data/admin.key"))
        .unwrap()
        .trim()
        .to_string()
}

#[tokio::test]
async fn the_access_log_is_off_by_default() {
    let echo = Echo::start().await;
    let port = echo.port();
    let tmp = tempfile::tempdir().unwrap();
    let serve = Serve::start(tmp.path(), "").await;
    let (id, token) = serve.sandbox_and_token(port).await;
    let resp = serve
        .tls
        .get(
            &sandbox_host(port, &id),
            "/",
            &[("x-sandgate-token", &token)],
        )
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let log = serve.stop(tmp.path()).await;
    assert!(log.contains("sandgate is ready"), "{log}");
    assert!(access_lines(&log).is_empty(), "{log}");
}
