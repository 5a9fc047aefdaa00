"""PPO with a critic (the paper's PPO): per-token rewards with the KL penalty, GAE over the critic's old values,
advantages whitened over the batch's completion tokens, the clipped PPO loss of ``ppo.py`` and the clipped value loss.
The pure maths is ``gae.py``; the value model itself is ``learner/critic.py``::

    old values V (critic forward) -> per-token rewards: score at the last token, -kl_coef * (logp_sampler -
    logp_ref) at every token -> GAE (gamma, lambda) -> advantages whitened over the batch's tokens -> the policy's
    clipped loss -> the critic's clipped value loss against the returns
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_async_rlhf.algorithms.base import register_algorithm
from megatron_async_rlhf.algorithms.gae import gae, token_rewards, value_loss
from megatron_async_rlhf.algorithms.ppo import PPO, ClipConfig
from megatron_async_rlhf.errors import ConfigError


def gae_advantages(micro_batches: list[dict], scores: torch.Tensor, kl_coef: float, gamma: float, lam: float,
                   dp_sum=None) -> dict:
    """Per micro-batch: ``adv [b, s-1]`` (GAE, whitened over all completion tokens of the batch) and ``returns``
    (GAE + old values, not whitened), from ``scores [rows]`` (the sequence rewards, indexed by ``m["rows"]``),
    ``sampler``, ``ref``, ``old_values`` and ``mask``. Returns metrics of the raw numbers. ``dp_sum``: sums a tensor
    over the data-parallel replicas that hold the batch's other rows (``Algorithm.dp_sum``): the whitening statistics
    and metrics are then the whole batch's."""
    raw = []
    for m in micro_batches:
        r = token_rewards(scores[m["rows"]], m["sampler"], m["ref"], m["mask"], kl_coef)  # [b, s-1]
        adv, m["returns"] = gae(r, m["old_values"], m["mask"], gamma, lam)
        raw.append(adv)
    flat = torch.cat([a[m["mask"].bool()] for a, m in zip(raw, micro_batches)])  # every completion token
    returns = torch.cat([m["returns"][m["mask"].bool()] for m in micro_batches])
    if dp_sum is None:
        mean, std, returns_mean = flat.mean(), flat.std(unbiased=False), returns.mean()
    else:  # two passes over all replicas' tokens: the mean, then the squared deviations from it
        n, total, ret = dp_sum(torch.stack([flat.new_tensor(flat.numel()), flat.sum(), returns.sum()]).double())
        mean = (total / n).to(flat.dtype)
        std = (dp_sum(((flat - mean) ** 2).sum().double().view(1))[0] / n).sqrt().to(flat.dtype)
        returns_mean = ret / n
    for a, m in zip(raw, micro_batches):
        m["adv"] = (a - mean) * torch.rsqrt(std ** 2 + 1e-8) * m["mask"]  # gae.whiten over the whole batch
    return {"advantage_raw_mean": float(mean), "advantage_raw_std": float(std), "returns_mean": float(returns_mean)}


@register_algorithm("ppo_critic")
class PPOCritic(PPO):
    """PPO with a value model: token-level GAE advantages; otherwise as ``ppo`` (rows, units, clipped loss)."""

    @dataclass(kw_only=True)
    class Config(ClipConfig):
        kl_coef: float = 0.05
        """KL-to-reference penalty in the per-token reward."""
        gae_gamma: float = 1.0
        """GAE discount per token, in [0, 1] (1: none)."""
        gae_lambda: float = 0.95
        """GAE lambda, in [0, 1]: 1 gives Monte-Carlo returns minus the value (low bias), 0 one-step TD errors (low
        variance)."""
        value_coef: float = 0.1
        """The value loss's weight (the critic has its own Adam, so this scales its gradient before clipping; with
        ``critic_lr`` it sets how fast the critic moves)."""
        value_clip: float = 0.2
        """Value predictions move at most this far from the batch's old values (clipped value loss)."""
        critic_lr: float = 0.0
        """The critic's learning rate; 0: ``algorithm.lr``. The critic starts from the reward model
        (reward.kind=reward_model), else from the policy's trunk with a fresh head."""

    uses_critic = True

    def check(self) -> None:
        super().check()
        c = self.cfg
        if not (0 <= c.gae_gamma <= 1 and 0 <= c.gae_lambda <= 1) or c.value_clip <= 0 or c.critic_lr < 0:
            raise ConfigError("algorithm.ppo_critic: gae_gamma and gae_lambda must be in [0, 1], value_clip > 0, "
                              "critic_lr >= 0")

    def advantages(self, micro_batches: list[dict], rewards: torch.Tensor, order: list[int]) -> dict:
        c = self.cfg
        return gae_advantages(micro_batches, rewards[order], c.kl_coef, c.gae_gamma, c.gae_lambda, self.dp_sum)

    def value_loss(self, values: torch.Tensor, m: dict) -> tuple[torch.Tensor, dict]:
        loss, mm = value_loss(values, m["old_values"], m["returns"], m["mask"], self.cfg.value_clip)
        return self.cfg.value_coef * loss, {**mm, "value_loss": loss.detach()}
