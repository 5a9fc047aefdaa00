"""The chat pipeline's pieces that need no model: the local chat prompt set and the judged win-rate."""

import json

import pytest

from megatron_async_rlhf.data.chat_prompts import chat_prompts, chat_splits, write_chat_jsonl
from megatron_async_rlhf.evaluation import win_rate


def test_chat_prompts_are_many_distinct_and_split_without_overlap():
    prompts = chat_prompts(seed=0)
    assert len(prompts) >= 2000 and len(set(prompts)) == len(prompts)
    assert chat_prompts(seed=0) == prompts and chat_prompts(seed=1) != prompts  # deterministic per seed
    train, test = chat_splits(test_size=200, seed=0)
    assert len(test) == 200 and not set(train) & set(test) and len(train) + len(test) == len(prompts)


def test_chat_jsonl_reads_back_through_datasets(tmp_path):
    from megatron_async_rlhf.data.tasks import load_split

    out = write_chat_jsonl(str(tmp_path / "chat"), test_size=50)
    ds = load_split(out, "test")
    assert ds.column_names == ["prompt"] and len(ds) == 50
    with open(tmp_path / "chat" / "train.jsonl") as f:
        assert len([json.loads(line) for line in f]) == len(chat_prompts()) - 50


def test_win_rate_counts_ties_half_with_an_interval():
    out = win_rate([1.0, 0.0, 0.5, 0.2], [0.0, 0.0, 0.6, 0.1])  # win, tie, loss, win
    assert out["win_rate"] == pytest.approx(2.5 / 4) and out["ties"] == 1
    assert out["win_rate_lo95"] < 2.5 / 4 < out["win_rate_hi95"]
    assert win_rate([0.3] * 10, [0.3] * 10)["win_rate"] == 0.5  # against itself: even
    with pytest.raises(ValueError):
        win_rate([1.0], [1.0, 2.0])  # scores of different prompt sets


def test_win_rate_against_reference_answers_and_answers_from_a_conversation(tmp_path):
    """eval.win_rate_against=answers: the judge scores the data's reference answers once and every evaluation's
    greedy completions against them; a conversation column gives its last assistant turn as the answer."""
    import torch

    from megatron_async_rlhf.data.tasks import dataset_rows
    from megatron_async_rlhf.evaluation import Evaluator
    from megatron_async_rlhf.rollout.base import Sample

    with open(tmp_path / "test.jsonl", "w") as f:
        for p, a in [("p0", "aaa"), ("p1", "a"), ("p2", "aa")]:
            msgs = [{"role": "user", "content": p}, {"role": "assistant", "content": "x"},
                    {"role": "user", "content": "more"}, {"role": "assistant", "content": a}]
            f.write(json.dumps({"prompt": p, "messages": msgs}) + "\n")
    rows = dataset_rows(str(tmp_path), "test", "prompt", "messages")
    assert [r.answer for r in rows] == ["aaa", "a", "aa"]

    class Tok:
        def batch_decode(self, ids, skip_special_tokens=True):
            return ["b" * len(t) for t in ids]

    class Client:
        def generate(self, prompts, sampling):  # completions of 2 tokens for every prompt
            return [Sample(i, p, [7, 7], [0.0, 0.0], "stop", 0) for i, p in enumerate(prompts)]

    calls = []

    def judge(prompts, completions):  # longer is better
        calls.append(list(completions))
        return [float(len(c)) for c in completions]

    ev = Evaluator([[1], [2], [3]], rows, lambda s, r: torch.zeros(len(s)), Tok(), str(tmp_path), 4, (), judge=judge,
                   against_answers=True)
    out = ev.run(Client(), 0)
    assert calls[1] == ["aaa", "a", "aa"]  # the answers, judged once after the first completions
    assert out["win_rate"] == pytest.approx((0 + 1 + 0.5) / 3) and out["ties"] == 1  # "bb" vs 3, 1, 2 chars
    assert ev.run(Client(), 1)["win_rate"] == pytest.approx(1.5 / 3) and len(calls) == 3  # answers judged once
