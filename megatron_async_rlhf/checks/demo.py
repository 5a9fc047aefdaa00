"""The main job until the RL loop lands: conversion + parity on a tiny LLaMA made locally.

Makes a random-weight tiny LLaMA with an offline-trained tokenizer, converts it to a Megatron dist checkpoint at TP2,
exports it back to HF from PP2 (checking the round trip is bit-exact), and checks the learner's logits and
log-probs against HF transformers at TP2 and PP2 loading that checkpoint. Two gloo processes, CPU.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

import torch

log = logging.getLogger("megatron_async_rlhf")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m megatron_async_rlhf", description=__doc__)
    ap.add_argument("--out", default="runs/demo", help="output directory")
    ap.add_argument("--preset", default="tiny-gqa")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from safetensors.torch import load_file

    from megatron_async_rlhf.launch import WorkerGroup
    from megatron_async_rlhf.weights.llama_config import read_config
    from megatron_async_rlhf.checks import jobs
    from megatron_async_rlhf.checks.parity import compare, hf_reference, random_batches, reported
    from megatron_async_rlhf.models.tiny import make_tiny_llama

    t0 = time.time()
    hf_dir, mc_dir, back_dir = (os.path.join(args.out, n) for n in ("hf", "mcore_tp2", "hf_roundtrip"))
    steps = 5
    log.info("[1/%d] making tiny LLaMA %r (random weights, offline tokenizer) in %s", steps, args.preset, hf_dir)
    make_tiny_llama(hf_dir, args.preset)
    cfg = read_config(hf_dir)
    batches = random_batches(cfg.vocab_size, batch=2, seq_len=32, num=2)
    reference = hf_reference(hf_dir, batches)
    ok = True
    with WorkerGroup(2) as pool:
        log.info("[2/%d] HF -> Megatron dist checkpoint at TP2: %s", steps, mc_dir)
        pool.run(jobs.hf_to_mcore, hf_dir, mc_dir, 2, 1)
        log.info("[3/%d] Megatron (loaded at PP2) -> HF: %s", steps, back_dir)
        pool.run(jobs.mcore_to_hf, mc_dir, hf_dir, back_dir, 1, 2)
        a, b = load_file(f"{hf_dir}/model.safetensors"), load_file(f"{back_dir}/model.safetensors")
        exact = sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
        log.info("      round trip HF -> mcore -> HF bit-exact: %s (%d tensors)", exact, len(a))
        ok &= exact
        for i, (tp, pp) in enumerate([(2, 1), (1, 2)]):
            log.info("[%d/%d] parity vs transformers, checkpoint loaded at TP%d PP%d", 4 + i, steps, tp, pp)
            res = compare(reported(pool.run(jobs.parity_from_mcore, mc_dir, hf_dir, tp, pp, batches)), reference)
            log.info("      tp=%d pp=%d %s %s", tp, pp, res.line(), "OK" if res.ok else "FAIL")
            ok &= res.ok
    log.info("done in %.1f s: %s", time.time() - t0, "all checks passed" if ok else "CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
