"""The vLLM backend's side of a weight sync: received buckets streamed into vLLM's workers, each loaded on arrival
(driven by ``RolloutBackend.load_weight_stream``), and the process-memory helpers every backend's stats use.

In-process engines get each bucket's tensors (views of the received buffer) directly. Multi-process engines (vLLM's
``VLLM_ENABLE_V1_MULTIPROCESSING=1``, one worker process per TP rank) get the name of a shared-memory file that the
bucket was received into: the workers map the same pages, nothing is copied or serialised. The files belong to the
run and the process that made them (``mrlhf-<run>-<pid>-<n>``, guarded by a lock that process holds), so files of a
killed process are removed by the next sweep and never those of a live one. (On GPU the same place is
for CUDA IPC handles; not written yet.) The next bucket is received while the workers load the current one, so at most
two buckets are alive on the engine (``weights.sync.consume_prefetched``); each is freed once its load returned.

Peak extra memory is measured per process as the rise of the peak resident set (``VmHWM``, reset through
``/proc/self/clear_refs``) over the resident set when the sync began.
"""

from __future__ import annotations

import atexit
import fcntl
import itertools
import logging
import os
import re
import secrets

import torch

from megatron_async_rlhf.weights.sync import Header, header_bytes, unpack

_SHM_DIR = "/dev/shm"
_counter = itertools.count()


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def reset_peak_rss() -> int:
    """Reset this process's peak resident set to its current size (Linux); returns the current size in bytes."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # the peak then covers the process's life: an over-estimate, never an under-estimate
    return _status_kb("VmRSS") * 1024


def peak_rss() -> int:
    return _status_kb("VmHWM") * 1024


_SHM_PATHS: dict[int, str] = {}  # storage address -> its shared-memory file, for buffers made by shm_alloc


def _key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


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
        path = os.path.join(_SHM_DIR, f"mrlhf-{owner}.lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a fresh name: nobody else holds it
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
    for path in list(_SHM_PATHS.values()):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    _SHM_PATHS.clear()
    try:
        os.unlink(os.path.join(_SHM_DIR, f"mrlhf-{_owner}.lock"))
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
        names = os.listdir(_SHM_DIR)
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
        lock = os.path.join(_SHM_DIR, f"mrlhf-{owner}.lock")
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
                    os.unlink(os.path.join(_SHM_DIR, name))
                    removed.append(os.path.join(_SHM_DIR, name))
                except FileNotFoundError:
                    pass  # another sweeper was first
        finally:
            if fd is not None:
                os.close(fd)
    return removed


_swept = False


def shm_alloc(nbytes: int) -> torch.Tensor:
    """A uint8 buffer in a new shared-memory file (``/dev/shm/mrlhf-<run>-<pid>-<n>``); ``shm_free`` unlinks it. The
    first call in a process sweeps files left by owners that are gone (:func:`sweep_stale_shm`)."""
    global _swept
    if not _swept:
        _swept = True
        removed = sweep_stale_shm()
        if removed:
            logging.getLogger("megatron_async_rlhf").info("removed %d shared-memory files of dead processes (%s ...)",
                                                          len(removed), removed[0])
    path = os.path.join(_SHM_DIR, f"{_own_prefix()}-{next(_counter)}")
    t = torch.from_file(path, shared=True, size=max(nbytes, 1), dtype=torch.uint8)[:nbytes]
    _SHM_PATHS[_key(t)] = path
    return t


def shm_free(t: torch.Tensor) -> None:
    path = _SHM_PATHS.pop(_key(t), None)
    if path and os.path.exists(path):
        os.unlink(path)  # the pages stay until the last mapping of them goes


class BucketRing:
    """Two receive buffers used in turn for one sync (bucket i+2 reuses bucket i's, which ``consume_prefetched`` has
    finished loading by then): fresh pages cost as much as the copy into them (a 64 MB buffer: ~22 ms to fault in vs
    ~3.5 ms to refill). Shared-memory files for workers in other processes. Freed by ``close``."""

    def __init__(self, shared: bool, slots: int = 2):
        self.shared, self.bufs, self.i = shared, [None] * slots, 0

    def take(self, nbytes: int) -> torch.Tensor:
        b = self.bufs[self.i]
        if b is None or b.numel() < nbytes:
            if b is not None and self.shared:
                shm_free(b)
            b = self.bufs[self.i] = shm_alloc(nbytes) if self.shared else torch.empty(nbytes, dtype=torch.uint8)
        self.i = (self.i + 1) % len(self.bufs)
        return b[:nbytes]

    def close(self) -> None:
        for b in self.bufs:
            if b is not None and self.shared:
                shm_free(b)
        self.bufs = [None] * len(self.bufs)


def unpack_shared(desc: dict, maps: dict | None = None) -> list[tuple[str, torch.Tensor]]:
    """A worker's view of a bucket in shared memory: (name, tensor) views of the mapped file, no copy. ``maps``: a
    cache of mapped files (path -> tensor) for the sync, so a reused ring buffer is mapped once."""
    header = [(n, d, tuple(s)) for n, d, s in desc["header"]]
    size = header_bytes(header)
    flat = (maps or {}).get(desc["shm"])
    if flat is None or flat.numel() < size:
        flat = torch.from_file(desc["shm"], shared=True, size=max(desc["capacity"], 1), dtype=torch.uint8)
        if maps is not None:
            maps[desc["shm"]] = flat
    return unpack(header, flat[:size])


def load_bucket(llm, header: Header, flat: torch.Tensor) -> None:
    """Load one received bucket into every worker of ``llm``: the shared-memory file's name when ``flat`` was made by
    ``shm_alloc`` (workers in other processes map it), else the (name, tensor) views themselves (in-process)."""
    path = _SHM_PATHS.get(_key(flat))
    if path is not None:
        desc = {"shm": path, "capacity": flat.untyped_storage().nbytes(), "header": header}
        llm.collective_rpc("load_weight_bucket", args=(desc,))
    else:
        llm.collective_rpc("load_weight_bucket", args=(unpack(header, flat),))
