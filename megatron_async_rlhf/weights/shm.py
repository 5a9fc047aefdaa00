"""Shared-memory files owned by their run (``/dev/shm/mrlhf-<run>-<pid>-<n>``): named, guarded by a lock their
owner holds for its life, and swept only when that owner is provably gone. The weight stream's buckets live in them
(``rollout/weight_stream.py``); the launcher sweeps its run after its ranks ended, and a multi-process engine's reaper
after its rank died (``rollout/reaper.py``). Standard library only.
"""

from __future__ import annotations

import atexit
import fcntl
import itertools
import os
import re
import secrets

SHM_DIR = "/dev/shm"
_counter = itertools.count()
_paths: set[str] = set()  # this process's files not freed yet


# A bucket file's name says whose it is: ``mrlhf-<run>-<pid>-<n>``. ``<run>``: the launch's run id (MRLHF_RUN_ID, set
# by the launcher for every rank; a random token per process when there is none), ``<pid>`` the allocating process.
# That process holds an exclusive flock on ``mrlhf-<run>-<pid>.lock`` for its whole life and creates the lock before any
# bucket. The kernel drops the lock when the process ends however it ends (kill -9 included), so "the lock can be taken"
# proves the owner is gone: a PID alone does not (containers that share /dev/shm repeat PIDs; a PID is reused).
RUN_ID_ENV = "MRLHF_RUN_ID"
_NAME = re.compile(r"mrlhf-([0-9A-Za-z]+)-(\d+)(?:-\d+|\.lock)")


def run_id() -> str:
    """This process's run id: the launcher's (MRLHF_RUN_ID), else a random token made once and exported to children."""
    rid = os.environ.get(RUN_ID_ENV)
    if not rid or not rid.isalnum():
        rid = os.environ[RUN_ID_ENV] = secrets.token_hex(6)
    return rid


_lock_fd: int | None = None
_owner: str | None = None  # "<run>-<pid>" of the lock this process holds


def _own_prefix() -> str:
    """``mrlhf-<run>-<pid>``, taking this process's lock first (once per process; a forked child takes its own)."""
    global _lock_fd, _owner
    owner = f"{run_id()}-{os.getpid()}"
    if _owner != owner:
        path = os.path.join(SHM_DIR, f"mrlhf-{owner}.lock")
        # locked under a name no sweeper reads, then renamed into place: a lock file is never seen unlocked
        tmp = f"{path}.{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(tmp, path)
        if _owner is None:
            atexit.register(_release_all)
        _lock_fd, _owner = fd, owner
    return f"mrlhf-{owner}"


def _release_all() -> None:
    """At a normal exit: unlink this process's bucket files still allocated (mapped pages stay until unmapped) and its
    lock. A killed process leaves them to the next sweep."""
    global _lock_fd, _owner
    if _owner != f"{run_id()}-{os.getpid()}":
        return  # a forked child: the files are its parent's
    for path in list(_paths):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    _paths.clear()
    try:
        os.unlink(os.path.join(SHM_DIR, f"mrlhf-{_owner}.lock"))
    except FileNotFoundError:
        pass
    if _lock_fd is not None:
        os.close(_lock_fd)
    _lock_fd, _owner = None, None


def sweep_stale_shm(run: str | None = None) -> list[str]:
    """Unlink the shared-memory files (``mrlhf-<run>-<pid>-<n>`` and their ``.lock``) whose owner process is provably
    gone: nobody holds its lock (an engine leader killed mid-run never reached ``shm_free``, and its buckets would hold
    ``/dev/shm``, i.e. RAM, until reboot). Live owners' files, in this run or any other, are kept. ``run``: only that
    run's files. Returns the paths removed."""
    removed = []
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return removed
    owners: dict[str, list[str]] = {}
    for name in names:
        m = _NAME.fullmatch(name)
        if m and (run is None or m.group(1) == run):
            owners.setdefault(f"{m.group(1)}-{m.group(2)}", []).append(name)
    for owner, files in owners.items():
        if owner == _owner:
            continue
        lock = os.path.join(SHM_DIR, f"mrlhf-{owner}.lock")
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            fd = None  # buckets without their lock: the owner made the lock first, so a sweeper removed it: gone
        try:
            if fd is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # alive
            # the lock file goes last: a concurrent sweeper that lists after this still finds the owner gone
            for name in sorted(files, key=lambda n: n.endswith(".lock")):
                try:
                    os.unlink(os.path.join(SHM_DIR, name))
                    removed.append(os.path.join(SHM_DIR, name))
                except FileNotFoundError:
                    pass  # another sweeper was first
        finally:
            if fd is not None:
                os.close(fd)
    return removed


def new_path() -> str:
    """A fresh file name of this process (its lock taken first)."""
    path = os.path.join(SHM_DIR, f"{_own_prefix()}-{next(_counter)}")
    _paths.add(path)
    return path


def remove(path: str) -> None:
    _paths.discard(path)
    if os.path.exists(path):
        os.unlink(path)  # the pages stay until the last mapping of them goes
