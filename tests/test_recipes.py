"""Recipe configs load and validate; bad configs fail before any process starts, naming the field."""

import pytest

from megatron_async_rlhf.hf_llama import ConfigError
from megatron_async_rlhf.train import load_config, main


@pytest.mark.parametrize("recipe,cuda", [("tiny", False), ("rho1b_gsm8k", True), ("llama3_8b_chat", True)])
def test_recipes_load_and_validate(recipe, cuda):
    cfg = load_config([f"recipe={recipe}"], cuda=cuda)
    assert cfg.algorithm.name == "online_dpo" and cfg.algorithm.max_staleness == 1
    if recipe == "llama3_8b_chat":
        assert cfg.cluster.world == 16 and cfg.reward.kind == "reward_model"
    if recipe == "rho1b_gsm8k":
        assert cfg.reward.kind == "math" and cfg.algorithm.samples_per_prompt == 4


def test_gpu_recipes_are_rejected_on_cpu_with_a_reason():
    with pytest.raises(ConfigError, match="rollout_tp=2"):
        load_config(["recipe=llama3_8b_chat"], cuda=False)


@pytest.mark.parametrize("override,message", [
    ("algorithm.name=a2c", "algorithm.name='a2c' unknown"),
    ("algorithm.samples_per_prompt=1", "needs k >= 2"),
    ("algorithm.max_staleness=-1", "max_staleness=-1 must be >= 0"),
    ("algorithm.max_new_tokens=60", "cannot hold prompt + completion"),
    ("recipe=nope", "Known recipes"),
    ("algorithm.bogus=1", "unknown AlgorithmConfig field"),
])
def test_bad_configs(override, message, capsys):
    assert main([override]) == 2
    assert message in capsys.readouterr().err


def test_prompt_longer_than_context_is_named(tmp_path, capsys):
    assert main([f"logging.out_dir={tmp_path}", "data.max_prompt_len=4"]) == 2
    err = capsys.readouterr().err
    assert "prompt 0 has" in err and "data.max_prompt_len=4" in err


def test_overrides_are_typed():
    cfg = load_config(["algorithm.lr=1e-3", "algorithm.steps=7", "pin_cpus=false"])
    assert cfg.algorithm.lr == 1e-3 and cfg.algorithm.steps == 7 and cfg.pin_cpus is False
    with pytest.raises(ConfigError, match="AlgorithmConfig.steps='x' is not a valid int"):
        load_config(["algorithm.steps=x"])


def test_context_longer_than_the_model_is_rejected(tmp_path, capsys):
    assert main([f"logging.out_dir={tmp_path}", "rollout.max_model_len=1024"]) == 2
    assert "exceeds the model's max_position_embeddings=256" in capsys.readouterr().err
