"""HF config reading, the layout contracts, and RoPE frequencies against transformers' own."""

import json
import math

import pytest
import torch

from megatron_async_rlhf.errors import ConfigError
from megatron_async_rlhf.weights.llama_config import read_config, rope_inv_freq, validate_parallel

BASE = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=100)


def test_reads_tiny_presets(tiny_models):
    for preset, path in tiny_models.items():
        cfg = read_config(path)
        assert cfg.dims.vocab_size == json.load(open(f"{path}/config.json"))["vocab_size"]
    assert read_config(tiny_models["tiny-tied"]).dims.tie_word_embeddings
    assert read_config(tiny_models["tiny-wide"]).dims.head_dim == 32  # explicit, hidden/heads would be 16


def test_non_llama_architecture_is_rejected():
    with pytest.raises(ConfigError, match=r"model_type='gpt2'.*not LLaMA-like.*Supported model_type"):
        read_config({**BASE, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(ConfigError, match="attention_bias=true"):
        read_config({**BASE, "attention_bias": True})
    with pytest.raises(ConfigError, match="hidden_act='gelu'"):
        read_config({**BASE, "hidden_act": "gelu"})


def test_query_groups_not_divisible_by_tp():
    with pytest.raises(ConfigError, match=r"num_query_groups \(num_key_value_heads=2\) is not divisible by "
                                          r"tensor_parallel=4.*\[1, 2\]"):
        validate_parallel(read_config(BASE), tp=4, pp=1)


def test_layers_not_divisible_by_pp():
    with pytest.raises(ConfigError, match=r"num_hidden_layers=3 is not divisible by pipeline_parallel=2.*\[1, 3\]"):
        validate_parallel(read_config(BASE), tp=1, pp=2)
    validate_parallel(read_config(BASE), tp=2, pp=3)  # fits


def test_unknown_rope_type_is_rejected():
    with pytest.raises(ConfigError, match="rope type 'yarn' is not supported"):
        read_config({**BASE, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})


@pytest.mark.parametrize("scaling", [
    None,
    {"rope_type": "linear", "factor": 4.0},
    # original context 128 puts head_dim 16's frequencies in all three llama3 bands (kept, blended, divided)
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 128},
])
def test_rope_inv_freq_matches_transformers(scaling):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    raw = {**BASE, "head_dim": 16, "rope_theta": 500000.0}
    if scaling:
        raw["rope_scaling"] = scaling
    ours = rope_inv_freq(read_config(raw))
    ref = LlamaRotaryEmbedding(LlamaConfig(**{k: v for k, v in raw.items() if k != "model_type"})).inv_freq
    torch.testing.assert_close(ours, ref.float(), rtol=1e-6, atol=0)
    if scaling and scaling["rope_type"] == "llama3":
        wavelen = 2 * math.pi / (1.0 / 500000.0 ** (torch.arange(0, 16, 2).float() / 16))
        assert (wavelen < 32).any() and ((wavelen >= 32) & (wavelen <= 128)).any() and (wavelen > 128).any()


def test_rope_parameters_v5_and_legacy_keys_agree():
    legacy = read_config({**BASE, "rope_theta": 1e6, "rope_scaling": {"type": "linear", "factor": 2.0}})
    v5 = read_config({**BASE, "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}})
    assert legacy.rope_theta == v5.rope_theta and legacy.rope_scaling == v5.rope_scaling
