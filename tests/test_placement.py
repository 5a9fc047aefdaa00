"""reward.placement=rollout (the engine's rank scores its own samples right after generating them) and dedicated (the
engine hands them to a reward rank of its own), with real vLLM: the rewards that come back equal the controller's own
scoring of the same samples; with a reward model there the learner holds none; a NaN reward stops the learner."""

import json
import re

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


def _poisoned_reward_model(hf_dir: str, out: str, poison: bool = True) -> str:
    """A tiny HF reward model on the policy's tokenizer whose embedding of ``z`` is NaN (``poison``): a prompt or
    completion with a ``z`` scores NaN through the real transformers forward, every other text a finite score."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tok = AutoTokenizer.from_pretrained(hf_dir)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, vocab_size=len(tok), num_labels=1, pad_token_id=tok.pad_token_id,
                      max_position_embeddings=256)
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(cfg)
    with torch.no_grad():
        if poison:
            model.model.embed_tokens.weight[tok("z", add_special_tokens=False)["input_ids"][0]] = float("nan")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _reward_model_off_the_learner_job(session, hf_dir, world_size, rm_dir, placement, out_dir):
    """Placement rollout/dedicated with a reward model: the controller holds none (eval.judge=reward_model included),
    its evaluation is scored on the rollout side by it; a NaN reward stops the learner on every path where rewards
    reach it (carried from the rollout side, scored by the controller, evaluated)."""
    import dataclasses
    import gc
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from megatron_async_rlhf.cluster import setup
    from megatron_async_rlhf.config import ClusterConfig, RewardConfig, RolloutConfig, run_config_from_dict
    from megatron_async_rlhf.data.tasks import Row
    from megatron_async_rlhf.evaluation import RUN_REWARD, Evaluations
    from megatron_async_rlhf.metrics import Metrics
    from megatron_async_rlhf.rewards import placement as placements
    from megatron_async_rlhf.rewards.placement import (TEXT_SCORES, NonFiniteReward, carried_rewards,
                                                        controller_scorer, learner_rewards, serve_rewards,
                                                        text_scores_handler)
    from megatron_async_rlhf.rewards.reward_model import RewardModelScorer
    from megatron_async_rlhf.rollout.base import EngineSettings, SamplingSettings
    from megatron_async_rlhf.rollout.client import RolloutClient
    from megatron_async_rlhf.rollout.server import serve

    reward = {"kind": "reward_model", "reward_model_path": rm_dir, "placement": placement}
    rc = RewardConfig(**reward)
    dedicated = placement == "dedicated"
    ctx = setup(ClusterConfig(rollout_engines=1, reward_ranks=int(dedicated), timeout_s=60), session, world_size)
    if ctx is None:
        return None
    if ctx.role.kind == "reward":
        return serve_rewards(ctx, rc, hf_dir)
    if ctx.role.kind == "engine":  # as modes/rl.py starts it
        return serve(ctx, EngineSettings(hf_dir, 1, RolloutConfig()), reward=None if dedicated else rc,
                     handlers={TEXT_SCORES: text_scores_handler(rc, hf_dir)})
    client = RolloutClient(ctx)
    try:
        tok = AutoTokenizer.from_pretrained(hf_dir)
        ids = lambda rows: [[tok.bos_token_id] + tok(r.prompt, add_special_tokens=False)["input_ids"] for r in rows]
        clean, poisoned = [Row("Q: 3+4= A:", "7"), Row("Q: 2+2= A:", "4")], Row("Q: zz+1= A:", "1")
        cfg = run_config_from_dict({"reward": reward, "eval": {"judge": "reward_model"},
                                    "logging": {"out_dir": out_dir, "wandb_mode": "disabled"}})
        data = SimpleNamespace(eval_ids=ids(clean), eval_rows=clean, tok=tok, stops=())
        metrics = Metrics(out_dir, {}, wandb_mode="disabled")
        reward_fn = controller_scorer(cfg.reward, tok)  # what modes/rl.py builds on the controller
        evals = Evaluations(cfg, data, reward_fn, metrics, True)
        before = evals.run(client, 0)
        gc.collect()
        held = sum(type(o) is RewardModelScorer for o in gc.get_objects())  # reward models in this process
        judge_is_run_reward = evals.evaluator().judge is RUN_REWARD
        written = [json.loads(x) for x in open(before["file"])]
        # eval.win_rate_against=answers: the reference answers are scored on the rollout side too
        cfg_answers = run_config_from_dict({"reward": reward, "eval": {"judge": "reward_model",
                                                                       "win_rate_against": "answers"},
                                            "logging": {"out_dir": out_dir + "/answers", "wandb_mode": "disabled"}})
        against = Evaluations(cfg_answers, data, reward_fn, metrics, True)
        against.run(client, 0)
        gc.collect()
        held += sum(type(o) is RewardModelScorer for o in gc.get_objects())

        sampling = SamplingSettings(max_new_tokens=6, n=2, stop_token_ids=(), seed=3)
        rows = clean + [poisoned]
        good = client.generate(ids(clean), sampling, clean)
        r, timing = learner_rewards(ctx, None, good, clean, client.last_collect, rc, 2)
        out = {"held": held, "judge_is_run_reward": judge_is_run_reward, "reward_fn": reward_fn, "written": written,
               "before": {k: v for k, v in before.items() if k != "file"}, "good": r, "carried": carried_rewards(good)}
        errors = {}
        try:  # scored on the rollout side, NaN for the poisoned prompt's samples (and any completion with a z)
            learner_rewards(ctx, None, client.generate(ids(rows), sampling, rows), rows, client.last_collect, rc, 7)
        except NonFiniteReward as e:
            errors["carried"] = str(e)
        # reference scores of the evaluated completions, now loaded here
        rm = RewardModelScorer(rm_dir)
        out["reference"] = rm.score([w["prompt"] for w in written], [w["completion"] for w in written])
        out["answers_judged"] = against.evaluator().first_judged
        out["answers_reference"] = rm.score([r.prompt for r in clean], [r.answer for r in clean]).tolist()
        rc_here = dataclasses.replace(rc, placement="controller")
        try:  # scored by the controller
            learner_rewards(ctx, controller_scorer(rc_here, tok), client.generate(ids(rows), sampling), rows, {},
                            rc_here, 9)
        except NonFiniteReward as e:
            errors["controller"] = str(e)
        bad_eval = Evaluations(cfg, SimpleNamespace(eval_ids=ids(rows), eval_rows=rows, tok=tok, stops=()), None,
                               metrics, True)
        try:  # an evaluation
            bad_eval.run(client, 5)
        except NonFiniteReward as e:
            errors["eval"] = str(e)
        metrics.close()
        return {**out, "errors": errors}
    finally:
        client.shutdown()
        placements.SCORERS.clear()  # this worker process runs the next test's controller too


@pytest.mark.parametrize("placement", ["rollout", "dedicated"])
def test_reward_model_only_where_rewards_are_scored_and_nan_stops(ppool, tiny_models, tmp_path, placement):
    hf = tiny_models["tiny-gqa"]
    rm_dir = _poisoned_reward_model(hf, str(tmp_path / "rm"))
    world = 3 if placement == "dedicated" else 2
    out = ppool.run(_reward_model_off_the_learner_job, f"rm-off-learner-{placement}", hf, world, rm_dir, placement,
                    str(tmp_path / "run"))[0]
    # the learner holds no reward model: not the scorer, not a second copy for eval.judge=reward_model
    assert out["reward_fn"] is None and out["held"] == 0 and out["judge_is_run_reward"]
    # the evaluation was scored on the rollout side by the reward model, and judged by the same scores
    got = torch.tensor([w["reward"] for w in out["written"]])
    torch.testing.assert_close(got, out["reference"], atol=1e-5, rtol=0)
    assert [w["judge"] for w in out["written"]] == [w["reward"] for w in out["written"]]
    assert out["before"]["judge_mean"] == pytest.approx(got.mean().item(), abs=1e-6)
    assert torch.isfinite(out["good"]).all() and torch.equal(out["good"], out["carried"])
    assert out["answers_judged"] == pytest.approx(out["answers_reference"], abs=1e-5)
    # a NaN reward stops the learner, naming the source, the step and the prompt, on each path it arrives by
    e = out["errors"]
    assert set(e) == {"carried", "controller", "eval"}, e
    assert "reward.kind=reward_model returned nan for" in e["carried"] and "at RL step 7;" in e["carried"]
    assert "at RL step 9;" in e["controller"] and "at the evaluation at step 5;" in e["eval"]
    prompts = ["Q: 3+4= A:", "Q: 2+2= A:", "Q: zz+1= A:"]
    for msg in e.values():  # the first bad sample's prompt: the poisoned one, unless a completion drew a z
        m = re.search(r"prompt index (\d+) \('([^']*)'\)", msg)
        assert m and prompts[int(m[1])] == m[2], msg
    assert "prompt index 2 ('Q: zz+1= A:')" in e["eval"]  # greedy: the clean prompts' completions score finite


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


@pytest.mark.parametrize("placement", ["rollout", "dedicated"])
def test_fully_async_scores_each_group_with_a_reward_model_off_the_learner(tiny_models, tmp_path, placement):
    """schedule=fully_async with a reward model: each group is scored where reward.placement puts the scorer as soon
    as it finishes (beside the engine, or on a reward rank of its own), and the steps train on those scores."""
    import json
    import os
    import subprocess
    import sys

    hf = tiny_models["tiny-gqa"]
    rm_dir = _poisoned_reward_model(hf, str(tmp_path / "rm"), poison=False)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = tmp_path / "run"
    extra = ["cluster.reward_ranks=1"] if placement == "dedicated" else []
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_async_rlhf", f"logging.out_dir={out}", "logging.wandb_mode=disabled",
         "schedule=fully_async", "pin_cpus=false", "sft.steps=0", "algorithm.steps=4", "algorithm.prompts_per_step=4",
         "data.eval_size=4", "eval.every=0", "algorithm.max_staleness=1", "reward.kind=reward_model",
         f"reward.reward_model_path={rm_dir}", f"reward.placement={placement}", *extra],
        cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    rl = [r for r in map(json.loads, open(out / "metrics.jsonl")) if r["phase"] == "rl"]
    assert [r["step"] for r in rl] == [1, 2, 3, 4]
    assert all(r["staleness_max"] <= 1 for r in rl)
    # a reward model's scores, not a checker's 0/1: every prompt's k samples differ, so every prompt makes a pair
    assert all(r["pairs"] == 4 and r["reward_mean"] not in (0.0, 1.0) for r in rl), rl
