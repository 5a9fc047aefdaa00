"""What the modes share: launching a world (every mode), the learner's prompt data, policy, metrics and export
(``rl`` and ``sft``)."""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import time
from dataclasses import dataclass

import torch

from megatron_async_rlhf.config import RunConfig, run_config_from_dict

log = logging.getLogger("megatron_async_rlhf")


# ----- launching ------------------------------------------------------------------------------------------------
def _pin_cpus(ctx) -> None:
    """CPU: learner ranks and rollout ranks on disjoint cores, so generation and training really run side by side."""
    cores = sorted(os.sched_getaffinity(0))
    n_learn = ctx.cfg.learner_world
    if len(cores) < ctx.cfg.world:
        mine = [cores[0]] if ctx.role.kind == "learner" else [cores[-1]]
    else:
        mine = [cores[ctx.role.rank]]
    os.sched_setaffinity(0, mine)
    torch.set_num_threads(1)
    log.info("rank %d (%s) pinned to cores %s (%d learner ranks)", ctx.role.rank, ctx.role.kind, mine, n_learn)


def join_launch(cfg_dict: dict, session: str, world_size: int | None):
    """(config, this rank's cluster context, or None if the rank sits this session out), CPUs pinned on CPU. The
    first call of every mode's per-rank job."""
    from megatron_async_rlhf.cluster import setup

    cfg = run_config_from_dict(cfg_dict)
    ctx = setup(cfg.cluster, session, world_size)
    if ctx is not None and cfg.pin_cpus and not torch.cuda.is_available():
        _pin_cpus(ctx)
    return cfg, ctx


def launch(cfg: RunConfig, job, model_path: str, session: str, learners_only: bool = False,
           stop_grace_s: float | None = None) -> dict | None:
    """Run ``job(cfg_dict, model_path, session)`` on every rank of the run's world (torchrun's, or local processes
    started here); the controller's result, None on other ranks under torchrun. ``learners_only``: a world of learner
    ranks alone (``cluster.rollout_*`` and ``reward_ranks`` ignored). ``stop_grace_s``: see
    ``launch.run_distributed``."""
    from megatron_async_rlhf.launch import run_distributed

    t0 = time.time()
    if learners_only:
        cfg = dataclasses.replace(cfg, cluster=dataclasses.replace(cfg.cluster, rollout_engines=0, reward_ranks=0))
    summary = run_distributed(cfg.cluster.world, job, dataclasses.asdict(cfg), model_path, session,
                              default_group=False, timeout_s=cfg.cluster.max_run_s, stop_grace_s=stop_grace_s)[0]
    if summary is not None:
        log.info("finished in %.1f s: %s", time.time() - t0, summary)
    return summary


# ----- the learner's side of a run --------------------------------------------------------------------------------
class PromptData:
    """The run's prompts: tokenizer and stop ids, training and held-out rows with their prompt token ids, and the
    python ``Random`` that draws training prompts (the warm start's, then RL's: ``run_state.PromptStream``)."""

    def __init__(self, cfg: RunConfig, model_path: str):
        from transformers import AutoTokenizer

        from megatron_async_rlhf.data.tasks import load_rows, tokenize_prompts
        from megatron_async_rlhf.models import stop_token_ids

        d = cfg.data
        self.tok = AutoTokenizer.from_pretrained(model_path)
        self.stops = stop_token_ids(model_path, self.tok)
        self.train_rows, self.eval_rows = load_rows(d, cfg.logging.out_dir)
        self.train_ids, self.eval_ids = (tokenize_prompts(self.tok, rows, d.max_prompt_len, d.use_chat_template,
                                                          d.prompt_template)
                                         for rows in (self.train_rows, self.eval_rows))
        self.rng = random.Random(cfg.seed)


@dataclass
class Policy:
    """The policy being trained on the learner pool: megatron model, its DDP wrapper and optimizer, its layout and
    HF config."""

    model: object
    ddp: object
    opt: object
    info: object  # learner.model.ModelInfo: TP/PP layout
    mcfg: object  # learner.build's model config (vocab_size, the HF config as ``raw``)

    @classmethod
    def from_hf(cls, cfg: RunConfig, model_path: str) -> "Policy":
        """Built from the HF checkpoint, its optimizer at ``sft.lr`` (RL sets its own rate after the warm start)."""
        from megatron_async_rlhf.learner.build import model_from_hf
        from megatron_async_rlhf.learner.train import OptimConfig, wrap_for_training

        mcfg, model, info = model_from_hf(model_path, cfg.cluster.learner_tp, cfg.cluster.learner_pp,
                                          dtype=cfg.learner.params_dtype, recompute=cfg.learner.recompute)
        ddp, opt = wrap_for_training(model, OptimConfig(lr=cfg.sft.lr, clip_grad=cfg.algorithm.clip_grad,
                                                        distributed_optimizer=cfg.learner.distributed_optimizer))
        return cls(model, ddp, opt, info, mcfg)


def open_metrics(cfg: RunConfig, ctx, total_steps: int, resume: dict | None = None):
    """The run's metrics (``metrics.py``) on the controller, None on other ranks. ``resume``: a checkpoint's."""
    if not ctx.is_controller:
        return None
    from megatron_async_rlhf.metrics import Metrics

    return Metrics(cfg.logging.out_dir, dataclasses.asdict(cfg), cfg.logging.wandb_mode, cfg.logging.wandb_project,
                   total_steps, resume=resume)


def export_policy(cfg: RunConfig, ctx, policy: Policy, model_path: str, name: str) -> None:
    """HF safetensors + config + tokenizer of the current policy in ``<logging.out_dir>/policy/<name>``, written
    atomically; refused if any weight is not finite (the last export on disk stays the last good state)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_async_rlhf.learner.step import NonFiniteLoss
    from megatron_async_rlhf.weights.gather import full_hf_state_dict
    from megatron_async_rlhf.weights.hf_io import save_hf

    device = "cuda" if torch.cuda.is_available() else "cpu"  # the learner pool's group is NCCL on GPUs
    bad = torch.tensor([0.0 if all(torch.isfinite(p).all() for p in policy.model.parameters()) else 1.0],
                       device=device)
    dist.all_reduce(bad)
    if bad.item():
        raise NonFiniteLoss(f"policy weights are not finite; not exporting {name!r}: the last export on disk is "
                            "the last good state")
    sd = full_hf_state_dict(policy.model, policy.info, policy.mcfg) if ps.get_data_parallel_rank() == 0 else None
    if sd is not None and ctx.is_controller:
        out = os.path.join(cfg.logging.out_dir, "policy", name)
        save_hf(out, sd, policy.mcfg.raw, copy_from=model_path)
        log.info("exported policy to %s", out)
    dist.barrier()
