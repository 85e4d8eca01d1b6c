//! What an isolated `command` sandbox may still ask of the kernel: its main command (started
//! by init) and an exec (started by the exec launcher) both run under the system call filter
//! with an empty capability bounding set, so new namespaces, the keyring, `bpf` and the other
//! refused calls fail with `EPERM` from inside, while servers, shells, threads and debuggers'
//! `ptrace` still work.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use http::{Method, StatusCode};
use serde_json::{json, Value};

/// Isolation needs root (as in CI); elsewhere these tests say so and pass vacuously.
fn can_isolate() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    eprintln!("skipped: confinement tests need root");
    false
}

async fn create(gw: &TestGateway, body: Value) -> String {
    let (status, v) = gw.api(Method::POST, "/v1/sandboxes", Some(body)).await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    assert_eq!(v["isolation"], "namespaces", "{v}");
    v["id"].as_str().unwrap().to_string()
}

async fn exec(gw: &TestGateway, id: &str, command: &[&str]) -> Value {
    let (status, v) = gw
        .api(
            Method::POST,
            &format!("/v1/sandboxes/{id}/exec"),
            Some(json!({"command": command, "timeout_secs": 30})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    v
}

async fn sh(gw: &TestGateway, id: &str, script: &str) -> String {
    let v = exec(gw, id, &["sh", "-c", script]).await;
    format!(
        "{}{}",
        v["stdout"].as_str().unwrap(),
        v["stderr"].as_str().unwrap()
    )
}

async fn fetch(gw: &TestGateway, id: &str, path: &str) -> (StatusCode, String) {
    let token = gw.token(id, 8000).await;
    let r = gw
        .tls()
        .get(
            &sandbox_host(8000, id),
            path,
            &[("x-sandgate-token", &token)],
        )
        .await;
    (r.status(), String::from_utf8_lossy(r.body()).into_owned())
}

async fn uid_of(gw: &TestGateway, id: &str) -> u32 {
    gw.gw
        .store
        .sandbox(id)
        .await
        .unwrap()
        .unwrap()
        .process
        .uid
        .unwrap()
}

/// Makes the calls the filter is about through libc's `syscall()` and prints one line each:
/// the call and `ok` or the errno's name. Without the filter (as the sandbox's unprivileged
/// user) keyctl and the namespace-making clone succeed, bpf (an unknown command), clone3
/// (a null argument) and io_uring_setup answer EINVAL or EFAULT: none of them EPERM.
const PROBE: &str = r#"
import ctypes, errno, os, platform
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
NR = {
    "x86_64": {"keyctl": 250, "bpf": 321, "clone": 56, "clone3": 435, "unshare": 272,
               "io_uring_setup": 425, "perf_event_open": 298},
    "aarch64": {"keyctl": 219, "bpf": 280, "clone": 220, "clone3": 435, "unshare": 97,
                "io_uring_setup": 425, "perf_event_open": 241},
}[platform.machine()]
CLONE_NEWUSER, CLONE_NEWNS, CLONE_NEWNET, CLONE_FILES, SIGCHLD = 0x10000000, 0x20000, 0x40000000, 0x400, 17

def call(label, name, *args):
    ctypes.set_errno(0)
    r = libc.syscall(ctypes.c_long(NR[name]), *[ctypes.c_long(a) for a in args])
    if name == "clone" and r == 0:
        os._exit(0)  # the child of a clone that worked
    if name == "clone" and r > 0:
        os.waitpid(r, 0)
    print(label, "ok" if r >= 0 else errno.errorcode.get(ctypes.get_errno(), "?"))

call("keyctl", "keyctl", 0, -3, 0)  # KEYCTL_GET_KEYRING_ID of the session keyring
call("bpf", "bpf", 9999, 0, 0)
call("clone-newuser", "clone", CLONE_NEWUSER | SIGCHLD, 0, 0, 0, 0)
call("clone-newnet", "clone", CLONE_NEWNET | SIGCHLD, 0, 0, 0, 0)
call("clone-plain", "clone", SIGCHLD, 0, 0, 0, 0)
call("clone3", "clone3", 0, 0)
call("unshare-newuser", "unshare", CLONE_NEWUSER)
call("unshare-newns", "unshare", CLONE_NEWNS)
call("unshare-files", "unshare", CLONE_FILES)
call("io_uring_setup", "io_uring_setup", 1, 0)
call("perf_event_open", "perf_event_open", 0, 0, -1, -1, 0)
# ptrace stays allowed: a child asks to be traced by its parent, then exits.
pid = os.fork()
if pid == 0:
    os._exit(0 if libc.ptrace(0, 0, 0, 0) == 0 else 1)
print("ptrace-traceme", "ok" if os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0 else "refused")
"#;

/// What [`PROBE`] prints under the filter.
const PROBE_EXPECTED: &str = "keyctl EPERM
bpf EPERM
clone-newuser EPERM
clone-newnet EPERM
clone-plain ok
clone3 ENOSYS
unshare-newuser EPERM
unshare-newns EPERM
unshare-files ok
io_uring_setup EPERM
perf_event_open EPERM
ptrace-traceme ok
";

/// The lines of `/proc/self/status` this is about, as a map.
fn status_fields(text: &str) -> std::collections::BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once(':'))
        .filter(|(k, _)| k.starts_with("Cap") || *k == "NoNewPrivs" || *k == "Seccomp")
        .map(|(k, v)| (k.to_string(), v.trim().to_string()))
        .collect()
}

