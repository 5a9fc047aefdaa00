"""Weight updates while requests are in flight (issue 21, the streaming interface of ``rollout.backend=vllm``):
per-token policy versions from vLLM's own step labels, and the sampler's log-probs checked against independent HF
transformers references of the weights that really produced each token.

One in-process vLLM engine (tiny-gqa, fp32, block size 32 so that 40-token prompts fill a prefix-cache block) for
the module; two weight sets: A (the checkpoint) and B (fresh random weights of the same shape), streamed in as
buckets between two engine steps. Greedy decoding where tokens are compared, seeded T=1 sampling where only
log-probs are."""

import copy

import pytest
import torch

from megatron_async_rlhf.rollout.base import FinishedGroup, Sample, SamplingSettings, check_spans

P_LEN, S = 40, 6  # prompt tokens (> one 32-token block); engine steps before the update


def _prompt(i: int) -> list[int]:
    return [1] + [(7 * i + 3 * j) % 200 + 10 for j in range(P_LEN - 1)]


@pytest.fixture(scope="module")
def models(tiny_models):
    from transformers import LlamaForCausalLM

    a = LlamaForCausalLM.from_pretrained(tiny_models["tiny-gqa"], torch_dtype=torch.float32).eval()
    b = copy.deepcopy(a)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in b.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.3 * noise if name.endswith("norm.weight") else 0.1 * noise)
    return {"A": a, "B": b}


@pytest.fixture(scope="module")
def engine(tiny_models):
    from megatron_async_rlhf.config import RolloutConfig, from_dict
    from megatron_async_rlhf.rollout.base import EngineSettings, build_backend

    rc = from_dict(RolloutConfig, {"vllm": {"kv_cache_gib": 0.0625, "extra": {"block_size": 32}}})
    eng = build_backend(EngineSettings(tiny_models["tiny-gqa"], 1, rc), 0)
    yield eng
    eng.close()


def _receive(model, bucket_bytes=200_000):
    """``receive(alloc)`` streaming ``model``'s HF-named weights as packed buckets (what the learner sends)."""
    from megatron_async_rlhf.weights.sync import buckets, pack

    named = [(n, t.detach().clone()) for n, t in model.state_dict().items()]

    def gen(alloc):
        for b in buckets([[x] for x in named], bucket_bytes):
            header, flat = pack(b)
            yield header, alloc(flat.numel()).copy_(flat)
    return gen


def _run(engine, steps_before=None, update=None):
    """Step the engine until nothing is in flight; after ``steps_before`` steps call ``update()`` once. Returns
    {group id: samples}."""
    done, n = {}, 0
    while engine.in_flight():
        if n == steps_before:
            update()
        for g in engine.step():
            assert isinstance(g, FinishedGroup) and g.group_id not in done
            done[g.group_id] = g.samples
        n += 1
    if steps_before is not None:
        assert n > steps_before, "every request finished before the update"
    return done


def _lp(logits, toks):
    return logits.float().log_softmax(-1).gather(-1, torch.tensor(toks)[:, None])[:, 0]


@torch.no_grad()
def _pure(model, prompt, toks):
    """Logits predicting each output token, the whole sequence under one model."""
    return model(torch.tensor([prompt + toks])).logits[0, len(prompt) - 1:len(prompt) - 1 + len(toks)]


@torch.no_grad()
def _mixed(a, b, prompt, toks, split):
    """in_flight_kv=keep: the keys/values of every position before the last token sampled before the update come
    from ``a`` (they were computed before it); that token's and all later ones from ``b``."""
    ids, cut = torch.tensor([prompt + toks]), len(prompt) + split - 1
    first = a(ids[:, :cut], use_cache=True)
    rest = b(ids[:, cut:], past_key_values=first.past_key_values, use_cache=True).logits[0]
    return torch.cat([first.logits[0], rest])[len(prompt) - 1:len(prompt) - 1 + len(toks)]


def _load(engine, model, version):
    stats = engine.load_weight_stream(_receive(model), version)
    assert stats["tensors"] == len(model.state_dict()) and stats["buckets"] > 1
    return stats


