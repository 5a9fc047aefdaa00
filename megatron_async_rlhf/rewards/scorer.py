"""Reward sources behind one interface, registered by ``reward.kind``.

A reward source is built from the ``RewardConfig`` and scores text: ``score(prompts, completions, answers) -> [N]``
(fp32), where ``answers`` are the data's gold answers (empty strings when the data has none). Each kind is one
module that registers its factory::

    @register_reward("math")            # rewards/math.py: the completion's final answer against the gold one
    def _math(rc): return MathScorer()

Built-in: ``math`` (``rewards/math.py``), ``reward_model`` (``rewards/reward_model.py``: an HF sequence classifier)
and ``judge`` (``rewards/judges.py``: a programmatic judge by name). Placement (controller, rollout, dedicated
ranks) is ``rewards/placement.py``'s business, not the source's.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch


class RewardSource(Protocol):
    def score(self, prompts: list, completions: list[str], answers: list[str] | None = None) -> torch.Tensor:
        """``[N]`` fp32 rewards of the completions (raw: penalties are applied later, on the controller)."""


REWARDS: dict[str, Callable] = {}


def register_reward(kind: str):
    """Decorator: ``factory(reward_config) -> RewardSource`` selectable as ``reward.kind=<kind>``."""

    def add(factory: Callable) -> Callable:
        if kind in REWARDS:
            raise ValueError(f"reward kind {kind!r} registered twice")
        REWARDS[kind] = factory
        return factory

    return add


def build_scorer(rc) -> RewardSource:
    """The reward source of a ``RewardConfig`` (``rc.kind``). Importing this module ran ``rewards/__init__``, which
    imports (registers) every built-in kind."""
    if rc.kind not in REWARDS:
        raise ValueError(f"reward.kind={rc.kind!r} unknown; choose one of {sorted(REWARDS)}")
    return REWARDS[rc.kind](rc)
