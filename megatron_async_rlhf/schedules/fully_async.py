"""The fully asynchronous schedule (``schedule=fully_async``): the engines generate continuously, prompt groups are
admitted as the staleness bound allows, finished groups stream to the learner, and after every optimizer step the new
weights reach the engines between two of their decoding steps (the sequences in flight continue under them).

Invariant (enforced here, nowhere else). ``P = prompts_per_step``, ``n = max_staleness``; versions count optimizer
steps, as in ``rounds.py``.

* A *group* is the ``k`` samples of one prompt. Groups are numbered ``g = 0, 1, ...`` in the prompt stream's order
  (group ``g`` is prompt ``g mod P`` of ``PromptStream.round(g // P)``, sampled with that round's seed: the prompts and
  seeds the round schedule would use for step ``g // P``).
* Strict FIFO: optimizer step ``t`` trains exactly the groups ``[tP, (t+1)P)`` (so the "first P groups ready, oldest
  admitted first" rule of the issue reduces to this: a group admitted earlier is never overtaken; step ``t`` waits for
  its stragglers while the engines go on generating later groups).
* Admission control (AReaL's rule): group ``g`` is admitted only while ``g // P - e <= n``, where ``e`` is the policy
  version the engines hold (every token of the group is then sampled by a version ``>= e``, since weights only move
  forward and the admit reaches the engine after the sync of ``e``). Group ``g`` is trained at step ``t = g // P``, so
  ``t - oldest token version <= t - e <= n``: the bound holds whatever the generation lengths or the finish order.
  It is asserted for every sample (:class:`StalenessError`), with ``oldest >= e`` and ``newest <= t``.
* Exactly once: a ledger of admitted, finished and trained group ids; every step takes its P groups once, and at the
  end ``admitted == trained == steps x P`` and nothing is in flight or left over (no group is generated that is not
  trained: admission stops at ``steps x P``).
* Weights: pushed after every optimizer step (``sync_every_step`` is implied), before the next admission.
  ``max_staleness=0`` is the synchronous schedule through the same code: after each push only the next step's groups
  are admitted.

``n = 1`` with ``P = 2``, groups finishing in random order (``e``: engine version at admission)::

    admit  g0 g1 g2 g3 @e0 | sync v1, admit g4 g5 @e1 | sync v2, admit g6 g7 @e2 | ...
    train  step 0 = g0 g1  | step 1 = g2 g3 (tokens v0..v1) | step 2 = g4 g5 (tokens v1..v2) | ...

Metrics per step (on top of the push's numbers): ``staleness`` (the step's largest ``t - oldest``, as
``staleness_max``), ``staleness_p50`` / ``staleness_p90`` over the batch's samples, ``version_spread`` (newest minus
oldest policy version among the batch's tokens; 0 in the round schedule), ``wait_s`` (the learner waited for the
step's groups), ``engine_busy_frac`` (of the polled engines' time since the last step, the share spent in engine
steps), ``groups_in_flight`` (admitted, not trained).

The engines (``rollout/server.py``, ``_Streaming``) talk request/response: the controller ``admit``s groups to the
least-loaded engine, ``poll``s every engine without waiting before it admits (an engine with nothing in flight
answers at once, not after the prefill of what is admitted next), then each engine holding a missing group once,
waiting ``until`` all of those have finished, and
pushes weights (``sync``) that the engine loads between two engine steps (``rollout.in_flight_kv``). Rewards are
computed per group as it finishes on the rollout pool (``reward.placement=rollout|dedicated``), else on the
controller when the step is trained.

Resume (``run_state.py``): checkpoints fall between two steps and hold the learner at version ``v`` and the prompt
stream as it was before round ``v``, but none of the groups admitted after step ``v - 1`` (finished or in flight:
they would be older than the resumed weights anyway). A resumed schedule pushes its weights, then admits groups
``vP, vP + 1, ...`` again, from the same prompts and seeds: each is trained exactly once, by a run that is not the
uninterrupted one sample for sample (nor is an uninterrupted fully asynchronous run reproducible: what is ready when
depends on timing).

Engines that die or hang (``rollout/supervisor.py``) are restarted by their rank with the newest weights they had
loaded (or the ones being loaded) and the groups in flight on them are admitted again there, from the same prompts
and seeds (``server._Streaming``): each still comes back once, and its tokens come from a version at least its
admission's (weights only move forward), so ``_check`` holds. Past ``rollout.max_restarts`` the run checkpoints and
exits 1 naming the engine, as the round schedule does.

The off-policy corrections (``algorithms/corrections.py``) weigh each token by the sampler's own log-prob of it, so a
sample whose tokens come from two versions is corrected token by token; the staleness metrics and the bound count a
sample's oldest version (``Sample.version``).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Iterator

from megatron_async_rlhf.cluster import RolloutError
from megatron_async_rlhf.schedules import Batch, ScheduleStats, StalenessError
from megatron_async_rlhf.schedules.rounds import Rounds

log = logging.getLogger(__name__)


def _percentile(xs: list[int], q: float) -> float:
    """Nearest-rank percentile of ``xs`` (non-empty)."""
    s = sorted(xs)
    return float(s[min(len(s) - 1, max(0, int(round(q / 100 * len(s) + 0.5)) - 1))])


class FullyAsync(Rounds):
    def __init__(self, client, policy, prompts, sampling, steps: int, max_staleness: int, off_policy_n: int = 1,
                 always_sync: bool = True, resume=None):
        """As :class:`Rounds` (the loop builds either the same way); ``off_policy_n`` must be 1, ``always_sync`` is
        implied (a push after every step). ``resume``: a ``checkpoint_state()`` (of either schedule) to continue from:
        the groups admitted after that step are generated again (see the module doc)."""
        if off_policy_n != 1:
            raise ValueError(f"schedule=fully_async needs off_policy_n=1, not {off_policy_n}")
        super().__init__(client, policy, prompts, sampling, steps, max_staleness, 1, True, None)
        self.per = prompts.per_round  # P groups per step
        # a checkpoint at step v needs the prompt stream as it was before round v; rounds up to v + n are drawn by then
        prompts.lookahead = max(getattr(prompts, "lookahead", 1), max_staleness + 1)
        self.total = steps * self.per
        if resume is not None:  # a round schedule's round in flight (resume[1]) is dropped: generated again below
            state, _ = resume
            self.version = state["version"]
            self.engine_version = -1  # the engines hold the starting weights, not this run's: push first
            self.stats = ScheduleStats(**state["stats"])
        self.admitted = self.version * self.per  # groups [0, admitted) admitted
        self.trained_groups = self.version * self.per  # groups [0, trained_groups) trained
        self._admitted_at: dict[int, int] = {}  # group -> engine version at its admission
        self._rounds: dict[int, tuple[list, list, int]] = {}  # round -> (prompts, rows, seed), drawn in order
        # controller only: where each group is, what came back
        self._engine_of: dict[int, int] = {}
        self._load = [0] * max(1, getattr(client, "engines", 1))  # groups admitted to each engine, not yet returned
        self._done: dict[int, list] = {}  # finished, not yet trained: group -> samples
        self._times: dict[int, tuple[float, float]] = {}  # engine -> (busy_s, up_s), as last polled
        self._times_prev: dict[int, tuple[float, float]] = {}
        self._reward_s: dict[int, float] = {}  # engine -> its cumulative scoring seconds, as last polled
        self._reward_prev: dict[int, float] = {}

    # ----- admission -------------------------------------------------------------------------------------------
    def _round(self, r: int) -> tuple[list, list, int]:
        if r not in self._rounds:
            assert not self._rounds or r == max(self._rounds) + 1, "rounds are drawn in order"
            prompts, rows = self.prompts.round(r)
            self._rounds[r] = (prompts, rows, self.prompts.seed(r))
        return self._rounds[r]

    def _admit(self) -> None:
        """Admit every group the bound allows now: ``g // P <= engine_version + max_staleness``."""
        limit = min(self.total, (self.engine_version + self.n + 1) * self.per)
        by_engine: dict[int, list] = {}
        while self.admitted < limit:
            g = self.admitted
            r, j = divmod(g, self.per)
            prompts, rows, seed = self._round(r)
            self._admitted_at[g] = self.engine_version
            self.admitted += 1
            if self.client.ctx.is_controller:
                e = min(range(len(self._load)), key=lambda i: (self._load[i], i))  # least loaded
                self._load[e] += 1
                self._engine_of[g] = e
                by_engine.setdefault(e, []).append(
                    {"id": g, "prompt": prompts[j], "index": j, "row": rows[j],
                     "sampling": dataclasses.replace(self.sampling, seed=seed)})
        for e, groups in sorted(by_engine.items()):
            self.client.admit(e, groups)
        self.stats.generated = self.admitted // self.per

    # ----- finished groups ---------------------------------------------------------------------------------------
    def _file(self, e: int, reply: dict) -> None:
        for group in reply["groups"]:
            g = group.group_id
            if g in self._done or g < self.trained_groups or self._engine_of.get(g) != e:
                raise StalenessError(f"group {g} came back twice, after it was trained, or from engine {e} which "
                                     f"was not given it")
            self._done[g] = group.samples
            self._load[e] -= 1
        self._times[e] = (reply["busy_s"], reply["up_s"])
        self._reward_s[e] = reply.get("reward_s", 0.0)

    def _poll_all(self) -> None:
        """Every engine once per step, without waiting (fresh busy times, the groups finished meanwhile); before the
        admit, so that an engine with nothing left in flight answers at once instead of after its next engine step,
        the prefill of the groups just admitted."""
        if self.client.ctx.is_controller:
            for e in range(len(self._load)):
                self._file(e, self.client.poll(e, wait=False))

    def _gather(self, t: int, t0: float) -> tuple[list | None, float]:
        """(step ``t``'s samples: its P groups in order, k samples each; None off the controller, the seconds waited
        since ``t0``)."""
        if not self.client.ctx.is_controller:
            return None, 0.0
        need = range(t * self.per, (t + 1) * self.per)
        while True:
            missing = [g for g in need if g not in self._done]
            if not missing:
                break
            e = self._engine_of[missing[0]]  # its engine, until it finished every missing group it holds
            self._file(e, self.client.poll(e, wait=True, until=[g for g in missing if self._engine_of[g] == e]))
        samples = []
        for g in need:
            group = self._done.pop(g)
            self._engine_of.pop(g)  # a second copy of it coming back is now refused by _file
            j = g % self.per
            if not group or any(s.prompt_index != j for s in group):
                raise StalenessError(f"group {g} came back with prompt indexes {[s.prompt_index for s in group]}, "
                                     f"not {j}")
            samples += group
        return samples, time.perf_counter() - t0

    def _check(self, t: int, samples: list) -> list[int]:
        """Assert the bound for every sample this rank holds; returns their staleness ``t - oldest``."""
        stale = []
        for i, s in enumerate(samples):
            if s is None:
                continue
            g = t * self.per + s.prompt_index
            lag = t - s.version
            if lag > self.n or s.version < self._admitted_at[g] or s.newest_version > t:
                raise StalenessError(f"step {t}: a sample of group {g} (admitted at engine version "
                                     f"{self._admitted_at[g]}) has token versions {s.versions}: {lag} updates old > "
                                     f"max_staleness {self.n}, or outside [{self._admitted_at[g]}, {t}]")
            stale.append(lag)
        return stale

    # ----- the loop ----------------------------------------------------------------------------------------------
    def run(self) -> Iterator[Batch | str]:
        """Step ``t``: push the weights of version ``t`` (after the first), collect what finished, admit what the
        bound allows, wait for groups ``[tP, (t+1)P)``, hand them out as one mini-batch."""
        start = self.version
        for t in range(start, self.steps):
            if t > start or self.engine_version != self.version:  # resumed: push the weights first
                yield from self._sync()  # weights move between two engine steps; groups in flight continue
            t0 = time.perf_counter()
            try:
                self._poll_all()
                self._admit()
                samples, wait_s = self._gather(t, t0)
            except RolloutError as e:  # an engine failed for good: every learner rank learns it (for the checkpoint)
                samples, wait_s = e, 0.0
            samples = self._deal(samples, self.per)
            if isinstance(samples, RolloutError):
                raise samples
            _, rows, _ = self._rounds.pop(t)
            batch = Batch(t, samples, rows, wait_s, self.engine_version)
            yield self._hand_out_async(batch, wait_s)
        if not (self.admitted == self.trained_groups == self.total and self.stats.trained == self.steps
                and not self._done and not any(self._load)):
            raise RuntimeError(f"schedule accounting broken: admitted {self.admitted}, trained {self.trained_groups} "
                               f"of {self.total} groups, {self.stats.trained} of {self.steps} steps; left over "
                               f"{sorted(self._done)}, in flight per engine {self._load}")

    def _hand_out_async(self, batch: Batch, wait_s: float) -> Batch:
        t = batch.index
        assert t == self.version, "steps are handed out in order"
        stale = self._check(t, batch.samples)
        for g in range(t * self.per, (t + 1) * self.per):
            del self._admitted_at[g]
        mine = [s for s in batch.samples if s is not None]
        spread = max(s.newest_version for s in mine) - min(s.version for s in mine)
        self.trained_groups += self.per
        self.version += 1
        self.stats.trained += 1
        self.stats.staleness.append(max(stale))
        self.stats.off_policy_updates.append(max(stale))
        busy = sum(self._times[e][0] - self._times_prev.get(e, (0.0, 0.0))[0] for e in self._times)
        up = sum(self._times[e][1] - self._times_prev.get(e, (0.0, 0.0))[1] for e in self._times)
        reward_s = sum(self._reward_s.values()) - sum(self._reward_prev.values())
        self._times_prev, self._reward_prev = dict(self._times), dict(self._reward_s)
        if self.client.ctx.is_controller:  # what learner_rewards reads: the groups were scored as they finished
            self.client.last_collect = {"reward_s": reward_s, "collect_wait_s": wait_s}
        batch.stats = {**self._sync_stats, "staleness": max(stale), "off_policy_updates": max(stale),
                       "staleness_max": max(stale), "staleness_p50": _percentile(stale, 50),
                       "staleness_p90": _percentile(stale, 90), "version_spread": spread,
                       "batch_version": min(s.version for s in mine), "gen_s": wait_s, "wait_s": wait_s,
                       "engine_busy_frac": busy / up if up > 0 else 0.0,
                       "groups_in_flight": self.admitted - self.trained_groups, "version": self.version}
        self._sync_stats = {}
        return batch

    def checkpoint_state(self) -> tuple[dict, None]:
        """(schedule state, None) between two steps: only the step and the counters. The groups admitted after it
        (finished or not) are not saved: a resumed schedule admits them again from the same prompts and seeds
        (``run_state.save`` stores the prompt stream as it was before round ``version``) and generates them with the
        resumed weights, so each is still trained exactly once; the checkpointing run itself goes on unchanged."""
        stats = dataclasses.replace(self.stats, generated=self.version, staleness=list(self.stats.staleness),
                                    off_policy_updates=list(self.stats.off_policy_updates))
        return {"version": self.version, "stats": dataclasses.asdict(stats)}, None
