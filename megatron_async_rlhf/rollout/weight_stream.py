"""The vLLM backend's side of a weight sync: received buckets streamed into vLLM's workers, each loaded on arrival
(driven by ``RolloutBackend.load_weight_stream``, loaded by vLLM's weight-update lifecycle with the project's
``mrlhf_shm`` transfer backend, ``transfer_backend.py``), and the process-memory helpers every backend's stats use.

In-process engines get each bucket's tensors (views of the received buffer) directly. Multi-process engines (vLLM's
``VLLM_ENABLE_V1_MULTIPROCESSING=1``, one worker process per TP rank) get the name of a shared-memory file that the
bucket was received into: the workers map the same pages, nothing is copied or serialised. The files belong to the
run and the process that made them (``weights/shm.py``: ``mrlhf-<run>-<pid>-<n>``, guarded by a lock that process
holds), so files of a killed process are removed by the next sweep and never those of a live one. (On GPU the same place is
for CUDA IPC handles; not written yet.) The next bucket is received while the workers load the current one, so at most
two buckets are alive on the engine (``weights.sync.consume_prefetched``); each is freed once its load returned.

Peak extra memory is measured per process as the rise of the peak resident set (``VmHWM``, reset through
``/proc/self/clear_refs``) over the resident set when the sync began.
"""

from __future__ import annotations

import logging

import torch

from megatron_async_rlhf.weights import shm
from megatron_async_rlhf.weights.sync import header_bytes, unpack


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


_swept = False


def shm_alloc(nbytes: int) -> torch.Tensor:
    """A uint8 buffer in a new shared-memory file of this run and process (``weights/shm.py``); ``shm_free`` unlinks
    it. The first call in a process sweeps files whose owners are gone."""
    global _swept
    if not _swept:
        _swept = True
        removed = shm.sweep_stale_shm()
        if removed:
            logging.getLogger("megatron_async_rlhf").info("removed %d shared-memory files of dead processes (%s ...)",
                                                          len(removed), removed[0])
    path = shm.new_path()
    t = torch.from_file(path, shared=True, size=max(nbytes, 1), dtype=torch.uint8)[:nbytes]
    _SHM_PATHS[_key(t)] = path
    return t


def shm_free(t: torch.Tensor) -> None:
    path = _SHM_PATHS.pop(_key(t), None)
    if path:
        shm.remove(path)


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


def shm_path(flat: torch.Tensor) -> str | None:
    """The shared-memory file behind ``flat`` when ``shm_alloc`` made it, else None."""
    return _SHM_PATHS.get(_key(flat))

