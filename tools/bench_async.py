#!/usr/bin/env python
"""Benchmark: three schedules (four modes) side by side in one invocation, at equal ``algorithm.prompts_per_step``
(P), ``samples_per_prompt`` (k), steps and seed, in one set of processes (1 learner core + 1 rollout core):

* ``sync``: ``schedule=rounds algorithm.max_staleness=0`` (generate, then train, then push);
* ``onestep``: ``schedule=rounds algorithm.max_staleness=1`` (round r+1 generated while round r trains);
* ``fully_async``: ``schedule=fully_async algorithm.max_staleness=1`` (continuous generation, in-flight pushes;
  ``rollout.in_flight_kv=recompute``, the default: the sequences in flight at a push are re-prefilled);
* ``fully_async_keep``: the same with ``rollout.in_flight_kv=keep`` (their KV cache is kept).

    python tools/bench_async.py [--shape tiny|longtail|genbound|all] [--steps N] [--modes sync,onestep,...]
                                [--repeats R] [--out DIR] [overrides...]

On a machine shared with other jobs, ``--repeats R`` runs every mode R times, interleaved, and shows each mode's median
run (by samples/s), with every run's samples/s listed.

Shapes (extra arguments are hydra-style overrides of every run of every shape):

* ``tiny``: the built-in tiny recipe (arithmetic, online DPO, 4 new tokens, SFT warm start): rewards are meaningful
  (held-out accuracy after RL, train reward of the last 5 steps).
* ``longtail``: completion lengths spread from 1 to several hundred tokens, about geometric: a random-weight tiny
  LLaMA whose every token is EOS with probability ~1/100 (``models/longtail.py``: a constant EOS logit through a
  residual coordinate no layer writes, calibrated), up to 300 new tokens, 16 prompts x 4 samples, RLOO (every sample
  trained, micro-batches of up to 32 rows padded to their longest: a learner step about as long as a generation round).
* ``genbound``: generation-bound, as RL on GPUs is: the same model, up to 500 new tokens, 4 prompts x 2 samples, and a
  cheap learner step (few rows, micro-batches packed by a 4096-token budget: little padding), so that generation,
  whose round lasts as long as its longest completion, takes most of a synchronous step (printed under the table).

The random model's rewards say nothing, so both long shapes train with ``algorithm.lr=1e-9``: the learner does its full
step (reference and policy passes, backward, Adam) but the weights, hence the length distribution, stay those of the
starting model, and every mode generates about the same completions (same prompts, seeds and weights; batching
beside other sequences may change the last bits).

Measured per mode (from each run's metrics.jsonl; every learner step is wrapped to also log its own seconds, the
batch's tokens and completion lengths): RL wall seconds (``rl_seconds``: the schedule's loop, without warm start and
evaluations), samples/s = steps x P x k / RL wall seconds (samples generated and handed to the learner), ratios
against onestep and sync, engine busy fraction, learner busy fraction = sum of ``train_s`` (rewards + learner step) /
RL wall, per-step means of the generation wait, train and weight-push seconds, completion length mean / max, reward.
Engine busy: fully_async logs the engines' own share of time in engine steps (``engine_busy_frac``, time-weighted
here); sync: sum of ``gen_s`` (request to samples back: the engine's generation plus hand-off) / wall; onestep: the
sync run's sum of ``gen_s`` / onestep's wall (the same prompts and seeds, so about the same generation work; onestep's
own ``gen_s`` also counts the time a finished round waits for the learner). A short warm-up run of each shape goes
first so that no mode pays first-call costs.

Under each table: the synchronous step's generation G, train T and rest O (push, hand-offs), and the ideal steps they
give: onestep ``max(G, T) + O``; fully_async with bound 1, where a round is admitted one step before it trains,
``max(T + O, (G + T + O) / 2)`` (so at most 2x onestep, approached only when generation dominates: 1.5x needs
``G >= 3T - O``, generation about 75% of a synchronous step).

Learner fixed cost per step: the synchronous run is repeated with P/4 prompts per step (4 steps); the intercept of the
least-squares line of each step's learner seconds (``rl_step``, timed around it) against its padded tokens (what the
learner computes on: micro-batch rows x longest row), over the steps of both runs, is the part of a step that does not
scale with tokens (optimizer, per-call and per-micro-batch overheads), printed with its standard error, beside the
synchronous step's push and reward / hand-off seconds.

Last line per shape: ``shape=<s> speedup_fa_vs_onestep=<x> speedup_fa_keep_vs_onestep=<x'>
speedup_onestep_vs_sync=<y> speedup_fa_vs_sync=<z> speedup_fa_keep_vs_sync=<z'> sps_sync=<a> sps_onestep=<b>
sps_fa=<c> sps_fa_keep=<c'> reward_sync=<r0> ... steps=<n>`` (reward: held-out accuracy after RL for tiny, the last 5
steps' train reward otherwise; a mode left out by ``--modes`` is left out of the line).
"""

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time

