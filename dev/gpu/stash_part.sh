#!/usr/bin/env bash
# Copy carried bundle parts into the parts folder and check them.
# usage: dev/gpu/stash_part.sh [CARRY_DIR] [PARTS_DIR]   (defaults: .gpu-carry /tmp/parts)
# CARRY_DIR holds part1/, part2/, ... (each: one bundle part + manifest.json, SHA256SUMS,
# install.sh) and optionally self/ (our wheel). Parts arrive over several calls; each
# call stashes what it carried. Exit 0 when all parts are there and good, 1 while some
# are missing, 2 on a bad checksum.
set -euo pipefail
CARRY="${1:-.gpu-carry}"
PARTS="${2:-/tmp/parts}"
mkdir -p "$PARTS"
shopt -s nullglob
for d in "$CARRY"/part* "$CARRY"/self; do
  [ -d "$d" ] || continue
  if [ -f "$d/SHA256SUMS" ] && [ -f "$PARTS/SHA256SUMS" ] && ! cmp -s "$d/SHA256SUMS" "$PARTS/SHA256SUMS"; then
    echo "new bundle build: dropping parts of the old one from $PARTS"
    rm -f "$PARTS"/saw-bundle.tar.part*
  fi
  for f in "$d"/*; do cp -f "$f" "$PARTS/"; done
  echo "stashed $d: $(cd "$d" && ls | tr '\n' ' ')"
done
[ -f "$PARTS/SHA256SUMS" ] || { echo "no SHA256SUMS in $PARTS yet"; exit 1; }
cd "$PARTS"
missing=()
while read -r sum name; do
  if [ ! -f "$name" ]; then missing+=("$name"); continue; fi
  echo "$sum  $name" | sha256sum -c --quiet - || { echo "BAD checksum: $name"; exit 2; }
  echo "ok  $name"
done < SHA256SUMS
if [ ${#missing[@]} -gt 0 ]; then
  echo "still missing: ${missing[*]}"
  exit 1
fi
echo "all $(wc -l < SHA256SUMS) parts present in $PARTS; next: dev/gpu/run_all.sh OUT --only install"
