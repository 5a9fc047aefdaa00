"""Per-token log-probs of given tokens from vocab-parallel logits, exact under tensor parallelism.

Each TP rank holds logits for its vocab slice ``[b, s, Vp/tp]``. The softmax normaliser and the target logit are
reduced over the TP group with megatron's ``reduce_from_tensor_model_parallel_region`` (forward all-reduce, backward
identity), so every TP rank gets the same log-probs and its own slice's gradient. Padded vocab columns (ids >=
``vocab_size``) are masked out of the normaliser: they are not tokens.
"""

from __future__ import annotations

import torch


def vocab_parallel_logprobs(
    logits: torch.Tensor,  # [b, s, Vp/tp] this rank's vocab slice
    targets: torch.Tensor,  # [b, s] token ids in [0, vocab_size)
    vocab_size: int,
    temperature: float = 1.0,
    tp_group=None,
) -> torch.Tensor:  # [b, s] fp32
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region
    import torch.distributed as dist

    group = tp_group or ps.get_tensor_model_parallel_group()
    tp_rank = dist.get_rank(group) if dist.is_initialized() else 0
    part = logits.shape[-1]
    start = tp_rank * part
    x = logits.float()  # fp32 from here whatever the learner's precision (bf16 logits, fp32 softmax)
    targets = targets.to(x.device)  # the caller's token ids may still be on the CPU
    if temperature != 1.0:
        x = x / temperature
    cols = torch.arange(start, start + part, device=x.device)
    x = x.masked_fill(cols >= vocab_size, float("-inf"))  # [b, s, part]
    # a constant shift for stability; its gradient cancels, so it carries none
    local_max = x.detach().max(dim=-1).values  # [b, s]
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(local_max, op=dist.ReduceOp.MAX, group=group)
    shifted = x - local_max.unsqueeze(-1)  # [b, s, part]
    sum_exp = reduce_from_tensor_model_parallel_region(shifted.exp().sum(dim=-1))  # [b, s]
    in_part = (targets >= start) & (targets < start + part)  # [b, s]
    local_idx = (targets - start).clamp(0, part - 1)
    tgt = shifted.gather(-1, local_idx.unsqueeze(-1)).squeeze(-1)  # [b, s]
    tgt = reduce_from_tensor_model_parallel_region(torch.where(in_part, tgt, torch.zeros_like(tgt)))
    return tgt - sum_exp.log()


def gather_vocab_parallel(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Full-vocab logits ``[b, s, vocab_size]`` from the TP slices (for parity checks and debugging, not training)."""
    from megatron.core import parallel_state as ps
    import torch.distributed as dist

    tp = ps.get_tensor_model_parallel_world_size()
    if tp > 1:
        parts = [torch.empty_like(logits) for _ in range(tp)]
        dist.all_gather(parts, logits.contiguous(), group=ps.get_tensor_model_parallel_group())
        logits = torch.cat(parts, dim=-1)
    return logits[..., :vocab_size]
