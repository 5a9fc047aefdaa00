"""Bradley-Terry pairwise loss of a reward model: ``-log sigmoid(r_chosen - r_rejected - margin)``.

``margin`` (optional, per pair or one number) asks the chosen response to win by at least that much (Llama 2's
preference-strength margin); 0 is the plain Bradley-Terry likelihood.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(
    chosen: torch.Tensor,  # [B] scalar rewards of the chosen responses
    rejected: torch.Tensor,  # [B] of the rejected ones
    margin: torch.Tensor | float = 0.0,  # [B] or a number
) -> tuple[torch.Tensor, dict]:
    """(mean loss, metrics). ``accuracy`` counts pairs ranked the right way (chosen > rejected, margin ignored)."""
    if chosen.shape != rejected.shape or chosen.dim() != 1:
        raise ValueError(f"chosen {list(chosen.shape)} and rejected {list(rejected.shape)} must both be [B]")
    diff = chosen.float() - rejected.float()  # [B]
    losses = -F.logsigmoid(diff - margin)  # [B]
    metrics = {
        "accuracy": (diff.detach() > 0).float().mean(),
        "reward_diff": diff.detach().mean(),
        "chosen_reward": chosen.detach().float().mean(),
        "rejected_reward": rejected.detach().float().mean(),
    }
    return losses.mean(), metrics
