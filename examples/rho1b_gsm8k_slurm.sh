#!/usr/bin/env bash
# Rho-1B GSM8k online DPO, 2 nodes x 8 GPUs: ranks 0-7 learner (DP8), ranks 8-15 eight vLLM engines.
#   sbatch --nodes=2 --gpus-per-node=8 --ntasks-per-node=1 examples/rho1b_gsm8k_slurm.sh
# Inside an NGC container built from ./Dockerfile. Override anything hydra-style after the script's arguments.
#SBATCH --job-name=rho1b-gsm8k-async
set -euo pipefail
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
srun torchrun --nnodes="$SLURM_NNODES" --nproc_per_node=8 \
  --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:29500" --rdzv_id="$SLURM_JOB_ID" \
  -m megatron_async_rlhf recipe=rho1b_gsm8k "$@"
