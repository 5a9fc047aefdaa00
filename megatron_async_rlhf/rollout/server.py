"""The rollout rank's loop: take commands from the learner's controller over bridge 0, one at a time.

Weights change only between commands, so a generation call never mixes two weight versions.
"""

from __future__ import annotations

import logging
import time

from megatron_async_rlhf.cluster import ClusterContext
from megatron_async_rlhf.rollout.engine import EngineSettings, RolloutEngine
from megatron_async_rlhf.weights.sync import recv_stage

log = logging.getLogger(__name__)

_ENGINES: dict[tuple, RolloutEngine] = {}  # per process: a test session re-uses its engine across layouts


def get_engine(settings: EngineSettings, index: int) -> RolloutEngine:
    key = (settings.model, settings.tensor_parallel, repr(settings.rollout), index)
    if key not in _ENGINES:
        close_engines()  # one engine per process
        _ENGINES[key] = RolloutEngine(settings, index)
    return _ENGINES[key]


def close_engines() -> None:
    """Shut the process's engine down while its process groups still exist (vLLM tears its groups down itself)."""
    for engine in _ENGINES.values():
        engine.close()
    _ENGINES.clear()


def serve(ctx: ClusterContext, settings: EngineSettings) -> dict:
    """Run until the controller says shutdown; returns this engine's counters."""
    if ctx.role.kind == "idle":  # an engine's non-leader rank on GPU: its device is driven by vLLM's own workers
        ctx.store.wait([f"{ctx.session}/shutdown"])
        return {}
    engine = get_engine(settings, ctx.role.engine)
    engine.version = 0
    ch = ctx.control
    ch.send_obj({"ready": True, "engine": ctx.role.engine}, 0, "reporting ready", timeout_s=ctx.cfg.startup_timeout_s)
    stats = {"generate_calls": 0, "syncs": 0, "samples": 0}
    while True:
        msg = ch.recv_obj(0, "waiting for a command from the learner", timeout_s=ctx.cfg.idle_timeout_s)
        cmd = msg["cmd"]
        if cmd == "shutdown":
            ch.send_obj(stats, 0, "acknowledging shutdown")
            return stats
        if cmd == "generate":
            t0 = time.perf_counter()
            samples = engine.generate(msg["prompts"], msg["sampling"], first_index=msg["first_index"])
            stats["generate_calls"] += 1
            stats["samples"] += len(samples)
            ch.send_obj({"samples": samples, "seconds": time.perf_counter() - t0}, 0, "returning samples")
        elif cmd == "score":
            ch.send_obj({"logprobs": engine.score(msg["sequences"])}, 0, "returning scores")
        elif cmd == "sync":
            t0 = time.perf_counter()
            named, nbytes = [], 0
            for stage in range(msg["stages"]):
                part, n = recv_stage(ctx.bridges[stage], f"receiving weights of stage {stage}")
                named += part
                nbytes += n
            t1 = time.perf_counter()
            engine.load_weights(named, msg["version"])
            stats["syncs"] += 1
            ch.send_obj({"version": engine.version, "recv_s": t1 - t0, "load_s": time.perf_counter() - t1,
                         "bytes": nbytes, "tensors": len(named)}, 0, "acknowledging a weight sync")
        else:
            raise ValueError(f"unknown rollout command {cmd!r}")
