"""Learner -> rollout weight sync, checked end to end (used by tools/check_weight_sync.py and the tests).

One job on every rank of a launch: a learner pool (Megatron, TP x PP) and a rollout pool (vLLM engines). The learner
loads an HF model, syncs it to the engines, the engines sample, the learner recomputes the sampled tokens' log-probs
and compares; then one optimizer step on a dummy loss, a second sync, the comparison again, and a check that the
engines' outputs changed.

Verdict (``evaluate``): the parity rule of ``parity.py`` applied to log-probs. The learner also reports its max |logit|
over the compared positions (``logit_scale``, the larger of the two rounds'); every round's max |engine log-prob -
learner log-prob| must be at most ``2 * RTOL * logit_scale / temperature``, since fp32 rounding in either forward grows
with the logits and moves a log-prob by at most twice the logit error.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from megatron_async_rlhf.cluster import setup
from megatron_async_rlhf.config import ClusterConfig, RolloutConfig, from_dict
from megatron_async_rlhf.checks.parity import logit_tolerance, logprob_tolerance
from megatron_async_rlhf.rollout.base import EngineSettings, SamplingSettings

log = logging.getLogger(__name__)

# the second sync must move the engine's log-probs by more than this (one optimizer step at lr 0.05 moves them by O(1))
MIN_ENGINE_CHANGE = 1e-3


def logprob_bound(report: dict) -> tuple[float, float]:
    """(logit_scale, log-prob tolerance) of a check's report: the learner's max |logit| over both rounds, and the
    parity rule's log-prob bound for logits of that magnitude at the sampling temperature."""
    scale = max(r["logit_scale"] for r in report["rounds"])
    return scale, logprob_tolerance(logit_tolerance(scale), report["temperature"])


def evaluate(report: dict) -> tuple[bool, list[str]]:
    """(passed, problems) of a ``check_job`` report."""
    _, tol = logprob_bound(report)
    problems = []
    for r in report["rounds"]:
        if r["max_abs_logprob_diff"] > tol:
            problems.append(f"v{r['version']}: max_abs_logprob_diff {r['max_abs_logprob_diff']:.3e} > {tol:.3e}")
        if r["versions"] != [r["version"]]:
            problems.append(f"v{r['version']}: samples tagged with versions {r['versions']}")
    change = report["rounds"][-1].get("engine_change", 0.0)
    if change < MIN_ENGINE_CHANGE:
        problems.append(f"the second sync did not change the engine's log-probs (max change {change:.2e})")
    return not problems, problems


def check_job(session: str, cluster: dict, hf_dir: str, num_prompts: int = 4, max_new_tokens: int = 12,
              n: int = 2, seed: int = 0, lr: float = 0.05, stop_token_ids: tuple[int, ...] = (),
              rollout: dict | None = None, world_size: int | None = None) -> dict | None:
    from megatron_async_rlhf.rollout.server import serve

    ccfg = from_dict(ClusterConfig, cluster)
    rcfg = from_dict(RolloutConfig, rollout)
    ctx = setup(ccfg, session, world_size)
    if ctx is None:
        return None
    if ctx.role.kind != "learner":
        return {"engine": ctx.role.engine, **serve(ctx, EngineSettings(hf_dir, ccfg.rollout_tp, rcfg))}
    return _learner_side(ctx, hf_dir, num_prompts, max_new_tokens, n, seed, lr, stop_token_ids)


