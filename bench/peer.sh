#!/usr/bin/env bash
# recpipe against the peer Python pipeline (../shared/bench/peer_pipeline.py: the usual
# one-process-per-stage design with numpy, hnswlib, sqlite and confluent-kafka), both
# draining the same backlog on a fresh tansu broker, alternated in one script; see
# bench/peer_vs_recpipe.py. Installs numpy, hnswlib and confluent-kafka into
# .tools/bench-venv. Arguments go to the script: --events (50000), --rounds (2),
# --partitions (1), --only (peer,recpipe,recpipe-ef-128: recpipe with its defaults, whose
# ef_search is calibrated on the catalog, and with the fixed ef_search 128 that was the
# default before; name one, e.g. to profile it).
# RECPIPE_DEMO_BIN_DIR runs another build's binaries; RECPIPE_PEER_KEEP=1 keeps each
# run's directory (logs, store).
set -euo pipefail
cd "$(dirname "$0")/.."
peer="${RECPIPE_PEER_PIPELINE:-../shared/bench/peer_pipeline.py}"
if [ ! -f "$peer" ]; then
  echo "skipped: the peer pipeline $peer is not here (it comes with ../shared; set RECPIPE_PEER_PIPELINE to its path)" >&2
  exit 0
fi
venv=.tools/bench-venv
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/python" -c 'import numpy, hnswlib, confluent_kafka' 2>/dev/null ||
  "$venv/bin/pip" install --quiet numpy hnswlib confluent-kafka
scripts/install-tansu.sh
bin="${RECPIPE_DEMO_BIN_DIR:-target/release}"
if [ -z "${RECPIPE_DEMO_BIN_DIR:-}" ]; then
  cargo build --release --workspace --bins --quiet
fi
exec "$venv/bin/python" bench/peer_vs_recpipe.py --peer "$peer" --bin "$bin" \
  --tansu .tools/bin/tansu --python "$venv/bin/python" "$@"
