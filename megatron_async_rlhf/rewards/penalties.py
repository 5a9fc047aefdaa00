"""Penalties applied to rewards before the loss: a sample cut off by the length limit never said it was done."""

from __future__ import annotations

import torch


def apply_penalties(rewards: torch.Tensor, finish_reasons: list[str], missing_eos_penalty: float = 0.0) -> torch.Tensor:
    """``rewards [N]`` minus ``missing_eos_penalty`` for every sample whose finish reason is ``length``."""
    truncated = torch.tensor([r == "length" for r in finish_reasons], dtype=rewards.dtype)
    return rewards - missing_eos_penalty * truncated
