"""Shared memory is owned by the run: the weight stream's bucket files (``/dev/shm/mrlhf-<run>-<pid>-<n>``) are removed
when their owner process is provably gone (its lock can be taken), never while it lives, and nothing is left after a
kill -9 of the rank that holds them, of another rank, or of the launcher. Real processes, the real allocator."""

import os
import secrets
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from megatron_async_rlhf.launch import WorkerError, WorkerGroup
from megatron_async_rlhf.rollout import weight_stream as ws
from megatron_async_rlhf.rollout.reaper import descendants, mapped_shm
from megatron_async_rlhf.weights import shm

SHM = shm.SHM_DIR

# a process that allocates two buckets through the real allocator, reports their paths, then waits for stdin to close
OWNER = textwrap.dedent("""
    import sys
    from megatron_async_rlhf.rollout import weight_stream as ws
    a, b = ws.shm_alloc(4096), ws.shm_alloc(10)
    print(" ".join(sorted(ws._SHM_PATHS.values())), flush=True)
    sys.stdin.read()
""")


def _owner():
    # a run of its own: this test process may already hold a lock of its run (an earlier test's shared memory),
    # which the children would otherwise share and _files() would list
    env = {**os.environ, shm.RUN_ID_ENV: secrets.token_hex(6)}
    p = subprocess.Popen([sys.executable, "-c", OWNER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                         env=env)
    return p, p.stdout.readline().split()


def _files(run: str) -> list[str]:
    return sorted(n for n in os.listdir(SHM) if n.startswith(f"mrlhf-{run}-"))


def test_killed_owners_files_are_swept_live_owners_kept():
    """kill -9 of one owner: its buckets and lock go at the next sweep; another live owner's stay, and go themselves
    at its normal exit."""
    (dead, dead_paths), (live, live_paths) = _owner(), _owner()
    try:
        assert len(dead_paths) == 2 and all(os.path.exists(p) for p in dead_paths + live_paths)
        dead_lock = dead_paths[0].rsplit("-", 1)[0] + ".lock"
        assert os.path.exists(dead_lock)
        assert not any(p in shm.sweep_stale_shm() for p in dead_paths + live_paths)  # both alive: nothing removed
        dead.kill()
        dead.wait()
        removed = shm.sweep_stale_shm()
        assert sorted(dead_paths + [dead_lock]) == sorted(p for p in removed if p in dead_paths + [dead_lock])
        assert not any(os.path.exists(p) for p in dead_paths + [dead_lock])
        assert all(os.path.exists(p) for p in live_paths)
    finally:
        live.stdin.close()  # a normal exit
        live.wait(timeout=60)
        dead.kill()
    run = os.path.basename(live_paths[0]).split("-")[1]
    assert _files(run) == []  # the live owner removed its own files and lock on exit


def test_a_reused_pid_does_not_keep_a_dead_runs_files():
    """Containers sharing /dev/shm repeat PIDs: files named with a PID that is alive here (this process's own) but
    whose lock nobody holds are another run's leftovers and go; a lock held by a live process keeps its files."""
    names = [f"mrlhf-deadrun1-{os.getpid()}-0", f"mrlhf-deadrun1-{os.getpid()}.lock", "mrlhf-deadrun2-1-3"]
    for n in names:
        open(os.path.join(SHM, n), "wb").close()
    try:
        removed = shm.sweep_stale_shm()
        assert sorted(os.path.join(SHM, n) for n in names) == sorted(p for p in removed if "deadrun" in p)
    finally:
        for n in names:
            if os.path.exists(os.path.join(SHM, n)):
                os.unlink(os.path.join(SHM, n))


def _job(hold_s: float, kill_self: bool = False):
    """Rank 0 holds two buckets (an engine leader mid-sync) for ``hold_s``; rank 1 dies by SIGKILL (a learner rank
    killed). ``kill_self``: rank 0 is killed while it holds them."""
    if int(os.environ["RANK"]) == 0:
        keep = [ws.shm_alloc(1 << 16), ws.shm_alloc(1 << 10)]
        if kill_self:
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(hold_s)
        return len(keep)
    time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.multiproc
def test_launcher_removes_shared_memory_of_killed_ranks():
    """Local launcher, 2 ranks: (1) kill -9 of another rank while rank 0 holds buckets (the launcher kills the rest and
    sweeps), (2) kill -9 of the rank that holds them. Nothing of the run is left in /dev/shm either way."""
    group = WorkerGroup(2, default_group=False, timeout_s=120, grace_s=1.0)
    run = group.run_id
    try:
        with pytest.raises(WorkerError, match="died"):
            group.run(_job, 60.0)
        assert _files(run) == []
    finally:
        group.close(force=True)
    group = WorkerGroup(1, default_group=False, timeout_s=120, grace_s=1.0)
    try:
        with pytest.raises(WorkerError, match="died"):
            group.run(_job, 0.0, kill_self=True)
        assert _files(group.run_id) == []
    finally:
        group.close(force=True)


LAUNCHER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r})
    if __name__ == "__main__":
        from megatron_async_rlhf.launch import WorkerGroup
        import test_shm
        group = WorkerGroup(1, default_group=False, timeout_s=120)
        print(group.run_id, group.pids()[0], flush=True)
        group.run(test_shm._hold_buckets)
        print("holding", flush=True)
        time.sleep(600)
