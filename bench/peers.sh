#!/usr/bin/env bash
# peers.sh — same-machine, same-run benchmark of TLS reverse-proxy peers for the
# connect-token gateway (JWT bearer check per request, proxy to a loopback backend).
# sandgate's copy: bench/run.sh drives it with sandgate as the "ours" row (see
# bench/sandgate-row.sh); it adds the fixed-rate mode "fixed" to the original.
#
# Everything runs on 127.0.0.1.  Rows (PEERS):
#   backend        nginx `return 200 "ok"` (plain HTTP; h2c on a 2nd port)  — ceiling
#   haproxy-es256  HAProxy TLS + jwt_verify ES256 + alg/exp/iss/aud checks  — main JWT peer
#   haproxy-hs256  HAProxy TLS + jwt_verify HS256 + same claim checks
#   haproxy-tls    HAProxy TLS proxy, no JWT       (isolates the cost of the JWT checks)
#   nginx          nginx TLS proxy, no JWT         (reference)
#   caddy          Caddy TLS proxy, no JWT         (reference, Go)
#   ours           OUR GATEWAY — see the "OUR GATEWAY" slot below; skipped unless OURS_CMD set
# Modes (MODES):
#   h1       HTTP/1.1 keep-alive, wrk  -t$THREADS -c$CONNS -d$DURATION --latency
#   h1new    new TCP(+TLS) connection per request, oha --disable-keepalive -c$CONNS
#            (oha's rustls client resumes TLS sessions: HAProxy reports ~99% resumed, so
#            this is TCP + resumed-TLS1.3 handshake per request; see the "note" column)
#   h2       HTTP/2 over TLS (ALPN h2; h2c prior-knowledge for the backend), h2load
#            -c$H2_CONNS -m$H2_STREAMS (= 64 streams in flight by default)
#   fixed    HTTP/1.1 keep-alive at a fixed offered rate: oha -q$FIXED_RATE -c$FIXED_CONNS
#            --latency-correction (latency counted from when each request was due, so a
#            stall shows up in the tail); only the peers in FIXED_PEERS. Needs oha.
#            p50/p99 are of the requests due after the first $FIXED_SKIP s: the $FIXED_CONNS
#            TLS handshakes at the start queue the first requests for tens of ms, which would
#            otherwise be the p99 of a short run (h1new measures connection set-up); the
#            note column gives the p99 over all requests.
# Before benchmarking, every JWT-checking row must accept the good token (200 "ok" over
# h1 and h2) and reject missing / bad-signature / expired / alg=none / alg-confusion /
# wrong-aud / garbage tokens with 401 or 403; otherwise the row is marked INVALID and skipped.
#
# Usage: bash peers.sh            (env knobs below; e.g. DURATION=5 PEERS="backend ours" ...)
# Needs: haproxy nginx-light wrk nghttp2-client caddy curl (apt, auto-installed if missing),
#        PyJWT+cryptography (apt python3-jwt python3-cryptography, else pip), oha (cargo install
#        oha --locked; else wrk fallback for h1new, and no fixed mode).
# Raw outputs: $BENCH_DIR/out/, table: $BENCH_DIR/results.tsv. Exit 1 if any row is INVALID.
# Note: 2 cores total — the load generator, the proxy and the backend all share them; the
# CPU% columns (100 = one core) show who used what during each measurement.
set -uo pipefail

BENCH_DIR=${BENCH_DIR:-/tmp/peers-bench}
DURATION=${DURATION:-10}          # seconds per measurement
WARMUP=${WARMUP:-1}               # seconds of discarded warm-up before each measurement
CONNS=${CONNS:-64}                # h1 / h1new concurrency
THREADS=${THREADS:-2}             # load-generator threads
H2_CONNS=${H2_CONNS:-16}
H2_STREAMS=${H2_STREAMS:-4}
PROXY_THREADS=${PROXY_THREADS:-2} # haproxy nbthread / nginx worker_processes
BACKEND_WORKERS=${BACKEND_WORKERS:-1}
PEERS=${PEERS:-"backend haproxy-es256 haproxy-hs256 haproxy-tls nginx caddy ours"}
MODES=${MODES:-"h1 h1new h2"}
FIXED_RATE=${FIXED_RATE:-2000}    # fixed mode: offered requests/s
FIXED_CONNS=${FIXED_CONNS:-64}
FIXED_SKIP=${FIXED_SKIP:-1}       # fixed mode: seconds of start-up left out of p50/p99
FIXED_PEERS=${FIXED_PEERS:-"backend haproxy-tls ours"}
JWT_ISS=${JWT_ISS:-peers-bench}
JWT_AUD=${JWT_AUD:-connect-gateway}

BACKEND_PORT=18080; BACKEND_H2C_PORT=18081
HAPROXY_ES256_PORT=18443; NGINX_PORT=18444; HAPROXY_HS256_PORT=18445
HAPROXY_TLS_PORT=18446; CADDY_PORT=18447; OURS_PORT=${OURS_PORT:-18448}

W=$BENCH_DIR
PIDFILE="${BENCH_DIR%/}.pids"     # outside $W so a crashed run can be cleaned up next time
export PEERS_BENCH_DIR="$W"       # marker inherited by every process we start
ulimit -n 65535 2>/dev/null || ulimit -n "$(ulimit -Hn)"

