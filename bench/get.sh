#!/usr/bin/env bash
# GET /v1/users/{id}/recommendations against its limit on this machine: the query API
# (a user with a personalised list, SQLite store) and a trivial axum handler that returns
# the same body, each loaded by wrk (closed loop, 2 threads, 64 connections, 10 s);
# then the API alone at 20,000 requests/s open loop (recpipe-loadtest query) for its p99.
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
run() { wrk -t2 -c64 -d10s --latency "$1" | awk "/Requests\/sec/ {rps=\$2} / 99%/ {p99=\$2} END {print rps, p99}"; }
read api_rps api_p99 < <(run "$api/v1/users/bench-user/recommendations?k=10")
read triv_rps triv_p99 < <(run "http://127.0.0.1:8090/v1/users/bench-user/recommendations?k=10")
kill $trivial
echo "query-api: $api_rps requests/s, p99 $api_p99 (wrk, 64 connections)"
echo "trivial:   $triv_rps requests/s, p99 $triv_p99"
python3 -c "print(\"ratio query-api / trivial: %.3f\" % ($api_rps / $triv_rps))"
target/release/recpipe-loadtest --catalog .run/catalog query --rate 20000 --seconds 10 --users 10000 | grep GET
'
