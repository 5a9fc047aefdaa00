#!/usr/bin/env python
"""Logit/log-prob parity of the Megatron learner (at a TP x PP layout) against HF transformers, in fp32.

    python tools/check_parity.py --hf DIR --tp 2 --pp 2 [--seq-len 32 --batch 2 --num-batches 2] [--fp64-floor]

Starts the TP*PP learner processes itself (gloo on CPU). Under torchrun it uses torchrun's processes instead:
    torchrun --nproc_per_node=4 tools/check_parity.py --hf DIR --tp 2 --pp 2

Pass rule (fp32 rounding grows with the logits' magnitude, so the bound does too):
    max_abs_logit_diff   <= logit_tolerance = 2e-5 * logit_scale      (logit_scale = max |HF logit|)
    max_abs_logprob_diff <= 2 * logit_tolerance / temperature          (a log-prob moves by at most twice the logits)
With --fp64-floor, transformers also runs in fp64 and logit_tolerance becomes the larger of the above and
4 * fp32_floor (fp32_floor = max |HF fp32 logit - HF fp64 logit|: how far a correct fp32 forward lands from exact).
2e-5 is twice the largest gap between two correct fp32 forwards seen on a 30-layer model, and 100x below what a 1%
wrong rope_theta does. E.g. SmolLM2-135M (logits up to ~34): logit tolerance ~6.9e-4, seen 9.9e-5 (TP1) and 2.0e-4
(TP3xPP2); a tiny random model (logits ~5): ~1e-4, seen ~1e-5. A wrong layout moves logits by 1e-1 x scale.
Last line: ``max_abs_logit_diff=<float> max_abs_logprob_diff=<float> logit_scale=<float> logit_tolerance=<float>
logprob_tolerance=<float> [fp32_floor=<float>]``; exit status 1 when a diff is above its tolerance.
"""

import argparse
import logging

from megatron_async_rlhf.weights.llama_config import check_hf_model, cli_exit
from megatron_async_rlhf.launch import run_distributed
from megatron_async_rlhf.checks.parity import compare, fp32_floor, hf_reference, random_batches, reported


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf", required=True, help="HF LLaMA model directory (config.json + *.safetensors)")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--num-batches", type=int, default=2, help="micro-batches (>1 exercises the pipeline schedule)")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fp64-floor", action="store_true",
                    help="also run transformers in fp64 to measure the fp32 noise floor (twice the reference's memory)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    # every contract checked before a process starts or a weight is read
    cfg = check_hf_model(args.hf, args.tp, args.pp)
    if args.seq_len > cfg.max_position_embeddings:
        raise SystemExit(f"--seq-len {args.seq_len} exceeds max_position_embeddings={cfg.max_position_embeddings}")

    from megatron_async_rlhf.checks import jobs

    batches = random_batches(cfg.vocab_size, args.batch, args.seq_len, args.num_batches, args.seed)
    out = reported(run_distributed(args.tp * args.pp, jobs.parity_from_hf, args.hf, args.tp, args.pp, batches,
                                   args.temperature))
    if out is None:  # under torchrun, a rank that does not hold the last stage's results
        return 0
    reference = hf_reference(args.hf, batches, args.temperature)
    floor = None
    if args.fp64_floor:
        import torch

        floor = fp32_floor(reference, hf_reference(args.hf, batches, args.temperature, dtype=torch.float64))
    result = compare(out, reference, args.temperature, floor)
    print(f"layout tp={args.tp} pp={args.pp}, {args.num_batches} x [{args.batch}, {args.seq_len}] tokens, "
          f"logit tolerance {result.logit_tolerance:.2e}, log-prob tolerance {result.logprob_tolerance:.2e}: "
          f"{'OK' if result.ok else 'FAIL'}")
    print(result.line())
    return 0 if result.ok else 1


if __name__ == "__main__":
    cli_exit(main)
