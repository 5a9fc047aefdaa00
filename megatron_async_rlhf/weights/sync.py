"""Bucketed weight transfer over a bridge: full HF-named tensors packed into flat byte buffers, streamed.

Sender (a learner stage's weight owner): for each bucket, broadcast a small header (names, dtypes, shapes) and then
one flat uint8 buffer; an empty header ends the stage. The next bucket is gathered and packed while the previous one
is still on the wire (the broadcast runs in the backend's own thread), so the sender holds at most two packed buckets.
Receivers (engine leaders) get one bucket at a time (``recv_buckets``) and load it before the next is taken;
``consume_prefetched`` receives the next bucket while the engine loads the current one, never more than two buckets
alive.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, Iterable, Iterator

import torch

_DTYPES = {str(d): d for d in (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64,
                               torch.int32, torch.uint8, torch.int8)}

Header = list[tuple[str, str, tuple[int, ...]]]


def wire_dtype(learner: torch.dtype, engine: torch.dtype | None) -> torch.dtype:
    """The dtype a sync stages (gathers, packs, sends) the learner's weights in: the engine's, converted on the learner
    before any byte leaves it (an fp32 learner feeding a bf16 engine sends half the bytes, and the engine loads them
    without a cast). One exception: an engine wider than the learner (a bf16 learner, an fp32 engine) gets the
    learner's dtype, because widening a float is exact and the engine's load does it for free. ``engine`` None (not
    reported): the learner's."""
    if engine is None or engine == learner:
        return learner
    if learner.is_floating_point and engine.is_floating_point and engine.itemsize > learner.itemsize:
        return learner
    return engine


def dtype_from_name(name: str | None) -> torch.dtype | None:
    """``str(torch dtype)`` back to the dtype (what engines report at start-up); None stays None."""
    if name is None:
        return None
    if name not in _DTYPES:
        raise ValueError(f"unknown weight dtype {name!r}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def buckets(groups: Iterable[list[tuple[str, torch.Tensor]]], bucket_bytes: int
            ) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group tensors into lists of about ``bucket_bytes``. A group (the parts of one fused tensor: q/k/v, gate/up) is
    never split, and a group larger than ``bucket_bytes`` gets a bucket of its own."""
    cur, size = [], 0
    for group in groups:
        n = sum(t.numel() * t.element_size() for _, t in group)
        if cur and size + n > bucket_bytes:
            yield cur
            cur, size = [], 0
        cur += group
        size += n
    if cur:
        yield cur


def pack(bucket: list[tuple[str, torch.Tensor]], out: torch.Tensor | None = None) -> tuple[Header, torch.Tensor]:
    """(header, flat bytes); into ``out`` (a uint8 buffer of exactly the bucket's size) when given."""
    header = [(name, str(t.dtype), tuple(t.shape)) for name, t in bucket]
    parts = [t.detach().contiguous().reshape(-1).view(torch.uint8) for _, t in bucket]  # [bytes] each
    return header, (torch.cat(parts) if out is None else torch.cat(parts, out=out))


class PackBuffers:
    """The sender's two pack buffers, used in turn (bucket i+2 reuses bucket i's, whose broadcast has been waited for)
    and kept across syncs: packing into fresh memory costs ~6x a copy into pages already mapped (a 64 MB bucket:
    ~22 ms vs ~3.5 ms on one CPU core). Holds two buckets (at least the largest tensor group each) on the learner."""

    def __init__(self):
        self.bufs: list[torch.Tensor | None] = [None, None]
        self.i = 0

    def take(self, nbytes: int, device: torch.device) -> torch.Tensor:
        b = self.bufs[self.i]
        if b is None or b.numel() < nbytes or b.device != device:
            b = self.bufs[self.i] = torch.empty(nbytes, dtype=torch.uint8, device=device)
        self.i = (self.i + 1) % 2
        return b[:nbytes]


def header_bytes(header: Header) -> int:
    return sum(_DTYPES[d].itemsize * int(torch.Size(s).numel()) for _, d, s in header)


def unpack(header: Header, flat: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Views of ``flat`` (no copy)."""
    out, offset = [], 0
    for name, dtype, shape in header:
        dt = _DTYPES[dtype]
        n = dt.itemsize * int(torch.Size(shape).numel())
        out.append((name, flat[offset:offset + n].view(dt).reshape(shape)))
        offset += n
    return out


def send_stage(channel, groups: Iterable[list[tuple[str, torch.Tensor]]], bucket_bytes: int, what: str,
               bufs: PackBuffers | None = None) -> int:
    """Broadcast one stage's tensors from this rank (bridge rank 0), packing bucket i+1 while bucket i is sent.
    Returns bytes sent."""
    sent, in_flight = 0, None
    bufs = bufs or PackBuffers()
    for bucket in buckets(groups, bucket_bytes):  # the TP gathers of the next bucket run here
        nbytes = sum(t.numel() * t.element_size() for _, t in bucket)
        header, flat = pack(bucket, bufs.take(nbytes, bucket[0][1].device))
        if in_flight is not None:
            in_flight()
        channel.broadcast_obj(header, 0, what)
        in_flight = channel.broadcast(flat, 0, what, wait=False)
        sent += flat.numel()
    if in_flight is not None:
        in_flight()
    channel.broadcast_obj([], 0, what)  # end of stage
    return sent


def recv_buckets(channel, what: str, alloc: Callable[[int], torch.Tensor] | None = None
                 ) -> Iterator[tuple[Header, torch.Tensor]]:
    """Receive one stage's buckets (on a bridge's non-root rank), one (header, flat bytes) at a time. ``alloc(n)``
    makes the receive buffer (default: plain memory; a multi-process engine passes shared memory)."""
    while True:
        header = channel.broadcast_obj(None, 0, what)
        if not header:
            return
        size = header_bytes(header)
        buf = alloc(size) if alloc is not None else torch.empty(size, dtype=torch.uint8)
        got = channel.broadcast(buf, 0, what)
        if alloc is not None and got is not buf:  # GPU bridge: the bytes landed in a device copy; the caller's buffer
            buf.copy_(got)  # (shared memory for vLLM's workers) must hold them. CUDA IPC handles would avoid this hop
            got = buf
        yield header, got


def recv_stage(channel, what: str) -> tuple[list[tuple[str, torch.Tensor]], int]:
    """A whole stage at once: (tensors, bytes). For tools and tests; the engines load bucket by bucket."""
    out, received = [], 0
    for header, flat in recv_buckets(channel, what):
        out += unpack(header, flat)
        received += flat.numel()
    return out, received


def consume_prefetched(items: Iterator, consume: Callable, depth: int = 1) -> list:
    """``[consume(x) for x in items]``, with ``items`` advanced in a background thread up to ``depth`` items ahead:
    the next bucket is received while this one loads. At most ``depth + 1`` items are alive at once (a slot is freed
    only after ``consume`` returned and its item was dropped). An exception in either thread is raised here."""
    slots = threading.Semaphore(depth + 1)
    out: queue.Queue = queue.Queue()
    done, stop = object(), threading.Event()

    def produce():
        try:
            while True:
                slots.acquire()
                if stop.is_set():
                    return
                item = next(items, done)
                out.put((item, None))
                if item is done:
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            out.put((None, e))

    threading.Thread(target=produce, name="bucket-prefetch", daemon=True).start()
    results = []
    try:
        while True:
            item, err = out.get()
            if err is not None:
                raise err
            if item is done:
                return results
            results.append(consume(item))
            del item
            slots.release()
    finally:
        stop.set()
        slots.release()
