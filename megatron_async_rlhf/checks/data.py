"""Data contracts: the sources exist and have the columns, there are enough prompts, and every prompt tokenizes to a
list of ids inside the vocab that fits ``data.max_prompt_len``."""

from __future__ import annotations

from megatron_async_rlhf.data.tasks import load_rows, tokenize_prompts
from megatron_async_rlhf.errors import ConfigError


def check_data(cfg, model_path: str, vocab_size: int) -> None:
    from transformers import AutoTokenizer

    train, ev = load_rows(cfg.data, cfg.logging.out_dir)
    if len(train) < cfg.algorithm.prompts_per_step:
        raise ConfigError(f"data has {len(train)} training prompts < algorithm.prompts_per_step="
                          f"{cfg.algorithm.prompts_per_step}")
    if not ev:
        raise ConfigError(f"data split {cfg.data.eval_split!r} of {cfg.data.source} is empty: nothing to evaluate on")
    tok = AutoTokenizer.from_pretrained(model_path)
    if cfg.data.use_chat_template and not tok.chat_template:
        raise ConfigError(f"data.use_chat_template=true but the tokenizer in {model_path} has no chat template. "
                          "Fix: set data.use_chat_template=false (and maybe data.prompt_template)")
    tokenize_prompts(tok, train + ev, cfg.data.max_prompt_len, cfg.data.use_chat_template, cfg.data.prompt_template,
                     vocab_size)
