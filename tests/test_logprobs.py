"""Vocab-parallel log-probs (and their gradient) against plain log_softmax(...).gather on the full logits."""

import pytest
import torch

from megatron_async_rlhf.checks.parity import reported

V, VP = 37, 40  # real vocab, padded vocab (3 padded columns that must not count)


def _job(tp: int, temperature: float):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_async_rlhf.learner.logprobs import vocab_parallel_logprobs
    from megatron_async_rlhf.learner.parallel import init_learner_parallel

    init_learner_parallel(tp, 1)
    g = torch.Generator().manual_seed(7)  # identical data on every rank
    full = torch.randn(3, 5, VP, generator=g) * 4
    full[..., V:] = 50.0  # large junk in the padded columns: included by mistake, it would dominate
    targets = torch.randint(0, V, (3, 5), generator=g)
    weights = torch.randn(3, 5, generator=g)
    r, part = ps.get_tensor_model_parallel_rank(), VP // tp
    local = full[..., r * part:(r + 1) * part].clone().requires_grad_(True)
    lp = vocab_parallel_logprobs(local, targets, V, temperature)
    (lp * weights).sum().backward()
    grads = [torch.empty_like(local.grad) for _ in range(tp)]
    dist.all_gather(grads, local.grad, group=ps.get_tensor_model_parallel_group())
    if dist.get_rank() != 0:
        return None
    return full, targets, weights, lp.detach(), torch.cat(grads, -1)


@pytest.mark.multiproc
@pytest.mark.parametrize("tp,temperature", [(2, 1.0), (4, 0.7)])
def test_vocab_parallel_logprobs_and_grad_match_full_softmax(pool, tp, temperature):
    full, targets, weights, lp, grad = reported(pool.run(_job, tp, temperature))
    ref_in = full[..., :V].clone().requires_grad_(True)
    ref = torch.log_softmax(ref_in / temperature, dim=-1).gather(-1, targets[..., None])[..., 0]
    (ref * weights).sum().backward()
    torch.testing.assert_close(lp, ref.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(grad[..., :V], ref_in.grad, atol=1e-5, rtol=0)
    assert grad[..., V:].abs().max() == 0  # padded columns get no gradient
