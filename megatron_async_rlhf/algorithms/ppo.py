"""PPO-clip with truncated importance sampling (TIS) for off-policy samples. Advantages are per sample (the
critic-free variant: group baseline, GRPO-style) or per token (PPO with a critic: GAE, ``algorithms/ppo_critic.py``). The
importance weight against the sampler (vLLM) is ``w = min(pi_old / pi_sampler, tis_cap)``, detached; the clipped
ratio is taken against ``old_logp`` (the learner's log-probs when the batch arrived; with one update per batch that is
the current policy, so the ratio is 1 and all of the off-policy correction is in ``w``; with
``algorithm.updates_per_batch > 1`` the ratio moves and the clip acts)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_async_rlhf.algorithms.base import Algorithm, register_algorithm


def group_advantages(rewards: torch.Tensor, normalize_std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """``rewards [P, k]`` -> ``(r - mean_prompt) / (std_prompt + eps)`` (std only if ``normalize_std``)."""
    adv = rewards - rewards.mean(dim=1, keepdim=True)
    if normalize_std:
        adv = adv / (rewards.std(dim=1, keepdim=True, unbiased=False) + eps)
    return adv


def ppo_clip_per_token(
    logp: torch.Tensor,  # [N, T] current policy
    old_logp: torch.Tensor | None,  # [N, T] learner log-probs when the batch arrived (None: = logp, detached)
    sampler_logp: torch.Tensor,  # [N, T] the sampler's log-probs of the same tokens
    advantages: torch.Tensor,  # [N] per sample, broadcast over its tokens, or [N, T] per token (GAE)
    mask: torch.Tensor,  # [N, T] 1 on completion tokens
    clip_eps: float = 0.2,
    tis_cap: float = 2.0,
) -> tuple[torch.Tensor, dict]:
    """(the clipped, importance-weighted per-token loss ``[N, T]``, 0 outside ``mask``; metrics)."""
    if old_logp is None:
        old_logp = logp.detach()
    adv = advantages.detach()
    adv = adv.unsqueeze(-1) if adv.dim() == 1 else adv  # [N, 1] or [N, T]
    ratio = torch.exp(logp - old_logp)  # [N, T]
    w = torch.exp(old_logp - sampler_logp).clamp(max=tis_cap).detach()  # [N, T]
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1 - clip_eps, 1 + clip_eps)
    per_token = w * torch.maximum(unclipped, clipped) * mask  # [N, T]
    m = mask.bool()
    metrics = {
        "clip_fraction": ((ratio - 1).abs() > clip_eps)[m].float().mean().detach() if m.any() else ratio.new_zeros(()),
        "tis_weight_mean": w[m].mean() if m.any() else w.new_zeros(()),
        "tis_truncated": (torch.exp(old_logp - sampler_logp) > tis_cap)[m].float().mean() if m.any()
        else w.new_zeros(()),
    }
    return per_token, metrics


def ppo_clip_loss(logp, old_logp, sampler_logp, advantages, mask, clip_eps: float = 0.2,
                  tis_cap: float = 2.0) -> tuple[torch.Tensor, dict]:
    """PPO-clip with TIS, the mean over all completion tokens (arguments as :func:`ppo_clip_per_token`)."""
    per_token, metrics = ppo_clip_per_token(logp, old_logp, sampler_logp, advantages, mask, clip_eps, tis_cap)
    return per_token.sum() / mask.sum().clamp(min=1), metrics


@dataclass(kw_only=True)
class ClipConfig:
    clip_eps: float = 0.2
    """The PPO ratio is clipped to [1 - clip_eps, 1 + clip_eps] (acts with algorithm.updates_per_batch > 1)."""
    tis_cap: float = 2.0
    """Truncated importance sampling: the weight pi_old / pi_sampler of an off-policy token is capped at this."""


@register_algorithm("ppo")
class PPO(Algorithm):
    """Critic-free PPO-clip: every sample a row, advantages from the prompt's group baseline (reward minus the
    group's mean, over its std), the loss a mean over completion tokens (its units)."""

    Config = ClipConfig

    def needs_old_logprobs(self) -> bool:
        return self.ac.updates_per_batch > 1  # with one update the ratio's "old" is the current policy

    def advantages(self, micro_batches: list[dict], rewards: torch.Tensor, order: list[int]) -> dict:
        adv = group_advantages(rewards.view(-1, self.ac.samples_per_prompt)).reshape(-1)[order]  # [rows]
        for m in micro_batches:
            m["adv"] = adv[m["rows"]]
        return {}

    def units(self, m: dict) -> float:
        return float(m["mask"].sum())

    def loss(self, logp: torch.Tensor, m: dict) -> tuple[torch.Tensor, dict]:
        return ppo_clip_loss(logp, m.get("old"), m["sampler"], m["adv"], m["mask"], self.cfg.clip_eps,
                             self.cfg.tis_cap)
