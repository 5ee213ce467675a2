#!/usr/bin/env bash
# The pipeline ÷ relay benchmark ROUNDS times, each on a fresh pipeline (broker, services
# and store started anew by bench/with-pipeline.sh, the store's files removed first), and
# the median: on a noisy 2-core machine one run's ratio moved by ±0.1 with no change at
# all (BENCHMARKS.md, thirty-fifth session).
#   bench/relay.sh [ROUNDS (5)] [EVENTS (200000)] [USERS (20000)]
# RECPIPE_DEMO_BIN_DIR=<dir> runs another build's services and load tester (an A/B; the
# directory holds them and recpipe-admin). Each round's output is kept in a directory
# printed at the end.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
rounds=${1:-5}
events=${2:-200000}
users=${3:-20000}
bin="${RECPIPE_DEMO_BIN_DIR:-$root/target/release}"
out="$(mktemp -d -t recpipe-relay.XXXXXX)"
. bench/stolen.sh
# The field after a line's last "(": "2.41 s)" and the like.
seconds() { grep -h "^$1" "$2" | sed 's/.*(\([0-9.]*\) s).*/\1/; s/.*in \([0-9.]*\) s).*/\1/'; }
printf '%-6s %10s %10s %10s %7s %9s\n' round 'relay s' 'lists s' 'pipeline s' ratio 'stolen %'
for round in $(seq 1 "$rounds"); do
  rm -f .run/recpipe*.db*
  log="$out/round-$round.log"
  steal0=$(stolen_ticks) started=$SECONDS
  if ! bench/with-pipeline.sh "$bin/recpipe-loadtest" --catalog .run/catalog relay \
    --events "$events" --users "$users" --json "$out/round-$round.json" >"$log" 2>&1; then
    tail -n 20 "$log" >&2
    echo "bench/relay.sh: round $round failed; its output is in $log" >&2
    exit 1
  fi
  ratio=$(grep -h '^ratio pipeline / relay:' "$log" | awk '{print $NF}' || true)
  if [ -z "$ratio" ]; then
    echo "bench/relay.sh: round $round printed no ratio; its output is in $log" >&2
    exit 1
  fi
  # Over the whole round (start-up and the GETs after the clock included).
  stolen=$(stolen_share $(($(stolen_ticks) - steal0)) $((SECONDS - started)))
  printf '%-6s %10s %10s %10s %7s %9s\n' "$round" "$(seconds "bare relay" "$log")" \
    "$(seconds lists "$log")" "$(seconds pipeline "$log")" "$ratio" "$stolen"
  echo "$ratio" >>"$out/ratios"
done
sort -n "$out/ratios" | awk -v n="$rounds" '
  { r[NR] = $1 }
  END {
    median = (n % 2) ? r[(n + 1) / 2] : (r[n / 2] + r[n / 2 + 1]) / 2
    met = 0; for (i = 1; i <= n; i++) if (r[i] >= 0.8) met++
    printf "median ratio %.3f over %d rounds (%.3f-%.3f; at least 0.8 in %d)\n", median, n, r[1], r[n], met
  }'
echo "each round's output: $out"
echo "stolen %: the machine's CPU time the hypervisor gave to other guests during the round; a round that lost much is the hour's, not recpipe's"
