"""Prompt sources. A row is (prompt text, gold answer text). Tokenisation and length checks happen once, up front."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Mapping
from dataclasses import dataclass

from megatron_async_rlhf.errors import ConfigError


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


LOCAL_SUFFIXES = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def load_split(path: str, split: str, name: str | None = None):
    """One split through ``datasets.load_dataset``: a hub name on clusters; here a local file (json/jsonl/parquet/
    csv, split name ignored: the file is the split) or a local directory holding ``<split>.jsonl`` files. Any load
    error is a ConfigError naming the source; for JSON lines, the file and the first line that is not a JSON object."""
    from datasets import load_dataset

    suffix = os.path.splitext(path)[1]
    if suffix in LOCAL_SUFFIXES:
        if not os.path.isfile(path):
            raise ConfigError(f"data file {path} does not exist. Fix: set data.source to an existing file, a directory "
                              "of <split>.jsonl files, a hub dataset name, or a built-in source")
        return _loaded(path, split, [path], lambda: load_dataset(LOCAL_SUFFIXES[suffix], data_files=path,
                                                                  split="train"))
    if os.path.isdir(path):
        files = [f for f in sorted(os.listdir(path)) if f.startswith(split + ".") or f.startswith(split + "-")]
        if not files:
            raise ConfigError(f"data directory {path} has no file for split {split!r} (files: "
                              f"{sorted(os.listdir(path))}). Fix: add {split}.jsonl or set data.split / data.eval_split")
        return _loaded(path, split, [os.path.join(path, f) for f in files], lambda: load_dataset(path, name,
                                                                                               split=split))
    if path.startswith((".", "/", "~")):
        raise ConfigError(f"data source {path} does not exist. Fix: point data.source at an existing local path")
    return _loaded(path, split, [], lambda: load_dataset(path, name, split=split))


def _loaded(path: str, split: str, files: list[str], load):
    """``load()``, its errors (``datasets``' own: a ValueError "Expected object or value", a DatasetGenerationError,
    a hub error) turned into a ConfigError that names the file and line where it can."""
    try:
        return load()
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 -- whatever datasets raised, the user's data is what to fix
        for f in files:
            bad = bad_json_line(f)
            if bad is not None:
                line, why = bad
                raise ConfigError(f"data file {f} line {line}: {why}. Fix: every line of a JSON-lines file must be "
                                  "one JSON object (one row); correct or remove that line") from None
        raise ConfigError(f"data.source={path!r} (split {split!r}) could not be loaded by datasets: "
                          f"{type(e).__name__}: {str(e)[:500]}. Fix: check the file's format, or data.source / "
                          "data.name / data.split") from None


def bad_json_line(file: str) -> tuple[int, str] | None:
    """(line number, what is wrong) of the first line of a JSON-lines ``file`` that is not a JSON object, or None
    (also for a ``.json`` file that is one JSON document, and for files that are not JSON)."""
    if os.path.splitext(file)[1] not in (".json", ".jsonl"):
        return None
    if file.endswith(".json"):
        try:
            with open(file, encoding="utf-8") as f:
                json.load(f)
            return None  # one JSON document (an array of rows), not JSON lines
        except (ValueError, UnicodeDecodeError):
            pass
    with open(file, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8")
                if not text.strip():
                    continue
                obj = json.loads(text)
            except UnicodeDecodeError as e:
                return n, f"not UTF-8 text ({e.reason} at byte {e.start})"
            except json.JSONDecodeError as e:
                return n, f"not valid JSON ({e.msg} at column {e.colno})"
            if not isinstance(obj, dict):
                return n, f"a JSON {type(obj).__name__}, not an object with the data's columns"
    return None


def dataset_rows(path: str, split: str, prompt_key: str, answer_key: str, name: str | None = None,
                 limit: int | None = None) -> list[Row]:
    """Rows from ``datasets.load_dataset`` (see ``load_split``). A GSM8k-style answer ("...#### 72") keeps only the
    final answer as gold; a conversation (list of ``{role, content}``) keeps its last assistant turn, the reference
    answer of a chat win-rate. ``answer_key=""``: prompts only (a reward model or judge scores the completions)."""
    from megatron_async_rlhf.data.answers import extract_final_answer

    ds = load_split(path, split, name)
    for key in (prompt_key, answer_key) if answer_key else (prompt_key,):
        if key not in ds.column_names:
            raise ConfigError(f"data: column {key!r} not in {path} (columns: {ds.column_names}); set data.prompt_key "
                              "/ data.answer_key")
    rows = []
    for i, ex in enumerate(ds.select(range(min(limit, len(ds)))) if limit else ds):
        where = f"data: row {i} of {path} (split {split!r})"
        prompt = ex[prompt_key]
        if not isinstance(prompt, str):
            raise ConfigError(f"{where}: data.prompt_key {prompt_key!r} is "
                              f"{'missing (null)' if prompt is None else f'a {type(prompt).__name__}, not text'}. "
                              "Fix: give every row a prompt string, or drop the row")
        ans = _answer_text(ex[answer_key], where, answer_key) if answer_key else ""
        rows.append(Row(prompt, extract_final_answer(ans) if "####" in ans else ans.strip()))
    return rows


def _answer_text(ans, where: str, key: str) -> str:
    """A row's gold answer as text: a string or a number as is; a conversation (No Robots' messages, a list of
    ``{role, content}``) its last assistant turn. Anything else is a ConfigError naming the row and the key."""
    fix = "Fix: give every row an answer (text, a number, or a conversation with an assistant turn), or drop the row"
    if isinstance(ans, str) or (isinstance(ans, (int, float)) and not isinstance(ans, bool)):
        return str(ans)
    if ans is None:
        raise ConfigError(f"{where}: data.answer_key {key!r} is missing (null). {fix}")
    if isinstance(ans, list) and ans and all(isinstance(m, Mapping) for m in ans):
        turns = [m.get("content") for m in ans if m.get("role") == "assistant"]
        if not turns:
            raise ConfigError(f"{where}: data.answer_key {key!r} is a conversation with no assistant turn (roles: "
                              f"{[m.get('role') for m in ans]}). {fix}")
        if not isinstance(turns[-1], str):
            raise ConfigError(f"{where}: the last assistant turn of data.answer_key {key!r} has no text content. {fix}")
        return turns[-1]
    raise ConfigError(f"{where}: data.answer_key {key!r} is a {type(ans).__name__}, not an answer. {fix}")


def format_prompt(text: str, template: str = "") -> str:
    """The prompt text the model sees: ``template`` with ``{prompt}`` (or ``{question}``) replaced, else the text."""
    return template.replace("{prompt}", text).replace("{question}", text) if template else text


def prompt_ids(tok, text: str, use_chat_template: bool = False) -> list[int]:
    """Token ids of one prompt: the chat template with a generation prompt (a single user turn), or the plain text
    after the tokenizer's BOS. Always a list of ints: transformers 5's ``apply_chat_template`` returns a
    BatchEncoding, whose iteration would give its keys."""
    if use_chat_template:
        out = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
        ids = out["input_ids"] if isinstance(out, Mapping) else out
    else:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        if tok.bos_token_id is not None:
            ids = [tok.bos_token_id] + ids
    return list(ids)


def tokenize_prompts(tok, rows: list[Row], max_prompt_len: int, use_chat_template: bool = False,
                     template: str = "", vocab_size: int | None = None) -> list[list[int]]:
    """Token ids per prompt, checked up front: each is a non-empty list of ints inside the vocab and no longer than
    ``max_prompt_len``; a prompt that is not is an error naming it (before any process starts)."""
    out = []
    for i, r in enumerate(rows):
        ids = prompt_ids(tok, format_prompt(r.prompt, template), use_chat_template)
        bad = [t for t in ids if not isinstance(t, int) or isinstance(t, bool)]
        if not ids or bad:
            raise ConfigError(f"prompt {i} tokenized to {ids[:8]!r}: not a list of token ids (bad entries "
                              f"{bad[:3]!r}). The tokenizer's chat template or encode returned something else; check "
                              "data.use_chat_template and the tokenizer files")
        if vocab_size is not None and not all(0 <= t < vocab_size for t in ids):
            raise ConfigError(f"prompt {i} has token ids outside the model's vocab [0, {vocab_size}): "
                              f"{[t for t in ids if not 0 <= t < vocab_size][:5]}. Fix: use the model's own tokenizer")
        if len(ids) > max_prompt_len:
            raise ConfigError(f"prompt {i} has {len(ids)} tokens > data.max_prompt_len={max_prompt_len}: "
                              f"{r.prompt[:80]!r}... Fix: raise data.max_prompt_len (and rollout.max_model_len) or "
                              "filter long prompts")
        out.append(ids)
    return out


def synthetic_gsm8k_dir(d, run_dir: str) -> str:
    """The local dataset directory (``train.jsonl``, ``test.jsonl`` in GSM8k's schema) for ``data.source=
    synthetic_gsm8k``, written once (atomically) under the run directory."""
    from megatron_async_rlhf.data.word_problems import write_gsm8k_jsonl

    out = os.path.join(run_dir, "data", f"synthetic_gsm8k-seed{d.seed}-train{d.train_size}-test{d.eval_size}"
                                        f"-steps{d.synthetic_max_steps}")
    if not all(os.path.exists(os.path.join(out, f"{s}.jsonl")) for s in ("train", "test")):
        write_gsm8k_jsonl(out, d.train_size, d.eval_size, seed=d.seed, max_steps=d.synthetic_max_steps)
    return out


def synthetic_chat_dir(d, run_dir: str) -> str:
    """The local dataset directory (``train.jsonl``, ``test.jsonl`` of ``{"prompt"}`` rows) for ``data.source=
    synthetic_chat`` (``data/chat_prompts.py``), written once (atomically) under the run directory."""
    from megatron_async_rlhf.data.chat_prompts import write_chat_jsonl

    out = os.path.join(run_dir, "data", f"synthetic_chat-v1-seed{d.seed}-test{d.eval_size}")
    if not all(os.path.exists(os.path.join(out, f"{s}.jsonl")) for s in ("train", "test")):
        write_chat_jsonl(out, d.eval_size, seed=d.seed)
    return out


def load_rows(d, run_dir: str) -> tuple[list[Row], list[Row]]:
    """(train rows, held-out rows) of a ``DataConfig``."""
    if d.source == "arithmetic":
        rows = arithmetic_rows(d.train_size + d.eval_size, d.seed, d.max_operand)
        return rows[: d.train_size], rows[d.train_size:]
    if d.source == "synthetic_gsm8k":
        path, split, eval_split = synthetic_gsm8k_dir(d, run_dir), "train", "test"
    elif d.source == "synthetic_chat":  # its own schema: prompts only
        path = synthetic_chat_dir(d, run_dir)
        return (dataset_rows(path, "train", "prompt", "", None, d.train_size),
                dataset_rows(path, "test", "prompt", "", None, d.eval_size))
    else:
        path, split, eval_split = d.source, d.split, d.eval_split
    return (dataset_rows(path, split, d.prompt_key, d.answer_key, d.name, d.train_size),
            dataset_rows(path, eval_split, d.prompt_key, d.answer_key, d.name, d.eval_size))
