#!/usr/bin/env bash
# Checks, before a build, for what the build needs beyond a Rust toolchain, and says how
# to install what is missing rather than letting a -sys crate fail a minute in.
# librdkafka (built by rdkafka-sys) needs a C compiler and make, and links the system's
# OpenSSL for Kafka over TLS and SCRAM; SQLite is compiled from rusqlite's bundled source.
set -euo pipefail
missing=()
for tool in gcc make pkg-config; do
  command -v "$tool" >/dev/null || missing+=("$tool")
done
if command -v pkg-config >/dev/null && ! pkg-config --exists openssl; then
  missing+=("OpenSSL's headers (libssl-dev)")
fi
if [ ${#missing[@]} -gt 0 ]; then
  printf 'missing for the build: %s\n' "${missing[*]}" >&2
  echo "Debian/Ubuntu: apt-get install gcc make pkg-config libssl-dev" >&2
  echo "Fedora: dnf install gcc make pkgconf-pkg-config openssl-devel" >&2
  exit 1
fi
