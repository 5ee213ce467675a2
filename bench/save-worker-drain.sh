#!/usr/bin/env bash
# save-worker alone: pauses update-embeddings and gen-recommendations (SIGSTOP), POSTs N
# events, and prints save-worker's CPU seconds and how long after the producer it had
# stored them all (by its records counter, which counts a batch when its write starts:
# the last write may still be running). Run inside a pipeline:
#   bench/with-pipeline.sh bench/save-worker-drain.sh 200000
# With --backlog, a backlog instead: save-worker is paused while the N events go through
# update-embeddings and gen-recommendations (so it has their states and lists to store
# too), then resumed, and timed until its group has committed to the end of every topic
# it reads (`recpipe-loadtest stored`):
#   bench/with-pipeline.sh bench/save-worker-drain.sh 200000 --backlog
# (RECPIPE_DEMO_BIN_DIR=<dir> runs other service binaries, for an A/B.)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
n=${1:-100000}
mode=${2:-}
loadtest="$root/target/release/recpipe-loadtest"
worker=$(pgrep -f "/save-worker( |$)" | head -1)
cpu_ticks() { read -r -a f <"/proc/$worker/stat"; echo $((f[13] + f[14])); }
records() { curl -fsS "127.0.0.1:$1/metrics" | awk '/^recpipe_records_total/ {s += $NF} END {print s + 0}'; }
. "$root/bench/stolen.sh"
# The share of the machine the hypervisor took back between two stolen_ticks readings.
stolen_between() { stolen_share $(($2 - $1)) "$(awk -v a="$3" -v b="$4" 'BEGIN {print b - a}')"; }

if [ "$mode" = --backlog ]; then
  trap 'kill -CONT "$worker" 2>/dev/null || true' EXIT
  kill -STOP "$worker"
  u0=$(records 9101)
  "$loadtest" --catalog "$root/.run/catalog" events \
    --events "$n" --users $((n / 10)) --rate 100000 --batch 500 >/dev/null
  # Until update-embeddings has read them all and gen-recommendations has stopped moving.
  for _ in $(seq 1 3000); do
    [ $(($(records 9101) - u0)) -ge "$n" ] && break
    sleep 0.2
  done
  g=-1
  until [ "$g" = "$(records 9102)" ]; do g=$(records 9102); sleep 1; done
  c0=$(cpu_ticks) s0=$(stolen_ticks)
  t0=$(date +%s.%N)
  kill -CONT "$worker"
  "$loadtest" stored --timeout 600 >/dev/null
  t1=$(date +%s.%N)
  c1=$(cpu_ticks) s1=$(stolen_ticks)
  awk -v n="$n" -v c=$((c1 - c0)) -v hz="$(getconf CLK_TCK)" -v t0="$t0" -v t1="$t1" -v stolen="$(stolen_between "$s0" "$s1" "$t0" "$t1")" \
    'BEGIN { printf "save-worker: a backlog of %d events with their states and lists stored in %.2f s, %.2f s CPU (stolen %s %%)\n", n, t1 - t0, c / hz, stolen }'
  exit 0
fi

resume() { pkill -CONT -f "/update-embeddings( |$)" || true; pkill -CONT -f "/gen-recommendations( |$)" || true; }
trap resume EXIT
pkill -STOP -f "/update-embeddings( |$)"
pkill -STOP -f "/gen-recommendations( |$)"
r0=$(records 9103)
c0=$(cpu_ticks)
"$loadtest" --catalog "$root/.run/catalog" events \
  --events "$n" --users $((n / 10)) --rate 50000 --batch 200 >/dev/null
t0=$(date +%s.%N) s0=$(stolen_ticks)
for _ in $(seq 1 3000); do
  [ $(($(records 9103) - r0)) -ge "$n" ] && break
  sleep 0.2
done
stored=$(($(records 9103) - r0))
[ "$stored" -ge "$n" ] || { echo "save-worker took $stored of $n records in 10 min; see .run/logs/save-worker.log" >&2; exit 1; }
t1=$(date +%s.%N)
c1=$(cpu_ticks) s1=$(stolen_ticks)
# Stolen from the producer's end until all is stored.
awk -v n="$n" -v c=$((c1 - c0)) -v hz="$(getconf CLK_TCK)" -v t0="$t0" -v t1="$t1" -v stolen="$(stolen_between "$s0" "$s1" "$t0" "$t1")" \
  'BEGIN { t = t1 - t0; printf "save-worker: %d events stored, %.2f s CPU (%.1f us/event), done %.2f s after the producer (stolen %s %%)\n", n, c / hz, c / hz / n * 1e6, t, stolen }'
