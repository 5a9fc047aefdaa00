"""PPO with a critic (the paper's PPO): per-token rewards with the KL penalty, generalized advantage estimation,
whitened advantages and the clipped value loss. Pure tensor functions on ``[N, T]`` completion-token tensors (``mask``
1 on the completion's tokens, which are left-aligned: token t of a row is position t of its completion).
"""

from __future__ import annotations

import torch


def token_rewards(scores: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor,
                  kl_coef: float) -> torch.Tensor:
    """``[N, T]``: ``-kl_coef * (logp - ref_logp)`` at every completion token (the per-token KL penalty, estimated on
    the sampled token) plus the sequence score ``scores [N]`` at the completion's last token (its last masked
    position: rows may also start after prompt positions, as in the learner's ``[b, s-1]`` layout)."""
    r = -kl_coef * (logp - ref_logp).detach() * mask
    last = ((mask > 0).long() * torch.arange(mask.shape[1])).max(dim=1).values  # [N]
    has = mask.sum(dim=1) > 0
    r[has, last[has]] += scores[has].to(r.dtype)
    return r


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over each row's completion tokens: ``delta_t = r_t + gamma * V_{t+1} - V_t``
    (``V`` after the last token is 0), ``A_t = delta_t + gamma * lam * A_{t+1}``; returns ``(advantages, returns =
    advantages + values)``, both ``[N, T]`` and 0 outside ``mask``."""
    values = values.detach() * mask
    rewards = rewards * mask
    n, t = rewards.shape
    adv = torch.zeros_like(rewards)
    next_value = torch.zeros(n, dtype=rewards.dtype)
    next_adv = torch.zeros(n, dtype=rewards.dtype)
    for i in reversed(range(t)):
        m = mask[:, i]
        delta = rewards[:, i] + gamma * next_value - values[:, i]
        a = delta + gamma * lam * next_adv
        adv[:, i] = a * m
        # past the end of a row (m = 0) the "next" state stays terminal
        next_value = torch.where(m > 0, values[:, i], next_value)
        next_adv = torch.where(m > 0, a, next_adv)
    return adv, (adv + values) * mask


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``(x - mean) / std`` over the masked entries (population std), 0 outside ``mask``."""
    n = mask.sum().clamp(min=1)
    mean = (x * mask).sum() / n
    var = (((x - mean) * mask) ** 2).sum() / n
    return (x - mean) * torch.rsqrt(var + eps) * mask


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float = 0.2) -> tuple[torch.Tensor, dict]:
    """Clipped value loss ``0.5 * max((V - R)^2, (clip(V, V_old +- clip) - R)^2)``, mean over masked tokens."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    per_token = 0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2) * mask
    n = mask.sum().clamp(min=1)
    frac = (((values - old_values).abs() > clip).float() * mask).sum() / n
    return per_token.sum() / n, {"value_clip_fraction": frac.detach(),
                                 "value_mean": ((values * mask).sum() / n).detach()}
