"""Run metrics: JSONL (always), wandb (offline unless configured), a progress line per step, and a plot of reward
against wall-clock at the end. Only the controller writes.

A resumed run (``resume``: a checkpoint's ``state()``) continues the same ``metrics.jsonl``, cut back to the rows
logged before the checkpoint (later ones are logged again), and the same wandb run (same id) on the same step axis
(wandb's step = the row's index in metrics.jsonl). A process killed with SIGKILL may never have flushed its last wandb
rows, so a resumed run logs again, from where the checkpoint's process started logging, the rows before the checkpoint
that wandb does not report having. wandb offline writes each (re)start into its own ``offline-run-*-<id>`` directory:
read in order, a later one's rows supersede an earlier one's from its first step on; together they hold every row
once.
"""

from __future__ import annotations

import json
import logging
import os
import time

log = logging.getLogger("megatron_async_rlhf")


SIGNIFICANT_DIGITS = 7


def significant(v: float) -> float:
    """``v`` rounded to 7 significant digits (fp32 holds about 7): small values such as a learning rate of 8e-7 keep
    their digits, which rounding to a fixed number of decimals would lose. NaN and infinities stay as they are."""
    return float(f"{v:.{SIGNIFICANT_DIGITS}g}")


class Metrics:
    def __init__(self, out_dir: str, config: dict, wandb_mode: str = "offline", project: str = "megatron_async_rlhf",
                 total_steps: int = 0, resume: dict | None = None):
        os.makedirs(out_dir, exist_ok=True)
        self.out_dir, self.total = out_dir, total_steps
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.rows: list[dict] = self._keep_rows(resume["rows"]) if resume else []
        self.t0 = time.time() - (resume["wall_s"] if resume else 0.0)
        self._f = open(self.path, "a" if resume else "w")  # one run per directory: a re-run starts afresh
        self.wandb_id = resume.get("wandb_id") if resume else None
        self._wandb = None
        self._wandb_phases: set[str] = set()
        if wandb_mode != "disabled":
            try:
                import wandb

                self._wandb = wandb.init(project=project, dir=out_dir, mode=wandb_mode, config=config,
                                         reinit="finish_previous", id=self.wandb_id,
                                         resume="allow" if self.wandb_id else None)
                self.wandb_id = self._wandb.id
            except Exception as e:  # a logging backend must never stop training
                log.warning("wandb unavailable (%s); metrics go to %s only", e, self.path)
        # the first row this process logs to wandb; rows before the checkpoint that wandb may have lost come first
        self.logged_from = len(self.rows)
        if resume and self._wandb is not None:
            self.logged_from = min(max(resume.get("logged_from", 0), self._wandb.step), len(self.rows))
            for i in range(self.logged_from, len(self.rows)):
                self._to_wandb(self.rows[i], i)

    def log(self, step: int, phase: str, **values) -> None:
        row = {"step": step, "phase": phase, "wall_s": round(time.time() - self.t0, 3),
               **{k: (significant(v) if isinstance(v, float) else v) for k, v in values.items()}}
        self.rows.append(row)
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()
        if self._wandb is not None:
            self._to_wandb(row, len(self.rows) - 1)
        show = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()
                        if k in ("reward_mean", "accuracy", "loss", "staleness", "gen_s", "train_s", "sync_seconds"))
        total = f"/{self.total}" if self.total and phase == "rl" else ""
        log.info("[%s %d%s %6.1fs] %s", phase, step, total, row["wall_s"], show)

    def _to_wandb(self, row: dict, index: int) -> None:
        # wandb's own step only increases, so phases that restart their count (sft 0..S, then rl 1..R, eval 0..R)
        # would be dropped against it: each phase gets its own x-axis (``<phase>/step``) and wandb's step is the
        # row's index
        phase = row["phase"]
        if phase not in self._wandb_phases:
            self._wandb.define_metric(f"{phase}/step")
            self._wandb.define_metric(f"{phase}/*", step_metric=f"{phase}/step")
            self._wandb_phases.add(phase)
        self._wandb.log({f"{phase}/{k}": v for k, v in row.items() if isinstance(v, (int, float))}, step=index)

    def _keep_rows(self, n: int) -> list[dict]:
        """The first ``n`` rows of metrics.jsonl (those logged before the checkpoint), the file cut back to them."""
        with open(self.path) as f:
            lines = f.readlines()[:n]
        if len(lines) < n:
            log.warning("%s has %d rows, the checkpoint counted %d: continuing after those present", self.path,
                        len(lines), n)
        with open(self.path + ".tmp", "w") as f:
            f.writelines(lines)
        os.replace(self.path + ".tmp", self.path)
        return [json.loads(line) for line in lines]

    def state(self) -> dict:
        """What a checkpoint stores to continue these metrics."""
        return {"rows": len(self.rows), "wandb_id": self.wandb_id, "wall_s": time.time() - self.t0,
                "logged_from": self.logged_from}

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
