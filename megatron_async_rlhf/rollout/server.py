"""The rollout rank's loop: take commands from the learner's controller over bridge 0, one at a time.

Weights change only between commands, so a generation call never mixes two weight versions. The engine is held by a
supervisor (``supervisor.py``): an engine that dies or hangs is restarted with the weights it held and the command
repeated; the controller is told first (``{"event": ...}`` messages before the answer). An engine that cannot be
restarted answers ``{"failed": why}`` and waits for the shutdown.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Callable

import torch

from megatron_async_rlhf.cluster import ClusterContext, wait_for_key
from megatron_async_rlhf.rollout.base import EngineSettings, RolloutBackend, build_backend
from megatron_async_rlhf.rollout.supervisor import EngineGaveUp, EngineSupervisor
from megatron_async_rlhf.weights.sync import recv_buckets

log = logging.getLogger(__name__)

_ENGINES: dict[tuple, RolloutBackend] = {}  # per process: a test session re-uses its engine across layouts

# an extra command: (ctx, engine, msg) -> None, answering on ctx.control itself (tools/bench_weight_sync.py's own)
Handler = Callable[[ClusterContext, RolloutBackend, dict], None]


def get_engine(settings: EngineSettings, index: int) -> RolloutBackend:
    """This process's engine for ``settings`` (``rollout.backend`` picks the class), started on first use."""
    key = (settings.model, settings.tensor_parallel, repr(settings.rollout), index)
    if key not in _ENGINES:
        close_engines()  # one engine per process
        _ENGINES[key] = build_backend(settings, index)
    return _ENGINES[key]


def close_engines() -> None:
    """Shut the process's engine down while its process groups still exist (vLLM tears its groups down itself)."""
    for engine in _ENGINES.values():
        engine.close()
    _ENGINES.clear()


def bridge_receiver(ctx: ClusterContext, stages: int):
    """``receive(alloc)`` for ``RolloutBackend.load_weight_stream``: every stage's buckets from its bridge, in stage
    order, each yielded as it arrives."""
    def receive(alloc):
        for stage in range(stages):
            yield from recv_buckets(ctx.bridges[stage], f"receiving weights of stage {stage}", alloc)

    return receive


def serve(ctx: ClusterContext, settings: EngineSettings, reward=None, handlers: dict[str, Handler] | None = None
          ) -> dict:
    """Run until the controller says shutdown; returns this engine's counters. ``reward``: the run's
    ``RewardConfig`` when rewards are computed here (``reward.placement=rollout``): every generation request that
    carries its rows is scored right after it is generated (``rewards/placement.py``). ``handlers``: commands beyond
    the core protocol (generate, score, sync, shutdown), by name: a mode's own commands (``modes/rl``: ``score_texts``)
    or a tool's (``tools/bench_weight_sync.py``)."""
    handlers = handlers or {}
    clash = sorted(set(handlers) & {"shutdown", "generate", "score", "sync"})
    if clash:
        raise ValueError(f"extra rollout commands {clash} would replace production ones")
    if ctx.role.kind == "idle":  # an engine's non-leader rank: vLLM's own workers drive its device (or, on CPU, cores)
        wait_for_key(ctx.store, f"{ctx.session}/shutdown")
        return {}
    rc = settings.rollout
    sup = EngineSupervisor(lambda: get_engine(settings, ctx.role.engine), close_engines, ctx.role.engine,
                           rc.max_restarts, rc.hang_timeout_s or 0.8 * ctx.cfg.timeout_s)
    engine = sup.engine
    ch = ctx.control
    if ctx.reward_bridge is not None:  # its reward rank has its scorer loaded
        ctx.reward_bridge.recv_obj(1, "loading the reward scorer", timeout_s=ctx.cfg.startup_timeout_s)
    dtype = None if engine.weight_dtype is None else str(engine.weight_dtype)  # the learner stages syncs in it
    ch.send_obj({"ready": True, "engine": ctx.role.engine, "dtype": dtype}, 0, "reporting ready",
                timeout_s=ctx.cfg.startup_timeout_s)
    stats = {"generate_calls": 0, "syncs": 0, "samples": 0, "restarts": 0}

    def notify(event: dict) -> None:  # a restart, told to the controller before the command's answer
        ch.send_obj(event, 0, "reporting an engine restart")

    reward_fn = None
    if reward is not None:
        from transformers import AutoTokenizer

        from megatron_async_rlhf.rewards.placement import RewardFn

        reward_fn = RewardFn(reward, AutoTokenizer.from_pretrained(settings.model))
    failed = None  # why this engine is gone for good: every later command is answered with it
    while True:
        msg = ch.recv_obj(0, "waiting for a command from the learner", timeout_s=ctx.cfg.idle_timeout_s)
        cmd = msg["cmd"]
        stats["restarts"] = sup.restarts
        if cmd == "shutdown":
            if ctx.reward_bridge is not None:
                ctx.reward_bridge.send_obj({"cmd": "shutdown"}, 1, "stopping the reward rank")
            ch.send_obj(stats, 0, "acknowledging shutdown")
            return stats
        if failed is not None:
            if cmd == "sync":  # the stage owners send regardless: receive and drop
                for _ in bridge_receiver(ctx, msg["stages"])(lambda n: torch.empty(n, dtype=torch.uint8)):
                    pass
            ch.send_obj({"failed": failed}, 0, "reporting a failed engine")
            continue
        try:
            _command(ctx, sup, msg, stats, reward_fn, handlers, notify)
        except EngineGaveUp as e:
            failed = str(e)
            log.error("%s", failed)
            ch.send_obj({"failed": failed}, 0, "reporting a failed engine")


def _command(ctx: ClusterContext, sup: EngineSupervisor, msg: dict, stats: dict, reward_fn, handlers: dict,
             notify) -> None:
    """Carry out one command of the controller and answer it."""
    ch, cmd = ctx.control, msg["cmd"]
    if cmd == "generate":
        t0 = time.perf_counter()
        samples = sup.call("generating", lambda e: e.generate(msg["prompts"], msg["sampling"],
                                                              first_index=msg["first_index"]), notify)
        reward_s = 0.0
        if msg.get("rows") is not None and (reward_fn is not None or ctx.reward_bridge is not None):
            from megatron_async_rlhf.rewards.placement import score_in_place, score_remotely

            rows = {msg["first_index"] + i: r for i, r in enumerate(msg["rows"])}
            if ctx.reward_bridge is not None:  # reward.placement=dedicated: this engine's reward rank scores
                reward_s = score_remotely(ctx.reward_bridge, samples, rows)
            else:
                reward_s = score_in_place(reward_fn, samples, rows)
        stats["generate_calls"] += 1
        stats["samples"] += len(samples)
        ch.send_obj({"samples": samples, "seconds": time.perf_counter() - t0, "reward_s": reward_s}, 0,
                    "returning samples")
    elif cmd == "score":
        ch.send_obj({"logprobs": sup.call("scoring", lambda e: e.score(msg["sequences"]), notify)}, 0,
                    "returning scores")
    elif cmd == "sync":
        load = sup.load_weights(bridge_receiver(ctx, msg["stages"]), msg["version"], notify)
        stats["syncs"] += 1
        stats["pid"], stats["worker_pids"] = os.getpid(), load.get("worker_pids", [])
        ch.send_obj({**load, "version": sup.engine.version}, 0, "acknowledging a weight sync")
    elif cmd in handlers:
        handlers[cmd](ctx, sup.engine, msg)
    else:
        raise ValueError(f"unknown rollout command {cmd!r}")