""")


def _hold_buckets():
    ws._held = [ws.shm_alloc(1 << 16), ws.shm_alloc(1 << 10)]  # stays allocated after the job returns


@pytest.mark.multiproc
def test_nothing_left_after_kill_9_of_the_launcher(tmp_path):
    """kill -9 of the launcher: its rank dies with it (PR_SET_PDEATHSIG) holding buckets; the next run's start sweep
    (its first allocation) removes them."""
    script = tmp_path / "launcher.py"
    script.write_text(LAUNCHER.format(tests=os.path.dirname(__file__)))
    p = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        run, rank_pid = p.stdout.readline().split()
        assert p.stdout.readline().strip() == "holding"
        assert len([n for n in _files(run) if not n.endswith(".lock")]) == 2
        p.kill()
        p.wait()
        deadline = time.monotonic() + 30
        while os.path.exists(f"/proc/{rank_pid}") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not os.path.exists(f"/proc/{rank_pid}"), "the rank outlived its launcher"
        assert _files(run)  # left behind by the killed rank ...
        # ... until the next run starts: its first allocation sweeps
        new = subprocess.run([sys.executable, "-c", OWNER], input="", capture_output=True, text=True, timeout=120)
        assert new.returncode == 0, new.stderr
        assert _files(run) == []
    finally:
        p.kill()


ENGINE_RANK = textwrap.dedent("""
    import sys
    if __name__ == "__main__":
        from megatron_async_rlhf.config import RolloutConfig, from_dict
        from megatron_async_rlhf.rollout.base import EngineSettings, build_backend
        rc = from_dict(RolloutConfig, {{"vllm": {{"engine_multiprocess": True, "kv_cache_gib": 0.0625}}}})
        engine = build_backend(EngineSettings({model!r}, 2, rc), 0)
        engine.begin_weight_update()
        engine.bucket_buffer(1 << 16)  # a weight bucket in shared memory, as mid-sync
        print("ready", flush=True)
        sys.stdin.read()
""")


def _tree(root: int) -> list[int]:
    return sorted(descendants(root, exclude=-1))


@pytest.mark.multiproc
def test_kill_9_of_a_multiprocess_engines_rank_leaves_nothing(tmp_path, tiny_models):
    """A rank hosting a vLLM engine with TP2 in multi-process mode (engine core + 2 worker processes, their
    ``vllm_dist_*`` files, a weight bucket in ``mrlhf-*``) is killed with SIGKILL: vLLM's processes stop and every
    file goes (rollout/reaper.py), none left to a later sweep."""
    script = tmp_path / "engine_rank.py"
    script.write_text(ENGINE_RANK.format(model=tiny_models["tiny-tied"]))
    before = set(os.listdir(SHM))
    rank = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "VLLM_LOGGING_LEVEL": "ERROR"})
    procs: list[int] = []
    try:
        assert rank.stdout.readline().strip() == "ready"
        procs = [p for p in _tree(rank.pid) if "reaper" not in open(f"/proc/{p}/cmdline").read()]
        names = {p: open(f"/proc/{p}/comm").read().strip() for p in procs}
        assert sorted(names.values())[:3] == ["VLLM::EngineCor", "VLLM::Worker_TP", "VLLM::Worker_TP"], names
        # this engine's files (other jobs on the machine make their own meanwhile)
        made = {os.path.basename(p) for p in mapped_shm(procs + [rank.pid])} - before
        made = {n for n in made if n.startswith("vllm_dist_")} | {
            n for n in os.listdir(SHM) if n.startswith("mrlhf-") and n.split("-")[2].split(".")[0] == str(rank.pid)}
        assert any(n.startswith("vllm_dist_") for n in made) and any(n.startswith("mrlhf-") for n in made), made
        rank.kill()
        rank.wait()
        deadline = time.monotonic() + 60
        while any(os.path.exists(f"/proc/{p}") for p in procs) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = [(p, names[p]) for p in procs if os.path.exists(f"/proc/{p}")]
        assert not left, f"outlived their rank: {left}"
        while (made & set(os.listdir(SHM))) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not (made & set(os.listdir(SHM))), sorted(made & set(os.listdir(SHM)))
    finally:
        rank.kill()
        rank.wait()
        for p in procs:  # only what the test failed on: vLLM's processes
            if os.path.exists(f"/proc/{p}"):
                os.kill(p, signal.SIGKILL)
