"""Preflight: every contract of a run checked in the launching process, before any worker starts or any weight is
read. Each check raises ``ConfigError`` naming the field and the fix."""

from __future__ import annotations

from megatron_async_rlhf.checks.data import check_data
from megatron_async_rlhf.checks.model import check_model


def preflight(cfg, model_path: str, cuda: bool = False) -> None:
    mc = check_model(cfg, model_path, cuda)
    if cfg.mode == "rm":  # preference pairs instead of prompts
        from megatron_async_rlhf.checks.preferences import check_preferences

        check_preferences(cfg, model_path, mc.max_position_embeddings, mc.vocab_size)
    else:
        check_data(cfg, model_path, mc.vocab_size)
    if cfg.resume:  # the checkpoint exists, is intact, and the config changes nothing that must not change
        from megatron_async_rlhf.run_state import find_resume

        find_resume(cfg)


__all__ = ["preflight", "check_data", "check_model"]
