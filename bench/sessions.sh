#!/usr/bin/env bash
# bench/sessions.sh — what the session features cost against the plain host doing the same work:
# image import, file transfer, snapshots, all through the real TLS API of a release gateway.
#
#   sudo bash bench/sessions.sh                         (as root; about 10 minutes with the defaults)
#   ROUNDS=1 SIZES=16 SNAP_SIZES="0 16" bash bench/sessions.sh      (a quick pass)
#
# One gateway from the release build, `[orchestrator] isolation = "namespaces"` (images and the
# files API need it), on its own data dir, loopback port and certificate made here; every
# measurement alternates with its peer inside one round (the gateway first in odd rounds, the
# peer first in even ones), so both see the same background load on a shared machine. Figures
# are medians over $ROUNDS rounds; ratios are the median of the per-round ratios. `sync` runs
# (untimed) before every timed operation, so that no earlier write-back lands on it; nothing
# timed syncs itself (neither does the gateway), so these are page-cache speeds.
#
# 1. image import: a docker-save archive (manifest.json, config.json, layer0/layer.tar; the layer
#    holds a static busybox with its applets as links and /opt/filler.bin of S MiB of random
#    bytes) for each S in $SIZES, `curl -T archive -X POST /v1/images?name=…` (streamed, 201
#    checked; the image deleted after, untimed). Peers, on the same file system as the data dir:
#    `cat archive >/dev/null` (read), `cp archive` (write), `tar -xf layer.tar` (the raw unpack),
#    and `cp archive; tar -xOf archive layer0/layer.tar | tar -x` (what an import does: store the
#    upload, then unpack its layer). MiB/s is of the archive's size in every row.
# 2. files: one sandbox (host image, `busybox httpd`), a file of S MiB (base64 of random bytes,
#    so that exec's JSON carries it byte for byte) for each S in $SIZES:
#    `curl -T file -X PUT /v1/sandboxes/{id}/files?path=/workspace/big-S` (201/204 checked)
#    against a host `cp` into that sandbox's workspace folder (<data_dir>/sandboxes/<id>/workspace:
#    the one-shot exec has no stdin, so it cannot write a file from the client's bytes);
#    `curl GET …/files?path=…` (size checked) against `POST …/exec {"command": ["cat", …]}`
#    (exit code, size and stdout_truncated checked; `[orchestrator] exec_output_max_bytes` is
#    raised for it) and a host `cat` of the same file.
# 3. snapshots: sandboxes of a busybox image; S MiB of random bytes written (untimed, by exec) to
#    /workspace/x or /opt/x (the root) for each S in $SNAP_SIZES; `POST …/snapshots {"name"}`
#    timed (201 checked), then create → running of a sandbox of the snapshot (polled every 5 ms
#    on one kept-alive connection; the file checked in it afterwards) against create → running
#    of a sandbox of the base image, in the same round. When the build has no snapshots
#    (404/405), the report says "snapshots: not available on this build".
#
# Output: a Markdown table on stdout and in bench/results/sessions-<UTC date>.md. Raw samples
# and the gateway's log stay in a temporary folder, removed at the end unless KEEP=1.
#
# Knobs (environment): ROUNDS (3), SIZES ("64 256": MiB), SNAP_SIZES ("0 1 16 64 256": MiB),
#   SKIP_BUILD=1, SKIP_INSTALL=1, KEEP=1, SANDGATE_BIN, CARGO_TARGET_DIR.
# Needs: root, busybox (busybox-static: /bin/busybox), openssl, curl, python3, tar, base64;
#   apt installs what is missing.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
cd "$repo"

given="" # the knobs set for this run, for the command line in the report
for k in ROUNDS SIZES SNAP_SIZES; do [[ -n ${!k+x} ]] && given+="$k=\"${!k}\" "; done
ROUNDS=${ROUNDS:-3}
read -r -a SIZES <<<"${SIZES:-64 256}"
read -r -a SNAP_SIZES <<<"${SNAP_SIZES:-0 1 16 64 256}"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$repo/target}
bin=${SANDGATE_BIN:-$CARGO_TARGET_DIR/release/sandgate}
MIB=1048576

