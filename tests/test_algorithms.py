"""Losses and advantages against numbers computed by hand."""

import math

import pytest
import torch

from megatron_async_rlhf.algorithms import (group_advantages, kl_penalized_rewards, online_dpo_loss, ppo_clip_loss,
                                            rloo_advantages, rloo_loss, select_pairs)

t = torch.tensor


def test_online_dpo_sigmoid_by_hand():
    # pair 1: margin = (-1 - -1.5) - (-2 - -1.5) = 1 -> -log sigmoid(0.5) = log(1 + e^-0.5) = 0.47407698
    # pair 2: margin = (-3 - -2) - (-1 - -2) = -2 -> -log sigmoid(-1) = log(1 + e) = 1.31326169
    loss, m = online_dpo_loss(t([-1.0, -3.0]), t([-2.0, -1.0]), t([-1.5, -2.0]), t([-1.5, -2.0]), beta=0.5)
    assert loss.item() == pytest.approx((0.47407698 + 1.31326169) / 2, abs=1e-6)
    assert m["dpo_accuracy"].item() == 0.5 and m["dpo_margin"].item() == pytest.approx(-0.5)


def test_online_dpo_ipo_by_hand():
    # margin 1, beta 0.25: (1 - 1/(2*0.25))^2 = (1 - 2)^2 = 1
    loss, _ = online_dpo_loss(t([-1.0]), t([-2.0]), t([-1.5]), t([-1.5]), beta=0.25, loss_type="ipo")
    assert loss.item() == pytest.approx(1.0)


def test_online_dpo_gradient_pushes_chosen_up():
    c = t([-2.0], requires_grad=True)
    r = t([-2.0], requires_grad=True)
    online_dpo_loss(c, r, t([-2.0]), t([-2.0]), beta=1.0)[0].backward()
    assert c.grad.item() == pytest.approx(-0.5) and r.grad.item() == pytest.approx(0.5)  # sigmoid(0) = 1/2


def test_online_dpo_logs_how_far_a_stale_pair_has_moved_by_hand():
    from megatron_async_rlhf.algorithms.online_dpo import OnlineDPO
    algo = OnlineDPO(OnlineDPO.Config(beta=0.5), None)
    mask = t([[0.0, 1.0, 1.0], [0.0, 1.0, 0.0]])
    logp = t([[0.0, -1.0, -2.0], [0.0, -0.5, 0.0]]) * mask
    sampler = t([[9.0, -1.5, -1.0], [9.0, -1.0, 7.0]])  # outside the mask: ignored
    ref = t([[0.0, -1.0, -1.0], [0.0, -1.0, 0.0]])
    # chosen: learner -3 vs sampler -2.5 -> 0.5; rejected: -0.5 vs -1.0 -> 0.5; mean 0.5
    loss, m = algo.loss(logp, {"mask": mask, "sampler": sampler, "ref": ref})
    assert m["sampler_seq_logp_diff"].item() == pytest.approx(0.5)
    # the sampler's log-probs never enter the loss: a pair is trained the same however stale it is
    assert algo.loss(logp, {"mask": mask, "sampler": sampler - 3.0, "ref": ref})[0].item() == loss.item()
    # margin = (-3 - -2) - (-0.5 - -1) = -1.5 -> -log sigmoid(-0.75) = log(1 + e^0.75)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(0.75)), abs=1e-6)


def test_select_pairs():
    chosen, rejected, valid = select_pairs(t([[0.0, 1.0, 0.5], [1.0, 1.0, 1.0]]))
    assert chosen.tolist() == [1, 0] and rejected.tolist() == [0, 0] and valid.tolist() == [True, False]
    with pytest.raises(ValueError, match="k>=2"):
        select_pairs(t([[1.0], [0.0]]))


def test_rloo_leave_one_out_by_hand():
    # k=4, rewards 1 0 0 1: baseline of sample 0 = (0+0+1)/3 = 1/3 -> 2/3; of sample 1 = 2/3 -> -2/3
    adv = rloo_advantages(t([[1.0, 0.0, 0.0, 1.0]]))
    torch.testing.assert_close(adv, t([[2 / 3, -2 / 3, -2 / 3, 2 / 3]]))
    assert adv.sum().item() == pytest.approx(0.0, abs=1e-6)


def test_rloo_loss_and_kl_penalty_by_hand():
    logp = t([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]])
    mask = t([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    loss, _ = rloo_loss(logp, t([1.0, -2.0]), mask)  # -mean(1*-3, -2*-0.5) = -mean(-3, 1) = 1
    assert loss.item() == pytest.approx(1.0)
    r = kl_penalized_rewards(t([1.0, 0.0]), t([[-1.0, -1.0], [-2.0, 0.0]]), t([[-1.5, -1.0], [-1.0, 0.0]]),
                             torch.ones(2, 2), kl_coef=0.1)  # KL 0.5 and -1
    assert r.tolist() == pytest.approx([0.95, 0.1])


def test_group_advantages_by_hand():
    torch.testing.assert_close(group_advantages(t([[1.0, 0.0, 0.0, 1.0]])), t([[1.0, -1.0, -1.0, 1.0]]), atol=1e-5,
                               rtol=0)
    assert group_advantages(t([[3.0, 1.0]]), normalize_std=False).tolist() == [[1.0, -1.0]]


def test_ppo_tis_weight_is_truncated():
    # on-policy learner (ratio 1), sampler gave the token p=0.25 vs 0.5 now: w = min(2, 1.5) = 1.5; loss = -1.5*A
    lp = t([[math.log(0.5)]])
    loss, m = ppo_clip_loss(lp, None, t([[math.log(0.25)]]), t([2.0]), torch.ones(1, 1), tis_cap=1.5)
    assert loss.item() == pytest.approx(-3.0)
    assert m["tis_truncated"].item() == 1.0


def test_ppo_clip_by_hand_and_no_gradient_when_clipped():
    old = t([[math.log(0.5)], [math.log(0.5)]])
    lp = t([[math.log(0.6)], [math.log(0.6)]], requires_grad=True)  # ratio 1.2
    # A=+1: max(-1.2, -1.1) = -1.1 (clipped, no gradient); A=-1: max(1.2, 1.1) = 1.2 (unclipped)
    loss, m = ppo_clip_loss(lp, old, old, t([1.0, -1.0]), torch.ones(2, 1), clip_eps=0.1)
    assert loss.item() == pytest.approx((-1.1 + 1.2) / 2)
    loss.backward()
    assert lp.grad[0, 0].item() == 0.0 and lp.grad[1, 0].item() == pytest.approx(0.5 * 1.2)
    assert m["clip_fraction"].item() == 1.0


def test_micro_batches_pad_few_rows_and_keep_pairs_together():
    from megatron_async_rlhf.learner.step import micro_size

    # (rows, cap, multiple) -> rows per micro-batch; padding = count * size - rows stays below one row per batch
    assert micro_size(4, 8, 2) == 4      # 2 DPO pairs: one micro-batch of 4, not 8
    assert micro_size(10, 8, 2) == 6     # micro-batches of 6 and 4 rows, pairs never split (even)
    assert micro_size(17, 8, 1) == 6     # 6 + 6 + 5 rows
    assert micro_size(33, 32, 1) == 17
    assert micro_size(2, 1, 2) == 2      # a cap below a pair still holds one pair
