#!/usr/bin/env bash
# Run the Read-ME pipeline on a CUDA machine (all local GPUs form the mesh).
#   launch/gpu.sh [CONFIG] [key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:-configs/llama2_7b_readme.yaml}; [ $# -gt 0 ] && shift
python3 -m venv .venv
.venv/bin/pip install -q -r requirements.txt 'jax[cuda12]'
exec .venv/bin/python -m readme_jax.train --config "$config" "$@"
