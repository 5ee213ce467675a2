#!/usr/bin/env bash
# Sets up and runs the whole pipeline on the embedded defaults: builds, starts a tansu
# broker and the four services, sends a burst of synthetic shopping traffic, prints a
# few users' recommendations, then swaps in a second model beside the first (an A/B
# experiment) while shoppers click what they like, prints the click-through per model,
# and leaves the API and its status page up until Ctrl-C stops everything.
#   scripts/demo.sh            run, then wait for Ctrl-C
#   scripts/demo.sh --no-wait  run, print, stop (for scripts)
#   scripts/demo.sh --serve    start everything, send no traffic, wait (for benchmarks)
# Ports: RECPIPE_DEMO_KAFKA_PORT (19092), RECPIPE_DEMO_API_PORT (8080); the experiment
# runs RECPIPE_DEMO_SHOP_SECS (20) seconds. RECPIPE_DEMO_BIN_DIR runs the binaries of another
# build instead of building this checkout's (benchmarks comparing two builds in one script);
# TANSU_BIN runs another tansu binary (as the tests' broker does).
# save-worker runs at nice RECPIPE_DEMO_BACKGROUND_NICE (10; 0 for none): nobody waits on
# it, and on one machine it would otherwise take CPU from the hops an event's list waits on.
set -euo pipefail
# Taken before the cd below, so that a relative path means what the caller meant.
tansu="${TANSU_BIN:-}"
case "$tansu" in
  "" | /*) ;;
  *) tansu="$PWD/$tansu" ;;
esac
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
wait_for_ctrl_c=1
serve_only=0
case "${1:-}" in
  --no-wait) wait_for_ctrl_c=0 ;;
  --serve) serve_only=1 ;;
  "") ;;
  *) echo "usage: scripts/demo.sh [--no-wait | --serve]" >&2; exit 2 ;;
esac
kafka_port="${RECPIPE_DEMO_KAFKA_PORT:-19092}"
api_port="${RECPIPE_DEMO_API_PORT:-8080}"
shop_secs="${RECPIPE_DEMO_SHOP_SECS:-20}"
background_nice="${RECPIPE_DEMO_BACKGROUND_NICE:-10}"
case "$background_nice" in
  [0-9] | 1[0-9]) ;;
  *) echo "RECPIPE_DEMO_BACKGROUND_NICE must be a niceness from 0 to 19, not '$background_nice'" >&2; exit 2 ;;
esac
run="$root/.run"
logs="$run/logs"
prebuilt="${RECPIPE_DEMO_BIN_DIR:-}"
unset RECPIPE_DEMO_BIN_DIR
bin="${prebuilt:-$root/target/release}"

say() { printf '\033[1m== %s\033[0m\n' "$*"; }
in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

for port in "$kafka_port" "$api_port"; do
  if in_use "$port"; then
    echo "port $port on 127.0.0.1 is already in use (another demo still running?)." >&2
    echo "Stop it, or pick other ports: RECPIPE_DEMO_KAFKA_PORT=29092 RECPIPE_DEMO_API_PORT=8081 scripts/demo.sh" >&2
    exit 1
  fi
done

# Before the broker's build too, which needs the same C toolchain.
[ -n "$prebuilt" ] || scripts/check-build-deps.sh

if [ -n "$tansu" ]; then
  [ -x "$tansu" ] || { echo "TANSU_BIN=$tansu is not an executable file" >&2; exit 2; }
  say "1/7 using the tansu broker at $tansu (TANSU_BIN)"
else
  say "1/7 installing the tansu broker (cached after the first run)"
  scripts/install-tansu.sh
  tansu="$root/.tools/bin/tansu"
fi

if [ -n "$prebuilt" ]; then
  say "2/7 using the binaries in $bin (RECPIPE_DEMO_BIN_DIR)"
else
  say "2/7 building recpipe (release)"
  cargo build --release --workspace --bins --quiet
fi

say "3/7 starting the broker on 127.0.0.1:$kafka_port"
rm -rf "$run/broker" "$run"/recpipe.db*
mkdir -p "$run/broker" "$logs"
pids=()
stop_all() {
  trap - INT TERM EXIT
  echo
  say "stopping"
  for pid in "${pids[@]:1}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]:1}"; do wait "$pid" 2>/dev/null || true; done
  kill -TERM "${pids[0]}" 2>/dev/null || true
  wait "${pids[0]}" 2>/dev/null || true
  echo "stopped; logs are in $logs"
}
trap stop_all EXIT
trap 'exit 0' INT TERM
url="tcp://127.0.0.1:$kafka_port"
# tansu reads settings from the environment and a .env file: run it in an empty directory
# with every setting given as a flag.
(cd "$run/broker" && exec env -u CLUSTER_ID -u LISTENER_URL -u ADVERTISED_LISTENER_URL -u STORAGE_ENGINE \
  "$tansu" broker --listener-url "$url" --advertised-listener-url "$url" \
  --storage-engine memory://tansu/ >"$logs/tansu.log" 2>&1) &
pids+=($!)
for _ in $(seq 1 100); do in_use "$kafka_port" && break; sleep 0.1; done
in_use "$kafka_port" || { echo "the broker did not start; see $logs/tansu.log" >&2; exit 1; }

export RECPIPE_KAFKA__BROKERS="127.0.0.1:$kafka_port"
export RECPIPE_API__PORT="$api_port"
export RECPIPE_STORE__URL="sqlite://$run/recpipe.db"
export RECPIPE_CATALOG__DIR="$run/catalog"
"$bin/recpipe-admin" topics create
"$bin/recpipe-admin" catalog generate --products 2000 --dim 32

say "4/7 starting update-embeddings, gen-recommendations, save-worker, query-api"
# Pipeline services expose /metrics, /healthz and /readyz on 9101-9103.
admin_port=9101
# save-worker yields the CPU to the others when both cores are busy (it still gets what
# they leave): at 7,208 events/s freshness p99 fell from 94-129 to 79-84 ms (BENCHMARKS.md).
for service in update-embeddings gen-recommendations save-worker query-api; do
  niceness=0
  [ "$service" = save-worker ] && niceness="$background_nice"
  RECPIPE_TELEMETRY__ADMIN_ADDRESS="127.0.0.1:$admin_port" nice -n "$niceness" "$bin/$service" >"$logs/$service.log" 2>&1 &
  pids+=($!)
  admin_port=$((admin_port + 1))
done
api="http://127.0.0.1:$api_port"
for _ in $(seq 1 300); do
  curl -fsS "$api/readyz" >/dev/null 2>&1 && break
  sleep 0.1
done
curl -fsS "$api/readyz" >/dev/null || { echo "query-api is not ready; see $logs/query-api.log" >&2; exit 1; }

if [ "$serve_only" = 1 ]; then
  say "serving at $api (metrics: $api/metrics and 127.0.0.1:9101-9103/metrics); Ctrl-C or SIGTERM stops"
  wait "${pids[0]}"
  exit 0
fi

say "5/7 sending 3,000 events from 60 synthetic shoppers (each has a favourite category)"
"$bin/recpipe-loadtest" --api "$api" --catalog "$run/catalog" events --users 60 --events 3000 --rate 1500
events_sent_ms="$(date +%s%3N)"

say "6/7 what the pipeline recommends"
"$bin/recpipe-loadtest" --api "$api" --catalog "$run/catalog" show --users user-0001,user-0002,user-0003 --k 5
echo
echo "A user never seen gets the popularity list:"
# gen-recommendations republishes that list every 2 s: wait (up to 6 s) for one made
# after the events above, rather than show one that counted only the first few.
for _ in $(seq 1 30); do
  popular="$(curl -fsS "$api/v1/users/someone-new/recommendations?k=3")"
  made_ms="$(grep -o '"generated_at":[0-9]*' <<<"$popular" | cut -d: -f2)"
  [ "${made_ms:-0}" -ge "$events_sent_ms" ] && break
  sleep 0.2
done
echo "$popular"

say "7/7 an experiment: a second model beside the first, published without a restart"
# blurred-v1 has the same products with blurred embeddings: a weaker model on purpose.
"$bin/recpipe-admin" catalog blur --out "$run/model-blurred" --noise 2.0 --version blurred-v1
"$bin/recpipe-admin" models publish "synthetic-v1=$run/catalog:0.5" "blurred-v1=$run/model-blurred:0.5"
echo "50 shoppers for $shop_secs s: each GETs their list and clicks what matches their taste (status page: $api/status)"
"$bin/recpipe-loadtest" --api "$api" --catalog "$run/catalog" shop --shoppers 50 --seconds "$shop_secs"
echo
say "the API is up at $api"
cat <<EOT
  curl '$api/v1/users/user-0004/recommendations?k=5'
  curl '$api/v1/users/user-0004/events?limit=5'
  curl '$api/v1/experiments'         # click-through per model version
  open $api/status                   # live figures for a person
  curl -X POST $api/v1/events -H 'content-type: application/json' \\
       -d '{"event_id":"my-1","user_id":"me","type":"view","product_id":"p-00004","ts":$(date +%s000)}'
  logs: $logs
EOT
if [ "$wait_for_ctrl_c" = 1 ]; then
  echo "Press Ctrl-C to stop everything."
  wait "${pids[0]}"
fi
