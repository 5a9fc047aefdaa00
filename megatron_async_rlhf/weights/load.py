"""HF tensors -> this rank's Megatron stage (TP shard, PP stage), through the mapping table."""

from __future__ import annotations

import torch

from megatron_async_rlhf.weights.llama_config import LlamaConfig
from megatron_async_rlhf.weights import mapping as M
from megatron_async_rlhf.weights.hf_io import HFCheckpoint


def stage_bound(model, info, cfg: LlamaConfig) -> list[M.Bound]:
    """The mapping rows for this stage, checked against the parameters the model really has."""
    tied_copy = cfg.dims.tie_word_embeddings and info.last and not info.first and info.head == "lm"
    table = M.stage_table(cfg.dims, info.pp, info.pp_rank, info.fused_norms, tied_output_in_stage=tied_copy,
                          head=info.head)
    params = {n for n, _ in model.named_parameters()}
    names = {b.mcore for b in table}
    if params != names:
        raise RuntimeError(
            "the weight mapping does not match this megatron-core model "
            f"(missing in model: {sorted(names - params)[:6]}, unmapped in model: {sorted(params - names)[:6]}); "
            "megatron-core's module names changed: update weights/mapping.py"
        )
    return table


@torch.no_grad()
def load_hf_into_stage(model, info, cfg: LlamaConfig, ckpt: HFCheckpoint, check: bool = True,
                       trunk_only: bool = False) -> None:
    """Copy this stage's slice of every HF tensor into the model. ``check``: validate the checkpoint's names and
    shapes against the config first (one error listing everything missing, unexpected or misshapen).
    ``trunk_only``: a scalar-head model (``info.head == "score"``) started from a language model's checkpoint: every
    tensor but the head is loaded, the head keeps its initialisation."""
    if check:
        M.check_hf_state_dict(ckpt.shapes(), cfg.dims, "lm" if trunk_only else info.head)
    params = dict(model.named_parameters())
    for b in stage_bound(model, info, cfg):
        if trunk_only and b.entry is M.SCORE:
            continue
        full = M.fuse(b.entry, [ckpt.get(n) for n in b.hf], cfg.dims)
        local = M.shard(full, b.entry.shard, info.tp_rank, info.tp, info.padded_vocab)
        p = params[b.mcore]
        if tuple(local.shape) != tuple(p.shape):
            raise ValueError(f"{b.hf} -> {b.mcore}: shard shape {list(local.shape)} != parameter {list(p.shape)}")
        p.copy_(local.to(p.dtype))