MODES = {"sync": ["schedule=rounds", "algorithm.max_staleness=0"],
         "onestep": ["schedule=rounds", "algorithm.max_staleness=1"],
         "fully_async": ["schedule=fully_async", "algorithm.max_staleness=1"],
         "fully_async_keep": ["schedule=fully_async", "algorithm.max_staleness=1", "rollout.in_flight_kv=keep"]}
DEFAULT_MODES = ("sync", "onestep", "fully_async", "fully_async_keep")  # ratios need sync and onestep

# lr 1e-9: a full learner step, but the same weights (hence lengths) in every mode (see the module doc)
_LONG = ["sft.steps=0", "algorithm.name=rloo", "algorithm.lr=1e-9", "data.eval_size=16", "eval.max_new_tokens=8"]
SHAPES = {  # name -> (default steps, overrides; {model} is the longtail model's directory)
    "tiny": (40, []),
    "longtail": (10, ["model.path={model}", *_LONG, "algorithm.prompts_per_step=16", "algorithm.samples_per_prompt=4",
                      "algorithm.max_new_tokens=300", "rollout.max_model_len=320"]),
    "genbound": (10, ["model.path={model}", *_LONG, "algorithm.prompts_per_step=4", "algorithm.samples_per_prompt=2",
                      "algorithm.max_new_tokens=500", "rollout.max_model_len=520",
                      "learner.max_tokens_per_micro_batch=4096"]),
}


def _job(cfg_dict: dict, model_path: str, session: str):
    """``modes.rl.job`` with every learner step (``learner.step.rl_step``) timed and its batch measured: adds
    ``rl_step_s``, ``batch_tokens`` (prompt + completion tokens of this rank's samples), ``padded_tokens`` (the
    micro-batches' rows x their longest row: what the learner computes on), ``completion_len_mean`` and
    ``completion_len_max`` to the step's metrics row. Runs in the worker processes."""
    from megatron_async_rlhf.learner import step
    from megatron_async_rlhf.modes.rl import job

    if not getattr(step.rl_step, "bench_wrapped", False):
        inner, build = step.rl_step, step.build_micro_batches
        padded = [0]

        def build_micro_batches(*args, **kwargs):  # rl_step looks it up in its module at call time
            mbs = build(*args, **kwargs)
            padded[0] = sum(m["tokens"].numel() for m in mbs)
            return mbs

        def rl_step(batch, *args, **kwargs):
            padded[0] = 0  # stays 0 when the step trains nothing (online DPO: every prompt tied)
            t0 = time.perf_counter()
            out = inner(batch, *args, **kwargs)
            mine = [s for s in batch.samples if s is not None]
            lens = [len(s.token_ids) for s in mine]
            return {**out, "rl_step_s": time.perf_counter() - t0, "completion_len_mean": sum(lens) / len(lens),
                    "completion_len_max": max(lens), "padded_tokens": padded[0],
                    "batch_tokens": sum(len(s.prompt_ids) + len(s.token_ids) for s in mine)}

        rl_step.bench_wrapped = True
        step.rl_step, step.build_micro_batches = rl_step, build_micro_batches  # modes/rl imports rl_step on call
    return job(cfg_dict, model_path, session)


