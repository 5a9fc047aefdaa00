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
    micro_batches: list[torch.Tensor],  # each [b, s] token ids; shapes may differ
    on_logits: Callable[[torch.Tensor, int], object],
) -> list[object]:
    """Run the micro-batches forward through every pipeline stage; on the last stage, apply
    ``on_logits(vocab_parallel_logits [b, s, Vp/tp], micro_batch_index)`` and return its results (in order). Other
    stages return an empty list. All ranks of the learner pool call this together.

    The micro-batches may live on another device than the model (built on the CPU, the model on a GPU): they go to
    the model's device for the forward, and ``on_logits``' tensors come back to the micro-batch's device."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_async_rlhf.learner.train import model_device, on_device

    device = model_device(model)
    it = iter(enumerate(micro_batches))
    collected: list[object] = []

    def loss_func(i, output):
        collected.append(on_device(on_logits(output, i), micro_batches[i].device))
        return output.sum() * 0.0, {}

    def step(data_iterator, m):
        i, tokens = next(data_iterator)
        tokens = tokens.to(device)
        # attention_mask=None: the local and TE attention apply the causal mask themselves
        out = m(tokens, _position_ids(tokens), None)  # [b, s, Vp/tp] on the last stage, hidden states elsewhere
        return out, partial(loss_func, i)

    from megatron_async_rlhf.learner.train import variable_shapes

    b, s = micro_batches[0].shape
    with variable_shapes(model, micro_batches):
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


def pad_batch(seqs: list[list[int]], rows: int, pad_id: int = 0) -> torch.Tensor:
    """Right-padded ``[rows, max_len]`` token ids (rows beyond ``len(seqs)`` are all padding). Causal attention
    means right padding never changes the log-probs of real positions."""
    width = max(len(s) for s in seqs)
    out = torch.full((rows, width), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


@torch.no_grad()
def token_logprobs(model, tokens: torch.Tensor, vocab_size: int, temperature: float = 1.0,
                   micro_batch: int = 8) -> torch.Tensor | None:
    """``[R, S-1]`` log-probs of tokens 1..S-1 of each row (position j: log p(token j+1 | tokens <= j)) on the last
    pipeline stage, None elsewhere. ``R`` must be a multiple of ``micro_batch``. All learner ranks call it."""
    from megatron_async_rlhf.learner.logprobs import vocab_parallel_logprobs
    from megatron.core import parallel_state as ps

    chunks = list(tokens.split(micro_batch))
    model.eval()
    outs = forward_collect(
        model, chunks,
        lambda logits, i: vocab_parallel_logprobs(logits[:, :-1], chunks[i][:, 1:], vocab_size, temperature),
    )
    return torch.cat(outs) if ps.is_pipeline_last_stage() else None


def completion_logprobs(model, info, vocab_size: int, prompts: list[list[int]], completions: list[list[int]],
                        temperature: float = 1.0, micro_batch: int = 8) -> list[torch.Tensor] | None:
    """The learner's log-probs of each completion's tokens given its prompt (fp32, [len(completion)] each), on the
    last pipeline stage; None on other stages. All learner ranks call it together with the same inputs."""
    seqs = [p + c for p, c in zip(prompts, completions)]
    rows = -(-len(seqs) // micro_batch) * micro_batch
    lp = token_logprobs(model, pad_batch(seqs, rows), vocab_size, temperature, micro_batch)
    if lp is None:
        return None
    return [lp[i, len(p) - 1: len(p) - 1 + len(c)].clone() for i, (p, c) in enumerate(zip(prompts, completions))]
