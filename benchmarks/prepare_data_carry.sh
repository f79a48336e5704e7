#!/usr/bin/env bash
# Fills data_carry/ (git-ignored) with the data the GPU suite reads, small enough to copy
# with the repository to an offline GPU machine: the Hippocampus cases as they are
# (16 MB) and the first $HC18_LIMIT (default 120) HC18 images converted to the Decathlon
# layout (python -m medseg_jax.tools.convert_hc18; about 0.17 MB an image).
#
#   benchmarks/prepare_data_carry.sh [DATA_DIR]     # default: ../shared/data beside the repo
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SRC=${1:-${MEDSEG_DATA:-$REPO/../shared/data}}
LIMIT=${HC18_LIMIT:-120}
PY=${PYTHON:-python3}
cd "$REPO"
rm -rf data_carry
mkdir -p data_carry
cp -r "$SRC/Task04_Hippocampus" data_carry/
PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m medseg_jax.tools.convert_hc18 \
    --src="$SRC/HC18" --dst=data_carry/HC18_decathlon --limit="$LIMIT" >/dev/null
echo "data_carry/: Task04_Hippocampus $(ls data_carry/Task04_Hippocampus/imagesTr | wc -l) cases" \
     "($(du -sh data_carry/Task04_Hippocampus | cut -f1)), HC18_decathlon" \
     "$(ls data_carry/HC18_decathlon/imagesTr | wc -l) images ($(du -sh data_carry/HC18_decathlon | cut -f1))"
bash benchmarks/carry_size.sh
