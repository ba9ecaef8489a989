#!/usr/bin/env bash
# Run the Read-ME pipeline on a CUDA machine (its local GPUs form the mesh).
#   launch/gpu.sh [CONFIG] [key=value ...]
#   e.g. launch/gpu.sh configs/llama2_7b_readme.yaml mesh.fsdp=8 model.source=/ckpt/Llama-2-7b-chat-hf
# Mesh keys: mesh.data / mesh.fsdp / mesh.expert (product = the GPUs used; one may be -1). Plan first:
#   python -m readme_jax.train --config CONFIG --plan --plan-devices 8 mesh.fsdp=8
# Several nodes: launch/slurm.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:-configs/llama2_7b_readme.yaml}; [ $# -gt 0 ] && shift
python3 -m venv .venv
.venv/bin/pip install -q -r requirements.txt 'jax[cuda12]'
exec .venv/bin/python -m readme_jax.train --config "$config" "$@"
