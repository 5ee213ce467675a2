#!/usr/bin/env bash
# recpipe's HNSW against hnswlib (PyPI) on the same vectors, queries and k, one thread,
# in one run: queries/s at recall@10 >= 0.95. Installs numpy and hnswlib into
# .tools/bench-venv. Size: RECPIPE_ANN_PRODUCTS (100000) × 64 dims, 1000 queries per set.
set -euo pipefail
cd "$(dirname "$0")/.."
out=target/ann-bench
venv=.tools/bench-venv
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet numpy hnswlib
fi
cargo build --release -p recpipe-loadtest --quiet
target/release/recpipe-loadtest ann --out "$out" --products "${RECPIPE_ANN_PRODUCTS:-100000}" >"$out.jsonl.tmp"
mkdir -p "$out" && mv "$out.jsonl.tmp" "$out/recpipe.jsonl"
"$venv/bin/python" bench/ann_vs_hnswlib.py "$out"
