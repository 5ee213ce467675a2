#!/usr/bin/env bash
# Runs schemathesis (PyPI) against a live query API on loopback: the whole pipeline on
# the debug binaries, a private tansu broker and store, and the API's own
# /openapi.json. Fails on any 5xx or any answer the document does not describe.
# Usage: scripts/api-conformance.sh [max examples per operation, default 40]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
examples="${1:-40}"
venv="$root/.tools/venv"
[ -x "$venv/bin/schemathesis" ] || { python3 -m venv "$venv"; "$venv/bin/pip" install --quiet --disable-pip-version-check schemathesis; }
# The binaries as `cargo test --workspace` builds them (with its features): after
# scripts/test.sh's tests this builds nothing. A `cargo build -p ...` resolves features
# differently and compiled recpipe-shared and everything above it again (5 minutes of CI).
cargo test --workspace --no-run --quiet
bin="$root/target/debug"
work="$(mktemp -d)"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
kafka_port=$(free_port); api_port=$(free_port)
mkdir -p "$work/broker" "$work/config"
url="tcp://127.0.0.1:$kafka_port"
(cd "$work/broker" && exec env -u CLUSTER_ID -u LISTENER_URL -u ADVERTISED_LISTENER_URL -u STORAGE_ENGINE \
  "$root/.tools/bin/tansu" broker --listener-url "$url" --advertised-listener-url "$url" --storage-engine memory://tansu/ \
  >"$work/tansu.log" 2>&1) &
pids+=($!)
export RECPIPE_CONFIG_DIR="$work/config" RECPIPE_KAFKA__BROKERS="127.0.0.1:$kafka_port" \
  RECPIPE_STORE__URL="sqlite://$work/recpipe.db" RECPIPE_CATALOG__DIR="$work/catalog" RECPIPE_API__PORT="$api_port" \
  RECPIPE_TELEMETRY__LEVEL=warn
for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$kafka_port") 2>/dev/null && break; sleep 0.1; done
"$bin/recpipe-admin" topics create >/dev/null
"$bin/recpipe-admin" catalog generate --products 500 --dim 16 >/dev/null
for service in update-embeddings gen-recommendations save-worker query-api; do
  "$bin/$service" >"$work/$service.log" 2>&1 &
  pids+=($!)
done
api="http://127.0.0.1:$api_port"
for _ in $(seq 1 200); do curl -fsS "$api/readyz" >/dev/null 2>&1 && break; sleep 0.1; done
# positive_data_acceptance is left out: a schema-valid request may still be refused for
# reasons no static schema can state (an unknown product or category, an event time
# outside events.max_future_secs / max_age_days), with a 400 that says so.
"$venv/bin/schemathesis" run "$api/openapi.json" \
  --checks all --exclude-checks positive_data_acceptance \
  --max-examples "$examples" --workers 1 --no-color --suppress-health-check all
