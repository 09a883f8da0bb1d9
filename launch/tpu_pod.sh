#!/usr/bin/env bash
# Run a dlm command on every host of a Cloud TPU pod slice (one process per host).
#
#   launch/tpu_pod.sh --tpu=NAME --zone=ZONE [--project=P] [--setup] -- \
#       dlm train --config=configs/quickstart.py --workdir=/mnt/shared/run1 \
#       --config.mesh.data=-1 --config.mesh.fsdp=4
#
# --setup copies this checkout to ~/dlm on every worker and installs it with the `tpu`
# extra (JAX's TPU runtime, libtpu).  The command runs on all workers at once (gcloud --worker=all) with
# --distributed appended to `dlm train`: JAX then finds the pod's coordinator and every
# host's id by itself.  The workdir must be storage every host sees (a Filestore/NFS or
# gcsfuse mount): all processes write one orbax checkpoint there.
# DRY_RUN=1 prints the gcloud commands instead of running them.
set -euo pipefail
tpu="" zone="" project="" setup=0
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
  case "$1" in
    --tpu=*) tpu=${1#*=} ;;
    --zone=*) zone=${1#*=} ;;
    --project=*) project=${1#*=} ;;
    --setup) setup=1 ;;
    *) echo "launch/tpu_pod.sh: unknown option $1 (see the header of this file)" >&2; exit 2 ;;
  esac
  shift
done
if [ -z "$tpu" ] || [ -z "$zone" ] || [ $# -lt 2 ]; then
  echo "usage: launch/tpu_pod.sh --tpu=NAME --zone=ZONE [--project=P] [--setup] -- dlm train ..." >&2
  exit 2
fi
shift  # the --
cmd=("$@")
if [ "${cmd[0]}" = dlm ] && [ "${cmd[1]:-}" = train ]; then cmd+=(--distributed); fi
where=(--zone="$zone" --worker=all)
[ -n "$project" ] && where+=(--project="$project")
run() { if [ "${DRY_RUN:-0}" = 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi; }
if [ "$setup" = 1 ]; then
  here=$(cd "$(dirname "$0")/.." && pwd)
  run gcloud compute tpus tpu-vm scp --recurse "$here" "$tpu":~/dlm "${where[@]}"
  run gcloud compute tpus tpu-vm ssh "$tpu" "${where[@]}" --command \
    "cd ~/dlm && python3 -m venv .venv && . .venv/bin/activate && pip install -q -e '.[tpu]'"
fi
printf -v remote '%q ' "${cmd[@]}"
run gcloud compute tpus tpu-vm ssh "$tpu" "${where[@]}" --command \
  "cd ~/dlm && . .venv/bin/activate && $remote"
