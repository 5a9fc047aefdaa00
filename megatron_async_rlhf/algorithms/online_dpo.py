"""Online DPO (the paper's main loss): k >= 2 fresh samples per prompt, the best and worst by reward form a pair,
sigmoid (DPO) or squared (IPO) loss on the policy/reference log-ratio margin."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def select_pairs(rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``rewards [P, k]`` -> (chosen index, rejected index, valid) per prompt, each ``[P]``. chosen = argmax,
    rejected = argmin; a prompt whose samples all tie carries no preference and is not valid."""
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"online DPO needs rewards [prompts, k>=2], got shape {list(rewards.shape)}")
    chosen = rewards.argmax(dim=1)
    rejected = rewards.argmin(dim=1)
    valid = rewards.max(dim=1).values > rewards.min(dim=1).values
    return chosen, rejected, valid


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
