#!/usr/bin/env bash
# Several JAX processes on this machine, talking over 127.0.0.1: a rehearsal of a
# multi-host run (each process holds its own CPU devices, reads its own share of every
# batch; process 0 writes the reports; all processes write the Orbax checkpoints).
#
#   launch/local_multiprocess.sh [NUM_PROCESSES] [DEVICES_PER_PROCESS] [-- extra flags]
#   launch/local_multiprocess.sh 2 2 -- --config=configs/unet.py --workdir=runs/mp \
#       --config.train.num_epochs=1
#
# Edit: PORT if 12355 is taken; the flags after "--" (defaults below). On a machine with
# GPUs, drop XLA_FLAGS/JAX_PLATFORMS and give each process its own GPU instead
# (CUDA_VISIBLE_DEVICES=$i), or simply run one process: it uses every local GPU.
set -euo pipefail
NPROC=${1:-2}
NDEV=${2:-2}
shift $(( $# >= 2 ? 2 : $# ))
[[ "${1:-}" == "--" ]] && shift
ARGS=("$@")
if [[ ${#ARGS[@]} -eq 0 ]]; then
  ARGS=(--config=configs/unet.py --workdir=runs/multiprocess)
fi
PORT=${PORT:-12355}
PYTHON=${PYTHON:-python}
pids=()
for ((i = 0; i < NPROC; i++)); do
  JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=${NDEV}" \
    "$PYTHON" -m medseg_jax.main "${ARGS[@]}" \
      --coordinator_address="127.0.0.1:${PORT}" --num_processes="${NPROC}" --process_id="$i" \
      > >(sed "s/^/[process $i] /") 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
