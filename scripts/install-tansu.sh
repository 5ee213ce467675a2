#!/usr/bin/env bash
# Installs the tansu Kafka-protocol broker into .tools/ (git-ignored), once.
#
# tansu 0.6.0 is built from its crates.io sources with two patches of ours (see
# BENCHMARKS.md): scripts/tansu/fetch-by-offset.patch (its memory engine answered each
# fetch by listing every batch the partition had stored, so the broker slowed down the
# longer it ran; the patch reads a consumer's batches by their names instead) and
# scripts/tansu/fetch-long-poll.patch (it held every fetch for the whole of the
# consumer's fetch.wait.max.ms, data or not; the patch answers once there is data and
# otherwise waits for the next produce, as Kafka does).
#
# The build takes 10-14 minutes on 2 cores, so the binary is also kept in a per-user
# cache ($RECPIPE_CACHE_DIR, default ~/.cache/recpipe) that other checkouts reuse. The
# build's name includes the patches' checksum: a changed patch builds anew.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
version=0.6.0
# Applied in this order: the second is made against the first.
patches=("$root/scripts/tansu/fetch-by-offset.patch" "$root/scripts/tansu/fetch-long-poll.patch")
# The crates' sha256, as crates.io's index and tansu's own Cargo.lock give them.
declare -A sha256=(
  [tansu]=4fdd85473ec265140488cf8d55e82b844f5c051c8916fabdd4a71156ac053f6d
  [tansu-storage]=720d2ed8e6010c70f7f06e5af5a7274ebbf6e42fdcd9e46de542b10dc4d2f35d
)
build_id="$version-$(cat "${patches[@]}" | sha256sum | cut -c1-12)"
tools="$root/.tools"
bin="$tools/bin/tansu"
stamp="$tools/bin/tansu.build"
cache="${RECPIPE_CACHE_DIR:-$HOME/.cache/recpipe}/tansu-$build_id"

works() { [ -x "$1" ] && "$1" --version >/dev/null 2>&1; }

if works "$bin" && [ "$(cat "$stamp" 2>/dev/null)" = "$build_id" ]; then
  exit 0
fi
mkdir -p "$tools/bin"
if works "$cache/bin/tansu"; then
  cp "$cache/bin/tansu" "$bin"
  echo "$build_id" >"$stamp"
  echo "tansu $build_id: copied from the cache $cache"
  exit 0
fi
for tool in cargo curl sha256sum tar patch; do
  command -v "$tool" >/dev/null || {
    case "$tool" in
      cargo) echo "cargo is missing: install Rust with rustup (https://rustup.rs) first" >&2 ;;
      *) echo "$tool is missing: install it (Debian: apt-get install $tool)" >&2 ;;
    esac
    exit 1
  }
done
echo "Building tansu $version with recpipe's patches into $tools: 10-14 minutes the first time..."
src="$tools/src/tansu-$build_id"
rm -rf "$src" && mkdir -p "$src"
for crate in tansu tansu-storage; do
  file="$src/$crate-$version.crate"
  "$root/scripts/fetch-crate.sh" "$crate" "$version" "${sha256[$crate]}" "$file"
  tar -xzf "$file" -C "$src"
done
for p in "${patches[@]}"; do
  patch --quiet -p1 -d "$src/tansu-storage-$version" <"$p"
done
# Its own workspace (so that cargo does not take recpipe's for it), with the patched crate
# in place of crates.io's. Its Cargo.lock keeps every other dependency at the version
# tansu was published with; only the patched crate's entry changes.
cat >>"$src/tansu-$version/Cargo.toml" <<TOML

[workspace]

[patch.crates-io]
tansu-storage = { path = "../tansu-storage-$version" }
TOML
# dynostore gives the memory:// engine, libsql the durable sqlite:// one.
cargo build --release --quiet --features dynostore,libsql \
  --manifest-path "$src/tansu-$version/Cargo.toml" --target-dir "$src/target"
cp "$src/target/release/tansu" "$bin"
works "$bin" || { echo "tansu was built but does not run: see the output above" >&2; exit 1; }
echo "$build_id" >"$stamp"
mkdir -p "$cache/bin" && cp "$bin" "$cache/bin/tansu" || echo "(could not write the cache $cache; continuing)"
# The sources and the build (several GB) are not needed any more.
rm -rf "$src"
rmdir "$tools/src" 2>/dev/null || true
echo "tansu $build_id installed at $bin"
