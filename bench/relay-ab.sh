#!/usr/bin/env bash
# The pipeline ÷ relay benchmark for two builds, alternated: one round of bench/relay.sh
# for each, ROUNDS times, the one that goes first swapped every round, each round on a
# fresh pipeline. On a shared 2-core VM the host's noise comes and goes within minutes,
# so builds run in separate scripts meet different hours (BENCHMARKS.md, thirty-eighth
# session). Prints each round, then each build's median ratio, pipeline and lists
# seconds, and how many pairs the new build stored sooner.
#   bench/relay-ab.sh OLD_BIN [ROUNDS (6)] [EVENTS (200000)] [USERS (20000)]
# OLD_BIN holds the other build's update-embeddings, gen-recommendations, save-worker,
# query-api, recpipe-loadtest and recpipe-admin (e.g. a copy of its target/release).
# RECPIPE_AB_OLD_CONFIG is its configuration directory (default ./configuration): a
# build refuses settings it does not know, so an older one may need its own copy
# (git show OLD:configuration/base.yaml > DIR/base.yaml). The new build is this
# checkout's, built by bench/with-pipeline.sh.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
usage="usage: bench/relay-ab.sh OLD_BIN [ROUNDS] [EVENTS] [USERS]"
old_bin=${1:?$usage}
rounds=${2:-6}
events=${3:-200000}
users=${4:-20000}
old_config=${RECPIPE_AB_OLD_CONFIG:-$root/configuration}
for binary in update-embeddings gen-recommendations save-worker query-api recpipe-loadtest recpipe-admin; do
  [ -x "$old_bin/$binary" ] || { echo "bench/relay-ab.sh: $old_bin/$binary is missing; OLD_BIN must hold the other build's binaries ($usage)" >&2; exit 2; }
done
[ -f "$old_config/base.yaml" ] || { echo "bench/relay-ab.sh: no base.yaml in $old_config (RECPIPE_AB_OLD_CONFIG)" >&2; exit 2; }
case $rounds in '' | *[!0-9]* | 0) echo "bench/relay-ab.sh: ROUNDS must be a positive number ($usage)" >&2; exit 2 ;; esac
results="$(mktemp -t recpipe-relay-ab.XXXXXX)"

# One round of one build; appends "build relay lists pipeline ratio stolen" to $results.
round() {
  local build=$1 output row
  if [ "$build" = old ]; then
    output=$(RECPIPE_CONFIG_DIR="$old_config" RECPIPE_DEMO_BIN_DIR="$old_bin" bench/relay.sh 1 "$events" "$users")
  else
    output=$(bench/relay.sh 1 "$events" "$users")
  fi
  # relay.sh's row: round, relay s, lists s, pipeline s, ratio, stolen %.
  row=$(echo "$output" | awk -v b="$build" '$1 == "1" && NF == 6 {print b, $2, $3, $4, $5, $6}')
  if [ -z "$row" ]; then
    echo "$output" >&2
    echo "bench/relay-ab.sh: bench/relay.sh printed no row for the $build build (above)" >&2
    exit 1
  fi
  printf '%-6s %10s %10s %10s %7s %9s\n' $row
  echo "$row" >>"$results"
}

printf '%-6s %10s %10s %10s %7s %9s\n' build 'relay s' 'lists s' 'pipeline s' ratio 'stolen %'
for i in $(seq 1 "$rounds"); do
  if [ $((i % 2)) = 1 ]; then round old; round new; else round new; round old; fi
done
python3 - "$results" <<'EOF'
import statistics, sys
rows = [line.split() for line in open(sys.argv[1]) if line.strip()]
side = {b: [[float(x) for x in r[1:]] for r in rows if r[0] == b] for b in ("old", "new")}
for b in ("old", "new"):
    ratio = [r[3] for r in side[b]]
    print(f"{b}: ratio median {statistics.median(ratio):.3f} ({min(ratio):.3f}-{max(ratio):.3f}; "
          f"at least 0.8 in {sum(x >= 0.8 for x in ratio)} of {len(ratio)}), "
          f"pipeline median {statistics.median(r[2] for r in side[b]):.2f} s, "
          f"lists median {statistics.median(r[1] for r in side[b]):.2f} s, "
          f"stolen {min(r[4] for r in side[b]):.1f}-{max(r[4] for r in side[b]):.1f} %")
sooner = sum(n[2] < o[2] for o, n in zip(side["old"], side["new"]))
print(f"the new build stored everything sooner in {sooner} of {len(side['new'])} pairs")
EOF
echo "rounds: $results (a round that lost much to the host measures the host)"
