"""mode=rm checkpoints, SIGTERM and resume (issue 22): a reward-model run continues exactly where it stopped.

Real subprocesses (`python -m megatron_async_rlhf mode=rm`, 2 learner ranks, DP2) on the toy marker preferences: an
uninterrupted run A; a run B stopped with SIGTERM to its whole process group (like Slurm) after a few steps, which
must write a checkpoint of its last step and exit 0, then resumed with ``resume=auto`` to the end. B must end where A
ends: the same metrics rows (every logged number, the held-out accuracies included) and the same exported weights,
bit for bit. The linear learning-rate schedule, an epoch boundary inside the run and a checkpoint in mid-epoch make a
resume that restores nothing, or only part (weights without optimizer state, or without the data order), differ.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from megatron_async_rlhf.errors import ConfigError
from test_resume import _rows  # metrics rows written so far (a run may be writing)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 40 training pairs (~33 comparison groups) / 8 a step: an epoch ends inside the run; checkpoints at 5, 10, 15
STEPS, EVERY, STOP_AFTER = 16, 5, 3
COMMON = ["mode=rm", "logging.wandb_mode=disabled", "pin_cpus=false", "cluster.learner_dp=2", f"rm.steps={STEPS}",
          "rm.eval_every=4", "rm.lr=7e-4", "rm.lr_schedule=linear", "rm.batch_size=8", "rm.micro_batch=8",
          "data.train_size=40", "data.eval_size=24", f"checkpoint.every={EVERY}", "checkpoint.keep=3"]


def _write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def _start(out, data, *extra):
    log = open(f"{out}.log", "a")
    return subprocess.Popen([sys.executable, "-m", "megatron_async_rlhf", f"data.source={data}",
                             f"logging.out_dir={out}", *COMMON, *extra],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _log(out):
    return open(f"{out}.log").read()


def _checkpoints(out):
    from megatron_async_rlhf.run_state import complete_checkpoints

    return [s for s, _ in complete_checkpoints(out)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from megatron_async_rlhf.data.preferences import marker_preferences

    root = tmp_path_factory.mktemp("rm_resume")
    data = root / "data"
    data.mkdir()
    _write_jsonl(data / "train.jsonl", marker_preferences(40, seed=0))
    _write_jsonl(data / "test.jsonl", marker_preferences(24, seed=1))
    a, b = str(root / "uninterrupted"), str(root / "interrupted")
    info = {"a": a, "b": b, "data": str(data)}
    ref = _start(a, data)
    p = _start(b, data)  # side by side with A: SIGTERM to the whole process group after step STOP_AFTER
    t_end = time.time() + 300
    while p.poll() is None and time.time() < t_end and not any(r["phase"] == "rm" and r["step"] >= STOP_AFTER
                                                                 for r in _rows(b)):
        time.sleep(0.005)
    assert p.poll() is None, f"run B ended (rc {p.poll()}) before step {STOP_AFTER}:\n{_log(b)[-3000:]}"
    t0 = time.time()
    os.killpg(p.pid, signal.SIGTERM)
    info["sigterm_rc"] = p.wait(timeout=300)
    info["sigterm_exit_s"] = time.time() - t0
    info["sigterm_steps"] = [r["step"] for r in _rows(b) if r["phase"] == "rm"]
    info["sigterm_checkpoints"] = _checkpoints(b)
    info["sigterm_log"] = _log(b)
    info["sigterm_exported"] = os.path.exists(os.path.join(b, "reward_model", "final"))

    p = _start(b, data, "resume=auto")
    assert p.wait(timeout=300) == 0, _log(b)[-3000:]
    assert ref.wait(timeout=300) == 0, _log(a)[-3000:]
    return info


@pytest.mark.multiproc
def test_rm_sigterm_checkpoints_the_last_step_and_exits_0(runs):
    assert runs["sigterm_rc"] == 0, runs["sigterm_log"][-3000:]
    steps = runs["sigterm_steps"]
    last = steps[-1]
    assert steps == list(range(1, last + 1)) and STOP_AFTER <= last < STEPS
    periodic = [s for s in range(EVERY, last, EVERY)]
    assert runs["sigterm_checkpoints"] == periodic + [last]  # the periodic ones and the last finished step's
    assert f"rm_stopped_after_step={last}" in runs["sigterm_log"]
    assert "rm_accuracy=" not in runs["sigterm_log"]  # stopped: no final evaluation, no export
    assert not runs["sigterm_exported"]
    print(f"SIGTERM -> exit 0 in {runs['sigterm_exit_s']:.1f} s, checkpoint after step {last}")


@pytest.mark.multiproc
def test_rm_resume_ends_exactly_where_the_uninterrupted_run_ends(runs):
    from safetensors.torch import load_file

    ref, got = _rows(runs["a"]), _rows(runs["b"])
    assert [(r["phase"], r["step"]) for r in got] == [(r["phase"], r["step"]) for r in ref]  # none lost, none twice
    for r, g in zip(ref, got):
        assert {k: v for k, v in r.items() if k != "wall_s"} == {k: v for k, v in g.items() if k != "wall_s"}
    evals = [r for r in ref if r["phase"] == "rm_eval"]
    assert [e["step"] for e in evals] == [0, 4, 8, 12, STEPS]
    assert len({e["accuracy"] for e in evals}) > 1 and len({r["loss"] for r in ref if r["phase"] == "rm"}) > 1
    last = {run: dict(kv.split("=", 1) for kv in _log(runs[run]).strip().splitlines()[-1].split()) for run in "ab"}
    for k in ("rm_accuracy", "rm_accuracy_before", "eval_pairs"):  # the run's last line
        assert last["a"][k] == last["b"][k]
    assert float(last["b"]["rm_accuracy"]) == pytest.approx(evals[-1]["accuracy"], abs=1e-4)
    wa = load_file(os.path.join(runs["a"], "reward_model", "final", "model.safetensors"))
    wb = load_file(os.path.join(runs["b"], "reward_model", "final", "model.safetensors"))
    assert wa.keys() == wb.keys()
    diff = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    print(f"final weights max abs diff {diff}, held-out accuracy {evals[-1]['accuracy']}")
    assert diff == 0.0
    assert _checkpoints(runs["b"]) == [5, 10, 15]  # the resumed run went on checkpointing (checkpoint.keep=3)


def _cfg(*overrides):
    from megatron_async_rlhf.train import load_config

    return load_config(list(overrides), cuda=False)


@pytest.mark.multiproc
def test_rm_checkpoint_resume_path_and_the_fields_it_fixes(runs):
    """``resume=PATH`` takes an rm checkpoint; what decides the numbers must not change (rm.lr, the data), rm.steps
    not below the checkpoint's step; an RL run does not take it, and a fresh run in its directory is refused."""
    from megatron_async_rlhf.run_state import find_resume

    b, data = runs["b"], runs["data"]
    path = os.path.join(b, "checkpoints", f"step_{EVERY:06d}")
    base = [f"data.source={data}", f"logging.out_dir={b}", *COMMON]
    assert find_resume(_cfg(*base, f"resume={path}")) == path
    # what does not decide the numbers may change: the layout, evaluation cadence, micro-batch, length of the run
    assert find_resume(_cfg(*base, f"resume={path}", "cluster.learner_dp=1", "rm.eval_every=0", "rm.micro_batch=4",
                            "rm.steps=30", "checkpoint.every=2")) == path
    with pytest.raises(ConfigError, match=r"rm\.lr=0\.001 \(checkpoint: 0\.0007\)"):
        find_resume(_cfg(*base, f"resume={path}", "rm.lr=1e-3"))
    with pytest.raises(ConfigError, match=r"data\.train_size=32 \(checkpoint: 40\)"):
        find_resume(_cfg(*base, f"resume={path}", "data.train_size=32"))
    with pytest.raises(ConfigError, match=r"rm\.steps=4 is below the checkpoint's step 5"):
        find_resume(_cfg(*base, f"resume={path}", "rm.steps=4"))
    with pytest.raises(ConfigError, match=r"mode='rl' \(checkpoint: 'rm'\)"):
        find_resume(_cfg(f"logging.out_dir={b}", f"resume={path}"))
    r = subprocess.run([sys.executable, "-m", "megatron_async_rlhf", *base], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "resume=auto to continue it" in r.stderr, r.stderr[-2000:]
    assert _checkpoints(b) == [5, 10, 15]  # nothing deleted