log() { printf '[sessions] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[[ $(id -u) == 0 ]] || die "run as root: isolated sandboxes need it (sudo bash bench/sessions.sh)"

# ---------------------------------------------------------------- tools and build
if [[ ${SKIP_INSTALL:-0} != 1 ]]; then
  missing=()
  [[ -x /bin/busybox ]] || missing+=(busybox-static)
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
state=$(mktemp -d /tmp/sandgate-sessions.XXXXXX)
chmod 711 "$state"
GW_PID="" URL="" KEY=""
cleanup() {
  trap - EXIT INT TERM
  local id
  if [[ -n $GW_PID ]]; then
    for id in $(api GET /v1/sandboxes 2>/dev/null | python3 -c \
        'import json,sys; print(" ".join(s["id"] for s in json.load(sys.stdin).get("items", [])))' 2>/dev/null); do
      api DELETE "/v1/sandboxes/$id" >/dev/null 2>&1 || true
    done
    kill -TERM "$GW_PID" 2>/dev/null || true
    wait "$GW_PID" 2>/dev/null || true
  fi
  if [[ ${KEEP:-0} == 1 ]]; then log "kept $state"; else rm -rf "$state"; fi
}
trap cleanup EXIT
trap 'log interrupted; exit 130' INT TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
# A small API call: prints the body; fails on a status >= 300.
api() { # method path [json]
  local args=(-sS --fail-with-body --cacert "$state/tls/ca.pem" -H "Authorization: Bearer $KEY" -X "$1")
  [[ $# -ge 3 ]] && args+=(-H "Content-Type: application/json" --data-binary "$3")
  curl "${args[@]}" "$URL$2"
}
# Times from bash's own clock (${EPOCHREALTIME/./}: microseconds).
export LC_NUMERIC=C
now_us() { echo "${EPOCHREALTIME/./}"; }
secs() { local d=$(($2 - $1)); printf '%d.%06d\n' $((d / 1000000)) $((d % 1000000)); } # from-us to-us

# ---------------------------------------------------------------- certificate and gateway
mkdir -p -m 700 "$state/tls"
(
  cd "$state/tls"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -noenc -days 30 \
    -keyout ca.key -out ca.pem -subj /CN=sandgate-sessions-bench-ca \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign 2>/dev/null
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -noenc \
    -keyout server.key -out server.csr -subj /CN=127.0.0.1 2>/dev/null
  printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' >ext.cnf
  openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 30 \
    -extfile ext.cnf -out server.pem 2>/dev/null
) || die "openssl could not make the bench certificate"

max_mib=1
for s in "${SIZES[@]}" "${SNAP_SIZES[@]}"; do ((s > max_mib)) && max_mib=$s; done
gw_dir="$state/gw"
data="$gw_dir/data"
start_gateway() {
  local port i
  mkdir -p "$gw_dir"
  port=$(free_port)
  cat >"$gw_dir/sandgate.toml" <<CONF
# bench/sessions.sh
[gateway]
listen = "127.0.0.1:$port"
base_domain = "127.0.0.1"
shutdown_grace_secs = 2
body_read_timeout_secs = 120
[telemetry]
listen = "127.0.0.1:0"
log_level = "warn,rustls=error"
[tls]
dev_cert = false
cert_file = "$state/tls/server.pem"
key_file = "$state/tls/server.key"
[store]
data_dir = "$data"
[api]
requests_per_second = 100000
burst = 100000
address_requests_per_second = 100000
address_burst = 100000
[orchestrator]
isolation = "namespaces"
start_timeout_secs = 60
exec_timeout_secs = 600
exec_output_max_bytes = $(((max_mib + 1) * MIB))
CONF
  "$bin" serve --config "$gw_dir/sandgate.toml" >"$gw_dir/gateway.log" 2>&1 &
  GW_PID=$!
  URL="https://127.0.0.1:$port"
  for i in $(seq 300); do
    kill -0 "$GW_PID" 2>/dev/null || { tail -n 20 "$gw_dir/gateway.log" >&2; die "the gateway exited at start"; }
    if [[ -s $data/admin.key ]] &&
       curl -sf --cacert "$state/tls/ca.pem" "$URL/.well-known/jwks.json" -o /dev/null; then
      KEY=$(cat "$data/admin.key")
      log "gateway: pid $GW_PID, $URL"
      return 0
    fi
    sleep 0.1
  done
  tail -n 20 "$gw_dir/gateway.log" >&2; die "the gateway did not answer within 30 s"
}
fail() { tail -n 20 "$gw_dir/gateway.log" >&2; die "$* (the gateway's log above)"; }

# ---------------------------------------------------------------- inputs
# A docker-save archive: out, filler MiB (0: none). The layer is kept beside it as <out>.layer.
cat >"$state/mkimage.py" <<'PY'
import io, json, os, sys, tarfile
out, mib = sys.argv[1], int(sys.argv[2])
applets = ["sh", "cat", "ls", "head", "dd", "mkdir", "rm", "sleep", "sync", "wc", "test",
           "echo", "env", "stat", "httpd", "true"]
def info(name, kind=tarfile.REGTYPE, mode=0o644, size=0, link=""):
    t = tarfile.TarInfo(name)
    t.type, t.mode, t.size, t.linkname, t.uid, t.gid, t.mtime = kind, mode, size, link, 0, 0, 0
    return t
layer = out + ".layer"
with tarfile.open(layer, "w", format=tarfile.GNU_FORMAT) as t:
    for d in ("bin", "etc", "opt", "tmp", "workspace"):
        t.addfile(info(d + "/", tarfile.DIRTYPE, 0o755))
    with open("/bin/busybox", "rb") as f:
        t.addfile(info("bin/busybox", mode=0o755, size=os.fstat(f.fileno()).st_size), f)
    for a in applets:
        t.addfile(info("bin/" + a, tarfile.SYMTYPE, 0o777, link="busybox"))
    if mib:
        # tarfile reads exactly `size` bytes of the file object it is given.
        with open("/dev/urandom", "rb") as f:
            t.addfile(info("opt/filler.bin", size=mib << 20), f)
config = json.dumps({"architecture": "amd64", "os": "linux", "config": {
    "Env": ["PATH=/bin"], "Cmd": ["/bin/busybox", "httpd", "-f", "-p", "8000"]}}).encode()
manifest = json.dumps([{"Config": "config.json", "RepoTags": ["bench:latest"],
                        "Layers": ["layer0/layer.tar"]}]).encode()
with tarfile.open(out, "w", format=tarfile.GNU_FORMAT) as t:
    t.addfile(info("config.json", size=len(config)), io.BytesIO(config))
    t.addfile(info("manifest.json", size=len(manifest)), io.BytesIO(manifest))
    t.addfile(info("layer0/", tarfile.DIRTYPE, 0o755))
    with open(layer, "rb") as f:
        t.addfile(info("layer0/layer.tar", size=os.fstat(f.fileno()).st_size), f)
PY

# The API calls that want fine timing: one kept-alive TLS connection.
cat >"$state/api.py" <<'PY'
"""start URL KEY CA BODY: create -> running, prints "ms id" | snapshot URL KEY CA ID NAME:
prints "status ms" | probe URL KEY CA ID NAME: prints the status of one snapshot call."""
import http.client, json, ssl, sys, time
from urllib.parse import urlsplit
verb, url, key, ca = sys.argv[1:5]
u = urlsplit(url)
conn = http.client.HTTPSConnection(u.hostname, u.port, context=ssl.create_default_context(cafile=ca))
hdr = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
def call(method, path, body=None):
    conn.request(method, path, body=None if body is None else json.dumps(body), headers=hdr)
    r = conn.getresponse()
    data = r.read()
    return r.status, data
if verb == "start":
    conn.connect()
    t0 = time.perf_counter()
    st, data = call("POST", "/v1/sandboxes", json.loads(sys.argv[5]))
    if st != 201:
        sys.exit(f"POST /v1/sandboxes: {st} {data[:300]!r}")
    sb = json.loads(data)
    while sb["status"] == "starting":
        time.sleep(0.005)
        st, data = call("GET", f"/v1/sandboxes/{sb['id']}")
        sb = json.loads(data)
    ms = (time.perf_counter() - t0) * 1e3
    if sb["status"] != "running":
        sys.exit(f"sandbox {sb['id']} is {sb['status']}: {sb.get('detail')}")
    print(f"{ms:.3f} {sb['id']}")
elif verb in ("snapshot", "probe"):
    sid, name = sys.argv[5:7]
    conn.connect()
    t0 = time.perf_counter()
    st, data = call("POST", f"/v1/sandboxes/{sid}/snapshots", {"name": name})
    ms = (time.perf_counter() - t0) * 1e3
    if verb == "probe":
        print(st, data[:300].decode("utf-8", "replace").replace("\n", " "))
    elif st != 201:
        sys.exit(f"POST /v1/sandboxes/{sid}/snapshots: {st} {data[:300]!r}")
    else:
        print(f"{st} {ms:.3f} {json.loads(data).get('size_bytes')}")
PY
apy() { python3 "$state/api.py" "$1" "$URL" "$KEY" "$state/tls/ca.pem" "${@:2}"; }

in="$state/inputs"      # beside the data dir, on its file system
R="$state/results"      # one line per sample: "<round> <size MiB> <seconds>" in $R/<name>
mkdir -p "$R"
sample() { echo "$2 $3 $4" >>"$R/$1"; } # name round size seconds
# Which side goes first in round $r: the first in odd rounds, the second in even ones.
lead() { if ((r % 2)); then echo "$1"; else echo "$2"; fi; }

# ---------------------------------------------------------------- 1. image import
step_import() {
  local r s first t0 t1 code name arch layer peer
  for s in "${SIZES[@]}"; do
    log "building a docker-save archive with $s MiB of filler"
    python3 "$state/mkimage.py" "$in/image-$s.tar" "$s" || die "could not build the archive"
  done
  peer="$in/peer"
  for r in $(seq "$ROUNDS"); do
    for s in "${SIZES[@]}"; do
      arch="$in/image-$s.tar" layer="$in/image-$s.tar.layer" name="imp-$s-$r"
      for first in gw peer; do
        if [[ $first == $(lead gw peer) ]]; then
          log "round $r/$ROUNDS: POST /v1/images?name=$name ($s MiB filler)"
          sync; t0=$(now_us)
          code=$(curl -sS --cacert "$state/tls/ca.pem" -H "Authorization: Bearer $KEY" \
            -H "Content-Type: application/x-tar" -X POST -T "$arch" -o "$state/import.out" \
            -w '%{http_code}' "$URL/v1/images?name=$name") || fail "POST /v1/images"
          t1=$(now_us)
          [[ $code == 201 ]] || fail "POST /v1/images answered $code: $(head -c 300 "$state/import.out")"
          sample import "$r" "$s" "$(secs "$t0" "$t1")"
          api DELETE "/v1/images/$name" >/dev/null || fail "DELETE /v1/images/$name"
        else
          log "round $r/$ROUNDS: peers: cat, cp, tar -xf layer, cp + tar -xO | tar -x ($s MiB)"
          rm -rf "$peer"; mkdir -p "$peer/x" "$peer/y"
          sync; t0=$(now_us); cat "$arch" >/dev/null; t1=$(now_us)
          sample cat "$r" "$s" "$(secs "$t0" "$t1")"
          sync; t0=$(now_us); cp "$arch" "$peer/a.tar"; t1=$(now_us)
          sample cp "$r" "$s" "$(secs "$t0" "$t1")"
          rm -f "$peer/a.tar"
          sync; t0=$(now_us); tar -xf "$layer" -C "$peer/x"; t1=$(now_us)
          sample untar "$r" "$s" "$(secs "$t0" "$t1")"
          sync; t0=$(now_us)
          cp "$arch" "$peer/b.tar" && tar -xOf "$peer/b.tar" layer0/layer.tar | tar -x -C "$peer/y"
          t1=$(now_us)
          sample cp_untar "$r" "$s" "$(secs "$t0" "$t1")"
          [[ -f $peer/y/opt/filler.bin ]] || die "the peer unpack made no /opt/filler.bin"
          rm -rf "$peer"
        fi
      done
    done
  done
  for s in "${SIZES[@]}"; do stat -c %s "$in/image-$s.tar" >"$R/archive_bytes.$s"; done
}

# ---------------------------------------------------------------- 2. files
SB_BODY='{"command": ["sh", "-c", "exec busybox httpd -f -p 127.0.0.1:$PORT"], "ports": [8000]}'
step_files() {
  local sb ws r s first t0 t1 out code f
  read -r _ sb < <(apy start "$SB_BODY") || fail "the files sandbox did not start"
  ws="$data/sandboxes/$sb/workspace"
  [[ -d $ws ]] || die "no workspace folder at <data_dir>/sandboxes/$sb/workspace (see src/sandbox/isolate.rs)"
  log "files: sandbox $sb"
  for s in "${SIZES[@]}"; do
    log "making a $s MiB file (base64 of random bytes)"
    head -c $((s * MIB / 4 * 3)) /dev/urandom | base64 -w0 >"$in/big-$s" # exactly s MiB
    (($(stat -c %s "$in/big-$s") == s * MIB)) || die "the $s MiB file came out $(stat -c %s "$in/big-$s") bytes"
  done
  local q="$URL/v1/sandboxes/$sb"
  local auth=(-sS --cacert "$state/tls/ca.pem" -H "Authorization: Bearer $KEY")
  for r in $(seq "$ROUNDS"); do
    for s in "${SIZES[@]}"; do
      f="$in/big-$s"
      for first in gw peer; do
        if [[ $first == $(lead gw peer) ]]; then
          log "round $r/$ROUNDS: PUT, GET /files, POST /exec cat ($s MiB)"
          sync; t0=$(now_us)
          code=$(curl "${auth[@]}" -X PUT -T "$f" -o "$state/put.out" -w '%{http_code}' \
            "$q/files?path=/workspace/big-$s") || fail "PUT /files"
          t1=$(now_us)
          [[ $code == 201 || $code == 204 ]] || fail "PUT /files answered $code: $(head -c 300 "$state/put.out")"
          sample put "$r" "$s" "$(secs "$t0" "$t1")"
          sync; t0=$(now_us)
          out=$(curl "${auth[@]}" -o /dev/null -w '%{http_code} %{size_download}' \
            "$q/files?path=/workspace/big-$s") || fail "GET /files"
          t1=$(now_us)
          [[ $out == "200 $((s * MIB))" ]] || fail "GET /files: $out, not 200 and $((s * MIB)) bytes"
          sample get "$r" "$s" "$(secs "$t0" "$t1")"
          sync; t0=$(now_us)
          code=$(curl "${auth[@]}" -H "Content-Type: application/json" -o "$state/exec.out" -w '%{http_code}' \
            --data-binary "{\"command\": [\"cat\", \"/workspace/big-$s\"], \"timeout_secs\": 600}" \
            "$q/exec") || fail "POST /exec"
          t1=$(now_us)
          [[ $code == 200 ]] || fail "POST /exec answered $code: $(head -c 300 "$state/exec.out")"
          # {"exit_code":0,...,"stdout":"<s MiB>","stderr":"",...,"stdout_truncated":false,...}
          head -c 100 "$state/exec.out" | grep -q '"exit_code":0' || die "exec cat: $(head -c 300 "$state/exec.out")"
          tail -c 300 "$state/exec.out" | grep -q '"stdout_truncated":false' || die "exec cat: the output was truncated"
          (($(stat -c %s "$state/exec.out") > s * MIB)) || die "exec cat: a short answer"
          rm -f "$state/exec.out"
          sample exec_cat "$r" "$s" "$(secs "$t0" "$t1")"
        else
          log "round $r/$ROUNDS: host cp into the workspace, host cat ($s MiB)"
          sync; t0=$(now_us); cp "$f" "$ws/cp-$s"; t1=$(now_us)
          sample host_cp "$r" "$s" "$(secs "$t0" "$t1")"
          rm -f "$ws/cp-$s"
          [[ -f $ws/big-$s ]] || die "host cat: no $ws/big-$s"
          sync; t0=$(now_us); cat "$ws/big-$s" >/dev/null; t1=$(now_us)
          sample host_cat "$r" "$s" "$(secs "$t0" "$t1")"
        fi
      done
    done
  done
  api DELETE "/v1/sandboxes/$sb" >/dev/null || fail "DELETE the files sandbox"
}

# ---------------------------------------------------------------- 3. snapshots
step_snapshots() {
  local src probe st base r s place path ms size snap from id n sb_body out
  log "importing the base image for snapshots"
  python3 "$state/mkimage.py" "$in/base.tar" 0 || die "could not build the base archive"
  curl -sS --fail-with-body --cacert "$state/tls/ca.pem" -H "Authorization: Bearer $KEY" \
    -H "Content-Type: application/x-tar" -X POST -T "$in/base.tar" -o /dev/null \
    "$URL/v1/images?name=sbase" || fail "importing the base image"
  local cmd='"command": ["/bin/busybox", "httpd", "-f", "-p", "8000"], "ports": [8000]'
  base="{\"image\": \"sbase\", $cmd}"
  read -r _ src < <(apy start "$base") || fail "a sandbox of the base image did not start"
  probe=$(apy probe "$src" sprobe) || fail "the snapshot probe"
  st=${probe%% *}
  case $st in
    201) api DELETE /v1/images/sprobe >/dev/null || fail "DELETE the probe snapshot" ;;
    404 | 405)
      log "snapshots: not available on this build ($probe)"
      echo "POST /v1/sandboxes/{id}/snapshots answered $probe" >"$R/snap_unavailable"
      api DELETE "/v1/sandboxes/$src" >/dev/null || true
      return 0 ;;
    *) fail "POST /v1/sandboxes/{id}/snapshots answered $probe" ;;
  esac
  api DELETE "/v1/sandboxes/$src" >/dev/null || fail "DELETE a sandbox"
  for r in $(seq "$ROUNDS"); do
    for place in workspace root; do
      for s in "${SNAP_SIZES[@]}"; do
        ((s == 0)) && [[ $place == root ]] && continue # nothing written is one case
        path=/workspace/x; [[ $place == root ]] && path=/opt/x
        log "round $r/$ROUNDS: snapshot with $s MiB at $path, start from it and from the base"
        read -r _ src < <(apy start "$base") || fail "a sandbox of the base image did not start"
        if ((s > 0)); then
          out=$(api POST "/v1/sandboxes/$src/exec" \
            "{\"command\": [\"sh\", \"-c\", \"dd if=/dev/urandom of=$path bs=1048576 count=$s 2>/dev/null && wc -c < $path\"], \"timeout_secs\": 600}") \
            || fail "writing $path"
          [[ $out == *"\"exit_code\":0"* && $out == *"$((s * MIB))"* ]] || die "writing $path: $out"
        fi
        snap="snap-$place-$s-$r"
        sync
        read -r _ ms size < <(apy snapshot "$src" "$snap") || fail "POST /snapshots"
        sample "snap_$place" "$r" "$s" "$(python3 -c "print($ms / 1e3)")"
        sample "snap_bytes_$place" "$r" "$s" "$size"
        sb_body="{\"image\": \"$snap\", $cmd}"
        for first in snap base; do
          if [[ $first == $(lead snap base) ]]; then
            sync
            read -r ms from < <(apy start "$sb_body") || fail "a sandbox of snapshot $snap did not start"
            sample "start_snap_$place" "$r" "$s" "$(python3 -c "print($ms / 1e3)")"
          else
            sync
            read -r ms id < <(apy start "$base") || fail "a sandbox of the base image did not start"
            sample "start_base_$place" "$r" "$s" "$(python3 -c "print($ms / 1e3)")"
            api DELETE "/v1/sandboxes/$id" >/dev/null || fail "DELETE a sandbox"
          fi
        done
        if ((s > 0)); then
          out=$(api POST "/v1/sandboxes/$from/exec" "{\"command\": [\"sh\", \"-c\", \"wc -c < $path\"]}") \
            || fail "reading $path in the snapshot's sandbox"
          [[ $out == *"\"exit_code\":0"* && $out == *"$((s * MIB))"* ]] || die "the snapshot's sandbox lacks its $s MiB at $path: $out"
        fi
        api DELETE "/v1/sandboxes/$from" >/dev/null || fail "DELETE a sandbox"
        api DELETE "/v1/sandboxes/$src" >/dev/null || fail "DELETE a sandbox"
        for n in $(seq 50); do
          api DELETE "/v1/images/$snap" >/dev/null 2>&1 && break
          ((n == 50)) && fail "DELETE /v1/images/$snap"
          sleep 0.1
        done
      done
    done
  done
}

