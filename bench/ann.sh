#!/usr/bin/env bash
# recpipe's HNSW against hnswlib (PyPI) on the same vectors, queries and k, one thread,
# in one run: queries/s at recall@10 >= 0.95. Installs numpy and hnswlib into
# .tools/bench-venv. Size: RECPIPE_ANN_PRODUCTS (100000) × 64 dims, 1000 queries per set.
#   bench/ann.sh [ROUNDS (3)]
# Within a round the two libraries' passes alternate (each side's fastest of 7 counts),
# so both meet the same moments of a shared machine. Each round builds both again, and
# the median round's ratio counts: on a shared 2-core VM one round's ratio moved from
# 0.91 to 1.73 with no change when the libraries were measured one after the other
# (BENCHMARKS.md, thirty-sixth session). The last round's tables are printed in full.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
. bench/stolen.sh
out=target/ann-bench
venv=.tools/bench-venv
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet numpy hnswlib
fi
cargo build --release -p recpipe-loadtest --quiet
mkdir -p "$out"
ratios=$(mktemp)
for round in $(seq 1 "$rounds"); do
  steal0=$(stolen_ticks) started=$SECONDS
  "$venv/bin/python" bench/ann_vs_hnswlib.py "$out" target/release/recpipe-loadtest \
    --products "${RECPIPE_ANN_PRODUCTS:-100000}" >"$out/round.txt"
  [ "$round" = "$rounds" ] && sed '/^one-interest:/,$d' "$out/round.txt"
  stolen=$(stolen_share $(($(stolen_ticks) - steal0)) $((SECONDS - started)))
  grep -E '^(one|two)-interest:' "$out/round.txt" | sed "s/^/round $round: /; s/\$/ (stolen $stolen %)/"
  { grep '^one-interest:.*ratio' "$out/round.txt" || true; } | awk '{print $NF}' >>"$ratios"
done
sort -n "$ratios" | awk '{ r[NR] = $1 } END {
  if (NR == 0) { print "no round reached recall@10 0.95 on one-interest"; exit }
  median = (NR % 2) ? r[(NR + 1) / 2] : (r[NR / 2] + r[NR / 2 + 1]) / 2
  printf "one-interest: median ratio %.2f over %d rounds (%.2f-%.2f)\n", median, NR, r[1], r[NR] }'
