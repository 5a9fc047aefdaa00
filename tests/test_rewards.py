"""Reward extraction against math-verify on a table of cases; penalties; the reward-model scorer on a local model."""

import pytest
import torch

from megatron_async_rlhf.rewards import apply_penalties, extract_final_answer, math_reward

CASES = [  # completion, gold, expected reward
    ("Natalia sold 48/2 = 24 clips in May.\n#### 72", "72", 1.0),
    ("so the total is 1,000 dollars\n#### 1,000", "1000", 1.0),
    ("#### 71", "72", 0.0),
    ("The answer is \\boxed{\\frac{1}{2}}.", "0.5", 1.0),
    ("We get \\boxed{x^{2}} and then \\boxed{4}", "4", 1.0),  # the last box counts
    ("Q: 12+7= A: 19", "19", 1.0),
    ("Q: 12+7= A: 18", "19", 0.0),
    ("I do not know.", "3", 0.0),
    ("-5 is wrong, it is -3", "-3", 1.0),
    ("\\boxed{3.50}", "3.5", 1.0),
]


@pytest.mark.parametrize("completion,gold,expected", CASES)
def test_math_reward_table(completion, gold, expected):
    assert math_reward(completion, gold) == expected


@pytest.mark.parametrize("completion,gold,expected", [c for c in CASES if c[0].count("\\boxed") == 1])
def test_boxed_answers_agree_with_math_verify_itself(completion, gold, expected):
    from math_verify import parse, verify

    assert bool(verify(parse(f"${gold}$"), parse(completion))) == bool(math_reward(completion, gold))


def test_extract_final_answer():
    assert extract_final_answer("a\n#### 1,234") == "1234"
    assert extract_final_answer("\\boxed{\\frac{a}{b}} end") == "\\frac{a}{b}"
    assert extract_final_answer("nothing here") is None


def test_missing_eos_penalty():
    r = apply_penalties(torch.tensor([1.0, 1.0, 0.0]), ["stop", "length", "length"], missing_eos_penalty=0.5)
    assert r.tolist() == [1.0, 0.5, -0.5]


def test_reward_model_scorer_on_a_local_classifier(tmp_path, tiny_models):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    from megatron_async_rlhf.rewards.reward_model import RewardModelScorer

    src = tiny_models["tiny-gqa"]
    tok = AutoTokenizer.from_pretrained(src)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, vocab_size=len(tok), num_labels=1, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForSequenceClassification(cfg).save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    rm = RewardModelScorer(str(tmp_path / "rm"), batch_size=2)
    scores = rm.score(["Q: 1+1= A:", "Q: 2+2= A:", "Q: 3+3= A:"], [" 2", " 4", " 7"])
    assert scores.shape == (3,) and torch.isfinite(scores).all()
    # batching and padding do not change a score
    single = rm.score(["Q: 3+3= A:"], [" 7"])
    torch.testing.assert_close(single, scores[2:], atol=1e-5, rtol=0)
    # reward.dtype=bfloat16: the same model in bf16 (weights and compute), equal to fp32 up to bf16 rounding
    half = RewardModelScorer(str(tmp_path / "rm"), batch_size=2, dtype="bfloat16")
    assert half.model.dtype == torch.bfloat16
    bf = half.score(["Q: 1+1= A:", "Q: 2+2= A:", "Q: 3+3= A:"], [" 2", " 4", " 7"])
    assert bf.dtype == torch.float32 and not torch.equal(bf, scores)
    torch.testing.assert_close(bf, scores, atol=0.05 * scores.abs().max().item() + 1e-2, rtol=0)


def test_eval_intervals_against_hand_numbers():
    from megatron_async_rlhf.evaluation import paired_difference, wilson_interval

    lo, hi = wilson_interval(20, 200)  # p=0.1: centre (0.1 + 1.96^2/400) / (1 + 1.96^2/200), Wilson by hand
    assert abs(lo - 0.06567) < 1e-4 and abs(hi - 0.14941) < 1e-4
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    # 4 prompts: +1, 0, 0, -1 ... diffs [1, 1, 0, 0]: mean 0.5, sample sd 0.57735, half-width 1.96 * 0.57735 / 2
    d, dlo, dhi = paired_difference([1, 1, 0, 1], [0, 0, 0, 1])
    assert d == 0.5 and abs(dhi - d - 1.96 * 0.57735027 / 2) < 1e-6 and abs(d - dlo - (dhi - d)) < 1e-12
