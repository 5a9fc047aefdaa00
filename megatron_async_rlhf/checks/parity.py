"""Logit / log-prob parity of the Megatron learner against HF transformers' LlamaForCausalLM (fp32).

The reference is independent of this package: HF's own model and a plain ``log_softmax(...).gather``.

The tolerance scales with the logits, because fp32 rounding does: two correct fp32 forwards that sum in different
orders (transformers vs Megatron's TP shards and fused layers) differ by a fraction of the logits' magnitude, not by a
fixed amount. The rule, used by tools/check_parity.py and tools/check_weight_sync.py:

- ``logit_tolerance = RTOL * logit_scale`` with ``logit_scale = max |reference logit|``; when the fp32 noise floor was
  measured (how far transformers' own fp32 forward lands from its fp64 forward), the larger of that and
  ``FLOOR_FACTOR * floor``.
- ``logprob_tolerance = 2 * logit_tolerance / temperature``: a log-prob is ``z_t/T - logsumexp(z/T)`` and logsumexp
  moves by at most the largest input change, so a logit error ``d`` moves a log-prob by at most ``2d/T``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Measured on SmolLM2-135M-Instruct (30 layers, fp32, max |logit| 34): transformers' own fp32 forward lands
# 1.2-1.6e-4 = 3.4-4.6e-6 x scale from its fp64 forward, Megatron's (TP1, TP3xPP2) 1.1-1.3e-4. Two correct fp32
# forwards can thus differ by up to ~9e-6 x scale (seen: 9.9e-5 at TP1, 1.97e-4 at TP3xPP2 = 5.8e-6 x scale).
# 2e-5 keeps 2x above that worst case (about 170 fp32 epsilons of 1.2e-7) and stays far below what a bug does on the
# same model: one layer's layout wrong (two q heads or RoPE halves swapped, gate/up rows mixed) 8e-2-1.7e-1 x scale,
# a 1% wrong rope_theta 2.8e-3, rms_norm_eps 1e-6 instead of 1e-5 2.0e-3. Tiny random models (logits ~5) get ~1e-4
# and sit at 1-2e-6 x scale.
RTOL = 2e-5
# A second fp32 implementation is about as far from fp64 as transformers' own fp32 (measured above: 0.7-1.1x), so the
# two differ by up to twice the floor (triangle inequality); 4x leaves room for the max-over-elements statistic's noise.
FLOOR_FACTOR = 4.0


def logit_tolerance(logit_scale: float, fp32_floor: float | None = None) -> float:
    """The largest max-abs logit difference accepted for logits of magnitude up to ``logit_scale``."""
    return max(RTOL * logit_scale, FLOOR_FACTOR * (fp32_floor or 0.0))


def logprob_tolerance(logit_tol: float, temperature: float = 1.0) -> float:
    """The log-prob bound implied by a logit bound (log-probs at ``temperature``)."""
    return 2.0 * logit_tol / temperature


@dataclass(frozen=True)
class ParityResult:
    max_abs_logit_diff: float
    max_abs_logprob_diff: float
    logit_scale: float  # max |reference logit|
    logit_tolerance: float
    logprob_tolerance: float
    fp32_floor: float | None = None  # max |HF fp32 - HF fp64| logit, when measured

    @property
    def ok(self) -> bool:
        return self.max_abs_logit_diff <= self.logit_tolerance and self.max_abs_logprob_diff <= self.logprob_tolerance

    def line(self) -> str:
        floor = "" if self.fp32_floor is None else f" fp32_floor={self.fp32_floor:.3e}"
        return (f"max_abs_logit_diff={self.max_abs_logit_diff:.3e} max_abs_logprob_diff={self.max_abs_logprob_diff:.3e}"
                f" logit_scale={self.logit_scale:.3e} logit_tolerance={self.logit_tolerance:.3e}"
                f" logprob_tolerance={self.logprob_tolerance:.3e}{floor}")


def random_batches(vocab_size: int, batch: int, seq_len: int, num: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (batch, seq_len), generator=g) for _ in range(num)]


def hf_reference(hf_dir: str, batches: list[torch.Tensor], temperature: float = 1.0,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """(logits [b, s, V], next-token log-probs [b, s-1]) per batch from transformers, computed in ``dtype`` on
    ``device`` (returned on the CPU)."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=dtype).to(device).eval()
    out = []
    with torch.no_grad():
        for toks in batches:
            toks = toks.to(device)
            logits = model(toks).logits.to(dtype)
            lp = torch.log_softmax(logits[:, :-1] / temperature, dim=-1).gather(-1, toks[:, 1:, None])[..., 0]
            out.append((logits.cpu(), lp.cpu()))
    return out


def _max_abs_diff(a, b, k: int) -> float:
    return max((x[k].double() - y[k].double()).abs().max().item() for x, y in zip(a, b, strict=True))


def fp32_floor(reference, reference_fp64) -> float:
    """How far transformers' own fp32 logits are from its fp64 ones (max abs): the fp32 noise floor."""
    return _max_abs_diff(reference, reference_fp64, 0)


def compare(megatron_out, reference, temperature: float = 1.0, floor: float | None = None) -> ParityResult:
    """``megatron_out``/``reference``: lists of (logits, logprobs at ``temperature``) per batch. ``floor``: the
    measured fp32 noise floor, if any (see ``fp32_floor``)."""
    scale = max(r[0].abs().max().item() for r in reference)
    tol = logit_tolerance(scale, floor)
    return ParityResult(_max_abs_diff(megatron_out, reference, 0), _max_abs_diff(megatron_out, reference, 1),
                        scale, tol, logprob_tolerance(tol, temperature), floor)


def reported(per_rank: list) -> object:
    """The one non-None per-rank result (the reporting rank's)."""
    got = [r for r in per_rank if r is not None]
    return got[0] if got else None