def test_sample_versions_default_and_checkpoint_round_trip():
    """Pure: a Sample made without spans has one span at its version; old checkpoints (no ``versions`` field) and
    new ones load back equal."""
    from megatron_async_rlhf import run_state

    s = Sample(0, [1, 2], [5, 6, 7], [-0.1, -0.2, -0.3], "stop", 4)
    assert s.versions == [(4, 0, 3)] and s.newest_version == 4 and s.token_versions() == [4, 4, 4]
    two = Sample(0, [1], [5, 6, 7], [0.0] * 3, "length", 2, versions=[(2, 0, 1), (3, 1, 3)])
    assert two.version == 2 and two.newest_version == 3 and two.token_versions() == [2, 3, 3]
    assert run_state.from_json(run_state.to_json(two)) == two
    old = run_state.to_json(s)
    del old["fields"]["versions"]  # written before the field existed
    assert run_state.from_json(old) == s
    check_spans([(0, 0, 2), (1, 2, 5)], 5)
    for bad, n in (([(0, 0, 2), (1, 3, 5)], 5), ([(0, 0, 2)], 3), ([(1, 0, 2), (0, 1, 3)], 3), ([], 2),
                   ([(0, 0, 0), (1, 0, 2)], 2)):
        with pytest.raises(ValueError, match="do not"):
            check_spans(bad, n)


def test_hf_backend_has_no_streaming(tiny_models):
    from megatron_async_rlhf.config import RolloutConfig
    from megatron_async_rlhf.rollout.base import EngineSettings, build_backend

    hf = build_backend(EngineSettings(tiny_models["tiny-tied"], 1, RolloutConfig(backend="hf")), 0)
    with pytest.raises(NotImplementedError, match="rollout.backend='hf' has no streaming generation"):
        hf.admit(0, [1, 2, 3], SamplingSettings())
    with pytest.raises(NotImplementedError, match="update_weights_between_steps"):
        hf.update_weights_between_steps(lambda alloc: iter(()), 1)


def test_round_and_streaming_samples_carry_vllm_version_labels(engine, models):
    """The round path (generate) and streaming with no update: one span at the engine's version, taken from vLLM's
    labels; streaming's k separate requests get generate's seeds, so the same samples; generate and score while
    groups are in flight."""
    _load(engine, models["A"], 3)
    assert engine.llm.llm_engine.get_weight_version() == "3"
    # the sync went through vLLM's weight-transfer lifecycle with the project's backend
    assert engine.llm.collective_rpc(lambda w: type(w.weight_transfer_engine).__name__) == ["MrlhfShmEngine"]
    s = SamplingSettings(max_new_tokens=8, n=2, seed=7)
    prompts = [_prompt(0), _prompt(1)]
    rounds = engine.generate(prompts, s, first_index=5)
    assert all(x.versions == [(3, 0, len(x.token_ids))] and x.version == 3 for x in rounds)
    for i, p in enumerate(prompts):
        engine.admit(10 + i, p, s, prompt_index=5 + i)
    assert engine.in_flight() == 2
    engine.step()
    # generate and score beside the streaming requests: they run to the end, the streaming groups are not disturbed
    greedy = engine.generate([_prompt(2)], SamplingSettings(temperature=0.0, max_new_tokens=30))[0]
    ref = _pure(models["A"], greedy.prompt_ids, greedy.token_ids)
    assert greedy.token_ids == ref.argmax(-1).tolist() and greedy.versions == [(3, 0, 30)]
    seq = _prompt(3)[:12]
    scored = torch.tensor(engine.score([seq])[0])
    with torch.no_grad():
        want = _lp(models["A"](torch.tensor([seq])).logits[0, :-1], seq[1:])
    assert (scored - want).abs().max() < 1e-4
    assert engine.in_flight() == 2  # both finished meanwhile (8 tokens < 30): kept for the next step()
    done = _run(engine)
    streamed = done[10] + done[11]
    assert [x.token_ids for x in streamed] == [x.token_ids for x in rounds]
    assert [x.prompt_index for x in streamed] == [5, 5, 6, 6]
    assert all(x.versions == [(3, 0, len(x.token_ids))] for x in streamed)
    for x in streamed:  # independent check: HF under A
        assert (torch.tensor(x.logprobs) - _lp(_pure(models["A"], x.prompt_ids, x.token_ids), x.token_ids)
                ).abs().max() < 1e-4


