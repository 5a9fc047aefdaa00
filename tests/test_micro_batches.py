"""Micro-batches by row count or by token budget (learner/step.py): the plan keeps DPO pairs together and respects
the budget, and splitting a batch any way gives the loss and the gradient of the whole batch in one padded pass."""

from types import SimpleNamespace

import pytest
import torch

from megatron_async_rlhf.learner.step import plan_micro_batches


def test_row_count_plan_keeps_order_and_spreads_rows():
    assert plan_micro_batches([5] * 10, group=2, max_rows=8) == [list(range(6)), list(range(6, 10))]
    assert plan_micro_batches([5] * 4, group=1, max_rows=16) == [[0, 1, 2, 3]]


def test_token_budget_plan_packs_by_length_and_keeps_pairs():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, 40, (24,), generator=g).tolist()
    plan = plan_micro_batches(lengths, group=2, max_tokens=100)
    assert sorted(i for mb in plan for i in mb) == list(range(24))  # every row exactly once
    for mb in plan:
        assert len(mb) % 2 == 0 and all(mb[j] % 2 == 0 and mb[j + 1] == mb[j] + 1 for j in range(0, len(mb), 2))
        assert len(mb) * max(lengths[i] for i in mb) <= 100
    # longest first, so micro-batches of long rows hold few rows and short rows share theirs
    widths = [max(lengths[i] for i in mb) for mb in plan]
    assert widths == sorted(widths, reverse=True) and len(plan) > 1
    # padding: far less than one batch padded to the longest row
    padded = sum(len(mb) * max(lengths[i] for i in mb) for mb in plan)
    assert padded - sum(lengths) < 0.5 * (len(lengths) * max(lengths) - sum(lengths))


def test_a_row_longer_than_the_budget_trains_alone():
    assert plan_micro_batches([50, 10, 10, 10], group=1, max_tokens=30) == [[0], [1, 2, 3]]


def _batch(vocab: int, prompts: int, k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    samples, rewards = [], []
    for p in range(prompts):
        prompt = torch.randint(0, vocab, (int(torch.randint(2, 10, (1,), generator=g)),), generator=g).tolist()
        for j in range(k):
            n = int(torch.randint(1, 14, (1,), generator=g))
            samples.append(SimpleNamespace(prompt_ids=prompt, token_ids=torch.randint(0, vocab, (n,), generator=g).tolist(),
                                           logprobs=(-torch.rand(n, generator=g) * 3).tolist()))
            rewards.append(float(j == p % k) + 0.1 * j)
    return SimpleNamespace(samples=samples), torch.tensor(rewards)


def _split_job(hf_dir: str, tp: int, pp: int, name: str, splits: list[dict]):
    """One RL step (lr 0: the weights stay put) per way of splitting the same batch: loss, grad norm, local grads."""
    from megatron_async_rlhf.config import AlgorithmConfig
    from megatron_async_rlhf.learner.build import model_from_hf
    from megatron_async_rlhf.learner.model import build_model
    from megatron_async_rlhf.learner.step import rl_step
    from megatron_async_rlhf.learner.train import OptimConfig, wrap_for_training

    cfg, model, info = model_from_hf(hf_dir, tp, pp, dtype=torch.float32)
    ddp, opt = wrap_for_training(model, OptimConfig(lr=0.0, clip_grad=0.0))
    ref, _ = build_model(cfg, dtype=torch.float32, init=False)
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():  # a reference that differs from the policy, so the KL and DPO terms are not trivially 0
        for p in ref.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    ref.requires_grad_(False)
    batch, rewards = _batch(cfg.vocab_size, 8, 2, seed=11)
    out = []
    for sp in splits:
        ac = AlgorithmConfig(name=name, samples_per_prompt=2, micro_batch=sp.get("micro_batch", 1000))
        m = rl_step(batch, rewards, ac, ddp, opt, ref, cfg.vocab_size, sp.get("max_tokens", 0))
        grads = [p.main_grad.clone() for p in model.parameters()]
        out.append({"loss": m.get("loss"), "grad_norm": m["grad_norm"], "grads": grads, "dp": 4 // (tp * pp),
                    "micro_batches": m["micro_batches"], "pad_fraction": m["pad_fraction"]})
    return out


@pytest.mark.multiproc
@pytest.mark.parametrize("name,tp,pp", [("online_dpo", 1, 1), ("rloo", 1, 2), ("ppo", 2, 1), ("online_dpo", 2, 2),
                                        ("grpo", 1, 1)])
def test_any_split_gives_the_loss_and_gradient_of_one_padded_batch(pool, tiny_models, name, tp, pp):
    splits = [{}, {"max_tokens": 48}, {"micro_batch": 6}]  # one padded batch; a token budget; 6 + 6 + 4 rows
    per_rank = pool.run(_split_job, tiny_models["tiny-gqa"], tp, pp, name, splits)
    whole, budget, rows = per_rank[-1]  # the last rank is on the last pipeline stage, where the loss is computed
    assert per_rank[0][0]["loss"] == whole["loss"]  # and rank 0 (the controller, which logs) gets the same metrics
    # each data-parallel replica (4 ranks / (tp x pp)) splits its 16 / dp rows; micro_batches counts all replicas'
    dp = whole["dp"]
    assert whole["micro_batches"] == dp and budget["micro_batches"] > max(2, dp)
    assert rows["micro_batches"] == dp * -(-16 // dp // 6)  # dp 1: 6 + 6 + 4 rows
    assert budget["pad_fraction"] < whole["pad_fraction"]
    print(f"{name} tp{tp} pp{pp}: pad_fraction whole {whole['pad_fraction']:.3f}, budget {budget['pad_fraction']:.3f} "
          f"({budget['micro_batches']} micro-batches)")
    for other in (budget, rows):
        assert other["loss"] == pytest.approx(whole["loss"], rel=1e-5, abs=1e-6)
        assert other["grad_norm"] == pytest.approx(whole["grad_norm"], rel=1e-5)
    worst = 0.0
    for res in per_rank:  # every rank's own shard of the gradient
        w = res[0]["grads"]
        scale = max(g.abs().max().item() for g in w)
        for other in res[1:]:
            worst = max(worst, max((a - b).abs().max().item() for a, b in zip(w, other["grads"])) / scale)
    print(f"max |grad diff| / max |grad|: {worst:.2e}")
    assert worst < 1e-5
