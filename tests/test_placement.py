"""reward.placement=rollout (the engine's rank scores its own samples right after generating them) and dedicated (the
engine hands them to a reward rank of its own), with real vLLM: the rewards that come back equal the controller's own
scoring of the same samples."""

import pytest
import torch

from megatron_async_rlhf.launch import WorkerGroup

pytestmark = pytest.mark.multiproc


def _placement_job(session, hf_dir, world_size, reward: dict, placement: str = "rollout"):
    from transformers import AutoTokenizer

    from megatron_async_rlhf.cluster import setup
    from megatron_async_rlhf.config import ClusterConfig, RewardConfig, RolloutConfig
    from megatron_async_rlhf.data.tasks import Row
    from megatron_async_rlhf.rewards.placement import RewardFn, carried_rewards, serve_rewards
    from megatron_async_rlhf.rollout.client import RolloutClient
    from megatron_async_rlhf.rollout.base import EngineSettings, SamplingSettings
    from megatron_async_rlhf.rollout.server import serve

    from megatron_async_rlhf.rewards.judges import register

    # a judge that reads both texts, so a prompt paired with the wrong row or a shifted index shows
    register("prompt_and_length")(lambda ps, cs: [1000.0 * len(p) + len(c) for p, c in zip(ps, cs)])
    rc = RewardConfig(**reward, placement=placement)
    dedicated = placement == "dedicated"
    ctx = setup(ClusterConfig(rollout_engines=1, reward_ranks=int(dedicated), timeout_s=60), session, world_size)
    if ctx is None:
        return None
    if ctx.role.kind == "reward":
        return serve_rewards(ctx, rc, hf_dir)
    if ctx.role.kind == "engine":
        return serve(ctx, EngineSettings(hf_dir, 1, RolloutConfig()), reward=None if dedicated else rc)
    client = RolloutClient(ctx)
    try:
        tok = AutoTokenizer.from_pretrained(hf_dir)
        rows = [Row("Q: 3+4= A:", "7"), Row("Q: 2+2= A:", "4"), Row("what a lovely day", "")]
        prompts = [[tok.bos_token_id] + tok(r.prompt, add_special_tokens=False)["input_ids"] for r in rows]
        sampling = SamplingSettings(max_new_tokens=6, n=3, stop_token_ids=())
        scored = client.generate(prompts, sampling, rows)
        plain = client.generate(prompts, sampling)  # no rows sent: nothing to score there
        mine = RewardFn(rc, tok)(scored, rows)  # the controller's scoring of the very same samples
        return {"carried": carried_rewards(scored), "mine": mine, "plain": carried_rewards(plain),
                "timing": client.last_collect, "n": len(scored)}
    finally:
        client.shutdown()


@pytest.fixture(scope="module")
def ppool():
    group = WorkerGroup(3, default_group=False, timeout_s=300)
    yield group
    group.close(force=not group.alive)


@pytest.mark.parametrize("placement,reward", [
    ("rollout", {"kind": "math"}), ("rollout", {"kind": "judge", "judge": "vader"}),
    ("rollout", {"kind": "judge", "judge": "prompt_and_length"}),
    ("dedicated", {"kind": "judge", "judge": "prompt_and_length"}),
], ids=["rollout-math", "rollout-vader", "rollout-text", "dedicated-text"])
def test_placements_off_the_learner_score_like_the_controller(ppool, tiny_models, placement, reward):
    world = 3 if placement == "dedicated" else 2
    out = ppool.run(_placement_job, f"placement-{placement}-" + "-".join(reward.values()), tiny_models["tiny-gqa"],
                    world, reward, placement)[0]
    assert out["n"] == 9 and out["carried"] is not None
    torch.testing.assert_close(out["carried"], out["mine"], rtol=0, atol=0)
    if reward.get("judge") == "prompt_and_length":  # 3 samples per prompt, in prompt order: the rows travelled right
        assert [int(r) // 1000 for r in out["carried"].tolist()] == [10] * 6 + [17] * 3
    assert out["plain"] is None  # a request without rows comes back unscored (evaluation scores on the controller)
    assert "reward_s" in out["timing"] and out["timing"]["collect_wait_s"] >= 0


@pytest.mark.parametrize("overrides,message", [
    (["reward.placement=gpu0"], "reward.placement='gpu0'"),
    (["reward.placement=dedicated"], "set cluster.reward_ranks=1"),
    (["cluster.reward_ranks=1"], "those ranks would sit idle"),
    (["reward.dtype=fp16"], "reward.dtype='fp16': use auto, float32 or bfloat16"),
    (["mode=rm", "rm.lr_schedule=cosine"], "rm.lr_schedule='cosine': use constant or linear"),
    (["mode=rm", "rm.warmup_steps=100"], "rm.warmup_steps=100 must be >= 0 and < rm.steps=100"),
])
def test_bad_placements_are_named(overrides, message):
    from megatron_async_rlhf.errors import ConfigError
    from megatron_async_rlhf.train import load_config

    with pytest.raises(ConfigError, match=message):
        load_config(overrides, cuda=False)
