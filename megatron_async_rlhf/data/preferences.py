"""Preference pairs for reward-model training: rows with a prompt, a chosen and a rejected response.

Read through ``datasets.load_dataset`` like every other source (a hub name on clusters, e.g.
``HuggingFaceH4/ultrafeedback_binarized``; a local json/jsonl/parquet file or a directory of ``<split>.jsonl``
files here). The columns are ``data.prompt_key`` / ``data.chosen_key`` / ``data.rejected_key`` (``prompt``,
``chosen``, ``rejected`` by default in mode=rm) and optionally ``data.margin_key``. Two forms:

- strings: ``{"prompt": "...", "chosen": "...", "rejected": "..."}``; the response follows the prompt text.
- chat messages (HH-RLHF in TRL's format, UltraFeedback-binarized): ``chosen`` / ``rejected`` are lists of
  ``{"role", "content"}`` messages ending in an assistant turn, the response. The turns before it are the prompt;
  they must be the same in both. When the lists hold only the response, the prompt column gives the conversation
  (a string is one user turn).

Token ids: with ``data.use_chat_template`` the whole conversation (prompt turns + the response as the assistant turn)
goes through the tokenizer's chat template; otherwise the prompt's ids (:func:`data.tasks.prompt_ids`: BOS + text,
after ``data.prompt_template``; message lists rendered as ``role: content`` lines) followed by the response's own ids,
the way a policy's prompt and sampled completion are joined. Every bad row is an error naming the row and the key,
found before any process starts (``checks/``).
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass

from megatron_async_rlhf.data.tasks import format_prompt, load_split, prompt_ids
from megatron_async_rlhf.errors import ConfigError

Messages = list[dict]


@dataclass(frozen=True)
class PreferencePair:
    prompt: str | Messages
    """Plain prompt text, or the conversation before the response (messages)."""
    chosen: str
    rejected: str
    margin: float | None = None
    """Per-pair margin from ``data.margin_key``; None: ``rm.margin``."""


@dataclass(frozen=True)
class TokenizedPair:
    chosen: list[int]
    """prompt + chosen response ids."""
    rejected: list[int]
    margin: float


def _is_messages(v) -> bool:
    return isinstance(v, list) and all(isinstance(m, Mapping) and "role" in m and "content" in m for m in v)


def _split_conversation(msgs: Messages, where: str) -> tuple[Messages, str]:
    """(turns before the response, the response) of a conversation ending in an assistant turn."""
    if not msgs or msgs[-1]["role"] != "assistant":
        raise ConfigError(f"{where}: a message list must end with the assistant's response (last role: "
                          f"{msgs[-1]['role'] if msgs else 'none, the list is empty'})")
    return [{"role": m["role"], "content": m["content"]} for m in msgs[:-1]], msgs[-1]["content"]


def pair_from_row(ex: Mapping, where: str, prompt_key: str, chosen_key: str, rejected_key: str,
                  margin_key: str = "") -> PreferencePair:
    """One dataset row -> :class:`PreferencePair`. ``where`` names the row in errors (source, split, index)."""
    for key in (chosen_key, rejected_key):
        v = ex.get(key)
        if v is None or (isinstance(v, (str, list)) and not v):
            raise ConfigError(f"{where}: key {key!r} is missing or empty")
        if not isinstance(v, str) and not _is_messages(v):
            raise ConfigError(f"{where}: key {key!r} is neither a string nor a list of {{role, content}} messages")
    c, r = ex[chosen_key], ex[rejected_key]
    prompt = ex.get(prompt_key)
    if _is_messages(c) != _is_messages(r):
        raise ConfigError(f"{where}: {chosen_key!r} and {rejected_key!r} must both be strings or both message lists")
    if _is_messages(c):
        before_c, c = _split_conversation(c, f"{where}, key {chosen_key!r}")
        before_r, r = _split_conversation(r, f"{where}, key {rejected_key!r}")
        if before_c != before_r:
            raise ConfigError(f"{where}: {chosen_key!r} and {rejected_key!r} have different turns before their last "
                              "assistant turn: a pair must answer the same conversation")
        if before_c:
            prompt = before_c
    if prompt is None or (isinstance(prompt, (str, list)) and not prompt):
        raise ConfigError(f"{where}: key {prompt_key!r} (the prompt) is missing or empty")
    if not isinstance(prompt, str) and not _is_messages(prompt):
        raise ConfigError(f"{where}: key {prompt_key!r} is neither a string nor a list of messages")
    for key, text in ((chosen_key, c), (rejected_key, r)):
        if not isinstance(text, str) or not text.strip():
            raise ConfigError(f"{where}: key {key!r}: the response is empty")
    if c == r:
        raise ConfigError(f"{where}: {chosen_key!r} and {rejected_key!r} are identical: the pair carries no "
                          "preference. Fix: drop the row")
    margin = None
    if margin_key:
        if not isinstance(ex.get(margin_key), (int, float)) or isinstance(ex.get(margin_key), bool):
            raise ConfigError(f"{where}: key {margin_key!r} (data.margin_key) is missing or not a number")
        margin = float(ex[margin_key])
    return PreferencePair(prompt, c, r, margin)


def load_pairs(d, split: str, limit: int | None = None) -> list[PreferencePair]:
    """Preference pairs of one split of ``d.source`` (a ``DataConfig``), at most ``limit``."""
    ds = load_split(d.source, split, d.name)
    for key in (d.chosen_key, d.rejected_key) + ((d.margin_key,) if d.margin_key else ()):
        if key not in ds.column_names:
            raise ConfigError(f"data: column {key!r} not in {d.source} split {split!r} (columns: {ds.column_names}); "
                              "set data.chosen_key / data.rejected_key / data.margin_key")
    n = min(limit, len(ds)) if limit else len(ds)
    return [pair_from_row(ds[i], f"{d.source} split {split!r} row {i}", d.prompt_key, d.chosen_key,
                          d.rejected_key, d.margin_key) for i in range(n)]


def render_messages(msgs: Messages) -> str:
    """A conversation as plain text (no chat template): one ``role: content`` line per turn."""
    return "".join(f"{m['role']}: {m['content']}\n" for m in msgs)


def pair_ids(tok, prompt: str | Messages, response: str, use_chat_template: bool = False,
             template: str = "") -> list[int]:
    """Token ids of prompt + response, as the reward model sees them (module docstring)."""
    if use_chat_template:
        msgs = [{"role": "user", "content": format_prompt(prompt, template)}] if isinstance(prompt, str) else prompt
        out = tok.apply_chat_template(msgs + [{"role": "assistant", "content": response}], tokenize=True)
        return list(out["input_ids"] if isinstance(out, Mapping) else out)
    text = format_prompt(prompt, template) if isinstance(prompt, str) else render_messages(prompt)
    return prompt_ids(tok, text) + list(tok(response, add_special_tokens=False)["input_ids"])


def tokenize_pairs(tok, pairs: list[PreferencePair], max_len: int, use_chat_template: bool = False,
                   template: str = "", default_margin: float = 0.0, vocab_size: int | None = None,
                   pad_token_id: int | None = None, what: str = "pair") -> list[TokenizedPair]:
    """Ids of every pair, checked: at most ``max_len`` tokens (else an error naming the pair; raise rm.max_len up to
    the model's context, or drop long rows), inside the vocab, the chosen and rejected ids different, and no sequence
    ending in ``pad_token_id`` (transformers' sequence classifier reads each row at its last non-pad token: it would
    score another position than the learner)."""
    out = []
    for i, p in enumerate(pairs):
        ids = {}
        for side, resp in (("chosen", p.chosen), ("rejected", p.rejected)):
            ids[side] = pair_ids(tok, p.prompt, resp, use_chat_template, template)
            seq = ids[side]
            if len(seq) > max_len:
                raise ConfigError(f"{what} {i}: prompt + {side} response is {len(seq)} tokens > {max_len} (rm.max_len, "
                                  "or the model's max_position_embeddings). Fix: raise rm.max_len if the model allows, "
                                  "or drop/shorten long rows")
            if vocab_size is not None and not all(0 <= t < vocab_size for t in seq):
                raise ConfigError(f"{what} {i}: {side} token ids outside the model's vocab [0, {vocab_size}). Fix: use "
                                  "the model's own tokenizer")
            if pad_token_id is not None and seq[-1] == pad_token_id:
                raise ConfigError(f"{what} {i}: the {side} sequence ends with the pad token (id {pad_token_id}); the "
                                  "exported classifier would read its value elsewhere. Fix: a tokenizer whose pad "
                                  "token is not the end-of-turn token")
        if ids["chosen"] == ids["rejected"]:
            raise ConfigError(f"{what} {i}: chosen and rejected tokenize to the same ids: no preference to learn")
        out.append(TokenizedPair(ids["chosen"], ids["rejected"], default_margin if p.margin is None else p.margin))
    return out


def comparison_groups(pairs: list[TokenizedPair]) -> list[list[int]]:
    """Indices of ``pairs`` grouped by shared sequences: two pairs that share a prompt + response are in one group
    (connected components), groups in order of first appearance. All the comparisons among one prompt's k sampled
    responses form one group of k sequences and up to k(k-1)/2 pairs (InstructGPT trains on such a group as one batch
    element: each response forwarded once, no over-fitting to a response seen in several pairs); a dataset with one
    pair per prompt has a group per pair."""
    parent: dict[tuple, tuple] = {}

    def root(x: tuple) -> tuple:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    keys = [(tuple(p.chosen), tuple(p.rejected)) for p in pairs]
    for c, r in keys:
        parent.setdefault(c, c)
        parent.setdefault(r, r)
        parent[root(c)] = root(r)
    groups: dict[tuple, list[int]] = {}
    for i, (c, _) in enumerate(keys):
        groups.setdefault(root(c), []).append(i)
    return list(groups.values())


def rm_pad_token_id(tok) -> int:
    """The pad id the exported reward model declares: the tokenizer's pad token, else its EOS."""
    pid = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if pid is None:
        raise ConfigError("the tokenizer has neither a pad nor an EOS token; the exported sequence classifier needs a "
                          "pad token id")
    return int(pid)


def marker_preferences(n: int, seed: int = 0, max_operand: int = 9) -> list[dict]:
    """A learnable toy preference set (tests, demos): each prompt asks for a marker word (``ok`` or ``no``) after the
    sum; the chosen response ends with the asked-for word, the rejected one with the other. Half the prompts ask for
    each, so neither word nor length wins on its own: a reward model must read the prompt (an untrained one scores
    about 0.5)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        want, other = ("ok", "no") if rng.random() < 0.5 else ("no", "ok")
        rows.append({"prompt": f"Q: {a}+{b}= say {want}:", "chosen": f" {a + b} {want}",
                     "rejected": f" {a + b} {other}"})
    return rows
