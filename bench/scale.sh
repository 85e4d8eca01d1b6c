#!/usr/bin/env bash
# scale.sh — the control-plane and scale half of bench/run.sh, against one sandgate started
# here (fresh data dir, a CA and certificate made here, header routing on base domain
# 127.0.0.1) and an nginx `return 200 "ok"` backend:
#
#   1. token issuance: examples/control_bench (16 concurrent TLS clients; it also reports
#      sandbox create-to-running and exec round trips);
#   2. HTTP/1.1 keep-alive throughput (wrk) through one sandbox, and the gateway's RSS;
#   3. examples/scale_sandboxes registers $SANDBOXES more sandboxes through the API;
#      then the RSS again, and the same wrk run through one of the new sandboxes;
#   4. examples/ws_scale holds $WEBSOCKETS WebSockets open through the gateway: RSS per
#      connection, then echo round trips at $WS_RATE messages/s.
#
#   bash bench/scale.sh OUTFILE.json     (bench/run.sh passes the results folder's scale.json)
#
# Every phase records CPU as percent of one core for the gateway and for the load generator
# (and the backend), from /proc/<pid>/stat and the shell's child times (2 cores = 200).
# Knobs: DURATION (wrk seconds, 10), WARMUP (1), CONNS (64), THREADS (2), SANDBOXES (100000),
# SCALE_CONCURRENCY (32), WEBSOCKETS (10000), WS_RATE (1000), WS_SECS (DURATION),
# CONTROL_RUNS (5), SKIP_CONTROL=1, SKIP_ROUTES=1, SKIP_WS=1, SCALE_DIR (work dir, default a
# temp dir), SANDGATE_CONF_GATEWAY / SANDGATE_CONF_EXTRA (extra config, as in sandgate-row.sh).
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
OUT=${1:?usage: scale.sh OUTFILE.json}

DURATION=${DURATION:-10}
WARMUP=${WARMUP:-1}
CONNS=${CONNS:-64}
THREADS=${THREADS:-2}
SANDBOXES=${SANDBOXES:-100000}
SCALE_CONCURRENCY=${SCALE_CONCURRENCY:-32}
WEBSOCKETS=${WEBSOCKETS:-10000}
WS_RATE=${WS_RATE:-1000}
WS_SECS=${WS_SECS:-$DURATION}
CONTROL_RUNS=${CONTROL_RUNS:-5}
GW_PORT=${SCALE_GW_PORT:-18460}
BACKEND_PORT=${SCALE_BACKEND_PORT:-18090}
TARGET=${CARGO_TARGET_DIR:-$repo/target}
BIN=$TARGET/release/sandgate
EX=$TARGET/release/examples

W=${SCALE_DIR:-$(mktemp -d /tmp/sandgate-scale.XXXXXX)}
mkdir -p "$W"
ulimit -n 1048576 2>/dev/null || ulimit -n "$(ulimit -Hn)"

