"""Entry point: asynchronous RLHF (``python -m megatron_async_rlhf [hydra overrides]``).

    rollout pool: serve()                     learner pool: warm start (sft) -> sync v0 -> Schedule.run(rl_step)

The schedule (schedule.py) decides when batches are requested, collected and trained and when weights move; one step
is learner/step.py; the losses are algorithms/. Started under torchrun it uses torchrun's ranks; otherwise it starts
``cluster.world`` local processes itself.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time

import torch

from megatron_async_rlhf.config import RunConfig, run_config_from_dict
from megatron_async_rlhf.errors import ConfigError

log = logging.getLogger("megatron_async_rlhf")
CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")


def load_config(overrides: list[str], cuda: bool | None = None) -> RunConfig:
    """Compose ``conf/config.yaml`` with the chosen recipe (hydra), then apply ``section.field=value`` overrides.
    Any field of the typed config can be overridden, present in the recipe or not; unknown ones are errors."""
    import yaml
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf

    recipe = [o for o in overrides if o.startswith("recipe=")]
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
            raw = OmegaConf.to_container(compose("config", overrides=recipe[-1:]), resolve=True)
    except HydraException as e:
        recipes = sorted(f[:-5] for f in os.listdir(os.path.join(CONF_DIR, "recipe")) if f.endswith(".yaml"))
        raise ConfigError(f"{e}\nKnown recipes: {recipes}") from e
    for o in overrides:
        if o.startswith("recipe="):
            continue
        key, sep, value = o.lstrip("+").partition("=")
        if not sep or not key:
            raise ConfigError(f"override {o!r}: use section.field=value, e.g. algorithm.max_staleness=0")
        node, *path = key.split(".")
        target = raw
        for part in [node, *path][:-1]:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ConfigError(f"override {o!r}: {part} is not a section")
        target[key.split(".")[-1]] = yaml.safe_load(value) if value != "" else ""
    return run_config_from_dict(raw).validate(cuda=torch.cuda.is_available() if cuda is None else cuda)


def prepare_model(cfg: RunConfig) -> str:
    """The HF directory the run starts from: a tiny model made once under the run directory, a built-in model
    converted once into the model cache, or ``model.path`` itself (see ``models/``)."""
    from megatron_async_rlhf.models import resolve_model

    return resolve_model(cfg.model.path, cfg.logging.out_dir, seed=cfg.seed)


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
    """(config, this rank's cluster context, or None if the rank sits this session out), CPUs pinned on CPU."""
    from megatron_async_rlhf.cluster import setup

    cfg = run_config_from_dict(cfg_dict)
    ctx = setup(cfg.cluster, session, world_size)
    if ctx is not None and cfg.pin_cpus and not torch.cuda.is_available():
        _pin_cpus(ctx)
    return cfg, ctx


def job(cfg_dict: dict, model_path: str, session: str = "run", world_size: int | None = None) -> dict | None:
    from megatron_async_rlhf.rollout.server import serve
    from megatron_async_rlhf.rollout.engine import EngineSettings

    from megatron_async_rlhf.preemption import install_handlers

    install_handlers()  # a first SIGTERM/SIGINT stops the run after its current step, checkpointed
    cfg, ctx = join_launch(cfg_dict, session, world_size)
    if ctx is None:
        return None
    if ctx.role.kind == "reward":  # reward.placement=dedicated
        from megatron_async_rlhf.rewards.placement import serve_rewards

        return serve_rewards(ctx, cfg.reward, model_path)
    if ctx.role.kind != "learner":
        return serve(ctx, EngineSettings(model_path, cfg.cluster.rollout_tp, cfg.rollout),
                     reward=cfg.reward if cfg.reward.placement == "rollout" else None)
    from megatron_async_rlhf.trainer import Trainer

    return Trainer(cfg, ctx, model_path).run()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = list(sys.argv[1:] if argv is None else argv)
    if {"-h", "--help"} & set(args):
        print(__doc__ + "\nOverrides: recipe=NAME (conf/recipe/*.yaml) and section.field=value for any field of "
              "megatron_async_rlhf/config.py, e.g. algorithm.max_staleness=0 cluster.learner_tp=2")
        return 0
    try:
        cfg = load_config(args)
        model_path = prepare_model(cfg)
        from megatron_async_rlhf.checks import preflight

        preflight(cfg, model_path, torch.cuda.is_available())  # every contract checked before any process starts
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if cfg.mode == "rm":  # reward-model training: learner ranks only (modes/rm.py)
        from megatron_async_rlhf.modes import rm

        return rm.main(cfg, model_path)
    from megatron_async_rlhf.launch import run_distributed

    t0 = time.time()
    results = run_distributed(cfg.cluster.world, job, dataclasses.asdict(cfg), model_path, default_group=False,
                              timeout_s=24 * 3600, stop_grace_s=cfg.checkpoint.grace_s)
    summary = results[0]
    if summary is None:
        return 0
    log.info("finished in %.1f s: %s", time.time() - t0, summary)
    return 0
