#!/usr/bin/env python
"""Write synthetic GSM8k-format word problems as train.jsonl + test.jsonl (columns: question, answer).

    python tools/make_gsm8k_data.py --out DIR [--train-size 5000 --test-size 500 --seed 0 --max-steps 3]

Each problem has 1 to --max-steps arithmetic steps with small numbers (see megatron_async_rlhf/data/word_problems.py).
No question is in both splits; the test split depends only on --test-size, --seed and --max-steps. Files are written
atomically. Read them with ``datasets.load_dataset(DIR, split="test")`` or the config ``data.source=DIR``.
"""

import argparse
import json
import os
from collections import Counter

from megatron_async_rlhf.data.word_problems import MAX_STEPS, write_gsm8k_jsonl
from megatron_async_rlhf.weights.llama_config import cli_exit


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output directory (created if missing)")
    ap.add_argument("--train-size", type=int, default=5000)
    ap.add_argument("--test-size", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-steps", type=int, default=MAX_STEPS, help=f"1..{MAX_STEPS} arithmetic steps a problem")
    args = ap.parse_args(argv)
    for flag, size in (("--train-size", args.train_size), ("--test-size", args.test_size)):
        if size < 1:
            raise ValueError(f"{flag} must be >= 1, got {size}")
    if not 1 <= args.max_steps <= MAX_STEPS:
        raise ValueError(f"--max-steps must be in 1..{MAX_STEPS}, got {args.max_steps}")

    paths = write_gsm8k_jsonl(args.out, args.train_size, args.test_size, args.seed, args.max_steps)
    steps = Counter()
    for path in paths.values():
        with open(path) as f:
            steps.update(json.loads(line)["answer"].count("<<") for line in f)
    print(json.dumps({"out": os.path.abspath(args.out), "train": args.train_size, "test": args.test_size,
                      "seed": args.seed, "max_steps": args.max_steps, "steps": dict(sorted(steps.items()))}))
    return 0


if __name__ == "__main__":
    cli_exit(main)
