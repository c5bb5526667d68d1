#!/usr/bin/env bash
# Run a jaxrlhf stage on every host of a Cloud TPU pod slice (v4 / v5e / v5p ...).
#
#   launch/tpu_pod.sh TPU_NAME ZONE [--project P] [--setup] -- sft --config configs/llama3_8b/sft_lora.yaml --set k=v
#
# --setup      first copy this repository to every worker (gcloud compute tpus tpu-vm scp) and install it
#              with the TPU extra (pip install -e ".[tpu]"); later runs reuse the install.
# Everything after "--" is the jaxrlhf command line. Each worker runs
#     python -m jaxrlhf <stage> ... --distributed
# and `--distributed` calls jax.distributed.initialize(), which on Cloud TPU discovers the coordinator,
# the number of hosts and this host's index by itself; jax.devices() is then the whole slice, the mesh
# spans every chip, and each host's data loader reads its own slice of every global batch.
#
# Paths in the config (model.path, data.path, output_dir) must be visible to every host: a GCS-fuse mount or
# an NFS/Filestore share for output_dir (Orbax writes one checkpoint from all hosts), or copies of the
# inputs on each worker. Environment variables named in JAXRLHF_ENV (space-separated, e.g. "HF_TOKEN
# WANDB_API_KEY") are forwarded to the workers.
set -euo pipefail

usage() { sed -n '2,17p' "$0"; exit 2; }
[[ $# -ge 2 ]] || usage
TPU_NAME=$1; ZONE=$2; shift 2
PROJECT_ARGS=(); SETUP=0
while [[ $# -gt 0 && $1 != "--" ]]; do
  case $1 in
    --project) PROJECT_ARGS=(--project "$2"); shift 2 ;;
    --setup) SETUP=1; shift ;;
    *) usage ;;
  esac
done
[[ ${1:-} == "--" ]] || usage
shift
[[ $# -ge 1 ]] || usage

REPO_DIR=${JAXRLHF_REMOTE_DIR:-jaxrlhf}
HERE=$(cd "$(dirname "$0")/.." && pwd)
ssh_all() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" "${PROJECT_ARGS[@]}" --worker=all --command "$1"
}

if [[ $SETUP == 1 ]]; then
  tarball=$(mktemp /tmp/jaxrlhf-XXXX.tar.gz)
  git -C "$HERE" archive --format=tar.gz -o "$tarball" HEAD
  gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME":/tmp/jaxrlhf.tar.gz --zone "$ZONE" \
    "${PROJECT_ARGS[@]}" --worker=all
  rm -f "$tarball"
  ssh_all "mkdir -p $REPO_DIR && tar -xzf /tmp/jaxrlhf.tar.gz -C $REPO_DIR && \
    python3 -m venv ~/jaxrlhf-venv && ~/jaxrlhf-venv/bin/pip install -q -e '$REPO_DIR[tpu]'"
fi

ENV_EXPORTS=""
for name in ${JAXRLHF_ENV:-}; do
  ENV_EXPORTS+="export $name=$(printf '%q' "${!name:-}"); "
done
ARGS=$(printf '%q ' "$@")
ssh_all "${ENV_EXPORTS}cd $REPO_DIR && ~/jaxrlhf-venv/bin/python -m jaxrlhf $ARGS --distributed"
