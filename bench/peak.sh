#!/usr/bin/env bash
# The peak run: starts the whole pipeline on the embedded defaults (scripts/demo.sh
# --serve: tansu, the four services in release builds, SQLite), then raises the event
# rate step by step with GETs and freshness probes running, until the pipeline stops
# keeping up. Writes the report (summary.json, SVG plots, report.html) to $1
# (default: loadtest/example-peak). Extra arguments go to `recpipe-loadtest peak`.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
out="${1:-loadtest/example-peak}"
shift || true
api_port="${RECPIPE_DEMO_API_PORT:-8080}"
api="http://127.0.0.1:$api_port"

scripts/demo.sh --serve >/tmp/recpipe-peak-demo.log 2>&1 &
demo=$!
trap 'kill -TERM $demo 2>/dev/null; wait $demo 2>/dev/null || true' EXIT
for _ in $(seq 1 3000); do
  curl -fsS "$api/readyz" >/dev/null 2>&1 && break
  kill -0 $demo 2>/dev/null || { cat /tmp/recpipe-peak-demo.log; exit 1; }
  sleep 0.2
done
curl -fsS "$api/readyz" >/dev/null
target/release/recpipe-loadtest --api "$api" --catalog .run/catalog peak \
  --metrics http://127.0.0.1:9101/metrics --metrics http://127.0.0.1:9102/metrics \
  --metrics http://127.0.0.1:9103/metrics --report "$out" "$@"
