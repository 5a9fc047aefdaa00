"""The rollout-backend interface in one process: config and registry errors, and the transformers backend (``hf``)
against a plain forward of the same model (its multi-process weight-sync parity runs in test_rollout.py)."""

import pytest
import torch

from megatron_async_rlhf.config import RolloutConfig, from_dict
from megatron_async_rlhf.errors import ConfigError


def test_rollout_config_sections_and_errors():
    rc = from_dict(RolloutConfig, {"backend": "hf", "vllm": {"kv_cache_gib": "0.5", "extra": {"a": 1}}})
    assert rc.backend == "hf" and rc.vllm.kv_cache_gib == 0.5 and rc.vllm.extra == {"a": 1}
    with pytest.raises(ConfigError, match=r"kv_cache_gib moved: set rollout\.vllm\.kv_cache_gib instead"):
        from_dict(RolloutConfig, {"kv_cache_gib": 1.0})
    with pytest.raises(ConfigError, match=r"rollout\.backend='sglang'.*\['hf', 'vllm'\]"):
        RolloutConfig(backend="sglang").validate()


@pytest.fixture(scope="module")
def hf_engine(tiny_models):
    from megatron_async_rlhf.rollout.base import EngineSettings, build_backend

    return build_backend(EngineSettings(tiny_models["tiny-tied"], 1, RolloutConfig(backend="hf")), 0)


def _forward_logprobs(engine, prompt, tokens, temperature):
    ids = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logits = engine.model(input_ids=ids).logits[0, len(prompt) - 1:-1].float()  # [len(tokens), V]
    return (logits / temperature).log_softmax(-1).gather(-1, torch.tensor(tokens)[:, None])[:, 0]


def test_hf_samples_are_exact_seeded_and_split_independent(hf_engine):
    from megatron_async_rlhf.rollout.base import SamplingSettings

    prompts = [[1, 5, 6, 7], [1, 9, 9], [1, 30, 31, 32, 33]]
    s = SamplingSettings(temperature=0.7, max_new_tokens=8, n=2, seed=11)
    whole = hf_engine.generate(prompts, s)
    split = hf_engine.generate(prompts[:1], s) + hf_engine.generate(prompts[1:], s, first_index=1)
    assert [x.token_ids for x in whole] == [x.token_ids for x in split]  # per-prompt seeds, not per engine
    assert whole[0].token_ids != whole[1].token_ids  # sample k of a prompt: its own seed
    for x in whole:
        assert x.version == hf_engine.version and len(x.logprobs) == len(x.token_ids)
        assert x.finish_reason == ("stop" if x.token_ids[-1] in hf_engine.eos_ids else "length")
        ref = _forward_logprobs(hf_engine, x.prompt_ids, x.token_ids, 0.7)  # after temperature, like vLLM
        assert (torch.tensor(x.logprobs) - ref).abs().max() < 1e-5
    seq = whole[0].prompt_ids + whole[0].token_ids
    scored = torch.tensor(hf_engine.score([seq])[0][len(whole[0].prompt_ids) - 1:])
    assert (scored - _forward_logprobs(hf_engine, whole[0].prompt_ids, whole[0].token_ids, 1.0)).abs().max() < 1e-5

    greedy = hf_engine.generate(prompts[:1], SamplingSettings(temperature=0, max_new_tokens=4))[0]
    ref = _forward_logprobs(hf_engine, prompts[0], greedy.token_ids, 1.0)
    assert torch.allclose(torch.tensor(greedy.logprobs), ref, atol=1e-5)
    stop = greedy.token_ids[1]
    stopped = hf_engine.generate(prompts[:1], SamplingSettings(temperature=0, max_new_tokens=4,
                                                               stop_token_ids=(stop,)))[0]
    assert stopped.finish_reason == "stop" and stopped.token_ids == greedy.token_ids[:greedy.token_ids.index(stop) + 1]


def test_hf_weight_update_checks_every_name(hf_engine):
    from megatron_async_rlhf.weights.sync import buckets, pack

    state = {n: p.detach().clone() for n, p in hf_engine.model.named_parameters()}

    def receive(named, bucket_bytes=20_000):
        def gen(alloc):
            for b in buckets([[x] for x in named], bucket_bytes):
                header, flat = pack(b)
                yield header, alloc(flat.numel()).copy_(flat)
        return gen

    new = [(n, t + 0.01) for n, t in state.items()]
    stats = hf_engine.load_weight_stream(receive(new), version=3)
    assert hf_engine.version == 3 and stats["tensors"] == len(state) and stats["buckets"] > 1
    assert torch.equal(hf_engine.params["model.norm.weight"], state["model.norm.weight"] + 0.01)
    with pytest.raises(ValueError, match="not received"):
        hf_engine.load_weight_stream(receive(new[1:]), version=4)
    with pytest.raises(ValueError, match="is not a parameter"):
        hf_engine.load_weight_stream(receive(new + [("model.bogus.weight", torch.zeros(2))]), version=4)
    hf_engine.load_weight_stream(receive(list(state.items())), version=0)  # back to the fixture's weights
    assert hf_engine.version == 0
