#!/usr/bin/env bash
# Sets up everything the tests need (the tansu broker, the deployment validators) and
# runs them: formatting, lints, deployment files, then every test of the workspace. Each integration test starts its own broker
# on a free loopback port.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

# Each heading gives the time the run has taken so far, so a slow CI log shows where.
step() { printf '\n== [%dm%02ds] %s\n' $((SECONDS / 60)) $((SECONDS % 60)) "$*"; }

step "what the build needs (a C compiler, make, pkg-config, OpenSSL's headers)"
scripts/check-build-deps.sh

step "installing the broker (cached after the first run)"
scripts/install-tansu.sh

step "vendored rdkafka: crates.io's 0.39.0 plus vendor/rdkafka.patch"
scripts/check-vendor.sh

step "the summary of a failed cargo test, against its fixture"
scripts/check-test-failures.sh

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy -D warnings"
cargo clippy --workspace --all-targets --quiet -- -D warnings

step "deployment files (compose, Kubernetes, YAML, Dockerfile)"
scripts/validate-deploy.sh

step "cargo test"
if [ -z "${SCYLLA_URI:-}" ]; then
  echo "(SCYLLA_URI is not set: no ScyllaDB backend tests run here; the embedded store's suite does)"
fi
results="$(mktemp)"
trap 'rm -f "$results"' EXIT
test_status=0
cargo test --workspace --no-fail-fast 2>&1 | tee "$results" || test_status=$?
if [ "$test_status" -ne 0 ]; then
  # The failures are far up a long log (and CI may show only its end): repeat each
  # failed test's panic, each hung test's stacks in brief, each crashed binary, here, last.
  step "cargo test failed (exit $test_status); the failures, repeated:"
  awk -f scripts/test-failures.awk "$results"
  exit "$test_status"
fi

step "API conformance: schemathesis against the live API and its /openapi.json"
scripts/api-conformance.sh 40

# One closing line for the whole run, summed over every cargo test binary.
awk '/^test result:/ { p += $4; f += $6 } END { printf "tests: %d passed, %d failed\n", p, f }' "$results"
step "done"
