"""mode=rm: a reward model trained on preference pairs by the Megatron learner, exported for transformers and vLLM.

    python -m megatron_async_rlhf mode=rm data.source=prefs.jsonl model.path=DIR rm.steps=200

    learner ranks only -> pairs (data/preferences.py) -> scalar-head model from model.path (learner/value_head.py)
    -> held-out accuracy -> rm.steps x [Bradley-Terry step (algorithms/bradley_terry.py); eval every rm.eval_every]
    -> held-out accuracy -> <logging.out_dir>/reward_model/final (HF LlamaForSequenceClassification + tokenizer)

No rollout engine is started: the world is the learner pool (``cluster.learner_tp x learner_pp x learner_dp`` ranks),
``cluster.rollout_*`` are ignored. Each data-parallel replica trains on its share of every batch of pairs. The run's
last line is ``rm_accuracy=<held-out pairwise accuracy>``.

Checkpoints and resume work as in mode=rl (``run_state.py``): every ``checkpoint.every`` steps, and after the step in
which a first SIGTERM/SIGINT arrived (the run then exits 0), ``checkpoints/step_N`` holds the model and its optimizer,
the data order (``rng.json``: its ``Random`` state and the rest of the epoch) and the run state (step, metrics rows,
the accuracy before training); ``resume=auto`` or ``resume=PATH`` continues exactly, to the same held-out accuracy.

A batch is ``rm.batch_size`` comparison groups (``data.preferences.comparison_groups``): the pairs that share a
response. With one pair per prompt that is pairs; with all the comparisons among a prompt's k responses (the chat
pipeline's training pairs) each response is forwarded once per step for its k-1 comparisons, InstructGPT's
reward-model batching, which trains on k(k-1)/2 pairs for the cost of k sequences.
"""

from __future__ import annotations

import logging
import os
import random
import time

import torch
import torch.distributed as dist

from megatron_async_rlhf.algorithms.bradley_terry import bradley_terry_loss
from megatron_async_rlhf.config import RunConfig
from megatron_async_rlhf.errors import ConfigError
from megatron_async_rlhf.modes.common import join_launch, launch, open_metrics

log = logging.getLogger("megatron_async_rlhf")


def main(cfg: RunConfig, model_path: str) -> int:
    """Launch a learner-only world and run :func:`job` on it (the preflight has checked a ``resume`` checkpoint)."""
    summary = launch(cfg, job, model_path, "rm", learners_only=True, stop_grace_s=cfg.checkpoint.grace_s)
    if summary is None:  # a non-controller rank under torchrun
        return 0
    if "stopped_after_step" in summary:
        print(f"rm_stopped_after_step={summary['stopped_after_step']} checkpoint={summary['checkpoint']}", flush=True)
        return 0
    print(f"rm_accuracy={summary['rm_accuracy']:.4f} rm_accuracy_before={summary['rm_accuracy_before']:.4f} "
          f"eval_pairs={summary['eval_pairs']} export={summary['export']}", flush=True)
    return 0


def job(cfg_dict: dict, model_path: str, session: str = "rm", world_size: int | None = None) -> dict | None:
    from megatron_async_rlhf.preemption import install_handlers

    install_handlers()  # a first SIGTERM/SIGINT stops the run after its current step, checkpointed
    cfg, ctx = join_launch(cfg_dict, session, world_size)
    if ctx is None:
        return None
    return RewardModelTraining(cfg, ctx, model_path).run()


def rm_max_len(cfg, max_positions: int) -> int:
    """The longest prompt + response a reward-model run accepts: ``rm.max_len`` (at most the model's positions)."""
    if cfg.rm.max_len > max_positions:
        raise ConfigError(f"rm.max_len={cfg.rm.max_len} exceeds the model's max_position_embeddings={max_positions}")
    return cfg.rm.max_len or max_positions


