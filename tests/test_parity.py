"""The Megatron learner against HF transformers' LlamaForCausalLM (fp32), at TP1, TP2, PP2 and TP2xPP2, on configs
with GQA + llama3 rope scaling (tiny-gqa), tied embeddings + vocab not divisible by TP (tiny-tied), and an explicit
head_dim (tiny-tied, tiny-wide). Real megatron-core, 4 gloo processes shared by all tests."""

import functools

import pytest

from megatron_async_rlhf.hf_llama import read_config
from megatron_async_rlhf.learner import jobs
from megatron_async_rlhf.parity import TOLERANCE, compare, hf_reference, random_batches, reported

LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]


@functools.lru_cache(maxsize=None)
def _case(hf_dir: str):
    cfg = read_config(hf_dir)
    batches = random_batches(cfg.vocab_size, batch=2, seq_len=24, num=2, seed=1)  # 2 micro-batches: PP schedule
    return batches, hf_reference(hf_dir, batches)


@pytest.mark.multiproc
@pytest.mark.parametrize("preset", ["tiny-gqa", "tiny-tied"])
@pytest.mark.parametrize("tp,pp", LAYOUTS)
def test_logits_and_logprobs_match_transformers(pool, tiny_models, preset, tp, pp):
    hf_dir = tiny_models[preset]
    batches, ref = _case(hf_dir)
    out = reported(pool.run(jobs.parity_from_hf, hf_dir, tp, pp, batches))
    res = compare(out, ref)
    assert res.ok, f"{preset} tp={tp} pp={pp}: {res.line()}"


@pytest.mark.multiproc
def test_untuned_wide_config_at_tp2_pp2(pool, tiny_models):
    hf_dir = tiny_models["tiny-wide"]
    batches, ref = _case(hf_dir)
    res = compare(reported(pool.run(jobs.parity_from_hf, hf_dir, 2, 2, batches)), ref)
    assert res.max_abs_logit_diff <= TOLERANCE and res.max_abs_logprob_diff <= TOLERANCE, res.line()


def test_parity_detects_a_wrong_model(tiny_models):
    """The comparison is not vacuous: a different model's outputs fail it."""
    batches, ref = _case(tiny_models["tiny-gqa"])
    other = [(logits * 1.001, lp * 1.001) for logits, lp in ref]
    assert not compare(other, ref).ok
