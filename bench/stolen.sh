# Sourced by the benchmark scripts: CPU time the hypervisor gave to other guests while a
# benchmark ran ("steal" in /proc/stat). On a shared VM it moves the figures with no change
# to recpipe: in the thirty-sixth session, freshness p99 at 7,208 events/s was 64 ms in a
# run that lost 6 % of the machine this way and 186-190 ms in runs that lost 16-23 %.
stolen_ticks() { awk '/^cpu / {print $9}' /proc/stat; }
# stolen_share TICKS SECONDS: the share of all cores' time over SECONDS, in %.
stolen_share() {
  awk -v t="$1" -v s="$2" -v n="$(nproc)" -v hz="$(getconf CLK_TCK)" \
    'BEGIN {printf "%.1f", (s > 0) ? 100 * t / hz / (s * n) : 0}'
}
