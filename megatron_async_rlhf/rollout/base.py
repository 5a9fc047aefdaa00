"""The rollout-backend interface: what the rollout rank's loop (``rollout/server.py``) needs from an engine, and a
registry of the implementations by ``rollout.backend``.

A backend samples completions tagged with the policy version of its weights and the sampler's per-token log-probs,
scores sequences (prompt log-probs), and replaces its weights bucket by bucket from the learner's stream of HF-named
tensors (``weights.sync.recv_buckets``). Adding one is one file: subclass :class:`RolloutBackend`, decorate it with
``@register_backend("name")`` and import the module in ``rollout/__init__.py``.
"""

from __future__ import annotations

import abc
import hashlib
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator

import torch

from megatron_async_rlhf.errors import ConfigError

if TYPE_CHECKING:  # the config layer sits above the rollout pool: it validates rollout.backend against the registry
    from megatron_async_rlhf.config import RolloutConfig


@dataclass(frozen=True, kw_only=True)
class SamplingSettings:
    """What to sample. ``n`` completions per prompt; generation stops at any ``stop_token_ids`` token (the model's
    EOS ids) or after ``max_new_tokens``. ``temperature=0`` decodes greedily (evaluation only)."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 32
    n: int = 1
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    """Reproducible sampling: prompt ``j`` of the request is sampled with seed ``prompt_seed(seed, j)`` (its index in
    the whole request, so the samples do not depend on how prompts are split over engines). None: the engine's
    own random stream."""

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0 = greedy decoding, for evaluation: "
                             "its log-probs are not a sampling distribution and must not feed an RL loss)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if self.max_new_tokens < 1 or self.n < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} and n={self.n} must be >= 1")


def prompt_seed(seed: int, prompt_index: int) -> int:
    """The seed of one prompt of a seeded request; its n samples use ``seed + 0 .. n-1`` (vLLM's convention)."""
    digest = hashlib.blake2b(f"{seed}/{prompt_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2  # 62 bits: room for + n


@dataclass
class Sample:
    """One completion. ``logprobs[i]`` is the sampler's log-prob of ``token_ids[i]`` (after temperature)."""

    prompt_index: int
    prompt_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" (a stop token / EOS) or "length" (max_new_tokens reached)
    version: int  # the policy version (learner optimizer steps) of the weights that produced it
    engine: int = 0
    reward: float | None = None  # raw reward, when scored on the rollout pool (reward.placement=rollout)


@dataclass(frozen=True)
class EngineSettings:
    """What an engine is built from: the HF directory (config, tokenizer, initial weights), its tensor-parallel size,
    and the run's rollout settings (``rollout.backend`` picks the implementation)."""

    model: str
    tensor_parallel: int
    rollout: RolloutConfig


Bucket = tuple[list, torch.Tensor]  # (header, flat bytes) as ``weights.sync.recv_buckets`` yields it


class RolloutBackend(abc.ABC):
    """One rollout engine. Built once per rollout rank (``build_backend(settings, index)``); the server calls its
    methods one at a time, so weights change only between calls unless a backend supports :meth:`pause`."""

    name: str = ""  # set by @register_backend
    # the dtype the engine holds its weights in, set once it is up: the learner stages a sync's tensors in it
    # (``weights.sync.wire_dtype``); None: not known, the learner sends its own
    weight_dtype: torch.dtype | None = None

    def __init__(self, settings: EngineSettings, index: int = 0):
        """Start the engine from ``settings.model`` (initial weights); ``index`` is the engine's place in the pool
        (it offsets the engine's own seed)."""
        self.settings, self.index, self.version = settings, index, 0

    @abc.abstractmethod
    def generate(self, prompts: list[list[int]], sampling: SamplingSettings, first_index: int = 0) -> list[Sample]:
        """``sampling.n`` samples per prompt (token ids), each tagged with ``self.version`` and the sampler's log-prob
        of every token after temperature. Prompt ``i`` is request prompt ``first_index + i`` (its seed)."""

    @abc.abstractmethod
    def score(self, sequences: list[list[int]]) -> list[list[float]]:
        """Log-probs of each sequence's tokens 1..L-1 under the current weights (temperature 1)."""

    # a weight update: begin, one load per bucket as it arrives, finish; driven by load_weight_stream
    @abc.abstractmethod
    def begin_weight_update(self) -> None:
        """Prepare to receive a full set of HF-named weights."""

    def bucket_buffer(self, nbytes: int) -> torch.Tensor:
        """Where a bucket of ``nbytes`` is received (uint8). Plain memory by default; a backend whose workers live in
        other processes returns shared memory, possibly reused between buckets of one update."""
        return torch.empty(nbytes, dtype=torch.uint8)

    @abc.abstractmethod
    def load_weight_bucket(self, header: list, flat: torch.Tensor) -> None:
        """Load one bucket (``weights.sync.unpack(header, flat)`` gives its tensors). ``flat`` may be reused for a
        later bucket once this returns: anything kept must be copied."""

    @abc.abstractmethod
    def finish_weight_update(self) -> dict:
        """Check every weight was replaced, drop caches of the old weights. Returns at least ``tensors`` (loaded),
        ``worker_pids`` and ``peak_extra_by_process`` ({pid: bytes} for processes other than this one)."""

    def end_weight_update(self) -> None:
        """Release what :meth:`begin_weight_update` took (receive buffers); called even when the update failed."""

    def load_weight_stream(self, receive: Callable[[Callable[[int], torch.Tensor]], Iterator[Bucket]],
                           version: int) -> dict:
        """Replace every weight as ``receive(alloc)`` yields buckets (``alloc``: :meth:`bucket_buffer`), each loaded
        as it arrives while the next is received, then take ``version``. Returns bytes, buckets, tensors, timings and
        peak extra memory (the rise of the peak resident set, per process)."""
        from megatron_async_rlhf.rollout.weight_stream import peak_rss, reset_peak_rss
        from megatron_async_rlhf.weights.sync import consume_prefetched

        rss0 = reset_peak_rss()
        t0 = time.perf_counter()
        stats = {"bytes": 0, "buckets": 0, "max_bucket_bytes": 0, "load_s": 0.0}

        def load(item: Bucket) -> None:
            header, flat = item
            tl = time.perf_counter()
            self.load_weight_bucket(header, flat)
            stats["load_s"] += time.perf_counter() - tl
            stats["bytes"] += flat.numel()
            stats["buckets"] += 1
            stats["max_bucket_bytes"] = max(stats["max_bucket_bytes"], flat.numel())

        self.begin_weight_update()
        try:
            consume_prefetched(receive(self.bucket_buffer), load)
            done = self.finish_weight_update()
        finally:
            self.end_weight_update()
        extra = {os.getpid(): peak_rss() - rss0, **done.pop("peak_extra_by_process", {})}
        stats.update(done, seconds=time.perf_counter() - t0, peak_extra_bytes=max(extra.values()),
                     peak_extra_by_process=extra)
        self.version = version
        return stats

    def pause(self) -> None:
        """Stop generating between decoding steps so weights can change mid-request. A no-op for backends that only
        change weights between calls (both today's); the fully async schedule will use vLLM's
        ``pause_generation`` here."""

    def resume(self) -> None:
        """Continue what :meth:`pause` stopped (a no-op where pause is)."""

    def close(self) -> None:
        """Shut the engine down now, while the process groups it was built on still exist."""

    def shutdown(self) -> None:
        """Alias of :meth:`close`."""
        self.close()


_BACKENDS: dict[str, type[RolloutBackend]] = {}


def register_backend(name: str):
    """Class decorator: make a :class:`RolloutBackend` buildable as ``rollout.backend=<name>``."""

    def wrap(cls: type[RolloutBackend]) -> type[RolloutBackend]:
        if name in _BACKENDS and _BACKENDS[name] is not cls:
            raise ValueError(f"rollout backend {name!r} registered twice ({_BACKENDS[name].__name__}, {cls.__name__})")
        cls.name = name
        _BACKENDS[name] = cls
        return cls

    return wrap


def backend_class(name: str) -> type[RolloutBackend]:
    """The class registered as ``name``; a ConfigError listing the registered names otherwise."""
    if name not in _BACKENDS:
        raise ConfigError(f"rollout.backend={name!r} is not a registered rollout backend; choose one of "
                          f"{sorted(_BACKENDS)}")
    return _BACKENDS[name]


def build_backend(settings: EngineSettings, index: int = 0) -> RolloutBackend:
    """Start engine ``index`` of the pool with the backend ``settings.rollout.backend``."""
    return backend_class(settings.rollout.backend)(settings, index)
