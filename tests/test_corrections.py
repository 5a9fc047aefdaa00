"""Off-policy corrections (algorithms/corrections.py) against numbers computed by hand (issue 21 item 5)."""

import math

import pytest
import torch

from megatron_async_rlhf.algorithms import ppo_clip_loss
from megatron_async_rlhf.algorithms.corrections import effective_sample_size, importance_weights
from megatron_async_rlhf.errors import ConfigError

# two sequences of two tokens; r = pi_old / pi_sampler = [1, 5 | 1.25, 0.5/0.9]
OLD = torch.log(torch.tensor([[0.5, 0.5], [0.5, 0.5]]))
SAMPLER = torch.log(torch.tensor([[0.5, 0.1], [0.4, 0.9]]))
MASK = torch.ones(2, 2)
R = [[1.0, 5.0], [1.25, 0.5 / 0.9]]


def _w(kind, **kw):
    w, stats = importance_weights(OLD, SAMPLER, MASK, kind, **kw)
    return w.flatten().tolist(), {k: float(v) for k, v in stats.items()}


def test_tis_caps_the_ratio():
    w, s = _w("tis", cap=2.0)
    assert w == pytest.approx([1.0, 2.0, 1.25, 0.5 / 0.9])
    assert s["capped_fraction"] == 0.25 and s["masked_fraction"] == 0.0
    flat = [1.0, 2.0, 1.25, 0.5 / 0.9]
    ess = effective_sample_size(s)["ess"]
    assert ess == pytest.approx(sum(flat) ** 2 / (4 * sum(x * x for x in flat)))
    assert s["sampler_ratio_max"] == pytest.approx(5.0)
    assert s["sampler_logp_diff"] == pytest.approx(sum(abs(math.log(x)) for row in R for x in row) / 4)


def test_mis_drops_tokens_outside_the_band():
    w, s = _w("mis", low=0.5, high=2.0)
    assert w == pytest.approx([1.0, 0.0, 1.25, 0.5 / 0.9])  # r = 5 is dropped, not capped
    assert s["masked_fraction"] == 0.25 and s["capped_fraction"] == 0.0


def test_seq_mask_drops_a_sequence_by_its_geometric_mean_ratio():
    # sequence 0: sqrt(1 * 5) = 2.24 > 2 -> dropped; sequence 1: sqrt(1.25 * 0.556) = 0.83 -> kept, TIS weights
    w, s = _w("seq_mask", cap=2.0, low=0.5, high=2.0)
    assert w == pytest.approx([0.0, 0.0, 1.25, 0.5 / 0.9])
    assert s["masked_fraction"] == 0.5


def test_none_and_padding():
    w, _ = _w("none")
    assert w == [1.0, 1.0, 1.0, 1.0]
    w, s = importance_weights(OLD, SAMPLER, torch.tensor([[1.0, 0.0], [1.0, 1.0]]), "mis")
    assert w[0, 1] == 0 and s["masked_fraction"] == 0.0  # a padded position is neither counted nor weighted


def test_the_loss_weights_each_token_by_its_correction():
    adv = torch.tensor([1.0, -2.0])  # one per sequence; ratio pi / pi_old = 1 (old = the current policy)
    logp = OLD.clone().requires_grad_(True)
    loss, m = ppo_clip_loss(logp, None, SAMPLER, adv, MASK, 0.2, 2.0, "mis", (0.5, 2.0))
    by_hand = (-1.0 * (1.0 + 0.0) + 2.0 * (1.25 + 0.5 / 0.9)) / 4
    assert float(loss) == pytest.approx(by_hand)
    assert float(m["masked_fraction"]) == 0.25
    loss.backward()  # d/dlogp of -A w exp(logp - old) at logp = old: -A w
    assert logp.grad.flatten().tolist() == pytest.approx([-1.0 / 4, 0.0, 2.0 * 1.25 / 4, 2.0 * 0.5 / 0.9 / 4])


@pytest.mark.parametrize("override, field", [
    ("algorithm.ppo.correction=icepop", "algorithm.ppo.correction"),
    ("algorithm.grpo.mis_low=1.5", "algorithm.grpo.mis_low"),
])
def test_bad_correction_settings_name_the_field(override, field):
    from megatron_async_rlhf.train import load_config

    name = override.split(".")[1]
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config([f"algorithm.name={name}", override], cuda=False)
