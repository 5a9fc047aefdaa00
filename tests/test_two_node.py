"""examples/two_node_local.sh end to end: two torchrun agents (a learner node, Megatron TP2; a rollout node, one vLLM
engine with TP2 in multi-process mode) pass the weight-sync check and both exit 0, and shut down cleanly: vLLM's
engine core and workers exit on their own (nothing force-killed) and nothing is left in /dev/shm. About a minute."""

import glob
import os
import secrets
import shutil
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _unmapped(paths: set[str]) -> set[str]:
    """The paths no live process maps (a leak; another test's live engine maps its own)."""
    mapped = set()
    for maps in glob.glob("/proc/[0-9]*/maps"):
        try:
            with open(maps) as f:
                mapped.update(line.split(None, 5)[-1].strip() for line in f if "/dev/shm/" in line)
        except OSError:
            pass
    return {p for p in paths if p not in mapped and os.path.exists(p)}


@pytest.mark.multiproc
def test_two_node_example_exits_0_on_both_nodes(tmp_path):
    before = set(glob.glob("/dev/shm/*"))
    run = secrets.token_hex(6)
    t0 = time.monotonic()
    r = subprocess.run(["bash", os.path.join(ROOT, "examples", "two_node_local.sh")], cwd=ROOT, capture_output=True,
                       text=True, timeout=400, env={**os.environ, "PYTHON": sys.executable, "GRACE": "20", "KEEP_LOGS": "1",
                                                       "MRLHF_RUN_ID": run})
    took = time.monotonic() - t0
    tail = f"stdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}"
    assert "agent exit codes: 0 (first) 0 (second)" in r.stderr, tail
    assert r.returncode == 0, tail
    assert r.stdout.strip().splitlines()[-1].startswith("max_abs_logprob_diff="), tail
    assert "FAIL:" not in r.stdout, tail
    logs = r.stdout.splitlines()[0].removeprefix("logs: ")
    try:
        agents = "".join(open(os.path.join(logs, f)).read() for f in ("a.log", "b.log"))
    finally:
        shutil.rmtree(logs, ignore_errors=True)
    # vLLM's engine core and workers stopped on their own, and no thread died inside C++ at exit
    for bad in ("force killing", "sending SIGTERM", "sending SIGKILL", "terminate called", "Traceback"):
        assert bad not in agents, f"{bad!r} in the agents' logs:\n{agents[-4000:]}"
    assert not glob.glob(f"/dev/shm/mrlhf-{run}-*"), "the run's weight buckets were left in /dev/shm"
    # vLLM's files carry no run id: new ones that no process maps (another job's live engine maps its own)
    leaks = {p for p in _unmapped(set(glob.glob("/dev/shm/vllm_dist_*")) - before)}
    assert not leaks, f"left in /dev/shm: {sorted(leaks)}"
    assert took < 300, took
