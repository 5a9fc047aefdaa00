"""Run modes: ``mode=<name>`` picks one, and ``train.main`` runs its ``main(cfg, model_path) -> exit code`` after the
config and preflight checks. Each mode is a module of its own, launching its world with ``modes/common.py``:

- ``rl``: asynchronous RLHF, the main job (learner pool, rollout engines, reward ranks), ``modes/rl.py``;
- ``sft``: supervised fine-tuning only, learner ranks only, ``modes/sft.py``;
- ``rm``: a reward model on preference pairs, learner ranks only, ``modes/rm.py``.

A new mode is one module plus its line in :data:`MODES`.
"""

from __future__ import annotations

import importlib

from megatron_async_rlhf.errors import ConfigError

MODES = {"rl": "megatron_async_rlhf.modes.rl", "sft": "megatron_async_rlhf.modes.sft",
         "rm": "megatron_async_rlhf.modes.rm"}
"""mode name -> the module that runs it (imported only when that mode runs)."""


def check_mode(name: str) -> None:
    if name not in MODES:
        raise ConfigError(f"mode={name!r}: use one of {sorted(MODES)}")


def get_mode(name: str):
    """The module of mode ``name``."""
    check_mode(name)
    return importlib.import_module(MODES[name])
