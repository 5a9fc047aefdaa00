"""Schedules: when prompts are sent to the engines, when their samples are trained and when weights move.

The interface between the run's loop (``modes/rl.py``) and a schedule is small: ``for mb in schedule.run()`` yields
the mini-batches to train, in order, each with ``stats`` for its metrics row, and :data:`ENGINES_IDLE` at the moments
the engines hold the learner's weights and generate nothing (where mid-run evaluation may use them). The loop trains
each mini-batch before it asks for the next item; ``schedule.version`` counts the mini-batches handed out (the
learner's policy version once the loop has trained them), ``schedule.checkpoint_state()`` is what a checkpoint
between rounds holds. ``rounds.py``: the synchronous / N-step off-policy schedule; ``fully_async.py``: continuous
generation with in-flight weight updates. The top-level ``schedule`` field picks one (:data:`SCHEDULES`).
"""

from __future__ import annotations

from dataclasses import dataclass, field


class StalenessError(RuntimeError):
    pass


SCHEDULES = {"rounds": "megatron_async_rlhf.schedules.rounds:Rounds",
             "fully_async": "megatron_async_rlhf.schedules.fully_async:FullyAsync"}
"""``schedule=<name>`` -> its class (imported on use: the config layer validates names without importing them)."""


def schedule_class(name: str):
    import importlib

    module, cls = SCHEDULES[name].split(":")
    return getattr(importlib.import_module(module), cls)


ENGINES_IDLE = "engines idle"
"""Yielded right after a weight push and before the next generation request: the engines hold ``schedule.version``
and nothing is in flight. What the loop does there never changes what is trained or when. (``fully_async``: yielded
after each push too, but prompt groups stay in flight: a request made there runs beside them.)"""


@dataclass
class Batch:
    index: int  # a round's index when collected; a mini-batch's optimizer step (r*M + j) when trained
    samples: list  # rollout.base.Sample, prompt-major: k samples per prompt; None where another DP replica trains it
    #   (a learner rank other than the controller holds only its replica's share: schedules/rounds)
    meta: list  # per prompt of the round, whatever the data source attached (gold answers, texts): a sample's
    # prompt_index indexes it, in a mini-batch too
    gen_seconds: float
    requested_at_version: int
    minibatch: int = 0  # j: position of this mini-batch in its round
    ends_round: bool = True  # the round's last mini-batch: checkpoints and stops fall after it
    stats: dict = field(default_factory=dict)  # the schedule's numbers for this step's metrics row

    @property
    def versions(self) -> list[int]:
        return sorted({s.version for s in self.samples if s is not None})


@dataclass
class ScheduleStats:
    generated: int = 0
    trained: int = 0
    syncs: int = 0
    staleness: list[int] = field(default_factory=list)  # per trained mini-batch: its round's staleness (rounds)
    off_policy_updates: list[int] = field(default_factory=list)  # per trained mini-batch
