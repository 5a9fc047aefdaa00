"""Preference-data contracts (mode=rm), checked before any process starts by loading the data as the run will
(``modes.rm.load_tokenized_pairs``): the splits exist and have the columns, every row is a usable pair (keys present
and non-empty, chosen != rejected), and every prompt + response fits the context."""

from __future__ import annotations

from megatron_async_rlhf.errors import ConfigError


def check_preferences(cfg, model_path: str, max_positions: int, vocab_size: int) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    if cfg.data.use_chat_template and not tok.chat_template:
        raise ConfigError(f"data.use_chat_template=true but the tokenizer in {model_path} has no chat template. "
                          "Fix: set data.use_chat_template=false")
    from megatron_async_rlhf.modes.rm import load_tokenized_pairs

    load_tokenized_pairs(cfg, tok, max_positions, vocab_size)
