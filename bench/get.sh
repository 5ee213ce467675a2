#!/usr/bin/env bash
# GET /v1/users/{id}/recommendations against its limit on this machine: the query API
# (a user with a personalised list, SQLite store) and a trivial axum handler that returns
# the same body: each at 20,000 requests/s open loop (recpipe-loadtest query: the p99,
# and the load tester's own floor), then three rounds of wrk (closed loop, 2 threads, 64
# connections, 5 s) against each: the requests/s ratio.
# Needs wrk (Debian: apt-get install wrk).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" != "--inside" ]; then
  command -v wrk >/dev/null || { echo "wrk is needed: apt-get install wrk" >&2; exit 1; }
  cargo build --release --workspace --bins --quiet
  exec bench/with-pipeline.sh "$0" --inside
fi

# From here on the pipeline runs (bench/with-pipeline.sh stops it afterwards).
api=http://127.0.0.1:8080
trivial_api=http://127.0.0.1:8090
path="/v1/users/bench-user/recommendations?k=10"
now=$(date +%s000)
curl -fsS -X POST $api/v1/events -H "content-type: application/json" \
  -d "[{\"event_id\":\"b1-$now\",\"user_id\":\"bench-user\",\"type\":\"view\",\"product_id\":\"p-00011\",\"ts\":$now},{\"event_id\":\"b2-$now\",\"user_id\":\"bench-user\",\"type\":\"view\",\"product_id\":\"p-00021\",\"ts\":$now}]" >/dev/null
for _ in $(seq 1 200); do
  curl -fsS "$api$path" | grep -q "\"source_event_id\":\"b2-$now\"" && break
  sleep 0.05
done
body=$(mktemp); curl -fsS "$api$path" >"$body"
echo "response: $(wc -c <"$body") bytes"
target/release/recpipe-loadtest trivial-server --port 8090 --body "$body" & trivial=$!
trap 'kill $trivial 2>/dev/null || true' EXIT
sleep 0.5

# Open loop first: the GETs of a wrk run leave as many impressions for tansu and
# save-worker to store for a while after, which would load the next measurement.
. bench/stolen.sh
# With the share of the machine the hypervisor gave to other guests meanwhile.
open_loop() {
  local steal0 started=$SECONDS result
  steal0=$(stolen_ticks)
  result=$(target/release/recpipe-loadtest --api "$1" --catalog .run/catalog query --rate 20000 --seconds 10 --users 10000 | grep GET)
  echo "$result  stolen $(stolen_share $(($(stolen_ticks) - steal0)) $((SECONDS - started))) %"
}
echo "open loop, 20,000 requests/s:"
echo "  query-api: $(open_loop $api)"
echo "  trivial:   $(open_loop $trivial_api)"

# CPU seconds a process has used (user + system).
cpu() { awk '{printf "%.2f", ($14 + $15) / 100}' "/proc/$1/stat"; }
# Until the machine is nearly idle (at most 120 s): impressions of earlier runs may still
# be being stored, and a measurement taken meanwhile would share the cores.
quiet() {
  for _ in $(seq 1 120); do
    read -r _ u1 n1 s1 i1 _ < /proc/stat; sleep 1; read -r _ u2 n2 s2 i2 _ < /proc/stat
    busy=$(( (u2 + n2 + s2) - (u1 + n1 + s1) )); idle=$(( i2 - i1 ))
    [ $(( busy * 100 / (busy + idle + 1) )) -lt 20 ] && return
  done
}
seconds=5
# "requests/s p99" of a wrk run.
load() { wrk -t2 -c64 -d${seconds}s --latency "$1" | awk '/Requests\/sec/ {rps=$2} / 99%/ {p99=$2} END {print rps, p99}'; }
api_pid=$(pgrep -x query-api | head -1)

# Rounds of the trivial handler then the API, each from a quiet machine: the machine is
# shared and its speed drifts by tens of percent from minute to minute, so the two
# servers of a round are compared with each other and the median round counts. Besides
# requests/s, requests per CPU second of the server process alone: on two shared cores
# the requests/s ratio also pays for wrk and for the rest of the pipeline storing the
# API run's impressions meanwhile; the CPU one does not.
echo "closed loop (wrk, 64 connections, ${seconds} s per run):"
results=$(mktemp)
for round in 1 2 3; do
  quiet; t0=$(cpu $trivial)
  # wrk prints no figures when every request failed: say so and skip the round.
  read -r triv_rps triv_p99 < <(load "$trivial_api$path") ||
    { echo "  round $round: wrk gave no result against the trivial handler"; continue; }
  t1=$(cpu $trivial)
  quiet; a0=$(cpu "$api_pid")
  read -r api_rps api_p99 < <(load "$api$path") ||
    { echo "  round $round: wrk gave no result against query-api (is it still up?)"; continue; }
  a1=$(cpu "$api_pid")
  echo "$round $api_rps $api_p99 $a0 $a1 $triv_rps $triv_p99 $t0 $t1" >>"$results"
done
[ -s "$results" ] || { echo "no round gave a result"; exit 1; }
python3 - "$results" "$seconds" <<'PY'
import statistics, sys
rows, seconds = [l.split() for l in open(sys.argv[1])], float(sys.argv[2])
rps, cpus = [], []
for n, a, ap99, a0, a1, t, tp99, t0, t1 in rows:
    a, t = float(a), float(t)
    ac = a * seconds / max(float(a1) - float(a0), 0.01)
    tc = t * seconds / max(float(t1) - float(t0), 0.01)
    rps.append(a / t); cpus.append(ac / tc)
    print(f"  round {n}: query-api {a:,.0f}/s (p99 {ap99}, {ac:,.0f} per CPU s), "
          f"trivial {t:,.0f}/s (p99 {tp99}, {tc:,.0f} per CPU s): ratio {a / t:.3f}, per CPU s {ac / tc:.3f}")
print(f"ratio query-api / trivial: median {statistics.median(rps):.3f} (rounds {', '.join(f'{r:.3f}' for r in rps)})")
print(f"per server CPU second:     median {statistics.median(cpus):.3f} (rounds {', '.join(f'{r:.3f}' for r in cpus)})")
PY
