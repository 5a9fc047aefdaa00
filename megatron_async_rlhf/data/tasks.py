"""Prompt sources. A row is (prompt text, gold answer text). Tokenisation and length checks happen once, up front."""

from __future__ import annotations

import random
from dataclasses import dataclass

from megatron_async_rlhf.hf_llama import ConfigError


@dataclass(frozen=True)
class Row:
    prompt: str
    answer: str


def arithmetic_rows(n: int, seed: int, max_operand: int = 9, ops: str = "+") -> list[Row]:
    """``Q: a+b= A:`` -> ``c``. Small operands so a tiny model learns it in minutes on a CPU."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b, op = rng.randint(0, max_operand), rng.randint(0, max_operand), rng.choice(ops)
        rows.append(Row(f"Q: {a}{op}{b}= A:", str(a + b if op == "+" else a - b)))
    return rows


def dataset_rows(path: str, split: str, prompt_key: str, answer_key: str, name: str | None = None,
                 limit: int | None = None) -> list[Row]:
    """Rows from ``datasets.load_dataset`` (a hub name on clusters, a local json/parquet path or dir anywhere).
    A GSM8k-style answer ("...#### 72") keeps only the final answer as gold."""
    from datasets import load_dataset

    from megatron_async_rlhf.rewards.math import extract_final_answer

    if path.endswith((".json", ".jsonl")):
        ds = load_dataset("json", data_files=path, split=split)
    elif path.endswith(".parquet"):
        ds = load_dataset("parquet", data_files=path, split=split)
    else:
        ds = load_dataset(path, name, split=split)
    for key in (prompt_key, answer_key):
        if key not in ds.column_names:
            raise ConfigError(f"data: column {key!r} not in {path} (columns: {ds.column_names}); set data.prompt_key "
                              "/ data.answer_key")
    rows = []
    for ex in ds.select(range(min(limit, len(ds)))) if limit else ds:
        ans = str(ex[answer_key])
        rows.append(Row(str(ex[prompt_key]), extract_final_answer(ans) if "####" in ans else ans.strip()))
    return rows


def tokenize_prompts(tok, rows: list[Row], max_prompt_len: int, use_chat_template: bool = False) -> list[list[int]]:
    """Token ids per prompt; a prompt longer than ``max_prompt_len`` is an error naming it (before any work)."""
    out = []
    for i, r in enumerate(rows):
        if use_chat_template:
            ids = tok.apply_chat_template([{"role": "user", "content": r.prompt}], add_generation_prompt=True)
        else:
            ids = tok(r.prompt, add_special_tokens=False)["input_ids"]
            if tok.bos_token_id is not None:
                ids = [tok.bos_token_id] + ids
        if len(ids) > max_prompt_len:
            raise ConfigError(f"prompt {i} has {len(ids)} tokens > data.max_prompt_len={max_prompt_len}: "
                              f"{r.prompt[:80]!r}... Fix: raise data.max_prompt_len (and rollout.max_model_len) or "
                              "filter long prompts")
        out.append(ids)
    return out
