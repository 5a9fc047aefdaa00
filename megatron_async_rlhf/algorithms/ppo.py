"""PPO-clip with an off-policy correction for off-policy samples. Advantages are per sample (the critic-free
variant: group baseline, GRPO-style) or per token (PPO with a critic: GAE, ``algorithms/ppo_critic.py``). The
importance weight against the sampler (vLLM) is by default ``w = min(pi_old / pi_sampler, tis_cap)`` (truncated
importance sampling; ``correction``: masked, sequence-masked or none, ``algorithms/corrections.py``), detached; the
clipped ratio is taken against ``old_logp`` (the learner's log-probs when the batch arrived; with one update per
batch that is the current policy, so the ratio is 1 and all of the off-policy correction is in ``w``; with
``algorithm.updates_per_batch > 1`` the ratio moves and the clip acts)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_async_rlhf.algorithms.base import Algorithm, register_algorithm
from megatron_async_rlhf.algorithms.corrections import CORRECTIONS, effective_sample_size, importance_weights
from megatron_async_rlhf.errors import ConfigError


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
    correction: str = "tis",  # algorithms/corrections.py
    band: tuple[float, float] = (0.5, 2.0),  # [low, high] of mis / seq_mask
) -> tuple[torch.Tensor, dict]:
    """(the clipped, importance-weighted per-token loss ``[N, T]``, 0 outside ``mask``; metrics)."""
    if old_logp is None:
        old_logp = logp.detach()
    adv = advantages.detach()
    adv = adv.unsqueeze(-1) if adv.dim() == 1 else adv  # [N, 1] or [N, T]
    ratio = torch.exp(logp - old_logp)  # [N, T]
    w, stats = importance_weights(old_logp, sampler_logp, mask, correction, tis_cap, *band)  # [N, T]
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1 - clip_eps, 1 + clip_eps)
    per_token = w * torch.maximum(unclipped, clipped) * mask  # [N, T]
    m = mask.bool()
    metrics = {
        "clip_fraction": ((ratio - 1).abs() > clip_eps)[m].float().mean().detach() if m.any() else ratio.new_zeros(()),
        "tis_weight_mean": w[m].mean() if m.any() else w.new_zeros(()),
        "tis_truncated": (torch.exp(old_logp - sampler_logp) > tis_cap)[m].float().mean() if m.any()
        else w.new_zeros(()),
        **stats,
    }
    return per_token, metrics


def ppo_clip_loss(logp, old_logp, sampler_logp, advantages, mask, clip_eps: float = 0.2,
                  tis_cap: float = 2.0, correction: str = "tis", band: tuple[float, float] = (0.5, 2.0)
                  ) -> tuple[torch.Tensor, dict]:
    """PPO-clip with an off-policy correction, the mean over all completion tokens (arguments as
    :func:`ppo_clip_per_token`)."""
    per_token, metrics = ppo_clip_per_token(logp, old_logp, sampler_logp, advantages, mask, clip_eps, tis_cap,
                                            correction, band)
    return per_token.sum() / mask.sum().clamp(min=1), metrics


@dataclass(kw_only=True)
class ClipConfig:
    clip_eps: float = 0.2
    """The PPO ratio is clipped to [1 - clip_eps, 1 + clip_eps] (acts with algorithm.updates_per_batch > 1)."""
    tis_cap: float = 2.0
    """Truncated importance sampling: the weight pi_old / pi_sampler of an off-policy token is capped at this."""
    correction: str = "tis"
    """Off-policy correction of each token's loss by r = pi_old / pi_sampler (``algorithms/corrections.py``): tis
    (weight min(r, tis_cap); with the learner's log-probs at the step's start as pi_old this is decoupled PPO:
    behaviour policy = the sampler, proximal policy = the learner) | mis (weight r inside [mis_low, mis_high], 0
    outside: masked importance sampling, ICEPOP) | seq_mask (tis, and a sequence whose geometric-mean r is outside
    [mis_low, mis_high] is dropped) | none (weight 1)."""
    mis_low: float = 0.5
    """Lower edge of the band of r kept by ``correction=mis`` / ``seq_mask``."""
    mis_high: float = 2.0
    """Upper edge of the band of r kept by ``correction=mis`` / ``seq_mask``."""

    @property
    def band(self) -> tuple[float, float]:
        return self.mis_low, self.mis_high


def check_clip(cfg: ClipConfig, section: str) -> None:
    """The clip section's own contracts (a ConfigError naming the field)."""
    if cfg.correction not in CORRECTIONS:
        raise ConfigError(f"algorithm.{section}.correction={cfg.correction!r}: use one of {list(CORRECTIONS)}")
    if not 0 < cfg.mis_low < 1 < cfg.mis_high:
        raise ConfigError(f"algorithm.{section}.mis_low={cfg.mis_low}, mis_high={cfg.mis_high}: need 0 < mis_low < 1 "
                          "< mis_high (the band of pi_old / pi_sampler that is kept)")
    if not cfg.tis_cap > 0 or not cfg.clip_eps > 0:
        raise ConfigError(f"algorithm.{section}.tis_cap={cfg.tis_cap}, clip_eps={cfg.clip_eps}: both must be > 0")


@register_algorithm("ppo")
class PPO(Algorithm):
    """Critic-free PPO-clip: every sample a row, advantages from the prompt's group baseline (reward minus the
    group's mean, over its std), the loss a mean over completion tokens (its units)."""

    Config = ClipConfig

    def check(self) -> None:
        check_clip(self.cfg, self.name)

    def batch_metrics(self, metrics: dict) -> dict:
        return effective_sample_size(metrics)

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
        c = self.cfg
        return ppo_clip_loss(logp, m.get("old"), m["sampler"], m["adv"], m["mask"], c.clip_eps, c.tis_cap,
                             c.correction, c.band)
