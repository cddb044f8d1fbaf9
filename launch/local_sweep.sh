#!/usr/bin/env bash
# Several configs on one machine, each in its own workdir WORKDIR/<config stem>.
#
# Usage (from the repository root):
#   launch/local_sweep.sh CONFIG... [-- EXTRA_ARGS...]
#
#   # one after another, on every visible device:
#   WORKDIR=workdir/study launch/local_sweep.sh configs/bn_noclip.py configs/ln_noclip.py
#   # one run per GPU in parallel; config i gets CUDA_VISIBLE_DEVICES=GPUS[i mod n], configs
#   # sharing a GPU run one after another there; each run's output goes to WORKDIR/logs/<stem>.log:
#   GPUS="0 1 2" launch/local_sweep.sh configs/{bn,ln,frn}_{noclip,clip}.py
#   # EXTRA_ARGS go to every run:
#   launch/local_sweep.sh configs/bn_clip.py:quick -- --config.train.max_steps=10
#   # print the commands instead of running them:
#   DRY_RUN=1 GPUS="0 1" launch/local_sweep.sh configs/bn_noclip.py configs/ln_noclip.py
#
# Each run is `$PYTHON -m normjax.main --config=CONFIG --workdir=WORKDIR/<stem> EXTRA_ARGS...`
# (a CONFIG may carry a config argument, configs/bn_clip.py:quick -> stem bn_clip). Rerunning
# the script resumes unfinished runs from their checkpoints; finished ones do not train again.
# Runs go on past a failed run; the exit status is 1 if any failed, and names them.
#
# Environment: WORKDIR (default workdir/sweep), GPUS (default empty: sequential),
# PYTHON (default python), DRY_RUN=1 (print, do not run).
set -uo pipefail

WORKDIR=${WORKDIR:-workdir/sweep}
PYTHON=${PYTHON:-python}
GPUS=${GPUS:-}
DRY_RUN=${DRY_RUN:-0}

configs=()
extra=()
while (($#)); do
  if [[ $1 == -- ]]; then
    shift
    extra=("$@")
    break
  fi
  configs+=("$1")
  shift
done
if ((${#configs[@]} == 0)); then
  echo "usage: $0 CONFIG... [-- EXTRA_ARGS...]   (see the header of $0)" >&2
  exit 2
fi

stem() {  # configs/bn_clip.py:quick -> bn_clip
  local file=${1%%:*}
  file=${file##*/}
  echo "${file%.py}"
}

declare -A seen=()
for config in "${configs[@]}"; do
  s=$(stem "$config")
  if [[ -n ${seen[$s]:-} ]]; then
    echo "$0: ${seen[$s]} and $config share the workdir $WORKDIR/$s" >&2
    exit 2
  fi
  seen[$s]=$config
done

# run LOG CMD...: print CMD (with its redirection to LOG when LOG is set); run it unless DRY_RUN=1.
run() {
  local log=$1 line
  shift
  printf -v line '%q ' "$@"
  line=${line% }
  echo "$line${log:+ > $log 2>&1}"
  [[ $DRY_RUN == 1 ]] && return 0
  if [[ -n $log ]]; then
    "$@" > "$log" 2>&1
  else
    "$@"
  fi
}

train_cmd() {  # train_cmd CONFIG -> the argv in the array `cmd`
  cmd=("$PYTHON" -m normjax.main "--config=$1" "--workdir=$WORKDIR/$(stem "$1")" "${extra[@]}")
}

queue() {  # queue G: GPU slot G's configs (G, G+n, ...) one after another; failures -> $status
  local g=$1 i
  for ((i = g; i < ${#configs[@]}; i += ${#gpus[@]})); do
    train_cmd "${configs[i]}"
    run "$WORKDIR/logs/$(stem "${configs[i]}").log" env "CUDA_VISIBLE_DEVICES=${gpus[g]}" \
      "${cmd[@]}" || stem "${configs[i]}" >> "$status/failed"
  done
}

failed=()
read -r -a gpus <<< "$GPUS"
if ((${#gpus[@]} == 0)); then
  for config in "${configs[@]}"; do
    train_cmd "$config"
    run "" "${cmd[@]}" || failed+=("$(stem "$config")")
  done
else
  [[ $DRY_RUN == 1 ]] || mkdir -p "$WORKDIR/logs"
  status=$(mktemp -d)
  trap 'rm -rf "$status"' EXIT
  for g in "${!gpus[@]}"; do
    if [[ $DRY_RUN == 1 ]]; then
      queue "$g"  # in slot order, so the printed commands are deterministic
    else
      queue "$g" &
    fi
  done
  wait
  [[ -f $status/failed ]] && mapfile -t failed < "$status/failed"
fi

if ((${#failed[@]})); then
  echo "$0: ${#failed[@]} of ${#configs[@]} runs failed: ${failed[*]}" >&2
  exit 1
fi
