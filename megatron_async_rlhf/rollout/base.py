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


Span = tuple[int, int, int]  # (policy version, start, end): output tokens [start, end) were sampled by that version


@dataclass
class Sample:
    """One completion. ``logprobs[i]`` is the sampler's log-prob of ``token_ids[i]`` (after temperature).

    ``versions`` says which weights sampled which tokens: contiguous spans ``(version, start, end)`` over the output
    token indexes, covering ``[0, len(token_ids))`` in order. A sample made between two weight updates has one span
    (the default: every token at ``version``); one that was in flight while the engine's weights changed (the fully
    asynchronous schedule, :meth:`RolloutBackend.update_weights_between_steps`) has one span per version it saw.
    ``version`` is the OLDEST of them (the staleness that matters), :attr:`newest_version` the newest."""

    prompt_index: int
    prompt_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" (a stop token / EOS) or "length" (max_new_tokens reached)
    version: int  # the policy version (learner optimizer steps) of the (oldest) weights that produced it
    engine: int = 0
    reward: float | None = None  # raw reward, when scored on the rollout pool (reward.placement=rollout)
    versions: list[Span] | None = None  # None: one span, every token at ``version`` (filled in on construction)

    def __post_init__(self):
        if self.versions is None:
            self.versions = [(self.version, 0, len(self.token_ids))]
        else:
            self.versions = [tuple(int(x) for x in span) for span in self.versions]

    @property
    def newest_version(self) -> int:
        """The newest policy version that sampled any of this sample's tokens (= ``version`` for a single span)."""
        return max(v for v, _, _ in self.versions)

    def token_versions(self) -> list[int]:
        """The policy version that sampled each output token (``len(token_ids)`` entries)."""
        return [v for v, start, end in self.versions for _ in range(start, end)]


def check_spans(spans: list[Span], num_tokens: int) -> None:
    """Raise ValueError unless ``spans`` are contiguous, non-empty and in order, and cover exactly
    ``[0, num_tokens)``. (Versions normally increase from span to span; that is the caller's to check.)"""
    pos = 0
    for _, start, end in spans:
        if start != pos or end <= start:
            raise ValueError(f"version spans {spans} do not tile [0, {num_tokens}) in order")
        pos = end
    if pos != num_tokens or (num_tokens and not spans):
        raise ValueError(f"version spans {spans} do not cover [0, {num_tokens})")


@dataclass
class FinishedGroup:
    """A prompt group finished by the streaming interface (:meth:`RolloutBackend.step`): every one of its samples
    (``sampling.n`` of them, in sample order) of the group admitted as ``group_id``."""

    group_id: int
    samples: list[Sample]


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
    methods one at a time, so weights change only between calls: between two whole requests (:meth:`generate`), or,
    streaming (:meth:`admit` / :meth:`step`), between two engine steps with requests in flight."""

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

    # ----- streaming (the fully asynchronous schedule): requests live across calls and across weight updates -----
    # The caller drives the engine: admit groups whenever it likes, call step() while in_flight() > 0, and update the
    # weights between two steps. Weights then change mid-request; every Sample says which version sampled which of
    # its tokens (Sample.versions). Backends without it (rollout.backend=hf) raise NotImplementedError.
    IN_FLIGHT_KV = ("recompute", "keep")

    def _no_streaming(self, what: str):
        return NotImplementedError(
            f"rollout.backend={self.name!r} has no streaming generation ({what}): it only generates whole requests "
            "between weight updates (generate). Use rollout.backend=vllm for the fully asynchronous schedule")

    def admit(self, group_id: int, prompt: list[int], sampling: SamplingSettings,
              prompt_index: int | None = None) -> None:
        """Queue one prompt group: ``sampling.n`` samples of ``prompt``, generated by later :meth:`step` calls and
        returned together by the step that finishes the last of them. ``group_id`` must not be in flight already.
        ``prompt_index`` (default ``group_id``) is the samples' ``prompt_index`` and, with ``sampling.seed``, picks
        their seeds exactly as :meth:`generate` does for request prompt ``prompt_index``."""
        raise self._no_streaming("admit")

    def step(self) -> list[FinishedGroup]:
        """Run one engine step (one decoding step of every running request, prefill of newly admitted ones) and
        return the groups it finished (possibly none)."""
        raise self._no_streaming("step")

    def in_flight(self) -> int:
        """How many admitted groups have not been returned by :meth:`step` yet."""
        raise self._no_streaming("in_flight")

    def abort_all(self) -> list[int]:
        """Drop every group in flight (their partial samples are lost); returns their group ids."""
        raise self._no_streaming("abort_all")

    def update_weights_between_steps(self, receive: Callable[[Callable[[int], torch.Tensor]], Iterator[Bucket]],
                                     version: int, in_flight_kv: str = "recompute") -> dict:
        """:meth:`load_weight_stream` while groups are in flight (between two :meth:`step` calls); their later
        tokens are sampled by the new weights and labelled ``version``. ``in_flight_kv`` says what happens to the
        KV cache the old weights computed for them: ``recompute`` drops it (the requests are preempted and
        re-prefilled under the new weights, so every later token is sampled by exactly ``version``); ``keep`` keeps
        it (no recompute; later tokens are sampled by a MIXED model: old-weight keys/values for the positions before
        the update, new weights for the rest). Either way a request admitted later never reuses cached prefix blocks
        computed by older weights. Returns the load's stats plus ``in_flight`` (groups in flight) and
        ``in_flight_kv``."""
        raise self._no_streaming("update_weights_between_steps")

    def pause(self) -> None:
        """Nothing to do for either of today's backends: both run in the caller's thread, so between two calls
        (generate, or streaming :meth:`step`) nothing is generating and weights can change. A backend whose engine
        generates on its own (vLLM's AsyncLLM / multi-process engine core) stops it here, keeping its requests
        (``pause_generation(mode="keep")``)."""

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
