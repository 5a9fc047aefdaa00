"""GRPO / Dr. GRPO (algorithms/grpo.py) against numbers worked out by hand, and the algorithm seam it was added
through: a registered module with its own config section, selected by name, that ``rl_step`` never names."""

import inspect
import re
import math

import pytest
import torch

from megatron_async_rlhf.algorithms import ALGORITHMS, build_algorithm
from megatron_async_rlhf.algorithms.grpo import grpo_loss
from megatron_async_rlhf.config import run_config_from_dict
from megatron_async_rlhf.errors import ConfigError

t = torch.tensor
MASK = t([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])  # sequence 0 has 2 completion tokens, sequence 1 has 3
LOGP = t([[-1.0, -2.0, 0.0], [-0.5, -1.0, -1.5]])
ADV = t([1.0, -0.5])


def test_grpo_normalises_each_sequence_by_its_length_and_dr_grpo_by_the_budget():
    # ratio 1 (one update), sampler = policy (w = 1): the per-token loss is -A
    # GRPO: seq 0: (-1 - 1) / 2 = -1; seq 1: (0.5 * 3) / 3 = 0.5; mean -0.25
    loss, m = grpo_loss(LOGP, None, LOGP, LOGP, ADV, MASK)
    assert loss.item() == pytest.approx(-0.25) and m["kl_k3"].item() == pytest.approx(0.0)
    # Dr. GRPO, budget 4: seq 0: -2 / 4 = -0.5; seq 1: 1.5 / 4 = 0.375; mean -0.0625
    loss, _ = grpo_loss(LOGP, None, LOGP, LOGP, ADV, MASK, length_norm=4)
    assert loss.item() == pytest.approx(-0.0625)


def test_grpo_kl_term_is_the_k3_estimator_and_tis_weights_the_off_policy_token():
    ref = LOGP - 0.1  # ref - logp = -0.1 on every token (to fp32 rounding): k3 = e^-0.1 + 0.1 - 1
    k3 = math.exp(-0.1) + 0.1 - 1
    loss, m = grpo_loss(LOGP, None, LOGP, ref, ADV, MASK, kl_coef=0.5)
    assert loss.item() == pytest.approx(-0.25 + 0.5 * k3, abs=1e-6) and m["kl_k3"].item() == pytest.approx(k3, rel=1e-4)
    sampler = LOGP.clone()
    sampler[0, 0] += math.log(4.0)  # the sampler liked token 0 four times more: w = 1/4 there
    loss, m = grpo_loss(LOGP, None, sampler, LOGP, ADV, MASK)
    # seq 0: (-0.25 - 1) / 2 = -0.625; seq 1: 0.5; mean -0.0625
    assert loss.item() == pytest.approx(-0.0625)


def test_grpo_gradient_is_minus_advantage_over_length_and_count():
    logp = LOGP.clone().requires_grad_(True)
    grpo_loss(logp, None, LOGP, LOGP, ADV, MASK)[0].backward()
    expected = t([[-1 / 2 / 2, -1 / 2 / 2, 0.0], [0.5 / 3 / 2] * 3])
    torch.testing.assert_close(logp.grad, expected)


def test_grpo_advantages_by_hand_and_without_std_for_dr_grpo():
    cfg = run_config_from_dict({"algorithm": {"name": "grpo", "samples_per_prompt": 4}}).validate()
    rewards = t([1.0, 0.0, 0.0, 1.0])  # mean 0.5, std 0.5
    mbs = [{"rows": t([0, 1])}, {"rows": t([2, 3])}]
    build_algorithm(cfg.algorithm).advantages(mbs, rewards, [0, 1, 2, 3])
    torch.testing.assert_close(torch.cat([m["adv"] for m in mbs]), t([1.0, -1.0, -1.0, 1.0]), atol=1e-5, rtol=0)
    cfg = run_config_from_dict({"algorithm": {"name": "grpo", "samples_per_prompt": 4,
                                              "grpo": {"dr_grpo": "true"}}}).validate()
    build_algorithm(cfg.algorithm).advantages(mbs, rewards, [0, 1, 2, 3])
    torch.testing.assert_close(torch.cat([m["adv"] for m in mbs]), t([0.5, -0.5, -0.5, 0.5]))


def test_each_algorithm_owns_its_section_and_old_flat_names_say_the_new_place():
    assert {"online_dpo", "rloo", "ppo", "ppo_critic", "grpo"} <= set(ALGORITHMS)
    cfg = run_config_from_dict({"algorithm": {"name": "online_dpo", "online_dpo": {"beta": "0.3"}}}).validate()
    assert cfg.algorithm.online_dpo.beta == 0.3 and build_algorithm(cfg.algorithm).cfg.beta == 0.3
    for old, new in [("beta", "algorithm.online_dpo.beta"), ("clip_eps", "algorithm.<name>.clip_eps"),
                     ("critic", "algorithm.name=ppo_critic"), ("value_clip", "algorithm.ppo_critic.value_clip")]:
        with pytest.raises(ConfigError, match=re.escape(new)):
            run_config_from_dict({"algorithm": {old: 1}})
    with pytest.raises(ConfigError, match="unknown algorithm.grpo field"):
        run_config_from_dict({"algorithm": {"grpo": {"betta": 1}}})
    with pytest.raises(ConfigError, match=r"algorithm.name='nope' unknown; choose one of \['grpo'"):
        run_config_from_dict({"algorithm": {"name": "nope"}}).validate()


def test_the_learner_step_names_no_algorithm():
    from megatron_async_rlhf.learner import step

    source = inspect.getsource(step)
    named = [n for n in ALGORITHMS if f'"{n}"' in source or f"'{n}'" in source or f".{n}" in source]
    assert not named, f"learner/step.py branches on algorithm names {named}"
