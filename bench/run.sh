#!/usr/bin/env bash
# bench/run.sh — the whole performance check in one command:
#
#   bash bench/run.sh                       (about 10 minutes with the defaults)
#   DURATION=3 SANDBOXES=2000 WEBSOCKETS=500 bash bench/run.sh     (a quick pass)
#
# 1. builds sandgate and the bench examples (release, --locked) and installs what is missing
#    (haproxy, nginx-light, wrk, nghttp2-client, caddy, curl, python3-jwt,
#    python3-cryptography from apt; oha with cargo install);
# 2. bench/peers.sh with sandgate as the "ours" row (bench/sandgate-row.sh): backend,
#    haproxy-es256, haproxy-tls, nginx and ours in modes h1, h1new, h2, then the fixed-rate
#    latency run (oha -q $FIXED_RATE --latency-correction) against backend, haproxy-tls, ours;
#    every JWT row must reject bad tokens before it is measured;
# 3. bench/scale.sh: token issuance (examples/control_bench), $SANDBOXES sandboxes
#    (examples/scale_sandboxes: RSS, h1 before and after), $WEBSOCKETS WebSockets
#    (examples/ws_scale: RSS per connection, echo RTT);
# 4. bench/report.py: a Markdown table of the results against the targets, and an SVG chart.
#
# Results: bench/results/<UTC date-time>/ (results.md, chart.svg, peers.tsv, scale.json, raw
# outputs); results.md and chart.svg are also copied to bench/results/latest.md and latest.svg.
# Exit status: 0 when every step ran (targets not met are reported, not failed), else 1.
#
# Knobs (environment):
#   DURATION (10) seconds per measurement; WARMUP (1)
#   SKIP_BUILD=1, SKIP_INSTALL=1, SKIP_PEERS=1, SKIP_SCALE=1 (all of bench/scale.sh),
#   SKIP_CONTROL=1, SKIP_ROUTES=1, SKIP_WS=1 (parts of it), SKIP_FIXED=1
#   PEERS ("backend haproxy-es256 haproxy-tls nginx ours"), MODES ("h1 h1new h2" + fixed)
#   FIXED_RATE (2000), FIXED_CONNS (64), FIXED_SKIP (1: seconds of connection set-up left out
#   of the fixed-rate percentiles)
#   SANDBOXES (100000), SCALE_CONCURRENCY (32), WEBSOCKETS (10000), WS_RATE (1000),
#   CONTROL_RUNS (5)
#   SANDGATE_CONF_GATEWAY, SANDGATE_CONF_EXTRA: extra gateway config for every run
#   CARGO_TARGET_DIR: where the release build goes (default target/)
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
cd "$repo"

export DURATION=${DURATION:-10} WARMUP=${WARMUP:-1}
export FIXED_RATE=${FIXED_RATE:-2000} FIXED_CONNS=${FIXED_CONNS:-64} FIXED_SKIP=${FIXED_SKIP:-1}
export SANDBOXES=${SANDBOXES:-100000} SCALE_CONCURRENCY=${SCALE_CONCURRENCY:-32}
export WEBSOCKETS=${WEBSOCKETS:-10000} WS_RATE=${WS_RATE:-1000} CONTROL_RUNS=${CONTROL_RUNS:-5}
PEERS=${PEERS:-"backend haproxy-es256 haproxy-tls nginx ours"}
MODES=${MODES:-"h1 h1new h2"}
[[ ${SKIP_FIXED:-0} == 1 || " $MODES " == *" fixed "* ]] || MODES="$MODES fixed"
export PEERS MODES
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$repo/target}

