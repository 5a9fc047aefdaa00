"""PPO-with-critic pieces (algorithms/gae.py) against numbers worked out by hand."""

import pytest
import torch

from megatron_async_rlhf.algorithms.gae import gae, token_rewards, value_loss, whiten


def test_token_rewards_put_the_score_on_the_last_token_and_the_kl_on_every_token():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, 0.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-2.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1, 1], [1, 0, 0]])
    r = token_rewards(torch.tensor([2.0, -1.0]), logp, ref, mask, kl_coef=0.1)
    # row 0: -0.1 * (0.5, -1, 0) and +2 on token 2; row 1: -0.1 * 1 - 1 on token 0
    torch.testing.assert_close(r, torch.tensor([[-0.05, 0.1, 2.0], [-1.1, 0.0, 0.0]]))


def test_gae_by_hand():
    # one row of 3 tokens, gamma 1, lam 0.5; rewards (0, 0, 1), values (0.5, 0.2, 0.4), V after the end = 0
    r = torch.tensor([[0.0, 0.0, 1.0]])
    v = torch.tensor([[0.5, 0.2, 0.4]])
    m = torch.ones(1, 3)
    adv, ret = gae(r, v, m, gamma=1.0, lam=0.5)
    # deltas: d2 = 1 - 0.4 = 0.6; d1 = 0 + 0.4 - 0.2 = 0.2; d0 = 0 + 0.2 - 0.5 = -0.3
    # A2 = 0.6; A1 = 0.2 + 0.5 * 0.6 = 0.5; A0 = -0.3 + 0.5 * 0.5 = -0.05
    torch.testing.assert_close(adv, torch.tensor([[-0.05, 0.5, 0.6]]))
    torch.testing.assert_close(ret, torch.tensor([[0.45, 0.7, 1.0]]))


def test_gae_lambda_one_gamma_one_is_reward_to_go_minus_value_and_ignores_padding():
    r = torch.tensor([[0.1, 0.2, 0.3, 9.0], [1.0, 9.0, 9.0, 9.0]])
    v = torch.tensor([[0.3, 0.1, 0.2, 9.0], [0.4, 9.0, 9.0, 9.0]])
    m = torch.tensor([[1.0, 1, 1, 0], [1, 0, 0, 0]])
    adv, ret = gae(r, v, m, gamma=1.0, lam=1.0)
    torch.testing.assert_close(ret, torch.tensor([[0.6, 0.5, 0.3, 0.0], [1.0, 0, 0, 0]]))
    torch.testing.assert_close(adv, torch.tensor([[0.3, 0.4, 0.1, 0.0], [0.6, 0, 0, 0]]))


def test_whiten_over_masked_entries():
    x = torch.tensor([[1.0, 3.0, 100.0]])
    m = torch.tensor([[1.0, 1.0, 0.0]])
    torch.testing.assert_close(whiten(x, m), torch.tensor([[-1.0, 1.0, 0.0]]), atol=1e-6, rtol=0)


def test_clipped_value_loss_by_hand():
    values = torch.tensor([[1.0, 0.0]])
    old = torch.tensor([[0.5, 0.1]])
    ret = torch.tensor([[0.0, 1.0]])
    m = torch.ones(1, 2)
    loss, mm = value_loss(values, old, ret, m, clip=0.2)
    # token 0: unclipped (1-0)^2 = 1, clipped V = 0.7 -> 0.49; max 1. token 1: (0-1)^2 = 1, clipped 0 -> 1; max 1
    assert loss.item() == pytest.approx(0.5 * (1.0 + 1.0) / 2)
    assert mm["value_clip_fraction"].item() == pytest.approx(0.5)
    # gradient flows only through the branch that is the max: token 0 unclipped d/dV 0.5*(V-R)^2/2 = (1-0)/2
    v = values.clone().requires_grad_(True)
    value_loss(v, old, ret, m, clip=0.2)[0].backward()
    torch.testing.assert_close(v.grad, torch.tensor([[0.5, -0.5]]))


def test_critic_advantages_over_micro_batches_by_hand():
    """algorithms/ppo_critic.gae_advantages on the learner's [b, s-1] layout (completions start after prompt positions),
    two micro-batches whitened together; gamma 1, lambda 1, kl_coef 0.1."""
    from megatron_async_rlhf.algorithms.ppo_critic import gae_advantages

    a = {"rows": torch.tensor([0]), "mask": torch.tensor([[0.0, 1, 1]]), "sampler": torch.tensor([[0.0, -1, -1]]),
         "ref": torch.tensor([[0.0, -1.5, -1]]), "old_values": torch.tensor([[0.0, 0.5, 0.2]])}
    b = {"rows": torch.tensor([1]), "mask": torch.tensor([[1.0, 0]]), "sampler": torch.tensor([[-2.0, 0]]),
         "ref": torch.tensor([[-1.0, 0]]), "old_values": torch.tensor([[0.3, 0.0]])}
    m = gae_advantages([a, b], torch.tensor([1.0, 0.0]), kl_coef=0.1, gamma=1.0, lam=1.0)
    # a: token rewards (-0.1 * 0.5, 1 + 0) = (-0.05, 1); returns (0.95, 1); advantages (0.45, 0.8)
    # b: token reward -0.1 * (-1) + 0 = 0.1; return 0.1; advantage 0.1 - 0.3 = -0.2
    torch.testing.assert_close(a["returns"], torch.tensor([[0.0, 0.95, 1.0]]))
    torch.testing.assert_close(b["returns"], torch.tensor([[0.1, 0.0]]))
    # whitened over (0.45, 0.8, -0.2): mean 0.35, population std sqrt(0.515 / 3)
    std = (0.515 / 3) ** 0.5
    torch.testing.assert_close(a["adv"], torch.tensor([[0.0, 0.1 / std, 0.45 / std]]))
    torch.testing.assert_close(b["adv"], torch.tensor([[-0.55 / std, 0.0]]))
    assert m["advantage_raw_mean"] == pytest.approx(0.35) and m["returns_mean"] == pytest.approx(2.05 / 3)


def test_ppo_clip_with_per_token_advantages_and_an_old_policy_by_hand():
    from megatron_async_rlhf.algorithms import ppo_clip_loss

    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    old, sampler = torch.tensor([[-1.2, -2.0]]), torch.tensor([[-1.2, -2.5]])
    loss, m = ppo_clip_loss(logp, old, sampler, torch.tensor([[1.0, -1.0]]), torch.ones(1, 2), 0.2, 2.0)
    # token 0: ratio e^0.2 = 1.2214 > 1.2, advantage +1: the clipped -1.2 is the max, weight e^0 = 1
    # token 1: ratio 1, advantage -1: +1, TIS weight e^0.5 = 1.6487 (under the cap 2)
    assert loss.item() == pytest.approx((-1.2 + 1.6487213) / 2, abs=1e-5)
    assert m["clip_fraction"].item() == pytest.approx(0.5)
    loss.backward()  # the clipped token passes no gradient; token 1: w * -A * ratio / 2
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 1.6487213 / 2]]))
