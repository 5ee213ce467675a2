#!/usr/bin/env bash
# Checks scripts/test-failures.awk, which sums up a failed `cargo test` at the end of a CI
# log, against a log with a hung test (the watchdog's stacks), a crashed test binary and
# a failed assertion: if it stops showing them, CI's failures would be out of sight.
set -euo pipefail
cd "$(dirname "$0")"
if ! diff -u testdata/cargo-test-failures.expected \
  <(awk -f test-failures.awk testdata/cargo-test-failures.log); then
  echo "scripts/test-failures.awk's summary changed (above: - expected, + now)." >&2
  echo "If the change is meant, regenerate: awk -f scripts/test-failures.awk scripts/testdata/cargo-test-failures.log > scripts/testdata/cargo-test-failures.expected" >&2
  exit 1
fi
echo "the failure summary shows the hung test's stacks, the crashed binary and the panic"
