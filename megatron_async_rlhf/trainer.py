"""The learner pool's side of a run: data, warm start, reference model, the schedule, evaluation, exports,
checkpoints and resume (``run_state.py``), stopping on a signal (``preemption.py``)."""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import time

import torch
import torch.distributed as dist

from megatron_async_rlhf import run_state
from megatron_async_rlhf.config import RunConfig
from megatron_async_rlhf.data.tasks import Row, load_rows, tokenize_prompts

log = logging.getLogger("megatron_async_rlhf")


class Trainer:
    def __init__(self, cfg: RunConfig, ctx, model_path: str):
        from transformers import AutoTokenizer

        from megatron_async_rlhf.models import stop_token_ids

        self.cfg, self.ctx, self.model_path = cfg, ctx, model_path
        self.tok = AutoTokenizer.from_pretrained(model_path)
        self.stops = stop_token_ids(model_path, self.tok)
        d = cfg.data
        self.train_rows, self.eval_rows = load_rows(d, cfg.logging.out_dir)
        self.train_ids, self.eval_ids = (tokenize_prompts(self.tok, rows, d.max_prompt_len, d.use_chat_template,
                                                          d.prompt_template) for rows in (self.train_rows, self.eval_rows))
        self.rng = random.Random(cfg.seed)
        self.cursor = run_state.DataCursor(self.rng)
        self.resume_path = run_state.find_resume(cfg) if cfg.mode == "rl" else ""
        self.resume = run_state.read_run_state(self.resume_path) if self.resume_path else None
        if cfg.mode == "rl" and not self.resume and ctx.is_controller:
            run_state.clear_checkpoints(cfg.logging.out_dir)
        self.metrics = None
        if ctx.is_controller:
            from megatron_async_rlhf.metrics import Metrics

            self.metrics = Metrics(cfg.logging.out_dir, dataclasses.asdict(cfg), cfg.logging.wandb_mode,
                                   cfg.logging.wandb_project, cfg.algorithm.steps,
                                   resume=self.resume["metrics"] if self.resume else None)
        self._evaluator = None
        self.last_checkpoint = ""
        self.reward_fn = None
        if ctx.is_controller:  # scores what arrives unscored (reward.placement=controller; evaluation)
            from megatron_async_rlhf.rewards.placement import RewardFn

            self.reward_fn = RewardFn(cfg.reward, self.tok)

    # ----- rewards (controller) --------------------------------------------------------------------------------
    def rewards(self, samples, rows: list[Row], penalties: bool = True) -> torch.Tensor:
        """Rewards of ``samples`` (controller): as scored on the rollout pool when they carry them
        (``reward.placement=rollout``), else scored here; then the training penalties."""
        from megatron_async_rlhf.rewards import apply_penalties
        from megatron_async_rlhf.rewards.placement import carried_rewards

        r = carried_rewards(samples)
        if r is None:
            r = self.reward_fn(samples, rows)
        if not penalties:
            return r
        return apply_penalties(r, [s.finish_reason for s in samples], self.cfg.reward.missing_eos_penalty)

    def _shared_rewards(self, samples, rows, collected: dict) -> tuple[torch.Tensor, dict]:
        """(rewards, {reward_s, reward_wait_s}) on every learner rank. ``collected``: the client's last collect."""
        box = [None]
        if self.ctx.is_controller:
            from megatron_async_rlhf.rewards.placement import carried_rewards

            t0 = time.perf_counter()
            scored_there = carried_rewards(samples) is not None
            r = self.rewards(samples, rows)
            here = time.perf_counter() - t0
            if scored_there:  # the learner waited only for the scoring that outlasted its own work
                timing = {"reward_s": collected.get("reward_s", 0.0),
                          "reward_wait_s": min(collected.get("reward_s", 0.0), collected.get("collect_wait_s", 0.0))}
            else:
                timing = {"reward_s": here, "reward_wait_s": here}
            box = [(r, timing)]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    # ----- phases -----------------------------------------------------------------------------------------------
    def warm_start(self, ddp, opt, vocab_size: int) -> None:
        from megatron_async_rlhf.learner.step import sft_step

        sc = self.cfg.sft
        eos = self.stops[0] if self.stops else self.tok.eos_token_id
        for step in range(sc.steps):
            idx = [self.rng.randrange(len(self.train_rows)) for _ in range(sc.batch_size)]
            answers = [self.tok(" " + self.train_rows[i].answer, add_special_tokens=False)["input_ids"] + [eos]
                       for i in idx]
            out = sft_step(ddp, opt, [self.train_ids[i] for i in idx], answers, vocab_size, sc.batch_size,
                           self.cfg.learner.max_tokens_per_micro_batch)
            if self.metrics and (step % 10 == 0 or step == sc.steps - 1):
                self.metrics.log(step, "sft", **{k: v for k, v in out.items() if isinstance(v, float)})

    def evaluate(self, client, step: int) -> dict | None:
        """Greedy pass@1 on the held-out prompts (controller only), logged and written row by row."""
        if not self.ctx.is_controller:
            return None
        out = self.evaluator().run(client, step)
        self.metrics.log(step, "eval", **{k: v for k, v in out.items() if k != "file"})
        return out

    def evaluator(self):
        from megatron_async_rlhf.evaluation import Evaluator

        if self._evaluator is None:
            self._evaluator = Evaluator(self.eval_ids, self.eval_rows,
                                        lambda samples, rows: self.rewards(samples, rows, penalties=False), self.tok,
                                        self.cfg.logging.out_dir, self.cfg.eval_max_new_tokens, self.stops,
                                        judge=self._eval_judge(), against_answers=self.cfg.eval.win_rate_against
                                        == "answers")
        return self._evaluator

    def _eval_judge(self):
        """eval.judge: a registry judge, the run's reward model (``reward_model``), or a reward model directory."""
        from megatron_async_rlhf.rewards.judges import get_judge

        name = self.cfg.eval.judge
        if not name:
            return None
        if name == "reward_model" or "/" in name:
            from megatron_async_rlhf.rewards.reward_model import RewardModelScorer

            rm = (RewardModelScorer(self.cfg.reward.reward_model_path, dtype=self.cfg.reward.dtype)
                  if name == "reward_model" else RewardModelScorer(name))
            return lambda prompts, completions: rm.score(prompts, completions).tolist()
        return get_judge(name)

    def run(self) -> dict | None:
        from megatron_async_rlhf.learner.build import model_from_hf
        from megatron_async_rlhf.learner.model import build_model
        from megatron_async_rlhf.learner.step import rl_step
        from megatron_async_rlhf.learner.train import OptimConfig, set_lr, wrap_for_training
        from megatron_async_rlhf.preemption import stop_agreed
        from megatron_async_rlhf.rollout.client import RolloutClient
        from megatron_async_rlhf.rollout.engine import SamplingSettings
        from megatron_async_rlhf.schedules.rounds import Schedule

        cfg, ac = self.cfg, self.cfg.algorithm
        mcfg, model, info = model_from_hf(self.model_path, cfg.cluster.learner_tp, cfg.cluster.learner_pp,
                                          dtype=cfg.learner.params_dtype, recompute=cfg.learner.recompute)
        ddp, opt = wrap_for_training(model, OptimConfig(lr=cfg.sft.lr, clip_grad=ac.clip_grad,
                                                        distributed_optimizer=cfg.learner.distributed_optimizer))
        client = RolloutClient(self.ctx)  # waits for the engines
        summary: dict = {}
        try:
            if cfg.sft.steps and not self.resume:
                self.warm_start(ddp, opt, mcfg.vocab_size)
            if cfg.mode == "sft":
                self.export(model, info, mcfg, "final")
                return {"mode": "sft", "steps": cfg.sft.steps} if self.ctx.is_controller else None
            ref, _ = build_model(mcfg, dtype=cfg.learner.params_dtype, init=False)  # frozen copy of the starting policy
            ref.requires_grad_(False)
            evaluated, ready, sched_state = [0], None, None
            if self.resume:  # policy, optimizer, reference, RNG, data cursor, schedule, evaluation as checkpointed
                _, cursor, ready = run_state.load(self.resume_path, model, opt, ref)
                self.rng.setstate(cursor)
                sched_state, ev = self.resume["schedule"], self.resume["evaluation"]
                evaluated[0], acc0 = ev["last_version"], ev["before"]
                if self.ctx.is_controller:
                    self.evaluator().first = ev["first"]
            else:
                ref.load_state_dict(model.state_dict())
            set_lr(opt, ac.lr)
            if not self.resume:
                client.sync_weights(model, info, mcfg, 0)
                acc0 = self.evaluate(client, 0)
            k = ac.samples_per_prompt
            from megatron_async_rlhf.learner.critic import build_critic  # PPO's value model; None without one

            critic = build_critic(cfg, mcfg, model) if ac.critic else None
            if self.resume and critic is not None:
                run_state.load_critic(self.resume_path, critic)

            def prompts_for(i):  # round i: off_policy_n mini-batches' prompts
                idx = self.cursor.draw(i, ac.prompts_per_step * ac.off_policy_n, len(self.train_rows))
                return [self.train_ids[j] for j in idx], [self.train_rows[j] for j in idx]

            def train(batch):
                rewards, timing = self._shared_rewards(batch.samples, batch.meta, client.last_collect)
                return timing | rl_step(batch, rewards, ac, ddp, opt, ref, mcfg.vocab_size,
                               cfg.learner.max_tokens_per_micro_batch, critic=critic)

            def on_step(batch, m):
                if self.metrics:
                    self.metrics.log(batch.index + 1, "rl", **{k2: v for k2, v in m.items()
                                                               if isinstance(v, (int, float))})
                if cfg.logging.save_every and (batch.index + 1) % cfg.logging.save_every == 0:
                    self.export(model, info, mcfg, f"step_{batch.index + 1}")
                if m["minibatch"] != ac.off_policy_n - 1:  # checkpoints and stops fall between rounds
                    return False
                stop = stop_agreed(self.ctx.store)  # a SIGTERM/SIGINT anywhere: every learner rank stops here
                every = cfg.checkpoint.every
                if stop or (every and (batch.index + 1) % every == 0):
                    self.checkpoint(batch.index + 1, sched, model, opt, ref, info, mcfg, acc0, evaluated[0], critic)
                return stop

            def eval_due(version):  # mid-run evaluations, every eval.every RL steps
                every = cfg.eval.every
                if every and version < ac.steps and version // every > evaluated[0] // every:
                    evaluated[0] = version
                    self.evaluate(client, version)

            sampling = SamplingSettings(temperature=ac.temperature, top_p=ac.top_p, max_new_tokens=ac.max_new_tokens,
                                        n=k, stop_token_ids=self.stops)
            sched = Schedule(client, ac.max_staleness, ac.steps, prompts_for, sampling,
                             sync=lambda v: client.sync_weights(model, info, mcfg, v),
                             always_sync=ac.sync_every_step, after_sync=eval_due, off_policy_n=ac.off_policy_n,
                             resume=sched_state, seed_of=lambda i: run_state.sampling_seed(cfg.seed, cfg.rollout.seed, i))
            t_rl = time.perf_counter()
            stats = sched.run(train, on_step, ready=ready)
            rl_seconds = time.perf_counter() - t_rl
            if sched.version < ac.steps:  # stopped by a signal, checkpointed: no final evaluation or export
                client.shutdown()
                log.warning("stopped after RL step %d; continue with resume=auto", sched.version)
                return {"stopped_after_step": sched.version, "checkpoint": self.last_checkpoint} \
                    if self.ctx.is_controller else None
            client.sync_weights(model, info, mcfg, sched.version)
            acc1 = self.evaluate(client, ac.steps)
            self.export(model, info, mcfg, "final")
            if self.ctx.is_controller:
                plot = self.metrics.plot()
                rl = [r for r in self.metrics.rows if r["phase"] == "rl"]
                summary = {"accuracy_before": acc0["accuracy"], "accuracy_after": acc1["accuracy"],
                           "accuracy_before_ci95": [round(acc0["accuracy_lo95"], 4), round(acc0["accuracy_hi95"], 4)],
                           "accuracy_after_ci95": [round(acc1["accuracy_lo95"], 4), round(acc1["accuracy_hi95"], 4)],
                           "eval_n": acc1["n"], "eval_file": acc1["file"],
                           "accuracy_delta_paired_ci95": [round(acc1["delta_lo95"], 4), round(acc1["delta_hi95"], 4)],
                           "steps": stats.trained,
                           "generated": stats.generated, "max_staleness_seen": max(stats.staleness),
                           "syncs": stats.syncs, "plot": plot, "metrics": self.metrics.path,
                           "gen_s_mean": sum(r["gen_s"] for r in rl) / len(rl),
                           "train_s_mean": sum(r["train_s"] for r in rl) / len(rl),
                           "rl_seconds": rl_seconds,
                           "reward_last5": sum(r.get("reward_mean", 0) for r in rl[-5:]) / len(rl[-5:])}
                if "win_rate" in acc1:  # eval.judge: judged win-rate against the starting policy, proxy vs judge
                    summary.update(win_rate=acc1["win_rate"],
                                   win_rate_ci95=[round(acc1["win_rate_lo95"], 4), round(acc1["win_rate_hi95"], 4)],
                                   judge_mean_before=acc0.get("judge_mean"), judge_mean_after=acc1["judge_mean"],
                                   reward_mean_before=acc0.get("reward_mean"), reward_mean_after=acc1["reward_mean"])
        except BaseException:
            log.exception("learner failed; stopping the rollout pool")
            try:
                client.shutdown()
            except Exception as e:  # the original error matters more than a failed goodbye
                log.warning("rollout pool shutdown failed too: %s", e)
            raise
        else:
            client.shutdown()
        finally:
            if self.metrics:
                self.metrics.close()
        return summary if self.ctx.is_controller else None

    def checkpoint(self, step: int, sched, model, opt, ref, info, mcfg, acc0, last_eval: int, critic=None) -> None:
        """A full RL checkpoint after ``step`` (run_state.py); collective over the learner pool."""
        sched_state, batch = sched.checkpoint_state()
        run = {}
        if self.ctx.is_controller:
            run = {"schedule": sched_state, "metrics": self.metrics.state(), "config": dataclasses.asdict(self.cfg),
                   "evaluation": {"before": acc0, "first": self.evaluator().first, "last_version": last_eval}}
        # the data cursor: the prompt stream before the first batch the checkpoint does not hold
        next_round = sched_state["version"] // self.cfg.algorithm.off_policy_n + (batch is not None)
        self.last_checkpoint = run_state.save(self.cfg.logging.out_dir, step, self.cfg.checkpoint.keep, model, opt,
                                              ref, info, mcfg.raw, run, self.cursor.state_before(next_round), batch,
                                              critic)

    def export(self, model, info, mcfg, name: str) -> None:
        """HF safetensors + config + tokenizer of the current policy, written atomically."""
        from megatron_async_rlhf.weights.gather import full_hf_state_dict
        from megatron_async_rlhf.weights.hf_io import save_hf

        from megatron.core import parallel_state as ps

        from megatron_async_rlhf.learner.step import NonFiniteLoss

        bad = torch.tensor([0.0 if all(torch.isfinite(p).all() for p in model.parameters()) else 1.0])
        dist.all_reduce(bad)
        if bad.item():
            raise NonFiniteLoss(f"policy weights are not finite; not exporting {name!r}: the last export on disk is "
                                "the last good state")
        sd = full_hf_state_dict(model, info, mcfg) if ps.get_data_parallel_rank() == 0 else None
        if sd is not None and self.ctx.is_controller:
            out = os.path.join(self.cfg.logging.out_dir, "policy", name)
            save_hf(out, sd, mcfg.raw, copy_from=self.model_path)
            log.info("exported policy to %s", out)
        dist.barrier()