def test_recompute_update_mid_request(engine, models):
    """in_flight_kv=recompute: samples straddling the update have two spans split at the step of the update; tokens
    before it have A's log-probs, after it B's (the requests were re-prefilled under B), seeded T=1 sampling."""
    _load(engine, models["A"], 0)
    s = SamplingSettings(max_new_tokens=16, n=2, seed=3)
    for i in range(2):
        engine.admit(i, _prompt(i), s)
    done = _run(engine, S, lambda: engine.update_weights_between_steps(_receive(models["B"]), 1, "recompute"))
    assert engine.version == 1 and engine.llm.llm_engine.get_weight_version() == "1"
    straddled = 0
    for x in done[0] + done[1]:
        n = len(x.token_ids)
        if n <= S:  # stopped (EOS) before the update
            assert x.versions == [(0, 0, n)]
            continue
        straddled += 1
        assert x.versions == [(0, 0, S), (1, S, n)] and x.version == 0 and x.newest_version == 1
        lp = torch.tensor(x.logprobs)
        ref_a = _lp(_pure(models["A"], x.prompt_ids, x.token_ids), x.token_ids)
        ref_b = _lp(_pure(models["B"], x.prompt_ids, x.token_ids), x.token_ids)
        assert (lp[:S] - ref_a[:S]).abs().max() < 1e-4
        assert (lp[S:] - ref_b[S:]).abs().max() < 1e-4
    assert straddled >= 3


def test_keep_update_mid_request_samples_from_the_mixed_model(engine, models):
    """in_flight_kv=keep: the old keys/values stay, so the tokens after the update come from a MIXED model (A's KV
    for the positions computed before it, B for the rest): greedy tokens are that model's argmax and the sampler's
    log-probs match it, not a pure-B re-score."""
    _load(engine, models["A"], 0)
    s = SamplingSettings(temperature=0.0, max_new_tokens=16, n=1)
    for i in range(2):
        engine.admit(i, _prompt(i + 2), s)
    done = _run(engine, S, lambda: engine.update_weights_between_steps(_receive(models["B"]), 1, "keep"))
    far_from_pure_b = 0.0
    for gid in (0, 1):
        (x,) = done[gid]
        n = len(x.token_ids)
        assert n > S and x.versions == [(0, 0, S), (1, S, n)]
        ref = _mixed(models["A"], models["B"], x.prompt_ids, x.token_ids, S)
        assert x.token_ids == ref.argmax(-1).tolist()  # a valid (greedy) continuation of the mixed model
        lp = torch.tensor(x.logprobs)
        assert (lp - _lp(ref, x.token_ids)).abs().max() < 1e-4
        pure_b = _lp(_pure(models["B"], x.prompt_ids, x.token_ids), x.token_ids)
        far_from_pure_b = max(far_from_pure_b, (lp[S:] - pure_b[S:]).abs().max().item())
    assert far_from_pure_b > 1e-2  # the hazard is real: keep's log-probs are not the new policy's


def test_keep_update_new_request_never_hits_old_prefix_blocks(engine, models):
    """A request admitted after a keep-update, with the same (>= one block) prompt as one still in flight, must not
    reuse the prefix KV blocks A computed: its greedy tokens are pure B's."""
    _load(engine, models["A"], 0)
    s = SamplingSettings(temperature=0.0, max_new_tokens=12, n=1)
    p = _prompt(5)
    engine.admit(0, p, s)

    def update():
        engine.update_weights_between_steps(_receive(models["B"]), 1, "keep")
        engine.admit(1, p, s)

    done = _run(engine, 3, update)
    (late,) = done[1]
    assert late.versions == [(1, 0, len(late.token_ids))]
    assert late.token_ids == _pure(models["B"], p, late.token_ids).argmax(-1).tolist()
    # and the one in flight continued from A's blocks (the mixed model), diverging from the late request
    (old,) = done[0]
    assert old.versions[0] == (0, 0, 3) and old.token_ids != late.token_ids


