"""The final answer of a math text (a GSM8k gold solution or a model's completion): the text after the last
``#### `` marker, else the last ``\\boxed{...}``, else the last number. Shared by the data loaders (gold answers)
and the math reward (completions)."""

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
