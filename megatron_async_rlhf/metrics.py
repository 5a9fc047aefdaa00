"""Run metrics: JSONL (always), wandb (offline unless configured), a progress line per step, and a plot of reward
against wall-clock at the end. Only the controller writes."""

from __future__ import annotations

import json
import logging
import os
import time

log = logging.getLogger("megatron_async_rlhf")


class Metrics:
    def __init__(self, out_dir: str, config: dict, wandb_mode: str = "offline", project: str = "megatron_async_rlhf",
                 total_steps: int = 0):
        os.makedirs(out_dir, exist_ok=True)
        self.out_dir, self.total, self.t0 = out_dir, total_steps, time.time()
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self._f = open(self.path, "w")  # one run per directory: a re-run starts its metrics afresh
        self.rows: list[dict] = []
        self._wandb = None
        self._wandb_phases: set[str] = set()
        if wandb_mode != "disabled":
            try:
                import wandb

                self._wandb = wandb.init(project=project, dir=out_dir, mode=wandb_mode, config=config,
                                         reinit="finish_previous")
            except Exception as e:  # a logging backend must never stop training
                log.warning("wandb unavailable (%s); metrics go to %s only", e, self.path)

    def log(self, step: int, phase: str, **values) -> None:
        row = {"step": step, "phase": phase, "wall_s": round(time.time() - self.t0, 3),
               **{k: (round(v, 6) if isinstance(v, float) else v) for k, v in values.items()}}
        self.rows.append(row)
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()
        if self._wandb is not None:
            # wandb's own step only increases, so phases that restart their count (sft 0..S, then rl 1..R, eval
            # 0..R) would be dropped against it: each phase gets its own x-axis (``<phase>/step``) and wandb's step
            # just counts log calls
            if phase not in self._wandb_phases:
                self._wandb.define_metric(f"{phase}/step")
                self._wandb.define_metric(f"{phase}/*", step_metric=f"{phase}/step")
                self._wandb_phases.add(phase)
            self._wandb.log({f"{phase}/{k}": v for k, v in row.items() if isinstance(v, (int, float))})
        show = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()
                        if k in ("reward_mean", "accuracy", "loss", "staleness", "gen_s", "train_s", "sync_seconds"))
        total = f"/{self.total}" if self.total and phase == "rl" else ""
        log.info("[%s %d%s %6.1fs] %s", phase, step, total, row["wall_s"], show)

    def plot(self, name: str = "reward_vs_wallclock.png") -> str | None:
        rl = [r for r in self.rows if r["phase"] == "rl" and "reward_mean" in r]
        if not rl:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([r["wall_s"] for r in rl], [r["reward_mean"] for r in rl], marker=".", label="train reward")
        ev = [r for r in self.rows if r["phase"] == "eval"]
        if ev:
            ax.plot([r["wall_s"] for r in ev], [r["accuracy"] for r in ev], "s--", label="eval accuracy")
        ax.set_xlabel("wall-clock (s)")
        ax.set_ylabel("reward")
        ax.legend()
        ax.grid(alpha=0.3)
        path = os.path.join(self.out_dir, name)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path

    def close(self) -> None:
        self._f.close()
        if self._wandb is not None:
            self._wandb.finish()
