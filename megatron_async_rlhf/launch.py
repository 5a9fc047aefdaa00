"""Start a group of local torch.distributed worker processes and run jobs on all of them.

Used by the tools when they are not started under torchrun (they start the processes they need themselves), and by
the test suite, which keeps one group alive across tests so megatron-core's import (6-8 s a process) is paid once.

A job is a module-level function ``fn(*args)`` run on every rank at once; ``run`` returns the per-rank results. If a
rank raises, its traceback is raised here and the group is torn down (the other ranks may be stuck in a collective);
if a rank dies or the job exceeds ``timeout_s`` (None: no limit), the same. Never a silent hang. The store binds its
own port (port 0: the kernel picks a free one while the store holds it), so no other process can take it between a
probe and the bind. Workers die with this process
(``preemption.die_with_parent``), even when it is killed with SIGKILL. Shared-memory files that killed workers leave
are removed when the group closes (the group's run id is in their names: ``weights/shm.py``); a job's rank, here or
under torchrun, shuts its engine down before it exits (``release_rank``).
"""

from __future__ import annotations

import atexit
import datetime
import os
import queue
import secrets
import socket
import sys
import time
import traceback
from typing import Any, Callable

import torch.multiprocessing as mp

from megatron_async_rlhf.errors import ConfigError


