#!/usr/bin/env bash
# Multi-node GPU training under SLURM: one process per node, every local GPU in the mesh.
#   sbatch --nodes=4 --gpus-per-node=8 launch/slurm.sh [CONFIG] [key=value ...]
#   e.g. sbatch --nodes=2 --gpus-per-node=8 launch/slurm.sh configs/llama2_7b_readme.yaml \
#          mesh.data=2 mesh.fsdp=8 model.source=/ckpt/Llama-2-7b-chat-hf corpus.from_dir=/data/redpajama
# The mesh spans all nodes' GPUs (mesh.* sizes multiply to nodes x GPUs; one may be -1). Check the plan first:
#   python -m readme_jax.train --config CONFIG --plan --plan-devices 16 mesh.data=2 mesh.fsdp=8
# The run folder (--run-dir, default runs/<name>) must be on a filesystem every node sees: orbax writes
# each process's shards of a checkpoint there and process 0 finalises it.
#SBATCH --ntasks-per-node=1
#SBATCH --job-name=readme_jax
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
config=${1:-configs/llama2_7b_readme.yaml}; [ $# -gt 0 ] && shift
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv && .venv/bin/pip install -q -r requirements.txt 'jax[cuda12]'
fi
head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export JAX_COORDINATOR_ADDRESS="$head:${READMEJAX_PORT:-12355}"
export JAX_NUM_PROCESSES="$SLURM_NNODES"
# JAX_PROCESS_ID is each task's SLURM_PROCID (readme_jax.parallel.distributed reads the three variables)
exec srun --kill-on-bad-exit=1 bash -c \
  'JAX_PROCESS_ID=$SLURM_PROCID exec .venv/bin/python -m readme_jax.train --config "$0" "$@"' "$config" "$@"
