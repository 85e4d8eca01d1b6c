#!/usr/bin/env bash
# Runs the side-by-side peers benchmark (HAProxy with jwt_verify, HAProxy TLS, nginx, Caddy and
# a direct backend) with sandgate as the "ours" row. bench/run.sh calls it; it also runs alone:
#
#   bash bench/sandgate-row.sh [path/to/peers.sh]      (default: bench/peers.sh; the env knobs
#                                                       of peers.sh apply: DURATION, PEERS,
#                                                       MODES, ...)
#
# sandgate runs from the release build on a fresh data dir, with the bench's certificate, and
# routes one sandbox to the bench backend. Its token is minted through its own API, and sent
# as `Authorization: Bearer`, the same way the peers receive theirs; the route is named by the
# X-Sandgate-Sandbox / X-Sandgate-Port headers on the base domain. The base domain is the
# bench's own address (127.0.0.1), because the load tools cannot resolve *.localhost names
# and an HTTP/2 `host` header that disagrees with `:authority` is refused, as it must be.
#
# Knobs: SKIP_BUILD=1 (bench/run.sh has built already); SANDGATE_CONF_GATEWAY: extra lines for
# the gateway's [gateway] table (e.g. 'workers = 2'); SANDGATE_CONF_EXTRA: extra tables.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
peers=${1:-${PEERS_SH:-$here/peers.sh}}
[ -f "$peers" ] || { echo "peers.sh not found at $peers (pass its path)" >&2; exit 1; }

[ "${SKIP_BUILD:-0}" = 1 ] || (cd "$repo" && cargo build --release --locked --bin sandgate)

state=$(mktemp -d)
trap 'rm -rf "$state"' EXIT
export SANDGATE_BIN="${CARGO_TARGET_DIR:-$repo/target}/release/sandgate"
export SANDGATE_BENCH_STATE="$state"
export SANDGATE_CONF_GATEWAY=${SANDGATE_CONF_GATEWAY:-} SANDGATE_CONF_EXTRA=${SANDGATE_CONF_EXTRA:-}
[ -x "$SANDGATE_BIN" ] || { echo "no sandgate binary at $SANDGATE_BIN" >&2; exit 1; }

# The gateway: a config written at start (peers.sh exports the listen address and the bench's
# certificate only then), pointing at the bench's certificate. Exec'd, so the PID peers.sh
# tracks and measures is the gateway itself.
cat >"$state/start.sh" <<'SH'
cat >"$SANDGATE_BENCH_STATE/sandgate.toml" <<CONF
[gateway]
listen = "$OURS_LISTEN"
base_domain = "127.0.0.1"
$SANDGATE_CONF_GATEWAY
[telemetry]
listen = "127.0.0.1:0"
log_level = "warn,rustls=error"
[tls]
dev_cert = false
cert_file = "$BENCH_TLS_CERT"
key_file = "$BENCH_TLS_KEY"
[store]
data_dir = "$SANDGATE_BENCH_STATE/data"
$SANDGATE_CONF_EXTRA
CONF
exec "$SANDGATE_BIN" serve --config "$SANDGATE_BENCH_STATE/sandgate.toml"
SH
export OURS_CMD="bash $state/start.sh"

# Once it is up: register the backend as a sandbox, mint a 1-hour token, name the route. (The
# listener is bound before the first start has written the admin key: wait for the key.)
export OURS_TOKEN_CMD='
  for _ in $(seq 300); do [ -s "$SANDGATE_BENCH_STATE/data/admin.key" ] && break; sleep 0.1; done
  key=$(cat "$SANDGATE_BENCH_STATE/data/admin.key")
  api() { curl -sk --fail-with-body -H "Authorization: Bearer $key" \
            -H "Content-Type: application/json" "$@"; }
  port=${BENCH_BACKEND_ADDR##*:}
  id=$(api -d "{\"upstream\":\"127.0.0.1\",\"ports\":[$port]}" "https://$OURS_LISTEN/v1/sandboxes" \
       | python3 -c "import json,sys; print(json.load(sys.stdin)[\"id\"])")
  printf "X-Sandgate-Sandbox: %s\nX-Sandgate-Port: %s\n" "$id" "$port" \
       >"$SANDGATE_BENCH_STATE/headers"
  api -d "{\"port\":$port,\"ttl_secs\":3600}" "https://$OURS_LISTEN/v1/sandboxes/$id/connect-tokens" \
       | python3 -c "import json,sys; print(json.load(sys.stdin)[\"token\"])"'
export OURS_HEADERS_FILE="$state/headers"
# Our tokens carry our own audience; the bench's wrong-aud token is one of its ES256 tokens,
# which sandgate already rejects as a foreign signature.
export OURS_CHECK_AUD=${OURS_CHECK_AUD:-0}

bash "$peers"
