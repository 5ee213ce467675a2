#!/usr/bin/env bash
# The peak run: the whole pipeline on the embedded defaults, then events, GETs and
# freshness probes at once with the event rate raised step by step until the pipeline
# stops keeping up. Writes the report (summary.json, SVG plots, report.html) to $1
# (default: loadtest/example-peak); extra arguments go to `recpipe-loadtest peak`.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-loadtest/example-peak}"
shift || true
cargo build --release --workspace --bins --quiet
# The services' consumer lag refreshed every second rather than librdkafka's 5 s here, so
# that each step is judged on its lag's trend over a reading a second, not on 2-4 values.
export RECPIPE_KAFKA__CLIENT__STATISTICS_INTERVAL_MS="${RECPIPE_KAFKA__CLIENT__STATISTICS_INTERVAL_MS:-1000}"
. bench/stolen.sh
steal0=$(stolen_ticks) started=$SECONDS
bench/with-pipeline.sh target/release/recpipe-loadtest --catalog .run/catalog peak \
  --metrics http://127.0.0.1:9101/metrics --metrics http://127.0.0.1:9102/metrics \
  --metrics http://127.0.0.1:9103/metrics --report "$out" "$@"
echo "stolen: $(stolen_share $(($(stolen_ticks) - steal0)) $((SECONDS - started))) % of the machine's CPU over the run went to other guests of the hypervisor"
