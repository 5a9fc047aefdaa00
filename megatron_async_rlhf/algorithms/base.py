"""What an RL algorithm is to the learner step, and the registry that ``algorithm.name`` selects from.

An algorithm is one module: a subclass of :class:`Algorithm` registered with ``@register_algorithm("name")``, owning
its config section (a nested ``Config`` dataclass, read from ``algorithm.<name>.*``), which samples become training
rows, their advantages, the loss units a micro-batch is weighted by, and the loss. ``learner/step.py`` calls these
hooks in this order and knows no algorithm by name::

    rows(rewards)                    -> row order (chosen/rejected pairs, all samples, ...), metrics
    needs_old_logprobs(updates)      -> whether the step records the policy's log-probs before its first update
    advantages(micro_batches, ...)   -> ``m["adv"]`` per micro-batch (last pipeline stage), metrics; the rows of
                                        this data-parallel replica, the rewards of the whole batch
    units(micro_batch)               -> its share of the batch's loss (pairs, samples, tokens)
    loss(logp, micro_batch)          -> (loss of the micro-batch, metrics): a pure function of tensors
    value_loss(values, micro_batch)  -> the critic's loss, for algorithms with ``uses_critic``

Micro-batch dicts carry ``tokens [b, s]``, ``mask [b, s-1]`` (1 where a completion token is predicted), ``rows [b]``
(indices into the step's rows), ``sampler`` / ``ref`` / ``old`` log-probs ``[b, s-1]`` and, with a critic,
``old_values``. The pure maths (losses, advantages) lives in plain functions next to each class, tested by hand.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import torch

from megatron_async_rlhf.errors import ConfigError


@dataclass(kw_only=True)
class NoConfig:
    """An algorithm without settings of its own."""


class Algorithm:
    """Base class: the defaults are what most policy-gradient losses want (every sample a row, no old log-probs)."""

    name: ClassVar[str] = ""
    Config: ClassVar[type] = NoConfig
    rows_per_unit: ClassVar[int] = 1
    """Consecutive rows that form one loss unit and are never split over micro-batches (2: a DPO pair)."""
    uses_critic: ClassVar[bool] = False
    """True: the learner builds a value model (``learner/critic.py``) and trains it with :meth:`value_loss`."""
    dp_sum: Callable[[torch.Tensor], torch.Tensor] | None = None
    """Set by the learner step when the batch's rows are split over data-parallel replicas: sums a tensor over the
    replicas, for statistics of the whole batch (advantage whitening); None when this rank holds every row."""

    def __init__(self, cfg, ac):
        """``cfg``: this algorithm's section (``algorithm.<name>``); ``ac``: the whole ``algorithm`` config (k,
        max_new_tokens, updates_per_batch)."""
        self.cfg, self.ac = cfg, ac

    def check(self) -> None:
        """Contracts between this algorithm's section and the general ``algorithm.*`` fields (raise ConfigError)."""

    def rows(self, rewards: torch.Tensor) -> tuple[list[int], dict]:
        """``rewards [P, k]`` -> (the samples that become rows, in row order, as prompt-major sample indices;
        metrics). An empty order skips the step (nothing to learn from)."""
        return list(range(rewards.numel())), {}

    def needs_old_logprobs(self) -> bool:
        """Whether the loss needs ``old``: the policy's log-probs before this batch's first update."""
        return False

    def advantages(self, micro_batches: list[dict], rewards: torch.Tensor, order: list[int]) -> dict:
        """Set ``m["adv"]`` in each micro-batch from ``rewards [N]`` (every sample, prompt-major) and the row
        ``order``; returns metrics. Runs on the last pipeline stage only. Default: no advantages."""
        return {}

    def units(self, m: dict) -> float:
        """The micro-batch's loss units (its loss is weighted by its share of the batch's)."""
        return float(len(m["rows"]))

    def loss(self, logp: torch.Tensor, m: dict) -> tuple[torch.Tensor, dict]:
        """Loss of one micro-batch from the policy's ``logp [b, s-1]`` (0 outside ``m["mask"]``)."""
        raise NotImplementedError

    def batch_metrics(self, metrics: dict) -> dict:
        """The step's metrics once averaged over the batch (micro-batches and replicas, weighted by loss units;
        ``*_max`` keys: the maximum), with what can only be derived from those means added. Default: unchanged."""
        return metrics

    def value_loss(self, values: torch.Tensor, m: dict) -> tuple[torch.Tensor, dict]:
        """The critic's loss of one micro-batch (``uses_critic`` algorithms)."""
        raise NotImplementedError(f"{self.name} has no critic")


ALGORITHMS: dict[str, type[Algorithm]] = {}


def register_algorithm(name: str):
    """Class decorator: make an :class:`Algorithm` selectable as ``algorithm.name=<name>``, its ``Config`` the
    ``algorithm.<name>`` section."""

    def add(cls: type[Algorithm]) -> type[Algorithm]:
        if name in ALGORITHMS:
            raise ValueError(f"algorithm {name!r} registered twice ({ALGORITHMS[name].__module__}, {cls.__module__})")
        cls.name = name
        ALGORITHMS[name] = cls
        return cls

    return add


def build_algorithm(ac) -> Algorithm:
    """The algorithm ``ac.name`` (``ac``: the ``algorithm`` config) with its own section."""
    if ac.name not in ALGORITHMS:
        raise ConfigError(f"algorithm.name={ac.name!r} unknown; choose one of {sorted(ALGORITHMS)}")
    return ALGORITHMS[ac.name](getattr(ac, ac.name), ac)
