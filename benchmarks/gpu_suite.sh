#!/usr/bin/env bash
# The GPU benchmark suite on a GPU machine, also an offline one: set-up, then the stages of
# benchmarks/gpu_suite.py (which says what each one measures).
#
#   benchmarks/gpu_suite.sh OUTDIR [--dry_run] [more gpu_suite.py flags]
#
# Set-up, with no network: the wheels the machine's image lacks, carried in .whl/
# (benchmarks/fetch_gpu_wheels.sh), are installed into $GPU_SUITE_SITE (default /tmp/site)
# and the repository is used in place (PYTHONPATH=repo:/tmp/site: nothing is built). The
# data come from data_carry/ (benchmarks/prepare_data_carry.sh). OUTDIR receives
# gpu_suite.json, gpu_suite.md (rewritten after every item) and gpu_suite.log.
# --dry_run: every stage on the CPU at toy sizes (tests/test_gpu_suite.py).
set -uo pipefail
if [[ $# -lt 1 || $1 == -* ]]; then
  echo "usage: $0 OUTDIR [--dry_run] [gpu_suite.py flags]" >&2
  exit 2
fi
OUTDIR=$1
shift
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
SITE=${GPU_SUITE_SITE:-/tmp/site}
mkdir -p "$OUTDIR" || exit 1
T0=$(date +%s)
if "$PY" -c "import grain, nibabel, ml_collections" 2>/dev/null; then
  echo "set-up: grain, nibabel and ml_collections already installed: .whl/ not needed"
  export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
elif compgen -G "$REPO/.whl/*.whl" >/dev/null; then
  echo "set-up: installing $(ls "$REPO"/.whl/*.whl | wc -l) carried wheels into $SITE"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" "$REPO"/.whl/*.whl || { echo "set-up: wheel install failed" >&2; exit 1; }
  export PYTHONPATH="$REPO:$SITE${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "set-up: grain, nibabel or ml_collections missing and no .whl/ (benchmarks/fetch_gpu_wheels.sh):" \
       "the stages that need them will fail"
  export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
echo "set-up: $("$PY" --version 2>&1) at $(command -v "$PY"); PYTHONPATH=$PYTHONPATH;" \
     "$(( $(date +%s) - T0 )) s"
"$PY" "$REPO/benchmarks/gpu_suite.py" --outdir="$OUTDIR" "$@" 2>&1 | tee "$OUTDIR/gpu_suite.log"
exit "${PIPESTATUS[0]}"
