"""Where a batch's rewards are computed (``reward.placement``), and the reward of samples itself.

- ``controller``: the learner's controller scores each batch when it arrives, before training it. Every second of
  scoring is a second the learner waits (``reward_wait_s == reward_s``), and a reward model lives on the learner's
  first device beside its shard and the reference model.
- ``rollout``: each engine's rank scores its own samples right after generating them, with the scorer built there
  (a reward model or judge beside the engine, or the math checker against the gold answers sent with the prompts).
  The learner receives batches already scored. In the asynchronous schedule scoring overlaps training like
  generation does: the learner waits only for the part of it that outlasts its own step (``reward_wait_s`` <=
  ``reward_s``), and the reward model's memory is on the rollout pool.
- ``dedicated``: as ``rollout``, but engine e hands its samples to reward rank e (``cluster.reward_ranks``, ranks of
  their own after the rollout pool, :func:`serve_rewards`), so the scorer has a device to itself and neither pool
  holds its memory.

Penalties that depend on how a sample ended (``reward.missing_eos_penalty``) are applied on the controller in both
cases (they are arithmetic on the finish reason), so ``Sample.reward`` is always the raw score.

The scorer is built only where rewards are computed: with ``rollout`` or ``dedicated`` the learner holds none
(:func:`controller_scorer`), and its evaluations are scored there too (the rows travel with the eval prompts; an
evaluation's reference answers are sent there as texts, :func:`score_texts_remotely`).
Every reward is checked where it arrives on the learner: a NaN or infinite one stops the run
(:class:`NonFiniteReward`, naming the source, the step and the prompt) before any update or evaluation uses it.
"""

from __future__ import annotations

import time

import torch

PLACEMENTS = ("controller", "rollout", "dedicated")


SCORERS: dict[tuple, object] = {}
"""This process's reward sources by what decides them: an engine that scores in two ways (its generations, and texts
sent to it: :func:`text_scores_handler`) loads its reward model once."""


def shared_scorer(rc):
    """The reward source of ``RewardConfig`` ``rc``, built once per process (``SCORERS``)."""
    from megatron_async_rlhf.rewards.scorer import build_scorer

    key = (rc.kind, rc.reward_model_path, rc.dtype, rc.judge, tuple(sorted((rc.policy_format or {}).items())))
    if key not in SCORERS:
        SCORERS[key] = build_scorer(rc)
    return SCORERS[key]


class RewardFn:
    """Raw rewards of samples: ``fn(samples, rows) -> [N]``, where sample ``s`` answers ``rows[s.prompt_index]``.
    The run's reward source (``reward.kind``, ``rewards/scorer.py``) scores the decoded completions with their rows'
    prompts and gold answers."""

    def __init__(self, reward_cfg, tokenizer):
        self.tok = tokenizer
        self.text = shared_scorer(reward_cfg)

    def __call__(self, samples, rows) -> torch.Tensor:
        texts = self.tok.batch_decode([s.token_ids for s in samples], skip_special_tokens=True)
        picked = [rows[s.prompt_index] for s in samples]
        return self.text.score([r.prompt for r in picked], texts, [r.answer for r in picked]).float()


def controller_scorer(reward_cfg, tokenizer) -> RewardFn | None:
    """The controller's scorer: a :class:`RewardFn` with ``reward.placement=controller``; None with ``rollout`` or
    ``dedicated`` (the scorer, e.g. a reward model, is loaded on the rollout pool or reward ranks, never here)."""
    return RewardFn(reward_cfg, tokenizer) if reward_cfg.placement == "controller" else None


class NonFiniteReward(RuntimeError):
    """A reward that is NaN or infinite reached the learner: the run stops before anything uses it."""


def check_finite(rewards: torch.Tensor, samples, rows, kind: str, where: str) -> None:
    """Raise :class:`NonFiniteReward` naming the reward source (``reward.kind``), ``where`` (the step) and the first
    bad sample's prompt index and text, if any of ``rewards [N]`` (raw, one per sample) is NaN or infinite."""
    bad = (~torch.isfinite(rewards)).nonzero().flatten().tolist()
    if not bad:
        return
    s = samples[bad[0]]
    prompt = getattr(rows[s.prompt_index], "prompt", None) if rows is not None else None
    raise NonFiniteReward(
        f"reward.kind={kind} returned {rewards[bad[0]].item()} for {len(bad)} of {len(rewards)} samples at {where}; "
        f"the first is a completion of prompt index {s.prompt_index} ({str(prompt)[:80]!r}). The run stops before "
        "any update uses it. Fix: the reward source (a reward model with non-finite weights or an overflowing "
        "reward.dtype: try float32; a judge returning nan)")


def _unscored(samples) -> RuntimeError:
    return RuntimeError(f"{len(samples)} samples arrived unscored and the controller has no scorer (reward.placement "
                        "is rollout or dedicated): the request must carry its rows so the rollout side scores them")


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


def raw_rewards(fn: RewardFn | None, samples, rows) -> torch.Tensor:
    """The samples' raw rewards (controller): as scored on the rollout side when they carry them, else scored here."""
    r = carried_rewards(samples)
    if r is None and fn is None:
        raise _unscored(samples)
    return fn(samples, rows) if r is None else r


