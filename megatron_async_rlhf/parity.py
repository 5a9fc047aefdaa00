"""Logit / log-prob parity of the Megatron learner against HF transformers' LlamaForCausalLM (fp32).

The reference is independent of this package: HF's own model and a plain ``log_softmax(...).gather``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

TOLERANCE = 1e-4


@dataclass
class ParityResult:
    max_abs_logit_diff: float
    max_abs_logprob_diff: float

    @property
    def ok(self) -> bool:
        return self.max_abs_logit_diff <= TOLERANCE and self.max_abs_logprob_diff <= TOLERANCE

    def line(self) -> str:
        return f"max_abs_logit_diff={self.max_abs_logit_diff:.3e} max_abs_logprob_diff={self.max_abs_logprob_diff:.3e}"


def random_batches(vocab_size: int, batch: int, seq_len: int, num: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (batch, seq_len), generator=g) for _ in range(num)]


def hf_reference(hf_dir: str, batches: list[torch.Tensor], temperature: float = 1.0):
    """(logits [b, s, V], next-token log-probs [b, s-1]) per batch from transformers, in fp32."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for toks in batches:
            logits = model(toks).logits.float()
            lp = torch.log_softmax(logits[:, :-1] / temperature, dim=-1).gather(-1, toks[:, 1:, None])[..., 0]
            out.append((logits, lp))
    return out


def compare(megatron_out, reference) -> ParityResult:
    """``megatron_out``/``reference``: lists of (logits, logprobs) per batch."""
    dl = max((m[0] - r[0]).abs().max().item() for m, r in zip(megatron_out, reference, strict=True))
    dp = max((m[1] - r[1]).abs().max().item() for m, r in zip(megatron_out, reference, strict=True))
    return ParityResult(dl, dp)


def reported(per_rank: list) -> object:
    """The one non-None per-rank result (the reporting rank's)."""
    got = [r for r in per_rank if r is not None]
    return got[0] if got else None
