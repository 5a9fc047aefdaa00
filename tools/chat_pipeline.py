#!/usr/bin/env python
"""The chat pipeline on a real model, a miniature of the paper's gold / proxy reward-model protocol, in one command:

    python tools/chat_pipeline.py [--out runs/chat_pipeline] [--pairs 1800] [--rm-steps 450] [--rl-steps 30]

1. **prompts**: 2160 open-ended chat requests made locally (``data/chat_prompts.py``; 200 held out for eval).
2. **pairs**: four completions per prompt sampled from SmolLM2-135M-Instruct (vLLM, bf16, temperature 1), paired and
   labelled by the gold judge (VADER sentiment, ``rewards/judges.py``): the happier response is chosen, ties dropped.
   Written to ``<out>/preferences/{train,test}.jsonl``. Train: all 6 comparisons among each prompt's 4 samples
   (``--train-pairs all``; ``disjoint``: (1st, 2nd) and (3rd, 4th)); test: (1st, 2nd) and (3rd, 4th) on 160 prompts
   the reward model never trains on (random pairs, as the RL's k=2 pairs are).
3. **proxy reward model**: ``mode=rm`` trains a Bradley-Terry reward model from SmolLM2 on the train pairs (Megatron
   learner, bf16, two data-parallel ranks: one per core, lr 1e-4 after 20 warm-up steps decaying linearly, one epoch;
   a step is 4 prompts, each with its 4 responses forwarded once and trained on all their comparisons); its held-out
   pairwise accuracy against the gold labels is ``rm_accuracy``.
4. **RL**: ``recipe=smollm2_chat``: online DPO, k=2, against the proxy reward model, asynchronous (one step
   off-policy) and synchronous, same seed and steps.
5. **eval** (inside each RL run, ``eval.judge=vader``): greedy completions of the 200 held-out prompts before, during
   and after RL; the gold win-rate of each against the starting policy's completions with its 95% interval, the mean
   gold score and the mean proxy reward; KL to the reference per step. ``<out>/curves.png`` plots gold and proxy over
   steps for both runs (over-optimisation shows as proxy up while gold flattens).

Each stage writes its outputs atomically and is skipped when they exist, so an interrupted pipeline continues where it
stopped; ``<out>/minutes.json`` keeps each stage's minutes. Last line: ``rm_accuracy=.. win_rate_async=.. (lo-hi)
win_rate_sync=.. (lo-hi) minutes=..`` (minutes: pairs + reward model + asynchronous RL, the pipeline itself; the
synchronous run is the comparison, its minutes are in ``summary.json``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def log(msg: str) -> None:
    print(f"[chat_pipeline {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sample_pairs(out_dir: str, n_train: int, n_test: int, max_new_tokens: int, k: int, seed: int,
                 all_pairs: bool = True) -> dict:
    """Stage 2: ``k`` sampled completions per prompt (bf16 engine), gold-labelled, as preference JSONL (train / test
    prompts disjoint from each other and from the RL eval prompts). Test pairs are (0, 1), (2, 3), ...; train pairs
    are every one of the k(k-1)/2 comparisons of a prompt's samples with ``all_pairs`` (mode=rm forwards each
    response once per step and trains on all its comparisons, as InstructGPT's reward model does), else disjoint."""
    from transformers import AutoTokenizer

    from megatron_async_rlhf.config import RolloutConfig, VLLMConfig
    from megatron_async_rlhf.data.chat_prompts import chat_splits
    from megatron_async_rlhf.data.tasks import prompt_ids
    from megatron_async_rlhf.models import resolve_model, stop_token_ids
    from megatron_async_rlhf.rewards.judges import label_pairs
    from megatron_async_rlhf.rollout.base import EngineSettings, SamplingSettings, build_backend
    from megatron_async_rlhf.weights.hf_io import replace_dir

    model = resolve_model("smollm2-135m-instruct", out_dir)
    tok = AutoTokenizer.from_pretrained(model)
    train_prompts, _ = chat_splits(test_size=200, seed=0)  # the RL eval prompts (test split) are never used here
    if n_train + n_test > len(train_prompts):
        raise SystemExit(f"--pairs {n_train} + --rm-eval-pairs {n_test} > {len(train_prompts)} training prompts")
    prompts = train_prompts[: n_train + n_test]
    vllm = VLLMConfig(kv_cache_gib=2.0, extra={"max_num_batched_tokens": 32768})
    engine = build_backend(EngineSettings(model, 1, RolloutConfig(dtype="bfloat16", max_model_len=256, seed=seed,
                                                                  vllm=vllm)))
    t0 = time.perf_counter()
    samples = engine.generate([prompt_ids(tok, p, use_chat_template=True) for p in prompts],
                              SamplingSettings(temperature=1.0, max_new_tokens=max_new_tokens, n=k,
                                               stop_token_ids=stop_token_ids(model, tok)))
    gen_s = time.perf_counter() - t0
    texts = tok.batch_decode([s.token_ids for s in samples], skip_special_tokens=True)  # prompt-major, k per prompt
    tmp = os.path.join(out_dir, f"preferences.tmp-{os.getpid()}")
    os.makedirs(tmp, exist_ok=True)
    stats = {"sample_s": round(gen_s, 1), "tokens": sum(len(s.token_ids) for s in samples)}
    for name, (lo, hi) in (("train", (0, n_train)), ("test", (n_train, n_train + n_test))):
        if name == "train" and all_pairs:  # every comparison among a prompt's k samples (InstructGPT's K choose 2)
            idx = [(p, i, j) for p in range(lo, hi) for i, j in itertools.combinations(range(k), 2)]
        else:  # disjoint random pairs of one prompt's samples, as the RL's k=2 pairs are
            idx = [(p, j, j + 1) for p in range(lo, hi) for j in range(0, k - 1, 2)]
        rows, ties = label_pairs("vader", [prompts[p] for p, _, _ in idx], [texts[p * k + i] for p, i, _ in idx],
                                 [texts[p * k + j] for p, _, j in idx])
        with open(os.path.join(tmp, f"{name}.jsonl"), "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        stats[f"{name}_pairs"], stats[f"{name}_ties"] = len(rows), ties
    replace_dir(tmp, os.path.join(out_dir, "preferences"))
    engine.close()
    return stats


def run_main(args: list[str], log_path: str) -> str:
    """``python -m megatron_async_rlhf ARGS`` with its output teed to ``log_path``; returns the output."""
    log(f"python -m megatron_async_rlhf {' '.join(args)}  (log: {log_path})")
    lines = []
    with open(log_path, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "megatron_async_rlhf", *args], cwd=ROOT, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for line in proc.stdout:
            f.write(line)
            f.flush()
            lines.append(line)
            if " rl " in line or "rm_accuracy" in line or "error" in line.lower() or "eval" in line:
                print("    " + line.rstrip()[-200:], flush=True)
        if proc.wait():
            raise SystemExit(f"stage failed (exit {proc.returncode}); see {log_path}")
    return "".join(lines)


def eval_rows(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["phase"] == "eval"]


def plot(runs: dict[str, str], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (gold, proxy, kl) = plt.subplots(1, 3, figsize=(15, 4))
    for name, run_dir in runs.items():
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            train = [r for r in map(json.loads, f) if r["phase"] == "rl" and "kl_ref" in r]
        kl.plot([r["step"] for r in train], [r["kl_ref"] for r in train], label=f"{name}: KL to the reference")
        rows = eval_rows(run_dir)
        steps = [r["step"] for r in rows]
        gold.plot(steps, [r["judge_mean"] for r in rows], marker="o", label=f"{name}: gold (VADER) mean")
        gold.plot(steps, [r["win_rate"] for r in rows], marker="x", linestyle="--", label=f"{name}: gold win-rate")
        proxy.plot(steps, [r["reward_mean"] for r in rows], marker="o", label=f"{name}: proxy RM mean")
    gold.set(xlabel="RL step", title="gold judge on held-out prompts (greedy)")
    proxy.set(xlabel="RL step", title="proxy reward model on the same completions")
    kl.set(xlabel="RL step", title="KL to the reference on sampled tokens (nats/sequence)")
    for ax in (gold, proxy, kl):
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/chat_pipeline")
    ap.add_argument("--pairs", type=int, default=1800, help="prompts sampled for reward-model training pairs")
    ap.add_argument("--rm-eval-pairs", type=int, default=160, help="prompts sampled for held-out RM accuracy pairs")
    ap.add_argument("--pair-tokens", type=int, default=48, help="longest sampled response")
    ap.add_argument("--samples-per-prompt", type=int, default=4, help="even: k/2 disjoint pairs per prompt")
    ap.add_argument("--train-pairs", choices=("all", "disjoint"), default="all",
                    help="all: every comparison of a prompt's samples (k(k-1)/2); disjoint: k/2 per prompt")
    ap.add_argument("--rm-steps", type=int, default=450,
                    help="one epoch of 1,800 prompts at 4 a step; a second epoch over-fits (README)")
    ap.add_argument("--rm-batch", type=int, default=4,
                    help="prompts a step (each: its k responses, all their pairs); 4 beat 8 at equal epochs (README)")
    ap.add_argument("--rm-lr", type=float, default=1e-4, help="peak; decays linearly to 0")
    ap.add_argument("--rm-head-lr-mult", type=float, default=1.0, help="the scalar head's lr over the trunk's")
    ap.add_argument("--rm-warmup", type=int, default=20, help="steps rising linearly to the peak lr")
    ap.add_argument("--rl-steps", type=int, default=30)
    ap.add_argument("--no-sync", action="store_true", help="skip the synchronous RL run")
    ap.add_argument("--seed", type=int, default=0)
    args, overrides = ap.parse_known_args()
    if args.samples_per_prompt < 2 or args.samples_per_prompt % 2:
        ap.error(f"--samples-per-prompt {args.samples_per_prompt}: use an even number >= 2 (disjoint pairs)")
    k = args.samples_per_prompt
    per_train = k * (k - 1) // 2 if args.train_pairs == "all" else k // 2  # pairs per prompt
    per_test = k // 2
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    timings_path = os.path.join(out, "minutes.json")  # per stage, kept across restarts (skipped stages keep theirs)
    timings = json.load(open(timings_path)) if os.path.exists(timings_path) else {}

    def timed(stage: str, fn, *a):
        t0 = time.time()
        result = fn(*a)
        timings[stage] = round((time.time() - t0) / 60, 1)
        with open(timings_path, "w") as f:
            json.dump(timings, f)
        return result

    def pairs_stage():
        # in a child process: an in-process vLLM engine keeps its threads (and a core) busy after it is closed
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            return pool.apply(sample_pairs, (out, args.pairs, args.rm_eval_pairs, args.pair_tokens,
                                             k, args.seed, args.train_pairs == "all"))

    if not os.path.exists(os.path.join(out, "preferences", "test.jsonl")):
        log(f"pairs: sampling {args.samples_per_prompt} responses for {args.pairs + args.rm_eval_pairs} prompts, "
            "labelling with VADER")
        log(f"pairs: {timed('pairs', pairs_stage)}")
    rm_dir = os.path.join(out, "rm")
    rm_final = os.path.join(rm_dir, "reward_model", "final")
    rm_log = os.path.join(out, "rm.log")
    if not os.path.exists(os.path.join(rm_final, "config.json")):
        rm_args = ["mode=rm", "model.path=smollm2-135m-instruct", f"data.source={out}/preferences",
                   "data.use_chat_template=true", "data.max_prompt_len=64", f"data.train_size={args.pairs * per_train}",
                   f"data.eval_size={args.rm_eval_pairs * per_test}", f"rm.steps={args.rm_steps}",
                   # --rm-batch comparison groups (a prompt's k responses, each forwarded once, and all their pairs)
                   # a step, half on each data-parallel rank in one micro-batch
                   f"rm.batch_size={args.rm_batch}", f"rm.micro_batch={max(args.rm_batch // 2, 1) * k}",
                   f"rm.lr={args.rm_lr}", "rm.lr_schedule=linear", f"rm.warmup_steps={args.rm_warmup}",
                   f"rm.head_lr_mult={args.rm_head_lr_mult}",
                   f"rm.eval_every={max(args.rm_steps // 4, 1)}", "learner.precision=bf16", "cluster.learner_dp=2",
                   f"logging.out_dir={rm_dir}", "logging.wandb_mode=disabled", f"seed={args.seed}"]
        timed("rm", run_main, rm_args, rm_log)
    acc = re.findall(r"rm_accuracy=([0-9.]+)", open(rm_log).read())
    rm_accuracy = float(acc[-1]) if acc else float("nan")
    log(f"proxy reward model: held-out accuracy vs gold labels {rm_accuracy:.3f}")

    runs = {"async": os.path.join(out, "rl_async")}
    if not args.no_sync:
        runs["sync"] = os.path.join(out, "rl_sync")
    for name, run_dir in runs.items():
        if os.path.exists(os.path.join(run_dir, "policy", "final", "config.json")):
            continue
        rl_args = ["recipe=smollm2_chat", f"reward.reward_model_path={rm_final}", f"algorithm.steps={args.rl_steps}",
                   f"algorithm.max_staleness={1 if name == 'async' else 0}", f"logging.out_dir={run_dir}",
                   f"seed={args.seed}", *overrides]
        timed(f"rl_{name}", run_main, rl_args, os.path.join(out, f"rl_{name}.log"))
    plot(runs, os.path.join(out, "curves.png"))
    # minutes: prompts -> pairs -> proxy RM -> asynchronous RL with its evals (the sync run is the comparison)
    minutes = sum(timings.get(k, 0.0) for k in ("pairs", "rm", "rl_async"))
    summary = {"rm_accuracy": rm_accuracy, "minutes": round(minutes, 1),
               "minutes_by_stage": timings}
    for name, run_dir in runs.items():
        first, last = eval_rows(run_dir)[0], eval_rows(run_dir)[-1]
        summary[name] = {k: round(last[k], 4) for k in ("win_rate", "win_rate_lo95", "win_rate_hi95", "judge_mean",
                                                         "reward_mean")}
        summary[name].update(judge_mean_before=round(first["judge_mean"], 4),
                             reward_mean_before=round(first["reward_mean"], 4), step=last["step"])
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    log(f"summary ({out}/summary.json, plot {out}/curves.png): {json.dumps(summary)}")
    line = f"rm_accuracy={rm_accuracy:.4f}"
    for name in runs:
        s = summary[name]
        line += f" win_rate_{name}={s['win_rate']:.4f} ({s['win_rate_lo95']:.3f}-{s['win_rate_hi95']:.3f})"
    print(f"{line} minutes={summary['minutes']} (sync run: {timings.get('rl_sync', 0.0)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
