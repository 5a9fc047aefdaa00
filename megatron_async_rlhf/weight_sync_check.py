"""Learner -> rollout weight sync, checked end to end (used by tools/check_weight_sync.py and the tests).

One job on every rank of a launch: a learner pool (Megatron, TP x PP) and a rollout pool (vLLM engines). The learner
loads an HF model, syncs it to the engines, the engines sample, the learner recomputes the sampled tokens' log-probs
and compares; then one optimizer step on a dummy loss, a second sync, the comparison again, and a check that the
engines' outputs changed.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from megatron_async_rlhf.cluster import setup
from megatron_async_rlhf.config import ClusterConfig, RolloutConfig, from_dict
from megatron_async_rlhf.rollout.engine import EngineSettings, SamplingSettings

log = logging.getLogger(__name__)


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
    from megatron_async_rlhf.learner.jobs import model_from_hf
    from megatron_async_rlhf.learner.train import OptimConfig, train_step, wrap_for_training
    from megatron_async_rlhf.rollout.client import RolloutClient

    cfg, model, info = model_from_hf(hf_dir, ctx.cfg.learner_tp, ctx.cfg.learner_pp, dtype=torch.float32)
    client = RolloutClient(ctx)
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, cfg.vocab_size, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist()
               for _ in range(num_prompts)]
    sampling = SamplingSettings(max_new_tokens=max_new_tokens, n=n, seed=seed, stop_token_ids=tuple(stop_token_ids))
    report: dict = {"rounds": []}
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
            if ours is not None:
                rnd["max_abs_logprob_diff"] = max(
                    (a - torch.tensor(s.logprobs)).abs().max().item() for a, s in zip(ours, samples))
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
                r0["max_abs_logprob_diff"] = r["max_abs_logprob_diff"]
        if p.get("train") and len(p["train"]) > len(merged.get("train") or {}):
            merged["train"] = p["train"]  # the last stage also holds the loss
    return merged