def _rows(summary: dict) -> list[dict]:
    with open(summary["metrics"]) as f:
        return [r for r in map(json.loads, f) if r.get("phase") == "rl"]


def _line_fit(points: list[tuple[float, float]]) -> tuple[float, float, float]:
    """(intercept, slope, intercept's standard error) of the least-squares line y = a + b x."""
    n = len(points)
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if n < 3 or sxx == 0:
        return float("nan"), float("nan"), float("nan")
    b = sum((x - mx) * (y - my) for x, y in points) / sxx
    a = my - b * mx
    s2 = sum((y - a - b * x) ** 2 for x, y in points) / (n - 2)
    return a, b, (s2 * (1 / n + mx * mx / sxx)) ** 0.5


def _fixed_cost(shape: str, rows: list[dict], small: list[dict]) -> str:
    """The learner step's seconds that do not scale with tokens: the intercept (and its standard error) of the
    least-squares line of ``rl_step_s`` against ``padded_tokens`` over the steps of the synchronous run at P and at P/4
    prompts per step (steps that trained nothing left out); with the sync run's per-step push seconds and the rest of
    ``train_s`` (rewards, batch hand-off) beside it."""
    points = [(r["padded_tokens"], r["rl_step_s"]) for r in rows + small if r.get("padded_tokens")]
    a, b, se = _line_fit(points)
    n = len(rows)
    push = sum(r.get("sync_seconds", 0.0) for r in rows) / n
    rest = sum(r["train_s"] - r["rl_step_s"] for r in rows) / n
    step = sum(r["rl_step_s"] for r in rows) / n
    return (f"[{shape}] learner step = {a:.3f} s (+- {se:.3f}) + {b * 1e6:.2f} us/padded token ({len(points)} steps, "
            f"{min(x for x, _ in points):.0f}-{max(x for x, _ in points):.0f} padded tokens): fixed share of a "
            f"P-sized step {a / step:.0%} of {step:.3f} s; per sync step also push {push:.3f} s, rewards + "
            f"hand-off {rest:.3f} s")


def _measure(name: str, summary: dict, rows: list[dict], samples: int, mode: list[str]) -> dict:
    wall = summary["rl_seconds"]
    n = len(rows)

    def total(key):
        return sum(r.get(key, 0.0) for r in rows)

    m = {"mode": name, "wall": wall, "sps": samples / wall, "train_s": total("train_s") / n,
         "gen_s": total("gen_s") / n, "sync_s": total("sync_seconds") / n,
         "learner_busy": total("train_s") / wall, "len_mean": total("completion_len_mean") / n,
         "len_max": max(r["completion_len_max"] for r in rows), "acc_after": summary["accuracy_after"],
         "reward": summary["reward_last5"], "gen_sum": total("gen_s"), "rows": rows}
    if "schedule=fully_async" in mode:
        m["engine_busy"] = _time_weighted_busy(rows)
        m["engine_busy_frac"] = True
    return m


def _time_weighted_busy(rows: list[dict]) -> float:
    """fully_async's engine busy fraction over the run: each step's ``engine_busy_frac`` covers the engines' time since
    the previous step, weighted by that step's seconds (wait + train + push)."""
    w = [r.get("wait_s", 0.0) + r["train_s"] + r.get("sync_seconds", 0.0) for r in rows]
    return sum(r["engine_busy_frac"] * x for r, x in zip(rows, w)) / sum(w)


