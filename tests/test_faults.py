"""Fault injection on the main job, real processes (issue 22): an engine killed mid-generation, killed mid-sync and
hung is restarted and the run's numbers do not change; past ``rollout.max_restarts``, or when an engine's rank dies
(mid-generation or mid-sync), the run checkpoints what it trained, exits 1 naming the engine, and ``resume=auto``
finishes it with every step trained once. A learner rank killed with SIGKILL takes the run down without orphans and
``resume=auto`` continues exactly from the last checkpoint; SIGTERM during a checkpoint's write finishes it, stops
at the next step with a checkpoint and exit 0, and the resumed run is exact.

Faults are fired by ``MRLHF_FAULTS`` (``rollout/faults.py``): SIGKILL / SIGSTOP of the real vLLM engine-core process
(``rollout.vllm.engine_multiprocess=true``, vLLM's GPU default), or SIGKILL of the engine's rank.
Other faults of the table are tested where their code lives: kill -9 of the launcher and SIGTERM (test_resume.py),
corrupted / truncated checkpoints and a full disk (test_checkpoints.py), shared memory after kill -9 (test_shm.py).
"""

import json
import os
import re
import subprocess
import signal
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 24
COMMON = ["logging.wandb_mode=disabled", "sft.steps=20", f"algorithm.steps={STEPS}", "data.eval_size=32"]
MULTIPROCESS = ["rollout.vllm.engine_multiprocess=true", "cluster.bucket_mb=0.05"]  # a sync of many buckets


