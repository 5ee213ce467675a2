#!/usr/bin/env bash
# What save-worker's windows cost the embedded store as it grows, without the pipeline
# (shared/benches/store_growth.rs: 1,400 events of 10,000 Zipf users a window, with each
# user's state and list). Prints, per round, the CPU µs and KB written per event over the
# second half of the run (the store past EVENTS/2), and the share of CPU stolen.
#   bench/store-growth.sh [EVENTS] [ROUNDS] [OTHER_BIN]
# With OTHER_BIN (the bench binary of another build: `cargo bench -p recpipe-shared
# --bench store_growth --no-run` prints its path), the two builds alternate round by round
# and the medians' ratio (this build ÷ the other) is printed.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
events=${1:-1000000}
rounds=${2:-3}
other=${3:-}
cd "$root"
# A build that fails says why (its output) rather than leaving the script to stop silently.
built=$(cargo bench -p recpipe-shared --bench store_growth --no-run 2>&1) ||
  { echo "$built" >&2; echo "bench/store-growth.sh: the bench did not build" >&2; exit 1; }
this=$(echo "$built" | grep -o 'target/release/deps/store_growth-[0-9a-f]*' | tail -1)
[ -x "$this" ] || { echo "bench/store-growth.sh: cargo named no store_growth binary" >&2; exit 1; }
[ -z "$other" ] || [ -x "$other" ] || { echo "bench/store-growth.sh: OTHER_BIN $other is not an executable" >&2; exit 2; }
. bench/stolen.sh
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# run NAME BIN: one round; prints "NAME cpu_us kb stolen%" and keeps the cpu figure.
run() {
  local s0 t0
  s0=$(stolen_ticks) t0=$SECONDS
  "$2" "$events" 1400 "$work/db" >"$work/out"
  rm -rf "$work/db"
  awk -v half=$((events / 2)) -v name="$1" -v stolen="$(stolen_share $(($(stolen_ticks) - s0)) $((SECONDS - t0)))" '
    NR > 1 && $1 > half { cpu += $3; kb += $4; n++ }
    END { printf "%s\t%.2f\t%.1f\t%s\n", name, cpu / n, kb / n, stolen }' "$work/out" | tee -a "$work/rounds"
}
printf 'build\tcpu_us_per_event\twritten_kb_per_event\tstolen_%%\n'
for _ in $(seq 1 "$rounds"); do
  run this "$this"
  [ -n "$other" ] && run other "$other"
done
median() { awk -v b="$1" '$1 == b {print $2}' "$work/rounds" | sort -n | awk '{v[NR] = $1} END {print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }
if [ -n "$other" ]; then
  awk -v a="$(median this)" -v b="$(median other)" \
    'BEGIN {printf "median CPU per event: this build %.2f µs, the other %.2f µs, ratio %.3f\n", a, b, a / b}'
else
  echo "median CPU per event: $(median this) µs"
fi