def _table(shape: str, res: dict, steps: int) -> str:
    sync, one = res["sync"], res["onestep"]
    sync["engine_busy"] = sync["gen_sum"] / sync["wall"]
    one["engine_busy"] = min(1.0, sync["gen_sum"] / one["wall"])
    head = (f"{'mode':>16} {'RL wall s':>9} {'samples/s':>9} {'vs 1step':>8} {'vs sync':>7} {'eng busy':>8} "
            f"{'lrn busy':>8} {'gen s/st':>8} {'train s/st':>8} {'push s/st':>9} {'len mean':>8} {'len max':>7} "
            f"{'acc after':>9} {'reward5':>7}")
    lines = [f"\n[{shape}] {steps} steps", head]
    for m in res.values():
        lines.append(f"{m['mode']:>16} {m['wall']:>9.2f} {m['sps']:>9.2f} {m['sps'] / one['sps']:>8.3f} "
                     f"{m['sps'] / sync['sps']:>7.3f} {m['engine_busy']:>8.2f} {m['learner_busy']:>8.2f} "
                     f"{m['gen_s']:>8.3f} {m['train_s']:>10.3f} {m['sync_s']:>9.3f} {m['len_mean']:>8.1f} "
                     f"{m['len_max']:>7d} {m['acc_after']:>9.3f} {m['reward']:>7.3f}")
    step = sync["wall"] / steps
    g, t = sync["gen_s"], sync["train_s"]
    o = max(0.0, step - g - t)
    lines.append(f"sync step {step:.3f} s: generation G {g:.3f} s ({g / step:.0%}), train T {t:.3f} s "
                 f"({t / step:.0%}), rest O {o:.3f} s (push {sync['sync_s']:.3f} s)")
    one_ideal, fa_ideal = max(g, t) + o, max(t + o, (g + t + o) / 2)
    lines.append(f"ideal step from G, T, O: onestep max(G, T) + O = {one_ideal:.3f} s, fully_async (bound 1: a round "
                 f"is admitted one step before it trains) max(T + O, (G + T + O) / 2) = {fa_ideal:.3f} s; ideal "
                 f"fully_async / onestep = {one_ideal / fa_ideal:.3f}, onestep / sync = {step / one_ideal:.3f}")
    for m in res.values():
        if "engine_busy_frac" in m:
            lines.append(f"{m['mode']} step {m['wall'] / steps:.3f} s: wait {m['gen_s']:.3f} + train "
                         f"{m['train_s']:.3f} + push {m['sync_s']:.3f} s")
    return "\n".join(lines)