log() { printf '[scale] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# The gateway holds two descriptors per WebSocket (client and upstream). Where the hard limit
# cannot be raised (containers), run as many as fit; the report names the count it ran at.
nofile=$(ulimit -n)
if [[ $nofile != unlimited ]] && ((WEBSOCKETS * 2 + 256 > nofile)); then
  log "open-files limit is $nofile: the gateway needs 2 per WebSocket, so $(((nofile - 256) / 2)) instead of $WEBSOCKETS"
  WEBSOCKETS=$(((nofile - 256) / 2))
fi

PIDS=()
cleanup() {
  trap - EXIT INT TERM
  local p i
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null; done
  for i in $(seq 50); do
    local alive=0
    for p in "${PIDS[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    ((alive)) || break
    sleep 0.1
  done
  for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null; done
  [[ -z ${SCALE_DIR:-} ]] && rm -rf "$W"
}
trap cleanup EXIT
trap 'log interrupted; exit 130' INT TERM

for b in "$BIN" "$EX/scale_sandboxes" "$EX/ws_scale" "$EX/control_bench"; do
  [[ -x $b ]] || die "missing $b (cargo build --release --bin sandgate --example scale_sandboxes --example ws_scale --example control_bench)"
done
for port in $GW_PORT $BACKEND_PORT; do
  [[ -z $(ss -Hltn "( sport = :$port )" 2>/dev/null) ]] || die "port $port is busy"
done

wait_port() { # port pid name logfile
  local i
  for i in $(seq 300); do
    kill -0 "$2" 2>/dev/null || { log "$3 exited during start-up:"; tail -n 20 "$4" >&2; return 1; }
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  log "$3 did not listen on :$1"; return 1
}
ticks() { local s f; s=$(cat /proc/"$1"/stat 2>/dev/null) || { echo 0; return; }; read -ra f <<<"${s##*) }"; echo $((f[11] + f[12])); }
# CPU ticks of the waited-for children of shell $1. Pass the pid of the shell that runs the load
# generator: $$ in the main shell, $BASHPID taken outside any $(...) inside a function that
# itself runs in a $(...).
ticks_children() { local s f; s=$(cat /proc/"$1"/stat); read -ra f <<<"${s##*) }"; echo $((f[13] + f[14])); }
rss_kib() { awk '/^VmRSS:/ {print $2}' /proc/"$1"/status; }
now_s() { date +%s.%N; }
HZ=$(getconf CLK_TCK)

# ---------------------------------------------------------------- certificates: a CA + a leaf
mkdir -p "$W/tls"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -noenc -days 30 \
  -keyout "$W/tls/ca.key" -out "$W/tls/ca.pem" -subj "/CN=sandgate bench CA" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign" 2>/dev/null \
  || die "openssl (CA) failed"
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -noenc \
  -keyout "$W/tls/server.key" -out "$W/tls/server.csr" -subj /CN=localhost 2>/dev/null \
  || die "openssl (CSR) failed"
printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n' >"$W/tls/ext.cnf"
openssl x509 -req -in "$W/tls/server.csr" -CA "$W/tls/ca.pem" -CAkey "$W/tls/ca.key" \
  -CAcreateserial -days 30 -extfile "$W/tls/ext.cnf" -out "$W/tls/server.crt" 2>/dev/null \
  || die "openssl (sign) failed"

# ---------------------------------------------------------------- backend: nginx "ok"
mkdir -p "$W/backend/tmp"
cat >"$W/backend/nginx.conf" <<EOF
worker_processes 1;
pid $W/backend/nginx.pid;
error_log $W/backend/error.log warn;
events { worker_connections 16384; }
http {
    access_log off;
    keepalive_requests 100000000;
    keepalive_timeout 75s;
    client_body_temp_path $W/backend/tmp/body;
    proxy_temp_path $W/backend/tmp/proxy;
    fastcgi_temp_path $W/backend/tmp/fastcgi;
    uwsgi_temp_path $W/backend/tmp/uwsgi;
    scgi_temp_path $W/backend/tmp/scgi;
    server {
        listen 127.0.0.1:$BACKEND_PORT;
        location / { default_type text/plain; return 200 "ok"; }
    }
}
EOF
nginx -p "$W/backend" -c "$W/backend/nginx.conf" -e "$W/backend/error.log" -g 'daemon off;' \
  >"$W/backend/stdout.log" 2>&1 &
BACKEND_PID=$!; PIDS+=("$BACKEND_PID")
wait_port "$BACKEND_PORT" "$BACKEND_PID" backend "$W/backend/error.log" || die "backend failed"

# ---------------------------------------------------------------- the gateway
cat >"$W/sandgate.toml" <<EOF
[gateway]
listen = "127.0.0.1:$GW_PORT"
base_domain = "127.0.0.1"
max_connections = 1000000
max_connections_per_ip = 1000000
max_connections_per_sandbox = 1000000
${SANDGATE_CONF_GATEWAY:-}
[telemetry]
listen = "127.0.0.1:0"
log_level = "warn,rustls=error"   # wrk sends 127.0.0.1 as SNI: one warning per connection
[tls]
dev_cert = false
cert_file = "$W/tls/server.crt"
key_file = "$W/tls/server.key"
[store]
data_dir = "$W/data"
[orchestrator]
run_as = "gateway"   # control_bench's sandbox runs in the work dir, which only we can enter
[api]
requests_per_second = 1000000
burst = 1000000
address_requests_per_second = 1000000
address_burst = 1000000
${SANDGATE_CONF_EXTRA:-}
EOF
"$BIN" serve --config "$W/sandgate.toml" >"$W/sandgate.log" 2>&1 &
GW_PID=$!; PIDS+=("$GW_PID")
wait_port "$GW_PORT" "$GW_PID" sandgate "$W/sandgate.log" || die "sandgate failed to start"
# The listener is bound before a first start has written the admin key.
for _ in $(seq 300); do [[ -s $W/data/admin.key ]] && break; sleep 0.1; done
export SANDGATE_URL="https://127.0.0.1:$GW_PORT" SANDGATE_CA_CERT="$W/tls/ca.pem"
SANDGATE_API_KEY=$(cat "$W/data/admin.key") || die "no admin key"
export SANDGATE_API_KEY

api() { curl -s --fail-with-body --cacert "$W/tls/ca.pem" -H "Authorization: Bearer $SANDGATE_API_KEY" \
          -H "Content-Type: application/json" "$@"; }
new_sandbox() { api -d "{\"upstream\":\"127.0.0.1\",\"ports\":[$BACKEND_PORT]}" "$SANDGATE_URL/v1/sandboxes" \
                  | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])'; }