fn assert_confined(status: &str) {
    let fields = status_fields(status);
    for cap in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(
            fields.get(cap).map(String::as_str),
            Some("0000000000000000"),
            "{cap}: {status}"
        );
    }
    assert_eq!(
        fields.get("NoNewPrivs").map(String::as_str),
        Some("1"),
        "{status}"
    );
    // 2: SECCOMP_MODE_FILTER.
    assert_eq!(
        fields.get("Seccomp").map(String::as_str),
        Some("2"),
        "{status}"
    );
}

/// A sandbox whose main command records its own status and the probe's answers in its
/// folder, then serves that folder on port 8000.
async fn probed_server(gw: &TestGateway) -> String {
    let id = create(
        gw,
        json!({"command": ["sh", "-c", "id -u > init-uid.txt; cat /proc/self/status > init-status.txt; \
                                       python3 -c \"$PROBE\" > init-probe.txt 2>&1; \
                                       exec python3 -m http.server 8000"],
               "env": {"PROBE": PROBE},
               "ports": [8000]}),
    )
    .await;
    wait_for_status(gw, &id, &["running"], Duration::from_secs(20)).await;
    id
}

#[tokio::test]
async fn the_main_command_and_an_exec_have_no_capabilities_and_run_under_the_filter() {
    if !can_isolate() {
        return;
    }
    let gw = TestGateway::start().await;
    let id = probed_server(&gw).await;
    let uid = uid_of(&gw, &id).await;
    assert_ne!(uid, 0);

    // The main command (init's child): read through the gateway, from its own server.
    let (status, init_status) = fetch(&gw, &id, "/init-status.txt").await;
    assert_eq!(status, StatusCode::OK, "{init_status}");
    assert_confined(&init_status);
    // init still changed the user with an empty bounding set.
    assert_eq!(
        fetch(&gw, &id, "/init-uid.txt").await,
        (StatusCode::OK, format!("{uid}\n"))
    );

    // An exec (the exec launcher's child), and a process that one starts.
    let exec_status = sh(&gw, &id, "id -u; cat /proc/self/status").await;
    assert!(
        exec_status.starts_with(&format!("{uid}\n")),
        "{exec_status}"
    );
    assert_confined(&exec_status);
    let grandchild = sh(&gw, &id, "sh -c 'cat /proc/self/status'").await;
    assert_confined(&grandchild);
    gw.stop().await;
}

#[tokio::test]
async fn refused_calls_fail_with_eperm_in_the_main_command_and_in_an_exec() {
    if !can_isolate() {
        return;
    }
    let gw = TestGateway::start().await;
    let id = probed_server(&gw).await;

    let (status, init_probe) = fetch(&gw, &id, "/init-probe.txt").await;
    assert_eq!(status, StatusCode::OK, "{init_probe}");
    assert_eq!(init_probe, PROBE_EXPECTED);

    let v = exec(&gw, &id, &["python3", "-c", PROBE]).await;
    assert_eq!(v["stdout"].as_str().unwrap(), PROBE_EXPECTED, "{v}");
    assert_eq!(v["exit_code"], 0, "{v}");

    // util-linux's unshare, as a user would try it.
    let v = exec(&gw, &id, &["unshare", "-U", "true"]).await;
    assert_eq!(v["exit_code"], 1, "{v}");
    assert!(
        v["stderr"]
            .as_str()
            .unwrap()
            .contains("Operation not permitted"),
        "{v}"
    );
    gw.stop().await;
}

#[tokio::test]
async fn servers_shells_subprocesses_and_threads_still_work_under_the_filter() {
    if !can_isolate() {
        return;
    }
    let gw = TestGateway::start().await;
    let id = create(
        &gw,
        json!({"command": ["sh", "-c", "echo served > page.txt; exec python3 -m http.server 8000"],
               "ports": [8000]}),
    )
    .await;
    wait_for_status(&gw, &id, &["running"], Duration::from_secs(20)).await;
    // The server, through the gateway.
    assert_eq!(
        fetch(&gw, &id, "/page.txt").await,
        (StatusCode::OK, "served\n".into())
    );
    // A shell's pipes, command substitution and a background job (fork and exec).
    let out = sh(
        &gw,
        &id,
        "a=$(echo confined | tr a-z A-Z); (sleep 0.1; echo background) & wait; echo \"$a\"; \
         sh -c 'echo nested'",
    )
    .await;
    assert_eq!(out, "background\nCONFINED\nnested\n");
    // Python threads (pthread_create: glibc's clone3, refused with ENOSYS, then clone), a
    // subprocess (posix_spawn, the same fallback) and the server answering on loopback.
    let script = r#"
import subprocess, threading, urllib.request
results = []
def work(n):
    results.append(sum(range(n * 1000)))
threads = [threading.Thread(target=work, args=(n,)) for n in range(1, 9)]
for t in threads: t.start()
for t in threads: t.join()
print("threads", len(results), sum(results))
print("subprocess", subprocess.run(["sh", "-c", "echo from-child"], capture_output=True, text=True).stdout.strip())
print("loopback", urllib.request.urlopen("http://127.0.0.1:8000/page.txt").read().decode().strip())
"#;
    let expected_sum: u64 = (1..9u64).map(|n| (0..n * 1000).sum::<u64>()).sum();
    let v = exec(&gw, &id, &["python3", "-c", script]).await;
    assert_eq!(
        v["stdout"].as_str().unwrap(),
        format!("threads 8 {expected_sum}\nsubprocess from-child\nloopback served\n"),
        "{v}"
    );
    gw.stop().await;
}
