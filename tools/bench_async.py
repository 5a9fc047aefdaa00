#!/usr/bin/env python
"""Benchmark: the tiny recipe synchronous (max_staleness=0) and asynchronous (max_staleness=1) side by side in one
run, same seed, same steps, same processes (1 learner core + 1 rollout core).

    python tools/bench_async.py [--steps 40] [hydra-style overrides, e.g. algorithm.prompts_per_step=64]

G = generation seconds per step and T = train seconds per step, both from the synchronous run, where they do not
overlap; O = the rest of a synchronous step (weight sync, rewards, hand-off), which stays serial in both modes.
ideal speedup = (G + T + O) / (max(G, T) + O); efficiency = measured / ideal. A short warm-up run goes first so that
neither mode pays first-call costs. Rewards are held-out accuracy after RL.
Last line: speedup=<x> ideal=<y> efficiency=<x/y> reward_sync=<a> reward_async=<b> steps=<n>
"""

import argparse
import dataclasses
import os
import sys
import tempfile


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--out", default=None)
    args, overrides = ap.parse_known_args()
    from megatron_async_rlhf.launch import WorkerGroup
    from megatron_async_rlhf.modes.rl import job
    from megatron_async_rlhf.train import load_config, prepare_model

    out = args.out or tempfile.mkdtemp(prefix="bench_async_")
    results = {}
    with WorkerGroup(2, default_group=False, timeout_s=3600) as group:
        warm = load_config([*overrides, "algorithm.steps=3", "sft.steps=5", "logging.wandb_mode=disabled",
                            f"logging.out_dir={os.path.join(out, 'warmup')}"])
        group.run(job, dataclasses.asdict(warm), prepare_model(warm), "warmup")
        for n in (0, 1):
            cfg = load_config([*overrides, f"algorithm.steps={args.steps}", f"algorithm.max_staleness={n}",
                               f"logging.out_dir={os.path.join(out, f'n{n}')}", "logging.wandb_mode=disabled"])
            results[n] = group.run(job, dataclasses.asdict(cfg), prepare_model(cfg), f"bench{n}")[0]
    s, a = results[0], results[1]
    g, t = s["gen_s_mean"], s["train_s_mean"]
    o = max(0.0, s["rl_seconds"] / args.steps - g - t)
    ideal = (g + t + o) / (max(g, t) + o)
    speedup = s["rl_seconds"] / a["rl_seconds"]
    print(f"\n{'':>6} {'RL wall s':>10} {'gen s/step':>11} {'train s/step':>13} {'syncs':>6} {'acc before':>11} "
          f"{'acc after':>10} {'train reward (last 5)':>22}")
    for name, r in (("sync", s), ("async", a)):
        print(f"{name:>6} {r['rl_seconds']:>10.2f} {r['gen_s_mean']:>11.3f} {r['train_s_mean']:>13.3f} "
              f"{r['syncs']:>6} {r['accuracy_before']:>11.3f} {r['accuracy_after']:>10.3f} {r['reward_last5']:>22.3f}")
    print(f"G={g:.3f}s T={t:.3f}s O={o:.3f}s per step (synchronous run); outputs in {out}")
    print(f"speedup={speedup:.3f} ideal={ideal:.3f} efficiency={speedup / ideal:.3f} "
          f"reward_sync={s['accuracy_after']:.3f} reward_async={a['accuracy_after']:.3f} steps={args.steps}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