def load_tokenized_pairs(cfg, tok, max_positions: int, vocab_size: int | None = None):
    """(train, held-out) tokenized pairs of a mode=rm run, every contract checked (errors name the row and key)."""
    from megatron_async_rlhf.data.preferences import comparison_groups, load_pairs, rm_pad_token_id, tokenize_pairs

    d = cfg.data
    if d.source in ("arithmetic", "synthetic_gsm8k"):
        raise ConfigError(f"mode=rm trains on preference pairs, but data.source={d.source!r} is a built-in prompt "
                          "source. Fix: set data.source to a preference dataset (prompt / chosen / rejected; README, "
                          "'Reward models')")
    max_len = rm_max_len(cfg, max_positions)
    out = []
    for split, limit in ((d.split, d.train_size), (d.eval_split, d.eval_size)):
        pairs = load_pairs(d, split, limit)
        if not pairs:
            raise ConfigError(f"data split {split!r} of {d.source} has no preference pairs")
        out.append(tokenize_pairs(tok, pairs, max_len, d.use_chat_template, d.prompt_template, cfg.rm.margin,
                                  vocab_size, rm_pad_token_id(tok), what=f"{d.source} split {split!r} pair"))
    groups = len(comparison_groups(out[0]))
    if groups < cfg.rm.batch_size:
        raise ConfigError(f"data has {len(out[0])} training pairs in {groups} comparison groups (pairs sharing a "
                          f"response) < rm.batch_size={cfg.rm.batch_size} groups. Fix: lower rm.batch_size")
    return out[0], out[1]


def _last_stage_totals(values: list[float] | None, n: int) -> list[float]:
    """Sums over the data-parallel replicas of numbers known on the last pipeline stage (its TP rank 0 contributes;
    ``values`` is ignored elsewhere), on every learner rank."""
    from megatron.core import parallel_state as ps

    mine = ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0 and values is not None
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the default group is NCCL on GPUs
    t = torch.tensor(values if mine else [0.0] * n, dtype=torch.float64, device=device)
    dist.all_reduce(t)  # the default group is the learner pool
    return t.cpu().tolist()


def group_micro_batches(groups: list[list], micro_batch: int) -> list[dict]:
    """Micro-batches of whole comparison groups (lists of ``TokenizedPair``; ``data.preferences.comparison_groups``):
    each distinct sequence of a micro-batch is one row (a response compared k-1 times is forwarded once), the pairs
    are row indices. Groups are packed in order while the rows stay within ``micro_batch``; a group with more
    sequences gets a micro-batch of its own. Each micro-batch is right-padded to its own longest row: ``tokens``,
    ``mask [b, s]``, ``chosen`` / ``rejected [P]`` row indices, ``margin [P]``, ``pairs`` (P)."""
    from megatron_async_rlhf.learner.value_head import right_padded

    out, cur = [], []

    def flush():
        rows: dict[tuple, int] = {}
        for p in cur:
            for s in (p.chosen, p.rejected):
                rows.setdefault(tuple(s), len(rows))
        tokens, mask = right_padded([list(s) for s in rows], len(rows))
        out.append({"tokens": tokens, "mask": mask, "pairs": len(cur),
                    "chosen": torch.tensor([rows[tuple(p.chosen)] for p in cur]),
                    "rejected": torch.tensor([rows[tuple(p.rejected)] for p in cur]),
                    "margin": torch.tensor([float(p.margin) for p in cur])})
        cur.clear()

    def n_rows(pairs) -> int:
        return len({tuple(s) for p in pairs for s in (p.chosen, p.rejected)})

    for g in groups:
        if cur and n_rows(cur + g) > micro_batch:
            flush()
        cur.extend(g)
    if cur:
        flush()
    return out


def bradley_terry_step(ddp, opt, groups: list[list], micro_batch: int, total_pairs: int | None = None) -> dict:
    """One optimizer step of the scalar-head model on this data-parallel replica's comparison groups (lists of
    ``TokenizedPair``; a group of one pair is a plain pair): the mean Bradley-Terry loss over the pairs of all
    replicas (``total_pairs``; default: every replica has as many as this one), whatever the micro-batching.
    Returns loss, accuracy, pairs and sequences over all replicas (every rank), and the grad norm. All learner ranks
    call it together."""
    from megatron.core import parallel_state as ps

    from megatron_async_rlhf.learner.step import NonFiniteLoss
    from megatron_async_rlhf.learner.train import train_step
    from megatron_async_rlhf.learner.value_head import last_token_values

    batches = group_micro_batches(groups, micro_batch)
    mine = sum(b["pairs"] for b in batches)
    dp = ps.get_data_parallel_world_size()
    total = total_pairs or mine * dp
    for b in batches:  # megatron-core averages the replicas' gradients: weight = share of all replicas' pairs x dp
        b["weight"] = b["pairs"] * dp / total

    def loss_fn(v, b):  # v [b]: each row's value at its last real token
        loss, m = bradley_terry_loss(v[b["chosen"]], v[b["rejected"]], b["margin"])
        return loss, {"loss": loss.detach(), "accuracy": m["accuracy"]}

    out = train_step(ddp, opt, batches, loss_fn, 0, head_fn=lambda output, b: last_token_values(output[..., 0],
                                                                                                 b["mask"]))
    keys = ("loss", "accuracy")
    sums = [out[k] * mine for k in keys] if "loss" in out else None
    rows = sum(len(b["tokens"]) for b in batches)
    loss_sum, correct, n, seqs = _last_stage_totals(sums and sums + [mine, rows], 4)
    if not torch.isfinite(torch.tensor([loss_sum, out["grad_norm"]])).all():
        raise NonFiniteLoss(f"non-finite reward-model loss/grad norm ({loss_sum}, {out['grad_norm']}); stopping")
    return {"loss": loss_sum / n, "accuracy": correct / n, "grad_norm": out["grad_norm"], "pairs": int(n),
            "sequences": int(seqs)}


