"""Build a megatron-core GPTModel stage from an HF LLaMA config.

LLaMA in Megatron terms: RMSNorm, SwiGLU (``gated_linear_unit`` + silu), grouped-query attention
(``num_query_groups``), RoPE with HF's inverse frequencies (incl. Llama 3.x scaling), no biases, tied or untied
embeddings, vocab padded so every TP rank holds an equal slice. Local layer spec (``learner.layers``) on CPU;
Transformer Engine spec when TE imports and CUDA is present.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from megatron_async_rlhf.weights.llama_config import LlamaConfig, rope_inv_freq, validate_parallel
from megatron_async_rlhf.weights.mapping import padded_vocab_size

log = logging.getLogger(__name__)

try:  # optional: Transformer Engine (GPU images)
    import transformer_engine  # noqa: F401  (only whether it imports matters)

    HAVE_TE = True
except Exception:  # ImportError, or a TE build that fails to load without CUDA
    HAVE_TE = False


def use_te() -> bool:
    return HAVE_TE and torch.cuda.is_available()


@dataclass(frozen=True)
class StageInfo:
    """What a built model stage is: enough for the weight mapping to address its tensors."""

    tp: int
    tp_rank: int
    pp: int
    pp_rank: int
    padded_vocab: int
    fused_norms: bool  # TE spec: norms live inside linear_qkv / linear_fc1
    head: str = "lm"  # "lm": vocab output layer; "score": a scalar head (reward model, critic; learner/value_head.py)

    @property
    def first(self) -> bool:
        return self.pp_rank == 0

    @property
    def last(self) -> bool:
        return self.pp_rank == self.pp - 1


# ``learner.recompute`` -> megatron-core 0.16.1's TransformerConfig fields. selective: the core attention
# (softmax(QK^T)V: large activations, few FLOPs) of every layer; full: every layer keeps only its input and is re-run
# in backward (uniform method, one layer per recompute unit).
RECOMPUTE = {
    "none": {},
    "selective": {"recompute_granularity": "selective", "recompute_modules": ["core_attn"]},
    "full": {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1},
}


def transformer_config(cfg: LlamaConfig, tp: int, pp: int, dtype: torch.dtype | None = None, init: bool = True,
                       recompute: str = "none"):
    from megatron.core.transformer.transformer_config import TransformerConfig

    d = cfg.dims
    dtype = dtype or cfg.dtype
    return TransformerConfig(
        num_layers=d.num_layers,
        hidden_size=d.hidden_size,
        num_attention_heads=d.num_heads,
        num_query_groups=d.num_kv_heads,
        kv_channels=d.head_dim,
        ffn_hidden_size=d.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        # fused kernels are CUDA-only; on GPU TE provides its own fusions through the TE spec
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        cross_entropy_loss_fusion=False,
        attention_softmax_in_fp32=True,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        sequence_parallel=False,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu_initialization=not torch.cuda.is_available(),
        perform_initialization=init,
        init_method_std=cfg.initializer_range,
        **RECOMPUTE[recompute],
    )


def build_model(
    cfg: LlamaConfig,
    dtype: torch.dtype | None = None,
    init: bool = True,
    vocab_multiple: int = 128,
    padded_vocab: int | None = None,
    recompute: str = "none",
    head: str = "lm",
):
    """This rank's GPTModel stage for the current Megatron parallel state, and its :class:`StageInfo`.

    ``dtype``: the weights' and compute dtype (default: the HF config's). bf16/fp16 is Megatron mixed precision:
    the model holds half-precision weights, the optimizer fp32 main copies (``learner.train``), log-probs and losses
    are computed in fp32 from the logits (``learner.logprobs``). ``init=False`` skips random initialisation (weights
    are about to be loaded). ``padded_vocab`` forces the padded vocab size (a checkpoint's), instead of deriving it
    from ``vocab_multiple`` and TP. ``recompute``: a key of :data:`RECOMPUTE`.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    validate_parallel(cfg, tp, pp)
    info = StageInfo(
        tp=tp,
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp=pp,
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        padded_vocab=padded_vocab or padded_vocab_size(cfg.vocab_size, tp, vocab_multiple),
        fused_norms=use_te(),
        head=head,
    )
    if info.padded_vocab % tp or info.padded_vocab < cfg.vocab_size:
        raise ValueError(f"padded vocab {info.padded_vocab} must be >= vocab_size={cfg.vocab_size} and divisible by "
                         f"tensor_parallel={tp}")
    tcfg = transformer_config(cfg, tp, pp, dtype=dtype, init=init, recompute=recompute)
    if info.fused_norms:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        spec = get_gpt_layer_with_transformer_engine_spec()
    else:
        from megatron_async_rlhf.learner.layers import local_layer_spec

        spec = local_layer_spec()
    model = GPTModel(
        config=tcfg,
        transformer_layer_spec=spec,
        vocab_size=info.padded_vocab,
        max_sequence_length=cfg.max_position_embeddings,
        pre_process=info.first,
        post_process=info.last,
        parallel_output=True,  # logits stay vocab-parallel; learner.logprobs reduces over TP
        share_embeddings_and_output_weights=cfg.dims.tie_word_embeddings and head == "lm",
        position_embedding_type="rope",
        rotary_base=int(cfg.rope_theta),
    )
    if head == "score" and info.last:
        from megatron_async_rlhf.learner.value_head import ScalarHead

        # replaces the vocab-sized output layer GPTModel just built (freed here): same slot, same call
        model.output_layer = ScalarHead(cfg.dims.hidden_size, cfg.initializer_range)
    if not init:
        mark_tensor_parallel(model)
    if tcfg.params_dtype != torch.float32:
        # megatron-core's torch norms (local spec) ignore params_dtype and make fp32 weights; Megatron-LM's
        # Float16Module casts the whole module. Do the same cast without the wrapper, which would rename every
        # parameter: the inputs are token ids (nothing to cast), learner.logprobs casts the logits to fp32.
        model.to(tcfg.params_dtype)
    # HF's inverse frequencies (Llama 3.x scaling has config-given low/high frequency factors that megatron-core's
    # built-in `rope_scaling` hard-codes); set before the first forward, whose embedding is cached per length.
    model.rotary_pos_emb.inv_freq = rope_inv_freq(cfg).to(model.rotary_pos_emb.inv_freq.device)
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    return model, info


def mark_tensor_parallel(model) -> None:
    """Tag every TP-sharded weight as megatron-core's own initialisation does (``tensor_model_parallel``,
    ``partition_dim``). megatron-core tags a weight only while randomly initialising it, so a model built with
    ``init=False`` (weights about to be loaded) looks replicated to the optimizer's gradient norm, which then counts the
    sharded weights on TP rank 0 only: at TP>1 the norm came out too small (13.4 at TP1, 10.2 at TP2 for the same
    gradients of a tiny model) and clipping too weak. The stride (1 here) is read by resharding code this package does
    not use."""
    from megatron.core.tensor_parallel.layers import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                                      set_tensor_model_parallel_attributes)

    columns, rows = [ColumnParallelLinear, VocabParallelEmbedding], [RowParallelLinear]
    if use_te():
        from megatron.core.extensions import transformer_engine as te

        columns += [te.TEColumnParallelLinear, te.TELayerNormColumnParallelLinear]
        rows += [te.TERowParallelLinear]
    for m in model.modules():
        dim = 0 if isinstance(m, tuple(columns)) else 1 if isinstance(m, tuple(rows)) else None
        w = getattr(m, "weight", None)
        if dim is not None and isinstance(w, torch.nn.Parameter) and not hasattr(w, "tensor_model_parallel"):
            set_tensor_model_parallel_attributes(w, True, dim, 1)