def _learner_side(ctx, hf_dir, num_prompts, max_new_tokens, n, seed, lr, stop_token_ids) -> dict | None:
    from megatron_async_rlhf.learner.forward import completion_logprobs, pad_batch
    from megatron_async_rlhf.learner.build import model_from_hf
    from megatron_async_rlhf.learner.train import OptimConfig, train_step, wrap_for_training
    from megatron_async_rlhf.rollout.client import RolloutClient

    cfg, model, info = model_from_hf(hf_dir, ctx.cfg.learner_tp, ctx.cfg.learner_pp, dtype=torch.float32)
    client = RolloutClient(ctx)
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, cfg.vocab_size, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist()
               for _ in range(num_prompts)]
    sampling = SamplingSettings(max_new_tokens=max_new_tokens, n=n, seed=seed, stop_token_ids=tuple(stop_token_ids))
    report: dict = {"rounds": [], "temperature": sampling.temperature}
    try:
        first_sequences = None
        for version in (0, 1):
            if version == 1:
                before = client.score(first_sequences) if ctx.is_controller else None
                ddp, opt = wrap_for_training(model, OptimConfig(lr=lr, clip_grad=0.0))
                tokens = pad_batch(first_sequences, len(first_sequences))
                step = train_step(ddp, opt, [{"tokens": tokens}], lambda lp, b: (-lp.mean(), {"nll": -lp.mean()}),
                                  cfg.vocab_size)
                report["train"] = step
            sync = client.sync_weights(model, info, cfg, version)
            samples = client.generate(prompts, sampling) if ctx.is_controller else None
            box = [samples]
            dist.broadcast_object_list(box, src=0)
            samples = box[0]
            if first_sequences is None:
                first_sequences = [s.prompt_ids + s.token_ids for s in samples]
            ours = completion_logprobs(model, info, cfg.vocab_size, [s.prompt_ids for s in samples],
                                       [s.token_ids for s in samples])
            rnd = {"version": version, **sync, "samples": len(samples),
                   "versions": sorted({s.version for s in samples}),
                   "finish_reasons": [s.finish_reason for s in samples],
                   "lengths": [len(s.token_ids) for s in samples],
                   "last_tokens": [s.token_ids[-1] if s.token_ids else None for s in samples]}
            scale = _logit_scale(model, cfg.vocab_size, [s.prompt_ids for s in samples],
                                 [s.token_ids for s in samples])
            if ours is not None:
                rnd["max_abs_logprob_diff"] = max(
                    (a - torch.tensor(s.logprobs)).abs().max().item() for a, s in zip(ours, samples))
                rnd["logit_scale"] = scale
            if version == 1 and ctx.is_controller:
                after = client.score(first_sequences)
                rnd["engine_change"] = max(abs(x - y) for a, b in zip(before, after) for x, y in zip(a, b))
            report["rounds"].append(rnd)
    finally:
        report["engines"] = client.shutdown()
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, report)
    if dist.get_rank() != 0:
        return None
    merged = parts[0]
    for p in parts[1:]:  # the last stage's log-prob diffs join the controller's report
        for r0, r in zip(merged["rounds"], p["rounds"]):
            if "max_abs_logprob_diff" in r:
                r0["max_abs_logprob_diff"], r0["logit_scale"] = r["max_abs_logprob_diff"], r["logit_scale"]
        if p.get("train") and len(p["train"]) > len(merged.get("train") or {}):
            merged["train"] = p["train"]  # the last stage also holds the loss
    return merged


def _logit_scale(model, vocab_size: int, prompts: list[list[int]], completions: list[list[int]],
                 micro_batch: int = 8) -> float | None:
    """The learner's max |logit| over the positions whose log-probs are compared, on the last pipeline stage (None
    elsewhere). All learner ranks call it together, like ``completion_logprobs``."""
    from megatron.core import parallel_state as ps

    from megatron_async_rlhf.learner.forward import forward_collect, pad_batch
    from megatron_async_rlhf.learner.logprobs import gather_vocab_parallel

    rows = -(-len(prompts) // micro_batch) * micro_batch
    chunks = list(pad_batch([p + c for p, c in zip(prompts, completions)], rows).split(micro_batch))
    # position j predicts token j+1, so a completion's tokens are predicted at [len(prompt)-1, len(prompt)-1+len(c))
    spans = [(len(p) - 1, len(p) - 1 + len(c)) for p, c in zip(prompts, completions)]

    def on_logits(logits, i):
        full = gather_vocab_parallel(logits, vocab_size)  # [micro_batch, S, V]
        mine = spans[i * micro_batch: (i + 1) * micro_batch]
        return max((full[r, a:b].abs().max().item() for r, (a, b) in enumerate(mine) if b > a), default=0.0)

    model.eval()
    out = forward_collect(model, chunks, on_logits)
    return max(out, default=0.0) if ps.is_pipeline_last_stage() else None