# ---------------------------------------------------------------- run
start_gateway
mkdir -p "$in"
step_import
step_files
step_snapshots

# ---------------------------------------------------------------- report
day=$(date -u +%F)
out="$here/results/sessions-$day.md"
mkdir -p "$here/results"
commit=$(git rev-parse --short HEAD 2>/dev/null || echo "?")
[[ -n $(git status --porcelain -- src Cargo.toml 2>/dev/null) ]] && commit="$commit+dirty"
cmd="${given}bash bench/sessions.sh"
fs=$(df -T "$data" | awk 'NR == 2 {print $2}')
DAY=$day COMMIT=$commit CMD=$cmd FS=$fs ROUNDS=$ROUNDS SIZES="${SIZES[*]}" SNAP_SIZES="${SNAP_SIZES[*]}" \
  python3 - "$R" "$out" <<'PY'
import os, platform, sys
R, out = sys.argv[1], sys.argv[2]
E = os.environ
MIB = 1 << 20
def samples(name):
    """{(round, size): seconds}"""
    p = os.path.join(R, name)
    got = {}
    if os.path.exists(p):
        for line in open(p):
            r, s, t = line.split()
            got[(int(r), int(s))] = float(t)
    return got
def median(xs):
    xs = sorted(xs)
    if not xs:
        return None
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2
sizes = [int(s) for s in E["SIZES"].split()]
snap_sizes = [int(s) for s in E["SNAP_SIZES"].split()]
def arch_mib(s):
    p = os.path.join(R, f"archive_bytes.{s}")
    return int(open(p).read()) / MIB if os.path.exists(p) else float(s)