def _run(out, *extra, faults=None, timeout=900, common=COMMON):
    env = {k: v for k, v in os.environ.items() if k != "MRLHF_FAULTS"}
    if faults:
        env["MRLHF_FAULTS"] = faults
    p = subprocess.run([sys.executable, "-m", "megatron_async_rlhf", f"logging.out_dir={out}", *common, *extra],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout + p.stderr


def _rows(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _numbers(rows):
    """What a run computed: every row but events, without timings and the sync's bucket layout."""
    timing = re.compile(r"(_s|_seconds|_gbps|_bytes|_frac|^buckets|^tensors)$")  # _frac: shares of wall time
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
def test_engine_rank_killed_mid_sync_checkpoints_and_exits_1(tmp_path):
    rc, log = _run(tmp_path, faults="kill-rank@sync#6")  # sync 6 pushes v5 (1: v0 before RL)
    assert rc == 1, log[-3000:]
    assert "rollout engine 0 (rank 1) did not answer while receiving weights v5" in log
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["reference", "step_000005"]


@pytest.mark.multiproc
def test_engine_rank_killed_mid_generation_checkpoints_and_resume_finishes_the_run(baseline, tmp_path):
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


# ----- the learner's side: a rank killed, SIGTERM while a checkpoint is written -----------------------------------
def _start(out, *extra, common=(*COMMON, "checkpoint.every=4")):
    env = {k: v for k, v in os.environ.items() if k != "MRLHF_FAULTS"}
    return subprocess.Popen([sys.executable, "-m", "megatron_async_rlhf", f"logging.out_dir={out}", *common, *extra],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def _wait(proc, done, what, timeout=300):
    t_end = time.time() + timeout
    while proc.poll() is None and time.time() < t_end:
        if done():
            return
        time.sleep(0.005)
    raise AssertionError(f"run ended (rc {proc.poll()}) or timed out before {what}")


def _session(sid) -> list[int]:
    alive = []
    for d in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.getsid(int(d)) == sid and open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[0] != "Z":
                alive.append(int(d))
        except OSError:
            pass
    return alive


def _learner_rank0(launcher: int) -> int:
    """The first rank the launcher spawned (learner rank 0, the controller)."""
    import psutil

    ranks = [p for p in psutil.Process(launcher).children() if "spawn_main" in " ".join(p.cmdline())]
    return min(ranks, key=lambda p: p.create_time()).pid


def _rl(out):
    return [r for r in _rows(out) if r["phase"] == "rl"] if os.path.exists(os.path.join(out, "metrics.jsonl")) else []


def _kill_learner_rank0_and_see_the_session_gone(p) -> None:
    """kill -9 of learner rank 0: the launcher exits nonzero and no process of the session is left (the engine rank and
    vLLM go with it)."""
    os.kill(_learner_rank0(p.pid), signal.SIGKILL)
    assert p.wait(timeout=120) != 0
    t_end = time.time() + 30
    while _session(p.pid) and time.time() < t_end:
        time.sleep(0.2)
    assert _session(p.pid) == []


@pytest.mark.multiproc
def test_learner_rank_killed_then_resume_is_exact(baseline, tmp_path):
    p = _start(tmp_path)
    _wait(p, lambda: len(_rl(tmp_path)) >= 10, "step 10")
    _kill_learner_rank0_and_see_the_session_gone(p)
    assert "step_000008" in os.listdir(tmp_path / "checkpoints")
    rc, log = _run(tmp_path, "checkpoint.every=4", "resume=auto")
    assert rc == 0, log[-3000:]
    assert _numbers(_rl(tmp_path)) == _numbers([r for r in baseline if r["phase"] == "rl"])


@pytest.mark.multiproc
def test_sigterm_while_a_checkpoint_is_written_then_resume_is_exact(baseline, tmp_path):
    p = _start(tmp_path)
    ckpts = tmp_path / "checkpoints"
    _wait(p, lambda: ckpts.exists() and any(n.startswith("step_000004.tmp") for n in os.listdir(ckpts)),
          "checkpoint 4 being written")
    os.killpg(p.pid, signal.SIGTERM)
    assert p.wait(timeout=120) == 0
    # checkpoint 4 was finished, the run stopped at the next step with a checkpoint of its own
    from megatron_async_rlhf.run_state import complete_checkpoints

    assert [s for s, _ in complete_checkpoints(str(tmp_path))] == [4, 5]
    rc, log = _run(tmp_path, "checkpoint.every=4", "resume=auto")
    assert rc == 0, log[-3000:]
    assert _numbers(_rl(tmp_path)) == _numbers([r for r in baseline if r["phase"] == "rl"])


# ----- schedule=fully_async: the learner's controller killed while groups stream ------------------------------------
FULLY_ASYNC = ["logging.wandb_mode=disabled", "schedule=fully_async", "pin_cpus=false", "sft.steps=0",
               "algorithm.steps=6", "data.eval_size=8", "algorithm.max_staleness=1"]


@pytest.mark.multiproc
def test_fully_async_learner_rank_killed_then_resume_trains_each_step_once(tmp_path):
    """kill -9 of learner rank 0 (the controller, which holds the group ledger) after step 3 of 6: the run goes down
    without orphans; ``resume=auto`` continues from the newest checkpoint, admits the groups after it again and ends
    0 (the schedule raises at the end if its ledger does not balance): every step is in metrics.jsonl once."""
    p = _start(tmp_path, common=[*FULLY_ASYNC, "checkpoint.every=2"])
    _wait(p, lambda: len(_rl(tmp_path)) >= 3, "step 3")
    _kill_learner_rank0_and_see_the_session_gone(p)
    before = _rl(tmp_path)
    from megatron_async_rlhf.run_state import complete_checkpoints

    ckpt = max(s for s, _ in complete_checkpoints(str(tmp_path)))
    assert 2 <= ckpt <= len(before)
    rc, log = _run(tmp_path, "checkpoint.every=2", "resume=auto", common=FULLY_ASYNC)
    assert rc == 0, log[-3000:]
    assert re.search(rf"resumed from \S+step_{ckpt:06d} \(step {ckpt}\)", log), log[-3000:]
    rl = _rl(tmp_path)
    assert [r["step"] for r in rl] == list(range(1, 7))  # each step once: the rows after the checkpoint were cut
    assert rl[:ckpt] == before[:ckpt]  # what was checkpointed is kept as it was
    assert all(r["staleness_max"] <= 1 and r["version"] == r["step"] for r in rl)
    assert rl[ckpt]["staleness_max"] == 0  # the first resumed step's groups were generated again by its weights


@pytest.mark.multiproc
def test_fully_async_engine_killed_while_streaming_restarts_and_each_step_is_trained_once(tmp_path):
    """The engine core (its own process) killed after a streaming engine step with groups in flight (generation call
    3: 1 is the evaluation before RL, 2 and 3 are engine steps of step 1's groups), then hung (SIGSTOP) after the
    11th engine step: each time the rank restarts it with the weights it held, admits the groups in flight again,
    and the run finishes with every step trained once within the bound. (A death mid-sync between engine steps:
    test_fully_async.py; mid-sync without groups in flight is the round schedule's restart, above. The hang timeout
    bounds one engine step here: 6 s once killed a healthy step on the loaded 2-core machine.)"""
    vllm_before = set(_vllm_processes())  # (another run's engines may be up)
    rc, log = _run(tmp_path, *MULTIPROCESS, "rollout.max_restarts=2", "rollout.hang_timeout_s=20", common=FULLY_ASYNC,
                   faults="kill@generate#3,stop@generate#12")
    assert rc == 0, log[-3000:]
    rows = _rows(tmp_path)
    events = [r for r in rows if r["phase"] == "event"]
    assert [(e["event"], e["restart"], e["while"], e["reason"]) for e in events] == [
        ("engine_restart", 1, "generating (streaming)", "its engine core died"),
        ("engine_restart", 2, "generating (streaming)", "hung past rollout.hang_timeout_s=20 s")], events
    assert events[0]["version"] == 0
    assert "streaming groups admitted again after the restart" in log
    rl = [r for r in rows if r["phase"] == "rl"]
    assert [r["step"] for r in rl] == list(range(1, 7))  # each step once (the schedule's ledger balanced: exit 0)
    assert all(r["staleness_max"] <= 1 and r["version"] == r["step"] for r in rl)
    assert set(_vllm_processes()) - vllm_before == set()


@pytest.mark.multiproc
def test_fully_async_engine_past_max_restarts_checkpoints_and_exits_1_naming_it(tmp_path):
    """A streaming engine step's death with no restart left (found between two commands): the next command is
    answered ``failed``, the learner pool checkpoints what it trained and the run exits 1 naming the engine."""
    vllm_before = set(_vllm_processes())
    rc, log = _run(tmp_path, *MULTIPROCESS, "rollout.max_restarts=0", common=FULLY_ASYNC, faults="kill@generate#12")
    assert rc == 1, log[-3000:]
    last = [ln for ln in log.splitlines() if "run stopped:" in ln][-1]
    assert "rollout engine 0 failed while generating (streaming): its engine core died" in last
    assert "rollout.max_restarts=0" in last and "resume=auto" in last
    from megatron_async_rlhf.run_state import complete_checkpoints

    trained = len(_rl(tmp_path))
    assert 1 <= trained < 6 and [s for s, _ in complete_checkpoints(str(tmp_path))] == [trained]
    assert set(_vllm_processes()) - vllm_before == set()
