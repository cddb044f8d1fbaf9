#!/usr/bin/env bash
# One training run on a Cloud TPU VM or pod slice: the same command on every worker.
#
# Usage (from any machine with gcloud):
#   TPU_NAME=my-v4-32 ZONE=us-central2-b launch/tpu_vm.sh CONFIG WORKDIR [EXTRA_ARGS...]
#
#   TPU_NAME=my-v4-32 ZONE=us-central2-b \
#     launch/tpu_vm.sh configs/bn_clip.py /mnt/shared/normjax/bn_clip \
#     --config.train.batch_size=256
#   # first install jax[tpu] and normjax on every worker, then train:
#   INSTALL=1 TPU_NAME=... ZONE=... launch/tpu_vm.sh configs/bn_clip.py /mnt/shared/nj/bn_clip
#   # print the gcloud commands instead of running them:
#   DRY_RUN=1 TPU_NAME=... ZONE=... launch/tpu_vm.sh configs/bn_clip.py /mnt/shared/nj/bn_clip
#
# Every worker needs this repository at ~/$REPO_DIR (e.g. git clone it there with a
# `gcloud compute tpus tpu-vm ssh ... --worker=all --command="git clone ..."`) and the data at
# the same path (config.data.tfds_dir / NORMJAX_DATA_DIR). normjax.main calls
# jax.distributed.initialize(), which detects the pod slice's workers on its own; WORKDIR must be
# one POSIX directory all workers share (a Filestore/NFS or gcsfuse mount), since all of them
# write the checkpoints. gs:// URLs are refused by normjax: mount the bucket instead.
#
# Environment: TPU_NAME, ZONE (required), PROJECT (optional gcloud --project), REPO_DIR (default
# normjax), INSTALL=1 (pip install first), DRY_RUN=1 (print, do not run).
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME=<TPU VM name>}"
: "${ZONE:?set ZONE=<TPU zone, e.g. us-central2-b>}"
REPO_DIR=${REPO_DIR:-normjax}
if (($# < 2)); then
  echo "usage: TPU_NAME=... ZONE=... $0 CONFIG WORKDIR [EXTRA_ARGS...]   (see the header of $0)" >&2
  exit 2
fi
config=$1
workdir=$2
shift 2

quote() {  # quote WORD...: the words joined by spaces, quoted only where the shell needs it
  local w out=()
  for w in "$@"; do
    if [[ $w =~ ^[A-Za-z0-9_./=:,@%+-]+$ ]]; then
      out+=("$w")
    elif [[ $w != *[\"\$\`\\!]* ]]; then
      out+=("\"$w\"")
    else
      out+=("${w@Q}")
    fi
  done
  echo "${out[*]}"
}

ssh_all() {  # ssh_all REMOTE_ARGV...: run one command line on every worker (or print it)
  local cmd
  cmd=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" ${PROJECT:+--project="$PROJECT"}
       --worker=all --command="$(quote cd "$REPO_DIR") && $(quote "$@")")
  quote "${cmd[@]}"
  [[ ${DRY_RUN:-0} == 1 ]] || "${cmd[@]}"
}

if [[ ${INSTALL:-0} == 1 ]]; then
  ssh_all pip install -U 'jax[tpu]' -e .
fi
ssh_all python -m normjax.main --config="$config" --workdir="$workdir" "$@"
