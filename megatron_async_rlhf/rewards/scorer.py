"""The reward that reads text, built from a ``RewardConfig``: one object with ``score(prompts, completions) -> [N]``
that the trainer calls for RL rewards and evaluation."""

from __future__ import annotations


def text_scorer(rc):
    """The scorer of a ``RewardConfig`` whose reward reads text: ``score(prompts, completions) -> [N]`` for
    ``reward_model`` (an HF sequence classifier) and ``judge``; None for ``math`` (scored against gold answers)."""
    if rc.kind == "judge":
        from megatron_async_rlhf.rewards.judges import JudgeScorer

        return JudgeScorer(rc.judge)
    if rc.kind == "reward_model":
        from megatron_async_rlhf.rewards.reward_model import RewardModelScorer

        return RewardModelScorer(rc.reward_model_path, dtype=rc.dtype)
    return None
