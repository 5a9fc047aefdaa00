"""Building the learner's model from a checkpoint: an HF directory or a Megatron dist checkpoint, at a TP/PP layout.

Each call (re)initialises Megatron's parallel state for its layout; every rank of the learner pool calls it together.
"""

from __future__ import annotations

import torch

from megatron_async_rlhf.learner import checkpoint as ckpt
from megatron_async_rlhf.learner.model import build_model
from megatron_async_rlhf.learner.parallel import init_learner_parallel
from megatron_async_rlhf.weights.hf_io import HFCheckpoint
from megatron_async_rlhf.weights.llama_config import read_config
from megatron_async_rlhf.weights.load import load_hf_into_stage
from megatron_async_rlhf.weights.mapping import head_kind


def model_from_hf(hf_dir: str, tp: int, pp: int, dtype: torch.dtype | None = None, recompute: str = "none"):
    """The model an HF directory holds: a language model, or a scalar-head model for a sequence classifier."""
    cfg = read_config(hf_dir)
    init_learner_parallel(tp, pp)
    model, info = build_model(cfg, dtype=dtype, init=False, recompute=recompute, head=head_kind(cfg.raw))
    load_hf_into_stage(model, info, cfg, HFCheckpoint(hf_dir))
    return cfg, model, info


def model_from_mcore(ckpt_dir: str, hf_config: str | dict, tp: int, pp: int):
    cfg = read_config(hf_config)
    meta = ckpt.read_meta(ckpt_dir)
    ckpt.checkpoint_vocab_fits(meta, tp)
    init_learner_parallel(tp, pp)
    model, info = build_model(cfg, init=False, padded_vocab=meta["padded_vocab"], head=head_kind(cfg.raw))
    ckpt.load_model(model, ckpt_dir)
    return cfg, model, info


def value_model_from_hf(hf_dir: str, tp: int, pp: int, dtype: torch.dtype | None = None, recompute: str = "none"):
    """(LlamaConfig, scalar-head model stage, StageInfo) from an HF directory: a sequence classifier loads whole
    (its ``score`` is the head); a language model gives its trunk and the head starts fresh (normal, std
    ``initializer_range``, the same on every rank). All learner ranks call it together."""
    cfg = read_config(hf_dir)
    init_learner_parallel(tp, pp)
    model, info = build_model(cfg, dtype=dtype, init=False, recompute=recompute, head="score")
    load_hf_into_stage(model, info, cfg, HFCheckpoint(hf_dir), trunk_only=head_kind(cfg.raw) == "lm")
    return cfg, model, info