new_token() { api -d "{\"port\":$BACKEND_PORT,\"ttl_secs\":3600}" "$SANDGATE_URL/v1/sandboxes/$1/connect-tokens" \
                | python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])'; }

# Results accumulate as JSON fragments, one file per phase, merged at the end.
mkdir -p "$W/res"
put() { printf '%s' "$2" >"$W/res/$1.json"; }   # name json

cpu_json() { # wall gen_ticks gw_ticks be_ticks -> {"gen_pct","gateway_pct","backend_pct"}
  awk -v hz="$HZ" -v w="$1" -v g="$2" -v p="$3" -v b="$4" \
    'BEGIN{printf "{\"gen_pct\":%.0f,\"gateway_pct\":%.0f,\"backend_pct\":%.0f,\"wall_secs\":%.2f}", g/hz/w*100, p/hz/w*100, b/hz/w*100, w}'
}

# wrk h1 through sandbox $1 -> JSON {rps,p50_ms,p99_ms,bad,cpu}
wrk_json() {
  local id=$1 name=$2 tok out="$W/wrk.$2.txt" me=$BASHPID
  tok=$(new_token "$id") || die "token for $id"
  local hdr=(-H "Authorization: Bearer $tok" -H "X-Sandgate-Sandbox: $id" -H "X-Sandgate-Port: $BACKEND_PORT")
  local c; c=$(curl -s -o /dev/null -w '%{http_code}' --cacert "$W/tls/ca.pem" "${hdr[@]}" "$SANDGATE_URL/")
  [[ $c == 200 ]] || die "sandbox $id answered $c, not 200"
  ((WARMUP > 0)) && wrk -t"$THREADS" -c"$CONNS" -d"${WARMUP}s" "${hdr[@]}" "$SANDGATE_URL/" >/dev/null 2>&1
  local g0 p0 b0 t0 g1 p1 b1 t1
  g0=$(ticks_children "$me"); p0=$(ticks "$GW_PID"); b0=$(ticks "$BACKEND_PID"); t0=$(now_s)
  wrk -t"$THREADS" -c"$CONNS" -d"${DURATION}s" --latency "${hdr[@]}" "$SANDGATE_URL/" >"$out" 2>&1
  t1=$(now_s); g1=$(ticks_children "$me"); p1=$(ticks "$GW_PID"); b1=$(ticks "$BACKEND_PID")
  local cpu; cpu=$(cpu_json "$(awk -v a="$t0" -v b="$t1" 'BEGIN{print b-a}')" $((g1 - g0)) $((p1 - p0)) $((b1 - b0)))
  python3 - "$out" "$cpu" <<'PY'
import json, re, sys
txt = open(sys.argv[1]).read()
def ms(v, u): return float(v) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[u]
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", txt).group(1))
pct = {int(p): ms(v, u) for p, v, u in re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s|m)\s*$", txt, re.M)}
bad = sum(int(x) for x in re.findall(r"Non-2xx or 3xx responses:\s+(\d+)", txt))
m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", txt)
if m: bad += sum(map(int, m.groups()))
print(json.dumps({"rps": rps, "p50_ms": pct.get(50), "p99_ms": pct.get(99), "bad": bad, "cpu": json.loads(sys.argv[2])}))
PY
}

