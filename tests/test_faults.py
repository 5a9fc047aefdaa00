"""Fault injection on the main job, real processes (issue 22): an engine killed mid-generation, killed mid-sync and
hung is restarted and the run's numbers do not change; past ``rollout.max_restarts``, or when an engine's rank dies,
the run checkpoints what it trained, exits 1 naming the engine, and ``resume=auto`` finishes it with every step
trained once.

Faults are fired by ``MRLHF_FAULTS`` (``rollout/faults.py``): SIGKILL / SIGSTOP of the real vLLM engine-core process
(``rollout.vllm.engine_multiprocess=true``, vLLM's GPU default), or SIGKILL of the engine's rank.
Other faults of the table are tested where their code lives: kill -9 of the launcher and SIGTERM (test_resume.py),
corrupted / truncated checkpoints and a full disk (test_checkpoints.py), shared memory after kill -9 (test_shm.py).
"""

import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 24
COMMON = ["logging.wandb_mode=disabled", "sft.steps=20", f"algorithm.steps={STEPS}", "data.eval_size=32"]
MULTIPROCESS = ["rollout.vllm.engine_multiprocess=true", "cluster.bucket_mb=0.05"]  # a sync of many buckets


def _run(out, *extra, faults=None, timeout=900):
    env = {k: v for k, v in os.environ.items() if k != "MRLHF_FAULTS"}
    if faults:
        env["MRLHF_FAULTS"] = faults
    p = subprocess.run([sys.executable, "-m", "megatron_async_rlhf", f"logging.out_dir={out}", *COMMON, *extra],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout + p.stderr


def _rows(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _numbers(rows):
    """What a run computed: every row but events, without timings and the sync's bucket layout."""
    timing = re.compile(r"(_s|_seconds|_gbps|_bytes|^buckets|^tensors)$")
    return [{k: v for k, v in r.items() if not timing.search(k)} for r in rows if r["phase"] != "event"]


def _unmapped_vllm_shm() -> set[str]:
    names = {n for n in os.listdir("/dev/shm") if n.startswith(("vllm_", "psm_"))}
    mapped = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/maps") as f:
                mapped |= {os.path.basename(line.split()[-1]) for line in f if "/dev/shm/" in line}
        except OSError:
            pass
    return names - mapped


def _vllm_processes() -> list[int]:
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read(6) == b"VLLM::":
                    out.append(int(pid))
        except OSError:
            pass
    return out


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("baseline"))
    rc, log = _run(out)
    assert rc == 0, log[-3000:]
    return _rows(out)


@pytest.mark.multiproc
def test_killed_and_hung_engine_restarts_and_the_run_is_unchanged(baseline, tmp_path):
    shm_before = _unmapped_vllm_shm()
    rc, log = _run(tmp_path, *MULTIPROCESS, "rollout.max_restarts=3", "rollout.hang_timeout_s=6",
                   faults="kill@generate#5,kill@sync#9,stop@generate#14")
    assert rc == 0, log[-3000:]
    rows = _rows(tmp_path)
    events = [r for r in rows if r["phase"] == "event"]
    assert [(e["event"], e["while"], e["restart"]) for e in events] == [
        ("engine_restart", "generating", 1), ("engine_restart", "loading weights", 2),
        ("engine_restart", "generating", 3)], events
    assert events[0]["reason"] == events[1]["reason"] == "its engine core died"
    assert events[2]["reason"].startswith("hung past rollout.hang_timeout_s=6")
    # the repeated requests had the same prompts, seeds and weights: the same samples, so the same run
    assert _numbers(rows) == _numbers(baseline)
    assert _vllm_processes() == []
    assert _unmapped_vllm_shm() - shm_before == set()


@pytest.mark.multiproc
def test_engine_past_max_restarts_checkpoints_and_exits_1_naming_it(tmp_path):
    rc, log = _run(tmp_path, *MULTIPROCESS, "rollout.max_restarts=0", faults="kill@generate#5")
    assert rc == 1, log[-3000:]
    last = [ln for ln in log.splitlines() if "run stopped:" in ln][-1]
    assert "rollout engine 0 failed while generating: its engine core died" in last
    assert "rollout.max_restarts=0" in last and "resume=auto" in last
    # generation request 5 is round 3 (1: the evaluation before RL; round r+1 is requested while round r trains):
    # steps 1-3 were trained, round 3 is lost
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["reference", "step_000003"]
    assert _vllm_processes() == []


@pytest.mark.multiproc
def test_dead_engine_rank_checkpoints_and_resume_finishes_the_run(baseline, tmp_path):
    rc, log = _run(tmp_path, faults="kill-rank@generate#5")
    assert rc == 1, log[-3000:]
    assert "rollout engine 0 (rank 1) did not answer while generating" in log
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["reference", "step_000003"]
    rc, log = _run(tmp_path, "resume=auto")
    assert rc == 0, log[-3000:]
    rl = [r for r in _rows(tmp_path) if r["phase"] == "rl"]
    assert [r["step"] for r in rl] == list(range(1, STEPS + 1))  # every step trained once
    # the round the dead engine lost is generated again, by the checkpoint's (newer) weights: fresher, never staler
    assert [r["staleness"] for r in rl[3:5]] == [0, 1] and max(r["staleness"] for r in rl) <= 1
    base = [r for r in baseline if r["phase"] == "rl"]
    assert _numbers(rl[:3]) == _numbers(base[:3])  # what was checkpointed is kept as it was
