"""Rewards: sources behind one interface, registered by ``reward.kind`` (``scorer.py``: math answers, a reward model,
programmatic judges), where they are computed (``placement.py``), and penalties for truncated samples."""

from megatron_async_rlhf.rewards import judges, math, reward_model  # noqa: F401  (registers each reward kind)
from megatron_async_rlhf.rewards.math import extract_final_answer, math_reward
from megatron_async_rlhf.rewards.penalties import apply_penalties
from megatron_async_rlhf.rewards.scorer import REWARDS, build_scorer, register_reward

__all__ = ["REWARDS", "build_scorer", "register_reward", "extract_final_answer", "math_reward", "apply_penalties"]
