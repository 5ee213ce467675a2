#!/usr/bin/env bash
# Checks that vendor/rdkafka is rdkafka 0.39.0 from crates.io with exactly
# vendor/rdkafka.patch applied (nothing else changed). The patch's behaviour is tested in
# the workspace (recpipe-shared's kafka::tests, a poll shorter than a millisecond), which
# builds the crate anyway. `--write-patch` instead writes the patch from the vendored tree.
#   scripts/check-vendor.sh [--write-patch]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
version=0.39.0
# crates.io's sha256 of the crate, as Cargo.lock gave it before the crate was patched.
sha256=d7956f9ac12b5712e50372d9749a3102f4810a8d42481c5eae3748d36d585bcf
vendored="$root/vendor/rdkafka"
patch_file="$root/vendor/rdkafka.patch"
# The files vendored: the library, its manifest and its notices, not its examples or tests.
files=(Cargo.toml LICENSE README.md changelog.md src)

work="$(mktemp -d)"
# The lock file that building the crate on its own writes (git-ignored, not vendored).
trap 'rm -rf "$work" "$vendored/Cargo.lock"' EXIT
crate="$work/rdkafka-$version.crate"
"$root/scripts/fetch-crate.sh" rdkafka "$version" "$sha256" "$crate"
tar -xzf "$crate" -C "$work"
mkdir -p "$work/a" "$work/b"
for f in "${files[@]}"; do
  cp -r "$work/rdkafka-$version/$f" "$work/a/"
  cp -r "$vendored/$f" "$work/b/"
done

if [ "${1:-}" = "--write-patch" ]; then
  # Without the files' times, so that the same change writes the same patch.
  (cd "$work" && { diff -ruN a b || true; } | sed -E 's/^(---|[+]{3}) ([^\t]+)\t.*/\1 \2/') >"$patch_file"
  echo "wrote $patch_file"
  exit 0
fi

(cd "$work/a" && patch -s -p1 <"$patch_file")
if ! diff -r "$work/a" "$work/b" >"$work/diff"; then
  echo "vendor/rdkafka differs from crates.io's rdkafka $version with vendor/rdkafka.patch:" >&2
  head -40 "$work/diff" >&2
  echo "(after changing vendor/rdkafka on purpose: scripts/check-vendor.sh --write-patch)" >&2
  exit 1
fi
extra="$(cd "$vendored" && ls -A | grep -vxF -e Cargo.toml -e Cargo.lock -e LICENSE -e README.md -e changelog.md -e src || true)"
[ -z "$extra" ] || { echo "vendor/rdkafka has files that are not vendored: $extra" >&2; exit 1; }
echo "vendor/rdkafka: crates.io rdkafka $version + vendor/rdkafka.patch"
