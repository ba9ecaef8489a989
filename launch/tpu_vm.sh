#!/usr/bin/env bash
# Run the Read-ME pipeline on a Cloud TPU VM (single- or multi-host).
#   launch/tpu_vm.sh NAME ZONE ACCELERATOR [CONFIG] [key=value ...]
#   e.g. launch/tpu_vm.sh readme-v5p us-east5-a v5p-64 configs/llama2_7b_readme.yaml \
#          mesh.fsdp=32 train.grad_accum=2 model.source=/data/llama2-7b
# Mesh keys: mesh.data / mesh.fsdp / mesh.expert over all the slice's chips (v5p-64: 32 JAX devices); check the
# memory plan first: python -m readme_jax.train --config CONFIG --plan --plan-devices 32 mesh.fsdp=32 ...
# The run folder must be shared by the workers (e.g. a gcsfuse mount) for orbax's multi-host checkpoints.
# Creates the VM if needed, copies this checkout to every worker, installs jax[tpu] + requirements and starts
# `python -m readme_jax.train` on all workers at once (jax.distributed.initialize() finds the peers itself).
set -euo pipefail
name=$1 zone=$2 accel=$3; shift 3
config=${1:-configs/llama2_7b_readme.yaml}; [ $# -gt 0 ] && shift
version=${TPU_RUNTIME:-v2-alpha-tpuv5}
if ! gcloud compute tpus tpu-vm describe "$name" --zone "$zone" >/dev/null 2>&1; then
  gcloud compute tpus tpu-vm create "$name" --zone "$zone" --accelerator-type "$accel" --version "$version"
fi
tar czf /tmp/readme_jax_src.tgz --exclude .venv --exclude runs --exclude .git .
gcloud compute tpus tpu-vm scp /tmp/readme_jax_src.tgz "$name":~/ --zone "$zone" --worker all
gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker all --command "
  set -e; mkdir -p readme_jax && tar xzf readme_jax_src.tgz -C readme_jax && cd readme_jax
  python3 -m venv .venv && .venv/bin/pip install -q -r requirements.txt 'jax[tpu]'
  READMEJAX_DISTRIBUTED=1 nohup .venv/bin/python -m readme_jax.train --config $config $* > train.log 2>&1 &
  echo started on \$(hostname)"