# ---------------------------------------------------------------- 1. token issuance
if [[ ${SKIP_CONTROL:-0} != 1 ]]; then
  log "control_bench (RUNS=$CONTROL_RUNS; token issuance with 16 TLS clients for 5 s)"
  g0=$(ticks_children $$); p0=$(ticks "$GW_PID"); t0=$(now_s)
  RUNS=$CONTROL_RUNS "$EX/control_bench" >"$W/control.txt" 2>&1 || { cat "$W/control.txt" >&2; die "control_bench failed"; }
  t1=$(now_s); g1=$(ticks_children $$); p1=$(ticks "$GW_PID")
  sed 's/^/[scale]   /' "$W/control.txt" >&2
  put control "$(python3 - "$W/control.txt" "$(cpu_json "$(awk -v a="$t0" -v b="$t1" 'BEGIN{print b-a}')" $((g1 - g0)) $((p1 - p0)) 0)" <<'PY'
import json, re, sys
txt = open(sys.argv[1]).read()
g = lambda pat: (lambda m: float(m.group(1)) if m else None)(re.search(pat, txt))
print(json.dumps({
  "tokens_per_sec": g(r"token issuance: .*= ([\d.]+) tokens/s"),
  "create_to_running_ms": g(r"create-to-running: median ([\d.]+) ms"),
  "exec_ms": g(r"exec round trip .*: median ([\d.]+) ms"),
  "cpu_whole_run": json.loads(sys.argv[2]),
  "raw": txt.strip().splitlines(),
}))
PY
)"
fi

# ---------------------------------------------------------------- 2-3. route table scale
if [[ ${SKIP_ROUTES:-0} != 1 ]]; then
  first=$(new_sandbox) || die "cannot create a sandbox"
  log "h1 through one sandbox (before the scale registration)"
  before=$(wrk_json "$first" before) || die "wrk (before) failed"
  rss_before=$(rss_kib "$GW_PID")
  log "  $before; gateway RSS ${rss_before} KiB"

  log "registering $SANDBOXES sandboxes ($SCALE_CONCURRENCY in flight)"
  t0=$(now_s)
  reg=$("$EX/scale_sandboxes" --backend "127.0.0.1:$BACKEND_PORT" -n "$SANDBOXES" \
          -c "$SCALE_CONCURRENCY" --gateway-pid "$GW_PID" 2> >(sed -u 's/^/[scale]   /' >&2)) \
    || die "scale_sandboxes failed"
  t1=$(now_s)
  reg=$(python3 -c 'import json,sys; r=json.loads(sys.argv[1]); w=float(sys.argv[2]); r["cpu"]={"gateway_pct": round((r["gateway_cpu_secs"] or 0)/w*100), "gen_pct": round(r["client_cpu_secs"]/w*100)}; print(json.dumps(r))' \
          "$(tail -n 1 <<<"$reg")" "$(awk -v a="$t0" -v b="$t1" 'BEGIN{print b-a}')")
  log "  $reg"
  sleep 1
  rss_after=$(rss_kib "$GW_PID")
  last=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["last_id"])' "$reg")
  after=$(wrk_json "$last" after) || die "wrk (after) failed"
  rss_after_wrk=$(rss_kib "$GW_PID")
  log "  $after; gateway RSS ${rss_after} KiB after registering, ${rss_after_wrk} KiB after wrk"
  put routes "{\"sandboxes\": $SANDBOXES, \"before\": $before, \"register\": $reg, \"after\": $after,
    \"rss_before_kib\": $rss_before, \"rss_after_kib\": $rss_after, \"rss_after_wrk_kib\": $rss_after_wrk}"
fi

# ---------------------------------------------------------------- 4. WebSockets
if [[ ${SKIP_WS:-0} != 1 ]]; then
  log "ws_scale: $WEBSOCKETS WebSockets, then $WS_RATE echoes/s for ${WS_SECS}s"
  ws=$("$EX/ws_scale" run -n "$WEBSOCKETS" --gateway-pid "$GW_PID" --rate "$WS_RATE" --secs "$WS_SECS" \
         2> >(sed -u 's/^/[scale]   /' >&2)) || die "ws_scale failed"
  put ws "$(tail -n 1 <<<"$ws")"
fi

put meta "{\"gateway_rss_end_kib\": $(rss_kib "$GW_PID"), \"duration\": $DURATION, \"conns\": $CONNS, \"threads\": $THREADS}"
python3 - "$W/res" "$OUT" <<'PY'
import json, os, sys
d, out = sys.argv[1:3]
res = {f[:-5]: json.load(open(os.path.join(d, f))) for f in sorted(os.listdir(d)) if f.endswith(".json")}
json.dump(res, open(out, "w"), indent=2)
PY
log "wrote $OUT"
cp "$W/sandgate.log" "$(dirname "$OUT")/scale-sandgate.log" 2>/dev/null || true
