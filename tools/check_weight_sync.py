#!/usr/bin/env python
"""Learner -> vLLM weight sync, end to end: log-prob parity before and after an optimizer step.

    python tools/check_weight_sync.py --hf DIR --learner-tp 2 --learner-pp 2 [--rollout-engines 1]
        [--rollout-tp 2] [--multiprocess] [--backend vllm|hf]

Starts a learner pool (Megatron, TP x PP, fp32) and a rollout pool (vLLM engines) as one local launch (or use
torchrun --nproc_per_node=TP*PP+E*ROLLOUT_TP). ``--rollout-tp``: vLLM tensor parallel per engine (its leader rank runs
vLLM, which starts one worker process per TP rank; the engine's other ranks stay idle). ``--multiprocess``: vLLM's
multi-process mode (the GPU default; weights reach its workers through shared memory). ``--backend hf``: the
transformers backend (``rollout.backend=hf``) in place of vLLM, same buckets, same bound. Loads DIR into the learner, syncs, samples, recomputes the sampled tokens'
log-probs on the learner and compares with vLLM's; takes one optimizer step on a dummy loss, syncs again and compares
again.

Pass rule: every round's max |vLLM log-prob - learner log-prob| over the sampled tokens is at most
    logprob_tolerance = 2 * 2e-5 * logit_scale / temperature     (logit_scale = the learner's max |logit| there)
the parity rule of tools/check_parity.py: fp32 rounding in either forward grows with the logits, and a log-prob moves
by at most twice the logit error. E.g. SmolLM2-135M (logits up to ~35): ~1.4e-3; a tiny random model (logits ~5):
~2e-4; a stale or misplaced tensor moves log-probs by O(0.1-1). Also fails if a sample carries the wrong version, or
if the second sync moved the engine's log-probs by less than 1e-3 (the optimizer step was not applied).
Last line: ``max_abs_logprob_diff=<float> sync_seconds=<float> logit_scale=<float> logprob_tolerance=<float>`` (the
worse of the two rounds; the second sync's time).
"""

import argparse
import json
import logging

from megatron_async_rlhf.config import ClusterConfig
from megatron_async_rlhf.weights.llama_config import check_hf_model, cli_exit
from megatron_async_rlhf.launch import run_distributed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf", required=True)
    ap.add_argument("--learner-tp", type=int, default=1)
    ap.add_argument("--learner-pp", type=int, default=1)
    ap.add_argument("--rollout-engines", type=int, default=1)
    ap.add_argument("--rollout-tp", type=int, default=1)
    ap.add_argument("--multiprocess", action="store_true", help="vLLM multi-process engines (rollout.vllm.engine_multiprocess)")
    ap.add_argument("--backend", default="vllm", help="rollout.backend: vllm or hf")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=12)
    ap.add_argument("--bucket-mb", type=float, default=64.0)
    ap.add_argument("--timeout-s", type=float, default=300.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    check_hf_model(args.hf, args.learner_tp, args.learner_pp)
    cluster = dict(learner_tp=args.learner_tp, learner_pp=args.learner_pp, rollout_engines=args.rollout_engines,
                   rollout_tp=args.rollout_tp, bucket_mb=args.bucket_mb, timeout_s=args.timeout_s)
    rollout = {"backend": args.backend, **({"vllm": {"engine_multiprocess": True}} if args.multiprocess else {})}
    import torch

    world = ClusterConfig(**cluster).validate(cuda=torch.cuda.is_available()).world

    from megatron_async_rlhf.checks.weight_sync import check_job, evaluate, logprob_bound

    results = run_distributed(world, check_job, "check", cluster, args.hf, args.prompts, args.max_new_tokens,
                              seed=args.seed, rollout=rollout, default_group=False, timeout_s=args.timeout_s * 4)
    report = results[0]
    if report is None:  # under torchrun, ranks other than the controller
        return 0
    for r in report["rounds"]:
        print(f"v{r['version']}: {r['samples']} samples, versions {r['versions']}, finish "
              f"{ {k: r['finish_reasons'].count(k) for k in set(r['finish_reasons'])} }, "
              f"max_abs_logprob_diff={r['max_abs_logprob_diff']:.3e} (logit_scale {r['logit_scale']:.2f}), "
              f"sync {r['sync_seconds']:.3f} s "
              f"{r['sync_bytes'] / 1e6:.2f} MB {r['sync_gbps']:.3f} GB/s")
    print(f"train step: {json.dumps(report.get('train'))}; engine change after step: "
          f"{report['rounds'][-1].get('engine_change', 0):.3e}")
    ok, problems = evaluate(report)
    for p in problems:
        print(f"FAIL: {p}")
    diff = max(r["max_abs_logprob_diff"] for r in report["rounds"])
    scale, tol = logprob_bound(report)
    print(f"max_abs_logprob_diff={diff:.3e} sync_seconds={report['rounds'][-1]['sync_seconds']:.3f} "
          f"logit_scale={scale:.3e} logprob_tolerance={tol:.3e}")
    return 0 if ok else 1


if __name__ == "__main__":
    cli_exit(main)
