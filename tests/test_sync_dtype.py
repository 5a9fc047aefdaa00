"""Weight sync in the engine's dtype (``rollout.dtype``): an fp32 learner feeding a bf16 engine converts on the
learner, so half the bytes leave it, and the engine ends up with exactly the weights it would have loaded itself."""

import pytest
import torch

from megatron_async_rlhf.launch import WorkerGroup
from megatron_async_rlhf.weights.sync import dtype_from_name, wire_dtype


def test_wire_dtype_is_the_engines_unless_widening():
    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    assert wire_dtype(f32, bf16) == bf16  # converted on the learner: half the bytes
    assert wire_dtype(f32, f16) == f16
    assert wire_dtype(bf16, f32) == bf16  # widening is exact: the engine's load casts, the wire carries 2 bytes
    assert wire_dtype(f16, bf16) == bf16  # same size, not exact either way: the engine's dtype
    assert wire_dtype(bf16, bf16) == bf16 and wire_dtype(f32, None) == f32  # None: the engine did not say
    assert dtype_from_name("torch.bfloat16") == bf16 and dtype_from_name(None) is None
    with pytest.raises(ValueError, match="unknown weight dtype"):
        dtype_from_name("torch.complex64")


def _bf16_engine_job(session, hf_dir, backend):
    """Learner fp32 TP1, one engine in bf16: the engine's log-probs of fixed sequences before any sync, after a sync
    of the unchanged weights (must be identical: the learner rounds fp32 -> bf16 as the engine's own load did), and
    after an optimizer step (must move)."""
    import torch.distributed as dist

    from megatron_async_rlhf.cluster import setup
    from megatron_async_rlhf.config import ClusterConfig, RolloutConfig, from_dict
    from megatron_async_rlhf.learner.build import model_from_hf
    from megatron_async_rlhf.learner.forward import pad_batch
    from megatron_async_rlhf.learner.train import OptimConfig, train_step, wrap_for_training
    from megatron_async_rlhf.rollout.base import EngineSettings
    from megatron_async_rlhf.rollout.client import RolloutClient
    from megatron_async_rlhf.rollout.server import serve

    ccfg = ClusterConfig(rollout_engines=1, timeout_s=120, bucket_mb=0.05)
    ctx = setup(ccfg, session, 2)
    if ctx.role.kind == "engine":
        rcfg = from_dict(RolloutConfig, {"backend": backend, "dtype": "bfloat16"})
        return serve(ctx, EngineSettings(hf_dir, 1, rcfg))
    cfg, model, info = model_from_hf(hf_dir, 1, 1, dtype=torch.float32)
    client = RolloutClient(ctx)
    seqs = [[1, 5, 9, 13, 17, 21, 25, 29], [1, 40, 41, 42, 43]]
    try:
        out = {"engine_dtype": client.engine_dtype, "fresh": client.score(seqs)}
        out["sync"] = client.sync_weights(model, info, cfg, 0)
        out["synced"] = client.score(seqs)
        ddp, opt = wrap_for_training(model, OptimConfig(lr=0.05, clip_grad=0.0))
        train_step(ddp, opt, [{"tokens": pad_batch(seqs, 2)}], lambda lp, b: (-lp.mean(), {}), cfg.vocab_size)
        client.sync_weights(model, info, cfg, 1)
        out["stepped"] = client.score(seqs)
        out["params"] = sum(p.numel() for p in model.parameters()) - (
            cfg.dims.hidden_size * (info.padded_vocab - cfg.vocab_size))  # the tied embedding's vocab padding
        return out
    finally:
        client.shutdown()
        dist.barrier()


@pytest.mark.multiproc
@pytest.mark.parametrize("backend", ["hf", "vllm"])
def test_fp32_learner_sends_bf16_to_a_bf16_engine(tiny_models, backend):
    with WorkerGroup(2, default_group=False, timeout_s=300) as group:
        out = group.run(_bf16_engine_job, f"bf16-{backend}", tiny_models["tiny-tied"], backend)[0]
    assert out["engine_dtype"] == torch.bfloat16
    assert out["sync"]["sync_bytes"] == 2 * out["params"]  # bf16 on the wire, not the learner's fp32
    assert out["sync"]["buckets"] >= 3
    assert out["synced"] == out["fresh"]  # bit-identical: the same rounding of the same weights
    change = max(abs(a - b) for x, y in zip(out["fresh"], out["stepped"]) for a, b in zip(x, y))
    assert change > 1e-2, change  # the second sync reached the engine
