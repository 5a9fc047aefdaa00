"""Reading and validating an HF LLaMA ``config.json``; RoPE frequencies. Pure: imports only torch.

Every check here runs before any process is started or any weight is read, and names the field and the fix.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

import torch

from megatron_async_rlhf.errors import ConfigError
from megatron_async_rlhf.weights.mapping import LlamaDims

# config.json model_type values whose tensors and maths are exactly LLaMA's (RMSNorm, SwiGLU, RoPE, GQA, no biases)
LLAMA_LIKE = ("llama",)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class LlamaConfig:
    dims: LlamaDims
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None  # normalised: {"rope_type": "llama3"|"linear", ...} or None for plain RoPE
    max_position_embeddings: int
    dtype: torch.dtype
    initializer_range: float
    raw: dict = field(repr=False, compare=False, default_factory=dict)

    @property
    def vocab_size(self) -> int:
        return self.dims.vocab_size


def read_config(path_or_dict: str | os.PathLike | dict) -> LlamaConfig:
    """Parse an HF LLaMA config (a directory, a config.json path or a dict) and reject what is not LLaMA-like."""
    if isinstance(path_or_dict, dict):
        raw, where = path_or_dict, "config"
    else:
        p = os.fspath(path_or_dict)
        p = os.path.join(p, "config.json") if os.path.isdir(p) else p
        if not os.path.exists(p):
            raise ConfigError(f"{p} not found. Fix: pass an HF model directory that contains config.json.")
        with open(p) as f:
            raw, where = json.load(f), p
    model_type = raw.get("model_type")
    archs = raw.get("architectures") or []
    if model_type not in LLAMA_LIKE:
        raise ConfigError(
            f"{where}: model_type={model_type!r} (architectures={archs}) is not LLaMA-like. "
            f"Supported model_type values: {list(LLAMA_LIKE)}. Fix: convert a LlamaForCausalLM checkpoint."
        )
    problems = []
    if raw.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={raw['hidden_act']!r} (LLaMA uses 'silu')")
    for k in ("attention_bias", "mlp_bias"):
        if raw.get(k, False):
            problems.append(f"{k}=true (LLaMA has no biases)")
    if problems:
        raise ConfigError(f"{where}: not a LLaMA-like model: " + "; ".join(problems))

    heads = int(raw["num_attention_heads"])
    kv = int(raw.get("num_key_value_heads") or heads)
    hidden = int(raw["hidden_size"])
    head_dim = int(raw.get("head_dim") or hidden // heads)
    if heads % kv:
        raise ConfigError(f"{where}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}.")
    dims = LlamaDims(
        num_layers=int(raw["num_hidden_layers"]),
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=head_dim,
        ffn_hidden_size=int(raw["intermediate_size"]),
        vocab_size=int(raw["vocab_size"]),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
    )
    theta, scaling = _rope_settings(raw, where)
    dtype_name = raw.get("dtype") or raw.get("torch_dtype") or "float32"
    if dtype_name not in _DTYPES:
        raise ConfigError(f"{where}: dtype={dtype_name!r} unsupported; use one of {sorted(_DTYPES)}.")
    return LlamaConfig(
        dims=dims,
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
        dtype=_DTYPES[dtype_name],
        initializer_range=float(raw.get("initializer_range", 0.02)),
        raw=raw,
    )


def _rope_settings(raw: dict, where: str) -> tuple[float, dict | None]:
    """(theta, scaling) from either the transformers<5 keys (``rope_theta`` + ``rope_scaling``) or the
    transformers>=5 ``rope_parameters`` dict."""
    params = raw.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params:
        theta = float(params["rope_theta"])
        scaling = dict(params)
    else:
        theta = float(raw.get("rope_theta", 10000.0))
        scaling = dict(raw["rope_scaling"]) if raw.get("rope_scaling") else {}
    rope_type = scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type == "default":
        return theta, None
    if rope_type == "linear":
        return theta, {"rope_type": "linear", "factor": float(scaling["factor"])}
    if rope_type == "llama3":
        return theta, {
            "rope_type": "llama3",
            "factor": float(scaling["factor"]),
            "low_freq_factor": float(scaling["low_freq_factor"]),
            "high_freq_factor": float(scaling["high_freq_factor"]),
            "original_max_position_embeddings": int(scaling["original_max_position_embeddings"]),
        }
    raise ConfigError(
        f"{where}: rope type {rope_type!r} is not supported; supported: default, linear, llama3."
    )


def rope_inv_freq(cfg: LlamaConfig) -> torch.Tensor:
    """RoPE inverse frequencies ``[head_dim/2]`` in fp32, with Llama 3.x / linear scaling applied."""
    d = cfg.dims.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    s = cfg.rope_scaling
    if s is None:
        return inv
    if s["rope_type"] == "linear":
        return inv / s["factor"]
    # llama3: long wavelengths divided by `factor`, short ones kept, a smooth blend between
    factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_ctx = s["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_ctx / lo, old_ctx / hi
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_freq_wavelen, inv / factor, inv)
    smooth = (old_ctx / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(medium, smoothed, scaled)


def validate_parallel(cfg: LlamaConfig, tp: int, pp: int) -> None:
    """The contracts a TP x PP layout must meet, checked before any process starts."""
    d = cfg.dims
    if tp < 1 or pp < 1:
        raise ConfigError(f"tensor_parallel={tp} and pipeline_parallel={pp} must both be >= 1.")
    if d.num_kv_heads % tp:
        raise ConfigError(
            f"num_query_groups (num_key_value_heads={d.num_kv_heads}) is not divisible by tensor_parallel={tp}. "
            f"Fix: use a tensor_parallel that divides {d.num_kv_heads}: "
            f"{[t for t in range(1, d.num_kv_heads + 1) if d.num_kv_heads % t == 0]}."
        )
    if d.ffn_hidden_size % tp:
        raise ConfigError(f"intermediate_size={d.ffn_hidden_size} is not divisible by tensor_parallel={tp}.")
    if d.num_layers % pp:
        raise ConfigError(
            f"num_hidden_layers={d.num_layers} is not divisible by pipeline_parallel={pp}. "
            f"Fix: use a pipeline_parallel that divides {d.num_layers}: "
            f"{[p for p in range(1, d.num_layers + 1) if d.num_layers % p == 0]}."
        )


def check_hf_model(path: str, tp: int = 1, pp: int = 1) -> LlamaConfig:
    """Everything a tool checks before it starts processes: a LLaMA-like config, a layout it fits, and a checkpoint
    whose tensors match the config (names and shapes; no weights are read)."""
    from megatron_async_rlhf.weights.hf_io import HFCheckpoint
    from megatron_async_rlhf.weights.mapping import check_hf_state_dict, head_kind

    cfg = read_config(path)
    validate_parallel(cfg, tp, pp)
    head = head_kind(cfg.raw)
    if head == "score":
        check_reward_model_labels(cfg.raw, path)
    check_hf_state_dict(HFCheckpoint(path).shapes(), cfg.dims, head)
    return cfg


def check_reward_model_labels(raw: dict, where: str) -> None:
    """A sequence classifier used as a reward model has exactly one output (``num_labels=1``)."""
    labels = len(raw.get("id2label") or {}) or int(raw.get("num_labels", 2))  # transformers' default is 2 labels
    if labels != 1:
        raise ConfigError(f"{where}: a sequence classifier with num_labels={labels}; a reward model has one output "
                          "(num_labels=1). Fix: use a reward model, or re-head the classifier with one label")


def cli_exit(main) -> None:
    """Run a tool's ``main``; input errors become one line on stderr and exit status 2 (no traceback)."""
    import sys

    try:
        sys.exit(main())
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
