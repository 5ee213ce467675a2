#!/usr/bin/env bash
# save-worker alone: pauses update-embeddings and gen-recommendations (SIGSTOP), POSTs N
# events, and prints save-worker's CPU seconds and how long after the producer it had
# stored them all. Run inside a pipeline:
#   bench/with-pipeline.sh bench/save-worker-drain.sh 200000
# (RECPIPE_DEMO_BIN_DIR=<dir> runs other service binaries, for an A/B.)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
n=${1:-100000}
resume() { pkill -CONT -f "/update-embeddings( |$)" || true; pkill -CONT -f "/gen-recommendations( |$)" || true; }
trap resume EXIT
pkill -STOP -f "/update-embeddings( |$)"
pkill -STOP -f "/gen-recommendations( |$)"
worker=$(pgrep -f "/save-worker( |$)" | head -1)
records() { curl -fsS 127.0.0.1:9103/metrics | awk '/^recpipe_records_total/ {s += $NF} END {print s + 0}'; }
cpu_ticks() { read -r -a f <"/proc/$worker/stat"; echo $((f[13] + f[14])); }
r0=$(records)
c0=$(cpu_ticks)
"$root/target/release/recpipe-loadtest" --catalog "$root/.run/catalog" events \
  --events "$n" --users $((n / 10)) --rate 50000 --batch 200 >/dev/null
t0=$(date +%s.%N)
for _ in $(seq 1 3000); do
  [ $(($(records) - r0)) -ge "$n" ] && break
  sleep 0.2
done
stored=$(($(records) - r0))
[ "$stored" -ge "$n" ] || { echo "save-worker took $stored of $n records in 10 min; see .run/logs/save-worker.log" >&2; exit 1; }
t1=$(date +%s.%N)
c1=$(cpu_ticks)
awk -v n="$n" -v c=$((c1 - c0)) -v hz="$(getconf CLK_TCK)" -v t0="$t0" -v t1="$t1" \
  'BEGIN { t = t1 - t0; printf "save-worker: %d events stored, %.2f s CPU (%.1f us/event), done %.2f s after the producer\n", n, c / hz, c / hz / n * 1e6, t }'
