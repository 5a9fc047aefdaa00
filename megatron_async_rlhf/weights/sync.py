"""Bucketed weight transfer over a bridge: full HF-named tensors packed into flat byte buffers.

Sender (a learner stage's weight owner): for each bucket, broadcast a small header (names, dtypes, shapes) and then
one flat uint8 buffer; an empty header ends the stage. Receivers (engine leaders) unpack views of the buffer.
Memory on either side is bounded by one bucket plus the tensors being gathered.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch

_DTYPES = {str(d): d for d in (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64,
                               torch.int32, torch.uint8, torch.int8)}


def buckets(named: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group tensors into lists of about ``bucket_bytes`` (a larger tensor gets a bucket of its own)."""
    cur, size = [], 0
    for name, t in named:
        n = t.numel() * t.element_size()
        if cur and size + n > bucket_bytes:
            yield cur
            cur, size = [], 0
        cur.append((name, t))
        size += n
    if cur:
        yield cur


def pack(bucket: list[tuple[str, torch.Tensor]]) -> tuple[list[tuple[str, str, tuple[int, ...]]], torch.Tensor]:
    header = [(name, str(t.dtype), tuple(t.shape)) for name, t in bucket]
    flat = torch.cat([t.detach().contiguous().reshape(-1).view(torch.uint8) for _, t in bucket])  # [bytes]
    return header, flat


def unpack(header: list[tuple[str, str, tuple[int, ...]]], flat: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    out, offset = [], 0
    for name, dtype, shape in header:
        dt = _DTYPES[dtype]
        n = dt.itemsize * int(torch.Size(shape).numel())
        out.append((name, flat[offset:offset + n].view(dt).reshape(shape)))
        offset += n
    return out


def send_stage(channel, named: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int, what: str) -> int:
    """Broadcast one stage's tensors from this rank (bridge rank 0). Returns bytes sent."""
    sent = 0
    for bucket in buckets(named, bucket_bytes):
        header, flat = pack(bucket)
        channel.broadcast_obj(header, 0, what)
        channel.broadcast(flat, 0, what)
        sent += flat.numel()
    channel.broadcast_obj([], 0, what)  # end of stage
    return sent


def recv_stage(channel, what: str) -> tuple[list[tuple[str, torch.Tensor]], int]:
    """Receive one stage's tensors (on a bridge's non-root rank). Returns (tensors, bytes)."""
    out, received = [], 0
    while True:
        header = channel.broadcast_obj(None, 0, what)
        if not header:
            return out, received
        size = sum(_DTYPES[d].itemsize * int(torch.Size(s).numel()) for _, d, s in header)
        flat = channel.broadcast(torch.empty(size, dtype=torch.uint8), 0, what)
        out += unpack(header, flat)
        received += size
