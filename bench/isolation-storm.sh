#!/usr/bin/env bash
# Creates and deletes N isolated sandboxes in a loop against a running gateway (as root, on
# the gateway's host), then shows that nothing is left behind: no sandbox cgroup, no process of
# a sandbox uid, no extra network namespace, no extra mount.
#
#   SANDGATE_URL=... SANDGATE_CA_CERT=... SANDGATE_API_KEY=... bash bench/isolation-storm.sh [N]
#
# SANDGATE_BIN names the sandgate binary (default: target/release/sandgate).
set -euo pipefail
n=${1:-200}
bin=${SANDGATE_BIN:-target/release/sandgate}
netns() { find /proc/[0-9]*/ns/net -maxdepth 0 -printf '%l\n' 2>/dev/null | sort -u | wc -l; }
cgroups() { find /sys/fs/cgroup -type d -path '*/sandgate/*' 2>/dev/null | wc -l; }
sandbox_procs() { ps -eo uid= | awk '$1 >= 2000000000 && $1 < 2000100000' | wc -l; }
mounts() { wc -l </proc/self/mountinfo; }

before="netns=$(netns) cgroups=$(cgroups) sandbox_processes=$(sandbox_procs) mounts=$(mounts)"
start=$(date +%s.%N)
for i in $(seq "$n"); do
  id=$("$bin" sandbox create --port 8000 --wait -- sh -c 'sleep 300 & exec python3 -m http.server 8000' 2>/dev/null)
  "$bin" sandbox rm "$id" >/dev/null
done
end=$(date +%s.%N)
sleep 1
after="netns=$(netns) cgroups=$(cgroups) sandbox_processes=$(sandbox_procs) mounts=$(mounts)"
printf '%s create+run+delete cycles in %.1f s (%.0f ms each)\n' "$n" \
  "$(echo "$end - $start" | bc)" "$(echo "($end - $start) * 1000 / $n" | bc)"
echo "before: $before"
echo "after:  $after"
[ "$before" = "$after" ] && echo "nothing left behind" || { echo "LEFT BEHIND"; exit 1; }
