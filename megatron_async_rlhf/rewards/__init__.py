"""Rewards: verifiable math answers, a reward-model scorer, and penalties for truncated samples."""

from megatron_async_rlhf.rewards.math import extract_final_answer, math_reward
from megatron_async_rlhf.rewards.penalties import apply_penalties

__all__ = ["extract_final_answer", "math_reward", "apply_penalties"]