class WorkerError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, jobs, results, threads: int, pg_timeout_s: float, env: dict,
            default_group: bool, parent_pid: int) -> None:
    from megatron_async_rlhf.preemption import die_with_parent

    die_with_parent(parent_pid)
    os.environ.update(env)
    # the same environment torchrun gives its ranks: the store is served by the launcher (here: the parent)
    os.environ.update(
        {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world),
         "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "TORCHELASTIC_USE_AGENT_STORE": "True"}
    )
    import faulthandler
    import logging
    import signal

    import torch
    import torch.distributed as dist

    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 <pid>` prints every thread's stack

    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s %(levelname)s [rank {rank}] %(name)s: %(message)s")
    logging.getLogger("megatron_async_rlhf").setLevel(os.environ.get("MRLHF_WORKER_LOG_LEVEL", "INFO"))
    torch.set_num_threads(threads)
    try:
        if default_group:  # otherwise each job builds its own groups (cluster.setup)
            store = dist.TCPStore("127.0.0.1", port, is_master=False,
                                  timeout=datetime.timedelta(seconds=pg_timeout_s))
            dist.init_process_group(
                "nccl" if torch.cuda.is_available() else "gloo",
                store=dist.PrefixStore("default_pg/", store),
                rank=rank,
                world_size=world,
                timeout=datetime.timedelta(seconds=pg_timeout_s),
            )
        results.put((rank, "ready", None))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
        return
    while True:
        job = jobs.get()
        if job is None:
            break
        fn, args, kwargs = job
        try:
            results.put((rank, "ok", fn(*args, **kwargs)))
        except BaseException:
            results.put((rank, "error", traceback.format_exc()))
    release_rank()


def release_rank() -> None:
    """End a rank's job cleanly, before the interpreter exits: its rollout engine shut down (vLLM's engine core and
    worker processes stopped and joined, its threads and sockets closed) and its default group destroyed. Left to
    interpreter exit, a vLLM thread can wake inside C++ code after finalization began and abort the process
    ("terminate called without an active exception", SIGABRT), and vLLM's 5 s default grace kills its own workers."""
    import torch.distributed as dist

    try:
        if "megatron_async_rlhf.rollout.server" in sys.modules:
            sys.modules["megatron_async_rlhf.rollout.server"].close_engines()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class WorkerGroup:
    """``world`` local processes, like a torchrun launch: this process serves the TCP store at MASTER_PORT. With
    ``default_group`` every worker joins one gloo (CPU) / NCCL (GPU) default group over all of them; without, each job
    sets up its own groups from the store (a learner pool and a rollout pool, see cluster.py)."""

    def __init__(self, world: int, threads_per_rank: int = 1, timeout_s: float | None = 600.0,
                 env: dict | None = None, default_group: bool = True, grace_s: float = 30.0):
        import torch.distributed as dist

        self.world = world
        self.timeout_s = timeout_s  # None: a job may run as long as it runs
        self.grace_s = grace_s
        self._stop_deadline: float | None = None
        from megatron_async_rlhf.weights.shm import RUN_ID_ENV

        # the run's id, in the name of every shared-memory file its ranks make (weights/shm.py)
        self.run_id = (env or {}).get(RUN_ID_ENV) or secrets.token_hex(6)
        env = {**(env or {}), RUN_ID_ENV: self.run_id}
        ctx = mp.get_context("spawn")
        wait_s = timeout_s or _NO_LIMIT_STORE_S  # how long one store or collective operation may wait
        self._store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                                    timeout=datetime.timedelta(seconds=wait_s))
        port = self._store.port
        self._jobs = [ctx.Queue() for _ in range(world)]
        self._results = ctx.Queue()
        self._procs = [
            ctx.Process(
                target=_worker,
                args=(r, world, port, self._jobs[r], self._results, threads_per_rank, wait_s, dict(env or {}),
                      default_group, os.getpid()),
                # not daemonic: megatron-core's dist_checkpointing save starts child processes of its own;
                # close() (also registered atexit) ends the workers instead
                daemon=False,
                name=f"worker-{r}",
            )
            for r in range(world)
        ]
        for p in self._procs:
            p.start()
        atexit.register(self.close, force=True)
        self._collect("start-up")

    def _collect(self, what: str) -> list[Any]:
        """Per-rank results of the job in flight. A rank's error is raised at once. When a rank dies, the others get
        ``grace_s`` to finish (their own error, e.g. "engine 1 did not answer", says more than the death)."""
        out: list[Any] = [None] * self.world
        pending = set(range(self.world))
        deadline = time.monotonic() + self.timeout_s if self.timeout_s else float("inf")
        dead: dict[int, int | None] = {}
        while pending - set(dead):
            try:
                rank, status, payload = self._results.get(timeout=1.0)
            except queue.Empty:
                now = time.monotonic()
                for r in pending:
                    if r not in dead and not self._procs[r].is_alive():
                        dead[r] = self._procs[r].exitcode
                        deadline = min(deadline, now + self.grace_s)
                if now > deadline:
                    break
                if self._stop_deadline is not None and now > self._stop_deadline:
                    self.close(force=True)
                    raise WorkerError(f"{what} did not stop within the grace period after a stop signal; workers "
                                      "killed")
                continue
            if status == "error":
                self.close(force=True)
                died = f" (rank(s) {sorted(dead)} had died)" if dead else ""
                raise WorkerError(f"rank {rank} failed during {what}{died}:\n{payload}")
            out[rank] = payload
            pending.discard(rank)
        if dead:
            self.close(force=True)
            raise WorkerError(f"worker rank(s) {sorted(dead)} died during {what} (exit codes {list(dead.values())})")
        if pending:
            self.close(force=True)
            raise WorkerError(f"{what} did not finish within {self.timeout_s:.0f} s on rank(s) {sorted(pending)}")
        return out

    def run(self, fn: Callable, *args, **kwargs) -> list[Any]:
        """Run ``fn(*args, **kwargs)`` on every rank; the list of per-rank return values."""
        if not self.alive:
            raise WorkerError("the worker group was closed after an earlier failure")
        for q in self._jobs:
            q.put((fn, args, kwargs))
        return self._collect(getattr(fn, "__qualname__", str(fn)))

    def request_stop(self, grace_s: float) -> None:
        """Ask the job to stop at its next step boundary (``preemption.STOP_KEY`` in the store the workers use) and
        kill the workers if it has not returned within ``grace_s``."""
        from megatron_async_rlhf.preemption import STOP_KEY

        self._store.set(STOP_KEY, "1")
        self._stop_deadline = time.monotonic() + grace_s

    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    @property
    def alive(self) -> bool:
        return bool(self._procs) and all(p.is_alive() for p in self._procs)

    def close(self, force: bool = False) -> None:
        if not force:
            for q in self._jobs:
                q.put(None)
            for p in self._procs:
                p.join(timeout=30)
        for p in self._procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=10)
        if self._procs:  # a rank killed (kill -9, the OOM killer, or by us) leaves its shared memory: remove it
            from megatron_async_rlhf.weights.shm import sweep_stale_shm

            sweep_stale_shm(self.run_id)
        self._procs = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close(force=exc[0] is not None)


_NO_LIMIT_STORE_S = 1800.0  # no run time limit: one store operation or collective still waits at most this long


def check_launch_world(world: int) -> None:
    """Under torchrun, its WORLD_SIZE must be the ``world`` the run needs; a ConfigError naming both and the fix."""
    raw = os.environ.get("WORLD_SIZE", "")
    try:
        have = int(raw)
    except ValueError:
        raise ConfigError(f"WORLD_SIZE={raw!r} (set by the launcher) is not a number of processes. Fix: start with "
                          f"torchrun --nnodes=N --nproc_per_node=M where N x M = {world}") from None
    if have != world:
        raise ConfigError(f"started under torchrun with WORLD_SIZE={have}, but this run needs {world} processes "
                          "(cluster.*: learner_tp x learner_pp x learner_dp + rollout_engines x rollout_tp + "
                          f"reward_ranks). Fix: torchrun --nnodes=N --nproc_per_node=M with N x M = {world}, or "
                          f"change cluster.* to fit {have} processes")


def run_distributed(world: int, fn: Callable, *args, timeout_s: float | None = 600.0, default_group: bool = True,
                    stop_grace_s: float | None = None, **kwargs) -> list[Any]:
    """One job on a fresh group of ``world`` processes, or in this process's own torchrun world if it has one
    (then the result list holds only this rank's result, at its rank). With ``stop_grace_s``, a first SIGTERM/SIGINT
    asks the job to stop (``preemption``) and allows it that long; a second ends everything at once."""
    import torch.distributed as dist

    if "TORCHELASTIC_RUN_ID" in os.environ or (os.environ.get("RANK") and os.environ.get("WORLD_SIZE")):
        check_launch_world(world)
        if default_group and not dist.is_initialized():
            import torch

            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                                    timeout=datetime.timedelta(seconds=timeout_s or _NO_LIMIT_STORE_S))
        out: list[Any] = [None] * world
        # the launch's rank: a job may leave this process in a smaller default group (an engine's 1-rank one) or none
        try:
            out[int(os.environ["RANK"])] = fn(*args, **kwargs)
        finally:
            release_rank()
        return out
    with WorkerGroup(world, timeout_s=timeout_s, default_group=default_group) as group:
        if stop_grace_s is None:
            return group.run(fn, *args, **kwargs)
        from megatron_async_rlhf.preemption import stop_on_signals

        restore = stop_on_signals(lambda: group.request_stop(stop_grace_s))
        try:
            return group.run(fn, *args, **kwargs)
        finally:
            restore()
