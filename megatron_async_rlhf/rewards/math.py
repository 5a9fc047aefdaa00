"""Verifiable math reward: 1.0 when the completion's final answer equals the gold answer, else 0.0.

The final answer is the text after the last GSM8k-style ``#### `` marker, else the last ``\\boxed{...}``, else the
last number in the completion (``data/answers.py``). Equality is decided by ``math-verify`` (numbers, fractions, LaTeX, sets).
"""

from __future__ import annotations

import torch

from megatron_async_rlhf.data.answers import extract_final_answer
from megatron_async_rlhf.rewards.scorer import register_reward


def math_reward(completion: str, gold: str) -> float:
    from math_verify import parse, verify

    answer = extract_final_answer(completion)
    if answer is None:
        return 0.0
    gold_parsed = parse(_as_math(gold))
    pred = parse(_as_math(answer))
    return 1.0 if gold_parsed and pred and verify(gold_parsed, pred) else 0.0


def _as_math(s: str) -> str:
    """math-verify extracts from LaTeX or plain expressions; wrap plain answers so both parse the same way."""
    s = s.strip()
    return s if "\\" in s or s.startswith("$") else f"${s}$"


class MathScorer:
    """``reward.kind=math``: 1.0 for each completion whose final answer equals its gold answer, else 0.0."""

    def score(self, prompts: list, completions: list[str], answers: list[str] | None = None) -> torch.Tensor:
        if answers is None or len(answers) != len(completions):
            raise ValueError("reward.kind=math scores against gold answers: one per completion")
        return torch.tensor([math_reward(c, a) for c, a in zip(completions, answers)], dtype=torch.float32)


@register_reward("math")
def _math(rc) -> MathScorer:
    return MathScorer()
