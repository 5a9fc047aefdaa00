"""RLOO: REINFORCE with a leave-one-out baseline over the k samples of a prompt, KL-to-reference in the reward."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_async_rlhf.algorithms.base import Algorithm, register_algorithm


def kl_penalized_rewards(rewards: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor,
                         kl_coef: float) -> torch.Tensor:
    """``rewards [N]`` minus ``kl_coef`` x the sequence KL estimate sum_t (logp - ref_logp) (sampled tokens)."""
    kl = ((logp - ref_logp) * mask).sum(dim=-1)  # [N]
    return rewards - kl_coef * kl.detach()


def rloo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """``rewards [P, k]`` -> advantages ``[P, k]``: r_i - mean of the other k-1 rewards of the same prompt."""
    k = rewards.shape[1]
    if k < 2:
        raise ValueError("RLOO needs k >= 2 samples per prompt")
    others = (rewards.sum(dim=1, keepdim=True) - rewards) / (k - 1)
    return rewards - others


def rloo_loss(logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """``-mean_i A_i * sum_t logp_it`` over the N samples (``advantages [N]``, detached)."""
    seq_logp = (logp * mask).sum(dim=-1)  # [N]
    loss = -(advantages.detach() * seq_logp).mean()
    return loss, {"advantage_abs": advantages.abs().mean().detach()}


@register_algorithm("rloo")
class RLOO(Algorithm):
    """Every sample a row; the loss unit is a sample; the KL to the reference is a penalty in the sequence reward."""

    @dataclass(kw_only=True)
    class Config:
        kl_coef: float = 0.05
        """KL-to-reference penalty in the reward, per sequence (estimated on the sampled tokens)."""

    def advantages(self, micro_batches: list[dict], rewards: torch.Tensor, order: list[int]) -> dict:
        rr = rewards[order].clone()  # [rows]
        for m in micro_batches:
            rr[m["rows"]] = kl_penalized_rewards(rr[m["rows"]], m["sampler"], m["ref"], m["mask"], self.cfg.kl_coef)
        adv = rloo_advantages(rr.view(-1, self.ac.samples_per_prompt)).reshape(-1)  # [rows]
        for m in micro_batches:
            m["adv"] = adv[m["rows"]]
        return {}

    def loss(self, logp: torch.Tensor, m: dict) -> tuple[torch.Tensor, dict]:
        return rloo_loss(logp, m["adv"], m["mask"])
