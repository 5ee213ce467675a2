#!/usr/bin/env bash
# User state in memory per user ÷ the raw vector, as update-embeddings keeps it, against
# the same states all held in memory (the limit before the state file), in one script.
# Each line is its own process, so one run's freed memory does not flatter the next.
# Every case runs with sequential event ids and again with random UUIDs (which do not
# front-code: the larger states).
# Usage: bench/memory.sh [USERS] [EVENTS_PER_USER...]   (default 100000 users; 1 10 60)
set -euo pipefail
cd "$(dirname "$0")/.."
users="${1:-100000}"
shift || true
per_user=("${@:-1 10 60}")
cargo build --release -p recpipe-loadtest -p recpipe-shared --quiet
[ -f .run/catalog/products.jsonl ] || target/release/recpipe-admin catalog generate --products 2000 --dim 32 >/dev/null
run() { target/release/recpipe-loadtest --catalog .run/catalog memory --users "$users" --events-per-user "$1" --event-ids "$2" ${3:+--hot-users "$3"} | sed -n 1p; }
for ids in sequential uuid; do
  for n in ${per_user[*]}; do
    echo "-- $users users, $n events each, $ids event ids"
    run "$n" "$ids" "$users"   # every state in memory
    run "$n" "$ids"            # the service's default state.hot_users
  done
done
