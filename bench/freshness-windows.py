"""Freshness by windows of a long run: how it changes the longer the pipeline runs.

Reads the summary.json that `recpipe-loadtest freshness ... --report DIR` (or a `peak`
run's report) wrote and prints,
for each window of WINDOW seconds (default 30), the median of the per-second p50s and the
highest per-second p99, in milliseconds. BENCHMARKS.md's four-minute tables come from it:

    bench/with-pipeline.sh target/release/recpipe-loadtest --catalog .run/catalog \
        freshness --rate 10 --seconds 240 --events-rate 2000 --report /tmp/long
    python3 bench/freshness-windows.py /tmp/long/summary.json

Standard library only.
"""
import json
import statistics
import sys


def windows(summary, width):
    seconds = [s for s in summary["per_second"]["freshness"] if s.get("ok", 0) > 0]
    if not seconds:
        return []
    end = max(s["second"] for s in seconds) + 1
    rows = []
    for start in range(0, end, width):
        inside = [s for s in seconds if start <= s["second"] < start + width]
        if inside:
            rows.append(
                (
                    start,
                    min(start + width, end),
                    statistics.median(s["p50_ms"] for s in inside),
                    max(s["p99_ms"] for s in inside),
                )
            )
    return rows


def main(argv):
    if len(argv) not in (2, 3):
        sys.exit("usage: freshness-windows.py SUMMARY.json [WINDOW_SECONDS]")
    try:
        width = int(argv[2]) if len(argv) == 3 else 30
    except ValueError:
        width = 0
    if width <= 0:
        sys.exit("WINDOW_SECONDS must be a positive number of seconds")
    try:
        with open(argv[1]) as f:
            summary = json.load(f)
    except (OSError, ValueError) as e:
        sys.exit(f"cannot read {argv[1]}: {e}")
    if "freshness" not in summary.get("per_second", {}):
        sys.exit(f"{argv[1]} has no per-second freshness figures (a freshness or peak run's summary.json has)")
    rows = windows(summary, width)
    if not rows:
        sys.exit(f"{argv[1]} has no second with a freshness probe")
    print("seconds      p50 (median of the seconds')  p99 (highest second's)")
    for start, end, p50, p99 in rows:
        print(f"{start:>4}-{end:<4}  {p50:>10.1f} ms {p99:>27.0f} ms")
    whole = summary.get("freshness")
    if isinstance(whole, dict) and "p50_ms" in whole and "p99_ms" in whole:
        print(f"whole run  p50 {whole['p50_ms']:.1f} ms, p99 {whole['p99_ms']:.1f} ms")


if __name__ == "__main__":
    main(sys.argv)
