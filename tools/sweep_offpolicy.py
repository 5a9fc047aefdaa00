#!/usr/bin/env python
"""The paper's off-policy sweep: final eval score vs N (``algorithm.off_policy_n``) per algorithm.

    python tools/sweep_offpolicy.py --algorithms online_dpo,rloo,ppo --n 1,2,4,8 [--steps 96] [overrides...]

Every run has the same seed, the same number of gradient steps (``--steps``, a multiple of every N) and the same
mini-batch (``algorithm.prompts_per_step`` prompts); only N changes, so with N mini-batches per generation round,
mini-batch i of a round is i updates old (``schedules/rounds.py``). The runs are synchronous by default
(``algorithm.max_staleness=0``: N=1 is on-policy, as in the paper's figure); pass ``algorithm.max_staleness=1`` to
add the asynchronous lag. ``ppo`` is the paper's PPO with a critic (``algorithm.name=ppo_critic``); ``ppo_nocritic`` the
critic-free variant. Recipe: ``recipe=...`` among the overrides, default the tiny CPU recipe.

Writes ``<out>/sweep.csv`` (algorithm, n, score, interval, train reward, wall seconds, run dir) and
``<out>/sweep.png`` (score vs N, one line per algorithm, 95% intervals). The score is the held-out eval after RL:
greedy pass@1 of the run's reward (exact match on the math recipes), with its Wilson interval.
Last line: ``csv=<path> plot=<path>``.
"""

import argparse
import csv
import dataclasses
import os
import sys
import time

ALGORITHMS = {"online_dpo": ["algorithm.name=online_dpo"], "rloo": ["algorithm.name=rloo"],
              "ppo": ["algorithm.name=ppo_critic"],
              "ppo_nocritic": ["algorithm.name=ppo"]}


def plot(rows: list[dict], path: str, metric: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for algo in dict.fromkeys(r["algorithm"] for r in rows):
        rs = sorted((r for r in rows if r["algorithm"] == algo), key=lambda r: r["n"])
        ns = [r["n"] for r in rs]
        ax.errorbar(ns, [r["score"] for r in rs], yerr=[[r["score"] - r["score_lo95"] for r in rs],
                                                        [r["score_hi95"] - r["score"] for r in rs]],
                    marker="o", capsize=3, label=algo)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({r["n"] for r in rows}), [str(n) for n in sorted({r["n"] for r in rows})])
    ax.set_xlabel("N (mini-batches per generation round; mini-batch i is i-1 updates old)")
    ax.set_ylabel(f"final eval {metric}")
    ax.set_title("robustness to off-policy data")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--algorithms", default="online_dpo,rloo,ppo")
    ap.add_argument("--n", default="1,2,4,8")
    ap.add_argument("--steps", type=int, default=96, help="gradient steps of every run (a multiple of every N)")
    ap.add_argument("--out", default="runs/sweep_offpolicy")
    args, overrides = ap.parse_known_args()
    algos, ns = args.algorithms.split(","), [int(n) for n in args.n.split(",")]
    unknown = [a for a in algos if a not in ALGORITHMS]
    if unknown or any(args.steps % n for n in ns):
        ap.error(f"unknown algorithms {unknown} (known: {sorted(ALGORITHMS)})" if unknown else
                 f"--steps {args.steps} is not a multiple of every N in {ns}")
    from megatron_async_rlhf.launch import WorkerGroup
    from megatron_async_rlhf.modes.rl import job
    from megatron_async_rlhf.train import load_config, prepare_model

    base = ["algorithm.max_staleness=0", *overrides, f"algorithm.steps={args.steps}", "logging.wandb_mode=disabled"]
    os.makedirs(args.out, exist_ok=True)
    csv_path, png_path = os.path.join(args.out, "sweep.csv"), os.path.join(args.out, "sweep.png")
    rows: list[dict] = []
    metric = "pass@1"
    group = None
    try:
        for algo in algos:
            for n in ns:
                run_dir = os.path.join(args.out, f"{algo}_n{n}")
                cfg = load_config([*base, *ALGORITHMS[algo], f"algorithm.off_policy_n={n}",
                                   f"logging.out_dir={run_dir}"])
                if group is None:
                    group = WorkerGroup(cfg.cluster.world, default_group=False, timeout_s=3600)
                t0 = time.time()
                s = group.run(job, dataclasses.asdict(cfg), prepare_model(cfg), f"sweep_{algo}_{n}")[0]
                lo, hi = s["accuracy_after_ci95"]
                rows.append({"algorithm": algo, "n": n, "score": s["accuracy_after"], "score_lo95": lo,
                             "score_hi95": hi, "score_before": s["accuracy_before"],
                             "train_reward_last5": round(s["reward_last5"], 4), "steps": s["steps"],
                             "rounds": s["generated"], "wall_s": round(time.time() - t0, 1), "run_dir": run_dir})
                print(f"{algo} N={n}: {metric} {s['accuracy_before']:.3f} -> {s['accuracy_after']:.3f} "
                      f"[{lo:.3f}, {hi:.3f}]", flush=True)
                with open(csv_path, "w", newline="") as f:  # rewritten after every run: a partial sweep is kept
                    w = csv.DictWriter(f, fieldnames=list(rows[0]))
                    w.writeheader()
                    w.writerows(rows)
    finally:
        if group is not None:
            group.close(force=not group.alive)
    plot(rows, png_path, metric)
    print(f"\n{'algorithm':>12} " + " ".join(f"{'N=' + str(n):>8}" for n in ns))
    for algo in algos:
        by_n = {r["n"]: r["score"] for r in rows if r["algorithm"] == algo}
        print(f"{algo:>12} " + " ".join(f"{by_n[n]:>8.3f}" for n in ns))
    print(f"csv={csv_path} plot={png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
