#!/usr/bin/env bash
# Installs the tansu Kafka-protocol broker into .tools/ (git-ignored), once.
# The build takes about 14 minutes on 2 cores, so the binary is also kept in a per-user
# cache ($RECPIPE_CACHE_DIR, default ~/.cache/recpipe) that other checkouts reuse.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
version=0.6.0
tools="$root/.tools"
bin="$tools/bin/tansu"
cache="${RECPIPE_CACHE_DIR:-$HOME/.cache/recpipe}/tansu-$version"

works() { [ -x "$1" ] && "$1" --version >/dev/null 2>&1; }

if works "$bin"; then
  exit 0
fi
mkdir -p "$tools/bin"
if works "$cache/bin/tansu"; then
  cp "$cache/bin/tansu" "$bin"
  echo "tansu $version: copied from the cache $cache"
  exit 0
fi
command -v cargo >/dev/null || { echo "cargo is missing: install Rust with rustup (https://rustup.rs) first" >&2; exit 1; }
echo "Installing tansu $version (Kafka-protocol broker) into $tools: about 14 minutes the first time..."
# dynostore gives the memory:// engine, libsql the durable sqlite:// one.
cargo install tansu --version "$version" --locked --features dynostore,libsql --root "$tools" --quiet
works "$bin" || { echo "tansu was built but does not run: see the output above" >&2; exit 1; }
mkdir -p "$cache/bin" && cp "$bin" "$cache/bin/tansu" || echo "(could not write the cache $cache; continuing)"
echo "tansu $version installed at $bin"
