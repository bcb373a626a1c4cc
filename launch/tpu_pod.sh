#!/usr/bin/env bash
# Run the same nagjax command on every worker of a Cloud TPU VM slice (via gcloud).
#
#   launch/tpu_pod.sh [--setup] TPU_NAME ZONE [PROJECT] -- nagjax train --experiment scale_1b_deep_nag_tpu \
#       --workdir /mnt/shared/runs/1b_deep_nag
#
# Every worker runs the command with NAGJAX_DISTRIBUTED=1, so `jax.distributed.initialize()` reads
# the slice's TPU metadata (coordinator, process count and id); each process loads only its rows of
# every batch. --setup first installs this checkout on every worker (`pip install -e '.[tpu]'` in
# REMOTE_DIR, default ~/nagjax, copied with `gcloud compute tpus tpu-vm scp`). The workdir must be
# on storage that all workers share (NFS/Filestore or a gcsfuse mount): Orbax writes one checkpoint
# from all hosts and process 0 writes logs. Multi-slice (a queued resource of several slices): run
# this once per slice name with the same command and `--set mesh.dcn_data=<slices>`.
set -euo pipefail

setup=0
if [[ "${1:-}" == "--setup" ]]; then setup=1; shift; fi
if [[ $# -lt 3 ]]; then
  sed -n '2,13p' "$0"; exit 2
fi
TPU_NAME=$1; ZONE=$2; shift 2
PROJECT_ARGS=()
if [[ "${1:-}" != "--" ]]; then PROJECT_ARGS=(--project "$1"); shift; fi
[[ "${1:-}" == "--" ]] && shift
if [[ $# -eq 0 ]]; then echo "give the command after --" >&2; exit 2; fi
REMOTE_DIR=${REMOTE_DIR:-nagjax}
GCLOUD=(gcloud compute tpus tpu-vm)

if [[ $setup -eq 1 ]]; then
  repo=$(cd "$(dirname "$0")/.." && pwd)
  tar -C "$repo" --exclude=.git --exclude=runs -czf /tmp/nagjax-src.tgz .
  "${GCLOUD[@]}" scp /tmp/nagjax-src.tgz "$TPU_NAME":/tmp/ --zone "$ZONE" "${PROJECT_ARGS[@]}" --worker=all
  "${GCLOUD[@]}" ssh "$TPU_NAME" --zone "$ZONE" "${PROJECT_ARGS[@]}" --worker=all --command \
    "mkdir -p ~/$REMOTE_DIR && tar -xzf /tmp/nagjax-src.tgz -C ~/$REMOTE_DIR && cd ~/$REMOTE_DIR && pip install -q -e '.[tpu]'"
fi

cmd=$(printf '%q ' "$@")
"${GCLOUD[@]}" ssh "$TPU_NAME" --zone "$ZONE" "${PROJECT_ARGS[@]}" --worker=all --command \
  "cd ~/$REMOTE_DIR && export PATH=\$HOME/.local/bin:\$PATH NAGJAX_DISTRIBUTED=1 && $cmd"
