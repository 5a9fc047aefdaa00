"""Stopping a run on SIGTERM / SIGINT (Slurm preemption, Ctrl-C) without losing it.

First signal: the run finishes the RL step it is in, writes a checkpoint, stops the engines and exits 0. A second
signal stops at once (the default action, no clean-up). Whoever receives the signal:

- the launcher (``launch.run_distributed`` with ``stop_grace_s``: the parent of local workers) sets ``STOP_KEY`` in the
  store it serves and gives the workers ``checkpoint.grace_s`` to finish; then it kills them and exits 1;
- every worker, local or torchrun's (Slurm signals the whole job, Ctrl-C the whole foreground process group), only
  notes it (``install_handlers``). Learner ranks agree at each step boundary (``stop_agreed``: a max over the learner
  pool of "this rank was signalled or the launcher asked"); engines keep serving until the controller stops them.

Workers never outlive their launcher: ``die_with_parent`` has the kernel kill a worker whose parent is gone (a kill -9
of the launcher included).
"""

from __future__ import annotations

import logging
import os
import signal
from typing import Callable

log = logging.getLogger(__name__)

STOP_KEY = "mrlhf/stop"
SIGNALS = (signal.SIGTERM, signal.SIGINT)
_signalled: list[int] = []


def _on_signal(signum, frame) -> None:
    _signalled.append(signum)
    for s in SIGNALS:  # the next one takes the default action: the process ends at once
        signal.signal(s, signal.SIG_DFL)
    log.warning("%s: stopping after the current step (checkpoint, then exit); signal again to stop now",
                signal.Signals(signum).name)


def install_handlers() -> None:
    """Worker side: note the first SIGTERM/SIGINT instead of dying (KeyboardInterrupt, SIGTERM's default)."""
    _signalled.clear()
    for s in SIGNALS:
        signal.signal(s, _on_signal)


def stop_agreed(store=None) -> bool:
    """Collective over the learner pool (its default group): True on every rank if any learner rank was signalled or
    the launcher set ``STOP_KEY`` in ``store``. Called at step boundaries, so all ranks stop after the same step."""
    import torch
    import torch.distributed as dist

    local = bool(_signalled) or (store is not None and store.check([STOP_KEY]))
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the learner pool's group is NCCL on GPUs
    flag = torch.tensor([1.0 if local else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def die_with_parent(parent_pid: int) -> None:
    """Have the kernel SIGKILL this process when its parent dies (Linux ``PR_SET_PDEATHSIG``); no-op elsewhere."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return
    PR_SET_PDEATHSIG = 1
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os._exit(1)


def checkpoint_writer_dies_with_us() -> None:
    """megatron-core's dist_checkpointing keeps one multiprocessing Manager per process for its write results
    (``filesystem_async._results_queue``), a spawned server that outlives a killed worker, and that SIGTERM kills: a
    preemption (Slurm signals every process of the job) arriving while a checkpoint is written broke the write
    ("BrokenPipeError") and failed the very checkpoint the signal asks for. Start it here instead, with
    ``_writer_server_init`` as its initializer: it dies with its rank and ignores SIGTERM/SIGINT (the rank decides
    when to stop). No-op where that module or attribute does not exist (other versions)."""
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async as fa
    except ImportError:
        return
    if getattr(fa, "_results_queue", "absent") is not None:
        return
    import multiprocessing as mp
    from multiprocessing.managers import SyncManager

    manager = SyncManager(ctx=mp.get_context("spawn"))
    manager.start(_writer_server_init, (os.getpid(),))
    fa._results_queue = manager.Queue()  # the proxy keeps its manager alive


def _writer_server_init(parent_pid: int) -> None:
    for s in SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    die_with_parent(parent_pid)


def stop_on_signals(request_stop: Callable[[], None]) -> Callable[[], None]:
    """Launcher side: the first SIGTERM/SIGINT calls ``request_stop()``; the second ends this process at once (its
    workers follow, ``die_with_parent``). Returns a function that restores the previous handlers."""
    previous = {s: signal.getsignal(s) for s in SIGNALS}

    def handler(signum, frame):
        for s in SIGNALS:
            signal.signal(s, signal.SIG_DFL)
        log.warning("%s: the run stops after its current step (checkpoint, engines stopped); signal again to stop "
                    "now", signal.Signals(signum).name)
        request_stop()

    for s in SIGNALS:
        signal.signal(s, handler)

    def restore() -> None:
        for s, h in previous.items():
            signal.signal(s, h)

    return restore
