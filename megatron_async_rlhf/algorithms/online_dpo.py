"""Online DPO (the paper's main loss): k >= 2 fresh samples per prompt, the best and worst by reward form a pair,
sigmoid (DPO) or squared (IPO) loss on the policy/reference log-ratio margin.

Stale pairs. The loss is a function of the learner's and the reference's log-probs of the pair only: the sampler's
probabilities never enter it, so a pair sampled by an older policy is trained exactly as a fresh one (no importance
weight, nothing masked). Staleness changes the data, not the formula: the pair was picked among an older policy's
samples, and its margin is measured under the current policy, so a pair the policy has already moved towards has a
larger margin and (sigmoid loss) a smaller gradient. How far the policy has moved from the pair's sampler is logged
per step as ``sampler_seq_logp_diff``: the mean over the pair's sequences of ``|log pi(y|x) - log pi_sampler(y|x)|``
(whole-sequence log-probs, the quantity the loss uses; with one update per batch, ``pi`` is the learner at the
step's start)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from megatron_async_rlhf.algorithms.base import Algorithm, register_algorithm
from megatron_async_rlhf.errors import ConfigError


def select_pairs(rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``rewards [P, k]`` -> (chosen index, rejected index, valid) per prompt, each ``[P]``. chosen = argmax,
    rejected = argmin; a prompt whose samples all tie carries no preference and is not valid."""
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"online DPO needs rewards [prompts, k>=2], got shape {list(rewards.shape)}")
    chosen = rewards.argmax(dim=1)
    rejected = rewards.argmin(dim=1)
    valid = rewards.max(dim=1).values > rewards.min(dim=1).values
    return chosen, rejected, valid


def sequence_drift(logp: torch.Tensor, sampler: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ``|sum_t (logp - sampler)|`` on the ``mask``'s tokens: how far each sequence's log-prob under
    the learner is from its sampler's (``[b, T]`` each; a scalar)."""
    return (((logp - sampler) * mask).sum(-1)).abs().mean()


def online_dpo_loss(
    chosen_logp: torch.Tensor,  # [B] policy sequence log-probs (sum over completion tokens)
    rejected_logp: torch.Tensor,  # [B]
    ref_chosen_logp: torch.Tensor,  # [B] frozen reference model
    ref_rejected_logp: torch.Tensor,  # [B]
    beta: float = 0.1,
    loss_type: str = "sigmoid",
) -> tuple[torch.Tensor, dict]:
    chosen_ratio = chosen_logp - ref_chosen_logp  # [B]
    rejected_ratio = rejected_logp - ref_rejected_logp  # [B]
    margin = chosen_ratio - rejected_ratio  # [B]
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * margin)
    elif loss_type == "ipo":
        losses = (margin - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"loss_type={loss_type!r}: use 'sigmoid' (DPO) or 'ipo'")
    metrics = {
        "dpo_margin": margin.detach().mean(),
        "dpo_accuracy": (margin.detach() > 0).float().mean(),
        "chosen_reward": beta * chosen_ratio.detach().mean(),
        "rejected_reward": beta * rejected_ratio.detach().mean(),
    }
    return losses.mean(), metrics


@register_algorithm("online_dpo")
class OnlineDPO(Algorithm):
    """Rows are (chosen, rejected) pairs, one per prompt whose samples do not all tie; the loss unit is a pair."""

    @dataclass(kw_only=True)
    class Config:
        beta: float = 0.1
        """Strength of the implicit KL to the reference: the loss is on ``beta`` x the log-ratio margin."""
        loss_type: str = "sigmoid"
        """sigmoid (DPO) or ipo."""

    rows_per_unit = 2

    def check(self) -> None:
        if self.cfg.loss_type not in ("sigmoid", "ipo"):
            raise ConfigError(f"algorithm.online_dpo.loss_type={self.cfg.loss_type!r}: use sigmoid or ipo")

    def rows(self, rewards: torch.Tensor) -> tuple[list[int], dict]:
        k = rewards.shape[1]
        chosen, rejected, ok = select_pairs(rewards)
        order = [p * k + int(i) for p in range(rewards.shape[0]) if ok[p] for i in (chosen[p], rejected[p])]
        return order, {"pairs": len(order) // 2}

    def units(self, m: dict) -> float:
        return len(m["rows"]) / 2

    def loss(self, logp: torch.Tensor, m: dict) -> tuple[torch.Tensor, dict]:
        seq, ref_seq = logp.sum(-1), (m["ref"] * m["mask"]).sum(-1)  # [b]: rows alternate chosen, rejected
        loss, metrics = online_dpo_loss(seq[0::2], seq[1::2], ref_seq[0::2], ref_seq[1::2], self.cfg.beta,
                                        self.cfg.loss_type)
        # a pair's two rows: the per-row mean is this micro-batch's per-pair mean, so it averages exactly by pairs
        metrics["sampler_seq_logp_diff"] = sequence_drift(logp.detach(), m["sampler"], m["mask"])
        return loss, metrics
