//! The README's walkthrough, run as written: the `sh` blocks of its "Five-minute walkthrough"
//! section, read from README.md itself (so the README and this test cannot drift apart), in a
//! fresh folder laid out like the repository, against the real binary on the dev config's
//! fixed ports (8443, 9464, and 8000 for the demo service).
//!
//! Between every two blocks, a check fetches the gateway's secrets through the sandbox URL the
//! walkthrough uses (`/data/admin.key`, the dev CA's key, and `..` variants): none may come
//! back. The walkthrough once served the repository root, admin key included.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

/// The `sh` blocks of the README section `heading` (up to the next `## ` heading).
fn sh_blocks(readme: &str, heading: &str) -> Vec<String> {
    let start = readme
        .find(heading)
        .unwrap_or_else(|| panic!("README has no section {heading}"));
    let rest = &readme[start + heading.len()..];
    let section = &rest[..rest.find("\n## ").unwrap_or(rest.len())];
    let mut blocks = Vec::new();
    let mut lines = section.lines();
    while let Some(line) = lines.next() {
        if line.trim() == "```sh" {
            let body: Vec<&str> = lines.by_ref().take_while(|l| l.trim() != "```").collect();
            blocks.push(body.join("\n"));
        }
    }
    blocks
}

/// Runs before the blocks: stop at the first failing command, and the leak check.
const PRELUDE: &str = r#"set -euo pipefail
leak_check() {
  [ -n "${TOKEN:-}" ] && [ -n "${ID:-}" ] || return 0
  local base="https://8000-$ID.sandbox.localhost:8443"
  local root
  root=$(curl -s -o /dev/null -w '%{http_code}' --cacert data/certs/ca.pem \
    -H "X-Sandgate-Token: $TOKEN" "$base/" || true)
  [ "$root" = 200 ] || return 0
  echo "LEAK-CHECK-RAN $ID"
  local admin_key
  admin_key=$(cat data/admin.key)
  for p in data/admin.key data/certs/ca-key.pem admin.key certs/ca-key.pem \
           ../data/admin.key ../../admin.key ../../../data/admin.key %2e%2e/%2e%2e/admin.key; do
    curl -s --path-as-is -o "$LEAK_BODY" --cacert data/certs/ca.pem \
      -H "X-Sandgate-Token: $TOKEN" "$base/$p" || true
    if grep -qF -- "$admin_key" "$LEAK_BODY" || grep -q 'PRIVATE KEY' "$LEAK_BODY"; then
      echo "LEAKED $p"
    fi
  done
}
"#;

#[test]
fn the_readme_walkthrough_works_and_serves_no_secret() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(repo.join("README.md")).unwrap();
    let blocks = sh_blocks(&readme, "## Five-minute walkthrough");
    assert!(blocks.len() >= 5, "too few blocks: {blocks:?}");
    // The first block starts the gateway; the test starts the binary it built instead.
    assert_eq!(blocks[0].trim(), "cargo run --release -- serve");

    // A folder shaped like the repository: its dev config, nothing else. Traversable by
    // others, as a clone in a home folder usually is: the process driver runs commands as
    // `nobody`, which must reach its working folder.
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::create_dir(root.join("config")).unwrap();
    std::fs::copy(
        repo.join("config/sandgate.toml"),
        root.join("config/sandgate.toml"),
    )
    .unwrap();
    // `sandgate` on PATH is the binary under test.
    let bin = root.join("bin");
    std::fs::create_dir(&bin).unwrap();
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_sandgate"), bin.join("sandgate")).unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );

    let log = std::fs::File::create(root.join("serve.log")).unwrap();
    let server = std::process::Command::new(env!("CARGO_BIN_EXE_sandgate"))
        .arg("serve")
        .current_dir(root)
        .env_remove("SANDGATE_CONFIG")
        .env_remove("SANDGATE_URL")
        .env_remove("SANDGATE_API_KEY")
        .env_remove("SANDGATE_CA_CERT")
        .env_remove("SANDGATE_STORE_URL")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut server = KillOnDrop(server);
    let started = Instant::now();
    while !(root.join("data/admin.key").exists()
        && std::net::TcpStream::connect("127.0.0.1:8443").is_ok())
    {
        if let Some(status) = server.0.try_wait().unwrap() {
            panic!(
                "sandgate serve exited ({status}); is another sandgate on 8443/9464?\n{}",
                std::fs::read_to_string(root.join("serve.log")).unwrap_or_default()
            );
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "serve never came up"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    let mut script = String::from(PRELUDE);
    for block in &blocks[1..] {
        script.push_str(block);
        script.push_str("\nleak_check\n");
    }
    let out = std::process::Command::new("bash")
        .arg("-c")
        .arg(&script)
        .current_dir(root)
        .env("PATH", &path)
        .env("LEAK_BODY", root.join("leak-body"))
        .env_remove("SANDGATE_CONFIG")
        .env_remove("SANDGATE_URL")
        .env_remove("SANDGATE_API_KEY")
        .env_remove("SANDGATE_CA_CERT")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let context = || {
        format!(
            "stdout:\n{stdout}\nstderr:\n{stderr}\nserve log:\n{}",
            std::fs::read_to_string(root.join("serve.log")).unwrap_or_default()
        )
    };
    assert!(
        out.status.success(),
        "the walkthrough failed\n{}",
        context()
    );
    for needle in [
        "hello from the demo service",
        "token id: ",
        "token_revoked",
        "made inside the sandbox",
    ] {
        assert!(stdout.contains(needle), "`{needle}` missing\n{}", context());
    }
    // The check really ran, against both sandboxes, and found nothing.
    assert!(
        stdout.matches("LEAK-CHECK-RAN").count() >= 2,
        "the leak check never reached a sandbox\n{}",
        context()
    );
    assert!(!stdout.contains("LEAKED"), "a secret leaked\n{}", context());
    drop(server);
}

/// Stops `sandgate serve` however the test ends (SIGTERM: it ends its sandboxes on the way).
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.0.id()).unwrap());
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        for _ in 0..200 {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
