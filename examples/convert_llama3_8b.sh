#!/usr/bin/env bash
# HF Llama 3.1 8B -> Megatron dist checkpoint, converted by 8 processes at TP4 x PP2 (loads at any other layout):
#   bash examples/convert_llama3_8b.sh /models/Llama-3.1-8B /ckpts/llama3_8b_mcore
set -euo pipefail
HF=${1:?usage: $0 HF_DIR OUT_DIR}
OUT=${2:?usage: $0 HF_DIR OUT_DIR}
torchrun --nproc_per_node=8 tools/convert_checkpoint.py hf-to-mcore --hf "$HF" --out "$OUT" --tp 4 --pp 2