log() { printf '[run] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

stamp=$(date -u +%Y-%m-%dT%H%M%SZ)
out="$here/results/$stamp"
mkdir -p "$out"
log "results: ${out#"$repo"/}"
failed=0

# ---------------------------------------------------------------- 1. tools and build
if [[ ${SKIP_INSTALL:-0} != 1 ]]; then
  missing=()
  command -v haproxy >/dev/null || missing+=(haproxy)
  command -v nginx >/dev/null || missing+=(nginx-light)
  command -v wrk >/dev/null || missing+=(wrk)
  command -v h2load >/dev/null || missing+=(nghttp2-client)
  command -v caddy >/dev/null || missing+=(caddy)
  command -v curl >/dev/null || missing+=(curl)
  command -v openssl >/dev/null || missing+=(openssl)
  python3 -c 'import jwt, cryptography' 2>/dev/null || missing+=(python3-jwt python3-cryptography)
  if ((${#missing[@]})); then
    log "apt-get install ${missing[*]}"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; } \
      || die "could not install ${missing[*]}"
  fi
  if ! command -v oha >/dev/null && [[ ! -x $HOME/.cargo/bin/oha ]]; then
    log "cargo install oha --locked (a few minutes, once)"
    cargo install oha --locked >"$out/oha-install.log" 2>&1 || log "oha install failed: h1new falls back to wrk, no fixed-rate run"
  fi
fi
export PATH="$PATH:$HOME/.cargo/bin"

if [[ ${SKIP_BUILD:-0} != 1 ]]; then
  log "cargo build --release --locked (sandgate and the bench examples)"
  cargo build --release --locked --bin sandgate \
    --example scale_sandboxes --example ws_scale --example control_bench >"$out/build.log" 2>&1 \
    || { tail -n 30 "$out/build.log" >&2; die "build failed"; }
fi

# ---------------------------------------------------------------- machine and knobs
python3 - "$out/meta.json" <<PY
import json, os, platform, subprocess, sys
def sh(c):
    try: return subprocess.run(c, shell=True, capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception: return ""
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
knobs = " ".join(f"{k}={os.environ[k]}" for k in ("DURATION", "PEERS", "MODES", "FIXED_RATE", "SANDBOXES",
        "WEBSOCKETS", "WS_RATE", "SKIP_PEERS", "SKIP_SCALE", "SKIP_CONTROL", "SKIP_ROUTES", "SKIP_WS",
        "SANDGATE_CONF_GATEWAY") if os.environ.get(k))
json.dump({
  "date": "$stamp", "cpu": cpu, "cores": os.cpu_count(), "kernel": "Linux " + platform.release(),
  "commit": (sh("git rev-parse --short HEAD") or "?") + ("+dirty" if sh("git status --porcelain -- src Cargo.toml") else ""),
  "fixed_rate": os.environ["FIXED_RATE"], "fixed_skip": os.environ["FIXED_SKIP"], "scale_concurrency": os.environ["SCALE_CONCURRENCY"], "knobs": knobs,
}, open(sys.argv[1], "w"), indent=2)
PY

# ---------------------------------------------------------------- 2. side by side
if [[ ${SKIP_PEERS:-0} != 1 ]]; then
  log "peers: $PEERS | modes: $MODES | ${DURATION}s each"
  export BENCH_DIR; BENCH_DIR=$(mktemp -d /tmp/sandgate-peers.XXXXXX)
  SKIP_BUILD=1 bash "$here/sandgate-row.sh" "$here/peers.sh" 2>&1 | tee "$out/peers.log"
  rc=${PIPESTATUS[0]}
  ((rc == 0)) || { log "peers.sh exited $rc (an INVALID row, or a failure: see peers.log)"; failed=1; }
  cp "$BENCH_DIR/results.tsv" "$out/peers.tsv" 2>/dev/null || log "no peers results"
  mkdir -p "$out/peers-raw"
  find "$BENCH_DIR/out" -maxdepth 1 -type f ! -name '*.reqlog' -exec cp {} "$out/peers-raw/" \; 2>/dev/null
  cp "$BENCH_DIR/ours/ours.log" "$out/peers-raw/sandgate.log" 2>/dev/null
  grep -E '^(h1 =|bad =)' "$out/peers.log" | sed 's/^/    /' >"$out/peers-tools.txt" || true
  rm -rf "$BENCH_DIR"
fi

# ---------------------------------------------------------------- 3. scale
if [[ ${SKIP_SCALE:-0} != 1 ]]; then
  log "scale: control_bench, $SANDBOXES sandboxes, $WEBSOCKETS WebSockets"
  bash "$here/scale.sh" "$out/scale.json" 2>&1 | tee "$out/scale.log"
  ((PIPESTATUS[0] == 0)) || { log "scale.sh failed (see scale.log)"; failed=1; }
fi

# ---------------------------------------------------------------- 4. report
if [[ -s $out/peers-tools.txt ]]; then
  python3 - "$out/meta.json" "$out/peers-tools.txt" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
m["tools"] = [l.strip() for l in open(sys.argv[2]) if l.strip()]
json.dump(m, open(sys.argv[1], "w"), indent=2)
PY
fi
echo
python3 "$here/report.py" "$out" || die "report failed"
cp "$out/results.md" "$here/results/latest.md"
if [[ -f $out/chart.svg ]]; then
  cp "$out/chart.svg" "$here/results/latest.svg"
  sed -i 's/(chart.svg)/(latest.svg)/' "$here/results/latest.md"
fi
log "wrote ${out#"$repo"/}/results.md (and bench/results/latest.md)"
exit $failed
