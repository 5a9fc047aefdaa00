"""Typed configuration: keyword-only dataclasses, one docstring per field, contracts checked in ``validate``.

Hydra YAML in ``conf/`` is turned into these once (``from_dict``); sub-configs are passed down, never a global.
Imports nothing heavy.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from megatron_async_rlhf.hf_llama import ConfigError


@dataclass(kw_only=True)
class ClusterConfig:
    """How one torchrun world splits into a learner pool (ranks ``[0, L)``) and a rollout pool (``[L, L+R)``)."""

    learner_tp: int = 1
    """Megatron tensor-parallel size of the learner."""
    learner_pp: int = 1
    """Megatron pipeline-parallel size of the learner."""
    learner_dp: int = 1
    """Learner data-parallel replicas. Learner ranks L = learner_tp * learner_pp * learner_dp."""
    rollout_engines: int = 1
    """Number of vLLM engines (data-parallel rollout)."""
    rollout_tp: int = 1
    """Devices per engine (vLLM tensor parallel), independent of the learner's layout. 1 on CPU."""
    devices_per_node: int = 0
    """GPUs per node; 0 on CPU, where both pools share the one machine (pinned to separate cores)."""
    timeout_s: float = 300.0
    """Longest wait on the other pool (one generation call, one weight sync) before the run fails with an error
    naming the engine and what it was doing."""
    startup_timeout_s: float = 900.0
    """Longest wait for an engine to start (model load, KV cache allocation) before the run fails."""
    idle_timeout_s: float = 3600.0
    """Longest an engine waits for its next command (the learner may train for long between calls)."""
    bucket_mb: float = 64.0
    """Weight-sync bucket size: tensors are packed into flat buffers of about this size per broadcast."""

    @property
    def learner_world(self) -> int:
        return self.learner_tp * self.learner_pp * self.learner_dp

    @property
    def rollout_world(self) -> int:
        return self.rollout_engines * self.rollout_tp

    @property
    def world(self) -> int:
        return self.learner_world + self.rollout_world

    def validate(self, world_size: int | None = None, cuda: bool = False) -> "ClusterConfig":
        for name in ("learner_tp", "learner_pp", "learner_dp", "rollout_engines", "rollout_tp"):
            if getattr(self, name) < 1:
                raise ConfigError(f"cluster.{name}={getattr(self, name)} must be >= 1")
        if self.timeout_s <= 0 or self.bucket_mb <= 0:
            raise ConfigError("cluster.timeout_s and cluster.bucket_mb must be > 0")
        if world_size is not None and world_size != self.world:
            raise ConfigError(
                f"the launch has {world_size} ranks but cluster needs learner {self.learner_tp}x{self.learner_pp}x"
                f"{self.learner_dp}={self.learner_world} + rollout {self.rollout_engines}x{self.rollout_tp}="
                f"{self.rollout_world} = {self.world}. Fix: launch with {self.world} ranks or change cluster.*"
            )
        if not cuda:
            if self.rollout_tp != 1:
                raise ConfigError(f"cluster.rollout_tp={self.rollout_tp}: on CPU each vLLM engine is one in-process "
                                  "worker; use rollout_tp=1 and more rollout_engines")
            return self
        n = self.devices_per_node
        if n < 1:
            raise ConfigError("cluster.devices_per_node must be set (GPUs per node) on GPU machines")
        if self.rollout_tp > n:
            raise ConfigError(f"cluster.rollout_tp={self.rollout_tp} is larger than a node ({n} devices): an engine "
                              "must fit in one node")
        if n % self.rollout_tp:
            raise ConfigError(f"cluster.rollout_tp={self.rollout_tp} does not divide devices_per_node={n}")
        if self.learner_world % n or self.rollout_world % n:
            raise ConfigError(
                f"learner pool ({self.learner_world} ranks) and rollout pool ({self.rollout_world} ranks) must each "
                f"fill whole nodes of {n} devices, or a node would be shared by both pools (overlapping pools)"
            )
        return self


@dataclass(kw_only=True)
class RolloutConfig:
    """The engines' build settings (see rollout.engine.EngineSettings)."""

    dtype: str = "float32"
    """Engine weights dtype: float32 on CPU for exact parity; bfloat16 on GPU."""
    max_model_len: int = 256
    """Prompt + completion tokens an engine accepts."""
    kv_cache_gib: float = 1.0
    """CPU: KV cache size (vLLM's own memory probe refuses to start in CPU sandboxes)."""
    gpu_memory_utilization: float = 0.85
    """GPU: share of device memory vLLM may use."""
    seed: int = 0
    """Engine seed (each engine adds its index)."""
    extra: dict = field(default_factory=dict)
    """Other vllm.LLM keyword arguments, passed through."""


def from_dict(cls, d: dict | None):
    """Build a config dataclass from a plain dict, rejecting unknown keys with the list of known ones."""
    d = dict(d or {})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} field(s) {unknown}; known: {sorted(known)}")
    return cls(**d)
