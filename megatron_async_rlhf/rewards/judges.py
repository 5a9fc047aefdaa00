"""Programmatic judges: ``name -> judge(prompts, completions) -> list[float]``, one score per completion.

One registry, three uses: the RL reward (``reward.kind=judge reward.judge=NAME``, through :class:`JudgeScorer`), a
preference labeller (:func:`label_pairs`: of two responses to a prompt, the higher-scored one is chosen), and an eval
judge (the run's evaluation scores greedy completions with the run's reward). Another judge is one function::

    @register("length")
    def length(prompts, completions):
        return [float(len(c)) for c in completions]

A judge's heavy imports go inside it, so the registry imports with nothing installed.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Callable

import torch

from megatron_async_rlhf.errors import ConfigError
from megatron_async_rlhf.rewards.scorer import register_reward

Judge = Callable[[list[str], list[str]], list[float]]
JUDGES: dict[str, Judge] = {}


def register(name: str) -> Callable[[Judge], Judge]:
    def add(fn: Judge) -> Judge:
        JUDGES[name] = fn
        return fn

    return add


def get_judge(name: str) -> Judge:
    if name not in JUDGES:
        raise ConfigError(f"judge {name!r} unknown; choose one of {sorted(JUDGES)}")
    return JUDGES[name]


@lru_cache(maxsize=1)
def _vader():
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError:
        raise ConfigError("reward.judge=vader needs the vadersentiment package. Fix: pip install vadersentiment "
                          "(tools/install.sh installs it)") from None
    return SentimentIntensityAnalyzer()


@register("vader")
def vader(prompts: list[str], completions: list[str]) -> list[float]:
    """VADER's compound sentiment of the completion alone, in [-1, 1] (Hutto & Gilbert 2014; lexicon and rules,
    no model): positive text scores high. The prompt is not read."""
    analyzer = _vader()
    return [float(analyzer.polarity_scores(c)["compound"]) for c in completions]


class JudgeScorer:
    """The RL reward / eval judge: ``score(prompts, completions) -> [N]`` tensor, like ``RewardModelScorer``."""

    def __init__(self, name: str):
        self.name, self.judge = name, get_judge(name)

    def score(self, prompts: list[str], completions: list[str], answers: list[str] | None = None) -> torch.Tensor:
        scores = self.judge(prompts, completions)
        if len(scores) != len(completions):
            raise RuntimeError(f"judge {self.name!r} returned {len(scores)} scores for {len(completions)} completions")
        return torch.tensor(scores, dtype=torch.float32)


@register_reward("judge")
def _judge(rc) -> JudgeScorer:
    return JudgeScorer(rc.judge)


def label_pairs(judge: str | Judge, prompts: list, first: list[str], second: list[str]) -> tuple[list[dict], int]:
    """Preference rows from two responses per prompt: ``{"prompt", "chosen", "rejected", "chosen_score",
    "rejected_score"}`` with chosen = the higher-scored one, in the schema ``mode=rm`` reads (``data/preferences.py``;
    prompts may be strings or message lists, passed through; judges see strings). Ties carry no preference and are
    dropped: returns (rows, number of ties dropped)."""
    fn = get_judge(judge) if isinstance(judge, str) else judge
    if not len(prompts) == len(first) == len(second):
        raise ValueError(f"{len(prompts)} prompts, {len(first)} and {len(second)} responses: one pair per prompt")
    texts = [p if isinstance(p, str) else "\n".join(m["content"] for m in p) for p in prompts]
    s1, s2 = fn(texts, first), fn(texts, second)
    rows, ties = [], 0
    for p, a, b, x, y in zip(prompts, first, second, s1, s2):
        if x == y:
            ties += 1
            continue
        (c, cs), (r, rs) = ((a, x), (b, y)) if x > y else ((b, y), (a, x))
        rows.append({"prompt": p, "chosen": c, "rejected": r, "chosen_score": cs, "rejected_score": rs})
    return rows, ties

