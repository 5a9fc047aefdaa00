"""This rank's Megatron stage -> full HF-named tensors: TP shards gathered, fused tensors split, vocab unpadded.

Shared by the converter (mcore-to-hf) and the live weight sync to the rollout engines.
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.distributed as dist

from megatron_async_rlhf.weights.llama_config import LlamaConfig
from megatron_async_rlhf.weights import mapping as M
from megatron_async_rlhf.weights.load import stage_bound


def stage_hf_tensors(model, info, cfg: LlamaConfig, dtype: torch.dtype | None = None
                     ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, full tensor) for every tensor this PP stage owns, in ``dtype`` (None: the model's; the live
    sync passes ``weights.sync.wire_dtype``, the engines' dtype, so a bf16 engine never receives fp32). Collective
    over the TP group: every TP rank of the stage must iterate it together."""
    for group in stage_hf_groups(model, info, cfg, dtype):
        yield from group


@torch.no_grad()
def stage_hf_groups(model, info, cfg: LlamaConfig, dtype: torch.dtype | None = None, chunk_bytes: int = 64 * 2**20
                    ) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """``stage_hf_tensors`` grouped by Megatron tensor: q/k/v together, gate/up together. The live sync keeps a group
    in one bucket, so each of the engine's fused modules (qkv_proj, gate_up_proj) gets all its parts in one load
    call and no received bucket is held past its own load.

    TP shards are gathered about ``chunk_bytes`` of full tensors (in ``dtype``) at a time in one all-gather of their
    bytes, not one collective per tensor: per-call latency, not bandwidth, dominated the per-tensor gather (a 30-layer
    model has ~270 TP-sharded tensors). A ``dtype`` narrower than the model's is applied to each shard before the
    gather (rounding is elementwise, so the result is the same and the gather moves fewer bytes); a wider one after.
    At TP1 in the model's dtype the yielded tensors are the live parameters, not copies."""
    from megatron.core import parallel_state as ps

    params = dict(model.named_parameters())
    group = ps.get_tensor_model_parallel_group()
    bound = [b for b in stage_bound(model, info, cfg)
             # the last stage's copy of a tied embedding is exported once, as the embedding
             if not (b.entry is M.OUTPUT and cfg.dims.tie_word_embeddings)]
    chunk, size = [], 0
    for k, b in enumerate(bound):
        chunk.append(b)
        p = params[b.mcore]
        size += p.numel() * (dtype.itemsize if dtype is not None else p.element_size()) * info.tp
        if size < chunk_bytes and k + 1 < len(bound):
            continue
        # a narrower dtype rounds each shard before it is gathered: half the bytes on the TP links for fp32 -> bf16
        locals_ = [t.to(dtype) if dtype is not None and dtype.itemsize < t.element_size() else t
                   for t in (params[c.mcore].detach() for c in chunk)]
        for b_, full in zip(chunk, _gather_chunk(locals_, chunk, info, group)):
            full = M.gather(full, b_.entry.shard, cfg.vocab_size)
            if dtype is not None:
                full = full.to(dtype)
            yield list(zip(b_.hf, M.unfuse(b_.entry, full, cfg.dims)))
        chunk, size = [], 0


def _gather_chunk(locals_: list[torch.Tensor], bound: list, info, group) -> list[list[torch.Tensor]]:
    """Every TP rank's shard of each tensor, in rank order ([local] for replicated tensors and at TP1), with one
    all-gather of the sharded tensors' bytes."""
    out = [[t] for t in locals_]
    sharded = [i for i, b in enumerate(bound) if b.entry.shard is not M.Shard.REPLICATED and info.tp > 1]
    if not sharded:
        return out
    flat = torch.cat([locals_[i].contiguous().reshape(-1).view(torch.uint8) for i in sharded])  # [bytes]
    ranks = [torch.empty_like(flat) for _ in range(info.tp)]
    dist.all_gather(ranks, flat, group=group)
    offset = 0
    for i in sharded:
        t = locals_[i]
        n = t.numel() * t.element_size()
        out[i] = [r[offset:offset + n].view(t.dtype).reshape(t.shape) for r in ranks]
        offset += n
    return out


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
        if not info.first or info.tp_rank != 0:  # only the first stage's TP rank 0 received the stages
            return None
        out: dict[str, torch.Tensor] = {}
        for part in gathered:
            out.update(part)
        mine = out
    return mine if info.tp_rank == 0 else None