def learner_rewards(ctx, fn: RewardFn | None, samples, rows, collected: dict, reward_cfg,
                    step: int) -> tuple[torch.Tensor, dict]:
    """(training rewards: raw + penalties, {reward_s, reward_wait_s}) of the batch of RL step ``step``, computed on
    the controller and broadcast to every learner rank; a non-finite raw reward raises :class:`NonFiniteReward` on
    every learner rank. ``collected``: the rollout client's numbers of the collect that brought it; ``reward_cfg``:
    the run's ``RewardConfig``."""
    import torch.distributed as dist

    from megatron_async_rlhf.rewards import apply_penalties

    box = [None]
    if ctx.is_controller:
        t0 = time.perf_counter()
        r = carried_rewards(samples)
        scored_there = r is not None
        if not scored_there:
            r = raw_rewards(fn, samples, rows)
        try:
            check_finite(r, samples, rows, reward_cfg.kind, f"RL step {step}")
        except NonFiniteReward as e:
            box = [e]
        else:
            r = apply_penalties(r, [s.finish_reason for s in samples], reward_cfg.missing_eos_penalty)
            here = time.perf_counter() - t0
            if scored_there:  # the learner waited only for the scoring that outlasted its own work
                timing = {"reward_s": collected.get("reward_s", 0.0),
                          "reward_wait_s": min(collected.get("reward_s", 0.0), collected.get("collect_wait_s", 0.0))}
            else:
                timing = {"reward_s": here, "reward_wait_s": here}
            box = [(r, timing)]
    dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], NonFiniteReward):  # every learner rank stops at the same step
        raise box[0]
    return box[0]


def serve_rewards(ctx, reward_cfg, model_path: str) -> dict:
    """A reward rank's loop (``reward.placement=dedicated``): score what its engine sends until it says shutdown."""
    from transformers import AutoTokenizer

    fn = RewardFn(reward_cfg, AutoTokenizer.from_pretrained(model_path))
    ch, stats = ctx.reward_bridge, {"batches": 0, "samples": 0, "reward_s": 0.0}
    ch.send_obj({"ready": True}, 0, "reporting the reward scorer ready", timeout_s=ctx.cfg.startup_timeout_s)
    while True:
        msg = ch.recv_obj(0, "waiting for samples to score", timeout_s=ctx.cfg.idle_timeout_s)
        if msg["cmd"] == "shutdown":
            return stats
        if msg["cmd"] == TEXT_SCORES:
            ch.send_obj({"rewards": fn.text.score(msg["prompts"], msg["completions"]).tolist()}, 0,
                        "returning text scores")
            continue
        t0 = time.perf_counter()
        rewards = fn(msg["samples"], msg["rows"]).tolist()
        seconds = time.perf_counter() - t0
        stats["batches"] += 1
        stats["samples"] += len(rewards)
        stats["reward_s"] += seconds
        ch.send_obj({"rewards": rewards, "seconds": seconds}, 0, "returning rewards")


def score_remotely(ch, samples, rows) -> float:
    """Engine side of ``dedicated``: send the samples to this engine's reward rank, set ``sample.reward`` from its
    answer; returns the seconds the reward rank spent scoring."""
    ch.send_obj({"cmd": "score", "samples": samples, "rows": rows}, 1, f"sending {len(samples)} samples to score")
    reply = ch.recv_obj(1, f"scoring {len(samples)} samples")
    for s, r in zip(samples, reply["rewards"]):
        s.reward = r
    return reply["seconds"]


# ----- texts that were not sampled (the reference answers an evaluation judges against) ---------------------------
TEXT_SCORES = "score_texts"
"""The rollout command (an engine handler, ``rollout.server.serve(handlers=...)``) that scores given prompt +
completion texts with the run's reward source where it lives: the engine's own scorer (``rollout``) or its reward
rank's (``dedicated``)."""


def text_scores_handler(reward_cfg, model_path: str):
    """The engine's handler of :data:`TEXT_SCORES` (``modes/rl.py`` passes it to every engine)."""

    def handle(ctx, engine, msg) -> None:
        if ctx.reward_bridge is not None:  # dedicated: the engine's reward rank holds the scorer
            ctx.reward_bridge.send_obj(msg, 1, f"sending {len(msg['prompts'])} texts to score")
            reply = ctx.reward_bridge.recv_obj(1, f"scoring {len(msg['prompts'])} texts")
        else:  # rollout: the scorer this engine scores its generations with (built once, shared_scorer)
            from transformers import AutoTokenizer

            fn = RewardFn(reward_cfg, AutoTokenizer.from_pretrained(model_path))
            reply = {"rewards": fn.text.score(msg["prompts"], msg["completions"]).tolist()}
        ctx.control.send_obj(reply, 0, "returning text scores")

    return handle


def score_texts_remotely(client, prompts: list, completions: list[str]) -> list[float]:
    """Controller: the run's raw rewards of given texts, scored on the rollout side (the first engine)."""
    client.command(0, {"cmd": TEXT_SCORES, "prompts": prompts, "completions": completions},
                   f"sending {len(prompts)} texts to score")
    return client.ctx.control.recv_obj(1, f"scoring {len(prompts)} texts")["rewards"]
