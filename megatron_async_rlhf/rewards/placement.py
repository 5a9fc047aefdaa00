"""Where a batch's rewards are computed (``reward.placement``), and the reward of samples itself.

- ``controller``: the learner's controller scores each batch when it arrives, before training it. Every second of
  scoring is a second the learner waits (``reward_wait_s == reward_s``), and a reward model lives on the learner's
  first device beside its shard and the reference model.
- ``rollout``: each engine's rank scores its own samples right after generating them, with the scorer built there
  (a reward model or judge beside the engine, or the math checker against the gold answers sent with the prompts).
  The learner receives batches already scored. In the asynchronous schedule scoring overlaps training like
  generation does: the learner waits only for the part of it that outlasts its own step (``reward_wait_s`` <=
  ``reward_s``), and the reward model's memory is on the rollout pool.

Penalties that depend on how a sample ended (``reward.missing_eos_penalty``) are applied on the controller in both
cases (they are arithmetic on the finish reason), so ``Sample.reward`` is always the raw score.
"""

from __future__ import annotations

import time

import torch

PLACEMENTS = ("controller", "rollout")


class RewardFn:
    """Raw rewards of samples: ``fn(samples, rows) -> [N]``, where sample ``s`` answers ``rows[s.prompt_index]``.
    A reward model or judge scores prompt and completion text (``rewards/scorer.py``); otherwise the math checker
    compares the completion's final answer with the row's gold answer."""

    def __init__(self, reward_cfg, tokenizer):
        from megatron_async_rlhf.rewards.scorer import text_scorer

        self.tok = tokenizer
        self.text = text_scorer(reward_cfg)

    def __call__(self, samples, rows) -> torch.Tensor:
        from megatron_async_rlhf.rewards import math_reward

        texts = self.tok.batch_decode([s.token_ids for s in samples], skip_special_tokens=True)
        if self.text is not None:
            return self.text.score([rows[s.prompt_index].prompt for s in samples], texts).float()
        return torch.tensor([math_reward(t, rows[s.prompt_index].answer) for t, s in zip(texts, samples)],
                            dtype=torch.float32)


def score_in_place(fn: RewardFn, samples, rows) -> float:
    """Rollout placement: set ``sample.reward`` on every sample; returns the seconds it took."""
    t0 = time.perf_counter()
    for s, r in zip(samples, fn(samples, rows).tolist()):
        s.reward = r
    return time.perf_counter() - t0


def carried_rewards(samples) -> torch.Tensor | None:
    """The raw rewards the samples came back with (rollout placement), or None if any sample has none."""
    if not samples or any(getattr(s, "reward", None) is None for s in samples):
        return None
    return torch.tensor([s.reward for s in samples], dtype=torch.float32)
