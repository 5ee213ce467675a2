#!/usr/bin/env bash
# CPU of the idle pipeline: starts it on the embedded defaults (bench/with-pipeline.sh),
# lets it settle, then reports each process's CPU seconds over SECONDS (default 20) with
# no traffic at all. On tansu every consumer polls once per fetch.wait.max.ms whether or
# not there is data, so this is what the pipeline's consumers cost the broker at rest.
#   bench/idle.sh [SECONDS]
# Settings come from the environment as usual, e.g.
#   RECPIPE_KAFKA__BACKGROUND_FETCH_WAIT_MAX_MS=1 bench/idle.sh   (save-worker at 1 ms)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" != "--inside" ]; then
  [ -n "${RECPIPE_DEMO_BIN_DIR:-}" ] || cargo build --release --workspace --bins --quiet
  exec bench/with-pipeline.sh "$0" --inside "${1:-20}"
fi
seconds="$2"
sleep 5 # start-up work (restores, first popularity list) done
cpu() { awk '{printf "%.2f", ($14 + $15) / 100}' "/proc/$1/stat"; }
names=(tansu update-embeddings gen-recommendations save-worker query-api)
declare -A pid before
for n in "${names[@]}"; do
  pid[$n]=$(pgrep -f "/$n( |$)" | head -1)
  before[$n]=$(cpu "${pid[$n]}")
done
sleep "$seconds"
total=0
for n in "${names[@]}"; do
  used=$(awk -v a="${before[$n]}" -v b="$(cpu "${pid[$n]}")" 'BEGIN {printf "%.2f", b - a}')
  total=$(awk -v t="$total" -v u="$used" 'BEGIN {printf "%.2f", t + u}')
  printf '%-20s %6s CPU s  (%4.1f %% of a core)\n' "$n" "$used" "$(awk -v u="$used" -v s="$seconds" 'BEGIN {print 100 * u / s}')"
done
printf '%-20s %6s CPU s over %s s idle\n' "all" "$total" "$seconds"
