"""A scalar head on the learner's Megatron trunk: one value per sequence (the reward model; a PPO critic later).

The model is the learner's GPTModel (``build_model(head="score")``) whose vocab output layer is swapped for
:class:`ScalarHead`, ``Linear(hidden, 1)`` without bias, held whole on every TP rank of the last pipeline stage. Its
input, the final-normed hidden state, is the same on every TP rank, so each computes the same value and the same
gradient: no TP reduction (a ColumnParallelLinear would all-reduce the input gradient and count it TP times). The
model's forward returns ``[b, s, 1]`` fp32 values, one per position; HF's equivalent is a
``LlamaForSequenceClassification`` with ``num_labels=1``, whose ``score.weight`` is the head
(``weights.mapping.SCORE``), so the converter, the HF loader and the exporter all go through the one mapping table.

A sequence's value is the value at its last real token (:func:`last_token_values`). The learner right-pads its
batches (causal attention: padding after a token never changes its value); the read itself handles left padding too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class ScalarHead(torch.nn.Module):
    """``[s, b, H] -> [s, b, 1]`` in fp32 whatever the trunk's precision. Sits in GPTModel's ``output_layer`` slot and
    answers its call (``weight=``, ``runtime_gather_output=`` are the vocab layer's arguments, unused here)."""

    def __init__(self, hidden_size: int, init_std: float, seed: int = 0):
        super().__init__()
        # the same fixed-seed draw on every rank: TP and DP replicas start identical without a broadcast
        g = torch.Generator().manual_seed(seed)
        self.weight = torch.nn.Parameter(torch.randn(1, hidden_size, generator=g) * init_std)  # [1, H]

    def forward(self, hidden_states, weight=None, runtime_gather_output=None):
        return F.linear(hidden_states.float(), self.weight.float()), None  # [s, b, 1]


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """``[b]`` position of each row's last real token; ``mask [b, s]`` is nonzero on real tokens (right or left
    padding, or both)."""
    m = mask.bool()
    if not m.any(dim=1).all():
        raise ValueError(f"rows {(~m.any(dim=1)).nonzero().flatten().tolist()} have no real token")
    return m.shape[1] - 1 - m.flip(1).int().argmax(dim=1)  # first real token from the right


def last_token_values(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``values [b, s]`` (one per position) -> ``[b]``, each row's value at its last real token."""
    return values.gather(1, last_token_index(mask).unsqueeze(1)).squeeze(1)


def right_padded(seqs: list[list[int]], rows: int, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens ``[rows, S]`` and real-token mask ``[rows, S]``; rows beyond ``len(seqs)`` hold one pad token, so the
    value read stays defined for them (callers drop them)."""
    from megatron_async_rlhf.learner.forward import pad_batch

    tokens = pad_batch(seqs, rows, pad_id)
    lengths = torch.tensor([len(s) for s in seqs] + [1] * (rows - len(seqs)))  # [rows]
    mask = torch.arange(tokens.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)  # [rows, S]
    return tokens, mask


# config.json key of a reward model's input format (how prompt + response became token ids in training), read back
# by the scorers in rewards/reward_model.py; transformers and vLLM ignore it
INPUT_FORMAT_KEY = "mrlhf_input_format"


def classifier_config(hf_config: dict, pad_token_id: int, input_format: dict | None = None) -> dict:
    """The HF ``config.json`` of the scalar-head model built from ``hf_config``: a ``LlamaForSequenceClassification``
    with one label and a pad token (transformers reads each row's value at its last non-pad token); ``input_format``
    (``data.preferences.pair_ids``'s keyword arguments) is stored under :data:`INPUT_FORMAT_KEY`."""
    out = dict(hf_config)
    out.update(architectures=["LlamaForSequenceClassification"], id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0},
               pad_token_id=int(pad_token_id))
    if input_format is not None:
        out[INPUT_FORMAT_KEY] = dict(input_format)
    out.pop("num_labels", None)  # implied by id2label
    return out


@torch.no_grad()
def sequence_values(model, seqs: list[list[int]], micro_batch: int = 8) -> torch.Tensor | None:
    """``[N]`` fp32 value of each token sequence at its last token, on the last pipeline stage (None elsewhere).
    All learner ranks call it together with the same inputs."""
    from megatron.core import parallel_state as ps

    from megatron_async_rlhf.learner.forward import forward_collect

    n = len(seqs)
    rows = max(micro_batch, -(-n // micro_batch) * micro_batch)
    tokens, mask = right_padded(seqs, rows)
    chunks, masks = list(tokens.split(micro_batch)), list(mask.split(micro_batch))
    model.eval()
    outs = forward_collect(model, chunks, lambda v, i: last_token_values(v[..., 0], masks[i]))  # v: [b, s, 1]
    return torch.cat(outs)[:n] if ps.is_pipeline_last_stage() else None
