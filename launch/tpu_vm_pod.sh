#!/usr/bin/env bash
# Cloud TPU VM pod slice: the same command on every worker (one process per host).
#
#   TPU_NAME=my-v5e-32 ZONE=us-west4-a launch/tpu_vm_pod.sh --config.train.batch_size=256
#
# Edit: TPU_NAME, ZONE, PROJECT, REPO (where the code is checked out on the workers; run
# the install line once), WORKDIR (a file system every worker sees, e.g. a Filestore/NFS mount: the
# checkpoints are written by all workers, the reports by worker 0).
# On the workers, --distributed=true calls jax.distributed.initialize() with no
# arguments: JAX finds the coordinator and the process ids from the TPU metadata.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
PROJECT=${PROJECT:-$(gcloud config get-value project)}
REPO=${REPO:-~/medseg_jax}
CONFIG=${CONFIG:-configs/unet.py}
WORKDIR=${WORKDIR:-/mnt/shared/runs/${TPU_NAME}}
# Once: gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command \
#   "git clone https://YOUR/medseg_jax.git $REPO && cd $REPO && pip install -e . 'jax[tpu]'"
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --project="$PROJECT" --worker=all \
  --command="cd $REPO && python -m medseg_jax.main --config=$CONFIG --workdir=$WORKDIR \
    --distributed=true $*"
