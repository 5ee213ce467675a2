#!/usr/bin/env bash
# GET /v1/users/{id}/recommendations against its limit on this machine: the query API
# (a user with a personalised list, SQLite store) and a trivial axum handler that returns
# the same body: each at 20,000 requests/s open loop (recpipe-loadtest query: the p99,
# and the load tester's own floor), then each loaded by wrk (closed loop, 2 threads, 64
# connections, 10 s: the requests/s ratio).
# Needs wrk (Debian: apt-get install wrk).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v wrk >/dev/null || { echo "wrk is needed: apt-get install wrk" >&2; exit 1; }
cargo build --release --workspace --bins --quiet
exec bench/with-pipeline.sh bash -c '
set -euo pipefail
api=http://127.0.0.1:8080
now=$(date +%s000)
curl -fsS -X POST $api/v1/events -H "content-type: application/json" \
  -d "[{\"event_id\":\"b1-$now\",\"user_id\":\"bench-user\",\"type\":\"view\",\"product_id\":\"p-00011\",\"ts\":$now},{\"event_id\":\"b2-$now\",\"user_id\":\"bench-user\",\"type\":\"view\",\"product_id\":\"p-00021\",\"ts\":$now}]" >/dev/null
for _ in $(seq 1 200); do
  curl -fsS "$api/v1/users/bench-user/recommendations?k=10" | grep -q "\"source_event_id\":\"b2-$now\"" && break
  sleep 0.05
done
body=$(mktemp); curl -fsS "$api/v1/users/bench-user/recommendations?k=10" >"$body"
echo "response: $(wc -c <"$body") bytes"
target/release/recpipe-loadtest trivial-server --port 8090 --body "$body" & trivial=$!
sleep 0.5
# Open loop first: the million GETs of a wrk run leave a million impressions for tansu and
# save-worker to digest for a while after, which would load the next measurement.
open_loop() { target/release/recpipe-loadtest --api "$1" --catalog .run/catalog query --rate 20000 --seconds 10 --users 10000 | grep GET; }
echo "open loop, 20,000 requests/s:"
echo "  query-api: $(open_loop $api)"
echo "  trivial:   $(open_loop http://127.0.0.1:8090)"
run() { wrk -t2 -c64 -d10s --latency "$1" | awk "/Requests\/sec/ {rps=\$2} / 99%/ {p99=\$2} END {print rps, p99}"; }
# CPU seconds a process has used (user + system).
cpu() { awk "{printf \"%.2f\", (\$14 + \$15) / 100}" /proc/$1/stat; }
# Until the machine is nearly idle (at most 120 s): the impressions of the open-loop runs
# are still being stored, and a measurement taken meanwhile would share the cores.
quiet() {
  for _ in $(seq 1 120); do
    read -r _ u1 n1 s1 i1 _ < /proc/stat; sleep 1; read -r _ u2 n2 s2 i2 _ < /proc/stat
    busy=$(( (u2 + n2 + s2) - (u1 + n1 + s1) )); idle=$(( i2 - i1 ))
    [ $(( busy * 100 / (busy + idle + 1) )) -lt 20 ] && return
  done
}
api_pid=$(pgrep -x query-api | head -1)
# The trivial handler first; each run starts from a quiet machine.
quiet; t0=$(cpu $trivial)
read triv_rps triv_p99 < <(run "http://127.0.0.1:8090/v1/users/bench-user/recommendations?k=10")
triv_cpu=$(python3 -c "print($(cpu $trivial) - $t0)")
quiet; a0=$(cpu $api_pid)
read api_rps api_p99 < <(run "$api/v1/users/bench-user/recommendations?k=10")
api_cpu=$(python3 -c "print($(cpu $api_pid) - $a0)")
kill $trivial
echo "closed loop (wrk, 64 connections, 10 s):"
echo "  query-api: $api_rps requests/s, p99 $api_p99, $api_cpu CPU s"
echo "  trivial:   $triv_rps requests/s, p99 $triv_p99, $triv_cpu CPU s"
python3 -c "print(\"ratio query-api / trivial: %.3f\" % ($api_rps / $triv_rps))"
# The same comparison per CPU second of the server alone: requests per CPU second. On
# two shared cores the requests/s ratio also pays for wrk and for the rest of the
# pipeline storing the impressions of the API run meanwhile; this one does not.
python3 -c "a = $api_rps * 10 / $api_cpu; t = $triv_rps * 10 / $triv_cpu; print(\"requests per server CPU second: query-api %.0f, trivial %.0f, ratio %.3f\" % (a, t, a / t))"
'
