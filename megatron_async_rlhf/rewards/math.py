"""Verifiable math reward: 1.0 when the completion's final answer equals the gold answer, else 0.0.

The final answer is the text after the last GSM8k-style ``#### `` marker, else the last ``\\boxed{...}``, else the
last number in the completion. Equality is decided by ``math-verify`` (numbers, fractions, LaTeX, sets).
"""

from __future__ import annotations

import re

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _last_boxed(text: str) -> str | None:
    i = text.rfind("\\boxed{")
    if i < 0:
        return None
    depth, j = 0, i + len("\\boxed{")
    for k in range(j, len(text)):
        if text[k] == "{":
            depth += 1
        elif text[k] == "}":
            if depth == 0:
                return text[j:k]
            depth -= 1
    return None


def extract_final_answer(text: str) -> str | None:
    """The completion's final answer as a string, or None if it states none."""
    if "####" in text:
        tail = text.rsplit("####", 1)[1].strip()
        m = _NUMBER.search(tail)
        return m.group(0).replace(",", "") if m else (tail.split("\n")[0].strip() or None)
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    nums = _NUMBER.findall(text)
    return nums[-1].replace(",", "") if nums else None


def math_reward(completion: str, gold: str) -> float:
    from math_verify import parse, verify

    answer = extract_final_answer(completion)
    if answer is None:
        return 0.0
    gold_parsed = parse(_as_math(gold))
    pred = parse(_as_math(answer))
    return 1.0 if gold_parsed and pred and verify(gold_parsed, pred) else 0.0


def _as_math(s: str) -> str:
    """math-verify extracts from LaTeX or plain expressions; wrap plain answers so both parse the same way."""
    s = s.strip()
    return s if "\\" in s or s.startswith("$") else f"${s}$"
