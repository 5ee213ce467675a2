#!/usr/bin/env bash
# Puts a published crate's .crate file at DEST after checking it against crates.io's
# sha256: from cargo's own download cache when it has it (a machine behind a registry
# mirror has it there once it has fetched the crate), else from static.crates.io.
#   scripts/fetch-crate.sh NAME VERSION SHA256 DEST
set -euo pipefail
[ $# -eq 4 ] || { echo "usage: scripts/fetch-crate.sh NAME VERSION SHA256 DEST" >&2; exit 2; }
name=$1 version=$2 sha256=$3 dest=$4
verified() { echo "$sha256  $dest" | sha256sum --check --quiet 2>/dev/null; }
cached=$(ls "${CARGO_HOME:-$HOME/.cargo}"/registry/cache/*/"$name-$version.crate" 2>/dev/null | head -1 || true)
if [ -n "$cached" ] && cp "$cached" "$dest" && verified; then
  exit 0
fi
curl -fsSL --retry 3 -o "$dest" "https://static.crates.io/crates/$name/$name-$version.crate" || {
  echo "could not download $name $version from static.crates.io (is crates.io reachable?)" >&2
  exit 1
}
verified || {
  echo "$name-$version.crate from static.crates.io does not have crates.io's checksum; not using it" >&2
  exit 1
}
