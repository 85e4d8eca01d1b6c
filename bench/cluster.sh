#!/usr/bin/env bash
# Cluster mode throughput: one sandgate gateway against two gateways sharing one PostgreSQL,
# measured in the same run, with the same backend and the same load generator.
#
#   bash bench/cluster.sh            (knobs: DURATION=10, CONNS=64, PG_URL=postgres://...)
#
# Both layouts get the same machine: "one" is a single gateway with one worker per core; "two"
# is two gateway processes with one worker each (one per core), the load split evenly between
# them, as an L4 balancer would. Tokens are minted through gateway A and used on both, so the
# run also shows that a token minted on one node is accepted by the other. On a machine where
# the load generator and the backend share the gateways' cores, the ratio shows the cost of
# running two processes instead of one, not the gain from more hardware.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
DURATION=${DURATION:-10}
CONNS=${CONNS:-64}
PG_URL=${PG_URL:-${SANDGATE_TEST_PG:-postgres://postgres@127.0.0.1:5432/test}}
BIN="${CARGO_TARGET_DIR:-$repo/target}/release/sandgate"

for tool in wrk nginx curl psql python3; do
  command -v "$tool" >/dev/null || { echo "missing $tool (apt-get install wrk nginx-light curl postgresql-client python3)" >&2; exit 1; }
done
[ "${SKIP_BUILD:-0}" = 1 ] || (cd "$repo" && cargo build --release --locked --bin sandgate)

work=$(mktemp -d)
pids=()
schema="sg_bench_$(date +%s)_$$"
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  psql "$PG_URL" -qc "DROP SCHEMA IF EXISTS $schema CASCADE" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
psql "$PG_URL" -qc "CREATE SCHEMA $schema" >/dev/null
sep='?'; [[ $PG_URL == *\?* ]] && sep='&'
store_url="${PG_URL}${sep}options[search_path]=$schema"
export SANDGATE_KEK=$("$BIN" kek generate)

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# The backend: nginx answering 200 "ok", as in bench/peers.sh.
backend_port=$(free_port)
mkdir -p "$work/nginx"
cat >"$work/nginx/nginx.conf" <<CONF
worker_processes 1;
daemon off;
pid $work/nginx/nginx.pid;
error_log $work/nginx/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  server { listen 127.0.0.1:$backend_port; location / { return 200 "ok"; } }
}
CONF
nginx -c "$work/nginx/nginx.conf" -p "$work/nginx" &
pids+=($!)

# start_gateway NAME WORKERS: sets GW_PORT and GW_PID once it answers (no subshell, so the
# PID is tracked for cleanup)
start_gateway() {
  local name=$1 workers=$2 port telemetry dir
  port=$(free_port); telemetry=$(free_port); dir="$work/$name"
  mkdir -p "$dir"
  cat >"$dir/sandgate.toml" <<CONF
[gateway]
listen = "127.0.0.1:$port"
base_domain = "sandbox.localhost"
workers = $workers
[telemetry]
listen = "127.0.0.1:$telemetry"
log_level = "warn"
[store]
data_dir = "data"
url = "$store_url"
[cluster]
node_name = "$name"
[orchestrator]
enabled = false
CONF
  "$BIN" serve --config "$dir/sandgate.toml" 2>"$dir/log" &
  GW_PID=$!
  pids+=("$GW_PID")
  for _ in $(seq 200); do
    curl -sk --max-time 1 -o /dev/null "https://127.0.0.1:$port/.well-known/jwks.json" -H "Host: sandbox.localhost" && break
    sleep 0.1
  done
  GW_PORT=$port
}

cpu_ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }

# wrk with the token and the route headers against every port given, at once; prints total req/s.
load() {
  # The same load generator either way: 2 threads and $CONNS connections in all.
  local each=$(( CONNS / $# )) threads=$(( 2 / $# > 0 ? 2 / $# : 1 )) outs=() p i=0
  for p in "$@"; do
    wrk -t"$threads" -c"$each" -d"${DURATION}s" --latency \
        -H "Host: sandbox.localhost" -H "Authorization: Bearer $token" \
        -H "X-Sandgate-Sandbox: $sandbox" -H "X-Sandgate-Port: $backend_port" \
        "https://127.0.0.1:$p/" >"$work/wrk.$i" 2>&1 &
    outs+=($!); i=$((i + 1))
  done
  wait "${outs[@]}"
  local total=0 j rate
  for ((j = 0; j < i; j++)); do
    grep -q "Non-2xx" "$work/wrk.$j" && { echo "non-2xx answers in run $j:" >&2; cat "$work/wrk.$j" >&2; exit 1; }
    rate=$(awk '/Requests\/sec/ {print $2}' "$work/wrk.$j")
    total=$(python3 -c "print(round($total + $rate))")
  done
  echo "$total"
}

# One gateway first: it initialises the schema and writes the admin key.
start_gateway node-a 0; a_port=$GW_PORT; a_pid=$GW_PID
key=$(cat "$work/node-a/data/admin.key")
api() { curl -sk --fail-with-body -H "Host: sandbox.localhost" -H "Authorization: Bearer $key" -H "Content-Type: application/json" "$@"; }
sandbox=$(api -d "{\"upstream\":\"127.0.0.1\",\"ports\":[$backend_port]}" "https://127.0.0.1:$a_port/v1/sandboxes" | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
token=$(api -d "{\"port\":$backend_port,\"ttl_secs\":3600}" "https://127.0.0.1:$a_port/v1/sandboxes/$sandbox/connect-tokens" | python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')

one=$(load "$a_port")
kill "$a_pid"; wait "$a_pid" 2>/dev/null || true

start_gateway node-b 1; b_port=$GW_PORT
start_gateway node-c 1; c_port=$GW_PORT
two=$(load "$b_port" "$c_port")

ratio=$(python3 -c "print(f'{$two / $one:.2f}')")
date=$(date -u +%Y-%m-%dT%H:%M:%SZ)
cat <<OUT

== cluster throughput ($date, $(nproc) cores, ${DURATION}s, wrk ${CONNS} connections, h1 keep-alive, PostgreSQL store) ==
| layout | req/s |
|---|---|
| one gateway, $(nproc) workers | $one |
| two gateways (1 worker each), load split evenly; token minted on a third node | $two |
| two / one | ${ratio}× |
OUT
