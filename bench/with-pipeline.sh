#!/usr/bin/env bash
# Runs a command against the whole pipeline: starts it on the embedded defaults
# (scripts/demo.sh --serve: tansu, the four release services, SQLite, API on
# 127.0.0.1:8080, service metrics on 127.0.0.1:9101-9103), waits until it is ready, runs
# "$@", and stops everything (SIGTERM) whatever the command's outcome.
#   bench/with-pipeline.sh target/release/recpipe-loadtest freshness --rate 10
# RECPIPE_CONFIG_DIR points the services at another configuration directory.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
api="http://127.0.0.1:${RECPIPE_DEMO_API_PORT:-8080}"
log="$(mktemp -t recpipe-pipeline.XXXXXX.log)"
scripts/demo.sh --serve >"$log" 2>&1 &
demo=$!
trap 'kill -TERM $demo 2>/dev/null; wait $demo 2>/dev/null || true' EXIT
for _ in $(seq 1 3000); do
  curl -fsS "$api/readyz" >/dev/null 2>&1 && break
  kill -0 $demo 2>/dev/null || { cat "$log"; exit 1; }
  sleep 0.2
done
curl -fsS "$api/readyz" >/dev/null || { cat "$log"; exit 1; }
"$@"
