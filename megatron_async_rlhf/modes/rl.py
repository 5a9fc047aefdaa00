"""mode=rl: asynchronous RLHF, the main job (``python -m megatron_async_rlhf``).

    rollout pool:  serve() (rollout/server.py)          reward ranks: serve_rewards() (reward.placement=dedicated)
    learner pool:  train() below: warm start (modes/sft.py) -> push v0, evaluate -> each mini-batch the schedule
                   (schedules/rounds.py, or fully_async.py: ``schedule``) hands out: rewards -> rl_step
                   (learner/step.py) -> log, export, checkpoint
                   -> push the final weights, evaluate, export

The schedule decides when rounds are requested, collected and trained and when weights move, and states and asserts
the staleness invariant; one step is learner/step.py; the losses are algorithms/. Started under torchrun it uses
torchrun's ranks; otherwise it starts ``cluster.world`` local processes itself.
"""

from __future__ import annotations

import contextlib
import logging
import time

from megatron_async_rlhf.config import RunConfig
from megatron_async_rlhf.modes.common import Policy, PromptData, export_policy, join_launch, launch, open_metrics

log = logging.getLogger("megatron_async_rlhf")


def main(cfg: RunConfig, model_path: str) -> int:
    launch(cfg, job, model_path, "run", stop_grace_s=cfg.checkpoint.grace_s)
    return 0


def job(cfg_dict: dict, model_path: str, session: str = "run", world_size: int | None = None) -> dict | None:
    """One rank of the RL world: a learner rank, a rollout engine or a reward rank, by the cluster layout."""
    from megatron_async_rlhf.preemption import install_handlers
    from megatron_async_rlhf.rollout.base import EngineSettings

    install_handlers()  # a first SIGTERM/SIGINT stops the run after its current round, checkpointed
    cfg, ctx = join_launch(cfg_dict, session, world_size)
    if ctx is None:
        return None
    if ctx.role.kind == "reward":
        from megatron_async_rlhf.rewards.placement import serve_rewards

        return serve_rewards(ctx, cfg.reward, model_path)
    if ctx.role.kind != "learner":
        from megatron_async_rlhf.rewards.placement import TEXT_SCORES, text_scores_handler
        from megatron_async_rlhf.rollout.server import serve

        return serve(ctx, EngineSettings(model_path, cfg.cluster.rollout_tp, cfg.rollout),
                     reward=cfg.reward if cfg.reward.placement == "rollout" else None,
                     handlers={TEXT_SCORES: text_scores_handler(cfg.reward, model_path)})  # eval's reference answers
    return train(cfg, ctx, model_path)