def _final_line(shape: str, res: dict, steps: int) -> str:
    sync, one = res["sync"], res["onestep"]
    reward = "acc_after" if shape == "tiny" else "reward"
    short = {"fully_async": "fa", "fully_async_keep": "fa_keep"}
    parts = [f"shape={shape}"]
    for name, m in res.items():
        if name in short:
            parts += [f"speedup_{short[name]}_vs_onestep={m['sps'] / one['sps']:.3f}"]
    parts.append(f"speedup_onestep_vs_sync={one['sps'] / sync['sps']:.3f}")
    for name, m in res.items():
        if name in short:
            parts += [f"speedup_{short[name]}_vs_sync={m['sps'] / sync['sps']:.3f}"]
    parts += [f"sps_{short.get(n, n)}={m['sps']:.2f}" for n, m in res.items()]
    parts += [f"reward_{short.get(n, n)}={m[reward]:.3f}" for n, m in res.items()]
    return " ".join([*parts, f"steps={steps}"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="tiny", help="tiny | longtail | genbound | all, or a comma-separated list")
    ap.add_argument("--steps", type=int, default=0, help="RL steps of every run (0: the shape's default)")
    ap.add_argument("--p-eos", type=float, default=0.01, help="longtail / genbound model: per-token EOS probability")
    ap.add_argument("--model-dir", default=None,
                    help="where the longtail / genbound model is made (kept and reused when made with the same "
                         "arguments); default <out>/longtail_model")
    ap.add_argument("--modes", default=",".join(DEFAULT_MODES),
                    help=f"comma-separated, among {list(MODES)}; sync and onestep are always run")
    ap.add_argument("--repeats", type=int, default=1,
                    help="runs of every mode, interleaved (sync, onestep, ..., sync, ...); the table shows each mode's "
                         "median run by samples/s")
    ap.add_argument("--out", default=None)
    args, overrides = ap.parse_known_args()
    shapes = list(SHAPES) if args.shape == "all" else args.shape.split(",")
    modes = list(dict.fromkeys(["sync", "onestep", *args.modes.split(",")]))
    unknown = [s for s in shapes if s not in SHAPES] + [m for m in modes if m not in MODES]
    if unknown:
        ap.error(f"unknown shapes or modes {unknown}; shapes: {list(SHAPES)} or all, modes: {list(MODES)}")
    from megatron_async_rlhf.launch import WorkerGroup
    from megatron_async_rlhf.train import load_config, prepare_model

    out = args.out or tempfile.mkdtemp(prefix="bench_async_")
    model = None
    if any(s != "tiny" for s in shapes):
        from megatron_async_rlhf.models.longtail import make_longtail_llama

        model = make_longtail_llama(args.model_dir or os.path.join(out, "longtail_model"), p_eos=args.p_eos)
    tables, finals, fits = [], [], []
    with WorkerGroup(2, default_group=False, timeout_s=3600) as group:
        for shape in shapes:
            default_steps, shape_overrides = SHAPES[shape]
            steps = args.steps or default_steps
            base = [o.format(model=model) for o in shape_overrides] + overrides + ["logging.wandb_mode=disabled"]

            def run(name: str, extra: list[str]) -> dict:
                cfg = load_config([*base, *extra, f"logging.out_dir={os.path.join(out, shape, name)}"])
                return group.run(_job, dataclasses.asdict(cfg), prepare_model(cfg), f"{shape}_{name}")[0]

            runs, warm, last_engine = {}, set(), ()
            for rep in range(args.repeats):  # modes interleaved: a load that drifts hits every mode alike
                for name in modes:
                    mode = MODES[name]
                    # first-call costs: each code path (schedule) and each engine (a rollout.* change starts a new
                    # one, rollout/server.get_engine) gets a short run right before its first measured run
                    key = tuple(o for o in mode if not o.startswith("algorithm."))
                    engine = tuple(o for o in mode if o.startswith("rollout."))
                    if key not in warm or engine != last_engine:
                        run(f"warmup_{name}_{rep}", ["algorithm.steps=2", *(["sft.steps=5"] if shape == "tiny" else []),
                                                     *mode])
                        warm.add(key)
                    last_engine = engine
                    t0 = time.time()
                    summary = run(f"{name}_{rep}" if args.repeats > 1 else name, [f"algorithm.steps={steps}", *mode])
                    cfg = load_config([*base, *mode])
                    samples = steps * cfg.algorithm.prompts_per_step * cfg.algorithm.samples_per_prompt
                    runs.setdefault(name, []).append(_measure(name, summary, _rows(summary), samples, mode))
                    print(f"{shape} {name}: RL {summary['rl_seconds']:.2f} s (run {time.time() - t0:.0f} s)",
                          flush=True)
                    if name == "sync" and rep == 0:  # the learner's fixed cost: again with a quarter of the prompts
                        p = cfg.algorithm.prompts_per_step
                        small = run("sync_small", ["algorithm.steps=4", f"algorithm.prompts_per_step={max(1, p // 4)}",
                                                   *mode])
                        fits.append(_fixed_cost(shape, runs["sync"][0]["rows"], _rows(small)))
            # per mode, the run of median samples/s (all of them listed when repeated)
            res = {name: sorted(rs, key=lambda m: m["sps"])[len(rs) // 2] for name, rs in runs.items()}
            if args.repeats > 1:
                print(f"{shape} samples/s per repeat: " + "; ".join(
                    f"{name} " + " ".join(f"{m['sps']:.2f}" for m in rs) for name, rs in runs.items()), flush=True)
            tables.append(_table(shape, res, steps))
            finals.append(_final_line(shape, res, steps))
    for t in tables:
        print(t)
    print("\nlearner fixed cost per step (intercept of learner step seconds against padded tokens, sync runs at P "
          "and P/4 prompts per step) and the synchronous step's other serial parts:")
    for f in fits:
        print(f)
    print(f"outputs in {out}")
    print("\n".join(finals))
    return 0


if __name__ == "__main__":
    sys.exit(main())
