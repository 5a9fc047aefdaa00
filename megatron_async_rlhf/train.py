"""Entry point (``python -m megatron_async_rlhf [hydra overrides]``): compose the config, check every contract,
run the mode (``modes/``: ``rl``, the asynchronous RLHF main job, by default; ``sft``; ``rm``).

The RL loop is ``modes/rl.py``; the schedule (``schedules/rounds.py``) decides when batches are requested, collected
and trained and when weights move; one step is ``learner/step.py``; the losses are ``algorithms/``. Started under
torchrun a mode uses torchrun's ranks; otherwise it starts its local processes itself.
"""

from __future__ import annotations

import logging
import os
import sys

import torch

from megatron_async_rlhf.config import RunConfig, run_config_from_dict
from megatron_async_rlhf.errors import ConfigError

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
    from megatron_async_rlhf.modes import check_mode

    cfg = run_config_from_dict(raw)
    check_mode(cfg.mode)  # a name the modes' registry knows
    return cfg.validate(cuda=torch.cuda.is_available() if cuda is None else cuda)


def prepare_model(cfg: RunConfig) -> str:
    """The HF directory the run starts from: a tiny model made once under the run directory, a built-in model
    converted once into the model cache, or ``model.path`` itself (see ``models/``)."""
    from megatron_async_rlhf.models import resolve_model

    return resolve_model(cfg.model.path, cfg.logging.out_dir, seed=cfg.seed)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(args)
        from megatron_async_rlhf.run_state import check_fresh_start

        check_fresh_start(cfg)  # an earlier run's checkpoints are never deleted by a forgotten resume=auto
        model_path = prepare_model(cfg)
        from megatron_async_rlhf.checks import preflight

        preflight(cfg, model_path, torch.cuda.is_available())  # every contract checked before any process starts
        from megatron_async_rlhf.modes import get_mode

        # the launch checks torchrun's WORLD_SIZE against cluster.* before it starts anything (a ConfigError too)
        return get_mode(cfg.mode).main(cfg, model_path)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # a rollout engine that failed for good: one line that names it, after the traceback
        gave_up = _engine_failure(e)
        if gave_up is None:
            raise
        logging.getLogger("megatron_async_rlhf").error(
            "run stopped: %s. What was trained is checkpointed: continue with resume=auto", gave_up)
        return 1


def _engine_failure(e: BaseException) -> str | None:
    """The message of the rollout failure behind ``e`` (an ``EngineGaveUp`` or ``RolloutError`` raised here under
    torchrun, or a rank's, in a WorkerError), or None."""
    if type(e).__name__ in ("EngineGaveUp", "RolloutError"):
        return str(e)
    lines = [ln.split(m, 1)[1] for ln in str(e).splitlines() for m in (".EngineGaveUp: ", ".RolloutError: ") if m in ln]
    return lines[-1] if lines else None