def train(cfg: RunConfig, ctx, model_path: str) -> dict | None:
    """The learner pool's RL run, top to bottom. Every learner rank runs it; only the controller talks to the
    engines, scores, evaluates and logs."""
    from megatron_async_rlhf import run_state
    from megatron_async_rlhf.evaluation import Evaluations
    from megatron_async_rlhf.learner.critic import build_critic
    from megatron_async_rlhf.learner.step import rl_step
    from megatron_async_rlhf.learner.train import set_lr
    from megatron_async_rlhf.modes.sft import warm_start
    from megatron_async_rlhf.preemption import stop_agreed
    from megatron_async_rlhf.rewards.placement import controller_scorer, learner_rewards
    from megatron_async_rlhf.rollout.base import SamplingSettings
    from megatron_async_rlhf.rollout.client import RolloutClient
    from megatron_async_rlhf.schedules import ENGINES_IDLE, schedule_class

    ac = cfg.algorithm
    data = PromptData(cfg, model_path)
    resume_path, saved = run_state.open_run(cfg, ctx.is_controller)  # saved: the checkpoint's run state, or None
    metrics = open_metrics(cfg, ctx, ac.steps, saved and saved["metrics"])
    # the scorer lives where rewards are computed: here only with reward.placement=controller
    reward_fn = controller_scorer(cfg.reward, data.tok) if ctx.is_controller else None
    policy = Policy.from_hf(cfg, model_path)
    client = RolloutClient(ctx)  # waits for the engines
    with _stopping_engines_at_exit(client, metrics):
        if cfg.sft.steps and not saved:
            warm_start(cfg, data, policy, metrics)
        prompts = run_state.PromptStream(data.train_ids, data.train_rows, data.rng,
                                         ac.prompts_per_step * ac.off_policy_n, cfg.seed, cfg.rollout.seed)
        ref = _frozen_copy(cfg, policy)  # the reference policy
        resume = run_state.load(resume_path, policy, ref, prompts) if saved else None
        evals = Evaluations(cfg, data, reward_fn, metrics, ctx.is_controller, saved and saved["evaluation"])
        set_lr(policy.opt, ac.lr)
        if not saved:
            client.sync_weights(policy.model, policy.info, policy.mcfg, 0)
            evals.before = evals.run(client, 0)
        critic = build_critic(cfg, policy.mcfg, policy.model)  # the algorithm's value model, or None
        if saved and critic is not None:
            run_state.load_critic(resume_path, critic)
        sampling = SamplingSettings(temperature=ac.temperature, top_p=ac.top_p, max_new_tokens=ac.max_new_tokens,
                                    n=ac.samples_per_prompt, stop_token_ids=data.stops)
        schedule = schedule_class(cfg.schedule)(client, policy, prompts, sampling, ac.steps, ac.max_staleness,
                                                ac.off_policy_n, ac.sync_every_step, resume)  # rounds | fully_async
        saved_at = [saved["step"] if saved else 0]  # the newest checkpoint's step

        def checkpoint() -> str:  # collective over the learner pool, between two rounds
            mine = {"metrics": metrics.state(), "evaluation": evals.state()} if ctx.is_controller else None
            saved_at[0] = schedule.version
            return run_state.save(cfg, schedule.version, schedule, prompts, policy, ref, critic, mine)

        t_rl = t_last = time.perf_counter()
        with _checkpoint_if_engines_fail(schedule, saved_at, checkpoint):
            for mb in schedule.run():
                if mb is ENGINES_IDLE:  # the engines hold the learner's weights, nothing in flight
                    if evals.due(schedule.version):
                        evals.run(client, schedule.version)
                    continue
                t0 = time.perf_counter()
                rewards, timing = learner_rewards(ctx, reward_fn, mb.samples, mb.meta, client.last_collect,
                                                  cfg.reward, mb.index + 1)  # a non-finite reward stops the run here
                m = {**timing, **rl_step(mb, rewards, ac, policy.ddp, policy.opt, ref, policy.mcfg.vocab_size,
                                         cfg.learner.max_tokens_per_micro_batch, critic=critic),
                     **mb.stats, "lr": _lr(policy.opt), "train_s": time.perf_counter() - t0}  # lr: the step's
                m["learner_wait_frac"] = _wait_fraction(m["train_s"], time.perf_counter() - t_last)
                t_last = time.perf_counter()
                step = mb.index + 1
                if metrics:
                    metrics.log(step, "rl", **{k: v for k, v in m.items() if isinstance(v, (int, float))})
                    _log_events(client, metrics, step)  # engine restarts
                if cfg.logging.save_every and step % cfg.logging.save_every == 0:
                    export_policy(cfg, ctx, policy, model_path, f"step_{step}")
                if not mb.ends_round:  # checkpoints and stops fall between rounds
                    continue
                stop = stop_agreed(ctx.store)  # a SIGTERM/SIGINT anywhere: every learner rank stops here
                if stop or (cfg.checkpoint.every and step % cfg.checkpoint.every == 0):
                    path = checkpoint()
                if stop:
                    log.warning("stopped after RL step %d; continue with resume=auto", step)
                    return {"stopped_after_step": step, "checkpoint": path} if ctx.is_controller else None
        rl_seconds = time.perf_counter() - t_rl
        client.sync_weights(policy.model, policy.info, policy.mcfg, schedule.version)
        after = evals.run(client, ac.steps)
        export_policy(cfg, ctx, policy, model_path, "final")
        if metrics:
            _log_events(client, metrics, ac.steps)
        return _summary(metrics, evals.before, after, schedule.stats, rl_seconds) if ctx.is_controller else None