def rate_row(label, ours, peer, s, mib):
    """MiB/s medians of both, and the median over rounds of ours / peer (a rate ratio)."""
    a, b = samples(ours), samples(peer)
    ra = [mib / t for (r, z), t in a.items() if z == s]
    rb = [mib / t for (r, z), t in b.items() if z == s]
    ratios = [b[k] / a[k] for k in a if k[1] == s and k in b]  # time(peer)/time(ours) = rate(ours)/rate(peer)
    return label, median(ra), median(rb), median(ratios), ratios

lines = []
def table(head, rows, fmt):
    lines.extend(["", f"| {head[0]} | {head[1]} | {head[2]} | {head[3]} | per round |", "|---|---:|---:|---:|---|"])
    for label, a, b, ratio, ratios in rows:
        cell = lambda x: "-" if x is None else fmt.format(x)
        rr = ", ".join(f"{x:.2f}" for x in ratios) or "-"
        lines.append(f"| {label} | {cell(a)} | {cell(b)} | {'-' if ratio is None else f'{ratio:.2f}×'} | {rr} |")

cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
mem = next((int(l.split()[1]) // 1024 for l in open("/proc/meminfo") if l.startswith("MemTotal")), 0)
lines += [f"# Sessions: image import, files, snapshots ({E['DAY']})", "",
          f"`{E['CMD']}` (as root): sandgate {E['COMMIT']} (release), one gateway with "
          f"`isolation = \"namespaces\"`, the API over TLS on loopback. Machine: {cpu}, "
          f"{os.cpu_count()} cores, {mem} MiB RAM, Linux {platform.release()}, data dir on {E['FS']}; "
          "a shared, noisy machine: each figure is the median of "
          f"{E['ROUNDS']} rounds that alternate the gateway and its peer, and each ratio the median "
          "of the per-round ratios (listed). Page-cache speeds: `sync` runs before each timed "
          "operation, none syncs itself."]

lines += ["", "## 1. Image import (MiB/s of the archive)", "",
          "`curl -T archive -X POST /v1/images?name=N` against host commands on the same archive, "
          "on the data dir's file system. The import stores the upload, then unpacks its layer; "
          "the last peer does the same work with `cp` and `tar`."]
rows = []
for s in sizes:
    m = arch_mib(s)
    for peer, what in (("cp_untar", "`cp` + `tar -xOf … layer0/layer.tar \\| tar -x`"),
                       ("untar", "`tar -xf layer.tar` (the raw unpack)"),
                       ("cp", "`cp archive` (write)"),
                       ("cat", "`cat archive >/dev/null` (read)")):
        rows.append(rate_row(f"{s} MiB filler ({m:.0f} MiB archive): import vs {what}", "import", peer, s, m))
table(("measurement", "import MiB/s", "peer MiB/s", "import / peer"), rows, "{:,.0f}")

lines += ["", "## 2. Files (MiB/s)", "",
          "`PUT`/`GET /v1/sandboxes/{id}/files?path=/workspace/big` with curl. The one-shot exec "
          "(`POST …/exec`) takes no stdin, so PUT is set against a host `cp` into the sandbox's "
          "workspace folder; GET against `cat` through the one-shot exec (its JSON answer carries "
          "the file; the file is base64 text so that it does so byte for byte) and a host `cat`."]
rows = []
for s in sizes:
    rows.append(rate_row(f"{s} MiB: PUT /files vs host `cp` into the workspace", "put", "host_cp", s, s))
    rows.append(rate_row(f"{s} MiB: GET /files vs exec `cat`", "get", "exec_cat", s, s))
    rows.append(rate_row(f"{s} MiB: GET /files vs host `cat`", "get", "host_cat", s, s))
table(("measurement", "API MiB/s", "peer MiB/s", "API / peer"), rows, "{:,.0f}")

lines += ["", "## 3. Snapshots (ms)", ""]
unavailable = os.path.join(R, "snap_unavailable")
if os.path.exists(unavailable):
    lines += ["snapshots: not available on this build (" + open(unavailable).read().strip() + ")."]
else:
    lines += ["S MiB of random bytes written in a sandbox of a busybox image (at `/workspace/x`, "
              "or `/opt/x` in its root), then `POST …/snapshots` timed; then create → running "
              "(polled every 5 ms) of a sandbox of the snapshot against one of the base image, "
              "in the same round. Ratios are times: snapshot start / base start. The image size is the "
              "201 answer's `size_bytes`."]
    rows = []
    for place, where in (("workspace", "/workspace/x"), ("root", "/opt/x")):
        snap, ss, sb = samples(f"snap_{place}"), samples(f"start_snap_{place}"), samples(f"start_base_{place}")
        for s in snap_sizes:
            if s == 0 and place == "root":
                continue
            ks = [k for k in snap if k[1] == s]
            label = f"{s} MiB at {where}" if s else "nothing written"
            t_snap = median([snap[k] * 1e3 for k in ks])
            sizes_b = samples(f"snap_bytes_{place}")
            kb = median([sizes_b[k] for k in ks if k in sizes_b])
            rows.append((f"{label}: snapshot" + (f" (its image: {kb / MIB:.1f} MiB)" if kb is not None else ""),
                         t_snap, None, None, []))
            ratios = [ss[k] / sb[k] for k in ks if k in ss and k in sb]
            rows.append((f"{label}: start from snapshot vs from base",
                         median([ss[k] * 1e3 for k in ks if k in ss]),
                         median([sb[k] * 1e3 for k in ks if k in sb]), median(ratios), ratios))
    table(("measurement", "ms", "base start ms", "snapshot / base"), rows, "{:,.1f}")
text = "\n".join(lines) + "\n"
open(out, "w").write(text)
print(text, end="")
PY
log "wrote ${out#"$repo"/}"