def test_abort_all(engine, models):
    s = SamplingSettings(max_new_tokens=50, n=2, seed=1)
    engine.admit(0, _prompt(0), s)
    engine.admit(1, _prompt(1), s)
    engine.step()
    with pytest.raises(ValueError, match="group 1 is already in flight"):
        engine.admit(1, _prompt(1), s)
    with pytest.raises(RuntimeError, match="use update_weights_between_steps"):
        engine.load_weight_stream(_receive(models["A"]), 9)
    with pytest.raises(ValueError, match="in_flight_kv='drop'"):
        engine.update_weights_between_steps(_receive(models["A"]), 9, "drop")
    assert sorted(engine.abort_all()) == [0, 1] and engine.in_flight() == 0
    assert not engine.llm.llm_engine.has_unfinished_requests()
    assert engine.step() == []


@pytest.fixture(scope="module")
def mp_engine(tiny_models):
    """vLLM's multi-process engine core (the GPU default): it steps on its own, so an update pauses its scheduler."""
    from megatron_async_rlhf.config import RolloutConfig, from_dict
    from megatron_async_rlhf.rollout.base import EngineSettings, build_backend

    rc = from_dict(RolloutConfig, {"vllm": {"kv_cache_gib": 0.0625, "engine_multiprocess": True,
                                            "extra": {"block_size": 32}}})
    eng = build_backend(EngineSettings(tiny_models["tiny-gqa"], 1, rc), 1)
    assert not eng.core_in_process
    yield eng
    eng.close()


@pytest.mark.parametrize("kv", ["recompute", "keep"])
def test_multiprocess_engine_core_updates_between_steps(mp_engine, models, kv):
    """The engine core runs ahead of step(), so where the split falls is vLLM's to say: whatever it says, the tokens
    before it have A's log-probs and those after it B's (recompute) or the mixed model's (keep)."""
    _load(mp_engine, models["A"], 0)
    s = SamplingSettings(max_new_tokens=20, n=2, seed=11)
    for i in range(3):
        mp_engine.admit(i, _prompt(i + 6), s)
    done = _run(mp_engine, 2, lambda: mp_engine.update_weights_between_steps(_receive(models["B"]), 1, kv))
    straddled = 0
    for x in (x for g in done.values() for x in g):
        n = len(x.token_ids)
        if len(x.versions) == 1:
            assert x.versions == [(0, 0, n)] or x.versions == [(1, 0, n)]
            continue
        straddled += 1
        (_, _, split), (v1, start, end) = x.versions
        assert v1 == 1 and start == split and end == n and 0 < split < n
        lp = torch.tensor(x.logprobs)
        ref_a = _lp(_pure(models["A"], x.prompt_ids, x.token_ids), x.token_ids)
        after = _pure(models["B"], x.prompt_ids, x.token_ids) if kv == "recompute" else \
            _mixed(models["A"], models["B"], x.prompt_ids, x.token_ids, split)
        assert (lp[:split] - ref_a[:split]).abs().max() < 1e-4
        assert (lp[split:] - _lp(after, x.token_ids)[split:]).abs().max() < 1e-4
    assert straddled >= 4


def test_a_failed_update_leaves_the_engine_updatable(engine, models):
    """A sync that dies half-way (the learner's stream broke) closes vLLM's weight-update session, so the next sync
    starts cleanly and leaves the engine exactly on the weights it sent."""
    full = _receive(models["B"], bucket_bytes=20_000)

    def broken(alloc):
        for i, item in enumerate(full(alloc)):
            if i == 3:
                raise ConnectionError("learner went away")
            yield item

    with pytest.raises(ConnectionError, match="went away"):
        engine.load_weight_stream(broken, 7)
    _load(engine, models["A"], 8)
    out = engine.generate([_prompt(4)], SamplingSettings(temperature=0.0, max_new_tokens=6))[0]
    assert out.versions == [(8, 0, len(out.token_ids))]
    assert out.token_ids == _pure(models["A"], out.prompt_ids, out.token_ids).argmax(-1).tolist()
