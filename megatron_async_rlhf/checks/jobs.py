"""Whole-learner-pool jobs of the checks, tools and tests (parity, conversion, reward-model values): every rank of the pool calls the same function.

Each job (re)initialises Megatron's parallel state for its layout, so one group of processes can run several.
"""

from __future__ import annotations

import torch

from megatron_async_rlhf.learner import checkpoint as ckpt
from megatron_async_rlhf.learner.forward import forward_collect
from megatron_async_rlhf.learner.logprobs import gather_vocab_parallel, vocab_parallel_logprobs
from megatron_async_rlhf.learner.build import model_from_hf, model_from_mcore
from megatron_async_rlhf.learner.parallel import ranks
from megatron_async_rlhf.weights.gather import full_hf_state_dict
from megatron_async_rlhf.weights.hf_io import save_hf


def _reporter(info) -> bool:
    """The one rank that returns results: last pipeline stage, TP rank 0, DP rank 0."""
    return info.last and info.tp_rank == 0 and ranks()["dp_rank"] == 0


def logits_and_logprobs(cfg, model, info, batches: list[torch.Tensor], temperature: float = 1.0):
    """Per micro-batch (full-vocab logits [b, s, V], log-probs of the next tokens [b, s-1]) on the reporting rank."""
    model.eval()

    def on_logits(logits, i):
        tokens = batches[i]
        full = gather_vocab_parallel(logits, cfg.vocab_size)
        lp = vocab_parallel_logprobs(logits[:, :-1], tokens[:, 1:], cfg.vocab_size, temperature)
        return full, lp

    out = forward_collect(model, batches, on_logits)
    return out if _reporter(info) else None


def parity_from_hf(hf_dir: str, tp: int, pp: int, batches: list[torch.Tensor], temperature: float = 1.0):
    cfg, model, info = model_from_hf(hf_dir, tp, pp, dtype=torch.float32)
    return logits_and_logprobs(cfg, model, info, batches, temperature)


def parity_from_mcore(ckpt_dir: str, hf_config: str, tp: int, pp: int, batches: list[torch.Tensor]):
    cfg, model, info = model_from_mcore(ckpt_dir, hf_config, tp, pp)
    return logits_and_logprobs(cfg, model, info, batches)


def hf_to_mcore(hf_dir: str, out_dir: str, tp: int, pp: int) -> None:
    cfg, model, info = model_from_hf(hf_dir, tp, pp)
    ckpt.save_model(model, info, cfg.raw, out_dir)


def mcore_to_hf(ckpt_dir: str, hf_config_dir: str, out_dir: str, tp: int = 1, pp: int = 1) -> None:
    cfg, model, info = model_from_mcore(ckpt_dir, hf_config_dir, tp, pp)
    sd = full_hf_state_dict(model, info, cfg)
    if sd is not None and ranks()["dp_rank"] == 0:
        save_hf(out_dir, sd, cfg.raw, copy_from=hf_config_dir)
    torch.distributed.barrier()


def values_from_hf(hf_dir: str, tp: int, pp: int, seqs: list[list[int]], export_dir: str | None = None,
                   pad_token_id: int = 0, micro_batch: int = 4):
    """Scalar-head model from an HF directory (a sequence classifier, or a language model's trunk with a fresh
    head): ``[N]`` values of ``seqs`` at their last token on the reporting rank; with ``export_dir``, the model is
    also written there as an HF ``LlamaForSequenceClassification`` (tokenizer files copied from ``hf_dir``)."""
    from megatron_async_rlhf.learner.build import value_model_from_hf
    from megatron_async_rlhf.learner.value_head import classifier_config, sequence_values

    cfg, model, info = value_model_from_hf(hf_dir, tp, pp, dtype=torch.float32)
    values = sequence_values(model, seqs, micro_batch)
    if export_dir is not None:
        sd = full_hf_state_dict(model, info, cfg)
        if sd is not None and ranks()["dp_rank"] == 0:
            save_hf(export_dir, sd, classifier_config(cfg.raw, pad_token_id), copy_from=hf_dir)
        torch.distributed.barrier()
    return values if _reporter(info) else None