log() { printf '[peers] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# ---------------------------------------------------------------- process bookkeeping
PIDS=()
track() { PIDS+=("$1"); echo "$1" >>"$PIDFILE"; }
ours_pid() { # is PID one of ours from a previous run of this script (same BENCH_DIR)?
  local p=$1
  [[ -d /proc/$p ]] || return 1
  tr '\0' ' ' </proc/"$p"/cmdline 2>/dev/null | grep -qF "$W" && return 0
  tr '\0' '\n' </proc/"$p"/environ 2>/dev/null | grep -qxF "PEERS_BENCH_DIR=$W"
}
kill_list() { # TERM, wait up to 5 s, then KILL; only the given PIDs
  local p i
  for p in "$@"; do kill -TERM "$p" 2>/dev/null; done
  for i in $(seq 50); do
    local alive=0
    for p in "$@"; do kill -0 "$p" 2>/dev/null && alive=1; done
    ((alive)) || return 0
    sleep 0.1
  done
  for p in "$@"; do kill -KILL "$p" 2>/dev/null; done
}
cleanup() {
  trap - EXIT INT TERM
  local all=() p c
  [[ -n ${GEN_PID:-} ]] && all+=("$GEN_PID")
  for p in "${PIDS[@]}"; do
    all+=("$p")
    for c in $(ps -o pid= --ppid "$p" 2>/dev/null); do all+=("$c"); done  # nginx workers
  done
  ((${#all[@]})) && kill_list "${all[@]}"
  rm -f "$PIDFILE"
}
trap cleanup EXIT
trap 'log interrupted; exit 130' INT TERM

stale_cleanup() {
  [[ -f $PIDFILE ]] || return 0
  local stale=() p
  while read -r p; do [[ $p =~ ^[0-9]+$ ]] && ours_pid "$p" && stale+=("$p"); done <"$PIDFILE"
  if ((${#stale[@]})); then log "killing stale processes of a previous run: ${stale[*]}"; kill_list "${stale[@]}"; fi
  rm -f "$PIDFILE"
}

port_busy() { [[ -n $(ss -Hltn "( sport = :$1 )" 2>/dev/null) ]]; }
wait_port() { # port pid name logfile
  local i
  for i in $(seq 150); do
    kill -0 "$2" 2>/dev/null || { log "$3 exited during start-up; log:"; tail -n 20 "$4" >&2; return 1; }
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  log "$3 did not listen on :$1"; tail -n 20 "$4" >&2; return 1
}

# ---------------------------------------------------------------- tools
ensure_tools() {
  local missing=()
  command -v haproxy >/dev/null || missing+=(haproxy)
  command -v nginx   >/dev/null || missing+=(nginx-light)
  command -v wrk     >/dev/null || missing+=(wrk)
  command -v h2load  >/dev/null || missing+=(nghttp2-client)
  command -v curl    >/dev/null || missing+=(curl)
  command -v openssl >/dev/null || missing+=(openssl)
  if [[ " $PEERS " == *" caddy "* ]] && ! command -v caddy >/dev/null; then missing+=(caddy); fi
  python3 -c 'import jwt, cryptography' 2>/dev/null || missing+=(python3-jwt python3-cryptography)
  if ((${#missing[@]})); then
    log "apt-get install ${missing[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
      || die "could not install ${missing[*]}"
  fi
  python3 -c 'import jwt, cryptography' 2>/dev/null || {
    log "pip install PyJWT cryptography"; python3 -m pip install -q PyJWT cryptography || die "pip install failed"; }
  OHA=${OHA:-$(command -v oha || echo "$HOME/.cargo/bin/oha")}
  if [[ ! -x $OHA ]]; then
    [[ " $MODES " == *" h1new "* ]] && log "oha not found: 'cargo install oha --locked' (~5 min); h1new falls back to wrk + 'Connection: close'"
    OHA=""
  fi
}

# ---------------------------------------------------------------- keys, cert, tokens
make_crypto() {
  mkdir -p "$W/tls" "$W/jwt"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -noenc \
    -keyout "$W/tls/server.key" -out "$W/tls/server.crt" -days 3650 -subj /CN=localhost \
    -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" 2>/dev/null || die "openssl req failed"
  cat "$W/tls/server.crt" "$W/tls/server.key" >"$W/tls/server.pem"        # haproxy bundle
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$W/jwt/es256.key" 2>/dev/null
  openssl pkey -in "$W/jwt/es256.key" -pubout -out "$W/jwt/es256.pub.pem"
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$W/jwt/es256-attacker.key" 2>/dev/null
  openssl rand -hex 32 | tr -d '\n' >"$W/jwt/hs256.secret"                 # 64 ASCII chars
  HS256_SECRET=$(cat "$W/jwt/hs256.secret")
  python3 - "$W/jwt" "$JWT_ISS" "$JWT_AUD" <<'PY' || die "token minting failed"
import base64, hashlib, hmac, json, sys, time
import jwt
from jwt.algorithms import ECAlgorithm
d, iss, aud = sys.argv[1:4]
rd = lambda n: open(f"{d}/{n}", "rb").read()
es_key, es_pub, bad_key = rd("es256.key"), rd("es256.pub.pem"), rd("es256-attacker.key")
secret = rd("hs256.secret").decode()
now = int(time.time())
claims = lambda **kw: {"iss": iss, "aud": aud, "sub": "bench-client", "iat": now, "exp": now + 10 * 365 * 86400, **kw}
b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()
def raw(header, payload, sig=b""):
    h = b64(json.dumps(header, separators=(",", ":")).encode()); p = b64(json.dumps(payload, separators=(",", ":")).encode())
    return f"{h}.{p}.{b64(sig)}" if sig else f"{h}.{p}."
def hs(header, payload, key):
    h = b64(json.dumps(header, separators=(",", ":")).encode()); p = b64(json.dumps(payload, separators=(",", ":")).encode())
    return f"{h}.{p}.{b64(hmac.new(key, f'{h}.{p}'.encode(), hashlib.sha256).digest())}"
t = {
  "good-es256":     jwt.encode(claims(), es_key, algorithm="ES256"),
  "expired-es256":  jwt.encode(claims(iat=now - 7200, exp=now - 60), es_key, algorithm="ES256"),
  "badsig-es256":   jwt.encode(claims(), bad_key, algorithm="ES256"),
  "wrongaud-es256": jwt.encode(claims(aud="someone-else"), es_key, algorithm="ES256"),
  "noexp-es256":    jwt.encode({k: v for k, v in claims().items() if k != "exp"}, es_key, algorithm="ES256"),
  "none-alg":       raw({"alg": "none", "typ": "JWT"}, claims()),
  "confused-hs256": hs({"alg": "HS256", "typ": "JWT"}, claims(), es_pub),   # HMAC keyed with the public PEM
  "garbage":        "abc.def.ghi",
  "good-hs256":     jwt.encode(claims(), secret, algorithm="HS256"),
  "expired-hs256":  jwt.encode(claims(iat=now - 7200, exp=now - 60), secret, algorithm="HS256"),
  "badsig-hs256":   jwt.encode(claims(), "x" * 64, algorithm="HS256"),
  "wrongaud-hs256": jwt.encode(claims(aud="someone-else"), secret, algorithm="HS256"),
}
for k, v in t.items():
    open(f"{d}/{k}.jwt", "w").write(v)
jwk = json.loads(ECAlgorithm.to_jwk(ECAlgorithm(ECAlgorithm.SHA256).prepare_key(es_pub)))
jwk.update(kid="bench-es256", alg="ES256", use="sig")
json.dump({"keys": [jwk]}, open(f"{d}/es256.jwks.json", "w"))
PY
  # exported for OUR GATEWAY's start command
  export BENCH_TLS_CERT="$W/tls/server.crt" BENCH_TLS_KEY="$W/tls/server.key" BENCH_TLS_PEM="$W/tls/server.pem"
  export BENCH_ES256_PUB="$W/jwt/es256.pub.pem" BENCH_ES256_JWKS="$W/jwt/es256.jwks.json"
  export BENCH_HS256_SECRET_FILE="$W/jwt/hs256.secret" BENCH_HS256_SECRET="$HS256_SECRET"
  export BENCH_BACKEND_ADDR="127.0.0.1:$BACKEND_PORT" BENCH_JWT_ISS="$JWT_ISS" BENCH_JWT_AUD="$JWT_AUD"
}
tok() { cat "$W/jwt/$1.jwt"; }

# ---------------------------------------------------------------- servers
nginx_common_http() { # $1 = prefix dir
  cat <<EOF
    access_log off;
    keepalive_requests 100000000;
    keepalive_timeout 75s;
    client_body_temp_path $1/tmp/body;
    proxy_temp_path $1/tmp/proxy;
    fastcgi_temp_path $1/tmp/fastcgi;
    uwsgi_temp_path $1/tmp/uwsgi;
    scgi_temp_path $1/tmp/scgi;
EOF
}

start_backend() {
  local d="$W/backend"; mkdir -p "$d/tmp"
  cat >"$d/nginx.conf" <<EOF
worker_processes $BACKEND_WORKERS;
pid $d/nginx.pid;
error_log $d/error.log warn;
events { worker_connections 16384; }
http {
$(nginx_common_http "$d")
    server {
        listen 127.0.0.1:$BACKEND_PORT;
        listen 127.0.0.1:$BACKEND_H2C_PORT http2;   # h2c prior knowledge (for h2load)
        location / { default_type text/plain; return 200 "ok"; }
    }
}
EOF
  nginx -p "$d" -c "$d/nginx.conf" -e "$d/error.log" -g 'daemon off;' >"$d/stdout.log" 2>&1 &
  BACKEND_PID=$!; track $BACKEND_PID
  wait_port $BACKEND_PORT $BACKEND_PID backend "$d/error.log" || die "backend failed"
}

start_haproxy() {
  local d="$W/haproxy"; mkdir -p "$d"
  local deny='http-request return status 401 content-type text/plain hdr WWW-Authenticate Bearer string'
  jwt_rules() { # $1 alg, $2 key (file path or HMAC secret)
    cat <<EOF
    http-request set-var(txn.bearer) http_auth_bearer
    $deny "missing bearer token" unless { var(txn.bearer) -m found }
    http-request set-var(txn.alg) var(txn.bearer),jwt_header_query('\$.alg')
    $deny "bad alg" unless { var(txn.alg) -m str $1 }
    $deny "bad signature" unless { var(txn.bearer),jwt_verify("$1","$2") -m int 1 }
    http-request set-var(txn.exp) var(txn.bearer),jwt_payload_query('\$.exp','int')
    http-request set-var(txn.now) date()
    $deny "expired or no exp" unless { var(txn.exp),sub(txn.now) -m int gt 0 }
    $deny "bad aud" unless { var(txn.bearer),jwt_payload_query('\$.aud') -m str $JWT_AUD }
    $deny "bad iss" unless { var(txn.bearer),jwt_payload_query('\$.iss') -m str $JWT_ISS }
EOF
  }
  cat >"$d/haproxy.cfg" <<EOF
global
    nbthread $PROXY_THREADS
    maxconn 8000
    pidfile $d/haproxy.pid
    stats socket $d/admin.sock mode 600 level admin
    ssl-default-bind-options ssl-min-ver TLSv1.2

defaults
    mode http
    option http-keep-alive
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    timeout http-keep-alive 75s

backend be_origin
    server origin 127.0.0.1:$BACKEND_PORT

frontend fe_jwt_es256
    bind 127.0.0.1:$HAPROXY_ES256_PORT ssl crt $W/tls/server.pem alpn h2,http/1.1
$(jwt_rules ES256 "$W/jwt/es256.pub.pem")
    default_backend be_origin

frontend fe_jwt_hs256
    bind 127.0.0.1:$HAPROXY_HS256_PORT ssl crt $W/tls/server.pem alpn h2,http/1.1
$(jwt_rules HS256 "$HS256_SECRET")
    default_backend be_origin

frontend fe_tls_only
    bind 127.0.0.1:$HAPROXY_TLS_PORT ssl crt $W/tls/server.pem alpn h2,http/1.1
    default_backend be_origin
EOF
  haproxy -c -q -f "$d/haproxy.cfg" >"$d/check.log" 2>&1 || { cat "$d/check.log" >&2; die "haproxy config invalid"; }
  haproxy -f "$d/haproxy.cfg" -db >"$d/haproxy.log" 2>&1 &
  HAPROXY_PID=$!; track $HAPROXY_PID
  wait_port $HAPROXY_ES256_PORT $HAPROXY_PID haproxy "$d/haproxy.log" || die "haproxy failed"
}

start_nginx_proxy() {
  local d="$W/nginx-proxy"; mkdir -p "$d/tmp"
  cat >"$d/nginx.conf" <<EOF
worker_processes $PROXY_THREADS;
pid $d/nginx.pid;
error_log $d/error.log warn;
events { worker_connections 16384; }
http {
$(nginx_common_http "$d")
    upstream origin { server 127.0.0.1:$BACKEND_PORT; keepalive 128; keepalive_requests 100000000; }
    server {
        listen 127.0.0.1:$NGINX_PORT ssl http2;
        ssl_certificate     $W/tls/server.crt;
        ssl_certificate_key $W/tls/server.key;
        ssl_protocols TLSv1.2 TLSv1.3;
        location / {
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }
    }
}
EOF
  nginx -p "$d" -c "$d/nginx.conf" -e "$d/error.log" -g 'daemon off;' >"$d/stdout.log" 2>&1 &
  NGINX_PID=$!; track $NGINX_PID
  wait_port $NGINX_PORT $NGINX_PID nginx "$d/error.log" || die "nginx proxy failed"
}

start_caddy() {
  local d="$W/caddy"; mkdir -p "$d/data" "$d/config"
  cat >"$d/Caddyfile" <<EOF
{
    admin off
    auto_https off
    default_sni localhost
    storage file_system $d/data
}
https://127.0.0.1:$CADDY_PORT, https://localhost:$CADDY_PORT {
    bind 127.0.0.1
    tls $W/tls/server.crt $W/tls/server.key
    reverse_proxy 127.0.0.1:$BACKEND_PORT {
        transport http {
            keepalive_idle_conns 256
            keepalive_idle_conns_per_host 256
        }
    }
}
EOF
  HOME="$d" XDG_DATA_HOME="$d/data" XDG_CONFIG_HOME="$d/config" \
    caddy run --config "$d/Caddyfile" --adapter caddyfile >"$d/caddy.log" 2>&1 &
  CADDY_PID=$!; track $CADDY_PID
  wait_port $CADDY_PORT $CADDY_PID caddy "$d/caddy.log" || die "caddy failed"
}

###############################################################################
# >>> OUR GATEWAY (slot) <<<
# Add our gateway as the row "ours" by setting, in the environment or right here:
#   OURS_CMD   command that runs the gateway in the FOREGROUND (it is exec'd, so the PID we
#              track and later SIGTERM is the gateway itself; it must not daemonize).
#              It may use these exported variables:
#                OURS_LISTEN=127.0.0.1:$OURS_PORT          BENCH_BACKEND_ADDR=127.0.0.1:18080
#                BENCH_TLS_CERT / BENCH_TLS_KEY (PKCS#8) / BENCH_TLS_PEM (cert+key bundle)
#                                                          (EC P-256, SAN localhost,127.0.0.1)
#                BENCH_ES256_PUB (SPKI PEM)  BENCH_ES256_JWKS (JWKS, kid=bench-es256)
#                BENCH_HS256_SECRET_FILE / BENCH_HS256_SECRET
#                BENCH_JWT_ISS / BENCH_JWT_AUD             (claims the tokens carry)
#   OURS_URL   URL to load (default https://127.0.0.1:$OURS_PORT/)
#   OURS_ALG   ES256 (default) or HS256: which good token is sent
#   OURS_H2    1 (default) if it negotiates h2 via ALPN; 0 to skip the h2 mode
#   OURS_CHECK_AUD  1 (default): also require rejection of a wrong-aud token
#   OURS_TOKEN_CMD  optional: a command run once the gateway is up; what it prints is the
#              good token sent to "ours" (for a gateway that mints its own tokens). Then the
#              bench's own ES256/HS256 tokens count as bad tokens for "ours".
#   OURS_HEADERS  optional: extra request headers for "ours", one "Name: value" a line
#              (e.g. a Host naming a sandbox route); sent by curl, wrk, oha and h2load alike.
#   OURS_HEADERS_FILE  optional: a file of more such lines, read after OURS_TOKEN_CMD ran
#              (so the token command can write a Host that names the route it created).
# Example:
#   OURS_CMD='target/release/sandgate --listen $OURS_LISTEN --backend $BENCH_BACKEND_ADDR
#             --cert $BENCH_TLS_CERT --key $BENCH_TLS_KEY --jwt-es256-pub $BENCH_ES256_PUB' \
#   bash peers.sh
OURS_CMD=${OURS_CMD:-}
OURS_URL=${OURS_URL:-https://127.0.0.1:$OURS_PORT/}
OURS_ALG=${OURS_ALG:-ES256}
OURS_H2=${OURS_H2:-1}
OURS_CHECK_AUD=${OURS_CHECK_AUD:-1}
start_ours() {
  local d="$W/ours"; mkdir -p "$d"
  export OURS_LISTEN="127.0.0.1:$OURS_PORT"
  bash -c "exec $OURS_CMD" >"$d/ours.log" 2>&1 &
  OURS_PID=$!; track $OURS_PID
  local port=${OURS_URL##*:}; port=${port%%/*}
  wait_port "$port" $OURS_PID ours "$d/ours.log" || die "our gateway failed to start (see $d/ours.log)"
  if [[ -n ${OURS_TOKEN_CMD:-} ]]; then
    local t; t=$(bash -c "$OURS_TOKEN_CMD" 2>"$d/token.err" | tr -d '[:space:]') || die "OURS_TOKEN_CMD failed (see $d/token.err)"
    [[ -n $t ]] || die "OURS_TOKEN_CMD printed no token (see $d/token.err)"
    printf '%s' "$t" >"$W/jwt/good-ours.jwt"
  fi
  OURS_HARGS=()
  local hdrs=${OURS_HEADERS:-}
  [[ -n ${OURS_HEADERS_FILE:-} && -f $OURS_HEADERS_FILE ]] && hdrs+=$'\n'$(cat "$OURS_HEADERS_FILE")
  while IFS= read -r line; do [[ -n $line ]] && OURS_HARGS+=(-H "$line"); done <<<"$hdrs"
}
OURS_HARGS=()
xh() { [[ ${CUR_PEER:-} == ours ]] && ((${#OURS_HARGS[@]})) && printf '%s\0' "${OURS_HARGS[@]}"; }
# >>> end of OUR GATEWAY slot <<<
###############################################################################

# ---------------------------------------------------------------- peer table
# peer -> url / h2 url / token name / pid var / JWT kind (es256|hs256|none)
peer_info() {
  case $1 in
    backend)       echo "http://127.0.0.1:$BACKEND_PORT/ http://127.0.0.1:$BACKEND_H2C_PORT/ good-es256 BACKEND_PID none" ;;
    haproxy-es256) echo "https://127.0.0.1:$HAPROXY_ES256_PORT/ same good-es256 HAPROXY_PID es256" ;;
    haproxy-hs256) echo "https://127.0.0.1:$HAPROXY_HS256_PORT/ same good-hs256 HAPROXY_PID hs256" ;;
    haproxy-tls)   echo "https://127.0.0.1:$HAPROXY_TLS_PORT/ same good-es256 HAPROXY_PID none" ;;
    nginx)         echo "https://127.0.0.1:$NGINX_PORT/ same good-es256 NGINX_PID none" ;;
    caddy)         echo "https://127.0.0.1:$CADDY_PORT/ same good-es256 CADDY_PID none" ;;
    ours)          local a=${OURS_ALG,,}; local h2=same; [[ $OURS_H2 == 1 ]] || h2=none
                   if [[ -n ${OURS_TOKEN_CMD:-} ]]; then echo "$OURS_URL $h2 good-ours OURS_PID own"
                   else echo "$OURS_URL $h2 good-$a OURS_PID $a"; fi ;;
    *) die "unknown peer $1" ;;
  esac
}

# ---------------------------------------------------------------- correctness gate
http_code() { # url tokenfile-name|"" [curl args...]
  local url=$1 t=$2; shift 2
  local hdr=(); [[ -n $t ]] && hdr=(-H "Authorization: Bearer $(tok "$t")")
  local x=(); mapfile -d '' x < <(xh); hdr+=("${x[@]}")
  curl -sk -o "$W/body.out" -w '%{http_code}' --max-time 5 "${hdr[@]}" "$@" "$url" 2>/dev/null || true
}
verify_peer() { # peer -> 0 if it behaves; prints a line per check
  local peer=$1 url h2url good pidvar kind ok=0 c
  CUR_PEER=$peer
  local x=(); mapfile -d '' x < <(xh)
  read -r url h2url good pidvar kind <<<"$(peer_info "$peer")"
  c=$(http_code "$url" "$good" --http1.1)
  if [[ $c == 200 && $(cat "$W/body.out") == ok ]]; then log "  $peer good token h1 -> $c ok"; else log "  $peer good token h1 -> $c FAIL"; ok=1; fi
  if [[ $h2url != none ]]; then
    local u=$url; [[ $h2url != same ]] && u=$h2url
    local h2args=(--http2); [[ $u == http:* ]] && h2args=(--http2-prior-knowledge)
    c=$(curl -sk -o /dev/null -w '%{http_code} %{http_version}' --max-time 5 "${h2args[@]}" \
          -H "Authorization: Bearer $(tok "$good")" "${x[@]}" "$u" 2>/dev/null || true)
    if [[ $c == "200 2" ]]; then log "  $peer good token h2 -> $c"; else log "  $peer good token h2 -> '$c' FAIL"; ok=1; fi
  fi
  [[ $kind == none ]] && return $ok
  local bad=("" "expired-$kind" "badsig-$kind" "none-alg" "garbage")
  [[ $kind == es256 ]] && bad+=("confused-hs256" "noexp-es256" "good-hs256")
  [[ $kind == hs256 ]] && bad+=("good-es256")
  [[ $kind == own ]] && bad=("" "expired-es256" "badsig-es256" "none-alg" "garbage" "good-es256" "good-hs256" "confused-hs256")
  [[ $peer != ours || $OURS_CHECK_AUD == 1 ]] && bad+=("wrongaud-$kind")
  local b
  for b in "${bad[@]}"; do
    c=$(http_code "$url" "$b" --http1.1)
    if [[ $c == 401 || $c == 403 ]]; then log "  $peer rejects ${b:-no-token} -> $c"
    else log "  $peer ACCEPTS/ERR ${b:-no-token} -> $c FAIL"; ok=1; fi
  done
  return $ok
}

# ---------------------------------------------------------------- measurement
ticks_tree() { # utime+stime (clock ticks) of pid + its direct children (all threads)
  local t=0 p s f
  for p in "$1" $(ps -o pid= --ppid "$1" 2>/dev/null); do
    s=$(cat /proc/"$p"/stat 2>/dev/null) || continue
    read -ra f <<<"${s##*) }"            # f[0] = field 3 (state); utime = field 14
    t=$((t + f[11] + f[12]))
  done
  echo $t
}
ticks_children() { local s f; s=$(cat /proc/$$/stat); read -ra f <<<"${s##*) }"; echo $((f[13] + f[14])); }
now_s() { date +%s.%N; }

GEN_PID=""
gen() { # outfile errfile cmd... — run the load generator as a tracked child (killable by the trap)
  local out=$1 err=$2; shift 2
  if [[ $err == - ]]; then "$@" >"$out" 2>&1 & else "$@" >"$out" 2>"$err" & fi
  GEN_PID=$!; echo "$GEN_PID" >>"$PIDFILE"
  wait "$GEN_PID"; local rc=$?; GEN_PID=""; return $rc
}
run_tool() { # mode url tokname dur outfile [warmup]
  local mode=$1 url=$2 t=$3 dur=$4 out=$5 auth
  auth="Authorization: Bearer $(tok "$t")"
  local x=(); mapfile -d '' x < <(xh)
  case $mode in
    h1)    gen "$out" - wrk -t"$THREADS" -c"$CONNS" -d"${dur}s" --latency -H "$auth" "${x[@]}" "$url" ;;
    h1new) if [[ -n $OHA ]]; then
             gen "$out" "$out.err" "$OHA" -z "${dur}s" -c "$CONNS" --disable-keepalive --insecure --no-tui \
               --output-format json -H "$auth" "${x[@]}" "$url"
           else
             gen "$out" - wrk -t"$THREADS" -c"$CONNS" -d"${dur}s" --latency -H "$auth" -H "Connection: close" "${x[@]}" "$url"
           fi ;;
    h2)    gen "$out" - h2load -c"$H2_CONNS" -m"$H2_STREAMS" -t"$THREADS" -D"$dur" --warm-up-time="${6:-0}" \
             -H "authorization: Bearer $(tok "$t")" "${x[@]}" --log-file="$out.reqlog" "$url" ;;
    fixed) gen "$out" "$out.err" "$OHA" -z "${dur}s" -c "$FIXED_CONNS" -q "$FIXED_RATE" --latency-correction \
             --insecure --no-tui --output-format csv -H "$auth" "${x[@]}" "$url" ;;
  esac
}

parse() { # mode outfile -> "rps p50ms p99ms bad" (fixed: and a note)
  FIXED_SKIP=$FIXED_SKIP FIXED_RATE=$FIXED_RATE FIXED_CONNS=$FIXED_CONNS DURATION=$DURATION python3 - "$1" "$2" <<'PY'
import json, os, re, sys
mode, path = sys.argv[1], sys.argv[2]
txt = open(path, errors="replace").read()
def ms(v, u): return float(v) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[u]
def wrk():
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", txt).group(1))
    pct = {int(p): ms(v, u) for p, v, u in re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s|m)\s*$", txt, re.M)}
    bad = sum(int(x) for x in re.findall(r"Non-2xx or 3xx responses:\s+(\d+)", txt))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", txt)
    if m: bad += sum(map(int, m.groups()))
    return rps, pct.get(50), pct.get(99), bad
def oha():
    j = json.loads(txt)
    s, lp = j["summary"], j["latencyPercentiles"]
    ok = sum(v for k, v in j.get("statusCodeDistribution", {}).items() if k.startswith("2"))
    bad = sum(v for k, v in j.get("statusCodeDistribution", {}).items() if not k.startswith("2"))
    bad += sum(v for k, v in j.get("errorDistribution", {}).items() if "deadline" not in k)
    return ok / s["total"], lp["p50"] * 1e3, lp["p99"] * 1e3, bad
def h2load():
    rps = float(re.search(r"finished in [^,]+, ([\d.]+) req/s", txt).group(1))
    m = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored, (\d+) timeout", txt)
    st = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", txt)
    bad = int(m.group(5)) + int(m.group(6)) + int(m.group(7)) + int(st.group(3)) + int(st.group(4))
    lat = sorted(int(l.split("\t")[2]) for l in open(path + ".reqlog") if l.count("\t") >= 2)
    q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] / 1e3 if lat else float("nan")
    return rps, q(0.50), q(0.99), bad
def oha_csv():
    # request-start (s from the start; the due time under --latency-correction), ...,
    # request-duration (s), bytes, status. Failed requests are not rows: those missing from
    # the offered rate x duration, beyond the ones in flight at the deadline, count as bad.
    rows = [l.split(",") for l in txt.splitlines()[1:] if l.count(",") >= 6]
    start = [float(r[0]) for r in rows]
    dur = [float(r[4]) * 1e3 for r in rows]
    ok = [r for r in rows if r[6].strip().startswith("2")]
    offered = float(os.environ["FIXED_RATE"]) * float(os.environ["DURATION"])
    missing = offered - len(rows) - int(os.environ["FIXED_CONNS"])
    bad = len(rows) - len(ok) + max(0, round(missing))
    skip = float(os.environ.get("FIXED_SKIP", "1"))
    steady = sorted(d for s, d in zip(start, dur) if s >= skip)
    q = lambda v, p: v[min(len(v) - 1, int(p * len(v)))] if v else None
    span = max(start) - min(start) if len(start) > 1 else float("nan")
    global note
    note = f"p99 all requests {q(sorted(dur), 0.99):.2f} ms; {len(steady)} after {skip:g} s"
    return len(ok) / span, q(steady, 0.50), q(steady, 0.99), bad
note = ""
try:
    if mode == "fixed":
        r = oha_csv
    else:
        r = {"h1": wrk, "h2": h2load}.get(mode) or (oha if txt.lstrip().startswith("{") else wrk)
    rps, p50, p99, bad = r()
    f = lambda x: "-" if x is None else f"{x:.2f}"
    print(f"{rps:.0f} {f(p50)} {f(p99)} {bad}" + (f"\t{note}" if note else ""))
except Exception as e:
    print(f"ERR - - parse:{type(e).__name__}")
PY
}

RESULTS="$W/results.tsv"
bench_one() { # peer mode
  local peer=$1 mode=$2 url h2url good pidvar kind u out
  CUR_PEER=$peer
  read -r url h2url good pidvar kind <<<"$(peer_info "$peer")"
  u=$url
  if [[ $mode == h2 ]]; then
    [[ $h2url == none ]] && return 0
    [[ $h2url != same ]] && u=$h2url
  fi
  out="$W/out/$peer.$mode.txt"
  local ppid=${!pidvar} bpid=$BACKEND_PID
  if [[ $mode != h2 ]] && ((WARMUP > 0)); then run_tool "$mode" "$u" "$good" "$WARMUP" "$out.warmup"; fi
  local p0 b0 g0 t0 p1 b1 g1 t1
  local note="" sampler=""
  if [[ $mode == h1new && $peer == haproxy-* ]]; then   # does the client resume TLS sessions?
    ( sleep $(((DURATION + 1) / 2)); haproxy_ssl_sample ) >"$out.tls" 2>&1 &
    sampler=$!
  fi
  p0=$(ticks_tree "$ppid"); b0=$(ticks_tree "$bpid"); g0=$(ticks_children); t0=$(now_s)
  run_tool "$mode" "$u" "$good" "$DURATION" "$out" "$WARMUP"
  t1=$(now_s); p1=$(ticks_tree "$ppid"); b1=$(ticks_tree "$bpid"); g1=$(ticks_children)
  if [[ -n $sampler ]]; then wait "$sampler"; note=$(cat "$out.tls"); fi
  local res cpu
  res=$(parse "$mode" "$out")
  if [[ $res == *$'\t'* ]]; then note="${res#*$'\t'}"; res="${res%%$'\t'*}"; fi
  cpu=$(awk -v hz="$(getconf CLK_TCK)" -v t0="$t0" -v t1="$t1" \
            -v g=$((g1 - g0)) -v p=$((p1 - p0)) -v b=$((b1 - b0)) -v same="$([[ $peer == backend ]] && echo 1 || echo 0)" \
            'BEGIN{w=t1-t0; if(same) printf "%d/-/%d", g/hz/w*100, b/hz/w*100; else printf "%d/%d/%d", g/hz/w*100, p/hz/w*100, b/hz/w*100}')
  printf '%s\t%s\t%s\t%s\t%s\n' "$peer" "$mode" "$res" "$cpu" "$note" | tee -a "$RESULTS" | sed 's/^/[peers]   /' >&2
}

haproxy_ssl_sample() { # HAProxy's last-second TLS rates from the stats socket -> "tls:resumed=N%"
  python3 - "$W/haproxy/admin.sock" <<'PY' 2>/dev/null || echo "tls:?"
import socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.sendall(b"show info\n")
d = b""
while (c := s.recv(65536)): d += c
kv = dict(l.split(": ", 1) for l in d.decode().splitlines() if ": " in l)
print(f"tls:resumed={kv['SslFrontendSessionReuse_pct']}%(SslRate={kv['SslRate']},fullHs/s={kv['SslFrontendKeyRate']})")
PY
}

# ---------------------------------------------------------------- main
main() {
  stale_cleanup
  ensure_tools
  rm -rf "$W"; mkdir -p "$W/out"; : >"$RESULTS"
  local p port
  for port in $BACKEND_PORT $BACKEND_H2C_PORT $HAPROXY_ES256_PORT $NGINX_PORT $HAPROXY_HS256_PORT $HAPROXY_TLS_PORT $CADDY_PORT; do
    port_busy "$port" && die "port $port busy: $(ss -Hltnp "( sport = :$port )")"
  done
  make_crypto
  log "versions: $(haproxy -v | head -1 | cut -d' ' -f1-3); $(nginx -v 2>&1 | cut -d' ' -f3); caddy $(caddy version 2>/dev/null | cut -d' ' -f1); $(wrk -v 2>&1 | head -1 | cut -d' ' -f1-2); $(h2load --version); ${OHA:+$($OHA --version)}; $(openssl version | cut -d' ' -f1-2)"

  start_backend
  local want=" $PEERS "
  [[ $want == *" haproxy-"* ]] && start_haproxy
  [[ $want == *" nginx "* ]] && start_nginx_proxy
  [[ $want == *" caddy "* ]] && start_caddy
  local peers=()
  for p in $PEERS; do
    if [[ $p == ours && -z $OURS_CMD ]]; then log "ours: OURS_CMD not set — row skipped (see OUR GATEWAY slot)"; continue; fi
    peers+=("$p")
  done
  [[ " ${peers[*]} " == *" ours "* ]] && start_ours
  # nginx workers are children of tracked masters: record them too for stale cleanup
  for p in "${PIDS[@]}"; do ps -o pid= --ppid "$p" 2>/dev/null | tr -d ' ' >>"$PIDFILE"; done

  log "correctness gate:"
  local valid=() invalid=()
  for p in "${peers[@]}"; do
    if verify_peer "$p"; then valid+=("$p"); else invalid+=("$p"); fi
  done

  log "measuring: ${DURATION}s each (+${WARMUP}s warm-up), h1/h1new c=$CONNS t=$THREADS, h2 c=$H2_CONNS m=$H2_STREAMS"
  local m
  for m in $MODES; do
    if [[ $m == fixed && -z $OHA ]]; then log "fixed: oha not found — mode skipped"; continue; fi
    for p in "${valid[@]}"; do
      [[ $m == fixed && " $FIXED_PEERS " != *" $p "* ]] && continue
      bench_one "$p" "$m"
    done
  done

  echo
  echo "== peers.sh results ($(date -u +%FT%TZ), $(nproc) cores, ${DURATION}s/run) =="
  printf '%-14s %-6s %9s %8s %8s %6s  %-13s %s\n' peer mode req/s p50_ms p99_ms bad "cpu%gen/px/be" note
  while IFS=$'\t' read -r p m res cpu note; do
    read -r rps p50 p99 bad <<<"$res"
    printf '%-14s %-6s %9s %8s %8s %6s  %-13s %s\n' "$p" "$m" "$rps" "$p50" "$p99" "$bad" "$cpu" "$note"
  done <"$RESULTS"
  for p in "${invalid[@]}"; do printf '%-14s %-6s %s\n' "$p" all "INVALID: failed the correctness gate (see log above)"; done
  local newtool="wrk -H 'Connection: close'"; [[ -n $OHA ]] && newtool="oha --disable-keepalive"
  echo "h1 = wrk keep-alive -t$THREADS -c$CONNS | h1new = $newtool -c$CONNS | h2 = h2load -t$THREADS -c$H2_CONNS -m$H2_STREAMS | fixed = oha -q$FIXED_RATE -c$FIXED_CONNS --latency-correction (p50/p99 after the first ${FIXED_SKIP}s)"
  echo "bad = non-2xx + socket errors | cpu% = share of one core used by load generator / proxy / backend (2 cores = 200)"
  ((${#invalid[@]} == 0))
}

main "$@"
