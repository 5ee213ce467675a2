#!/usr/bin/env bash
# Runs a command while the pipeline runs and prints each pipeline process's CPU seconds
# (user + system, from /proc/<pid>/stat) over the command: how BENCHMARKS.md splits a
# run's CPU among tansu and the four services. The command's exit status is kept.
#   bench/with-pipeline.sh bench/cpu.sh target/release/recpipe-loadtest --catalog .run/catalog \
#     freshness --rate 10 --seconds 30 --events-rate 4806
set -uo pipefail
names=(tansu update-embeddings gen-recommendations save-worker query-api)
cpu() { awk '{printf "%.2f", ($14 + $15) / 100}' "/proc/$1/stat" 2>/dev/null; }
declare -A pid before
for n in "${names[@]}"; do
  pid[$n]=$(pgrep -f "/$n( |$)" | head -1)
  if [ -z "${pid[$n]}" ]; then
    echo "bench/cpu.sh: $n is not running; start the pipeline with it: bench/with-pipeline.sh bench/cpu.sh COMMAND" >&2
    exit 2
  fi
  before[$n]=$(cpu "${pid[$n]}")
done
. "$(dirname "$0")/stolen.sh"
steal0=$(stolen_ticks)
started=$(date +%s.%N)
"$@"
status=$?
seconds=$(awk -v s="$started" -v e="$(date +%s.%N)" 'BEGIN {printf "%.1f", e - s}')
total=0
for n in "${names[@]}"; do
  after=$(cpu "${pid[$n]}") || {
    # Its CPU time went with it: say so rather than print a figure that is not one.
    printf '%-20s exited during the command (see its log in .run/logs)\n' "$n"
    continue
  }
  used=$(awk -v a="${before[$n]}" -v b="$after" 'BEGIN {printf "%.2f", b - a}')
  total=$(awk -v t="$total" -v u="$used" 'BEGIN {printf "%.2f", t + u}')
  printf '%-20s %6s CPU s  (%4.1f %% of a core)\n' "$n" "$used" "$(awk -v u="$used" -v s="$seconds" 'BEGIN {print 100 * u / s}')"
done
printf '%-20s %6s CPU s over %s s\n' "all" "$total" "$seconds"
stolen=$(($(stolen_ticks) - steal0))
printf '%-20s %6s CPU s  (%s %% of the machine; the hypervisor gave it to other guests)\n' "stolen" \
  "$(awk -v t="$stolen" -v hz="$(getconf CLK_TCK)" 'BEGIN {printf "%.2f", t / hz}')" "$(stolen_share "$stolen" "$seconds")"
exit "$status"
