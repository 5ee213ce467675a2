#!/usr/bin/env bash
# CPU of the idle pipeline: starts it on the embedded defaults (bench/with-pipeline.sh),
# lets it settle, then reports each process's CPU seconds over SECONDS (default 20) with
# no traffic at all: what the pipeline's consumers cost the broker at rest (each asks
# again once per fetch.wait.max.ms when nothing comes; the patched tansu, like Kafka,
# holds an empty fetch until then or until a produce).
#   bench/idle.sh [SECONDS]
# Settings come from the environment as usual, e.g.
#   RECPIPE_KAFKA__BACKGROUND_FETCH_WAIT_MAX_MS=10 bench/idle.sh   (save-worker at 10 ms)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" != "--inside" ]; then
  [ -n "${RECPIPE_DEMO_BIN_DIR:-}" ] || cargo build --release --workspace --bins --quiet
  exec bench/with-pipeline.sh "$0" --inside "${1:-20}"
fi
seconds="$2"
sleep 5 # start-up work (restores, first popularity list) done
exec bench/cpu.sh sleep "$seconds"
