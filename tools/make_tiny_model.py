#!/usr/bin/env python
"""Make a tiny random-weight HF LLaMA (+ offline-trained tokenizer) locally.

    python tools/make_tiny_model.py --out DIR [--preset tiny-gqa|tiny-tied|tiny-wide] [--seed 0]
"""

import argparse

from megatron_async_rlhf.models.tiny import PRESETS, make_tiny_llama

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", required=True)
    ap.add_argument("--preset", default="tiny-gqa", choices=sorted(PRESETS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    a = ap.parse_args()
    print(make_tiny_llama(a.out, a.preset, a.seed, a.dtype))
