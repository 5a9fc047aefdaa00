"""PPO-clip with truncated importance sampling (TIS) for off-policy samples. Advantages are per sample (the
critic-free variant: group baseline, GRPO-style) or per token (PPO with a critic: GAE, ``algorithms/gae.py``). The
importance weight against the sampler (vLLM) is ``w = min(pi_old / pi_sampler, tis_cap)``, detached; the clipped
ratio is taken against ``old_logp`` (the learner's log-probs when the batch arrived; with one update per batch that is
the current policy, so the ratio is 1 and all of the off-policy correction is in ``w``; with
``algorithm.updates_per_batch > 1`` the ratio moves and the clip acts)."""

from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor, normalize_std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """``rewards [P, k]`` -> ``(r - mean_prompt) / (std_prompt + eps)`` (std only if ``normalize_std``)."""
    adv = rewards - rewards.mean(dim=1, keepdim=True)
    if normalize_std:
        adv = adv / (rewards.std(dim=1, keepdim=True, unbiased=False) + eps)
    return adv


def ppo_clip_loss(
    logp: torch.Tensor,  # [N, T] current policy
    old_logp: torch.Tensor | None,  # [N, T] learner log-probs when the batch arrived (None: = logp, detached)
    sampler_logp: torch.Tensor,  # [N, T] the sampler's log-probs of the same tokens
    advantages: torch.Tensor,  # [N] per sample, broadcast over its tokens, or [N, T] per token (GAE)
    mask: torch.Tensor,  # [N, T] 1 on completion tokens
    clip_eps: float = 0.2,
    tis_cap: float = 2.0,
) -> tuple[torch.Tensor, dict]:
    if old_logp is None:
        old_logp = logp.detach()
    adv = advantages.detach()
    adv = adv.unsqueeze(-1) if adv.dim() == 1 else adv  # [N, 1] or [N, T]
    ratio = torch.exp(logp - old_logp)  # [N, T]
    w = torch.exp(old_logp - sampler_logp).clamp(max=tis_cap).detach()  # [N, T]
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1 - clip_eps, 1 + clip_eps)
    per_token = w * torch.maximum(unclipped, clipped) * mask  # [N, T]
    loss = per_token.sum() / mask.sum().clamp(min=1)
    m = mask.bool()
    metrics = {
        "clip_fraction": ((ratio - 1).abs() > clip_eps)[m].float().mean().detach() if m.any() else ratio.new_zeros(()),
        "tis_weight_mean": w[m].mean() if m.any() else w.new_zeros(()),
        "tis_truncated": (torch.exp(old_logp - sampler_logp) > tis_cap)[m].float().mean() if m.any()
        else w.new_zeros(()),
    }
    return loss, metrics
