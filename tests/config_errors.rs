//! What `sandgate serve` says when it cannot start: every config problem at once, a TOML
//! syntax error with its caret, a missing file's cause said once, and which listener's
//! address is taken. Each runs the real binary and reads its stderr, which is a pipe here, so
//! the log lines in it must carry no colour codes.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Output;

/// Runs `sandgate serve --config <path>` with the log settings under the test's control; it
/// is expected to fail before serving anything.
async fn serve(config: &Path) -> (Output, String) {
    let out = tokio::time::timeout(
        std::time::Duration::from_secs(20),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_sandgate"))
            .args(["serve", "--config"])
            .arg(config)
            .env_remove("RUST_LOG")
            .env_remove("NO_COLOR")
            .env_remove("SANDGATE_STORE_URL")
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("sandgate serve exits by itself")
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "serve should fail: {stderr}");
    (out, stderr)
}

fn write_config(dir: &Path, text: &str) -> std::path::PathBuf {
    let path = dir.join("sandgate.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test]
async fn three_mistakes_are_reported_in_one_run() {
    let tmp = tempfile::tempdir().unwrap();
    let config = write_config(
        tmp.path(),
        "[gateway]\nlisten = \"127.0.0.1:99999\"\n\
         [telemetry]\nlog_levle = \"debug\"\n\
         [tokens]\nmax_ttl_secs = \"a day\"\n\
         [store]\ndata_dir = \"data\"\n",
    );
    let (_, stderr) = serve(&config).await;
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(
        lines.first().copied(),
        Some(format!("error: config file {} has 3 problems:", config.display()).as_str()),
        "{stderr}"
    );
    for expected in [
        "  telemetry.log_levle: unknown key; did you mean `log_level`?",
        "  tokens.max_ttl_secs: invalid type: string \"a day\", expected an integer",
        "  gateway.listen: `127.0.0.1:99999` is not an address such as 127.0.0.1:8443",
    ] {
        assert!(
            lines.contains(&expected),
            "missing {expected:?} in:\n{stderr}"
        );
    }
    assert_eq!(lines.len(), 4, "{stderr}");
    assert!(
        !tmp.path().join("data").exists(),
        "a refused config must not create the data dir"
    );
}

#[tokio::test]
async fn a_toml_syntax_error_keeps_its_caret_on_its_own_line() {
    let tmp = tempfile::tempdir().unwrap();
    let config = write_config(tmp.path(), "[gateway]\nlisten = 127.0.0.1:8443\n");
    let (_, stderr) = serve(&config).await;
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(
        lines.first().copied(),
        Some(format!("error: config file {} is not valid TOML:", config.display()).as_str()),
        "{stderr}"
    );
    let quoted = lines
        .iter()
        .position(|l| l.starts_with("  2 | listen = 127.0.0.1:8443"))
        .unwrap_or_else(|| panic!("the bad line is quoted, indented: {stderr}"));
    let caret = lines[quoted + 1];
    assert!(
        caret.starts_with("    |") && caret.trim_end().ends_with('^'),
        "the caret line follows the quoted line: {stderr}"
    );
    assert!(
        caret.find('^') >= lines[quoted].find("127"),
        "the caret points into the value: {stderr}"
    );
}

#[tokio::test]
async fn a_missing_config_file_says_its_cause_once() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("nonexistent.toml");
    let (_, stderr) = serve(&missing).await;
    assert_eq!(
        stderr.trim_end(),
        format!(
            "error: cannot read config file {}: No such file or directory (os error 2)",
            missing.display()
        ),
        "{stderr}"
    );
    assert_eq!(stderr.matches("No such file or directory").count(), 1);
}

/// The listener named by `key` gets an address the test holds; serve must say which.
async fn taken(key: &str) {
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = holder.local_addr().unwrap();
    let (gateway, telemetry) = match key {
        "[gateway] listen" => (addr.to_string(), "127.0.0.1:0".to_string()),
        _ => ("127.0.0.1:0".to_string(), addr.to_string()),
    };
    let tmp = tempfile::tempdir().unwrap();
    let config = write_config(
        tmp.path(),
        &format!(
            "[gateway]\nlisten = \"{gateway}\"\n[telemetry]\nlisten = \"{telemetry}\"\n\
             [store]\ndata_dir = \"data\"\n[orchestrator]\nenabled = false\n"
        ),
    );
    let (out, stderr) = serve(&config).await;
    let error = stderr
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_else(|| panic!("an error line: {stderr}"));
    assert!(
        error.starts_with(&format!("error: cannot listen on {addr} ({key}): ")),
        "{stderr}"
    );
    assert!(error.contains("is another sandgate running?"), "{stderr}");
    assert!(
        error.contains(&format!("set {key} in the config file")),
        "{stderr}"
    );
    assert_eq!(
        error.matches("in use").count(),
        1,
        "cause said once: {stderr}"
    );
    // The log line before it went to a pipe: no colour codes.
    assert!(stderr.contains("configuration loaded"), "{stderr}");
    assert!(
        !out.stderr.windows(2).any(|w| w == b"\x1b["),
        "ANSI escape in redirected output: {stderr:?}"
    );
    drop(holder);
}

#[tokio::test]
async fn a_taken_telemetry_address_is_named() {
    taken("[telemetry] listen").await;
}

#[tokio::test]
async fn a_taken_gateway_address_is_named() {
    taken("[gateway] listen").await;
}
