"""Preference-data contracts (mode=rm): the splits exist and have the columns, every row is a usable pair (keys
present and non-empty, chosen != rejected), and every prompt + response fits the context."""

from __future__ import annotations

from megatron_async_rlhf.errors import ConfigError


def rm_max_len(cfg, max_positions: int) -> int:
    """The longest prompt + response a reward-model run accepts: ``rm.max_len`` (at most the model's positions)."""
    if cfg.rm.max_len > max_positions:
        raise ConfigError(f"rm.max_len={cfg.rm.max_len} exceeds the model's max_position_embeddings={max_positions}")
    return cfg.rm.max_len or max_positions


def load_tokenized_pairs(cfg, tok, max_positions: int, vocab_size: int | None = None):
    """(train, held-out) tokenized pairs of a mode=rm run, every contract checked (errors name the row and key)."""
    from megatron_async_rlhf.data.preferences import comparison_groups, load_pairs, rm_pad_token_id, tokenize_pairs

    d = cfg.data
    if d.source in ("arithmetic", "synthetic_gsm8k"):
        raise ConfigError(f"mode=rm trains on preference pairs, but data.source={d.source!r} is a built-in prompt "
                          "source. Fix: set data.source to a preference dataset (prompt / chosen / rejected; README, "
                          "'Reward models')")
    max_len = rm_max_len(cfg, max_positions)
    out = []
    for split, limit in ((d.split, d.train_size), (d.eval_split, d.eval_size)):
        pairs = load_pairs(d, split, limit)
        if not pairs:
            raise ConfigError(f"data split {split!r} of {d.source} has no preference pairs")
        out.append(tokenize_pairs(tok, pairs, max_len, d.use_chat_template, d.prompt_template, cfg.rm.margin,
                                  vocab_size, rm_pad_token_id(tok), what=f"{d.source} split {split!r} pair"))
    groups = len(comparison_groups(out[0]))
    if groups < cfg.rm.batch_size:
        raise ConfigError(f"data has {len(out[0])} training pairs in {groups} comparison groups (pairs sharing a "
                          f"response) < rm.batch_size={cfg.rm.batch_size} groups. Fix: lower rm.batch_size")
    return out[0], out[1]


def check_preferences(cfg, model_path: str, max_positions: int, vocab_size: int) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    if cfg.data.use_chat_template and not tok.chat_template:
        raise ConfigError(f"data.use_chat_template=true but the tokenizer in {model_path} has no chat template. "
                          "Fix: set data.use_chat_template=false")
    load_tokenized_pairs(cfg, tok, max_positions, vocab_size)
