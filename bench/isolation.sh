#!/usr/bin/env bash
# bench/isolation.sh — what isolation costs: the same work on a gateway with
# `[orchestrator] isolation = "namespaces"` and on one with `isolation = "none"`, in one run.
#
#   sudo bash bench/isolation.sh                  (as root; about 5 minutes with the defaults)
#   N=10 M=20 K=5 DURATION=3 bash bench/isolation.sh        (a quick pass)
#
# Both gateways run from the release build, each on its own data dir, loopback port and config
# file written here, with a certificate made here for 127.0.0.1 (the base domain, so routing is
# by the X-Sandgate-Sandbox / X-Sandgate-Port headers, as in bench/sandgate-row.sh). They run
# side by side and every step runs on one, then at once on the other, so both see the same
# background load on a shared machine.
#
# 1. create → running: N `sandgate sandbox create --port 8000 --wait -- sh -c 'exec python3 -m
#    http.server $PORT'`, each call timed (what a user sees: the CLI polls every 250 ms, so
#    these figures come in steps of 250 ms); then the same N through the API on one keep-alive
#    connection, polled every 5 ms (the start itself); the `sandbox rm` of each, timed.
# 2. exec: M `sandgate sandbox exec <id> -- true`, each timed, then M `POST .../exec` on one
#    keep-alive connection.
# 3. h1 through one sandbox: nginx (the host's, seen read-only inside) serving a 1 KiB file,
#    one worker, $ROUNDS rounds alternating the modes (medians reported); `wrk -t$THREADS -c$CONNS -d${DURATION}s --latency` with a connect token as
#    `Authorization: Bearer`, after a ${WARMUP} s warm-up; the response is checked first.
# 4. memory: K idle sandboxes (`busybox httpd -f`: every sandbox must listen on a port), then K
#    python http.server sandboxes: per sandbox, its cgroup's memory (isolated only: memory.current
#    or memory.usage_in_bytes of <gateway's cgroup>/sandgate/<id>, see src/sandbox/cgroup.rs),
#    the PSS of its processes (cgroup.procs when isolated, its process group otherwise), and the
#    gateway's RSS growth.
#
# Output: a Markdown table on stdout and in bench/results/isolation-<UTC date>.md, ratio
# namespaces / none per row. Raw samples and gateway logs stay in a temporary folder, removed
# at the end unless KEEP=1.
#
# Knobs (environment): N (50), M (100), K (20), DURATION (10), WARMUP (1), CONNS (64),
#   THREADS (2), ROUNDS (3), MODES ("none namespaces": the order), UID_RANGE (the isolated gateway's [orchestrator] uid_range; default the
#   built-in one), STORM (0: when > 0, bench/isolation-storm.sh $STORM runs against the isolated
#   gateway at the end and its lines join the report), SKIP_BUILD=1, SKIP_INSTALL=1, KEEP=1,
#   SANDGATE_BIN, CARGO_TARGET_DIR.
# Needs: root, wrk, nginx (nginx-light), busybox (busybox-static), openssl, curl, python3 in
#   /usr/bin (the sandboxes see only the host's /usr, /bin, /lib*); apt installs what is missing.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
cd "$repo"

N=${N:-50} M=${M:-100} K=${K:-20} DURATION=${DURATION:-10} WARMUP=${WARMUP:-1}
CONNS=${CONNS:-64} THREADS=${THREADS:-2} ROUNDS=${ROUNDS:-3} STORM=${STORM:-0} UID_RANGE=${UID_RANGE:-}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$repo/target}
bin=${SANDGATE_BIN:-$CARGO_TARGET_DIR/release/sandgate}
read -r -a MODES <<<"${MODES:-none namespaces}" # the order each step runs them in

