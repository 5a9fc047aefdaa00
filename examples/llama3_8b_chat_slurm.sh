#!/usr/bin/env bash
# LLaMA 3.1 8B chatbot online DPO vs a reward model, 2 nodes x 8 GPUs: node 0 = learner TP4 x DP2,
# node 1 = four vLLM engines with TP2 each (their leaders are ranks 8, 10, 12, 14; vLLM drives the other GPUs).
#   sbatch --nodes=2 --gpus-per-node=8 --ntasks-per-node=1 examples/llama3_8b_chat_slurm.sh
#SBATCH --job-name=llama3-8b-chat-async
set -euo pipefail
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
srun torchrun --nnodes="$SLURM_NNODES" --nproc_per_node=8 \
  --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:29500" --rdzv_id="$SLURM_JOB_ID" \
  -m megatron_async_rlhf recipe=llama3_8b_chat "$@"
