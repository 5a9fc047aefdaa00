"""GRPO (Shao et al. 2024, DeepSeekMath): group-normalised advantages, PPO-clip with truncated importance sampling,
an optional KL-to-reference term in the loss; and Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training"),
which removes GRPO's two length/difficulty biases: no division by the group's std, and each sequence's token sum
divided by the generation budget instead of by its own length.

Per sequence i of a prompt's group of k, with A_i = (r_i - mean(r)) / (std(r) + eps) (Dr. GRPO: r_i - mean(r)) and
per-token ratio rho_t = pi / pi_old, importance weight w_t = min(pi_old / pi_sampler, tis_cap)::

    loss_i = (1 / |o_i|) sum_t w_t * max(-A_i rho_t, -A_i clip(rho_t, 1-eps, 1+eps)) + kl_coef * k3_t
             (Dr. GRPO: 1 / max_new_tokens in place of 1 / |o_i|)
    k3_t   = exp(ref_t - logp_t) - (ref_t - logp_t) - 1          (Schulman's unbiased, non-negative KL estimator)

and the loss is the mean over sequences (the loss unit is a sequence).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_async_rlhf.algorithms.base import Algorithm, register_algorithm
from megatron_async_rlhf.algorithms.corrections import effective_sample_size
from megatron_async_rlhf.algorithms.ppo import ClipConfig, check_clip, group_advantages, ppo_clip_per_token


def grpo_loss(
    logp: torch.Tensor,  # [N, T] current policy, 0 outside mask
    old_logp: torch.Tensor | None,  # [N, T] before this batch's first update (None: = logp, detached)
    sampler_logp: torch.Tensor,  # [N, T] the sampler's
    ref_logp: torch.Tensor,  # [N, T] the reference model's
    advantages: torch.Tensor,  # [N] one per sequence
    mask: torch.Tensor,  # [N, T] 1 on completion tokens
    clip_eps: float = 0.2,
    tis_cap: float = 2.0,
    kl_coef: float = 0.0,
    length_norm: int = 0,  # 0: each sequence by its own length (GRPO); > 0: by this constant (Dr. GRPO)
    correction: str = "tis",  # algorithms/corrections.py
    band: tuple[float, float] = (0.5, 2.0),
) -> tuple[torch.Tensor, dict]:
    """(mean over the N sequences of each one's normalised token sum, metrics)."""
    per_token, metrics = ppo_clip_per_token(logp, old_logp, sampler_logp, advantages, mask, clip_eps, tis_cap,
                                            correction, band)
    d = (ref_logp - logp) * mask  # [N, T]
    k3 = (torch.exp(d) - d - 1) * mask  # [N, T], >= 0
    if kl_coef:
        per_token = per_token + kl_coef * k3
    lengths = mask.sum(-1)  # [N]
    denom = torch.full_like(lengths, float(length_norm)) if length_norm > 0 else lengths.clamp(min=1)
    per_seq = per_token.sum(-1) / denom  # [N]
    n_tok = mask.sum().clamp(min=1)
    return per_seq.mean(), {**metrics, "kl_k3": (k3.sum() / n_tok).detach()}


@register_algorithm("grpo")
class GRPO(Algorithm):
    """Every sample a row, one advantage per sample from its prompt's group; the loss unit is a sequence."""

    @dataclass(kw_only=True)
    class Config(ClipConfig):
        kl_coef: float = 0.0
        """Weight of the per-token k3 KL-to-reference term in the loss (DeepSeekMath used 0.04; DAPO and Dr. GRPO
        drop it)."""
        dr_grpo: bool = False
        """Dr. GRPO: advantages not divided by the group's std, and each sequence's loss divided by
        ``algorithm.max_new_tokens`` rather than by its own length."""

    def check(self) -> None:
        check_clip(self.cfg, self.name)

    def batch_metrics(self, metrics: dict) -> dict:
        return effective_sample_size(metrics)

    def needs_old_logprobs(self) -> bool:
        return self.ac.updates_per_batch > 1

    def advantages(self, micro_batches: list[dict], rewards: torch.Tensor, order: list[int]) -> dict:
        grouped = rewards.view(-1, self.ac.samples_per_prompt)  # [P, k]
        adv = group_advantages(grouped, normalize_std=not self.cfg.dr_grpo).reshape(-1)[order]  # [rows]
        for m in micro_batches:
            m["adv"] = adv[m["rows"]]
        return {}

    def loss(self, logp: torch.Tensor, m: dict) -> tuple[torch.Tensor, dict]:
        c = self.cfg
        return grpo_loss(logp, m.get("old"), m["sampler"], m["ref"], m["adv"], m["mask"], c.clip_eps, c.tis_cap,
                         c.kl_coef, self.ac.max_new_tokens if c.dr_grpo else 0, c.correction, c.band)