log() { printf '[isolation] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[[ $(id -u) == 0 ]] || die "run as root: isolated sandboxes need it (sudo bash bench/isolation.sh)"

# ---------------------------------------------------------------- tools and build
if [[ ${SKIP_INSTALL:-0} != 1 ]]; then
  missing=()
  command -v wrk >/dev/null || missing+=(wrk)
  [[ -x /usr/sbin/nginx ]] || missing+=(nginx-light)
  [[ -x /usr/bin/busybox || -x /bin/busybox ]] || missing+=(busybox-static)
  command -v openssl >/dev/null || missing+=(openssl)
  command -v curl >/dev/null || missing+=(curl)
  [[ -x /usr/bin/python3 ]] || missing+=(python3)
  if ((${#missing[@]})); then
    log "apt-get install ${missing[*]}"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; } \
      || die "could not install ${missing[*]}"
  fi
fi
if [[ ${SKIP_BUILD:-0} != 1 ]]; then
  log "cargo build --release --locked --bin sandgate"
  cargo build --release --locked --bin sandgate >&2 || die "build failed"
fi
[[ -x $bin ]] || die "no sandgate binary at $bin (build it, or set SANDGATE_BIN)"

# ---------------------------------------------------------------- state, cleanup
state=$(mktemp -d /tmp/sandgate-isolation.XXXXXX)
# Under isolation = "none" a sandbox runs as `nobody` in <data_dir>/sandboxes/<id>: the folders
# above it must let others through (the data dir's own files stay private).
chmod 711 "$state"
declare -A GW_PID URL KEY
cleanup() {
  trap - EXIT INT TERM
  local m id
  for m in "${MODES[@]}"; do
    [[ -n ${GW_PID[$m]:-} ]] || continue
    # Sandboxes a failed step left behind: end them through the API before the gateway goes.
    for id in $(sg "$m" sandbox list --json 2>/dev/null | python3 -c \
        'import json,sys; print(" ".join(s["id"] for s in json.load(sys.stdin).get("items", [])))' 2>/dev/null); do
      sg "$m" sandbox rm "$id" >/dev/null 2>&1 || true
    done
    kill -TERM "${GW_PID[$m]}" 2>/dev/null || true
  done
  for m in "${MODES[@]}"; do
    [[ -n ${GW_PID[$m]:-} ]] && wait "${GW_PID[$m]}" 2>/dev/null || true
  done
  if [[ ${KEEP:-0} == 1 ]]; then log "kept $state"; else rm -rf "$state"; fi
}
trap cleanup EXIT
trap 'log interrupted; exit 130' INT TERM

sg() { # mode args... — the CLI against that mode's gateway
  local m=$1; shift
  SANDGATE_URL=${URL[$m]} SANDGATE_CA_CERT="$state/tls/ca.pem" SANDGATE_API_KEY=${KEY[$m]} "$bin" "$@"
}
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
# Times from bash's own clock (${EPOCHREALTIME/./}: microseconds), so that timing a call forks
# nothing but the call.
export LC_NUMERIC=C
elapsed_ms() { local d=$(($2 - $1)); printf '%d.%03d\n' $((d / 1000)) $((d % 1000)); } # from-us to-us

# ---------------------------------------------------------------- certificate
mkdir -p -m 700 "$state/tls"
(
  cd "$state/tls"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -noenc -days 30 \
    -keyout ca.key -out ca.pem -subj /CN=sandgate-isolation-bench-ca \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign 2>/dev/null
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -noenc \
    -keyout server.key -out server.csr -subj /CN=127.0.0.1 2>/dev/null
  printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' >ext.cnf
  openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 30 \
    -extfile ext.cnf -out server.pem 2>/dev/null
) || die "openssl could not make the bench certificate"

# ---------------------------------------------------------------- gateways
start_gateway() { # mode
  local m=$1 d="$state/$1" port
  mkdir -p "$d"
  port=$(free_port)
  cat >"$d/sandgate.toml" <<CONF
# bench/isolation.sh: the "$m" gateway
[gateway]
listen = "127.0.0.1:$port"
base_domain = "127.0.0.1"
shutdown_grace_secs = 2
[telemetry]
listen = "127.0.0.1:0"
log_level = "warn,rustls=error"
[tls]
dev_cert = false
cert_file = "$state/tls/server.pem"
key_file = "$state/tls/server.key"
[store]
data_dir = "$d/data"
[api]
requests_per_second = 100000
burst = 100000
address_requests_per_second = 100000
address_burst = 100000
[orchestrator]
isolation = "$m"
start_timeout_secs = 30
$([[ $m == namespaces && -n $UID_RANGE ]] && echo "uid_range = \"$UID_RANGE\"")
CONF
  "$bin" serve --config "$d/sandgate.toml" >"$d/gateway.log" 2>&1 &
  GW_PID[$m]=$!
  URL[$m]="https://127.0.0.1:$port"
  local i
  for i in $(seq 300); do
    kill -0 "${GW_PID[$m]}" 2>/dev/null || { tail -n 20 "$d/gateway.log" >&2; die "the $m gateway exited at start"; }
    if [[ -s $d/data/admin.key ]] &&
       curl -sf --cacert "$state/tls/ca.pem" "${URL[$m]}/.well-known/jwks.json" -o /dev/null; then
      KEY[$m]=$(cat "$d/data/admin.key")
      log "$m gateway: pid ${GW_PID[$m]}, ${URL[$m]}"
      return 0
    fi
    sleep 0.1
  done
  tail -n 20 "$d/gateway.log" >&2; die "the $m gateway did not answer within 30 s"
}

fail_step() { # mode what — the step failed: show the gateway's log and stop
  tail -n 20 "$state/$1/gateway.log" >&2
  die "$2 failed on the $1 gateway (its log above)"
}

# The commands run inside the sandboxes ($PORT and $PWD expanded there, not here).
PY_CMD='exec python3 -m http.server $PORT'
IDLE_CMD='exec busybox httpd -f -p 127.0.0.1:$PORT'
# nginx with every path in the sandbox's working folder (its compiled-in ones are not there,
# nor writable), one worker, a 1 KiB file.
NGINX_CMD=$(cat <<'SH'
set -e
mkdir -p www tmp
head -c 1024 /dev/zero | tr '\0' x >www/index.html
cat >nginx.conf <<EOF
worker_processes 1;
pid $PWD/nginx.pid;
error_log stderr warn;
events { worker_connections 4096; }
http {
  access_log off;
  default_type text/plain;
  keepalive_requests 100000000;
  keepalive_timeout 75s;
  client_body_temp_path $PWD/tmp/body;
  proxy_temp_path $PWD/tmp/proxy;
  fastcgi_temp_path $PWD/tmp/fastcgi;
  uwsgi_temp_path $PWD/tmp/uwsgi;
  scgi_temp_path $PWD/tmp/scgi;
  server { listen 127.0.0.1:$PORT; root $PWD/www; }
}
EOF
exec /usr/sbin/nginx -p "$PWD/" -e stderr -c "$PWD/nginx.conf" -g 'daemon off;'
SH
)

# The API's side of steps 1 and 2: one keep-alive TLS connection, fine-grained timing.
cat >"$state/api.py" <<'PY'
"""create URL KEY CA N CMD OUT_CREATE | exec URL KEY CA ID M OUT: one sample (ms) a line."""
import http.client, json, ssl, sys, time
from urllib.parse import urlsplit

verb, url, key, ca = sys.argv[1:5]
u = urlsplit(url)
ctx = ssl.create_default_context(cafile=ca)
conn = http.client.HTTPSConnection(u.hostname, u.port, context=ctx)
hdr = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}

def call(method, path, body=None):
    conn.request(method, path, body=None if body is None else json.dumps(body), headers=hdr)
    r = conn.getresponse()
    data = r.read()
    if r.status >= 300:
        sys.exit(f"{method} {path}: {r.status} {data[:300]!r}")
    return json.loads(data) if data else None

if verb == "create":
    n, cmd, out = int(sys.argv[5]), sys.argv[6], sys.argv[7]
    ids = []
    with open(out, "w") as f:
        for _ in range(n):
            t0 = time.perf_counter()
            sb = call("POST", "/v1/sandboxes", {"command": ["sh", "-c", cmd], "ports": [8000]})
            while sb["status"] == "starting":
                time.sleep(0.005)
                sb = call("GET", f"/v1/sandboxes/{sb['id']}")
            if sb["status"] != "running":
                sys.exit(f"sandbox {sb['id']} is {sb['status']}: {sb.get('detail')}")
            f.write(f"{(time.perf_counter() - t0) * 1e3:.3f}\n")
            ids.append(sb["id"])
    for i in ids:
        call("DELETE", f"/v1/sandboxes/{i}")
elif verb == "exec":
    sid, m, out = sys.argv[5], int(sys.argv[6]), sys.argv[7]
    with open(out, "w") as f:
        for _ in range(m):
            t0 = time.perf_counter()
            r = call("POST", f"/v1/sandboxes/{sid}/exec", {"command": ["true"]})
            if r["exit_code"] != 0:
                sys.exit(f"exec true: {r}")
            f.write(f"{(time.perf_counter() - t0) * 1e3:.3f}\n")
PY

# A sandbox through the CLI, waited for; prints its id.
create() { # mode command
  sg "$1" sandbox create --port 8000 --wait -- sh -c "$2" 2>>"$state/$1/cli.err"
}

# ---------------------------------------------------------------- measurements
R="$state/results" # one file per figure: $R/<mode>.<name>
mkdir -p "$R"
put() { echo "$3" >"$R/$1.$2"; }

step_create() {
  local m t0 t1 id i ids
  for m in "${MODES[@]}"; do
    log "$m: $N x sandbox create --wait (python3 -m http.server)"
    ids=()
    : >"$R/$m.create_cli"; : >"$R/$m.rm_cli"
    for i in $(seq "$N"); do
      t0=${EPOCHREALTIME/./}
      id=$(create "$m" "$PY_CMD") || fail_step "$m" "sandbox create --wait"
      t1=${EPOCHREALTIME/./}
      elapsed_ms "$t0" "$t1" >>"$R/$m.create_cli"
      ids+=("$id")
    done
    for id in "${ids[@]}"; do
      t0=${EPOCHREALTIME/./}
      sg "$m" sandbox rm "$id" >/dev/null 2>>"$state/$m/cli.err" || fail_step "$m" "sandbox rm"
      t1=${EPOCHREALTIME/./}
      elapsed_ms "$t0" "$t1" >>"$R/$m.rm_cli"
    done
    log "$m: $N x POST /v1/sandboxes, polled every 5 ms"
    python3 "$state/api.py" create "${URL[$m]}" "${KEY[$m]}" "$state/tls/ca.pem" "$N" "$PY_CMD" \
      "$R/$m.create_api" 2>>"$state/$m/cli.err" || fail_step "$m" "POST /v1/sandboxes"
  done
}

# Steps 2 and 3 share one nginx sandbox per mode; both stay up for step 3, whose rounds
# alternate the modes (none first in odd rounds, namespaces first in even ones), so that a
# burst of other work on a shared machine lands on both alike. Each figure is the median of
# the rounds.
declare -A NGX HDR
step_exec() {
  local m t0 t1 i tok body
  for m in "${MODES[@]}"; do
    NGX[$m]=$(create "$m" "$NGINX_CMD") || fail_step "$m" "the nginx sandbox"
    log "$m: $M x sandbox exec ${NGX[$m]} -- true"
    : >"$R/$m.exec_cli"
    for i in $(seq "$M"); do
      t0=${EPOCHREALTIME/./}
      sg "$m" sandbox exec "${NGX[$m]}" -- true >/dev/null 2>>"$state/$m/cli.err" || fail_step "$m" "sandbox exec"
      t1=${EPOCHREALTIME/./}
      elapsed_ms "$t0" "$t1" >>"$R/$m.exec_cli"
    done
    python3 "$state/api.py" exec "${URL[$m]}" "${KEY[$m]}" "$state/tls/ca.pem" "${NGX[$m]}" "$M" \
      "$R/$m.exec_api" 2>>"$state/$m/cli.err" || fail_step "$m" "POST .../exec"
    tok=$(sg "$m" token create "${NGX[$m]}" --port 8000 --ttl 1h --json |
          python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])') || fail_step "$m" "token create"
    HDR[$m]="$tok"
    body=$(curl -sS --cacert "$state/tls/ca.pem" -H "Authorization: Bearer $tok" \
      -H "X-Sandgate-Sandbox: ${NGX[$m]}" -H "X-Sandgate-Port: 8000" "${URL[$m]}/index.html") || fail_step "$m" "GET /index.html"
    [[ $body == $(head -c 1024 /dev/zero | tr '\0' x) ]] || die "$m: the nginx sandbox answered '${body:0:200}', not its 1 KiB file"
  done
}

step_h1() {
  local r m order t0 t1 pid k0 k1 hdr
  for r in $(seq "$ROUNDS"); do
    order=("${MODES[@]}")
    ((r % 2 == 0)) && order=("${order[1]}" "${order[0]}")
    for m in "${order[@]}"; do
      hdr=(-H "Authorization: Bearer ${HDR[$m]}" -H "X-Sandgate-Sandbox: ${NGX[$m]}" -H "X-Sandgate-Port: 8000")
      log "$m: round $r/$ROUNDS: wrk -t$THREADS -c$CONNS -d${DURATION}s through sandbox ${NGX[$m]}"
      wrk -t"$THREADS" -c"$CONNS" -d"${WARMUP}s" "${hdr[@]}" "${URL[$m]}/index.html" >/dev/null
      pid=${GW_PID[$m]}
      k0=$(awk '{print $14 + $15}' /proc/"$pid"/stat)
      t0=${EPOCHREALTIME/./}
      wrk -t"$THREADS" -c"$CONNS" -d"${DURATION}s" --latency "${hdr[@]}" "${URL[$m]}/index.html" >"$R/$m.wrk.$r"
      t1=${EPOCHREALTIME/./}
      k1=$(awk '{print $14 + $15}' /proc/"$pid"/stat)
      echo "$((k1 - k0)) $(elapsed_ms "$t0" "$t1")" >"$R/$m.gwcpu.$r"
    done
  done
  for m in "${MODES[@]}"; do sg "$m" sandbox rm "${NGX[$m]}" >/dev/null || fail_step "$m" "sandbox rm"; done
}

rss_kib() { awk '/^VmRSS:/ {print $2}' /proc/"$1"/status; }
pss_kib() { # pids... — the sum of their PSS
  local p t=0 v
  for p in "$@"; do
    v=$(awk '/^Pss:/ {print $2}' /proc/"$p"/smaps_rollup 2>/dev/null) || continue
    t=$((t + ${v:-0}))
  done
  echo $t
}
# The folder of an isolated sandbox's memory cgroup, found as src/sandbox/cgroup.rs lays it
# out: `sandgate/<id>` beneath the gateway's own cgroup (under v2 the gateway may have moved
# itself into `<own>/supervisor` first).
memcg_dir() { # gateway-pid id
  local own v1 v2 d
  v1=$(awk -F: '$2 == "memory" {print $3}' /proc/"$1"/cgroup)
  v2=$(awk -F: '$1 == "0" {print $3}' /proc/"$1"/cgroup)
  for d in "/sys/fs/cgroup/memory${v1%/}/sandgate/$2" "/sys/fs/cgroup${v2%/}/sandgate/$2" \
           "/sys/fs/cgroup$(dirname "${v2:-/x}")/sandgate/$2"; do
    d=${d//\/\//\/}
    [[ -f $d/memory.current || -f $d/memory.usage_in_bytes ]] && { echo "$d"; return 0; }
  done
  return 1
}
sandbox_pids() { # mode gateway-pid id
  if [[ $1 == namespaces ]]; then
    local d; d=$(memcg_dir "$2" "$3") || return 0
    cat "$d/cgroup.procs"
  fi
}
none_pids() { # gateway-pid — every process in the process groups the gateway started
  local leaders
  leaders=$(ps -o pid= --ppid "$1" | tr -d ' ' | paste -sd, -)
  [[ -n $leaders ]] || return 0
  ps -eo pid=,pgid= | awk -v l=",$leaders," 'index(l, "," $2 ",") {print $1}'
}

step_memory() { # kind command
  local kind=$1 cmd=$2 m pid id ids i rss0 rss1 mem pss d
  for m in "${MODES[@]}"; do
    pid=${GW_PID[$m]}
    log "$m: $K idle sandboxes ($kind)"
    sleep 1
    rss0=$(rss_kib "$pid")
    ids=()
    for i in $(seq "$K"); do
      id=$(create "$m" "$cmd") || fail_step "$m" "sandbox create ($kind)"
      ids+=("$id")
    done
    sleep 2
    rss1=$(rss_kib "$pid")
    mem=0; pss=0
    if [[ $m == namespaces ]]; then
      local pids=()
      for id in "${ids[@]}"; do
        d=$(memcg_dir "$pid" "$id") || die "no memory cgroup found for sandbox $id (see src/sandbox/cgroup.rs)"
        if [[ -f $d/memory.current ]]; then mem=$((mem + $(cat "$d/memory.current")))
        else mem=$((mem + $(cat "$d/memory.usage_in_bytes"))); fi
        mapfile -t -O "${#pids[@]}" pids < <(sandbox_pids "$m" "$pid" "$id")
      done
      pss=$(pss_kib "${pids[@]}")
      put "$m" "mem_cg_$kind" "$((mem / K / 1024))"
    else
      mapfile -t pids < <(none_pids "$pid")
      pss=$(pss_kib "${pids[@]}")
    fi
    put "$m" "mem_pss_$kind" "$((pss / K))"
    put "$m" "mem_gw_$kind" "$(((rss1 - rss0) / K))"
    for id in "${ids[@]}"; do sg "$m" sandbox rm "$id" >/dev/null || fail_step "$m" "sandbox rm"; done
  done
}

# ---------------------------------------------------------------- run
for m in "${MODES[@]}"; do start_gateway "$m"; done
step_create
step_exec
step_h1
step_memory idle "$IDLE_CMD"
step_memory python "$PY_CMD"

if ((STORM > 0)); then
  log "bash bench/isolation-storm.sh $STORM against the namespaces gateway"
  SANDGATE_BIN="$bin" SANDGATE_URL=${URL[namespaces]} SANDGATE_CA_CERT="$state/tls/ca.pem" \
    SANDGATE_API_KEY=${KEY[namespaces]} bash "$here/isolation-storm.sh" "$STORM" >"$R/storm" 2>&1 || true
  cat "$R/storm" >&2
fi

# ---------------------------------------------------------------- report
day=$(date -u +%F)
out="$here/results/isolation-$day.md"
mkdir -p "$here/results"
commit=$(git rev-parse --short HEAD 2>/dev/null || echo "?")
[[ -n $(git status --porcelain -- src Cargo.toml 2>/dev/null) ]] && commit="$commit+dirty"
cgv=v1; [[ -f /sys/fs/cgroup/cgroup.controllers ]] && cgv=v2
DAY=$day COMMIT=$commit CGV=$cgv N=$N M=$M K=$K THREADS=$THREADS CONNS=$CONNS DURATION=$DURATION \
WARMUP=$WARMUP STORM=$STORM ROUNDS=$ROUNDS python3 - "$R" "$out" <<'PY'
import math, os, platform, re, sys
R, out = sys.argv[1], sys.argv[2]
E = os.environ
modes = ("none", "namespaces")
def rd(m, name):
    p = os.path.join(R, f"{m}.{name}" if m else name)
    return open(p).read() if os.path.exists(p) else None
def samples(m, name):
    t = rd(m, name)
    return sorted(float(x) for x in t.split()) if t else []
def pct(v, p):  # nearest rank
    return v[max(0, math.ceil(p / 100 * len(v)) - 1)] if v else None
def ms(v, u):
    return float(v) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[u]
def wrk_round(t, cpu_text):
    rps = re.search(r"Requests/sec:\s+([\d.]+)", t)
    p = {int(a): ms(v, u) for a, v, u in re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s|m)\s*$", t, re.M)}
    bad = sum(int(x) for x in re.findall(r"Non-2xx or 3xx responses:\s+(\d+)", t))
    e = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", t)
    bad += sum(map(int, e.groups())) if e else 0
    cpu = None
    if cpu_text:
        ticks, msecs = cpu_text.split()
        cpu = int(ticks) / os.sysconf("SC_CLK_TCK") / (float(msecs) / 1e3) * 100
    return (float(rps.group(1)) if rps else None), p.get(50), p.get(99), bad, cpu
def median(xs):
    xs = sorted(x for x in xs if x is not None)
    return xs[len(xs) // 2] if xs else None
def wrk(m):
    rounds = [wrk_round(rd(m, f"wrk.{r}") or "", rd(m, f"gwcpu.{r}"))
              for r in range(1, int(E["ROUNDS"]) + 1)]
    cols = list(zip(*rounds)) if rounds else [[]] * 5
    return median(cols[0]), median(cols[1]), median(cols[2]), sum(x or 0 for x in cols[3]), median(cols[4])
def num(m, name):
    t = rd(m, name)
    return float(t) if t and t.strip() else None

rows = []  # (label, none, namespaces, format)
for name, label in (("create_cli", "create → running, CLI `create --wait` (ms)"),
                    ("create_api", "create → running, API polled every 5 ms (ms)"),
                    ("rm_cli", "delete, CLI `sandbox rm` (ms)"),
                    ("exec_cli", "exec `true`, CLI `sandbox exec` (ms)"),
                    ("exec_api", "exec `true`, API on a kept-alive connection (ms)")):
    v = {m: samples(m, name) for m in modes}
    for p in (50, 99):
        rows.append((f"{label}, p{p}", pct(v["none"], p), pct(v["namespaces"], p), "{:.1f}"))
w = {m: wrk(m) for m in modes}
rows += [("h1 through one sandbox (nginx, 1 KiB), req/s", w["none"][0], w["namespaces"][0], "{:,.0f}"),
         ("h1 through one sandbox, p50 (ms)", w["none"][1], w["namespaces"][1], "{:.2f}"),
         ("h1 through one sandbox, p99 (ms)", w["none"][2], w["namespaces"][2], "{:.2f}"),
         ("h1 through one sandbox, gateway CPU (% of one core)", w["none"][4], w["namespaces"][4], "{:.0f}"),
         ("h1 errors (non-2xx + socket errors)", w["none"][3], w["namespaces"][3], "{:.0f}")]
for kind, what in (("idle", "idle `busybox httpd`"), ("python", "python http.server")):
    rows += [(f"memory per {what} sandbox: its cgroup (KiB)", None, num("namespaces", f"mem_cg_{kind}"), "{:,.0f}"),
             (f"memory per {what} sandbox: PSS of its processes (KiB)", num("none", f"mem_pss_{kind}"), num("namespaces", f"mem_pss_{kind}"), "{:,.0f}"),
             (f"memory per {what} sandbox: gateway RSS growth (KiB)", num("none", f"mem_gw_{kind}"), num("namespaces", f"mem_gw_{kind}"), "{:,.0f}")]

def cell(x, f):
    return "-" if x is None else f.format(x)
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
lines = [f"# Isolation cost: namespaces vs none ({E['DAY']})", "",
         f"`bash bench/isolation.sh`: sandgate {E['COMMIT']}, {cpu}, {os.cpu_count()} cores, "
         f"Linux {platform.release()}, cgroup {E['CGV']}. N={E['N']} creates, M={E['M']} execs, "
         f"K={E['K']} sandboxes per memory row, wrk -t{E['THREADS']} -c{E['CONNS']} -d{E['DURATION']}s "
         f"(after a {E['WARMUP']} s warm-up), h1 figures the median of {E['ROUNDS']} rounds that "
         "alternate the modes. Both gateways ran side by side; each other step ran on one, then on "
         "the other.",
         "", "| measurement | none | namespaces | namespaces / none |", "|---|---:|---:|---:|"]
for label, a, b, f in rows:
    ratio = f"{b / a:.2f}×" if a and b is not None else "-"
    lines.append(f"| {label} | {cell(a, f)} | {cell(b, f)} | {ratio} |")
lines += ["", "The CLI polls every 250 ms while it waits, so its create figures come in steps of 250 ms; "
          "the API row polls every 5 ms on one kept-alive connection. CLI rows include starting the "
          "CLI and its TLS handshake. A cgroup's memory is what the kernel charges it (its processes' "
          "pages, its /tmp, page cache first touched from it), so `none` has no such figure."]
storm = (rd(None, "storm") or "").strip()
if storm:
    lines += ["", f"`bash bench/isolation-storm.sh {E['STORM']}` against the namespaces gateway:",
              "", "```", storm, "```"]
text = "\n".join(lines) + "\n"
open(out, "w").write(text)
print(text, end="")
PY
log "wrote ${out#"$repo"/}"
