"""learner.precision=bf16 (Megatron mixed precision), the distributed optimizer and activation recompute, on tiny
models: bf16 log-probs against fp32 log-probs of the same weights, a bf16 step that learns and keeps fp32 main
weights in the optimizer, and switches that must not change the numbers (recompute, distributed optimizer)."""

import pytest
import torch

from megatron_async_rlhf.errors import ConfigError
from megatron_async_rlhf.checks.parity import random_batches, reported

# bf16 keeps 8 mantissa bits: a logit L is off by up to ~|L| * 2^-8 from rounding alone, and the weights and every
# layer's activations are rounded too. Measured on tiny-gqa, batch 8 x 32 (max |logit| 5.2): max |log-prob diff|
# 0.054 at TP1 and 0.059 at TP2xPP2 (mean 0.014), i.e. ~0.011 x max |logit|.
BF16_LOGPROB_RTOL = 0.02  # of the largest |logit|


def _learner(hf_dir: str, tp: int, pp: int, dtype, recompute: str = "none"):
    from megatron_async_rlhf.learner.build import model_from_hf

    return model_from_hf(hf_dir, tp, pp, dtype=dtype, recompute=recompute)


def _logprobs_job(hf_dir: str, tp: int, pp: int, tokens: torch.Tensor):
    from megatron_async_rlhf.learner.forward import forward_collect, token_logprobs
    from megatron_async_rlhf.checks.jobs import _reporter
    from megatron_async_rlhf.learner.logprobs import gather_vocab_parallel

    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        cfg, model, info = _learner(hf_dir, tp, pp, dtype)
        out[name] = token_logprobs(model, tokens, cfg.vocab_size, micro_batch=4)
        out[name + "_param_dtypes"] = {p.dtype for p in model.parameters()}
    logits = forward_collect(model, [tokens], lambda lg, i: gather_vocab_parallel(lg, cfg.vocab_size))
    out["max_logit"] = logits[0].float().abs().max().item() if logits else None
    return out if _reporter(info) else None


@pytest.mark.multiproc
@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 2)])
def test_bf16_logprobs_close_to_fp32_of_the_same_weights(pool, tiny_models, tp, pp):
    hf_dir = tiny_models["tiny-gqa"]
    tokens = random_batches(300, batch=8, seq_len=32, num=1, seed=3)[0]
    out = reported(pool.run(_logprobs_job, hf_dir, tp, pp, tokens))
    assert out["bf16_param_dtypes"] == {torch.bfloat16} and out["fp32_param_dtypes"] == {torch.float32}
    assert out["bf16"].dtype == torch.float32  # log-probs leave the learner in fp32 whatever its precision
    diff = (out["bf16"] - out["fp32"]).abs()
    print(f"tp={tp} pp={pp}: bf16 vs fp32 max |logprob diff| {diff.max():.4f}, mean {diff.mean():.5f}, "
          f"max |logit| {out['max_logit']:.2f}")
    assert diff.max() < BF16_LOGPROB_RTOL * out["max_logit"], diff.max()
    assert diff.max() > 0  # the bf16 model really computed in bf16


def _sft_micro_batches(vocab: int, seed: int, dp_rank: int = 0, micro: int = 4):
    tokens = random_batches(vocab, batch=8, seq_len=24, num=1, seed=seed + 100 * dp_rank)[0]
    return [{"tokens": tokens[i:i + micro]} for i in range(0, 8, micro)]


def _nll(lp, batch):
    loss = -lp.mean()
    return loss, {"loss": loss.detach()}


def _bf16_step_job(hf_dir: str, steps: int):
    from megatron_async_rlhf.checks.jobs import _reporter
    from megatron_async_rlhf.learner.train import OptimConfig, train_step, wrap_for_training
    from megatron_async_rlhf.weights.gather import full_hf_state_dict, stage_hf_tensors

    cfg, model, info = _learner(hf_dir, 1, 1, torch.bfloat16)
    ddp, opt = wrap_for_training(model, OptimConfig(lr=3e-3))
    batches = _sft_micro_batches(cfg.vocab_size, seed=5)
    losses = [train_step(ddp, opt, batches, _nll, cfg.vocab_size)["loss"] for _ in range(steps)]
    (inner,) = opt.chained_optimizers  # one Float16OptimizerWithFloat16Params
    main = [p for g in inner.optimizer.param_groups for p in g["params"]]  # what Adam updates: fp32 main copies
    model_params = [p for g in inner.float16_groups for p in g]
    mains = [p for g in inner.fp32_from_float16_groups for p in g]
    out = {
        "losses": losses,
        "model_dtypes": {p.dtype for p in model.parameters()},
        "main_grad_dtypes": {p.main_grad.dtype for p in model.parameters()},
        "adam_dtypes": {p.dtype for p in main} | {s.dtype for st in inner.optimizer.state.values()
                                                   for s in st.values() if torch.is_tensor(s) and s.dim()},
        # the model weights are the main weights rounded to bf16, and the main weights hold what bf16 cannot
        "model_is_rounded_main": all(torch.equal(m.to(torch.bfloat16), p) for m, p in zip(mains, model_params)),
        "main_has_more_bits": any(not torch.equal(m, m.to(torch.bfloat16).float()) for m in mains),
        "export_dtypes": {t.dtype for t in full_hf_state_dict(model, info, cfg).values()},
        "sync_dtypes": {t.dtype for _, t in stage_hf_tensors(model, info, cfg, torch.float32)},
    }
    return out if _reporter(info) else None