class RewardModelTraining:
    def __init__(self, cfg: RunConfig, ctx, model_path: str):
        from transformers import AutoTokenizer

        from megatron_async_rlhf import run_state
        from megatron_async_rlhf.data.preferences import comparison_groups, rm_pad_token_id
        from megatron_async_rlhf.weights.llama_config import read_config

        self.cfg, self.ctx, self.model_path = cfg, ctx, model_path
        # saved: the checkpoint's run state, or None (a fresh run); refused here, before the model is built
        self.resume_path, self.saved = run_state.open_run(cfg, ctx.is_controller)
        tok = AutoTokenizer.from_pretrained(model_path)
        self.pad_id = rm_pad_token_id(tok)
        max_positions = read_config(model_path).max_position_embeddings
        self.train_pairs, self.eval_pairs = load_tokenized_pairs(cfg, tok, max_positions)
        self.groups = [[self.train_pairs[i] for i in g] for g in comparison_groups(self.train_pairs)]
        self.rng = random.Random(cfg.seed)  # the same on every rank: every replica draws the same batch
        self._order: list[int] = []
        self.metrics = open_metrics(cfg, ctx, cfg.rm.steps, self.saved and self.saved["metrics"])

    def _next_batch(self) -> list[list]:
        """``rm.batch_size`` comparison groups, epoch by epoch in a shuffled order."""
        out = []
        while len(out) < self.cfg.rm.batch_size:
            if not self._order:
                self._order = list(range(len(self.groups)))
                self.rng.shuffle(self._order)
            out.append(self.groups[self._order.pop()])
        return out

    def data_cursor(self) -> dict:
        """The data order's position (JSON state): its ``Random`` and the groups left in the current epoch."""
        return {"rng": self.rng.getstate(), "order": list(self._order)}

    def set_data_cursor(self, cursor: dict) -> None:
        self.rng.setstate(tuple(cursor["rng"]))
        self._order = [int(i) for i in cursor["order"]]
        if any(not 0 <= i < len(self.groups) for i in self._order):
            raise ConfigError(f"checkpoint {self.resume_path}: its data order names comparison groups beyond the "
                              f"{len(self.groups)} of data.* (the data changed?)")

    def checkpoint(self, step: int, model, opt, info, mcfg, acc0: float, train_s: float) -> str:
        """Checkpoint ``step`` (collective over the learner pool): model + optimizer, data order, RNG, run state."""
        from megatron_async_rlhf import run_state

        run = {"metrics": self.metrics.state(), "rm_accuracy_before": acc0, "train_s": train_s} \
            if self.ctx.is_controller else None
        return run_state.save_checkpoint(self.cfg, step, info, mcfg.raw, {run_state.MODEL: (model, opt)}, run,
                                         self.data_cursor())

    def restore(self, model, opt) -> tuple[int, float, float]:
        """(step, accuracy before training, training seconds so far) of the checkpoint resumed from; model,
        optimizer, RNG and the data order restored (collective over the learner pool)."""
        from megatron_async_rlhf import run_state

        rng = run_state.read_state_file(os.path.join(self.resume_path, run_state.RNG))  # JSON, or refused
        self.set_data_cursor(rng["data_cursor"])
        run_state.restore_learner(self.resume_path, rng, {run_state.MODEL: (model, opt)})
        step = self.saved["step"]
        log.info("resumed from %s (step %d)", self.resume_path, step)
        return step, self.saved["rm_accuracy_before"], self.saved["train_s"]

    def evaluate(self, model, step: int, dp: int, dp_rank: int) -> float:
        """Held-out pairwise accuracy (and loss), logged by the controller; every rank gets the accuracy."""
        from megatron_async_rlhf.learner.value_head import sequence_values

        mine = self.eval_pairs[dp_rank::dp]
        vals = None
        if mine:
            v = sequence_values(model, [s for p in mine for s in (p.chosen, p.rejected)], self.cfg.rm.micro_batch)
            if v is not None:
                c, r = v[0::2], v[1::2]
                loss, _ = bradley_terry_loss(c, r, torch.tensor([p.margin for p in mine]))
                vals = [float((c > r).sum()), float(loss) * len(mine), float(len(mine)), float((c - r).sum())]
        correct, loss_sum, n, diff = _last_stage_totals(vals, 4)
        acc = correct / n
        if self.metrics:
            self.metrics.log(step, "rm_eval", accuracy=acc, loss=loss_sum / n, reward_diff=diff / n, n=int(n))
        return acc

    def run(self) -> dict | None:
        from megatron_async_rlhf.learner.parallel import ranks
        from megatron_async_rlhf.learner.train import OptimConfig, set_lr, wrap_for_training
        from megatron_async_rlhf.learner.build import value_model_from_hf
        from megatron_async_rlhf.preemption import stop_agreed

        cfg, rc = self.cfg, self.cfg.rm
        mcfg, model, info = value_model_from_hf(self.model_path, cfg.cluster.learner_tp, cfg.cluster.learner_pp,
                                                dtype=cfg.learner.params_dtype, recompute=cfg.learner.recompute)
        oc = OptimConfig(lr=rc.lr, distributed_optimizer=cfg.learner.distributed_optimizer,
                         head_lr_mult=rc.head_lr_mult)
        ddp, opt = wrap_for_training(model, oc)
        dp, dp_rank = ranks()["dp"], ranks()["dp_rank"]
        try:
            if self.saved:
                done, acc0, train_s = self.restore(model, opt)
            else:
                done, acc0, train_s = 0, self.evaluate(model, 0, dp, dp_rank), 0.0
            t0 = time.perf_counter() - train_s
            for step in range(done + 1, rc.steps + 1):
                lr = set_lr(opt, rc.lr, rc.lr_schedule, step - 1, rc.steps, rc.warmup_steps)
                batch = self._next_batch()
                m = bradley_terry_step(ddp, opt, batch[dp_rank::dp], rc.micro_batch, sum(map(len, batch)))
                m["lr"] = lr
                if self.metrics:
                    self.metrics.log(step, "rm", **m)
                if rc.eval_every and step % rc.eval_every == 0 and step < rc.steps:
                    self.evaluate(model, step, dp, dp_rank)
                stop = stop_agreed(self.ctx.store)  # a SIGTERM/SIGINT anywhere: every learner rank stops here
                if stop or (cfg.checkpoint.every and step % cfg.checkpoint.every == 0):
                    path = self.checkpoint(step, model, opt, info, mcfg, acc0, time.perf_counter() - t0)
                if stop:
                    log.warning("stopped after rm step %d; continue with resume=auto", step)
                    return {"stopped_after_step": step, "checkpoint": path} if self.ctx.is_controller else None
            train_s = time.perf_counter() - t0
            acc1 = self.evaluate(model, rc.steps, dp, dp_rank)
            out = self.export(model, info, mcfg, "final")
        finally:
            if self.metrics:
                self.metrics.close()
        if not self.ctx.is_controller:
            return None
        return {"mode": "rm", "rm_accuracy": acc1, "rm_accuracy_before": acc0, "eval_pairs": len(self.eval_pairs),
                "train_pairs": len(self.train_pairs),
                "train_groups": len(self.groups), "steps": rc.steps, "train_seconds": round(train_s, 2),
                "export": out, "metrics": self.metrics.path}

    def export(self, model, info, mcfg, name: str) -> str:
        """HF LlamaForSequenceClassification (num_labels=1, pad token set, the input format in config.json) +
        tokenizer, written atomically."""
        from megatron.core import parallel_state as ps

        from megatron_async_rlhf.learner.value_head import classifier_config
        from megatron_async_rlhf.weights.gather import full_hf_state_dict
        from megatron_async_rlhf.weights.hf_io import save_hf

        out = os.path.join(self.cfg.logging.out_dir, "reward_model", name)
        sd = full_hf_state_dict(model, info, mcfg) if ps.get_data_parallel_rank() == 0 else None
        if sd is not None and self.ctx.is_controller:
            fmt = {"use_chat_template": self.cfg.data.use_chat_template, "template": self.cfg.data.prompt_template}
            save_hf(out, sd, classifier_config(mcfg.raw, self.pad_id, fmt), copy_from=self.model_path)
            log.info("exported reward model to %s", out)
        dist.barrier()
        return out
