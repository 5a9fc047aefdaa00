#!/usr/bin/env python
"""Logit/log-prob parity of the Megatron learner (at a TP x PP layout) against HF transformers, in fp32.

    python tools/check_parity.py --hf DIR --tp 2 --pp 2 [--seq-len 32 --batch 2 --num-batches 2]

Starts the TP*PP learner processes itself (gloo on CPU). Under torchrun it uses torchrun's processes instead:
    torchrun --nproc_per_node=4 tools/check_parity.py --hf DIR --tp 2 --pp 2
Last line: ``max_abs_logit_diff=<float> max_abs_logprob_diff=<float>``; exit status 1 above 1e-4.
"""

import argparse
import logging

from megatron_async_rlhf.hf_llama import check_hf_model, cli_exit
from megatron_async_rlhf.launch import run_distributed
from megatron_async_rlhf.parity import compare, hf_reference, random_batches, reported


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
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    # every contract checked before a process starts or a weight is read
    cfg = check_hf_model(args.hf, args.tp, args.pp)
    if args.seq_len > cfg.max_position_embeddings:
        raise SystemExit(f"--seq-len {args.seq_len} exceeds max_position_embeddings={cfg.max_position_embeddings}")

    from megatron_async_rlhf.learner import jobs

    batches = random_batches(cfg.vocab_size, args.batch, args.seq_len, args.num_batches, args.seed)
    out = reported(run_distributed(args.tp * args.pp, jobs.parity_from_hf, args.hf, args.tp, args.pp, batches,
                                   args.temperature))
    if out is None:  # under torchrun, a rank that does not hold the last stage's results
        return 0
    result = compare(out, hf_reference(args.hf, batches, args.temperature))
    print(f"layout tp={args.tp} pp={args.pp}, {args.num_batches} x [{args.batch}, {args.seq_len}] tokens, "
          f"tolerance 1e-4: {'OK' if result.ok else 'FAIL'}")
    print(f"max_abs_logit_diff={result.max_abs_logit_diff} max_abs_logprob_diff={result.max_abs_logprob_diff}")
    return 0 if result.ok else 1


if __name__ == "__main__":
    cli_exit(main)
