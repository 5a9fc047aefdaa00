"""A reward model reads what it was trained on, whole: the input format its config.json records (chat template
included), else the policy's (data.use_chat_template / prompt_template, stated in the log); never a truncated text
(the scorer refuses, the preflight refuses a run that could not fit). Ids here are built by hand with the tokenizer,
not through the scorer's own formatting code."""

import json
import logging

import pytest
import torch

from megatron_async_rlhf.errors import ConfigError

CHAT = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant: {% endif %}")


def _reward_model(tiny_models, out, max_positions=2048, input_format=None, chat=False) -> str:
    """A tiny random LlamaForSequenceClassification on the tiny policy's tokenizer (optionally with a chat template),
    recording ``input_format`` in its config.json as mode=rm does."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    from megatron_async_rlhf.learner.value_head import INPUT_FORMAT_KEY

    tok = AutoTokenizer.from_pretrained(tiny_models["tiny-gqa"])
    if chat:
        tok.chat_template = CHAT
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, vocab_size=len(tok), num_labels=1, pad_token_id=tok.pad_token_id,
                      max_position_embeddings=max_positions)
    torch.manual_seed(0)
    LlamaForSequenceClassification(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    if input_format is not None:
        path = f"{out}/config.json"
        raw = json.load(open(path))
        raw[INPUT_FORMAT_KEY] = input_format
        json.dump(raw, open(path, "w"))
    return str(out)


PROMPTS, COMPLETIONS = ["Q: 3+4= A:", "Q: 12+30= A:"], [" 7", " 42 and more"]


def test_recorded_chat_format_is_what_the_model_reads(tiny_models, tmp_path):
    from transformers import AutoTokenizer

    from megatron_async_rlhf.rewards.reward_model import RewardModelScorer

    rm_dir = _reward_model(tiny_models, tmp_path / "rm", input_format={"use_chat_template": True, "template": ""},
                           chat=True)
    # the policy's format says plain text: the recorded one wins
    rm = RewardModelScorer(rm_dir, policy_format={"use_chat_template": False, "template": "Say {prompt}"})
    tok = AutoTokenizer.from_pretrained(rm_dir)
    by_hand = [tok(f"<s>user: {p}</s><s>assistant: {c}</s>", add_special_tokens=False)["input_ids"]
               for p, c in zip(PROMPTS, COMPLETIONS)]
    torch.testing.assert_close(rm.score(PROMPTS, COMPLETIONS), rm.score_ids(by_hand), atol=0, rtol=0)
    plain = [[tok.bos_token_id] + tok(p + c, add_special_tokens=False)["input_ids"] for p, c in zip(PROMPTS, COMPLETIONS)]
    assert not torch.allclose(rm.score(PROMPTS, COMPLETIONS), rm.score_ids(plain))  # the format matters


def test_unrecorded_format_is_the_policys_and_is_logged(tiny_models, tmp_path, caplog):
    from transformers import AutoTokenizer

    from megatron_async_rlhf.config import run_config_from_dict
    from megatron_async_rlhf.rewards.scorer import build_scorer

    rm_dir = _reward_model(tiny_models, tmp_path / "rm")
    cfg = run_config_from_dict({"data": {"prompt_template": "Please: {prompt}"},
                                "reward": {"kind": "reward_model", "reward_model_path": rm_dir}})
    assert cfg.reward.policy_format == {"use_chat_template": False, "template": "Please: {prompt}"}
    with caplog.at_level(logging.INFO, logger="megatron_async_rlhf"):
        rm = build_scorer(cfg.reward)  # what every placement builds from the reward section
    assert "records no input format" in caplog.text and "prompt_template='Please: {prompt}'" in caplog.text
    tok = AutoTokenizer.from_pretrained(rm_dir)
    by_hand = [[tok.bos_token_id] + tok(f"Please: {p}", add_special_tokens=False)["input_ids"]
               + tok(c, add_special_tokens=False)["input_ids"] for p, c in zip(PROMPTS, COMPLETIONS)]
    torch.testing.assert_close(rm.score(PROMPTS, COMPLETIONS), rm.score_ids(by_hand), atol=0, rtol=0)

    chat_dir = _reward_model(tiny_models, tmp_path / "chat", chat=True)
    cfg = run_config_from_dict({"data": {"use_chat_template": True},
                                "reward": {"kind": "reward_model", "reward_model_path": chat_dir}})
    rm = build_scorer(cfg.reward)
    by_hand = [tok(f"<s>user: {p}</s><s>assistant: {c}</s>", add_special_tokens=False)["input_ids"]
               for p, c in zip(PROMPTS, COMPLETIONS)]
    torch.testing.assert_close(rm.score(PROMPTS, COMPLETIONS), rm.score_ids(by_hand), atol=0, rtol=0)


def test_long_texts_are_read_whole_never_truncated(tiny_models, tmp_path):
    from megatron_async_rlhf.rewards.reward_model import RewardModelScorer

    rm = RewardModelScorer(_reward_model(tiny_models, tmp_path / "rm", max_positions=2048))
    prompt, completion = "Q: " + "1+" * 600 + "1= A:", " 601"
    ids = rm.tok(prompt, add_special_tokens=False)["input_ids"]
    whole = [[rm.tok.bos_token_id] + ids + rm.tok(completion, add_special_tokens=False)["input_ids"]]
    assert 1024 < len(whole[0]) <= 2048  # past the old 1024-token cut
    got = rm.score([prompt], [completion])
    torch.testing.assert_close(got, rm.score_ids(whole), atol=0, rtol=0)
    assert not torch.allclose(got, rm.score_ids([whole[0][:1024]]))  # the end of the text counts
    short = RewardModelScorer(_reward_model(tiny_models, tmp_path / "short", max_positions=64))
    with pytest.raises(ValueError, match=r"is \d+ tokens > its max_position_embeddings=64; it is never truncated"):
        short.score([prompt], [completion])


@pytest.mark.parametrize("chat,overrides,message", [
    (False, ["algorithm.max_new_tokens=60"], r"max_position_embeddings=64 tokens, but a prompt \+ completion can "
                                             r"take data.max_prompt_len \(16\) \+ the longest completion "
                                             r"\(algorithm.max_new_tokens / eval.max_new_tokens: 60\) = 76"),
    (False, ["eval.max_new_tokens=49"], r"eval.max_new_tokens: 49\) = 65"),
    # 16 + 47 fits 64 in plain text, not with the chat template's end-of-turn token after the response
    (True, ["algorithm.max_new_tokens=48", "data.use_chat_template=true"], r"\+ 1 end-of-turn tokens of its chat "
                                                                           r"template = 65"),
])
def test_a_reward_model_too_short_for_the_run_is_a_config_error(tiny_models, tmp_path, chat, overrides, message):
    from megatron_async_rlhf.checks.model import check_reward_models
    from megatron_async_rlhf.train import load_config

    rm_dir = _reward_model(tiny_models, tmp_path / "rm", max_positions=64, chat=chat)
    cfg = load_config(["reward.kind=reward_model", f"reward.reward_model_path={rm_dir}", "rollout.max_model_len=128",
                       *overrides], cuda=False)
    with pytest.raises(ConfigError, match="reward.reward_model_path=.*" + message):
        check_reward_models(cfg)
    fits = load_config(["reward.kind=reward_model", f"reward.reward_model_path={rm_dir}",
                        "algorithm.max_new_tokens=47", *overrides[1:]], cuda=False)
    check_reward_models(fits)  # 16 + 47 (+ 1) <= 64


def test_preflight_refuses_before_launch(tiny_models, tmp_path, capsys):
    from megatron_async_rlhf.train import main

    rm_dir = _reward_model(tiny_models, tmp_path / "rm", max_positions=64)
    assert main(["reward.kind=reward_model", f"reward.reward_model_path={rm_dir}", "algorithm.max_new_tokens=60",
                 "rollout.max_model_len=128", f"logging.out_dir={tmp_path}/run", "logging.wandb_mode=disabled"]) == 2
    assert "reads at most max_position_embeddings=64 tokens" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="eval.judge='/nowhere/rm': no HF reward model there"):
        from megatron_async_rlhf.checks.model import check_reward_models
        from megatron_async_rlhf.train import load_config

        check_reward_models(load_config(["eval.judge=/nowhere/rm"], cuda=False))


@pytest.mark.multiproc
def test_a_nan_reward_stops_the_main_job_before_any_update(tiny_models, tmp_path):
    """The whole run (``python -m megatron_async_rlhf``), 2 learner ranks, reward model scored on the rollout side,
    every training prompt scoring NaN (the reward model's embedding of ``z`` is NaN; eval prompts have none): both
    learner ranks stop at RL step 1 (none waits for a collective), the run exits non-zero naming the source, the step
    and a prompt, with no RL row logged and no policy exported (it used to skip every step and exit 0)."""
    import os
    import subprocess
    import sys

    from test_placement import _poisoned_reward_model

    hf = tiny_models["tiny-gqa"]
    rm_dir = _poisoned_reward_model(hf, str(tmp_path / "rm"))
    os.makedirs(tmp_path / "data")
    with open(tmp_path / "data" / "train.jsonl", "w") as f:
        f.writelines(json.dumps({"question": f"Q: z+{i}= A:", "answer": str(i)}) + "\n" for i in range(16))
    with open(tmp_path / "data" / "test.jsonl", "w") as f:
        f.writelines(json.dumps({"question": f"Q: {i}+1= A:", "answer": str(i + 1)}) + "\n" for i in range(4))
    out = tmp_path / "run"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-m", "megatron_async_rlhf", f"model.path={hf}", f"data.source={tmp_path}/data",
                        "data.train_size=16", "data.eval_size=4", "sft.steps=0", "algorithm.steps=3",
                        "algorithm.prompts_per_step=4", "cluster.learner_dp=2", "reward.kind=reward_model",
                        f"reward.reward_model_path={rm_dir}", "reward.placement=rollout", f"logging.out_dir={out}",
                        "logging.wandb_mode=disabled"], capture_output=True, text=True, timeout=600, cwd=root)
    assert r.returncode != 0, r.stderr[-3000:]
    assert "NonFiniteReward: reward.kind=reward_model returned nan for 16 of 16 samples at RL step 1; the first is a " \
           "completion of prompt index" in r.stderr, r.stderr[-3000:]
    assert "('Q: z+" in r.stderr
    assert "[rank 1] megatron_async_rlhf: learner failed" in r.stderr  # the second learner rank raised it too
    phases = [json.loads(x)["phase"] for x in open(out / "metrics.jsonl")]
    assert phases == ["eval"] and not (out / "policy").exists()


def test_eval_judge_reward_model_reuses_the_controllers_scorer(tiny_models, tmp_path):
    """reward.placement=controller: eval.judge=reward_model judges with the very scorer the run rewards with (one
    reward model in the process), including the reference answers; no second copy is loaded."""
    import gc

    from transformers import AutoTokenizer

    from megatron_async_rlhf.config import run_config_from_dict
    from megatron_async_rlhf.evaluation import eval_judge
    from megatron_async_rlhf.rewards import placement
    from megatron_async_rlhf.rewards.reward_model import RewardModelScorer

    rm_dir = _reward_model(tiny_models, tmp_path / "rm")
    cfg = run_config_from_dict({"reward": {"kind": "reward_model", "reward_model_path": rm_dir},
                                "eval": {"judge": "reward_model", "win_rate_against": "answers"}}).validate()
    placement.SCORERS.clear()
    try:
        fn = placement.controller_scorer(cfg.reward, AutoTokenizer.from_pretrained(tiny_models["tiny-gqa"]))
        judge = eval_judge(cfg, fn)
        gc.collect()
        assert sum(type(o) is RewardModelScorer for o in gc.get_objects()) == 1
        assert judge(PROMPTS, COMPLETIONS) == fn.text.score(PROMPTS, COMPLETIONS).tolist()
    finally:
        placement.SCORERS.clear()
