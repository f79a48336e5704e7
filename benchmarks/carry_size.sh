#!/usr/bin/env bash
# Prints the size of what an offline GPU machine needs from this checkout: tracked and
# untracked-not-ignored files, plus the .whl/ and data_carry/ folders (checked against a
# 64 MiB limit on what is copied).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
tree=$(git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- 2>/dev/null \
       | tail -1 | cut -f1)
whl=$( [ -d .whl ] && du -sb .whl | cut -f1 || echo 0)
data=$( [ -d data_carry ] && du -sb data_carry | cut -f1 || echo 0)
total=$((tree + whl + data))
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
echo "travels: working tree $(mib "$tree"), .whl/ $(mib "$whl"), data_carry/ $(mib "$data"):" \
     "total $(mib "$total") of 64 MiB"
if [ "$total" -gt $((64 * 1048576)) ]; then
  echo "OVER the 64 MiB limit: carry less (HC18_LIMIT=... benchmarks/prepare_data_carry.sh)" >&2
  exit 1
fi