@contextlib.contextmanager
def _stopping_engines_at_exit(client, metrics):
    """The rollout pool is stopped however the run ends (a failed learner must not leave engines waiting), then the
    metrics are closed."""
    try:
        yield
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
        if metrics:
            metrics.close()


@contextlib.contextmanager
def _checkpoint_if_engines_fail(schedule, saved_at: list, checkpoint):
    """An engine that failed for good (past ``rollout.max_restarts``, or its rank died) ends the run with exit code
    1, after a checkpoint of what was trained (the round it lost is generated again on resume)."""
    from megatron_async_rlhf.cluster import RolloutError

    try:
        yield
    except RolloutError as e:
        if schedule.version > saved_at[0]:
            log.error("%s; writing a checkpoint of step %d first (continue with resume=auto)", e, schedule.version)
            checkpoint()
        raise


def _wait_fraction(train_s: float, since_last_s: float) -> float:
    """The share of the learner's time since its previous step not spent in this step (rewards on the controller and
    the update): waiting for samples, pushing weights, evaluating, checkpointing."""
    return max(0.0, since_last_s - train_s) / since_last_s if since_last_s > 0 else 0.0


def _log_events(client, metrics, step: int) -> None:
    for event in client.take_events():
        metrics.log(step, "event", **event)


def _lr(opt) -> float:
    """The optimizer's base learning rate (its first param group's, without that group's ``lr_mult``)."""
    g = opt.param_groups[0]
    return g["lr"] / g.get("lr_mult", 1.0)


def _frozen_copy(cfg: RunConfig, policy: Policy):
    """A frozen copy of the starting policy (the reference model of the KL term and DPO)."""
    from megatron_async_rlhf.learner.model import build_model

    ref, _ = build_model(policy.mcfg, dtype=cfg.learner.params_dtype, init=False)
    ref.requires_grad_(False)
    ref.load_state_dict(policy.model.state_dict())
    return ref


def _summary(metrics, acc0: dict, acc1: dict, stats, rl_seconds: float) -> dict:
    """The controller's result of a finished run: accuracy before/after with intervals, schedule counts, timings."""
    plot = metrics.plot()
    rl = [r for r in metrics.rows if r["phase"] == "rl"]
    summary = {"accuracy_before": acc0["accuracy"], "accuracy_after": acc1["accuracy"],
               "accuracy_before_ci95": [round(acc0["accuracy_lo95"], 4), round(acc0["accuracy_hi95"], 4)],
               "accuracy_after_ci95": [round(acc1["accuracy_lo95"], 4), round(acc1["accuracy_hi95"], 4)],
               "eval_n": acc1["n"], "eval_file": acc1["file"],
               "accuracy_delta_paired_ci95": [round(acc1["delta_lo95"], 4), round(acc1["delta_hi95"], 4)],
               "steps": stats.trained, "generated": stats.generated, "max_staleness_seen": max(stats.staleness),
               "syncs": stats.syncs, "plot": plot, "metrics": metrics.path,
               "gen_s_mean": sum(r["gen_s"] for r in rl) / len(rl),
               "train_s_mean": sum(r["train_s"] for r in rl) / len(rl),
               "rl_seconds": rl_seconds,
               "reward_last5": sum(r.get("reward_mean", 0) for r in rl[-5:]) / len(rl[-5:])}
    if "win_rate" in acc1:  # eval.judge: judged win-rate against the starting policy, proxy vs judge
        summary.update(win_rate=acc1["win_rate"],
                       win_rate_ci95=[round(acc1["win_rate_lo95"], 4), round(acc1["win_rate_hi95"], 4)],
                       judge_mean_before=acc0.get("judge_mean"), judge_mean_after=acc1["judge_mean"],
                       reward_mean_before=acc0.get("reward_mean"), reward_mean_after=acc1["reward_mean"])
    return summary
