#!/usr/bin/env bash
# Builds the libFuzzer targets in fuzz/ and runs each for a bounded time.
#
#   bash scripts/fuzz.sh [seconds-per-target]      (default 60)
#
# Uses LLVM's sanitizer-coverage instrumentation through stable rustc flags (what cargo-fuzz
# sets, minus AddressSanitizer, which needs a nightly compiler; sandgate forbids unsafe code,
# so memory errors are not what these targets look for: panics, hangs and wrong answers are).
# Crashes are written to fuzz/artifacts/<target>/ and fail the run.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
secs=${1:-60}
cd "$repo/fuzz"
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
 -Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
 -Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks"
# An explicit --target keeps these flags off build scripts and proc macros (as cargo-fuzz does).
triple=$(rustc -vV | sed -n 's/^host: //p')
cargo build --release --locked --bins --target "$triple"
bindir="target/$triple/release"
status=0
for target in token_verify host_route cookie_query image_tar; do
  mkdir -p "corpus/$target" "artifacts/$target"
  # Inputs that once crashed a target are kept in regressions/ and replayed every run.
  # Hand-made starting inputs (seeds/: a few valid archives, where random bytes rarely make
  # one) join them.
  seeds=(); [ -d "regressions/$target" ] && seeds=("regressions/$target")
  [ -d "seeds/$target" ] && seeds+=("seeds/$target")
  echo "=== fuzz $target for ${secs}s"
  if ! "$bindir/$target" -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 \
      -artifact_prefix="artifacts/$target/" -print_final_stats=1 "corpus/$target" "${seeds[@]}" 2>"artifacts/$target.log"; then
    echo "fuzz $target: FAILED (see fuzz/artifacts/$target.log and fuzz/artifacts/$target/)"
    tail -30 "artifacts/$target.log"
    status=1
  fi
  grep -E "^stat::number_of_executed_units|^stat::peak_rss_mb|Done [0-9]+ runs" "artifacts/$target.log" | tr '\n' ' '
  echo
done
exit $status
