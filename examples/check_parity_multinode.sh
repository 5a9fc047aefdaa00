#!/usr/bin/env bash
# Parity of the Megatron learner vs transformers for a real checkpoint at TP4 x PP2 on one 8-GPU node:
#   bash examples/check_parity_multinode.sh /models/Llama-3.1-8B
# Under Slurm: srun --nodes=1 --gpus-per-node=8 bash examples/check_parity_multinode.sh /models/Llama-3.1-8B
set -euo pipefail
HF=${1:?usage: $0 HF_MODEL_DIR}
torchrun --nnodes="${SLURM_NNODES:-1}" --nproc_per_node=8 \
  --rdzv_backend=c10d --rdzv_endpoint="${MASTER_ADDR:-localhost}:${MASTER_PORT:-29500}" \
  tools/check_parity.py --hf "$HF" --tp 4 --pp 2 --seq-len 512 --batch 2
