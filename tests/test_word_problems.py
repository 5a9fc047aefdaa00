"""Synthetic GSM8k word problems: schema, worked solutions re-checked by an independent evaluator, determinism,
uniqueness, disjoint splits read back through ``datasets``, step and template coverage, the CLI."""

import json
import os
import re
import subprocess
import sys
from collections import Counter
from fractions import Fraction

import pytest

from megatron_async_rlhf.data.word_problems import (
    MAX_STEPS,
    MAX_VALUE,
    make_word_problems,
    sample_problems,
    templates,
    write_gsm8k_jsonl,
)
from megatron_async_rlhf.rewards.math import extract_final_answer, math_reward

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ANNOTATION = re.compile(r"<<([^<>=]*)=([^<>]*)>>(\S*?)(?=[ .,]|$)")
FINAL = re.compile(r"\n#### (\d+)$")
IMPLICIT = {2, 7}  # "half", "there and back", "a week": numbers a story says in words


def evaluate(expr: str) -> Fraction:
    """Exact value of an expression of non-negative integers and + - * / (usual precedence, left to right)."""
    if not re.fullmatch(r"[0-9+\-*/]+", expr):
        raise ValueError(f"unexpected characters in {expr!r}")
    tokens = re.findall(r"\d+|[+\-*/]", expr)
    pos = 0

    def number() -> Fraction:
        nonlocal pos
        if pos >= len(tokens) or not tokens[pos].isdigit():
            raise ValueError(f"number expected in {expr!r}")
        pos += 1
        return Fraction(int(tokens[pos - 1]))

    def term() -> Fraction:
        nonlocal pos
        v = number()
        while pos < len(tokens) and tokens[pos] in "*/":
            op, pos = tokens[pos], pos + 1
            v = v * number() if op == "*" else v / number()
        return v

    v = term()
    while pos < len(tokens):
        op, pos = tokens[pos], pos + 1
        v = v + term() if op == "+" else v - term()
    return v


def test_evaluator():
    assert evaluate("3*4") == 12 and evaluate("2+3*4") == 14 and evaluate("20-4-6") == 10
    assert evaluate("7/2") == Fraction(7, 2) and evaluate("12/4*3") == 9
    for bad in ("__import__('os')", "2**3", "1+", "(1)"):
        with pytest.raises(ValueError):
            evaluate(bad)


def check_solution(question: str, answer: str) -> tuple[int, int]:
    """(steps, final answer) after checking every annotated step of the worked solution."""
    m = FINAL.search(answer)
    assert m, f"no final '#### <int>' line: {answer!r}"
    final = int(m.group(1))
    lines = answer.split("\n")[:-1]
    known = {int(x) for x in re.findall(r"\d+", question)} | IMPLICIT
    values = []
    for line in lines:
        notes = ANNOTATION.findall(line)
        assert len(notes) == 1, f"one calculation per line: {line!r}"
        expr, val, shown = notes[0]
        assert val.isdigit() and shown == val, f"annotation and shown value differ: {line!r}"
        assert evaluate(expr) == int(val), f"wrong arithmetic: {line!r}"
        assert 0 <= int(val) < MAX_VALUE
        for operand in re.findall(r"\d+", expr):  # every number comes from the question or an earlier step
            assert int(operand) in known, f"{operand} in {line!r} is neither in the question nor computed"
        known.add(int(val))
        values.append(int(val))
    assert values and values[-1] == final, answer
    return len(lines), final


@pytest.fixture(scope="module")
def problems():
    return sample_problems(1000, seed=0)


def test_schema_and_solutions(problems):
    rows = make_word_problems(1000, seed=0)
    assert rows == [p.row() for p in problems]
    for row, p in zip(rows, problems):
        assert set(row) == {"question", "answer"} and all(isinstance(v, str) for v in row.values())
        assert row["question"].endswith("?") and row["question"].count("?") == 1
        steps, final = check_solution(row["question"], row["answer"])
        assert (steps, final) == (p.steps, p.value)
        assert all(int(x) < MAX_VALUE for x in re.findall(r"\d+", row["question"]))


def test_reward_reads_the_final_answer(problems):
    for p in problems[:200]:
        assert extract_final_answer(p.answer) == str(p.value)
        assert math_reward(p.answer, str(p.value)) == 1.0
        assert math_reward(p.answer, str(p.value + 1)) == 0.0


def test_deterministic_and_seeded():
    assert make_word_problems(200, seed=3) == make_word_problems(200, seed=3)
    a, b = make_word_problems(200, seed=3), make_word_problems(200, seed=4)
    assert a != b and len({r["question"] for r in a} & {r["question"] for r in b}) < 20


def test_unique():
    rows = make_word_problems(3000, seed=1)
    assert len({r["question"] for r in rows}) == 3000


@pytest.mark.parametrize("max_steps", range(1, MAX_STEPS + 1))
def test_step_counts_cover_range(max_steps):
    steps = Counter(p.steps for p in sample_problems(300, seed=0, max_steps=max_steps))
    assert set(steps) == set(range(1, max_steps + 1))
    assert min(steps.values()) > 300 / max_steps / 2  # roughly uniform


def test_templates_varied(problems):
    used = Counter(p.template for p in problems[:500])
    assert len(used) >= 15 and set(used) <= set(templates())
    assert len(set(templates().values())) >= 7  # domains
    for steps in range(1, MAX_STEPS + 1):  # every template can tell every length
        assert {p.template for p in problems if p.steps == steps} == set(templates())


def test_bad_arguments():
    for kwargs in ({"max_steps": 0}, {"max_steps": MAX_STEPS + 1}):
        with pytest.raises(ValueError, match="max_steps"):
            make_word_problems(5, seed=0, **kwargs)
    with pytest.raises(ValueError, match="n must be"):
        make_word_problems(-1, seed=0)
    assert make_word_problems(0, seed=0) == []


def test_write_splits_and_load_dataset(tmp_path):
    from datasets import load_dataset

    out = str(tmp_path / "gsm")
    paths = write_gsm8k_jsonl(out, train_size=300, test_size=50, seed=7)
    assert paths == {"train": os.path.join(out, "train.jsonl"), "test": os.path.join(out, "test.jsonl")}
    assert sorted(os.listdir(out)) == ["test.jsonl", "train.jsonl"]  # no temp file left behind
    rows = {}
    for split, n in (("train", 300), ("test", 50)):
        ds = load_dataset(out, split=split, cache_dir=str(tmp_path / "cache"))
        assert len(ds) == n and ds.column_names == ["question", "answer"]
        rows[split] = list(ds)
    assert not {r["question"] for r in rows["train"]} & {r["question"] for r in rows["test"]}
    # the test split depends only on its own size and the seed
    write_gsm8k_jsonl(str(tmp_path / "bigger"), train_size=500, test_size=50, seed=7)
    with open(tmp_path / "bigger" / "test.jsonl") as f:
        assert [json.loads(line) for line in f] == rows["test"]
    with pytest.raises(ValueError, match="test_size"):
        write_gsm8k_jsonl(out, train_size=10, test_size=0)


def test_cli(tmp_path):
    tool = os.path.join(ROOT, "tools", "make_gsm8k_data.py")
    run = [sys.executable, tool, "--out", str(tmp_path / "d"), "--train-size", "40", "--test-size", "10",
           "--max-steps", "2"]
    r = subprocess.run(run, capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["train"] == 40 and summary["test"] == 10 and set(summary["steps"]) <= {"1", "2"}
    bad = subprocess.run(run[:4] + ["--train-size", "0"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "--train-size must be >= 1" in bad.stderr and "Traceback" not in bad.stderr