@pytest.mark.multiproc
def test_bf16_step_learns_and_keeps_fp32_main_weights(pool, tiny_models):
    out = reported(pool.run(_bf16_step_job, tiny_models["tiny-gqa"], 4))
    assert out["losses"][-1] < out["losses"][0] - 0.3, out["losses"]
    assert out["model_dtypes"] == {torch.bfloat16}
    assert out["main_grad_dtypes"] == {torch.float32}  # grads accumulated and all-reduced in fp32
    assert out["adam_dtypes"] == {torch.float32}  # main weights, exp_avg, exp_avg_sq
    assert out["model_is_rounded_main"] and out["main_has_more_bits"]
    assert out["export_dtypes"] == {torch.float32}  # HF export in the HF config's dtype (tiny models: float32)
    assert out["sync_dtypes"] == {torch.float32}  # the sync sends in the engine's dtype


def _switch_job(hf_dir: str, tp: int, variants: list[dict], steps: int = 2):
    """Train the same steps (each DP rank on its own data) once per variant; the full weights after, per variant."""
    from megatron_async_rlhf.checks.jobs import _reporter
    from megatron_async_rlhf.learner.parallel import ranks
    from megatron_async_rlhf.learner.train import OptimConfig, train_step, wrap_for_training
    from megatron_async_rlhf.weights.gather import full_hf_state_dict

    results = []
    for v in variants:
        cfg, model, info = _learner(hf_dir, tp, 1, torch.float32, v.get("recompute", "none"))
        ddp, opt = wrap_for_training(model, OptimConfig(lr=3e-3, distributed_optimizer=v.get("dist_opt", False)))
        batches = _sft_micro_batches(cfg.vocab_size, seed=7, dp_rank=ranks()["dp_rank"])
        losses = [train_step(ddp, opt, batches, _nll, cfg.vocab_size)["loss"] for _ in range(steps)]
        sd = full_hf_state_dict(model, info, cfg)
        results.append((losses, sd, type(opt.chained_optimizers[0]).__name__))
    return results if _reporter(info) else None


def _assert_same_training(a, b, atol):
    (la, sa, _), (lb, sb, _) = a, b
    torch.testing.assert_close(torch.tensor(la), torch.tensor(lb), atol=atol, rtol=0)
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], atol=atol, rtol=0, msg=k)


@pytest.mark.multiproc
def test_activation_recompute_changes_nothing(pool, tiny_models):
    none, selective, full = reported(pool.run(_switch_job, tiny_models["tiny-gqa"], 1,
                                              [{}, {"recompute": "selective"}, {"recompute": "full"}]))
    _assert_same_training(none, selective, atol=0)
    _assert_same_training(none, full, atol=0)


@pytest.mark.multiproc
def test_distributed_optimizer_matches_plain_at_dp2(pool, tiny_models):
    """TP2 x DP2 over the 4 processes, each DP replica on its own data: sharding the optimizer state over DP must
    give the same weights as replicating it (to fp32 reduction-order noise)."""
    plain, sharded = reported(pool.run(_switch_job, tiny_models["tiny-gqa"], 2, [{}, {"dist_opt": True}]))
    assert sharded[2] == "DistributedOptimizer" and plain[2] != "DistributedOptimizer"
    _assert_same_training(plain, sharded, atol=1e-6)


@pytest.mark.parametrize("override,message", [
    ("learner.precision=fp16", "learner.precision='fp16': use one of ['fp32', 'bf16']"),
    ("learner.recompute=all", "learner.recompute='all': use one of ['none', 'selective', 'full']"),
    ("learner.distributed_optimizer=maybe", "learner.distributed_optimizer='maybe' is not a valid bool"),
])
def test_bad_learner_settings_are_named(override, message):
    from megatron_async_rlhf.train import load_config

    with pytest.raises(ConfigError) as e:
        load_config([override])
    assert message in str(e.value)


def test_learner_defaults_to_fp32_and_gpu_recipes_to_bf16():
    from megatron_async_rlhf.train import load_config

    assert load_config([]).learner.params_dtype == torch.float32
    for recipe in ("rho1b_gsm8k", "llama3_8b_chat"):
        assert load_config([f"recipe={recipe}"], cuda=True).learner.params_dtype == torch.bfloat16
    big = load_config(["recipe=llama3_8b_chat"], cuda=True).learner
    assert big.distributed_optimizer and big.recompute != "none"


def test_every_recompute_setting_maps_to_megatron():
    from megatron_async_rlhf.config import LearnerConfig
    from megatron_async_rlhf.learner.model import RECOMPUTE

    assert set(LearnerConfig.RECOMPUTE) == set(RECOMPUTE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_function_matches_autograd_of_chunk_silu_mul(dtype):
    """The learner's SwiGLU (learner/layers.py) against megatron-core's own formula, value and gradient."""
    from megatron_async_rlhf.learner.layers import SwiGLU

    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 2 * 7, generator=g).to(dtype)  # [s, b, 2*ffn]
    up = torch.randn(5, 3, 7, generator=g).to(dtype)
    a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    gate, lin = torch.chunk(b, 2, dim=-1)
    ref = torch.nn.functional.silu(gate) * lin
    out = SwiGLU.apply(a)
    (out * up).sum().backward()
    (ref * up).sum().backward()
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    torch.testing.assert_close(a.grad, b.grad, atol=0 if dtype == torch.float32 else 1e-2, rtol=1e-6)
