"""This rank's Megatron stage -> full HF-named tensors: TP shards gathered, fused tensors split, vocab unpadded.

Shared by the converter (mcore-to-hf) and the live weight sync to the rollout engines.
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.distributed as dist

from megatron_async_rlhf.hf_llama import LlamaConfig
from megatron_async_rlhf.weights import mapping as M
from megatron_async_rlhf.weights.load import stage_bound


def stage_hf_tensors(model, info, cfg: LlamaConfig, dtype: torch.dtype | None = None
                     ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, full tensor) for every tensor this PP stage owns, in ``dtype`` (None: the model's; the live
    sync passes the engines' dtype, so a bf16 engine never receives fp32). Collective over the TP group: every TP
    rank of the stage must iterate it together."""
    for group in stage_hf_groups(model, info, cfg, dtype):
        yield from group


@torch.no_grad()
def stage_hf_groups(model, info, cfg: LlamaConfig, dtype: torch.dtype | None = None
                    ) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """``stage_hf_tensors`` grouped by Megatron tensor: q/k/v together, gate/up together. The live sync keeps a group
    in one bucket, so each of the engine's fused modules (qkv_proj, gate_up_proj) gets all its parts in one load
    call and no received bucket is held past its own load."""
    from megatron.core import parallel_state as ps

    params = dict(model.named_parameters())
    group = ps.get_tensor_model_parallel_group()
    for b in stage_bound(model, info, cfg):
        if b.entry is M.OUTPUT and cfg.dims.tie_word_embeddings:
            continue  # the last stage's copy of a tied embedding is exported once, as the embedding
        local = params[b.mcore].detach()
        if b.entry.shard is M.Shard.REPLICATED or info.tp == 1:
            shards = [local]
        else:
            shards = [torch.empty_like(local) for _ in range(info.tp)]
            dist.all_gather(shards, local.contiguous(), group=group)
        full = M.gather(shards, b.entry.shard, cfg.vocab_size)
        if dtype is not None:
            full = full.to(dtype)
        yield list(zip(b.hf, M.unfuse(b.entry, full, cfg.dims)))


def full_hf_state_dict(model, info, cfg: LlamaConfig) -> dict[str, torch.Tensor] | None:
    """The whole model as HF tensors in the HF config's dtype (what its ``config.json`` says, whatever the learner's
    precision) on the first pipeline stage's TP rank 0 (CPU copies); None elsewhere."""
    from megatron.core import parallel_state as ps

    # copies: at TP1 the gathered tensors are the live parameters themselves
    mine = {k: v.to("cpu", copy=True) for k, v in stage_hf_tensors(model, info, cfg, cfg.dtype)}
    if info.pp > 1:
        gathered = [None] * info.pp if info.first else None
        if info.tp_rank == 0:
            dist.gather_object(mine, gathered,
                               group_dst=0, group=ps.get_pipeline_model_parallel_group())
        if not info.first:
            return None
        out: dict[str, torch.Tensor] = {}
        for part in gathered:
            out.update(part)
        mine = out
    return mine if info.tp_rank == 0 else None
