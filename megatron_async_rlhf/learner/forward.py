"""Forward-only passes through a (pipeline-parallel) learner model with megatron-core's schedules."""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch


def _position_ids(tokens: torch.Tensor) -> torch.Tensor:
    return torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)  # [b, s]


@torch.no_grad()
def forward_collect(
    model,
    micro_batches: list[torch.Tensor],  # each [b, s] token ids
    on_logits: Callable[[torch.Tensor, int], object],
) -> list[object]:
    """Run the micro-batches forward through every pipeline stage; on the last stage, apply
    ``on_logits(vocab_parallel_logits [b, s, Vp/tp], micro_batch_index)`` and return its results (in order). Other
    stages return an empty list. All ranks of the learner pool call this together."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    it = iter(enumerate(micro_batches))
    collected: list[object] = []

    def loss_func(i, output):
        collected.append(on_logits(output, i))
        return output.sum() * 0.0, {}

    def step(data_iterator, m):
        i, tokens = next(data_iterator)
        # attention_mask=None: the local and TE attention apply the causal mask themselves
        out = m(tokens, _position_ids(tokens), None)  # [b, s, Vp/tp] on the last stage, hidden states elsewhere
        return out, partial(loss_func, i)

    b, s = micro_batches[0].shape
    get_forward_backward_func()(
        forward_step_func=step,
        data_iterator=it,
        model=[model],
        num_microbatches=len(micro_batches),
        seq_length=s,
        micro_batch_size=b,
        forward_only=True,
    )
    return collected
